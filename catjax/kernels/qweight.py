"""Quantized weights in the layout the kernels read (docs/design.md §1.1).

A `(d_in, d_out)` kernel is quantized symmetrically per output channel with
`catjax.core.quant.quantize` (so the integers and scales are exactly those of
`weight_config(bits)`) and stored **K-major**: `values` has shape
`(d_out, d_in)` for 5..8 bits, i.e. the transpose of the kernel. Hopper's
int8 tensor-core instruction (wgmma) takes both operands K-major only, so
storing the transpose once at quantization time saves a transpose per call.

For 2..4 bits two values share a byte (`catjax.core.quant.pack_int4`), paired
**split-half**: byte `j` of row `o` holds input channel `j` in its low nibble
and channel `j + d_in/2` in its high nibble, so `values` is
`(d_out, d_in/2)`. Unpacking a tile then gives two contiguous K-tiles (one
from each half of `d_in`) instead of interleaved columns, which a GPU kernel
could only produce with register shuffles.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from catjax.core import quant


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["values", "scale"], meta_fields=["bits", "shape"])
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
  """A per-output-channel quantized `(d_in, d_out)` kernel, as a pytree.

  Leading axes (e.g. stacked layers) are allowed on both arrays; `shape`
  names the trailing `(d_in, d_out)` of one layer, so slicing the stack under
  `jax.lax.scan` keeps the metadata valid.

  Attributes:
    values: int8 `(..., d_out, d_in)` for `bits > 4`, or `(..., d_out, d_in/2)`
      with split-half packed signed nibbles for `bits <= 4` (see module doc).
    scale: float32 `(..., d_out)` per-channel scales.
    bits: weight bit width, 2..8.
    shape: `(d_in, d_out)` of the unquantized kernel.
  """

  values: jax.Array
  scale: jax.Array
  bits: int
  shape: tuple[int, int]

  @property
  def packed(self) -> bool:
    """Whether two values share a byte (`bits <= 4`)."""
    return self.bits <= 4

  @property
  def nbytes(self) -> int:
    """Bytes of `values` and `scale` together."""
    return int(self.values.size * self.values.dtype.itemsize
               + self.scale.size * self.scale.dtype.itemsize)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """The real-valued kernel `(..., d_in, d_out)` these integers stand for."""
    q = unpack_values(self.values, bits=self.bits).astype(jnp.float32)
    return (jnp.swapaxes(q, -1, -2) * self.scale[..., None, :]).astype(dtype)


def _check_bits(bits) -> int:
  if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
    raise ValueError(f"bits must be an integer in 2..8, got {bits=!r}")
  return bits


def pack_values(q: jax.Array) -> jax.Array:
  """Split-half packing of int8 nibbles along the last axis.

  Args:
    q: int8 `(..., d_out, d_in)` values in [-8, 7], `d_in` even.

  Returns:
    int8 `(..., d_out, d_in/2)`: low nibble channel `j`, high nibble `j + d_in/2`.

  Raises:
    ValueError: odd `d_in` or a dtype other than int8.
  """
  q = jnp.asarray(q)
  if q.dtype != jnp.int8 or q.ndim < 1 or q.shape[-1] % 2:
    raise ValueError(f"pack_values takes int8 values with an even last axis, got {q.shape=} {q.dtype=}")
  h = q.shape[-1] // 2
  pairs = jnp.stack([q[..., :h], q[..., h:]], axis=-1)  # (..., h, 2): (low, high)
  return quant.pack_int4(pairs, axis=-1)[..., 0]


def unpack_values(values: jax.Array, *, bits: int) -> jax.Array:
  """Inverse of the storage layout: int8 `(..., d_out, d_in)` integers."""
  if _check_bits(bits) > 4:
    return values
  pairs = quant.unpack_int4(values[..., None], axis=-1)  # (..., h, 2)
  return jnp.concatenate([pairs[..., 0], pairs[..., 1]], axis=-1)


def quantize_weight(kernel: jax.Array, *, bits: int, scale: jax.Array | None = None
                    ) -> QuantizedWeight:
  """Quantize a `(..., d_in, d_out)` kernel per output channel for the kernels.

  Args:
    kernel: float kernel of a linear layer `y = x @ kernel` (leading axes,
      such as stacked layers, are kept).
    bits: weight bit width, 2..8; `bits <= 4` packs two values per byte.
    scale: optional per-channel scales `(..., d_out)` of a grid the kernel
      already lies on (e.g. GPTQ or clip-searched fake-quantized kernels);
      default: RTN scales `max |kernel| / qmax`.

  Returns:
    A `QuantizedWeight` with K-major values (see the module docstring).
    Integers cannot hold NaN: the scale of an output channel holding a NaN
    or ±Inf is NaN, so that channel of `dequantize` and of
    `quantized_matmul`'s output is NaN, never finite.

  Raises:
    ValueError: rank < 2, a bit width outside 2..8, an odd `d_in` when
      packing, or (eagerly) a `scale` with values <= 0.
  """
  bits = _check_bits(bits)
  kernel = jnp.asarray(kernel)
  if kernel.ndim < 2 or not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise ValueError(f"kernel must be a float (..., d_in, d_out) array, got {kernel.shape=} {kernel.dtype=}")
  d_in, d_out = kernel.shape[-2:]
  if bits <= 4 and d_in % 2:
    raise ValueError(f"packing {bits}-bit weights needs an even d_in, got {kernel.shape=} {bits=}")
  config = quant.weight_config(bits)
  if scale is None:
    q = quant.quantize(kernel, config)
    values, scale = q.values, q.scale[..., 0, :].astype(jnp.float32)
  else:
    scale = jnp.asarray(scale, jnp.float32)
    if scale.shape != kernel.shape[:-2] + (d_out,):
      raise ValueError(f"scale must have shape {kernel.shape[:-2] + (d_out,)}, got {scale.shape=}")
    bad = jnp.sum(scale <= 0)
    if not isinstance(bad, jax.core.Tracer) and int(bad):
      raise ValueError(f"scale must be > 0, got {int(bad)} value(s) <= 0")
    k = kernel.astype(jnp.float32)
    scale = jnp.where(jnp.all(jnp.isfinite(k), axis=-2), scale, jnp.nan)
    v = jnp.round(k / scale[..., None, :])
    values = jnp.clip(v, -config.qmax, config.qmax).astype(jnp.int8)
  values = jnp.swapaxes(values, -1, -2)
  if bits <= 4:
    values = pack_values(values)
  return QuantizedWeight(values=values, scale=scale, bits=bits, shape=(int(d_in), int(d_out)))
