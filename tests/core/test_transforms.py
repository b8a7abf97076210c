import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import catjax as cj
from catjax.core import transforms
from catjax.core import linalg
from catjax.core.synthetic import synthetic_layer
from operands import GW, K, SX

CASES = [("identity", {}), ("smoothquant", {}), ("smoothquant_hadamard", {}), ("hadamard", {}),
         ("cat", {"block_size": 1}), ("cat", {"block_size": 16}), ("cat", {}), ("cat_full", {})]


@pytest.fixture(scope="module")
def layer():
  x, w = synthetic_layer(jax.random.PRNGKey(0), tokens=2048, d_in=128, d_out=96)
  return x, w, cj.second_moment(x), cj.weight_gram(w)


@pytest.mark.parametrize("method,kw", CASES)
def test_every_transform_preserves_the_function(layer, method, kw):
  x, w, sx, g = layer
  t = cj.fit_transform(method, sx, g, act_absmax=jnp.max(jnp.abs(x), 0), **kw)
  y, yt = x @ w, t.apply(x) @ t.merge(w)
  assert float(jnp.max(jnp.abs(yt - y)) / jnp.max(jnp.abs(y))) < 1e-4
  # and the dense matrix agrees with apply / merge
  tm = t.matrix()
  np.testing.assert_allclose(t.apply(x[:4]), x[:4] @ tm.T, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(t.merge(w), jnp.linalg.solve(tm.T, w), rtol=1e-3, atol=1e-4)


def test_cat_full_reaches_the_closed_form_optimum(layer, x64):
  x, w, _, _ = layer
  x, w = x.astype(jnp.float64), w.astype(jnp.float64)
  sx, g = cj.second_moment(x), cj.weight_gram(w)
  t = cj.fit_transform("cat_full", sx, g, eps=1e-12)
  tm = np.asarray(t.matrix(), np.float64)
  tinv_t = np.linalg.inv(tm).T
  sx_t, g_t = tm @ sx @ tm.T, tinv_t @ g @ tinv_t.T
  a_star = float(cj.optimal_alignment(sx, g))
  assert float(cj.alignment(jnp.asarray(sx_t), jnp.asarray(g_t))) == pytest.approx(a_star, rel=1e-4)
  assert a_star > 1.5 / sx.shape[0]  # the synthetic layer is misaligned: room to gain
  # at the optimum the transformed second moment equals the transformed Gram
  np.testing.assert_allclose(sx_t, g_t, rtol=1e-3, atol=1e-4 * np.abs(g_t).max())


def test_block_cat_equalizes_each_diagonal_block(layer, x64):
  x, w, _, _ = layer
  sx = cj.second_moment(x.astype(jnp.float64))
  g = cj.weight_gram(w.astype(jnp.float64))
  t = cj.fit_transform("cat", sx, g, block_size=32, eps=1e-12)
  for i in range(4):
    b = np.asarray(t.blocks[i], np.float64)
    s = slice(32 * i, 32 * (i + 1))
    sx_t = b @ np.asarray(sx)[s, s] @ b.T
    binv = np.linalg.inv(b)
    g_t = binv.T @ np.asarray(g)[s, s] @ binv
    np.testing.assert_allclose(sx_t, g_t, rtol=1e-3, atol=1e-4 * np.abs(g_t).max())


def test_block_size_one_is_the_diagonal_closed_form(layer):
  _, _, sx, g = layer
  t = cj.fit_transform("cat", sx, g, block_size=1, eps=1e-9)
  expected = (jnp.diagonal(g) / jnp.diagonal(sx)) ** 0.25
  np.testing.assert_allclose(t.blocks[:, 0, 0], expected, rtol=1e-4)
  np.testing.assert_allclose(t.inv_blocks[:, 0, 0], 1 / expected, rtol=1e-4)


def test_smoothquant_scales(layer):
  x, _, sx, g = layer
  a = jnp.max(jnp.abs(x), 0)
  wmax = jnp.linspace(0.5, 2.0, 128)
  t = cj.fit_transform("smoothquant", sx, g, act_absmax=a, weight_absmax=wmax, alpha=0.7)
  np.testing.assert_allclose(t.inv_blocks[:, 0, 0], a**0.7 / wmax**0.3, rtol=1e-5)
  assert t.signs is None
  assert cj.fit_transform("smoothquant_hadamard", sx, g).signs is not None


def test_w4a4_sqnr_ordering_on_outlier_misaligned_layer():
  x, w = synthetic_layer(jax.random.PRNGKey(3), tokens=4096, d_in=256, d_out=384)
  sx, g = cj.second_moment(x), cj.weight_gram(w)

  def sqnr(method, **kw):
    t = cj.fit_transform(method, sx, g, **kw)
    return cj.sqnr_decomposition(t.apply(x), t.merge(w)).measured_sqnr_db

  none, had = sqnr("identity"), sqnr("hadamard")
  cat64, full = sqnr("cat", block_size=64), sqnr("cat_full")
  assert full > cat64 > had > none, (full, cat64, had, none)
  assert cat64 > had + 6


@pytest.mark.parametrize("method,kw", [("cat_full", {}), ("cat", {"block_size": 32})])
def test_wide_input_fits_from_the_weight_factor(method, kw):
  # d_in 256 > d_out 24: every diagonal block of Σ_W is singular; with the
  # weight factor the fit takes the low-rank path (r × r eigh): it preserves
  # the function and quantizes as well as the dense fit on the ridged Gram.
  x, w = synthetic_layer(jax.random.PRNGKey(4), tokens=4096, d_in=256, d_out=24)
  sx, g = cj.second_moment(x), cj.weight_gram(w)
  dense = cj.fit_transform(method, sx, g, **kw)
  thin = cj.fit_transform(method, sx, g, weight=w, **kw)
  assert not np.allclose(thin.blocks, dense.blocks)  # a different path was taken
  y, yt = x @ w, thin.apply(x) @ thin.merge(w)
  assert float(jnp.max(jnp.abs(yt - y)) / jnp.max(jnp.abs(y))) < 1e-4
  sqnr = [cj.sqnr_decomposition(t.apply(x), t.merge(w)).measured_sqnr_db for t in (dense, thin)]
  assert abs(sqnr[1] - sqnr[0]) < 0.3, sqnr
  with pytest.raises(ValueError, match="weight must have shape"):
    cj.fit_transform(method, sx, g, weight=w.T, **kw)


def test_fitting_many_layers_of_one_shape_compiles_once(key):
  d = 64
  before = transforms.base._fit._cache_size()
  for i in range(4):
    x = jax.random.normal(jax.random.fold_in(key, i), (256, d))
    w = jax.random.normal(jax.random.fold_in(key, 100 + i), (d, 32))
    cj.fit_transform("cat", cj.second_moment(x), cj.weight_gram(w), block_size=16,
                     key=jax.random.fold_in(key, i))
  assert transforms.base._fit._cache_size() == before + 1


def test_transform_is_a_pytree_usable_under_jit(layer):
  x, w, sx, g = layer
  t = cj.fit_transform("cat", sx, g, block_size=32)
  y = jax.jit(lambda t, x, w: t.apply(x) @ t.merge(w))(t, x, w)
  np.testing.assert_allclose(y, x @ w, rtol=1e-3, atol=1e-3)
  leaves = jax.tree_util.tree_leaves(t)
  assert len(leaves) == 3


def test_whole_fit_can_be_jitted_and_vmapped(key):
  xs = jax.random.normal(key, (3, 256, 32))
  ws = jax.random.normal(jax.random.PRNGKey(1), (3, 32, 16))
  sxs = jax.vmap(cj.second_moment)(xs)
  gs = jax.vmap(cj.weight_gram)(ws)
  fit = lambda sx, g: transforms.base._fit(sx, g, None, None, None, None, method="cat", block_size=8,
                                      alpha=0.5, eps=1e-6)
  batched = jax.vmap(fit)(sxs, gs)
  one = cj.fit_transform("cat", sxs[2], gs[2], block_size=8)
  np.testing.assert_allclose(batched.blocks[2], one.blocks, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("args,kw,match", [
    (("rotate",), {}, "unknown method"),
    (("cat",), {"block_size": 48}, "block_size must be a positive divisor"),
    (("smoothquant",), {"act_absmax": jnp.ones(5)}, "act_absmax must have shape"),
    (("smoothquant",), {"alpha": 2.0}, "alpha"),
])
def test_fit_errors(args, kw, match):
  with pytest.raises(ValueError, match=match):
    cj.fit_transform(*args, jnp.eye(128), jnp.eye(128), **kw)


def test_fit_shape_and_hadamard_errors():
  with pytest.raises(ValueError, match="equal square"):
    cj.fit_transform("cat", jnp.eye(8), jnp.eye(16))
  with pytest.raises(ValueError, match="nearest supported sizes: 96 and 104"):
    cj.fit_transform("hadamard", jnp.eye(100), jnp.eye(100))
  t = cj.fit_transform("identity", jnp.eye(8), jnp.eye(8))
  with pytest.raises(ValueError, match="size 8"):
    t.apply(jnp.ones((2, 7)))


def test_non_finite_fit_names_the_layer():
  g = jnp.eye(16).at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match="layer 3 down_in: gram_w has 1 non-finite"):
    cj.fit_transform("cat", jnp.eye(16), g, block_size=8, name="layer 3 down_in")


def test_fold_block_hadamard_is_block_diagonal_and_preserves_the_function():
  from catjax.core.transforms import fold_block_hadamard
  rng = np.random.RandomState(3)
  d, k = 48, 16
  x = rng.randn(200, d).astype(np.float32) * np.linspace(0.2, 5, d).astype(np.float32)
  w = rng.randn(d, 24).astype(np.float32)
  t = transforms.fit_transform("cat", x.T @ x / 200, w @ w.T, block_size=k, key=jax.random.PRNGKey(1))
  f = fold_block_hadamard(t)
  assert f.signs is None and f.blocks.shape == (d // k, k, k)
  m = np.asarray(f.matrix())
  mask = np.kron(np.eye(d // k), np.ones((k, k))).astype(bool)
  assert np.abs(m[~mask]).max() == 0 and np.abs(m[mask]).max() > 0
  np.testing.assert_allclose(np.asarray(f.apply(x) @ f.merge(w)), x @ w, rtol=1e-4, atol=1e-3)
  with pytest.raises(ValueError, match="needs blocks and a Hadamard"):
    fold_block_hadamard(transforms.fit_transform("hadamard", x.T @ x, w @ w.T))


@pytest.mark.parametrize("d,k,dense_outer_max", [
    (576, 64, 128), (1536, 64, 128), (1536, 64, 4), (192, 32, 128), (96, 8, 128), (64, 64, 128),
    (48, 16, 128)])
def test_apply_folds_the_inner_hadamard_into_the_blocks(d, k, dense_outer_max, monkeypatch):
  """With at least `k` rows, `apply` runs `(H_outer ⊗ I)·((I ⊗ H_inner) D B)`:
  the same `T = H D B` as the dense product, also when the outer part is
  applied factor by factor; fewer rows take the unfolded path."""
  from catjax.core import hadamard as hd
  monkeypatch.setattr(hd, "DENSE_OUTER_MAX", dense_outer_max)
  key = jax.random.PRNGKey(d + k)
  blocks = jax.random.normal(key, (d // k, k, k))
  signs = hd.random_signs(jax.random.fold_in(key, 1), d)
  t = transforms.Transform(blocks, None, signs, "cat", d)
  dense = (hd.hadamard_matrix(d) * np.asarray(signs)) @ jax.scipy.linalg.block_diag(*blocks)
  x = jax.random.normal(jax.random.fold_in(key, 2), (2, k, d))
  assert t._fuses(x) and not t._fuses(x[0, :k - 1])
  inner, outer = hd.inner_split(d, k)
  assert inner > 1 and k % inner == 0 and inner * math.prod(outer) == d
  want = np.asarray(x) @ np.asarray(dense).T
  scale = np.abs(want).max()
  np.testing.assert_allclose(t.apply(x), want, atol=2e-6 * scale)
  np.testing.assert_allclose(t.apply(x[0, :k - 1]), want[0, :k - 1], atol=2e-6 * scale)


# --- bad arguments and operands: ValueError naming the value (and the layer) ----------------

def _fit_layer2(**kw):
  args = {"method": "cat", "sigma_x": SX, "gram_w": GW, "block_size": 8, "name": "layer 2 mlp_in", **kw}
  return transforms.fit_transform(args.pop("method"), args.pop("sigma_x"), args.pop("gram_w"), **args)


FIT_CASES = [
    ("eps negative", {"eps": -1.0}, "eps must be a finite number >= 0, got eps=-1.0"),
    ("eps nan", {"eps": float("nan")}, "eps must be"),
    ("eps inf", {"eps": float("inf")}, "eps must be"),
    ("eps bool", {"eps": True}, "eps must be"),
    ("eps string", {"eps": "1e-6"}, "eps must be"),
    ("alpha bool", {"method": "smoothquant", "alpha": True}, "alpha must be in"),
    ("alpha none", {"method": "smoothquant", "alpha": None}, "alpha must be in"),
    ("x64 string", {"x64": "yes"}, "x64 must be"),
    ("sigma nan", {"sigma_x": SX.at[3, 4].set(jnp.nan)}, "layer 2 mlp_in: sigma_x has 1 non-finite"),
    ("sigma nan hadamard", {"method": "hadamard", "sigma_x": SX.at[3, 4].set(jnp.inf)}, "sigma_x has 1"),
    ("sigma negated", {"sigma_x": -SX}, "sigma_x has 16 negative diagonal"),
    ("sigma negated smoothquant", {"method": "smoothquant", "sigma_x": -SX}, "sigma_x has 16 negative"),
    ("gram negated", {"method": "cat_full", "gram_w": -GW}, "gram_w has 16 negative diagonal"),
    ("sigma zero", {"sigma_x": jnp.zeros((16, 16))}, "sigma_x is all zero"),
    ("gram zero", {"method": "cat_full", "gram_w": jnp.zeros((16, 16))}, "gram_w is all zero"),
    ("act_absmax negative", {"method": "smoothquant", "act_absmax": -jnp.ones(16)}, "act_absmax has 16 negative"),
    ("act_absmax nan", {"method": "smoothquant", "act_absmax": jnp.ones(16).at[0].set(jnp.nan)},
     "act_absmax has 1 non-finite"),
    ("weight_absmax inf", {"method": "smoothquant", "weight_absmax": jnp.full(16, jnp.inf)},
     "weight_absmax has 16 non-finite"),
    ("weight nan", {"weight": K.at[0, 0].set(jnp.nan)}, "weight has 1 non-finite"),
]


@pytest.mark.parametrize("name,kw,words", FIT_CASES, ids=[c[0] for c in FIT_CASES])
def test_fit_transform_rejects_bad_arguments(name, kw, words):
  with pytest.raises(ValueError, match=words):
    _fit_layer2(**kw)


def test_x64_fit_equals_the_float64_linalg():
  """`transforms.fit_transform(x64=True)` is `alignment_transform` in float64 on the diagonal blocks."""
  sx32, gw32 = SX.astype(jnp.float32), GW.astype(jnp.float32)
  t = transforms.fit_transform("cat", sx32, gw32, block_size=8, x64=True)
  with jax.enable_x64(True):
    blocks = lambda a: jnp.stack([a[i:i + 8, i:i + 8] for i in (0, 8)])
    m, m_inv = linalg.alignment_transform(blocks(sx32), blocks(gw32), eps=1e-6, dtype=jnp.float64)
    assert m.dtype == jnp.float64
  np.testing.assert_array_equal(np.asarray(t.blocks), np.asarray(m, np.float32))
  np.testing.assert_array_equal(np.asarray(t.inv_blocks), np.asarray(m_inv, np.float32))
