"""SmolLM2-135M as tunix's `Llama3`, W4A4 through qwix: catjax's weights exported into
the model `qwix.quantize_model` makes (fake-quantized inputs, and integer inputs: qwix's
products then multiply int4 codes), and qwix's own calibrate → fit → quantize order
with catjax's providers, beside `catjax.quantize` on the same windows.

Per row: perplexity on the eval windows (catjax.quantize on the calibration windows in
reverse order gives the chaos band: the same statistics up to float rounding), quantize seconds and the forward's time on one
batch (median of 5, under `nnx.jit`). Needs google-tunix (it brings qwix; scripts/test.sh
sets up `.venv-tunix`). Writes `results/qwix_interop.{json,md}`.

    .venv-tunix/bin/python benchmarks/qwix_interop.py [--calib-windows 8]
        [--eval-max-tokens 4096] [--method cat@k64]
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
import qwix  # noqa: E402
from flax import nnx  # noqa: E402

import catjax as cj  # noqa: E402
from catjax.analysis import token_nll  # noqa: E402
from catjax.app import load_pretrained, parse_spec, text_windows  # noqa: E402
from catjax.models import save_hf  # noqa: E402
from catjax.models import tunix as tx  # noqa: E402
from catjax.ptq import qwix_interop as cq  # noqa: E402


def main() -> None:
  p = smollm2_parser(__doc__.split("\n")[0])
  p.add_argument("--method", default="cat@k64")
  args = p.parse_args()
  model, tokenizer, _ = load_pretrained(args.model)
  folder = Path(tempfile.mkdtemp()) / "hf"
  save_hf(model, folder, tokenizer=tokenizer)
  foreign = tx.load_tunix(folder)
  del model
  calib = text_windows(tokenizer, "wiki-calib", seqlen=args.seqlen,
                       max_tokens=args.calib_windows * args.seqlen).tokens
  evals = text_windows(tokenizer, "wiki-eval", seqlen=args.seqlen,
                       max_tokens=args.eval_max_tokens).tokens
  batches = [calib[i:i + 1] for i in range(len(calib))]
  recipe = parse_spec(args.method)
  rules = [cj.Rule(r"layers/\d+/.*", recipe)]
  nll = nnx.jit(lambda m, t: token_nll(tx.forward(m, t), t).sum(-1))
  batch = evals[:args.batch_size]

  def ppl(m):
    total = sum(float(np.asarray(nll(m, evals[i:i + args.batch_size])).sum())
                for i in range(0, len(evals), args.batch_size))
    return math.exp(total / (evals.shape[0] * (evals.shape[1] - 1)))

  rows = []

  def row(name, m, seconds):
    r = {"model": name, "ppl": ppl(m), "quantize_s": seconds,
         "forward_s": median_time(lambda: jax.block_until_ready(nll(m, batch)))}
    rows.append(r)
    print(r, flush=True)

  row("fp (tunix)", foreign, 0.0)
  t0 = time.perf_counter()
  ours = cj.quantize(foreign, rules, batches, forward=tx.forward, progress=False)
  row("catjax.quantize", ours, time.perf_counter() - t0)
  # The chaos band of W4A4 rounding: the same statistics up to float rounding.
  t0 = time.perf_counter()
  row("catjax.quantize, calibration reversed",
      cj.quantize(foreign, rules, batches[::-1], forward=tx.forward, progress=False),
      time.perf_counter() - t0)
  for integer in (False, True):
    t0 = time.perf_counter()
    theirs = cq.export(ours, qwix.quantize_model(
        foreign, cq.CatPtqProvider(rules, integer=integer), *tx.call_args(calib[:1])))
    row(f"export → qwix, {'integer' if integer else 'fake-quantized'} inputs", theirs,
        time.perf_counter() - t0)
  t0 = time.perf_counter()
  provider = cq.CatCalibrationProvider(rules)
  calibrated = qwix.quantize_model(foreign, provider, *tx.call_args(calib[:1]))
  run = nnx.jit(lambda m, *a: m(*a))
  for b in batches:
    run(calibrated, *tx.call_args(b))
  fitted = cq.fit(qwix.quantize_model(foreign, cq.CatPtqProvider(rules, integer=True),
                                      *tx.call_args(calib[:1])), foreign, calibrated, provider)
  row("qwix calibrate (jit) → fit → integer", fitted, time.perf_counter() - t0)

  head = ("| model | perplexity | quantize s | forward s |\n|---|---|---|---|")
  lines = [f"| {r['model']} | {r['ppl']:.3f} | {r['quantize_s']:.1f} | {r['forward_s']:.2f} |"
           for r in rows]
  note = (f"SmolLM2-135M as tunix's Llama3, {recipe.label}; calibration {calib.shape[0]} × "
          f"{calib.shape[1]}, eval {evals.size} tokens (seqlen {args.seqlen}); forward = one "
          f"batch of {len(batch)} windows, median of 5; {machine()['processor']}, "
          f"{machine()['cpu_count']} cores, jax {jax.__version__}, qwix {qwix.__version__}.")
  md = "\n".join([head, *lines, "", note])
  print(md)
  write("qwix_interop", {"machine": machine(), "args": vars(args), "rows": rows}, md)


if __name__ == "__main__":
  main()
