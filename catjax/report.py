"""Per-site reports of a quantized model: measured and predicted SQNR and its factors.

For every block and site, on held-out tokens with full-precision inputs
(docs/design.md §3): the SQNR of the site's output `x W` (all its linears side by
side) under the recipe's online transform and quantizers, the SQNR the
uniform-noise model predicts (docs/design.md §1.2), `C(x)`, `C(W)` of the transformed
operands and their alignment gain `d · A`. Tables as Markdown, plots as PNG.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from catjax import stats as st
from flax import nnx

from catjax.models.llama import SITES, Llama, capture
from catjax.models.spec import spec_for
from catjax.ptq import QuantizedModel, site_kernel
from catjax.quant import activation_config, fake_quantize, weight_config

HIGHEST = jax.lax.Precision.HIGHEST
SITE_FIELDS = ("measured_sqnr_db", "measured_sqnr_excl_pos0_db", "predicted_sqnr_db",
               "concentration_x_db", "concentration_w_db", "alignment_gain_db")


@dataclasses.dataclass(frozen=True)
class SiteSQNR:
  """One block site of a quantized model on held-out tokens; dB, None where
  infinite (an unquantized model). `to_dict()` gives the report's JSON keys."""

  layer: int
  site: str
  method: str
  measured_sqnr_db: float | None
  measured_sqnr_excl_pos0_db: float | None
  predicted_sqnr_db: float | None
  concentration_x_db: float | None
  concentration_w_db: float | None
  alignment_gain_db: float | None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SQNRGain:
  """Per-site differences of one SQNR field between two methods (dB);
  `sites == 0` (and the rest None) when no site has both values."""

  sites: int
  mean_db: float | None = None
  median_db: float | None = None
  max_db: float | None = None
  min_db: float | None = None
  fraction_at_least: float | None = None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SummaryRow:
  """One method's line of the comparison table: perplexity, its gap to fp and
  the mean of every site field (`mean_<field>`)."""

  method: str
  perplexity: float | None
  ppl_gap_to_fp: float | None
  mean_measured_sqnr_db: float | None
  mean_measured_sqnr_excl_pos0_db: float | None
  mean_predicted_sqnr_db: float | None
  mean_concentration_x_db: float | None
  mean_concentration_w_db: float | None
  mean_alignment_gain_db: float | None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@functools.partial(jax.jit, static_argnames=("a_config", "w_config"))
def _site_terms(x, kernel, qkernel, transform, *, a_config, w_config):
  """Linear-scale terms for each layer; `x (L, B, T, d)`, kernels `(L, d, o)`.

  Every term is `catjax.stats`'s: `output_sqnr` of the site's output against
  the quantized model's (all tokens, and without position 0), `sqnr_factors`
  of the transformed operands (8-bit quantizers' ranges for an operand left
  unquantized) and `predicted_sqnr` from them. Degenerate sites give NaN.
  """

  def one(args):
    x, k, kq, t = args
    xt = x if t is None else t.apply(x)
    kt = k if t is None else t.merge(k)
    xq = xt if a_config is None else fake_quantize(xt, a_config)
    y = jnp.einsum("btd,do->bto", x, k, precision=HIGHEST)
    yq = jnp.einsum("btd,do->bto", xq, kq, precision=HIGHEST)
    f = st.sqnr_factors(xt, kt, a_config=a_config or activation_config(8),
                        w_config=w_config or weight_config(8))
    c_x, c_w, align = f["concentration_x"], f["concentration_w"], f["alignment"]
    predicted = st.predicted_sqnr(c_x, c_w, align, a_config=a_config, w_config=w_config,
                                  diag_align=f["diagonal_alignment"])
    return {
        "measured": st.output_sqnr(y, yq),
        "measured_excl_pos0": st.output_sqnr(y[:, 1:], yq[:, 1:]),
        "predicted": jnp.asarray(predicted, jnp.float32),
        "c_x": c_x, "c_w": c_w, "align": align,
    }

  return jax.lax.map(one, (x, kernel, qkernel, transform))


