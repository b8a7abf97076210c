"""The `catjax` command: argv -> frozen options -> library call.

    catjax eval --model smollm2-135m --seqlen 512 --max-tokens 16384 --json ppl.json
    catjax generate --model smollm2-135m --prompt "The capital of France is"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16")


def _model_args(p: argparse.ArgumentParser):
  p.add_argument("--model", default="smollm2-135m",
                 help="model name (smollm2-135m), .gguf file or Hugging Face folder "
                      "(default: %(default)s)")
  p.add_argument("--dtype", default="float32", choices=DTYPES,
                 help="parameter and compute dtype (default: %(default)s)")


def _positive(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
  return value


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="catjax", description="Post-training quantization of LLaMA-family models with "
      "Concentration-Alignment Transforms (CAT), in JAX.")
  sub = parser.add_subparsers(dest="command", required=True)

  ev = sub.add_parser("eval", help="perplexity of a model on a text")
  _model_args(ev)
  ev.add_argument("--seqlen", type=_positive, default=512,
                  help="tokens per window (default: %(default)s)")
  ev.add_argument("--max-tokens", type=_positive, default=16384,
                  help="token budget: at most this many tokens, whole windows "
                       "(default: %(default)s)")
  ev.add_argument("--eval-text", default="wiki-eval",
                  help="wiki-eval (default), wiki-calib, brown, or a text file")
  ev.add_argument("--batch-size", type=_positive, default=1,
                  help="windows per step (default: %(default)s)")
  ev.add_argument("--json", type=Path, help="write the report as JSON here")
  ev.add_argument("--no-progress", action="store_true", help="no progress bar")

  gen = sub.add_parser("generate", help="greedy continuation of a prompt")
  _model_args(gen)
  gen.add_argument("--prompt", required=True, help="text to continue")
  gen.add_argument("--max-new-tokens", type=_positive, default=32,
                   help="(default: %(default)s)")
  gen.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's chat template")
  return parser


def _eval(args) -> dict:
  from catjax.data import text_windows
  from catjax.evaluate import perplexity
  from catjax.models import load_pretrained
  model, tokenizer, path = load_pretrained(args.model, dtype=args.dtype)
  windows = text_windows(tokenizer, args.eval_text, seqlen=args.seqlen,
                         max_tokens=args.max_tokens)
  result = perplexity(model, windows.tokens, batch_size=args.batch_size, model_name=args.model,
                      data_name=args.eval_text, progress=not args.no_progress)
  report = {**result.to_dict(), "model_path": str(path)}
  print(f"perplexity {result.perplexity:.4f}  ({args.model}, {args.eval_text}, "
        f"seqlen {result.seqlen}, {result.windows} windows, {result.tokens} tokens, "
        f"{result.dtype}, {result.tokens_per_second:.0f} tok/s)")
  return report


def _generate(args) -> dict:
  from catjax.models import generate, load_pretrained
  model, tokenizer, _ = load_pretrained(args.model, dtype=args.dtype)
  if args.chat:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                           add_generation_prompt=True, tokenize=False)
  else:
    prompt = args.prompt
  ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
  new = generate(model, ids, max_new_tokens=args.max_new_tokens,
                 eos_token_id=model.config.eos_token_id)
  text = tokenizer.decode(new, skip_special_tokens=True)
  print(text if args.chat else args.prompt + text)
  return {"prompt": args.prompt, "completion": text, "tokens": new}


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    report = {"eval": _eval, "generate": _generate}[args.command](args)
  except (ValueError, FileNotFoundError) as e:
    print(f"catjax {args.command}: error: {e}", file=sys.stderr)
    return 2
  if getattr(args, "json", None):
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
  return 0
