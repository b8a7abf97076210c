"""Choose a per-site plan from the SQNR decomposition, before quantizing anything.

For every block and site, every candidate transform (none, Hadamard, CAT with
each allowed block size `k`) is fitted from the calibration statistics exactly
as the engine would fit it (`catjax.ptq.blocks.fit_block`, same seeds), and the
decomposition's factors of the transformed operands are measured on a sample
of calibration activations held out from the statistics (the CLI: the
`--report-windows` windows): the integer concentrations `C(x)`, `C(W)`, the
alignment `A` and the diagonal alignment `A_diag`. Every bit width and format
then has a predicted SQNR in closed form (`catjax.core.stats.predicted_sqnr`):
`12 N² C A` per integer operand, `A / (κ A_diag)` per FP4 operand.

Objective: minimise the total relative output noise `Σ_sites 1/SQNR`. Every
site is weighted alike: in a pre-norm decoder each linear's output is read
relative to its own scale (through a norm, a softmax or the SwiGLU product)
or added to a residual stream whose norm it is a fixed share of, so the
noise-to-signal ratio, not the absolute noise, is what carries to the loss;
weighting by measured sensitivities (gradients) is left open. The sum is
dominated by the worst sites, which is where bits and transforms go. The
alternative objective "db" maximises `Σ SQNR_dB` instead (every dB counts the
same wherever it is won); benchmarks/planner.py compares the two.

Budgets: average weight bits over weight elements, average activation bits
over the elements the linears read (FP4 counts its block scale: MXFP4 4.25,
NVFP4 4.5 bits), and optionally the online transforms' multiply-adds relative
to the linears' (`catjax.ptq.plan.transform_flops`). The search starts every site
at its cheapest option and repeatedly takes the upgrade with the largest noise
reduction per unit of budget (each resource as a fraction of its budget) that
keeps all budgets; it stops when no upgrade fits.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import numpy as np
from tqdm.auto import tqdm

from catjax.core import hadamard as hd
from catjax.core import stats as st
from catjax.models.llama import Llama
from catjax.models.spec import spec_for
from catjax.ptq.plan import Plan, SitePlan, format_bits, transform_flops
from catjax.ptq.recipe import Recipe
from catjax.ptq.blocks import fit_block, site_kernel
from catjax.core.quant import FP4_GROUP, FORMATS, activation_config, weight_config
from catjax.core.stats import SecondMoment

DEFAULT_BLOCK_SIZES = (32, 64, 128, 192)
DEFAULT_BITS = (4, 6, 8)


@dataclasses.dataclass(frozen=True)
class Budget:
  """Average weight / activation bits and the transform cost ceiling (None: any)."""

  avg_w_bits: float
  avg_a_bits: float
  max_transform_flops: float | None = None

  def __post_init__(self):
    for name in ("avg_w_bits", "avg_a_bits"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not 2 <= v <= 16:
        raise ValueError(f"{name}={v!r}: expected a number of bits in [2, 16]")
    r = self.max_transform_flops
    if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float))
                          or not 0 <= r < math.inf):
      raise ValueError(f"max_transform_flops={r!r}: expected a ratio >= 0 (or None)")


def transform_candidates(dim: int, block_sizes) -> list[tuple[str, int | None]]:
  """`(method, k)` a site of width `dim` can take: none; Hadamard and CAT (each
  `k` of `block_sizes` that divides `dim`, below it) where a Hadamard of size
  `dim` exists."""
  out = [("none", None)]
  if hd.is_supported(dim):
    out.append(("hadamard", None))
    out += [("cat", int(k)) for k in sorted(set(block_sizes)) if k < dim and dim % k == 0]
  return out


def number_candidates(dim: int, bits, formats) -> list[tuple[int, str]]:
  """`(bits, format)` options of one operand at width `dim`: the integer
  `bits`, and each FP4 format of `formats` whose block divides `dim`."""
  out = [(int(b), "int") for b in sorted(set(bits))] if "int" in formats else []
  out += [(4, f) for f in formats if f != "int" and dim % FP4_GROUP[f] == 0]
  if not out:
    raise ValueError(f"no number format fits width {dim}: bits={bits}, formats={formats}")
  return out


def site_factors(model: Llama, stats: dict[str, SecondMoment], acts: dict[str, jax.Array],
                 base: Recipe, block_sizes=DEFAULT_BLOCK_SIZES, *, progress: bool = True
                 ) -> dict[tuple[int, str, str, int | None], dict[str, float]]:
  """`{(layer, site, method, k): factors}` of every candidate transform:
  `c_x`, `c_w` (per-token / per-channel integer ranges, no groups), `align`,
  `diag_align` of the transformed operands; `acts[site]` `(L, ..., d)` is the
  sample of calibration inputs the factors are measured on."""
  from flax import nnx
  cfg = model.config
  spec = spec_for(cfg)
  dims = spec.site_dims(cfg)
  layers = nnx.to_pure_dict(nnx.state(model.layers))
  cands = {s: transform_candidates(d, block_sizes) for s, d in dims.items()}
  n_variants = max(len(c) for c in cands.values())
  out = {}
  bar = tqdm(total=cfg.num_layers * n_variants, desc="plan: fit candidates", unit="fit",
             disable=not progress, leave=False)
  for b in range(cfg.num_layers):
    block = jax.tree.map(lambda a: a[b], layers)
    stats_b = jax.tree.map(lambda a: a[b], stats)
    for i in range(n_variants):
      # Candidate i of every site at once (sites with fewer candidates repeat "none").
      chosen = {s: (c[i] if i < len(c) else ("none", None)) for s, c in cands.items()}
      recipes = {s: dataclasses.replace(base, method=m, block_size=k or base.block_size,
                                        hadamard=base.hadamard if m == "cat" else "full")
                 for s, (m, k) in chosen.items()}
      ts = fit_block(block, stats_b, recipes, spec=spec, layer=b) or {s: None for s in dims}
      for s, (m, k) in chosen.items():
        if (b, s, m, k) in out:
          continue
        t = ts[s]
        x = acts[s][b].reshape(-1, dims[s])
        kernel = site_kernel(block, s, spec=spec)
        f = _factors(x if t is None else t.apply(x), kernel if t is None else t.merge(kernel))
        out[(b, s, m, k)] = {key: float(v) for key, v in jax.device_get(f).items()}
      bar.update()
  bar.close()
  return out


@jax.jit
def _factors(x, kernel):
  f = st.sqnr_factors(x, kernel, a_config=activation_config(4), w_config=weight_config(4))
  return {"c_x": f["concentration_x"], "c_w": f["concentration_w"], "align": f["alignment"],
          "diag_align": f["diagonal_alignment"]}


def site_out_dims(model: Llama) -> dict[str, int]:
  """`{site: Σ d_out over the linears reading it}` (for `Plan.summary`)."""
  from flax import nnx
  spec = spec_for(model.config)
  block = jax.tree.map(lambda a: a[0], nnx.to_pure_dict(nnx.state(model.layers)))
  return {s: int(site_kernel(block, s, spec=spec).shape[1]) for s in spec.site_names}


def predict_db(f: dict[str, float], w: tuple[int, str] | None, a: tuple[int, str] | None
               ) -> float:
  """Predicted SQNR (dB) of a site with factors `f` at weight / activation
  `(bits, format)` (None: not quantized)."""
  def cfg(kind, opt):
    if opt is None:
      return None
    make = activation_config if kind == "a" else weight_config
    return make(opt[0], format=opt[1])
  p = st.predicted_sqnr(f["c_x"], f["c_w"], f["align"], a_config=cfg("a", a),
                        w_config=cfg("w", w), diag_align=f["diag_align"])
  return 10.0 * math.log10(float(p))


OBJECTIVES = {
    "noise": "sum over sites of 1/SQNR (equal sensitivity)",
    "db": "sum over sites of -SQNR in dB (the geometric mean of the SQNRs)",
}


def choose(factors, model: Llama, budget: Budget, base: Recipe, *, bits=DEFAULT_BITS,
           formats=("int",), block_sizes=DEFAULT_BLOCK_SIZES, objective: str = "noise") -> Plan:
  """The plan (see the module docstring) for `factors` from `site_factors`.

  `objective`: "noise" minimises `Σ 1/SQNR` (the default; dominated by the
  worst sites), "db" maximises `Σ SQNR_dB` (every dB counts the same wherever
  it is won)."""
  if objective not in OBJECTIVES:
    raise ValueError(f"objective={objective!r}: expected one of {tuple(OBJECTIVES)}")
  cfg = model.config
  spec = spec_for(cfg)
  dims = spec.site_dims(cfg)
  for f in formats:
    if f not in FORMATS:
      raise ValueError(f"formats: {f!r} is not one of {FORMATS}")
  out_dims = site_out_dims(model)
  n_lin = {s.name: len(s.linears) for s in spec.sites}
  keys = [(b, s) for b in range(cfg.num_layers) for s in spec.site_names]
  # Per site: options (transform, w, a), their noise and resource use.
  options, noise, cost = [], [], []
  for b, s in keys:
    d, o = dims[s], out_dims[s]
    opts, nz, cs = [], [], []
    for (m, k), w, a in itertools.product(transform_candidates(d, block_sizes),
                                          number_candidates(d, bits, formats),
                                          number_candidates(d, bits, formats)):
      f = factors[(b, s, m, k)]
      opts.append((m, k, w, a))
      p_db = predict_db(f, w, a)
      nz.append(10 ** (-p_db / 10) if objective == "noise" else -p_db)
      cs.append((d * o * format_bits(*w), d * n_lin[s] * format_bits(*a),
                 transform_flops(m, k, d)))
    options.append(opts)
    noise.append(np.asarray(nz))
    cost.append(np.asarray(cs, float))
  w_total = sum(dims[s] * out_dims[s] for _, s in keys)
  a_total = sum(dims[s] * n_lin[s] for _, s in keys)
  caps = np.array([budget.avg_w_bits * w_total, budget.avg_a_bits * a_total,
                   math.inf if budget.max_transform_flops is None
                   else budget.max_transform_flops * w_total])
  scale = np.where(np.isfinite(caps), np.maximum(caps, 1e-30), np.inf)  # no cap: free
  # Start: the cheapest option of every site (by normalised cost, then noise).
  pred = [np.asarray([predict_db(factors[(b, s, m, k)], w, a) for m, k, w, a in opts])
          for (b, s), opts in zip(keys, options)]
  current = [int(np.lexsort((n, (c / scale).sum(1)))[0]) for n, c in zip(noise, cost)]
  used = sum(c[i] for c, i in zip(cost, current))
  if np.any(used > caps * (1 + 1e-12)):
    names = ("average weight bits", "average activation bits", "transform flops ratio")
    over = [f"{n} {u / t:.3g} > {c / t:.3g}" for n, u, c, t in
            zip(names, used, caps, (w_total, a_total, w_total)) if u > c]
    raise ValueError(f"the budget is below the cheapest plan: {', '.join(over)}")
  while True:
    best = None
    for j, (n, c) in enumerate(zip(noise, cost)):
      i = current[j]
      gain = n[i] - n
      delta = c - c[i]
      fits = np.all(used + delta <= caps * (1 + 1e-12), axis=1) & (gain > 0)
      if not fits.any():
        continue
      price = np.maximum(delta / scale, 0).sum(1)
      ratio = np.where(fits, gain / np.maximum(price, 1e-12), -np.inf)
      k = int(np.argmax(ratio))
      if best is None or ratio[k] > best[0]:
        best = (ratio[k], j, k)
    if best is None:
      break
    _, j, k = best
    used = used + cost[j][k] - cost[j][current[j]]
    current[j] = k
  sites = []
  for (b, s), opts, p_db, i in zip(keys, options, pred, current):
    m, k, w, a = opts[i]
    sites.append(SitePlan(b, s, m, k, w[0], a[0], w[1], a[1], predicted_sqnr_db=float(p_db[i])))
  plan = Plan(tuple(sites), base)
  summary = plan.summary(cfg, out_dims)
  info = {**summary, "objective": OBJECTIVES[objective],
          "predicted_total_relative_noise": float(sum(10 ** (-p[i] / 10)
                                                      for p, i in zip(pred, current))),
          "predicted_mean_sqnr_db": float(np.mean([p[i] for p, i in zip(pred, current)])),
          "budget": dataclasses.asdict(budget), "candidates": {
              "block_sizes": list(block_sizes), "bits": list(bits), "formats": list(formats)}}
  return Plan(plan.sites, base, info)


def plan_model(model: Llama, stats, acts, budget: Budget, base: Recipe = Recipe(), *,
               bits=DEFAULT_BITS, formats=("int",), block_sizes=DEFAULT_BLOCK_SIZES,
               objective: str = "noise", progress: bool = True) -> Plan:
  """`site_factors` then `choose`: the plan for `model` under `budget`."""
  factors = site_factors(model, stats, acts, base, block_sizes, progress=progress)
  return choose(factors, model, budget, base, bits=bits, formats=formats,
                block_sizes=block_sizes, objective=objective)


