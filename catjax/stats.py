"""Streaming second moments and the SQNR decomposition of a quantized linear.

For `y = x @ kernel` with `x: (tokens, d_in)` and `kernel: (d_in, d_out)`,
assuming uncorrelated weight and activation errors (arXiv 2603.04359,
docs/design.md §1.2):

    SQNR ≈ 12 · (N(b_x)² C(x) ∥ N(b_w)² C(W)) · A(x, W),   a ∥ b = ab/(a+b)

with the concentrations `C(x) = E‖x‖² / E[r(x)²]`, `C(W) = ‖W‖_F² / Σ_j r(W_j)²`
and the alignment `A = tr(Σ_x Σ_W) / (tr Σ_x · tr Σ_W)`, `Σ_x = E[x xᵀ]`,
`Σ_W = Wᵀ W = kernel @ kernel.T`. All functions are pure and jittable except
`sqnr_decomposition`, which returns Python floats. Called eagerly, the public
ones raise `ValueError` for operands that are all zero or hold NaN or ±Inf
(whose ratios would be NaN); inside `jit` they are not checked.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from catjax import linalg
from catjax.quant import QuantConfig, _grouped, activation_config, fake_quantize, weight_config

HIGHEST = jax.lax.Precision.HIGHEST


def db(ratio):
  """Power ratio in decibels, `10·log10`."""
  return 10.0 * jnp.log10(ratio)


# ---------------------------------------------------------------------------
# Streaming second moments


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["xx", "absmax", "count"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class SecondMoment:
  """Running `Σ x xᵀ`, per-channel `max |x|` and token count of one site.

  A pytree: `update` it with batches inside `jit`, `merge` partial results
  (e.g. across devices or files), read `sigma` at the end. Accumulates in the
  dtype it was made with (`zeros(d, dtype=...)`, float32 by default).
  """

  xx: jax.Array      # (d, d) sum of outer products
  absmax: jax.Array  # (d,) running max |x_i|
  count: jax.Array   # () int32 number of tokens seen

  @classmethod
  def zeros(cls, d: int, *, dtype=jnp.float32) -> "SecondMoment":
    """Empty statistics of width `d`, accumulated in `dtype` (float32 or
    float64; float64 needs x64)."""
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
      raise ValueError(f"d must be a positive integer, got {d=!r}")
    dtype = linalg.compute_dtype(dtype=dtype)
    return cls(xx=jnp.zeros((d, d), dtype), absmax=jnp.zeros((d,), dtype),
               count=jnp.zeros((), jnp.int32))

  @property
  def dim(self) -> int:
    return self.xx.shape[-1]

  def update(self, x: jax.Array, mask: jax.Array | None = None) -> "SecondMoment":
    """Add a batch `x: (..., d)`; a boolean `mask: x.shape[:-1]` drops padding."""
    if x.shape[-1] != self.dim:
      raise ValueError(f"expected activations with last axis {self.dim}, got {x.shape=}")
    x = x.reshape(-1, self.dim).astype(self.xx.dtype)
    if mask is None:
      w = jnp.ones((x.shape[0],), x.dtype)
    else:
      if mask.shape != () and mask.size != x.shape[0]:
        raise ValueError(f"mask must have shape x.shape[:-1], got {mask.shape=}")
      w = mask.reshape(-1).astype(bool).astype(x.dtype)
    xx = jnp.matmul((x * w[:, None]).T, x, precision=HIGHEST)
    a = jnp.where(jnp.isnan(x), jnp.inf, jnp.abs(x))  # max reductions need not keep NaN
    absmax = jnp.max(jnp.where(w[:, None] > 0, a, 0.0), axis=0)
    return SecondMoment(
        xx=self.xx + xx, absmax=jnp.maximum(self.absmax, absmax), count=self.count + jnp.sum(w > 0, dtype=jnp.int32))

  def merge(self, other: "SecondMoment") -> "SecondMoment":
    if other.dim != self.dim:
      raise ValueError(f"cannot merge second moments of dims {self.dim} and {other.dim}")
    return SecondMoment(
        xx=self.xx + other.xx, absmax=jnp.maximum(self.absmax, other.absmax),
        count=self.count + other.count)

  @property
  def sigma(self) -> jax.Array:
    """`E[x xᵀ]` (uncentered), symmetrized; stacked moments (leading axes,
    e.g. layers) give stacked matrices. NaN when no token was seen."""
    s = self.xx / self.count.astype(self.xx.dtype)[..., None, None]
    return 0.5 * (s + jnp.swapaxes(s, -1, -2))


def second_moment(x: jax.Array, *, dtype=None) -> jax.Array:
  """`E[x xᵀ]` over all leading axes of `x: (..., d)`, in `dtype` (default:
  the dtype of `x`, at least float32)."""
  x = jnp.asarray(x)
  x = x.reshape(-1, x.shape[-1]).astype(linalg.compute_dtype(x, dtype=dtype))
  return jnp.matmul(x.T, x, precision=HIGHEST) / x.shape[0]


def weight_gram(kernel: jax.Array, *, dtype=None) -> jax.Array:
  """`Σ_W = Wᵀ W = kernel @ kernel.T`, `(d_in, d_in)`, in `dtype` (default:
  the dtype of `kernel`, at least float32)."""
  kernel = jnp.asarray(kernel)
  k = kernel.astype(linalg.compute_dtype(kernel, dtype=dtype))
  return jnp.matmul(k, k.T, precision=HIGHEST)


# ---------------------------------------------------------------------------
# Concentration, alignment, SQNR


def _check_operands(x=None, kernel=None) -> None:
  """Shapes `x (..., d_in)` and `kernel (d_in, d_out)`, then values: each
  concrete operand finite and not all zero (`linalg.check_array`)."""
  if kernel is not None and jnp.ndim(kernel) != 2:
    raise ValueError(f"kernel must be (d_in, d_out), got kernel.shape={jnp.shape(kernel)}")
  if x is not None and jnp.ndim(x) < 1:
    raise ValueError(f"x must be (..., d_in), got x.shape={jnp.shape(x)}")
  if x is not None and kernel is not None and jnp.shape(x)[-1] != jnp.shape(kernel)[0]:
    raise ValueError(f"need x (..., d_in) and kernel (d_in, d_out), got x.shape={jnp.shape(x)} "
                     f"kernel.shape={jnp.shape(kernel)}")
  linalg.check_array("x", x, nonzero=True)
  linalg.check_array("kernel", kernel, nonzero=True)


def _check_moments(sigma_x, gram_w) -> None:
  """Equal square shapes; concrete values finite, not all zero, with a
  non-negative diagonal."""
  linalg._check_pair(("sigma_x", "gram_w"), jnp.asarray(sigma_x), jnp.asarray(gram_w))
  for name, a in (("sigma_x", sigma_x), ("gram_w", gram_w)):
    linalg.check_array(name, a, nonzero=True, psd=True)


def _check_positive(name: str, v) -> None:
  """A concrete `v` must be finite and > 0 everywhere."""
  if isinstance(v, jax.core.Tracer):
    return
  a = jnp.asarray(v)
  bad = jnp.sum(~(jnp.isfinite(a) & (a > 0)))
  if not isinstance(bad, jax.core.Tracer) and int(bad):
    got = f"{name}={float(a)!r}" if a.size == 1 else f"{bad} of {a.size} values of {name}"
    raise ValueError(f"{got}: expected a finite value > 0")


def _range_sq_sum(v: jax.Array, config: QuantConfig) -> jax.Array:
  """Σ over elements of the squared quantization range of their group."""
  g, axes = _grouped(v.astype(jnp.float32), config)
  if config.symmetric:
    r = 2.0 * jnp.max(jnp.abs(g), axis=axes, keepdims=True)
  else:
    r = (jnp.maximum(jnp.max(g, axis=axes, keepdims=True), 0.0)
         - jnp.minimum(jnp.min(g, axis=axes, keepdims=True), 0.0))
  r = r * config.clip_ratio
  per_group = 1
  for a in axes:
    per_group *= g.shape[a]
  return jnp.sum(r**2) * per_group


def concentration_x(x: jax.Array, config: QuantConfig | None = None) -> jax.Array:
  """`C(x) = E‖x‖² / E[r(x)²]` for the activation quantizer `config`.

  `r(x)` is the per-token range (`2·max|x_i|` when symmetric); with groups,
  the mean of the groups' squared ranges. Default: symmetric per token.
  """
  config = config or activation_config(8)
  _check_operands(x=x)
  x = jnp.asarray(x)
  x = x.reshape(-1, x.shape[-1])
  return jnp.sum(x.astype(jnp.float32) ** 2) / (_range_sq_sum(x, config) / x.shape[-1])


def concentration_w(kernel: jax.Array, config: QuantConfig | None = None) -> jax.Array:
  """`C(W) = ‖W‖_F² / Σ_j r(W_j)²` over output channels `j` (columns of `kernel`)."""
  config = config or weight_config(8)
  _check_operands(kernel=kernel)
  kernel = jnp.asarray(kernel)
  return jnp.sum(kernel.astype(jnp.float32) ** 2) / (_range_sq_sum(kernel, config) / kernel.shape[0])


def alignment(sigma_x: jax.Array, gram_w: jax.Array) -> jax.Array:
  """`A = tr(Σ_x Σ_W) / (tr Σ_x · tr Σ_W)`; `1/d` for isotropic activations."""
  _check_moments(sigma_x, gram_w)
  sigma_x, gram_w = jnp.asarray(sigma_x), jnp.asarray(gram_w)
  num = jnp.sum(sigma_x * gram_w.T)
  return num / (jnp.trace(sigma_x) * jnp.trace(gram_w))


def alignment_gain(sigma_x: jax.Array, gram_w: jax.Array) -> jax.Array:
  """`d_in · A`: > 1 when activations meet the large weight directions."""
  return sigma_x.shape[-1] * alignment(sigma_x, gram_w)


def optimal_alignment(sigma_x: jax.Array, gram_w: jax.Array) -> jax.Array:
  """Best alignment over invertible transforms, `A* = Σσ_i² / (Σσ_i)²`.

  `σ_i` are the singular values of `W Σ_x^½`, i.e. `σ_i²` the eigenvalues of
  `Σ_x^½ Σ_W Σ_x^½` (docs/design.md §1.3). No damping is applied. Computes in
  the promoted dtype of the inputs (at least float32).
  """
  _check_moments(sigma_x, gram_w)
  s_half = linalg.spd_sqrt(sigma_x, eps=0.0, dtype=linalg.compute_dtype(sigma_x, gram_w))
  g = jnp.asarray(gram_w, s_half.dtype)
  lam = jnp.linalg.eigvalsh(linalg.symmetrize(s_half @ g @ s_half))
  sig = jnp.sqrt(jnp.maximum(lam, 0.0))
  return jnp.sum(sig**2) / jnp.sum(sig) ** 2


def _steps(config: QuantConfig) -> float:
  """`N(b)` of an integer quantizer; NaN for the FP4 formats, which the uniform
  noise model does not describe (no prediction)."""
  return float("nan") if config.is_fp4 else float(config.num_steps)


def _operand_sqnrs(c_x, c_w, align, a_config: QuantConfig, w_config: QuantConfig):
  """`SQNR_x = 12 N_x² C_x A` and `SQNR_w = 12 N_w² C_w A`."""
  return (12.0 * _steps(a_config)**2 * c_x * align,
          12.0 * _steps(w_config)**2 * c_w * align)


def predicted_sqnr(c_x, c_w, align, *, a_config: QuantConfig | None,
                   w_config: QuantConfig | None):
  """`12 · (N_x² C_x ∥ N_w² C_w) · A` (linear, not dB): `1 / (1/SQNR_x + 1/SQNR_w)`,
  where an operand whose config is None is not quantized and adds no noise
  (both None: infinite). NaN when an operand has an FP4 format (no model yet).

  Raises:
    ValueError: (eagerly) a factor the prediction uses that is not finite and > 0.
  """
  if a_config is not None or w_config is not None:
    _check_positive("align", align)
  if a_config is not None:
    _check_positive("c_x", c_x)
  if w_config is not None:
    _check_positive("c_w", c_w)
  inv = 0.0
  if a_config is not None:
    inv = inv + 1.0 / (12.0 * _steps(a_config)**2 * c_x * align)
  if w_config is not None:
    inv = inv + 1.0 / (12.0 * _steps(w_config)**2 * c_w * align)
  return jnp.inf if a_config is None and w_config is None else 1.0 / inv


def output_sqnr(y: jax.Array, y_q: jax.Array) -> jax.Array:
  """`‖y‖² / ‖y - y_q‖²` (linear) of an output and its quantized counterpart."""
  return jnp.sum(y**2) / jnp.sum((y - y_q) ** 2)


def measured_sqnr(x: jax.Array, kernel: jax.Array, *, a_config: QuantConfig,
                  w_config: QuantConfig) -> jax.Array:
  """`‖x W‖² / ‖x W - Q(x) Q(W)‖²` over all tokens, in float32 (linear)."""
  _check_operands(x, kernel)
  x, kernel = jnp.asarray(x), jnp.asarray(kernel)
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  k = kernel.astype(jnp.float32)
  y = jnp.matmul(x, k, precision=HIGHEST)
  yq = jnp.matmul(fake_quantize(x, a_config), fake_quantize(k, w_config), precision=HIGHEST)
  return output_sqnr(y, yq)


def operand_alignment(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`alignment(Σ_x, Σ_W)` of the operands themselves, without `d × d` products:
  with `Σ_x = XᵀX / n` and `Σ_W = K Kᵀ`, `tr(Σ_x Σ_W) = ‖X K‖² / n`, so
  `A = ‖X K‖² / (‖X‖² ‖K‖²)`."""
  _check_operands(x, kernel)
  x, kernel = jnp.asarray(x), jnp.asarray(kernel)
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  k = kernel.astype(jnp.float32)
  y = jnp.matmul(x, k, precision=HIGHEST)
  return jnp.sum(y**2) / (jnp.sum(x**2) * jnp.sum(k**2))


