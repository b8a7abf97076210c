"""catjax.models.gguf: tiny llama GGUF files written with gguf.GGUFWriter, read back."""

import math

import gguf
import numpy as np
import pytest

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
