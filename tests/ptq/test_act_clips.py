"""Per-site learned activation clips (Recipe.train.a_clip, Transform.a_clip): fake
quantization with a traced clip, LSQ gradients, learned in trained CAT and FlatQuant,
carried to the integer linears, the kernel API and the checkpoint; bad settings refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from catjax.app.specs import parse_spec
from catjax.artifacts.checkpoint import load_quantized, save_quantized
from catjax.core.quant import activation_config, fake_quantize
from catjax.kernels import quantize_weight, quantized_matmul
from catjax.models import forward, random_model
from catjax.ptq import train
from catjax.ptq.configs import TrainConfig
from catjax.ptq.engine import quantize_model
from catjax.ptq.hooks import fake_quantize_ste
from catjax.ptq.realization import realize
from catjax.ptq.recipe import Recipe

MODEL = random_model(tiny.config(num_layers=2), seed=3)
WINDOWS = tiny.tokens((6, 16), 128, seed=3)
X = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)


def test_a_traced_clip_quantizes_as_the_configs_and_gets_a_gradient():
  cfg = activation_config(4)
  want = fake_quantize(X, activation_config(4, clip_ratio=0.7))
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda c: fake_quantize(X, cfg, clip=c))(0.7)),
                                np.asarray(want))
  np.testing.assert_array_equal(np.asarray(fake_quantize_ste(X, cfg, ste=True, clip=jnp.float32(0.7))),
                                np.asarray(want))
  g = jax.grad(lambda c: jnp.sum(fake_quantize_ste(X, cfg, ste=True, clip=c) ** 2))(jnp.float32(0.7))
  assert np.isfinite(g) and g != 0  # LSQ: the clip learns; plain STE would give 0
  with pytest.raises(ValueError, match="integer format"):
    fake_quantize(X, activation_config(4, format="mxfp4"), clip=0.5)


def test_the_kernel_api_takes_an_array_clip():
  w = quantize_weight(jnp.asarray(np.random.default_rng(1).normal(size=(64, 32)), jnp.float32), bits=4)
  static = quantized_matmul(X, None, w, a_bits=4, a_clip=0.8)
  arr = quantized_matmul(X, None, w, a_bits=4, a_clip=jnp.float32(0.8))
  # the compiled-in constant may fold into the scale's division: float rounding only
  np.testing.assert_allclose(np.asarray(arr), np.asarray(static), rtol=1e-6, atol=1e-5)
  jitted = jax.jit(lambda c: quantized_matmul(X, None, w, a_bits=4, a_clip=c))(jnp.float32(0.8))
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(static), rtol=1e-6, atol=1e-5)
  assert not np.allclose(np.asarray(quantized_matmul(X, None, w, a_bits=4,
                                                     a_clip=jnp.float32(0.5))), np.asarray(static))
  with pytest.raises(ValueError, match="float scalar"):
    quantized_matmul(X, None, w, a_bits=4, a_clip=jnp.ones(2))
  with pytest.raises(ValueError, match=r"a_clip must be in \(0, 1\], got 1.5"):
    quantized_matmul(X, None, w, a_bits=4, a_clip=jnp.float32(1.5))


@pytest.mark.parametrize("spec", ["cat@k16@t4@lac@ac0.9", "flatquant@t4@lac"])
def test_learned_clips_start_at_the_recipes_and_reach_the_integer_model(spec, tmp_path):
  recipe = parse_spec(spec, Recipe(train=TrainConfig(batch=4)))
  qm = quantize_model(MODEL, WINDOWS[:4], recipe, batch_size=2, progress=False)
  for info in qm.info["train"]:  # step 0: θ = 0 is the recipe's clip, the closed form's loss
    np.testing.assert_allclose(info["first_step_loss"], info["closed_form_loss"], rtol=1e-5)
  clips = np.stack([np.asarray(t.a_clip) for t in qm.transforms.values()])
  assert clips.shape == (4, 2)
  assert (clips >= train.A_CLIP_MIN).all() and (clips <= 1).all()
  assert len(np.unique(clips)) > 1 and not np.allclose(clips, recipe.a_clip)  # learned, per site
  real = realize(MODEL, qm)
  assert real.model.layers.mlp.up_proj.clips is not None
  fake = np.asarray(forward(qm.model, WINDOWS[4:], hook=qm.hook, hook_state=qm.transforms)[0])
  got = np.asarray(forward(real.model, WINDOWS[4:], hook=real.hook, hook_state=real.transforms)[0])
  fp = np.asarray(forward(MODEL, WINDOWS[4:]))
  rms = lambda a: np.sqrt(np.mean(a ** 2))  # noqa: E731
  assert rms(got - fake) < 5e-2 * rms(fp - fake)
  # without the learned clips the integer model is another one
  plain = realize(MODEL, quantize_model(MODEL, WINDOWS[:4], recipe.with_fields(
      {"train.a_clip": False}), batch_size=2, progress=False))
  assert rms(np.asarray(forward(plain.model, WINDOWS[4:], hook=plain.hook,
                                hook_state=plain.transforms)[0]) - got) > 0
  loaded, _ = load_quantized(save_quantized(real, tmp_path / "q"))
  np.testing.assert_array_equal(np.asarray(loaded.model.layers.mlp.up_proj.clips[...]),
                                np.asarray(real.model.layers.mlp.up_proj.clips[...]))
  np.testing.assert_array_equal(np.asarray(forward(loaded.model, WINDOWS[4:], hook=loaded.hook,
                                                   hook_state=loaded.transforms)[0]), got)


@pytest.mark.parametrize("kw, words", [
    ({"method": "cat"}, "needs train.steps > 0"),
    ({"method": "spinquant", "steps": 2}, "learned block by block, not by 'spinquant'"),
    ({"method": "cat", "steps": 2, "a_bits": None}, "needs quantized activations"),
    ({"method": "cat", "steps": 2, "a_format": "mxfp4", "w_clip": False},
     "takes integer activations, not a_format='mxfp4'"),
])
def test_bad_settings_are_named(kw, words):
  steps, w_clip = kw.pop("steps", 0), kw.pop("w_clip", True)
  with pytest.raises(ValueError, match=words):
    Recipe(train=TrainConfig(steps=steps, a_clip=True, w_clip=w_clip), **kw)
