"""The per-algorithm settings of a `Recipe`: small frozen, validated records.

`Recipe.gptq` (weights="gptq"), `Recipe.train` (trained CAT), `Recipe.smoothquant`
(the SmoothQuant methods) and `Recipe.spinquant` (its optimizer) hold them; each checks its own
fields, naming them as the recipe does (`gptq.damping=-1.0: ...`).
"""

from __future__ import annotations

import dataclasses

from catjax.base.checks import check_bool, check_int, is_real

# GPTQ's relative damping: 10% of the mean diagonal, not `gptq_quantize`'s 1%: on
# SmolLM2 W4A4 with 32 × 512 calibration tokens it is the better of the two for CAT
# (benchmarks/results/smollm2_gptq_damping.md).
DEFAULT_DAMPING = 0.1


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQConfig:
  """GPTQ's settings (`catjax.gptq_quantize`).

  Attributes:
    damping: relative damping of the Hessian, a finite value >= 0.
    lazy_batch: columns quantized per lazy batch (speed only).
    act_order: quantize input channels in order of decreasing `H_ii`.
  """

  damping: float = DEFAULT_DAMPING
  lazy_batch: int = 128
  act_order: bool = False

  def __post_init__(self):
    if not (is_real(self.damping) and self.damping >= 0):
      raise ValueError(f"gptq.damping={self.damping!r}: expected a finite value >= 0")
    check_int("gptq.lazy_batch", self.lazy_batch, 1)
    check_bool("gptq.act_order", self.act_order)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Trained CAT's settings (`catjax.ptq.train`).

  Attributes:
    steps: AdamW steps per block (0: the closed form, no training).
    lr: peak learning rate (cosine decay), a finite value > 0.
    batch: calibration windows per step.
    w_clip: also learn a weight clip ratio per output channel (in
      [`catjax.ptq.train.W_CLIP_MIN`, 1], from 1), which then sets the grid
      of RTN and GPTQ; not with weights="clip" (its search replaces it).
    a_clip: also learn the activation clip ratio of every site, one per layer and
      site (in [`catjax.ptq.train.A_CLIP_MIN`, 1], from the recipe's `a_clip`),
      kept in the site's transform (`Transform.a_clip`); integer activations.
  """

  steps: int = 0
  lr: float = 1e-3
  batch: int = 4
  w_clip: bool = True
  a_clip: bool = False

  def __post_init__(self):
    check_int("train.steps", self.steps, 0, 2**31 - 1, "optax counts steps in int32")
    if not (is_real(self.lr) and self.lr > 0):
      raise ValueError(f"train.lr={self.lr!r}: expected a finite value > 0")
    check_int("train.batch", self.batch, 1)
    check_bool("train.w_clip", self.w_clip)
    check_bool("train.a_clip", self.a_clip)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SmoothQuantConfig:
  """SmoothQuant's settings.

  Attributes:
    alpha: migration strength in [0, 1] (`s_j = a_j^α / w_j^(1-α)`).
  """

  alpha: float = 0.5

  def __post_init__(self):
    if not (is_real(self.alpha) and 0.0 <= self.alpha <= 1.0):
      raise ValueError(f"smoothquant.alpha={self.alpha!r}: expected a value in [0, 1]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpinQuantConfig:
  """SpinQuant's optimizer (`catjax.ptq.spinquant.cayley_sgd`); steps and windows per
  step are `Recipe.train`'s.

  Attributes:
    lr: Cayley SGD's learning rate, a finite value > 0 (the step is also capped
      by the retraction's bound `2q / ‖W‖`).
    momentum: in [0, 1).
    fold_norms: fold the RMSNorm scale of the residual's readers into their kernels
      (the paper's SpinQuant: step 0 is QuaRot with folded norms); False keeps the
      scale in the activations (step 0 is a randomized Hadamard at every site, as
      catjax's "hadamard", with one sign vector for every residual reader). Spec `nofold`.
  """

  lr: float = 1.5
  momentum: float = 0.9
  fold_norms: bool = True

  def __post_init__(self):
    if not (is_real(self.lr) and self.lr > 0):
      raise ValueError(f"spinquant.lr={self.lr!r}: expected a finite value > 0")
    if not (is_real(self.momentum) and 0 <= self.momentum < 1):
      raise ValueError(f"spinquant.momentum={self.momentum!r}: expected a value in [0, 1)")
    check_bool("spinquant.fold_norms", self.fold_norms)


# The recipe fields that hold a config, and their types.
CONFIGS = {"gptq": GPTQConfig, "train": TrainConfig, "smoothquant": SmoothQuantConfig,
           "spinquant": SpinQuantConfig}
