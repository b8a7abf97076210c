import jax
import jax.numpy as jnp
import numpy as np
import pytest

import catjax as cj
from catjax.core import hadamard
from catjax.core import stats
from catjax.core.quant import QuantConfig
from catjax.core.gptq import gptq_quantize
from catjax.core import linalg
from catjax.core.quant import activation_config, weight_config
from catjax.core.synthetic import _random_orthogonal, synthetic_layer
from operands import GW, SX, K, X, bad_k, bad_x


def test_streaming_second_moment_matches_batch(key):
  x = jax.random.normal(key, (3, 50, 16)) * jnp.arange(1, 17)
  acc = cj.SecondMoment.zeros(16)
  update = jax.jit(lambda s, b: s.update(b))
  for i in range(3):
    acc = update(acc, x[i])
  ref = cj.second_moment(x)
  np.testing.assert_allclose(acc.sigma, ref, rtol=1e-5, atol=1e-6 * float(jnp.max(ref)))
  assert int(acc.count) == 150
  np.testing.assert_allclose(acc.absmax, jnp.max(jnp.abs(x.reshape(-1, 16)), axis=0))
  halves = cj.SecondMoment.zeros(16).update(x[:2]).merge(cj.SecondMoment.zeros(16).update(x[2]))
  np.testing.assert_allclose(halves.sigma, acc.sigma, rtol=1e-5, atol=1e-6 * float(jnp.max(ref)))


