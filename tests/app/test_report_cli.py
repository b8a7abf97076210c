"""Per-site reports and the `quantize` / `compare` commands on a tiny model."""

import json
import math

import numpy as np
import pytest

import tiny
from flax import nnx

from catjax.app import cli
from catjax.models import LLAMA, SITES, capture, random_model
from catjax.ptq.engine import quantize_model
from catjax.ptq.recipe import Recipe
from catjax.ptq.calibration import calibrate
from catjax.ptq.blocks import site_kernel
from catjax.analysis.sites import SITE_FIELDS, site_report, sqnr_gain
from catjax.core.stats import sqnr_decomposition


@pytest.fixture(scope="module")
def model_and_windows():
  model = random_model(tiny.config(num_layers=2), seed=11)
  windows = tiny.tokens((6, 16), 128, seed=11)
  return model, windows, calibrate(model, windows[:4], progress=False)


def _numpy_rtn(v, bits, axis):
  """Symmetric RTN in float32 numpy, one scale per slice along `axis`."""
  qmax = np.float32(2 ** (bits - 1) - 1)
  s = (np.abs(v).max(axis=axis, keepdims=True) / qmax).astype(np.float32)
  return np.clip(np.round(v / s), -qmax, qmax) * s


def _numpy_terms(x, k, *, a_bits, w_bits):
  """The report's terms from their definitions, in numpy (dB): measured SQNR of
  `x k` (all tokens, and without position 0; `x (B, T, d)`), C(x), C(W), d·A and
  `12 (N_x² C(x) ∥ N_w² C(W)) A` with `N(b) = 2^b - 2`."""
  y = x.astype(np.float64) @ k
  yq = _numpy_rtn(x, a_bits, -1).astype(np.float64) @ _numpy_rtn(k, w_bits, 0)
  sqnr = lambda s: np.sum(y[s] ** 2) / np.sum((y[s] - yq[s]) ** 2)
  x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
  c_x = np.sum(x2**2) / np.sum((2 * np.abs(x2).max(-1)) ** 2)
  c_w = np.sum(k**2) / np.sum((2 * np.abs(k.astype(np.float64)).max(0)) ** 2)
  align = np.sum((x2 @ k) ** 2) / (np.sum(x2**2) * np.sum(k.astype(np.float64) ** 2))
  sx, sw = 12 * (2**a_bits - 2) ** 2 * c_x * align, 12 * (2**w_bits - 2) ** 2 * c_w * align
  db = lambda v: 10 * math.log10(v)
  return {"measured_sqnr_db": db(sqnr(np.s_[:])), "measured_sqnr_excl_pos0_db": db(sqnr(np.s_[:, 1:])),
          "predicted_sqnr_db": db(sx * sw / (sx + sw)), "concentration_x_db": db(c_x),
          "concentration_w_db": db(c_w), "alignment_gain_db": db(x.shape[-1] * align)}


def test_site_report_of_rtn_equals_the_layer_decomposition(model_and_windows):
  """For `none` (no transform) every row equals the terms of the captured input
  and the site's concatenated kernel, computed independently in numpy."""
  model, windows, stats = model_and_windows
  qm = quantize_model(model, None, stats=stats, recipe=Recipe(method="none", w_bits=4, a_bits=6), progress=False)
  rows = site_report(model, qm, windows[4:])
  assert len(rows) == 2 * len(SITES)
  acts = capture(model, windows[4:])
  layers = nnx.to_pure_dict(nnx.state(model.layers))
  for r in rows:
    x, k = np.asarray(acts[r.site][r.layer]), np.asarray(site_kernel(layers, r.site, spec=LLAMA)[r.layer])
    for field, want in _numpy_terms(x, k, a_bits=6, w_bits=4).items():
      assert getattr(r, field) == pytest.approx(want, abs=1e-3), (r.layer, r.site, field)


