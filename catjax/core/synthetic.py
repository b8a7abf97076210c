"""Synthetic linear layers for tests, examples and benchmarks.

`synthetic_layer` draws activations with a decaying spectrum in a random basis
(like LLM hidden states, which are strongly correlated) plus a few outlier
channels, and weights whose large directions are a *different* random basis,
so alignment is poor and the outlier channels meet small weights. This is the
situation the CAT paper analyses: rotations fix the outliers (concentration),
only a data-driven transform fixes the misalignment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _random_orthogonal(key: jax.Array, d: int) -> jax.Array:
  q, r = jnp.linalg.qr(jax.random.normal(key, (d, d)))
  return q * jnp.sign(jnp.diagonal(r))


def synthetic_layer(key: jax.Array, *, tokens: int = 4096, d_in: int = 256, d_out: int = 384,
                    n_outliers: int = 4, outlier_scale: float = 30.0, decay: float = 1.0,
                    ) -> tuple[jax.Array, jax.Array]:
  """Activations `x: (tokens, d_in)` and a kernel `(d_in, d_out)`.

  Args:
    key: PRNG key.
    tokens, d_in, d_out: shapes.
    n_outliers: number of input channels scaled by `outlier_scale` (0 gives
      outlier-free, Gaussian activations).
    outlier_scale: factor on the outlier channels.
    decay: spectra fall as `i^-decay` (0 = isotropic).

  Returns:
    `(x, kernel)` in float32.
  """
  kz, kbx, kbw, kw = jax.random.split(key, 4)
  spectrum = (1.0 + jnp.arange(d_in, dtype=jnp.float32)) ** (-0.5 * decay)
  x = (jax.random.normal(kz, (tokens, d_in)) * spectrum) @ _random_orthogonal(kbx, d_in).T
  x = x.at[:, :n_outliers].multiply(outlier_scale)
  w_basis = _random_orthogonal(kbw, d_in)
  kernel = w_basis @ (spectrum[:, None] * jax.random.normal(kw, (d_in, d_out)))
  # Outlier channels meet small weights: the misalignment CAT corrects.
  kernel = kernel.at[:n_outliers].multiply(1.0 / outlier_scale)
  return x, kernel / jnp.sqrt(d_in)
