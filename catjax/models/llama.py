"""The decoder in Flax NNX: Llama 1/2/3, SmolLM2, Qwen2 (q/k/v biases) and Gemma 3
(GeGLU, `1 + w` norms, QK-norm, sandwich norms, sliding-window layers; the
`ModelConfig` fields switch these on).

The decoder blocks are stored **stacked**: every block parameter has a leading
`num_layers` axis (`layers/attn/q_proj/kernel` is `(L, d, H·hd)`) and the
forward is one `jax.lax.scan` over them, so a 30-block model compiles one
block. The PTQ pipeline works on these stacked arrays directly.

Site hook. The four quantization sites of a block (docs/design.md §2) are the inputs
of its linears: `attn_in` (q, k, v), `o_in` (o_proj), `mlp_in` (gate, up) and
`down_in` (down_proj). A forward may take `hook(site, x, state) -> (x', out)`:
it sees each site input `x (B, T, d)` with `state`, this layer's slice of
`hook_state[site]` (or None), feeds `x'` to the linears, and `out` is
collected per site, stacked over layers. The hook also sees the attention
keys (after RoPE) and values on their way into the KV cache, as the sites
`KV_SITES` with `x (B, T, kv_heads, head_dim)`. Capturing activations, accumulating
calibration statistics and online transform + fake quantization are all
hooks; there is one copy of the model.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from catjax.base.checks import check_seed
from catjax.models.config import ModelConfig
from catjax.models.spec import LLAMA

SITES = LLAMA.site_names
# Hook points of the attention keys (after RoPE) and values, `(B, T, kv_heads, hd)`,
# before they enter the KV cache: where KV-cache quantization happens.
KV_SITES = LLAMA.kv_sites
Hook = Callable[[str, jax.Array, Any], tuple[jax.Array, Any]]
_INIT = nnx.initializers.normal(0.02)


class Linear(nnx.Module):
  """`y = x @ kernel (+ bias)`; `kernel` is `(*stack, d_in, d_out)`."""

  def __init__(self, d_in: int, d_out: int, *, bias: bool, stack: tuple[int, ...],
               dtype, rngs: nnx.Rngs):
    self.kernel = nnx.Param(_INIT(rngs.params(), (*stack, d_in, d_out)).astype(dtype))
    self.bias = nnx.Param(jnp.zeros((*stack, d_out), dtype)) if bias else None

  def __call__(self, x):
    y = jnp.einsum("...i,io->...o", x, self.kernel[...].astype(x.dtype))
    return y if self.bias is None else y + self.bias[...].astype(x.dtype)


class RMSNorm(nnx.Module):
  """RMS normalization, computed in float32 as transformers does.

  With `offset` (Gemma) the weight is stored as `scale - offset` (initialized
  to 0) and the product is taken in float32 before the cast; without, Llama's
  `scale * x.astype(dtype)`.
  """

  def __init__(self, d: int, *, eps: float, stack: tuple[int, ...], dtype, offset: float = 0.0):
    self.scale = nnx.Param((jnp.zeros if offset else jnp.ones)((*stack, d), dtype))
    self.eps, self.offset = eps, offset

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.offset:
      return ((self.offset + self.scale[...].astype(jnp.float32)) * x32).astype(x.dtype)
    return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def rotate(x, cos, sin):
  """RoPE in the half-split ("rotate_half") layout of transformers: x (B, T, heads, hd)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  rot = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos + rot * sin).astype(x.dtype)


def attend(q, k, v, mask, scale: float | None = None):
  """Softmax attention of `q (B, T, K, G, hd)` (G query heads per kv head) over
  `k, v (B, S, K, hd)` where `mask` (broadcastable to `(B, K, G, T, S)`) is True;
  scores scaled by `scale` (default `hd ** -0.5`)."""
  scale = jnp.asarray(q.shape[-1] ** -0.5 if scale is None else scale, q.dtype)
  scores = jnp.einsum("btkgh,bskh->bkgts", q * scale, k, preferred_element_type=jnp.float32)
  scores = jnp.where(mask, scores, -jnp.inf)
  # Normalize after the value product: (T, hd) divisions instead of (T, S).
  probs = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
  total = jnp.sum(probs, axis=-1).transpose(0, 3, 1, 2)[..., None]  # (B, T, K, G, 1)
  out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return (out / total).astype(v.dtype)


