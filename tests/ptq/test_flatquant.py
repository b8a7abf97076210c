"""FlatQuant (catjax.core.transforms.flatquant, trained by catjax.ptq.train): the
Kronecker closed form, its parametrization keeps the function and agrees with the
exact inverse, step 0 is the closed form, training is deterministic, bad settings
are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from catjax.app.specs import parse_spec
from catjax.core.transforms import fit_transform, flatquant
from catjax.models import random_model
from catjax.ptq import train
from catjax.ptq.configs import TrainConfig
from catjax.ptq.engine import quantize_model
from catjax.ptq.recipe import Recipe

MODEL = random_model(tiny.config(num_layers=2), seed=3)
WINDOWS = tiny.tokens((6, 16), 128, seed=3)


@pytest.mark.parametrize("d, sizes", [(576, (24, 24)), (1536, (32, 48)), (64, (8, 8)), (7, (1, 7)),
                                      (2048, (32, 64))])
def test_kronecker_sizes(d, sizes):
  assert flatquant.kron_sizes(d) == sizes


def test_closed_form_is_a_kronecker_hadamard():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(64, 64))
  t = fit_transform("flatquant", a @ a.T, np.eye(64), key=jax.random.PRNGKey(0))
  b = np.asarray(t.blocks[0], np.float64)
  h8 = flatquant.start_factors(64)[0]
  np.testing.assert_allclose(b, np.kron(h8, h8), atol=1e-6)
  np.testing.assert_allclose(b @ b.T, np.eye(64), atol=1e-5)
  assert t.signs is None and t.blocks.shape == (1, 64, 64)


def test_parametrization_keeps_the_function_and_matches_the_exact_inverse():
  rng = np.random.default_rng(1)
  t = fit_transform("flatquant", np.eye(64), np.eye(64), key=jax.random.PRNGKey(0))
  p = {"d1": jnp.asarray(0.05 * rng.normal(size=(8, 8)), jnp.float32),
       "d2": jnp.asarray(0.05 * rng.normal(size=(8, 8)), jnp.float32),
       "sigma": jnp.asarray(0.3 * rng.normal(size=64), jnp.float32)}
  par = train.parametrization(t)
  assert par is train.KRONECKER
  traced, exact = par.traced(t, p), par.exact(t, p)
  x = rng.normal(size=(5, 64)).astype(np.float32)
  w = rng.normal(size=(64, 9)).astype(np.float32)
  for u in (traced, exact):
    np.testing.assert_allclose(np.asarray(u.apply(x) @ u.merge(w)), x @ w, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(traced.inv_blocks), np.asarray(exact.inv_blocks), atol=1e-5)
  assert np.linalg.cond(np.asarray(exact.blocks[0], np.float64)) <= par.cond(p) * (1 + 1e-6)
  zero = par.exact(t, par.init(t))  # the parameters' origin is the closed form
  np.testing.assert_allclose(np.asarray(zero.blocks), np.asarray(t.blocks), atol=1e-6)


def test_training_starts_at_the_closed_form_and_repeats_under_a_seed():
  recipe = parse_spec("flatquant@t3", Recipe(train=TrainConfig(batch=4)))
  a = quantize_model(MODEL, WINDOWS[:4], recipe, batch_size=2, progress=False)
  for info in a.info["train"]:  # one batch of every window: step 0's loss is the closed form's
    np.testing.assert_allclose(info["first_step_loss"], info["closed_form_loss"], rtol=1e-5)
    assert info["max_cond"] < train.MAX_COND
  assert any(i["kept"] for i in a.info["train"])
  b = quantize_model(MODEL, WINDOWS[:4], recipe, batch_size=2, progress=False)
  np.testing.assert_array_equal(np.asarray(a.transforms["mlp_in"].blocks),
                                np.asarray(b.transforms["mlp_in"].blocks))


def test_bad_settings_are_named():
  with pytest.raises(ValueError, match="hadamard='block' applies to"):
    parse_spec("flatquant@bh")
  with pytest.raises(ValueError, match="train.steps=-1"):
    Recipe(method="flatquant", train=TrainConfig(steps=-1))