def _layer_groups(qm: QuantizedModel, site: str, num_layers: int):
  """`(layers, their stacked transforms or None, a_config, w_config)` for the
  groups of layers that quantize `site` alike: all layers for a recipe; per
  transform variant and weight quantizer for a plan."""
  if qm.plan is None:
    t = None if qm.transforms is None else qm.transforms[site]
    return [(np.arange(num_layers), t, qm.recipe.a_config, qm.recipe.w_config)]
  state = qm.transforms[site]
  choice = np.asarray(state["choice"])
  groups: dict[tuple, list[int]] = {}
  for b in range(num_layers):
    r = qm.plan.recipe(b, site)
    groups.setdefault((int(choice[b]), r.a_config, r.w_config), []).append(b)
  out = []
  for (c, a_config, w_config), idx in groups.items():
    idx = np.asarray(idx)
    t = state["transforms"][c]
    out.append((idx, None if t is None else jax.tree.map(lambda a: a[idx], t), a_config, w_config))
  return out


def _db(v: float) -> float | None:
  """dB of a linear ratio; None for an infinite or undefined one (JSON has no inf)."""
  return None if not math.isfinite(v) or v <= 0 else 10.0 * math.log10(v)


def site_report(model: Llama, qm: QuantizedModel, windows: np.ndarray, *,
                acts: dict[str, jax.Array] | None = None) -> list[SiteSQNR]:
  """One `SiteSQNR` per block and site: SQNR terms of `qm` on `windows` (held-out tokens).

  Inputs of every site are captured from the full-precision `model`, so each
  row measures that site alone. Pass `acts=capture(model, windows)` to reuse
  one capture across recipes.
  """
  windows = np.asarray(windows, np.int32)
  acts = capture(model, windows) if acts is None else acts
  spec = spec_for(model.config)
  layers, qlayers = (nnx.to_pure_dict(nnx.state(m.layers)) for m in (model, qm.model))
  rows = []
  for site in spec.site_names:
    kernel, qkernel = (site_kernel(p, site, spec=spec) for p in (layers, qlayers))
    terms = {}
    for idx, t, a_config, w_config in _layer_groups(qm, site, model.config.num_layers):
      got = jax.device_get(_site_terms(acts[site][idx], kernel[idx], qkernel[idx], t,
                                       a_config=a_config, w_config=w_config))
      terms.update({int(b): {k: float(a[j]) for k, a in got.items()} for j, b in enumerate(idx)})
    for layer in range(model.config.num_layers):
      v = terms[layer]
      d = acts[site].shape[-1]
      rows.append(SiteSQNR(
          layer=layer, site=site, method=qm.label,
          measured_sqnr_db=_db(v["measured"]),
          measured_sqnr_excl_pos0_db=_db(v["measured_excl_pos0"]),
          predicted_sqnr_db=_db(v["predicted"]),
          concentration_x_db=_db(v["c_x"]),
          concentration_w_db=_db(v["c_w"]),
          alignment_gain_db=_db(d * v["align"])))
  rows.sort(key=lambda r: (r.layer, spec.site_names.index(r.site)))
  return rows


def sqnr_gain(rows: list[SiteSQNR], base: list[SiteSQNR], *,
              field: str = "measured_sqnr_db") -> SQNRGain:
  """Per-site `rows - base` of `field` (matched on layer and site): mean, median, max,
  min and the fraction of sites where `rows >= base`."""
  ref = {(r.layer, r.site): getattr(r, field) for r in base}
  diffs = np.array([getattr(r, field) - ref[(r.layer, r.site)] for r in rows
                    if getattr(r, field) is not None and ref.get((r.layer, r.site)) is not None])
  if diffs.size == 0:
    return SQNRGain(sites=0)
  return SQNRGain(sites=int(diffs.size), mean_db=float(diffs.mean()),
                  median_db=float(np.median(diffs)), max_db=float(diffs.max()),
                  min_db=float(diffs.min()), fraction_at_least=float(np.mean(diffs >= 0)))


def _mean(rows: list[SiteSQNR], field: str) -> float | None:
  vals = [getattr(r, field) for r in rows if getattr(r, field) is not None]
  return float(np.mean(vals)) if vals else None


def summary_row(label: str, ppl: float | None, rows: list[SiteSQNR],
                fp_ppl: float | None) -> SummaryRow:
  """One line of the comparison table: perplexity, its gap to fp, mean site terms."""
  return SummaryRow(method=label, perplexity=ppl,
                    ppl_gap_to_fp=None if ppl is None or fp_ppl is None else ppl - fp_ppl,
                    **{f"mean_{f}": _mean(rows, f) for f in SITE_FIELDS})


