"""Function-preserving transforms of a linear layer's input (docs/design.md §1.3).

Every transform is `T = H · D · B · P`: an optional channel permutation `P`, a
block-diagonal `B` (`d/k` blocks of `k × k`; absent for pure rotations), then an
optional randomized orthonormal Hadamard `H · D` (`D` a ±1 diagonal). Activations become `x' = x Tᵀ` and the
kernel `kernel' = T⁻ᵀ kernel`, so `x' @ kernel' == x @ kernel`. `B⁻¹` is
computed once, at fit time, from the same eigendecomposition as `B`.

Methods (all fitted from `Σ_x = E[x xᵀ]` and `Σ_W = Wᵀ W = kernel @ kernel.T`):

| method | B | H·D | file |
|---|---|---|---|
| identity | -- | -- | `rotation.py` |
| smoothquant | `diag(1/s)`, `s_j = a_j^α / w_j^(1-α)` | -- | `smoothquant.py` |
| smoothquant_hadamard | as smoothquant | yes | `smoothquant.py` |
| hadamard | -- | yes | `rotation.py` |
| spinquant | -- (learned rotations: `catjax.ptq.spinquant`) | yes | `rotation.py` |
| cat | blockdiag of `(Σ_x,i⁻¹ # Σ_W,i)^½` over `k × k` diagonal blocks | yes | `cat.py` |
| cat_full | `(Σ_x⁻¹ # Σ_W)^½` (k = d, the optimum) | yes | `cat.py` |
| cat_perm | as cat, after `P` = `permutation.coupling_permutation` | yes | `cat.py` |
| flatquant | `(P₁ ⊗ P₂) diag(1/c)`, one `d × d` block; closed form `H_a ⊗ H_b` (trained: `catjax.ptq.train`) | -- | `flatquant.py` |

A method is a `Method` entry (`base.py`) in one file; registering it is its
line below. `Recipe`, the CLI's method specs and `fit_transform` read `REGISTRY`.
"""

from catjax.core.transforms import cat, flatquant, permutation, rotation, smoothquant
from catjax.core.transforms.base import (
    DEFAULT_BLOCK_SIZE, DEFAULT_EPS, REGISTRY, FitInputs, Method, Transform, fit_transform,
    fold_block_hadamard)

REGISTRY.update({m.name: m for m in (
    rotation.IDENTITY,
    *smoothquant.METHODS,  # smoothquant, smoothquant_hadamard
    rotation.HADAMARD,
    rotation.SPINQUANT,
    *cat.METHODS,  # cat, cat_full, cat_perm
    flatquant.FLATQUANT,
)})
METHODS = tuple(REGISTRY)

__all__ = ["flatquant", "permutation", "DEFAULT_BLOCK_SIZE", "DEFAULT_EPS", "REGISTRY", "METHODS", "FitInputs", "Method",
           "Transform", "fit_transform", "fold_block_hadamard"]
