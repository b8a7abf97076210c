"""Symmetric positive definite (SPD) matrix functions for fitting transforms.

Everything here is pure and jittable, works on batches of matrices (leading
axes), and computes in an explicit `dtype`: by default the inputs' promoted
dtype, at least float32 (`compute_dtype`), never one picked from the x64 flag;
pass float64 (under `jax.enable_x64`) for ill-conditioned statistics. Matmuls
run at HIGHEST precision. Second moments of LLM activations are extremely
ill-conditioned (docs/design.md §1.3), so every function damps its inputs by
`eps · tr(S)/d · I` and floors eigenvalues at `eps` times their mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The matmul precision of every numerics-critical contraction in catjax.
HIGHEST = jax.lax.Precision.HIGHEST
# Smallest ridge of an activation second moment before its Cholesky, relative
# to its trace, for float32 statistics (~8 ulps: their rounding noise); other
# dtypes scale it by their ulp.
CHOLESKY_RIDGE = 1e-6


def compute_dtype(*arrays, dtype=None):
  """The dtype to compute in: `dtype` when given, else the promoted dtype of
  `arrays` (None entries skipped), at least float32.

  Raises:
    ValueError: a `dtype` that is not float32 or float64, or float64 while
      x64 is off (jax would silently compute in float32).
  """
  if dtype is None:
    return jnp.dtype(jnp.result_type(*(a for a in arrays if a is not None), jnp.float32))
  dtype = jnp.dtype(dtype)
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
    raise ValueError(f"dtype must be float32 or float64, got {dtype=}")
  if dtype == jnp.float64 and not jax.config.jax_enable_x64:
    raise ValueError("dtype=float64 needs x64: call inside `with jax.enable_x64(True):`")
  return dtype


def check_array(name: str, a, *, finite: bool = True, nonzero: bool = False,
                nonnegative: bool = False, psd: bool = False, context: str | None = None) -> None:
  """Raise `ValueError` naming `name` (after `context: `) if a concrete `a` has
  non-finite values, is all zero (`nonzero`), has negative values
  (`nonnegative`) or a negative diagonal (`psd`: not a second moment).

  Inside `jit` (traced arrays, or a concrete one under a trace) nothing is
  checked; the reductions run where `a` lives and one scalar per check comes
  back.
  """
  if a is None or isinstance(a, jax.core.Tracer):
    return
  a = jnp.asarray(a)
  where = f"{context}: " if context else ""
  if a.size == 0:
    if nonzero:
      raise ValueError(f"{where}{name} is empty (shape {a.shape})")
    return
  counts = {}
  if finite and jnp.issubdtype(a.dtype, jnp.inexact):
    counts["finite"] = jnp.sum(~jnp.isfinite(a))
  if nonzero:
    counts["nonzero"] = jnp.any(a != 0)
  if nonnegative:
    counts["nonnegative"] = jnp.sum(a < 0)
  if psd:
    counts["psd"] = jnp.sum(jnp.diagonal(a, axis1=-2, axis2=-1) < 0)
  if any(isinstance(c, jax.core.Tracer) for c in counts.values()):
    return
  counts = jax.device_get(counts)
  if counts.get("finite", 0):
    raise ValueError(f"{where}{name} has {int(counts['finite'])} non-finite value(s) (NaN or Inf) "
                     f"out of {a.size}")
  if nonzero and not counts["nonzero"]:
    raise ValueError(f"{where}{name} is all zero")
  if counts.get("nonnegative", 0):
    raise ValueError(f"{where}{name} has {int(counts['nonnegative'])} negative value(s); "
                     "expected values >= 0")
  if counts.get("psd", 0):
    raise ValueError(f"{where}{name} has {int(counts['psd'])} negative diagonal value(s); expected "
                     "a positive semi-definite second moment")


def _check_square(name: str, a: jax.Array) -> None:
  if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
    raise ValueError(f"{name} must be a (batch of) square matrices, got {name}.shape={a.shape}")


def check_pair(names: tuple[str, str], a: jax.Array, b: jax.Array) -> None:
  for name, m in zip(names, (a, b)):
    _check_square(name, m)
  if a.shape != b.shape:
    raise ValueError(f"{names[0]} and {names[1]} need equal shapes, got {a.shape} and {b.shape}")


def symmetrize(a: jax.Array) -> jax.Array:
  return 0.5 * (a + jnp.swapaxes(a, -1, -2))


def damp(a: jax.Array, eps: float) -> jax.Array:
  """`a + eps · tr(a)/d · I`: relative ridge, keeps the scale of `a`."""
  d = a.shape[-1]
  mean_eig = jnp.trace(a, axis1=-2, axis2=-1) / d
  return a + (eps * mean_eig)[..., None, None] * jnp.eye(d, dtype=a.dtype)


def spd_eigh(a: jax.Array, *, eps: float = 1e-6, dtype=None) -> tuple[jax.Array, jax.Array]:
  """Eigen-decomposition of a damped SPD matrix with floored eigenvalues.

  Args:
    a: `(..., d, d)` symmetric positive semi-definite matrix.
    eps: relative damping and eigenvalue floor.
    dtype: computation dtype (default `compute_dtype(a)`).

  Returns:
    `(w, v)` with `a ≈ v diag(w) vᵀ` and `w >= max(eps · mean(w),
    d · ulp · max(w)) > 0`.
  """
  _check_square("a", a)
  a = damp(symmetrize(jnp.asarray(a, compute_dtype(a, dtype=dtype))), eps)
  w, v = jnp.linalg.eigh(a)
  floor = _eigen_floor(jnp.mean(jnp.abs(w), axis=-1, keepdims=True),
                       jnp.max(jnp.abs(w), axis=-1, keepdims=True), a.shape[-1], eps)
  return jnp.maximum(w, floor), v


def _eigen_floor(mean: jax.Array, largest: jax.Array, d: int, eps: float) -> jax.Array:
  """`spd_eigh`'s eigenvalue floor from the mean and largest eigenvalue of a `d × d` matrix."""
  # Below d·ulp·λmax an eigenvalue is rounding noise (float32: ~1e-5 relative
  # for d = 128); floor there too, so that inverse powers stay meaningful.
  floor = jnp.maximum(eps * mean, d * jnp.finfo(largest.dtype).eps * largest)
  return jnp.maximum(floor, jnp.finfo(largest.dtype).tiny)


