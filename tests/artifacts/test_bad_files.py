"""Bad input files are refused with one clear error naming the file and what is wrong."""

import json
import logging
import os
import shutil
import subprocess
import sys
import time

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import tiny
from catjax.app import assets
from catjax.artifacts import checkpoint
from catjax.artifacts.checkpoint import MANIFEST, CheckpointError, load_quantized, save_quantized
from catjax.app.data import text_windows
from catjax.base.errors import InputError
from catjax.models import load_gguf, load_hf
from catjax.models.gguf import tokenizer_from_gguf

Q = gguf.GGMLQuantizationType


def _raises(exc, words, fn, *args, path=None, **kw):
  """`fn(*args, **kw)` raises `exc` whose message holds every word (and `path`)."""
  with pytest.raises(exc) as e:
    fn(*args, **kw)
  msg = str(e.value)
  for w in [*words, *([str(path)] if path is not None else [])]:
    assert w in msg, f"{w!r} not in {msg!r}"
  if path is not None and isinstance(e.value, InputError):
    assert e.value.path == str(path)
  return e.value


# --- Hugging Face folders: safetensors, index and config.json -------------------------------

W = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf") / "m"
  tiny.hf_folder(path, seed=3)
  return path


def _tensors(edit):
  def apply(folder):
    t = dict(load_file(str(folder / "model.safetensors")))
    edit(t)
    save_file(t, str(folder / "model.safetensors"))
  return apply


def _value(v):
  def edit(t):
    t[W] = t[W].copy()
    t[W].flat[5] = v
  return _tensors(edit)


def _cast(dtype):
  return _tensors(lambda t: t.update({W: t[W].astype(dtype)}))


def _write(name, data):
  return lambda folder: (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())


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
    names = list(load_file(str(folder / "model.safetensors")))
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
    "config not JSON": (_write(CFG, '{"vocab_size": 128,'), CFG, ["not valid JSON"], {}),
    "config not UTF-8": (_write(CFG, b"\xff\xfe{}"), CFG, ["not UTF-8"], {}),
    "config a list": (_write(CFG, "[1, 2]"), CFG, ["JSON object", "list"], {}),
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
}


@pytest.mark.parametrize("case", list(HF_BAD))
def test_bad_hugging_face_folders(hf_base, tmp_path, case):
  edit, file, words, kw = HF_BAD[case]
  folder = tmp_path / "m"
  shutil.copytree(hf_base, folder)
  edit(folder)
  where = folder if file == "." else folder / file
  _raises(InputError, words, load_hf, folder, path=where, **kw)


# --- GGUF files --------------------------------------------------------------------------

HIDDEN, HEADS, KV, HEAD_DIM, INTER, VOCAB = 256, 4, 2, 64, 256, 32
TYPES = {"token_embd.weight": Q.F16, "blk.0.attn_q.weight": Q.Q4_1, "blk.0.attn_k.weight": Q.Q8_0,
         "blk.0.attn_v.weight": Q.BF16, "blk.0.ffn_up.weight": Q.Q4_K}
SHAPES = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,),
          "blk.0.attn_q.weight": (HEADS * HEAD_DIM, HIDDEN),
          "blk.0.attn_k.weight": (KV * HEAD_DIM, HIDDEN), "blk.0.attn_v.weight": (KV * HEAD_DIM, HIDDEN),
          "blk.0.attn_output.weight": (HIDDEN, HEADS * HEAD_DIM),
          "blk.0.ffn_gate.weight": (INTER, HIDDEN), "blk.0.ffn_up.weight": (INTER, HIDDEN),
          "blk.0.ffn_down.weight": (HIDDEN, INTER), "blk.0.attn_norm.weight": (HIDDEN,),
          "blk.0.ffn_norm.weight": (HIDDEN,)}
