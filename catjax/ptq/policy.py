"""One per-site policy: what each `(layer, site)` of a model is quantized with.

The engine, the quantized model, the site report and realization consume one
interface, which a `Recipe` (the uniform case) and a `Plan` (per-site
choices over a base recipe) both implement:

    policy.recipe(layer, site) -> Recipe   that site's recipe
    policy.base -> Recipe                  what is not per site: propagation,
                                           training, KV bits, weight rounding, seeds
    policy.uniform -> Recipe | None        the recipe of every site, if they share one
    policy.quantized, policy.label, policy.check_model(cfg), policy.to_dict(),
    policy.predicted_db() -> {(layer, site): planner's predicted SQNR}

A uniform plan runs bit for bit as its recipe. The hook state follows from the
policy: a site whose layers all use one *variant* (transform kind and
activation quantizer) holds its transforms stacked over the layers, as a
recipe's model does; a site with several holds, per variant, the transforms
stacked over all layers (a layer that uses another variant holds a copy of one
that uses this one) and the per-layer index `choice` (`catjax.ptq.hooks.SiteHook`).
"""

from __future__ import annotations

from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from catjax.core.transforms import Transform
from catjax.models.spec import ArchSpec
from catjax.ptq.hooks import SiteHook
from catjax.ptq.plan import Plan
from catjax.ptq.recipe import Recipe

Policy = Union[Recipe, Plan]


def layer_recipes(policy: Policy, spec: ArchSpec, num_layers: int) -> list[dict[str, Recipe]]:
  """`[{site: recipe} for each layer]` of `policy`."""
  return [{s: policy.recipe(b, s) for s in spec.site_names} for b in range(num_layers)]


def _variant(r: Recipe):
  """What the hook of a site does (besides the layer's transform arrays)."""
  return (r.transform_method, r.site_block_size, r.hadamard, r.a_config)


def _variants(recipes: list[dict[str, Recipe]], site: str):
  keys = [_variant(r[site]) for r in recipes]
  return keys, list(dict.fromkeys(keys))


def site_hook(recipes: list[dict[str, Recipe]], spec: ArchSpec, *, kv_config, real: bool = False,
              ste: bool = False) -> SiteHook:
  """The hook of blocks quantized with `recipes[b][site]` (`layer_recipes`).
  `real`: the linears quantize their inputs themselves (`catjax.ptq.realization`),
  so the hook only transforms (and quantizes the KV cache)."""
  configs = tuple((s, tuple(None if real else v[3] for v in _variants(recipes, s)[1]))
                  for s in spec.site_names)
  return SiteHook(configs, kv_config, spec.kv_sites, ste)


def stack_layers(items: list):
  """Per-layer pytrees stacked on a new leading layer axis."""
  return jax.tree.map(lambda *a: jnp.stack(a), *items)


def site_state(transforms: list[dict[str, Transform | None] | None],
               recipes: list[dict[str, Recipe]], spec: ArchSpec):
  """The hook state of blocks whose sites have `transforms[b][site]` (None: no
  site of block `b` has one) from `recipes[b][site]`, arrays stacked over the
  blocks; None when no site of any block has a transform."""
  transforms = [t or dict.fromkeys(spec.site_names) for t in transforms]
  state = {}
  for site in spec.site_names:
    keys, variants = _variants(recipes, site)
    stacks = []
    for v in variants:
      rep = transforms[keys.index(v)][site]
      per_layer = [t[site] if k == v else rep for t, k in zip(transforms, keys)]
      stacks.append(None if rep is None else stack_layers(per_layer))
    if len(variants) == 1:
      state[site] = stacks[0]
    else:
      state[site] = {"choice": jnp.asarray([variants.index(k) for k in keys], jnp.int32),
                     "transforms": tuple(stacks)}
  return None if all(v is None for v in state.values()) else state


def site_variants(state, site: str, num_layers: int) -> tuple[np.ndarray, tuple[Any, ...]]:
  """`(variant index per layer, each variant's transforms stacked over all layers)` of
  `site` in a hook state (`site_state`)."""
  s = None if state is None else state.get(site)
  if isinstance(s, dict) and "choice" in s:
    return np.asarray(s["choice"]), tuple(s["transforms"])
  return np.zeros(num_layers, np.int32), (s,)


def layer_transform(state, site: str, layer: int, num_layers: int) -> Transform | None:
  """The transform (or None) block `layer` applies at `site` under a hook state."""
  choice, stacks = site_variants(state, site, num_layers)
  t = stacks[int(choice[layer])]
  return None if t is None else jax.tree.map(lambda a: a[layer], t)
