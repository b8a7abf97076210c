"""SpinQuant (catjax.ptq.spinquant): Cayley SGD stays on the manifold and optimizes;
learning starts at QuaRot's rotations, keeps the function without quantization, is
deterministic under a seed, and bad settings are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tiny
from catjax.app.specs import parse_spec
from catjax.core import hadamard as hd
from catjax.models import forward, random_model
from catjax.models.spec import spec_for
from catjax.ptq import spinquant
from catjax.ptq.configs import SpinQuantConfig, TrainConfig
from catjax.ptq.engine import quantize_model
from catjax.ptq.recipe import Recipe

MODEL = random_model(tiny.config(num_layers=2), seed=3)
for _norm in (MODEL.layers.attn_norm, MODEL.layers.mlp_norm):  # scales to fold, not ones
  _norm.scale[...] = jnp.asarray(np.random.default_rng(4).uniform(0.5, 2.0, _norm.scale.shape),
                                 _norm.scale[...].dtype)
WINDOWS = tiny.tokens((6, 16), 128, seed=3)


def _rotation(t, norms, b):
  """Block `b`'s `R1` out of a residual site's transform `R1 · diag(1/g)`."""
  return np.asarray(t.blocks[b, 0], np.float64) * np.asarray(norms[b], np.float64)[None, :]


def _recipe(**kw):
  return Recipe(method="spinquant", train=TrainConfig(steps=kw.pop("steps", 4), batch=2), **kw)


def test_cayley_sgd_keeps_rotations_orthogonal_and_solves_procrustes():
  """min ‖R A − B‖² over rotations (orthogonal Procrustes: R* = U Vᵀ of B Aᵀ = U S Vᵀ),
  from R = I."""
  rng = np.random.default_rng(0)
  a = rng.normal(size=(8, 32))
  r_true = np.linalg.qr(rng.normal(size=(8, 8)))[0]
  r_true[:, 0] *= np.sign(np.linalg.det(r_true))  # in SO(8), which a retraction from I stays in
  b = r_true @ a
  u, _, vt = np.linalg.svd(b @ a.T)
  want = u @ vt
  loss = lambda r: jnp.sum((r @ a - b) ** 2) / a.shape[1]  # noqa: E731
  params = {"r": jnp.eye(8, dtype=jnp.float32)}
  opt = spinquant.cayley_sgd(0.1, 0.9)
  state = opt.init(params)
  step = jax.jit(lambda p, s: (lambda g: (lambda u_s: (optax.apply_updates(p, u_s[0]), u_s[1]))(
      opt.update(g, s, p)))(jax.grad(lambda q: loss(q["r"]))(p)))
  for _ in range(300):
    params, state = step(params, state)
    assert spinquant.orthogonality_error(params) < 1e-5
  np.testing.assert_allclose(np.asarray(params["r"]), want, atol=1e-3)
  with pytest.raises(ValueError, match="square matrices"):
    opt.update({"r": jnp.ones((3, 2))}, opt.init({"r": jnp.ones((3, 2))}), {"r": jnp.ones((3, 2))})
  with pytest.raises(ValueError, match="needs the parameters"):
    opt.update(params, state)


@pytest.mark.parametrize("kw, words", [
    ({"learning_rate": 0.0}, "learning_rate=0.0"),
    ({"learning_rate": 1.0, "momentum": 1.0}, r"momentum=1.0: expected a value in \[0, 1\)"),
])
def test_cayley_sgd_refuses_bad_settings(kw, words):
  with pytest.raises(ValueError, match=words):
    spinquant.cayley_sgd(**kw)


def test_start_is_quarots_rotation():
  cfg, spec = MODEL.config, spec_for(MODEL.config)
  p = spinquant.start(cfg, seed=7)
  signs = hd.random_signs(jax.random.fold_in(jax.random.PRNGKey(7), 0x5b1), cfg.hidden_size)
  x = np.random.default_rng(0).normal(size=(3, cfg.hidden_size)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(x @ p["r1"].T), np.asarray(hd.apply_hadamard(x, signs)),
                             atol=1e-5)
  np.testing.assert_array_equal(np.asarray(p["r2"]), np.broadcast_to(np.eye(cfg.head_dim),
                                                                     p["r2"].shape))
  ts = spinquant.transforms(p, spinquant.site_signs(cfg, spec, 7), spec.site_dims(cfg), spec)
  t = spinquant.layer(ts, 1)
  o = np.random.default_rng(1).normal(size=(3, t["o_in"].dim)).astype(np.float32)
  # R2 = I: the o_in transform is the plain Hadamard with its signs
  np.testing.assert_allclose(np.asarray(t["o_in"].apply(o)),
                             np.asarray(hd.apply_hadamard(o, t["o_in"].signs)), atol=1e-5)
  assert t["down_in"].blocks is None


def test_the_residual_sites_fold_the_norm_scale():
  """`R1 · diag(1/g)` on the norm's output `x̂ ⊙ g` quantizes `x̂ R1ᵀ`; the kernel gets
  `R1 · diag(g) · W`, so the product is kept. Gemma's offset is part of `g`."""
  cfg, spec = MODEL.config, spec_for(MODEL.config)
  p = spinquant.start(cfg, seed=2)
  norms = spinquant.norm_scales(MODEL, spec)
  g = np.asarray(MODEL.layers.mlp_norm.scale[...][1], np.float64)
  np.testing.assert_allclose(np.asarray(norms["mlp_in"][1]), g, rtol=1e-6)
  t = spinquant.layer(spinquant.transforms(p, spinquant.site_signs(cfg, spec, 2),
                                           spec.site_dims(cfg), spec, norms), 1)["mlp_in"]
  rng = np.random.default_rng(5)
  x_hat = rng.normal(size=(3, cfg.hidden_size))
  w = rng.normal(size=(cfg.hidden_size, 7))
  r1 = np.asarray(p["r1"], np.float64)
  np.testing.assert_allclose(np.asarray(t.apply(jnp.asarray(x_hat * g, jnp.float32))),
                             x_hat @ r1.T, atol=1e-4)
  np.testing.assert_allclose(np.asarray(t.merge(jnp.asarray(w, jnp.float32))),
                             r1 @ (g[:, None] * w), rtol=1e-4, atol=1e-4)
  gemma = random_model(tiny.config(model_type="gemma3_text", hidden_act="gelu_pytorch_tanh",
                                   norm_offset=1.0, embed_scale=True, qk_norm=True,
                                   sandwich_norms=True), seed=1)
  gemma.layers.attn_norm.scale[...] = jnp.asarray(rng.normal(size=gemma.layers.attn_norm.scale.shape),
                                                  jnp.float32)
  folded = spinquant.norm_scales(gemma, spec_for(gemma.config))["attn_in"]
  np.testing.assert_allclose(np.asarray(folded), 1.0 + np.asarray(gemma.layers.attn_norm.scale[...]))


