"""The block engine: one walk over a model's blocks, for every kind of model.

    x ← adapter.inputs()                                  (None: no forward needed)
    for block b:  y, stats ← adapter.calibrate(b, x)       site second moments on x; y = block_b(x)
                  T ← adapter.fit(b, stats)                 closed form
                  T ← adapter.train(b, T, x, target)        trained CAT (target: the float model's)
                  adapter.quantize(b, T, stats)             merge T⁻ᵀ W, round (RTN | clip | GPTQ)
                  x ← adapter.run(b, x)  or  y              quantized or full-precision propagation

`BlockAdapter` is all the walk knows of a model. catjax's own decoder is one
adapter (`catjax.ptq.engine`: stacked parameters, a jitted block with an explicit
site hook); any NNX model is another (`catjax.ptq.foreign`: blocks found by module
path, sites by the identity of the intercepted inputs), and the same adapter takes
a whole model as one block (closed-form recipes, calibrated at once). What `x`
is belongs to the adapter: an `(n, T, d)` array, or one hidden state per batch.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax.numpy as jnp
from tqdm.auto import tqdm

from catjax.core.stats import SecondMoment


class BlockAdapter(Protocol):
  """A model as the block engine walks it."""

  num_blocks: int

  def name(self, b: int) -> str:
    """How errors name block `b` (`block 3`, `block 'layers/3'`)."""

  def inputs(self) -> Any:
    """The inputs of block 0 over the calibration data, or None when the recipes need
    no forward (statistics given, full-precision propagation, no training)."""

  def calibrate(self, b: int, x: Any, *, outputs: bool) -> tuple[Any, dict[str, SecondMoment] | None]:
    """`(block_b(x) or None, {site: second moment} or None)` of the float block b; the
    outputs only when `outputs` (the engine needs them)."""

  def run(self, b: int, x: Any) -> Any:
    """Block b on `x`: the float block until `quantize(b, ...)`, the quantized one after."""

  def fit(self, b: int, stats: dict[str, SecondMoment] | None) -> Any:
    """Block b's transforms, in closed form, from its statistics."""

  def train(self, b: int, transforms: Any, x: Any, target: Any) -> tuple[Any, Any, dict | None]:
    """`(trained transforms, learned weight clips or None, report or None)` of block b
    on inputs `x` against the float model's outputs `target`."""

  def quantize(self, b: int, transforms: Any, stats: dict[str, SecondMoment] | None,
               w_clip: Any) -> bool:
    """Merge and round block b's weights (in the adapter's result); whether it changed."""


def check_finite(stats: dict[str, SecondMoment], where: str) -> None:
  for site, st in stats.items():
    if not bool(jnp.isfinite(st.xx).all() & jnp.isfinite(st.absmax).all()):
      raise FloatingPointError(
          f"{where} site {site}: non-finite calibration statistics (the inputs of this "
          "block overflowed or are NaN; check the model's dtype and the earlier blocks)")


def walk(adapter: BlockAdapter, *, quantized_inputs: bool, train: bool, desc: str = "quantize",
         progress: bool = True) -> list[dict]:
  """Quantize `adapter`'s model block by block; returns the training reports.

  `quantized_inputs`: each block is calibrated on the quantized blocks' outputs
  (GPTQ's Hessians of quantized inputs), else on the float model's. `train`: the
  transforms of every block are trained; with quantized inputs the float model's
  stream runs beside (the training targets)."""
  x = adapter.inputs()
  twin = x if train and quantized_inputs else None  # the float model's stream
  reports: list[dict] = []
  n = adapter.num_blocks
  for b in tqdm(range(n), desc=desc, unit="block", disable=not progress, leave=False):
    last = b == n - 1
    y, stats = adapter.calibrate(b, x, outputs=train or not last)
    if stats:
      check_finite(stats, adapter.name(b))
    transforms = adapter.fit(b, stats)
    w_clip = None
    if train:
      target = y if twin is None else adapter.run(b, twin)
      transforms, w_clip, report = adapter.train(b, transforms, x, target)
      if report is not None:
        reports.append(report)
      twin = None if twin is None else target
    try:
      changed = adapter.quantize(b, transforms, stats, w_clip)
    except FloatingPointError as e:  # GPTQ's Cholesky, naming the linear: add the block
      raise FloatingPointError(f"{adapter.name(b)}, {e}") from None
    if not last:
      x = adapter.run(b, x) if quantized_inputs and changed else y
  return reports
