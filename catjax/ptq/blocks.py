"""Post-training quantization: recipes and the per-block pure functions.

A decoder block is quantized by `fit_block` (one transform per site from that
block's statistics) -> `merge_block` (`kernel' = T⁻ᵀ kernel`) ->
`quantize_block` (RTN, clip search or GPTQ per output channel, or per block
of input channels for the FP4 formats); the block
engine (`catjax.ptq.engine`) walks the model through them. Which linears read each
site comes from the model's architecture spec (`catjax.models.spec`); every
function here takes one block's pure parameter dict (or, where noted, the
stacked `layers` dict: the leading layer axis is carried along)."""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp

from catjax.models.spec import ArchSpec, get_path
from catjax.core.stats import SecondMoment
from catjax.core.transforms import Transform, fit_transform, fold_block_hadamard
from catjax.ptq import rounding
from catjax.ptq.recipe import Recipe
from catjax.core.linalg import HIGHEST


def _kernel(block: dict, path) -> jax.Array:
  return get_path(block, path)["kernel"]


def site_kernel(block: dict, site: str, *, spec: ArchSpec, layers=None) -> jax.Array:
  """The kernels that read `site`, side by side on the output axis: `(..., d, Σ d_out)`.
  `block` is one block's parameter dict or the stacked `layers` dict; `layers`
  (an index into the stacked axis) takes only those blocks before the kernels are
  joined, so that the copy holds only them."""
  pick = (lambda k: k) if layers is None else (lambda k: k[layers])
  return jnp.concatenate([pick(_kernel(block, p)) for p in spec.site(site).linears], axis=-1)


def site_grams(block: dict, *, spec: ArchSpec) -> dict[str, jax.Array]:
  """`Σ_W` of every site, `(..., d, d)`: `Σ_j kernel_j kernel_jᵀ` over the linears it feeds."""
  return {s.name: sum(jnp.einsum("...io,...jo->...ij", k, k, precision=HIGHEST)
                      for k in (_kernel(block, p).astype(jnp.float32) for p in s.linears))
          for s in spec.sites}


def site_recipes(recipe: "Recipe | dict[str, Recipe]", spec: ArchSpec) -> dict[str, Recipe]:
  """`{site: recipe}`: one recipe for every site, or a plan's per-site recipes as given."""
  return dict(recipe) if isinstance(recipe, dict) else {s: recipe for s in spec.site_names}


def fit_block(block: dict, stats: dict[str, SecondMoment], recipe: "Recipe | dict[str, Recipe]",
              *, spec: ArchSpec, layer: int, devices=None) -> dict[str, Transform | None] | None:
  """One transform per site of block `layer` from its statistics (closed form).

  `recipe`: one for every site, or `{site: recipe}` (a plan's block). Hadamard
  signs depend on the recipe's seed, the layer and the site only.
  `devices`: run the sites' fits concurrently, site `i` on
  `devices[(layer · sites + i) mod len(devices)]` (one thread per device; the
  same computation, so the same transforms as on one device). `block` and
  `stats` must then be host arrays (or uncommitted), and so are the results.

  Returns:
    `{site: Transform}` (None for a site whose recipe has no transform), or
    None when no site has one.
  """
  recipes = site_recipes(recipe, spec)
  if all(r.transform_method is None for r in recipes.values()):
    return None
  grams = site_grams(block, spec=spec)

  def fit(i, s):
    recipe = recipes[s.name]
    if recipe.transform_method is None:
      return None
    key = jax.random.PRNGKey(recipe.seed)
    weight_absmax = jnp.max(jnp.stack([jnp.abs(_kernel(block, p)).max(-1) for p in s.linears]), 0)
    t = fit_transform(
        recipe.transform_method, stats[s.name].sigma, grams[s.name], block_size=recipe.block_size,
        key=jax.random.fold_in(key, layer * len(spec.sites) + i),
        act_absmax=stats[s.name].absmax, alpha=recipe.smoothquant.alpha, weight_absmax=weight_absmax,
        eps=recipe.eps, x64=recipe.fit_x64, name=f"layer {layer} {s.name}",
        weight=site_kernel(block, s.name, spec=spec))
    return fold_block_hadamard(t) if recipe.hadamard == "block" else t

  if not devices or len(devices) < 2:
    return {s.name: fit(i, s) for i, s in enumerate(spec.sites)}

  def fit_on_device(i, s):
    with jax.default_device(devices[(layer * len(spec.sites) + i) % len(devices)]):
      return jax.device_get(fit(i, s))

  with ThreadPoolExecutor(min(len(devices), len(spec.sites))) as pool:
    fitted = list(pool.map(fit_on_device, *zip(*enumerate(spec.sites))))
  return {s.name: t for s, t in zip(spec.sites, fitted)}


