"""Post-training quantization pipeline: calibrate -> fit -> transform -> quantize.

The one table of the pipeline is `SITE_LINEARS`: which linears of a decoder
block read each quantization site (DESIGN §2). Everything else — Grams for
shared inputs, where the inverse transforms are merged — is derived from it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from catjax.models.config import ModelConfig
from catjax.models.llama import SITES, Llama
from catjax.stats import SecondMoment

# site -> the linears (paths under the stacked `layers`) whose input it is.
SITE_LINEARS: dict[str, tuple[tuple[str, str], ...]] = {
    "attn_in": (("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj")),
    "o_in": (("attn", "o_proj"),),
    "mlp_in": (("mlp", "gate_proj"), ("mlp", "up_proj")),
    "down_in": (("mlp", "down_proj"),),
}
assert tuple(SITE_LINEARS) == SITES


def site_dims(cfg: ModelConfig) -> dict[str, int]:
  """Input width of every site."""
  return {"attn_in": cfg.hidden_size, "o_in": cfg.num_heads * cfg.head_dim,
          "mlp_in": cfg.hidden_size, "down_in": cfg.intermediate_size}


def init_stats(cfg: ModelConfig) -> dict[str, SecondMoment]:
  """Empty per-site statistics, stacked over the `num_layers` blocks."""
  return {site: jax.tree.map(lambda a: jnp.broadcast_to(a, (cfg.num_layers, *a.shape)),
                             SecondMoment.zeros(d, dtype=jnp.float32))
          for site, d in site_dims(cfg).items()}


def _stats_hook(site, x, state):
  return x, state.update(x)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("stats",))
def _calibration_step(graphdef, params, tokens, stats):
  _, stats = nnx.merge(graphdef, params)(tokens, hook=_stats_hook, hook_state=stats)
  return stats


def calibrate(model: Llama, windows: np.ndarray, *, batch_size: int = 1,
              stats: dict[str, SecondMoment] | None = None,
              progress: bool = True) -> dict[str, SecondMoment]:
  """Accumulate `Σ x xᵀ`, per-channel `max |x|` and token counts of every site.

  One jitted forward per batch of windows updates the statistics inside the
  model's site hook; memory is that of the statistics (`L · Σ d²` floats),
  whatever the number of tokens. Pass `stats` to continue an accumulation.

  Returns:
    `{site: SecondMoment}` with a leading `num_layers` axis.
  """
  windows = np.asarray(windows, np.int32)
  if windows.ndim != 2 or windows.shape[0] < 1:
    raise ValueError(f"windows.shape={windows.shape}; expected (n >= 1, seqlen)")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  stats = init_stats(model.config) if stats is None else stats
  graphdef, params = nnx.split(model)
  for i in tqdm(range(0, len(windows), batch_size), desc="calibration", unit="batch",
                disable=not progress, leave=False):
    stats = _calibration_step(graphdef, params, jnp.asarray(windows[i:i + batch_size]), stats)
  return stats


PTQ_METHODS = ("fp", "none", "smoothquant", "smoothquant_hadamard", "hadamard", "cat", "cat_full")
# PTQ method -> the transform method of `catjax.transforms` (None: no transform).
_TRANSFORM_OF = {"fp": None, "none": None, "smoothquant": "smoothquant",
                 "smoothquant_hadamard": "smoothquant_hadamard", "hadamard": "hadamard",
                 "cat": "cat", "cat_full": "cat_full"}


def site_grams(model: Llama) -> dict[str, jax.Array]:
  """`Σ_W` of every site, `(L, d, d)`: `Σ_j kernel_j kernel_jᵀ` over the linears it feeds."""
  return {site: sum(jnp.einsum("lio,ljo->lij", k, k, precision=jax.lax.Precision.HIGHEST)
                    for k in (_kernel(model, path) for path in linears))
          for site, linears in SITE_LINEARS.items()}


def _kernel(model: Llama, path: tuple[str, str]) -> jax.Array:
  group, name = path
  return getattr(getattr(model.layers, group), name).kernel[...]


def fit_transforms(model: Llama, stats: dict[str, SecondMoment], *, method: str,
                   block_size: int | None = None, seed: int = 0, alpha: float = 0.5,
                   eps: float = 1e-6, progress: bool = True):
  """Fit one transform per block and site from calibration statistics.

  Returns:
    `{site: Transform}` stacked over layers (a leading `num_layers` axis on
    every array), or None for methods without a transform ("fp", "none").
  """
  from catjax.transforms import fit_transform
  if method not in PTQ_METHODS:
    raise ValueError(f"method={method!r}; expected one of {PTQ_METHODS}")
  tmethod = _TRANSFORM_OF[method]
  if tmethod is None:
    return None
  grams = site_grams(model)
  weight_absmax = {site: jnp.max(jnp.stack([jnp.abs(_kernel(model, p)).max(-1)
                                            for p in linears]), axis=0)
                   for site, linears in SITE_LINEARS.items()}
  key = jax.random.PRNGKey(seed)
  out = {}
  cfg = model.config
  bar = tqdm(total=cfg.num_layers * len(SITES), desc=f"fit {method}", disable=not progress,
             leave=False)
  for s, site in enumerate(SITES):
    st = stats[site]
    per_layer = []  # fitted one layer at a time (float64 eigh); stacked below
    for layer in range(cfg.num_layers):
      st_l = jax.tree.map(lambda a: a[layer], st)
      per_layer.append(fit_transform(
          tmethod, st_l.sigma, grams[site][layer], block_size=block_size,
          key=jax.random.fold_in(key, layer * len(SITES) + s), act_absmax=st_l.absmax,
          alpha=alpha, weight_absmax=weight_absmax[site][layer], eps=eps,
          name=f"layer {layer} {site}"))
      bar.update()
    out[site] = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
  bar.close()
  return out


def transform_params(model: Llama, transforms) -> Llama:
  """A new model whose kernels carry the inverse transforms: `kernel' = T⁻ᵀ kernel`.

  Together with the online hook `transform_hook` (`x' = x Tᵀ`) the function
  is unchanged.
  """
  if transforms is None:
    return model
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  for site, linears in SITE_LINEARS.items():
    t = transforms[site]
    for group, name in linears:
      leaf = params["layers"][group][name]
      leaf["kernel"] = jax.vmap(lambda tr, k: tr.merge(k))(t, leaf["kernel"])
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def transform_hook(site, x, transform):
  """Site hook applying this layer's online transform `x' = x Tᵀ` (None: identity)."""
  return (x if transform is None else transform.apply(x)), None
