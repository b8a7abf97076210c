"""What every transform shares: the `Transform` pytree `T = H · D · B · P`, the
`Method` entry of the registry, and `fit_transform`, which checks the
statistics, draws the Hadamard signs and calls the method's fit of `B`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from catjax.base.checks import is_real
from catjax.core import hadamard as hd
from catjax.core import linalg
from catjax.core.linalg import HIGHEST
from catjax.core.transforms.permutation import coupling_permutation

DEFAULT_EPS = 1e-6
DEFAULT_BLOCK_SIZE = 64  # `k` of block CAT (`Recipe.block_size`, the CLI's --block-size)


@dataclasses.dataclass(frozen=True)
class FitInputs:
  """What a method's fit of `B` reads (inside `jit`; float64 when fitting in x64).

  Attributes:
    sigma_x: `(d, d)` activation second moment `E[x xᵀ]`.
    gram_w: `(d, d)` weight Gram `kernel @ kernel.T`.
    act_absmax / weight_absmax: `(d,)` per-channel maxima, or None (RMS fallbacks).
    weight: `(d, r)` factor of `gram_w` when `r` is below the block size, else None.
    block_size: `k` (`d` for "full" methods; None for methods without blocks).
    alpha: SmoothQuant's migration strength.
    eps: relative damping of the moments and eigenvalue floor.
    dtype: the dtype the fit computes in.
  """

  sigma_x: jax.Array
  gram_w: jax.Array
  act_absmax: jax.Array | None
  weight_absmax: jax.Array | None
  weight: jax.Array | None
  block_size: int | None
  alpha: float
  eps: float
  dtype: jnp.dtype | None


@dataclasses.dataclass(frozen=True)
class Method:
  """One entry of `catjax.core.transforms.REGISTRY`.

  Attributes:
    name: the method's name (`Recipe.method`, the CLI's method specs).
    blocks: what `B` is: None (no `B`), "diagonal" (`1 × 1` blocks), "block"
      (`k × k` blocks, `k` = `Recipe.block_size`) or "full" (`k = d`).
    hadamard: whether a randomized Hadamard follows `B`.
    fit: `fit(FitInputs) -> (blocks, inv_blocks)`, the `(d/k, k, k)` blocks of
      `B` and `B⁻¹`; None when `blocks` is None.
    summary: one line for the docs and the help.
    permute: whether the channels are first reordered so that coupled ones share a
      block (`permutation.coupling_permutation` on the statistics; "block" only).
    end_to_end: `Recipe.train.steps` learns this method's transforms for the whole
      model at once (`catjax.ptq.spinquant`) instead of refining each block's `B`.
  """

  name: str
  blocks: str | None
  hadamard: bool
  fit: Callable[[FitInputs], tuple[jax.Array, jax.Array]] | None = None
  summary: str = ""
  permute: bool = False
  end_to_end: bool = False

  def __post_init__(self):
    if self.blocks not in (None, "diagonal", "block", "full"):
      raise ValueError(f"Method {self.name!r}: blocks={self.blocks!r}, expected None, "
                       f"'diagonal', 'block' or 'full'")
    if (self.fit is None) != (self.blocks is None):
      raise ValueError(f"Method {self.name!r}: a fit is needed exactly when there are blocks")
    if self.permute and self.blocks != "block":
      raise ValueError(f"Method {self.name!r}: a channel permutation needs blocks='block'")

  @property
  def takes_block_size(self) -> bool:
    """Whether `Recipe.block_size` sets this method's `k`."""
    return self.blocks == "block"

  @property
  def eigen_fit(self) -> bool:
    """Whether the fit factors the (blocks of the) moments (Cholesky, eigh): they
    must not be all zero, and a low-rank weight factor may replace the Gram."""
    return self.blocks in ("block", "full")


# The registry of transform methods, filled in `catjax.core.transforms` (one line per
# method); `catjax.ptq.recipe` adds "fp" and "none" on top.
REGISTRY: dict[str, Method] = {}


