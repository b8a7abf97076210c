"""SpinQuant (Liu et al., 2024): rotations learned end to end on the Stiefel manifold.

The recipe method "spinquant" without training is QuaRot: a randomized Hadamard at
every site (`catjax.core.transforms`, closed form). With `train.steps > 0` the
rotations are learned before the block walk, for the whole model at once:

- `R1` (`d × d`), one rotation of the residual stream: the transform of every
  site that reads it (`attn_in`, `mlp_in`) in every layer. SpinQuant folds the
  RMSNorm scales `g` into the following linears and fuses `R1` offline into the
  embedding and the residual's writers. catjax applies it where the residual is
  read, after the norm, with the norm's scale folded: the site's transform is
  `R1 · diag(1/g)` (the kernels get `R1 · diag(g) · W`), so the quantized
  operands are the paper's, `x̂ R1ᵀ` of the normalized `x̂` and `R1 diag(g) W`.
  (A zero `g_i` is left unfolded: that channel is zero either way;
  `SpinQuantConfig.fold_norms=False` leaves every `g` in the activations.) The
  residual's writers (`o_proj`, `down_proj`) keep their own output basis, so
  their per-output-channel weight quantizers see `W`, not `W R1`.
- `R2` (`head_dim × head_dim` per layer), a rotation of every attention head on
  the value/output path, followed by the online Hadamard across the width (the
  `o_in` transform is `H · D · blockdiag(R2, ..., R2)`).
- the online Hadamard at `down_in` (SpinQuant's `R4`), not learned.

Both start from QuaRot's choice: `R1 = H · D` (a randomized Hadamard with the
recipe's seed), `R2 = I`, so step 0 is QuaRot with one residual rotation. The
loss is the fake-quantized network's next-token cross-entropy on the
calibration windows, with straight-through rounding of activations, KV cache
and (for RTN weights) weights; with GPTQ weights the rotations are learned
with the weights in floating point, as the paper does, and GPTQ runs after.
The optimizer is Cayley SGD with momentum (Li et al., 2020), `cayley_sgd`, an
optax gradient transformation whose updates keep every rotation orthogonal
to float precision. The learned rotations are kept only if their loss on
all calibration windows is below the start's; otherwise the start stays.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from catjax.core import hadamard as hd
from catjax.core.linalg import HIGHEST
from catjax.core.transforms import Transform
from catjax.models.llama import Llama
from catjax.models.spec import ArchSpec, get_path, spec_for
from catjax.ptq.hooks import SiteHook
from catjax.ptq.train import quantized_block

RESIDUAL_SITES = ("attn_in", "mlp_in")  # read the residual stream: R1
HEAD_SITE = "o_in"  # the attention heads' output: R2 per head, then a Hadamard
METHOD = "spinquant"


def _mm(a, b):
  return jnp.einsum("...ij,...jk->...ik", a, b, precision=HIGHEST)


def _t(a):
  return jnp.swapaxes(a, -1, -2)


class CayleyState(NamedTuple):
  momentum: optax.Updates


def cayley_sgd(learning_rate: float, momentum: float = 0.9, *, q: float = 0.5,
               fixed_point_steps: int = 2, polar_steps: int = 2) -> optax.GradientTransformation:
  """Cayley SGD with momentum on square orthogonal matrices (every leaf `(..., n, n)`).

  Per step, with Euclidean gradient `G` of the parameter `X` (Li et al., 2020, Alg. 1):
  `M ← β M − G`; the skew `W = Ŵ − Ŵᵀ`, `Ŵ = M Xᵀ − ½ X Xᵀ M Xᵀ`; `M ← W X`; the
  step `α = min(lr, 2q / ‖W‖)`; the Cayley retraction `Y = (I − α/2 W)⁻¹ (I + α/2 W) X`
  by its fixed-point iteration `Y ← X + α/2 W (X + Y)` from `Y = X + α M`. Then
  `polar_steps` Newton–Schulz steps `Y ← Y (3I − YᵀY) / 2` put `Y` back on the manifold
  to float precision (the iteration's own error is `O(α³)`). The update is `Y − X`.
  Matmuls only (no LAPACK call inside the training step).
  """
  if not (np.isfinite(learning_rate) and learning_rate > 0):
    raise ValueError(f"learning_rate={learning_rate!r}: expected a finite value > 0")
  if not (np.isfinite(momentum) and 0 <= momentum < 1):
    raise ValueError(f"momentum={momentum!r}: expected a value in [0, 1)")

  def init(params):
    return CayleyState(jax.tree.map(jnp.zeros_like, params))

  def one(g, m, x):
    if x.ndim < 2 or x.shape[-1] != x.shape[-2]:
      raise ValueError(f"cayley_sgd takes square matrices, got a parameter of shape {x.shape}")
    m = momentum * m - g
    w_hat = _mm(m, _t(x)) - 0.5 * _mm(x, _mm(_mm(_t(x), m), _t(x)))
    w = w_hat - _t(w_hat)
    m = _mm(w, x)
    norm = jnp.sqrt(jnp.sum(w * w, axis=(-2, -1), keepdims=True))
    alpha = jnp.minimum(learning_rate, 2 * q / (norm + 1e-8))
    y = x + alpha * m
    for _ in range(fixed_point_steps):
      y = x + 0.5 * alpha * _mm(w, x + y)
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)
    for _ in range(polar_steps):
      y = 0.5 * _mm(y, 3 * eye - _mm(_t(y), y))
    return y - x, m

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("cayley_sgd needs the parameters (optimizer.update(grads, state, params))")
    pairs = jax.tree.map(one, grads, state.momentum, params)
    is_pair = lambda p: isinstance(p, tuple)  # noqa: E731
    updates = jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair)
    moms = jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair)
    return updates, CayleyState(moms)

  return optax.GradientTransformation(init, update)


def check_model(spec: ArchSpec) -> None:
  missing = [s for s in RESIDUAL_SITES + (HEAD_SITE,) if s not in spec.site_names]
  if missing:
    raise ValueError(f"spinquant learns R1 at {RESIDUAL_SITES} and R2 at {HEAD_SITE!r}; the "
                     f"{spec.family} family has sites {spec.site_names}")


def start(cfg, seed: int) -> dict[str, jax.Array]:
  """QuaRot's rotations, where learning starts: `R1 = H · D` (dense, the signs from
  `seed`), `R2 = I` per layer."""
  d = cfg.hidden_size
  signs = hd.random_signs(jax.random.fold_in(jax.random.PRNGKey(seed), 0x5b1), d)
  r1 = hd.apply_hadamard(jnp.eye(d, dtype=jnp.float32), signs).T  # T = H D: x Tᵀ = hadamard(x)
  r2 = jnp.broadcast_to(jnp.eye(cfg.head_dim, dtype=jnp.float32),
                        (cfg.num_layers, cfg.head_dim, cfg.head_dim))
  return {"r1": r1, "r2": r2}


def site_signs(cfg, spec: ArchSpec, seed: int) -> dict[str, jax.Array]:
  """`(L, d)` Hadamard signs of the sites with an online Hadamard (all but `R1`'s)."""
  dims = spec.site_dims(cfg)
  out = {}
  for i, site in enumerate(spec.site_names):
    if site in RESIDUAL_SITES:
      continue
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x5b2 + i)
    out[site] = jnp.stack([hd.random_signs(jax.random.fold_in(key, b), dims[site])
                           for b in range(cfg.num_layers)])
  return out


