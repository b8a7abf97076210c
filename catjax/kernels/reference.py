"""The specification of the quantized, transformed matmul, in plain jnp.

For activations `x (m, d_in)`, an optional block-diagonal transform `B`
(`transform_blocks`, `(d_in/k, k, k)`, the convention of
`catjax.core.transforms.Transform.blocks`) and a `QuantizedWeight`:

1. `x' = x Bᵀ` blockwise in float32 (`"...bk,bjk->...bj"`, HIGHEST precision);
2. `x'` is quantized per token to `a_bits` with `catjax.core.quant.quantize`
   (symmetric, `scale = a_clip · absmax / qmax`, round-half-even, clip; int8
   values);
3. `acc = x_q · w_qᵀ` with int32 accumulation;
4. `out = (acc · s_x) · s_w`, in float32, cast to `out_dtype`.

Steps 1-2 (`quantize_activations`) are the pre-pass every implementation
shares; steps 3-4 (`int_matmul`) are what the Pallas kernels compute, so a
kernel agrees with this reference bit for bit (docs/design.md §1.1, §1.3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from catjax.core import quant
from catjax.kernels import qweight
from catjax.core.linalg import HIGHEST


def transform_activations(x: jax.Array, transform_blocks: jax.Array | None) -> jax.Array:
  """`x Bᵀ` blockwise in float32 for `x (..., d_in)`; identity when None."""
  v = jnp.asarray(x).astype(jnp.float32)
  if transform_blocks is None:
    return v
  nb, k, _ = transform_blocks.shape
  v = v.reshape(v.shape[:-1] + (nb, k))
  v = jnp.einsum("...bk,bjk->...bj", v, transform_blocks.astype(jnp.float32), precision=HIGHEST)
  return v.reshape(v.shape[:-2] + (nb * k,))


def quantize_activations(x: jax.Array, transform_blocks: jax.Array | None, *,
                         a_bits: int, a_clip: float | jax.Array = 1.0
                         ) -> tuple[jax.Array, jax.Array]:
  """The pre-pass: transform, then quantize per token.

  Args:
    x: `(m, d_in)` activations (any float dtype).
    transform_blocks: `(d_in/k, k, k)` blocks or None.
    a_bits: activation bit width, 2..8.
    a_clip: clip ratio of the per-token range, in (0, 1]: a number, or a float32
      scalar array (e.g. learned per layer; may be traced).

  Returns:
    `(x_q, s_x)`: int8 `(m, d_in)` integers and float32 `(m, 1)` scales; a
    token holding a NaN or ±Inf gets a NaN scale.
  """
  static = isinstance(a_clip, (int, float))
  config = quant.activation_config(a_bits, clip_ratio=a_clip if static else 1.0)
  q = quant.quantize(transform_activations(x, transform_blocks), config,
                     clip=None if static else a_clip)
  return q.values, q.scale


def int_matmul(x_q: jax.Array, s_x: jax.Array, values: jax.Array, scale: jax.Array, *,
               bits: int, out_dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """Integer matmul and scale epilogue on pre-quantized operands.

  Args:
    x_q: int8 `(m, d_in)`.
    s_x: float32 `(m, 1)` per-token scales.
    values: `QuantizedWeight.values` of one layer, `(d_out, d_in[/2])`.
    scale: float32 `(d_out,)` per-channel scales.
    bits: weight bit width (decides whether `values` is packed).
    out_dtype: float32 or bfloat16.

  Returns:
    `(out, acc)`: `out_dtype (m, d_out)` and the int32 accumulator.
  """
  w_q = qweight.unpack_values(values, bits=bits)
  acc = jax.lax.dot_general(x_q, w_q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
  out = acc.astype(jnp.float32) * s_x.reshape(-1, 1) * scale.reshape(1, -1)
  return out.astype(out_dtype), acc


def quantized_matmul(x: jax.Array, transform_blocks: jax.Array | None,
                     qw: qweight.QuantizedWeight, *, a_bits: int, a_clip: float | jax.Array = 1.0,
                     out_dtype=jnp.float32) -> jax.Array:
  """Reference `(m, d_in) -> (m, d_out)` transformed W`bits`A`a_bits` matmul.

  Inputs are assumed validated (see `catjax.kernels.quantized_matmul`).
  """
  x_q, s_x = quantize_activations(x, transform_blocks, a_bits=a_bits, a_clip=a_clip)
  return int_matmul(x_q, s_x, qw.values, qw.scale, bits=qw.bits, out_dtype=out_dtype)[0]
