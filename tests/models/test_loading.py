"""Checkpoint loading and saving: errors name the tensor; shards; dtypes; every bad
Hugging Face folder (safetensors, index, config.json) is refused naming the file and the problem."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.flax import load_file, save_file
from safetensors.numpy import load_file as load_numpy, save_file as save_numpy

import tiny
from catjax.models import forward, load_hf, load_model, save_hf
from catjax.models.lazy import LazyTensors
from catjax.base.errors import InputError
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


# --- bad Hugging Face folders ----------------------------------------------------------

W = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf") / "m"
  tiny.hf_folder(path, seed=3)
  return path


def _tensors(edit):
  def apply(folder):
    t = dict(load_numpy(str(folder / "model.safetensors")))
    edit(t)
    save_numpy(t, str(folder / "model.safetensors"))
  return apply


def _value(v):
  def edit(t):
    t[W] = t[W].copy()
    t[W].flat[5] = v
  return _tensors(edit)


def _cast(dtype):
  return _tensors(lambda t: t.update({W: t[W].astype(dtype)}))


def _cut(name, keep):
  def apply(folder):
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[:keep if keep >= 1 else int(len(data) * keep)])
  return apply


def _config(**kw):
  def apply(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    for k, v in kw.items():
      if v is _DROP:
        cfg.pop(k, None)
      else:
        cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))
  return apply


_DROP = object()


def _index(weight_map_edit=None, text=None):
  def apply(folder):
    names = list(load_numpy(str(folder / "model.safetensors")))
    wm = dict.fromkeys(names, "model.safetensors")
    if weight_map_edit is not None:
      weight_map_edit(wm)
    (folder / "model.safetensors.index.json").write_text(
        text if text is not None else json.dumps({"weight_map": wm}))
  return apply


ST, CFG, IDX = "model.safetensors", "config.json", "model.safetensors.index.json"
# case: (edit, file named, words of the message, load kwargs)
HF_BAD = {
    "NaN weight": (_value(np.nan), ST, [f"tensor '{W}'", "non-finite"], {}),
    "Inf weight": (_value(-np.inf), ST, [f"tensor '{W}'", "non-finite"], {}),
    "f16 overflow": (_value(1e6), ST, [f"tensor '{W}'", "overflows float16"],
                     {"dtype": jnp.float16}),
    "int32 weight": (_cast(np.int32), ST, [f"tensor '{W}'", "dtype I32", "float"], {}),
    "bool weight": (_cast(np.bool_), ST, [f"tensor '{W}'", "dtype BOOL"], {}),
    "uint8 weight": (_cast(np.uint8), ST, [f"tensor '{W}'", "dtype U8"], {}),
    "missing tensor": (_tensors(lambda t: t.pop(W)), ".", [f"tensor '{W}' is missing"], {}),
    "truncated safetensors": (_cut(ST, 0.5), ST, ["not a readable safetensors file"], {}),
    "empty safetensors": (_cut(ST, 0), ST, ["not a readable safetensors file"], {}),
    "safetensors header cut": (_cut(ST, 5), ST, ["not a readable safetensors file"], {}),
    "index not JSON": (_index(text="{oops"), IDX, ["not valid JSON", "line 1"], {}),
    "index without weight_map": (_index(text="{}"), IDX, ['"weight_map"'], {}),
    "index weight_map a list": (_index(text='{"weight_map": []}'), IDX, ['"weight_map"'], {}),
    "index names a missing shard": (
        _index(lambda wm: wm.update({W: "model-00002-of-00002.safetensors"})), IDX,
        ["'model-00002-of-00002.safetensors'", f"'{W}'"], {}),
    "index lists a tensor its file lacks": (
        _index(lambda wm: wm.update({"model.layers.0.mlp.extra": ST})), ST,
        ["'model.layers.0.mlp.extra' is missing"], {}),
    "config not JSON": (tiny.write_edit(CFG, '{"vocab_size": 128,'), CFG, ["not valid JSON"], {}),
    "config not UTF-8": (tiny.write_edit(CFG, b"\xff\xfe{}"), CFG, ["not UTF-8"], {}),
    "config a list": (tiny.write_edit(CFG, "[1, 2]"), CFG, ["JSON object", "list"], {}),
    "config missing vocab_size": (_config(vocab_size=_DROP), CFG, ["'vocab_size'", "missing"], {}),
    "config missing num_attention_heads": (_config(num_attention_heads=_DROP), CFG,
                                           ["'num_attention_heads'", "missing"], {}),
    "rope_theta 0": (_config(rope_theta=0), CFG, ["rope_theta=0", "positive"], {}),
    "rope_theta negative": (_config(rope_theta=-5e5), CFG, ["rope_theta=-500000.0"], {}),
    "rms_norm_eps 0": (_config(rms_norm_eps=0.0), CFG, ["rms_norm_eps=0.0", "positive"], {}),
    "rms_norm_eps NaN": (_config(rms_norm_eps=float("nan")), CFG, ["rms_norm_eps=nan", "finite"],
                         {}),
    "rms_norm_eps a string": (_config(rms_norm_eps="1e-6"), CFG, ["rms_norm_eps='1e-6'"], {}),
    "vocab_size 0": (_config(vocab_size=0), CFG, ["vocab_size=0", "positive integer"], {}),
    "hidden_size a float": (_config(hidden_size=64.5), CFG, ["hidden_size=64.5"], {}),
    "vocab_size a string": (_config(vocab_size="128"), CFG, ["vocab_size='128'"], {}),
    "max_position_embeddings 0": (_config(max_position_embeddings=0), CFG,
                                  ["max_position_embeddings=0"], {}),
    "heads do not divide hidden": (_config(head_dim=_DROP, num_attention_heads=5,
                                           num_key_value_heads=5), CFG,
                                   ["num_attention_heads=5", "hidden_size=64"], {}),
    "kv heads do not divide heads": (_config(num_key_value_heads=3), CFG,
                                     ["num_kv_heads=3"], {}),
    "linear rope factor 0": (_config(rope_scaling={"rope_type": "linear", "factor": 0}), CFG,
                             ["rope_scaling.factor=0"], {}),
    "llama3 rope low == high": (
        _config(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                              "high_freq_factor": 4.0}), CFG, ["low_freq_factor=4.0"], {}),
    "rope_scaling a list": (_config(rope_scaling=[8.0]), CFG, ["rope_scaling=[8.0]"], {}),
    "tie_word_embeddings a string": (_config(tie_word_embeddings="no"), CFG,
                                     ["tie_word_embeddings='no'"], {}),
    "eos_token_id a string": (_config(eos_token_id="</s>"), CFG, ["eos_token_id='</s>'"], {}),
    # 10^11 parameters by the config: refused from the tensors' shapes, nothing allocated.
    "intermediate_size too large for memory": (
        _config(intermediate_size=10**9), ST, ["mlp/gate_proj/kernel", "from the config",
                                               "expected (1000000000, 64)"], {}),
}


@pytest.mark.parametrize("case", list(HF_BAD))
def test_bad_hugging_face_folders(hf_base, tmp_path, case):
  edit, file, words, kw = HF_BAD[case]
  folder = tmp_path / "m"
  shutil.copytree(hf_base, folder)
  edit(folder)
  where = folder if file == "." else folder / file
  tiny.raises(InputError, words, load_hf, folder, path=where, **kw)


def test_parameters_larger_than_free_memory_are_refused_before_allocating(hf_base, monkeypatch):
  from catjax.models import loading
  need = []
  monkeypatch.setattr(loading, "available_bytes", lambda device: need.append(device) or 1000)
  monkeypatch.setattr(loading, "_zeros", lambda *a: pytest.fail("allocated before the check"))
  tiny.raises(InputError, ["its parameters need 0.0 GiB in float32", "0.0 GiB free",
                           "--dtype bfloat16"], load_hf, hf_base, path=hf_base)
  assert need == [jax.devices()[0]]