def _from_eigh(w: jax.Array, v: jax.Array, power: float) -> jax.Array:
  scaled = v * (w**power)[..., None, :]
  return symmetrize(jnp.matmul(scaled, jnp.swapaxes(v, -1, -2), precision=HIGHEST))


def spd_power(a: jax.Array, power: float, *, eps: float = 1e-6, dtype=None) -> jax.Array:
  """`a^power` of a (damped) SPD matrix via `eigh`, in `dtype` (see `spd_eigh`)."""
  w, v = spd_eigh(a, eps=eps, dtype=dtype)
  return _from_eigh(w, v, power)


def spd_sqrt(a: jax.Array, *, eps: float = 1e-6, dtype=None) -> jax.Array:
  """SPD square root `a^½`."""
  return spd_power(a, 0.5, eps=eps, dtype=dtype)


def spd_inv_sqrt(a: jax.Array, *, eps: float = 1e-6, dtype=None) -> jax.Array:
  """SPD inverse square root `a^-½`."""
  return spd_power(a, -0.5, eps=eps, dtype=dtype)


def _mm(*mats: jax.Array) -> jax.Array:
  out = mats[0]
  for m in mats[1:]:
    out = jnp.matmul(out, m, precision=HIGHEST)
  return out


def geometric_mean(a: jax.Array, b: jax.Array, *, eps: float = 1e-6, dtype=None) -> jax.Array:
  """Matrix geometric mean `a # b` of two SPD matrices.

  `a # b = a^½ (a^-½ b a^-½)^½ a^½`, the unique SPD `G` with `G a⁻¹ G = b`
  (arXiv 2603.04359, optimal alignment). Both inputs are damped by `eps`.

  Args:
    a, b: `(..., d, d)` SPD matrices of the same shape.
    eps: relative damping and eigenvalue floor.
    dtype: computation dtype (default `compute_dtype(a, b)`).

  Returns:
    `G`, symmetric, in that dtype.

  Raises:
    ValueError: for non-square or mismatched shapes.
  """
  check_pair(("a", "b"), a, b)
  dtype = compute_dtype(a, b, dtype=dtype)
  wa, va = spd_eigh(a, eps=eps, dtype=dtype)
  outer, inner_side = _from_eigh(wa, va, 0.5), _from_eigh(wa, va, -0.5)
  b = damp(symmetrize(jnp.asarray(b, dtype)), eps)
  inner = spd_sqrt(_mm(inner_side, b, inner_side), eps=0.0, dtype=dtype)
  return symmetrize(_mm(outer, inner, outer))


