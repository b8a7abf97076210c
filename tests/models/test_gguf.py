"""catjax.models.gguf: tiny llama GGUF files written with gguf.GGUFWriter, read back; every
bad file, metadata value and tokenizer is refused naming the file and the problem."""

import math
import shutil

import gguf
import numpy as np
import pytest

import tiny
from catjax.base.errors import InputError
from catjax.models import load_gguf

from catjax.models.gguf import permute_qk, read_gguf, tokenizer_from_gguf, unpermute_qk

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 2, 64, 4, 2, 16, 96, 100
THETA, CONTEXT = 10000.0, 8192
Q = gguf.GGMLQuantizationType

# GGUF name -> (Hugging Face name, PyTorch shape), spelled out independently of the module.
GLOBAL = {
  "token_embd.weight": ("model.embed_tokens.weight", (VOCAB, HIDDEN)),
  "output_norm.weight": ("model.norm.weight", (HIDDEN,)),
}
LAYER = {
  "attn_q": ("self_attn.q_proj", (HEADS * HEAD_DIM, HIDDEN)),
  "attn_k": ("self_attn.k_proj", (KV_HEADS * HEAD_DIM, HIDDEN)),
  "attn_v": ("self_attn.v_proj", (KV_HEADS * HEAD_DIM, HIDDEN)),
  "attn_output": ("self_attn.o_proj", (HIDDEN, HEADS * HEAD_DIM)),
  "ffn_gate": ("mlp.gate_proj", (INTER, HIDDEN)),
  "ffn_up": ("mlp.up_proj", (INTER, HIDDEN)),
  "ffn_down": ("mlp.down_proj", (HIDDEN, INTER)),
  "attn_norm": ("input_layernorm", (HIDDEN,)),
  "ffn_norm": ("post_attention_layernorm", (HIDDEN,)),
}
# Storage types: layer 0 is all F32; layer 1 mixes half precision and block quants.
FORMATS = {"token_embd.weight": Q.F16, "output.weight": Q.Q8_0, "blk.1.attn_q.weight": Q.Q8_0,
           "blk.1.attn_k.weight": Q.F16, "blk.1.attn_v.weight": Q.BF16,
           "blk.1.ffn_up.weight": Q.Q4_1, "blk.1.ffn_down.weight": Q.Q8_0}
# Worst-case error of each storage type, relative to the tensor's largest magnitude.
PRECISION = {Q.F32: 0.0, Q.F16: 2.0**-11, Q.BF16: 2.0**-8, Q.Q8_0: 1 / 127, Q.Q4_1: 2 / 15}


def tensor_names(tied=True):
  """`{gguf_name: (hf_name, shape)}` of a tiny llama checkpoint."""
  names = dict(GLOBAL)
  if not tied:
    names["output.weight"] = ("lm_head.weight", (VOCAB, HIDDEN))
  for i in range(LAYERS):
    names.update({f"blk.{i}.{g}.weight": (f"model.layers.{i}.{h}.weight", shape)
                  for g, (h, shape) in LAYER.items()})
  return names


def stored(w, qtype):
  """What a float32 array becomes after a round trip through `qtype`."""
  return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)


def _save(writer, path):
  """Write the file `writer` holds and return its path."""
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def _vocabulary(path, arch, model, tokens, types, *, bos, eos, unk):
  """A `GGUFWriter` holding only a tokenizer: its model, tokens, types and ids."""
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_tokenizer_model(model)
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_bos_token_id(bos)
  writer.add_eos_token_id(eos)
  writer.add_unk_token_id(unk)
  return writer


def write_gguf(path, tensors, arch="llama", edit=None):
  """Writes `{gguf_name: float32 array}` (PyTorch order) like llama.cpp's converter.

  q/k rows of llama files are permuted with `permute_qk` (qwen2 files are
  not); `edit(writer)` may add metadata.
  """
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(LAYERS)
  writer.add_context_length(CONTEXT)
  writer.add_embedding_length(HIDDEN)
  writer.add_feed_forward_length(INTER)
  writer.add_head_count(HEADS)
  writer.add_head_count_kv(KV_HEADS)
  writer.add_rope_dimension_count(HEAD_DIM)
  writer.add_rope_freq_base(THETA)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  if edit is not None:
    edit(writer)
  for name, w in tensors.items():
    if arch == "llama" and (".attn_q.weight" in name or ".attn_k.weight" in name):
      w = permute_qk(w, HEADS if ".attn_q." in name else KV_HEADS)
    qtype = FORMATS.get(name, Q.F32)
    if qtype in (Q.F32, Q.F16):
      writer.add_tensor(name, w.astype(np.float32 if qtype == Q.F32 else np.float16))
    else:
      writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
  return _save(writer, path)