def markdown_table(head: list[str], rows: list[list[str | None]], *,
                   needs: dict[str, str] | None = None, keep: int = 1) -> str:
  """A Markdown table of `rows` (None: no value, shown as "–") without its empty
  columns: a column (after the first `keep`) where no row has a value is left out
  and named in a note below the table, with `needs[column]` as the reason if given."""
  needs = needs or {}
  cols = [j for j in range(len(head))
          if j < keep or not rows or any(r[j] is not None for r in rows)]
  lines = ["| " + " | ".join(head[j] for j in cols) + " |", "|---" * len(cols) + "|"]
  lines += ["| " + " | ".join("–" if r[j] is None else r[j] for j in cols) + " |"
            for r in rows]
  dropped = [head[j] for j in range(len(head)) if j not in cols]
  if rows and dropped:
    by_reason: dict[str, list[str]] = {}
    for h in dropped:
      by_reason.setdefault(needs.get(h, "no value in any row"), []).append(f"`{h}`")
    lines += ["", "Columns left out: " + "; ".join(
        f"{', '.join(hs)}: {why}" for why, hs in by_reason.items()) + "."]
  return "\n".join(lines)


def _cell(v, spec=".2f") -> str | None:
  return None if v is None else format(v, spec)


def comparison_markdown(summary: list[SummaryRow]) -> str:
  """The side-by-side table: one row per method; a column without any value (e.g.
  "Δ vs fp" without the fp baseline) is left out, with a note saying what it needs."""
  head = ["method", "perplexity", "Δ vs fp", "mean SQNR dB", "mean SQNR dB (pos ≥ 1)",
          "mean predicted dB", "mean C(x) dB", "mean C(W) dB", "mean align gain dB"]
  rows = [[s.method, _cell(s.perplexity, ".3f"), _cell(s.ppl_gap_to_fp, "+.3f")]
          + [_cell(getattr(s, f"mean_{f}")) for f in SITE_FIELDS] for s in summary]
  quantized = "only unquantized methods, whose SQNR is infinite"
  return markdown_table(head, rows, needs={
      "perplexity": "not evaluated",
      "Δ vs fp": "needs the fp baseline (add `fp` to the methods)",
      "mean SQNR dB": quantized, "mean SQNR dB (pos ≥ 1)": quantized,
      "mean predicted dB": quantized})


def sites_markdown(rows: list[SiteSQNR]) -> str:
  """Every block × site row of one method; columns without any value (the SQNR of
  an unquantized model, which is infinite) are left out, with a note."""
  head = ["layer", "site", "measured dB", "measured dB (pos ≥ 1)", "predicted dB", "C(x) dB",
          "C(W) dB", "align gain dB"]
  cells = [[str(r.layer), r.site] + [_cell(getattr(r, f)) for f in SITE_FIELDS] for r in rows]
  infinite = "infinite, the method does not quantize"
  return markdown_table(head, cells, keep=2, needs={
      "measured dB": infinite, "measured dB (pos ≥ 1)": infinite,
      "predicted dB": infinite})


# Plots. Figures are built on the Agg canvas directly (no pyplot state, no display);
# `sqnr_figure` / `decomposition_figure` return the Figure, `plot_*` save it as PNG.

FIELD_LABELS = {
    "measured_sqnr_db": "site SQNR (dB)",
    "measured_sqnr_excl_pos0_db": "site SQNR, positions ≥ 1 (dB)",
    "predicted_sqnr_db": "predicted SQNR (dB)",
    "concentration_x_db": "concentration C(x) (dB)",
    "concentration_w_db": "concentration C(W) (dB)",
    "alignment_gain_db": "alignment gain d·A (dB)",
}
DECOMPOSITION_FIELDS = ("concentration_x_db", "concentration_w_db", "alignment_gain_db",
                        "measured_sqnr_db")
_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h")
_FONT = {"title": 16, "panel": 14, "label": 13, "tick": 11, "legend": 11, "note": 11}


