"""The per-site planner on SmolLM2-135M: are its predictions right, and do its plans pay?

One calibration (8 × 512 tokens of the Wikipedia calibration split), the
planner's factors on 2 further calibration windows, per-site SQNR measured on
2 other held-out calibration windows, perplexity on 4096 tokens of the Wikipedia eval
split. RTN weights throughout. Three questions:

(a) Predicted (planner) vs measured SQNR of every site of the 4.5-bit plan:
    mean |error|.
(b) The planner's block-size choice at W4A4 with the transform cost of a
    uniform CAT k=64 as its ceiling, vs uniform CAT k=64.
(c) Mixed precision at an average of 4.5 weight and 4.5 activation bits
    (ints of 4, 6, 8 bits) vs uniform W4A4 and W6A6.
Each plan is chosen with both objectives of `catjax.ptq.planner` ("noise":
Σ 1/SQNR, the default; "db": Σ SQNR_dB).
(CAT vs Hadamard at MXFP4 and NVFP4 is benchmarks/fp4_noise.py.)

Writes `results/planner.{json,md,png}` and prints the tables.

    python benchmarks/planner.py [--calib-windows 8] [--eval-max-tokens 4096]
"""

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, smollm2_parser, write  # noqa: E402

from catjax.app import (load_pretrained, markdown_table, parse_spec, plan_points,  # noqa: E402
                        plot_predicted_vs_measured, text_windows)
from catjax.ptq import Recipe, calibrate, planner, quantize_model, uniform_plan  # noqa: E402
from catjax.analysis import SiteSQNR, perplexity, site_report  # noqa: E402
from catjax.models import capture  # noqa: E402


