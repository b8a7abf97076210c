"""`QuantizedModel`: a model with merged, fake-quantized kernels and its online part."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from catjax.models.llama import Llama
from catjax.models.spec import spec_for
from catjax.core.transforms import Transform
from catjax.ptq.hooks import QuantHook
from catjax.ptq.recipe import Recipe


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
  """A model with transformed, fake-quantized kernels and its online part.

  Run it with `forward(qm.model, tokens, hook=qm.hook, hook_state=qm.transforms)`
  or `perplexity(qm.model, windows, hook=qm.hook, hook_state=qm.transforms)`.
  `real`: the linears are integer (`catjax.ptq.realize.realize`) and
  quantize their inputs themselves, so the hook only transforms (and
  quantizes the KV cache).

  Attributes:
    model: the model with merged, fake-quantized kernels.
    transforms: `{site: Transform}` stacked over layers, or None.
    recipe: the recipe.
    real: see above.
    w_scales: `{linear path: (num_layers, d_out)}` per-channel scales of the
      grid every fake-quantized kernel lies on (for integer export).
    info: what the engine measured (seconds, training losses per block, ...).
    plan / plan_hook: a `catjax.ptq.plan.Plan` model: `transforms` is then the
      `PlanHook`'s state (`catjax.ptq.plan.hook_state`) and `hook` the plan hook;
      `recipe` the plan's base recipe.
  """

  model: Llama
  transforms: dict[str, Transform] | None
  recipe: Recipe
  real: bool = False
  w_scales: dict[tuple[str, ...], jax.Array] | None = None
  info: dict[str, Any] | None = None
  plan: Any = None
  plan_hook: Any = None

  @property
  def label(self) -> str:
    return self.recipe.label if self.plan is None else self.plan.label

  @property
  def hook(self):
    if self.plan_hook is not None:
      return self.plan_hook
    return QuantHook(None if self.real else self.recipe.a_config, self.recipe.kv_config,
                     spec_for(self.model.config).kv_sites)
