"""Per-site plans: the JSON form, the engine applying a plan, and the planner."""

import json

import jax
from flax import nnx
import numpy as np
import pytest

import tiny
from catjax.ptq.engine import quantize_model
from catjax.analysis.evaluate import perplexity
from catjax.models import forward, random_model
from catjax.models.spec import spec_for
from catjax.ptq.plan import Plan, SitePlan, uniform_plan
from catjax.ptq.policy import layer_transform
from catjax.ptq.recipe import Recipe
from catjax.app.specs import parse_spec


@pytest.fixture(scope="module")
def setup():
  model = random_model(tiny.config(num_layers=2), seed=3)
  return model, tiny.tokens((10, 16), 128, seed=3)


def _logits(qm, tokens):
  return np.asarray(forward(qm.model, tokens, hook=qm.hook, hook_state=qm.transforms)[0])


@pytest.mark.parametrize("spec", ["cat@k32", "hadamard@w6a8", "none@mxfp4", "cat@k16@gptq"])
def test_a_uniform_plan_is_its_recipe(setup, spec):
  model, windows = setup
  recipe = parse_spec(spec, Recipe(block_size=32))
  want = quantize_model(model, windows[:8], recipe, batch_size=4, progress=False)
  plan = uniform_plan(recipe, model.config)
  assert plan.uniform == recipe and plan.label != recipe.label
  got = quantize_model(model, windows[:8], plan, batch_size=4, progress=False)
  # one policy: the same kernels, the same hook state (layout and bits), the same hook
  for part in ("model", "transforms", "w_scales"):
    a, b = (jax.tree_util.tree_flatten_with_path(getattr(qm, part) if part != "model" else
                                                 nnx.state(qm.model))[0] for qm in (want, got))
    assert [k for k, _ in a] == [k for k, _ in b], part
    for (_, x), (_, y) in zip(a, b):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=part)
  assert got.hook == want.hook and got.recipe == recipe
  np.testing.assert_array_equal(_logits(got, windows[8:]), _logits(want, windows[8:]))


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
      t_got = layer_transform(got.transforms, s, b, cfg.num_layers)
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
  assert plan.uniform is None
  with pytest.raises(ValueError, match="per-site plan whose sites differ"):
    got.recipe


def _get(layers, path):
  v = layers
  for p in path:
    v = getattr(v, p)
  return np.asarray(v.kernel[...])


def cfg_dim(cfg, site):
  return spec_for(cfg).site_dims(cfg)[site]


# ---------------------------------------------------------------------------
# The planner


@pytest.fixture(scope="module")
def planned(setup):
  from catjax.models import capture
  from catjax.ptq.planner import site_factors
  from catjax.ptq.calibration import calibrate
  model, windows = setup
  stats = calibrate(model, windows[:8], batch_size=4, progress=False)
  acts = capture(model, windows[8:])
  factors = site_factors(model, stats, acts, Recipe(), block_sizes=(16, 32), progress=False)
  return model, windows, stats, factors


@pytest.mark.parametrize("objective", ["noise", "db"])
@pytest.mark.parametrize("w,a,flops", [(4.5, 4.5, None), (4.0, 6.0, 0.02), (6.0, 4.25, None),
                                       (8.0, 8.0, 0.0)])
def test_planner_respects_its_budgets(planned, w, a, flops, objective):
  from catjax.ptq.planner import Budget, choose
  model, _, _, factors = planned
  plan = choose(factors, model, Budget(w, a, flops), Recipe(), bits=(4, 6, 8),
                formats=("int", "mxfp4", "nvfp4"), block_sizes=(16, 32), objective=objective)
  info = plan.info
  assert info["avg_w_bits"] <= w + 1e-9 and info["avg_a_bits"] <= a + 1e-9
  if flops is not None:
    assert info["transform_flops_ratio"] <= flops + 1e-12
  if flops == 0.0:
    assert {s.method for s in plan.sites} == {"none"}
  # spending the budget: no single cheaper-or-equal upgrade is left that lowers the noise
  # (the search stops only when nothing fits); here: the bits are used to within one step
  assert info["avg_w_bits"] > w - 2.01 and info["avg_a_bits"] > a - 2.01
  plan.check_model(model.config)
  json.loads(json.dumps(plan.to_dict()))


def test_more_budget_predicts_less_noise(planned):
  from catjax.ptq.planner import Budget, choose
  model, _, _, factors = planned
  noise = [choose(factors, model, Budget(b, b), Recipe(), block_sizes=(16, 32)).info[
      "predicted_total_relative_noise"] for b in (4.0, 5.0, 6.0, 8.0)]
  assert noise == sorted(noise, reverse=True) and noise[0] > noise[-1]


def test_budget_below_the_cheapest_plan_is_refused(planned):
  from catjax.ptq.planner import Budget, choose
  model, _, _, factors = planned
  with pytest.raises(ValueError, match="below the cheapest plan: average weight bits"):
    choose(factors, model, Budget(3.0, 4.0), Recipe(), bits=(4, 8), block_sizes=(16, 32))
  with pytest.raises(ValueError, match="avg_w_bits"):
    Budget(1.0, 4.0)
  with pytest.raises(ValueError, match="objective='mse'"):
    choose(factors, model, Budget(4.0, 4.0), Recipe(), objective="mse")