def test_site_report_of_a_transform_measures_the_transformed_operands(model_and_windows):
  model, windows, stats = model_and_windows
  had = site_report(model, quantize_model(model, None, stats=stats, recipe=Recipe(method="hadamard"),
                                          progress=False), windows[4:])
  none = site_report(model, quantize_model(model, None, stats=stats, recipe=Recipe(method="none"), progress=False),
                     windows[4:])
  for a, b in zip(had, none):
    # A rotation leaves the alignment unchanged and the measured SQNR differs.
    assert a.alignment_gain_db == pytest.approx(b.alignment_gain_db, abs=1e-3)
    assert a.measured_sqnr_db != b.measured_sqnr_db
  g = sqnr_gain(had, none)
  assert g.sites == 8 and g.min_db <= g.median_db <= g.max_db


def test_site_report_of_cat_equals_the_decomposition_of_the_transformed_operands(
    model_and_windows):
  """Each CAT row is `sqnr_decomposition(t.apply(x), t.merge(kernel))`: C(x), C(W)
  and the alignment change under a non-orthogonal transform, so this fails if any
  term came from the untransformed operands."""
  import jax
  model, windows, stats = model_and_windows
  qm = quantize_model(model, None, stats=stats, recipe=Recipe(method="cat", block_size=16),
                      progress=False)
  rows = site_report(model, qm, windows[4:])
  acts = capture(model, windows[4:])
  layers = nnx.to_pure_dict(nnx.state(model.layers))
  factors = ("concentration_x_db", "concentration_w_db", "alignment_gain_db")
  for r in rows:
    t = jax.tree.map(lambda a: a[r.layer], qm.transforms[r.site])
    x, k = acts[r.site][r.layer], site_kernel(layers, r.site, spec=LLAMA)[r.layer]
    ref = sqnr_decomposition(t.apply(x), t.merge(k), w_bits=4, a_bits=4)
    for field in ("measured_sqnr_db", "predicted_sqnr_db", *factors):
      assert getattr(r, field) == pytest.approx(getattr(ref, field), abs=2e-3), (r.layer, r.site, field)
    # The untransformed operands' factors are far from these (the check can fail).
    untransformed = sqnr_decomposition(x, k, w_bits=4, a_bits=4)
    assert max(abs(getattr(r, f) - getattr(untransformed, f)) for f in factors) > 0.05
  fp = site_report(model, quantize_model(model, None, stats=stats, recipe=Recipe(method="fp"), progress=False),
                   windows[4:])
  assert all(r.measured_sqnr_db is None and r.predicted_sqnr_db is None for r in fp)


def test_site_report_a_layer_at_a_time_equals_all_layers_at_once(model_and_windows, monkeypatch):
  """With the kernel budget below one layer, the report walks the layers one by one
  (what keeps a 1.5B model's report within memory) and gives the same rows; a plan
  whose layers differ splits the sites into groups, each walked the same way."""
  import catjax.analysis.sites as sites
  from catjax.ptq.plan import Plan, SitePlan
  model, windows, stats = model_and_windows
  cat = Recipe(method="cat", block_size=16)
  plan = Plan(tuple(SitePlan(b, s, "cat" if b else "hadamard", 16 if b else None, 4, 4)
                    for b in range(2) for s in SITES))
  for policy in (cat, plan):
    qm = quantize_model(model, None, stats=stats, recipe=policy, progress=False)
    whole = site_report(model, qm, windows[4:])
    monkeypatch.setattr(sites, "REPORT_CHUNK_BYTES", 1)
    one_by_one = site_report(model, qm, windows[4:])
    monkeypatch.undo()
    assert [r.to_dict() for r in one_by_one] == [r.to_dict() for r in whole]
    assert len({r.method for r in whole}) == 1 and len(whole) == 2 * len(SITES)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return tiny.folder_and_text(tmp_path_factory, "ptq")


def _common(folder):
  path, text = folder
  return ["--model", str(path), "--calib-text", str(text), "--eval-text", str(text),
          "--seqlen", "16", "--calib-windows", "4", "--report-windows", "1",
          "--eval-max-tokens", "64", "--block-size", "16", "--no-progress"]


