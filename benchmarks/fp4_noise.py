"""MXFP4 and NVFP4 on SmolLM2-135M: does the SQNR model hold, and does CAT beat Hadamard?

One calibration (8 × 512 tokens of the Wikipedia calibration split), then for
each recipe the block engine (RTN weights), per-site SQNR on 2 held-out
calibration windows and perplexity on 4096 tokens of the Wikipedia eval split.
For every site of every FP4 recipe it compares the measured SQNR with two
predictions from the same factors:

- the FP4 model `SQNR = A / (κ · A_diag)` (catjax.core.stats, what the report shows);
- the uniform model of 4-bit integers on the format's blocks, `12 N² C A`
  (N = 14), i.e. what the integer decomposition would say.

Writes `results/fp4_noise.{json,md}` and prints the tables.

    python benchmarks/fp4_noise.py [--calib-windows 8] [--eval-max-tokens 4096]
"""

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, smollm2_parser, write  # noqa: E402

from catjax.app import RunConfig, assets, markdown_table, parse_spec, run  # noqa: E402
from catjax.models import load_config, spec_for  # noqa: E402
from catjax import predicted_sqnr  # noqa: E402
from catjax.core import stats  # noqa: E402

METHODS = ("fp,none,hadamard,cat,none@mxfp4,hadamard@mxfp4,cat@mxfp4,none@nvfp4,"
           "hadamard@nvfp4,cat@nvfp4")


def _uniform_db(row, recipe, dim):
  """The integer model's prediction (4-bit, the format's blocks) from a site's factors."""
  if None in (row["concentration_x_db"], row["concentration_w_db"], row["alignment_gain_db"]):
    return None
  c_x, c_w = 10 ** (row["concentration_x_db"] / 10), 10 ** (row["concentration_w_db"] / 10)
  align = 10 ** (row["alignment_gain_db"] / 10) / dim
  a, w = recipe.a_config, recipe.w_config
  p = predicted_sqnr(c_x, c_w, align, a_config=a and stats.integer_counterpart(a),
                     w_config=w and stats.integer_counterpart(w))
  return 10 * np.log10(float(p))


def main() -> None:
  p = smollm2_parser(__doc__.split("\n")[0])
  p.add_argument("--methods", default=METHODS)
  args = p.parse_args()
  recipes = tuple(parse_spec(s) for s in args.methods.split(","))
  t0 = time.perf_counter()
  report = run(RunConfig(recipes=recipes, model=args.model, calib_windows=args.calib_windows,
                         seqlen=args.seqlen, eval_max_tokens=args.eval_max_tokens,
                         batch_size=args.batch_size))
  cfg = load_config(assets.resolve_model(args.model))
  dims = spec_for(cfg).site_dims(cfg)
  fp_ppl = next(m.perplexity for m in report.methods if m.recipe.method == "fp")
  rows, per_method = [], {}
  for m in report.methods:
    rc = m.recipe
    if rc.method == "fp":
      continue
    sites = [s.to_dict() for s in m.sites]
    meas = np.array([s["measured_sqnr_db"] for s in sites], float)
    pred = np.array([s["predicted_sqnr_db"] for s in sites], float)
    fp4 = "int" not in (rc.w_format, rc.a_format)
    uni = np.array([_uniform_db(s, rc, dims[s["site"]]) for s in sites], float) if fp4 else None
    per_site = {s: np.abs(pred - meas)[[x["site"] == s for x in sites]].mean() for s in dims}
    per_method[rc.label] = {
        "perplexity": m.perplexity, "mean_measured_sqnr_db": float(meas.mean()),
        "mean_abs_error_db": float(np.abs(pred - meas).mean()),
        "mean_error_db": float((pred - meas).mean()),
        "mean_abs_error_by_site_db": {k: float(v) for k, v in per_site.items()},
        "uniform_mean_abs_error_db": None if uni is None else float(np.abs(uni - meas).mean()),
        "sites": [{**s, "uniform_int4_prediction_db": None if uni is None else float(u)}
                  for s, u in zip(sites, uni if uni is not None else [None] * len(sites))]}
    d = per_method[rc.label]
    rows.append([rc.label, f"{m.perplexity:.2f}", f"{m.perplexity - fp_ppl:+.2f}",
                 f"{d['mean_measured_sqnr_db']:.2f}", f"{d['mean_abs_error_db']:.2f}",
                 f"{d['mean_error_db']:+.2f}",
                 None if uni is None else f"{d['uniform_mean_abs_error_db']:.2f}",
                 " / ".join(f"{v:.2f}" for v in per_site.values())])
  head = ["recipe", "perplexity", "gap to fp", "mean measured SQNR (dB)",
          "mean abs(pred - meas) (dB)", "mean pred - meas (dB)",
          "int4-on-blocks model: mean abs error (dB)",
          "abs error by site " + " / ".join(dims)]
  table = markdown_table(head, rows, needs={head[6]: "integer recipes"})
  extra = {"machine": machine(), "seconds": time.perf_counter() - t0, "fp_perplexity": fp_ppl,
           "command": "python benchmarks/fp4_noise.py " + " ".join(sys.argv[1:])}
  md = (f"# FP4 formats on {report.model['name']} (fp perplexity {fp_ppl:.2f})\n\n{table}\n\n"
        f"{extra['seconds']:.0f} s on {extra['machine']['processor']}, "
        f"{extra['machine']['cpu_count']} cores, jax {extra['machine']['jax']}")
  print(md)
  write("fp4_noise", {**extra, "methods": per_method, "calibration": report.calibration}, md)


if __name__ == "__main__":
  main()
