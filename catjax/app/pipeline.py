"""The whole PTQ job on a real model: for every recipe quantize with the block
engine, report per site and evaluate perplexity, all on one calibration text.

Recipes that would compute identical statistics (closed form, full-precision
propagation) share one calibration pass when there are several of them; GPTQ
and trained recipes walk the model with their own quantized activations.

`run(RunConfig(...))` returns one JSON-able report; `write_outputs` writes it as
JSON, Markdown and two PNG plots side by side. The CLI commands `quantize` and
`compare` and `benchmarks/smollm2_w4a4.py` are thin wrappers around these.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any


from catjax.analysis.sites import SQNRGain, SiteSQNR, SummaryRow, site_report, sqnr_gain, summary_row
from catjax.app.plots import plan_points, plot_decomposition, plot_predicted_vs_measured, plot_sqnr
from catjax.app.tables import comparison_markdown, markdown_table, sites_markdown
from catjax.artifacts.checkpoint import check_new_folder, save_quantized
from catjax.ptq.engine import quantize_model
from catjax.base.errors import check_writable, write_text
from catjax.ptq.realization import realize
from catjax.ptq.policy import Policy
from catjax.ptq.recipe import Recipe
from catjax.ptq.calibration import calibrate, model_fingerprint
from catjax.artifacts.stats_file import load_stats, save_stats

log = logging.getLogger("catjax")
CALIB_DEFAULTS = {"data": "wiki-calib", "windows": 32}  # and seqlen: the evaluation's


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
  """Everything one comparison needs.

  Attributes:
    recipes: the recipes to compare (or `catjax.ptq.plan.Plan`s); all share one
      calibration.
    model: model name, .gguf file or Hugging Face folder.
    dtype: "float32", "bfloat16" or "float16".
    calib_text / eval_text: text sources (`catjax.app.data.load_text`); the
      default Wikipedia splits are disjoint by article. `calib_text`
      defaults to "wiki-calib".
    calib_windows: windows of `calib_seqlen` tokens for the statistics
      (default 32).
    calib_seqlen: calibration window length (default: `seqlen`).
      With `stats_in`, the three calibration settings default to those the
      statistics were computed with; giving a different one is an error.
    report_windows: further calibration-text windows, held out from the fit,
      on which the per-site SQNR is measured.
    seqlen / eval_max_tokens: evaluation windows and token budget.
    batch_size: windows per step in calibration and evaluation.
    stats_in: reuse statistics saved by `save_stats` instead of calibrating.
    stats_out: save the statistics here.
    progress: show progress bars.
    mesh: "data=N,model=M" (`catjax.models.sharding.make_mesh`): shard the model,
      calibration and evaluation over the devices; None: all devices on
      `data` when there are several, else no mesh.
    save: write the real quantized model of the one recipe here
      (`catjax.artifacts.checkpoint.save_quantized`); a new folder, checked before any work.
  """

  recipes: tuple[Policy, ...]
  model: str = "smollm2-135m"
  dtype: str = "float32"
  calib_text: str | None = None
  calib_windows: int | None = None
  calib_seqlen: int | None = None
  report_windows: int = 2
  eval_text: str = "wiki-eval"
  seqlen: int = 512
  eval_max_tokens: int = 16384
  batch_size: int = 1
  stats_in: Path | None = None
  stats_out: Path | None = None
  progress: bool = True
  mesh: str | None = None
  save: Path | None = None

  def __post_init__(self):
    if not self.recipes:
      raise ValueError("recipes is empty: give at least one method")
    repeated = sorted({r.label for r in self.recipes if self.recipes.count(r) > 1})
    if repeated:
      raise ValueError(f"recipes repeat {repeated}; each method spec must differ")
    labels = [r.label for r in self.recipes]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:  # different recipes, but the reports and plots would show them as one
      raise ValueError(f"recipes {dup} differ only in settings their labels do not show; "
                       "compare them in separate runs")
    for name in ("calib_windows", "report_windows", "seqlen", "eval_max_tokens", "batch_size"):
      v = getattr(self, name)
      if v is None and name == "calib_windows":
        continue
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}={v!r}: expected a positive integer")
    if self.calib_seqlen is not None and self.calib_seqlen < 2:
      raise ValueError(f"calib_seqlen={self.calib_seqlen!r}: expected an integer >= 2")
    if self.save is not None:
      if len(self.recipes) != 1:
        raise ValueError(f"save={self.save}: saving needs exactly one recipe, got "
                         f"{len(self.recipes)}")
      r = self.recipes[0].uniform
      if r is None:
        raise ValueError(f"save={self.save}: a per-site plan runs as fake quantization only; "
                         "a real quantized model takes one recipe for every site")
      if r.method == "fp" or r.w_bits is None or r.a_bits is None:
        raise ValueError(f"save={self.save}: a real quantized model needs weight and activation "
                         f"bits; recipe {r.label!r} has w_bits={r.w_bits} a_bits={r.a_bits}")
      if (r.w_format, r.a_format) != ("int", "int"):
        raise ValueError(f"save={self.save}: a real quantized model is integer; recipe {r.label!r} "
                         f"has w_format={r.w_format!r} a_format={r.a_format!r} (no integer storage "
                         "for FP4 formats; they run as fake quantization only)")
    if self.eval_max_tokens < self.seqlen:
      raise ValueError(f"eval_max_tokens={self.eval_max_tokens} is less than one window of "
                       f"seqlen={self.seqlen}")


def _timed(result, t0: float) -> float:
  """Seconds since `t0` once `result` is computed (JAX dispatches asynchronously)."""
  import jax
  jax.block_until_ready(result)
  return time.perf_counter() - t0


def _shares_stats(policy: Policy) -> bool:
  """Whether `policy` can use the full-precision statistics of all blocks."""
  return policy.quantized and not policy.propagates_quantized and not policy.base.train.steps


def _calib_settings(cfg: RunConfig, meta: dict[str, Any] | None) -> tuple[str, int, int]:
  """`(text, windows, seqlen)` of the calibration: `cfg`'s, else the loaded
  statistics' (`meta`), else the defaults. A setting given in `cfg` that
  differs from the loaded statistics' is an error: it would be ignored."""
  given = {"data": cfg.calib_text, "windows": cfg.calib_windows, "seqlen": cfg.calib_seqlen}
  if meta is not None:
    names = {"data": "calib_text (--calib-text)", "windows": "calib_windows (--calib-windows)",
             "seqlen": "calib_seqlen (--calib-seqlen)"}
    clash = [f"{names[k]}={v!r} but they used {meta.get(k)!r}" for k, v in given.items()
             if v is not None and k in meta and v != meta[k]]
    if clash:
      raise ValueError(f"the statistics loaded from {cfg.stats_in} were computed on other "
                       f"calibration data: {'; '.join(clash)}. Leave these unset to use "
                       "theirs, or recalibrate without loading statistics")
    given = {k: v if v is not None else meta.get(k) for k, v in given.items()}
  return (given["data"] or CALIB_DEFAULTS["data"], given["windows"] or CALIB_DEFAULTS["windows"],
          given["seqlen"] or cfg.seqlen)


