"""The block engine's walk over a recording adapter: which stream each block is
calibrated on, when the float model's twin runs, what errors name. (Both real
adapters, catjax's decoder and any NNX model, are tested end to end in
test_engine.py and test_foreign.py.)"""

import jax.numpy as jnp
import pytest

from catjax.core.stats import SecondMoment
from catjax.ptq.engine import DecoderBlocks
from catjax.ptq.foreign import ModuleBlocks
from catjax.ptq.walk import BlockAdapter, walk


class Recorder:
  """Streams are numbers: a float block adds 1, a quantized one adds 10."""

  def __init__(self, n=3, *, nan_at=None, fails_at=None, inputs=0):
    self.num_blocks, self.nan_at, self.fails_at, self._inputs = n, nan_at, fails_at, inputs
    self.log, self.done = [], set()

  def name(self, b):
    return f"block {b}"

  def inputs(self):
    return self._inputs

  def calibrate(self, b, x, *, outputs):
    self.log.append(("calibrate", b, x, outputs))
    st = SecondMoment.zeros(2).update(jnp.ones((1, 2)) * (jnp.nan if b == self.nan_at else 1))
    return (x + 1 if outputs and x is not None else None), {"attn_in": st}

  def run(self, b, x):
    self.log.append(("run", b, x, b in self.done))
    return x + (10 if b in self.done else 1)

  def fit(self, b, stats):
    return f"T{b}"

  def train(self, b, transforms, x, target):
    self.log.append(("train", b, x, target))
    return transforms + "'", None, {"block": b}

  def quantize(self, b, transforms, stats, w_clip):
    if b == self.fails_at:
      raise FloatingPointError("q (site attn_in): not positive definite")
    self.log.append(("quantize", b, transforms))
    self.done.add(b)
    return True


def test_quantized_propagation_calibrates_on_the_quantized_stream():
  a = Recorder()
  assert walk(a, quantized_inputs=True, train=False, progress=False) == []
  assert a.log == [("calibrate", 0, 0, True), ("quantize", 0, "T0"), ("run", 0, 0, True),
                   ("calibrate", 1, 10, True), ("quantize", 1, "T1"), ("run", 1, 10, True),
                   ("calibrate", 2, 20, False), ("quantize", 2, "T2")]


def test_float_propagation_takes_the_calibration_outputs():
  a = Recorder()
  walk(a, quantized_inputs=False, train=False, progress=False)
  assert [e for e in a.log if e[0] == "calibrate"] == [
      ("calibrate", 0, 0, True), ("calibrate", 1, 1, True), ("calibrate", 2, 2, False)]
  assert not [e for e in a.log if e[0] == "run"]


def test_training_with_quantized_inputs_runs_the_float_twin_for_its_targets():
  a = Recorder()
  reports = walk(a, quantized_inputs=True, train=True, progress=False)
  assert reports == [{"block": 0}, {"block": 1}, {"block": 2}]
  # block 1: inputs from the quantized block 0 (10), targets from the float twin (1 + 1)
  assert ("train", 1, 10, 2) in a.log and ("quantize", 1, "T1'") in a.log
  assert ("run", 1, 1, False) in a.log  # the twin through the float block 1


def test_no_inputs_no_forward():
  a = Recorder(inputs=None)
  walk(a, quantized_inputs=False, train=False, progress=False)
  assert [e[:3] for e in a.log if e[0] == "calibrate"] == [("calibrate", b, None) for b in range(3)]


def test_errors_name_the_block():
  with pytest.raises(FloatingPointError, match="block 1 site attn_in: non-finite"):
    walk(Recorder(nan_at=1), quantized_inputs=True, train=False, progress=False)
  with pytest.raises(FloatingPointError, match=r"^block 2, q \(site attn_in\): not positive"):
    walk(Recorder(fails_at=2), quantized_inputs=True, train=False, progress=False)


@pytest.mark.parametrize("cls", [DecoderBlocks, ModuleBlocks, Recorder])
def test_adapters_have_the_protocol(cls):
  names = [n for n in vars(BlockAdapter) if not n.startswith("_")]
  assert names and all(callable(getattr(cls, n)) for n in names if n != "num_blocks")
