"""The site hook of a quantized forward: online transform, then activation / KV fake quantization.

A transform with a learned activation clip (`Transform.a_clip`) sets the clip
ratio of its site's quantizer. One hook serves every policy (`catjax.ptq.policy`): a site has one or more
*variants* (its transform kind and activation quantizer); a site with one
variant reads its transform straight from the hook state, a site whose
layers use several reads `{"choice": (L,), "transforms": (per variant)}` and
runs the layer's variant with `lax.switch`. A recipe is the case of one
variant at every site.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax

from catjax.core.quant import QuantConfig, fake_quantize
from catjax.core.transforms import Transform
from catjax.ptq.rounding.base import clipped_quantize


def fake_quantize_ste(x: jax.Array, config: QuantConfig, *, ste: bool,
                      clip: jax.Array | None = None) -> jax.Array:
  """`fake_quantize` (with the scalar clip ratio `clip` in place of the config's, where
  given); with `ste`, its gradient is the identity (straight-through), and with a
  `clip` too the rounding alone is straight-through, so that the clip ratio gets
  LSQ's gradient and clipped values none (symmetric integer configs)."""
  if clip is None or not ste:
    q = fake_quantize(x, config, clip=clip)
    return x + jax.lax.stop_gradient(q - x) if ste else q
  if not config.symmetric or config.is_fp4 or config.granularity != "token" or config.group_size:
    raise ValueError(f"a learned clip takes a symmetric integer per-token quantizer, got {config}")
  return clipped_quantize(x, clip, config.qmax, axis=-1)[0].astype(x.dtype)


def _run(x: jax.Array, transform: Transform | None, config: QuantConfig | None, ste: bool):
  if transform is not None:
    x = transform.apply(x)
  if config is None:
    return x
  return fake_quantize_ste(x, config, ste=ste, clip=None if transform is None else transform.a_clip)


@dataclasses.dataclass(frozen=True)
class SiteHook:
  """The site hook of a quantized forward.

  At every linear-input site: the layer's online transform (from the hook
  state), then per-token activation fake quantization; at the key/value sites
  `kv_sites`: KV fake quantization. Frozen and hashable: a static jit argument.

  Attributes:
    configs: `((site, (activation config or None, one per variant)), ...)`;
      a site not listed has one variant without activation quantization.
    kv_config: the KV-cache quantizer, or None.
    kv_sites: the sites that carry keys and values.
    ste: straight-through gradients of the rounding (for training).
  """

  configs: tuple[tuple[str, tuple[QuantConfig | None, ...]], ...] = ()
  kv_config: QuantConfig | None = None
  kv_sites: tuple[str, ...] = ("keys", "values")
  ste: bool = False

  @classmethod
  def uniform(cls, sites: Sequence[str], a_config: QuantConfig | None,
              kv_config: QuantConfig | None = None, kv_sites: tuple[str, ...] = ("keys", "values"),
              *, ste: bool = False) -> "SiteHook":
    """The hook that quantizes the activations of every one of `sites` with `a_config`."""
    return cls(tuple((s, (a_config,)) for s in sites), kv_config, tuple(kv_sites), ste)

  def __call__(self, site: str, x: jax.Array, state):
    if site in self.kv_sites:
      return (x if self.kv_config is None else fake_quantize_ste(x, self.kv_config, ste=self.ste)), None
    configs = dict(self.configs).get(site, (None,))
    if len(configs) == 1:
      return _run(x, state, configs[0], self.ste), None
    branches = [lambda x, ts, i=i: _run(x, ts[i], configs[i], self.ste) for i in range(len(configs))]
    return jax.lax.switch(state["choice"], branches, x, state["transforms"]), None
