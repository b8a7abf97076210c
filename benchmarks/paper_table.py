"""The paper's comparison in one harness: QuaRot, CAT, CAT with a channel permutation,
SpinQuant, FlatQuant and trained CAT at W4A4, with RTN and with GPTQ weights, on one
calibration set per model.

Per model: one calibration text (`--calib-windows` × 512 tokens of the Wikipedia
calibration split, the same for every method), then each method through the block
engine; perplexity on `--eval-max-tokens` tokens of the disjoint Wikipedia eval
split at `--seqlen`; beside it the mean per-site SQNR, concentration C(x), C(W) and
alignment gain of the transformed operands (2 held-out calibration windows), and
the quantize time. KV cache in 16 bits, per-token activations, per-channel weights.

Training budgets, equal in block passes: trained CAT and FlatQuant take
`--train-steps` AdamW steps per block on one 512-token window each, learning their
transforms, a weight clip per output channel and an activation clip per site
(`@lac`); SpinQuant
takes the same number of Cayley SGD steps, each a forward and backward of the
whole model on one window (so every method runs `steps × blocks` block passes
of 512 tokens).

The methods run in groups (closed form, trained with RTN, trained with GPTQ, and
SpinQuant without the norm fold, whose start is QuaRot's Hadamard); the
results file `results/paper_table_<model>.{json,md}` is rewritten after each method,
so a long run keeps what it finished. `results/paper_table.md` collects every model
that has a results file.

    python benchmarks/paper_table.py [--models smollm2-135m,gemma3-270m,qwen2.5-coder-1.5b]
        [--calib-windows 32] [--seqlen 512] [--eval-max-tokens 16384] [--train-steps 50]
        [--groups closed,trained_rtn,trained_gptq,nofold] [--methods SpinQuant,FlatQuant]
        [--weights rtn,gptq] [--batch-size 4] [--render]

`--methods` and `--weights` run only those columns and weight methods of the groups
(and replace their rows).
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine  # noqa: E402

from catjax.analysis import summary_row  # noqa: E402
from catjax.app import RunConfig, parse_spec, run  # noqa: E402
from catjax.ptq import Recipe, TrainConfig  # noqa: E402

# (column, method spec without weights); {T}: --train-steps; {K}: the block sizes
CLOSED = (("QuaRot", "hadamard"), ("CAT k=64", "cat@k64"), ("CAT k=128", "cat@k128"),
          ("CAT+perm k=64", "cat_perm@k64"))
TRAINED = (("SpinQuant", "spinquant@t{T}"), ("FlatQuant", "flatquant@t{T}@lac"),
           ("CAT-trained k=64", "cat@k64@t{T}@lac"))
GROUPS = {"closed": [("FP", "fp")] + [(c, s) for c, s in CLOSED]
                    + [(c, s + "@gptq") for c, s in CLOSED],
          "trained_rtn": list(TRAINED), "trained_gptq": [(c, s + "@gptq") for c, s in TRAINED],
          # SpinQuant with the norm scales left in the activations: step 0 is QuaRot's Hadamard
          "nofold": [("SpinQuant nofold", "spinquant@t{T}@nofold"),
                     ("SpinQuant nofold", "spinquant@t{T}@nofold@gptq")]}
COLUMNS = ("perplexity", "x fp", "mean SQNR dB", "C(x) dB", "C(W) dB", "align gain dB",
           "quantize s")


def _fits(recipe: Recipe, widths) -> bool:
  k = recipe.site_block_size
  return k is None or all(w % k == 0 for w in widths)


def _widths(model: str) -> tuple[int, ...]:
  """The site widths, from the model's config alone (`run` loads the weights)."""
  from catjax.app import assets
  from catjax.models import load_config, spec_for
  cfg = load_config(assets.resolve_model(model))
  return tuple(spec_for(cfg).site_dims(cfg).values())


def _row(column: str, m) -> dict:
  """The results-file row of one `MethodResult`."""
  s = summary_row(m.recipe.label, m.perplexity, m.sites, None)
  base = m.recipe if isinstance(m.recipe, Recipe) else m.recipe.base
  return {"column": column, "label": m.recipe.label,
          "weights": base.weights if base.method != "fp" else "-",
          "perplexity": m.perplexity, "fit_seconds": m.fit_seconds,
          "mean_sqnr_db": s.mean_measured_sqnr_db, "cx_db": s.mean_concentration_x_db,
          "cw_db": s.mean_concentration_w_db, "align_db": s.mean_alignment_gain_db,
          "engine": {k: v for k, v in m.engine.items() if k in ("train", "spinquant")}}


def _f(v, fmt):
  return "–" if v is None else format(v, fmt)


