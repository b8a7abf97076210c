"""Post-training quantization pipeline: calibrate -> fit -> transform -> quantize.

The one table of the pipeline is `SITE_LINEARS`: which linears of a decoder
block read each quantization site (DESIGN §2). Everything else — Grams for
shared inputs, where the inverse transforms are merged — is derived from it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from catjax import hadamard as hd
from catjax.models.config import ModelConfig
from catjax.models.llama import KV_SITES, SITES, Llama
from catjax.quant import (QuantConfig, activation_config, fake_quantize, fake_quantize_clip_search,
                          weight_config)
from catjax.stats import SecondMoment
from catjax.transforms import DEFAULT_EPS, Transform, fit_transform, fold_block_hadamard

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
  return x, (None if state is None else state.update(x))


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("stats",))
def _calibration_step(graphdef, params, tokens, stats):
  _, stats = nnx.merge(graphdef, params)(tokens, hook=_stats_hook, hook_state=stats)
  return {site: stats[site] for site in SITES}


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



def save_stats(path: str | Path, stats: dict[str, SecondMoment], **meta: Any) -> Path:
  """Write calibration statistics (and JSON-able `meta`) to one `.npz` file."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = {f"{site}.{f}": np.asarray(getattr(st, f)) for site, st in stats.items()
            for f in ("xx", "absmax", "count")}
  with open(path, "wb") as fh:  # a file object: numpy must not append ".npz"
    np.savez(fh, meta=np.asarray(json.dumps(meta)), **arrays)
  return path


