"""Quantized checkpoints of a foreign NNX model (`catjax.artifacts.foreign`): saved by
its own parameter paths, loaded onto a rebuilt float model, equal to the saved one."""

import json

import numpy as np
import pytest
from flax import nnx

from catjax.artifacts.checkpoint import CheckpointError
from catjax.artifacts.foreign import load_foreign, save_foreign
from catjax.ptq import foreign
from catjax.ptq.recipe import Recipe
from catjax.ptq.rules import Rule

from foreign_net import CALIB, TOKENS, Net

BLOCKS = r"blocks/\d+"


def _quantized(recipe, **kw):
  return foreign.quantize(Net(), Rule(r"blocks/\d+/.*", recipe), CALIB, blocks=BLOCKS,
                          progress=False, **kw)


@pytest.mark.parametrize("recipe", [
    Recipe(method="cat", block_size=8), Recipe(method="cat", block_size=8, weights="gptq"),
    Recipe(method="hadamard", w_format="nvfp4", a_format="nvfp4"), Recipe(method="smoothquant", w_bits=8),
], ids=lambda r: r.label)
def test_round_trip_onto_a_rebuilt_model(tmp_path, recipe):
  q = _quantized(recipe)
  save_foreign(q, tmp_path / "ck")
  manifest = json.loads((tmp_path / "ck" / "quantization.json").read_text())
  integer = recipe.w_format == "int"
  assert {info["integer"] for info in manifest["linears"].values()} == {integer}
  assert "blocks/1/o/w.values" in manifest["tensors"] if integer else "blocks/1/o/w" in manifest["tensors"]
  assert "head/kernel" in manifest["tensors"] and "embed/embedding" in manifest["tensors"]
  back = load_foreign(Net(seed=7), tmp_path / "ck")  # other weights: all come from the file
  assert back.blocks[0].q.catjax_input.transform is back.blocks[0].k.catjax_input.transform
  np.testing.assert_array_equal(back(TOKENS), q(TOKENS))
  run = nnx.jit(lambda m, t: m(t))
  np.testing.assert_array_equal(run(back, TOKENS), run(q, TOKENS))
  assert len(manifest["sites"]) == 8  # 2 blocks × (q/k/v, o, gate/up, down)


def test_integer_codes_are_in_the_weights_own_shape(tmp_path):
  from safetensors.numpy import load_file
  save_foreign(_quantized(Recipe(method="cat", block_size=8)), tmp_path / "ck")
  tensors = load_file(str(tmp_path / "ck" / "model.safetensors"))
  codes = tensors["blocks/0/o/w.values"]
  assert codes.dtype == np.int8 and codes.shape == (4, 8, 32)  # (N, H, D), as the model holds it
  assert np.abs(codes).max() <= 7 and tensors["blocks/0/o/w.scale"].shape == (32,)


def test_bad_checkpoints_are_one_clear_error(tmp_path):
  q = _quantized(Recipe(method="cat", block_size=8))
  with pytest.raises(ValueError, match="needs a model quantized by catjax.quantize"):
    save_foreign(Net(), tmp_path / "none")
  folder = save_foreign(q, tmp_path / "ck")
  with pytest.raises(FileExistsError):
    save_foreign(q, folder)
  with pytest.raises(CheckpointError, match="no such file"):
    load_foreign(Net(), tmp_path)
  with pytest.raises(CheckpointError, match=r"no tensor for the model's parameters \['blocks/2/"):
    load_foreign(Net(layers=3), folder)  # another model: a block the file does not have
  with pytest.raises(CheckpointError, match="linear 'blocks/1/down' is not a linear of the model"):
    load_foreign(Net(layers=1), folder)
  manifest = folder / "quantization.json"
  text = manifest.read_text()
  manifest.write_text(text.replace('"in_ndim": 2', '"in_ndim": 1'))
  with pytest.raises(CheckpointError, match="checksum does not match"):
    load_foreign(Net(), folder)
  manifest.write_text(text)
  data = bytearray((folder / "model.safetensors").read_bytes())
  data[-1] ^= 1
  (folder / "model.safetensors").write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match="sha256 differs"):
    load_foreign(Net(), folder)