def causal_attention(q, k, v, *, scale: float | None = None, window=None, chunk: int = 128):
  """Causal self-attention of `q (B, T, K, G, hd)` over `k, v (B, T, K, hd)`:
  query i sees keys 0..i, and only the `window` latest of them when `window`
  (a Python or traced int) is given.

  Computed in query chunks of `chunk`, heads-major (one transpose of q, k, v
  instead of one per product): chunk j's scores against the keys before it
  need no mask, those against its own keys a triangular one; the softmax
  spans both and is normalized after the value products. Only the unmasked
  half of the work is done and the scores stay in cache (~2x faster than the
  tokens-major layout at 2048 tokens on CPU, 3-4x faster than one masked
  product).
  """
  t, hd = q.shape[1], q.shape[-1]
  dtype = v.dtype
  qt = jnp.transpose(q, (0, 2, 3, 1, 4)) * jnp.asarray(hd ** -0.5 if scale is None else scale,
                                                        q.dtype)  # (B, K, G, T, hd)
  kt, vt = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))  # (B, K, T, hd)

  def part(qc, lo, hi, distance):
    s = jnp.einsum("bkgth,bksh->bkgts", qc, kt[:, :, lo:hi], preferred_element_type=jnp.float32)
    mask = distance >= 0
    if window is not None:
      mask = mask & (distance < window)
    return jnp.where(mask, s, -jnp.inf), vt[:, :, lo:hi]

  outs = []
  for lo in range(0, t, chunk):
    hi = min(lo + chunk, t)
    rows = np.arange(lo, hi)[:, None]
    parts = [part(qt[:, :, :, lo:hi], lo, hi, rows - np.arange(lo, hi)[None, :])]
    if lo:
      parts.append(part(qt[:, :, :, lo:hi], 0, lo, rows - np.arange(lo)[None, :]))
    m = functools.reduce(jnp.maximum, [jnp.max(s, -1, keepdims=True) for s, _ in parts])
    out = total = 0.0
    for s, vals in parts:
      p = jnp.exp(s - m)
      total = total + jnp.sum(p, axis=-1, keepdims=True)
      out = out + jnp.einsum("bkgts,bksh->bkgth", p.astype(dtype), vals,
                             preferred_element_type=jnp.float32)
    outs.append((out / total).astype(dtype))
  out = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
  return jnp.transpose(out, (0, 3, 1, 2, 4))  # (B, T, K, G, hd)