def load_stats(path: str | Path, cfg: ModelConfig | None = None
               ) -> tuple[dict[str, SecondMoment], dict[str, Any]]:
  """Read statistics written by `save_stats`; with `cfg`, check they fit that model.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file lacks a site or its shapes do not match `cfg`.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no calibration statistics at {path}")
  with np.load(path) as z:
    missing = [f"{s}.xx" for s in SITES if f"{s}.xx" not in z.files]
    if missing:
      raise ValueError(f"{path} lacks statistics {missing}; was it written by save_stats?")
    stats = {s: SecondMoment(xx=jnp.asarray(z[f"{s}.xx"]), absmax=jnp.asarray(z[f"{s}.absmax"]),
                             count=jnp.asarray(z[f"{s}.count"])) for s in SITES}
    meta = json.loads(str(z["meta"]))
  if cfg is not None:
    for site, d in site_dims(cfg).items():
      want = (cfg.num_layers, d, d)
      if stats[site].xx.shape != want:
        raise ValueError(f"statistics in {path} do not fit this model: {site} has shape "
                         f"{stats[site].xx.shape}, expected {want}")
  return stats, meta


# ---------------------------------------------------------------------------
# Recipe

PTQ_METHODS = ("fp", "none", "smoothquant", "smoothquant_hadamard", "hadamard", "cat", "cat_full")
# PTQ method -> the transform method of `catjax.transforms` (None: no transform).
_TRANSFORM_OF = {"fp": None, "none": None, "smoothquant": "smoothquant",
                 "smoothquant_hadamard": "smoothquant_hadamard", "hadamard": "hadamard",
                 "cat": "cat", "cat_full": "cat_full"}
_WITH_HADAMARD = ("smoothquant_hadamard", "hadamard", "cat", "cat_full")
CLIP_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.00, 0.95, ..., 0.50


def _check_bits(name: str, bits) -> None:
  if bits is None:
    return
  if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
    raise ValueError(f"{name}={bits!r}: expected an integer in 2..8, or None for 16-bit")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
  """How to quantize a model: one frozen, validated record.

  Attributes:
    method: one of `PTQ_METHODS`; "fp" switches quantization off.
    block_size: `k` of block CAT ("cat" only); must divide every site width.
    w_bits: weight bits (symmetric, per output channel), 2..8; None keeps
      weights in floating point.
    a_bits: activation bits (symmetric, per token), 2..8; None keeps them.
    kv_bits: KV-cache bits (asymmetric, per token and head), or None (16-bit).
    a_clip: activation clip ratio in (0, 1].
    w_clip_search: per output channel, choose the weight clip ratio from
      `CLIP_GRID` that minimizes the activation-weighted squared error.
    seed: seed of the randomized Hadamard signs.
    hadamard: where the Hadamard of "cat" / "cat_full" acts: "full" (one
      randomized Hadamard of the whole width after the blocks, as fitted) or
      "block" (a Hadamard of the block size folded into each block, so the
      transform is one block-diagonal matrix, as a fused kernel wants).
    alpha: SmoothQuant migration strength.
    eps: relative damping of the second moments in the fits.
  """

  method: str = "cat"
  block_size: int = 64
  w_bits: int | None = 4
  a_bits: int | None = 4
  kv_bits: int | None = None
  a_clip: float = 1.0
  w_clip_search: bool = False
  seed: int = 0
  hadamard: str = "full"
  alpha: float = 0.5
  eps: float = DEFAULT_EPS

  def __post_init__(self):
    if self.method not in PTQ_METHODS:
      raise ValueError(f"method={self.method!r}: expected one of {PTQ_METHODS}")
    if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) \
        or self.block_size < 1:
      raise ValueError(f"block_size={self.block_size!r}: expected a positive integer")
    _check_bits("w_bits", self.w_bits)
    _check_bits("a_bits", self.a_bits)
    _check_bits("kv_bits", self.kv_bits)
    if not 0.0 < float(self.a_clip) <= 1.0:
      raise ValueError(f"a_clip={self.a_clip!r}: expected a ratio in (0, 1]")
    if self.hadamard not in ("full", "block"):
      raise ValueError(f"hadamard={self.hadamard!r}: expected 'full' or 'block'")
    if self.hadamard == "block" and self.method not in ("cat", "cat_full"):
      raise ValueError(f"hadamard='block' applies to 'cat' and 'cat_full', not {self.method!r}")
    if not 0.0 <= float(self.alpha) <= 1.0:
      raise ValueError(f"alpha={self.alpha!r}: expected a value in [0, 1]")

  @property
  def quantized(self) -> bool:
    return self.method != "fp" and (self.w_bits, self.a_bits, self.kv_bits) != (None,) * 3

  @property
  def a_config(self) -> QuantConfig | None:
    if self.method == "fp" or self.a_bits is None:
      return None
    return activation_config(self.a_bits, clip_ratio=float(self.a_clip))

  @property
  def w_config(self) -> QuantConfig | None:
    return None if self.method == "fp" or self.w_bits is None else weight_config(self.w_bits)

  @property
  def kv_config(self) -> QuantConfig | None:
    if self.method == "fp" or self.kv_bits is None:
      return None
    return QuantConfig(bits=self.kv_bits, symmetric=False, granularity="token")

  @property
  def label(self) -> str:
    """Short name, e.g. "cat k=64 W4A4", "none W6A6", "fp"."""
    if self.method == "fp":
      return "fp"
    name = f"{self.method} k={self.block_size}" if self.method == "cat" else self.method
    name += " blockH" if self.hadamard == "block" else ""
    bits = f"W{self.w_bits or 16}A{self.a_bits or 16}"
    return f"{name} {bits}" + (f" KV{self.kv_bits}" if self.kv_bits else "")

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "label": self.label}

  def check_model(self, cfg: ModelConfig) -> None:
    """Raise ValueError, before any work, if this recipe cannot quantize `cfg`'s widths."""
    dims = site_dims(cfg)
    if self.method == "cat":
      bad = {s: d for s, d in dims.items() if d % self.block_size}
      if bad:
        common = np.gcd.reduce(list(dims.values()))
        raise ValueError(
            f"block_size={self.block_size} does not divide the site widths {bad} of this "
            f"model; block sizes that divide every width divide {common}")
    if self.hadamard == "block" and not hd.is_supported(self.block_size):
      raise ValueError(f"hadamard='block' needs a Hadamard matrix of block_size="
                       f"{self.block_size}; it has none (see catjax.hadamard)")
    if self.method in _WITH_HADAMARD:
      bad = sorted({d for d in dims.values() if not hd.is_supported(d)})
      if bad:
        raise ValueError(f"method {self.method!r} needs a Hadamard matrix of every site width; "
                         f"widths {bad} of this model have none (see catjax.hadamard)")

  def with_spec(self, spec: str) -> "Recipe":
    """This recipe with a method spec applied: `METHOD[@OPT...]`, options `wNaM`
    (bits), `kN` (block size), `kvN` (KV bits), `bh` (block Hadamard), e.g.
    "none@w6a6", "cat@k192", "cat@bh"."""
    method, *opts = spec.strip().split("@")
    kw: dict[str, Any] = {"method": method}
    for opt in opts:
      o = opt.lower()
      m = (re.fullmatch(r"w(\d+)a(\d+)", o), re.fullmatch(r"kv(\d+)", o), re.fullmatch(r"k(\d+)", o))
      if o == "bh":
        kw["hadamard"] = "block"
      elif m[0]:
        kw["w_bits"], kw["a_bits"] = int(m[0][1]), int(m[0][2])
      elif m[1]:
        kw["kv_bits"] = int(m[1][1])
      elif m[2]:
        kw["block_size"] = int(m[2][1])
      else:
        raise ValueError(f"method spec {spec!r}: unknown option {opt!r}; expected wNaM, kN, kvN "
                         "or bh")
    return dataclasses.replace(self, **kw)