def sqnr_factors(x: jax.Array, kernel: jax.Array, *, a_config: QuantConfig,
                 w_config: QuantConfig) -> dict[str, jax.Array]:
  """The decomposition's factors of `y = x @ kernel` (linear, not dB):
  `concentration_x`, `concentration_w` and `alignment`."""
  _check_operands(x, kernel)
  x = jnp.asarray(x)
  x2 = x.reshape(-1, x.shape[-1])
  return {"concentration_x": concentration_x(x2, a_config),
          "concentration_w": concentration_w(kernel, w_config),
          "alignment": operand_alignment(x2, kernel)}


@functools.partial(jax.jit, static_argnames=("a_config", "w_config"))
def layer_sqnr_terms(x: jax.Array, kernel: jax.Array, *, a_config: QuantConfig,
                     w_config: QuantConfig) -> dict[str, jax.Array]:
  """All terms of the decomposition as arrays in dB (jitted; batch with vmap)."""
  x2 = x.reshape(-1, x.shape[-1])
  f = sqnr_factors(x2, kernel, a_config=a_config, w_config=w_config)
  c_x, c_w, a = f["concentration_x"], f["concentration_w"], f["alignment"]
  sx, sw = _operand_sqnrs(c_x, c_w, a, a_config, w_config)
  return {
      "measured_sqnr_db": db(measured_sqnr(x2, kernel, a_config=a_config, w_config=w_config)),
      "predicted_sqnr_db": db(sx * sw / (sx + sw)),
      "predicted_act_sqnr_db": db(sx),
      "predicted_weight_sqnr_db": db(sw),
      "concentration_x_db": db(c_x),
      "concentration_w_db": db(c_w),
      "alignment_gain_db": db(x2.shape[-1] * a),
  }


