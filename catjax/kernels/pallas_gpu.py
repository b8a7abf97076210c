"""Pallas kernels for the integer part of the quantized, transformed matmul.

Design: **pre-pass + integer matmul kernel.** The block transform and the
per-token quantization run first (`reference.quantize_activations`, one
XLA-fused pass over `x`), because a per-token scale needs the whole
transformed row; doing the transform inside the matmul would recompute it
for every N tile, i.e. `k / tile_n` extra (float) work per integer MAC
(100 % at k = tile_n = 128). The kernel then reads int8 activations and
int8 or packed int4 weights, unpacks int4 to int8 (Hopper has no int4 MMA),
accumulates in int32 and applies `(acc · s_x) · s_w` in the epilogue.

Two bodies compute the same thing, tile for tile:

- `mosaic`: Pallas **Mosaic GPU** (`plgpu.kernel`, warpgroup semantics) for
  Hopper: a grid of `(m/tile_m, d_out/tile_n)` CTAs, each running a
  TMA-fed `plgpu.emit_pipeline` over K tiles with int8 `plgpu.wgmma` (both
  operands K-major: activations `(m, d_in)`, weights stored `(d_out, d_in)`
  and passed transposed), int4 unpacked in registers (via int16, since Mosaic
  GPU has no 8-bit arithmetic) into an SMEM tile per half; int32 accumulator
  in registers; the epilogue scales, casts and stores through SMEM. It needs
  jax >= 0.11; on jax >= 0.12 it also runs on CPU in Mosaic GPU interpret
  mode (`plgpu.InterpretGPUParams`), which the tests use.
- `portable`: `pl.pallas_call` with BlockSpecs, a K loop and
  `lax.dot_general(int8, int8 -> int32)`, run with `interpret=True` on CPU
  on every jax version (Mosaic GPU has no `dot_general` lowering, and the
  Triton backend is deprecated, so it is not a GPU path).

Split-half int4 packing (see `qweight`) means each K step reads one K tile
of packed weights and two K tiles of activations (one per half of `d_in`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Mosaic GPU is experimental; keep catjax importable without it.
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - depends on the jax build
  plgpu = None

MOSAIC_MIN_JAX = (0, 11)
SMEM_BUDGET = 200 * 1024  # bytes of SMEM a CTA may use (H100: 227 KiB).
_TILE_K = (128, 64)  # bytes of int8 per row per K step: 128B or 64B swizzle.
_BLOCK_N = (128, 64, 32, 16, 8)
OUT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _jax_version() -> tuple[int, ...]:
  return tuple(int(p) for p in jax.__version__.split(".")[:2])


def has_mosaic_gpu() -> bool:
  """Whether this jax can build the Mosaic GPU body."""
  return plgpu is not None and _jax_version() >= MOSAIC_MIN_JAX and hasattr(plgpu, "kernel")


def has_gpu_interpret() -> bool:
  """Whether this jax can run Mosaic GPU kernels on CPU (GPU interpret mode)."""
  return has_mosaic_gpu() and hasattr(plgpu, "InterpretGPUParams")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TileConfig:
  """Tile sizes of the integer matmul kernel.

  Attributes:
    tile_m: tokens per CTA, 64 or 128 (wgmma works on 64-row slabs).
    tile_n: output channels per CTA, a multiple of 8 up to 256.
    tile_k: bytes of a stored weight row per K step (= K channels for 8-bit
      weights, channel pairs for packed 4-bit), 64 or 128 (the SMEM swizzle).
    max_concurrent_steps: depth of the TMA pipeline over K.
  """

  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 128
  max_concurrent_steps: int = 2

  def __post_init__(self):
    if self.tile_m not in (64, 128):
      raise ValueError(f"tile_m must be 64 or 128, got {self.tile_m=}")
    if not (8 <= self.tile_n <= 256 and self.tile_n % 8 == 0):
      raise ValueError(f"tile_n must be a multiple of 8 in [8, 256], got {self.tile_n=}")
    if self.tile_k not in _TILE_K:
      raise ValueError(f"tile_k must be one of {_TILE_K}, got {self.tile_k=}")
    if self.max_concurrent_steps < 1:
      raise ValueError(f"max_concurrent_steps must be >= 1, got {self.max_concurrent_steps=}")


def _halves(bits: int) -> int:
  return 2 if bits <= 4 else 1


def smem_bytes(config: TileConfig, *, bits: int, out_dtype=jnp.float32) -> int:
  """Shared memory the Mosaic GPU body allocates for `config`."""
  h = _halves(bits)
  stage = h * config.tile_m * config.tile_k + config.tile_n * config.tile_k
  unpacked = (2 * config.tile_n * config.tile_k) if h == 2 else 0
  out = config.tile_m * config.tile_n * jnp.dtype(out_dtype).itemsize
  return config.max_concurrent_steps * stage + unpacked + out


def choose_block_config(m: int, d_in: int, d_out: int, *, bits: int = 4,
                        out_dtype=jnp.float32) -> TileConfig:
  """Heuristic tiles: small `m` (decode) gets 64x64 tiles for more CTAs.

  `tile_k` is 128 bytes (128B swizzle) when it divides the stored row, else
  64; the pipeline is as deep as SMEM allows, up to 4 stages. Shapes the
  kernel cannot take still get a config; `unsupported_reason` says why.
  """
  tile_m = 64 if m <= 64 else 128
  prefer = (64, 128, 32, 16, 8) if m <= 64 else _BLOCK_N
  tile_n = next((b for b in prefer if d_out % b == 0), 8)
  row = d_in // _halves(bits)
  tile_k = next((b for b in _TILE_K if row % b == 0), 64)
  k_steps = max(1, row // tile_k)
  steps = 1
  for s in range(min(4, k_steps), 0, -1):
    cfg = TileConfig(tile_m=tile_m, tile_n=tile_n, tile_k=tile_k, max_concurrent_steps=s)
    if smem_bytes(cfg, bits=bits, out_dtype=out_dtype) <= SMEM_BUDGET:
      steps = s
      break
  return TileConfig(tile_m=tile_m, tile_n=tile_n, tile_k=tile_k, max_concurrent_steps=steps)


def unsupported_reason(m: int, d_in: int, d_out: int, *, bits: int, out_dtype=jnp.float32,
                       config: TileConfig | None = None, interpret: bool = False) -> str | None:
  """Why the Pallas kernel cannot take this problem, or None if it can.

  Args:
    m: tokens (any m works: rows are padded to `tile_m`).
    d_in, d_out: layer shape.
    bits: weight bits.
    out_dtype: float32 or bfloat16.
    config: tiles (default `choose_block_config`).
    interpret: checking for interpret mode on CPU, which skips the device and
      jax-version checks of the GPU path.
  """
  del m
  cfg = config or choose_block_config(1, d_in, d_out, bits=bits, out_dtype=out_dtype)
  row = d_in // _halves(bits)
  if jnp.dtype(out_dtype) not in OUT_DTYPES:
    return f"out_dtype must be float32 or bfloat16, got {out_dtype=}"
  if row % cfg.tile_k:
    return (f"stored weight row ({row} bytes for {d_in=} at {bits=}) is not a multiple of "
            f"tile_k={cfg.tile_k} (int8 wgmma needs 64- or 128-byte K tiles)")
  if d_out % cfg.tile_n:
    return f"{d_out=} is not a multiple of tile_n={cfg.tile_n}"
  if (nbytes := smem_bytes(cfg, bits=bits, out_dtype=out_dtype)) > SMEM_BUDGET:
    return f"{cfg} needs {nbytes} bytes of shared memory (> {SMEM_BUDGET})"
  if interpret:
    return None
  if not has_mosaic_gpu():
    return f"the Mosaic GPU kernel needs jax >= {'.'.join(map(str, MOSAIC_MIN_JAX))}, have {jax.__version__}"
  dev = jax.devices()[0]
  if dev.platform != "gpu":
    return f"the Pallas kernel runs on an NVIDIA GPU; the default device is {dev.platform!r}"
  cc = str(getattr(dev, "compute_capability", ""))
  if not cc.startswith("9."):
    return f"the kernel uses Hopper wgmma (compute capability 9.x); {dev.device_kind} has {cc or 'unknown'}"
  return None


def _unpack_halves(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Signed low and high nibbles of int8 bytes, as int8 (via int16: Mosaic GPU
  has no 8-bit arithmetic)."""
  w16 = w.astype(jnp.int16)
  lo = lax.shift_right_arithmetic(lax.shift_left(w16, jnp.int16(12)), jnp.int16(12))
  hi = lax.shift_right_arithmetic(w16, jnp.int16(4))
  return lo.astype(jnp.int8), hi.astype(jnp.int8)


