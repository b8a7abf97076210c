"""`QuantizedModel`: a model with merged, fake-quantized kernels and its online part."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from catjax.models.llama import Llama
from catjax.models.spec import spec_for
from catjax.ptq.hooks import SiteHook
from catjax.ptq.policy import Policy, layer_recipes, site_hook
from catjax.ptq.recipe import Recipe


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
  """A model with transformed, fake-quantized kernels and its online part.

  Run it with `forward(qm.model, tokens, hook=qm.hook, hook_state=qm.transforms)`
  or `perplexity(qm.model, windows, hook=qm.hook, hook_state=qm.transforms)`.
  `real`: the linears are integer (`catjax.ptq.realization.realize`) and
  quantize their inputs themselves, so the hook only transforms (and
  quantizes the KV cache).

  Attributes:
    model: the model with merged, fake-quantized kernels.
    transforms: the hook state (`catjax.ptq.policy.site_state`): for a recipe
      `{site: Transform}` stacked over layers, or None.
    policy: what each site was quantized with: a `Recipe` or a
      `catjax.ptq.plan.Plan` (`catjax.ptq.policy`).
    real: see above.
    w_scales: `{linear path: (num_layers, d_out)}` per-channel scales of the
      grid every fake-quantized kernel lies on (for integer export).
    info: what the engine measured (seconds, training losses per block, ...).
  """

  model: Llama
  transforms: Any
  policy: Policy
  real: bool = False
  w_scales: dict[tuple[str, ...], jax.Array] | None = None
  info: dict[str, Any] | None = None

  @property
  def label(self) -> str:
    return self.policy.label

  @property
  def recipe(self) -> Recipe:
    """The recipe of every site (ValueError for a plan whose sites differ)."""
    r = self.policy.uniform
    if r is None:
      raise ValueError(f"{self.label!r} is a per-site plan whose sites differ: it has no single "
                       "recipe (see .policy)")
    return r

  @functools.cached_property
  def hook(self) -> SiteHook:
    cfg = self.model.config
    spec = spec_for(cfg)
    return site_hook(layer_recipes(self.policy, spec, cfg.num_layers), spec,
                     kv_config=self.policy.base.kv_config, real=self.real)
