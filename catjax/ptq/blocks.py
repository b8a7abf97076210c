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

from catjax.core.gptq import gptq_quantize
from catjax.models.spec import ArchSpec, get_path
from catjax.core.quant import channel_absmax, safe_scale, fake_quantize, fake_quantize_clip_search, quantize
from catjax.core.stats import SecondMoment
from catjax.core.transforms import Transform, fit_transform, fold_block_hadamard
from catjax.ptq.recipe import CLIP_GRID, Recipe
from catjax.core.linalg import HIGHEST


def _kernel(block: dict, path) -> jax.Array:
  return get_path(block, path)["kernel"]


def site_kernel(block: dict, site: str, *, spec: ArchSpec) -> jax.Array:
  """The kernels that read `site`, side by side on the output axis: `(..., d, Σ d_out)`.
  `block` is one block's parameter dict or the stacked `layers` dict."""
  return jnp.concatenate([_kernel(block, p) for p in spec.site(site).linears], axis=-1)


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
        act_absmax=stats[s.name].absmax, alpha=recipe.alpha, weight_absmax=weight_absmax,
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
def _merge(transform: Transform, kernel: jax.Array) -> jax.Array:
  return transform.merge(kernel)


def merge_block(block: dict, transforms: dict[str, Transform] | None, *, spec: ArchSpec) -> dict:
  """Kernels carrying the inverse transforms: `kernel' = T⁻ᵀ kernel`.

  Together with the online `x' = x Tᵀ` of `QuantHook` the function is unchanged.
  """
  if transforms is None:
    return block
  return map_kernels(block, spec, lambda site, _, k: k if transforms[site] is None
                     else _merge(transforms[site], k))


def transformed_sigma(sigma: jax.Array, t: Transform | None) -> jax.Array:
  """`T Σ Tᵀ`: the second moment of the transformed input."""
  return sigma if t is None else t.apply(t.apply(sigma).T)


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
  k = kernel.astype(jnp.float32)
  scale = safe_scale(ratio.astype(jnp.float32) * channel_absmax(jnp.abs(k), -2)[..., 0, :] / qmax)
  u = jnp.clip(k / scale, -qmax, qmax)
  levels = u + jax.lax.stop_gradient(jnp.round(u) - u)
  return levels * scale, scale


_clipped_rtn = jax.jit(channel_clipped_quantize, static_argnames=("qmax",))


@functools.partial(jax.jit, static_argnames=("config",))
def _clip(kernel, importance, *, config):
  return fake_quantize_clip_search(kernel, config, importance=importance, ratios=CLIP_GRID,
                                   return_scale=True)


def quantize_block(block: dict, recipe: "Recipe | dict[str, Recipe]", *, spec: ArchSpec,
                   transforms: dict[str, Transform] | None = None,
                   stats: dict[str, SecondMoment] | None = None,
                   w_clip: dict[str, jax.Array] | None = None
                   ) -> tuple[dict, dict[tuple[str, ...], jax.Array]]:
  """Fake-quantize every kernel of a (merged) block per output channel (FP4
  formats: per block of input channels and output channel).

  `recipe`: one for every site, or `{site: recipe}` (a plan's block).
  `recipe.weights`: "rtn"; "clip" (importance `diag(T Σ_x Tᵀ)`) or "gptq"
  (Hessian `T Σ_x Tᵀ`), both of which need `stats`. `w_clip`: learned
  per-output-channel clip ratios `{"/".join(path): (d_out,)}` (trained CAT)
  that set the grid of those kernels for "rtn" and "gptq".

  Returns:
    `(block with fake-quantized kernels, {linear path: per-channel scales (d_out,)})`;
    the scales are those of the grid the kernels lie on, for integer export
    (none for the FP4 formats, which have no integer export).
  """
  recipes = site_recipes(recipe, spec)
  if all(r.w_config is None for r in recipes.values()):
    return block, {}
  if any(r.weights != "rtn" for r in recipes.values()) and stats is None:
    raise ValueError(f"weights={next(r.weights for r in recipes.values())!r} needs the site "
                     "statistics (stats=...)")
  scales = {}
  sigmas = {}

  def sigma_t(site):  # T Σ Tᵀ of a site, shared by its linears
    if site not in sigmas:
      t = None if transforms is None else transforms[site]
      sigmas[site] = transformed_sigma(stats[site].sigma.astype(jnp.float32), t)
    return sigmas[site]

  def one(site, path, kernel):
    recipe = recipes[site]
    config = recipe.w_config
    if config is None:
      return kernel
    ratio = None if w_clip is None else w_clip.get("/".join(path))
    if ratio is not None and recipe.weights == "clip":
      raise ValueError("learned weight clip ratios replace the clip search: weights='clip' "
                       "cannot take w_clip")
    if recipe.weights == "clip":
      q, scale = _clip(kernel, jnp.diagonal(sigma_t(site)), config=config)
    elif ratio is not None:
      q, scale = _clipped_rtn(kernel, ratio, qmax=config.qmax)
      q = q.astype(kernel.dtype)
    elif config.is_fp4:
      q, scale = _fake_rtn(kernel, config=config), None  # no integer export: no scales
    else:
      q, scale = _rtn(kernel, config=config)
    if recipe.weights == "gptq":
      q = gptq_quantize(kernel, sigma_t(site), bits=config.bits, damping=recipe.gptq_damping,
                        block_size=recipe.gptq_block, act_order=recipe.act_order,
                        scale=None if ratio is None else scale, format=config.format)
    if scale is not None:
      scales[path] = scale
    return q

  return map_kernels(block, spec, one), scales
