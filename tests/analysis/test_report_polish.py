"""Readability of the report: tables without empty columns, plots that show every
method given, distinguishably, under a title naming the model, bits and tokens."""

import numpy as np
import pytest
from matplotlib.figure import Figure

from catjax.analysis.sites import summary_row
import catjax.app.plots as plots
from catjax.app.plots import plot_sqnr
from catjax.app.tables import comparison_markdown, sites_markdown
from catjax.models import SITES
from catjax.analysis.sites import SiteSQNR

LAYERS = 3


def _rows(method, base, *, sqnr=True):
  """Rows of one method on LAYERS layers; `sqnr=False` is an unquantized model (None)."""
  out = []
  for layer in range(LAYERS):
    for j, site in enumerate(SITES):
      v = base + layer + 0.1 * j
      out.append(SiteSQNR(layer=layer, site=site, method=method,
                          measured_sqnr_db=v if sqnr else None,
                          measured_sqnr_excl_pos0_db=v if sqnr else None,
                          predicted_sqnr_db=v if sqnr else None,
                          concentration_x_db=1.0 + j, concentration_w_db=2.0 + j,
                          alignment_gain_db=3.0 + j))
  return out


@pytest.fixture
def by_method():
  """Twelve methods (more than a colour cycle), an unquantized one without SQNR, and
  `none W6A6` with exactly the values of `none W4A4` (coinciding lines)."""
  names = ["none W4A4", "smoothquant W4A4", "smoothquant_hadamard W4A4", "hadamard W4A4",
           "cat k=64 W4A4", "cat k=192 W4A4", "cat_full W4A4", "hadamard gptq W4A4",
           "cat k=64 gptq W4A4", "cat k=64 gptq t50 W4A4"]
  out = {n: _rows(n.split()[0], 5.0 + i) for i, n in enumerate(names)}
  out["none W6A6"] = [SiteSQNR(**{**r.to_dict(), "method": "none"}) for r in out["none W4A4"]]
  out["fp"] = _rows("fp", 0.0, sqnr=False)
  return out


@pytest.fixture
def saved(monkeypatch):
  """Every Figure saved during the test (the PNG is still written)."""
  figs, save = [], Figure.savefig

  def record(self, *args, **kwargs):
    figs.append(self)
    return save(self, *args, **kwargs)

  monkeypatch.setattr(Figure, "savefig", record)
  return figs


def _table(md):
  lines = [l for l in md.splitlines() if l.startswith("|")]
  head = [c.strip() for c in lines[0].strip("|").split("|")]
  body = [[c.strip() for c in l.strip("|").split("|")] for l in lines[2:]]
  return head, body, md[md.rindex("|") + 1:]


def test_comparison_without_baselines_has_no_all_dash_column():
  summary = [summary_row(label, ppl, _rows(label, base), fp_ppl=None)
             for label, ppl, base in [("none W4A4", 40.0, 5.0), ("cat k=64 W4A4", 25.0, 9.0)]]
  head, body, note = _table(comparison_markdown(summary))
  assert len(body) == 2
  for j, h in enumerate(head):
    assert any(row[j] != "–" for row in body), f"column {h!r} is all dashes"
  assert "Δ vs fp" not in head and "fp baseline" in note
  assert "perplexity" in head and "mean SQNR dB" in head
  # With the baseline the column is back.
  summary = [summary_row(label, ppl, _rows(label, base), fp_ppl=14.0)
             for label, ppl, base in [("none W4A4", 40.0, 5.0), ("cat k=64 W4A4", 25.0, 9.0)]]
  head, body, _ = _table(comparison_markdown(summary))
  assert "Δ vs fp" in head and body[0][head.index("Δ vs fp")] == "+26.000"


def test_sites_table_of_an_unquantized_method_has_no_all_dash_column():
  head, body, note = _table(sites_markdown(_rows("fp", 0.0, sqnr=False)))
  assert len(body) == LAYERS * len(SITES)
  for j, h in enumerate(head):
    assert any(row[j] != "–" for row in body), f"column {h!r} is all dashes"
  assert "measured dB" not in head and "infinite" in note


def _legend_labels(fig):
  legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
  return [t.get_text() for lg in legends for t in lg.get_texts()]


def _lines(fig):
  """label -> the Line2D objects of that label across the panels."""
  out = {}
  for ax in fig.axes:
    for line in ax.get_lines():
      out.setdefault(line.get_label(), []).append(line)
  return out


