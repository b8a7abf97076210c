"""Llama, Qwen2 and Gemma 3 checkpoints in GGUF (llama.cpp's file format), read into
Hugging Face form.

`read_gguf` returns the config dict and float32 weights a Hugging Face
checkpoint would have: ggml's reversed dimension order is undone, quantized
tensors are dequantized with `gguf.quants.dequantize`, the q/k row permutation
that llama.cpp's `convert_hf_to_gguf.py` applies to llama models for its RoPE
layout is inverted (qwen2 and gemma3 files are not permuted), and the 1 that
it adds to Gemma's norm weights (ggml multiplies by the weight, Gemma by
`1 + weight`) is taken off again. `tokenizer_from_gguf` rebuilds the tokenizer
from the file's metadata with `tokenizers` alone: byte-level BPE ("gpt2"), or
SentencePiece BPE with byte fallback ("llama", as Gemma's), whose merges the
file does not store.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import gguf
import numpy as np

from catjax.base.errors import InputError, check_finite
from catjax.models.config import ARCHITECTURES
from catjax.models.lazy import LazyTensors

_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight",
                   "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_LINEAR_TENSORS = {
  "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
}
_LLAMA_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_GEMMA3_NORMS = {"attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
                 "ffn_norm": "pre_feedforward_layernorm",
                 "post_ffw_norm": "post_feedforward_layernorm",
                 "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_WEIGHTS = lambda table: {f"{g}.weight": f"{h}.weight" for g, h in table.items()}  # noqa: E731
# Qwen2's q/k/v biases (llama.cpp writes them for "qwen2" only).
_QKV_BIASES = {f"{g}.bias": f"{_LINEAR_TENSORS[g]}.bias" for g in ("attn_q", "attn_k", "attn_v")}


@dataclasses.dataclass(frozen=True)
class _Arch:
  """How llama.cpp wrote one architecture: its Hugging Face model_type, the
  per-block tensor names, whether q/k rows are permuted, what its norms add."""

  model_type: str
  block_tensors: dict
  permuted: bool
  norm_shift: float = 0.0


_ARCHS = {
  "llama": _Arch("llama", _WEIGHTS({**_LINEAR_TENSORS, **_LLAMA_NORMS}), True),
  "qwen2": _Arch("qwen2", {**_WEIGHTS({**_LINEAR_TENSORS, **_LLAMA_NORMS}), **_QKV_BIASES}, False),
  "gemma3": _Arch("gemma3_text", _WEIGHTS({**_LINEAR_TENSORS, **_GEMMA3_NORMS}), False, 1.0),
}
_OPTIONAL_TENSORS = ("output.weight", "rope_freqs.weight")
_REQUIRED = object()

# tokenizer.ggml.pre values whose llama.cpp pre-tokenizer isolates every digit
# before the GPT-2 split (Hugging Face: Digits(individual_digits) + ByteLevel).
_DIGIT_PRES = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"})
_LLAMA3_PRES = frozenset({"llama-bpe", "llama3", "llama-v3"})
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2: the same split with single digits, after NFC normalization.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _regroup_rows(w: np.ndarray, n_head: int, inner: str) -> np.ndarray:
  """Splits rows into `n_head` heads and swaps the two inner row axes of each."""
  w = np.asarray(w)
  rows = w.shape[0] if w.ndim else 0
  if n_head <= 0 or rows == 0 or rows % (2 * n_head):
    raise ValueError(f"cannot split {rows} rows (shape {w.shape}) into n_head={n_head} heads of even size")
  half = rows // n_head // 2
  split = (2, half) if inner == "pairs" else (half, 2)
  return w.reshape(n_head, *split, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Permutes q/k projection rows the way llama.cpp's `convert_hf_to_gguf.py` does.

  Args:
    w: `(n_head * head_dim, ...)` weight in Hugging Face row order.
    n_head: number of query heads for q, of key/value heads for k.

  Returns:
    `w` with each head's rows interleaved (llama.cpp's RoPE layout).

  Raises:
    ValueError: if the rows do not split into `n_head` heads of even size.
  """
  return _regroup_rows(w, n_head, "pairs")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of `permute_qk`: llama.cpp row order back to Hugging Face's."""
  return _regroup_rows(w, n_head, "halves")


