"""Trained CAT: refine one block's closed-form transforms by gradient descent.

For every site whose transform has a block-diagonal part `B` (cat, cat_full,
smoothquant...), the trained transform is `B(Δ) = (I + Δ) B₀` per `k × k` block,
`Δ` initialised at zero, so step 0 is exactly the closed form `B₀`. Its inverse
is `B₀⁻¹ (I + Δ)⁻¹`: the closed form's own (float64-fitted) inverse times the
inverse of a near-identity `k × k` matrix — Newton–Schulz iterations inside the
training step, an exact float64 inverse for the transforms that are kept — so
the function stays preserved without quantization and the inverse is well
conditioned as long as `I + Δ` is. The loss is the block's output error under fake quantization,
`‖block_q(X) − Y‖² / ‖Y‖²` against the full-precision block's outputs `Y`,
with straight-through rounding of activations, weights and the KV cache, and
AdamW with a cosine learning-rate decay (optax), on random batches of the
calibration windows (deterministic under `Recipe.seed`).

With `Recipe.train.w_clip` (the default for RTN and GPTQ weights) every
kernel also learns a clip ratio per output channel, `r = 1 + c·θ` with `θ`
from zero (so step 0 is still the closed form), projected back into
`[W_CLIP_MIN, 1]` after every step; the weights' grid is then
`r · absmax / qmax` (`catjax.ptq.rounding.channel_clipped_quantize`, LSQ gradients), and the
kept ratios set the grid of the final RTN or GPTQ quantization. `c =
W_CLIP_LR_SCALE` gives the ratios a 10× larger step than the block entries:
Adam's steps are about the learning rate in parameter units, and a useful
ratio lies ~0.1 below 1, a useful `Δ` entry ~0.01 from 0.

FlatQuant ("flatquant", `catjax.core.transforms.flatquant`) trains the same way with
its own parametrization (`PARAMETRIZATIONS`): per site the Kronecker factors
`P_i = (I + Δ_i) H_i` and log-scales `σ` from zero, inverses `H_iᵀ (I + Δ_i)⁻¹` (the
same Newton–Schulz iterations on the small factors; exact in float64 when kept)
and `exp(σ)`, so the inverse stays well conditioned while `I + Δ_i` does; its
condition bound is `cond(I + Δ₁) · cond(I + Δ₂) · max c / min c`.

With `Recipe.train.a_clip` every site also learns its activation clip ratio,
`a_clip + c·θ` from `θ = 0` (the recipe's `a_clip`), projected into
`[A_CLIP_MIN, 1]`, with LSQ's gradient (`catjax.ptq.hooks.fake_quantize_ste`); the
kept ratio rides in the site's transform (`Transform.a_clip`) to the site hook, the
integer linears and the checkpoints.

Safeguards (per block): the trained transforms are kept only if their loss on
all calibration windows is below the closed form's and every `I + Δ` has a
condition number below `MAX_COND`; otherwise the closed form stays.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from catjax.models.llama import block_forward
from catjax.models.spec import ArchSpec, get_path
from catjax.ptq.hooks import SiteHook, fake_quantize_ste
from catjax.ptq import rounding
from catjax.ptq.blocks import map_kernels
from catjax.ptq.rounding import channel_clipped_quantize
from catjax.core.quant import QuantConfig
from catjax.core.transforms import Transform, flatquant
from catjax.core.linalg import HIGHEST

MAX_COND = 1e3
W_CLIP_MIN = 0.5
W_CLIP_LR_SCALE = 10.0
A_CLIP_MIN = 0.3


NEWTON_STEPS = 12


def _near_identity_inverse(m: jax.Array) -> jax.Array:
  """`m⁻¹` of near-identity blocks by Newton–Schulz, `X ← X (2I − m X)` from `X = I`.

  Matmuls only (a LAPACK inverse inside the training step deadlocks XLA's CPU
  runtime on small machines); converges quadratically while `‖m − I‖ < 1`,
  to float32 rounding in these steps for `‖m − I‖ ≤ 0.8`. The kept transforms
  get an exact float64 inverse afterwards (`exact_with_delta`).
  """
  eye = jnp.eye(m.shape[-1], dtype=m.dtype)
  x = jnp.broadcast_to(eye, m.shape)
  for _ in range(NEWTON_STEPS):
    x = jnp.einsum("bij,bjk->bik", x, 2 * eye - jnp.einsum("bij,bjk->bik", m, x,
                                                           precision=HIGHEST), precision=HIGHEST)
  return x


def with_delta(t: Transform, delta: jax.Array) -> Transform:
  """`t` with blocks `(I + Δ) B₀` and inverse blocks `B₀⁻¹ (I + Δ)⁻¹` (Newton–Schulz;
  traceable, used in the training loss)."""
  m = jnp.eye(delta.shape[-1], dtype=jnp.float32) + delta
  blocks = jnp.einsum("bij,bjk->bik", m, t.blocks, precision=HIGHEST)
  inv = jnp.einsum("bij,bjk->bik", t.inv_blocks, _near_identity_inverse(m), precision=HIGHEST)
  return dataclasses.replace(t, blocks=blocks, inv_blocks=inv)


def exact_with_delta(t: Transform, delta: jax.Array) -> Transform:
  """As `with_delta`, computed in float64 with an exact (LU) inverse of `I + Δ`."""
  m = np.eye(delta.shape[-1]) + np.asarray(delta, np.float64)
  b0, inv0 = np.asarray(t.blocks, np.float64), np.asarray(t.inv_blocks, np.float64)
  blocks, inv = m @ b0, inv0 @ np.linalg.inv(m)
  return dataclasses.replace(t, blocks=jnp.asarray(blocks, jnp.float32),
                             inv_blocks=jnp.asarray(inv, jnp.float32))


def _delta_cond(delta) -> float:
  m = np.eye(delta.shape[-1]) + np.asarray(delta, np.float64)
  return float(np.max(np.linalg.cond(m))) if np.isfinite(m).all() else float("inf")


def _kron_factors(t: Transform):
  return tuple(jnp.asarray(h, jnp.float32) for h in flatquant.start_factors(t.dim))


def _kron_init(t: Transform) -> dict:
  a, b = flatquant.kron_sizes(t.dim)
  return {"d1": jnp.zeros((a, a), jnp.float32), "d2": jnp.zeros((b, b), jnp.float32),
          "sigma": jnp.zeros(t.dim, jnp.float32)}


def _kron_traced(t: Transform, p: dict) -> Transform:
  (h1, h2), out = _kron_factors(t), []
  for h, d in ((h1, p["d1"]), (h2, p["d2"])):
    m = jnp.eye(d.shape[-1], dtype=jnp.float32) + d
    out.append((m @ h, h.T @ _near_identity_inverse(m[None])[0]))
  (p1, i1), (p2, i2) = out
  blocks, inv = flatquant.assemble(p1, p2, i1, i2, p["sigma"])
  return dataclasses.replace(t, blocks=blocks, inv_blocks=inv)


def _kron_exact(t: Transform, p: dict) -> Transform:
  factors = []
  for h, d in zip(flatquant.start_factors(t.dim), (p["d1"], p["d2"])):
    m = np.eye(h.shape[0]) + np.asarray(d, np.float64)
    factors.append((m @ h, h.T @ np.linalg.inv(m)))
  (p1, i1), (p2, i2) = factors
  blocks, inv = flatquant.assemble(p1, p2, i1, i2, np.asarray(p["sigma"], np.float64), xp=np)
  return dataclasses.replace(t, blocks=jnp.asarray(blocks, jnp.float32),
                             inv_blocks=jnp.asarray(inv, jnp.float32))


def _kron_cond(p: dict) -> float:
  sigma = np.asarray(p["sigma"], np.float64)
  if not np.isfinite(sigma).all():
    return float("inf")
  return _delta_cond(p["d1"]) * _delta_cond(p["d2"]) * float(np.exp(sigma.max() - sigma.min()))


@dataclasses.dataclass(frozen=True)
class Parametrization:
  """How training writes a site's transform from its parameters.

  Attributes:
    init: `init(t)`, the parameters at which the transform is `t` (the closed form).
    traced: `traced(t, params)`, the transform inside the training step (traceable).
    exact: `exact(t, params)`, the kept transform (float64, exact inverse).
    cond: `cond(params)`, a bound on the condition number of what training added.
  """

  init: Callable[[Transform], Any]
  traced: Callable[[Transform, Any], Transform]
  exact: Callable[[Transform, Any], Transform]
  cond: Callable[[Any], float]


# Trained CAT's `(I + Δ) B₀` per block; FlatQuant's Kronecker factors and scales.
DELTA = Parametrization(lambda t: jnp.zeros_like(t.blocks), with_delta, exact_with_delta,
                        _delta_cond)
KRONECKER = Parametrization(_kron_init, _kron_traced, _kron_exact, _kron_cond)
PARAMETRIZATIONS = {"flatquant": KRONECKER}


def parametrization(t: Transform) -> Parametrization:
  """The parametrization that trains `t` (by its method; `DELTA` by default)."""
  return PARAMETRIZATIONS.get(t.method, DELTA)


def clip_ratio(theta: jax.Array) -> jax.Array:
  """The weight clip ratio of a trained parameter `θ` (see the module docstring)."""
  return 1.0 + W_CLIP_LR_SCALE * theta


def project_clips(params: dict, a_clip0: float = 1.0) -> dict:
  """Keep every learned weight clip ratio in `[W_CLIP_MIN, 1]` and every activation
  clip ratio `a_clip0 + c·θ` in `[A_CLIP_MIN, 1]`."""
  lo = (W_CLIP_MIN - 1.0) / W_CLIP_LR_SCALE
  a_lo, a_hi = ((b - a_clip0) / W_CLIP_LR_SCALE for b in (min(A_CLIP_MIN, a_clip0), 1.0))
  out = {**params, "w_clip": jax.tree.map(lambda t: jnp.clip(t, lo, 0.0), params["w_clip"])}
  if "a_clip" in params:
    out["a_clip"] = jax.tree.map(lambda t: jnp.clip(t, a_lo, a_hi), params["a_clip"])
  return out


def act_clip(theta: jax.Array, a_clip0: float) -> jax.Array:
  """The activation clip ratio of a trained parameter `θ`: `a_clip0 + c·θ`."""
  return a_clip0 + W_CLIP_LR_SCALE * theta


def with_clips(transforms: dict, params: dict, a_clip0: float) -> dict:
  """`transforms` carrying the learned activation clips of `params["a_clip"]`."""
  return {s: t if s not in params.get("a_clip", {}) else
          dataclasses.replace(t, a_clip=act_clip(params["a_clip"][s], a_clip0))
          for s, t in transforms.items()}


def quantized_block(block, transforms, spec: ArchSpec, w_config: QuantConfig | None,
                    w_clip: dict):
  """The block's kernels merged with `transforms` and fake-quantized with STE
  (on the learned clip grid of `w_clip` where it has the kernel)."""

  def one(site, path, k):
    k = transforms[site].merge(k)
    ratio = w_clip.get(path)
    if w_config is None:
      return k
    if ratio is None:
      return fake_quantize_ste(k, w_config, ste=True)
    return channel_clipped_quantize(k, ratio, w_config.qmax)[0].astype(k.dtype)

  return map_kernels(block, spec, one)


def _error(deltas, ratios, block, base, x, y, rope, *, graphdef, hook, spec, w_config):
  """The quantized block's relative output error with blocks `(I + Δ) B₀` and
  weight clip ratios `ratios`."""
  ts = {site: (parametrization(t).traced(t, deltas[site]) if site in deltas else t)
        for site, t in base.items()}
  qblock = quantized_block(block, ts, spec, w_config, ratios)
  out, _, _ = block_forward(graphdef, qblock, x, rope, hook=hook, hook_state=ts)
  err = jnp.sum((out.astype(jnp.float32) - y) ** 2)
  return err / jnp.sum(y.astype(jnp.float32) ** 2)


def _loss(params, block, base, *args, a_clip0, **kw):
  ratios = {p: clip_ratio(t) for p, t in params["w_clip"].items()}
  return _error(params["deltas"], ratios, block, with_clips(base, params, a_clip0), *args, **kw)


_STATIC = ("graphdef", "hook", "spec", "w_config")
_error_jit = jax.jit(_error, static_argnames=_STATIC)


def optimizer(lr: float, steps: int):
  return optax.adamw(optax.cosine_decay_schedule(lr, max(steps, 1)), weight_decay=0.0)


@functools.partial(jax.jit, static_argnames=_STATIC + ("lr", "steps", "a_clip0"))
def _step(params, opt_state, block, base, x, y, rope, *, graphdef, hook, spec, w_config, lr,
          steps, a_clip0):
  loss, grads = jax.value_and_grad(_loss)(params, block, base, x, y, rope, graphdef=graphdef,
                                          hook=hook, spec=spec, w_config=w_config, a_clip0=a_clip0)
  updates, opt_state = optimizer(lr, steps).update(grads, opt_state, params)
  return project_clips(optax.apply_updates(params, updates), a_clip0), opt_state, loss


def block_loss(runner, block, transforms, x, y, recipe, *, spec: ArchSpec,
               w_clip: dict[tuple[str, ...], jax.Array] | None = None) -> float:
  """The training loss of `transforms` (and learned weight clip ratios
  `w_clip`, `{linear path: (d_out,)}`) on all windows (in batches);
  straight-through estimation changes gradients only, so these are the
  quantized block's true errors."""
  hook = _hook(recipe, spec)
  err = 0.0
  for i in range(0, x.shape[0], runner.batch_size):
    xb, yb = x[i:i + runner.batch_size], y[i:i + runner.batch_size]
    part = _error_jit({}, w_clip or {}, block, transforms, xb, yb, runner.rope,
                      graphdef=runner.graphdef, hook=hook, spec=spec, w_config=recipe.w_config)
    err += float(part) * float(jnp.sum(yb.astype(jnp.float32) ** 2))
  return err / float(jnp.sum(y.astype(jnp.float32) ** 2))