def random_tensors(tied=True, seed=0):
  rng = np.random.default_rng(seed)
  return {name: rng.standard_normal(shape).astype(np.float32) for name, (_, shape) in tensor_names(tied).items()}


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip(tmp_path, tied):
  tensors = random_tensors(tied)
  config, weights = read_gguf(write_gguf(tmp_path / "tiny.gguf", tensors))
  assert config == {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
    "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
    "rms_norm_eps": 1e-5, "rope_theta": THETA, "max_position_embeddings": CONTEXT,
    "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2, "rope_scaling": None}
  names = tensor_names(tied)
  assert set(weights) == {hf for hf, _ in names.values()}
  assert ("lm_head.weight" in weights) == (not tied)
  for gguf_name, (hf_name, shape) in names.items():
    want, got, qtype = tensors[gguf_name], weights[hf_name], FORMATS.get(gguf_name, Q.F32)
    assert got.dtype == np.float32 and got.shape == shape, hf_name
    np.testing.assert_array_equal(got, stored(want, qtype), err_msg=hf_name)
    np.testing.assert_allclose(got, want, rtol=0, atol=PRECISION[qtype] * np.abs(want).max(), err_msg=hf_name)


def test_qwen2_file_has_biases_and_unpermuted_rows(tmp_path):
  from catjax.models import ModelConfig, forward
  from catjax.models.loading import params_from_hf
  tensors = random_tensors()
  rng = np.random.default_rng(4)
  for i in range(LAYERS):
    for g, rows in (("attn_q", HEADS), ("attn_k", KV_HEADS), ("attn_v", KV_HEADS)):
      tensors[f"blk.{i}.{g}.bias"] = rng.standard_normal(rows * HEAD_DIM).astype(np.float32)
  config, weights = read_gguf(write_gguf(tmp_path / "qwen.gguf", tensors, arch="qwen2"))
  assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
  np.testing.assert_array_equal(weights["model.layers.0.self_attn.q_proj.weight"],
                                tensors["blk.0.attn_q.weight"])  # F32, never permuted
  np.testing.assert_array_equal(weights["model.layers.1.self_attn.v_proj.bias"],
                                tensors["blk.1.attn_v.bias"])
  cfg = ModelConfig.from_hf(config)
  assert cfg.qkv_bias and not cfg.o_bias
  logits = forward(params_from_hf(cfg, weights), np.arange(8)[None] % VOCAB)
  assert logits.shape == (1, 8, VOCAB) and np.isfinite(np.asarray(logits)).all()


def test_permutation_is_undone_and_invertible():
  rng = np.random.default_rng(1)
  for heads in (HEADS, KV_HEADS):
    w = rng.standard_normal((heads * HEAD_DIM, HIDDEN)).astype(np.float32)
    permuted = permute_qk(w, heads)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_qk(permuted, heads), w)
    np.testing.assert_array_equal(permute_qk(unpermute_qk(w, heads), heads), w)
  # llama.cpp's layout: head h keeps its rows, the first and second halves interleaved.
  rows = np.arange(2 * 4)
  np.testing.assert_array_equal(permute_qk(rows, 2), [0, 2, 1, 3, 4, 6, 5, 7])
  with pytest.raises(ValueError, match="n_head=3"):
    permute_qk(np.zeros((8, 4)), 3)


def test_unknown_tensor_is_named(tmp_path):
  tensors = {**random_tensors(), "blk.0.attn_q.bias": np.zeros(HIDDEN, np.float32)}
  path = write_gguf(tmp_path / "bias.gguf", tensors)
  with pytest.raises(ValueError, match=r"unknown tensor 'blk\.0\.attn_q\.bias' in .*bias\.gguf"):
    read_gguf(path)


def test_missing_tensor_is_named(tmp_path):
  tensors = random_tensors()
  del tensors["blk.1.ffn_up.weight"]
  with pytest.raises(ValueError, match=r"'blk\.1\.ffn_up\.weight' is missing from .*short\.gguf"):
    read_gguf(write_gguf(tmp_path / "short.gguf", tensors))


def test_wrong_architecture_is_named(tmp_path):
  path = write_gguf(tmp_path / "phi.gguf", random_tensors(), arch="phi3")
  with pytest.raises(ValueError, match=r"architecture 'phi3' of .*phi\.gguf is not supported"):
    read_gguf(path)