@dataclasses.dataclass(frozen=True)
class _Tensor:
  name: str
  tensor_type: gguf.GGMLQuantizationType
  shape: tuple[int, ...]  # ggml order, fastest dimension first
  file: str
  offset: int  # of its data in the file
  item: np.dtype  # float type, or uint8 blocks of a quantized type
  stored_shape: tuple[int, ...]

  @property
  def data(self) -> np.ndarray:
    """Its stored data, read from the file now (a plain read, not a memory map:
    pages of a mapped file would count towards the process's resident memory
    until the whole model is loaded)."""
    count = math.prod(self.stored_shape)
    a = np.fromfile(self.file, self.item, count, offset=self.offset)
    if a.size != count:
      raise InputError(self.file, f"tensor {self.name!r} is truncated "
                       f"({a.size * self.item.itemsize} of {count * self.item.itemsize} bytes)")
    return a.reshape(self.stored_shape)


# GGUF metadata value types -> numpy scalar types (8 is a string, 9 an array).
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
            10: "<u8", 11: "<i8", 12: "<f8"}
_FLOATS = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
           gguf.GGMLQuantizationType.F64: np.float64}
_INTEGERS = frozenset(getattr(gguf.GGMLQuantizationType, k, None) for k in ("I8", "I16", "I32", "I64"))
_MAX_DIMS = 4  # GGML_MAX_DIMS


