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
  """Linear-scale terms for each layer; `x (L, B, T, d)`, kernels `(L, d, o)`."""

  def one(args):
    x, k, kq, t = args
    xt = x if t is None else t.apply(x)
    kt = k if t is None else t.merge(k)
    xq = xt if a_config is None else fake_quantize(xt, a_config)
    y = jnp.einsum("btd,do->bto", x, k, precision=HIGHEST)
    yq = jnp.einsum("btd,do->bto", xq, kq, precision=HIGHEST)
    sig, err = jnp.sum(y**2, -1), jnp.sum((y - yq) ** 2, -1)  # (B, T)
    # The factors of the transformed operands, as `catjax.stats` defines them
    # (8-bit quantizers' ranges for an operand left unquantized).
    f = st.sqnr_factors(xt, kt, a_config=a_config or activation_config(8),
                        w_config=w_config or weight_config(8))
    return {
        "measured": jnp.sum(sig) / jnp.sum(err),
        "measured_excl_pos0": jnp.sum(sig[:, 1:]) / jnp.sum(err[:, 1:]),
        "c_x": f["concentration_x"], "c_w": f["concentration_w"], "align": f["alignment"],
    }

  return jax.lax.map(one, (x, kernel, qkernel, transform))


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
  a_config, w_config = qm.recipe.a_config, qm.recipe.w_config
  spec = spec_for(model.config)
  layers, qlayers = (nnx.to_pure_dict(nnx.state(m.layers)) for m in (model, qm.model))
  rows = []
  for site in spec.site_names:
    t = None if qm.transforms is None else qm.transforms[site]
    terms = jax.device_get(_site_terms(acts[site], site_kernel(layers, site, spec=spec),
                                       site_kernel(qlayers, site, spec=spec), t,
                                       a_config=a_config, w_config=w_config))
    for layer in range(model.config.num_layers):
      v = {k: float(a[layer]) for k, a in terms.items()}
      d = acts[site].shape[-1]
      rows.append(SiteSQNR(
          layer=layer, site=site, method=qm.recipe.label,
          measured_sqnr_db=_db(v["measured"]),
          measured_sqnr_excl_pos0_db=_db(v["measured_excl_pos0"]),
          predicted_sqnr_db=_db(float(st.predicted_sqnr(v["c_x"], v["c_w"], v["align"],
                                                        a_config=a_config, w_config=w_config))),
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


def _fmt(v, spec=".2f") -> str:
  return "–" if v is None else format(v, spec)


def comparison_markdown(summary: list[SummaryRow]) -> str:
  """The side-by-side table: one row per method."""
  head = ["method", "perplexity", "Δ vs fp", "mean SQNR dB", "mean SQNR dB (pos ≥ 1)",
          "mean predicted dB", "mean C(x) dB", "mean C(W) dB", "mean align gain dB"]
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for s in summary:
    lines.append("| " + " | ".join(
        [s.method, _fmt(s.perplexity, ".3f"), _fmt(s.ppl_gap_to_fp, "+.3f")]
        + [_fmt(getattr(s, f"mean_{f}")) for f in SITE_FIELDS]) + " |")
  return "\n".join(lines)


def sites_markdown(rows: list[SiteSQNR]) -> str:
  """Every block × site row of one method."""
  head = ["layer", "site", "measured dB", "measured dB (pos ≥ 1)", "predicted dB", "C(x) dB",
          "C(W) dB", "align gain dB"]
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for r in rows:
    lines.append("| " + " | ".join([str(r.layer), r.site]
                                   + [_fmt(getattr(r, f)) for f in SITE_FIELDS]) + " |")
  return "\n".join(lines)


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_sqnr(rows_by_method: dict[str, list[SiteSQNR]], path: str | Path,
              field: str = "measured_sqnr_db") -> Path:
  """SQNR per layer, one panel per site, one line per method."""
  plt = _pyplot()
  fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
  for ax, site in zip(axes.flat, SITES):
    for label, rows in rows_by_method.items():
      pts = [(r.layer, getattr(r, field)) for r in rows
             if r.site == site and getattr(r, field) is not None]
      if pts:
        ax.plot(*zip(*pts), marker=".", label=label)
    ax.set_title(site)
    ax.set_ylabel(f"{field.replace('_db', '')} (dB)")
    ax.grid(alpha=0.3)
  for ax in axes[-1]:
    ax.set_xlabel("layer")
  axes.flat[0].legend(fontsize=8)
  fig.tight_layout()
  path = Path(path)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_decomposition(rows_by_method: dict[str, list[SiteSQNR]], path: str | Path) -> Path:
  """`C(x)`, `C(W)`, alignment gain and measured SQNR along the sites of the model
  (layer-major), one line per method: where each method's SQNR comes from."""
  plt = _pyplot()
  fields = ("concentration_x_db", "concentration_w_db", "alignment_gain_db", "measured_sqnr_db")
  fig, axes = plt.subplots(len(fields), 1, figsize=(13, 11), sharex=True)
  for ax, field in zip(axes, fields):
    for label, rows in rows_by_method.items():
      ax.plot([np.nan if getattr(r, field) is None else getattr(r, field) for r in rows],
              label=label, lw=1)
    ax.set_ylabel(field.replace("_db", " dB").replace("_", " "), fontsize=8)
    ax.grid(alpha=0.3)
  n = len(next(iter(rows_by_method.values())))
  axes[-1].set_xticks(range(0, n, len(SITES) * 5))
  axes[-1].set_xticklabels([str(i // len(SITES)) for i in range(0, n, len(SITES) * 5)])
  axes[-1].set_xlabel(f"layer (each has {len(SITES)} sites: {', '.join(SITES)})")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  path = Path(path)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