def alignment_transform(sigma_x: jax.Array, gram_w: jax.Array, *, eps: float = 1e-6,
                        min_ridge: float | None = None, dtype=None
                        ) -> tuple[jax.Array, jax.Array]:
  """An optimal-alignment transform `M` and its inverse, from one `eigh`.

  Alignment is maximized by every `M` with `Mᵀ M = P = Σ_x⁻¹ # Σ_W`
  (docs/design.md §1.3): then the transformed activation second moment and the
  transformed weight Gram are the same matrix, `M Σ_x Mᵀ = M⁻ᵀ Σ_W M⁻¹`. With
  the Cholesky factor `Σ_x = L Lᵀ` and `K = Lᵀ Σ_W L`,

      M = K^¼ L⁻¹,   M⁻¹ = L K^-¼,   M Σ_x Mᵀ = M⁻ᵀ Σ_W M⁻¹ = K^½,

  and `Mᵀ M = L⁻ᵀ K^½ L⁻¹ = Σ_x⁻¹ # Σ_W`. One Cholesky and one `eigh` instead
  of the three `eigh` of the symmetric root `P^½`, which differs from `M` by a
  rotation only (alignment is rotation invariant; the Hadamard that follows
  spreads either). Both inputs are damped by `eps`; `K`'s eigenvalues are
  floored (`spd_eigh`).

  Args:
    sigma_x: `(..., d, d)` activation second moment `E[x xᵀ]`.
    gram_w: `(..., d, d)` weight Gram `Wᵀ W`.
    eps: relative damping of both inputs and eigenvalue floor; `sigma_x`
      is damped by at least `min_ridge · tr(sigma_x)` (and `d` ulps of its
      mean eigenvalue), so that its Cholesky factor exists.
    min_ridge: see `eps`; default `CHOLESKY_RIDGE` (1e-6) for float32
      `sigma_x`, scaled by the ulp of other dtypes.
    dtype: computation dtype (default `compute_dtype(sigma_x, gram_w)`).

  Returns:
    `(M, M⁻¹)` in that dtype.
  """
  check_pair(("sigma_x", "gram_w"), sigma_x, gram_w)
  lower = _activation_cholesky(sigma_x, eps, min_ridge,
                               dtype=compute_dtype(sigma_x, gram_w, dtype=dtype))
  gram = damp(symmetrize(jnp.asarray(gram_w, lower.dtype)), eps)
  w, v = spd_eigh(_mm(jnp.swapaxes(lower, -1, -2), gram, lower), eps=eps, dtype=lower.dtype)
  return _transform_pair(lower, _from_eigh(w, v, 0.25), _mm(lower, _from_eigh(w, v, -0.25)))


def _activation_cholesky(sigma_x, eps: float, min_ridge: float | None, *, dtype=None
                         ) -> jax.Array:
  """`L` with `L Lᵀ = Σ_x` ridged (see `alignment_transform`), in `dtype`
  (default `compute_dtype(sigma_x)`)."""
  dtype = compute_dtype(sigma_x, dtype=dtype)
  d = sigma_x.shape[-1]
  # Second moments are sums accumulated in their dtype: eigenvalues below a
  # few ulps of the trace are rounding noise and may be negative. The ridge
  # covers them (at least min_ridge · tr), so the Cholesky exists.
  if min_ridge is None:
    ulps = jnp.finfo(jnp.asarray(sigma_x).dtype).eps / jnp.finfo(jnp.float32).eps
    min_ridge = CHOLESKY_RIDGE * float(ulps)
  ridge = max(eps, d * max(min_ridge, float(jnp.finfo(dtype).eps)))
  return jnp.linalg.cholesky(damp(symmetrize(jnp.asarray(sigma_x, dtype)), ridge))


def _transform_pair(lower, k_quarter, m_inv) -> tuple[jax.Array, jax.Array]:
  """`(M, M⁻¹)` with `M = K^¼ L⁻¹`: `Mᵀ` solves `Lᵀ Mᵀ = K^¼` (`K^¼` is symmetric);
  `m_inv = L K^-¼` comes computed."""
  m_t = jax.scipy.linalg.solve_triangular(lower, k_quarter, lower=True, trans="T")
  return jnp.swapaxes(m_t, -1, -2), m_inv


