"""Real (integer) quantized SmolLM2-135M vs its fake-quantized twin, and where CAT's
Hadamard goes: full width (online, before the kernel) or folded into the blocks.

For each recipe: per-site SQNR (2 held-out calibration windows), perplexity of
the fake-quantized model and of the real one (`QLinear`: packed int4 weights,
`catjax.kernels.quantized_matmul`, here the jnp reference with XLA's int8 dot
on CPU), and the bytes of the block linears vs bfloat16.

Are real and fake equal up to float rounding? Two checks: (1) every site's
first linear, fed the same full-precision inputs (held-out window, every
layer), computed both ways: the largest relative output difference; (2) how
far float-rounding-sized noise alone moves perplexity: both models are also
run with the embedding table scaled by `1 + j·2^-21` (`--perturbations`, the
j ≠ 0), and the two ensembles' means are compared (difference ± standard
error).

    python benchmarks/real_quantized.py [--calib-windows 32] [--eval-max-tokens 8192]
"""

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write  # noqa: E402

from catjax.app import load_pretrained, parse_spec, text_windows  # noqa: E402
from catjax.analysis import perplexity, site_report  # noqa: E402
from catjax.kernels import QuantizedWeight, quantized_matmul  # noqa: E402
from catjax.models import LLAMA, capture, get_path  # noqa: E402
from catjax.ptq import calibrate, linear_bytes, quantize_model, realize  # noqa: E402


def _layer(tree, l):
  return None if tree is None else jax.tree.map(lambda a: a[l], tree)


def site_differences(qm, real, acts) -> dict[str, float]:
  """Largest `‖y_real - y_fake‖ / ‖y_fake‖` over layers, per site (its first linear)."""
  out = {}
  for site in LLAMA.sites:
    fake_lin, q = (get_path(m.model.layers, site.linears[0]) for m in (qm, real))
    site = site.name
    worst = 0.0
    for l in range(acts[site].shape[0]):
      x = acts[site][l]
      # Each model's own site hook: fake = transform + fake-quant, real = transform only.
      t = _layer(None if qm.transforms is None else qm.transforms[site], l)
      y_fake = qm.hook(site, x, t)[0] @ fake_lin.kernel[...][l]
      online = _layer(None if real.transforms is None else real.transforms.get(site), l)
      y_real = quantized_matmul(
          real.hook(site, x, online)[0], None if q.blocks is None else q.blocks[...][l],
          QuantizedWeight(q.values[...][l], q.scale[...][l], q.bits, q.shape),
          a_bits=q.a_bits, a_clip=q.a_clip)
      worst = max(worst, float(np.linalg.norm(y_real - y_fake) / np.linalg.norm(y_fake)))
    out[site] = worst
  return out