META = {"llama.block_count": 1, "llama.context_length": 64, "llama.embedding_length": HIDDEN,
        "llama.feed_forward_length": INTER, "llama.attention.head_count": HEADS,
        "llama.attention.head_count_kv": KV, "llama.rope.dimension_count": HEAD_DIM,
        "llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5}


def _q4_k(shape, rng):
  """Random Q4_K blocks (144 bytes per 256 weights) with finite f16 scales."""
  rows, cols = shape
  blocks = rng.integers(0, 256, (rows, cols // 256, 144), dtype=np.uint8)
  blocks[..., :4] = np.array([0.01, 0.001], np.float16).view(np.uint8)  # d, dmin
  return blocks.reshape(rows, -1)


def write_gguf(path, meta=None):
  """A one-block llama GGUF of float, BF16, Q8_0, Q4_1 and Q4_K tensors (`meta` overrides)."""
  rng = np.random.default_rng(0)
  writer = gguf.GGUFWriter(str(path), "llama")
  for key, v in {**META, **(meta or {})}.items():
    (writer.add_string if isinstance(v, str) else writer.add_float32 if isinstance(v, float)
     else writer.add_uint32)(key, v)
  for name, shape in SHAPES.items():
    qtype = TYPES.get(name, Q.F32)
    w = rng.standard_normal(shape).astype(np.float32) * 0.1
    if qtype == Q.Q4_K:
      writer.add_tensor(name, _q4_k(shape, rng), raw_dtype=qtype)
    elif qtype in (Q.F32, Q.F16):
      writer.add_tensor(name, w.astype(np.float16 if qtype == Q.F16 else np.float32))
    else:
      writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


@pytest.fixture(scope="module")
def gguf_base(tmp_path_factory):
  path = write_gguf(tmp_path_factory.mktemp("gguf") / "base.gguf")
  load_gguf(path)  # the unedited file loads
  return path


def _patch(tensor, at, data):
  """Overwrite bytes of `tensor`'s data, `at` bytes into it (offsets from gguf-py's reader)."""
  def apply(path):
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == tensor)
    raw = bytearray(path.read_bytes())
    raw[t.data_offset + at:t.data_offset + at + len(data)] = data
    path.write_bytes(bytes(raw))
  return apply


def _retype(tensor, code):
  """Rewrite the GGML type id of `tensor` in the header."""
  def apply(path):
    raw = bytearray(path.read_bytes())
    i = raw.index(tensor.encode()) + len(tensor)
    n_dims = int.from_bytes(raw[i:i + 4], "little")
    j = i + 4 + 8 * n_dims
    raw[j:j + 4] = int(code).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
  return apply


def _f16(v):
  return np.float16(v).tobytes()


GGUF_BAD = {
    "F32 NaN": (_patch("blk.0.attn_output.weight", 20, np.float32(np.nan).tobytes()),
                ["'blk.0.attn_output.weight' (F32)", "1 non-finite"]),
    "F16 Inf": (_patch("token_embd.weight", 14, _f16(np.inf)), ["'token_embd.weight' (F16)"]),
    "BF16 NaN": (_patch("blk.0.attn_v.weight", 2, b"\xc0\x7f"), ["'blk.0.attn_v.weight' (BF16)"]),
    "Q4_1 scale NaN": (_patch("blk.0.attn_q.weight", 0, _f16(np.nan)),
                       ["'blk.0.attn_q.weight' (Q4_1)", "32 non-finite"]),
    "Q4_1 min Inf": (_patch("blk.0.attn_q.weight", 3 * 20 + 2, _f16(np.inf)),
                     ["'blk.0.attn_q.weight' (Q4_1)", "32 non-finite"]),
    "Q8_0 scale Inf": (_patch("blk.0.attn_k.weight", 2 * 34, _f16(-np.inf)),
                       ["'blk.0.attn_k.weight' (Q8_0)"]),
    "Q8_0 block of 0xFF bytes": (_patch("blk.0.attn_k.weight", 0, b"\xff" * 34),
                                 ["'blk.0.attn_k.weight' (Q8_0)", "non-finite"]),
    "Q4_K scale NaN": (_patch("blk.0.ffn_up.weight", 0, _f16(np.nan)),
                       ["'blk.0.ffn_up.weight' (Q4_K)", "non-finite"]),
    "Q4_K min Inf": (_patch("blk.0.ffn_up.weight", 144 + 2, _f16(np.inf)),
                     ["'blk.0.ffn_up.weight' (Q4_K)", "non-finite"]),
    "empty file": (lambda p: p.write_bytes(b""), ["empty file"]),
    "header cut short": (lambda p: p.write_bytes(p.read_bytes()[:120]),
                         ["truncated or corrupt GGUF header"]),
    "data cut short": (lambda p: p.write_bytes(p.read_bytes()[:-1000]),
                       ["'blk.0.ffn_norm.weight' ends past the end of the file"]),
    "unknown tensor type": (_retype("blk.0.ffn_norm.weight", 99),
                            ["'blk.0.ffn_norm.weight'", "unknown GGML type 99"]),
    "integer tensor type": (_retype("blk.0.ffn_norm.weight", Q.I32),
                            ["'blk.0.ffn_norm.weight'", "type I32"]),
    "tensor of many dimensions": (
        lambda p: p.write_bytes(p.read_bytes().replace(
            b"blk.0.ffn_norm.weight\x01\x00\x00\x00", b"blk.0.ffn_norm.weight\x09\x00\x00\x00")),
        ["'blk.0.ffn_norm.weight' has 9 dimensions"]),
}
GGUF_META = {
    "block_count a string": ({"llama.block_count": "one"}, ["llama.block_count='one'"]),
    "head_count 0": ({"llama.attention.head_count": 0}, ["llama.attention.head_count=0"]),
    "context_length 0": ({"llama.context_length": 0}, ["llama.context_length=0"]),
    "rms epsilon 0": ({"llama.attention.layer_norm_rms_epsilon": 0.0},
                      ["llama.attention.layer_norm_rms_epsilon=0.0", "positive"]),
    "rope base NaN": ({"llama.rope.freq_base": float("nan")}, ["llama.rope.freq_base=nan"]),
    "alignment 0": ({"general.alignment": 0}, ["general.alignment=0", "power of two"]),
}


@pytest.mark.parametrize("case", list(GGUF_BAD))
def test_bad_gguf_files(gguf_base, tmp_path, case):
  edit, words = GGUF_BAD[case]
  path = tmp_path / "bad.gguf"
  shutil.copy(gguf_base, path)
  edit(path)
  _raises(InputError, words, load_gguf, path, path=path)


@pytest.mark.parametrize("case", list(GGUF_META))
def test_bad_gguf_metadata(tmp_path, case):
  meta, words = GGUF_META[case]
  path = write_gguf(tmp_path / "meta.gguf", meta)
  _raises(InputError, words, load_gguf, path, path=path)


def _tokenizer_gguf(path, **meta):
  writer = gguf.GGUFWriter(str(path), "llama")
  fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab", "<s>"],
            "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.token_type": [1, 1, 1, 3], **meta}
  for key, v in fields.items():
    if isinstance(v, list):
      writer.add_array(key, v)
    elif isinstance(v, str):
      writer.add_string(key, v)
    else:
      writer.add_uint32(key, v)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


TOKENIZER_BAD = {
    "bos id past the vocabulary": ({"tokenizer.ggml.bos_token_id": 7},
                                   ["tokenizer.ggml.bos_token_id=7", "vocabulary has 4"]),
    "unk id past the vocabulary": ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores":
                                    [0.0, 0.0, 0.0, 0.0], "tokenizer.ggml.unknown_token_id": 9},
                                   ["tokenizer.ggml.unknown_token_id=9"]),
    "fewer scores than tokens": ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": [0.0]},
                                 ["tokenizer.ggml.scores", "expected 4"]),
    "malformed merge": ({"tokenizer.ggml.merges": ["ab"]}, ["tokenizer.ggml.merges", "'ab'"]),
}


