"""Round to nearest: every kernel on its per-output-channel grid."""

from catjax.ptq.rounding.base import WeightMethod, round_to_grid


def _quantize(kernel, config, *, hessian, ratio, recipe):
  return round_to_grid(kernel, config, ratio)


METHOD = WeightMethod("rtn", "round to nearest", _quantize)