def test_learning_keeps_orthogonality_and_starts_at_the_start():
  qm = quantize_model(MODEL, WINDOWS[:4], _recipe(steps=6), batch_size=2, progress=False)
  info = qm.info["spinquant"]
  assert info["orthogonality_error"] < 1e-5
  assert info["kept"] == (info["learned_loss"] < info["start_loss"])
  norms = spinquant.norm_scales(MODEL, spec_for(MODEL.config))
  r1 = _rotation(qm.transforms["attn_in"], norms["attn_in"], 0)
  np.testing.assert_allclose(r1.T @ r1, np.eye(r1.shape[0]), atol=1e-5)
  # R1 is one rotation for every residual reader of every layer
  np.testing.assert_allclose(_rotation(qm.transforms["mlp_in"], norms["mlp_in"], 1), r1, atol=1e-6)
  # step 0 is the start: the first step's loss is the start's on that batch
  cfg, spec = MODEL.config, spec_for(MODEL.config)
  from flax import nnx
  graphdef, state = nnx.split(MODEL)
  recipe = _recipe(steps=1)
  solo = quantize_model(MODEL, WINDOWS[:4], recipe, batch_size=2, progress=False)
  idx = jax.random.choice(jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), 0x5b3), 0),
                          4, (2,), replace=False)
  hook = spinquant.SiteHook.uniform(spec.site_names, recipe.a_config, None, spec.kv_sites, ste=True)
  want = spinquant._loss_jit(spinquant.start(cfg, 0), state, spinquant.site_signs(cfg, spec, 0),
                             norms, jnp.asarray(WINDOWS[:4])[idx], graphdef=graphdef, spec=spec,
                             dims=tuple(sorted(spec.site_dims(cfg).items())), hook=hook,
                             w_config=recipe.w_config)
  np.testing.assert_allclose(solo.info["spinquant"]["first_step_loss"], float(want), rtol=1e-6)


