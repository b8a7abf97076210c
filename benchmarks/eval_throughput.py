"""SmolLM2-135M perplexity and CPU throughput: catjax (JAX) vs transformers (PyTorch),
and catjax's fake-quantized W4A4 forward vs its full-precision one.

Both models come from the same GGUF file, loaded independently: catjax's own
reader, and transformers' GGUF loader (which needs `accelerate`). Both see the
same windows of the Wikipedia eval split. Windows are timed alternately
(catjax, PyTorch, then catjax's quantized model, window by window) so machine
noise hits all alike; one warm-up window each is excluded (jit compile,
PyTorch first-call setup). Batch size 1; PyTorch uses its default thread
count. The quantized model is the block engine's CAT k=64 W4A4 (calibrated on
4 windows of wiki-calib): its forward runs the site hook (online block
transforms, per-token activation fake quantization).

    python benchmarks/eval_throughput.py [--seqlens 512 2048] [--max-tokens 16384]
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write  # noqa: E402

from catjax.app import load_pretrained, parse_spec, text_windows  # noqa: E402
from catjax.analysis import window_nll  # noqa: E402
from catjax.ptq import quantize_model  # noqa: E402


def torch_nll_fn(path):
  import torch
  import transformers
  model = transformers.LlamaForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()

  def nll(tokens):
    with torch.no_grad():
      t = torch.tensor(tokens, dtype=torch.long)
      return float(model(t, labels=t).loss) * (tokens.shape[1] - 1)
  return nll, {"torch": torch.__version__, "transformers": transformers.__version__,
               "torch_threads": torch.get_num_threads()}


def timed(fn, *args):
  t0 = time.perf_counter()
  out = fn(*args)
  return out, time.perf_counter() - t0


def run(seqlen, max_tokens, tokenizer, ours, theirs, quantized):
  windows = text_windows(tokenizer, "wiki-eval", seqlen=seqlen, max_tokens=max_tokens).tokens
  (_, compile_s), (_, torch_warm_s) = timed(ours, windows[:1]), timed(theirs, windows[:1])
  timed(quantized, windows[:1])
  fns = (("catjax", lambda w: float(ours(w).sum())), ("pytorch", theirs),
         ("quantized", lambda w: float(quantized(w).sum())))
  nll = {name: 0.0 for name, _ in fns}
  secs = {name: [] for name, _ in fns}
  for i, w in enumerate(windows):
    for name, fn in fns:
      value, s = timed(fn, w[None])
      nll[name] += value
      secs[name].append(s)
    print(f"  seqlen {seqlen} window {i + 1}/{len(windows)}: catjax {secs['catjax'][-1]:.2f}s "
          f"pytorch {secs['pytorch'][-1]:.2f}s", flush=True)
  predicted = len(windows) * (seqlen - 1)
  row = {"seqlen": seqlen, "windows": len(windows), "tokens": windows.size,
         "compile_s": compile_s, "torch_warmup_s": torch_warm_s}
  for name in nll:
    row[f"ppl_{name}"] = math.exp(nll[name] / predicted)
    row[f"tok_s_{name}"] = windows.size / sum(secs[name])
  row["ppl_rel_diff"] = row["ppl_catjax"] / row["ppl_pytorch"] - 1
  row["speed_ratio"] = row["tok_s_catjax"] / row["tok_s_pytorch"]
  row["quantized_slowdown"] = sum(secs["quantized"]) / sum(secs["catjax"]) - 1
  row["median_window_ratio"] = statistics.median(
      p / c for c, p in zip(secs["catjax"], secs["pytorch"]))
  row["quantized_median_slowdown"] = statistics.median(
      q / c for c, q in zip(secs["catjax"], secs["quantized"])) - 1
  return row


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--seqlens", type=int, nargs="+", default=[512, 2048])
  ap.add_argument("--max-tokens", type=int, default=16384)
  args = ap.parse_args()
  t0 = time.perf_counter()
  model, tokenizer, path = load_pretrained("smollm2-135m")
  load_s = time.perf_counter() - t0
  theirs, versions = torch_nll_fn(path)
  ours = window_nll(model)
  calib = text_windows(tokenizer, "wiki-calib", seqlen=512, max_tokens=4 * 512).tokens
  qm = quantize_model(model, calib, parse_spec("cat@k64"), progress=False)
  quantized = window_nll(qm.model, hook=qm.hook, hook_state=qm.transforms)
  rows = [run(s, args.max_tokens, tokenizer, ours, theirs, quantized) for s in args.seqlens]
  header = ("| seqlen | windows | tokens | ppl catjax | ppl PyTorch | rel. diff | tok/s catjax "
            "| tok/s PyTorch | speed ratio | median window ratio | W4A4 ppl | tok/s W4A4 "
            "(fake quant) | W4A4 time vs fp | median window W4A4 vs fp |\n" + "|---" * 14 + "|")
  lines = [f"| {r['seqlen']} | {r['windows']} | {r['tokens']} | {r['ppl_catjax']:.4f} | "
           f"{r['ppl_pytorch']:.4f} | {100 * r['ppl_rel_diff']:+.4f}% | {r['tok_s_catjax']:.0f} | "
           f"{r['tok_s_pytorch']:.0f} | {r['speed_ratio']:.2f}x | {r['median_window_ratio']:.2f}x | "
           f"{r['ppl_quantized']:.3f} | {r['tok_s_quantized']:.0f} | "
           f"{100 * r['quantized_slowdown']:+.1f}% | "
           f"{100 * r['quantized_median_slowdown']:+.1f}% |" for r in rows]
  info = {**machine(), **versions}
  md = "\n".join([
      "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32), Wikipedia eval split, "
      "batch 1, float32.", "", header, *lines, "",
      f"catjax GGUF load {load_s:.1f} s; jit compile (first window) "
      + ", ".join(f"{r['compile_s']:.1f} s at {r['seqlen']}" for r in rows) + ".",
      "", "Machine: " + ", ".join(f"{k}={v}" for k, v in info.items())])
  print("\n" + md)
  write("eval_throughput", {"machine": info, "load_s": load_s, "rows": rows}, md)


if __name__ == "__main__":
  main()