def _check_in_ndim(v: jax.Array, n: int, d: int, *, leading: bool = False) -> tuple[int, ...]:
  """The shape of `v`, checking that its `n` trailing (`leading`: leading) axes hold `d` values."""
  what = "leading" if leading else "trailing"
  if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= v.ndim):
    raise ValueError(f"in_ndim={n!r} must be an integer in 1..{v.ndim} for shape {v.shape}")
  part = v.shape[:n] if leading else v.shape[v.ndim - n:]
  if math.prod(part) != d:
    raise ValueError(f"the {n} {what} axes {part} of shape {v.shape} hold {math.prod(part)} "
                     f"values; the transform has size {d}")
  return v.shape


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["blocks", "inv_blocks", "signs", "perm", "a_clip"], meta_fields=["method", "dim"])
@dataclasses.dataclass(frozen=True)
class Transform:
  """`T = H · D · B · P` as a pytree.

  Attributes:
    blocks: `(d/k, k, k)` float32 blocks `B_i` of `B`, or None.
    inv_blocks: `(d/k, k, k)` blocks of `B⁻¹`, or None.
    signs: `(d,)` ±1 diagonal `D` of the randomized Hadamard, or None when
      the transform has no Hadamard.
    method: the method it was fitted with.
    dim: `d`, the input width of the layer.
    perm: `(d,)` int32 channel order `P` applied before the blocks (`(x Pᵀ)_i =
      x_perm[i]`, so channel `perm[i]` lands in position `i`), or None (as they are).
    a_clip: the clip ratio of the activation quantizer that reads this site, a float32
      scalar learned with the transform (`catjax.ptq.train`, `TrainConfig.a_clip`), or
      None (the recipe's `a_clip`). It does not change `apply` or `merge`.
  """

  blocks: jax.Array | None
  inv_blocks: jax.Array | None
  signs: jax.Array | None
  method: str
  dim: int
  perm: jax.Array | None = None
  a_clip: jax.Array | None = None

  @property
  def block_size(self) -> int | None:
    return None if self.blocks is None else self.blocks.shape[-1]

  def _check(self, v: jax.Array, axis: int, what: str) -> None:
    if v.ndim < 1 or v.shape[axis] != self.dim:
      raise ValueError(f"{what} must have size {self.dim} on axis {axis}, got shape {v.shape}")

  def apply(self, x: jax.Array, *, in_ndim: int = 1) -> jax.Array:
    """`x' = x Tᵀ` for activations `x: (..., d)`; returns the dtype of `x`.

    `in_ndim`: how many trailing axes of `x` are the input (flattened in order to `d`,
    e.g. `(..., heads, head_dim)` before an `NH,NHD->D` einsum); the result has the
    shape of `x`.
    """
    x = jnp.asarray(x)
    if in_ndim != 1:
      shape = _check_in_ndim(x, in_ndim, self.dim)
      return self.apply(x.reshape(*shape[:-in_ndim], self.dim)).reshape(shape)
    self._check(x, -1, "x")
    v = x.astype(jnp.float32)
    if self.perm is not None:
      v = jnp.take(v, self.perm, axis=-1)
    if self._fuses(x):
      return self._apply_fused(v.reshape(-1, self.dim)).reshape(x.shape).astype(x.dtype)
    if self.blocks is not None:
      # Blocks-major batched matmul with explicit transposes: ~1.5x faster on
      # CPU than letting the einsum place the block axis.
      nb, k, _ = self.blocks.shape
      v = jnp.swapaxes(v.reshape(-1, nb, k), 0, 1)  # (nb, tokens, k)
      v = jnp.matmul(v, jnp.swapaxes(self.blocks, -1, -2), precision=HIGHEST)
      v = jnp.swapaxes(v, 0, 1).reshape(x.shape)
    if self.signs is not None:
      v = hd.apply_hadamard(v, self.signs)
    return v.astype(x.dtype)

  def _fuses(self, x: jax.Array) -> bool:
    """Whether `apply` folds `D` and the inner Hadamard factor into the blocks:
    when there are both blocks and a Hadamard and at least `k` rows (folding
    costs what applying that factor to `k` rows does)."""
    if self.blocks is None or self.signs is None or self.block_size < 2:
      return False
    return math.prod(x.shape[:-1]) >= self.block_size and hd.inner_split(
        self.dim, self.block_size)[0] > 1

  def _apply_fused(self, v: jax.Array) -> jax.Array:
    """`apply` on float32 `(rows, d)` as `(H_outer ⊗ I) · F` with the block
    diagonal `F = (I ⊗ H_inner) D B` (`hadamard.inner_split`): the same `T`,
    one pass over the activations fewer."""
    nb, k, _ = self.blocks.shape
    inner, outer = hd.inner_split(self.dim, k)
    f = self.signs.reshape(nb, k, 1).astype(jnp.float32) * self.blocks
    f = hd.apply_hadamard(f.reshape(nb, k // inner, inner, k), axis=2).reshape(nb, k, k)
    v = jnp.swapaxes(v.reshape(-1, nb, k), 0, 1)
    v = jnp.matmul(v, jnp.swapaxes(f, -1, -2), precision=HIGHEST)
    v = jnp.swapaxes(v, 0, 1).reshape(-1, self.dim // inner, inner)
    return hd.apply_outer(v, outer).reshape(-1, self.dim)

  def merge(self, kernel: jax.Array, *, in_axes: int | tuple[int, ...] = 0) -> jax.Array:
    """`kernel' = T⁻ᵀ kernel` for `kernel: (d, d_out)`; returns its dtype.

    `in_axes`: the kernel's input axes when it is N-D, flattened in that order to `d`
    (e.g. `(0, 1)` for an `(heads, head_dim, d_out)` einsum kernel); its other axes
    are the output. The result has the kernel's shape.
    """
    kernel = jnp.asarray(kernel)
    axes = (in_axes,) if isinstance(in_axes, int) else tuple(in_axes)
    if axes != (0,) or kernel.ndim != 2:
      nd = kernel.ndim
      named = [a % nd for a in axes if isinstance(a, int) and not isinstance(a, bool) and -nd <= a < nd]
      if not axes or len(set(named)) != len(axes) or len(axes) >= nd:
        raise ValueError(f"in_axes={in_axes!r} must name distinct axes of the kernel, leaving at "
                         f"least one output axis; got {kernel.shape=}")
      axes = tuple(a % nd for a in axes)
      order = axes + tuple(a for a in range(nd) if a not in axes)
      moved = jnp.transpose(kernel, order)
      _check_in_ndim(moved, len(axes), self.dim, leading=True)
      merged = self.merge(moved.reshape(self.dim, -1)).reshape(moved.shape)
      return jnp.transpose(merged, tuple(order.index(a) for a in range(nd)))
    self._check(kernel, 0, "kernel")
    k = kernel.astype(jnp.float32)
    if self.perm is not None:  # P⁻ᵀ = P: the rows in the activations' new order
      k = jnp.take(k, self.perm, axis=0)
    if self.inv_blocks is not None:
      nb, bs, _ = self.inv_blocks.shape
      k = jnp.einsum("bkj,bko->bjo", self.inv_blocks, k.reshape(nb, bs, -1), precision=HIGHEST)
      k = k.reshape(kernel.shape)
    if self.signs is not None:
      k = hd.apply_hadamard(k, self.signs, axis=0)
    return k.astype(kernel.dtype)

  def matrix(self) -> jax.Array:
    """Dense `T` (`d × d`), for analysis and tests: `T = apply(I)ᵀ`."""
    return self.apply(jnp.eye(self.dim, dtype=jnp.float32)).T


@functools.partial(jax.jit, static_argnames=("method", "block_size", "alpha", "eps", "dtype"))
def _fit(sigma_x, gram_w, signs, act_absmax, weight_absmax, weight, *, method, block_size, alpha,
         eps, dtype=None):
  blocks = inv = None
  m = REGISTRY[method]
  if m.fit is not None:
    blocks, inv = m.fit(FitInputs(sigma_x, gram_w, act_absmax, weight_absmax, weight, block_size,
                                  alpha, eps, dtype))
  d = sigma_x.shape[-1]
  as32 = lambda a: None if a is None else a.astype(jnp.float32)
  return Transform(blocks=as32(blocks), inv_blocks=as32(inv), signs=signs, method=method, dim=d)


def fit_transform(method: str, sigma_x: jax.Array, gram_w: jax.Array, *,
                  block_size: int | None = None, key: jax.Array | None = None,
                  act_absmax: jax.Array | None = None, alpha: float = 0.5,
                  weight_absmax: jax.Array | None = None, eps: float = DEFAULT_EPS,
                  x64: bool | None = None, name: str = "transform",
                  weight: jax.Array | None = None) -> Transform:
  """Fit a function-preserving transform for one linear input.

  Args:
    method: a method of `REGISTRY`.
    sigma_x: `(d, d)` activation second moment `E[x xᵀ]`.
    gram_w: `(d, d)` weight Gram `kernel @ kernel.T` (summed over the linears
      that share this input).
    block_size: `k` for "cat" (must divide `d`; default `DEFAULT_BLOCK_SIZE`);
      ignored by other methods ("cat_full" uses `k = d`).
    key: PRNG key for the Hadamard signs (default `PRNGKey(0)`).
    act_absmax: `(d,)` per-channel `max |x_j|` for SmoothQuant (default: RMS).
    alpha: SmoothQuant migration strength.
    weight_absmax: `(d,)` per-input-channel `max |W_:,j|` for SmoothQuant
      (default: the column norm from `gram_w`; a global factor does not
      change quantization).
    eps: relative damping of both second moments and eigenvalue floor,
      finite and >= 0.
    x64: fit in float64 (default: yes, except on TPU where float64 is
      emulated), else in float32, whatever `jax_enable_x64` says; the
      transform is stored in float32 either way. Activation second moments
      are too ill-conditioned for float32 eigh (docs/design.md §1.3).
    name: label used in error messages (e.g. "layer 3 down_in").
    weight: optional `(d, r)` factor of `gram_w` (`gram_w = weight weightᵀ`,
      e.g. the site's kernels side by side). When `r` is below the block size
      the blocks of `gram_w` are singular, and "cat" / "cat_full" fit from it
      with `linalg.alignment_transform_low_rank` (an `r × r` eigh per block
      instead of `k × k`; no separate ridge on `gram_w`).

  Returns:
    A `Transform` with `.apply(x)` and `.merge(kernel)`.

  Raises:
    ValueError: unknown method, mismatched shapes, a block size that does not
      divide `d`, a width without a supported Hadamard, a bad `eps`, `alpha`
      or `x64`, or statistics that hold NaN or ±Inf, are negative (a negative
      diagonal of `sigma_x` / `gram_w`, negative maxima) or, for "cat" and
      "cat_full", all zero. The message starts with `name`.
    FloatingPointError: the fit produced non-finite values.
  """
  if not isinstance(method, str) or method not in REGISTRY:
    raise ValueError(f"{name}: unknown method {method!r}; expected one of {tuple(REGISTRY)}")
  sigma_x, gram_w = jnp.asarray(sigma_x), jnp.asarray(gram_w)
  if sigma_x.ndim != 2 or sigma_x.shape[0] != sigma_x.shape[1] or sigma_x.shape != gram_w.shape:
    raise ValueError(f"sigma_x and gram_w must be equal square (d, d) matrices, got "
                     f"{sigma_x.shape=} {gram_w.shape=}")
  d = sigma_x.shape[0]
  for label, v in (("act_absmax", act_absmax), ("weight_absmax", weight_absmax)):
    if v is not None and jnp.shape(v) != (d,):
      raise ValueError(f"{label} must have shape ({d},), got {jnp.shape(v)}")
  if weight is not None and (jnp.ndim(weight) != 2 or jnp.shape(weight)[0] != d):
    raise ValueError(f"weight must have shape ({d}, r), got {jnp.shape(weight)}")
  if not (is_real(alpha) and 0.0 <= alpha <= 1.0):
    raise ValueError(f"{name}: alpha must be in [0, 1], got {alpha=!r}")
  if not (is_real(eps) and eps >= 0):
    raise ValueError(f"{name}: eps must be a finite number >= 0, got {eps=!r}")
  if x64 is not None and not isinstance(x64, (bool, np.bool_)):
    raise ValueError(f"{name}: x64 must be True, False or None, got {x64=!r}")
  kind, fits = REGISTRY[method].blocks, REGISTRY[method].eigen_fit
  for label, v, kw in (("sigma_x", sigma_x, {"psd": True, "nonzero": fits}),
                       ("gram_w", gram_w, {"psd": True, "nonzero": fits}),
                       ("act_absmax", act_absmax, {"nonnegative": True}),
                       ("weight_absmax", weight_absmax, {"nonnegative": True}),
                       ("weight", weight, {})):
    linalg.check_array(label, v, context=name, **kw)
  if kind == "block":
    block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) \
        or block_size < 1 or d % block_size:
      raise ValueError(f"block_size must be a positive divisor of d: {d=} {block_size=}")
    block_size = int(block_size)
  elif kind == "full":
    block_size = d
  else:
    block_size = None
  signs = None
  if REGISTRY[method].hadamard:
    hd.hadamard_factors(d)  # raises with the nearest supported sizes
    signs = hd.random_signs(jax.random.PRNGKey(0) if key is None else key, d)
  if not fits or weight is None or jnp.shape(weight)[1] >= block_size:
    weight = None  # the Gram's blocks are full rank: the dense fit
  if x64 is None:
    x64 = jax.default_backend() != "tpu"
  arrays = (sigma_x, gram_w, act_absmax, weight_absmax, weight)
  perm = None
  if REGISTRY[method].permute:
    perm = coupling_permutation(np.asarray(sigma_x), np.asarray(gram_w), block_size)
    reorder = lambda a, n: None if a is None else jnp.asarray(  # noqa: E731
        np.asarray(a)[np.ix_(perm, perm)] if n == 2 else np.asarray(a)[perm])
    arrays = tuple(reorder(a, n) for a, n in zip(arrays, (2, 2, 1, 1, 1)))
  if not x64:  # float32 inputs, as a jit with x64 off would see them
    arrays = tuple(None if a is None else _float32(jnp.asarray(a)) for a in arrays)
  # float64 arrays exist only with x64 on: a scope of this thread, for this fit.
  with jax.enable_x64(True) if x64 else contextlib.nullcontext():
    t = _fit(*arrays[:2], signs, *(None if a is None else jnp.asarray(a) for a in arrays[2:]),
             method=method, block_size=block_size, alpha=float(alpha), eps=float(eps),
             dtype=jnp.dtype(jnp.float64 if x64 else jnp.float32))
  linalg.ensure_finite(name, t.blocks, t.inv_blocks)
  return t if perm is None else dataclasses.replace(t, perm=jnp.asarray(perm, jnp.int32))


def _float32(a: jax.Array) -> jax.Array:
  return a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a


def fold_block_hadamard(t: Transform) -> Transform:
  """A block-only transform: the full-width Hadamard `H·D` of `t` replaced by a
  Hadamard of the block size inside every block, `B'_i = H_k D_i B_i`.

  `T' = blockdiag(H_k D_i B_i)` is one block-diagonal matrix (what a fused
  kernel applies), still function-preserving with `B'_i⁻¹ = B_i⁻¹ D_i H_kᵀ`,
  but its Hadamard mixes channels only within a block. It keeps `t`'s signs.

  Raises:
    ValueError: `t` lacks blocks or a Hadamard, or `k` has no Hadamard matrix.
  """
  if t.blocks is None or t.signs is None:
    raise ValueError(f"fold_block_hadamard needs blocks and a Hadamard, got method {t.method!r}")
  nb, k, _ = t.blocks.shape[-3:]
  if not hd.is_supported(k):
    raise ValueError(f"block size k={k} has no Hadamard matrix (see catjax.core.hadamard)")
  h = jnp.asarray(hd.hadamard_matrix(k), jnp.float32)
  s = t.signs.reshape(t.signs.shape[:-1] + (nb, k))
  hs = h * s[..., None, :]  # H_k D_i
  blocks = jnp.einsum("...bij,...bjk->...bik", hs, t.blocks, precision=HIGHEST)
  inv = jnp.einsum("...bij,...bkj->...bik", t.inv_blocks, hs, precision=HIGHEST)
  return dataclasses.replace(t, blocks=blocks, inv_blocks=inv, signs=None)
