"""Small operands shared by the math floors' bad-input tests, and the NaN checks:
a NaN (or ±Inf) in one token or channel makes that whole token / channel NaN and
leaves the rest finite."""

import jax.numpy as jnp
import numpy as np
import pytest

from catjax.core import stats

_RNG = np.random.default_rng(0)
X = jnp.asarray(_RNG.standard_normal((4, 16)), jnp.float32)  # (tokens, d_in)
K = jnp.asarray(_RNG.standard_normal((16, 8)), jnp.float32)  # (d_in, d_out)
SX = jnp.asarray(stats.second_moment(_RNG.standard_normal((256, 16))))
GW = jnp.asarray(stats.weight_gram(K))


def bad_x(v=np.nan):
  """`X` with one bad entry in token 1."""
  return X.at[1, 5].set(v)


def bad_k(v=np.nan):
  """`K` with one bad entry in output channel 2."""
  return K.at[5, 2].set(v)


def assert_nan_token(out, row=1):
  out = np.asarray(out)
  assert np.isnan(out[row]).all(), out[row]
  assert np.isfinite(np.delete(out, row, axis=0)).all()


def assert_nan_channel(out, col=2):
  out = np.asarray(out)
  assert np.isnan(out[:, col]).all(), out[:, col]
  assert np.isfinite(np.delete(out, col, axis=1)).all()


def nan_cases(rows=None, cols=None, inf_cols=()):
  """Parametrize a test `(f, bad, token)` over token cases (`rows`: f(x) with token 1 bad)
  and channel cases (`cols`: f(kernel) with channel 2 bad; the names in `inf_cols` also
  with ±Inf)."""
  cases = [pytest.param(f, np.nan, True, id=n) for n, f in (rows or {}).items()]
  for n, f in (cols or {}).items():
    cases += [pytest.param(f, v, False, id=f"{n}-{v}")
              for v in (np.nan, *((np.inf, -np.inf) if n in inf_cols else ()))]
  return pytest.mark.parametrize("f, bad, token", cases)


def check_nan_case(f, bad, token):
  if token:
    assert_nan_token(f(bad_x(bad)))
  else:
    assert_nan_channel(f(bad_k(bad)))

