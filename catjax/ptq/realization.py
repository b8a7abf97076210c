"""Real quantized inference: linears that store integer weights and run
`catjax.kernels.quantized_matmul`.

`realize(model, qm)` turns a fake-quantized model from the PTQ pipeline into
one whose seven block linears hold packed int4 (or int8) weights, per-channel
scales and, when the site's transform is block-diagonal, that transform, which
the kernel applies before quantizing the activations per token. Transforms with
a full-width Hadamard or a channel permutation stay in the site hook (online),
ahead of the kernel.
"""

from __future__ import annotations

from flax import nnx

from catjax.kernels import QuantizedWeight, quantize_weight, quantized_matmul
from catjax.models.llama import Llama
from catjax.models.spec import get_path, set_path, spec_for
from catjax.ptq.quantized import QuantizedModel


class QLinear(nnx.Module):
  """`y = Q_a(x Bᵀ) · Q_w(W) (+ bias)` with integer weights, stacked like `Linear`.

  Attributes:
    values, scale: the `QuantizedWeight` arrays (leading layer axis).
    blocks: the site's block-diagonal transform `(L, d/k, k, k)`, or None.
    bias: float bias or None.
    clips: the site's learned activation clip ratios `(L,)` (`Transform.a_clip`),
      or None (`a_clip`, the recipe's, for every layer).
  """

  def __init__(self, qweight: QuantizedWeight, *, bias, blocks, a_bits: int,
               a_clip: float = 1.0, implementation: str | None = None, clips=None):
    self.values = nnx.Param(qweight.values)
    self.scale = nnx.Param(qweight.scale)
    self.blocks = None if blocks is None else nnx.Param(blocks)
    self.bias = None if bias is None else nnx.Param(bias)
    self.clips = None if clips is None else nnx.Param(clips)  # learned, one per layer
    self.bits, self.shape = qweight.bits, qweight.shape
    self.a_bits, self.a_clip, self.implementation = a_bits, a_clip, implementation

  def __call__(self, x):
    qw = QuantizedWeight(self.values[...], self.scale[...], self.bits, self.shape)
    y = quantized_matmul(x, None if self.blocks is None else self.blocks[...], qw,
                         a_bits=self.a_bits,
                         a_clip=self.a_clip if self.clips is None else self.clips[...],
                         implementation=self.implementation).astype(x.dtype)
    return y if self.bias is None else y + self.bias[...].astype(x.dtype)

  @property
  def nbytes(self) -> int:
    return int(self.values[...].nbytes + self.scale[...].nbytes)


def realize(model: Llama, qm: QuantizedModel, *, implementation: str | None = None
            ) -> QuantizedModel:
  """The real quantized counterpart of `qm` (made from `model` by `quantize_model`):
  `qm`'s fake-quantized kernels as integers on the grid of `qm.w_scales`.

  Run it exactly like `qm`: `forward(r.model, tokens, hook=r.hook,
  hook_state=r.transforms)`; its outputs equal `qm`'s up to float rounding.

  Raises:
    ValueError: a recipe without both weight and activation quantization
      (the integer matmul needs both), or with an FP4 format.
  """
  r = qm.policy.uniform
  if r is None:
    raise ValueError(f"{qm.label!r} is a per-site plan whose sites differ: real integer inference "
                     "takes one recipe for the whole model; run the plan as fake quantization")
  if r.method == "fp" or r.w_bits is None or r.a_bits is None:
    raise ValueError(f"real quantized inference needs w_bits and a_bits; recipe {r.label!r} "
                     f"has w_bits={r.w_bits} a_bits={r.a_bits}")
  for side, fmt in (("w", r.w_format), ("a", r.a_format)):
    if fmt != "int":
      raise ValueError(f"no integer storage for {fmt} ({side}_format of recipe {r.label!r}); use "
                       "fake quantization")
  new = nnx.clone(qm.model)  # new modules and variables, shared arrays
  spec = spec_for(model.config)
  online = {}
  for site, path in spec.linears:
    t = None if qm.transforms is None else qm.transforms[site]
    # block-diagonal in the channels' own order: the kernel applies it
    fused = t is not None and t.signs is None and t.perm is None
    if t is not None and not fused:
      online[site] = t
    old = get_path(new.layers, path)
    scale = None if qm.w_scales is None else qm.w_scales[path]
    qw = quantize_weight(old.kernel[...], bits=r.w_bits, scale=scale)
    set_path(new.layers, path, QLinear(qw, bias=None if old.bias is None else old.bias[...],
                                       blocks=t.blocks if fused else None, a_bits=r.a_bits,
                                       a_clip=float(r.a_clip), implementation=implementation,
                                       clips=None if t is None else t.a_clip))
  return QuantizedModel(new, online or None, r, real=True)


def linear_bytes(model: Llama) -> int:
  """Bytes of the block linears' weights (kernels or integer values + scales)."""
  total = 0
  for _, path in spec_for(model.config).linears:
    lin = get_path(model.layers, path)
    total += lin.nbytes if isinstance(lin, QLinear) else int(lin.kernel[...].nbytes)
  return total
