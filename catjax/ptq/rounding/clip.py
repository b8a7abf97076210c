"""Clip search: per output channel, the clip ratio with the least activation-weighted error."""

import functools

import jax
import jax.numpy as jnp

from catjax.core.quant import fake_quantize_clip_search
from catjax.ptq.rounding.base import WeightMethod

GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.00, 0.95, ..., 0.50


@functools.partial(jax.jit, static_argnames=("config",))
def _search(kernel, importance, *, config):
  return fake_quantize_clip_search(kernel, config, importance=importance, ratios=GRID,
                                   return_scale=True)


def _quantize(kernel, config, *, hessian, ratio, recipe):
  if ratio is not None:
    raise ValueError("learned weight clip ratios replace the clip search: weights='clip' "
                     "cannot take w_clip")
  return _search(kernel, jnp.diagonal(hessian()), config=config)


METHOD = WeightMethod(
    "clip", "per output channel, the clip ratio of a grid with the least activation-weighted "
    "squared error", _quantize, needs_stats=True,
    integer_only="searches clip ratios of an integer grid", learned_clips=False,
    label=lambda recipe: " clip")
