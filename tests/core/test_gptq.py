import jax
import jax.numpy as jnp
import numpy as np
import pytest

from catjax.core import quant
from catjax.core.gptq import gptq_error, gptq_quantize
from operands import SX, K, check_nan_case, nan_cases


def _hessian(rng, d, n=None, outliers=True):
  """`X Xᵀ / n` of correlated inputs with a few outlier channels."""
  n = n or 4 * d
  mix = np.eye(d) + 0.3 * rng.standard_normal((d, d)) / np.sqrt(d)
  x = mix @ rng.standard_normal((d, n))
  if outliers:
    x[rng.choice(d, max(1, d // 16), replace=False)] *= 8.0
  return (x @ x.T / n).astype(np.float32)


def _scales(kernel, bits, group_size=None, clip_ratio=1.0):
  """Per-element RTN scales `(d_in, d_out)`, straight from `catjax.core.quant`."""
  cfg = quant.weight_config(bits, group_size=group_size, clip_ratio=clip_ratio)
  s = np.asarray(quant.quantize(jnp.asarray(kernel), cfg).scale, np.float64)
  return np.broadcast_to(s, kernel.shape) if group_size is None else np.repeat(s[:, 0], group_size, 0)


def _reference_gptq(kernel, hessian, *, bits, damping=0.01, act_order=False, group_size=None):
  """Plain float64 GPTQ/OBQ: one input channel at a time with explicit `H⁻¹` updates."""
  w = np.asarray(kernel, np.float64).copy()
  h = np.asarray(hessian, np.float64).copy()
  s = _scales(kernel, bits, group_size)
  qmax = 2 ** (bits - 1) - 1
  d = w.shape[0]
  dead = np.diag(h) == 0
  h[dead, :] = 0
  h[:, dead] = 0
  h[dead, dead] = 1
  w[dead] = 0
  order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(d)
  h = h + damping * np.mean(np.diag(h)) * np.eye(d)
  hinv = np.linalg.inv(h)
  q = np.zeros_like(w)
  remaining = list(order)
  for i in order:
    remaining.remove(i)
    q[i] = np.clip(np.round(w[i] / s[i]), -qmax, qmax) * s[i]
    err = (w[i] - q[i]) / hinv[i, i]
    # OBS update: w_F -= (H_F⁻¹)_{:,i} err, then drop i from the inverse.
    w[remaining] -= np.outer(hinv[remaining, i], err)
    hinv = hinv - np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
  return q, s


def _rtn(kernel, bits, group_size=None, clip_ratio=1.0):
  cfg = quant.weight_config(bits, group_size=group_size, clip_ratio=clip_ratio)
  return quant.fake_quantize(jnp.asarray(kernel), cfg)


@pytest.mark.parametrize("d_in,d_out,block,act_order,group,bits", [
    (16, 8, 5, False, None, 4),
    (48, 16, 20, True, None, 4),
    (64, 24, 24, False, 16, 3),
    (96, 12, 40, True, 32, 4),
    (96, 24, 128, True, None, 3),
])
def test_matches_float64_reference(d_in, d_out, block, act_order, group, bits):
  rng = np.random.default_rng(d_in * 100 + d_out)
  kernel = rng.standard_normal((d_in, d_out)).astype(np.float32)
  h = _hessian(rng, d_in)
  ref, s = _reference_gptq(kernel, h, bits=bits, act_order=act_order, group_size=group)
  out = np.asarray(gptq_quantize(kernel, h, bits=bits, lazy_batch=block, act_order=act_order,
                                 group_size=group), np.float64)
  steps = np.abs(out - ref) / s
  assert np.mean(steps < 1e-3) >= 0.99, np.mean(steps < 1e-3)
  assert np.max(steps) <= 1.0 + 1e-3


def test_matches_reference_exactly_in_float64(x64):
  rng = np.random.default_rng(7)
  kernel = rng.standard_normal((72, 16)).astype(np.float32)
  h = _hessian(rng, 72)
  ref, _ = _reference_gptq(kernel, h, bits=4, act_order=True, group_size=24)
  out = gptq_quantize(kernel, h, bits=4, lazy_batch=32, act_order=True, group_size=24)
  np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [3, 4])
def test_beats_rtn_on_correlated_hessians(bits):
  total_gptq = total_rtn = 0.0
  for seed in range(4):
    rng = np.random.default_rng(seed)
    kernel = rng.standard_normal((64, 32)).astype(np.float32)
    h = _hessian(rng, 64)
    e_gptq = float(gptq_error(kernel, gptq_quantize(kernel, h, bits=bits, lazy_batch=16), h))
    e_rtn = float(gptq_error(kernel, _rtn(kernel, bits), h))
    assert e_gptq <= e_rtn
    total_gptq, total_rtn = total_gptq + e_gptq, total_rtn + e_rtn
  assert total_gptq < 0.8 * total_rtn


@pytest.mark.parametrize("group,act_order", [(None, False), (8, True)])
def test_diagonal_hessian_equals_rtn(group, act_order):
  rng = np.random.default_rng(3)
  kernel = rng.standard_normal((40, 12)).astype(np.float32) * np.linspace(0.1, 2, 12)
  h = np.diag(rng.uniform(0.1, 5.0, 40)).astype(np.float32)
  out = gptq_quantize(kernel, h, bits=4, lazy_batch=16, act_order=act_order, group_size=group,
                      clip_ratio=0.9)
  np.testing.assert_array_equal(out, _rtn(kernel, 4, group, clip_ratio=0.9))


def test_given_scales_set_the_grid():
  rng = np.random.default_rng(4)
  kernel = rng.standard_normal((40, 12)).astype(np.float32)
  scale = np.abs(kernel).max(0) * rng.uniform(0.5, 1.0, 12) / 7
  # Diagonal hessian: no error to spread, so GPTQ is RTN on the given grid.
  h = np.diag(rng.uniform(0.1, 5.0, 40)).astype(np.float32)
  out = np.asarray(gptq_quantize(kernel, h, bits=4, scale=scale))
  np.testing.assert_allclose(out, np.clip(np.round(kernel / scale), -7, 7) * scale, rtol=1e-6)
  h = _hessian(rng, 40)
  levels = np.asarray(gptq_quantize(kernel, h, bits=4, scale=scale)) / scale
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("group", [None, 16])
def test_shape_dtype_and_grid(dtype, group):
  rng = np.random.default_rng(5)
  kernel = jnp.asarray(rng.standard_normal((48, 20)), dtype)
  h = _hessian(rng, 48)
  out = gptq_quantize(kernel, h, bits=3, lazy_batch=32, act_order=True, group_size=group)
  assert out.shape == kernel.shape and out.dtype == kernel.dtype
  levels = np.asarray(out, np.float64) / _scales(np.asarray(kernel, np.float32), 3, group)
  tol = 1e-4 if dtype == jnp.float32 else 2e-2  # bfloat16 rounds q·scale
  np.testing.assert_allclose(levels, np.round(levels), atol=tol)
  assert np.max(np.abs(np.round(levels))) <= 3


def test_rank_deficient_hessian_with_dead_inputs():
  rng = np.random.default_rng(11)
  d = 32
  x = rng.standard_normal((d, 8))  # rank 8 < d
  x[[3, 17, 30]] = 0.0             # dead input channels
  h = (x @ x.T / 8).astype(np.float32)
  kernel = rng.standard_normal((d, 10)).astype(np.float32)
  out = np.asarray(gptq_quantize(kernel, h, bits=4, lazy_batch=12, act_order=True))
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out[[3, 17, 30]], 0.0)
  assert float(gptq_error(kernel, out, h)) <= float(gptq_error(kernel, _rtn(kernel, 4), h))


def test_bad_inputs_raise():
  k = np.ones((16, 4), np.float32)
  h = np.eye(16, dtype=np.float32)
  bad = [
      (np.ones(16, np.float32), h, {}),
      (k, np.eye(8, dtype=np.float32), {}),
      (k, h, {"bits": 1}),
      (k, h, {"bits": 9}),
      (k, h, {"bits": 4.0}),
      (k, h, {"damping": -0.1}),
      (k, h, {"damping": float("nan")}),
      (k, h, {"lazy_batch": 0}),
      (k, h, {"group_size": 5}),
      (k, h, {"group_size": 0}),
      (k, h, {"clip_ratio": 0.0}),
      (k, h, {"clip_ratio": 1.5}),
      (k, h, {"scale": np.ones(3, np.float32)}),
      (k, h, {"scale": np.zeros(4, np.float32)}),
      (k, h, {"scale": np.ones(4, np.float32), "group_size": 8}),
      (k, np.where(np.eye(16) > 0, np.nan, 0.0).astype(np.float32), {}),
      (np.full((16, 4), np.inf, np.float32), h, {}),
  ]
  for kernel, hessian, kw in bad:
    with pytest.raises(ValueError):
      gptq_quantize(kernel, hessian, **kw)
  with pytest.raises(ValueError, match="shape"):
    gptq_error(k, k[:, :2], h)
  with pytest.raises(ValueError, match="clip_ratio"):
    gptq_quantize(K, SX, clip_ratio=True)


@nan_cases(cols={
    "gptq under jit": lambda k: jax.jit(lambda k: gptq_quantize(k, SX, bits=4))(k),
    "gptq scale= under jit": lambda k: jax.jit(
        lambda k: gptq_quantize(k, SX, bits=4, scale=jnp.full((8,), 0.5)))(k),
}, inf_cols=("gptq scale= under jit",))
def test_a_nan_channel_quantizes_to_nan(f, bad, token):
  check_nan_case(f, bad, token)


def test_indefinite_hessian_suggests_damping():
  h = -np.eye(16, dtype=np.float32)
  with pytest.raises(FloatingPointError, match="damping"):
    gptq_quantize(np.ones((16, 4), np.float32), h, damping=0.0)


def test_works_under_jit():
  rng = np.random.default_rng(2)
  kernel = rng.standard_normal((24, 8)).astype(np.float32)
  h = _hessian(rng, 24)
  f = jax.jit(lambda k, h: gptq_quantize(k, h, bits=4, lazy_batch=10))
  np.testing.assert_array_equal(f(kernel, h), gptq_quantize(kernel, h, bits=4, lazy_batch=10))