def _pad_rows(x_q, s_x, tile_m):
  m = x_q.shape[0]
  mp = -(-m // tile_m) * tile_m
  if mp != m:
    x_q = jnp.pad(x_q, ((0, mp - m), (0, 0)))
    s_x = jnp.pad(s_x, ((0, mp - m), (0, 0)), constant_values=1.0)
  return x_q, s_x


# ----------------------------------------------------------------------------
# Portable Pallas body (interpret mode on CPU, every jax version).


def _portable_body(x_ref, sx_ref, w_ref, sw_ref, o_ref, *, halves, tile_k, k_steps):
  row = k_steps * tile_k
  bm, bn = o_ref.shape

  def step(k, acc):
    w = w_ref[:, pl.ds(k * tile_k, tile_k)]
    ws = _unpack_halves(w) if halves == 2 else (w,)
    for h, wh in enumerate(ws):
      xh = x_ref[:, pl.ds(h * row + k * tile_k, tile_k)]
      acc = acc + lax.dot_general(xh, wh, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    return acc

  acc = lax.fori_loop(0, k_steps, step, jnp.zeros((bm, bn), jnp.int32))
  out = acc.astype(jnp.float32) * sx_ref[...] * sw_ref[...]
  o_ref[...] = out.astype(o_ref.dtype)


def _matmul_portable(x_q, s_x, values, scale, *, bits, config, out_dtype):
  m, d_in = x_q.shape
  d_out, row = values.shape
  bm, bn, bk = config.tile_m, config.tile_n, config.tile_k
  x_q, s_x = _pad_rows(x_q, s_x, bm)
  body = functools.partial(_portable_body, halves=_halves(bits), tile_k=bk, k_steps=row // bk)
  out = pl.pallas_call(
      body,
      out_shape=jax.ShapeDtypeStruct((x_q.shape[0], d_out), out_dtype),
      grid=(x_q.shape[0] // bm, d_out // bn),
      in_specs=[
          pl.BlockSpec((bm, d_in), lambda i, j: (i, 0)),
          pl.BlockSpec((bm, 1), lambda i, j: (i, 0)),
          pl.BlockSpec((bn, row), lambda i, j: (j, 0)),
          pl.BlockSpec((1, bn), lambda i, j: (0, j)),
      ],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      interpret=True,
  )(x_q, s_x, values, scale.reshape(1, d_out))
  return out[:m]


# ----------------------------------------------------------------------------
# Mosaic GPU body (Hopper; GPU interpret mode on CPU with jax >= 0.12).


def _smem_transforms(row_bytes: int):
  swizzle = plgpu.find_swizzle(row_bytes * 8)
  return (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))


def _load_vector(ref, layout):
  """A scale vector from GMEM into registers in `layout`.

  `optimized=False`: jax 0.11 has no optimized (vectorized) GMEM load into a
  WGMMA row/column layout ("Only optimized transfers to SMEM supported");
  the vectors are `tile_m` / `tile_n` floats per tile, so a plain load is
  cheap.
  """
  if "idx" in inspect.signature(plgpu.load).parameters:  # jax < 0.12
    return plgpu.load(ref.at[...], layout=layout, optimized=False)
  return plgpu.load(ref, layout=layout, optimized=False)


def _transposed(ref):
  """A `(n, k)` SMEM ref viewed as `(k, n)`: the K-major B operand of int8 wgmma."""
  return ref.transpose((1, 0)) if hasattr(ref, "transpose") else plgpu.transpose_ref(ref, (1, 0))


def _mosaic_body(x_gmem, sx_gmem, w_gmem, sw_gmem, o_gmem, o_smem, wu_smem=None, *,
                 halves, config, k_steps, out_dtype):
  """One `(tile_m, tile_n)` output tile per CTA; a TMA pipeline over K tiles."""
  bm, bn, bk = config.tile_m, config.tile_n, config.tile_k
  m_slice = pl.ds(lax.axis_index("m") * bm, bm)
  n_slice = pl.ds(lax.axis_index("n") * bn, bn)
  tiles = _smem_transforms(bk)

  in_specs = [plgpu.BlockSpec((bm, bk), functools.partial(lambda h, k: (0, k + h * k_steps), h),
                              transforms=tiles) for h in range(halves)]
  in_specs.append(plgpu.BlockSpec((bn, bk), lambda k: (0, k), transforms=tiles))

  def scope(acc_ref):
    def step(_, *refs):
      *x_tiles, w_tile = refs
      if halves == 2:
        lo, hi = _unpack_halves(w_tile[...])
        wu_smem[0] = lo
        wu_smem[1] = hi
        plgpu.commit_smem()  # make the register stores visible to wgmma
        w_tiles = (wu_smem.at[0], wu_smem.at[1])
      else:
        w_tiles = (w_tile,)
      for xt, wt in zip(x_tiles, w_tiles):
        plgpu.wgmma(acc_ref, xt, _transposed(wt))
      plgpu.wgmma_wait(0)  # wu_smem is rewritten by the next step

    plgpu.emit_pipeline(step, grid=(k_steps,), in_specs=in_specs,
                        max_concurrent_steps=min(config.max_concurrent_steps, k_steps))(
                            *([x_gmem.at[m_slice]] * halves), w_gmem.at[n_slice])
    return acc_ref[...]

  acc = pl.run_scoped(scope, plgpu.ACC((bm, bn), jnp.int32))
  s_x = _load_vector(sx_gmem.at[m_slice], plgpu.Layout.WGMMA.reduce(1))
  s_w = _load_vector(sw_gmem.at[n_slice], plgpu.Layout.WGMMA.reduce(0))
  out = acc.astype(jnp.float32) * s_x[:, None] * s_w[None, :]
  o_smem[...] = out.astype(out_dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[m_slice, n_slice])
  plgpu.wait_smem_to_gmem(0)


def _matmul_mosaic(x_q, s_x, values, scale, *, bits, config, out_dtype, interpret=False):
  if not has_mosaic_gpu():
    raise ValueError(f"the Mosaic GPU kernel needs jax >= {MOSAIC_MIN_JAX}, have {jax.__version__}")
  if interpret and not has_gpu_interpret():
    raise ValueError(f"jax {jax.__version__} has no Mosaic GPU interpret mode")
  m = x_q.shape[0]
  d_out, row = values.shape
  bm, bn, bk = config.tile_m, config.tile_n, config.tile_k
  halves = _halves(bits)
  x_q, s_x = _pad_rows(x_q, s_x, bm)
  out_bytes = bn * jnp.dtype(out_dtype).itemsize
  out_swizzle = plgpu.find_swizzle(out_bytes * 8)
  out_tiles = (plgpu.TilingTransform((8, out_swizzle // jnp.dtype(out_dtype).itemsize)),
               plgpu.SwizzleTransform(out_swizzle))
  body = functools.partial(_mosaic_body, halves=halves, config=config, k_steps=row // bk,
                           out_dtype=out_dtype)
  kernel = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((x_q.shape[0], d_out), out_dtype),
      grid=(x_q.shape[0] // bm, d_out // bn),
      grid_names=("m", "n"),
      scratch_types=[plgpu.SMEM((bm, bn), out_dtype, transforms=out_tiles)]
      + ([plgpu.SMEM((2, bn, bk), jnp.int8, transforms=_smem_transforms(bk))] if halves == 2 else []),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      **({"interpret": plgpu.InterpretGPUParams()} if interpret else {}),
  )
  return kernel(x_q, s_x.reshape(-1), values, scale)[:m]


def int_matmul(x_q: jax.Array, s_x: jax.Array, values: jax.Array, scale: jax.Array, *,
               bits: int, config: TileConfig, out_dtype=jnp.float32, body: str = "mosaic",
               interpret: bool = False) -> jax.Array:
  """`(x_q · w_qᵀ) · s_x · s_w` by a Pallas kernel (the kernel part of the op).

  Args:
    x_q: int8 `(m, d_in)` quantized (transformed) activations.
    s_x: float32 `(m, 1)` per-token scales.
    values: `QuantizedWeight.values` of one layer.
    scale: float32 `(d_out,)` per-channel weight scales.
    bits: weight bits.
    config: tiles; the shape must pass `unsupported_reason`.
    out_dtype: float32 or bfloat16.
    body: "mosaic" (Hopper; or GPU interpret mode) or "portable"
      (`pallas_call` in interpret mode).
    interpret: run the mosaic body in Mosaic GPU interpret mode on CPU.

  Returns:
    `out_dtype (m, d_out)`.

  Raises:
    ValueError: an unknown body, or a jax without what the body needs.
  """
  if body == "portable":
    return _matmul_portable(x_q, s_x, values, scale, bits=bits, config=config, out_dtype=out_dtype)
  if body == "mosaic":
    return _matmul_mosaic(x_q, s_x, values, scale, bits=bits, config=config,
                          out_dtype=out_dtype, interpret=interpret)
  raise ValueError(f"body must be 'mosaic' or 'portable', got {body=!r}")