class Attention(nnx.Module):
  """Grouped-query attention with RoPE and an optional KV cache."""

  def __init__(self, cfg: ModelConfig, *, stack, dtype, rngs):
    d, hd = cfg.hidden_size, cfg.head_dim
    lin = functools.partial(Linear, stack=stack, dtype=dtype, rngs=rngs)
    self.q_proj = lin(d, cfg.num_heads * hd, bias=cfg.qkv_bias)
    self.k_proj = lin(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
    self.v_proj = lin(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
    self.o_proj = lin(cfg.num_heads * hd, d, bias=cfg.o_bias)
    norm = functools.partial(RMSNorm, hd, eps=cfg.rms_norm_eps, stack=stack, dtype=dtype,
                             offset=cfg.norm_offset)
    self.q_norm, self.k_norm = (norm(), norm()) if cfg.qk_norm else (None, None)
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
    self.scale = cfg.attention_scale

  def __call__(self, x, rope, mask, cache, site):
    b, t, _ = x.shape
    cos, sin, window = rope
    x = site("attn_in", x)
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = rotate(q, cos, sin), site("keys", rotate(k, cos, sin))
    v = site("values", v)
    if cache is not None:  # write this step's keys/values at `start`, attend over the cache
      start = cache["index"]
      k = cache["k"] = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype),
                                                           start, axis=1)
      v = cache["v"] = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype),
                                                           start, axis=1)
      k, v = k.astype(x.dtype), v.astype(x.dtype)
    q = q.reshape(b, t, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
    if mask is None:
      out = causal_attention(q, k, v, scale=self.scale, window=window)
    else:
      out = attend(q, k, v, mask[:, None, None], self.scale)
    out = out.reshape(b, t, -1)
    return self.o_proj(site("o_in", out)), cache


_ACTIVATIONS = {"silu": jax.nn.silu,
                "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True)}


class MLP(nnx.Module):
  """Gated MLP: down(act(gate(x)) * up(x)), SwiGLU (silu) or GeGLU (tanh gelu)."""

  def __init__(self, cfg: ModelConfig, *, stack, dtype, rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    lin = functools.partial(Linear, bias=False, stack=stack, dtype=dtype, rngs=rngs)
    self.gate_proj, self.up_proj, self.down_proj = lin(d, f), lin(d, f), lin(f, d)
    self.act = cfg.hidden_act

  def __call__(self, x, site):
    x = site("mlp_in", x)
    hidden = _ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x)
    return self.down_proj(site("down_in", hidden))


class Block(nnx.Module):
  """Pre-norm decoder block (with `sandwich_norms`, the attention and MLP
  outputs are normalized too); built with `stack=(L,)` to hold all L blocks."""

  def __init__(self, cfg: ModelConfig, *, stack=(), dtype=jnp.float32, rngs):
    norm = functools.partial(RMSNorm, cfg.hidden_size, eps=cfg.rms_norm_eps, stack=stack,
                             dtype=dtype, offset=cfg.norm_offset)
    self.attn_norm, self.mlp_norm = norm(), norm()
    self.attn_post_norm, self.mlp_post_norm = (norm(), norm()) if cfg.sandwich_norms else (None, None)
    self.attn = Attention(cfg, stack=stack, dtype=dtype, rngs=rngs)
    self.mlp = MLP(cfg, stack=stack, dtype=dtype, rngs=rngs)

  def __call__(self, h, rope, mask, cache, site):
    a, cache = self.attn(self.attn_norm(h), rope, mask, cache, site)
    if self.attn_post_norm is not None:
      a = self.attn_post_norm(a)
    h = h + a
    m = self.mlp(self.mlp_norm(h), site)
    if self.mlp_post_norm is not None:
      m = self.mlp_post_norm(m)
    return h + m, cache


class Llama(nnx.Module):
  """LLaMA-family causal LM. Parameters in `dtype` (float32 or bfloat16)."""

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
      raise ValueError(f"dtype={dtype}; expected float32, bfloat16 or float16")
    self.config = cfg
    self.embed = nnx.Param(_INIT(rngs.params(), (cfg.vocab_size, cfg.hidden_size)).astype(dtype))
    self.layers = Block(cfg, stack=(cfg.num_layers,), dtype=dtype, rngs=rngs)
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, stack=(), dtype=dtype,
                        offset=cfg.norm_offset)
    self.lm_head = None if cfg.tie_embeddings else Linear(
        cfg.hidden_size, cfg.vocab_size, bias=False, stack=(), dtype=dtype, rngs=rngs)

  @property
  def dtype(self):
    return self.embed[...].dtype

  def embed_tokens(self, tokens):
    """The residual stream entering block 0: `(B, T, d)` in the model's dtype
    (Gemma: times √d rounded to that dtype, as transformers does)."""
    h = jnp.take(self.embed[...], tokens, axis=0)
    if self.config.embed_scale:
      h = h * jnp.asarray(self.config.hidden_size ** 0.5, h.dtype)
    return h

  def __call__(self, tokens, *, positions=None, cache=None, hook: Hook | None = None,
               hook_state: dict[str, Any] | None = None, key_mask=None):
    """Logits `(B, T, vocab)` in float32.

    Args:
      tokens: int `(B, T)`.
      positions: `(B, T)` absolute positions; default `index + arange(T)`.
      cache: a KV cache from `init_cache` (then returned updated), or None.
      hook: optional site hook (module docstring); a static Python callable.
      hook_state: per-site pytrees with a leading `num_layers` axis for `hook`.
      key_mask: optional bool `(B, S)` (S: the cache length, else T): False for
        key positions no query may see (left padding of a batch of prompts).
        A position whose own key is masked still sees itself, so its (unused)
        output stays finite.

    Returns:
      `logits`, then `cache` if one was given, then the dict of stacked hook
      outputs if `hook` was given.
    """
    b, t = tokens.shape
    start = 0 if cache is None else cache["index"]
    default_positions = positions is None
    if default_positions:
      positions = jnp.broadcast_to(start + jnp.arange(t), (b, t))
    cfg = self.config
    tables = rope_tables(cfg, positions, self.dtype)
    if cache is None and default_positions and key_mask is None:
      masks = None  # plain causal self-attention, computed in chunks
    else:
      key_pos = positions if cache is None else jnp.arange(cache["k"].shape[2])[None]
      distance = positions[:, :, None] - key_pos[:, None, :]  # (B, T, S)
      masks = jnp.stack([distance >= 0] + ([(distance >= 0) & (distance < cfg.sliding_window)]
                                           if cfg.layer_types else []))
      if key_mask is not None:
        masks = (masks & key_mask[None, :, None, :]) | (distance == 0)[None]

    hook_state = {} if hook_state is None else hook_state
    graphdef, layer_params = nnx.split(self.layers)
    layer_cache = None if cache is None else {"k": cache["k"], "v": cache["v"]}

    def body(h, xs):
      params, kv, states, kind = xs
      if kv is not None:
        kv = {**kv, "index": start}
      rope = layer_rope(cfg, tables, kind)
      mask = None if masks is None else masks[0 if cfg.layer_types is None else kind]
      h, kv, outs = block_forward(graphdef, params, h, rope, hook=hook, hook_state=states,
                                  mask=mask, cache=kv)
      if kv is not None:
        kv = {"k": kv["k"], "v": kv["v"]}
      return h, (kv, outs)

    h = self.embed_tokens(tokens)
    h, (layer_cache, outs) = jax.lax.scan(
        body, h, (layer_params, layer_cache, hook_state, jnp.asarray(cfg.layer_kinds)))
    h = self.norm(h)
    if self.lm_head is None:
      logits = jnp.einsum("btd,vd->btv", h, self.embed[...], preferred_element_type=jnp.float32)
    else:
      logits = self.lm_head(h).astype(jnp.float32)
    result = (logits,)
    if cache is not None:
      result += ({**layer_cache, "index": start + t},)
    if hook is not None:
      result += (outs,)
    return result[0] if len(result) == 1 else result


def rope_tables(cfg: ModelConfig, positions, dtype) -> tuple[jax.Array, jax.Array]:
  """RoPE `(cos, sin)` per layer kind (`cfg.layer_kinds`), each
  `(kinds, B, T, 1, head_dim)`, for integer `positions (B, T)`."""
  kinds = range(2 if cfg.layer_types else 1)
  inv_freq = np.stack([cfg.rope_frequencies(k) for k in kinds]).astype(np.float32)
  angles = jnp.asarray(positions)[None, ..., None].astype(jnp.float32) * inv_freq[:, None, None]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, :, None, :]
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def layer_rope(cfg: ModelConfig, tables, kind):
  """A layer's attention context `(cos, sin, window)` from `rope_tables`:
  `kind` 0 (full attention, window None) or 1 (sliding window), a Python int
  or a traced scalar (inside the scan over layers)."""
  cos, sin = tables
  if cfg.layer_types is None:
    return cos[0], sin[0], None
  if isinstance(kind, (int, np.integer)):
    return cos[kind], sin[kind], cfg.sliding_window if kind else None
  window = jnp.where(kind == 1, cfg.sliding_window, jnp.iinfo(jnp.int32).max)
  return cos[kind], sin[kind], window


