"""One vocabulary of argument checks, shared by every floor: each raises
`ValueError` naming the value and what was expected (or answers a predicate)."""

from __future__ import annotations

import numpy as np

_REAL = (int, float, np.integer, np.floating)
_BOOL = (bool, np.bool_)


def is_real(v) -> bool:
  """A finite real number, not a bool."""
  return isinstance(v, _REAL) and not isinstance(v, _BOOL) and bool(np.isfinite(v))


def is_ratio(v) -> bool:
  """A real number (not a bool) in (0, 1]; False for NaN."""
  return isinstance(v, _REAL) and not isinstance(v, _BOOL) and 0.0 < float(v) <= 1.0


def check_bits(name: str, bits) -> None:
  """`bits` is an integer in 2..8, or None (16-bit, not quantized)."""
  if bits is None:
    return
  if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
    raise ValueError(f"{name}={bits!r}: expected an integer in 2..8, or None for 16-bit")


def check_int(name: str, v, lo: int, hi: int | None = None, why: str = "") -> None:
  """`v` is an integer (not a bool) >= `lo` (and <= `hi`, the reason given in `why`)."""
  if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
    expected = f">= {lo}" if hi is None else f"in {lo}..{hi}{f' ({why})' if why else ''}"
    raise ValueError(f"{name}={v!r}: expected an integer {expected}")


def check_bool(name: str, v) -> None:
  """`v` is True or False."""
  if not isinstance(v, _BOOL):
    raise ValueError(f"{name}={v!r}: expected True or False")


SEED_RANGE = (-2**63, 2**63 - 1)  # what jax.random.PRNGKey takes


def check_seed(name: str, v) -> None:
  """`v` is an integer seed (not a bool) in `SEED_RANGE`, a 64-bit signed integer."""
  lo, hi = SEED_RANGE
  if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
    raise ValueError(f"{name}={v!r}: expected an integer in [-2**63, 2**63 - 1] (a 64-bit seed)")
