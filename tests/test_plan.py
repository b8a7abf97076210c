"""Per-site plans: the JSON form, the engine applying a plan, and the planner."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import tiny
from catjax.engine import quantize_model
from catjax.evaluate import perplexity
from catjax.models import forward, random_model
from catjax.models.spec import spec_for
from catjax.plan import Plan, SitePlan, layer_transforms, uniform_plan
from catjax.ptq import Recipe


@pytest.fixture(scope="module")
def setup():
  model = random_model(tiny.config(num_layers=2), seed=3)
  return model, tiny.tokens((10, 16), 128, seed=3)


def _logits(qm, tokens):
  return np.asarray(forward(qm.model, tokens, hook=qm.hook, hook_state=qm.transforms)[0])


@pytest.mark.parametrize("spec", ["cat@k32", "hadamard@w6a8", "none@mxfp4", "cat@k16@gptq"])
def test_a_uniform_plan_is_its_recipe(setup, spec):
  model, windows = setup
  recipe = Recipe(block_size=32).with_spec(spec)
  want = quantize_model(model, windows[:8], recipe, batch_size=4, progress=False)
  got = quantize_model(model, windows[:8], uniform_plan(recipe, model.config), batch_size=4,
                       progress=False)
  for a, b in zip(jax.tree.leaves(want.model.layers), jax.tree.leaves(got.model.layers)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(_logits(got, windows[8:]), _logits(want, windows[8:]),
                             rtol=1e-6, atol=1e-6)


def test_a_mixed_plan_gives_each_site_its_recipe(setup):
  """Layer 0 all CAT k=16 W4A4, layer 1 Hadamard W8A8 except an unrotated
  int4/MXFP4 down_in: each layer's kernels and transforms are those of a
  whole-model run of its recipe, and the plan's hook at each layer and site
  computes what that recipe's hook does there."""
  model, windows = setup
  cfg = model.config
  spec = spec_for(cfg)
  r0 = Recipe(method="cat", block_size=16)
  r1 = Recipe(method="hadamard", w_bits=8, a_bits=8)
  r_down = Recipe(method="none", w_bits=4, a_bits=4, a_format="mxfp4")
  sites = []
  for b in range(cfg.num_layers):
    for s in spec.site_names:
      r = r0 if b == 0 else (r_down if s == "down_in" else r1)
      sites.append(SitePlan(b, s, r.method, r.block_size if r.method == "cat" else None,
                            r.w_bits, r.a_bits, r.w_format, r.a_format))
  plan = Plan(tuple(sites))
  got = quantize_model(model, windows[:8], plan, batch_size=4, progress=False)
  runs = {name: quantize_model(model, windows[:8], r, batch_size=4, progress=False)
          for name, r in (("r0", r0), ("r1", r1), ("down", r_down))}
  for b in range(cfg.num_layers):
    for s in spec.site_names:
      ref = runs["r0" if b == 0 else ("down" if s == "down_in" else "r1")]
      for path in spec.site(s).linears:
        k_got = _get(got.model.layers, path)[b]
        k_ref = _get(ref.model.layers, path)[b]
        np.testing.assert_array_equal(k_got, k_ref, err_msg=f"{b} {path}")
      t_got = layer_transforms(got.transforms, s, b)
      t_ref = None if ref.transforms is None else jax.tree.map(lambda a: a[b], ref.transforms[s])
      assert (t_got is None) == (t_ref is None)
      if t_got is not None:
        for a, c in zip(jax.tree.leaves(t_got), jax.tree.leaves(t_ref)):
          np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
      # the plan's hook at this layer and site is that recipe's hook with that transform
      x = np.random.RandomState(b).standard_normal((2, 5, cfg_dim(cfg, s))).astype(np.float32)
      state_b = jax.tree.map(lambda a: a[b], got.transforms[s])
      np.testing.assert_array_equal(np.asarray(got.hook(s, x, state_b)[0]),
                                    np.asarray(ref.hook(s, x, t_ref)[0]))
  ppl = perplexity(got.model, windows[8:], hook=got.hook, hook_state=got.transforms,
                   progress=False).perplexity
  assert np.isfinite(ppl)
  assert plan.recipe(1, "down_in").a_config.format == "mxfp4"


def _get(layers, path):
  v = layers
  for p in path:
    v = getattr(v, p)
  return np.asarray(v.kernel[...])


def cfg_dim(cfg, site):
  return spec_for(cfg).site_dims(cfg)[site]
