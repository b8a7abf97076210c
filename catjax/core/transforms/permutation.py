"""Channel permutations for block CAT: which channels share a `k × k` block.

Block CAT's alignment has a closed form. Its transform `B` is invertible, so
`tr(Σ_x' Σ_W') = tr(Σ_x Σ_W)` does not move; the geometric mean of block `b`
makes both transformed traces equal to the block's nuclear norm
`‖Σ_x,b^½ Σ_W,b^½‖_*` (the sum of the singular values of `W_b Σ_x,b^½`). With
`S = Σ_b ‖Σ_x,b^½ Σ_W,b^½‖_*`,

    d · A(block CAT) = d · tr(Σ_x Σ_W) / S²,

and full CAT is the one block, `S* = ‖Σ_x^½ Σ_W^½‖_*` (`d · A*`). Grouping the
channels is therefore the problem "partition the `d` channels into `d/k` groups of
`k` that minimize `S`"; a permutation that puts each group in consecutive channels
costs nothing at run time (it folds into the kernels and the block matrix).

`coupling_permutation` finds one greedily from the exact gain of every pair (the
`2 × 2` nuclear norm has a closed form, `‖X‖_* = (‖X‖_F² + 2 |det X|)^½`), and keeps
the channels' own order when that groups better. Host code (NumPy, float64).

The method "cat_perm" (`cat.py`) fits block CAT on the reordered statistics and
keeps the order as `Transform.perm`.
"""

from __future__ import annotations

import numpy as np


def _check(sigma_x, gram_w, k: int) -> tuple[np.ndarray, np.ndarray]:
  sx, sw = np.asarray(sigma_x, np.float64), np.asarray(gram_w, np.float64)
  if sx.ndim != 2 or sx.shape[0] != sx.shape[1] or sx.shape != sw.shape:
    raise ValueError(f"sigma_x {sx.shape} and gram_w {sw.shape} must be square of one size")
  d = sx.shape[0]
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 or d % k:
    raise ValueError(f"block size k={k!r} must be a positive integer dividing the width {d}")
  return sx, sw


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.maximum(w, 0.0))) @ v.T


def block_nuclear_sum(sigma_x, gram_w, k: int, perm=None) -> float:
  """`S = Σ_b ‖Σ_x,b^½ Σ_W,b^½‖_*` over the `k × k` diagonal blocks, after reordering
  the channels by `perm` (channel `perm[i]` goes to position `i`; None: as they are)."""
  sx, sw = _check(sigma_x, gram_w, k)
  if perm is not None:
    perm = check_permutation(perm, sx.shape[0])
    sx, sw = sx[np.ix_(perm, perm)], sw[np.ix_(perm, perm)]
  total = 0.0
  for i in range(0, sx.shape[0], k):
    h = _psd_sqrt(sx[i:i + k, i:i + k])
    lam = np.linalg.eigvalsh(h @ sw[i:i + k, i:i + k] @ h)
    total += float(np.sum(np.sqrt(np.maximum(lam, 0.0))))
  return total


def block_alignment_gain(sigma_x, gram_w, k: int, perm=None) -> float:
  """`d · A` after block CAT with blocks of `k` (channels reordered by `perm`):
  `d · tr(Σ_x Σ_W) / S²`; `k = d` gives full CAT's `d · A*`."""
  sx, sw = _check(sigma_x, gram_w, k)
  s = block_nuclear_sum(sx, sw, k, perm)
  return float(sx.shape[0] * np.sum(sx * sw.T) / s**2)


def check_permutation(perm, d: int) -> np.ndarray:
  perm = np.asarray(perm)
  if perm.shape != (d,) or not np.issubdtype(perm.dtype, np.integer) or \
      not np.array_equal(np.sort(perm), np.arange(d)):
    raise ValueError(f"perm must be a permutation of range({d}), got shape {perm.shape}, "
                     f"dtype {perm.dtype}")
  return perm


def pair_gains(sigma_x, gram_w) -> np.ndarray:
  """`(d, d)`: what pairing channels `a` and `b` in one block saves of `S` against
  keeping them apart, `s_a + s_b - ‖X_ab‖_*` (`s_a = (Σ_x,aa Σ_W,aa)^½`), >= 0."""
  sx, sw = _check(sigma_x, gram_w, 1)
  dx, dw = np.diag(sx), np.diag(sw)
  s = np.sqrt(np.maximum(dx * dw, 0.0))
  # ‖X‖_F² = tr(Σ_x Σ_W) of the 2×2 block; |det X| = (det Σ_x det Σ_W)^½
  frob = dx[:, None] * dw[:, None] + dx[None, :] * dw[None, :] + 2 * sx * sw
  det = np.maximum(dx[:, None] * dx[None, :] - sx**2, 0.0) * \
      np.maximum(dw[:, None] * dw[None, :] - sw**2, 0.0)
  gain = s[:, None] + s[None, :] - np.sqrt(np.maximum(frob + 2 * np.sqrt(det), 0.0))
  np.fill_diagonal(gain, 0.0)
  return np.maximum(gain, 0.0)


def coupling_permutation(sigma_x, gram_w, k: int) -> np.ndarray:
  """A channel order whose consecutive groups of `k` are coupled channels, for block CAT.

  Greedy balanced clustering on `pair_gains`: each block starts from the free channel
  with the largest total gain and takes, one at a time, the free channel with the
  largest summed gain to its members. Deterministic (ties: the lower channel). Returns
  the identity when that has the smaller `S` (never worse than plain block CAT)."""
  sx, sw = _check(sigma_x, gram_w, k)
  d = sx.shape[0]
  if k in (1, d):
    return np.arange(d)
  gain = pair_gains(sx, sw)
  free = np.ones(d, bool)
  order: list[int] = []
  for _ in range(d // k):
    total = np.where(free, gain[:, free].sum(1), -np.inf)
    seed = int(np.argmax(total))
    members, free[seed] = [seed], False
    link = gain[seed].copy()
    for _ in range(k - 1):
      pick = int(np.argmax(np.where(free, link, -np.inf)))
      members.append(pick)
      free[pick] = False
      link += gain[pick]
    order += members
  perm = np.asarray(order)
  if block_nuclear_sum(sx, sw, k, perm) >= block_nuclear_sum(sx, sw, k):
    return np.arange(d)
  return perm
