import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import catjax as cj
from catjax.core import linalg
from operands import SX


def _spd(seed, d, cond=1e3):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  return (q * np.logspace(0, -np.log10(cond), d)) @ q.T


def test_geometric_mean_matches_scipy_float64(x64):
  a, b = _spd(0, 24), _spd(1, 24, cond=1e5)
  ah = np.real(scipy.linalg.sqrtm(a))
  ahi = np.linalg.inv(ah)
  ref = ah @ np.real(scipy.linalg.sqrtm(ahi @ b @ ahi)) @ ah
  g = np.asarray(cj.geometric_mean(jnp.asarray(a), jnp.asarray(b), eps=0.0))
  assert g.dtype == np.float64
  np.testing.assert_allclose(g, ref, rtol=1e-8, atol=1e-10)


def test_geometric_mean_float32_close_to_scipy():
  a, b = _spd(2, 16, cond=1e2), _spd(3, 16, cond=1e2)
  ah = np.real(scipy.linalg.sqrtm(a))
  ahi = np.linalg.inv(ah)
  ref = ah @ np.real(scipy.linalg.sqrtm(ahi @ b @ ahi)) @ ah
  g = cj.geometric_mean(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), eps=0.0)
  assert g.dtype == jnp.float32
  np.testing.assert_allclose(g, ref, rtol=2e-3, atol=2e-5)


def test_riccati_symmetry_and_idempotence(x64):
  a, b = jnp.asarray(_spd(4, 20, 1e4)), jnp.asarray(_spd(5, 20, 1e4))
  g = cj.geometric_mean(a, b, eps=0.0)
  np.testing.assert_allclose(g @ jnp.linalg.inv(a) @ g, b, rtol=1e-7, atol=1e-9)  # G a⁻¹ G = b
  np.testing.assert_allclose(g, g.T, atol=1e-12)
  np.testing.assert_allclose(cj.geometric_mean(a, a, eps=0.0), a, rtol=1e-8, atol=1e-10)
  # symmetric in its arguments: a # b = b # a
  np.testing.assert_allclose(cj.geometric_mean(b, a, eps=0.0), g, rtol=1e-7, atol=1e-10)


