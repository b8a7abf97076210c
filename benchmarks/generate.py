"""The quantized model as an artifact: SmolLM2-135M saved as a real W4A4 checkpoint,
loaded back, and generating, against the full-precision model.

Steps: load the float32 model; the block engine's CAT k=64 W4A4 (4 × 512
wiki-calib tokens); `realize` it (packed int4 linears); `save_quantized` to a
temporary folder (size on disk vs the model's bfloat16 safetensors from
`save_hf`); `load_quantized` (seconds; perplexity on the eval windows equals
the in-memory model's bit for bit: checked). Then greedy generation of
`--new-tokens` tokens after a `--prompt-tokens` prompt (a wiki-eval slice),
each model warmed up once (compile) and timed `--repeats` times (median):
time to first token (prompt forward + first token) and decode tokens/s of
the rest, for fp float32, fp bfloat16, fake-quantized W4A4 and the loaded
real W4A4. Memory: bytes of the block linears' weights.

    python benchmarks/generate.py [--prompt-tokens 128] [--new-tokens 64] [--repeats 3]

Writes `results/generate.{json,md}`.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write  # noqa: E402

from catjax.app import load_pretrained, parse_spec, text_windows  # noqa: E402
from catjax.artifacts import load_quantized, save_quantized  # noqa: E402
from catjax.ptq import linear_bytes, quantize_model, realize  # noqa: E402
from catjax.analysis import perplexity  # noqa: E402
from catjax.models import generate, save_hf  # noqa: E402


def _folder_bytes(folder: Path, pattern: str) -> int:
  return sum(p.stat().st_size for p in folder.glob(pattern))


def timed_generation(model, prompt, new_tokens, repeats, hook=None, hook_state=None):
  """Median time to first token and decode tokens/s over `repeats` runs (after a warm-up)."""
  def once():
    stamps = []
    t0 = time.perf_counter()
    tokens = generate(model, prompt, max_new_tokens=new_tokens, hook=hook, hook_state=hook_state,
                      on_token=lambda _: stamps.append(time.perf_counter()))
    return tokens, stamps[0] - t0, (len(stamps) - 1) / (stamps[-1] - stamps[0])
  tokens = once()[0]
  runs = [once() for _ in range(repeats)]
  assert all(r[0] == tokens for r in runs)  # greedy: the same tokens every time
  return {"ttft_s": statistics.median(r[1] for r in runs),
          "decode_tok_s": statistics.median(r[2] for r in runs), "tokens": tokens}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--prompt-tokens", type=int, default=128)
  p.add_argument("--new-tokens", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--calib-windows", type=int, default=4)
  p.add_argument("--eval-windows", type=int, default=4)
  args = p.parse_args()
  model, tok, _ = load_pretrained("smollm2-135m")
  bf16, _, _ = load_pretrained("smollm2-135m", dtype="bfloat16")
  calib = text_windows(tok, "wiki-calib", seqlen=512, max_tokens=args.calib_windows * 512).tokens
  evalw = text_windows(tok, "wiki-eval", seqlen=512, max_tokens=args.eval_windows * 512).tokens
  qm = quantize_model(model, calib, parse_spec("cat@k64"))
  real = realize(model, qm)
  with tempfile.TemporaryDirectory() as tmp:
    folder = save_quantized(real, Path(tmp) / "w4a4", tokenizer=tok)
    ckpt_bytes = _folder_bytes(folder, "*.safetensors")
    save_hf(bf16, Path(tmp) / "bf16")
    bf16_bytes = _folder_bytes(Path(tmp) / "bf16", "*.safetensors")
    t0 = time.perf_counter()
    loaded, _ = load_quantized(folder)
    jax.block_until_ready(jax.tree.leaves(loaded.model))
    load_s = time.perf_counter() - t0
  ppl = {name: perplexity(m.model, evalw, hook=m.hook, hook_state=m.transforms,
                          progress=False).perplexity for name, m in (("memory", real),
                                                                      ("loaded", loaded))}
  prompt = text_windows(tok, "wiki-eval", seqlen=args.prompt_tokens,
                        max_tokens=args.prompt_tokens).tokens[0]
  runs = {}
  for name, m, hook, state in (("fp float32", model, None, None), ("fp bfloat16", bf16, None, None),
                               ("W4A4 fake-quant", qm.model, qm.hook, qm.transforms),
                               ("W4A4 real (loaded)", loaded.model, loaded.hook,
                                loaded.transforms)):
    r = timed_generation(m, prompt, args.new_tokens, args.repeats, hook, state)
    r["linear_weight_bytes"] = linear_bytes(m)
    runs[name] = r
    print(name, {k: v for k, v in r.items() if k != "tokens"}, flush=True)
  fp = runs["fp float32"]
  agree = {n: int(np.argmin(np.asarray(r["tokens"]) == np.asarray(fp["tokens"])))
           if r["tokens"] != fp["tokens"] else len(fp["tokens"]) for n, r in runs.items()}
  lines = [
      f"SmolLM2-135M; CAT k=64 W4A4 (block engine, {args.calib_windows} × 512 wiki-calib "
      f"tokens). Greedy generation of {args.new_tokens} tokens after a {args.prompt_tokens}-token "
      f"wiki-eval prompt, batch 1, median of {args.repeats} runs after a warm-up.", "",
      "| model | time to first token s | decode tok/s | block linear weights MB | "
      "tokens equal to fp float32's |", "|---|---|---|---|---|"]
  for n, r in runs.items():
    lines.append(f"| {n} | {r['ttft_s']:.3f} | {r['decode_tok_s']:.1f} | "
                 f"{r['linear_weight_bytes'] / 1e6:.1f} | first {agree[n]} |")
  lines += ["", f"Checkpoint: {ckpt_bytes / 1e6:.1f} MB of safetensors (the bfloat16 model: "
            f"{bf16_bytes / 1e6:.1f} MB, {bf16_bytes / ckpt_bytes:.2f}×; the embedding and "
            f"norms stay float32); `load_quantized` {load_s:.2f} s (sha256 of every file "
            f"checked). Perplexity on {args.eval_windows} × 512 wiki-eval tokens: in memory "
            f"{ppl['memory']:.4f}, loaded {ppl['loaded']:.4f} "
            f"({'bitwise equal' if ppl['memory'] == ppl['loaded'] else 'DIFFERENT'}).",
            "", f"Machine: {machine()}."]
  md = "\n".join(lines)
  print("\n" + md)
  write("generate", {"machine": machine(), "args": vars(args), "runs": runs,
                     "checkpoint_bytes": ckpt_bytes, "bf16_bytes": bf16_bytes,
                     "load_seconds": load_s, "ppl": ppl}, md + "\n")


if __name__ == "__main__":
  main()
