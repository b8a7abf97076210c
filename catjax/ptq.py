"""Post-training quantization: recipes and the per-block pure functions.

A decoder block is quantized by `fit_block` (one transform per site from that
block's statistics) -> `merge_block` (`kernel' = T⁻ᵀ kernel`) ->
`quantize_block` (RTN, clip search or GPTQ per output channel, or per block
of input channels for the FP4 formats); the block
engine (`catjax.engine`) walks the model through them. Which linears read each
site comes from the model's architecture spec (`catjax.models.spec`); every
function here takes one block's pure parameter dict (or, where noted, the
stacked `layers` dict: the leading layer axis is carried along).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from catjax import hadamard as hd
from catjax import transforms as tf
from catjax.gptq import gptq_quantize
from catjax.models.config import ModelConfig
from catjax.models.llama import Llama
from catjax.models.spec import ArchSpec, get_path, spec_for
from catjax.quant import (FORMATS, FP4_BLOCK, QuantConfig, _absmax, _safe_scale,
                          activation_config, fake_quantize, fake_quantize_clip_search, quantize,
                          weight_config)
from catjax.sharding import shard_batch
from catjax.stats import SecondMoment
from catjax.transforms import DEFAULT_EPS, Transform, fit_transform, fold_block_hadamard


def init_stats(cfg: ModelConfig) -> dict[str, SecondMoment]:
  """Empty per-site statistics, stacked over the `num_layers` blocks."""
  n = cfg.num_layers
  return {site: jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)),
                             SecondMoment.zeros(d, dtype=jnp.float32))
          for site, d in spec_for(cfg).site_dims(cfg).items()}


def stats_hook(site, x, state):
  """Site hook that adds `x` to this site's `SecondMoment` (the hook state)."""
  return x, (None if state is None else state.update(x))


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("stats",))
def _calibration_step(graphdef, params, tokens, stats):
  _, out = nnx.merge(graphdef, params)(tokens, hook=stats_hook, hook_state=stats)
  return {site: out[site] for site in stats}


def calibrate(model: Llama, windows: np.ndarray, *, batch_size: int = 1,
              stats: dict[str, SecondMoment] | None = None,
              progress: bool = True, mesh=None) -> dict[str, SecondMoment]:
  """Accumulate `Σ x xᵀ`, per-channel `max |x|` and token counts of every site
  of every block at once, in full precision.

  One jitted forward per batch of windows updates the statistics inside the
  model's site hook; memory is that of the statistics (`L · Σ d²` floats),
  whatever the number of tokens. For analysis and `save_stats`; quantization
  walks the model block by block instead (`catjax.engine`), holding one
  block's statistics. Pass `stats` to continue an accumulation. With a
  `mesh` (`catjax.sharding`) the windows split over its data axis and the
  sums are all-reduced over it.

  Returns:
    `{site: SecondMoment}` with a leading `num_layers` axis.
  """
  windows = np.asarray(windows, np.int32)
  if windows.ndim != 2 or windows.shape[0] < 1:
    raise ValueError(f"windows.shape={windows.shape}; expected (n >= 1, seqlen)")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  stats = init_stats(model.config) if stats is None else stats
  graphdef, params = nnx.split(model)
  for i in tqdm(range(0, len(windows), batch_size), desc="calibration", unit="batch",
                disable=not progress, leave=False):
    stats = _calibration_step(graphdef, params, shard_batch(windows[i:i + batch_size], mesh), stats)
  return stats



def model_fingerprint(model: Llama) -> str:
  """A short hash of `model`'s configuration and weights, to tell which model
  statistics came from: every parameter's path, shape and first 1024 values
  rounded to bfloat16 (so the same checkpoint loaded in float32 or bfloat16
  has the same fingerprint)."""
  import hashlib
  h = hashlib.sha256(json.dumps(model.config.to_hf(), sort_keys=True, default=str).encode())
  for path, var in sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                          key=lambda kv: tuple(map(str, kv[0]))):
    value = var[...]
    head = np.asarray(value.reshape(-1)[:1024].astype(jnp.bfloat16))
    h.update(f"{'.'.join(map(str, path))}{tuple(value.shape)}".encode() + head.tobytes())
  return h.hexdigest()[:16]


