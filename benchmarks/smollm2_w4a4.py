"""W4A4 (and W6A6 / W8A8 RTN) quantization of SmolLM2-135M, every method in one harness.

One calibration text (32 × 512 tokens of the Wikipedia calibration split), then
for each method the block engine: fit, (train,) transform, fake-quantize
(RTN or GPTQ), per-site SQNR on 2 held-out calibration windows, perplexity on
16,384 tokens of the disjoint Wikipedia eval split at seqlen 512. Closed-form
RTN recipes share one full-precision calibration pass; GPTQ and trained
recipes walk the model on their own quantized activations. Writes `results/smollm2_w4a4{,_<seqlen>}.{json,md}`
and the two plots beside them; prints the tables.

    python benchmarks/smollm2_w4a4.py [--seqlen 512] [--calib-windows 32]
        [--eval-max-tokens 16384] [--methods ...]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine  # noqa: E402

from catjax.app import (RunConfig, comparison_markdown, comparisons_markdown,  # noqa: E402
                        parse_spec, run, write_outputs)
from catjax.ptq import Recipe, TrainConfig  # noqa: E402

METHODS = ("fp,none,smoothquant,smoothquant_hadamard,hadamard,cat@k64,cat@k192,cat_full,"
           "cat_full@f32,none@w6a6,none@w8a8,hadamard@gptq,smoothquant_hadamard@gptq,"
           "cat@k64@gptq,cat@k64@gptq@t{T},hadamard@gptq@ac0.8,cat@k64@gptq@ac0.8,"
           "cat@k64@gptq@ac0.8@t{T}")
# Trained CAT budget on 2 CPU cores: 50 AdamW steps per block, one 512-token window each.
TRAIN_STEPS, TRAIN_LR, TRAIN_BATCH = 50, 1e-3, 1


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seqlen", type=int, default=512)
  p.add_argument("--calib-windows", type=int, default=32)
  p.add_argument("--calib-seqlen", type=int, default=512)
  p.add_argument("--eval-max-tokens", type=int, default=16384)
  p.add_argument("--methods", default=METHODS,
                  help="method specs; {T} stands for --train-steps (default: %(default)s)")
  p.add_argument("--train-steps", type=int, default=TRAIN_STEPS,
                 help="trained CAT steps per block (default: %(default)s)")
  p.add_argument("--train-lr", type=float, default=TRAIN_LR)
  p.add_argument("--train-batch", type=int, default=TRAIN_BATCH,
                 help="windows per training step (default: %(default)s)")
  p.add_argument("--batch-size", type=int, default=4, help="windows per engine step")
  p.add_argument("--name", default=None, help="results file stem")
  args = p.parse_args()
  base = Recipe(w_bits=4, a_bits=4, train=TrainConfig(lr=args.train_lr, batch=args.train_batch))
  specs = args.methods.replace("{T}", str(args.train_steps)).split(",")
  cfg = RunConfig(recipes=tuple(parse_spec(s, base) for s in specs),
                  calib_windows=args.calib_windows, calib_seqlen=args.calib_seqlen,
                  seqlen=args.seqlen, eval_max_tokens=args.eval_max_tokens,
                  batch_size=args.batch_size)
  t0 = time.perf_counter()
  report = run(cfg)
  extra = {"machine": machine(), "total_seconds": time.perf_counter() - t0}
  name = args.name or "smollm2_w4a4" + ("" if args.seqlen == 512 else f"_{args.seqlen}")
  paths = write_outputs(report, RESULTS / f"{name}.json", extra=extra)
  print()
  print(comparison_markdown(report.summary))
  print()
  print(comparisons_markdown(report.comparisons))
  times = [(m.recipe.label, m.fit_seconds, m.evaluation["seconds"]) for m in report.methods]
  print(f"\ncalibration {report.calibration['seconds']:.1f} s; fit / eval seconds: "
        + ", ".join(f"{lab} {f:.1f}/{e:.0f}" for lab, f, e in times))
  print(f"total {extra['total_seconds']:.0f} s on {extra['machine']}")
  print("wrote", ", ".join(str(p) for p in paths))


if __name__ == "__main__":
  main()