def test_without_quantization_the_function_is_kept_and_a_seed_repeats():
  recipe = _recipe(steps=3, w_bits=None, a_bits=None, propagate="fp")
  a = quantize_model(MODEL, WINDOWS[:4], recipe, batch_size=2, progress=False)
  b = quantize_model(MODEL, WINDOWS[:4], recipe, batch_size=2, progress=False)
  for site in a.transforms:
    np.testing.assert_array_equal(*(np.asarray(jax.tree.leaves(q.transforms[site])[0])
                                    for q in (a, b)))
  fp = np.asarray(forward(MODEL, WINDOWS[4:]))
  got = np.asarray(forward(a.model, WINDOWS[4:], hook=a.hook, hook_state=a.transforms)[0])
  np.testing.assert_allclose(got, fp, rtol=1e-3, atol=1e-3 * np.abs(fp).max())
  other = quantize_model(MODEL, WINDOWS[:4], _recipe(steps=3, w_bits=None, a_bits=None,
                                                     propagate="fp", seed=1),
                         batch_size=2, progress=False)
  assert not np.allclose(np.asarray(other.transforms["attn_in"].blocks),
                         np.asarray(a.transforms["attn_in"].blocks))


def test_nofold_starts_at_the_hadamard_itself():
  """With `fold_norms=False` (spec `nofold`) the residual readers' start is the plain
  randomized Hadamard (no `diag(1/g)`), and what is learned stays a pure rotation."""
  recipe = parse_spec("spinquant@t1@nofold", _recipe(steps=1))
  assert recipe.label.endswith("t1 nofold W4A4") and not recipe.spinquant.fold_norms
  assert "nofold" not in parse_spec("spinquant@t1").label
  cfg, spec = MODEL.config, spec_for(MODEL.config)
  p = spinquant.start(cfg, seed=0)
  t = spinquant.layer(spinquant.transforms(p, spinquant.site_signs(cfg, spec, 0),
                                           spec.site_dims(cfg), spec, None), 0)["attn_in"]
  signs = hd.random_signs(jax.random.fold_in(jax.random.PRNGKey(0), 0x5b1), cfg.hidden_size)
  x = np.random.default_rng(2).normal(size=(4, cfg.hidden_size)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(t.apply(x)), np.asarray(hd.apply_hadamard(x, signs)),
                             atol=1e-5)
  qm = quantize_model(MODEL, WINDOWS[:4], recipe, batch_size=2, progress=False)
  r1 = np.asarray(qm.transforms["attn_in"].blocks[0, 0], np.float64)  # no diag(1/g) in it
  np.testing.assert_allclose(r1.T @ r1, np.eye(r1.shape[0]), atol=1e-5)
  with pytest.raises(ValueError, match="spinquant.fold_norms=1"):
    SpinQuantConfig(fold_norms=1)


def test_closed_form_spinquant_is_hadamard_and_bad_settings_are_named():
  h = quantize_model(MODEL, WINDOWS[:4], Recipe(method="hadamard"), progress=False)
  s = quantize_model(MODEL, WINDOWS[:4], Recipe(method="spinquant"), progress=False)
  np.testing.assert_array_equal(np.asarray(s.transforms["attn_in"].signs),
                                np.asarray(h.transforms["attn_in"].signs))
  assert parse_spec("spinquant@t5").train.steps == 5
  for kw, words in (({"lr": 0.0}, "spinquant.lr=0.0"), ({"momentum": 1.0}, "spinquant.momentum=1.0")):
    with pytest.raises(ValueError, match=words):
      Recipe(method="spinquant", spinquant=SpinQuantConfig(**kw))