def _calibration(cfg: RunConfig, model, tokenizer, mesh):
  """`(shared statistics or None, fit windows, held-out windows, info)`."""
  from catjax.app.data import text_windows
  stats = meta = None
  fingerprint = model_fingerprint(model) if (cfg.stats_in or cfg.stats_out) else None
  if cfg.stats_in is not None:
    stats, meta = load_stats(cfg.stats_in, model.config, fingerprint=fingerprint)
  text, n, seqlen = _calib_settings(cfg, meta)
  need = n + cfg.report_windows
  windows = text_windows(tokenizer, text, seqlen=seqlen, max_tokens=need * seqlen,
                         max_positions=model.config.max_position_embeddings)
  if len(windows.tokens) < need:
    raise ValueError(f"calibration text {text!r} gives {len(windows.tokens)} windows of "
                     f"{seqlen} tokens; calib_windows + report_windows = {need} are needed")
  fit, held = windows.tokens[:n], windows.tokens[n:]
  info = {"data": text, "seqlen": seqlen, "windows": n, "tokens": n * seqlen,
          "report_windows": cfg.report_windows}
  t0 = time.perf_counter()
  if meta is not None:
    info = {**meta, "report_windows": cfg.report_windows, "loaded_from": str(cfg.stats_in)}
  elif cfg.stats_out is not None or sum(map(_shares_stats, cfg.recipes)) > 1:
    stats = calibrate(model, fit, batch_size=cfg.batch_size, progress=cfg.progress, mesh=mesh)
  info["seconds"] = time.perf_counter() - t0 if stats is None else _timed(stats, t0)
  if cfg.stats_out is not None:
    out = save_stats(cfg.stats_out, stats, model=cfg.model, fingerprint=fingerprint,
                     **{k: v for k, v in info.items()  # loaded statistics' meta names their model
                        if k not in ("seconds", "report_windows", "model", "model_fingerprint")})
    log.info("calibration statistics saved to %s (%.0f MB)", out, out.stat().st_size / 2**20)
  return stats, fit, held, info


