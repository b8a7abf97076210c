"""What a weight rounding method is, and the per-channel grid every method starts from."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from catjax.core.quant import QuantConfig, channel_absmax, fake_quantize, quantize, safe_scale


@dataclasses.dataclass(frozen=True)
class WeightMethod:
  """One entry of `catjax.ptq.rounding.REGISTRY`.

  Attributes:
    name: the method's name (`Recipe.weights`, the spec option `@name`, `--weights`).
    summary: one line for the help and the docs.
    quantize: `quantize(kernel, config, *, hessian, ratio, recipe) -> (q, scale)`:
      the fake-quantized `(d_in, d_out)` kernel (its dtype) and the per-output-channel
      scales of the integer grid it lies on (None for FP4 formats, which have no
      integer export). `hessian()` returns the site's `T Σ_x Tᵀ` (computed once per
      site, on first call); `ratio` is trained CAT's learned clip ratio per output
      channel or None; `recipe` carries the method's settings.
    needs_stats: the method reads the site statistics (`hessian`).
    integer_only: None, or why the method takes integer grids only (FP4 formats are refused).
    learned_clips: takes trained CAT's learned clip ratios (`Recipe.train.w_clip`).
    propagates_quantized: `propagate="auto"` sends the quantized block's outputs on.
    label: the method's part of `Recipe.label`, from the recipe.
  """

  name: str
  summary: str
  quantize: Callable[..., tuple[jax.Array, jax.Array | None]]
  needs_stats: bool = False
  integer_only: str | None = None
  learned_clips: bool = True
  propagates_quantized: bool = False
  label: Callable[[Any], str] = lambda recipe: ""


@functools.partial(jax.jit, static_argnames=("config",))
def _rtn(kernel, *, config):
  q = quantize(kernel, config)
  return (q.values.astype(jnp.float32) * q.scale).astype(kernel.dtype), q.scale[0]


_fake_rtn = jax.jit(fake_quantize, static_argnames=("config",))


def channel_clipped_quantize(kernel: jax.Array, ratio: jax.Array, qmax: int
                             ) -> tuple[jax.Array, jax.Array]:
  """Symmetric per-output-channel fake quantization of a `(d_in, d_out)` kernel
  with a clip ratio per channel: scales `ratio · absmax / qmax`.

  Differentiable in both arguments with straight-through rounding (the LSQ
  gradient): `∂q/∂scale = round(u) − u` inside the range and `±qmax` where a
  weight is clipped, so a learned ratio trades clipping against rounding error.
  With `ratio = 1` the values equal `fake_quantize` on `weight_config`'s grid.

  Returns:
    `(fake-quantized kernel in float32, scales (d_out,))`; a channel holding a
    NaN or ±Inf (or with a NaN ratio) is all NaN, with a NaN scale.
  """
  q, scale = clipped_quantize(kernel, ratio, qmax, axis=-2)
  return q, scale[..., 0, :]


def clipped_quantize(v: jax.Array, ratio: jax.Array, qmax: int, *, axis: int
                     ) -> tuple[jax.Array, jax.Array]:
  """Symmetric fake quantization of `v` with scales `ratio · absmax / qmax`, the absmax
  over `axis` (kept as a length-1 axis of the returned scales) and `ratio` broadcasting
  against it; straight-through rounding, so `ratio` gets the LSQ gradient (see
  `channel_clipped_quantize`, the weights' case; the activations' is `axis=-1`)."""
  v = v.astype(jnp.float32)
  scale = safe_scale(jnp.asarray(ratio, jnp.float32) * channel_absmax(jnp.abs(v), axis) / qmax)
  u = jnp.clip(v / scale, -qmax, qmax)
  levels = u + jax.lax.stop_gradient(jnp.round(u) - u)
  return levels * scale, scale


_clipped_rtn = jax.jit(channel_clipped_quantize, static_argnames=("qmax",))


def round_to_grid(kernel: jax.Array, config: QuantConfig, ratio: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array | None]:
  """Round to nearest on the kernel's grid: per output channel (scales `absmax / qmax`,
  or `ratio · absmax / qmax` with learned clip ratios), per block of input channels
  for the FP4 formats (no integer scales). `(q, scale)` as `WeightMethod.quantize`."""
  if ratio is not None:
    q, scale = _clipped_rtn(kernel, ratio, qmax=config.qmax)
    return q.astype(kernel.dtype), scale
  if config.is_fp4:
    return _fake_rtn(kernel, config=config), None
  return _rtn(kernel, config=config)
