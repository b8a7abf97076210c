"""Quantized, transformed matmul: reference vs numpy, Pallas (interpret) vs reference,
CUDA lowering of the Mosaic GPU kernel, packing, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from catjax import kernels
from catjax.kernels import pallas_gpu, qweight, reference
from operands import K, X, check_nan_case, nan_cases

needs_mosaic = pytest.mark.skipif(
    not pallas_gpu.has_mosaic_gpu(),
    reason=f"Mosaic GPU kernel needs jax >= 0.11, have {jax.__version__}")
needs_gpu_interpret = pytest.mark.skipif(
    not pallas_gpu.has_gpu_interpret(),
    reason=f"jax {jax.__version__} has no Mosaic GPU interpret mode")


def _problem(m, d_in, d_out, k, seed=0, integer=False):
  rng = np.random.default_rng(seed)
  if integer:  # transform sums exact in float32 (multiples of 2^-10), for the numpy oracle
    x = (rng.integers(-8192, 8193, (m, d_in)) / 1024).astype(np.float32)
    tb = None if k is None else rng.integers(-3, 4, (d_in // k, k, k)).astype(np.float32)
  else:
    x = rng.standard_normal((m, d_in)).astype(np.float32)
    x[:, 3] *= 30.0  # an outlier channel
    tb = None if k is None else (np.eye(k) + 0.3 * rng.standard_normal((d_in // k, k, k))).astype(np.float32)
  w = rng.standard_normal((d_in, d_out)).astype(np.float32)
  return x, (None if tb is None else jnp.asarray(tb)), w


def _numpy_matmul(x, tb, w, *, bits, a_bits, a_clip=1.0):
  """Independent numpy oracle: float32 RTN, int64 accumulation."""
  m, d_in = x.shape
  if tb is not None:
    nb, k, _ = tb.shape
    x = np.einsum("mbk,bjk->mbj", x.reshape(m, nb, k), np.asarray(tb)).reshape(m, d_in)
  x = x.astype(np.float32)
  qa, qw = 2 ** (a_bits - 1) - 1, 2 ** (bits - 1) - 1
  sx = (np.float32(a_clip) * np.abs(x).max(axis=1, keepdims=True) / np.float32(qa)).astype(np.float32)
  sx = np.where(sx > 0, sx, np.float32(1))
  xq = np.clip(np.round(x / sx), -qa, qa).astype(np.int64)
  sw = (np.abs(w).max(axis=0, keepdims=True) / np.float32(qw)).astype(np.float32)
  sw = np.where(sw > 0, sw, np.float32(1))
  wq = np.clip(np.round(w / sw), -qw, qw).astype(np.int64)
  acc = xq @ wq
  return acc, (acc.astype(np.float32) * sx * sw).astype(np.float32), wq, sw


@pytest.mark.parametrize("bits,a_bits,k,a_clip", [(4, 4, 16, 1.0), (8, 8, None, 1.0),
                                                 (4, 8, 64, 1.0), (3, 6, 32, 1.0), (4, 4, 16, 0.75)])
def test_reference_matches_numpy(bits, a_bits, k, a_clip):
  x, tb, w = _problem(9, 128, 48, k, seed=bits + a_bits, integer=True)
  acc_np, out_np, wq_np, sw_np = _numpy_matmul(x, tb, w, bits=bits, a_bits=a_bits, a_clip=a_clip)
  qw = kernels.quantize_weight(jnp.asarray(w), bits=bits)
  np.testing.assert_array_equal(np.asarray(qweight.unpack_values(qw.values, bits=bits)).T, wq_np)
  # XLA may turn `/ qmax` into a multiply by the reciprocal: scales agree to an ulp.
  np.testing.assert_allclose(np.asarray(qw.scale), sw_np[0], rtol=1e-6)
  x_q, s_x = reference.quantize_activations(jnp.asarray(x), tb, a_bits=a_bits, a_clip=a_clip)
  out, acc = reference.int_matmul(x_q, s_x, qw.values, qw.scale, bits=bits)
  np.testing.assert_array_equal(np.asarray(acc), acc_np)
  np.testing.assert_allclose(np.asarray(out), out_np, rtol=1e-6)
  api = kernels.quantized_matmul(jnp.asarray(x), tb, qw, a_bits=a_bits, a_clip=a_clip,
                                 implementation="reference")
  # Jitted, XLA may fold `clip · absmax / qmax` differently: an ulp in the scales.
  np.testing.assert_allclose(np.asarray(api), np.asarray(out), rtol=1e-6)


# (m, d_in, d_out, k, bits, a_bits, out_dtype): odd m, several tilings, both packings.
INTERPRET_CASES = [
    (1, 128, 64, 16, 4, 4, jnp.float32),
    (7, 256, 128, 64, 4, 8, jnp.float32),
    (65, 256, 96, None, 8, 8, jnp.float32),
    (3, 384, 256, 16, 8, 4, jnp.bfloat16),
    (130, 512, 64, 64, 4, 4, jnp.bfloat16),
]


@pytest.mark.parametrize("m,d_in,d_out,k,bits,a_bits,out_dtype", INTERPRET_CASES)
def test_pallas_interpret_matches_reference(m, d_in, d_out, k, bits, a_bits, out_dtype):
  x, tb, w = _problem(m, d_in, d_out, k, seed=m)
  qw = kernels.quantize_weight(jnp.asarray(w), bits=bits)
  ref = kernels.quantized_matmul(x, tb, qw, a_bits=a_bits, implementation="reference", out_dtype=out_dtype)
  got = kernels.quantized_matmul(x, tb, qw, a_bits=a_bits, implementation="pallas_interpret",
                                 out_dtype=out_dtype)
  assert got.dtype == out_dtype and got.shape == (m, d_out)
  np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32)))


def _bodies():
  return ["portable"] + (["mosaic"] if pallas_gpu.has_gpu_interpret() else [])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("tile_n,tile_k,steps", [(32, 64, 1), (64, 128, 3)])
def test_integer_accumulator_is_exact(bits, tile_n, tile_k, steps):
  """Unit scales turn the kernel output into its int32 accumulator (exact in float32)."""
  m, d_in, d_out = 70, 512, 128
  rng = np.random.default_rng(bits)
  qmax = 2 ** (bits - 1) - 1
  x_q = jnp.asarray(rng.integers(-127, 128, (m, d_in)), jnp.int8)
  w_q = jnp.asarray(rng.integers(-qmax, qmax + 1, (d_out, d_in)), jnp.int8)
  values = qweight.pack_values(w_q) if bits <= 4 else w_q
  ones_x, ones_w = jnp.ones((m, 1), jnp.float32), jnp.ones((d_out,), jnp.float32)
  _, acc = reference.int_matmul(x_q, ones_x, values, ones_w, bits=bits)
  np.testing.assert_array_equal(
      np.asarray(acc), np.asarray(x_q, np.int64) @ np.asarray(w_q, np.int64).T)
  cfg = pallas_gpu.TileConfig(tile_m=64, tile_n=tile_n, tile_k=tile_k,
                              max_concurrent_steps=steps)
  for body in _bodies():
    out = pallas_gpu.int_matmul(x_q, ones_x, values, ones_w, bits=bits, config=cfg, body=body,
                                interpret=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(acc).astype(np.float32), err_msg=body)


def test_int4_round_trip_in_kernel_path():
  q = jnp.asarray(np.tile(np.arange(-8, 8, dtype=np.int8), (3, 4)))  # every nibble value
  packed = qweight.pack_values(q)
  assert packed.shape == (3, 32) and packed.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(qweight.unpack_values(packed, bits=4)), np.asarray(q))
  lo, hi = pallas_gpu._unpack_halves(packed)  # the kernels' unpacking
  np.testing.assert_array_equal(np.asarray(jnp.concatenate([lo, hi], axis=1)), np.asarray(q))
  w = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 24))  # stacked layers
  qw = kernels.quantize_weight(w, bits=4)
  assert qw.values.shape == (2, 24, 32) and qw.scale.shape == (2, 24)
  assert qw.nbytes == 2 * 24 * 32 + 2 * 24 * 4
  err = jnp.abs(qw.dequantize() - w) / qw.scale[:, None, :]
  assert float(err.max()) <= 0.5 + 1e-5
  leaves, treedef = jax.tree_util.tree_flatten(qw)
  assert len(leaves) == 2 and jax.tree_util.tree_unflatten(treedef, leaves).shape == (64, 24)


@needs_mosaic
@pytest.mark.parametrize("bits,out_dtype,k", [(4, jnp.bfloat16, 128), (8, jnp.float32, None)])
def test_mosaic_kernel_lowers_for_cuda(bits, out_dtype, k):
  m, d_in, d_out = 16, 4096, 11008
  cfg = pallas_gpu.choose_block_config(m, d_in, d_out, bits=bits, out_dtype=out_dtype)
  assert pallas_gpu.unsupported_reason(m, d_in, d_out, bits=bits, out_dtype=out_dtype, config=cfg,
                                       interpret=True) is None

  def f(x, tb, qw):
    x_q, s_x = reference.quantize_activations(x, tb, a_bits=4)
    return pallas_gpu.int_matmul(x_q, s_x, qw.values, qw.scale, bits=qw.bits, config=cfg,
                                 out_dtype=out_dtype, body="mosaic")

  qw = jax.eval_shape(lambda w: kernels.quantize_weight(w, bits=bits),
                      jax.ShapeDtypeStruct((d_in, d_out), jnp.float32))
  tb = None if k is None else jax.ShapeDtypeStruct((d_in // k, k, k), jnp.float32)
  lowered = jax.jit(f).trace(jax.ShapeDtypeStruct((m, d_in), jnp.bfloat16), tb, qw).lower(
      lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert "mosaic_gpu" in text


def test_default_falls_back_to_reference_without_gpu():
  x, tb, w = _problem(5, 128, 32, 16)
  qw = kernels.quantize_weight(jnp.asarray(w), bits=4)
  ref = kernels.quantized_matmul(x, tb, qw, a_bits=4, implementation="reference")
  if jax.devices()[0].platform != "gpu":
    np.testing.assert_array_equal(np.asarray(kernels.quantized_matmul(x, tb, qw, a_bits=4)), np.asarray(ref))
  jitted = jax.jit(lambda x: kernels.quantized_matmul(x, tb, qw, a_bits=4, implementation="reference"))
  batched = jitted(jnp.stack([x, x]))
  assert batched.shape == (2, 5, 32)
  np.testing.assert_array_equal(np.asarray(batched[1]), np.asarray(ref))


def test_bad_inputs_raise_value_errors():
  w = jnp.ones((128, 32))
  qw = kernels.quantize_weight(w, bits=4)
  x = jnp.ones((4, 128))
  with pytest.raises(ValueError, match=r"x.shape=\(4, 64\)"):
    kernels.quantized_matmul(jnp.ones((4, 64)), None, qw, a_bits=4)
  with pytest.raises(ValueError, match="a_bits=9"):
    kernels.quantized_matmul(x, None, qw, a_bits=9)
  with pytest.raises(ValueError, match="a_clip=1.5"):
    kernels.quantized_matmul(x, None, qw, a_bits=4, a_clip=1.5)
  with pytest.raises(ValueError, match="bits=1"):
    kernels.quantize_weight(w, bits=1)
  with pytest.raises(ValueError, match=r"kernel.shape=\(127, 32\)"):
    kernels.quantize_weight(jnp.ones((127, 32)), bits=4)
  with pytest.raises(ValueError, match=r"tb.shape=\(4, 16, 16\)"):
    kernels.quantized_matmul(x, jnp.ones((4, 16, 16)), qw, a_bits=4)
  with pytest.raises(ValueError, match="implementation='cuda'"):
    kernels.quantized_matmul(x, None, qw, a_bits=4, implementation="cuda")
  with pytest.raises(ValueError, match="out_dtype"):
    kernels.quantized_matmul(x, None, qw, a_bits=4, out_dtype=jnp.int32)
  with pytest.raises(ValueError, match="slice stacked layers"):
    kernels.quantized_matmul(x, None, kernels.quantize_weight(jnp.ones((2, 128, 32)), bits=4), a_bits=4)
  with pytest.raises(ValueError, match="tile_k"):
    pallas_gpu.TileConfig(tile_k=32)
  # 96 input channels at 4 bits: 48-byte rows, no 64-byte K tile.
  qw96 = kernels.quantize_weight(jnp.ones((96, 32)), bits=4)
  with pytest.raises(ValueError, match=r"d_in=96.*tile_k"):
    kernels.quantized_matmul(jnp.ones((2, 96)), None, qw96, a_bits=4, implementation="pallas_interpret")
  if jax.devices()[0].platform != "gpu":
    with pytest.raises(ValueError, match="implementation='pallas' cannot run"):
      kernels.quantized_matmul(x, None, qw, a_bits=4, implementation="pallas")
  with pytest.raises(ValueError, match="scale must be > 0"):
    kernels.quantize_weight(K, bits=4, scale=jnp.zeros(8))


@nan_cases(rows={
    "quantized_matmul": lambda x: kernels.quantized_matmul(x, None, kernels.quantize_weight(K, bits=4),
                                                           a_bits=4),
}, cols={
    "quantize_weight": lambda k: kernels.quantize_weight(k, bits=4).dequantize(),
    "quantize_weight scale=": lambda k: kernels.quantize_weight(k, bits=4,
                                                                scale=jnp.full((8,), 0.5)).dequantize(),
    "quantized_matmul weight": lambda k: kernels.quantized_matmul(X, None, kernels.quantize_weight(k, bits=4),
                                                                  a_bits=4),
}, inf_cols=("quantize_weight scale=",))
def test_a_nan_token_or_channel_gives_nan(f, bad, token):
  """A NaN (or, with a given scale, ±Inf) weight or activation is not rounded into range."""
  check_nan_case(f, bad, token)


def test_block_config_heuristic_covers_llama_shapes():
  for d_in, d_out in ((4096, 4096), (4096, 11008), (11008, 4096)):
    for m in (1, 16, 256, 2048, 8192):
      for bits in (4, 8):
        for out_dtype in (jnp.float32, jnp.bfloat16):
          cfg = pallas_gpu.choose_block_config(m, d_in, d_out, bits=bits, out_dtype=out_dtype)
          assert pallas_gpu.unsupported_reason(m, d_in, d_out, bits=bits, out_dtype=out_dtype,
                                               config=cfg, interpret=True) is None, (m, d_in, d_out, cfg)
          assert pallas_gpu.smem_bytes(cfg, bits=bits, out_dtype=out_dtype) <= pallas_gpu.SMEM_BUDGET


@pytest.mark.gpu
@pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits,k", [(4, 128), (8, None)])
def test_pallas_on_gpu_matches_reference(bits, k):
  m, d_in, d_out = 300, 4096, 11008
  reason = pallas_gpu.unsupported_reason(m, d_in, d_out, bits=bits)
  if reason is not None:
    pytest.skip(reason)
  x, tb, w = _problem(m, d_in, d_out, k)
  qw = kernels.quantize_weight(jnp.asarray(w), bits=bits)
  x_q, s_x = reference.quantize_activations(jnp.asarray(x), tb, a_bits=4)
  ones_x, ones_w = jnp.ones_like(s_x), jnp.ones_like(qw.scale)
  cfg = pallas_gpu.choose_block_config(m, d_in, d_out, bits=bits)
  acc = pallas_gpu.int_matmul(x_q, ones_x, qw.values, ones_w, bits=bits, config=cfg)
  _, ref_acc = reference.int_matmul(x_q, ones_x, qw.values, ones_w, bits=bits)
  np.testing.assert_array_equal(np.asarray(acc), np.asarray(ref_acc).astype(np.float32))
  got = kernels.quantized_matmul(x, tb, qw, a_bits=4, implementation="pallas")
  ref = kernels.quantized_matmul(x, tb, qw, a_bits=4, implementation="reference")
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=0)
