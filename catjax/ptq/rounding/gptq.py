"""GPTQ: column by column, the rounding error compensated on the columns not yet quantized."""

from catjax.core.gptq import gptq_quantize
from catjax.ptq.rounding.base import WeightMethod, round_to_grid

DEFAULT_DAMPING = 0.1  # of the mean diagonal (benchmarks/results/smollm2_gptq_damping.md)


def _quantize(kernel, config, *, hessian, ratio, recipe):
  # the grid (and the scales exported with it) is round to nearest's
  _, scale = round_to_grid(kernel, config, ratio)
  q = gptq_quantize(kernel, hessian(), bits=config.bits, damping=recipe.gptq_damping,
                    lazy_batch=recipe.gptq_lazy_batch, act_order=recipe.act_order,
                    scale=None if ratio is None else scale, format=config.format)
  return q, scale


def _label(recipe) -> str:
  name = " gptq"
  if recipe.gptq_damping != DEFAULT_DAMPING:
    name += f" d={recipe.gptq_damping:g}"
  return name + (" act-order" if recipe.act_order else "")


METHOD = WeightMethod(
    "gptq", "GPTQ with the site's Hessian T Σ_x Tᵀ", _quantize, needs_stats=True,
    propagates_quantized=True, label=_label)
