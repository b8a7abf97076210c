"""LLaMA-family model configuration, read from and written to Hugging Face
`config.json` dictionaries (transformers' `LlamaConfig` / `Qwen2Config`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """RoPE frequency scaling: "linear" (positions / factor) or "llama3"."""

  rope_type: str
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """Shape and numerics of a LLaMA-family decoder.

  `qkv_bias` / `o_bias` cover Llama's `attention_bias` (all four projections)
  and Qwen2 (q, k, v only).
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

  def __post_init__(self):
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim"):
      if int(getattr(self, f)) < 1:
        raise ValueError(f"{f}={getattr(self, f)} must be a positive integer")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    if self.model_type not in ARCHITECTURES:
      raise ValueError(f"model_type={self.model_type!r}; supported: {sorted(ARCHITECTURES)}")
    if self.rope_scaling is not None and self.rope_scaling.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_type={self.rope_scaling.rope_type!r}; supported: {ROPE_TYPES}")

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
    """From a transformers `config.json` dict (4.x `rope_scaling` or 5.x `rope_parameters`).

    Raises:
      ValueError: for an unsupported `model_type`, activation, sliding window,
        MLP bias or RoPE type.
    """
    model_type = hf.get("model_type", "llama")
    if model_type not in ARCHITECTURES:
      raise ValueError(f"model_type={model_type!r} is not a LLaMA-family model; "
                       f"supported: {sorted(ARCHITECTURES)}")
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"hidden_act={hf['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
    if hf.get("mlp_bias"):
      raise ValueError("mlp_bias=True is not supported")
    if hf.get("use_sliding_window"):
      raise ValueError("use_sliding_window=True is not supported")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    scaling = None
    if rope_type != "default":
      if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type={rope_type!r}; supported: {ROPE_TYPES}")
      keys = {f.name for f in dataclasses.fields(RopeScaling)}
      scaling = RopeScaling(rope_type=rope_type, **{k: v for k, v in rope.items() if k in keys})
    heads = hf["num_attention_heads"]
    bias = bool(hf.get("attention_bias", False))
    return cls(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bias, o_bias=bias and model_type == "llama",
        model_type=model_type, bos_token_id=hf.get("bos_token_id"),
        eos_token_id=_ids(hf.get("eos_token_id")))

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
        "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta, "rope_parameters": rope,
        "rope_scaling": None if self.rope_scaling is None else rope,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_embeddings, "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                        else self.eos_token_id,
    }
    if self.model_type == "llama":
      hf.update(attention_bias=self.o_bias, mlp_bias=False)
    return hf

  def rope_frequencies(self) -> np.ndarray:
    """Inverse frequencies `(head_dim/2,)` in float64, with the configured scaling."""
    inv = 1.0 / self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
    s = self.rope_scaling
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


def _ids(v):
  """Token ids as a hashable value: int, tuple of ints, or None."""
  return tuple(v) if isinstance(v, (list, tuple)) else v
