"""Checkpoint loading and saving: errors name the tensor; shards; dtypes."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.flax import load_file, save_file

import tiny
from catjax.models import forward, load_hf, load_model, save_hf
from catjax.models.lazy import LazyTensors
from catjax.models.loading import hf_tensors, params_from_hf


@pytest.fixture
def folder(tmp_path):
  model = tiny.hf_folder(tmp_path / "m", seed=1)
  return tmp_path / "m", model


def _rewrite(folder, edit):
  tensors = dict(load_file(str(folder / "model.safetensors")))
  edit(tensors)
  save_file(tensors, str(folder / "model.safetensors"))


def test_save_then_load_round_trip(folder):
  path, model = folder
  back = load_model(path)
  toks = tiny.tokens((1, 16), 128)
  np.testing.assert_array_equal(np.asarray(forward(back, toks)), np.asarray(forward(model, toks)))
  assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 2


def test_bfloat16_checkpoint_and_model(folder, tmp_path):
  path, model = folder
  _rewrite(path, lambda t: t.update({k: v.astype(jnp.bfloat16) for k, v in t.items()}))
  bf = load_hf(path, dtype=jnp.bfloat16)
  assert bf.dtype == jnp.bfloat16
  f32 = load_hf(path)
  expected = np.asarray(model.layers.attn.q_proj.kernel[...]).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(f32.layers.attn.q_proj.kernel[...]),
                                np.asarray(expected, np.float32))


def test_sharded_checkpoint(folder, tmp_path):
  path, model = folder
  tensors = {k: np.asarray(v) for k, v in hf_tensors(model).items()}
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  out = tmp_path / "sharded"
  out.mkdir()
  (out / "config.json").write_text((path / "config.json").read_text())
  for file, part in shards.items():
    save_file({n: jnp.asarray(tensors[n]) for n in part}, str(out / file))
  (out / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {n: f for f, part in shards.items() for n in part}}))
  toks = tiny.tokens((1, 8), 128)
  np.testing.assert_array_equal(np.asarray(forward(load_hf(out), toks)),
                                np.asarray(forward(model, toks)))


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     "tensor 'model.layers.1.mlp.up_proj.weight' is missing"),
    (lambda t: t.update({"model.layers.0.mlp.extra.weight": jnp.zeros(3)}),
     "unknown tensor 'model.layers.0.mlp.extra.weight'"),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": jnp.zeros((32, 60))}),
     r"tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(32, 60\), expected \(32, 64\)"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": jnp.zeros(64)}),
     "tensor 'model.layers.0.self_attn.q_proj.bias' has no place"),
])
def test_bad_checkpoints_name_the_tensor(folder, edit, match):
  path, _ = folder
  _rewrite(path, edit)
  with pytest.raises(ValueError, match=match):
    load_hf(path)


def test_missing_files_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load_hf(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(tiny.config().to_hf()))
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    load_hf(tmp_path)
  with pytest.raises(ValueError, match="expected a Hugging Face model folder or a .gguf file"):
    load_model(tmp_path / "config.json")


def _counting(tensors):
  reads = {}

  def read(name):
    reads[name] = reads.get(name, 0) + 1
    return np.asarray(tensors[name])

  return LazyTensors({n: (lambda n=n: read(n)) for n in tensors}), reads


def test_lazy_tensors_are_read_once_each_and_names_checked_first(folder):
  path, model = folder
  tensors = {k: np.asarray(v) for k, v in hf_tensors(model).items()}
  lazy, reads = _counting(tensors)
  back = params_from_hf(model.config, lazy)
  assert reads == dict.fromkeys(tensors, 1)
  toks = tiny.tokens((1, 16), 128)
  np.testing.assert_array_equal(np.asarray(forward(back, toks)), np.asarray(forward(model, toks)))
  lazy, reads = _counting({**tensors, "model.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match="unknown tensor 'model.extra.weight'"):
    params_from_hf(model.config, lazy)
  assert reads == {}  # refused before reading anything


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_conversion_to_the_target_dtype_matches_jax(folder, dtype):
  path, model = folder
  got = hf_tensors(load_hf(path, dtype=dtype))
  for name, want in hf_tensors(model).items():
    assert got[name].dtype == dtype
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want.astype(dtype)))


def test_save_shards_above_the_threshold(folder, tmp_path):
  _, model = folder
  out = tmp_path / "sharded"
  save_hf(model, out, max_shard_bytes=40_000)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  assert len(files) > 2 and not (out / "model.safetensors").exists()
  assert sorted(p.name for p in out.glob("model-*.safetensors")) == files
  assert index["metadata"]["total_size"] == sum(t.nbytes for t in hf_tensors(model).values())
  toks = tiny.tokens((1, 16), 128)
  np.testing.assert_array_equal(np.asarray(forward(load_hf(out), toks)),
                                np.asarray(forward(model, toks)))
  save_hf(model, out)  # one file again: the shards and index go
  assert [p.name for p in out.glob("model*.safetensors*")] == ["model.safetensors"]
  with pytest.raises(ValueError, match="max_shard_bytes=0"):
    save_hf(model, out, max_shard_bytes=0)
