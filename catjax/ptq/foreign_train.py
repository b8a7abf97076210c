"""Trained CAT on a foreign model's block (`catjax.quantize(..., blocks=...)`).

The same training as catjax's own engine (`catjax.ptq.train`): per site with a
block-diagonal part, blocks `(I + Δ) B₀` from `Δ = 0`; with learned weight clips
a ratio per output channel of every kernel; with learned activation clips one ratio
per site (`Transform.a_clip`); AdamW on the block's relative output
error under straight-through fake quantization, on random batches of the
calibration inputs (seeded by the recipe's seed and the block's index); the
trained result is kept only if its loss on all inputs is below the closed form's
and every `I + Δ` is well conditioned. The block runs as the model's own module:
inside the loss a copy of it (`nnx.merge`) gets the trained, fake-quantized
weights and input quantizers, and is called as the walk calls it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from catjax.ptq import rounding, train
from catjax.ptq.foreign import InputQuantizer, Linear, Site, hidden_of
from catjax.ptq.hooks import fake_quantize_ste
from catjax.ptq.recipe import Recipe


def _relative(block: nnx.Module) -> dict[str, nnx.Module]:
  return {"/".join(map(str, p)): m for p, m in nnx.iter_modules(block)}


def train_sites(block: nnx.Module, path: str, sites: list[Site], transforms: list, recipes: list[Recipe],
                hidden: list[jax.Array], targets: list[jax.Array], args: tuple, kwargs: dict,
                *, layer: int) -> tuple[list, dict[str, jax.Array] | None, dict]:
  """Refine the closed-form `transforms` of one block's `sites` (see the module docstring);
  `recipes[i]` is site `i`'s, `targets` the float block's outputs on `hidden`.

  Returns `(transforms, w_clip, info)`: the kept transforms, the kept clip ratios
  `{linear path: (d_out,)}` (or None), and the losses as `catjax.ptq.train` reports them."""
  base = recipes[0]
  graphdef, state = nnx.split(block)
  prefix = len(path) + 1
  kernels = {lin.path: lin.kernel() for site in sites for lin in site.linears}
  params = {"deltas": {str(i): train.parametrization(t).init(t) for i, t in enumerate(transforms)
                       if t is not None and t.blocks is not None}, "w_clip": {}}
  if train.learns_w_clip(base):
    params["w_clip"] = {p: jnp.zeros(k.shape[1], jnp.float32) for p, k in kernels.items()}
  a_clip0 = float(base.a_clip)
  if base.train.a_clip:
    params["a_clip"] = {str(i): jnp.zeros((), jnp.float32) for i, t in enumerate(transforms)
                        if t is not None}

  def clipped(ts, p):  # the transforms carrying the learned activation clips
    out = train.with_clips({str(i): t for i, t in enumerate(ts)}, p, a_clip0)
    return [out[str(i)] for i in range(len(ts))]

  def error(deltas, ratios, ts, x, y):
    """The block's relative output error with transforms `ts` (blocks `(I + Δ) B₀` where
    `deltas` has the site) and clip ratios `ratios`, its copy run as the walk runs it."""
    blk = nnx.merge(graphdef, state, copy=True)
    modules = _relative(blk)
    for i, (site, t, recipe) in enumerate(zip(sites, ts, recipes)):
      if str(i) in deltas:
        t = train.parametrization(t).traced(t, deltas[str(i)])
      for lin in site.linears:
        own = Linear(lin.path[prefix:], modules[lin.path[prefix:]], lin.param, lin.in_axes,
                     lin.in_ndim)
        k = kernels[lin.path] if t is None else t.merge(kernels[lin.path])
        ratio = ratios.get(lin.path)
        if recipe.w_config is not None:
          k = (fake_quantize_ste(k, recipe.w_config, ste=True) if ratio is None else
               rounding.channel_clipped_quantize(k, ratio, recipe.w_config.qmax)[0])
        own.set_kernel(k)
        own.module.catjax_input = InputQuantizer(t, recipe.a_config, lin.in_ndim, ste=True)
    out = hidden_of(blk(x, *args, **kwargs), x, path).astype(jnp.float32)
    y = y.astype(jnp.float32)
    return jnp.sum((out - y) ** 2) / jnp.sum(y ** 2)

  def loss(params, x, y):
    ratios = {p: train.clip_ratio(t) for p, t in params["w_clip"].items()}
    return error(params["deltas"], ratios, clipped(transforms, params), x, y)

  steps = base.train.steps
  opt = train.optimizer(base.train.lr, steps)

  @jax.jit
  def step(params, opt_state, x, y):
    value, grads = jax.value_and_grad(loss)(params, x, y)
    updates, opt_state = opt.update(grads, opt_state, params)
    return train.project_clips(optax.apply_updates(params, updates), a_clip0), opt_state, value

  error_jit = jax.jit(error)
  norms = [float(jnp.sum(y.astype(jnp.float32) ** 2)) for y in targets]

  def loss_all(ratios, ts):  # on every calibration input: the quantized block's true error
    return sum(float(error_jit({}, ratios, ts, x, y)) * n
               for x, y, n in zip(hidden, targets, norms)) / sum(norms)

  x_all, y_all = jnp.concatenate(hidden), jnp.concatenate(targets)
  n = x_all.shape[0]
  batch = min(base.train.batch, n)
  key = jax.random.fold_in(jax.random.PRNGKey(base.seed), layer)
  opt_state = opt.init(params)
  curve = []
  for s in range(steps):
    idx = jax.random.choice(jax.random.fold_in(key, s), n, (batch,), replace=False)
    params, opt_state, value = step(params, opt_state, x_all[idx], y_all[idx])
    curve.append(float(value))

  closed = loss_all({}, transforms)
  deltas = params["deltas"]
  cond = max((train.parametrization(transforms[int(i)]).cond(d) for i, d in deltas.items()),
             default=1.0)
  w_clip = {p: train.clip_ratio(t) for p, t in params["w_clip"].items()} or None
  result, trained = list(transforms), float("inf")
  if np.isfinite(cond) and cond < train.MAX_COND:
    result = clipped([train.parametrization(t).exact(t, deltas[str(i)]) if str(i) in deltas
                      else t for i, t in enumerate(transforms)], params)
    trained = loss_all(w_clip or {}, result)
  keep = bool(np.isfinite(trained) and trained < closed)
  info = {"layer": layer, "block": path, "closed_form_loss": closed, "trained_loss": trained,
          "first_step_loss": curve[0] if curve else None,
          "last_step_loss": curve[-1] if curve else None, "max_cond": cond, "kept": keep}
  if keep:
    return result, w_clip, info
  return clipped(transforms, jax.tree.map(jnp.zeros_like, params)), None, info