# ---------------------------------------------------------------------------
# Fit, transform, quantize: pure functions of the parameter dict


def _pure(model_or_params) -> dict:
  if isinstance(model_or_params, Llama):
    return nnx.to_pure_dict(nnx.state(model_or_params))
  return model_or_params


def _kernel(params: dict, path: tuple[str, str]) -> jax.Array:
  group, name = path
  return params["layers"][group][name]["kernel"]


def site_kernel(params, site: str) -> jax.Array:
  """The kernels that read `site`, concatenated on the output axis: `(L, d, Σ d_out)`."""
  params = _pure(params)
  return jnp.concatenate([_kernel(params, p) for p in SITE_LINEARS[site]], axis=-1)


def site_grams(params) -> dict[str, jax.Array]:
  """`Σ_W` of every site, `(L, d, d)`: `Σ_j kernel_j kernel_jᵀ` over the linears it feeds."""
  params = _pure(params)
  return {site: sum(jnp.einsum("lio,ljo->lij", k, k, precision=jax.lax.Precision.HIGHEST)
                    for k in (_kernel(params, p) for p in linears))
          for site, linears in SITE_LINEARS.items()}


def fit_transforms(params, stats: dict[str, SecondMoment], recipe: Recipe, *,
                   progress: bool = True) -> dict[str, Transform] | None:
  """Fit one transform per block and site from calibration statistics.

  Args:
    params: a `Llama` or its pure parameter dict.
    stats: `calibrate`'s statistics.
    recipe: method, block size, seed, alpha, eps.

  Returns:
    `{site: Transform}` stacked over layers (a leading `num_layers` axis on
    every array), or None for methods without a transform ("fp", "none").
  """
  tmethod = _TRANSFORM_OF[recipe.method]
  if tmethod is None:
    return None
  params = _pure(params)
  grams = site_grams(params)
  weight_absmax = {site: jnp.max(jnp.stack([jnp.abs(_kernel(params, p)).max(-1)
                                            for p in linears]), axis=0)
                   for site, linears in SITE_LINEARS.items()}
  key = jax.random.PRNGKey(recipe.seed)
  num_layers = grams["attn_in"].shape[0]
  out = {}
  bar = tqdm(total=num_layers * len(SITES), desc=f"fit {recipe.method}", disable=not progress,
             leave=False)
  for s, site in enumerate(SITES):
    st = stats[site]
    per_layer = []  # fitted one layer at a time (float64 eigh); stacked below
    for layer in range(num_layers):
      st_l = jax.tree.map(lambda a: a[layer], st)
      t = fit_transform(
          tmethod, st_l.sigma, grams[site][layer], block_size=recipe.block_size,
          key=jax.random.fold_in(key, layer * len(SITES) + s), act_absmax=st_l.absmax,
          alpha=recipe.alpha, weight_absmax=weight_absmax[site][layer], eps=recipe.eps,
          name=f"layer {layer} {site}")
      per_layer.append(fold_block_hadamard(t) if recipe.hadamard == "block" else t)
      bar.update()
    out[site] = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
  bar.close()
  return out


def _map_site_kernels(params: dict, fn) -> dict:
  """A copy of `params` with every block kernel replaced by `fn(site, kernel)`."""
  params = jax.tree.map(lambda a: a, params)  # new containers, shared leaves
  for site, linears in SITE_LINEARS.items():
    for group, name in linears:
      leaf = params["layers"][group][name]
      leaf["kernel"] = fn(site, leaf["kernel"])
  return params


def transform_params(params, transforms: dict[str, Transform] | None) -> dict:
  """Kernels carrying the inverse transforms: `kernel' = T⁻ᵀ kernel` (pure dict in, out).

  Together with the online `x' = x Tᵀ` of `QuantHook` the function is unchanged.
  """
  params = _pure(params)
  if transforms is None:
    return params
  return _map_site_kernels(params, lambda site, k: _merge_stacked(transforms[site], k))


