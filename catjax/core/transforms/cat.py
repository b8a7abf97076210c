"""Concentration-alignment transforms: `B_i = (Σ_x,i⁻¹ # Σ_W,i)^½` over the `k × k`
diagonal blocks of the activation second moment and the weight Gram (the
matrix geometric mean, `catjax.core.linalg.alignment_transform`), then a
randomized Hadamard. "cat_full" is the one block `k = d`, the optimum; "cat_perm"
first reorders the channels so that coupled ones share a block
(`catjax.core.transforms.permutation`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from catjax.core import linalg
from catjax.core.transforms.base import FitInputs, Method


def diagonal_blocks(s: jax.Array, k: int) -> jax.Array:
  """The `(d/k, k, k)` diagonal blocks of a `(d, d)` matrix."""
  nb = s.shape[-1] // k
  s = s.reshape(nb, k, nb, k).transpose(0, 2, 1, 3)
  idx = jnp.arange(nb)
  return s[idx, idx]


def fit(inp: FitInputs) -> tuple[jax.Array, jax.Array]:
  """Blocks of `B` and `B⁻¹` from one eigendecomposition per block; from the
  weight factor when the Gram's blocks have rank below `k`."""
  k = inp.block_size
  sx = diagonal_blocks(inp.sigma_x, k)
  if inp.weight is not None:
    wb = inp.weight.reshape(-1, k, inp.weight.shape[-1])
    return linalg.alignment_transform_low_rank(sx, wb, eps=inp.eps, dtype=inp.dtype)
  return linalg.alignment_transform(sx, diagonal_blocks(inp.gram_w, k), eps=inp.eps,
                                    dtype=inp.dtype)


METHODS = (
    Method("cat", "block", True, fit, "block CAT: geometric-mean blocks of k, then a Hadamard"),
    Method("cat_full", "full", True, fit, "full CAT: one geometric-mean block of the width"),
    Method("cat_perm", "block", True, fit, "block CAT after a channel permutation that puts "
           "coupled channels in one block", permute=True),
)
