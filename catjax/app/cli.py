"""The `catjax` command: argv -> frozen options -> library call.

    catjax eval --model smollm2-135m --seqlen 512 --max-tokens 16384 --json ppl.json
    catjax generate --model smollm2-135m --prompt "The capital of France is"
    catjax quantize --model smollm2-135m --method cat --block-size 64 --w-bits 4 --a-bits 4 --json q.json
    catjax compare --model smollm2-135m --methods fp,none,hadamard,cat,cat_full --json cmp.json
    catjax plan --model smollm2-135m --avg-w-bits 4.5 --avg-a-bits 4.5 --json plan.json
    catjax quantize --model smollm2-135m --plan plan.json --json q.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def quiet_backend_probe() -> None:
  """Silence jax's "Unable to initialize backend 'tpu'" warning, which every
  command printed on a machine without a TPU, unless a TPU was asked for
  (`JAX_PLATFORMS`); a failure to start an asked-for backend still raises."""
  import os
  if "tpu" not in os.environ.get("JAX_PLATFORMS", "").lower():
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)


def _model_args(p: argparse.ArgumentParser):
  p.add_argument("--model", default="smollm2-135m",
                 help="model name (smollm2-135m), .gguf file, Hugging Face folder or (eval, "
                      "generate) a quantized checkpoint folder (default: %(default)s)")
  p.add_argument("--dtype", default="float32", choices=DTYPES,
                 help="parameter and compute dtype (default: %(default)s)")
  p.add_argument("--mesh", default=None,
                 help="device mesh 'data=N,model=M': windows split over data, heads and MLP "
                      "width over model (default: all devices on data)")
  p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help="multi-process run: jax.distributed coordinator (process 0's address); "
                      "needs --num-processes and --process-id")
  p.add_argument("--num-processes", type=_positive, default=None,
                 help="multi-process run: how many processes in all")
  p.add_argument("--process-id", type=_nonnegative, default=None,
                 help="multi-process run: this process's index, 0..num-processes-1")
  p.add_argument("--debug", action="store_true",
                 help="on an error, show the Python traceback instead of one line")


def _positive(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
  return value


def _nonnegative(text: str) -> int:
  value = int(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f"{value} is negative")
  return value


def _positive_float(text: str) -> float:
  value = float(text)
  if not value > 0 or value == float("inf"):
    raise argparse.ArgumentTypeError(f"{value} is not a positive finite number")
  return value


def _nonnegative_float(text: str) -> float:
  value = float(text)
  if not 0 <= value < float("inf"):
    raise argparse.ArgumentTypeError(f"{value} is not a finite number >= 0")
  return value


def _seed(text: str) -> int:
  from catjax.base.checks import check_seed
  value = int(text)
  try:
    check_seed("seed", value)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{value} is not a 64-bit seed (an integer in "
                                     "[-2**63, 2**63 - 1])") from None
  return value


def _bits(text: str) -> int | None:
  value = int(text)
  if value == 16:
    return None
  if not 2 <= value <= 8:
    raise argparse.ArgumentTypeError(f"{value} bits: expected 2..8, or 16 for no quantization")
  return value


def _ratio(text: str) -> float:
  value = float(text)
  if not 0.0 < value <= 1.0:
    raise argparse.ArgumentTypeError(f"{value} is not a ratio in (0, 1]")
  return value


def _csv(kind):
  def parse(text: str):
    try:
      return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError as e:
      raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
  return parse


# Recipe flags whose meaning a plan file takes over (each site's method, block, bits, formats).
PLAN_SETS = ("method", "block_size", "w_bits", "a_bits", "w_format", "a_format")


def _ptq_args(p: argparse.ArgumentParser, *, several: bool, plan: bool = False):
  from catjax.ptq.planner import DEFAULT_BITS, DEFAULT_BLOCK_SIZES, OBJECTIVES
  from catjax.ptq import rounding
  from catjax.app.specs import SPEC_OPTIONS, spec_grammar
  from catjax.ptq.configs import TrainConfig
  from catjax.ptq.recipe import PROPAGATE, Recipe
  _model_args(p)
  if plan:
    b = p.add_argument_group("budget and candidates")
    b.add_argument("--avg-w-bits", type=_positive_float, required=True,
                   help="average weight bits over all weight elements (FP4 counts its block "
                        "scale: MXFP4 4.25, NVFP4 4.5)")
    b.add_argument("--avg-a-bits", type=_positive_float, required=True,
                   help="average activation bits over the elements the linears read")
    b.add_argument("--max-transform-flops", type=float, default=None, metavar="R",
                   help="online transforms' multiply-adds at most R times the linears' "
                        "(default: no limit; the plan reports its ratio)")
    b.add_argument("--bits", type=_csv(int), default=DEFAULT_BITS,
                   help="integer bit widths a site may take (default: "
                        f"{','.join(map(str, DEFAULT_BITS))})")
    b.add_argument("--formats", type=_csv(str), default=("int",),
                   help="number formats a site may take: int, mxfp4, nvfp4 (default: int)")
    b.add_argument("--objective", default="noise", choices=tuple(OBJECTIVES),
                   help="minimise the sum of 1/SQNR over sites (noise) or maximise the sum "
                        "of SQNR in dB (db) (default: %(default)s)")
    b.add_argument("--block-sizes", type=_csv(int), default=DEFAULT_BLOCK_SIZES,
                   help="CAT block sizes to consider; each site takes those dividing its "
                        "width (default: 32,64,128,192)")
  elif several:
    p.add_argument("--methods", default="fp,none,smoothquant,hadamard,cat,cat_full",
                   help=f"comma-separated method specs {spec_grammar()} ("
                        + "; ".join(f"{o}: {m}" for o, m in SPEC_OPTIONS)
                        + "), e.g. none@w6a6, hadamard@gptq, cat@gptq@t200 or cat@mxfp4; "
                          "options override the flags below (default: %(default)s)")
  q = p.add_argument_group("recipe" if not plan else "base recipe (what the plan leaves)")
  if not several and not plan:
    from catjax.ptq.recipe import ptq_methods
    q.add_argument("--method", default=Recipe.method, choices=ptq_methods(),
                   help="(default: %(default)s)")
  if not plan:
    q.add_argument("--block-size", type=_positive, default=Recipe.block_size,
                   help="block size k of 'cat'; must divide every site width "
                        "(default: %(default)s)")
    q.add_argument("--w-bits", type=_bits, default=4, help="weight bits, 2..8 or 16 (default: 4)")
    q.add_argument("--a-bits", type=_bits, default=4,
                   help="activation bits, 2..8 or 16 (default: 4)")
    from catjax.core.quant import FORMATS
    q.add_argument("--w-format", default="int", choices=FORMATS,
                   help="weight number format: integers, or E2M1 with a scale per 32 (mxfp4) / "
                        "16 (nvfp4) input channels, 4 bits (default: %(default)s)")
    q.add_argument("--a-format", default="int", choices=FORMATS,
                   help="activation number format, as --w-format (default: %(default)s)")
  q.add_argument("--kv-bits", type=_bits, default=None,
                 help="KV-cache bits, 2..8 (default: 16, not quantized)")
  q.add_argument("--a-clip", type=_ratio, default=1.0,
                 help="activation clip ratio (default: %(default)s)")
  q.add_argument("--weights", default=Recipe.weights, choices=tuple(rounding.REGISTRY),
                 help="weight rounding: " + "; ".join(
                     f"{m.name}: {m.summary}" for m in rounding.REGISTRY.values())
                 + " (default: %(default)s)")
  q.add_argument("--train-steps", type=_nonnegative, default=TrainConfig.steps,
                 help="trained CAT: AdamW steps per block on the block's output error "
                      "(default: 0, closed form)")
  q.add_argument("--train-lr", type=_positive_float, default=TrainConfig.lr,
                 help="trained CAT peak learning rate, cosine decay (default: %(default)s)")
  q.add_argument("--propagate", default=Recipe.propagate, choices=PROPAGATE,
                 help="what each block's successor sees during quantization: the quantized or "
                      "the full-precision outputs; auto = quantized for GPTQ and trained "
                      "recipes (default: %(default)s)")
  q.add_argument("--seed", type=_seed, default=0, help="Hadamard sign seed (default: %(default)s)")
  p.set_defaults(recipe_defaults={a.option_strings[0]: (a.dest, a.default)
                                  for a in q._group_actions})
  d = p.add_argument_group("data")
  d.add_argument("--calib-windows", type=_positive, default=None,
                 help="calibration windows (default: 32, or those of --load-stats)")
  d.add_argument("--calib-seqlen", type=_positive, default=None,
                 help="calibration window length (default: --seqlen, or that of --load-stats)")
  d.add_argument("--report-windows", type=_positive, default=2,
                 help="held-out calibration windows for the per-site SQNR (default: %(default)s)")
  d.add_argument("--calib-text", default=None,
                 help="wiki-calib (default, or that of --load-stats), wiki-eval, brown, or a "
                      "text file")
  d.add_argument("--seqlen", type=_positive, default=512,
                 help="evaluation window length (default: %(default)s)")
  d.add_argument("--eval-max-tokens", type=_positive, default=16384,
                 help="evaluation token budget (default: %(default)s)")
  d.add_argument("--eval-text", default="wiki-eval",
                 help="wiki-eval (default), wiki-calib, brown, or a text file")
  d.add_argument("--batch-size", type=_positive, default=1,
                 help="windows per step (default: %(default)s)")
  o = p.add_argument_group("statistics and output")
  o.add_argument("--save-stats", type=Path,
                 help="save the calibration statistics (.npz; the upper triangle of d×d per "
                      "site and layer: about 190 MiB for SmolLM2-135M, 15 GiB for an 8B model)")
  o.add_argument("--load-stats", type=Path,
                 help="reuse statistics saved from this same model instead of calibrating")
  if plan:
    o.add_argument("--json", type=Path, required=True,
                   help="write the plan here (what quantize --plan reads), its table as .md "
                        "beside it")
  else:
    o.add_argument("--json", type=Path,
                   help="write the report here, with .md, .sqnr.png and .decomposition.png "
                        "beside it")
  o.add_argument("--no-progress", action="store_true", help="no progress bars")
  if not several and not plan:
    o.add_argument("--save", type=Path, metavar="DIR",
                   help="write the real quantized model (integer weights, transforms, "
                        "tokenizer) to the new folder DIR; needs --w-bits and --a-bits")
    o.add_argument("--plan", type=Path, metavar="FILE",
                   help="quantize each site as the plan FILE (from catjax plan) says; the "
                        "file carries the base recipe too, so --method, --block-size, bits, "
                        "formats and the other recipe flags are not taken with it")


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

  gen = sub.add_parser("generate", help="continue a prompt (greedy or sampled), streaming")
  _model_args(gen)
  gen.add_argument("--prompt", required=True, help="text to continue")
  gen.add_argument("--max-new-tokens", type=_positive, default=32,
                   help="stop after this many new tokens, or at the end-of-text token "
                        "(default: %(default)s)")
  gen.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's chat template")
  gen.add_argument("--temperature", type=_nonnegative_float, default=0.0,
                   help="sampling temperature; 0 is greedy (default: %(default)s)")
  gen.add_argument("--top-p", type=_ratio, default=1.0,
                   help="nucleus sampling: keep the most likely tokens up to this probability "
                        "mass (default: %(default)s)")
  gen.add_argument("--seed", type=_seed, default=0, help="sampling seed (default: %(default)s)")
  gen.add_argument("--json", type=Path, help="write prompt, completion and token ids here")

  qz = sub.add_parser("quantize", help="calibrate, quantize with one recipe, evaluate, report")
  _ptq_args(qz, several=False)
  cmp = sub.add_parser("compare", help="several methods on one calibration, side by side")
  _ptq_args(cmp, several=True)
  pl = sub.add_parser("plan", help="choose transform, block size and bits per site under "
                                   "bit and transform-cost budgets (for quantize --plan)")
  _ptq_args(pl, several=False, plan=True)
  return parser


def _base_recipe(args):
  from catjax.ptq.configs import TrainConfig
  from catjax.ptq.recipe import Recipe
  kw = {k: getattr(args, k) for k in PLAN_SETS[1:] if hasattr(args, k)}
  return Recipe(method="fp", **kw, kv_bits=args.kv_bits, a_clip=args.a_clip,
                weights=args.weights, train=TrainConfig(steps=args.train_steps, lr=args.train_lr),
                propagate=args.propagate, seed=args.seed)


def _run_config(args, specs: list[str], recipes=None):
  from catjax.app.pipeline import RunConfig
  from catjax.app.specs import parse_spec
  if recipes is None:
    base = _base_recipe(args)
    recipes = tuple(parse_spec(s, base) for s in specs)
  return RunConfig(recipes=recipes, model=args.model, dtype=args.dtype,
                   save=getattr(args, "save", None),
                   calib_text=args.calib_text, calib_windows=args.calib_windows,
                   calib_seqlen=args.calib_seqlen, report_windows=args.report_windows,
                   eval_text=args.eval_text, seqlen=args.seqlen,
                   eval_max_tokens=args.eval_max_tokens, batch_size=args.batch_size,
                   mesh=args.mesh,
                   stats_in=args.load_stats, stats_out=args.save_stats,
                   progress=not args.no_progress)


def _print_tables(report) -> None:
  from catjax.app.tables import comparison_markdown
  from catjax.app.pipeline import comparisons_markdown, has_gains
  print(comparison_markdown(report.summary))
  if has_gains(report.comparisons):
    print()
    print(comparisons_markdown(report.comparisons))


def _wrote(paths) -> None:
  print("wrote " + ", ".join(str(p) for p in paths))


def _ptq(args, specs: list[str], *, head: bool = False, recipes=None) -> dict:
  from catjax.app.pipeline import check_outputs, run, write_outputs
  cfg = _run_config(args, specs, recipes)  # bad specs fail here, before any work
  if args.json:
    check_outputs(args.json)
  report = run(cfg)
  _print_tables(report)
  method = report.methods[0]
  extra = {"perplexity": method.perplexity,
           "sites": [r.to_dict() for r in method.sites]} if head else {}
  if args.json:
    _wrote(write_outputs(report, args.json, extra=extra))
  return {**extra, **report.to_dict()}


def _quantize(args) -> dict:
  if args.plan is None:
    return _ptq(args, [args.method], head=True)
  from catjax.ptq.plan import Plan
  for flag, (dest, default) in args.recipe_defaults.items():
    if getattr(args, dest) != default:
      raise ValueError(f"{flag} is not taken with --plan {args.plan}: the "
                       "plan sets each site's method, block size, bits and formats, and its "
                       "base recipe the rest (give recipe flags to catjax plan instead)")
  return _ptq(args, [], head=True, recipes=(Plan.load(args.plan),))


def _plan(args) -> dict:
  from catjax.base.errors import check_writable, write_text
  from catjax.app.pipeline import make_plan
  from catjax.ptq.planner import Budget
  from catjax.app.tables import plan_table
  md = args.json.with_suffix(".md")
  for path in (args.json, md):
    check_writable(path, what="--json")
  budget = Budget(args.avg_w_bits, args.avg_a_bits, args.max_transform_flops)
  cfg = _run_config(args, [], recipes=(_base_recipe(args),))
  plan, calib = make_plan(cfg, budget, bits=args.bits, formats=args.formats,
                          block_sizes=args.block_sizes, objective=args.objective)
  plan = type(plan)(plan.sites, plan.base, {**plan.info, "model": args.model,
                                             "calibration": calib})
  i = plan.info
  head = (f"plan for {args.model}: average weight bits {i['avg_w_bits']:.3f}, activation bits "
          f"{i['avg_a_bits']:.3f}, transform flops {100 * i['transform_flops_ratio']:.2f}% of "
          f"the linears'")
  table = plan_table(plan)
  print(head)
  print(table)
  plan.save(args.json)
  _wrote([args.json, write_text(md, f"{head}\n\n{table}\n")])
  return plan.to_dict()


def _compare(args) -> dict:
  return _ptq(args, [s for s in args.methods.split(",") if s.strip()])


def _eval(args) -> dict:
  from catjax.app.runnable import load_runnable
  from catjax.app.data import text_windows
  from catjax.analysis.evaluate import perplexity
  from catjax.models.sharding import default_mesh
  mesh = default_mesh(args.mesh)  # a bad --mesh fails before the model loads
  r = load_runnable(args.model, dtype=args.dtype, mesh=mesh)
  windows = text_windows(r.tokenizer, args.eval_text, seqlen=args.seqlen,
                         max_tokens=args.max_tokens,
                         max_positions=r.model.config.max_position_embeddings)
  result = perplexity(r.model, windows.tokens, batch_size=args.batch_size, model_name=args.model,
                      data_name=args.eval_text, progress=not args.no_progress, mesh=mesh,
                      hook=r.hook, hook_state=r.hook_state)
  report = {**result.to_dict(), "model_path": str(r.path)}
  print(f"perplexity {result.perplexity:.4f}  ({args.model}, {args.eval_text}, "
        f"seqlen {result.seqlen}, {result.windows} windows, {result.tokens} tokens, "
        f"{result.dtype}, {result.tokens_per_second:.0f} tok/s)")
  return report


def _generate(args) -> dict:
  from catjax.app.runnable import load_runnable
  from catjax.models import generate
  r = load_runnable(args.model, dtype=args.dtype)
  tokenizer = r.tokenizer
  if args.chat:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                           add_generation_prompt=True, tokenize=False)
  else:
    prompt = args.prompt
  ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
  if not args.chat:
    print(args.prompt, end="", flush=True)
  new, shown = [], ""

  def stream(token):  # print what the decoded text gained (whole characters only)
    nonlocal shown
    new.append(token)
    text = tokenizer.decode(new, skip_special_tokens=True)
    if not text.endswith("\ufffd"):
      print(text[len(shown):], end="", flush=True)
      shown = text

  generate(r.model, ids, max_new_tokens=args.max_new_tokens, hook=r.hook,
           hook_state=r.hook_state, eos_token_id=r.model.config.eos_token_id,
           temperature=args.temperature, top_p=args.top_p, seed=args.seed, on_token=stream)
  text = tokenizer.decode(new, skip_special_tokens=True)
  print(text[len(shown):], flush=True)
  return {"prompt": args.prompt, "completion": text, "tokens": new}


def _distributed(args) -> None:
  given = [getattr(args, k, None) is not None for k in ("coordinator", "num_processes", "process_id")]
  if not any(given):
    return
  if not all(given):
    raise ValueError("--coordinator, --num-processes and --process-id go together")
  if args.process_id >= args.num_processes:
    raise ValueError(f"--process-id {args.process_id} is not below --num-processes "
                     f"{args.num_processes}")
  from catjax.models.sharding import initialize_distributed
  initialize_distributed(args.coordinator, num_processes=args.num_processes,
                         process_id=args.process_id)


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
    text = f"{e.filename}: {text}"
  return text


def main(argv: list[str] | None = None) -> int:
  """Run the command line; returns the exit status: 0, or 2 on a user error
  (bad flag, value, file or configuration, or a fit the data cannot take: one
  line on stderr naming it; the traceback with --debug), 130 on an interrupt. Other exceptions are bugs and
  keep their traceback."""
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
  quiet_backend_probe()
  from catjax.base.errors import check_writable, write_text
  try:
    if getattr(args, "json", None) and args.command in ("eval", "generate"):
      check_writable(args.json, what="--json")
    _distributed(args)
    report = {"eval": _eval, "generate": _generate, "quantize": _quantize,
              "compare": _compare, "plan": _plan}[args.command](args)
    if getattr(args, "json", None) and args.command in ("eval", "generate"):
      _wrote([write_text(args.json, json.dumps(report, indent=2) + "\n")])
  except (ValueError, OSError, FloatingPointError) as e:  # a fit that failed on the data
    if args.debug:
      raise
    print(f"catjax {args.command}: error: {_one_line(e)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    if args.debug:
      raise
    print(f"catjax {args.command}: interrupted (no partial output files were left)",
          file=sys.stderr)
    return 130
  return 0