@dataclasses.dataclass(frozen=True)
class MethodResult:
  """One policy's result (`recipe`: a `Recipe` or a `catjax.ptq.plan.Plan`):
  perplexity, timings, engine info and per-site SQNR."""

  recipe: Policy
  perplexity: float
  evaluation: dict[str, Any]
  fit_seconds: float
  engine: dict[str, Any]
  sites: list[SiteSQNR]
  saved: str | None = None

  def to_dict(self) -> dict[str, Any]:
    out = {"recipe": self.recipe.to_dict(), "perplexity": self.perplexity,
           "evaluation": self.evaluation, "fit_seconds": self.fit_seconds,
           "engine": self.engine, "sites": [r.to_dict() for r in self.sites]}
    return out if self.saved is None else {**out, "saved": self.saved}


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A transform recipe against the baselines at its bits: per-site SQNR gain over
  hadamard, perplexity gap as a fraction of hadamard's, and how its sites fare
  against `none` at W6A6."""

  method: str
  sqnr_gain_over_hadamard: SQNRGain | None = None
  ppl_gap_fraction_of_hadamard: float | None = None
  vs_none_w6a6: SQNRGain | None = None

  def to_dict(self) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class RunReport:
  """What `run` measured. `to_dict()` is the JSON the CLI writes (keys in the README)."""

  config: dict[str, Any]
  model: dict[str, Any]
  calibration: dict[str, Any]
  evaluation: dict[str, Any]
  methods: list[MethodResult]
  summary: list[SummaryRow]
  comparisons: list[Comparison]

  def to_dict(self) -> dict[str, Any]:
    return {"config": self.config, "model": self.model, "calibration": self.calibration,
            "evaluation": self.evaluation, "methods": [m.to_dict() for m in self.methods],
            "summary": [s.to_dict() for s in self.summary],
            "comparisons": [c.to_dict() for c in self.comparisons]}


# The comparisons' default baselines: each transform against `hadamard` at its bits and
# formats, and every site against `none` at W6A6.
BASELINE = "hadamard"
REFERENCE = Recipe(method="none", w_bits=6, a_bits=6)


def _find(results: list[MethodResult], method: str, like: Recipe) -> MethodResult | None:
  """The result of the recipe `method` at `like`'s bits and formats."""
  want = (method, like.w_bits, like.a_bits, like.w_format, like.a_format)
  return next((r for r in results if (u := r.recipe.uniform) is not None
               and (u.method, u.w_bits, u.a_bits, u.w_format, u.a_format) == want), None)


def _reference(results: list[MethodResult]) -> MethodResult | None:
  """The full-precision result (the first policy that quantizes nothing)."""
  return next((r for r in results if not r.recipe.quantized), None)


def comparisons(results: list[MethodResult], *, baseline: str = BASELINE,
                reference: Recipe = REFERENCE) -> list[Comparison]:
  """For every other transform policy: its per-site SQNR gain over `baseline` at the
  same bits and formats, its perplexity gap as a fraction of `baseline`'s, and the
  fraction of sites where it is at least `reference`. The JSON keys name the
  defaults (`sqnr_gain_over_hadamard`, `vs_none_w6a6`)."""
  fp = _reference(results)
  ref = _find(results, reference.method, reference)
  out = []
  for r in results:
    u = r.recipe.uniform
    if not r.recipe.quantized or (u is not None and u.method in ("none", baseline)):
      continue
    had = None if u is None else _find(results, baseline, u)
    frac = None
    if had is not None and fp is not None and had.perplexity > fp.perplexity:
      frac = (r.perplexity - fp.perplexity) / (had.perplexity - fp.perplexity)
    out.append(Comparison(
        r.recipe.label, None if had is None else sqnr_gain(r.sites, had.sites), frac,
        None if ref is None else sqnr_gain(r.sites, ref.sites)))
  return out


def _load_checked(cfg: RunConfig, mesh):
  """`(model, tokenizer, path)` of `cfg.model`, every recipe checked against its
  config before the weights load."""
  from catjax.app import runnable
  from catjax.models import load_config
  path = runnable.resolve_model(cfg.model)
  model_config = load_config(path)
  for r in cfg.recipes:
    r.check_model(model_config)
  return runnable.load_pretrained(path, dtype=cfg.dtype, mesh=mesh)


