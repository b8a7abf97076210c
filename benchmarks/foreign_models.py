"""SmolLM2-135M as catjax's own decoder and as tunix's `Llama3` (a foreign NNX model,
through `catjax.quantize` and its rules), side by side in one harness.

Same calibration windows (default 32 × 512 of the Wikipedia calibration split) and
eval windows (16,384 tokens of the eval split) for both; per method: perplexity,
mean measured site SQNR (site reports on the first `--report-windows` eval
windows), quantize seconds, and the quantized forward's time on one batch (median
of 5: the rule path's linears against catjax's own site hook). GPTQ walks the
blocks on quantized inputs on both (`propagate="auto"`; the rule path with
`blocks=r"layers/\d+"`); closed forms calibrate the foreign model at once. Needs
google-tunix (scripts/test.sh sets up `.venv-tunix`). Writes
`results/foreign_models.{json,md}`.

    .venv-tunix/bin/python benchmarks/foreign_models.py [--calib-windows 32]
        [--eval-max-tokens 16384] [--report-windows 4]
        [--methods fp,hadamard,cat@k64,cat@k64@gptq,cat_full]
"""

import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median_time, smollm2_parser, write  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import catjax as cj  # noqa: E402
from catjax.analysis import foreign_site_report, site_report, token_nll, window_nll  # noqa: E402
from catjax.app import load_pretrained, parse_spec, text_windows  # noqa: E402
from catjax.models import capture, save_hf  # noqa: E402
from catjax.models import tunix as tx  # noqa: E402

METHODS = "fp,hadamard,cat@k64,cat@k64@gptq,cat_full"


def mean_sqnr(rows) -> float:
  return float(np.mean([r.measured_sqnr_db for r in rows]))


def main() -> None:
  p = smollm2_parser(__doc__.split("\n")[0])
  p.add_argument("--methods", default=METHODS)
  p.add_argument("--report-windows", type=int, default=4)
  p.set_defaults(calib_windows=32, eval_max_tokens=16384)
  args = p.parse_args()
  model, tokenizer, _ = load_pretrained(args.model)
  folder = Path(tempfile.mkdtemp()) / "hf"
  save_hf(model, folder, tokenizer=tokenizer)
  foreign = tx.load_tunix(folder)
  calib = text_windows(tokenizer, "wiki-calib", seqlen=args.seqlen,
                       max_tokens=args.calib_windows * args.seqlen).tokens
  evals = text_windows(tokenizer, "wiki-eval", seqlen=args.seqlen,
                       max_tokens=args.eval_max_tokens).tokens
  batch = evals[:args.batch_size]
  report = evals[:args.report_windows]
  own_acts = capture(model, report)
  foreign_nll = nnx.jit(lambda m, t: token_nll(tx.forward(m, t), t).sum(-1))

  def nll_ppl(nll):  # perplexity over the eval windows of `nll(tokens) -> (B,)` summed NLLs
    total = sum(float(np.asarray(nll(evals[i:i + args.batch_size])).sum())
                for i in range(0, len(evals), args.batch_size))
    return math.exp(total / (evals.shape[0] * (evals.shape[1] - 1)))

  rows = []
  for spec in args.methods.split(","):
    recipe = parse_spec(spec)
    row = {"method": recipe.label}
    t0 = time.perf_counter()
    qo = cj.quantize_model(model, calib, recipe, batch_size=args.batch_size, progress=False)
    row["own_quantize_s"] = time.perf_counter() - t0
    own_nll = window_nll(qo.model, hook=qo.hook, hook_state=qo.transforms)
    row["own_ppl"] = nll_ppl(own_nll)
    row["own_forward_s"] = median_time(lambda: jax.block_until_ready(own_nll(batch)))
    if recipe.quantized:
      row["own_site_sqnr_db"] = mean_sqnr(site_report(model, qo, report, acts=own_acts))
    if recipe.quantized:
      # The chaos band: the same recipe on the calibration windows in reverse order
      # (the same statistics up to float rounding; GPTQ's Hessians too).
      qr = cj.quantize_model(model, calib[::-1], recipe, batch_size=args.batch_size, progress=False)
      row["own_ppl_reordered"] = nll_ppl(window_nll(qr.model, hook=qr.hook, hook_state=qr.transforms))
    t0 = time.perf_counter()
    qf = foreign if recipe.method == "fp" else cj.quantize(
        foreign, cj.Rule(r"layers/\d+/.*", recipe),
        [calib[i:i + 1] for i in range(len(calib))], forward=tx.forward,
        blocks=r"layers/\d+" if recipe.propagates_quantized else None, progress=False)
    row["foreign_quantize_s"] = time.perf_counter() - t0
    row["foreign_ppl"] = nll_ppl(lambda t: foreign_nll(qf, t))
    row["foreign_forward_s"] = median_time(lambda: jax.block_until_ready(foreign_nll(qf, batch)))
    if recipe.quantized:
      row["foreign_site_sqnr_db"] = mean_sqnr(foreign_site_report(
          foreign, qf, [report[i:i + 1] for i in range(len(report))], forward=tx.forward))
    rows.append(row)
    print(row, flush=True)

  fp = next((r for r in rows if r["method"] == "fp"), None)
  head = ("| method | own ppl | own ppl, calibration reversed | tunix ppl | own site SQNR dB | "
          "tunix site SQNR dB | own quantize s | tunix quantize s | own forward s | "
          "tunix forward s | tunix / own | tunix / tunix fp |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")
  lines = [f"| {r['method']} | {r['own_ppl']:.3f} | "
           + (f"{r['own_ppl_reordered']:.3f}" if "own_ppl_reordered" in r else "")
           + f" | {r['foreign_ppl']:.3f} | "
           + (f"{r['own_site_sqnr_db']:.2f} | {r['foreign_site_sqnr_db']:.2f}" if "own_site_sqnr_db" in r
              else " | ")
           + f" | {r['own_quantize_s']:.0f} | {r['foreign_quantize_s']:.0f} | "
           f"{r['own_forward_s']:.2f} | {r['foreign_forward_s']:.2f} | "
           f"{r['foreign_forward_s'] / r['own_forward_s']:.2f} | "
           + (f"{r['foreign_forward_s'] / fp['foreign_forward_s']:.2f}" if fp else "") + " |"
           for r in rows]
  note = (f"SmolLM2-135M, calibration {calib.shape[0]} × {calib.shape[1]}, eval {evals.size} tokens "
          f"(seqlen {args.seqlen}); site SQNR = mean measured SQNR over the {len(report)} first eval "
          f"windows' sites; forward = one batch of {len(batch)} windows, median of 5; "
          f"{machine()['processor']}, {machine()['cpu_count']} cores, jax {jax.__version__}.")
  md = "\n".join([head, *lines, "", note])
  print(md)
  write("foreign_models", {"machine": machine(), "args": vars(args), "rows": rows}, md)


if __name__ == "__main__":
  main()