def test_cli_quantize_writes_report_and_plots(folder, tmp_path, capsys):
  out = tmp_path / "q" / "cat.json"
  assert cli.main(["quantize", *_common(folder), "--method", "cat", "--json", str(out),
                   "--save-stats", str(tmp_path / "stats.npz")]) == 0
  report = json.loads(out.read_text())
  assert math.isfinite(report["perplexity"]) and report["perplexity"] > 1
  assert len(report["sites"]) == 2 * len(SITES)
  site = report["sites"][0]
  assert {"layer", "site", *SITE_FIELDS} <= set(site) and site["site"] in SITES
  assert isinstance(site["layer"], int) and isinstance(site["measured_sqnr_db"], float)
  for suffix in (".md", ".sqnr.png", ".decomposition.png"):
    assert out.with_suffix("").with_name("cat" + suffix).stat().st_size > 0
  assert "cat k=16 W4A4" in capsys.readouterr().out
  # The saved statistics give the same result without calibrating.
  out2 = tmp_path / "q" / "again.json"
  assert cli.main(["quantize", *_common(folder), "--method", "cat", "--json", str(out2),
                   "--load-stats", str(tmp_path / "stats.npz")]) == 0
  again = json.loads(out2.read_text())
  assert again["perplexity"] == pytest.approx(report["perplexity"], rel=1e-6)
  assert again["calibration"]["loaded_from"] == str(tmp_path / "stats.npz")


def test_cli_compare_side_by_side(folder, tmp_path, capsys):
  out = tmp_path / "cmp.json"
  assert cli.main(["compare", *_common(folder), "--methods",
                   "fp,none,hadamard,cat,none@w6a6,hadamard@gptq,cat@gptq@t2",
                   "--json", str(out)]) == 0
  report = json.loads(out.read_text())
  labels = [m["recipe"]["label"] for m in report["methods"]]
  assert labels == ["fp", "none W4A4", "hadamard W4A4", "cat k=16 W4A4", "none W6A6",
                    "hadamard gptq W4A4", "cat k=16 gptq t2 W4A4"]
  trained = report["methods"][-1]["engine"]
  assert trained["propagate"] == "quantized" and len(trained["train"]) == 2
  assert [s["method"] for s in report["summary"]] == labels
  assert report["summary"][0]["ppl_gap_to_fp"] == 0.0
  (cat,) = [c for c in report["comparisons"] if c["method"] == "cat k=16 W4A4"]
  assert cat["sqnr_gain_over_hadamard"]["sites"] == 8 and cat["vs_none_w6a6"]["sites"] == 8
  printed = capsys.readouterr().out
  assert "| cat k=16 W4A4 |" in printed and "sites ≥ none W6A6" in printed


def test_run_hands_each_method_over_as_it_finishes(folder):
  """`run(on_method=...)` sees every result, in order, before the report exists
  (what lets a long benchmark keep what it finished)."""
  from catjax.app.pipeline import RunConfig, run
  path, text = folder
  seen = []
  report = run(RunConfig(recipes=(Recipe(method="fp"), Recipe(method="hadamard")),
                         model=str(path), calib_text=str(text), eval_text=str(text),
                         seqlen=16, calib_windows=4, report_windows=1, eval_max_tokens=64,
                         progress=False), on_method=seen.append)
  assert [m.recipe.label for m in seen] == ["fp", "hadamard W4A4"]
  assert [m.perplexity for m in seen] == [m.perplexity for m in report.methods]


@pytest.mark.parametrize("args, match", [
    (["--methods", "fp,cat@k48"], "block_size=48 does not divide"),
    (["--methods", "cat,quarot"], "method='quarot'"),
    (["--methods", "none,none"], "recipes repeat"),
    (["--calib-windows", "500"], "calib_windows \\+ report_windows = 501"),
    (["--mesh", "pipe=2"], "mesh 'pipe=2': expected 'data=N,model=M'"),
    (["--mesh", "data=3"], "data × model = 3, but there are 1 devices"),
    (["--coordinator", "127.0.0.1:1234"], "go together"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
     "--process-id 2 is not below --num-processes 2"),
])
def test_cli_compare_errors_before_work(folder, capsys, args, match):
  assert cli.main(["compare", *_common(folder), *args]) == 2
  import re
  assert re.search(match, capsys.readouterr().err)
