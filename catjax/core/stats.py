"""Streaming second moments and the SQNR decomposition of a quantized linear.

For `y = x @ kernel` with `x: (tokens, d_in)` and `kernel: (d_in, d_out)`,
assuming uncorrelated weight and activation errors (arXiv 2603.04359,
docs/design.md §1.2):

    SQNR ≈ 12 · (N(b_x)² C(x) ∥ N(b_w)² C(W)) · A(x, W),   a ∥ b = ab/(a+b)

with the concentrations `C(x) = E‖x‖² / E[r(x)²]`, `C(W) = ‖W‖_F² / Σ_j r(W_j)²`
and the alignment `A = tr(Σ_x Σ_W) / (tr Σ_x · tr Σ_W)`, `Σ_x = E[x xᵀ]`,
`Σ_W = Wᵀ W = kernel @ kernel.T`.

The FP4 formats (MXFP4, NVFP4) have no uniform step: E2M1's step grows with the
magnitude, so their error is close to a fixed fraction `κ` of each element's
power (`fp_relative_noise`, measured once on Gaussian blocks). An operand `v` of
such a format adds output noise `κ Σ_i Σ_x,ii Σ_W,ii` (errors uncorrelated
across elements), so

    SQNR_fp = A / (κ · A_diag),   A_diag = Σ_i Σ_x,ii Σ_W,ii / (tr Σ_x · tr Σ_W)

with the diagonal alignment `A_diag` (`diagonal_alignment`): concentration
drops out (a block's scale follows its largest element), and after a
rotation, which flattens both diagonals (`A_diag ≈ 1/d`), `SQNR_fp ≈ d·A / κ`,
the alignment gain over `κ`. All functions are pure and jittable except
`sqnr_decomposition`, which returns Python floats. Called eagerly, the public
ones raise `ValueError` for operands that are all zero or hold NaN or ±Inf
(whose ratios would be NaN); inside `jit` they are not checked.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from catjax.core import linalg
from catjax.core.quant import QuantConfig, grouped, activation_config, fake_quantize, weight_config
from catjax.core.linalg import HIGHEST


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
  linalg.check_pair(("sigma_x", "gram_w"), jnp.asarray(sigma_x), jnp.asarray(gram_w))
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
  g, axes = grouped(v.astype(jnp.float32), config)
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


def diagonal_alignment(sigma_x: jax.Array, gram_w: jax.Array) -> jax.Array:
  """`A_diag = Σ_i Σ_x,ii Σ_W,ii / (tr Σ_x · tr Σ_W)`: the alignment of the
  diagonals alone, which sets the SQNR of the FP4 formats (module docstring)."""
  _check_moments(sigma_x, gram_w)
  dx, dw = jnp.diagonal(jnp.asarray(sigma_x)), jnp.diagonal(jnp.asarray(gram_w))
  return jnp.sum(dx * dw) / (jnp.sum(dx) * jnp.sum(dw))


# Gaussian rows the FP4 noise ratio is measured on: 256 rows of 2048 elements.
_KAPPA_SHAPE, _KAPPA_SEED = (256, 2048), 0


@functools.lru_cache(maxsize=None)
def fp_relative_noise(config: QuantConfig) -> float:
  """`κ = E[(Q(v) - v)²] / E[v²]` of an FP4 `config` on Gaussian rows (of
  scales spread evenly over a factor of two in log): the
  format's error as a fraction of each element's power (the whole error,
  including elements that round to zero). Rotated activations and weights
  are close to Gaussian, where this is what the SQNR model uses; heavier
  tails give MXFP4 a larger κ (its power-of-two scales waste up to a bit),
  NVFP4 nearly the same (benchmarks/fp4_noise.py measures both on SmolLM2).
  Computed once per config, eagerly even under a trace.

  Raises:
    ValueError: an integer config (its noise is `Δ²/12`, not relative).
  """
  if not config.is_fp4:
    raise ValueError(f"fp_relative_noise takes an FP4 format, got {config.format=!r}")
  rng = np.random.RandomState(_KAPPA_SEED)
  v = rng.standard_normal(_KAPPA_SHAPE)
  # Rows at every position within a power of two: MXFP4's scale error depends on it.
  v = (v * 2.0 ** rng.uniform(0, 1, (_KAPPA_SHAPE[0], 1))).astype(np.float32)
  if config.granularity == "channel":  # blocks run down the columns
    v = v.T
  with jax.ensure_compile_time_eval():
    err = fake_quantize(jnp.asarray(v), config) - v
    return float(jnp.sum(err**2) / jnp.sum(jnp.asarray(v) ** 2))


def _operand_sqnr(c, align, diag_align, config: QuantConfig):
  """One operand's SQNR: `12 N² C A` (integers) or `A / (κ A_diag)` (FP4)."""
  if config.is_fp4:
    return align / (fp_relative_noise(config) * diag_align)
  return 12.0 * config.num_steps**2 * c * align


