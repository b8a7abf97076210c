"""Figures of per-site reports (matplotlib, written atomically)."""

from __future__ import annotations

import math
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np


from catjax.models.llama import SITES
from catjax.analysis.sites import SiteSQNR


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


def _with_perplexity(label: str, perplexity: dict[str, float] | None) -> str:
  ppl = None if perplexity is None else perplexity.get(label)
  return label if ppl is None else f"{label}  (perplexity {ppl:.2f})"


def decomposition_figure(rows_by_method: dict[str, list[SiteSQNR]], *,
                         model: str | None = None, bits: str | None = None,
                         tokens: int | None = None, title: str | None = None,
                         focus: Sequence[str] | None = None,
                         perplexity: dict[str, float] | None = None):
  """`C(x)`, `C(W)`, alignment gain and measured SQNR by layer, one column of
  panels per site and one line per method: where each method's SQNR comes from
  (the Figure). `perplexity`: `{label: perplexity}`, shown in the legend."""
  drawn, omitted = _split_focus(rows_by_method, focus)
  sites = _site_order(drawn)
  missing: dict[str, list[str]] = {}
  for label, rows in drawn.items():
    for f in DECOMPOSITION_FIELDS:
      if all(getattr(r, f) is None for r in rows):
        missing.setdefault(label, []).append(FIELD_LABELS[f].replace(" (dB)", ""))
  notes = _missing_note(missing) + _omitted_note(omitted)
  legend_h = _legend_height(len(drawn), notes)
  panel_h, nf = 2.8, len(DECOMPOSITION_FIELDS)
  fig = _figure((max(8.0, 4.4 * len(sites)), panel_h * nf + legend_h))
  gs = fig.add_gridspec(nf + 1, len(sites), height_ratios=[panel_h] * nf + [legend_h])
  offsets = _offsets(len(drawn), 0.4)
  handles, first = [], None
  for k, field in enumerate(DECOMPOSITION_FIELDS):
    row_ax = None
    for j, site in enumerate(sites):
      ax = fig.add_subplot(gs[k, j], sharex=first, sharey=row_ax)
      first, row_ax = first or ax, row_ax or ax
      for i, (label, rows) in enumerate(drawn.items()):
        rows = sorted((r for r in rows if r.site == site), key=lambda r: r.layer)
        x = np.array([r.layer for r in rows], float) + offsets[i]
        line, = ax.plot(x, _values(rows, field), label=_with_perplexity(label, perplexity),
                        **_style(i, len(drawn), max(1, len(rows) // 10)))
        if k == 0 and j == 0:
          handles.append(line)
      if k == 0:
        ax.set_title(site, fontsize=_FONT["panel"])
      if j == 0:
        ax.set_ylabel(FIELD_LABELS[field], fontsize=_FONT["label"])
      else:
        ax.tick_params(labelleft=False)
      if k == nf - 1:
        ax.set_xlabel("layer", fontsize=_FONT["label"])
      else:
        ax.tick_params(labelbottom=False)
      ax.tick_params(labelsize=_FONT["tick"])
      ax.grid(alpha=0.3)
  _legend_and_notes(fig, gs[nf, :], handles, notes)
  fig.suptitle(_title("Where the SQNR comes from: C(x), C(W), alignment, SQNR per site",
                      drawn, title=title, model=model, bits=bits, tokens=tokens),
               fontsize=_FONT["title"])
  return fig


def _save(fig, path, **kw) -> Path:
  """`fig.savefig`, atomically (and only in the writing process, `errors.is_writer`)."""
  from catjax.base.errors import atomic_write
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


def plan_points(predicted: dict[tuple[int, str], float], rows: list[SiteSQNR]
                ) -> dict[str, list[tuple[float, float]]]:
  """`{site: [(planner's predicted dB, measured dB), ...]}` from a plan's predictions
  (`Plan.predicted_db()`) and the site report of the model quantized with it."""
  out: dict[str, list[tuple[float, float]]] = {}
  for r in rows:
    p = predicted.get((r.layer, r.site))
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
                       focus: Sequence[str] | None = None,
                       perplexity: dict[str, float] | None = None) -> Path:
  """`decomposition_figure` (a column of panels per site; `perplexity` in the
  legend) as a PNG at `path`; keywords as `plot_sqnr`."""
  return _save(decomposition_figure(rows_by_method, model=model, bits=bits, tokens=tokens,
                                    title=title, focus=focus, perplexity=perplexity), path)
