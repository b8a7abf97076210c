"""Hadamard matrices of practical sizes and their fast application.

An order `n = 2^a · m` is built as the Kronecker product of a small base
Hadamard matrix `H_m` and Sylvester matrices `H_{2^j}` (docs/design.md §1.4). Base
orders `m` (multiples of 4 that are not powers of two, up to `MAX_BASE_ORDER`):

* Paley I: `q + 1` for primes `q ≡ 3 (mod 4)` (12, 20, 24, 44, 48, 60, ...);
* Paley II: `2(q + 1)` for primes `q ≡ 1 (mod 4)` (12, 28, 36, 60, 76, ...);
* Williamson: order 172 = 4·43 from the four symmetric circulant matrices of
  order 43 given by Holzmann & Kharaghani (1983), as tabulated in Sage.

`apply_hadamard` never forms the `n × n` matrix: it reshapes the input to the
Kronecker factors and contracts one factor at a time, `O(n · Σ factors)` work
per vector. All matrices here are orthonormal unless `normalized=False`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from catjax.core.linalg import HIGHEST

MAX_BASE_ORDER = 256   # largest non-power-of-two base factor
MAX_POW2_FACTOR = 128  # powers of two are split into factors of at most this size
DENSE_OUTER_MAX = 128  # `apply_outer` contracts at most this order in one dense pass

# First rows of symmetric circulant Williamson matrices A, B, C, D of order 43
# (A² + B² + C² + D² = 172·I); Holzmann & Kharaghani 1983.
_WILLIAMSON_43 = (
    "++---++++-+--+--++--------++--+--+-++++---+",
    "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
    "++-++++++----+-+--++-++-++--+-+----++++++-+",
    "+---++--++++-+-+++-++--++-+++-+-++++--++---",
)


def _is_prime(q: int) -> bool:
  return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _is_pow2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def _jacobsthal(q: int) -> np.ndarray:
  """`Q[i, j] = χ(j - i)` with `χ` the quadratic character of GF(q)."""
  chi = -np.ones(q, np.int64)
  chi[0] = 0
  chi[[(i * i) % q for i in range(1, q)]] = 1
  idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
  return chi[idx]


def _paley1(q: int) -> np.ndarray:
  """Order q+1 for a prime q ≡ 3 mod 4: `I + S`, S skew with S Sᵀ = q I."""
  s = np.zeros((q + 1, q + 1), np.int64)
  s[0, 1:] = 1
  s[1:, 0] = -1
  s[1:, 1:] = _jacobsthal(q)
  return s + np.eye(q + 1, dtype=np.int64)


def _paley2(q: int) -> np.ndarray:
  """Order 2(q+1) for a prime q ≡ 1 mod 4, from the symmetric conference matrix."""
  c = np.zeros((q + 1, q + 1), np.int64)
  c[0, 1:] = 1
  c[1:, 0] = 1
  c[1:, 1:] = _jacobsthal(q)
  return (np.kron(c, np.array([[1, 1], [1, -1]]))
          + np.kron(np.eye(q + 1, dtype=np.int64), np.array([[1, -1], [-1, -1]])))


def _williamson(rows: tuple[str, ...]) -> np.ndarray:
  def circulant(row: str) -> np.ndarray:
    v = np.array([1 if ch == "+" else -1 for ch in row], np.int64)
    return np.stack([np.roll(v, i) for i in range(len(v))])

  a, b, c, d = (circulant(r) for r in rows)
  return np.block([[a, b, c, d], [-b, a, -d, c], [-c, d, a, -b], [-d, -c, b, a]])


def _sylvester(n: int) -> np.ndarray:
  h = np.ones((1, 1), np.int64)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h


@functools.lru_cache(maxsize=None)
def base_orders() -> dict[int, str]:
  """Non-power-of-two base orders and the construction used for each."""
  out: dict[int, str] = {}
  for q in range(3, MAX_BASE_ORDER):
    if not _is_prime(q):
      continue
    if q % 4 == 3 and q + 1 <= MAX_BASE_ORDER and not _is_pow2(q + 1):
      out.setdefault(q + 1, f"paley1:{q}")
    if q % 4 == 1 and 2 * (q + 1) <= MAX_BASE_ORDER and not _is_pow2(2 * (q + 1)):
      out.setdefault(2 * (q + 1), f"paley2:{q}")
  out.setdefault(4 * len(_WILLIAMSON_43[0]), "williamson:43")
  return dict(sorted(out.items()))


@functools.lru_cache(maxsize=None)
def _base_matrix(m: int) -> np.ndarray:
  kind, q = base_orders()[m].split(":")
  if kind == "paley1":
    return _paley1(int(q))
  if kind == "paley2":
    return _paley2(int(q))
  return _williamson(_WILLIAMSON_43)


def _base_for(n: int) -> int | None:
  """Smallest base order m (1 for pure powers of two) with n = m · 2^a."""
  if n < 1:
    return None
  if _is_pow2(n):
    return 1
  for m in base_orders():
    if n % m == 0 and _is_pow2(n // m):
      return m
  return None


def is_supported(n: int) -> bool:
  """Whether catjax can build a Hadamard matrix of order `n`."""
  return isinstance(n, (int, np.integer)) and _base_for(int(n)) is not None


def supported_sizes(limit: int) -> list[int]:
  """All supported orders `<= limit`."""
  return [n for n in range(1, limit + 1) if n in (1, 2) or (n % 4 == 0 and is_supported(n))]


def _nearest_supported(n: int) -> tuple[int | None, int]:
  below = next((k for k in range(n - 1, 0, -1) if is_supported(k)), None)
  above = next(k for k in range(n + 1, 4 * n + 8) if is_supported(k))
  return below, above


def hadamard_factors(n: int) -> tuple[int, ...]:
  """Kronecker factors of `H_n`: the base order (if any), then powers of two.

  Raises:
    ValueError: if no Hadamard matrix of order `n` is supported, naming the
      nearest supported sizes.
  """
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"Hadamard order must be a positive integer, got {n=!r}")
  n = int(n)
  m = _base_for(n)
  if m is None:
    below, above = _nearest_supported(n)
    why = ("a Hadamard matrix needs n = 1, 2 or a multiple of 4" if n % 4 and n > 2 else
           f"supported orders are 2^a·m with m a power of two or one of {sorted(base_orders())}")
    raise ValueError(f"no Hadamard matrix of order n={n}: {why}; nearest supported sizes: "
                     f"{below} and {above}")
  factors = [m] if m > 1 else []
  rest = n // m
  while rest > 1:
    # Balance the split: 4096 -> 64·64 rather than 128·32.
    k = math.ceil(math.log2(rest) / math.log2(MAX_POW2_FACTOR))
    f = 2 ** math.ceil(math.log2(rest) / k)
    factors.append(f)
    rest //= f
  return tuple(factors) or (1,)


@functools.lru_cache(maxsize=64)
def _factor_matrix(f: int) -> np.ndarray:
  return _sylvester(f) if _is_pow2(f) else _base_matrix(f)


def _kron(factors) -> np.ndarray:
  """The ±1 Kronecker product of the factor matrices, most significant first."""
  h = np.ones((1, 1), np.int64)
  for f in factors:
    h = np.kron(h, _factor_matrix(f))
  return h


def hadamard_matrix(n: int, *, normalized: bool = True) -> np.ndarray:
  """Dense `H_n` (host numpy): orthonormal float64, or ±1 int64 if not normalized."""
  h = _kron(hadamard_factors(n))
  return h / math.sqrt(n) if normalized else h


def random_signs(key: jax.Array, n: int, dtype=jnp.float32) -> jax.Array:
  """A random ±1 vector: the diagonal `D` of a randomized Hadamard `H D`."""
  return jnp.where(jax.random.bernoulli(key, 0.5, (n,)), 1.0, -1.0).astype(dtype)


def apply_hadamard(x: jax.Array, signs: jax.Array | None = None, *, axis: int = -1) -> jax.Array:
  """Orthonormal `H_n` (times `diag(signs)`) applied along `axis` of `x`.

  For a row vector along the last axis this is `x' = x (H D)ᵀ`, i.e. every
  vector `v` along `axis` becomes `H D v`. Works under `jit` and `vmap`;
  computes in float32 and returns the dtype of `x`.

  Raises:
    ValueError: for unsupported sizes or a `signs` of the wrong shape.
  """
  x = jnp.asarray(x)
  axis = axis % x.ndim
  n = x.shape[axis]
  factors = hadamard_factors(n)
  out_dtype = x.dtype
  v = jnp.moveaxis(x, axis, -1).astype(jnp.float32)
  if signs is not None:
    if signs.shape != (n,):
      raise ValueError(f"signs must have shape ({n},), got {signs.shape=}")
    v = v * signs.astype(jnp.float32)
  v = _apply_factors(v.reshape(-1, n), factors).reshape(v.shape)
  return jnp.moveaxis(v, -1, axis).astype(out_dtype)


def _apply_factors(v: jax.Array, factors: tuple[int, ...]) -> jax.Array:
  """`v (H_f1 ⊗ H_f2 ⊗ ... ⊗ I)ᵀ` for float32 `v: (rows, n)`, one factor at a
  time (the identity fills what the factors leave of `n`)."""
  pre, post = v.shape
  shape = v.shape
  for f in factors:
    post //= f
    h = jnp.asarray(_factor_matrix(f) / math.sqrt(f), jnp.float32)
    v = jnp.einsum("ab,pbq->paq", h, v.reshape(pre, f, post), precision=HIGHEST)
    pre *= f
  return v.reshape(shape)


def inner_split(n: int, k: int) -> tuple[int, tuple[int, ...]]:
  """Split `H_n = H_outer ⊗ H_inner` for a block size `k`.

  `inner` is the largest power of two dividing both `k` and the power-of-two
  part of `n` (Sylvester matrices factor as Kronecker products of any powers
  of two, so this is the same `H_n`); `I_(n/k) ⊗ (I_(k/inner) ⊗ H_inner)` is
  then block diagonal with `k × k` blocks and can be folded into a block
  transform. Returns `(inner, outer factors)`, the outer factors in Kronecker
  order (most significant first).
  """
  factors = hadamard_factors(n)
  pow2 = math.prod(f for f in factors if _is_pow2(f))
  inner = math.gcd(pow2, k & -k) if k > 0 else 1
  outer, rest = [], n // inner
  for f in factors:
    g = math.gcd(f, rest) if _is_pow2(f) else f
    if g > 1:
      outer.append(g)
    rest //= g
  return inner, tuple(outer)


def apply_outer(v: jax.Array, factors: tuple[int, ...]) -> jax.Array:
  """`H_outer` (the Kronecker product of `factors`) applied along the middle
  axis of float32 `v: (rows, o, q)`: the outer part of `inner_split`. One
  dense contraction when `o` is small (one pass over `v` beats several cheaper
  ones on CPU), else one factor at a time."""
  rows, o, q = v.shape
  if o == 1:
    return v
  if o > DENSE_OUTER_MAX:
    return _apply_factors(v.reshape(rows, o * q), factors).reshape(v.shape)
  h = jnp.asarray(_kron(factors) / math.sqrt(o), jnp.float32)
  return jnp.einsum("ab,pbq->paq", h, v, precision=HIGHEST)
