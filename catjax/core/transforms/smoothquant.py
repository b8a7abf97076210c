"""SmoothQuant: `B = diag(1/s)`, `s_j = a_j^α / w_j^(1-α)`, moving activation
outliers into the weights channel by channel; alone or before a Hadamard."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from catjax.core.transforms.base import FitInputs, Method


def smooth_scales(sigma_x, gram_w, act_absmax, weight_absmax, alpha, eps) -> jax.Array:
  """SmoothQuant's `s_j = a_j^α / w_j^(1-α)` with RMS fallbacks for the maxima
  (`a_j = √Σ_x,jj`, `w_j = √Σ_W,jj`); both floored at `eps` times their maximum."""
  a = jnp.sqrt(jnp.maximum(jnp.diagonal(sigma_x), 0.0)) if act_absmax is None else act_absmax
  w = jnp.sqrt(jnp.maximum(jnp.diagonal(gram_w), 0.0)) if weight_absmax is None else weight_absmax
  a = jnp.maximum(a.astype(jnp.float32), eps * jnp.max(a) + 1e-30)
  w = jnp.maximum(w.astype(jnp.float32), eps * jnp.max(w) + 1e-30)
  return a**alpha / w ** (1.0 - alpha)


def fit(inp: FitInputs) -> tuple[jax.Array, jax.Array]:
  """`1 × 1` blocks of `B = diag(1/s)` and `B⁻¹ = diag(s)`."""
  s = smooth_scales(inp.sigma_x, inp.gram_w, inp.act_absmax, inp.weight_absmax, inp.alpha,
                    inp.eps)
  return (1.0 / s)[:, None, None], s[:, None, None]


METHODS = (
    Method("smoothquant", "diagonal", False, fit, "per-channel scales s = a^α / w^(1-α)"),
    Method("smoothquant_hadamard", "diagonal", True, fit, "SmoothQuant's scales, then a Hadamard"),
)