def embed_scaled(model, factor: float):
  """A copy of `model` with its (tied) embedding table times `factor`."""
  copy = nnx.clone(model)
  copy.embed = nnx.Param(copy.embed[...] * factor)
  return copy


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--calib-windows", type=int, default=32)
  p.add_argument("--eval-max-tokens", type=int, default=8192)
  p.add_argument("--specs", default="cat,cat@bh")
  p.add_argument("--perturbations", default="-3,-2,-1,1,2,3",
                 help="j values: also run both models with embeddings × (1 + j·2^-21); empty to skip")
  args = p.parse_args()
  steps = [int(j) for j in args.perturbations.split(",") if j.strip()]
  model, tok, _ = load_pretrained("smollm2-135m")
  calib = text_windows(tok, "wiki-calib", seqlen=512,
                       max_tokens=(args.calib_windows + 2) * 512).tokens
  evalw = text_windows(tok, "wiki-eval", seqlen=512, max_tokens=args.eval_max_tokens)
  t0 = time.perf_counter()
  stats = calibrate(model, calib[:args.calib_windows])
  calib_s = time.perf_counter() - t0
  bf16_bytes = linear_bytes(model) // 2  # float32 model -> bfloat16 bytes
  acts = {site: a[:, 0] for site, a in capture(model, calib[args.calib_windows:][:1]).items()}
  rows = []
  for spec in args.specs.split(","):
    qm = quantize_model(model, None, parse_spec(spec), stats=stats)
    sites = site_report(model, qm, calib[args.calib_windows:])
    real = realize(model, qm)
    runs = {}
    for kind, m in (("fake", qm), ("real", real)):
      base = perplexity(m.model, evalw.tokens, hook=m.hook, hook_state=m.transforms,
                        model_name=f"{qm.recipe.label} {kind}")
      nudged = [perplexity(embed_scaled(m.model, 1 + j * 2.0**-21), evalw.tokens, hook=m.hook,
                           hook_state=m.transforms, model_name=f"{qm.recipe.label} {kind} j={j}",
                           progress=False).perplexity for j in steps]
      runs[kind] = (base, [base.perplexity] + nudged)
    (fake, fake_all), (got, real_all) = runs["fake"], runs["real"]
    se = float(np.sqrt(np.var(fake_all, ddof=1) / len(fake_all)
                       + np.var(real_all, ddof=1) / len(real_all))) if steps else None
    rows.append({"method": qm.recipe.label,
                 "site_max_rel_diff": site_differences(qm, real, acts),
                 "mean_sqnr_db": float(np.mean([s.measured_sqnr_db for s in sites])),
                 "ppl_fake": fake.perplexity, "ppl_real": got.perplexity,
                 "rel_diff": got.perplexity / fake.perplexity - 1,
                 "perturbations_j": [0] + steps, "ppl_fake_perturbed": fake_all,
                 "ppl_real_perturbed": real_all,
                 "ensemble_mean_diff": float(np.mean(real_all) - np.mean(fake_all)),
                 "ensemble_mean_diff_se": se,
                 "fake_tok_s": fake.tokens_per_second, "real_tok_s": got.tokens_per_second,
                 "weight_bytes": linear_bytes(real.model), "bf16_bytes": bf16_bytes,
                 "ratio_vs_bf16": bf16_bytes / linear_bytes(real.model)})
    print(rows[-1], flush=True)
  head = ["method", "mean site SQNR dB", "max site rel. diff", "ppl fake-quant", "ppl real int",
          "rel. diff", "fake, all j: mean ± sd", "real, all j: mean ± sd", "real − fake (± se)",
          "tok/s fake", "tok/s real", "linear weights MB (bf16 MB)", "bf16 / int"]
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for r in rows:
    ens = ["–"] * 3 if len(r["perturbations_j"]) < 2 else [
        f"{np.mean(r['ppl_fake_perturbed']):.2f} ± {np.std(r['ppl_fake_perturbed'], ddof=1):.2f}",
        f"{np.mean(r['ppl_real_perturbed']):.2f} ± {np.std(r['ppl_real_perturbed'], ddof=1):.2f}",
        f"{r['ensemble_mean_diff']:+.2f} ± {r['ensemble_mean_diff_se']:.2f}"]
    lines.append(f"| {r['method']} | {r['mean_sqnr_db']:.2f} | "
                 f"{max(r['site_max_rel_diff'].values()):.1e} | {r['ppl_fake']:.3f} | "
                 f"{r['ppl_real']:.3f} | {r['rel_diff']:+.1%} | " + " | ".join(ens) + " | "
                 f"{r['fake_tok_s']:.0f} | {r['real_tok_s']:.0f} | "
                 f"{r['weight_bytes'] / 1e6:.1f} ({r['bf16_bytes'] / 1e6:.1f}) "
                 f"| {r['ratio_vs_bf16']:.2f}× |")
  info = machine()
  md = (f"SmolLM2-135M, calibration {args.calib_windows} × 512 tokens of wiki-calib "
        f"({calib_s:.0f} s), evaluation {evalw.to_dict()['tokens']} tokens of wiki-eval at "
        f"seqlen 512; {info['processor']}, {info['cpu_count']} cores, jax {info['jax']}.\n\n"
        + "\n".join(lines))
  print(md)
  write("real_quantized", {"machine": info, "calibration_seconds": calib_s,
                           "evaluation": evalw.to_dict(), "rows": rows}, md)


if __name__ == "__main__":
  main()
