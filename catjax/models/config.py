"""Decoder configuration, read from and written to Hugging Face `config.json`
dictionaries (transformers' `LlamaConfig`, `Qwen2Config`, `Gemma3TextConfig`)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import numpy as np

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """RoPE frequency scaling: "linear" (positions / factor) or "llama3"."""

  rope_type: str
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def check(self):
    """Raise `ValueError` naming the field for a value RoPE cannot use."""
    for f in ("factor", "low_freq_factor", "high_freq_factor"):
      _check_positive(f"rope_scaling.{f}", getattr(self, f))
    _check_int("rope_scaling.original_max_position_embeddings",
               self.original_max_position_embeddings)
    if self.rope_type == "llama3" and not self.low_freq_factor < self.high_freq_factor:
      raise ValueError(f"rope_scaling: low_freq_factor={self.low_freq_factor} must be below "
                       f"high_freq_factor={self.high_freq_factor}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Shape and numerics of a decoder (Llama, Qwen2, Gemma 3).

  `qkv_bias` / `o_bias` cover Llama's `attention_bias` (all four projections)
  and Qwen2 (q, k, v only). The fields after `eos_token_id` are Gemma 3's:
  `hidden_act` "gelu_pytorch_tanh" (GeGLU), `norm_offset` 1 (norms scale by
  `1 + weight`, in float32), `embed_scale` (embeddings times √hidden),
  `qk_norm` (RMSNorm of each query/key head before RoPE), `sandwich_norms`
  (norms after attention and MLP too), `query_pre_attn_scalar` (scores scale
  by its inverse root instead of `head_dim`'s), and `layer_types` with
  `sliding_window` / `rope_local_theta` for its sliding-window layers (a query
  sees the `sliding_window` latest keys, itself included; their RoPE has its
  own base and no scaling).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 2048
  tie_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  model_type: str = "llama"
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  hidden_act: str = "silu"
  norm_offset: float = 0.0
  embed_scale: bool = False
  qk_norm: bool = False
  sandwich_norms: bool = False
  query_pre_attn_scalar: float | None = None
  layer_types: tuple[str, ...] | None = None
  sliding_window: int | None = None
  rope_local_theta: float | None = None

  def __post_init__(self):
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim", "max_position_embeddings"):
      _check_int(f, getattr(self, f))
    for f in ("rms_norm_eps", "rope_theta"):
      _check_positive(f, getattr(self, f))
    for f in ("query_pre_attn_scalar", "rope_local_theta"):
      if getattr(self, f) is not None:
        _check_positive(f, getattr(self, f))
    if self.sliding_window is not None:
      _check_int("sliding_window", self.sliding_window)
    for f in ("bos_token_id", "eos_token_id"):
      v = getattr(self, f)
      for i in (v if isinstance(v, tuple) else () if v is None else (v,)):
        _check_int(f, i, low=0, shown=v)
    if self.rope_scaling is not None:
      self.rope_scaling.check()
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    if self.model_type not in ARCHITECTURES:
      raise ValueError(f"model_type={self.model_type!r}; supported: {sorted(ARCHITECTURES)}")
    if self.rope_scaling is not None and self.rope_scaling.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_type={self.rope_scaling.rope_type!r}; supported: {ROPE_TYPES}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r}; supported: {ACTIVATIONS}")
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(LAYER_TYPES):
        raise ValueError(f"layer_types={self.layer_types!r}: expected num_layers={self.num_layers} "
                         f"entries from {LAYER_TYPES}")
      if "sliding_attention" in self.layer_types and not (self.sliding_window or 0) >= 1:
        raise ValueError(f"sliding_window={self.sliding_window!r} must be a positive integer "
                         "for sliding_attention layers")

  @property
  def layer_kinds(self) -> np.ndarray:
    """Per layer, 0 for full attention, 1 for sliding-window attention (int32 `(L,)`)."""
    types = self.layer_types or ("full_attention",) * self.num_layers
    return np.array([LAYER_TYPES.index(t) for t in types], np.int32)

  @property
  def attention_scale(self) -> float:
    """What attention scores are multiplied by."""
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
    """From a transformers `config.json` dict (4.x `rope_scaling` or 5.x `rope_parameters`).

    Raises:
      ValueError: naming the key, for a missing required key, an impossible
        value, or an unsupported `model_type`, activation, sliding window, MLP
        bias or RoPE type.
    """
    if not isinstance(hf, dict):
      raise ValueError(f"expected a JSON object of config keys, not a {type(hf).__name__}")
    for key in _REQUIRED_KEYS:
      if hf.get(key) is None:
        raise ValueError(f"required key {key!r} is missing")
    for key in _SIZE_KEYS:
      if hf.get(key) is not None:
        _check_int(key, hf[key])
    for key in ("tie_word_embeddings", "attention_bias"):
      if hf.get(key) is not None and not isinstance(hf[key], bool):
        raise ValueError(f"{key}={hf[key]!r} must be true or false")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("head_dim") is None and hidden % heads:
      raise ValueError(f"num_attention_heads={heads} does not divide hidden_size={hidden} "
                       "(and there is no head_dim)")
    model_type = hf.get("model_type", "llama")
    if model_type not in ARCHITECTURES:
      raise ValueError(f"model_type={model_type!r} is not a supported decoder; "
                       f"supported: {sorted(ARCHITECTURES)}")
    gemma = model_type == "gemma3_text"
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if act not in ACTIVATIONS or (act == "silu") == gemma:
      raise ValueError(f"hidden_act={act!r} for model_type={model_type!r}; expected "
                       f"{'gelu_pytorch_tanh' if gemma else 'silu'}")
    if hf.get("mlp_bias"):
      raise ValueError("mlp_bias=True is not supported")
    if hf.get("use_sliding_window"):
      raise ValueError("use_sliding_window=True is not supported")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
      if hf.get(key) is not None:
        raise ValueError(f"{key}={hf[key]!r} is not supported (Gemma 3 has None)")
    if hf.get("use_bidirectional_attention"):
      raise ValueError("use_bidirectional_attention=True is not supported")
    for key in ("rope_parameters", "rope_scaling"):
      if hf.get(key) is not None and not isinstance(hf[key], dict):
        raise ValueError(f"{key}={hf[key]!r} must be a JSON object")
    rope_params = dict(hf.get("rope_parameters") or {})
    local_rope = {}
    if gemma:  # transformers 5 nests them per layer type; 4.x has rope_local_base_freq
      local_rope = dict(rope_params.pop("sliding_attention", None) or {})
      rope_params = dict(rope_params.pop("full_attention", None) or {})
      local_rope.setdefault("rope_theta", hf.get("rope_local_base_freq", 10000.0))
      if local_rope.get("rope_type", "default") != "default":
        raise ValueError(f"sliding-window RoPE {local_rope!r}: only 'default' is supported")
    rope = dict(rope_params or hf.get("rope_scaling") or {})
    theta = _default(rope.pop("rope_theta", hf.get("rope_theta")), 1e6 if gemma else 10000.0)
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    scaling = None
    if rope_type != "default":
      if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type={rope_type!r}; supported: {ROPE_TYPES}")
      keys = {f.name for f in dataclasses.fields(RopeScaling)}
      scaling = RopeScaling(rope_type=rope_type, **{k: v for k, v in rope.items() if k in keys})
    bias = bool(hf.get("attention_bias", False))
    if gemma:
      pattern = hf.get("sliding_window_pattern", 6)
      _check_int("sliding_window_pattern", pattern)
      types = tuple(hf.get("layer_types") or (
          "sliding_attention" if (i + 1) % pattern else "full_attention"
          for i in range(hf["num_hidden_layers"])))
      family = dict(hidden_act=act, norm_offset=1.0, embed_scale=True, qk_norm=True,
                    sandwich_norms=True,
                    query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
                    layer_types=types, sliding_window=hf.get("sliding_window", 4096),
                    rope_local_theta=_float(local_rope["rope_theta"]))
    else:
      family = {}
    return cls(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        rms_norm_eps=_default(hf.get("rms_norm_eps"), 1e-6), rope_theta=_float(theta),
        rope_scaling=scaling,
        max_position_embeddings=_default(hf.get("max_position_embeddings"), 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        qkv_bias=model_type == "qwen2" or bias, o_bias=bias and model_type == "llama",
        model_type=model_type, bos_token_id=hf.get("bos_token_id"),
        eos_token_id=_ids(hf.get("eos_token_id")), **family)

  def to_hf(self) -> dict[str, Any]:
    """A `config.json` dict that transformers loads as the same model."""
    rope = {"rope_type": "default", "rope_theta": self.rope_theta}
    if self.rope_scaling is not None:
      rope = {**dataclasses.asdict(self.rope_scaling), "rope_theta": self.rope_theta}
    hf = {
        "architectures": [ARCHITECTURES[self.model_type]], "model_type": self.model_type,
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim, "hidden_act": self.hidden_act, "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta, "rope_parameters": rope,
        "rope_scaling": None if self.rope_scaling is None else rope,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_embeddings, "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                        else self.eos_token_id,
    }
    if self.model_type == "llama":
      hf.update(attention_bias=self.o_bias, mlp_bias=False)
    if self.model_type == "gemma3_text":
      local = {"rope_type": "default", "rope_theta": self.rope_local_theta}
      hf.update(hidden_activation=self.hidden_act, query_pre_attn_scalar=self.query_pre_attn_scalar,
                sliding_window=self.sliding_window, layer_types=list(self.layer_types),
                rope_local_base_freq=self.rope_local_theta, attention_bias=False,
                rope_parameters={"full_attention": rope, "sliding_attention": local},
                final_logit_softcapping=None, attn_logit_softcapping=None)
    return hf

  def rope_frequencies(self, kind: int = 0) -> np.ndarray:
    """Inverse frequencies `(head_dim/2,)` in float64 of the layers of `kind`
    (`layer_kinds`): the configured scaling for full attention, none for
    sliding-window layers (which have their own base)."""
    theta = self.rope_theta if kind == 0 else self.rope_local_theta
    inv = 1.0 / theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
    s = self.rope_scaling if kind == 0 else None
    if s is None:
      return inv
    if s.rope_type == "linear":
      return inv / s.factor
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
    wavelen = 2 * math.pi / inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    ramp = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    mid = (1 - ramp) * inv / s.factor + ramp * inv
    return np.where(wavelen > low_wavelen, inv / s.factor,
                    np.where(wavelen < high_wavelen, inv, mid))


_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads")
_SIZE_KEYS = _REQUIRED_KEYS + ("num_key_value_heads", "head_dim", "max_position_embeddings")


def _default(v, default):
  return default if v is None else v


def _float(v):
  """`v` as a float when it is a number (else as is, for the check to name it)."""
  return float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else v


def _check_int(name: str, v, *, low: int = 1, shown=None) -> None:
  if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
    raise ValueError(f"{name}={v if shown is None else shown!r} must be "
                     f"{'a positive' if low == 1 else 'a non-negative'} integer")


def _check_positive(name: str, v) -> None:
  if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
    raise ValueError(f"{name}={v!r} must be a positive finite number")


def _ids(v):
  """Token ids as a hashable value: int, tuple of ints, or None."""
  return tuple(v) if isinstance(v, (list, tuple)) else v
