"""Bigger models end to end on this machine: load, fp32 vs bf16, CAT W4A4 with the block engine.

Per model, in a fresh subprocess (so peak RSS is that model's): parameter
count, load time and peak RSS right after the (streaming) load, fp
perplexity in float32 and in bfloat16, then the block engine's CAT k=64 W4A4
(RTN weights, full-precision propagation; its quantize time) and its
perplexity, all on the Wikipedia splits at seqlen 512.

    python benchmarks/scale.py [--models smollm2-135m,qwen2.5-coder-1.5b]
        [--calib-windows 8] [--eval-windows 8]

Writes `results/scale.{json,md}`.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write  # noqa: E402

GiB = 2**30


def _rss() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB


def child(model_name: str, calib_windows: int, eval_windows: int, method: str) -> None:
  import jax

  from catjax.assets import load_pretrained
  from catjax.data import text_windows
  from catjax.engine import quantize_model
  from catjax.evaluate import perplexity
  from catjax.ptq import Recipe
  out = {"model": model_name, "rss_before_load_GiB": _rss()}
  t0 = time.perf_counter()
  model, tok, path = load_pretrained(model_name)
  jax.block_until_ready(jax.tree.leaves(model))
  out.update(load_seconds=time.perf_counter() - t0, rss_after_load_GiB=_rss(),
             parameters=sum(x.size for x in jax.tree.leaves(model)), path=str(path),
             layers=model.config.num_layers, hidden=model.config.hidden_size,
             model_type=model.config.model_type)
  seqlen = 512
  ev = text_windows(tok, "wiki-eval", seqlen=seqlen, max_tokens=eval_windows * seqlen).tokens
  calib = text_windows(tok, "wiki-calib", seqlen=seqlen, max_tokens=calib_windows * seqlen).tokens
  out["fp32"] = perplexity(model, ev, batch_size=1, progress=False).to_dict()
  bf16, _, _ = load_pretrained(model_name, dtype="bfloat16")
  out["bf16"] = perplexity(bf16, ev, batch_size=1, progress=False).to_dict()
  del bf16
  recipe = Recipe().with_spec(method)
  t0 = time.perf_counter()
  qm = quantize_model(model, calib, recipe, batch_size=1, progress=False)
  jax.block_until_ready(jax.tree.leaves(qm.model))
  out["quantize_seconds"] = time.perf_counter() - t0
  out["recipe"] = recipe.label
  out["quantized"] = perplexity(qm.model, ev, batch_size=1, hook=qm.hook,
                                hook_state=qm.transforms, progress=False).to_dict()
  out["peak_rss_GiB"] = _rss()
  print(json.dumps(out))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="smollm2-135m,qwen2.5-coder-1.5b")
  p.add_argument("--calib-windows", type=int, default=8)
  p.add_argument("--eval-windows", type=int, default=8)
  p.add_argument("--method", default="cat@k64")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    child(args.child, args.calib_windows, args.eval_windows, args.method)
    return
  rows = []
  for name in args.models.split(","):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", name, "--calib-windows",
                           str(args.calib_windows), "--eval-windows", str(args.eval_windows),
                           "--method", args.method], capture_output=True, text=True)
    if proc.returncode != 0:
      raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["total_seconds"] = time.perf_counter() - t0
    rows.append(row)
    print(f"{name}: {row['parameters'] / 1e9:.2f} B params, load {row['load_seconds']:.0f} s "
          f"({row['rss_after_load_GiB']:.2f} GiB RSS), fp32 {row['fp32']['perplexity']:.3f}, "
          f"bf16 {row['bf16']['perplexity']:.3f}, {row['recipe']} "
          f"{row['quantized']['perplexity']:.3f} (quantize {row['quantize_seconds']:.0f} s)",
          flush=True)
  head = ("| model | params | load s | RSS after load GiB | fp32 ppl | bf16 ppl | bf16 vs fp32 | "
          "recipe | W4A4 ppl | quantize s | peak RSS GiB |")
  lines = [head, "|" + "---|" * 11]
  for r in rows:
    f32, b16 = r["fp32"]["perplexity"], r["bf16"]["perplexity"]
    lines.append(f"| {r['model']} | {r['parameters'] / 1e9:.3f} B | {r['load_seconds']:.1f} | "
                 f"{r['rss_after_load_GiB']:.2f} | {f32:.3f} | {b16:.3f} | "
                 f"{100 * (b16 / f32 - 1):+.2f}% | {r['recipe']} | "
                 f"{r['quantized']['perplexity']:.3f} | {r['quantize_seconds']:.0f} | "
                 f"{r['peak_rss_GiB']:.2f} |")
  info = machine()
  md = (f"# Models end to end\n\nMachine: {info}. Calibration {args.calib_windows} × 512 tokens "
        f"(wiki-calib), evaluation {args.eval_windows} × 512 tokens (wiki-eval).\n\n"
        + "\n".join(lines) + "\n")
  print(md)
  write("scale", {"machine": info, "args": vars(args), "rows": rows}, md)


if __name__ == "__main__":
  main()