def main() -> None:
  p = smollm2_parser(__doc__.split("\n")[0])
  p.add_argument("--budget", type=float, default=4.5, help="average bits of (a) and (c)")
  args = p.parse_args()
  t_start = time.perf_counter()
  model, tok, _ = load_pretrained(args.model)
  cfg = model.config
  n = args.calib_windows
  calib = text_windows(tok, "wiki-calib", seqlen=args.seqlen, max_tokens=(n + 4) * args.seqlen,
                       max_positions=cfg.max_position_embeddings).tokens
  # statistics / the planner's factors / the measurement: three disjoint sets of windows
  fit, factor_windows, held = calib[:n], calib[n:n + 2], calib[n + 2:n + 4]
  evalw = text_windows(tok, "wiki-eval", seqlen=args.seqlen, max_tokens=args.eval_max_tokens,
                       max_positions=cfg.max_position_embeddings).tokens
  stats = calibrate(model, fit, batch_size=args.batch_size)
  held_acts = capture(model, held)
  base = Recipe()
  t0 = time.perf_counter()
  factors = planner.site_factors(model, stats, capture(model, factor_windows), base)
  factor_seconds = time.perf_counter() - t0
  fp_ppl = perplexity(model, evalw, batch_size=args.batch_size, progress=False).perplexity

  def run(name, what):
    t = time.perf_counter()
    qm = quantize_model(model, fit, what, stats=stats, batch_size=args.batch_size,
                        progress=False)
    rows = site_report(model, qm, held, acts=held_acts)
    ppl = perplexity(qm.model, evalw, batch_size=args.batch_size, hook=qm.hook,
                     hook_state=qm.transforms, progress=False).perplexity
    meas = np.array([r.measured_sqnr_db for r in rows])
    print(f"{name}: perplexity {ppl:.3f}, mean site SQNR {meas.mean():.2f} dB "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    return {"name": name, "perplexity": ppl, "mean_measured_sqnr_db": float(meas.mean()),
            "sites": [r.to_dict() for r in rows]}

  def summary(what):
    info = what.info if hasattr(what, "info") else {}
    return {k: info.get(k) for k in ("avg_w_bits", "avg_a_bits", "transform_flops_ratio")}

  results = {}
  # (a) and (c): the mixed-precision plan at the budget, for each objective.
  plans = {}
  for obj in planner.OBJECTIVES:
    plans[obj] = planner.choose(factors, model, planner.Budget(args.budget, args.budget), base,
                                objective=obj)
    key = "plan" if obj == "noise" else f"plan_{obj}"
    results[key] = {**run(f"plan {args.budget:g} bits ({obj})", plans[obj]),
                    **summary(plans[obj]), "plan": plans[obj].to_dict()}
    results[key]["prediction_error_db"] = _errors(plans[obj], results[key]["sites"])
  mixed = plans["noise"]
  uniform = {}
  out_dims = planner.site_out_dims(model)
  for spec in ("hadamard", "cat@k64", "none@w6a6", "cat@k64@w6a6"):
    r = parse_spec(spec, Recipe(block_size=64))
    uniform[spec] = {**run(r.label, r), **uniform_plan(r, cfg).summary(cfg, out_dims)}
  results["uniform"] = uniform
  # (b) block sizes at the cost of uniform CAT k=64, W4A4.
  cost = uniform["cat@k64"]["transform_flops_ratio"]
  for obj in planner.OBJECTIVES:
    blocks = planner.choose(factors, model, planner.Budget(4, 4, cost), base, bits=(4,),
                            objective=obj)
    key = "blocks" if obj == "noise" else f"blocks_{obj}"
    results[key] = {**run(f"plan W4A4 block sizes ({obj})", blocks), **summary(blocks),
                    "plan": blocks.to_dict()}
    ks = [s.block_size if s.method == "cat" else s.method for s in blocks.sites]
    results[key]["choices"] = {str(k): ks.count(k) for k in dict.fromkeys(ks)}
    results[key]["prediction_error_db"] = _errors(blocks, results[key]["sites"])

  def row(label, r):
    return [label, f"{r['perplexity']:.2f}", f"{r['perplexity'] - fp_ppl:+.2f}",
            f"{r['mean_measured_sqnr_db']:.2f}", f"{r['avg_w_bits']:.2f}",
            f"{r['avg_a_bits']:.2f}", f"{100 * r['transform_flops_ratio']:.2f}%"]

  head = ["configuration", "perplexity", "gap to fp", "mean site SQNR (dB)", "avg W bits",
          "avg A bits", "transform FLOPs / linears"]
  table_c = markdown_table(head, [row(uniform[s]["name"], uniform[s]) for s in uniform]
                           + [row(results[k]["name"], results[k]) for k in ("plan", "plan_db")])
  table_b = markdown_table(head, [row(uniform["cat@k64"]["name"], uniform["cat@k64"])]
                           + [row(results[k]["name"], results[k]) for k in ("blocks", "blocks_db")])
  e = results["plan"]["prediction_error_db"]
  eb = results["blocks"]["prediction_error_db"]
  choices = "; ".join(f"{obj}: " + ", ".join(f"{k} {v}" for k, v in results[key]["choices"].items())
                      for obj, key in (("noise", "blocks"), ("db", "blocks_db")))
  bits = {}
  for s in mixed.sites:
    key = f"W{s.w_bits}A{s.a_bits}"
    bits[key] = bits.get(key, 0) + 1
  extra = {"machine": machine(), "fp_perplexity": fp_ppl, "factor_seconds": factor_seconds,
           "seconds": time.perf_counter() - t_start,
           "command": "python benchmarks/planner.py " + " ".join(sys.argv[1:])}
  md = "\n".join([
      f"# Planner on {args.model} (fp perplexity {fp_ppl:.2f})", "",
      f"(a) {args.budget:g}-bit plan: predicted (2 held-out calibration windows) vs measured "
      f"(2 other held-out windows) SQNR over its {len(mixed.sites)} sites: mean |error| "
      f"{e['mean_abs']:.2f} dB, mean error {e['mean']:+.2f} dB, max |error| "
      f"{e['max_abs']:.2f} dB. The W4A4 block-size plan of (b): mean |error| "
      f"{eb['mean_abs']:.2f} dB.", "",
      "(b) Block sizes chosen per site at W4A4 under the transform cost of uniform CAT k=64 "
      f"(sites per choice, by objective: {choices}):", "", table_b, "",
      f"(c) Mixed precision at {args.budget:g} average bits (noise objective, sites per width: "
      + ", ".join(f"{k} {v}" for k, v in sorted(bits.items())) + "):", "", table_c, "",
      f"Candidate fits and factors {factor_seconds:.0f} s; total {extra['seconds']:.0f} s on "
      f"{extra['machine']['processor']}, {extra['machine']['cpu_count']} cores, "
      f"jax {extra['machine']['jax']}."])
  print(md)
  write("planner", {**extra, **results}, md)
  rows = [SiteSQNR(**r) for r in results["plan"]["sites"]]
  print("wrote", plot_predicted_vs_measured(
      plan_points(mixed.predicted_db(), rows), RESULTS / "planner.png",
      title="Chosen plan, every site: predicted vs measured",
      xlabel="planner's predicted SQNR (dB, held-out calibration windows)",
      ylabel="measured SQNR (dB, other held-out windows)"))


def _errors(plan, sites):
  pred = {(s.layer, s.site): s.predicted_sqnr_db for s in plan.sites}
  err = np.array([pred[(r["layer"], r["site"])] - r["measured_sqnr_db"] for r in sites])
  return {"mean_abs": float(np.abs(err).mean()), "mean": float(err.mean()),
          "max_abs": float(np.abs(err).max())}


if __name__ == "__main__":
  main()
