"""Site hooks of a quantized forward: online transform, then activation / KV fake quantization."""

from __future__ import annotations

import dataclasses

import jax

from catjax.core.quant import QuantConfig, fake_quantize
from catjax.core.transforms import Transform


def fake_quantize_ste(x: jax.Array, config: QuantConfig, *, ste: bool) -> jax.Array:
  """`fake_quantize`; with `ste`, its gradient is the identity (straight-through)."""
  q = fake_quantize(x, config)
  return x + jax.lax.stop_gradient(q - x) if ste else q


@dataclasses.dataclass(frozen=True)
class QuantHook:
  """The site hook of a quantized forward.

  At every linear-input site: online transform (this layer's `Transform`, the
  hook state) then per-token activation fake quantization; at the key/value
  sites `kv_sites`: KV fake quantization. `ste`: straight-through gradients
  of the rounding (for training). Frozen and hashable: a static jit argument.
  """

  a_config: QuantConfig | None = None
  kv_config: QuantConfig | None = None
  kv_sites: tuple[str, ...] = ("keys", "values")
  ste: bool = False

  def __call__(self, site: str, x: jax.Array, transform: Transform | None):
    if site in self.kv_sites:
      return (x if self.kv_config is None else fake_quantize_ste(x, self.kv_config, ste=self.ste)), None
    if transform is not None:
      x = transform.apply(x)
    if self.a_config is not None:
      x = fake_quantize_ste(x, self.a_config, ste=self.ste)
    return x, None