def save_stats(path: str | Path, stats: dict[str, SecondMoment], *,
               fingerprint: str | None = None, **meta: Any) -> Path:
  """Write calibration statistics (and JSON-able `meta`) to one `.npz` file,
  atomically (multi-process runs: process 0 writes). `fingerprint`
  (`model_fingerprint`): the model they came from; `load_stats` refuses them
  for any other model. A second moment that is exactly symmetric (as
  `calibrate`'s are) is stored as its upper triangle (`SITE.xx_upper`, half
  the bytes), any other in full (`SITE.xx`): either way `load_stats` gives
  back the same values bit for bit."""
  from catjax.errors import atomic_write, is_writer
  from catjax.sharding import host_value
  if fingerprint is not None:
    meta = {**meta, "model_fingerprint": fingerprint}
  arrays = {}
  for site, st in stats.items():
    xx = host_value(st.xx)
    if np.array_equal(xx, np.swapaxes(xx, -1, -2)):
      rows, cols = np.triu_indices(xx.shape[-1])
      arrays[f"{site}.xx_upper"] = xx[..., rows, cols]
    else:
      arrays[f"{site}.xx"] = xx
    arrays[f"{site}.absmax"] = host_value(st.absmax)
    arrays[f"{site}.count"] = host_value(st.count)
  if is_writer():  # other processes gathered with it; they need not serialize gigabytes
    with atomic_write(path) as tmp, open(tmp, "wb") as fh:  # numpy must not append ".npz"
      np.savez(fh, meta=np.asarray(json.dumps(meta)), **arrays)
  return Path(path)


