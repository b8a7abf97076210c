"""tunix's Llama3 and Qwen2 (the optional `google-tunix` package) from a Hugging Face
folder: foreign models for `catjax.quantize`, and the reference that the rule
path works on a model catjax did not write.

`load_tunix(folder)` reads the folder's `config.json` with catjax's own reader,
builds tunix's `ModelConfig` from it and loads the weights with tunix's own
safetensors loader. tunix 0.1.7's `Llama3` attention calls `apply_rope`
without the configured `rope_theta` (so 1e6 is always used); `load_tunix`
swaps each layer's attention for a subclass whose `block` passes the theta
(`rope_fixed=False` keeps tunix's behaviour). `forward(model, tokens)` runs
either model causally over `(B, T)` tokens and returns the logits.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp

from catjax.models.loading import load_config

FAMILIES = ("llama", "qwen2")


def _tunix(family: str):
  try:
    if family == "llama":
      from tunix.models.llama3 import model, params
    else:
      from tunix.models.qwen2 import model, params
  except ImportError as e:
    raise ImportError(f"tunix's {family} model needs the optional package google-tunix "
                      f"(pip install google-tunix): {e}") from None
  return model, params


@functools.cache
def _rope_fixed_attention(base: type) -> type:
  """tunix Llama3's `Attention` with a `block` that rotates by `self.catjax_rope_theta`."""
  from tunix.models.llama3.model import apply_rope

  def block(self, x, segment_pos, cache, attn_mask):
    rot = functools.partial(apply_rope, positions=segment_pos, head_dim=self.head_dim,
                            rope_theta=self.catjax_rope_theta)
    q, k, v = rot(self.q_proj(x)), rot(self.k_proj(x)), self.v_proj(x)
    new_cache = None
    if cache is not None:
      at = (0, cache["end_index"][0] % cache["v"].shape[1], 0, 0)
      k = jax.lax.dynamic_update_slice(cache["k"], k, at)
      v = jax.lax.dynamic_update_slice(cache["v"], v, at)
      new_cache = {"k": k, "v": v, "end_index": cache["end_index"] + x.shape[1]}
    b, t, heads, hd = q.shape
    groups = heads // k.shape[2]
    scores = jnp.einsum("btkgh,bskh->bkgts", q.reshape(b, t, k.shape[2], groups, hd), k)
    scores = scores.astype(jnp.float32) * hd ** -0.5
    if attn_mask is not None:
      scores = jnp.where(attn_mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, heads, hd)
    return new_cache, self.o_proj(out)

  return type(base.__name__, (base,), {"block": block, "__module__": base.__module__,
                                       "__qualname__": base.__qualname__})


def load_tunix(folder: str | Path, *, dtype=jnp.float32, rope_fixed: bool = True):
  """tunix's `Llama3` (model_type "llama") or `Qwen2` ("qwen2") of a Hugging Face folder.

  `rope_fixed`: make Llama3 rotate by the config's `rope_theta` (tunix 0.1.7 uses
  1e6 whatever the config says). Raises ValueError for another model type or a
  RoPE scaling tunix does not implement.
  """
  folder = Path(folder)
  cfg = load_config(folder)
  family = cfg.model_type if cfg.model_type in FAMILIES else None
  if family is None:
    raise ValueError(f"{folder}: model_type={cfg.model_type!r}; tunix adapters exist for "
                     f"{FAMILIES}")
  if cfg.rope_scaling is not None:
    raise ValueError(f"{folder}: rope_scaling={cfg.rope_scaling!r}: tunix's models apply plain RoPE")
  model_lib, params = _tunix(family)
  common = dict(num_layers=cfg.num_layers, vocab_size=cfg.vocab_size, embed_dim=cfg.hidden_size,
                hidden_dim=cfg.intermediate_size, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
                num_kv_heads=cfg.num_kv_heads, rope_theta=cfg.rope_theta, norm_eps=cfg.rms_norm_eps)
  tied = {"weight_tying": cfg.tie_embeddings} if family == "llama" else {
      "use_tied_embedding": cfg.tie_embeddings}
  model = params.create_model_from_safe_tensors(str(folder), model_lib.ModelConfig(**common, **tied),
                                                dtype=dtype)
  if family == "llama" and rope_fixed:
    for layer in model.layers:
      layer.attn.__class__ = _rope_fixed_attention(type(layer.attn))
      layer.attn.catjax_rope_theta = cfg.rope_theta
  return model


def call_args(tokens) -> tuple:
  """The arguments of a tunix model's call over `tokens (B, T)`, causally, no cache:
  `(tokens, positions, None, mask)` (what `qwix.quantize_model` takes as its sample)."""
  tokens = jnp.asarray(tokens, jnp.int32)
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
  return tokens, positions, None, mask


def forward(model, tokens: jax.Array) -> jax.Array:
  """Logits `(B, T, vocab)` of a tunix model over `tokens (B, T)`, causally, no cache."""
  return model(*call_args(tokens))[0]
