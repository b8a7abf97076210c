"""The math core: quantizers, second moments and the SQNR decomposition, SPD
linear algebra, Hadamard transforms, the CAT transforms, GPTQ. Pure JAX, no
Flax, no I/O; `catjax` re-exports its main names."""

from catjax.base.lazy import lazy_names

__getattr__, __dir__, __all__ = lazy_names(__name__, {}, modules=(
    "gptq", "hadamard", "linalg", "quant", "stats", "synthetic", "transforms"))
