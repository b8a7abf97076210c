"""Per-site SQNR of a quantized model, measured and predicted, with its decomposition."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from catjax.core import stats as st
from flax import nnx

from catjax.models.llama import Llama, capture
from catjax.models.spec import spec_for
from catjax.ptq import foreign
from catjax.ptq.policy import site_variants
from catjax.ptq.quantized import QuantizedModel
from catjax.ptq.blocks import site_kernel
from catjax.core.quant import activation_config, fake_quantize, weight_config
from catjax.core.linalg import HIGHEST


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

  Every term is `catjax.core.stats`'s: `output_sqnr` of the site's output against
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
  groups of layers that quantize `site` alike (the same transform variant and
  quantizers; one group for a recipe)."""
  choice, stacks = site_variants(qm.transforms, site, num_layers)
  groups: dict[tuple, list[int]] = {}
  for b in range(num_layers):
    r = qm.policy.recipe(b, site)
    groups.setdefault((int(choice[b]), r.a_config, r.w_config), []).append(b)
  out = []
  for (c, a_config, w_config), idx in groups.items():
    t = stacks[c]
    if len(idx) < num_layers:
      t = None if t is None else jax.tree.map(lambda a: a[np.asarray(idx)], t)
    out.append((np.asarray(idx), t, a_config, w_config))
  return out


def _db(v: float) -> float | None:
  """dB of a linear ratio; None for an infinite or undefined one (JSON has no inf)."""
  return None if not math.isfinite(v) or v <= 0 else 10.0 * math.log10(v)


# Bytes of kernels `site_report` copies at a time (per model): a 1.5B model's
# float32 mlp_in kernels are 3 GB over its 28 layers, 110 MB a layer.
REPORT_CHUNK_BYTES = 2**28


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
    terms = {}
    for idx, t, a_config, w_config in _layer_groups(qm, site, model.config.num_layers):
      # a few layers at a time: the kernels' copies stay near REPORT_CHUNK_BYTES
      one = jax.eval_shape(lambda: site_kernel(layers, site, spec=spec, layers=idx[:1]))
      step = max(1, REPORT_CHUNK_BYTES // (one.dtype.itemsize * math.prod(one.shape)))
      for j in range(0, len(idx), step):
        part = idx[j:j + step]
        kernel, qkernel = (site_kernel(p, site, spec=spec, layers=part) for p in (layers, qlayers))
        tp = None if t is None else jax.tree.map(lambda a: a[j:j + step], t)
        got = jax.device_get(_site_terms(acts[site][part], kernel, qkernel, tp,
                                         a_config=a_config, w_config=w_config))
        terms.update({int(b): {k: float(a[i]) for k, a in got.items()} for i, b in enumerate(part)})
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


def _as_tokens(x: jax.Array, in_ndim: int) -> jax.Array:
  """A linear's input as `(windows, positions, d_in)`: the contracted trailing axes
  flattened, the last leading axis the positions (`(1, n, d)` for one leading axis)."""
  lead = x.shape[:x.ndim - in_ndim]
  d = math.prod(x.shape[x.ndim - in_ndim:])
  return x.reshape((math.prod(lead[:-1]), lead[-1], d) if len(lead) >= 2 else (1, -1, d))


def foreign_site_report(model: nnx.Module, quantized: nnx.Module, batches, *, forward=None,
                        label: str = "") -> list[SiteSQNR]:
  """`site_report` for a model quantized by `catjax.quantize`: one `SiteSQNR` per site
  (linears reading one input) on held-out `batches`, in the order of their call.

  Each site's inputs are captured from the float `model` (`forward(model, batch)`,
  default `model(batch)`); the quantized kernels, transform and quantizers come
  from `quantized`. `layer` is the site's position in call order and `site` its
  module paths (`layers/3/attn/{q_proj,k_proj,v_proj}`); `method` is `label`.
  """
  qlinears = foreign.quantized_linears(quantized)
  if not qlinears:
    raise ValueError("quantized has no linear quantized by catjax.quantize")
  rows = []
  for i, site in enumerate(foreign.site_inputs(model, list(qlinears), batches, forward)):
    first = site.linears[0]
    iq = vars(qlinears[first.path].module)["catjax_input"]
    x = jnp.concatenate([_as_tokens(a.astype(jnp.float32), first.in_ndim) for a in site.inputs])
    kernel = jnp.concatenate([lin.kernel() for lin in site.linears], axis=-1)
    qkernel = jnp.concatenate([qlinears[lin.path].kernel() for lin in site.linears], axis=-1)
    t = None if iq.transform is None else jax.tree.map(lambda a: a[None], iq.transform)
    v = {k: float(a[0]) for k, a in jax.device_get(_site_terms(
        x[None], kernel[None], qkernel[None], t, a_config=iq.config, w_config=iq.weights)).items()}
    rows.append(SiteSQNR(
        layer=i, site=site.name, method=label, measured_sqnr_db=_db(v["measured"]),
        measured_sqnr_excl_pos0_db=_db(v["measured_excl_pos0"]),
        predicted_sqnr_db=_db(v["predicted"]), concentration_x_db=_db(v["c_x"]),
        concentration_w_db=_db(v["c_w"]), alignment_gain_db=_db(x.shape[-1] * v["align"])))
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
