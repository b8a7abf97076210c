"""Quantized, transformed matmul: `Q_a(x Bᵀ) · Q_w(W)` with int32 accumulation.

`quantize_weight` stores a kernel in the layout the kernels read;
`quantized_matmul` runs the reference (`reference.py`, the spec) or the
Pallas Mosaic GPU kernel (`pallas_gpu.py`), or that kernel in interpret mode
on CPU.
"""

from catjax.kernels.api import quantized_matmul
from catjax.kernels.qweight import QuantizedWeight, quantize_weight

# pallas_gpu (the Mosaic GPU kernel, `TileConfig`) and reference are public modules.
__all__ = ["QuantizedWeight", "pallas_gpu", "quantize_weight", "quantized_matmul", "reference"]