@jax.jit
def _merge_stacked(transform: Transform, kernel: jax.Array) -> jax.Array:
  return jax.vmap(lambda t, k: t.merge(k))(transform, kernel)


_fake_quantize = jax.jit(fake_quantize, static_argnames="config")
_clip_search = jax.jit(fake_quantize_clip_search, static_argnames=("config", "ratios"))


def _transformed_importance(sigma: jax.Array, t: Transform | None) -> jax.Array:
  """`diag(T Σ Tᵀ)`: the energy of each transformed input channel."""
  if t is None:
    return jnp.diagonal(sigma)
  return jnp.diagonal(t.apply(t.apply(sigma).T))


def quantize_params(params, recipe: Recipe, *, transforms=None,
                    stats: dict[str, SecondMoment] | None = None) -> dict:
  """Fake-quantize every block kernel per output channel at `recipe.w_bits`.

  With `recipe.w_clip_search`, each output channel takes the clip ratio of
  `CLIP_GRID` that minimizes `Σ_i diag(T Σ_x Tᵀ)_i (w_i - Q(w)_i)²` (needs `stats`).
  """
  params = _pure(params)
  config = recipe.w_config
  if config is None:
    return params
  if not recipe.w_clip_search:
    return _map_site_kernels(params, lambda site, k: _fake_quantize(k, config))
  if stats is None:
    raise ValueError("w_clip_search=True needs the calibration statistics (stats=...)")
  importance = {site: jax.vmap(lambda st, t: _transformed_importance(st.sigma, t))(
      stats[site], None if transforms is None else transforms[site]) for site in SITES}
  return _map_site_kernels(params, lambda site, k: _clip_search(
      k, config, importance=importance[site], ratios=CLIP_GRID))


def apply_recipe(params, stats: dict[str, SecondMoment], recipe: Recipe, *,
                 progress: bool = True) -> tuple[dict, dict[str, Transform] | None]:
  """`(params, stats, recipe) -> (quantized params, per-site online transforms)`.

  Fits the transforms, merges their inverses into the kernels and
  fake-quantizes the kernels; all pure pytree transformations.
  """
  transforms = fit_transforms(params, stats, recipe, progress=progress)
  qparams = transform_params(params, transforms)
  if recipe.method != "fp":
    qparams = quantize_params(qparams, recipe, transforms=transforms, stats=stats)
  return qparams, transforms


@dataclasses.dataclass(frozen=True)
class QuantHook:
  """The site hook of a quantized forward.

  At every linear-input site: online transform (this layer's `Transform`, the
  hook state) then per-token activation fake quantization; at the key/value
  sites: KV fake quantization. Frozen and hashable: a static jit argument.
  """

  a_config: QuantConfig | None = None
  kv_config: QuantConfig | None = None

  def __call__(self, site: str, x: jax.Array, transform: Transform | None):
    if site in KV_SITES:
      return (x if self.kv_config is None else fake_quantize(x, self.kv_config)), None
    if transform is not None:
      x = transform.apply(x)
    if self.a_config is not None:
      x = fake_quantize(x, self.a_config)
    return x, None


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
  """A model with transformed, fake-quantized kernels and its online part.

  Run it with `forward(qm.model, tokens, hook=qm.hook, hook_state=qm.transforms)`
  or `perplexity(qm.model, windows, hook=qm.hook, hook_state=qm.transforms)`.
  `real`: the linears are integer (`catjax.models.quantized.realize`) and
  quantize their inputs themselves, so the hook only transforms (and
  quantizes the KV cache).
  """

  model: Llama
  transforms: dict[str, Transform] | None
  recipe: Recipe
  real: bool = False

  @property
  def hook(self) -> QuantHook:
    return QuantHook(None if self.real else self.recipe.a_config, self.recipe.kv_config)


def quantize_model(model: Llama, stats: dict[str, SecondMoment], recipe: Recipe, *,
                   progress: bool = True) -> QuantizedModel:
  """Apply `recipe` to `model` (checked against its widths first); `model` is unchanged."""
  recipe.check_model(model.config)
  graphdef, state = nnx.split(model)
  qparams, transforms = apply_recipe(nnx.to_pure_dict(state), stats, recipe, progress=progress)
  state = jax.tree.map(lambda a: a, state)
  nnx.replace_by_pure_dict(state, qparams)
  return QuantizedModel(nnx.merge(graphdef, state), transforms, recipe)
