"""FlatQuant's transform (Sun et al., 2024): per site an invertible affine map
`B = (P₁ ⊗ P₂) · diag(1/c)`, two small factors of sizes `a × a` and `b × b`
(`a · b = d`, `a` the largest divisor of `d` up to `√d`) and per-channel scales `c`.

Its closed form, where training starts (`catjax.ptq.train`, block by block like
trained CAT), is `P₁ = H_a`, `P₂ = H_b` (normalized Hadamards of the two sizes, or
the identity for a size without one) and `c = 1`: a rotation, so step 0 is a
Kronecker Hadamard (QuaRot-like, without random signs). Training writes
`P_i = (I + Δ_i) H_i` and `c = exp(σ)` from `Δ_i = 0`, `σ = 0`; see `assemble`.

Online cost: `x (P₁ ⊗ P₂)ᵀ` is two small matmuls per token, `d · (a + b)`
multiply-adds (576: 24 + 24 → 27,648; 1536: 32 + 48 → 122,880), plus `d` for the
scales. catjax stores the product as one dense `d × d` block (`Transform.blocks`
of shape `(1, d, d)`) and applies it densely: the same matrix at `d²` per token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from catjax.core import hadamard as hd
from catjax.core.linalg import HIGHEST
from catjax.core.transforms.base import FitInputs, Method


def kron_sizes(d: int) -> tuple[int, int]:
  """`(a, b)`, `a · b = d`, `a` the largest divisor of `d` with `a ≤ √d`."""
  a = max(i for i in range(1, math.isqrt(d) + 1) if d % i == 0)
  return a, d // a


def start_factors(d: int) -> tuple[np.ndarray, np.ndarray]:
  """The factors training starts from: normalized Hadamards (identity where the size
  has none)."""
  return tuple(np.asarray(hd.hadamard_matrix(n), np.float64) if hd.is_supported(n) and n > 1
               else np.eye(n) for n in kron_sizes(d))


def assemble(p1, p2, inv1, inv2, sigma, *, xp=jnp):
  """`(B, B⁻¹)` as `(1, d, d)` blocks from factors `P_i`, their inverses and log-scales
  `σ` (`c = exp(σ)`): `B = (P₁ ⊗ P₂) diag(e^{-σ})`, `B⁻¹ = diag(e^{σ}) (P₁⁻¹ ⊗ P₂⁻¹)`."""
  kron = (lambda a, b: jnp.einsum("ij,kl->ikjl", a, b, precision=HIGHEST).reshape(
      a.shape[0] * b.shape[0], -1)) if xp is jnp else np.kron
  b = kron(p1, p2) * xp.exp(-sigma)[None, :]
  inv = xp.exp(sigma)[:, None] * kron(inv1, inv2)
  return b[None], inv[None]


def fit(inp: FitInputs) -> tuple[jax.Array, jax.Array]:
  d = inp.sigma_x.shape[-1]
  h1, h2 = (jnp.asarray(h, inp.dtype) for h in start_factors(d))
  return assemble(h1, h2, h1.T, h2.T, jnp.zeros(d, inp.dtype))


FLATQUANT = Method("flatquant", "full", False, fit,
                   "a Kronecker affine map (P1 ⊗ P2) diag(1/c), trained block by block "
                   "(FlatQuant); closed form: a Kronecker Hadamard")
