import jax
import jax.numpy as jnp
import numpy as np
import pytest

from catjax.core import quant
from catjax.core.quant import (QuantConfig, activation_config, dequantize, fake_quantize,
                               fake_quantize_clip_search, quantize, weight_config)
from operands import K, check_nan_case, nan_cases


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity,group", [("tensor", None), ("token", None), ("token", 16),
                                               ("channel", None), ("channel", 8)])
def test_round_trip_error_is_within_half_a_step(key, bits, symmetric, granularity, group):
  v = jax.random.normal(key, (32, 64)) * jnp.linspace(0.1, 3.0, 64)
  cfg = QuantConfig(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group)
  q = quant.quantize(v, cfg)
  assert q.values.dtype == (jnp.int8 if symmetric else jnp.uint8)
  assert q.values.shape == v.shape
  lo, hi = (-cfg.qmax, cfg.qmax) if symmetric else (0, cfg.qmax)
  assert int(q.values.min()) >= lo and int(q.values.max()) <= hi
  g, _ = quant.grouped(v, cfg)
  step = jnp.broadcast_to(q.scale, g.shape).reshape(v.shape)
  err = jnp.abs(quant.dequantize(q) - v)
  assert bool(jnp.all(err <= 0.5 * step + 1e-6))
  # re-quantizing the dequantized values is exact
  q2 = quant.quantize(quant.dequantize(q), cfg)
  np.testing.assert_array_equal(q2.values, q.values)
  # fake_quantize skips the integer round trip but gives the same floats, bit for bit,
  # eagerly and under jit
  np.testing.assert_array_equal(quant.fake_quantize(v, cfg), quant.dequantize(q))
  np.testing.assert_array_equal(jax.jit(quant.fake_quantize, static_argnums=1)(v, cfg),
                                jax.jit(lambda v: quant.dequantize(quant.quantize(v, cfg)))(v))


def test_symmetric_levels_and_scale():
  v = jnp.array([[-1.0, 0.6, 0.25, 1.0]])
  q = quant.quantize(v, QuantConfig(bits=4, granularity="token"))
  assert float(q.scale.squeeze()) == pytest.approx(1.0 / 7)
  np.testing.assert_array_equal(q.values, [[-7, 4, 2, 7]])  # 0.6*7=4.2, 0.25*7=1.75


def test_asymmetric_zero_point_keeps_zero_exact():
  v = jnp.array([[0.0, 0.3, 1.7, 2.9]])
  q = quant.quantize(v, QuantConfig(bits=4, symmetric=False, granularity="token"))
  assert int(q.zero_point.squeeze()) == 0
  assert float(quant.dequantize(q)[0, 0]) == 0.0
  v = jnp.array([[-1.0, 0.0, 2.0]])
  fq = quant.fake_quantize(v, QuantConfig(bits=8, symmetric=False, granularity="token"))
  assert float(fq[0, 1]) == 0.0


def test_granularities_have_one_scale_per_row_or_column(key):
  v = jax.random.normal(key, (6, 10))
  assert quant.quantize(v, QuantConfig(granularity="token")).scale.shape == (6, 1)
  assert quant.quantize(v, QuantConfig(granularity="channel")).scale.shape == (1, 10)
  assert quant.quantize(v, QuantConfig(granularity="tensor")).scale.shape == (1, 1)
  assert quant.quantize(v, QuantConfig(granularity="channel", group_size=3)).scale.shape == (2, 1, 10)


def test_clip_ratio_shrinks_the_scale(key):
  v = jax.random.normal(key, (4, 32))
  full = quant.quantize(v, QuantConfig(bits=4))
  clipped = quant.quantize(v, QuantConfig(bits=4, clip_ratio=0.8))
  np.testing.assert_allclose(clipped.scale, 0.8 * full.scale, rtol=1e-6)


def test_zero_rows_do_not_produce_nan():
  v = jnp.zeros((3, 8)).at[1].set(1.0)
  assert bool(jnp.all(jnp.isfinite(quant.fake_quantize(v, QuantConfig(bits=4)))))


def test_fake_quantize_keeps_dtype_and_jits(key):
  v = jax.random.normal(key, (8, 16)).astype(jnp.bfloat16)
  cfg = QuantConfig(bits=4)
  out = jax.jit(quant.fake_quantize, static_argnums=1)(v, cfg)
  assert out.dtype == jnp.bfloat16


@pytest.mark.parametrize("axis", [0, -1])
def test_int4_pack_unpack_round_trip(key, axis):
  q = jax.random.randint(key, (6, 8), -8, 8).astype(jnp.int8)
  p = quant.pack_int4(q, axis=axis)
  assert p.dtype == jnp.int8
  assert p.shape[axis] == q.shape[axis] // 2
  np.testing.assert_array_equal(quant.unpack_int4(p, axis=axis), q)
  u = jax.random.randint(key, (4, 6), 0, 16).astype(jnp.uint8)
  np.testing.assert_array_equal(quant.unpack_int4(quant.pack_int4(u)), u)