def _read(path: str) -> tuple[dict, dict[str, _Tensor]]:
  """`(metadata, tensors)` of a GGUF file: one pass over its header.

  gguf-py's `GGUFReader` makes a memory-map view per array element, ~30 s for
  a 262k-token vocabulary; here arrays of numbers are one `frombuffer`, and
  strings a loop over the bytes. A truncated or corrupt header, an unknown
  tensor type or a tensor past the end of the file raise `InputError`.
  """
  if os.path.getsize(path) == 0:
    raise InputError(path, "empty file (expected a GGUF file)")
  data = np.memmap(path, mode="r")
  buf = memoryview(data)
  pos = 0

  def need(n: int, what: str):
    if pos + n > len(buf):
      raise InputError(path, f"truncated or corrupt GGUF header: {what} at byte {pos} needs "
                       f"{n} bytes, the file has {len(buf) - pos} left")

  def take(fmt: str):
    nonlocal pos
    need(np.dtype(fmt).itemsize, "a value")
    value = np.frombuffer(buf, np.dtype(fmt), 1, pos)[0]
    pos += np.dtype(fmt).itemsize
    return value

  def string() -> str:
    nonlocal pos
    n = int(take("<u8"))
    need(n, "a string")
    pos += n
    return bytes(buf[pos - n:pos]).decode("utf-8", errors="replace")

  def value(kind: int):
    nonlocal pos
    if kind == 8:
      return string()
    if kind == 9:
      item, n = int(take("<u4")), int(take("<u8"))
      if item in _SCALARS:
        need(n * np.dtype(_SCALARS[item]).itemsize, f"an array of {n}")
        arr = np.frombuffer(buf, np.dtype(_SCALARS[item]), n, pos)
        pos += arr.nbytes
        return arr.tolist()
      return [value(item) for _ in range(n)]
    if kind not in _SCALARS:
      raise InputError(path, f"unknown GGUF metadata value type {kind} at byte {pos}: corrupt header")
    return take(_SCALARS[kind]).item()

  if bytes(buf[:4]) != b"GGUF":
    raise InputError(path, f"not a GGUF file (magic {bytes(buf[:4])!r})")
  pos = 4
  version = int(take("<u4"))
  if version < 2:
    raise InputError(path, f"GGUF version {version} is not supported (2 or newer)")
  n_tensors, n_kv = int(take("<u8")), int(take("<u8"))
  meta = {}
  for _ in range(n_kv):
    key = string()
    meta[key] = value(int(take("<u4")))
  infos, seen = [], set()
  for _ in range(n_tensors):
    name = string()
    n_dims = int(take("<u4"))
    if n_dims > _MAX_DIMS:
      raise InputError(path, f"tensor {name!r} has {n_dims} dimensions (at most {_MAX_DIMS}): "
                       "corrupt header")
    dims = tuple(int(take("<u8")) for _ in range(n_dims))
    code = int(take("<u4"))
    try:
      kind = gguf.GGMLQuantizationType(code)
    except ValueError:
      raise InputError(path, f"tensor {name!r} has unknown GGML type {code}") from None
    if name in seen:
      raise InputError(path, f"tensor {name!r} is stored twice")
    seen.add(name)
    infos.append((name, dims, kind, int(take("<u8"))))
  align = meta.get("general.alignment", 32)
  if isinstance(align, bool) or not isinstance(align, int) or align < 1 or align & (align - 1):
    raise InputError(path, f"general.alignment={align!r}: expected a power of two")
  start = -(-pos // align) * align
  tensors = {}
  for name, dims, kind, offset in infos:
    shape = tuple(reversed(dims))
    if offset % align:
      raise InputError(path, f"tensor {name!r} starts at offset {offset}, not a multiple of the "
                       f"alignment {align}: corrupt header")
    if kind in _FLOATS:
      item, count = np.dtype(_FLOATS[kind]), math.prod(shape)
    else:
      try:
        shape = gguf.quants.quant_shape_to_byte_shape(shape, kind)
      except (KeyError, ValueError) as e:
        raise InputError(path, f"tensor {name!r} of shape {_torch_dims(dims)}, {kind.name}: "
                         f"{e}") from None
      item, count = np.dtype(np.uint8), math.prod(shape)
    if start + offset + count * item.itemsize > data.size:
      raise InputError(path, f"tensor {name!r} ends past the end of the file (truncated)")
    tensors[name] = _Tensor(name, kind, dims, str(path), start + offset, item, shape)
  return meta, tensors


def _field(meta: dict, path: str, key: str, default=_REQUIRED):
  """One metadata value; a missing key raises unless a default is given."""
  if key in meta:
    return meta[key]
  if default is _REQUIRED:
    raise InputError(path, f"GGUF metadata key {key!r} is missing")
  return default


def _count(meta: dict, path: str, key: str, default=_REQUIRED, *, low: int = 1) -> int:
  """An integer metadata value of at least `low` (a count or a size)."""
  v = _field(meta, path, key, default)
  if isinstance(v, bool) or not isinstance(v, int) or v < low:
    raise InputError(path, f"GGUF metadata {key}={v!r}: expected an integer >= {low}")
  return v


def _positive(meta: dict, path: str, key: str, default=_REQUIRED) -> float:
  """A positive, finite float32 metadata value."""
  v = _field(meta, path, key, default)
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
    raise InputError(path, f"GGUF metadata {key}={v!r}: expected a positive finite number")
  return _f32(v)


def _token_id(meta: dict, path: str, key: str, n_tokens: int | None = None, default=None):
  """A token id metadata value (None when absent), within the vocabulary when its size is given."""
  v = _field(meta, path, key, default)
  if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0
                        or (n_tokens is not None and v >= n_tokens)):
    raise InputError(path, f"GGUF metadata {key}={v!r}: not a token id" +
                     (f" (the vocabulary has {n_tokens})" if n_tokens is not None else ""))
  return v


def _f32(value) -> float:
  """A float32 metadata value as the shortest decimal that round-trips (1e-05)."""
  return float(str(np.float32(value)))


def _torch_dims(dims) -> tuple[int, ...]:
  return tuple(int(d) for d in reversed(dims))


def _torch_shape(tensor) -> tuple[int, ...]:
  """A tensor's shape in PyTorch order (ggml lists dimensions fastest first)."""
  return tuple(int(d) for d in reversed(tensor.shape))


def _dequantize(tensor) -> np.ndarray:
  """One tensor as float32 in PyTorch order."""
  data = tensor.data
  with np.errstate(over="ignore", invalid="ignore"):  # NaN / Inf are refused by the caller
    if tensor.tensor_type != gguf.GGMLQuantizationType.F64:
      try:
        data = gguf.quants.dequantize(data, tensor.tensor_type)
      except NotImplementedError:
        raise InputError(tensor.file, f"tensor {tensor.name!r} has GGML type "
                         f"{tensor.tensor_type.name}, which cannot be dequantized") from None
    return np.array(data, np.float32).reshape(_torch_shape(tensor))