def alignment_transform_low_rank(sigma_x: jax.Array, weight: jax.Array, *, eps: float = 1e-6,
                                 min_ridge: float | None = None, dtype=None
                                 ) -> tuple[jax.Array, jax.Array]:
  """`alignment_transform` for a weight Gram `Σ_W = W Wᵀ` of rank `r < d`.

  With `G = Lᵀ W` (`d × r`) and its thin eigen-decomposition `G Gᵀ = U S² Uᵀ`
  (from the `r × r` `Gᵀ G`), the damped and floored `K = G Gᵀ + μ I` has the
  eigenvalues `f(s² + μ)` on `U` and `f(μ)` on the rest, so
  `K^p = U (f(s² + μ)^p − f(μ)^p) Uᵀ + f(μ)^p I` -- one `r × r` `eigh` instead
  of a `d × d` one: the `cat_full` fit of `down_proj`, whose input is wider
  than its output. `μ` and the floor `f` are `spd_eigh`'s on `K`; unlike the
  dense path `Σ_W` gets no ridge of its own (a ridge `δ I` on it would add
  the full-rank `δ Lᵀ L` to `K`).

  Args:
    sigma_x: `(..., d, d)` activation second moment.
    weight: `(..., d, r)` with `W Wᵀ = Σ_W`, e.g. the site's kernels side by side.
    eps, min_ridge: as in `alignment_transform`.
    dtype: computation dtype (default `compute_dtype(sigma_x, weight)`).

  Returns:
    `(M, M⁻¹)` in that dtype.
  """
  _check_square("sigma_x", sigma_x)
  if weight.ndim != sigma_x.ndim or weight.shape[:-1] != sigma_x.shape[:-1]:
    raise ValueError(f"weight must be (..., d, r) beside sigma_x {sigma_x.shape}, got "
                     f"{weight.shape=}")
  lower = _activation_cholesky(sigma_x, eps, min_ridge,
                               dtype=compute_dtype(sigma_x, weight, dtype=dtype))
  d = lower.shape[-1]
  g = _mm(jnp.swapaxes(lower, -1, -2), jnp.asarray(weight, lower.dtype))  # (..., d, r)
  s2, v = jnp.linalg.eigh(symmetrize(_mm(jnp.swapaxes(g, -1, -2), g)))
  s2 = jnp.maximum(s2, 0.0)
  s = jnp.sqrt(s2)
  u = _mm(g, v) / jnp.where(s > 0, s, 1.0)[..., None, :]  # zero columns where s = 0
  # spd_eigh on K = G Gᵀ: ridge μ = eps · tr(K) / d, then the floor.
  mu = eps * jnp.sum(s2, axis=-1, keepdims=True) / d
  w = jnp.concatenate([s2 + mu, mu], axis=-1)
  mean = (jnp.sum(w[..., :-1], -1, keepdims=True) + (d - s2.shape[-1]) * mu) / d
  w = jnp.maximum(w, _eigen_floor(mean, jnp.max(w, axis=-1, keepdims=True), d, eps))
  u_t = jnp.swapaxes(u, -1, -2)

  def power(p):  # K^p = U diag(top) Uᵀ + rest · I
    rest = w[..., -1:] ** p
    return w[..., :-1] ** p - rest, rest[..., None]

  top, rest = power(0.25)
  k_quarter = symmetrize(_mm(u * top[..., None, :], u_t)) + rest * jnp.eye(d, dtype=lower.dtype)
  top, rest = power(-0.25)  # M⁻¹ = L K^-¼ = (L U) diag(top) Uᵀ + rest · L: thin products only
  return _transform_pair(lower, k_quarter, _mm(_mm(lower, u) * top[..., None, :], u_t) + rest * lower)


def ensure_finite(name: str, *arrays: jax.Array) -> None:
  """Raise `FloatingPointError` naming `name` if a concrete array is not finite.

  Traced arrays (inside `jit`) are skipped: check the result outside.
  """
  for a in arrays:
    if a is None or isinstance(a, jax.core.Tracer):
      continue
    if not bool(jnp.all(jnp.isfinite(a))):
      raise FloatingPointError(
          f"fit of {name} produced non-finite values; the second moments may be "
          "degenerate (all-zero activations or weights) or overflow float32 -- "
          "enable x64 or raise the damping eps")
