"""The block-by-block engine: equal to the all-at-once path, GPTQ and trained CAT recipes,
propagation, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from catjax.ptq.engine import BlockRunner, quantize_model
from catjax.models import forward, random_model, spec_for
from catjax.models.spec import get_path
from catjax.ptq.hooks import SiteHook
from catjax.ptq.configs import TrainConfig
from catjax.ptq.recipe import Recipe
from catjax.ptq.calibration import calibrate
from catjax.ptq.blocks import merge_block, quantize_block
from catjax.ptq.train import block_loss, train_block
from catjax.app.specs import parse_spec


@pytest.fixture(scope="module")
def setup():
  model = random_model(tiny.config(num_layers=2), seed=5)
  rng = np.random.RandomState(5)
  for norm in (model.layers.attn_norm, model.layers.mlp_norm):  # outlier channels
    scale = np.ones(norm.scale[...].shape, np.float32)
    scale[:, rng.choice(scale.shape[-1], 3, replace=False)] = 20.0
    norm.scale[...] = scale
  return model, tiny.tokens((10, 16), 128, seed=5)


def _logits(qm, tokens):
  return np.asarray(forward(qm.model, tokens, hook=qm.hook, hook_state=qm.transforms)[0],
                    np.float64)


# Gemma 3: a 4-token sliding window in layer 0 (16-token windows), full attention in layer 1.
GEMMA3 = dict(model_type="gemma3_text", hidden_act="gelu_pytorch_tanh", norm_offset=1.0,
              embed_scale=True, qk_norm=True, sandwich_norms=True, sliding_window=4,
              layer_types=("sliding_attention", "full_attention"), rope_local_theta=100.0)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_block_runner_statistics_equal_the_full_forward(setup, family):
  """The engine's per-block statistics (fp propagation) equal `calibrate`'s, block by block."""
  from flax import nnx

  from catjax import SecondMoment
  model, windows = setup
  if family == "gemma3":
    model = random_model(tiny.config(num_layers=2, **GEMMA3), seed=5)
  spec = spec_for(model.config)
  runner = BlockRunner(model, windows.shape[1], batch_size=3)
  stats = calibrate(model, windows[:6], progress=False)
  x = model.embed_tokens(jnp.asarray(windows[:6]))
  layers = nnx.to_pure_dict(nnx.state(model.layers))
  for b in range(model.config.num_layers):
    empty = {s: SecondMoment.zeros(d) for s, d in spec.site_dims(model.config).items()}
    x, got = runner.at(b).statistics(jax.tree.map(lambda a: a[b], layers), x, empty)
    for site in spec.site_names:
      want = np.asarray(stats[site].xx[b])
      np.testing.assert_allclose(np.asarray(got[site].xx), want, rtol=1e-4,
                                 atol=1e-5 * np.abs(want).max())
      assert int(got[site].count) == int(stats[site].count[b]) == 96


@pytest.mark.parametrize("spec", ["cat@k16", "smoothquant", "hadamard@clip"])
def test_block_walk_equals_all_at_once_statistics(setup, spec):
  """Per-block statistics from the walk (fp propagation) give the transforms and kernels of
  the old path: statistics of all blocks from one full forward."""
  model, windows = setup
  recipe = parse_spec(spec)
  walked = quantize_model(model, windows[:6], recipe, batch_size=4, progress=False)
  stats = calibrate(model, windows[:6], progress=False)
  given = quantize_model(model, None, recipe, stats=stats, progress=False)
  assert walked.info["walked"] and not given.info["walked"]
  for a, b in zip(jax.tree.leaves(walked.transforms), jax.tree.leaves(given.transforms)):
    # float32 statistics summed in another order (cat_full, k = d, amplifies that too much
    # on 96 tokens of a 96-wide site to compare; its statistics are compared above).
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3,
                               atol=2e-4 * np.abs(np.asarray(b)).max())
  ka = np.asarray(walked.model.layers.mlp.down_proj.kernel[...])
  kb = np.asarray(given.model.layers.mlp.down_proj.kernel[...])
  # The same grid points up to float rounding of the scales, but for rare rounding ties.
  close = np.isclose(ka, kb, rtol=1e-3, atol=1e-6 * np.abs(kb).max())
  assert np.mean(close) > 0.99, np.mean(close)


def test_gptq_recipe_beats_rtn_and_propagates_quantized(setup):
  model, windows = setup
  fp = np.asarray(forward(model, windows[8:]), np.float64)
  err = {}
  for weights in ("rtn", "gptq"):
    r = Recipe(method="hadamard", w_bits=3, a_bits=None, weights=weights)
    qm = quantize_model(model, windows[:8], r, batch_size=4, progress=False)
    err[weights] = np.mean((_logits(qm, windows[8:]) - fp) ** 2)
    assert qm.info["propagate"] == ("quantized" if weights == "gptq" else "fp")
  assert err["gptq"] < err["rtn"], err
  # Propagating fp outputs instead is a different (valid) recipe.
  r = Recipe(method="hadamard", w_bits=3, a_bits=None, weights="gptq", propagate="fp")
  qf = quantize_model(model, windows[:8], r, batch_size=4, progress=False)
  assert qf.info["propagate"] == "fp"
  assert not np.array_equal(np.asarray(qf.model.layers.attn.q_proj.kernel[...][1]),
                            np.asarray(qm.model.layers.attn.q_proj.kernel[...][1]))


def _block0(model):
  from flax import nnx
  return jax.tree.map(lambda a: a[0], nnx.to_pure_dict(nnx.state(model.layers)))


def test_trained_cat_step0_is_the_closed_form_and_training_helps(setup):
  model, windows = setup
  spec = spec_for(model.config)
  recipe = Recipe(method="cat", block_size=16, train=TrainConfig(steps=30, lr=2e-3, batch=4))
  runner = BlockRunner(model, windows.shape[1], batch_size=4)
  x = model.embed_tokens(jnp.asarray(windows[:8]))
  block = _block0(model)
  stats_hook_out = runner.statistics(block, x, {s: __import__("catjax").SecondMoment.zeros(d)
                                                for s, d in spec.site_dims(model.config).items()})
  y, stats = stats_hook_out
  from catjax.ptq.blocks import fit_block
  closed = fit_block(block, stats, recipe, spec=spec, layer=0)
  # Step 0: the training loss is the closed form's quantized block error, computed here
  # through the engine's own path (merged, fake-quantized kernels + SiteHook).
  qblock, _ = quantize_block(merge_block(block, closed, spec=spec), recipe, spec=spec)
  out, _ = runner(qblock, x, hook=SiteHook.uniform(spec.site_names, recipe.a_config), hook_state=closed)
  want = float(jnp.sum((out - y) ** 2) / jnp.sum(y ** 2))
  assert block_loss(runner, block, closed, x, y, recipe, spec=spec) == pytest.approx(want, rel=1e-5)
  trained, w_clip, info = train_block(runner, block, closed, x, y, recipe, spec=spec, layer=0)
  assert info["closed_form_loss"] == pytest.approx(want, rel=1e-5)
  assert info["kept"] and info["trained_loss"] < 0.97 * info["closed_form_loss"], info
  assert info["max_cond"] < 10
  # Deterministic under the seed.
  again, w_clip2, info2 = train_block(runner, block, closed, x, y, recipe, spec=spec, layer=0)
  for a, b in zip(jax.tree.leaves((trained, w_clip)), jax.tree.leaves((again, w_clip2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Learned weight clip ratios: one per output channel of all 7 kernels, inside
  # [W_CLIP_MIN, 1], moved off 1; the engine's quantization on that grid reproduces
  # the kept trained loss.
  from catjax.ptq.train import W_CLIP_MIN
  assert sorted(w_clip) == sorted(p for _, p in spec.linears)  # keyed as w_scales are
  ratios = np.concatenate([np.asarray(r) for r in w_clip.values()])
  assert ratios.min() >= W_CLIP_MIN and ratios.max() <= 1.0 and ratios.min() < 0.99
  qblock, scales = quantize_block(merge_block(block, trained, spec=spec), recipe, spec=spec,
                                  w_clip=w_clip)
  out, _ = runner(qblock, x, hook=SiteHook.uniform(spec.site_names, recipe.a_config), hook_state=trained)
  got = float(jnp.sum((out - y) ** 2) / jnp.sum(y ** 2))
  assert got == pytest.approx(info["trained_loss"], rel=1e-4)
  path = spec.linears[0][1]
  k = get_path(qblock, path)["kernel"]
  np.testing.assert_allclose(np.round(np.asarray(k / scales[path])), np.asarray(k / scales[path]),
                             atol=1e-3)
  # Without weight clip learning only the blocks train.
  no_clip = recipe.with_fields({"train.w_clip": False})
  assert train_block(runner, block, closed, x, y, no_clip, spec=spec, layer=0)[1] is None
  # Exactly function-preserving without quantization.
  fp_out, _ = runner(block, x)
  merged = merge_block(block, trained, spec=spec)
  got, _ = runner(merged, x, hook=SiteHook.uniform(spec.site_names, None), hook_state=trained)
  np.testing.assert_allclose(np.asarray(got), np.asarray(fp_out), rtol=1e-4,
                             atol=1e-4 * float(jnp.abs(fp_out).max()))


def test_trained_recipe_end_to_end_and_with_gptq(setup):
  # Training only keeps transforms that lower their block's loss on the
  # calibration windows; on this random 2-block model that need not lower the
  # logits' error, so the end-to-end check is "runs, no blow-up", and GPTQ
  # (which minimizes each layer's in-sample error) must help.
  model, windows = setup
  fp = np.asarray(forward(model, windows[:8]), np.float64)
  base = Recipe(method="cat", block_size=16, train=TrainConfig(lr=2e-3))
  err = {}
  for spec in ("cat@pq", "cat@t25", "cat@gptq@t25"):  # all propagate quantized outputs
    qm = quantize_model(model, windows[:8], parse_spec(spec, base), batch_size=4, progress=False)
    err[spec] = np.mean((_logits(qm, windows[:8]) - fp) ** 2)
    if "t25" in spec:
      info = qm.info["train"]
      assert [t["layer"] for t in info] == [0, 1]
      assert all(t["trained_loss"] < t["closed_form_loss"] for t in info if t["kept"])
      assert any(t["kept"] for t in info), info
  assert err["cat@t25"] < 1.25 * err["cat@pq"], err
  assert err["cat@gptq@t25"] < err["cat@pq"], err


def test_engine_errors(setup):
  model, windows = setup
  stats = calibrate(model, windows[:2], progress=False)
  with pytest.raises(ValueError, match="propagates quantized outputs"):
    quantize_model(model, windows[:2], Recipe(weights="gptq", block_size=16), stats=stats)
  with pytest.raises(ValueError, match="needs calibration windows"):
    quantize_model(model, None, Recipe(block_size=16))
  with pytest.raises(ValueError, match="outside the vocabulary"):
    quantize_model(model, windows[:2] + 1000, Recipe(block_size=16))
  with pytest.raises(ValueError, match="batch_size=0"):
    quantize_model(model, windows[:2], Recipe(block_size=16), batch_size=0)
  broken = random_model(tiny.config(num_layers=2), seed=5)
  k = np.asarray(broken.layers.mlp.down_proj.kernel[...]).copy()
  k[0, :, 3] = np.inf
  broken.layers.mlp.down_proj.kernel[...] = jnp.asarray(k)
  with pytest.raises(FloatingPointError, match="block 1 site attn_in: non-finite"):
    quantize_model(broken, windows[:2], Recipe(method="none", weights="clip"), progress=False)


def test_engine_method_specs():
  r = Recipe(block_size=64)
  assert parse_spec("cat@gptq@t200", r).label == "cat k=64 gptq t200 W4A4"
  assert parse_spec("cat@gptq@t200", r).propagates_quantized
  assert not parse_spec("cat@gptq@pfp", r).propagates_quantized
  assert parse_spec("hadamard@clip", r).weights == "clip"
  w4 = parse_spec("hadamard@gptq@w4a16", r)
  assert (w4.w_bits, w4.a_bits, w4.label) == (4, None, "hadamard gptq W4A16")
  assert dataclasses.replace(r, method="fp", weights="gptq").propagates_quantized is False


def test_channel_clipped_quantize_grid_and_lsq_gradient():
  from catjax.ptq.rounding import channel_clipped_quantize
  from catjax.core.quant import fake_quantize, weight_config
  k = jax.random.normal(jax.random.PRNGKey(0), (32, 6))
  q, scale = channel_clipped_quantize(k, jnp.ones(6), 7)
  np.testing.assert_array_equal(np.asarray(q), np.asarray(fake_quantize(k, weight_config(4))))
  ratio = jnp.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
  q, scale = channel_clipped_quantize(k, ratio, 7)
  np.testing.assert_allclose(np.asarray(scale), np.asarray(ratio * jnp.abs(k).max(0) / 7), rtol=1e-6)
  assert float(jnp.abs(q).max(0)[-1]) == pytest.approx(float(7 * scale[-1]), rel=1e-6)  # clipped
  # d q / d ratio: (round(u) - u) inside the range, ±qmax where clipped, times d scale / d ratio.
  ratio = ratio.at[0].set(0.95)  # away from 1, where the largest weight sits on the edge
  scale = channel_clipped_quantize(k, ratio, 7)[1]
  g = jax.grad(lambda r: jnp.sum(channel_clipped_quantize(k, r, 7)[0]))(ratio)
  u = np.asarray(k / scale)
  dq_ds = np.where(np.abs(u) < 7, np.round(u) - u, 7 * np.sign(u))
  want = (dq_ds * np.asarray(jnp.abs(k).max(0) / 7)).sum(0)
  np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=1e-4)


def test_learned_weight_clip_is_refused_with_the_clip_search(setup):
  model, _ = setup
  spec = spec_for(model.config)
  block = _block0(model)
  w_clip = {spec.linears[0][1]: jnp.ones(4)}
  with pytest.raises(ValueError, match="cannot take w_clip"):
    quantize_block(block, Recipe(method="none", weights="clip"), spec=spec, stats={}, w_clip=w_clip)


def test_a_nan_weight_gives_a_nan_quantized_block():
  """`quantize_block` (RTN via the integer `quantize`): a NaN weight's channel and its
  export scale are NaN, not finite numbers."""
  from flax import nnx

  from catjax.models import LLAMA
  model = random_model(tiny.config(num_layers=1), seed=3)
  block = jax.tree.map(lambda a: a[0], nnx.to_pure_dict(nnx.state(model.layers)))
  block["attn"]["q_proj"]["kernel"] = block["attn"]["q_proj"]["kernel"].at[5, 2].set(jnp.nan)
  q, scales = quantize_block(block, Recipe(method="none"), spec=LLAMA)
  qk = np.asarray(q["attn"]["q_proj"]["kernel"])
  assert np.isnan(qk[:, 2]).all() and np.isfinite(np.delete(qk, 2, axis=1)).all()
  assert np.isnan(np.asarray(scales[("attn", "q_proj")])[2])