def llama_cpp_rope_factors(factor, low, high, old_context):
  """`rope_freqs.weight` as llama.cpp's convert_hf_to_gguf.py computes it for llama3."""
  out = []
  for i in range(0, HEAD_DIM, 2):
    wavelen = 2 * math.pi * THETA ** (i / HEAD_DIM)
    if wavelen < old_context / high:
      out.append(1.0)
    elif wavelen > old_context / low:
      out.append(factor)
    else:
      smooth = (old_context / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.array(out, np.float32)


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
  tensors = {**random_tensors(), "rope_freqs.weight": llama_cpp_rope_factors(8.0, 1.0, 4.0, 2048)}
  config, weights = read_gguf(write_gguf(tmp_path / "llama3.gguf", tensors))
  assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 2048}
  assert "rope_freqs.weight" not in weights
  tensors["rope_freqs.weight"] = np.linspace(1, 3, HEAD_DIM // 2).astype(np.float32) ** 2
  with pytest.raises(ValueError, match=r"rope_freqs\.weight in .*odd\.gguf does not hold llama3"):
    read_gguf(write_gguf(tmp_path / "odd.gguf", tensors))


def test_linear_rope_scaling_from_metadata(tmp_path):
  def edit(writer):
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(2.0)
  config, _ = read_gguf(write_gguf(tmp_path / "linear.gguf", random_tensors(), edit=edit))
  assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


def write_tokenizer(path, pre="smollm", model="gpt2", add_bos=False):
  """A GGUF holding only a byte-level BPE vocabulary: bytes, 5 merges, 3 control tokens."""
  from tokenizers.pre_tokenizers import ByteLevel
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  merges = ["h e", "Ġ t", "t he", "Ġt he", "Ġ 1"]
  tokens = specials + sorted(ByteLevel.alphabet()) + [m.replace(" ", "") for m in merges]
  types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3)
  writer = _vocabulary(path, "llama", model, tokens, types, bos=1, eos=2, unk=0)
  writer.add_tokenizer_pre(pre)
  writer.add_token_merges(merges)
  writer.add_add_bos_token(add_bos)
  return _save(writer, path)


@pytest.mark.parametrize("pre, pieces", [
  ("gpt2", ["the", "Ġthe", "Ġ1", "2", "<|im_end|>"]),
  # "smollm" isolates every digit before the GPT-2 split, so "Ġ1" never forms.
  ("smollm", ["the", "Ġthe", "Ġ", "1", "2", "<|im_end|>"]),
])
def test_tokenizer(tmp_path, pre, pieces):
  tok = tokenizer_from_gguf(write_tokenizer(tmp_path / "tok.gguf", pre=pre))
  text = "the the 12<|im_end|>"
  ids = tok.encode(text)
  assert tok.convert_ids_to_tokens(ids) == pieces
  assert tok.decode(ids) == text
  assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
  with_bos = tokenizer_from_gguf(write_tokenizer(tmp_path / "bos.gguf", pre=pre, add_bos=True))
  assert with_bos.encode(text) == [1] + ids


def write_sentencepiece(path, arch):
  """A GGUF holding a SentencePiece BPE vocabulary (no merges): "ab" comes
  before "bc" in the file but has the lower score; a user-defined token of
  two spaces, stored as spaces (as Gemma's are)."""
  byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
  tokens = ["<pad>", "<eos>", "<bos>", "<unk>", *byte_tokens, "\u2581", "a", "b", "c",
            "  ", "ab", "bc", "\u2581a", "\u2581ab"]
  scores = [0.0] * (4 + 256) + [-1.0, -2.0, -3.0, -4.0, -4.5, -9.0, -5.0, -6.0, -7.0]
  types = ([gguf.TokenType.CONTROL] * 4 + [gguf.TokenType.BYTE] * 256
           + [gguf.TokenType.NORMAL] * 4 + [gguf.TokenType.USER_DEFINED]
           + [gguf.TokenType.NORMAL] * 4)
  writer = _vocabulary(path, arch, "llama", tokens, types, bos=2, eos=1, unk=3)
  writer.add_token_scores(scores)
  writer.add_add_space_prefix(False)
  return _save(writer, path)


@pytest.mark.parametrize("arch, pieces", [
  # Gemma ranks merges by file position ("ab" first), others by score ("bc" first).
  # The stored run of two spaces is the vocabulary's "\u2581\u2581".
  ("gemma3", ["\u2581ab", "c", "\u2581\u2581", "ab", "c", "<0xC3>", "<0xA9>"]),
  ("llama", ["\u2581a", "bc", "\u2581\u2581", "a", "bc", "<0xC3>", "<0xA9>"]),
])
def test_sentencepiece_tokenizer(tmp_path, arch, pieces):
  tok = tokenizer_from_gguf(write_sentencepiece(tmp_path / "spm.gguf", arch))
  text = " abc  abcé"
  ids = tok(text, add_special_tokens=False)["input_ids"]
  assert tok.convert_ids_to_tokens(ids) == pieces
  assert tok.decode(ids) == text
  assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<bos>", "<eos>", "<unk>")


