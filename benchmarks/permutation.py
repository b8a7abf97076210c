"""Block CAT with a channel permutation (`catjax.core.transforms.permutation`), measured
on a model's own statistics (SmolLM2-135M by default): the alignment gain `d · A` that
block CAT reaches with its channels as they are and with `coupling_permutation`'s
order, at k = 32, 64, 128 and 192 where k divides the site's width, against full
CAT's `d · A*`; mean over every block and site, in dB. Closed form
(`d · tr(Σ_x Σ_W) / S²`), no forward beyond the calibration. Writes
`results/permutation.{json,md}` (`permutation_<model>` for another `--model`; SmolLM2's
widths, 576 and 1536, do not divide by 128, Gemma 3 270M's 640, 1024 and 2048 do).

    python benchmarks/permutation.py [--model smollm2-135m] [--calib-windows 8]
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, smollm2_parser, write  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from catjax.app import load_pretrained, text_windows  # noqa: E402
from catjax.core import transforms  # noqa: E402
from catjax.models import spec_for  # noqa: E402
from catjax.ptq import calibrate, site_grams  # noqa: E402

perm_math = transforms.permutation

KS = (32, 64, 128, 192)


def main():
  args = smollm2_parser(__doc__.splitlines()[0]).parse_args()
  model, tokenizer, _ = load_pretrained(args.model)
  windows = text_windows(tokenizer, "wiki-calib", seqlen=args.seqlen,
                         max_tokens=args.calib_windows * args.seqlen).tokens
  stats = calibrate(model, windows, progress=False)
  layers = nnx.to_pure_dict(nnx.state(model.layers))
  grams = site_grams(layers, spec=spec_for(model.config))
  db = lambda v: 10 * np.log10(v)  # noqa: E731
  rows, seconds = {}, 0.0
  for site in sorted(grams):
    for layer in range(model.config.num_layers):
      sx = np.asarray(jax.device_get(stats[site].sigma[layer]), np.float64)
      sw = np.asarray(jax.device_get(grams[site][layer]), np.float64)
      d = sx.shape[0]
      full = db(perm_math.block_alignment_gain(sx, sw, d))
      for k in KS:
        if d % k:
          continue
        t0 = time.perf_counter()
        p = perm_math.coupling_permutation(sx, sw, k)
        seconds += time.perf_counter() - t0
        r = rows.setdefault((site, d, k), {"plain": [], "permuted": [], "full": [], "kept": 0})
        r["plain"].append(db(perm_math.block_alignment_gain(sx, sw, k)))
        r["permuted"].append(db(perm_math.block_alignment_gain(sx, sw, k, p)))
        r["full"].append(full)
        r["kept"] += int(np.array_equal(p, np.arange(d)))
  table = []
  for (site, d, k), r in rows.items():
    table.append({"site": site, "d": d, "k": k, "layers": len(r["plain"]),
                  **{m: float(np.mean(r[m])) for m in ("plain", "permuted", "full")},
                  "identity_kept": r["kept"]})
  lines = ["| site | d | k | block CAT d·A dB | permuted dB | full CAT d·A* dB | share of the gap closed | identity kept |",
           "|---|---|---|---|---|---|---|---|"]
  for t in table:
    gap = (t["permuted"] - t["plain"]) / max(t["full"] - t["plain"], 1e-12)
    lines.append(f"| {t['site']} | {t['d']} | {t['k']} | {t['plain']:.2f} | {t['permuted']:.2f} | "
                 f"{t['full']:.2f} | {100 * gap:.0f}% | {t['identity_kept']}/{t['layers']} |")
  note = (f"{args.model}, statistics of {windows.shape[0]} × {windows.shape[1]} calibration tokens "
          f"(wiki-calib); mean over the {model.config.num_layers} layers; permutation search "
          f"{seconds:.1f} s in all; {machine()['processor']}, {machine()['cpu_count']} cores.")
  md = "\n".join(lines) + "\n\n" + note
  print(md)
  name = "permutation" if args.model == "smollm2-135m" else f"permutation_{args.model}"
  write(name, {"model": args.model, "rows": table, "calib": list(windows.shape), "search_s": seconds,
                        "machine": machine()}, md)


if __name__ == "__main__":
  main()
