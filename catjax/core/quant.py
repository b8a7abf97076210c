"""Round-to-nearest (RTN) quantizers: uniform integers, MXFP4 and NVFP4; int4 packing.

Conventions (docs/design.md §1.1): activations `x` have shape `(..., tokens, d_in)` and
are quantized per token (one scale per row, reduction over the last axis);
kernels have shape `(d_in, d_out)` and are quantized per output channel (one
scale per column, reduction over axis -2). `group_size` splits the reduced
axis -- the input channels in both cases -- into groups with a scale each.

Symmetric `b`-bit quantization uses the levels `-qmax..qmax`,
`qmax = 2^(b-1) - 1`, so the range `2·absmax` is cut into `N(b) = 2^b - 2`
steps; asymmetric quantization uses `2^b - 1` steps over `[min, max]` (the
range always contains zero) and an integer zero point.

The FP4 formats (docs/design.md §1.1) round `v / scale` to the E2M1 grid
(magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6; nearest, ties to even, saturating at
±6) with one scale per block of consecutive elements along the reduced axis:
MXFP4 (OCP Microscaling) a power of two `2^(floor(log2 absmax) - 2)` per 32
elements (E8M0); NVFP4 an FP8-E4M3 scale per 16 elements times a float32
second-level scale per matrix (weights) or per token (activations). They
exist as fake quantization only (`fake_quantize`): `quantize` and the
integer export refuse them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from catjax.base.checks import is_ratio

GRANULARITIES = ("tensor", "token", "channel")
FORMATS = ("int", "mxfp4", "nvfp4")
FP4_GROUP = {"mxfp4": 32, "nvfp4": 16}  # elements per shared scale (the OCP spec calls it a block)
E2M1_MAX = 6.0  # largest E2M1 magnitude
E4M3_MAX = 448.0  # largest finite float8_e4m3fn


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
  """An RTN quantizer: uniform integers, or the FP4 block formats.

  Attributes:
    format: "int" (uniform integer levels), "mxfp4" or "nvfp4" (E2M1
      elements with a scale per block of 32 / 16 input channels; `bits` 4,
      symmetric, granularity "token" or "channel", `group_size` the block
      size, filled in when None).
    bits: bit width, 2..8.
    symmetric: symmetric (`-qmax..qmax`, no zero point) or asymmetric
      (`0..2^b-1` with an integer zero point).
    granularity: "tensor" (one scale), "token" (one scale per row of an
      activation, reduction over the last axis) or "channel" (one scale per
      output channel of a `(d_in, d_out)` kernel, reduction over axis -2).
    group_size: optional size of groups of input channels along the reduced
      axis; each group gets its own scale. Must divide that axis.
    clip_ratio: the quantization range is `clip_ratio` times the observed
      range, in (0, 1].
  """

  bits: int = 4
  symmetric: bool = True
  granularity: str = "token"
  group_size: int | None = None
  clip_ratio: float = 1.0
  format: str = "int"

  def __post_init__(self):
    if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
      raise ValueError(f"bits must be an integer in 2..8, got {self.bits=!r}")
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity=!r}")
    if self.group_size is not None:
      if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
        raise ValueError(f"group_size must be a positive integer or None, got {self.group_size=!r}")
      if self.granularity == "tensor":
        raise ValueError(
            f"group_size={self.group_size} needs granularity 'token' or 'channel', got {self.granularity=!r}")
    if not isinstance(self.symmetric, (bool, np.bool_)):
      raise ValueError(f"symmetric must be True or False, got {self.symmetric=!r}")
    if not is_ratio(self.clip_ratio):
      raise ValueError(f"clip_ratio must be a number in (0, 1], got {self.clip_ratio=!r}")
    if not isinstance(self.format, str) or self.format not in FORMATS:
      raise ValueError(f"format must be one of {FORMATS}, got {self.format=!r}")
    if self.format != "int":
      block = FP4_GROUP[self.format]
      if self.bits != 4:
        raise ValueError(f"format={self.format!r} has 4-bit E2M1 elements: bits must be 4, "
                         f"got {self.bits=!r}")
      if not self.symmetric:
        raise ValueError(f"format={self.format!r} is symmetric: symmetric must be True")
      if self.granularity == "tensor":
        raise ValueError(f"format={self.format!r} scales blocks of {block} along the reduced axis: "
                         f"granularity must be 'token' or 'channel', got {self.granularity=!r}")
      if self.group_size not in (None, block):
        raise ValueError(f"format={self.format!r} has one scale per {block} elements: group_size "
                         f"must be None or {block}, got {self.group_size=!r}")
      object.__setattr__(self, "group_size", block)

  @property
  def is_fp4(self) -> bool:
    """Whether this is an FP4 block format (fake quantization only)."""
    return self.format != "int"

  def _integer_only(self, what: str) -> None:
    if self.is_fp4:
      raise ValueError(f"{what} is defined for integer formats only; format={self.format!r} "
                       f"has E2M1 elements (magnitudes up to {E2M1_MAX:g}) and block scales")

  @property
  def qmax(self) -> int:
    """Largest integer level: `2^(b-1)-1` symmetric, `2^b-1` asymmetric."""
    self._integer_only("qmax")
    return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

  @property
  def num_steps(self) -> int:
    """`N(b)`: quantization steps across the range (docs/design.md §1.1)."""
    self._integer_only("num_steps")
    return 2**self.bits - 2 if self.symmetric else 2**self.bits - 1

  @property
  def storage_dtype(self):
    self._integer_only("storage_dtype")
    return jnp.int8 if self.symmetric else jnp.uint8


def activation_config(bits: int, **kw) -> QuantConfig:
  """Symmetric per-token quantizer for activations (`format=` for FP4)."""
  return QuantConfig(bits=bits, granularity="token", **kw)


def weight_config(bits: int, **kw) -> QuantConfig:
  """Symmetric per-output-channel quantizer for `(d_in, d_out)` kernels (`format=`
  for FP4: blocks along d_in)."""
  return QuantConfig(bits=bits, granularity="channel", **kw)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["values", "scale", "zero_point"],
    meta_fields=["config", "shape"])
@dataclasses.dataclass(frozen=True)
class QArray:
  """Integer values with their scales (and zero points when asymmetric).

  `values` has the shape of the quantized array; `scale` and `zero_point`
  are shaped to broadcast against the grouped view of it (see `dequantize`).
  """

  values: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None
  config: QuantConfig
  shape: tuple[int, ...]


def _reduced_axis(ndim: int, config: QuantConfig) -> int | None:
  if config.granularity == "tensor":
    return None
  need = 1 if config.granularity == "token" else 2
  if ndim < need:
    raise ValueError(
        f"granularity {config.granularity!r} needs an array of rank >= {need}, got rank {ndim}")
  return ndim - 1 if config.granularity == "token" else ndim - 2


def grouped(v: jax.Array, config: QuantConfig) -> tuple[jax.Array, tuple[int, ...]]:
  """Reshape `v` so that every quantization group is reduced over `axes`."""
  axis = _reduced_axis(v.ndim, config)
  if axis is None:
    return v, tuple(range(v.ndim))
  if config.group_size is None:
    return v, (axis,)
  n = v.shape[axis]
  if n % config.group_size and config.is_fp4:
    raise ValueError(
        f"format={config.format!r} scales blocks of {config.group_size} elements along axis "
        f"{axis}: its size {n} ({v.shape=}) is not a multiple of {config.group_size}")
  if n % config.group_size:
    raise ValueError(
        f"group_size must divide the reduced axis: {v.shape=} axis={axis} (size {n}) "
        f"group_size={config.group_size}")
  shape = v.shape[:axis] + (n // config.group_size, config.group_size) + v.shape[axis + 1:]
  return v.reshape(shape), (axis + 1,)


def quantize(v: jax.Array, config: QuantConfig, *, clip: jax.Array | None = None) -> QArray:
  """Round-to-nearest quantization of `v` (computed in float32).

  Args:
    v: array to quantize; rank >= 1 for "token", >= 2 for "channel".
    config: the quantizer.
    clip: a scalar clip ratio (may be traced) in place of `config.clip_ratio`.

  Returns:
    A `QArray` with int8 (symmetric) or uint8 (asymmetric) values. Integers
    cannot hold NaN: a group with a NaN or ±Inf gets a NaN scale (its
    values and zero point are then meaningless), so `dequantize` and the
    integer matmul give NaN there instead of finite numbers.

  Raises:
    ValueError: for ranks or group sizes the config cannot take, and for the
      FP4 formats (no integer storage; use `fake_quantize`).
  """
  if config.is_fp4:
    raise ValueError(f"no integer storage for {config.format}; use fake quantization "
                     "(catjax.core.quant.fake_quantize)")
  v = jnp.asarray(v)
  shape = v.shape
  g, axes = grouped(v.astype(jnp.float32), config)
  q, scale, zero = _levels(g, axes, config, clip)
  zero = None if zero is None else zero.astype(jnp.int32)
  values = q.astype(config.storage_dtype).reshape(shape)
  return QArray(values=values, scale=scale, zero_point=zero, config=config, shape=shape)


def channel_absmax(g: jax.Array, axes, sign: float = 1.0) -> jax.Array:
  """`max(sign · g)` over `axes` (`g` already `|g|` for the absolute maximum),
  +Inf where the group holds a NaN: XLA's max reductions need not propagate
  NaN (on CPU, those over a non-minor axis drop it)."""
  return jnp.max(jnp.where(jnp.isnan(g), jnp.inf, sign * g), axis=axes, keepdims=True)


def safe_scale(scale: jax.Array) -> jax.Array:
  """`scale` with 1 where it is 0 (an all-zero group) and NaN where it is
  infinite (a group holding a NaN or ±Inf), so such a group quantizes to NaN."""
  return jnp.where(scale == 0, 1.0, jnp.where(jnp.isinf(scale), jnp.nan, scale))


def _levels(g: jax.Array, axes, config: QuantConfig, clip: jax.Array | None = None):
  """`(levels, scale, zero point or None)` of grouped float32 `g`; the levels
  are integers held as float32 (exact: at most 8 bits). A group with a NaN or
  ±Inf gets a NaN scale. `clip` replaces `config.clip_ratio` when given."""
  clip = jnp.float32(config.clip_ratio) if clip is None else jnp.asarray(clip, jnp.float32)
  if config.symmetric:
    scale = safe_scale(clip * channel_absmax(jnp.abs(g), axes) / config.qmax)
    return jnp.clip(jnp.round(g / scale), -config.qmax, config.qmax), scale, None
  lo = jnp.minimum(-channel_absmax(g, axes, -1.0), 0.0) * clip
  hi = jnp.maximum(channel_absmax(g, axes), 0.0) * clip
  scale = safe_scale((hi - lo) / config.qmax)
  zero = jnp.clip(jnp.round(-lo / scale), 0, config.qmax)
  return jnp.clip(jnp.round(g / scale) + zero, 0, config.qmax), scale, zero


def dequantize(q: QArray, dtype: Any = jnp.float32) -> jax.Array:
  """Back to real values: `(q - zero_point) * scale`, in `dtype`."""
  g, _ = grouped(q.values, q.config)
  g = g.astype(jnp.float32)
  if q.zero_point is not None:
    g = g - q.zero_point.astype(jnp.float32)
  return (g * q.scale).reshape(q.shape).astype(dtype)


def fake_quantize(v: jax.Array, config: QuantConfig, *, clip: jax.Array | None = None
                  ) -> jax.Array:
  """`dequantize(quantize(v))`, returned in the dtype of `v`: the same values,
  computed without the round trip through the integer storage dtype (the
  levels are exact integers in float32). FP4 formats: `E2M1(v / s) · s` with
  each block's scale `s` (`fp4_scales`). A group holding a NaN or ±Inf comes
  back all NaN; an all-zero group comes back zero. `clip`: a scalar clip ratio (may
  be traced, e.g. learned per layer) in place of `config.clip_ratio`; integer formats."""
  v = jnp.asarray(v)
  if clip is not None and config.is_fp4:
    raise ValueError(f"a clip ratio per call takes the integer format, not {config.format!r}")
  if config.is_fp4:
    g, axes = grouped(v.astype(jnp.float32), config)
    return _fp4_levels(g, _fp4_scale(g, axes, config)).reshape(v.shape).astype(v.dtype)
  g, axes = grouped(v.astype(jnp.float32), config)
  q, scale, zero = _levels(g, axes, config, clip)
  return ((q if zero is None else q - zero) * scale).reshape(v.shape).astype(v.dtype)


def round_e2m1(u: jax.Array) -> jax.Array:
  """`u` rounded to the E2M1 grid (0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6): nearest,
  ties to even, saturating at ±6; NaN stays NaN. Exact in the dtype of `u`:
  the grid step is 0.5 below 2, 1 below 4 and 2 above, and on each step's
  range the even multiples are the even mantissas. The same values as a cast
  through float4_e2m1fn (tests/test_formats.py), which has no NaN and is
  about four times slower on CPU."""
  u = jnp.asarray(u)
  a = jnp.abs(u)
  step = jnp.where(a < 2, 0.5, jnp.where(a < 4, 1.0, 2.0)).astype(u.dtype)
  q = jnp.minimum(jnp.round(a / step) * step, E2M1_MAX)  # jnp.round: ties to even; NaN stays
  return jnp.copysign(q, u)


def _pow2(e: jax.Array) -> jax.Array:
  """`2^e` in float32, exactly, for integer `e` in -126..127 (from the bits)."""
  return jax.lax.bitcast_convert_type(jnp.left_shift(e + 127, 23).astype(jnp.int32), jnp.float32)


def _floor_log2(a: jax.Array) -> jax.Array:
  """`floor(log2 a)` of float32 `a >= 0` from its exponent bits (-127 for 0
  and subnormals, 128 for Inf)."""
  return jnp.right_shift(jax.lax.bitcast_convert_type(a, jnp.int32), 23) - 127


def round_e4m3(a: jax.Array) -> jax.Array:
  """Float32 `a` in [0, 448] rounded to float8_e4m3fn: nearest, ties to even.
  Exact: the step is `2^(e-3)` on the binade `[2^e, 2^(e+1))`, `2^-9` below
  `2^-6` (subnormals). The same values as a cast through float8_e4m3fn
  (tests/test_formats.py), which XLA on CPU runs far slower."""
  step = _pow2(jnp.maximum(_floor_log2(a), -6) - 3)
  return jnp.round(a / step) * step


def _fp4_parts(g: jax.Array, axes, config: QuantConfig) -> tuple[jax.Array, jax.Array]:
  """`(block scale, second-level scale)` of grouped float32 `g` (keepdims shapes).

  MXFP4: `2^(floor(log2(clip · absmax)) - 2)`, the exponent clamped to
  -126..127 (E8M0 reaches -127, float32 normals -126; XLA on CPU flushes
  subnormals), and a second-level scale of 1. NVFP4: the second level is
  `clip · absmax · float32(1 / (6 · 448))` over the finite blocks of each matrix
  ("channel") or token ("token"), 1 where that is 0, and the block scale
  `e4m3(min(clip · absmax_block / (6 · second), 448))` (float8_e4m3fn
  rounding, `round_e4m3`). A block holding a NaN or ±Inf gets a NaN block scale.
  """
  clip = jnp.float32(config.clip_ratio)
  amax = clip * channel_absmax(jnp.abs(g), axes)  # +Inf where the block holds a NaN or ±Inf
  if config.format == "mxfp4":
    block = _pow2(jnp.clip(_floor_log2(amax) - 2, -126, 127))
    return jnp.where(jnp.isinf(amax), jnp.nan, block), jnp.ones_like(block)
  outer = tuple(range(min(axes) - 1, g.ndim))  # the blocks' axis, the block and what follows
  tensor = jnp.max(jnp.where(jnp.isinf(amax), 0.0, amax), axis=outer, keepdims=True)
  # Times the float32 reciprocal, as XLA computes a division by a constant anyway.
  second = tensor * np.float32(1 / (E2M1_MAX * E4M3_MAX))
  second = jnp.where(second == 0, 1.0, second)
  block = round_e4m3(jnp.minimum(amax / (E2M1_MAX * second), E4M3_MAX))
  return jnp.where(jnp.isinf(amax), jnp.nan, block), second


def _fp4_scale(g: jax.Array, axes, config: QuantConfig) -> jax.Array:
  """Each block's scale `block · second` (`_fp4_parts`); 0 for a block of zeros
  under NVFP4 (or whose E4M3 scale underflows), NaN for a non-finite block."""
  block, second = _fp4_parts(g, axes, config)
  return block * second


def _fp4_levels(g: jax.Array, scale: jax.Array) -> jax.Array:
  """`E2M1(g / scale) · scale`; 0 where the scale is 0."""
  return round_e2m1(g / jnp.where(scale == 0, 1.0, scale)) * scale


def fp4_scales(v: jax.Array, config: QuantConfig) -> tuple[jax.Array, jax.Array]:
  """The scales an FP4 `config` gives `v`, `(block, second)` in float32.

  `block` has the shape of the grouped view of `v` with the block axis of
  size 1 (`(..., d_in/block, 1, d_out)` for "channel", `(..., d/block, 1)`
  for "token"): E8M0 powers of two (MXFP4) or E4M3 values (NVFP4); NaN for a
  block holding a NaN or ±Inf. `second` broadcasts against it: 1 (MXFP4),
  the float32 scale of each matrix or token (NVFP4). A block's elements are
  `E2M1(v / (block · second)) · block · second`.

  Raises:
    ValueError: an integer config, or a width the block size does not divide.
  """
  if not config.is_fp4:
    raise ValueError(f"fp4_scales takes format 'mxfp4' or 'nvfp4', got {config.format=!r}")
  g, axes = grouped(jnp.asarray(v).astype(jnp.float32), config)
  return _fp4_parts(g, axes, config)


def pack_int4(q: jax.Array, *, axis: int = -1) -> jax.Array:
  """Pack pairs of 4-bit integers along `axis` into one byte each.

  Element `2i` goes to the low nibble and `2i+1` to the high nibble.
  int8 input must lie in [-8, 7] (signed nibbles); uint8 input in [0, 15].

  Raises:
    ValueError: for other dtypes or an odd length along `axis`.
  """
  q = jnp.asarray(q)
  if q.dtype not in (jnp.int8, jnp.uint8):
    raise ValueError(f"pack_int4 takes int8 or uint8 values, got {q.dtype=}")
  if q.ndim == 0 or q.shape[axis] % 2:
    raise ValueError(f"pack_int4 needs an even length along axis {axis}, got {q.shape=}")
  q = jnp.moveaxis(q, axis, -1)
  lo, hi = q[..., 0::2], q[..., 1::2]
  packed = (lo & 0x0F) | jnp.left_shift(hi, 4)
  return jnp.moveaxis(packed.astype(q.dtype), -1, axis)


def unpack_int4(p: jax.Array, *, axis: int = -1) -> jax.Array:
  """Inverse of `pack_int4`: int8 bytes give signed nibbles, uint8 unsigned."""
  p = jnp.asarray(p)
  if p.dtype not in (jnp.int8, jnp.uint8):
    raise ValueError(f"unpack_int4 takes int8 or uint8 bytes, got {p.dtype=}")
  p = jnp.moveaxis(p, axis, -1)
  # Arithmetic shifts on int8 sign-extend; on uint8 they are logical.
  lo = jnp.right_shift(jnp.left_shift(p, 4), 4)
  hi = jnp.right_shift(p, 4)
  out = jnp.stack([lo, hi], axis=-1).reshape(p.shape[:-1] + (2 * p.shape[-1],))
  return jnp.moveaxis(out, -1, axis)


def fake_quantize_clip_search(kernel: jax.Array, config: QuantConfig, *,
                              importance: jax.Array | None = None,
                              ratios=(1.0, 0.9, 0.8, 0.7, 0.6, 0.5),
                              return_scale: bool = False):
  """Per-output-channel fake quantization with the best clip ratio of each channel.

  For every column `j` of `kernel (..., d_in, d_out)` and every ratio `r` in
  `ratios`, quantize with the range `r · max_i |w_ij|` and keep the result
  with the least `Σ_i importance_i (w_ij - Q(w)_ij)²` (plain squared error
  when `importance` is None; use the energy `E[x_i²]` of each input channel
  to minimize the output error of a diagonal activation model). A NaN
  importance makes the channels it weighs NaN.

  Returns:
    The fake-quantized kernel (NaN in every channel holding a NaN or ±Inf);
    with `return_scale`, also the chosen scales `(..., d_out)`.

  Raises:
    ValueError: a config that is not symmetric per channel without groups,
      an `importance` that does not match `d_in`, or no ratio in (0, 1].
  """
  if config.is_fp4:
    raise ValueError(f"clip search takes an integer format, got {config.format=!r}")
  if config.granularity != "channel" or not config.symmetric or config.group_size is not None:
    raise ValueError(f"clip search takes a symmetric per-channel config without groups, got {config}")
  ratios = tuple(ratios)
  if not ratios or not all(is_ratio(r) for r in ratios):
    raise ValueError(f"ratios must be a non-empty sequence of numbers in (0, 1], got {ratios!r}")
  kernel = jnp.asarray(kernel)
  if kernel.ndim < 2:
    raise ValueError(f"kernel must be (..., d_in, d_out), got {kernel.shape=}")
  k = kernel.astype(jnp.float32)
  if importance is None:
    w = jnp.ones(k.shape[:-1] + (1,), jnp.float32)
  else:
    importance = jnp.asarray(importance, jnp.float32)
    if importance.shape != k.shape[:-1]:
      raise ValueError(f"importance must have shape {k.shape[:-1]}, got {importance.shape=}")
    negative = jnp.sum(importance < 0)
    if not isinstance(negative, jax.core.Tracer) and int(negative):
      raise ValueError(f"importance must be >= 0 (energies E[x_i²]), got {int(negative)} "
                       "negative value(s)")
    w = importance[..., None]
  absmax = channel_absmax(jnp.abs(k), -2)
  best = best_err = best_scale = None
  for r in ratios:
    scale = safe_scale(float(r) * absmax / config.qmax)
    q = jnp.clip(jnp.round(k / scale), -config.qmax, config.qmax) * scale
    err = jnp.sum(w * (q - k) ** 2, axis=-2, keepdims=True)
    if best is None:
      best, best_err, best_scale = q, err, scale
    else:
      take = err < best_err
      best, best_err = jnp.where(take, q, best), jnp.where(take, err, best_err)
      best_scale = jnp.where(take, scale, best_scale)
  best = jnp.where(jnp.isnan(best_err), jnp.nan, best).astype(kernel.dtype)  # NaN importance
  return (best, best_scale[..., 0, :]) if return_scale else best
