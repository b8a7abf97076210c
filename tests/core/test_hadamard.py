import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import catjax as cj
from catjax.core import hadamard as hd

ISSUE_BASES = [12, 20, 28, 36, 44, 60, 68, 76, 84, 108, 140, 148, 172]
MODEL_WIDTHS = [576, 1536, 4096, 8960, 11008, 13824, 14336, 18944]


@pytest.mark.parametrize("m", sorted(hd.base_orders()))
def test_every_base_matrix_is_hadamard(m):
  h = hd._factor_matrix(m)
  assert set(np.unique(h)) == {-1, 1}
  np.testing.assert_array_equal(h @ h.T, m * np.eye(m, dtype=np.int64))


def test_required_orders_and_model_widths_are_supported():
  assert set(ISSUE_BASES) <= set(hd.base_orders())
  assert hd.base_orders()[172].startswith("williamson")
  for n in MODEL_WIDTHS + [2**k for k in range(15)]:
    assert hd.is_supported(n), n
    assert math.prod(hd.hadamard_factors(n)) == n


def test_dense_h_ht_is_n_identity_for_every_supported_size_up_to_2048():
  sizes = hd.supported_sizes(2048)
  assert len(sizes) > 100
  for n in sizes:
    h = hd.hadamard_matrix(n, normalized=False).astype(np.float64)  # exact in float64
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n), err_msg=str(n))


def test_every_supported_size_up_to_16384_is_orthonormal():
  """Sizes above 2048: H_n = ⊗ H_f with exact Hadamard factors (so H Hᵀ = n I),
  and the fast apply is orthonormal on random vectors for the largest size of
  every base order (one compile each; the smaller ones share the code path)."""
  sizes = [n for n in hd.supported_sizes(16384) if n > 2048]
  largest_per_base = {}
  for n in sizes:
    factors = hd.hadamard_factors(n)
    assert math.prod(factors) == n
    for f in factors:
      h = hd._factor_matrix(f)
      np.testing.assert_array_equal(h @ h.T, f * np.eye(f, dtype=np.int64))
    largest_per_base[factors[0] if n % factors[0] == 0 and not hd._is_pow2(factors[0]) else 1] = n
  rng = np.random.default_rng(0)
  apply = jax.jit(cj.apply_hadamard)
  for n in largest_per_base.values():
    x = jnp.asarray(rng.normal(size=(3, n)), jnp.float32)
    y = apply(x)
    # Gram of three random vectors preserved <=> H orthonormal on their span.
    np.testing.assert_allclose(y @ y.T, x @ x.T, rtol=1e-4, atol=1e-2 * math.sqrt(n), err_msg=str(n))
    assert float(jnp.max(jnp.abs(y - x))) > 0.1  # it is not the identity


@pytest.mark.parametrize("n", [1, 2, 4, 12, 24, 48, 96, 172, 344, 576, 1536])
def test_fast_apply_equals_dense_product(n):
  x = jax.random.normal(jax.random.PRNGKey(n), (5, n))
  h = jnp.asarray(hd.hadamard_matrix(n), jnp.float32)
  np.testing.assert_allclose(cj.apply_hadamard(x), x @ h.T, atol=2e-5)


@pytest.mark.parametrize("n", MODEL_WIDTHS)
def test_fast_apply_columns_equal_kronecker_columns_for_model_widths(n):
  factors = hd.hadamard_factors(n)
  idx = np.array([0, 1, n // 3, n - 1])
  cols = cj.apply_hadamard(jax.nn.one_hot(idx, n, dtype=jnp.float32))  # rows are H e_i = H[:, i]
  for row, i in zip(np.asarray(cols), idx):
    ref, rest = np.ones(1), int(i)
    for j, f in enumerate(factors):
      inner = math.prod(factors[j + 1:])
      ref = np.kron(ref, hd._factor_matrix(f)[:, rest // inner])
      rest %= inner
    np.testing.assert_allclose(row, ref / math.sqrt(n), atol=1e-6)


def test_randomized_axis_and_dtype():
  n = 48
  x = jax.random.normal(jax.random.PRNGKey(1), (n, 7))
  s = hd.random_signs(jax.random.PRNGKey(2), n)
  assert set(np.unique(np.asarray(s))) == {-1.0, 1.0}
  h = jnp.asarray(hd.hadamard_matrix(n), jnp.float32)
  np.testing.assert_allclose(cj.apply_hadamard(x, s, axis=0), h @ (s[:, None] * x), atol=2e-5)
  y = jax.jit(cj.apply_hadamard)(x.T.astype(jnp.bfloat16), s)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(y.astype(jnp.float32), (h @ (s[:, None] * x)).T, atol=5e-2)


@pytest.mark.parametrize("n,near", [(6, "4 and 8"), (100, "96 and 104"), (804, "800 and 816")])
def test_unsupported_sizes_name_the_nearest(n, near):
  with pytest.raises(ValueError, match=f"n={n}.*nearest supported sizes: {near}"):
    cj.apply_hadamard(jnp.ones((2, n)))


def test_bad_signs_shape():
  with pytest.raises(ValueError, match="signs"):
    cj.apply_hadamard(jnp.ones((2, 8)), jnp.ones(4))
