"""How a W4A4 model amplifies float-rounding-sized changes of its input.

The fake-quantized SmolLM2-135M is run on one eval window twice: as is and
with its embedding table scaled by `1 + 2^-21` (what float rounding could do).
For every layer and site it reports `‖x' - x‖ / ‖x‖` of the site inputs
(before the online transform and quantization) and the mean change of the
per-token NLL. The full-precision model is run the same way for contrast.
This is why real (integer) and fake-quantized perplexities, equal per site to
float rounding, still differ by about a percent (benchmarks/real_quantized.py).

    python benchmarks/rounding_sensitivity.py [--spec cat] [--calib-windows 32]
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write  # noqa: E402
from real_quantized import embed_scaled  # noqa: E402

from catjax.app import load_pretrained, parse_spec, text_windows  # noqa: E402
from catjax.analysis import token_nll  # noqa: E402
from catjax.models import SITES, forward  # noqa: E402
from catjax.ptq import SiteHook, quantize_model  # noqa: E402


@dataclasses.dataclass(frozen=True)
class RecordingHook(SiteHook):
  """`SiteHook` that also returns each site's input."""

  def __call__(self, site, x, transform):
    return SiteHook.__call__(self, site, x, transform)[0], x


def _run(model, tokens, hook, state):
  logits, inputs = forward(model, tokens, hook=hook, hook_state=state)
  return inputs, np.asarray(token_nll(logits, tokens)[0])


def divergence(model, tokens, hook, state, factor):
  """Per-site, per-layer relative change of the site inputs, and NLL change."""
  base, nll0 = _run(model, tokens, hook, state)
  moved, nll1 = _run(embed_scaled(model, factor), tokens, hook, state)
  rel = {s: [float(jnp.linalg.norm(moved[s][l] - base[s][l]) / jnp.linalg.norm(base[s][l]))
             for l in range(base[s].shape[0])] for s in SITES}
  return rel, float(np.mean(nll1 - nll0)), float(np.mean(np.abs(nll1 - nll0)))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--spec", default="cat")
  p.add_argument("--calib-windows", type=int, default=32)
  args = p.parse_args()
  model, tok, _ = load_pretrained("smollm2-135m")
  calib = text_windows(tok, "wiki-calib", seqlen=512, max_tokens=args.calib_windows * 512).tokens
  tokens = jnp.asarray(text_windows(tok, "wiki-eval", seqlen=512, max_tokens=512).tokens[:1])
  qm = quantize_model(model, calib, parse_spec(args.spec), batch_size=4)
  factor = 1 + 2.0**-21
  runs = {"fp": divergence(model, tokens, RecordingHook(), None, factor),
          qm.recipe.label: divergence(qm.model, tokens, RecordingHook(qm.hook.configs),
                                      qm.transforms, factor)}
  layers = len(runs["fp"][0]["attn_in"])
  shown = sorted({0, 1, 2, 3, 5, 10, 20, layers - 1})
  head = ["model", "mean ΔNLL", "mean abs ΔNLL"] + [f"layer {l}" for l in shown]
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for name, (rel, d_nll, abs_nll) in runs.items():
    lines.append(f"| {name} | {d_nll:+.4f} | {abs_nll:.4f} | "
                 + " | ".join(f"{max(rel[s][l] for s in SITES):.1e}" for l in shown) + " |")
  info = machine()
  md = (f"SmolLM2-135M, one 512-token wiki-eval window, embedding table × (1 + 2⁻²¹); "
        f"cells: largest relative change of a site input (attn_in, o_in, mlp_in, down_in) "
        f"in that layer. Calibration {args.calib_windows} × 512 tokens; {info['processor']}, "
        f"{info['cpu_count']} cores, jax {info['jax']}.\n\n" + "\n".join(lines))
  print(md)
  write("rounding_sensitivity", {"machine": info, "factor": factor, "runs": {
      name: {"site_rel_change": rel, "mean_nll_change": d, "mean_abs_nll_change": a}
      for name, (rel, d, a) in runs.items()}}, md)


if __name__ == "__main__":
  main()