@dataclasses.dataclass(frozen=True)
class SQNRDecomposition:
  """Measured and predicted SQNR of one quantized linear and its factors (dB)."""

  measured_sqnr_db: float
  predicted_sqnr_db: float
  concentration_x_db: float
  concentration_w_db: float
  alignment_gain_db: float
  predicted_act_sqnr_db: float
  predicted_weight_sqnr_db: float

  def to_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


def sqnr_decomposition(x: jax.Array, kernel: jax.Array, *, w_bits: int = 4,
                       a_bits: int = 4) -> SQNRDecomposition:
  """Decompose the W{w_bits}A{a_bits} SQNR of `y = x @ kernel` (docs/design.md §1.2).

  Symmetric RTN, activations per token, weights per output channel, no
  clipping.

  Args:
    x: `(tokens, d_in)` activations (leading axes are flattened).
    kernel: `(d_in, d_out)` weights.
    w_bits, a_bits: bit widths, 2..8.

  Returns:
    `SQNRDecomposition` with float attributes in dB.

  Raises:
    ValueError: mismatched shapes, invalid bit widths, or an operand that is
      all zero or holds NaN or ±Inf.
  """
  for name, bits in (("w_bits", w_bits), ("a_bits", a_bits)):
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
      raise ValueError(f"{name}={bits!r}: expected an integer in 2..8")
  x, kernel = jnp.asarray(x), jnp.asarray(kernel)
  _check_operands(x, kernel)
  terms = layer_sqnr_terms(x, kernel, a_config=activation_config(a_bits),
                           w_config=weight_config(w_bits))
  return SQNRDecomposition(**{k: float(v) for k, v in jax.device_get(terms).items()})
