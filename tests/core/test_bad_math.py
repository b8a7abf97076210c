"""Bad inputs to the math core: NaN propagates through quantizers, eager entry
points and configs raise `ValueError` naming the value, dtypes are explicit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import catjax as cj
from catjax.core import linalg
from catjax.core import stats
from catjax.core.gptq import gptq_quantize
from catjax.kernels import quantize_weight, quantized_matmul
from catjax.ptq.hooks import SiteHook, fake_quantize_ste
from catjax.ptq.configs import GPTQConfig, SmoothQuantConfig, TrainConfig
from catjax.ptq.recipe import Recipe
from catjax.ptq.rounding import channel_clipped_quantize
from catjax.core.quant import QuantConfig, activation_config, dequantize, fake_quantize, fake_quantize_clip_search, quantize, weight_config
from catjax.core.transforms import fit_transform

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.standard_normal((4, 16)), jnp.float32)  # (tokens, d_in)
K = jnp.asarray(RNG.standard_normal((16, 8)), jnp.float32)  # (d_in, d_out)
SX = jnp.asarray(stats.second_moment(RNG.standard_normal((256, 16))))
GW = jnp.asarray(stats.weight_gram(K))


def _bad_x(v=np.nan):
  return X.at[1, 5].set(v)  # token 1


def _bad_k(v=np.nan):
  return K.at[5, 2].set(v)  # output channel 2


# ---------------------------------------------------------------------------
# NaN (or ±Inf) in one token or channel makes that whole token / channel NaN.

ROW_CASES = {  # f(x) for x (tokens, d_in) with token 1 bad: token 1 all NaN, the rest finite
    "fake_quantize token": lambda x: fake_quantize(x, activation_config(4)),
    "fake_quantize token asym": lambda x: dequantize(quantize(x, QuantConfig(bits=4, symmetric=False))),
    "fake_quantize grouped": lambda x: fake_quantize(x, activation_config(4, group_size=16)),
    "quantize+dequantize": lambda x: dequantize(quantize(x, activation_config(8))),
    "fake_quantize_ste": lambda x: fake_quantize_ste(x, activation_config(4), ste=True),
    "SiteHook": lambda x: SiteHook.uniform(("attn_in",), activation_config(4))("attn_in", x, None)[0],
    "jit fake_quantize": lambda x: jax.jit(fake_quantize, static_argnums=1)(x, activation_config(4)),
    "quantized_matmul": lambda x: quantized_matmul(x, None, quantize_weight(K, bits=4), a_bits=4),
}

COL_CASES = {  # f(kernel) for kernel (d_in, d_out) with channel 2 bad: column 2 all NaN
    "fake_quantize channel": lambda k: fake_quantize(k, weight_config(4)),
    "quantize+dequantize channel": lambda k: dequantize(quantize(k, weight_config(4))),
    "clip search": lambda k: fake_quantize_clip_search(k, weight_config(4)),
    "channel_clipped_quantize": lambda k: channel_clipped_quantize(k, jnp.full((8,), 0.9), 7)[0],
    "quantize_weight": lambda k: quantize_weight(k, bits=4).dequantize(),
    "quantize_weight scale=": lambda k: quantize_weight(k, bits=4, scale=jnp.full((8,), 0.5)).dequantize(),
    "quantized_matmul weight": lambda k: quantized_matmul(X, None, quantize_weight(k, bits=4), a_bits=4),
    "gptq under jit": lambda k: jax.jit(lambda k: gptq_quantize(k, SX, bits=4))(k),
    "gptq scale= under jit": lambda k: jax.jit(
        lambda k: gptq_quantize(k, SX, bits=4, scale=jnp.full((8,), 0.5)))(k),
}


# ±Inf already came out NaN on the float paths; with a given scale it did not.
COL_BAD = [(name, np.nan) for name in COL_CASES] + [
    (name, v) for name in ("quantize_weight scale=", "gptq scale= under jit") for v in (np.inf, -np.inf)]


@pytest.mark.parametrize("name", ROW_CASES)
def test_a_nan_token_quantizes_to_nan(name):
  out = np.asarray(ROW_CASES[name](_bad_x(np.nan)))
  assert np.isnan(out[1]).all(), out[1]
  assert np.isfinite(np.delete(out, 1, axis=0)).all()


@pytest.mark.parametrize("name,bad", COL_BAD, ids=[f"{n}-{b}" for n, b in COL_BAD])
def test_a_bad_channel_quantizes_to_nan(name, bad):
  out = np.asarray(COL_CASES[name](_bad_k(bad)))
  assert np.isnan(out[:, 2]).all(), out[:, 2]
  assert np.isfinite(np.delete(out, 2, axis=1)).all()


def test_a_nan_importance_makes_its_channels_nan():
  imp = jnp.ones((16,)).at[3].set(jnp.nan)
  q = fake_quantize_clip_search(K, weight_config(4), importance=imp)
  out = jax.jit(lambda k, i: fake_quantize_clip_search(k, weight_config(4), importance=i))(K, imp)
  assert np.isnan(np.asarray(q)).all() and np.isnan(np.asarray(out)).all()


def test_a_nan_weight_gives_a_nan_quantized_block():
  """`quantize_block` (RTN via the integer `quantize`): a NaN weight's channel and its
  export scale are NaN, not finite numbers."""
  import tiny
  from flax import nnx

  from catjax.models import LLAMA, random_model
  from catjax.ptq.blocks import quantize_block
  model = random_model(tiny.config(num_layers=1), seed=3)
  block = jax.tree.map(lambda a: a[0], nnx.to_pure_dict(nnx.state(model.layers)))
  block["attn"]["q_proj"]["kernel"] = block["attn"]["q_proj"]["kernel"].at[5, 2].set(jnp.nan)
  q, scales = quantize_block(block, Recipe(method="none"), spec=LLAMA)
  qk = np.asarray(q["attn"]["q_proj"]["kernel"])
  assert np.isnan(qk[:, 2]).all() and np.isfinite(np.delete(qk, 2, axis=1)).all()
  assert np.isnan(np.asarray(scales[("attn", "q_proj")])[2])


# ---------------------------------------------------------------------------
# Eager entry points: ValueError naming the argument.

STATS_CASES = [
    ("sqnr_decomposition zero x", lambda: cj.sqnr_decomposition(jnp.zeros((4, 16)), K), "x is all zero"),
    ("sqnr_decomposition nan x", lambda: cj.sqnr_decomposition(_bad_x(), K), "x has 1 non-finite"),
    ("sqnr_decomposition inf kernel", lambda: cj.sqnr_decomposition(X, _bad_k(np.inf)),
     "kernel has 1 non-finite"),
    ("sqnr_decomposition zero kernel", lambda: cj.sqnr_decomposition(X, jnp.zeros((16, 8))),
     "kernel is all zero"),
    ("sqnr_decomposition empty x", lambda: cj.sqnr_decomposition(jnp.zeros((0, 16)), K), "x is empty"),
    ("sqnr_decomposition bool bits", lambda: cj.sqnr_decomposition(X, K, a_bits=True), "a_bits=True"),
    ("sqnr_decomposition w_bits", lambda: cj.sqnr_decomposition(X, K, w_bits=9), "w_bits=9"),
    ("measured_sqnr zero x", lambda: cj.measured_sqnr(jnp.zeros((4, 16)), K, a_config=activation_config(4),
                                                      w_config=weight_config(4)), "x is all zero"),
    ("measured_sqnr nan kernel", lambda: cj.measured_sqnr(X, _bad_k(), a_config=activation_config(4),
                                                          w_config=weight_config(4)), "kernel has 1"),
    ("measured_sqnr shapes", lambda: cj.measured_sqnr(X, K[:8], a_config=activation_config(4),
                                                      w_config=weight_config(4)), "need x"),
    ("concentration_x zero", lambda: cj.concentration_x(jnp.zeros((4, 16))), "x is all zero"),
    ("concentration_x nan", lambda: cj.concentration_x(_bad_x()), "x has 1 non-finite"),
    ("concentration_w zero", lambda: cj.concentration_w(jnp.zeros((16, 8))), "kernel is all zero"),
    ("concentration_w inf", lambda: cj.concentration_w(_bad_k(-np.inf)), "kernel has 1 non-finite"),
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
    ("operand_alignment nan", lambda: stats.operand_alignment(_bad_x(), K), "x has 1 non-finite"),
]


@pytest.mark.parametrize("name,call,words", STATS_CASES, ids=[c[0] for c in STATS_CASES])
def test_stats_entry_points_reject_bad_operands(name, call, words):
  with pytest.raises(ValueError, match=words):
    call()


def _fit(**kw):
  args = {"method": "cat", "sigma_x": SX, "gram_w": GW, "block_size": 8, "name": "layer 2 mlp_in", **kw}
  return fit_transform(args.pop("method"), args.pop("sigma_x"), args.pop("gram_w"), **args)


FIT_CASES = [
    ("eps negative", {"eps": -1.0}, "eps must be a finite number >= 0, got eps=-1.0"),
    ("eps nan", {"eps": float("nan")}, "eps must be"),
    ("eps inf", {"eps": float("inf")}, "eps must be"),
    ("eps bool", {"eps": True}, "eps must be"),
    ("eps string", {"eps": "1e-6"}, "eps must be"),
    ("alpha bool", {"method": "smoothquant", "alpha": True}, "alpha must be in"),
    ("alpha none", {"method": "smoothquant", "alpha": None}, "alpha must be in"),
    ("x64 string", {"x64": "yes"}, "x64 must be"),
    ("sigma nan", {"sigma_x": SX.at[3, 4].set(jnp.nan)}, "layer 2 mlp_in: sigma_x has 1 non-finite"),
    ("sigma nan hadamard", {"method": "hadamard", "sigma_x": SX.at[3, 4].set(jnp.inf)}, "sigma_x has 1"),
    ("sigma negated", {"sigma_x": -SX}, "sigma_x has 16 negative diagonal"),
    ("sigma negated smoothquant", {"method": "smoothquant", "sigma_x": -SX}, "sigma_x has 16 negative"),
    ("gram negated", {"method": "cat_full", "gram_w": -GW}, "gram_w has 16 negative diagonal"),
    ("sigma zero", {"sigma_x": jnp.zeros((16, 16))}, "sigma_x is all zero"),
    ("gram zero", {"method": "cat_full", "gram_w": jnp.zeros((16, 16))}, "gram_w is all zero"),
    ("act_absmax negative", {"method": "smoothquant", "act_absmax": -jnp.ones(16)}, "act_absmax has 16 negative"),
    ("act_absmax nan", {"method": "smoothquant", "act_absmax": jnp.ones(16).at[0].set(jnp.nan)},
     "act_absmax has 1 non-finite"),
    ("weight_absmax inf", {"method": "smoothquant", "weight_absmax": jnp.full(16, jnp.inf)},
     "weight_absmax has 16 non-finite"),
    ("weight nan", {"weight": K.at[0, 0].set(jnp.nan)}, "weight has 1 non-finite"),
]


@pytest.mark.parametrize("name,kw,words", FIT_CASES, ids=[c[0] for c in FIT_CASES])
def test_fit_transform_rejects_bad_arguments(name, kw, words):
  with pytest.raises(ValueError, match=words):
    _fit(**kw)


# ---------------------------------------------------------------------------
# Configs: one ValueError naming the field and value.

CONFIG_CASES = [
    (QuantConfig, {"clip_ratio": True}, "clip_ratio"),
    (QuantConfig, {"clip_ratio": "0.5"}, "clip_ratio"),
    (QuantConfig, {"symmetric": 1}, "symmetric"),
    (QuantConfig, {"symmetric": "no"}, "symmetric"),
    (Recipe, {"eps": -1.0}, "eps=-1.0"),
    (Recipe, {"eps": float("nan")}, "eps=nan"),
    (Recipe, {"a_clip": True}, "a_clip=True"),
    (Recipe, {"a_clip": "0.5"}, "a_clip='0.5'"),
    (GPTQConfig, {"damping": True}, "gptq.damping=True"),
    (GPTQConfig, {"damping": -1.0}, "gptq.damping=-1.0"),
    (GPTQConfig, {"lazy_batch": 0}, "gptq.lazy_batch=0"),
    (TrainConfig, {"lr": True}, "train.lr=True"),
    (TrainConfig, {"lr": 0.0}, "train.lr=0.0"),
    (TrainConfig, {"steps": -1}, "train.steps=-1"),
    (TrainConfig, {"batch": 0}, "train.batch=0"),
    (SmoothQuantConfig, {"alpha": True}, "smoothquant.alpha=True"),
    (Recipe, {"seed": "0"}, "seed='0'"),
    (Recipe, {"seed": 1.5}, "seed=1.5"),
    (GPTQConfig, {"act_order": "yes"}, "gptq.act_order='yes'"),
    (Recipe, {"fit_x64": 1}, "fit_x64=1"),
    (TrainConfig, {"w_clip": None}, "train.w_clip=None"),
]


@pytest.mark.parametrize("cls,kw,words", CONFIG_CASES,
                         ids=[f"{c.__name__}-{next(iter(k))}={k[next(iter(k))]!r}" for c, k, _ in CONFIG_CASES])
def test_configs_reject_bad_values(cls, kw, words):
  with pytest.raises(ValueError, match=words):
    cls(**kw)


ARG_CASES = [
    ("clip search no ratios", lambda: fake_quantize_clip_search(K, weight_config(4), ratios=()), "ratios"),
    ("clip search bool ratio", lambda: fake_quantize_clip_search(K, weight_config(4), ratios=(True,)), "ratios"),
    ("clip search negative importance",
     lambda: fake_quantize_clip_search(K, weight_config(4), importance=-jnp.ones(16)), "importance must be >= 0"),
    ("quantize_weight zero scale", lambda: quantize_weight(K, bits=4, scale=jnp.zeros(8)), "scale must be > 0"),
    ("gptq bool clip_ratio", lambda: gptq_quantize(K, SX, clip_ratio=True), "clip_ratio"),
    ("float64 without x64", lambda: cj.SecondMoment.zeros(8, dtype=jnp.float64), "needs x64"),
    ("int dtype", lambda: linalg.spd_eigh(SX, dtype=jnp.int32), "float32 or float64"),
]


@pytest.mark.parametrize("name,call,words", ARG_CASES, ids=[c[0] for c in ARG_CASES])
def test_arguments_are_checked(name, call, words):
  with pytest.raises(ValueError, match=words):
    call()


# ---------------------------------------------------------------------------
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


def test_x64_fit_equals_the_float64_linalg():
  """`fit_transform(x64=True)` is `alignment_transform` in float64 on the diagonal blocks."""
  sx32, gw32 = SX.astype(jnp.float32), GW.astype(jnp.float32)
  t = fit_transform("cat", sx32, gw32, block_size=8, x64=True)
  with jax.enable_x64(True):
    blocks = lambda a: jnp.stack([a[i:i + 8, i:i + 8] for i in (0, 8)])
    m, m_inv = linalg.alignment_transform(blocks(sx32), blocks(gw32), eps=1e-6, dtype=jnp.float64)
    assert m.dtype == jnp.float64
  np.testing.assert_array_equal(np.asarray(t.blocks), np.asarray(m, np.float32))
  np.testing.assert_array_equal(np.asarray(t.inv_blocks), np.asarray(m_inv, np.float32))