def block_forward(graphdef, params, h, rope, *, hook: Hook | None = None, hook_state=None,
                  mask=None, cache=None):
  """One decoder block: `(h', cache', hook outputs)`.

  `graphdef` is the block's (from `nnx.split(model.layers)`), `params` one
  block's slice of the stacked state; the site hook and `hook_state` (this
  block's per-site states) work as in `Llama.__call__`. The block-by-block PTQ
  engine and the model's own scan both run blocks through here.
  """
  states = {} if hook_state is None else hook_state
  outs = {}

  def site(name, x):
    if hook is None:
      return x
    x, outs[name] = hook(name, x, states.get(name))
    return x

  h, cache = nnx.merge(graphdef, params)(h, rope, mask, cache, site)
  return h, cache, outs


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
  """An empty KV cache: `k`, `v` of shape `(L, B, max_len, kv_heads, head_dim)`, `index` 0."""
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
          "index": jnp.zeros((), jnp.int32)}


def random_model(cfg: ModelConfig, *, seed: int = 0, dtype=jnp.float32) -> Llama:
  """A randomly initialized model (normal(0.02) weights, unit norms) for tests."""
  return Llama(cfg, dtype=dtype, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig, *, dtype=jnp.float32) -> Llama:
  """The model's structure with `ShapeDtypeStruct` leaves (no memory, no init)."""
  return nnx.eval_shape(lambda: Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


@functools.partial(jax.jit, static_argnames=("graphdef", "hook"))
def _apply(graphdef, state, tokens, cache, hook, hook_state, key_mask):
  return nnx.merge(graphdef, state)(tokens, cache=cache, hook=hook, hook_state=hook_state,
                                    key_mask=key_mask)


def forward(model: Llama, tokens, *, cache=None, hook: Hook | None = None, hook_state=None,
            key_mask=None):
  """Jitted `model(tokens, ...)` (compiled once per shape, hook and model structure)."""
  graphdef, state = nnx.split(model)
  return _apply(graphdef, state, jnp.asarray(tokens, jnp.int32), cache, hook, hook_state,
                None if key_mask is None else jnp.asarray(key_mask, bool))


def capture(model: Llama, tokens, *, sites=SITES) -> dict[str, jax.Array]:
  """The inputs of `sites` (any of `SITES + KV_SITES`), each `(num_layers, B, T, ...)`:
  a hook that records them."""
  unknown = set(sites) - set(SITES + KV_SITES)
  if unknown:
    raise ValueError(f"unknown sites {sorted(unknown)}; expected some of {SITES + KV_SITES}")
  _, outs = forward(model, tokens, hook=_capture_hook(tuple(sites)))
  return {site: outs[site] for site in sites}


@functools.lru_cache(maxsize=None)
def _capture_hook(sites: tuple[str, ...]) -> Hook:
  return lambda site, x, _: (x, x if site in sites else None)


# `generate`'s default end of sequence: the model config's `eos_token_id`.
FROM_CONFIG = "config"


def generate(model: Llama, prompt, *, max_new_tokens: int = 32,
             eos_token_id: int | list[int] | str | None = FROM_CONFIG, hook: Hook | None = None,
             hook_state=None, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             on_token=None) -> list[int]:
  """Continuation of one prompt with a KV cache; returns the new token ids.

  Greedy at `temperature == 0`, else sampled from `softmax(logits / temperature)`
  restricted to the smallest set of tokens whose probability reaches `top_p`
  (nucleus), with `jax.random` keys from `seed` (the same seed, the same
  tokens). `hook`/`hook_state` run a quantized model (`QuantizedModel.hook`,
  `.transforms`); a KV-quantizing hook quantizes the cached keys and values.
  `on_token(id)` is called as each token is chosen (streaming); a true return
  value stops generation there. Stops after `max_new_tokens` or at an
  end-of-sequence id (included in the result): `eos_token_id`, by default the
  model config's (as the checkpoint declares it); None never stops early.

  Raises:
    ValueError: an empty prompt, `max_new_tokens < 1`, a negative temperature
      or a `top_p` outside (0, 1].
  """
  stream = None if on_token is None else (lambda _, token: on_token(token))
  return generate_batch(model, [prompt], max_new_tokens=max_new_tokens,
                        eos_token_id=eos_token_id, hook=hook, hook_state=hook_state,
                        temperature=temperature, top_p=top_p, seed=seed, on_token=stream)[0]


def _check_cache_memory(model: Llama, batch: int, prompt: int, max_new_tokens: int) -> None:
  """Refuse, before allocating, a KV cache that does not fit the free memory."""
  from catjax.models.loading import available_bytes  # loading builds on this module

  cfg = model.config
  need = (2 * cfg.num_layers * batch * (prompt + max_new_tokens) * cfg.num_kv_heads * cfg.head_dim
          * jnp.dtype(model.dtype).itemsize)
  have = available_bytes(jax.devices()[0])
  if have is not None and need > have:
    raise ValueError(f"max_new_tokens={max_new_tokens}: the KV cache of {batch} x "
                     f"{prompt + max_new_tokens} positions needs {need / 2**30:.1f} GiB; "
                     f"{have / 2**30:.1f} GiB are free")


def generate_batch(model: Llama, prompts, *, max_new_tokens: int = 32,
                   eos_token_id: int | list[int] | str | None = FROM_CONFIG,
                   hook: Hook | None = None,
                   hook_state=None, temperature: float = 0.0, top_p: float = 1.0,
                   seed: int = 0, on_token=None) -> list[list[int]]:
  """`generate` for several prompts at once, one forward per step for all.

  Prompts of different lengths are left-padded and the padding is masked from
  attention (`key_mask`); RoPE depends only on relative positions, so each
  row computes what it would alone. `on_token(row, id)` streams; a true
  return value stops that row. Each row stops on its own (end of sequence,
  `on_token`, `max_new_tokens`); the batch runs until all have.

  Raises:
    ValueError: as `generate`, naming the empty prompt's index.
  """
  prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
  if not prompts:
    raise ValueError("prompts is empty: give at least one prompt")
  for i, p in enumerate(prompts):
    if p.size == 0:
      raise ValueError(f"prompt {i} is empty: generation needs at least one token")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if not (np.isfinite(temperature) and temperature >= 0):
    raise ValueError(f"temperature={temperature!r}: expected a finite value >= 0")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p!r}: expected a value in (0, 1]")
  check_seed("seed", seed)
  if isinstance(eos_token_id, str):
    if eos_token_id != FROM_CONFIG:
      raise ValueError(f"eos_token_id={eos_token_id!r}: expected token ids, None or "
                       f"{FROM_CONFIG!r} (the model config's)")
    eos_token_id = model.config.eos_token_id
  eos = set(np.atleast_1d(eos_token_id).tolist()) if eos_token_id is not None else set()
  b, t = len(prompts), max(p.size for p in prompts)
  _check_cache_memory(model, b, t, max_new_tokens)
  tokens = np.zeros((b, t), np.int32)
  key_mask = np.ones((b, t + max_new_tokens), bool)
  for i, p in enumerate(prompts):
    tokens[i, t - p.size:] = p
    key_mask[i, :t - p.size] = False
  padded = not key_mask.all()
  cache = init_cache(model.config, b, t + max_new_tokens, model.dtype)
  key = jax.random.PRNGKey(seed)

  def step(tokens, cache):
    out = forward(model, tokens, cache=cache, hook=hook, hook_state=hook_state,
                  key_mask=key_mask if padded else None)
    return out[0], out[1]

  logits, cache = step(tokens, cache)
  new = [[] for _ in prompts]
  done = [False] * b
  while True:
    last = logits[:, -1]
    if temperature == 0:
      chosen = np.asarray(jnp.argmax(last, axis=-1)).tolist()
    else:
      chosen = [int(_sample(last[i], jax.random.fold_in(key, len(new[i]) * b + i),
                            float(temperature), float(top_p))) for i in range(b)]
    for i, token in enumerate(chosen):
      if done[i]:
        continue
      new[i].append(int(token))
      stop = on_token is not None and on_token(i, int(token))
      done[i] = bool(stop) or token in eos or len(new[i]) == max_new_tokens
    if all(done):
      return new
    logits, cache = step(np.asarray(chosen, np.int32)[:, None], cache)


@jax.jit
def _sample(logits, key, temperature, top_p):
  """One token from `softmax(logits / temperature)` cut to its top-`p` nucleus."""
  logits = logits.astype(jnp.float32) / temperature
  order = jnp.argsort(-logits)
  probs = jax.nn.softmax(logits[order])
  # Keep a token when the mass before it is below top_p (the first is always kept).
  keep = jnp.cumsum(probs) - probs < top_p
  choice = jax.random.categorical(key, jnp.where(keep, logits[order], -jnp.inf))
  return order[choice]
