"""GPTQ: column by column, the rounding error compensated on the columns not yet quantized."""

from catjax.core.gptq import gptq_quantize
from catjax.ptq.configs import DEFAULT_DAMPING
from catjax.ptq.rounding.base import WeightMethod, round_to_grid


def _quantize(kernel, config, *, hessian, ratio, recipe):
  # the grid (and the scales exported with it) is round to nearest's
  _, scale = round_to_grid(kernel, config, ratio)
  q = gptq_quantize(kernel, hessian(), bits=config.bits, damping=recipe.gptq.damping,
                    lazy_batch=recipe.gptq.lazy_batch, act_order=recipe.gptq.act_order,
                    scale=None if ratio is None else scale, format=config.format)
  return q, scale


def _label(recipe) -> str:
  name = " gptq"
  if recipe.gptq.damping != DEFAULT_DAMPING:
    name += f" d={recipe.gptq.damping:g}"
  return name + (" act-order" if recipe.gptq.act_order else "")


METHOD = WeightMethod(
    "gptq", "GPTQ with the site's Hessian T Σ_x Tᵀ", _quantize, needs_stats=True,
    propagates_quantized=True, label=_label)