def test_planner_predictions_are_the_reports(planned):
  """Applied, every site's planner prediction equals the one the site report
  computes for the quantized model on the same tokens."""
  from catjax.ptq.planner import Budget, choose
  from catjax.analysis.sites import site_report
  model, windows, stats, factors = planned
  plan = choose(factors, model, Budget(5.0, 5.0), Recipe(), bits=(4, 6, 8),
                formats=("int", "nvfp4"), block_sizes=(16, 32))
  assert len({(s.method, s.block_size, s.w_bits, s.a_bits, s.a_format) for s in plan.sites}) > 1
  qm = quantize_model(model, windows[:8], plan, stats=stats, progress=False)
  rows = {(r.layer, r.site): r for r in site_report(model, qm, windows[8:])}
  for s in plan.sites:
    r = rows[(s.layer, s.site)]
    assert r.predicted_sqnr_db == pytest.approx(s.predicted_sqnr_db, abs=1e-3), s
    assert r.method == plan.label


def test_plan_json_round_trip_and_bad_files(planned, tmp_path):
  from catjax.base.errors import InputError
  from catjax.ptq.planner import Budget, choose
  model, _, _, factors = planned
  plan = choose(factors, model, Budget(4.5, 4.5), Recipe(weights="gptq"), block_sizes=(16, 32))
  plan.save(tmp_path / "p.json")
  back = Plan.load(tmp_path / "p.json")
  assert back.sites == plan.sites and back.base == plan.base
  d = json.loads((tmp_path / "p.json").read_text())
  assert {"sites", "avg_w_bits", "avg_a_bits", "transform_flops_ratio"} <= set(d)
  assert set(d["sites"][0]) == {"layer", "site", "method", "block_size", "w_bits", "a_bits",
                                "w_format", "a_format", "predicted_sqnr_db"}
  bad = [({"sites": []}, "non-empty"),
         ({"sites": [dict(d["sites"][0], method="smoothquant")]}, "method='smoothquant'"),
         ({"sites": [dict(d["sites"][0], w_bits=9)]}, "w_bits"),
         ({"sites": [dict(d["sites"][0], a_format="fp8")]}, "a_format='fp8'"),
         ({"sites": [{"layer": 0}]}, "lacks"),
         ({"sites": d["sites"] + d["sites"][:1]}, "twice")]
  for content, match in bad:
    (tmp_path / "bad.json").write_text(json.dumps(content))
    with pytest.raises(InputError, match=match):
      Plan.load(tmp_path / "bad.json")
  short = Plan.from_dict({"sites": d["sites"][:-1]})
  with pytest.raises(ValueError, match="missing"):
    short.check_model(model.config)
  wrong_k = Plan.from_dict({"sites": [dict(s, method="cat", block_size=24) for s in d["sites"]]})
  with pytest.raises(ValueError, match="site .*block_size=24 does not divide"):
    wrong_k.check_model(model.config)


@pytest.mark.cli
def test_cli_plan_then_quantize_the_plan(tmp_path_factory, tmp_path, capsys):
  """`catjax plan` writes the plan file and its table; `quantize --plan` applies
  it and reports every site; recipe flags beside --plan are refused."""
  from catjax.app import cli
  path, text = tiny.folder_and_text(tmp_path_factory, "plan")
  common = ["--model", str(path), "--calib-text", str(text), "--seqlen", "16",
            "--calib-windows", "4", "--no-progress"]
  out = tmp_path / "plan.json"
  assert cli.main(["plan", *common, "--avg-w-bits", "5", "--avg-a-bits", "4.5",
                   "--max-transform-flops", "0.5", "--block-sizes", "16,32",
                   "--formats", "int,nvfp4", "--weights", "gptq", "--json", str(out)]) == 0
  d = json.loads(out.read_text())
  assert d["avg_w_bits"] <= 5 and d["avg_a_bits"] <= 4.5 and d["transform_flops_ratio"] <= 0.5
  assert len(d["sites"]) == 2 * 4 and d["base_recipe"]["weights"] == "gptq"
  assert "layer" in (tmp_path / "plan.md").read_text()
  capsys.readouterr()
  q = tmp_path / "q.json"
  assert cli.main(["quantize", *common, "--eval-text", str(text), "--eval-max-tokens", "32",
                   "--report-windows", "1", "--plan", str(out), "--json", str(q)]) == 0
  report = json.loads(q.read_text())
  assert report["methods"][0]["recipe"]["sites"] == d["sites"]
  assert len(report["sites"]) == 8 and all(s["predicted_sqnr_db"] is not None
                                           for s in report["sites"])
  assert np.isfinite(report["perplexity"])
  assert (tmp_path / "q.predicted.png").stat().st_size > 0  # planner vs measured, every site
  capsys.readouterr()
  assert cli.main(["quantize", *common, "--plan", str(out), "--w-bits", "8"]) == 2
  assert "--w-bits is not taken with --plan" in capsys.readouterr().err
  assert cli.main(["quantize", *common, "--plan", str(out), "--save", str(tmp_path / "s")]) == 2
  assert "fake quantization only" in capsys.readouterr().err
  assert cli.main(["plan", *common, "--avg-w-bits", "3", "--avg-a-bits", "4", "--bits", "4,8",
                   "--json", str(tmp_path / "p2.json")]) == 2
  assert "below the cheapest plan" in capsys.readouterr().err
