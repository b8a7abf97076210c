"""Real quantized inference (integer linears) equals the fake-quantized model."""

import numpy as np
import pytest

import tiny
from catjax.analysis.evaluate import perplexity
from catjax.models import forward, random_model
from catjax.ptq.realization import QLinear, linear_bytes, realize
from catjax.ptq.engine import quantize_model
from catjax.ptq.recipe import Recipe
from catjax.ptq.calibration import calibrate
from catjax.app.specs import parse_spec


@pytest.fixture(scope="module")
def setup():
  model = random_model(tiny.config(num_layers=2), seed=21)
  windows = tiny.tokens((6, 16), 128, seed=21)
  return model, windows, calibrate(model, windows[:4], progress=False)


@pytest.mark.parametrize("spec,a_clip", [("none", 1.0), ("hadamard", 1.0), ("cat", 1.0),
                                         ("cat@bh", 1.0), ("none@w8a8", 1.0), ("cat@kv4", 1.0),
                                         ("cat@bh", 0.8), ("cat@gptq", 1.0), ("none@clip", 1.0),
                                         ("cat@bh@gptq@t2", 1.0), ("cat_perm", 1.0),
                                         ("cat_perm@bh", 1.0), ("spinquant@t2", 1.0)])
def test_real_model_equals_fake_quantized(setup, spec, a_clip):
  model, windows, stats = setup
  recipe = parse_spec(spec, Recipe(block_size=16, a_clip=a_clip))
  qm = quantize_model(model, windows[:4], recipe, progress=False)
  real = realize(model, qm)
  assert isinstance(real.model.layers.mlp.down_proj, QLinear)
  # Block-only transforms go into the kernel; full-width Hadamards stay in the hook.
  # SpinQuant's R1 (no Hadamard after it) goes into the kernel too; a permutation stays online.
  fused = (qm.recipe.hadamard == "block" and qm.recipe.method != "cat_perm"
           or qm.recipe.method == "spinquant" and qm.recipe.train.steps > 0)
  assert (real.model.layers.attn.q_proj.blocks is not None) == fused
  assert (real.transforms is None) == (qm.recipe.hadamard == "block" and fused
                                       or qm.transforms is None)
  fake = np.asarray(forward(qm.model, windows[4:], hook=qm.hook, hook_state=qm.transforms)[0])
  got = np.asarray(forward(real.model, windows[4:], hook=real.hook,
                           hook_state=real.transforms)[0])
  fp = np.asarray(forward(model, windows[4:]))
  rms = lambda a: np.sqrt(np.mean(a**2))
  # Float rounding only: the integer path computes the same values in another
  # order, which can move an activation across a rounding boundary (one level
  # flips); with trained block transforms that reaches ~2% of the noise.
  assert rms(got - fake) < 5e-2 * rms(fp - fake), spec
  p_fake = perplexity(qm.model, windows[4:], hook=qm.hook, hook_state=qm.transforms,
                      progress=False).perplexity
  p_real = perplexity(real.model, windows[4:], hook=real.hook, hook_state=real.transforms,
                      progress=False).perplexity
  assert p_real == pytest.approx(p_fake, rel=1e-3)


def test_real_weights_are_a_quarter_of_bf16_or_less(setup):
  model, _, stats = setup
  real = realize(model, quantize_model(model, None, stats=stats, recipe=Recipe(method="none"), progress=False))
  bf16 = linear_bytes(model) // 2  # the float32 tiny model in bfloat16
  assert linear_bytes(real.model) < 0.3 * bf16
  with pytest.raises(ValueError, match="needs w_bits and a_bits"):
    realize(model, quantize_model(model, None, stats=stats, recipe=Recipe(method="none", a_bits=None),
                                  progress=False))