def test_sqrt_and_inverse_sqrt(x64):
  a = jnp.asarray(_spd(6, 12, 1e6))
  s, si = cj.spd_sqrt(a, eps=0.0), cj.spd_inv_sqrt(a, eps=0.0)
  np.testing.assert_allclose(s @ s, a, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(s @ si, np.eye(12), atol=1e-8)


def test_damping_and_floor_make_singular_input_invertible():
  a = jnp.zeros((6, 6)).at[0, 0].set(1.0)  # rank 1
  w, _ = linalg.spd_eigh(a, eps=1e-3)
  assert float(w.min()) > 0
  assert bool(jnp.all(jnp.isfinite(cj.spd_inv_sqrt(a, eps=1e-3))))


def test_batched_and_jitted():
  a = jnp.stack([jnp.asarray(_spd(i, 8), jnp.float32) for i in range(3)])
  b = jnp.stack([jnp.asarray(_spd(10 + i, 8), jnp.float32) for i in range(3)])
  g = jax.jit(cj.geometric_mean)(a, b)
  np.testing.assert_allclose(g[1], cj.geometric_mean(a[1], b[1]), rtol=1e-4, atol=1e-6)


def test_alignment_transform_solves_riccati(x64):
  sx, sw = jnp.asarray(_spd(7, 16, 1e5)), jnp.asarray(_spd(8, 16, 1e3))
  m, m_inv = linalg.alignment_transform(sx, sw, eps=0.0, min_ridge=0.0)
  np.testing.assert_allclose(m @ m_inv, np.eye(16), atol=1e-8)
  p = m.T @ m  # P = Σ_x⁻¹ # Σ_W solves P Σ_x P = Σ_W
  np.testing.assert_allclose(p @ sx @ p, sw, rtol=1e-7, atol=1e-9)
  np.testing.assert_allclose(p, cj.geometric_mean(jnp.linalg.inv(sx), sw, eps=0.0), rtol=1e-6)
  # Transformed activation moment and weight Gram are one matrix.
  np.testing.assert_allclose(m @ sx @ m.T, m_inv.T @ sw @ m_inv, rtol=1e-7, atol=1e-9)


def test_alignment_transform_rank_deficient_sigma(x64):
  # A rank-1 float32 activation moment whose accumulation left a slightly
  # negative eigenvalue (as a dead attention head does): the ridge, 8 float32
  # ulps of the trace, absorbs it.
  v = np.random.default_rng(0).normal(size=(16, 1))
  sx = jnp.asarray(v @ v.T - 1e-5 * np.trace(v @ v.T) / 16 * np.eye(16), jnp.float32)
  sw = jnp.asarray(_spd(3, 16))
  assert not np.isfinite(linalg.alignment_transform(sx, sw, min_ridge=0.0)[0]).all()
  m, m_inv = linalg.alignment_transform(sx, sw)
  assert np.isfinite(m).all() and np.isfinite(m_inv).all()
  np.testing.assert_allclose(m @ m_inv, np.eye(16), atol=1e-6)


def test_alignment_transform_batched_float32():
  sx = jnp.stack([jnp.asarray(_spd(i, 8, 1e4), jnp.float32) for i in range(3)])
  sw = jnp.stack([jnp.asarray(_spd(10 + i, 8), jnp.float32) for i in range(3)])
  m, m_inv = jax.jit(linalg.alignment_transform)(sx, sw)
  m1, _ = linalg.alignment_transform(sx[1], sw[1])
  np.testing.assert_allclose(m[1], m1, rtol=1e-2, atol=1e-4)  # float32 noise, cond 1e4
  np.testing.assert_allclose(m @ m_inv, np.broadcast_to(np.eye(8), (3, 8, 8)), atol=1e-3)


def test_errors():
  with pytest.raises(ValueError, match="square"):
    cj.geometric_mean(jnp.ones((3, 4)), jnp.ones((3, 4)))
  with pytest.raises(ValueError, match="equal shapes"):
    cj.geometric_mean(jnp.eye(3), jnp.eye(4))
  with pytest.raises(FloatingPointError, match="layer 7"):
    linalg.ensure_finite("layer 7", jnp.array([1.0, jnp.nan]))
  with pytest.raises(ValueError, match="float32 or float64"):
    linalg.spd_eigh(SX, dtype=jnp.int32)


@pytest.mark.parametrize("r", [1, 5, 12])
def test_low_rank_alignment_transform_equals_the_dense_eigh(x64, r):
  # Σ_W = W Wᵀ of rank r < d: the thin path equals one dense eigh of
  # K = Lᵀ Σ_W L with spd_eigh's ridge and floor (and no ridge on Σ_W itself).
  d = 16
  sx = jnp.stack([jnp.asarray(_spd(7, d, 1e5)), jnp.asarray(_spd(9, d, 1e2))])
  w = jnp.asarray(np.random.default_rng(r).normal(size=(2, d, r)))
  eps = 1e-4
  lower = linalg._activation_cholesky(sx, eps, None)
  k = jnp.swapaxes(lower, -1, -2) @ (w @ jnp.swapaxes(w, -1, -2)) @ lower
  ev, vec = linalg.spd_eigh(k, eps=eps)
  want = linalg._transform_pair(lower, linalg._from_eigh(ev, vec, 0.25),
                                lower @ linalg._from_eigh(ev, vec, -0.25))
  got = linalg.alignment_transform_low_rank(sx, w, eps=eps)
  for g, x in zip(got, want):
    np.testing.assert_allclose(g, x, rtol=1e-7, atol=1e-9 * float(jnp.abs(x).max()))
  np.testing.assert_allclose(got[0] @ got[1], np.broadcast_to(np.eye(d), (2, d, d)), atol=1e-9)
  with pytest.raises(ValueError, match="weight must be"):
    linalg.alignment_transform_low_rank(sx, w[0], eps=eps)