def run(cfg: RunConfig, *, on_method=None) -> RunReport:
  """Calibrate once and quantize, report and evaluate every recipe of `cfg`.

  Every recipe is checked against the model's widths before any work starts.
  `on_method`, if given, is called with each `MethodResult` as soon as that recipe
  is evaluated, so that a long run can keep what it finished.
  """
  from catjax.app.data import text_windows
  from catjax.analysis.evaluate import perplexity
  from catjax.models import capture
  from catjax.models.sharding import default_mesh, shard_model
  mesh = default_mesh(cfg.mesh)  # a bad mesh fails before the model loads
  if cfg.save is not None:
    check_new_folder(cfg.save)
  if cfg.stats_out is not None:
    check_writable(cfg.stats_out, what="statistics file")
  model, tokenizer, path = _load_checked(cfg, mesh)
  eval_windows = text_windows(tokenizer, cfg.eval_text, seqlen=cfg.seqlen,
                              max_tokens=cfg.eval_max_tokens,
                              max_positions=model.config.max_position_embeddings)
  stats, fit, held, calib_info = _calibration(cfg, model, tokenizer, mesh)
  held_acts = capture(model, held)  # full-precision site inputs, shared by every recipe
  results = []
  for recipe in cfg.recipes:
    t0 = time.perf_counter()
    qm = quantize_model(model, fit, recipe, stats=stats if _shares_stats(recipe) else None,
                        batch_size=cfg.batch_size, progress=cfg.progress, mesh=mesh)
    fit_seconds = _timed(qm.model, t0)
    sites = site_report(model, qm, held, acts=held_acts)
    quantized = recipe.quantized
    if mesh is not None:
      shard_model(qm.model, mesh)
    ppl = perplexity(qm.model, eval_windows.tokens, batch_size=cfg.batch_size, mesh=mesh,
                     hook=qm.hook if quantized else None,
                     hook_state=qm.transforms, model_name=f"{cfg.model} {recipe.label}",
                     data_name=cfg.eval_text, progress=cfg.progress)
    saved = None
    if cfg.save is not None:
      saved = str(save_quantized(realize(model, qm), cfg.save, tokenizer=tokenizer))
      log.info("%28s: real quantized model saved to %s", recipe.label, saved)
    results.append(MethodResult(recipe, ppl.perplexity, ppl.to_dict(), fit_seconds,
                                qm.info or {}, sites, saved))
    if on_method is not None:
      on_method(results[-1])
    log.info("%28s: perplexity %.3f  (fit %.1f s, eval %.0f s)", recipe.label, ppl.perplexity,
             fit_seconds, ppl.seconds)
  fp = getattr(_reference(results), "perplexity", None)
  return RunReport(
      config={k: (str(v) if isinstance(v, Path) else v)
              for k, v in dataclasses.asdict(cfg).items() if k != "recipes"},
      model={"name": cfg.model, "path": str(path), "dtype": cfg.dtype},
      calibration=calib_info, evaluation=eval_windows.to_dict(), methods=results,
      summary=[summary_row(r.recipe.label, r.perplexity, r.sites, fp) for r in results],
      comparisons=comparisons(results))


def make_plan(cfg: RunConfig, budget, *, bits=None, formats=("int",), block_sizes=None,
              objective: str = "noise"):
  """Calibrate (or load the statistics of) `cfg`'s model and choose a per-site
  plan under `budget` (`catjax.ptq.planner`); `cfg.recipes[0]` is the base recipe.
  The factors are measured on the `cfg.report_windows` calibration windows
  held out from the statistics (those `quantize` reports the sites on).

  Returns:
    `(plan, calibration info)`.
  """
  from catjax.ptq import planner
  from catjax.models import capture
  from catjax.models.sharding import default_mesh
  mesh = default_mesh(cfg.mesh)
  base = cfg.recipes[0]
  model, tokenizer, _ = _load_checked(cfg, mesh)
  stats, fit, held, info = _calibration(cfg, model, tokenizer, mesh)
  if stats is None:
    t0 = time.perf_counter()
    stats = calibrate(model, fit, batch_size=cfg.batch_size, progress=cfg.progress, mesh=mesh)
    info["seconds"] = _timed(stats, t0)
  kw = {k: v for k, v in (("bits", bits), ("block_sizes", block_sizes)) if v is not None}
  plan = planner.plan_model(model, stats, capture(model, held), budget, base, formats=formats,
                            objective=objective, progress=cfg.progress, **kw)
  return plan, info


def has_gains(comps: list[Comparison]) -> bool:
  """Whether any method has a gain to show (its baselines ran too)."""
  return any(c.sqnr_gain_over_hadamard or c.ppl_gap_fraction_of_hadamard is not None
             or c.vs_none_w6a6 for c in comps)