def test_stacked_second_moments_give_stacked_sigmas(key):
  x = jax.random.normal(key, (3, 20, 8))
  per_layer = [cj.SecondMoment.zeros(8).update(x[i][: 10 + 5 * i]) for i in range(3)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
  assert stacked.sigma.shape == (3, 8, 8)
  for i in range(3):
    np.testing.assert_allclose(stacked.sigma[i], per_layer[i].sigma, rtol=1e-6)


def test_second_moment_mask_drops_tokens(key):
  x = jax.random.normal(key, (10, 8))
  mask = jnp.arange(10) < 6
  s = cj.SecondMoment.zeros(8).update(x.at[6:].set(1e6), mask)
  np.testing.assert_allclose(s.sigma, cj.second_moment(x[:6]), rtol=1e-5)
  assert int(s.count) == 6


def test_second_moment_errors():
  with pytest.raises(ValueError, match="last axis 8"):
    cj.SecondMoment.zeros(8).update(jnp.ones((4, 6)))
  with pytest.raises(ValueError, match="cannot merge"):
    cj.SecondMoment.zeros(8).merge(cj.SecondMoment.zeros(4))


def test_concentration_closed_forms():
  x = jnp.array([[1.0, -3.0], [2.0, 0.0]])
  # E||x||^2 = (10 + 4)/2 = 7 ; E[r^2] = (36 + 16)/2 = 26
  assert float(cj.concentration_x(x)) == pytest.approx(7 / 26)
  k = jnp.array([[1.0, 2.0], [-1.0, 0.5]])  # columns: r = 2, 4
  assert float(cj.concentration_w(k)) == pytest.approx((1 + 4 + 1 + 0.25) / (4 + 16))


def test_alignment_isotropic_and_bounds(key):
  d = 32
  w = jax.random.normal(key, (d, 48))
  assert float(cj.alignment_gain(jnp.eye(d), cj.weight_gram(w))) == pytest.approx(1.0, rel=1e-5)
  sx = cj.second_moment(jax.random.normal(jax.random.PRNGKey(3), (500, d)) * jnp.arange(1, d + 1))
  a, a_star = cj.alignment(sx, cj.weight_gram(w)), cj.optimal_alignment(sx, cj.weight_gram(w))
  assert float(a_star) >= float(a)
  assert d * float(a_star) >= 1.0


def test_predicted_matches_measured_on_outlier_free_data(key):
  x, w = synthetic_layer(key, n_outliers=0)
  for bits in (4, 6, 8):
    r = cj.sqnr_decomposition(x, w, w_bits=bits, a_bits=bits)
    assert abs(r.predicted_sqnr_db - r.measured_sqnr_db) < 0.3, (bits, r)


def test_about_six_db_per_bit(key):
  x, w = synthetic_layer(key, n_outliers=0)
  m = [cj.sqnr_decomposition(x, w, w_bits=b, a_bits=b).measured_sqnr_db for b in (4, 5, 6, 7)]
  steps = np.diff(m)
  # each bit doubles N(b) = 2^b - 2 (a bit more than 2x at low b): ~6.02 dB
  expected = [20 * np.log10((2 ** (b + 1) - 2) / (2**b - 2)) for b in (4, 5, 6)]
  np.testing.assert_allclose(steps, expected, atol=0.3)
  assert np.all((steps > 5.7) & (steps < 7.0)), steps


def test_alignment_is_invariant_under_rotations(key):
  x, w = synthetic_layer(key)
  base = cj.sqnr_decomposition(x, w).alignment_gain_db
  r = _random_orthogonal(jax.random.PRNGKey(7), x.shape[1])
  rotated = cj.sqnr_decomposition(x @ r.T, r @ w).alignment_gain_db  # x' = x Rᵀ, W' = W Rᵀ
  signs = hadamard.random_signs(jax.random.PRNGKey(8), x.shape[1])
  had = cj.sqnr_decomposition(cj.apply_hadamard(x, signs),
                              cj.apply_hadamard(w, signs, axis=0)).alignment_gain_db
  assert rotated == pytest.approx(base, abs=1e-3)
  assert had == pytest.approx(base, abs=1e-3)


def test_outliers_lower_activation_concentration(key):
  x0, w = synthetic_layer(key, n_outliers=0)
  x1, _ = synthetic_layer(key, n_outliers=4)
  assert cj.sqnr_decomposition(x1, w).concentration_x_db < cj.sqnr_decomposition(x0, w).concentration_x_db - 6


def test_measured_sqnr_zero_error_at_high_precision_limit(key):
  x, w = synthetic_layer(key, n_outliers=0)
  lo = cj.measured_sqnr(x, w, a_config=cj.activation_config(4), w_config=cj.weight_config(4))
  hi = cj.measured_sqnr(x, w, a_config=cj.activation_config(8), w_config=cj.weight_config(8))
  assert float(hi) > 100 * float(lo)


def test_grouped_concentration_is_higher(key):
  x, w = synthetic_layer(key)
  c = cj.concentration_x(x, QuantConfig(bits=4))
  cg = cj.concentration_x(x, QuantConfig(bits=4, group_size=32))
  assert float(cg) > float(c)


def test_decomposition_errors(key):
  with pytest.raises(ValueError, match="kernel"):
    cj.sqnr_decomposition(jnp.ones((4, 8)), jnp.ones((6, 3)))
  with pytest.raises(ValueError, match="bits"):
    cj.sqnr_decomposition(jnp.ones((4, 8)), jnp.ones((8, 3)), a_bits=12)


def test_layer_terms_vmap_over_layers(key):
  xs = jax.random.normal(key, (3, 64, 16))
  ws = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 8))
  f = lambda x, w: stats.layer_sqnr_terms(x, w, a_config=cj.activation_config(4),
                                          w_config=cj.weight_config(4))
  out = jax.vmap(f)(xs, ws)
  one = f(xs[1], ws[1])
  np.testing.assert_allclose(out["measured_sqnr_db"][1], one["measured_sqnr_db"], rtol=1e-5)


# --- eager entry points: ValueError naming the argument -----------------------------------

