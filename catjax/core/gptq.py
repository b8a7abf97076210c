"""GPTQ: second-order post-training weight quantization.

Implements GPTQ (Frantar, Ashkboos, Hoefler & Alistarh, 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers",
arXiv:2210.17323) for Flax-layout kernels `(d_in, d_out)` (`y = x @ kernel`).
The paper's weight matrix is `W = kernel.T`, so its "columns" (input channels)
are the rows of `kernel` here.

With `H = E[x xᵀ]` of the layer input, GPTQ quantizes the input channels one
at a time in a fixed order and, after quantizing channel `i`, moves its
rounding error onto the channels not yet quantized so that the layer output
error `tr((W - Q)ᵀ H (W - Q))` stays small. With `H⁻¹ = Uᵀ U` (`U` upper
triangular, the Cholesky form of the paper, Alg. 1):

    q_i  = quant(w_i)
    e_i  = (w_i - q_i) / U_ii
    w_j -= U_ij · e_i            for all j > i

Updates are applied lazily: inside a batch of `lazy_batch` channels row by
row, to all later channels once per batch with one matmul (paper §4, "Lazy
Batch-Updates"). The grid is the repository's RTN weight quantizer
(`catjax.core.quant.weight_config`): symmetric, per output channel (or per group of
input channels and output channel), scales fixed up front from the original
kernel, so that GPTQ without error propagation reproduces `fake_quantize`.
With `format="mxfp4"` / `"nvfp4"` the grid is that FP4 format's (E2M1
elements, one scale per block of input channels and output channel, also
fixed from the original kernel).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from catjax.base.checks import is_ratio
from catjax.core import linalg
from catjax.core import quant
from catjax.core.linalg import HIGHEST


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _row_scales(kernel: jax.Array, config: quant.QuantConfig) -> jax.Array:
  """Per-element scales `(d_in, d_out)` of the RTN quantizer, in original row order."""
  if config.is_fp4:
    block, second = quant.fp4_scales(kernel, config)  # (d_in/g, 1, d_out), (1, 1, 1)
    scale = block * second
  else:
    scale = quant.quantize(kernel, config).scale  # (1, d_out) or (d_in/g, 1, d_out)
  if config.group_size is None:
    return jnp.broadcast_to(scale, kernel.shape)
  return jnp.repeat(scale[:, 0, :], config.group_size, axis=0)


def _upper_inverse_factor(h: jax.Array) -> jax.Array:
  """Upper triangular `U` with `h⁻¹ = Uᵀ U`.

  With the flip `J`, `J h J = L Lᵀ` gives `h⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J)`, and
  `J L⁻¹ J` is upper triangular: one Cholesky and one triangular solve.
  """
  lower = jnp.linalg.cholesky(h[::-1, ::-1])
  eye = jnp.eye(h.shape[0], dtype=h.dtype)
  inv = jax.scipy.linalg.solve_triangular(lower, eye, lower=True)
  return jnp.triu(inv[::-1, ::-1])


@functools.partial(jax.jit, static_argnames=("qmax", "lazy_batch", "act_order", "dtype"))
def _gptq(kernel, hessian, scales, damping, *, qmax, lazy_batch, act_order, dtype):
  """GPTQ on the grid of `scales`: integer levels `-qmax..qmax`, or E2M1 when
  `qmax` is None (a scale of 0 then rounds to 0)."""
  d_in = kernel.shape[0]
  scales = scales.astype(dtype)
  w = kernel.astype(dtype)
  h = linalg.symmetrize(hessian.astype(dtype))
  # Dead inputs (never active): no error to weigh there; quantize them to 0.
  dead = jnp.diag(h) == 0
  h = jnp.where(dead[:, None] | dead[None, :], 0.0, h) + jnp.diag(dead.astype(dtype))
  w = jnp.where(dead[:, None], 0.0, w)
  if act_order:  # Largest diag(H) first (paper §5 / reference code "act_order").
    perm = jnp.argsort(-jnp.diag(h))
    w, scales, h = w[perm], scales[perm], h[perm][:, perm]
  h = h + damping * jnp.mean(jnp.diag(h)) * jnp.eye(d_in, dtype=dtype)
  u = _upper_inverse_factor(h)
  ok = jnp.all(jnp.isfinite(u))

  # Pad to whole blocks: padded channels have weight 0, scale 1 and U = I, so
  # they quantize exactly and never touch the real channels.
  b = min(lazy_batch, d_in)
  n_blocks = -(-d_in // b)
  pad = n_blocks * b - d_in
  w = jnp.pad(w, ((0, pad), (0, 0)))
  scales = jnp.pad(scales, ((0, pad), (0, 0)), constant_values=1.0)
  u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(d_in + pad) >= d_in).astype(dtype)

  def quantize_row(i, carry, ub, sb):
    wb, qb, eb = carry
    s = sb[i]
    if qmax is None:
      q = quant.round_e2m1(wb[i] / jnp.where(s == 0, 1.0, s)) * s
    else:
      q = jnp.clip(jnp.round(wb[i] / s), -qmax, qmax) * s
    e = (wb[i] - q) / ub[i, i]
    # U is upper triangular: rows j < i of the block are left alone (row i
    # itself changes too, but it is already stored in `qb`).
    wb = wb - ub[i][:, None] * e[None, :]
    return wb, qb.at[i].set(q), eb.at[i].set(e)

  def block(k, carry):
    w, q = carry
    start = k * b
    wb = jax.lax.dynamic_slice_in_dim(w, start, b, axis=0)
    sb = jax.lax.dynamic_slice_in_dim(scales, start, b, axis=0)
    ur = jax.lax.dynamic_slice_in_dim(u, start, b, axis=0)  # (b, d_pad)
    ub = jax.lax.dynamic_slice_in_dim(ur, start, b, axis=1)
    zeros = jnp.zeros_like(wb)
    _, qb, eb = jax.lax.fori_loop(
        0, b, functools.partial(quantize_row, ub=ub, sb=sb), (wb, zeros, zeros))
    # Lazy batch update of every later channel (earlier columns of `ur` are 0;
    # the block's own rows change too but are never read again).
    w = w - jnp.matmul(ur.T, eb, precision=HIGHEST)
    return w, jax.lax.dynamic_update_slice_in_dim(q, qb, start, axis=0)

  _, q = jax.lax.fori_loop(0, n_blocks, block, (w, jnp.zeros_like(w)))
  q = q[:d_in]
  if act_order:
    q = q[jnp.argsort(perm)]
  q = jnp.where(ok, q, jnp.nan)  # a failed Cholesky: all NaN, not a partial result
  return q.astype(jnp.float32).astype(kernel.dtype), ok


def gptq_quantize(kernel, hessian, *, bits=4, damping=0.01, lazy_batch=128, act_order=False,
                  group_size=None, clip_ratio=1.0, scale=None, dtype=None,
                  format="int") -> jax.Array:
  """Quantize a kernel with GPTQ (Frantar et al., 2022, arXiv:2210.17323).

  Works in `dtype` (default: the promoted dtype of `kernel` and `hessian`, at
  least float32; matmuls at HIGHEST precision). Input channels with `H_ii = 0`
  are dead: their rows are quantized to 0. `H` is damped by
  `damping · mean(diag H) · I`. Under `jit`, where the inputs cannot be
  checked, an output channel holding a NaN or ±Inf comes out NaN, and so
  does everything when the Cholesky fails.

  Args:
    kernel: `(d_in, d_out)` weight, `y = x @ kernel`.
    hessian: `(d_in, d_in)` second moment `E[x xᵀ]` of the layer input
      (symmetric positive semi-definite; may be rank deficient).
    bits: bit width, an integer in 2..8; levels `-qmax..qmax`,
      `qmax = 2^(bits-1) - 1`.
    damping: relative diagonal damping, finite and >= 0.
    lazy_batch: input channels per lazy batch update (need not divide d_in).
    act_order: quantize input channels in order of decreasing `H_ii`.
    group_size: if set, one scale per group of `group_size` consecutive input
      channels (in the original order) and output channel; must divide d_in.
    clip_ratio: scales are `clip_ratio · absmax / qmax`, in (0, 1].
    scale: optional `(d_out,)` positive per-output-channel scales to use
      instead (e.g. from a clip search); not with `group_size` or `clip_ratio`.
    dtype: computation dtype, float32 or float64 (float64 needs x64).
    format: "int", or "mxfp4" / "nvfp4" (`quant.QuantConfig.format`: bits 4,
      the format's block size as the groups, no `scale`).

  Returns:
    The fake-quantized (dequantized) kernel, same shape and dtype as `kernel`,
    on the grid of `quant.fake_quantize(kernel, quant.weight_config(bits,
    group_size=group_size, clip_ratio=clip_ratio, format=format))` (or of `scale`).

  Raises:
    ValueError: bad shapes, parameters, or non-finite inputs.
    FloatingPointError: the damped hessian is not positive definite (Cholesky
      failed); raise `damping`.
  """
  kernel, hessian = jnp.asarray(kernel), jnp.asarray(hessian)
  if kernel.ndim != 2 or hessian.shape != (kernel.shape[0],) * 2:
    raise ValueError(f"need kernel (d_in, d_out) and hessian (d_in, d_in), got "
                     f"{kernel.shape=} {hessian.shape=}")
  if not _is_int(bits) or not 2 <= bits <= 8:
    raise ValueError(f"bits must be an integer in 2..8, got {bits=!r}")
  if isinstance(damping, bool) or not (math.isfinite(float(damping)) and float(damping) >= 0):
    raise ValueError(f"damping must be finite and >= 0, got {damping=!r}")
  if not _is_int(lazy_batch) or lazy_batch < 1:
    raise ValueError(f"lazy_batch must be a positive integer, got {lazy_batch=!r}")
  if group_size is not None and (
      not _is_int(group_size) or group_size < 1 or kernel.shape[0] % group_size):
    raise ValueError(f"group_size must be None or a positive divisor of d_in, got "
                     f"{group_size=!r} {kernel.shape=}")
  if not is_ratio(clip_ratio):
    raise ValueError(f"clip_ratio must be a number in (0, 1], got {clip_ratio=!r}")
  dtype = linalg.compute_dtype(kernel, hessian, dtype=dtype)
  concrete = not any(isinstance(a, jax.core.Tracer) for a in (kernel, hessian))
  for name, a in (("kernel", kernel), ("hessian", hessian)):
    linalg.check_array(name, a)
  config = quant.weight_config(int(bits), group_size=None if group_size is None else int(group_size),
                               clip_ratio=float(clip_ratio), format=format)
  if config.is_fp4 and scale is not None:
    raise ValueError(f"scale= gives per-channel integer scales; not with {format=!r}")
  # Scales outside the jit, op by op like `quant.fake_quantize`: inside a jit XLA
  # folds `clip · absmax / qmax` into one multiply, which can move a scale by an ulp.
  if scale is None:
    scales = _row_scales(kernel, config)
  else:
    scale = jnp.asarray(scale, jnp.float32)
    if group_size is not None or float(clip_ratio) != 1.0:
      raise ValueError("scale= replaces the grid: give it without group_size or clip_ratio")
    if scale.shape != kernel.shape[1:]:
      raise ValueError(f"scale must have shape (d_out,) = {kernel.shape[1:]}, got {scale.shape=}")
    if concrete and not bool(jnp.all(jnp.isfinite(scale) & (scale > 0))):
      raise ValueError("scale must be finite and > 0")
    scales = jnp.broadcast_to(scale, kernel.shape)
  # A channel holding a NaN or ±Inf gets a NaN scale: it comes out NaN (also where it is dead).
  scales = jnp.where(jnp.all(jnp.isfinite(kernel), axis=0), scales, jnp.nan)
  q, ok = _gptq(kernel, hessian, scales, float(damping),
                qmax=None if config.is_fp4 else config.qmax,
                lazy_batch=int(lazy_batch), act_order=bool(act_order), dtype=dtype)
  if not isinstance(ok, jax.core.Tracer) and not bool(ok):
    raise FloatingPointError(
        f"GPTQ: Cholesky of the damped hessian failed ({hessian.shape=}, {damping=}); the "
        "hessian is not positive definite -- raise damping or check the calibration data")
  return q


def gptq_error(kernel, qkernel, hessian) -> jax.Array:
  """Output error `tr((W - Q)ᵀ H (W - Q))` of a quantized kernel (GPTQ's objective).

  Args:
    kernel: `(d_in, d_out)` original weight.
    qkernel: `(d_in, d_out)` quantized weight.
    hessian: `(d_in, d_in)` second moment of the layer input.

  Returns:
    A scalar in the inputs' promoted dtype (at least float32):
    `Σ_j (k - q)[:, j]ᵀ H (k - q)[:, j]`.

  Raises:
    ValueError: mismatched shapes.
  """
  kernel, qkernel, hessian = jnp.asarray(kernel), jnp.asarray(qkernel), jnp.asarray(hessian)
  if kernel.ndim != 2 or qkernel.shape != kernel.shape or hessian.shape != (kernel.shape[0],) * 2:
    raise ValueError(f"need matching (d_in, d_out) kernels and a (d_in, d_in) hessian, got "
                     f"{kernel.shape=} {qkernel.shape=} {hessian.shape=}")
  dtype = linalg.compute_dtype(kernel, qkernel, hessian)
  diff = kernel.astype(dtype) - qkernel.astype(dtype)
  return jnp.sum(diff * jnp.matmul(hessian.astype(dtype), diff, precision=HIGHEST))