def _hook(recipe, spec):
  return SiteHook.uniform(spec.site_names, recipe.a_config, recipe.kv_config, spec.kv_sites,
                          ste=True)


def learns_w_clip(recipe) -> bool:
  """Whether trained CAT of `recipe` learns weight clip ratios."""
  return (recipe.train.w_clip and recipe.w_config is not None
          and rounding.REGISTRY[recipe.weights].learned_clips)


def train_block(runner, block: dict, transforms: dict[str, Transform], x: jax.Array,
                y: jax.Array, recipe, *, spec: ArchSpec, layer: int
                ) -> tuple[dict[str, Transform], dict[str, jax.Array] | None, dict]:
  """Refine `transforms` of one block (see the module docstring).

  Args:
    runner: the engine's `BlockRunner` (block graph, RoPE tables, batch size).
    block: the block's full-precision parameter dict.
    transforms: the closed-form `{site: Transform}` of the block.
    x: the block's calibration inputs `(n, T, d)`.
    y: the targets, the full-precision block's outputs `(n, T, d)`.
    recipe: `train` (steps, lr, batch, w_clip), `seed`
      and the quantizers.
    layer: the block index (seeds the batch order).

  Returns:
    `(transforms, w_clip, info)`: the kept transforms; the kept weight clip
    ratios `{linear path: (d_out,)}` for `quantize_block`, or None (not
    learned, or the closed form kept); the losses (closed form, first and last
    training step, trained on all windows), max condition number of `I + Δ`,
    the mean learned clip ratio, and whether the trained result was kept.
  """
  trainable = {s: t for s, t in transforms.items() if t.blocks is not None}
  params = {"deltas": {s: parametrization(t).init(t) for s, t in trainable.items()},
            "w_clip": {}}
  if learns_w_clip(recipe):
    params["w_clip"] = {path: jnp.zeros(get_path(block, path)["kernel"].shape[-1], jnp.float32)
                        for _, path in spec.linears}
  a_clip0 = float(recipe.a_clip)
  if recipe.train.a_clip:  # one ratio per site, where the site has a transform to carry it
    params["a_clip"] = {s: jnp.zeros((), jnp.float32) for s, t in transforms.items()
                        if t is not None}
  steps, n = recipe.train.steps, x.shape[0]
  batch = min(recipe.train.batch, n)
  static = dict(graphdef=runner.graphdef, hook=_hook(recipe, spec), spec=spec,
                w_config=recipe.w_config)
  opt_state = optimizer(recipe.train.lr, steps).init(params)
  key = jax.random.fold_in(jax.random.PRNGKey(recipe.seed), layer)
  curve = []
  for step in range(steps):
    idx = jax.random.choice(jax.random.fold_in(key, step), n, (batch,), replace=False)
    params, opt_state, loss = _step(params, opt_state, block, transforms, x[idx], y[idx],
                                    runner.rope, lr=float(recipe.train.lr), steps=steps,
                                    a_clip0=a_clip0, **static)
    curve.append(float(loss))

  deltas = params["deltas"]
  w_clip = {p: clip_ratio(t) for p, t in params["w_clip"].items()} or None
  cond = max((parametrization(transforms[s]).cond(d) for s, d in deltas.items()), default=1.0)
  closed = block_loss(runner, block, transforms, x, y, recipe, spec=spec)
  result = transforms
  trained = float("inf")
  if np.isfinite(cond) and cond < MAX_COND:
    result = with_clips({s: (parametrization(t).exact(t, deltas[s]) if s in deltas else t)
                         for s, t in transforms.items()}, params, a_clip0)
    trained = block_loss(runner, block, result, x, y, recipe, spec=spec, w_clip=w_clip)
  keep = bool(np.isfinite(trained) and trained < closed)
  info = {"layer": layer, "closed_form_loss": closed, "trained_loss": trained,
          "first_step_loss": curve[0] if curve else None,
          "last_step_loss": curve[-1] if curve else None, "max_cond": cond,
          "mean_w_clip": (float(np.mean([np.mean(np.asarray(r)) for r in w_clip.values()]))
                          if w_clip else None),
          "a_clip": ({s: float(act_clip(v, a_clip0)) for s, v in params["a_clip"].items()}
                     if params.get("a_clip") else None),
          "kept": keep}
  if keep:
    return result, w_clip, info
  if params.get("a_clip"):  # every layer's transforms carry a clip (they are stacked)
    transforms = with_clips(transforms, jax.tree.map(jnp.zeros_like, params), a_clip0)
  return transforms, None, info