def _figure(figsize):
  """A Figure on its own non-interactive Agg canvas (no pyplot state, no display)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=figsize, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _style(i: int, n: int, markevery: int) -> dict[str, Any]:
  """Method `i` of `n`: colour, line style and (hollow) marker combinations that stay
  distinct for 180 methods; markers staggered along the line so that coinciding
  series still show each of their markers."""
  from matplotlib import colormaps
  colors = colormaps["tab10"].colors
  return dict(color=colors[i % len(colors)], ls=_LINESTYLES[i % len(_LINESTYLES)],
              marker=_MARKERS[i % len(_MARKERS)], markevery=(i % markevery, markevery),
              markersize=7, markerfacecolor="none", markeredgewidth=1.4,
              lw=1.8, alpha=0.85, zorder=2 + i / max(n, 1))


def _offsets(n: int, spread: float) -> list[float]:
  """x shifts of `n` series within `spread` (one x unit = a layer or a site), so that
  series with equal values are drawn side by side rather than on top of each other."""
  return [0.0] * n if n < 2 else [spread * (i / (n - 1) - 0.5) for i in range(n)]


def _bits(labels) -> str | None:
  import re
  found = sorted({m for lab in labels for m in re.findall(r"\bW\d+A\d+(?:KV\d+)?\b", lab)})
  return ", ".join(found) or None


def _title(what: str, labels, *, title, model, bits, tokens) -> str:
  if title is not None:
    return title
  bits = bits or _bits(labels)
  parts = [p for p in (model and f"model {model}", bits,
                       tokens is not None and f"{tokens:,} held-out tokens") if p]
  return what + (": " + " · ".join(parts) if parts else "")


def _split_focus(rows_by_method, focus):
  """(drawn, left out): a method is drawn if its label or its first word (the method
  name, e.g. "cat" of "cat k=64 W4A4") is in `focus`; all are drawn if none is."""
  if not rows_by_method:
    raise ValueError("no methods to plot")
  if focus is None:
    return dict(rows_by_method), []
  focus = set(focus)
  drawn = {k: v for k, v in rows_by_method.items() if k in focus or k.split()[0] in focus}
  if not drawn:
    return dict(rows_by_method), []
  return drawn, [k for k in rows_by_method if k not in drawn]


def _site_order(rows_by_method) -> list[str]:
  seen = {r.site for rows in rows_by_method.values() for r in rows}
  return [s for s in SITES if s in seen] + sorted(seen - set(SITES))


def _legend_and_notes(fig, gs_row, handles, notes: list[str]) -> None:
  """The shared legend below the panels and the footnotes under it."""
  import textwrap
  ax = fig.add_subplot(gs_row)
  ax.set_axis_off()
  ncol = min(len(handles), 3)
  ax.legend(handles=handles, loc="upper center", ncol=ncol, frameon=False,
            fontsize=_FONT["legend"], handlelength=3.5, borderaxespad=0.0)
  if notes:
    text = "\n".join(textwrap.fill(n, 150) for n in notes)
    ax.text(0.0, 0.0, text, transform=ax.transAxes, ha="left", va="bottom",
            fontsize=_FONT["note"], style="italic", color="0.25")


def _legend_height(n: int, notes: list[str]) -> float:
  lines = sum(1 + len(n) // 150 for n in notes)
  return 0.3 * math.ceil(n / 3) + 0.28 * lines + 0.2


def _missing_note(missing: dict[str, list[str]]) -> list[str]:
  """Names the methods with no finite value in a panel (an unquantized model's SQNR
  is infinite), e.g. "fp (site SQNR)": they keep their legend entry, nothing is drawn."""
  if not missing:
    return []
  return ["No finite value, so nothing drawn in that panel: "
          + "; ".join(f"{k} ({', '.join(v)})" for k, v in missing.items())
          + " (an unquantized method's SQNR is infinite)."]


def _omitted_note(omitted: list[str]) -> list[str]:
  return [f"Left out of this plot to keep it readable: {', '.join(omitted)}; "
          "their numbers are in the report's tables and the SQNR plot."] if omitted else []


def _values(rows, field):
  return np.array([np.nan if getattr(r, field) is None else getattr(r, field) for r in rows],
                  dtype=float)


def sqnr_figure(rows_by_method: dict[str, list[SiteSQNR]], field: str = "measured_sqnr_db", *,
                model: str | None = None, bits: str | None = None, tokens: int | None = None,
                title: str | None = None, focus: Sequence[str] | None = None):
  """`field` per layer, one panel per site, one line per method (the Figure)."""
  drawn, omitted = _split_focus(rows_by_method, focus)
  sites = _site_order(drawn)
  ncols = 2 if len(sites) > 1 else 1
  nrows = math.ceil(len(sites) / ncols)
  missing: dict[str, list[str]] = {}
  for label, rows in drawn.items():
    if all(getattr(r, field) is None for r in rows):
      missing.setdefault(label, []).append(FIELD_LABELS.get(field, field).replace(" (dB)", ""))
  notes = _missing_note(missing) + _omitted_note(omitted)
  legend_h = _legend_height(len(drawn), notes)
  fig = _figure((14, 4.2 * nrows + legend_h))
  gs = fig.add_gridspec(nrows + 1, ncols, height_ratios=[4.2] * nrows + [legend_h])
  offsets = _offsets(len(drawn), 0.4)
  ylabel = FIELD_LABELS.get(field, field.replace("_db", "").replace("_", " ") + " (dB)")
  handles, axes = [], []
  for k, site in enumerate(sites):
    ax = fig.add_subplot(gs[k // ncols, k % ncols], sharex=axes[0] if axes else None)
    axes.append(ax)
    for i, (label, rows) in enumerate(drawn.items()):
      pts = sorted((r.layer, getattr(r, field)) for r in rows if r.site == site)
      x = np.array([p[0] for p in pts], float) + offsets[i]
      y = np.array([np.nan if p[1] is None else p[1] for p in pts], float)
      line, = ax.plot(x, y, label=label, **_style(i, len(drawn), max(1, len(pts) // 10)))
      if k == 0:
        handles.append(line)
    ax.set_title(site, fontsize=_FONT["panel"])
    ax.set_ylabel(ylabel, fontsize=_FONT["label"])
    ax.set_xlabel("layer", fontsize=_FONT["label"])
    ax.tick_params(labelsize=_FONT["tick"])
    ax.grid(alpha=0.3)
  _legend_and_notes(fig, gs[nrows, :], handles, notes)
  what = ylabel.replace(" (dB)", "")
  fig.suptitle(_title(f"{what[0].upper()}{what[1:]} by layer", drawn,
                      title=title, model=model, bits=bits, tokens=tokens),
               fontsize=_FONT["title"])
  return fig


def decomposition_figure(rows_by_method: dict[str, list[SiteSQNR]], *,
                         model: str | None = None, bits: str | None = None,
                         tokens: int | None = None, title: str | None = None,
                         focus: Sequence[str] | None = None):
  """`C(x)`, `C(W)`, alignment gain and measured SQNR along the sites of the model
  (layer-major), one line per method: where each method's SQNR comes from (the Figure)."""
  drawn, omitted = _split_focus(rows_by_method, focus)
  sites = _site_order(drawn)
  pos = {s: j for j, s in enumerate(sites)}
  layers = 1 + max((r.layer for rows in drawn.values() for r in rows), default=0)
  missing: dict[str, list[str]] = {}
  for label, rows in drawn.items():
    for f in DECOMPOSITION_FIELDS:
      if all(getattr(r, f) is None for r in rows):
        missing.setdefault(label, []).append(FIELD_LABELS[f].replace(" (dB)", ""))
  notes = _missing_note(missing) + _omitted_note(omitted)
  legend_h = _legend_height(len(drawn), notes)
  panel_h = 3.0
  fig = _figure((15, panel_h * len(DECOMPOSITION_FIELDS) + legend_h))
  gs = fig.add_gridspec(len(DECOMPOSITION_FIELDS) + 1, 1,
                        height_ratios=[panel_h] * len(DECOMPOSITION_FIELDS) + [legend_h])
  offsets = _offsets(len(drawn), 0.5)
  handles, axes = [], []
  for k, field in enumerate(DECOMPOSITION_FIELDS):
    ax = fig.add_subplot(gs[k, 0], sharex=axes[0] if axes else None)
    axes.append(ax)
    for i, (label, rows) in enumerate(drawn.items()):
      rows = sorted(rows, key=lambda r: (r.layer, pos[r.site]))
      x = np.array([r.layer * len(sites) + pos[r.site] for r in rows], float) + offsets[i]
      line, = ax.plot(x, _values(rows, field), label=label,
                      **_style(i, len(drawn), max(1, len(rows) // 12)))
      if k == 0:
        handles.append(line)
    ax.set_ylabel(FIELD_LABELS[field], fontsize=_FONT["label"])
    ax.tick_params(labelsize=_FONT["tick"])
    ax.grid(alpha=0.3)
    if k < len(DECOMPOSITION_FIELDS) - 1:
      ax.tick_params(labelbottom=False)
  step = max(1, math.ceil(layers / 12))
  axes[-1].set_xticks([l * len(sites) for l in range(0, layers, step)])
  axes[-1].set_xticklabels([str(l) for l in range(0, layers, step)])
  axes[-1].set_xlabel(f"layer (each has {len(sites)} sites: {', '.join(sites)})",
                      fontsize=_FONT["label"])
  _legend_and_notes(fig, gs[len(DECOMPOSITION_FIELDS), 0], handles, notes)
  fig.suptitle(_title("Where the SQNR comes from: C(x), C(W), alignment, SQNR per site",
                      drawn, title=title, model=model, bits=bits, tokens=tokens),
               fontsize=_FONT["title"])
  return fig


def _save(fig, path, **kw) -> Path:
  """`fig.savefig`, atomically (and only in the writing process, `errors.is_writer`)."""
  from catjax.errors import atomic_write
  with atomic_write(path) as tmp:
    fig.savefig(tmp, **{"dpi": 110, **kw})
  return Path(path)


def plot_sqnr(rows_by_method: dict[str, list[SiteSQNR]], path: str | Path,
              field: str = "measured_sqnr_db", *, model: str | None = None,
              bits: str | None = None, tokens: int | None = None, title: str | None = None,
              focus: Sequence[str] | None = None) -> Path:
  """SQNR per layer, one panel per site, one line per method, as a PNG at `path`.
  The title names `model`, `bits` (default: the W·A· of the labels) and `tokens`
  (held-out tokens) unless `title` is given; `focus` (method names or labels) limits
  the lines drawn, and a footnote names the methods left out."""
  return _save(sqnr_figure(rows_by_method, field, model=model, bits=bits, tokens=tokens,
                           title=title, focus=focus), path)


def plan_points(plan, rows: list[SiteSQNR]) -> dict[str, list[tuple[float, float]]]:
  """`{site: [(planner's predicted dB, measured dB), ...]}` of a `catjax.plan.Plan`
  and the site report of the model quantized with it."""
  pred = {(s.layer, s.site): s.predicted_sqnr_db for s in plan.sites}
  out: dict[str, list[tuple[float, float]]] = {}
  for r in rows:
    p = pred.get((r.layer, r.site))
    if p is not None and r.measured_sqnr_db is not None:
      out.setdefault(r.site, []).append((p, r.measured_sqnr_db))
  return out


def plot_predicted_vs_measured(points: dict[str, list[tuple[float, float]]], path: str | Path,
                               *, title: str, xlabel: str = "predicted SQNR (dB)",
                               ylabel: str = "measured SQNR (dB)") -> Path:
  """One point per site, coloured by site kind, with the identity line; a PNG at `path`."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(5.5, 5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  every = [v for pts in points.values() for p in pts for v in p]
  for site, pts in points.items():
    ax.scatter([p for p, _ in pts], [m for _, m in pts], s=14, label=site)
  if every:
    lo, hi = min(every) - 1, max(every) + 1
    ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend()
  return _save(fig, path, dpi=120, bbox_inches="tight")


def plot_decomposition(rows_by_method: dict[str, list[SiteSQNR]], path: str | Path, *,
                       model: str | None = None, bits: str | None = None,
                       tokens: int | None = None, title: str | None = None,
                       focus: Sequence[str] | None = None) -> Path:
  """`C(x)`, `C(W)`, alignment gain and measured SQNR along the sites of the model
  (layer-major), one line per method, as a PNG at `path`; keywords as `plot_sqnr`."""
  return _save(decomposition_figure(rows_by_method, model=model, bits=bits, tokens=tokens,
                                    title=title, focus=focus), path)
