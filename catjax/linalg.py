"""Symmetric positive definite (SPD) matrix functions for fitting transforms.

Everything here is pure and jittable, works on batches of matrices (leading
axes), and computes in `fit_dtype()`: float64 when x64 is enabled, otherwise
float32 with matmuls at HIGHEST precision. Second moments of LLM activations
are extremely ill-conditioned (docs/design.md §1.3), so every function damps its
inputs by `eps · tr(S)/d · I` and floors eigenvalues at `eps` times their mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
# Smallest ridge of an activation second moment before its Cholesky, relative
# to its trace, for float32 statistics (~8 ulps: their rounding noise); other
# dtypes scale it by their ulp.
CHOLESKY_RIDGE = 1e-6


def fit_dtype():
  """float64 when `jax_enable_x64` is on, else float32."""
  return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def _check_square(name: str, a: jax.Array) -> None:
  if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
    raise ValueError(f"{name} must be a (batch of) square matrices, got {name}.shape={a.shape}")


def _check_pair(names: tuple[str, str], a: jax.Array, b: jax.Array) -> None:
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


def spd_eigh(a: jax.Array, *, eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
  """Eigen-decomposition of a damped SPD matrix with floored eigenvalues.

  Args:
    a: `(..., d, d)` symmetric positive semi-definite matrix.
    eps: relative damping and eigenvalue floor.

  Returns:
    `(w, v)` with `a ≈ v diag(w) vᵀ` and `w >= max(eps · mean(w),
    d · ulp · max(w)) > 0`.
  """
  _check_square("a", a)
  a = damp(symmetrize(jnp.asarray(a, fit_dtype())), eps)
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


def spd_power(a: jax.Array, power: float, *, eps: float = 1e-6) -> jax.Array:
  """`a^power` of a (damped) SPD matrix via `eigh`."""
  w, v = spd_eigh(a, eps=eps)
  return _from_eigh(w, v, power)


def spd_sqrt(a: jax.Array, *, eps: float = 1e-6) -> jax.Array:
  """SPD square root `a^½`."""
  return spd_power(a, 0.5, eps=eps)


def spd_inv_sqrt(a: jax.Array, *, eps: float = 1e-6) -> jax.Array:
  """SPD inverse square root `a^-½`."""
  return spd_power(a, -0.5, eps=eps)


def _mm(*mats: jax.Array) -> jax.Array:
  out = mats[0]
  for m in mats[1:]:
    out = jnp.matmul(out, m, precision=HIGHEST)
  return out


def geometric_mean(a: jax.Array, b: jax.Array, *, eps: float = 1e-6) -> jax.Array:
  """Matrix geometric mean `a # b` of two SPD matrices.

  `a # b = a^½ (a^-½ b a^-½)^½ a^½`, the unique SPD `G` with `G a⁻¹ G = b`
  (arXiv 2603.04359, optimal alignment). Both inputs are damped by `eps`.

  Args:
    a, b: `(..., d, d)` SPD matrices of the same shape.
    eps: relative damping and eigenvalue floor.

  Returns:
    `G`, symmetric, in `fit_dtype()`.

  Raises:
    ValueError: for non-square or mismatched shapes.
  """
  _check_pair(("a", "b"), a, b)
  wa, va = spd_eigh(a, eps=eps)
  outer, inner_side = _from_eigh(wa, va, 0.5), _from_eigh(wa, va, -0.5)
  b = damp(symmetrize(jnp.asarray(b, fit_dtype())), eps)
  inner = spd_sqrt(_mm(inner_side, b, inner_side), eps=0.0)
  return symmetrize(_mm(outer, inner, outer))


def alignment_transform(sigma_x: jax.Array, gram_w: jax.Array, *, eps: float = 1e-6,
                        min_ridge: float | None = None) -> tuple[jax.Array, jax.Array]:
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

  Returns:
    `(M, M⁻¹)` in `fit_dtype()`.
  """
  _check_pair(("sigma_x", "gram_w"), sigma_x, gram_w)
  lower = _activation_cholesky(sigma_x, eps, min_ridge)
  gram = damp(symmetrize(jnp.asarray(gram_w, lower.dtype)), eps)
  w, v = spd_eigh(_mm(jnp.swapaxes(lower, -1, -2), gram, lower), eps=eps)
  return _transform_pair(lower, _from_eigh(w, v, 0.25), _mm(lower, _from_eigh(w, v, -0.25)))


def _activation_cholesky(sigma_x, eps: float, min_ridge: float | None) -> jax.Array:
  """`L` with `L Lᵀ = Σ_x` ridged (see `alignment_transform`), in `fit_dtype()`."""
  dtype = fit_dtype()
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
                                 min_ridge: float | None = None
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

  Returns:
    `(M, M⁻¹)` in `fit_dtype()`.
  """
  _check_square("sigma_x", sigma_x)
  if weight.ndim != sigma_x.ndim or weight.shape[:-1] != sigma_x.shape[:-1]:
    raise ValueError(f"weight must be (..., d, r) beside sigma_x {sigma_x.shape}, got "
                     f"{weight.shape=}")
  lower = _activation_cholesky(sigma_x, eps, min_ridge)
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
