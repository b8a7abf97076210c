"""Zero-shot accuracy of SmolLM2-135M, full precision and W4A4, on catjax's two
offline lm-eval tasks, through the "catjax" lm-eval model type.

Methods: fp, then W4A4 with none / hadamard / cat k=64 / cat_full (block
engine, RTN weights unless a spec says otherwise, fake quantization; calibration `--calib-windows` × 512
wiki-calib tokens). Tasks (`catjax/app/lmeval_tasks`, built from the Wikipedia
eval split by scripts/make_lmeval_tasks.py): `catjax_wiki_lastword`
(LAMBADA-style last word: accuracy of the greedy word, perplexity) and
`catjax_wiki_cloze` (4-way multiple-choice cloze: acc, acc_norm), the first
`--limit` examples of each; lm-eval's standard errors.

    python benchmarks/zero_shot.py [--limit 300] [--calib-windows 16] [--methods ...]
        [--name zero_shot]

Writes `results/<name>.{json,md}`.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write  # noqa: E402

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from catjax.app import lmeval, load_runnable  # noqa: E402

TASKS = ("catjax_wiki_lastword", "catjax_wiki_cloze")
METRICS = (("catjax_wiki_lastword", "acc"), ("catjax_wiki_lastword", "perplexity"),
           ("catjax_wiki_cloze", "acc"), ("catjax_wiki_cloze", "acc_norm"))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--limit", type=int, default=300)
  p.add_argument("--calib-windows", type=int, default=16)
  p.add_argument("--methods", default="fp,none,hadamard,cat@k64,cat_full")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--name", default="zero_shot", help="results file stem (default: %(default)s)")
  args = p.parse_args()
  manager = TaskManager(include_path=str(lmeval.TASKS_DIR))
  base = load_runnable("smollm2-135m")
  rows = []
  for spec in args.methods.split(","):
    t0 = time.perf_counter()
    lm = lmeval.CatjaxLM(model=base, recipe=None if spec == "fp" else spec,
                  calib_windows=args.calib_windows, batch_size=args.batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), limit=args.limit,
                                  task_manager=manager)
    res = out["results"]
    label = "fp" if spec == "fp" else lm.runnable.quantized.recipe.label
    row = {"method": label, "seconds": time.perf_counter() - t0}
    for task, metric in METRICS:
      row[f"{task}/{metric}"] = res[task][f"{metric},none"]
      row[f"{task}/{metric}_stderr"] = res[task].get(f"{metric}_stderr,none")
    rows.append(row)
    print(row, flush=True)
  head = ["method", "last word acc", "last word ppl", "cloze acc", "cloze acc_norm"]
  lines = [f"SmolLM2-135M, first {args.limit} examples of each task, zero-shot; W4A4 = block "
           f"engine, fake quantization, {args.calib_windows} × 512 wiki-calib "
           "calibration tokens. Accuracies ± lm-eval's standard error.", "",
           "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for r in rows:
    cells = [r["method"]]
    for task, metric in METRICS:
      v, se = r[f"{task}/{metric}"], r[f"{task}/{metric}_stderr"]
      cells.append(f"{v:.2f}" if metric == "perplexity" else
                   f"{100 * v:.1f} ± {100 * se:.1f}" if isinstance(se, float) else f"{100 * v:.1f}")
    lines.append("| " + " | ".join(cells) + " |")
  info = {**machine(), "lm_eval": lm_eval.__version__}
  md = "\n".join(lines) + f"\n\nMachine: {info}.\n"
  print("\n" + md)
  write(args.name, {"machine": info, "args": vars(args), "rows": rows}, md)


if __name__ == "__main__":
  main()