def _style(line):
  return (line.get_color(), line.get_linestyle(), line.get_marker())


def _texts(fig):
  return [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]


def _visible(fig):
  return "\n".join(_texts(fig))


@pytest.mark.parametrize("plot", ["plot_sqnr", "plot_decomposition"])
def test_plots_draw_every_method_distinguishably(plot, by_method, saved, tmp_path):
  path = getattr(plots, plot)(by_method, tmp_path / "p.png")
  assert path.exists() and path.stat().st_size > 0
  (fig,) = saved
  assert sorted(_legend_labels(fig)) == sorted(by_method)
  lines = _lines(fig)
  assert set(by_method) <= set(lines)
  styles = {label: _style(lines[label][0]) for label in by_method}
  assert len(set(styles.values())) == len(by_method), styles
  # Coinciding series stay visible: shifted apart, or with line styles that let the
  # one below show through.
  a, b = lines["none W4A4"][0], lines["none W6A6"][0]
  shifted = not np.array_equal(a.get_xdata(), b.get_xdata())
  assert shifted or a.get_linestyle() != b.get_linestyle()
  # Every drawn value is the method's own, in layer order, one panel per site.
  field = "measured_sqnr_db" if plot == "plot_sqnr" else "concentration_x_db"
  rows = sorted((r for r in by_method["cat k=64 W4A4"] if r.site == SITES[0]),
                key=lambda r: r.layer)
  want = [getattr(r, field) for r in rows]
  assert {ax.get_title() for ax in fig.axes if ax.get_lines()} - {""} == set(SITES)
  np.testing.assert_allclose(lines["cat k=64 W4A4"][0].get_ydata(), want)
  # The unquantized method has no finite SQNR; the figure says so rather than
  # dropping it silently.
  assert any("fp" in t and "infinite" in t for t in _texts(fig))
  fig.canvas.draw()
  panels = [ax for ax in fig.axes if ax.get_lines()]
  assert all(t.get_fontsize() >= 11 for ax in panels for t in ax.get_yticklabels())
  assert all(ax.yaxis.label.get_fontsize() >= 12 for ax in panels if ax.get_ylabel())


@pytest.mark.parametrize("plot", ["plot_sqnr", "plot_decomposition"])
def test_plot_titles_name_model_bits_and_tokens(plot, by_method, saved, tmp_path):
  getattr(plots, plot)(by_method, tmp_path / "p.png", model="smollm2-135m", bits="W4A4",
                     tokens=1024)
  getattr(plots, plot)(by_method, tmp_path / "q.png", title="my own title")
  title, custom = (f.get_suptitle() for f in saved)
  assert "smollm2-135m" in title and "W4A4" in title and "1,024" in title
  assert custom == "my own title"
  labels = [ax.get_ylabel() for ax in saved[0].axes if ax.get_ylabel()]
  assert "site SQNR (dB)" in labels
  if plot == "plot_decomposition":
    assert "concentration C(x) (dB)" in labels


def test_the_decomposition_plot_shows_perplexity_in_its_legend(by_method, saved, tmp_path):
  ppl = {label: 20.0 + i for i, label in enumerate(by_method)}
  plots.plot_decomposition(by_method, tmp_path / "p.png", perplexity=ppl)
  labels = _legend_labels(saved[0])
  assert sorted(labels) == sorted(f"{k}  (perplexity {v:.2f})" for k, v in ppl.items())


def test_plot_titles_default_to_the_bits_of_the_labels(by_method, saved, tmp_path):
  plot_sqnr(by_method, tmp_path / "p.png", model="smollm2-135m")
  assert "W4A4, W6A6" in saved[0].get_suptitle()


@pytest.mark.parametrize("plot", ["plot_sqnr", "plot_decomposition"])
def test_methods_left_out_of_a_plot_are_named_in_it(plot, by_method, saved, tmp_path):
  getattr(plots, plot)(by_method, tmp_path / "p.png", focus=("none", "hadamard", "cat"))
  (fig,) = saved
  drawn = [k for k in by_method if k.split()[0] in ("none", "hadamard", "cat")]
  assert sorted(_legend_labels(fig)) == sorted(drawn)
  left_out = [k for k in by_method if k not in drawn]
  assert "smoothquant W4A4" in left_out
  text = _visible(fig)
  assert "Left out" in text and all(k in text for k in left_out)
