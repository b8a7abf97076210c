"""catjax: post-training quantization of LLaMA-family models with
Concentration-Alignment Transforms (arXiv 2603.04359) in JAX."""

from catjax.gptq import gptq_error, gptq_quantize
from catjax.hadamard import apply_hadamard, hadamard_matrix, is_supported as hadamard_supported
from catjax.linalg import geometric_mean, spd_inv_sqrt, spd_sqrt
from catjax.quant import (QArray, QuantConfig, activation_config, dequantize, fake_quantize,
                          pack_int4, quantize, unpack_int4, weight_config)
from catjax.stats import (SecondMoment, SQNRDecomposition, alignment, alignment_gain,
                          concentration_w, concentration_x, measured_sqnr, optimal_alignment,
                          predicted_sqnr, second_moment, sqnr_decomposition, weight_gram)
from catjax.transforms import METHODS, Transform, fit_transform

__version__ = "0.1.0"

# The model-level API, imported on first use (the math core above needs no Flax).
_LAZY = {"load_quantized": "catjax.checkpoint", "save_quantized": "catjax.checkpoint",
         "CheckpointError": "catjax.checkpoint"}


def __getattr__(name):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'catjax' has no attribute {name!r}")


__all__ = [
    "CheckpointError", "METHODS", "QArray", "QuantConfig", "SQNRDecomposition", "SecondMoment", "Transform",
    "activation_config", "alignment", "alignment_gain", "apply_hadamard", "concentration_w",
    "concentration_x", "dequantize", "fake_quantize", "fit_transform", "geometric_mean",
    "gptq_error", "gptq_quantize", "load_quantized",
    "hadamard_matrix", "hadamard_supported", "measured_sqnr", "optimal_alignment", "pack_int4",
    "predicted_sqnr", "quantize", "save_quantized", "second_moment", "spd_inv_sqrt", "spd_sqrt",
    "sqnr_decomposition", "unpack_int4", "weight_config", "weight_gram",
]