def _operand_sqnrs(c_x, c_w, align, diag_align, a_config: QuantConfig, w_config: QuantConfig):
  """`(SQNR_x, SQNR_w)` of the two operands (`_operand_sqnr`)."""
  return (_operand_sqnr(c_x, align, diag_align, a_config),
          _operand_sqnr(c_w, align, diag_align, w_config))


def predicted_sqnr(c_x, c_w, align, *, a_config: QuantConfig | None,
                   w_config: QuantConfig | None, diag_align=None):
  """`1 / (1/SQNR_x + 1/SQNR_w)` (linear, not dB): for integer operands
  `12 · (N_x² C_x ∥ N_w² C_w) · A`; an FP4 operand's SQNR is `A / (κ A_diag)`
  (module docstring), so it needs `diag_align`. An operand whose config is
  None is not quantized and adds no noise (both None: infinite).

  Raises:
    ValueError: (eagerly) a factor the prediction uses that is not finite and
      > 0, or an FP4 operand without `diag_align`.
  """
  used = [(name, v) for name, v, cfg in (("c_x", c_x, a_config), ("c_w", c_w, w_config))
          if cfg is not None and not cfg.is_fp4]
  fp4 = [cfg.format for cfg in (a_config, w_config) if cfg is not None and cfg.is_fp4]
  if fp4 and diag_align is None:
    raise ValueError(f"an FP4 operand ({fp4[0]}) needs diag_align (stats.diagonal_alignment)")
  for name, v in ([("align", align)] if a_config is not None or w_config is not None else []
                  ) + used + ([("diag_align", diag_align)] if fp4 else []):
    _check_positive(name, v)
  inv = 0.0
  for c, cfg in ((c_x, a_config), (c_w, w_config)):
    if cfg is not None:
      inv = inv + 1.0 / _operand_sqnr(c, align, diag_align, cfg)
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


def operand_diagonal_alignment(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`diagonal_alignment(Σ_x, Σ_W)` of the operands themselves:
  `Σ_i ‖X_:i‖² ‖K_i:‖² / (‖X‖² ‖K‖²)`."""
  _check_operands(x, kernel)
  x, kernel = jnp.asarray(x), jnp.asarray(kernel)
  dx = jnp.sum(x.reshape(-1, x.shape[-1]).astype(jnp.float32) ** 2, axis=0)
  dw = jnp.sum(kernel.astype(jnp.float32) ** 2, axis=1)
  return jnp.sum(dx * dw) / (jnp.sum(dx) * jnp.sum(dw))


def sqnr_factors(x: jax.Array, kernel: jax.Array, *, a_config: QuantConfig,
                 w_config: QuantConfig) -> dict[str, jax.Array]:
  """The decomposition's factors of `y = x @ kernel` (linear, not dB):
  `concentration_x`, `concentration_w`, `alignment` and `diagonal_alignment`
  (the FP4 formats' factor). The concentrations use an integer quantizer's
  ranges: for an FP4 config, 4-bit integers with the format's blocks as groups."""
  _check_operands(x, kernel)
  x = jnp.asarray(x)
  x2 = x.reshape(-1, x.shape[-1])
  return {"concentration_x": concentration_x(x2, integer_counterpart(a_config)),
          "concentration_w": concentration_w(kernel, integer_counterpart(w_config)),
          "alignment": operand_alignment(x2, kernel),
          "diagonal_alignment": operand_diagonal_alignment(x2, kernel)}


def integer_counterpart(config: QuantConfig) -> QuantConfig:
  """An FP4 config's integer counterpart (same bits, blocks and clip); integers as they are."""
  return dataclasses.replace(config, format="int") if config.is_fp4 else config


@functools.partial(jax.jit, static_argnames=("a_config", "w_config"))
def layer_sqnr_terms(x: jax.Array, kernel: jax.Array, *, a_config: QuantConfig,
                     w_config: QuantConfig) -> dict[str, jax.Array]:
  """All terms of the decomposition as arrays in dB (jitted; batch with vmap)."""
  x2 = x.reshape(-1, x.shape[-1])
  f = sqnr_factors(x2, kernel, a_config=a_config, w_config=w_config)
  c_x, c_w, a = f["concentration_x"], f["concentration_w"], f["alignment"]
  sx, sw = _operand_sqnrs(c_x, c_w, a, f["diagonal_alignment"], a_config, w_config)
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