def norm_scales(model: Llama, spec: ArchSpec) -> dict[str, jax.Array]:
  """`{site: (L, d) float32}`: the effective scale (Gemma's offset included) of the
  RMSNorm each residual site reads, with zeros replaced by 1 (left unfolded)."""
  out = {}
  for site in RESIDUAL_SITES:
    norm = get_path(model.layers, spec.site(site).norm)
    g = norm.offset + jnp.asarray(norm.scale[...], jnp.float32)
    out[site] = jnp.where(g == 0, 1.0, g)
  return out


def transforms(params: dict[str, jax.Array], signs: dict[str, jax.Array], dims: dict[str, int],
               spec: ArchSpec, norms: dict[str, jax.Array] | None = None) -> dict[str, Transform]:
  """`{site: Transform stacked over the layers}` of rotations `params` (traceable);
  `dims`: every site's width; `norms`: `norm_scales`, folded at the residual sites
  (`R1 · diag(1/g)`, inverse `diag(g) · R1ᵀ`), or None (plain `R1`)."""
  r1, r2 = params["r1"], params["r2"]
  (L, hdim, _), d = r2.shape, r1.shape[0]
  out = {}
  r1 = jnp.broadcast_to(r1, (L, 1, d, d))
  for site in spec.site_names:
    dim = dims[site]
    if site in RESIDUAL_SITES:  # orthogonal: B⁻¹ = Bᵀ
      if norms is None:
        out[site] = Transform(r1, _t(r1), None, METHOD, dim)
      else:
        g = norms[site][:, None]  # (L, 1, d)
        out[site] = Transform(r1 / g[..., None, :], g[..., :, None] * _t(r1), None, METHOD, dim)
    elif site == HEAD_SITE:
      r2h = jnp.broadcast_to(r2[:, None], (L, dim // hdim, hdim, hdim))
      out[site] = Transform(r2h, _t(r2h), signs[site], METHOD, dim)
    else:
      out[site] = Transform(None, None, signs[site], METHOD, dim)
  return out


def layer(ts: dict[str, Transform], b: int) -> dict[str, Transform]:
  """Block `b`'s transforms of stacked `ts`."""
  return {s: jax.tree.map(lambda a: a[b], t) for s, t in ts.items()}


def _loss(params, state, signs, norms, tokens, *, graphdef, spec, dims, hook, w_config):
  """Mean next-token cross-entropy of the model with rotations `params` (norm scales
  `norms` folded), its kernels merged and (with `w_config`) fake-quantized with
  straight-through rounding."""
  ts = transforms(params, signs, dict(dims), spec, norms)
  pure = nnx.to_pure_dict(state)
  pure["layers"] = jax.vmap(lambda block, t: quantized_block(block, t, spec, w_config, {}))(
      pure["layers"], ts)
  state = jax.tree.map(lambda a: a, state)
  nnx.replace_by_pure_dict(state, pure)
  logits, _ = nnx.merge(graphdef, state)(tokens, hook=hook, hook_state=ts)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


_STATIC = ("graphdef", "spec", "dims", "hook", "w_config")
_loss_jit = jax.jit(_loss, static_argnames=_STATIC)


@functools.partial(jax.jit, static_argnames=_STATIC + ("lr", "momentum"))
def _step(params, opt_state, state, signs, norms, tokens, *, lr, momentum, **static):
  loss, grads = jax.value_and_grad(_loss)(params, state, signs, norms, tokens, **static)
  updates, opt_state = cayley_sgd(lr, momentum).update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def orthogonality_error(params: dict[str, jax.Array]) -> float:
  """`max |RᵀR − I|` over the rotations."""
  def err(r):
    r = np.asarray(r, np.float64)
    return float(np.max(np.abs(np.swapaxes(r, -1, -2) @ r - np.eye(r.shape[-1]))))
  return max(err(r) for r in params.values())


def learn(model: Llama, windows, recipe, *, progress: bool = False
          ) -> tuple[list[dict[str, Transform]], dict]:
  """Learn SpinQuant's rotations for `model` under `recipe` (see the module docstring).

  Args:
    model: the full-precision model.
    windows: calibration token windows `(n, T)`.
    recipe: a "spinquant" `Recipe`: `train.steps`, `train.batch` (windows per step),
      `spinquant.lr` and `.momentum`, `seed` (start and batch order), the quantizers.

  Returns:
    `([{site: Transform} per block], info)`: the kept rotations as the blocks'
    transforms, and the losses (start and learned on all windows, first and last
    step), the orthogonality error `max |RᵀR − I|` and whether the learned ones were kept.
  """
  cfg = model.config
  spec = spec_for(cfg)
  check_model(spec)
  windows = jnp.asarray(windows, jnp.int32)
  graphdef, state = nnx.split(model)
  signs = site_signs(cfg, spec, recipe.seed)
  norms = norm_scales(model, spec) if recipe.spinquant.fold_norms else None
  static = dict(graphdef=graphdef, spec=spec, dims=tuple(sorted(spec.site_dims(cfg).items())),
                hook=SiteHook.uniform(spec.site_names, recipe.a_config, recipe.kv_config,
                                      spec.kv_sites, ste=True),
                w_config=recipe.w_config if recipe.weights == "rtn" else None)
  params = start(cfg, recipe.seed)
  n, steps = windows.shape[0], recipe.train.steps
  batch = min(recipe.train.batch, n)
  opt_state = cayley_sgd(recipe.spinquant.lr, recipe.spinquant.momentum).init(params)
  key = jax.random.fold_in(jax.random.PRNGKey(recipe.seed), 0x5b3)
  curve = []
  bar = range(steps)
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(bar, desc="spinquant rotations", unit="step")
  for step in bar:
    idx = jax.random.choice(jax.random.fold_in(key, step), n, (batch,), replace=False)
    params, opt_state, loss = _step(params, opt_state, state, signs, norms, windows[idx],
                                    lr=float(recipe.spinquant.lr),
                                    momentum=float(recipe.spinquant.momentum), **static)
    curve.append(float(loss))

  def full_loss(p):
    parts = [(float(_loss_jit(p, state, signs, norms, w, **static)), len(w))
             for w in (windows[i:i + batch] for i in range(0, n, batch))]
    return sum(v * k for v, k in parts) / n

  first = start(cfg, recipe.seed)
  start_loss, learned_loss = full_loss(first), full_loss(params)
  keep = bool(np.isfinite(learned_loss) and learned_loss < start_loss)
  info = {"start_loss": start_loss, "learned_loss": learned_loss,
          "first_step_loss": curve[0] if curve else None,
          "last_step_loss": curve[-1] if curve else None,
          "orthogonality_error": orthogonality_error(params), "kept": keep}
  ts = transforms(params if keep else first, signs, dict(static["dims"]), spec, norms)
  return [layer(ts, b) for b in range(cfg.num_layers)], info
