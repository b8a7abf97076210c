"""Channel permutations for block CAT (catjax.core.transforms.permutation): the closed
form of block CAT's alignment, the exact pair gains, and the greedy grouping."""

import jax
import numpy as np
import pytest

from catjax.core.stats import alignment
from catjax.core.transforms import fit_transform
from catjax.core.transforms import permutation as P

D, K = 64, 8


def _moments(seed, d=32):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(d, d))
  w = rng.normal(size=(d, 48)) * rng.uniform(0.2, 3, (d, 1))
  return a @ a.T / d + np.diag(rng.uniform(0.1, 5, d)), w @ w.T


def _blocky(seed, rank):
  rng = np.random.default_rng(seed)
  m = 0.05 * np.eye(D)
  for i in range(0, D, K):
    a = rng.normal(size=(K, rank))
    m[i:i + K, i:i + K] += a @ a.T
  return m


def test_block_alignment_is_the_fitted_transforms_alignment(x64):
  """d · A of the moments block CAT leaves equals d · tr(Σ_x Σ_W) / S² (and k = d: A*)."""
  sx, sw = _moments(0)
  for k, method in ((8, "cat"), (32, "cat_full")):
    t = fit_transform(method, sx, sw, block_size=k, key=jax.random.PRNGKey(0), eps=1e-12)
    m = np.asarray(t.apply(np.eye(32)), np.float64).T  # T
    inv = np.linalg.inv(m)
    want = 32 * float(alignment(m @ sx @ m.T, inv.T @ sw @ inv))
    np.testing.assert_allclose(P.block_alignment_gain(sx, sw, k), want, rtol=1e-6)


def test_pair_gains_are_exact():
  sx, sw = _moments(1, d=6)
  gains = P.pair_gains(sx, sw)
  for a, b in [(0, 1), (2, 5), (3, 4)]:
    idx = np.ix_([a, b], [a, b])
    apart = np.sqrt(sx[a, a] * sw[a, a]) + np.sqrt(sx[b, b] * sw[b, b])
    np.testing.assert_allclose(gains[a, b], apart - P.block_nuclear_sum(sx[idx], sw[idx], 2),
                               rtol=1e-10)
  assert (gains >= 0).all() and np.allclose(gains, gains.T)


def test_shuffled_blocks_are_found_again():
  """Block-structured moments with their channels shuffled: the permutation restores the
  blocks (block CAT reaches full CAT there), plain block CAT does not."""
  sx, sw = _blocky(1, 3), _blocky(2, 2)
  shuffle = np.random.default_rng(0).permutation(D)
  sxs, sws = sx[np.ix_(shuffle, shuffle)], sw[np.ix_(shuffle, shuffle)]
  perm = P.coupling_permutation(sxs, sws, K)
  assert np.array_equal(np.sort(perm), np.arange(D))
  assert np.array_equal(perm, P.coupling_permutation(sxs, sws, K))  # deterministic
  full = P.block_alignment_gain(sxs, sws, D)
  np.testing.assert_allclose(P.block_alignment_gain(sxs, sws, K, perm), full, rtol=1e-9)
  assert P.block_alignment_gain(sxs, sws, K) < 0.6 * full


def test_never_worse_than_the_channels_own_order():
  """Moments that are already block-structured in order: the identity is kept or matched."""
  sx, sw = _blocky(3, 3), _blocky(4, 2)
  perm = P.coupling_permutation(sx, sw, K)
  assert P.block_nuclear_sum(sx, sw, K, perm) <= P.block_nuclear_sum(sx, sw, K) + 1e-9


@pytest.mark.parametrize("kw, words", [
    ({"k": 5}, "k=5 must be a positive integer dividing the width 64"),
    ({"k": True}, "k=True"),
    ({"gram_w": np.eye(32)}, r"sigma_x \(64, 64\) and gram_w \(32, 32\)"),
])
def test_bad_inputs_are_named(kw, words):
  args = {"sigma_x": np.eye(D), "gram_w": np.eye(D), "k": K, **kw}
  with pytest.raises(ValueError, match=words):
    P.coupling_permutation(**args)
  with pytest.raises(ValueError, match="perm must be a permutation of range"):
    P.block_nuclear_sum(np.eye(D), np.eye(D), K, perm=np.zeros(D, int))


def test_cat_perm_transform_preserves_the_function_and_reaches_its_alignment(x64):
  """"cat_perm": `x Tᵀ · T⁻ᵀ W = x W` with the permutation inside `T`; its transformed
  moments have the alignment the closed form promises for its order, and on shuffled
  block moments that is full CAT's."""
  sx, sw = _blocky(1, 3), _blocky(2, 2)
  shuffle = np.random.default_rng(0).permutation(D)
  sx, sw = sx[np.ix_(shuffle, shuffle)], sw[np.ix_(shuffle, shuffle)]
  t = fit_transform("cat_perm", sx, sw, block_size=K, key=jax.random.PRNGKey(0), eps=1e-12)
  perm = np.asarray(t.perm)
  assert np.array_equal(perm, P.coupling_permutation(sx, sw, K))
  x = np.random.default_rng(1).normal(size=(5, D)).astype(np.float32)
  w = np.random.default_rng(2).normal(size=(D, 7)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(t.apply(x) @ t.merge(w)), x @ w, rtol=2e-3, atol=2e-3)
  m = np.asarray(t.matrix(), np.float64)
  inv = np.linalg.inv(m)
  got = D * float(alignment(m @ sx @ m.T, inv.T @ sw @ inv))
  np.testing.assert_allclose(got, P.block_alignment_gain(sx, sw, K, perm), rtol=1e-5)
  np.testing.assert_allclose(got, P.block_alignment_gain(sx, sw, D), rtol=1e-5)
  plain = fit_transform("cat", sx, sw, block_size=K, key=jax.random.PRNGKey(0), eps=1e-12)
  assert plain.perm is None
  # the blocks are block CAT's on the reordered statistics
  again = fit_transform("cat", sx[np.ix_(perm, perm)], sw[np.ix_(perm, perm)], block_size=K,
                        key=jax.random.PRNGKey(0), eps=1e-12)
  np.testing.assert_allclose(np.asarray(t.blocks), np.asarray(again.blocks), rtol=1e-6, atol=1e-8)