def comparisons_markdown(comps: list[Comparison]) -> str:
  """The gains table; a column no method has a value for is left out, with a note.
  Callers print it only when `has_gains`: without baselines it has nothing to show."""
  head = ["method", "SQNR gain over hadamard: mean / median / max dB",
          "ppl gap / hadamard's gap", "sites ≥ none W6A6"]
  rows = []
  for c in comps:
    g, frac, w6 = c.sqnr_gain_over_hadamard, c.ppl_gap_fraction_of_hadamard, c.vs_none_w6a6
    rows.append([
        c.method,
        f"{g.mean_db:+.2f} / {g.median_db:+.2f} / {g.max_db:+.2f}" if g and g.sites else None,
        None if frac is None else f"{100 * frac:.0f}%",
        f"{100 * w6.fraction_at_least:.0f}% of {w6.sites}" if w6 and w6.sites else None])
  had = "needs `hadamard` at the same bits"
  return markdown_table(head, rows, needs={
      head[1]: had, head[2]: f"{had} and `fp`", head[3]: "needs `none@w6a6`"})


def markdown(report: RunReport) -> str:
  """The report as Markdown: setup, comparison table, gains, per-site table per method."""
  c, e = report.calibration, report.evaluation
  parts = [
      f"Model `{report.model['name']}` ({report.model['dtype']}). "
      f"Calibration: {c['windows']} × {c['seqlen']} tokens of `{c['data']}` "
      f"({c['seconds']:.1f} s); per-site SQNR on {c['report_windows']} further held-out windows. "
      f"Evaluation: {e['windows']} × {e['seqlen']} tokens of `{e['data']}`.",
      "", comparison_markdown(report.summary)]
  if has_gains(report.comparisons):
    parts += ["", comparisons_markdown(report.comparisons)]
  for r in report.methods:
    parts += ["", f"### {r.recipe.label} (fit {r.fit_seconds:.1f} s)", "",
              sites_markdown(r.sites)]
  return "\n".join(parts)


def output_paths(json_path: str | Path) -> dict[str, Path]:
  """The files `write_outputs` writes for `json_path=X.json`: X.json, X.md,
  X.sqnr.png, X.decomposition.png (and X.predicted.png for a plan)."""
  json_path = Path(json_path)
  stem = json_path.with_suffix("")
  return {"json": json_path, "md": stem.with_suffix(".md"),
          "sqnr": Path(f"{stem}.sqnr.png"), "decomposition": Path(f"{stem}.decomposition.png"),
          "predicted": Path(f"{stem}.predicted.png")}


def check_outputs(json_path: str | Path) -> None:
  """Check, before any work, that every file of `write_outputs` can be written."""
  for path in output_paths(json_path).values():
    check_writable(path, what="report file")


# The methods the decomposition plot draws by default (others are named in a footnote).
FOCUS = ("none", "smoothquant", "hadamard", "cat", "cat_full")


def write_outputs(report: RunReport, json_path: str | Path, *,
                  extra: dict[str, Any] | None = None, focus: tuple[str, ...] = FOCUS
                  ) -> list[Path]:
  """Write `X.json` (`report.to_dict()`, after `extra`'s keys), `X.md`, `X.sqnr.png`
  and `X.decomposition.png` (the methods or labels `focus`) for `json_path=X.json`,
  each atomically; for a policy with planner predictions (a per-site plan) also
  `X.predicted.png` (the prediction vs the measured SQNR of every site)."""
  out = output_paths(json_path)
  json_path, md = out["json"], out["md"]
  write_text(json_path, json.dumps({**(extra or {}), **report.to_dict()}, indent=2) + "\n")
  write_text(md, markdown(report) + "\n")
  by_method = {r.recipe.label: r.sites for r in report.methods if r.recipe.quantized}
  paths = [json_path, md]
  if by_method:
    c = report.calibration
    kw = {"model": report.model["name"], "tokens": c["report_windows"] * c["seqlen"]}
    paths.append(plot_sqnr(by_method, out["sqnr"], **kw))
    paths.append(plot_decomposition(
        by_method, out["decomposition"], focus=focus,
        perplexity={r.recipe.label: r.perplexity for r in report.methods}, **kw))
  for r in report.methods:
    predicted = r.recipe.predicted_db()
    if predicted:
      paths.append(plot_predicted_vs_measured(
          plan_points(predicted, r.sites), out["predicted"],
          title=f"{r.recipe.label}: every site, planner vs measured",
          xlabel="planner's predicted SQNR (dB)", ylabel="measured SQNR (dB, held-out windows)"))
  return paths
