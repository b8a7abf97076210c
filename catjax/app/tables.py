"""Markdown tables of reports and plans."""

from __future__ import annotations
from catjax.analysis.sites import SITE_FIELDS, SiteSQNR, SummaryRow
from catjax.ptq.plan import Plan, SitePlan






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


def plan_table(plan: Plan) -> str:
  """The plan as Markdown: one row per block, one column per site."""
  from catjax.app.tables import markdown_table
  by = {(s.layer, s.site): s for s in plan.sites}
  site_names = list(dict.fromkeys(s.site for s in plan.sites))
  layers = sorted({s.layer for s in plan.sites})

  def cell(s: SitePlan) -> str:
    m = s.method if s.method != "cat" else f"cat k={s.block_size}"
    w = f"{s.w_format}" if s.w_format != "int" else f"W{s.w_bits or 16}"
    a = f"{s.a_format}" if s.a_format != "int" else f"A{s.a_bits or 16}"
    return f"{m} {w}{a} ({s.predicted_sqnr_db:.1f} dB)"

  return markdown_table(["layer", *site_names],
                        [[str(b), *(cell(by[(b, s)]) for s in site_names)] for b in layers])