@pytest.mark.parametrize("case", list(TOKENIZER_BAD))
def test_bad_gguf_tokenizers(tmp_path, case):
  meta, words = TOKENIZER_BAD[case]
  path = _tokenizer_gguf(tmp_path / "tok.gguf", **meta)
  _raises(InputError, words, tokenizer_from_gguf, path, path=path)


# --- quantized checkpoints -----------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A tiny real W4A4 checkpoint with a tokenizer, and a sharded copy of it."""
  from catjax.ptq.engine import quantize_model
  from catjax.models import random_model
  from catjax.ptq.recipe import Recipe
  from catjax.ptq.realization import realize
  model = random_model(tiny.config(), seed=4)
  qm = quantize_model(model, None, Recipe(method="none"), progress=False)
  root = tmp_path_factory.mktemp("ckpt")
  single = save_quantized(realize(model, qm), root / "single", tokenizer=tiny.tokenizer())
  sharded = root / "sharded"
  shutil.copytree(single, sharded)
  tensors = load_file(str(sharded / "model.safetensors"))
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for f, part in shards.items():
    save_file({n: tensors[n] for n in part}, str(sharded / f))
  (sharded / "model.safetensors").unlink()
  (sharded / "model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {n: f for f, part in shards.items() for n in part}}))
  _manifest(lambda m: (m["files"].pop("model.safetensors"),
                       m["files"].update(dict.fromkeys([*shards, "model.safetensors.index.json"]))
                       ))(sharded)
  load_quantized(sharded)
  return single, sharded


def _manifest(edit):
  """Edit the manifest, then recompute every listed file's sha256 and the checksum."""
  import hashlib

  def apply(folder):
    m = json.loads((folder / MANIFEST).read_text())
    edit(m)
    if isinstance(m.get("files"), dict):
      m["files"] = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest()
                    if (folder / n).is_file() else d for n, d in m["files"].items()}
    m["checksum"] = checkpoint._checksum(m)
    (folder / MANIFEST).write_text(json.dumps(m))
  return apply