def _llama3_scaling(factors: np.ndarray, theta: float, head_dim: int, path: str) -> dict:
  """The "llama3" rope_scaling that reproduces a `rope_freqs.weight` tensor.

  llama.cpp stores Llama 3's per-frequency factors, not the parameters. Between
  the two cut-off wavelengths the blend is linear in 1 / wavelength; taking
  low_freq_factor = 1 (Meta's value) fixes the one free degree without changing
  any frequency. The fit is checked against the stored factors.
  """
  wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
  factors = factors.reshape(-1).astype(np.float64)
  factor = float(factors.max())
  if factors.shape == wavelen.shape and factor > 1.0:
    smooth = (1 / factors - 1 / factor) / (1 - 1 / factor)
    mid = (smooth > 1e-4) & (smooth < 1 - 1e-4)
    slope, intercept = np.polyfit(1 / wavelen[mid], smooth[mid], 1) if mid.sum() >= 2 else (0.0, 0.0)
    if slope > 0 and intercept < 0:
      high, old = round(float(1 - 1 / intercept), 4), int(round(-slope / intercept))
      fit = np.clip((old / wavelen - 1) / (high - 1), 0, 1)
      if np.allclose(1 / ((1 - fit) / factor + fit), factors, rtol=1e-4):
        return {"rope_type": "llama3", "factor": _f32(factor), "low_freq_factor": 1.0,
                "high_freq_factor": high, "original_max_position_embeddings": old}
  raise InputError(path, f"rope_freqs.weight in {os.path.basename(path)} does not hold llama3 rope "
                   "scaling factors")


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
  """Reads a llama or qwen2 GGUF file into a Hugging Face config and state dict.

  Args:
    path: the `.gguf` file (architecture "llama" or "qwen2").

  Returns:
    `(config, weights)`: `config` has the keys of a `LlamaConfig` /
    `Qwen2Config` config.json;
    `weights` (a `LazyTensors`: each tensor is dequantized from the
    memory-mapped file when read) maps Hugging Face tensor names to float32
    arrays of PyTorch shape
    `(out_features, in_features)`, q/k rows in Hugging Face order. `lm_head.weight`
    is present only when the file has `output.weight` (else tied embeddings).

  NaN or Inf values (a corrupt scale of a quantized block, say) are refused
  when a tensor is loaded (`catjax.models.loading.params_from_hf`); finite
  garbage cannot be detected (GGUF files carry no checksums).

  Raises:
    InputError: for another architecture, a missing or malformed metadata
      value or tensor, an unknown tensor, a non-float tensor type, a truncated
      or corrupt file, or rope factors that are not llama3 rope scaling.
  """
  path = os.fspath(path)
  meta, tensors = _read(path)
  get = functools.partial(_field, meta, path)
  count = functools.partial(_count, meta, path)
  arch = get("general.architecture")
  if arch not in _ARCHS:
    raise InputError(path, f"architecture {arch!r} of {os.path.basename(path)} is not supported "
                     f"({sorted(_ARCHS)})")
  spec = _ARCHS[arch]
  model_type, permuted = spec.model_type, spec.permuted
  n_layers = count(f"{arch}.block_count")
  names = dict(_GLOBAL_TENSORS)
  for i in range(n_layers):
    names.update({f"blk.{i}.{g}": f"model.layers.{i}.{h}" for g, h in spec.block_tensors.items()})
  for name in tensors:
    if name not in names and name not in _OPTIONAL_TENSORS:
      raise InputError(path, f"unknown tensor {name!r} in {os.path.basename(path)}")
  for name in names:
    if name not in tensors and name not in _OPTIONAL_TENSORS:
      raise InputError(path, f"expected tensor {name!r} is missing from {os.path.basename(path)}")
  for name, t in tensors.items():
    if t.tensor_type in _INTEGERS:
      raise InputError(path, f"tensor {name!r} has type {t.tensor_type.name}; expected a float "
                       "or quantized float type")

  hidden = count(f"{arch}.embedding_length")
  heads = count(f"{arch}.attention.head_count")
  kv_heads = count(f"{arch}.attention.head_count_kv", heads)
  rope_dim = count(f"{arch}.rope.dimension_count", hidden // heads)
  head_dim = count(f"{arch}.attention.key_length", rope_dim)
  theta = _positive(meta, path, f"{arch}.rope.freq_base", 10000.0)
  def load(tensor, n_head, shift):
    w = _dequantize(tensor)
    try:
      w = w if n_head is None else unpermute_qk(w, n_head)
    except ValueError as e:
      raise InputError(path, f"tensor {tensor.name!r}: {e}") from None
    return w - np.float32(shift) if shift else w

  loaders, shapes, labels = {}, {}, {}
  for name, hf_name in names.items():
    if name in tensors:
      n_head = (None if not permuted else heads if ".attn_q." in name
                else kv_heads if ".attn_k." in name else None)
      shift = spec.norm_shift if name.endswith("norm.weight") else 0.0
      loaders[hf_name] = functools.partial(load, tensors[name], n_head, shift)
      shapes[hf_name] = _torch_shape(tensors[name])
      labels[hf_name] = f"{name!r} ({tensors[name].tensor_type.name})"
  weights = LazyTensors(loaders, shapes, files=dict.fromkeys(loaders, path), labels=labels)

  scaling_type = get(f"{arch}.rope.scaling.type", "none")
  original = count(f"{arch}.rope.scaling.original_context_length", 0, low=0)
  if scaling_type != "none":  # linear / yarn: llama.cpp writes the parameters as metadata
    rope_scaling = {"rope_type": scaling_type,
                    "factor": _positive(meta, path, f"{arch}.rope.scaling.factor"),
                    **({"original_max_position_embeddings": original} if original else {})}
  elif "rope_freqs.weight" in tensors:
    factors = _dequantize(tensors["rope_freqs.weight"])
    check_finite("tensor 'rope_freqs.weight'", factors, where=path)
    rope_scaling = _llama3_scaling(factors, theta, head_dim, path)
  else:
    rope_scaling = None
  bos = _token_id(meta, path, "tokenizer.ggml.bos_token_id")
  eos = _token_id(meta, path, "tokenizer.ggml.eos_token_id")
  config = {
    "architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
    "vocab_size": weights.shape("model.embed_tokens.weight")[0], "hidden_size": hidden,
    "intermediate_size": count(f"{arch}.feed_forward_length"), "num_hidden_layers": n_layers,
    "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
    "rms_norm_eps": _positive(meta, path, f"{arch}.attention.layer_norm_rms_epsilon"),
    "rope_theta": theta, "max_position_embeddings": count(f"{arch}.context_length"),
    "tie_word_embeddings": "output.weight" not in tensors,
    "bos_token_id": bos, "eos_token_id": eos,
    "rope_scaling": rope_scaling,
  }
  if model_type == "gemma3_text":
    # Not in the file; llama.cpp's values: every 6th layer global, local RoPE
    # base 10000, scores scaled by 1/sqrt(head_dim).
    config.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=head_dim,
                  sliding_window=count(f"{arch}.attention.sliding_window"),
                  sliding_window_pattern=count(f"{arch}.attention.sliding_window_pattern", 6),
                  rope_local_base_freq=10000.0)
  return config, weights