def _unpack_upper(packed: np.ndarray, d: int, name: str) -> np.ndarray:
  """The symmetric `(..., d, d)` matrices whose upper triangles `packed` holds."""
  if packed.shape[-1:] != (d * (d + 1) // 2,):
    raise ValueError(f"{name} has shape {packed.shape}: the upper triangle of a {d} x {d} "
                     f"matrix has {d * (d + 1) // 2} entries")
  full = np.empty(packed.shape[:-1] + (d, d), packed.dtype)
  rows, cols = np.triu_indices(d)
  full[..., rows, cols] = packed
  full[..., cols, rows] = packed
  return full


def load_stats(path: str | Path, cfg: ModelConfig | None = None, *,
               fingerprint: str | None = None) -> tuple[dict[str, SecondMoment], dict[str, Any]]:
  """Read statistics written by `save_stats`; with `cfg`, check they fit that
  model; with `fingerprint` (`model_fingerprint`), that they came from it.

  Raises:
    FileNotFoundError: no such file.
    InputError (a ValueError): the file is truncated or not a statistics file,
      lacks a site, holds non-finite or impossible (negative second moment)
      values, or does not fit `cfg` / `fingerprint`.
  """
  import zipfile
  from catjax.errors import InputError
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no calibration statistics at {path}")
  try:
    with np.load(path) as z:
      sites = sorted({f.split(".")[0] for f in z.files if f.endswith((".xx", ".xx_upper"))})
      if cfg is not None:
        sites = list(spec_for(cfg).site_names)
      xx_key = {s: f"{s}.xx_upper" if f"{s}.xx_upper" in z.files else f"{s}.xx" for s in sites}
      missing = [name for s in sites for name in (xx_key[s], f"{s}.absmax", f"{s}.count")
                 if name not in z.files] + ([] if "meta" in z.files else ["meta"])
      if missing or not sites:
        raise InputError(path, f"lacks {missing or 'statistics of any site'}; was it written "
                               "by save_stats?")
      raw = {s: {"xx": z[xx_key[s]], "absmax": z[f"{s}.absmax"], "count": z[f"{s}.count"]}
             for s in sites}
      meta = json.loads(str(z["meta"]))
    for s, r in raw.items():
      if xx_key[s].endswith("_upper"):
        r["xx"] = _unpack_upper(r["xx"], r["absmax"].shape[-1], xx_key[s])
  except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
    if isinstance(e, (InputError, FileNotFoundError)):
      raise
    raise InputError(path, f"not a readable statistics file (truncated, or not written by "
                           f"save_stats): {type(e).__name__}: {e}") from None
  for site, r in raw.items():
    xx = r["xx"]
    if not np.isfinite(xx).all() or not np.isfinite(r["absmax"]).all():
      raise InputError(path, f"statistics of {site} hold non-finite values")
    if (np.diagonal(xx, axis1=-2, axis2=-1) < 0).any() or (r["absmax"] < 0).any() \
        or (r["count"] <= 0).any():
      raise InputError(path, f"statistics of {site} are impossible (negative second moment or "
                             "absmax, or no tokens counted); was the file altered?")
  stats = {s: SecondMoment(xx=jnp.asarray(r["xx"]), absmax=jnp.asarray(r["absmax"]),
                           count=jnp.asarray(r["count"])) for s, r in raw.items()}
  if cfg is not None:
    for site, d in spec_for(cfg).site_dims(cfg).items():
      want = (cfg.num_layers, d, d)
      if stats[site].xx.shape != want:
        raise InputError(path, f"statistics do not fit this model: {site} has shape "
                               f"{stats[site].xx.shape}, expected {want}")
  saved = meta.get("model_fingerprint")
  if fingerprint is not None and saved is not None and saved != fingerprint:
    raise InputError(path, f"statistics come from another model (model "
                           f"{meta.get('model', '?')!r}, fingerprint {saved}; this model's is "
                           f"{fingerprint}); recalibrate, or load the model they came from")
  return stats, meta


# ---------------------------------------------------------------------------
# Recipe

# "fp" switches quantization off; "none" quantizes without a transform; every other
# method is a transform of the registry `catjax.transforms.REGISTRY`.
PTQ_METHODS = ("fp", "none") + tuple(m for m in tf.METHODS if m != "identity")
WEIGHT_METHODS = ("rtn", "clip", "gptq")
PROPAGATE = ("auto", "fp", "quantized")
CLIP_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.00, 0.95, ..., 0.50


def _check_bits(name: str, bits) -> None:
  if bits is None:
    return
  if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
    raise ValueError(f"{name}={bits!r}: expected an integer in 2..8, or None for 16-bit")


def _check_int(name: str, v, lo: int) -> None:
  if isinstance(v, bool) or not isinstance(v, int) or v < lo:
    raise ValueError(f"{name}={v!r}: expected an integer >= {lo}")


def _check_bool(name: str, v) -> None:
  if not isinstance(v, (bool, np.bool_)):
    raise ValueError(f"{name}={v!r}: expected True or False")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
  """How to quantize a model: one frozen, validated record.

  Attributes:
    method: one of `PTQ_METHODS`; "fp" switches quantization off.
    block_size: `k` of block CAT ("cat" only); must divide every site width.
    w_bits: weight bits (symmetric, per output channel), 2..8; None keeps
      weights in floating point.
    a_bits: activation bits (symmetric, per token), 2..8; None keeps them.
    w_format / a_format: number format of the weights / activations (one of
      `catjax.quant.FORMATS`): "int" (uniform integers, the default),
      "mxfp4" or "nvfp4" (E2M1 elements with a scale per block of 32 / 16
      input channels, `catjax.quant.fake_quantize`; bits must be 4). FP4
      weights take weights="rtn" or "gptq", not the clip search nor, with
      `train_steps`, learned weight clips (`train_w_clip=False`); they have
      no integer export.
    kv_bits: KV-cache bits (asymmetric, per token and head), or None (16-bit).
    a_clip: activation clip ratio in (0, 1].
    weights: how kernels are rounded: "rtn" (round to nearest), "clip" (per
      output channel, the clip ratio of `CLIP_GRID` with the least
      activation-weighted squared error) or "gptq" (`catjax.gptq_quantize`
      with the site's Hessian `T Σ_x Tᵀ`).
    gptq_damping / gptq_block / act_order: GPTQ's relative damping, lazy
      batch size and descending-diag(H) order. The damping defaults to 10% of
      the mean diagonal, not `gptq_quantize`'s 1%: on SmolLM2 W4A4 with
      32 × 512 calibration tokens it is the better of the two for CAT
      (benchmarks/results/smollm2_gptq_damping.md).
    train_steps: optimizer steps of trained CAT per block (0: closed form);
      methods with a block-diagonal part only.
    train_lr: peak AdamW learning rate (cosine decay) of trained CAT.
    train_batch: calibration windows per training step.
    train_w_clip: trained CAT also learns a weight clip ratio per output
      channel (in [`catjax.train.W_CLIP_MIN`, 1], from 1), which then sets the
      grid of RTN and GPTQ; not with weights="clip" (its search replaces it).
    propagate: what the next block sees: "fp" (outputs of the
      full-precision block) or "quantized" (of the quantized block); "auto"
      is "quantized" for GPTQ or trained recipes, else "fp".
    seed: seed of the randomized Hadamard signs and of the training batches.
    hadamard: where the Hadamard of "cat" / "cat_full" acts: "full" (one
      randomized Hadamard of the whole width after the blocks, as fitted) or
      "block" (a Hadamard of the block size folded into each block, so the
      transform is one block-diagonal matrix, as a fused kernel wants).
    alpha: SmoothQuant migration strength.
    eps: relative damping of the second moments in the fits, finite and >= 0.
    fit_x64: fit in float64 (default); False fits in float32 with the
      eigenvalue floors, ~3x faster for wide sites, at some accuracy cost.
  """

  method: str = "cat"
  block_size: int = 64
  w_bits: int | None = 4
  a_bits: int | None = 4
  w_format: str = "int"
  a_format: str = "int"
  kv_bits: int | None = None
  a_clip: float = 1.0
  weights: str = "rtn"
  gptq_damping: float = 0.1
  gptq_block: int = 128
  act_order: bool = False
  train_steps: int = 0
  train_lr: float = 1e-3
  train_batch: int = 4
  train_w_clip: bool = True
  propagate: str = "auto"
  seed: int = 0
  hadamard: str = "full"
  alpha: float = 0.5
  eps: float = DEFAULT_EPS
  fit_x64: bool = True

  def __post_init__(self):
    if self.method not in PTQ_METHODS:
      raise ValueError(f"method={self.method!r}: expected one of {PTQ_METHODS}")
    _check_int("block_size", self.block_size, 1)
    _check_bits("w_bits", self.w_bits)
    _check_bits("a_bits", self.a_bits)
    _check_bits("kv_bits", self.kv_bits)
    if not (tf._is_real(self.a_clip) and 0.0 < self.a_clip <= 1.0):
      raise ValueError(f"a_clip={self.a_clip!r}: expected a ratio in (0, 1]")
    if self.weights not in WEIGHT_METHODS:
      raise ValueError(f"weights={self.weights!r}: expected one of {WEIGHT_METHODS}")
    if not (tf._is_real(self.gptq_damping) and self.gptq_damping >= 0):
      raise ValueError(f"gptq_damping={self.gptq_damping!r}: expected a finite value >= 0")
    _check_int("gptq_block", self.gptq_block, 1)
    _check_int("train_steps", self.train_steps, 0)
    _check_int("train_batch", self.train_batch, 1)
    if not (tf._is_real(self.train_lr) and self.train_lr > 0):
      raise ValueError(f"train_lr={self.train_lr!r}: expected a finite value > 0")
    if not (tf._is_real(self.eps) and self.eps >= 0):
      raise ValueError(f"eps={self.eps!r}: expected a finite value >= 0")
    if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
      raise ValueError(f"seed={self.seed!r}: expected an integer")
    for name in ("act_order", "train_w_clip", "fit_x64"):
      _check_bool(name, getattr(self, name))
    if self.propagate not in PROPAGATE:
      raise ValueError(f"propagate={self.propagate!r}: expected one of {PROPAGATE}")
    if self.train_steps and (self.method == "fp" or self.transform_method is None
                             or tf.REGISTRY[self.transform_method].blocks is None):
      raise ValueError(f"train_steps={self.train_steps} needs a method with trainable blocks "
                       f"(cat, cat_full, smoothquant...), not {self.method!r}")
    if self.hadamard not in ("full", "block"):
      raise ValueError(f"hadamard={self.hadamard!r}: expected 'full' or 'block'")
    if self.hadamard == "block" and self.method not in ("cat", "cat_full"):
      raise ValueError(f"hadamard='block' applies to 'cat' and 'cat_full', not {self.method!r}")
    if not (tf._is_real(self.alpha) and 0.0 <= self.alpha <= 1.0):
      raise ValueError(f"alpha={self.alpha!r}: expected a value in [0, 1]")
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
    if self.weights == "clip":
      raise ValueError(f"weights='clip' searches clip ratios of an integer grid; with "
                       f"w_format={self.w_format!r} use weights='rtn' or 'gptq'")
    if self.train_steps and self.train_w_clip:
      raise ValueError(f"trained CAT's learned weight clip ratios (train_w_clip=True) scale an "
                       f"integer per-channel grid; with w_format={self.w_format!r} set "
                       f"train_w_clip=False (method spec option @nowc)")

  @property
  def transform_method(self) -> str | None:
    """The transform of `catjax.transforms` this recipe fits (None: no transform)."""
    return None if self.method in ("fp", "none") else self.method

  @property
  def quantized(self) -> bool:
    return self.method != "fp" and (self.w_bits, self.a_bits, self.kv_bits) != (None,) * 3

  @property
  def propagates_quantized(self) -> bool:
    """Whether the next block sees the quantized block's outputs (resolves "auto")."""
    if self.propagate == "auto":
      return self.quantized and (self.weights == "gptq" or self.train_steps > 0)
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
    name = f"{self.method} k={self.block_size}" if self.method == "cat" else self.method
    name += " blockH" if self.hadamard == "block" else ""
    name += "" if self.weights == "rtn" else f" {self.weights}"
    if self.weights == "gptq" and self.gptq_damping != Recipe.gptq_damping:
      name += f" d={self.gptq_damping:g}"
    name += " act-order" if self.weights == "gptq" and self.act_order else ""
    name += f" aclip={self.a_clip:g}" if self.a_clip != 1.0 else ""
    name += f" t{self.train_steps}" if self.train_steps else ""
    name += " nowc" if self.train_steps and not self.train_w_clip else ""
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

  def check_model(self, cfg: ModelConfig, *, sites: tuple[str, ...] | None = None) -> None:
    """Raise ValueError, before any work, if this recipe cannot quantize `cfg`'s
    widths (those of `sites` only, if given)."""
    dims = spec_for(cfg).site_dims(cfg)
    dims = {s: d for s, d in dims.items() if sites is None or s in sites}
    for side, fmt, bits in (("w", self.w_format, self.w_bits), ("a", self.a_format, self.a_bits)):
      if fmt == "int" or bits is None or self.method == "fp":
        continue
      bad = {s: d for s, d in dims.items() if d % FP4_BLOCK[fmt]}
      if bad:
        raise ValueError(f"{side}_format={fmt!r} scales blocks of {FP4_BLOCK[fmt]} input channels: "
                         f"the site widths {bad} of this model are not multiples of "
                         f"{FP4_BLOCK[fmt]}")
    if self.method == "cat":
      bad = {s: d for s, d in dims.items() if d % self.block_size}
      if bad:
        common = np.gcd.reduce(list(dims.values()))
        raise ValueError(
            f"block_size={self.block_size} does not divide the site widths {bad} of this "
            f"model; block sizes that divide every width divide {common}")
    if self.hadamard == "block" and not hd.is_supported(self.block_size):
      raise ValueError(f"hadamard='block' needs a Hadamard matrix of block_size="
                       f"{self.block_size}; it has none (see catjax.hadamard)")
    if self.transform_method and tf.REGISTRY[self.transform_method].hadamard:
      bad = sorted({d for d in dims.values() if not hd.is_supported(d)})
      if bad:
        raise ValueError(f"method {self.method!r} needs a Hadamard matrix of every site width; "
                         f"widths {bad} of this model have none (see catjax.hadamard)")

  def with_spec(self, spec: str) -> "Recipe":
    """This recipe with a method spec applied: `METHOD[@OPT...]`, options `wNaM`
    (bits; 16 = not quantized), `kN` (block size), `kvN` (KV bits), `bh` (block Hadamard), `rtn` /
    `clip` / `gptq` (weight rounding), `tN` (trained CAT, N steps per block),
    `pfp` / `pq` (propagate fp / quantized outputs), `f32` (float32 fits), `dX` (GPTQ damping),
    `act` (GPTQ act-order), `nowc` (trained CAT without learned weight clips),
    `acX` (activation clip ratio), `mxfp4` / `nvfp4` (both formats, and 4 bits), `int`
    (both formats integer), e.g. "none@w6a6", "cat@k192", "cat@bh", "hadamard@gptq",
    "cat@gptq@d0.1@t200", "hadamard@ac0.9", "cat@mxfp4", "hadamard@nvfp4"."""
    method, *opts = spec.strip().split("@")
    kw: dict[str, Any] = {"method": method}
    flags = {"bh": ("hadamard", "block"), "pfp": ("propagate", "fp"),
             "pq": ("propagate", "quantized"), "f32": ("fit_x64", False), "act": ("act_order", True),
             "nowc": ("train_w_clip", False),
             **{w: ("weights", w) for w in WEIGHT_METHODS}}
    for opt in opts:
      o = opt.lower()
      m = (re.fullmatch(r"w(\d+)a(\d+)", o), re.fullmatch(r"kv(\d+)", o), re.fullmatch(r"k(\d+)", o),
           re.fullmatch(r"t(\d+)", o), re.fullmatch(r"d(\d*\.?\d+)", o),
           re.fullmatch(r"ac(\d*\.?\d+)", o))
      if o in flags:
        kw[flags[o][0]] = flags[o][1]
      elif o in FORMATS:
        kw["w_format"] = kw["a_format"] = o
        if o != "int":
          kw["w_bits"] = kw["a_bits"] = 4
      elif m[0]:  # 16 bits: not quantized
        kw["w_bits"], kw["a_bits"] = (None if int(v) == 16 else int(v) for v in m[0].groups())
      elif m[1]:
        kw["kv_bits"] = None if int(m[1][1]) == 16 else int(m[1][1])
      elif m[2]:
        kw["block_size"] = int(m[2][1])
      elif m[3]:
        kw["train_steps"] = int(m[3][1])
      elif m[4]:
        kw["gptq_damping"] = float(m[4][1])
      elif m[5]:
        kw["a_clip"] = float(m[5][1])
      else:
        raise ValueError(f"method spec {spec!r}: unknown option {opt!r}; expected wNaM, kN, kvN, "
                         f"tN, dX, acX, act, nowc, bh, rtn, clip, gptq, pfp, pq, f32, mxfp4, "
                         f"nvfp4 or int")
    return dataclasses.replace(self, **kw)


# ---------------------------------------------------------------------------
# One block: fit -> merge -> quantize, pure functions of its parameter dict

HIGHEST = jax.lax.Precision.HIGHEST


def _kernel(block: dict, path) -> jax.Array:
  return get_path(block, path)["kernel"]


def site_kernel(block: dict, site: str, *, spec: ArchSpec) -> jax.Array:
  """The kernels that read `site`, side by side on the output axis: `(..., d, Σ d_out)`.
  `block` is one block's parameter dict or the stacked `layers` dict."""
  return jnp.concatenate([_kernel(block, p) for p in spec.site(site).linears], axis=-1)


def site_grams(block: dict, *, spec: ArchSpec) -> dict[str, jax.Array]:
  """`Σ_W` of every site, `(..., d, d)`: `Σ_j kernel_j kernel_jᵀ` over the linears it feeds."""
  return {s.name: sum(jnp.einsum("...io,...jo->...ij", k, k, precision=HIGHEST)
                      for k in (_kernel(block, p).astype(jnp.float32) for p in s.linears))
          for s in spec.sites}


def site_recipes(recipe: "Recipe | dict[str, Recipe]", spec: ArchSpec) -> dict[str, Recipe]:
  """`{site: recipe}`: one recipe for every site, or a plan's per-site recipes as given."""
  return dict(recipe) if isinstance(recipe, dict) else {s: recipe for s in spec.site_names}


def fit_block(block: dict, stats: dict[str, SecondMoment], recipe: "Recipe | dict[str, Recipe]",
              *, spec: ArchSpec, layer: int, devices=None) -> dict[str, Transform | None] | None:
  """One transform per site of block `layer` from its statistics (closed form).

  `recipe`: one for every site, or `{site: recipe}` (a plan's block). Hadamard
  signs depend on the recipe's seed, the layer and the site only.
  `devices`: run the sites' fits concurrently, site `i` on
  `devices[(layer · sites + i) mod len(devices)]` (one thread per device; the
  same computation, so the same transforms as on one device). `block` and
  `stats` must then be host arrays (or uncommitted), and so are the results.

  Returns:
    `{site: Transform}` (None for a site whose recipe has no transform), or
    None when no site has one.
  """
  recipes = site_recipes(recipe, spec)
  if all(r.transform_method is None for r in recipes.values()):
    return None
  grams = site_grams(block, spec=spec)

  def fit(i, s):
    recipe = recipes[s.name]
    if recipe.transform_method is None:
      return None
    key = jax.random.PRNGKey(recipe.seed)
    weight_absmax = jnp.max(jnp.stack([jnp.abs(_kernel(block, p)).max(-1) for p in s.linears]), 0)
    t = fit_transform(
        recipe.transform_method, stats[s.name].sigma, grams[s.name], block_size=recipe.block_size,
        key=jax.random.fold_in(key, layer * len(spec.sites) + i),
        act_absmax=stats[s.name].absmax, alpha=recipe.alpha, weight_absmax=weight_absmax,
        eps=recipe.eps, x64=recipe.fit_x64, name=f"layer {layer} {s.name}",
        weight=site_kernel(block, s.name, spec=spec))
    return fold_block_hadamard(t) if recipe.hadamard == "block" else t

  if not devices or len(devices) < 2:
    return {s.name: fit(i, s) for i, s in enumerate(spec.sites)}

  def fit_on_device(i, s):
    with jax.default_device(devices[(layer * len(spec.sites) + i) % len(devices)]):
      return jax.device_get(fit(i, s))

  with ThreadPoolExecutor(min(len(devices), len(spec.sites))) as pool:
    fitted = list(pool.map(fit_on_device, *zip(*enumerate(spec.sites))))
  return {s.name: t for s, t in zip(spec.sites, fitted)}


def map_kernels(block: dict, spec: ArchSpec, fn) -> dict:
  """A copy of `block` with every quantized kernel replaced by `fn(site, path, kernel)`."""
  block = jax.tree.map(lambda a: a, block)  # new containers, shared leaves
  for site, path in spec.linears:
    leaf = get_path(block, path)
    leaf["kernel"] = fn(site, path, leaf["kernel"])
  return block


@jax.jit
def _merge(transform: Transform, kernel: jax.Array) -> jax.Array:
  return transform.merge(kernel)


def merge_block(block: dict, transforms: dict[str, Transform] | None, *, spec: ArchSpec) -> dict:
  """Kernels carrying the inverse transforms: `kernel' = T⁻ᵀ kernel`.

  Together with the online `x' = x Tᵀ` of `QuantHook` the function is unchanged.
  """
  if transforms is None:
    return block
  return map_kernels(block, spec, lambda site, _, k: k if transforms[site] is None
                     else _merge(transforms[site], k))


def transformed_sigma(sigma: jax.Array, t: Transform | None) -> jax.Array:
  """`T Σ Tᵀ`: the second moment of the transformed input."""
  return sigma if t is None else t.apply(t.apply(sigma).T)


@functools.partial(jax.jit, static_argnames=("config",))
def _rtn(kernel, *, config):
  q = quantize(kernel, config)
  return (q.values.astype(jnp.float32) * q.scale).astype(kernel.dtype), q.scale[0]


_fake_rtn = jax.jit(fake_quantize, static_argnames=("config",))


def channel_clipped_quantize(kernel: jax.Array, ratio: jax.Array, qmax: int
                             ) -> tuple[jax.Array, jax.Array]:
  """Symmetric per-output-channel fake quantization of a `(d_in, d_out)` kernel
  with a clip ratio per channel: scales `ratio · absmax / qmax`.

  Differentiable in both arguments with straight-through rounding (the LSQ
  gradient): `∂q/∂scale = round(u) − u` inside the range and `±qmax` where a
  weight is clipped, so a learned ratio trades clipping against rounding error.
  With `ratio = 1` the values equal `fake_quantize` on `weight_config`'s grid.

  Returns:
    `(fake-quantized kernel in float32, scales (d_out,))`; a channel holding a
    NaN or ±Inf (or with a NaN ratio) is all NaN, with a NaN scale.
  """
  k = kernel.astype(jnp.float32)
  scale = _safe_scale(ratio.astype(jnp.float32) * _absmax(jnp.abs(k), -2)[..., 0, :] / qmax)
  u = jnp.clip(k / scale, -qmax, qmax)
  levels = u + jax.lax.stop_gradient(jnp.round(u) - u)
  return levels * scale, scale


_clipped_rtn = jax.jit(channel_clipped_quantize, static_argnames=("qmax",))


@functools.partial(jax.jit, static_argnames=("config",))
def _clip(kernel, importance, *, config):
  return fake_quantize_clip_search(kernel, config, importance=importance, ratios=CLIP_GRID,
                                   return_scale=True)


def quantize_block(block: dict, recipe: "Recipe | dict[str, Recipe]", *, spec: ArchSpec,
                   transforms: dict[str, Transform] | None = None,
                   stats: dict[str, SecondMoment] | None = None,
                   w_clip: dict[str, jax.Array] | None = None
                   ) -> tuple[dict, dict[tuple[str, ...], jax.Array]]:
  """Fake-quantize every kernel of a (merged) block per output channel (FP4
  formats: per block of input channels and output channel).

  `recipe`: one for every site, or `{site: recipe}` (a plan's block).
  `recipe.weights`: "rtn"; "clip" (importance `diag(T Σ_x Tᵀ)`) or "gptq"
  (Hessian `T Σ_x Tᵀ`), both of which need `stats`. `w_clip`: learned
  per-output-channel clip ratios `{"/".join(path): (d_out,)}` (trained CAT)
  that set the grid of those kernels for "rtn" and "gptq".

  Returns:
    `(block with fake-quantized kernels, {linear path: per-channel scales (d_out,)})`;
    the scales are those of the grid the kernels lie on, for integer export
    (none for the FP4 formats, which have no integer export).
  """
  recipes = site_recipes(recipe, spec)
  if all(r.w_config is None for r in recipes.values()):
    return block, {}
  if any(r.weights != "rtn" for r in recipes.values()) and stats is None:
    raise ValueError(f"weights={next(r.weights for r in recipes.values())!r} needs the site "
                     "statistics (stats=...)")
  scales = {}
  sigmas = {}

  def sigma_t(site):  # T Σ Tᵀ of a site, shared by its linears
    if site not in sigmas:
      t = None if transforms is None else transforms[site]
      sigmas[site] = transformed_sigma(stats[site].sigma.astype(jnp.float32), t)
    return sigmas[site]

  def one(site, path, kernel):
    recipe = recipes[site]
    config = recipe.w_config
    if config is None:
      return kernel
    ratio = None if w_clip is None else w_clip.get("/".join(path))
    if ratio is not None and recipe.weights == "clip":
      raise ValueError("learned weight clip ratios replace the clip search: weights='clip' "
                       "cannot take w_clip")
    if recipe.weights == "clip":
      q, scale = _clip(kernel, jnp.diagonal(sigma_t(site)), config=config)
    elif ratio is not None:
      q, scale = _clipped_rtn(kernel, ratio, qmax=config.qmax)
      q = q.astype(kernel.dtype)
    elif config.is_fp4:
      q, scale = _fake_rtn(kernel, config=config), None  # no integer export: no scales
    else:
      q, scale = _rtn(kernel, config=config)
    if recipe.weights == "gptq":
      q = gptq_quantize(kernel, sigma_t(site), bits=config.bits, damping=recipe.gptq_damping,
                        block_size=recipe.gptq_block, act_order=recipe.act_order,
                        scale=None if ratio is None else scale, format=config.format)
    if scale is not None:
      scales[path] = scale
    return q

  return map_kernels(block, spec, one), scales


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


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
  """A model with transformed, fake-quantized kernels and its online part.

  Run it with `forward(qm.model, tokens, hook=qm.hook, hook_state=qm.transforms)`
  or `perplexity(qm.model, windows, hook=qm.hook, hook_state=qm.transforms)`.
  `real`: the linears are integer (`catjax.quantized.realize`) and
  quantize their inputs themselves, so the hook only transforms (and
  quantizes the KV cache).

  Attributes:
    model: the model with merged, fake-quantized kernels.
    transforms: `{site: Transform}` stacked over layers, or None.
    recipe: the recipe.
    real: see above.
    w_scales: `{linear path: (num_layers, d_out)}` per-channel scales of the
      grid every fake-quantized kernel lies on (for integer export).
    info: what the engine measured (seconds, training losses per block, ...).
    plan / plan_hook: a `catjax.plan.Plan` model: `transforms` is then the
      `PlanHook`'s state (`catjax.plan.hook_state`) and `hook` the plan hook;
      `recipe` the plan's base recipe.
  """

  model: Llama
  transforms: dict[str, Transform] | None
  recipe: Recipe
  real: bool = False
  w_scales: dict[tuple[str, ...], jax.Array] | None = None
  info: dict[str, Any] | None = None
  plan: Any = None
  plan_hook: Any = None

  @property
  def label(self) -> str:
    return self.recipe.label if self.plan is None else self.plan.label

  @property
  def hook(self):
    if self.plan_hook is not None:
      return self.plan_hook
    return QuantHook(None if self.real else self.recipe.a_config, self.recipe.kv_config,
                     spec_for(self.model.config).kv_sites)