@pytest.mark.parametrize("model, pre, match", [("bert", "default", "tokenizer.ggml.model 'bert'"),
                                               ("gpt2", "mystery", "tokenizer.ggml.pre 'mystery'")])
def test_unsupported_tokenizer_is_named(tmp_path, model, pre, match):
  with pytest.raises(ValueError, match=match):
    tokenizer_from_gguf(write_tokenizer(tmp_path / "tok.gguf", pre=pre, model=model))


# --- bad files ---------------------------------------------------------------------------

# One llama block of float, BF16, Q8_0, Q4_1 and Q4_K tensors, for the bad-file cases.
B_HIDDEN, B_HEADS, B_KV, B_HEAD_DIM, B_INTER, B_VOCAB = 256, 4, 2, 64, 256, 32
B_TYPES = {"token_embd.weight": Q.F16, "blk.0.attn_q.weight": Q.Q4_1, "blk.0.attn_k.weight": Q.Q8_0,
         "blk.0.attn_v.weight": Q.BF16, "blk.0.ffn_up.weight": Q.Q4_K}
B_SHAPES = {"token_embd.weight": (B_VOCAB, B_HIDDEN), "output_norm.weight": (B_HIDDEN,),
          "blk.0.attn_q.weight": (B_HEADS * B_HEAD_DIM, B_HIDDEN),
          "blk.0.attn_k.weight": (B_KV * B_HEAD_DIM, B_HIDDEN), "blk.0.attn_v.weight": (B_KV * B_HEAD_DIM, B_HIDDEN),
          "blk.0.attn_output.weight": (B_HIDDEN, B_HEADS * B_HEAD_DIM),
          "blk.0.ffn_gate.weight": (B_INTER, B_HIDDEN), "blk.0.ffn_up.weight": (B_INTER, B_HIDDEN),
          "blk.0.ffn_down.weight": (B_HIDDEN, B_INTER), "blk.0.attn_norm.weight": (B_HIDDEN,),
          "blk.0.ffn_norm.weight": (B_HIDDEN,)}
B_META = {"llama.block_count": 1, "llama.context_length": 64, "llama.embedding_length": B_HIDDEN,
        "llama.feed_forward_length": B_INTER, "llama.attention.head_count": B_HEADS,
        "llama.attention.head_count_kv": B_KV, "llama.rope.dimension_count": B_HEAD_DIM,
        "llama.rope.freq_base": 10000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5}


def _q4_k(shape, rng):
  """Random Q4_K blocks (144 bytes per 256 weights) with finite f16 scales."""
  rows, cols = shape
  blocks = rng.integers(0, 256, (rows, cols // 256, 144), dtype=np.uint8)
  blocks[..., :4] = np.array([0.01, 0.001], np.float16).view(np.uint8)  # d, dmin
  return blocks.reshape(rows, -1)


def write_one_block(path, meta=None):
  """A one-block llama GGUF of float, BF16, Q8_0, Q4_1 and Q4_K tensors (`meta` overrides)."""
  rng = np.random.default_rng(0)
  writer = gguf.GGUFWriter(str(path), "llama")
  for key, v in {**B_META, **(meta or {})}.items():
    (writer.add_string if isinstance(v, str) else writer.add_float32 if isinstance(v, float)
     else writer.add_uint32)(key, v)
  for name, shape in B_SHAPES.items():
    qtype = B_TYPES.get(name, Q.F32)
    w = rng.standard_normal(shape).astype(np.float32) * 0.1
    if qtype == Q.Q4_K:
      writer.add_tensor(name, _q4_k(shape, rng), raw_dtype=qtype)
    elif qtype in (Q.F32, Q.F16):
      writer.add_tensor(name, w.astype(np.float16 if qtype == Q.F16 else np.float32))
    else:
      writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
  return _save(writer, path)


@pytest.fixture(scope="module")
def gguf_base(tmp_path_factory):
  path = write_one_block(tmp_path_factory.mktemp("gguf") / "base.gguf")
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
  tiny.raises(InputError, words, load_gguf, path, path=path)


@pytest.mark.parametrize("case", list(GGUF_META))
def test_bad_gguf_metadata(tmp_path, case):
  meta, words = GGUF_META[case]
  path = write_one_block(tmp_path / "meta.gguf", meta)
  tiny.raises(InputError, words, load_gguf, path, path=path)


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
  return _save(writer, path)


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
  tiny.raises(InputError, words, tokenizer_from_gguf, path, path=path)
