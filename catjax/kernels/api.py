"""`quantized_matmul`: validation and dispatch to the reference or a kernel."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from catjax.kernels import pallas_gpu, reference
from catjax.kernels.qweight import QuantizedWeight

IMPLEMENTATIONS = (None, "reference", "pallas", "pallas_interpret")


def _validate(x, transform_blocks, qweight, a_bits, a_clip, implementation, out_dtype):
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation=!r}")
  if not isinstance(qweight, QuantizedWeight):
    raise ValueError(f"qweight must be a QuantizedWeight (from quantize_weight), got {type(qweight).__name__}")
  if isinstance(a_bits, bool) or not isinstance(a_bits, int) or not 2 <= a_bits <= 8:
    raise ValueError(f"a_bits must be an integer in 2..8, got {a_bits=!r}")
  if isinstance(a_clip, (jax.Array, np.ndarray)):
    if a_clip.shape != () or not jnp.issubdtype(a_clip.dtype, jnp.floating):
      raise ValueError(f"a_clip as an array must be a float scalar, got shape {a_clip.shape} "
                       f"{a_clip.dtype}")
    if not isinstance(a_clip, jax.core.Tracer) and not 0 < float(a_clip) <= 1:
      raise ValueError(f"a_clip must be in (0, 1], got {float(a_clip)!r}")
  elif isinstance(a_clip, bool) or not isinstance(a_clip, (int, float)) or not 0 < a_clip <= 1:
    raise ValueError(f"a_clip must be a number in (0, 1], got {a_clip=!r}")
  if jnp.dtype(out_dtype) not in pallas_gpu.OUT_DTYPES:
    raise ValueError(f"out_dtype must be float32 or bfloat16, got {out_dtype=}")
  d_in, d_out = qweight.shape
  if x.ndim < 1 or x.shape[-1] != d_in:
    raise ValueError(f"x must be (..., d_in) with d_in={d_in} of the weight, got {x.shape=}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be a float array, got {x.dtype=}")
  stored = (d_out, d_in // 2 if qweight.packed else d_in)
  if qweight.values.shape != stored or qweight.scale.shape != (d_out,):
    raise ValueError(
        f"qweight of one layer must have values {stored} and scale ({d_out},) for "
        f"shape={qweight.shape} bits={qweight.bits}, got {qweight.values.shape=} "
        f"{qweight.scale.shape=} (slice stacked layers first)")
  if transform_blocks is not None:
    tb = transform_blocks
    if tb.ndim != 3 or tb.shape[1] != tb.shape[2] or tb.shape[0] * tb.shape[1] != d_in:
      raise ValueError(f"transform_blocks must be (d_in/k, k, k) with d_in={d_in}, got {tb.shape=}")


@functools.partial(jax.jit, static_argnames=("a_bits", "a_clip", "kind", "config", "out_dtype"))
def _run(x2, transform_blocks, qweight, clip, *, a_bits, a_clip, kind, config, out_dtype):
  a_clip = a_clip if clip is None else clip  # a number (static) or a scalar array
  if kind == "reference":
    return reference.quantized_matmul(x2, transform_blocks, qweight, a_bits=a_bits, a_clip=a_clip,
                                      out_dtype=out_dtype)
  x_q, s_x = reference.quantize_activations(x2, transform_blocks, a_bits=a_bits, a_clip=a_clip)
  body, interpret = {"mosaic": ("mosaic", False), "mosaic_interpret": ("mosaic", True),
                     "portable_interpret": ("portable", True)}[kind]
  return pallas_gpu.int_matmul(x_q, s_x, qweight.values, qweight.scale, bits=qweight.bits,
                               config=config, out_dtype=out_dtype, body=body, interpret=interpret)


def quantized_matmul(x: jax.Array, transform_blocks: jax.Array | None, qweight: QuantizedWeight, *,
                     a_bits: int, a_clip: float = 1.0, implementation: str | None = None,
                     out_dtype=jnp.float32,
                     config: pallas_gpu.TileConfig | None = None) -> jax.Array:
  """Transformed, dynamically quantized activations times quantized weights.

  Computes `Q_a(x Bᵀ) · Q_w(W)` with int32 accumulation and both scales
  applied at the end; `reference` (`catjax.kernels.reference`) is the spec.

  Args:
    x: `(..., d_in)` float activations; leading axes are flattened to tokens.
    transform_blocks: `(d_in/k, k, k)` block-diagonal transform (as
      `Transform.blocks`) applied online, or None.
    qweight: one layer from `quantize_weight`.
    a_bits: activation bits (symmetric per token), 2..8.
    a_clip: the activation range is `a_clip` times each token's absmax, in (0, 1]: a
      number (compiled in) or a float32 scalar array (a learned per-layer clip; may be
      traced, e.g. inside the scan over layers).
    implementation: None (the Pallas kernel on a Hopper GPU when the shape is
      supported, else the reference, silently), "reference", "pallas"
      (Mosaic GPU; ValueError with the reason where it cannot run) or
      "pallas_interpret" (CPU: the Mosaic GPU body in GPU interpret mode on
      jax >= 0.12, else the portable Pallas body in interpret mode).
    out_dtype: float32 or bfloat16.
    config: kernel tiles (default `choose_block_config`).

  Returns:
    `(..., d_out)` in `out_dtype`. NaN propagates through the float scales:
    a token holding a NaN or ±Inf (after the transform) gives a NaN output
    row, and a weight channel quantized from one a NaN column.

  Raises:
    ValueError: mismatched shapes, bad bit widths or dtypes, an unknown
      implementation, or "pallas"/"pallas_interpret" on a problem the kernel
      cannot take (the message says why).
  """
  x = jnp.asarray(x)
  _validate(x, transform_blocks, qweight, a_bits, a_clip, implementation, out_dtype)
  out_dtype = jnp.dtype(out_dtype)
  lead = x.shape[:-1]
  d_in, d_out = qweight.shape
  x2 = x.reshape(-1, d_in)
  m = x2.shape[0]
  if config is None:
    config = pallas_gpu.choose_block_config(m, d_in, d_out, bits=qweight.bits, out_dtype=out_dtype)
  kind = "reference"
  if implementation in (None, "pallas"):
    reason = pallas_gpu.unsupported_reason(m, d_in, d_out, bits=qweight.bits, out_dtype=out_dtype,
                                           config=config)
    if reason is None:
      kind = "mosaic"
    elif implementation == "pallas":
      raise ValueError(f"implementation='pallas' cannot run {x.shape=} @ {qweight.shape} "
                       f"(bits={qweight.bits}): {reason}")
  elif implementation == "pallas_interpret":
    reason = pallas_gpu.unsupported_reason(m, d_in, d_out, bits=qweight.bits, out_dtype=out_dtype,
                                           config=config, interpret=True)
    if reason is not None:
      raise ValueError(f"implementation='pallas_interpret' cannot run {x.shape=} @ {qweight.shape} "
                       f"(bits={qweight.bits}): {reason}")
    kind = "mosaic_interpret" if pallas_gpu.has_gpu_interpret() else "portable_interpret"
  if m == 0:
    return jnp.zeros(lead + (d_out,), out_dtype)
  static = isinstance(a_clip, (int, float))
  out = _run(x2, transform_blocks, qweight, None if static else jnp.asarray(a_clip, jnp.float32),
             a_bits=a_bits, a_clip=float(a_clip) if static else 1.0, kind=kind, config=config,
             out_dtype=out_dtype)
  return out.reshape(lead + (d_out,))