def test_int4_packing_layout():
  p = quant.pack_int4(jnp.array([1, -2], jnp.int8))
  # low nibble first: 0x1 | 0xE << 4 = 0xE1 = -31 as int8
  assert int(p[0]) == -31


def test_int4_pack_round_trips_quantized_weights(key):
  w = jax.random.normal(key, (64, 16))
  q = quant.quantize(w, quant.weight_config(4))
  np.testing.assert_array_equal(quant.unpack_int4(quant.pack_int4(q.values, axis=0), axis=0),
                                q.values)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=1), "bits"), (dict(bits=9), "bits"), (dict(bits=4.0), "bits"),
    (dict(granularity="row"), "granularity"), (dict(group_size=0), "group_size"),
    (dict(granularity="tensor", group_size=4), "group_size"), (dict(clip_ratio=1.5), "clip_ratio"),
    (dict(clip_ratio=True), "clip_ratio"), (dict(clip_ratio="0.5"), "clip_ratio"),
    (dict(symmetric=1), "symmetric"), (dict(symmetric="no"), "symmetric"),
])
def test_config_errors_name_the_value(kwargs, match):
  with pytest.raises(ValueError, match=match):
    QuantConfig(**kwargs)


def test_shape_errors():
  with pytest.raises(ValueError, match="group_size must divide"):
    quant.quantize(jnp.ones((4, 10)), QuantConfig(group_size=4))
  with pytest.raises(ValueError, match="rank >= 2"):
    quant.quantize(jnp.ones((10,)), QuantConfig(granularity="channel"))
  with pytest.raises(ValueError, match="even length"):
    quant.pack_int4(jnp.ones((3,), jnp.int8))
  with pytest.raises(ValueError, match="int8 or uint8"):
    quant.pack_int4(jnp.ones((4,), jnp.int32))


def test_clip_search_never_worse_than_full_range_and_helps_outliers():
  from catjax.core.quant import activation_config, fake_quantize, fake_quantize_clip_search, weight_config
  rng = np.random.RandomState(0)
  k = rng.randn(3, 64, 8).astype(np.float32)
  k[:, 5, :4] *= 12.0  # one outlier input channel in half of the columns
  imp = rng.uniform(0.5, 2.0, (3, 64)).astype(np.float32)
  cfg = weight_config(4)
  plain = np.asarray(fake_quantize(k, cfg))
  searched = np.asarray(fake_quantize_clip_search(k, cfg, importance=imp,
                                                  ratios=(1.0, 0.9, 0.8, 0.7, 0.6, 0.5)))
  err = lambda q: np.sum(imp[..., None] * (q - k) ** 2, axis=-2)
  assert np.all(err(searched) <= err(plain) + 1e-6)
  assert np.mean(err(searched) < 0.99 * err(plain)) > 0.2
  # Ratio 1.0 alone is plain RTN.
  np.testing.assert_allclose(np.asarray(fake_quantize_clip_search(k, cfg, ratios=(1.0,))), plain,
                             rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="importance must have shape"):
    fake_quantize_clip_search(k, cfg, importance=imp[0])
  with pytest.raises(ValueError, match="symmetric per-channel"):
    fake_quantize_clip_search(k, activation_config(4))


# --- bad operands: NaN propagates, bad arguments raise naming the value -------------------


@nan_cases(rows={
    "fake_quantize token": lambda x: fake_quantize(x, activation_config(4)),
    "fake_quantize token asym": lambda x: dequantize(quantize(x, QuantConfig(bits=4, symmetric=False))),
    "fake_quantize grouped": lambda x: fake_quantize(x, activation_config(4, group_size=16)),
    "quantize+dequantize": lambda x: dequantize(quantize(x, activation_config(8))),
    "jit fake_quantize": lambda x: jax.jit(fake_quantize, static_argnums=1)(x, activation_config(4)),
}, cols={
    "fake_quantize channel": lambda k: fake_quantize(k, weight_config(4)),
    "quantize+dequantize channel": lambda k: dequantize(quantize(k, weight_config(4))),
    "clip search": lambda k: fake_quantize_clip_search(k, weight_config(4)),
})
def test_a_nan_token_or_channel_quantizes_to_nan(f, bad, token):
  check_nan_case(f, bad, token)


def test_a_nan_importance_makes_its_channels_nan():
  imp = jnp.ones((16,)).at[3].set(jnp.nan)
  q = fake_quantize_clip_search(K, weight_config(4), importance=imp)
  out = jax.jit(lambda k, i: fake_quantize_clip_search(k, weight_config(4), importance=i))(K, imp)
  assert np.isnan(np.asarray(q)).all() and np.isnan(np.asarray(out)).all()


@pytest.mark.parametrize("kw, words", [
    ({"ratios": ()}, "ratios"), ({"ratios": (True,)}, "ratios"),
    ({"importance": -jnp.ones(16)}, "importance must be >= 0")])
def test_clip_search_checks_its_arguments(kw, words):
  with pytest.raises(ValueError, match=words):
    fake_quantize_clip_search(K, weight_config(4), **kw)