STATS_CASES = [
    ("sqnr_decomposition zero x", lambda: cj.sqnr_decomposition(jnp.zeros((4, 16)), K), "x is all zero"),
    ("sqnr_decomposition nan x", lambda: cj.sqnr_decomposition(bad_x(), K), "x has 1 non-finite"),
    ("sqnr_decomposition inf kernel", lambda: cj.sqnr_decomposition(X, bad_k(np.inf)),
     "kernel has 1 non-finite"),
    ("sqnr_decomposition zero kernel", lambda: cj.sqnr_decomposition(X, jnp.zeros((16, 8))),
     "kernel is all zero"),
    ("sqnr_decomposition empty x", lambda: cj.sqnr_decomposition(jnp.zeros((0, 16)), K), "x is empty"),
    ("sqnr_decomposition bool bits", lambda: cj.sqnr_decomposition(X, K, a_bits=True), "a_bits=True"),
    ("sqnr_decomposition w_bits", lambda: cj.sqnr_decomposition(X, K, w_bits=9), "w_bits=9"),
    ("measured_sqnr zero x", lambda: cj.measured_sqnr(jnp.zeros((4, 16)), K, a_config=activation_config(4),
                                                      w_config=weight_config(4)), "x is all zero"),
    ("measured_sqnr nan kernel", lambda: cj.measured_sqnr(X, bad_k(), a_config=activation_config(4),
                                                          w_config=weight_config(4)), "kernel has 1"),
    ("measured_sqnr shapes", lambda: cj.measured_sqnr(X, K[:8], a_config=activation_config(4),
                                                      w_config=weight_config(4)), "need x"),
    ("concentration_x zero", lambda: cj.concentration_x(jnp.zeros((4, 16))), "x is all zero"),
    ("concentration_x nan", lambda: cj.concentration_x(bad_x()), "x has 1 non-finite"),
    ("concentration_w zero", lambda: cj.concentration_w(jnp.zeros((16, 8))), "kernel is all zero"),
    ("concentration_w inf", lambda: cj.concentration_w(bad_k(-np.inf)), "kernel has 1 non-finite"),
    ("alignment zero sigma", lambda: cj.alignment(jnp.zeros((16, 16)), GW), "sigma_x is all zero"),
    ("alignment nan gram", lambda: cj.alignment(SX, GW.at[0, 1].set(jnp.nan)), "gram_w has 1 non-finite"),
    ("alignment negated sigma", lambda: cj.alignment(-SX, GW), "sigma_x has 16 negative diagonal"),
    ("alignment shapes", lambda: cj.alignment(SX, GW[:8, :8]), "equal shapes"),
    ("alignment_gain zero gram", lambda: cj.alignment_gain(SX, jnp.zeros((16, 16))), "gram_w is all zero"),
    ("optimal_alignment nan", lambda: cj.optimal_alignment(SX.at[2, 2].set(jnp.nan), GW), "sigma_x has 1"),
    ("predicted_sqnr nan c_x", lambda: cj.predicted_sqnr(float("nan"), 1.0, 0.1, a_config=activation_config(4),
                                                         w_config=weight_config(4)), "c_x=nan"),
    ("predicted_sqnr zero c_w", lambda: cj.predicted_sqnr(1.0, 0.0, 0.1, a_config=None,
                                                          w_config=weight_config(4)), "c_w=0.0"),
    ("predicted_sqnr negative align", lambda: cj.predicted_sqnr(1.0, 1.0, -0.1, a_config=activation_config(4),
                                                                w_config=None), "align=-0.1"),
    ("sqnr_factors zero x", lambda: stats.sqnr_factors(jnp.zeros((4, 16)), K, a_config=activation_config(4),
                                                       w_config=weight_config(4)), "x is all zero"),
    ("operand_alignment nan", lambda: stats.operand_alignment(bad_x(), K), "x has 1 non-finite"),
]


@pytest.mark.parametrize("name,call,words", STATS_CASES, ids=[c[0] for c in STATS_CASES])
def test_entry_points_reject_bad_operands(name, call, words):
  with pytest.raises(ValueError, match=words):
    call()


def test_float64_needs_x64():
  with pytest.raises(ValueError, match="needs x64"):
    cj.SecondMoment.zeros(8, dtype=jnp.float64)


# Dtypes come from arguments, never from the x64 flag.
def test_dtypes_are_explicit_under_x64(x64):
  x32 = jnp.asarray(np.random.default_rng(1).standard_normal((64, 16)), jnp.float32)
  assert cj.SecondMoment.zeros(8).xx.dtype == jnp.float32
  assert cj.SecondMoment.zeros(8, dtype=jnp.float64).xx.dtype == jnp.float64
  assert cj.second_moment(x32).dtype == jnp.float32
  assert cj.second_moment(x32, dtype=jnp.float64).dtype == jnp.float64
  assert cj.weight_gram(x32, dtype=jnp.float64).dtype == jnp.float64
  s32 = cj.second_moment(x32)
  assert linalg.spd_eigh(s32)[0].dtype == jnp.float32
  assert linalg.spd_eigh(s32, dtype=jnp.float64)[0].dtype == jnp.float64
  assert cj.geometric_mean(s32, s32).dtype == jnp.float32
  k32 = x32[:16, :8]
  assert gptq_quantize(k32, s32, dtype=jnp.float64).dtype == jnp.float32  # the kernel's dtype

