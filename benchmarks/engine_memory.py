"""Peak host memory of the block engine vs statistics of every block at once (SmolLM2-135M).

Each mode runs in a fresh subprocess and reports its peak RSS (`ru_maxrss`):

- `load`: load the model and the calibration windows only (the floor);
- `all_at_once`: `calibrate` (statistics of all 30 blocks) then a closed-form
  `quantize_model(stats=...)`, the old path;
- `engine`: `quantize_model(windows)`: walk block by block, one block's statistics;
- `engine_gptq`: the walk with quantized propagation and GPTQ.

    python benchmarks/engine_memory.py [--calib-windows 32] [--seqlen 512]

Writes `results/engine_memory.{json,md}` with the measured figures and the memory model
for 8B and 70B LLaMA shapes.
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

MODES = ("load", "all_at_once", "engine", "engine_gptq")
GiB = 2**30


def child(mode: str, windows: int, seqlen: int) -> None:
  from catjax.app import load_pretrained
  from catjax.app import text_windows
  from catjax.ptq import quantize_model
  from catjax.ptq import Recipe
  from catjax.ptq import calibrate
  model, tok, _ = load_pretrained("smollm2-135m")
  calib = text_windows(tok, "wiki-calib", seqlen=seqlen, max_tokens=windows * seqlen).tokens
  t0 = time.perf_counter()
  if mode == "all_at_once":
    stats = calibrate(model, calib, batch_size=4, progress=False)
    quantize_model(model, None, Recipe(method="cat"), stats=stats, progress=False)
  elif mode == "engine":
    quantize_model(model, calib, Recipe(method="cat"), batch_size=4, progress=False)
  elif mode == "engine_gptq":
    quantize_model(model, calib, Recipe(method="cat", weights="gptq"), batch_size=4,
                   progress=False)
  seconds = time.perf_counter() - t0
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps({"mode": mode, "peak_rss_bytes": rss, "seconds": seconds}))


def memory_model(name, *, d, f, layers, heads, kv_heads, head_dim, n_tokens, devices=8):
  """Bytes of the engine's working set and of all-layer statistics (float32)."""
  site_d2 = d * d + (heads * head_dim) ** 2 + d * d + f * f  # attn_in, o_in, mlp_in, down_in
  params = layers * (d * (heads + 2 * kv_heads) * head_dim + heads * head_dim * d + 3 * d * f)
  return {"model": name, "block_stats_GiB": 4 * site_d2 / GiB,
          "all_layer_stats_GiB": 4 * layers * site_d2 / GiB,
          "activations_GiB": 4 * n_tokens * d / GiB,
          "activations_with_fp_twin_GiB": 8 * n_tokens * d / GiB,
          "block_params_bf16_GiB": 2 * params / layers / GiB,
          "params_bf16_GiB": 2 * params / GiB,
          "params_bf16_per_device_GiB": 2 * params / devices / GiB}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--calib-windows", type=int, default=32)
  p.add_argument("--seqlen", type=int, default=512)
  p.add_argument("--child")
  args = p.parse_args()
  if args.child:
    child(args.child, args.calib_windows, args.seqlen)
    return
  rows = []
  for mode in MODES:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--calib-windows",
                          str(args.calib_windows), "--seqlen", str(args.seqlen)],
                         capture_output=True, text=True, check=True)
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(rows[-1], flush=True)
  n = 128 * 2048  # the paper's calibration: 128 windows of 2048 tokens
  models = [memory_model("Llama-3-8B", d=4096, f=14336, layers=32, heads=32, kv_heads=8,
                         head_dim=128, n_tokens=n),
            memory_model("Llama-3-70B", d=8192, f=28672, layers=80, heads=64, kv_heads=8,
                         head_dim=128, n_tokens=n)]
  base = rows[0]["peak_rss_bytes"]
  md = ["| mode | peak RSS GiB | above load GiB | seconds |", "|---|---|---|---|"]
  md += [f"| {r['mode']} | {r['peak_rss_bytes'] / GiB:.2f} | "
         f"{(r['peak_rss_bytes'] - base) / GiB:.2f} | {r['seconds']:.0f} |" for r in rows]
  md += ["", "Memory model (float32 statistics and activations, 128 × 2048 calibration tokens):", "",
         "| model | one block's statistics | all blocks' statistics | activations X_b "
         "| + fp twin | one block's params (bf16) | all block params (bf16) / per device of 8 |",
         "|---|---|---|---|---|---|---|"]
  md += [f"| {m['model']} | {m['block_stats_GiB']:.2f} | {m['all_layer_stats_GiB']:.1f} | "
         f"{m['activations_GiB']:.1f} | {m['activations_with_fp_twin_GiB']:.1f} | "
         f"{m['block_params_bf16_GiB']:.2f} | {m['params_bf16_GiB']:.0f} / "
         f"{m['params_bf16_per_device_GiB']:.1f} |" for m in models]
  print("\n".join(md))
  write("engine_memory", {"machine": machine(), "calib_windows": args.calib_windows,
                          "seqlen": args.seqlen, "runs": rows, "memory_model": models},
        "\n".join(md))


if __name__ == "__main__":
  main()