def _then_rehash(first):
  return lambda folder: (first(folder), _manifest(lambda m: None)(folder))


CKPT_BAD = {
    "no files key": ("single", _manifest(lambda m: m.pop("files")), MANIFEST, ["'files'"]),
    "files a list": ("single", _manifest(lambda m: m.update(files=["model.safetensors"])),
                     MANIFEST, ['"files"']),
    "no tensors key": ("single", _manifest(lambda m: m.pop("tensors")), MANIFEST, ["'tensors'"]),
    "weights not checksummed": ("single", _manifest(lambda m: m["files"].pop("model.safetensors")),
                                MANIFEST, ["neither model.safetensors"]),
    "file outside the folder": ("single",
                                _manifest(lambda m: m["files"].update({"../x.bin": "0" * 64})),
                                MANIFEST, ["'../x.bin'", "not in the checkpoint folder"]),
    "tokenizer.json not JSON": ("single", _then_rehash(_write("tokenizer.json", "{oops")),
                                "tokenizer.json", ["not valid JSON"]),
    "tokenizer_config.json not JSON": ("single",
                                       _then_rehash(_write("tokenizer_config.json", "[1,")),
                                       "tokenizer_config.json", ["not valid JSON"]),
    "tokenizer.json not a tokenizer": ("single", _then_rehash(_write("tokenizer.json", "{}")),
                                       "tokenizer.json", ["tokenizer cannot be loaded"]),
    "index not JSON": ("sharded", _then_rehash(_write(IDX, "{oops")), IDX, ["not valid JSON"]),
    "index without weight_map": ("sharded", _then_rehash(_write(IDX, "{}")), IDX,
                                 ['"weight_map"']),
    "shard not checksummed": (
        "sharded", _manifest(lambda m: m["files"].pop("model-00002-of-00002.safetensors")), IDX,
        ["'model-00002-of-00002.safetensors'", "does not list"]),
    "config rms_norm_eps 0": ("single", _manifest(lambda m: m["config"].update(rms_norm_eps=0)),
                              MANIFEST, ["rms_norm_eps=0"]),
}


@pytest.mark.parametrize("case", list(CKPT_BAD))
def test_bad_quantized_checkpoints(saved, tmp_path, case):
  which, edit, file, words = CKPT_BAD[case]
  folder = tmp_path / "q"
  shutil.copytree(saved[0] if which == "single" else saved[1], folder)
  edit(folder)
  _raises(CheckpointError, words, load_quantized, folder, path=folder / file)


# --- the asset cache -----------------------------------------------------------------------

from app.test_assets import CONTENT, setup as fake_registry  # noqa: E402,F401  (the fake registry)


def _flip_in_place(path):
  """Flip one byte, keeping the size and the mtime."""
  st = path.stat()
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01
  path.write_bytes(bytes(data))
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
  assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_flipped_cached_asset_is_fetched_again(fake_registry):
  table, download, calls, cache = fake_registry
  path = assets.fetch("tiny", cache=cache, download=download, assets=table)
  _flip_in_place(path)
  assert assets.fetch("tiny", cache=cache, download=download, assets=table).read_bytes() == CONTENT
  assert calls == ["tiny", "tiny"]