def markdown(model: str, payload: dict) -> str:
  order = list(dict.fromkeys(c for g in GROUPS.values() for c, _ in g))
  rows = sorted(payload["rows"], key=lambda r: (["-", "rtn", "gptq"].index(r["weights"]),
                                                 order.index(r["column"])))
  fp = next((r["perplexity"] for r in rows if r["column"] == "FP"), None)
  lines = [f"### {model}", "",
           "| method | weights | " + " | ".join(COLUMNS) + " |",
           "|---|---|" + "---|" * len(COLUMNS)]
  for r in rows:
    ratio = None if fp is None else r["perplexity"] / fp
    lines.append(f"| {r['column']} | {r['weights']} | {r['perplexity']:.3f} | {_f(ratio, '.3f')} | "
                 f"{_f(r['mean_sqnr_db'], '.2f')} | {_f(r['cx_db'], '.2f')} | "
                 f"{_f(r['cw_db'], '.2f')} | {_f(r['align_db'], '.2f')} | {r['fit_seconds']:.0f} |")
  c = payload["config"]
  lines += ["", f"{model}, float32; calibration {c['calib_windows']} × 512 tokens of wiki-calib "
            f"(one set for every method); eval {c['eval_max_tokens']} tokens of wiki-eval at "
            f"seqlen {c['seqlen']}; W4A4, KV16; trained methods {c['train_steps']} steps "
            f"(per block for FlatQuant / CAT-trained, whole model for SpinQuant), one window "
            f"each; {payload['machine']['processor']}, {payload['machine']['cpu_count']} cores; "
            f"groups {', '.join(payload['groups'])} in {payload['seconds']:.0f} s."]
  return "\n".join(lines)


def collect() -> None:
  parts = ["Results of `python benchmarks/paper_table.py` (one file per model).", ""]
  for f in sorted(RESULTS.glob("paper_table_*.json")):
    payload = json.loads(f.read_text())
    parts += [markdown(payload["model"], payload), ""]
  (RESULTS / "paper_table.md").write_text("\n".join(parts))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="smollm2-135m")
  p.add_argument("--calib-windows", type=int, default=32)
  p.add_argument("--seqlen", type=int, default=512)
  p.add_argument("--eval-max-tokens", type=int, default=16384)
  p.add_argument("--train-steps", type=int, default=50)
  p.add_argument("--batch-size", type=int, default=4, help="eval and calibration windows per "
                 "step (1 for the 1.5B model at seqlen 2048: its logits are 1.2 GB a window)")
  p.add_argument("--groups", default="closed,trained_rtn,trained_gptq")
  p.add_argument("--methods", default=None, help="only these columns (default: all)")
  p.add_argument("--weights", default="rtn,gptq", help="only these weight methods")
  p.add_argument("--render", action="store_true",
                 help="only rewrite the tables from the results files (runs nothing)")
  args = p.parse_args()
  if args.render:
    for f in sorted(RESULTS.glob("paper_table_*.json")):
      payload = json.loads(f.read_text())
      f.with_suffix(".md").write_text(markdown(payload["model"], payload) + "\n")
    collect()
    return
  base = Recipe(w_bits=4, a_bits=4, train=TrainConfig(lr=1e-3, batch=1))
  groups = args.groups.split(",")
  bad = [g for g in groups if g not in GROUPS]
  if bad:
    p.error(f"--groups: unknown {bad}; expected some of {tuple(GROUPS)}")
  columns = {c for g in groups for c, _ in GROUPS[g]}
  methods = columns if args.methods is None else set(args.methods.split(","))
  if methods - columns:
    p.error(f"--methods: unknown {sorted(methods - columns)} in groups {groups}; expected some "
            f"of {sorted(columns)}")
  weights = args.weights.split(",")
  if set(weights) - {"rtn", "gptq"}:
    p.error(f"--weights={args.weights!r}: expected some of rtn,gptq")
  for model in args.models.split(","):
    widths = _widths(model)
    out = RESULTS / f"paper_table_{model}.json"
    payload = json.loads(out.read_text()) if out.exists() else {}
    config = {"calib_windows": args.calib_windows, "seqlen": args.seqlen,
              "eval_max_tokens": args.eval_max_tokens, "train_steps": args.train_steps}
    if payload.get("config") != config:
      payload = {"model": model, "config": config, "rows": [], "groups": [], "seconds": 0.0}
    for group in groups:
      specs = [(c, parse_spec(s.replace("{T}", str(args.train_steps)), base))
               for c, s in GROUPS[group]]
      specs = [(c, r) for c, r in specs if c in methods and _fits(r, widths)
               and (r.method == "fp" or r.weights in weights)]
      if not specs:
        continue
      payload["groups"] = sorted(set(payload["groups"]) | {group}, key=list(GROUPS).index)
      columns_of = {r.label: c for c, r in specs}
      clock = time.perf_counter()

      def keep(m):  # after every method: a long run keeps what it finished
        nonlocal clock
        payload["rows"] = [r for r in payload["rows"] if r["label"] != m.recipe.label]
        payload["rows"].append(_row(columns_of[m.recipe.label], m))
        payload["seconds"] += time.perf_counter() - clock
        clock = time.perf_counter()
        payload["machine"] = machine()
        out.write_text(json.dumps(payload, indent=2) + "\n")
        (RESULTS / f"paper_table_{model}.md").write_text(markdown(model, payload) + "\n")
        collect()

      run(RunConfig(recipes=tuple(r for _, r in specs), model=model,
                    calib_windows=args.calib_windows, calib_seqlen=512, seqlen=args.seqlen,
                    eval_max_tokens=args.eval_max_tokens, batch_size=args.batch_size),
          on_method=keep)
      print(markdown(model, payload), flush=True)

if __name__ == "__main__":
  main()