def tokenizer_from_gguf(path: str | os.PathLike):
  """Builds the tokenizer a GGUF file describes: byte-level BPE ("gpt2") or
  SentencePiece BPE with byte fallback ("llama", e.g. Gemma 3's).

  Args:
    path: the `.gguf` file.

  Returns:
    A `transformers.PreTrainedTokenizerFast` with the file's vocabulary, merges
    (derived from the vocabulary for "llama"), pre-tokenizer
    (`tokenizer.ggml.pre`), special tokens and chat template.

  Raises:
    ValueError: for another tokenizer model, an unsupported
      `tokenizer.ggml.pre`, or missing or malformed metadata (`InputError`).
  """
  from tokenizers import AddedToken

  from catjax.models.hf import import_transformers
  PreTrainedTokenizerFast = import_transformers().PreTrainedTokenizerFast

  path = os.fspath(path)
  meta = _read(path)[0]
  get = functools.partial(_field, meta, path)
  kind = get("tokenizer.ggml.model")
  if kind not in ("gpt2", "llama"):
    raise ValueError(f"tokenizer.ggml.model {kind!r} in {path} is not supported "
                     "('gpt2' or 'llama')")
  tokens = get("tokenizer.ggml.tokens")
  if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
    raise InputError(path, "GGUF metadata tokenizer.ggml.tokens: expected a non-empty list of "
                     "strings")
  token_id = functools.partial(_token_id, meta, path, n_tokens=len(tokens))
  pre = get("tokenizer.ggml.pre", "default")
  if kind == "llama":
    scores = get("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(tokens):
      raise InputError(path, f"GGUF metadata tokenizer.ggml.scores: expected {len(tokens)} "
                       "numbers, one per token")
    backend = _sentencepiece_bpe(tokens, scores, get("general.architecture") == "gemma3",
                                 get("tokenizer.ggml.add_space_prefix", True),
                                 token_id("tokenizer.ggml.unknown_token_id", default=0))
  else:
    merges = get("tokenizer.ggml.merges")
    bad = [m for m in (merges if isinstance(merges, list) else [merges])
           if not isinstance(m, str) or len(m.split(" ")) != 2]
    if bad:
      raise InputError(path, f"GGUF metadata tokenizer.ggml.merges: {bad[0]!r} is not a merge "
                       "('left right')")
    backend = _byte_level_bpe(tokens, merges, pre, path)
  types = get("tokenizer.ggml.token_type", [])
  control, user = gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED
  backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                              for t, k in zip(tokens, types) if k == control])
  # User-defined tokens are matched whole in the text; Gemma's runs of spaces
  # are not (they are respelled in the vocabulary and reached by merges).
  vocab = backend.get_vocab()
  backend.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types)
                      if k == user and t in vocab])
  ids = {f"{role}_token": token_id(f"tokenizer.ggml.{key}_token_id")
         for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
  special = {role: tokens[i] for role, i in ids.items() if i is not None}
  return PreTrainedTokenizerFast(
    tokenizer_object=backend, chat_template=get("tokenizer.chat_template", None),
    add_bos_token=bool(get("tokenizer.ggml.add_bos_token", False)),
    add_eos_token=bool(get("tokenizer.ggml.add_eos_token", False)), **special)


def _byte_level_bpe(tokens, merges, pre: str, path: str):
  """The "gpt2" tokenizer: byte-level BPE with the file's merges and `pre` split."""
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
  split = {**dict.fromkeys(_LLAMA3_PRES, _LLAMA3_SPLIT), "qwen2": _QWEN2_SPLIT}.get(pre)
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
  if pre in ("default", "gpt2"):
    pre_tokenizer = byte_level
  elif pre in _DIGIT_PRES:
    pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif split is not None:
    pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
  else:
    raise ValueError(f"tokenizer.ggml.pre {pre!r} in {path} is not supported")

  merges = [tuple(merge.split(" ")) for merge in merges]
  backend = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                                 ignore_merges=pre in _LLAMA3_PRES))
  backend.pre_tokenizer = pre_tokenizer
  if pre == "qwen2":
    backend.normalizer = normalizers.NFC()
  backend.decoder = decoders.ByteLevel()
  return backend