def test_flipped_cached_asset_offline_names_the_file_and_the_fix(fake_registry):
  table, download, _, cache = fake_registry
  path = assets.fetch("tiny", cache=cache, download=download, assets=table)
  _flip_in_place(path)

  def offline(a, dest):
    raise assets.AssetError("registry unreachable")

  err = _raises(OSError, [str(path), "corrupt", "delete it", "registry unreachable"],
                assets.fetch, "tiny", cache=cache, download=offline, assets=table)
  assert isinstance(err, assets.AssetError)


def test_stale_fetch_temporaries_are_cleaned(fake_registry):
  table, download, _, cache = fake_registry
  assets.fetch("tiny", cache=cache, download=download, assets=table)
  done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  dead_pid = int(done.stdout)
  host = assets._temp_prefix().split("-")[1]
  old = cache / ".fetch-old1234"  # an older version's name: stale by age only
  dead = cache / f".fetch-{host}-{dead_pid}-abcd"
  live = cache / f".fetch-{host}-{os.getpid()}-efgh"
  fresh = cache / ".fetch-new5678"
  for d in (old, dead, live, fresh):
    d.mkdir()
    (d / "model.bin").write_bytes(b"partial")
  stamp = time.time() - 2 * assets.STALE_SECONDS
  for p in (old, old / "model.bin"):
    os.utime(p, (stamp, stamp))
  assets.fetch("tiny", cache=cache, download=download, assets=table)
  assert not old.exists() and not dead.exists() and live.exists() and fresh.exists()


# --- text files, windows and tokenizers ---------------------------------------------------

def test_edited_text_file_is_tokenized_again(tmp_path):
  f = tmp_path / "t.txt"
  f.write_text(tiny.TEXT)
  first = text_windows(tiny.tokenizer(), str(f), seqlen=8).tokens
  st = f.stat()
  f.write_text(tiny.TEXT.upper())  # same size
  os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
  again = text_windows(tiny.tokenizer(), str(f), seqlen=8).tokens
  assert not np.array_equal(first[: len(again)], again[: len(first)])


TEXT_BAD = {
    "too short": ("Paris is the capital.", 64, ["too short", "seqlen=64", "tokens available"]),
    "empty": ("  \n", 8, ["empty"]),
    "not UTF-8": (b"caf\xe9 au lait " * 20, 8, ["not UTF-8", "byte 3"]),
}


@pytest.mark.parametrize("case", list(TEXT_BAD))
def test_bad_text_files(tmp_path, case):
  text, seqlen, words = TEXT_BAD[case]
  f = tmp_path / "t.txt"
  f.write_bytes(text if isinstance(text, bytes) else text.encode())
  _raises(InputError, words, text_windows, tiny.tokenizer(), str(f), seqlen=seqlen, path=f)


def test_seqlen_beyond_the_models_positions_warns(tmp_path, caplog):
  f = tmp_path / "t.txt"
  f.write_text(tiny.TEXT)
  with caplog.at_level(logging.WARNING, logger="catjax"):
    text_windows(tiny.tokenizer(), str(f), seqlen=32, max_positions=16)
  warned = [r for r in caplog.records if r.name == "catjax"]
  assert len(warned) == 1 and "seqlen=32" in warned[0].getMessage()
  assert "max_position_embeddings=16" in warned[0].getMessage()
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="catjax"):
    text_windows(tiny.tokenizer(), str(f), seqlen=16, max_positions=16)
  assert not [r for r in caplog.records if r.name == "catjax"]


def test_no_pytorch_notice_when_loading_a_tokenizer(hf_base):
  """Without torch, transformers' "PyTorch was not found" notice is dropped; its other
  messages are kept."""
  code = ("import sys; sys.modules['torch'] = None\n"
          "from catjax.app.data import load_tokenizer\n"
          f"load_tokenizer({str(hf_base)!r})\n"
          "import transformers\n"
          "transformers.logging.get_logger('transformers').warning('another notice')\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        check=False, timeout=120)
  assert done.returncode == 0, done.stderr
  assert "PyTorch was not found" not in done.stderr
  assert "another notice" in done.stderr
