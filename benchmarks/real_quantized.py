"""Real (integer) quantized SmolLM2-135M vs its fake-quantized twin, and where CAT's
Hadamard goes: full width (online, before the kernel) or folded into the blocks.

For each recipe: per-site SQNR (2 held-out calibration windows), perplexity of
the fake-quantized model and of the real one (`QLinear`: packed int4 weights,
`catjax.kernels.quantized_matmul`, here the jnp reference with XLA's int8 dot
on CPU), and the bytes of the block linears vs bfloat16.

    python benchmarks/real_quantized.py [--calib-windows 32] [--eval-max-tokens 8192]
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write  # noqa: E402

from catjax.data import text_windows  # noqa: E402
from catjax.evaluate import perplexity  # noqa: E402
from catjax.models import load_pretrained  # noqa: E402
from catjax.models.quantized import linear_bytes, realize  # noqa: E402
from catjax.ptq import Recipe, calibrate, quantize_model  # noqa: E402
from catjax.report import site_report  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--calib-windows", type=int, default=32)
  p.add_argument("--eval-max-tokens", type=int, default=8192)
  p.add_argument("--specs", default="none,cat,cat@bh")
  args = p.parse_args()
  model, tok, _ = load_pretrained("smollm2-135m")
  calib = text_windows(tok, "wiki-calib", seqlen=512,
                       max_tokens=(args.calib_windows + 2) * 512).tokens
  evalw = text_windows(tok, "wiki-eval", seqlen=512, max_tokens=args.eval_max_tokens)
  t0 = time.perf_counter()
  stats = calibrate(model, calib[:args.calib_windows])
  calib_s = time.perf_counter() - t0
  bf16_bytes = linear_bytes(model) // 2  # float32 model -> bfloat16 bytes
  rows = []
  for spec in args.specs.split(","):
    qm = quantize_model(model, stats, Recipe().with_spec(spec))
    sites = site_report(model, qm, calib[args.calib_windows:])
    fake = perplexity(qm.model, evalw.tokens, hook=qm.hook, hook_state=qm.transforms,
                      model_name=qm.recipe.label)
    real = realize(model, qm)
    got = perplexity(real.model, evalw.tokens, hook=real.hook, hook_state=real.transforms,
                     model_name=qm.recipe.label + " real")
    rows.append({"method": qm.recipe.label,
                 "mean_sqnr_db": float(np.mean([s["measured_sqnr_db"] for s in sites])),
                 "ppl_fake": fake.perplexity, "ppl_real": got.perplexity,
                 "rel_diff": got.perplexity / fake.perplexity - 1,
                 "fake_tok_s": fake.tokens_per_second, "real_tok_s": got.tokens_per_second,
                 "weight_bytes": linear_bytes(real.model), "bf16_bytes": bf16_bytes,
                 "ratio_vs_bf16": bf16_bytes / linear_bytes(real.model)})
    print(rows[-1], flush=True)
  head = ["method", "mean site SQNR dB", "ppl fake-quant", "ppl real int", "rel. diff",
          "tok/s fake", "tok/s real", "linear weights MB (bf16 MB)", "bf16 / int"]
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for r in rows:
    lines.append(f"| {r['method']} | {r['mean_sqnr_db']:.2f} | {r['ppl_fake']:.3f} | "
                 f"{r['ppl_real']:.3f} | {r['rel_diff']:+.1e} | {r['fake_tok_s']:.0f} | "
                 f"{r['real_tok_s']:.0f} | {r['weight_bytes'] / 1e6:.1f} ({r['bf16_bytes'] / 1e6:.1f}) "
                 f"| {r['ratio_vs_bf16']:.2f}× |")
  info = machine()
  md = (f"SmolLM2-135M, calibration {args.calib_windows} × 512 tokens of wiki-calib "
        f"({calib_s:.0f} s), evaluation {evalw.describe()['tokens']} tokens of wiki-eval at "
        f"seqlen 512; {info['processor']}, {info['cpu_count']} cores, jax {info['jax']}.\n\n"
        + "\n".join(lines))
  print(md)
  write("real_quantized", {"machine": info, "calibration_seconds": calib_s,
                           "evaluation": evalw.describe(), "rows": rows}, md)


if __name__ == "__main__":
  main()
