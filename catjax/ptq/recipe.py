"""`Recipe`: how to quantize a model, one frozen, validated record."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from catjax.base.checks import check_bits, check_bool, check_int, check_seed, is_real
from catjax.core import hadamard as hd
from catjax.core import transforms as tf
from catjax.ptq import rounding
from catjax.models.config import ModelConfig
from catjax.models.spec import spec_for
from catjax.core.quant import FORMATS, FP4_GROUP, QuantConfig, activation_config, weight_config
from catjax.core.transforms import DEFAULT_EPS
from catjax.ptq.configs import CONFIGS, GPTQConfig, SmoothQuantConfig, SpinQuantConfig, TrainConfig


def ptq_methods() -> tuple[str, ...]:
  """The recipe methods: "fp" switches quantization off, "none" quantizes without a
  transform, every other is a transform of `catjax.core.transforms.REGISTRY` (read
  at call time, so a registered transform is a method)."""
  return ("fp", "none") + tuple(m for m in tf.REGISTRY if m != "identity")


PTQ_METHODS = ptq_methods()  # those registered in catjax itself


WEIGHT_METHODS = rounding.NAMES  # the registry `catjax.ptq.rounding.REGISTRY`


PROPAGATE = ("auto", "fp", "quantized")


# Fields of earlier versions, old name -> where it lives now (files written before
# keep loading): the flat GPTQ, training and SmoothQuant fields went into configs.
RENAMED = {"gptq_block": "gptq.lazy_batch", "gptq_lazy_batch": "gptq.lazy_batch",
           "gptq_damping": "gptq.damping", "act_order": "gptq.act_order",
           "train_steps": "train.steps", "train_lr": "train.lr", "train_batch": "train.batch",
           "train_w_clip": "train.w_clip", "alpha": "smoothquant.alpha"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
  """How to quantize a model: one frozen, validated record.

  Attributes:
    method: one of `ptq_methods()`; "fp" switches quantization off.
    block_size: `k` of block CAT (methods whose `B` has `k × k` blocks, "cat");
      must divide every site width.
    w_bits: weight bits (symmetric, per output channel), 2..8; None keeps
      weights in floating point.
    a_bits: activation bits (symmetric, per token), 2..8; None keeps them.
    w_format / a_format: number format of the weights / activations (one of
      `catjax.core.quant.FORMATS`): "int" (uniform integers, the default),
      "mxfp4" or "nvfp4" (E2M1 elements with a scale per block of 32 / 16
      input channels, `catjax.core.quant.fake_quantize`; bits must be 4). FP4
      weights take weights="rtn" or "gptq", not the clip search nor, with
      `train.steps`, learned weight clips (`train.w_clip=False`); they have
      no integer export.
    kv_bits: KV-cache bits (asymmetric, per token and head), or None (16-bit).
    a_clip: activation clip ratio in (0, 1].
    weights: how kernels are rounded, a method of `catjax.ptq.rounding.REGISTRY`:
      "rtn" (round to nearest), "clip" (per output channel, the clip ratio of
      `catjax.ptq.rounding.clip.GRID` with the least activation-weighted squared
      error) or "gptq" (`catjax.gptq_quantize` with the site's Hessian `T Σ_x Tᵀ`).
    gptq: GPTQ's settings, a `catjax.ptq.configs.GPTQConfig` (damping, lazy
      batch, act-order).
    train: trained CAT's settings, a `catjax.ptq.configs.TrainConfig`
      (`steps` > 0 trains, methods with a block-diagonal part only; lr, batch,
      learned weight clips).
    smoothquant: SmoothQuant's settings, a `catjax.ptq.configs.SmoothQuantConfig`.
    spinquant: SpinQuant's optimizer, a `catjax.ptq.configs.SpinQuantConfig`
      (method "spinquant" with `train.steps` > 0: rotations learned end to end,
      `catjax.ptq.spinquant`).
    propagate: what the next block sees: "fp" (outputs of the
      full-precision block) or "quantized" (of the quantized block); "auto"
      is "quantized" for GPTQ or trained recipes, else "fp".
    seed: seed of the randomized Hadamard signs and of the training batches.
    hadamard: where the Hadamard of a method with `k × k` blocks and a Hadamard
      ("cat", "cat_full") acts: "full" (one randomized Hadamard of the whole
      width after the blocks, as fitted) or "block" (a Hadamard of the block
      size folded into each block, so the transform is one block-diagonal
      matrix, as a fused kernel wants).
    eps: relative damping of the second moments in the fits, finite and >= 0.
    fit_x64: fit in float64 (default); False fits in float32 with the
      eigenvalue floors, ~3x faster for wide sites, at some accuracy cost.
  """

  method: str = "cat"
  block_size: int = tf.DEFAULT_BLOCK_SIZE
  w_bits: int | None = 4
  a_bits: int | None = 4
  w_format: str = "int"
  a_format: str = "int"
  kv_bits: int | None = None
  a_clip: float = 1.0
  weights: str = "rtn"
  gptq: GPTQConfig = GPTQConfig()
  train: TrainConfig = TrainConfig()
  smoothquant: SmoothQuantConfig = SmoothQuantConfig()
  spinquant: SpinQuantConfig = SpinQuantConfig()
  propagate: str = "auto"
  seed: int = 0
  hadamard: str = "full"
  eps: float = DEFAULT_EPS
  fit_x64: bool = True

  def __post_init__(self):
    if self.method not in ptq_methods():
      raise ValueError(f"method={self.method!r}: expected one of {ptq_methods()}")
    check_int("block_size", self.block_size, 1)
    check_bits("w_bits", self.w_bits)
    check_bits("a_bits", self.a_bits)
    check_bits("kv_bits", self.kv_bits)
    if not (is_real(self.a_clip) and 0.0 < self.a_clip <= 1.0):
      raise ValueError(f"a_clip={self.a_clip!r}: expected a ratio in (0, 1]")
    if self.weights not in rounding.REGISTRY:
      raise ValueError(f"weights={self.weights!r}: expected one of {tuple(rounding.REGISTRY)}")
    for name, kind in CONFIGS.items():
      if not isinstance(getattr(self, name), kind):
        raise ValueError(f"{name}={getattr(self, name)!r}: expected a {kind.__name__}")
    if not (is_real(self.eps) and self.eps >= 0):
      raise ValueError(f"eps={self.eps!r}: expected a finite value >= 0")
    check_seed("seed", self.seed)
    check_bool("fit_x64", self.fit_x64)
    if self.propagate not in PROPAGATE:
      raise ValueError(f"propagate={self.propagate!r}: expected one of {PROPAGATE}")
    transform = self.transform
    if self.train.steps and (transform is None or not (transform.blocks or transform.end_to_end)):
      trainable = ", ".join(m.name for m in tf.REGISTRY.values() if m.blocks or m.end_to_end)
      raise ValueError(f"train.steps={self.train.steps} needs a method with trainable blocks "
                       f"({trainable}), not {self.method!r}")
    if self.train.a_clip:
      why = ("needs train.steps > 0" if not self.train.steps else
             f"is learned block by block, not by {self.method!r}" if transform.end_to_end else
             "needs quantized activations (a_bits)" if self.a_bits is None else
             f"takes integer activations, not a_format={self.a_format!r}"
             if self.a_format != "int" else None)
      if why:
        raise ValueError(f"train.a_clip=True (a learned activation clip per layer and site) {why}")
    if self.hadamard not in ("full", "block"):
      raise ValueError(f"hadamard={self.hadamard!r}: expected 'full' or 'block'")
    if self.hadamard == "block" and not (transform and transform.eigen_fit and transform.hadamard):
      foldable = " and ".join(repr(m.name) for m in tf.REGISTRY.values()
                              if m.eigen_fit and m.hadamard)
      raise ValueError(f"hadamard='block' applies to {foldable}, not {self.method!r}")
    self._check_formats()

  def _check_formats(self) -> None:
    for side, fmt, bits in (("w", self.w_format, self.w_bits), ("a", self.a_format, self.a_bits)):
      if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ValueError(f"{side}_format={fmt!r}: expected one of {FORMATS}")
      if fmt != "int" and bits not in (None, 4):
        raise ValueError(f"{side}_format={fmt!r} has 4-bit E2M1 elements: {side}_bits must be 4 "
                         f"(or None for 16-bit), got {side}_bits={bits!r}")
    if self.w_format == "int" or self.w_bits is None or self.method == "fp":
      return
    why = rounding.REGISTRY[self.weights].integer_only
    if why:
      fits = " or ".join(repr(m.name) for m in rounding.REGISTRY.values() if not m.integer_only)
      raise ValueError(f"weights={self.weights!r} {why}; with w_format={self.w_format!r} use "
                       f"weights={fits}")
    if self.train.steps and self.train.w_clip:
      raise ValueError(f"trained CAT's learned weight clip ratios (train.w_clip=True) scale an "
                       f"integer per-channel grid; with w_format={self.w_format!r} set "
                       f"train.w_clip=False (method spec option @nowc)")

  @property
  def transform_method(self) -> str | None:
    """The transform of `catjax.core.transforms` this recipe fits (None: no transform)."""
    return None if self.method in ("fp", "none") else self.method

  @property
  def transform(self) -> tf.Method | None:
    """The registry entry of `transform_method` (None: no transform)."""
    return None if self.transform_method is None else tf.REGISTRY[self.transform_method]

  @property
  def site_block_size(self) -> int | None:
    """`block_size` where the method takes one (`Method.takes_block_size`), else None."""
    t = self.transform
    return self.block_size if t is not None and t.takes_block_size else None

  @property
  def quantized(self) -> bool:
    return self.method != "fp" and (self.w_bits, self.a_bits, self.kv_bits) != (None,) * 3

  @property
  def propagates_quantized(self) -> bool:
    """Whether the next block sees the quantized block's outputs (resolves "auto")."""
    if self.propagate == "auto":
      return self.quantized and (rounding.REGISTRY[self.weights].propagates_quantized
                                 or self.train.steps > 0)
    return self.propagate == "quantized" and self.quantized

  @property
  def a_config(self) -> QuantConfig | None:
    if self.method == "fp" or self.a_bits is None:
      return None
    return activation_config(self.a_bits, clip_ratio=float(self.a_clip), format=self.a_format)

  @property
  def w_config(self) -> QuantConfig | None:
    if self.method == "fp" or self.w_bits is None:
      return None
    return weight_config(self.w_bits, format=self.w_format)

  @property
  def kv_config(self) -> QuantConfig | None:
    if self.method == "fp" or self.kv_bits is None:
      return None
    return QuantConfig(bits=self.kv_bits, symmetric=False, granularity="token")

  @property
  def label(self) -> str:
    """Short name, e.g. "cat k=64 W4A4", "cat k=64 gptq t200 W4A4", "fp"; FP4
    formats: "cat k=64 MXFP4" (both operands), "none W4A8 w:nvfp4" (one)."""
    if self.method == "fp":
      return "fp"
    k = self.site_block_size
    name = self.method if k is None else f"{self.method} k={k}"
    name += " blockH" if self.hadamard == "block" else ""
    name += rounding.REGISTRY[self.weights].label(self)
    name += f" aclip={self.a_clip:g}" if self.a_clip != 1.0 else ""
    name += f" t{self.train.steps}" if self.train.steps else ""
    name += " nowc" if self.train.steps and not self.train.w_clip else ""
    name += " lac" if self.train.a_clip else ""
    end_to_end = self.train.steps and self.transform is not None and self.transform.end_to_end
    name += " nofold" if end_to_end and not self.spinquant.fold_norms else ""
    name += "" if self.fit_x64 else " f32"
    if self.propagate != "auto":
      name += f" prop={self.propagate}"
    bits = f"W{self.w_bits or 16}A{self.a_bits or 16}"
    w_fmt = self.w_format if self.w_bits else "int"
    a_fmt = self.a_format if self.a_bits else "int"
    if w_fmt == a_fmt != "int":
      bits = w_fmt.upper()
    else:
      bits += "".join(f" {side}:{fmt}" for side, fmt in (("w", w_fmt), ("a", a_fmt))
                      if fmt != "int")
    return f"{name} {bits}" + (f" KV{self.kv_bits}" if self.kv_bits else "")

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "label": self.label}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Recipe":
    """The recipe of `to_dict()` (or of a checkpoint manifest / plan file): the
    display-only "label" is dropped, the configs are rebuilt from their dicts
    and fields of earlier versions take their current places (`RENAMED`).

    Raises:
      TypeError: an unknown field, naming it.
    """
    changes = {}
    for k, v in d.items():
      if k == "label":
        continue
      if k in CONFIGS and isinstance(v, dict):
        changes.update({f"{k}.{field}": x for field, x in v.items()})
      else:
        changes[RENAMED.get(k, k)] = v
    return cls().with_fields(changes)

  def with_fields(self, changes: dict[str, Any]) -> "Recipe":
    """A copy with `changes` applied: recipe fields by name, config fields by a
    dotted path ("train.steps", "gptq.damping"); validated as a new recipe."""
    flat, nested = {}, {}
    for k, v in changes.items():
      if "." in k:
        name, field = k.split(".", 1)
        nested.setdefault(name, {})[field] = v
      else:
        flat[k] = v
    for name, kw in nested.items():
      if name not in CONFIGS:
        raise ValueError(f"{name!r} in {name}.{next(iter(kw))}: expected one of {tuple(CONFIGS)}")
      flat[name] = dataclasses.replace(getattr(self, name), **kw)
    return dataclasses.replace(self, **flat)

  # -- the per-site policy interface (`catjax.ptq.policy`): the uniform case -----

  def recipe(self, layer: int, site: str) -> "Recipe":
    """The recipe of block `layer`'s `site`: this one, for every site."""
    return self

  @property
  def base(self) -> "Recipe":
    return self

  @property
  def uniform(self) -> "Recipe":
    return self

  def predicted_db(self) -> dict[tuple[int, str], float]:
    """A recipe carries no planner predictions."""
    return {}

  def check_model(self, cfg: ModelConfig, *, sites: tuple[str, ...] | None = None) -> None:
    """Raise ValueError, before any work, if this recipe cannot quantize `cfg`'s
    widths (those of `sites` only, if given)."""
    dims = spec_for(cfg).site_dims(cfg)
    dims = {s: d for s, d in dims.items() if sites is None or s in sites}
    for side, fmt, bits in (("w", self.w_format, self.w_bits), ("a", self.a_format, self.a_bits)):
      if fmt == "int" or bits is None or self.method == "fp":
        continue
      bad = {s: d for s, d in dims.items() if d % FP4_GROUP[fmt]}
      if bad:
        raise ValueError(f"{side}_format={fmt!r} scales blocks of {FP4_GROUP[fmt]} input channels: "
                         f"the site widths {bad} of this model are not multiples of "
                         f"{FP4_GROUP[fmt]}")
    if self.site_block_size is not None:
      bad = {s: d for s, d in dims.items() if d % self.block_size}
      if bad:
        common = np.gcd.reduce(list(dims.values()))
        raise ValueError(
            f"block_size={self.block_size} does not divide the site widths {bad} of this "
            f"model; block sizes that divide every width divide {common}")
    if self.hadamard == "block" and not hd.is_supported(self.block_size):
      raise ValueError(f"hadamard='block' needs a Hadamard matrix of block_size="
                       f"{self.block_size}; it has none (see catjax.core.hadamard)")
    if self.transform is not None and self.transform.hadamard:
      bad = sorted({d for d in dims.values() if not hd.is_supported(d)})
      if bad:
        raise ValueError(f"method {self.method!r} needs a Hadamard matrix of every site width; "
                         f"widths {bad} of this model have none (see catjax.core.hadamard)")