def map_kernels(block: dict, spec: ArchSpec, fn) -> dict:
  """A copy of `block` with every quantized kernel replaced by `fn(site, path, kernel)`."""
  block = jax.tree.map(lambda a: a, block)  # new containers, shared leaves
  for site, path in spec.linears:
    leaf = get_path(block, path)
    leaf["kernel"] = fn(site, path, leaf["kernel"])
  return block


@jax.jit
def merge_kernel(transform: Transform, kernel: jax.Array) -> jax.Array:
  """`T⁻ᵀ kernel` of a `(d_in, d_out)` kernel, jitted."""
  return transform.merge(kernel)


def merge_block(block: dict, transforms: dict[str, Transform] | None, *, spec: ArchSpec) -> dict:
  """Kernels carrying the inverse transforms: `kernel' = T⁻ᵀ kernel`.

  Together with the online `x' = x Tᵀ` of `catjax.ptq.hooks.SiteHook` the function is unchanged.
  """
  if transforms is None:
    return block
  return map_kernels(block, spec, lambda site, _, k: k if transforms[site] is None
                     else merge_kernel(transforms[site], k))


def transformed_sigma(sigma: jax.Array, t: Transform | None) -> jax.Array:
  """`T Σ Tᵀ`: the second moment of the transformed input."""
  return sigma if t is None else t.apply(t.apply(sigma).T)


def quantize_block(block: dict, recipe: "Recipe | dict[str, Recipe]", *, spec: ArchSpec,
                   transforms: dict[str, Transform] | None = None,
                   stats: dict[str, SecondMoment] | None = None,
                   w_clip: dict[tuple[str, ...], jax.Array] | None = None
                   ) -> tuple[dict, dict[tuple[str, ...], jax.Array]]:
  """Fake-quantize every kernel of a (merged) block per output channel (FP4
  formats: per block of input channels and output channel).

  `recipe`: one for every site, or `{site: recipe}` (a plan's block).
  `recipe.weights`: a method of `catjax.ptq.rounding.REGISTRY` ("rtn"; "clip" and
  "gptq" read `T Σ_x Tᵀ` and need `stats`). `w_clip`: learned
  per-output-channel clip ratios `{linear path: (d_out,)}` (trained CAT)
  that set the grid of those kernels for the methods that take them.

  Returns:
    `(block with fake-quantized kernels, {linear path: per-channel scales (d_out,)})`;
    the scales are those of the grid the kernels lie on, for integer export
    (none for the FP4 formats, which have no integer export).
  """
  recipes = site_recipes(recipe, spec)
  if all(r.w_config is None for r in recipes.values()):
    return block, {}
  needs = [r.weights for r in recipes.values() if rounding.REGISTRY[r.weights].needs_stats]
  if needs and stats is None:
    raise ValueError(f"weights={needs[0]!r} needs the site statistics (stats=...)")
  scales = {}
  sigmas = {}

  def sigma_t(site):  # T Σ Tᵀ of a site, shared by its linears
    if site not in sigmas:
      t = None if transforms is None else transforms[site]
      sigmas[site] = transformed_sigma(stats[site].sigma.astype(jnp.float32), t)
    return sigmas[site]

  def one(site, path, kernel):
    recipe = recipes[site]
    if recipe.w_config is None:
      return kernel
    ratio = None if w_clip is None else w_clip.get(path)
    try:
      q, scale = rounding.REGISTRY[recipe.weights].quantize(
          kernel, recipe.w_config, hessian=functools.partial(sigma_t, site), ratio=ratio,
          recipe=recipe)
    except FloatingPointError as e:  # GPTQ's Cholesky: say which linear
      raise FloatingPointError(f"{'/'.join(path)} (site {site}): {e}") from None
    if scale is not None:
      scales[path] = scale
    return q

  return map_kernels(block, spec, one), scales