_SPACE = "\u2581"  # SentencePiece's visible space


def _sentencepiece_bpe(tokens, scores, file_order: bool, space_prefix: bool, unk_id: int):
  """The "llama" tokenizer: SentencePiece BPE with byte fallback.

  The file has no merges: every split of a token into two vocabulary tokens
  is a merge, ranked by the token's score, or by its position in the file
  when `file_order` (Gemma's scores do not follow its merge order); splits of
  one token rank longer left parts first. Gemma stores tokens of several
  spaces as spaces; they are spelled with the visible space here, as the text
  is after normalization.
  """
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

  tokens = [_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
  vocab = {t: i for i, t in enumerate(tokens)}
  rank = range(len(tokens)) if file_order else -np.asarray(scores, np.float64)
  merges = []
  for i, t in enumerate(tokens):
    for cut in range(len(t) - 1, 0, -1):
      if t[:cut] in vocab and t[cut:] in vocab:
        merges.append((rank[i], len(merges), t[:cut], t[cut:]))
  merges.sort()
  backend = Tokenizer(models.BPE(vocab, [(a, b) for *_, a, b in merges], byte_fallback=True,
                                 fuse_unk=True, unk_token=tokens[unk_id]))
  replace = normalizers.Replace(" ", _SPACE)
  backend.normalizer = (normalizers.Sequence([normalizers.Prepend(_SPACE), replace])
                        if space_prefix else replace)
  backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
  steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
  backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
  return backend
