"""catjax: post-training quantization of LLaMA-family models with
Concentration-Alignment Transforms (arXiv 2603.04359) in JAX.

The package is laid out in floors, each importing only from those below it:
`base` (errors, checks, atomic files) · `core` (pure JAX math, no Flax) ·
`kernels` · `models` (structure, forward, checkpoint I/O) · `ptq` (recipes,
plans, calibration, per-block algorithms, hooks, engine, training,
realization, planner) · `artifacts` (statistics files, quantized checkpoints)
· `analysis` (site reports, layer comparisons, perplexity) · `app` (assets,
data, pipeline, tables, plots, CLI, lm-eval). This module is the public
surface: the math core directly, the model-level API on first use (so the
math core imports without Flax). `catjax.quantize` is the rule-based entry point
for any NNX model; the array quantizer is `catjax.core.quant.quantize`.
"""

from catjax.base.lazy import lazy_names
from catjax.core.gptq import gptq_error, gptq_quantize
from catjax.core.hadamard import apply_hadamard, hadamard_matrix, is_supported as hadamard_supported
from catjax.core.linalg import geometric_mean, spd_inv_sqrt, spd_sqrt
from catjax.core.quant import (QArray, QuantConfig, activation_config, dequantize, fake_quantize,
                               pack_int4, unpack_int4, weight_config)
from catjax.core.stats import (SecondMoment, SQNRDecomposition, alignment, alignment_gain,
                               concentration_w, concentration_x, measured_sqnr, optimal_alignment,
                               predicted_sqnr, second_moment, sqnr_decomposition, weight_gram)
from catjax.core.transforms import METHODS, Transform, fit_transform

__version__ = "0.1.0"

# The model-level API, imported on first use.
__getattr__, __dir__, _lazy = lazy_names(__name__, {
    "Recipe": ".ptq.recipe", "Plan": ".ptq.plan", "SitePlan": ".ptq.plan",
    "calibrate": ".ptq.calibration", "quantize_model": ".ptq.engine",
    "QuantizedModel": ".ptq.quantized", "realize": ".ptq.realization",
    "save_stats": ".artifacts.stats_file", "load_stats": ".artifacts.stats_file",
    "save_quantized": ".artifacts.checkpoint", "load_quantized": ".artifacts.checkpoint",
    "CheckpointError": ".artifacts.checkpoint", "perplexity": ".analysis.evaluate",
    "site_report": ".analysis.sites", "InputError": ".base.errors",
    "Rule": ".ptq.rules", "quantize": ".ptq.foreign", "foreign_site_report": ".analysis.sites",
    "save_foreign": ".artifacts.foreign", "load_foreign": ".artifacts.foreign",
})

__all__ = sorted([
    "METHODS", "QArray", "QuantConfig", "SQNRDecomposition", "SecondMoment", "Transform",
    "activation_config", "alignment", "alignment_gain", "apply_hadamard", "concentration_w",
    "concentration_x", "dequantize", "fake_quantize", "fit_transform", "geometric_mean",
    "gptq_error", "gptq_quantize", "hadamard_matrix", "hadamard_supported", "measured_sqnr",
    "optimal_alignment", "pack_int4", "predicted_sqnr", "second_moment",
    "spd_inv_sqrt", "spd_sqrt", "sqnr_decomposition", "unpack_int4", "weight_config",
    "weight_gram", *_lazy,
])


def __dir__():
  return __all__
