"""Layer-level benchmark of the SQNR decomposition and of the transforms' cost.

1. A synthetic 768->2048 layer with outlier channels misaligned with the
   weights: measured / predicted SQNR, C(x), C(W), alignment gain for every
   method at W4A4 and W6A6 (fit on 8192 tokens, measured on 8192 others).
2. Time to fit block CAT (k=128) for a 4096-wide layer, float64 and float32.
3. Fast Hadamard apply vs a dense matmul for (2048, 4096) and (2048, 11008).

    python benchmarks/layer_sqnr.py [--quick]
"""

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median_time, write  # noqa: E402

import catjax as cj  # noqa: E402
from catjax.core import hadamard, synthetic  # noqa: E402
from catjax.analysis import compare_methods, markdown_table  # noqa: E402


def layer_table(tokens: int):
  key = jax.random.PRNGKey(0)
  x, kernel = synthetic.synthetic_layer(key, tokens=2 * tokens, d_in=768, d_out=2048)
  results = compare_methods(x[:tokens], x[tokens:], kernel, key=key)
  return results, markdown_table(results)


def fit_time(d: int, repeats: int):
  key = jax.random.PRNGKey(1)
  x = jax.random.normal(key, (2 * d, d)) * jnp.linspace(0.1, 10, d)
  w = jax.random.normal(jax.random.PRNGKey(2), (d, d))
  sx, g = cj.second_moment(x), cj.weight_gram(w)
  out = {}
  for x64 in (True, False):
    def run():
      t = cj.fit_transform("cat", sx, g, block_size=128, x64=x64)
      jax.block_until_ready(t.blocks)
    out["float64" if x64 else "float32"] = median_time(run, repeats=repeats)
  return out


def hadamard_vs_dense(shape, repeats: int):
  n = shape[1]
  x = jax.random.normal(jax.random.PRNGKey(3), shape)
  h = jnp.asarray(hadamard.hadamard_matrix(n), jnp.float32)
  fast = jax.jit(cj.apply_hadamard)
  dense = jax.jit(lambda x, h: jnp.matmul(x, h.T, precision=jax.lax.Precision.HIGHEST))
  err = float(jnp.max(jnp.abs(fast(x) - dense(x, h))))
  t_fast = median_time(lambda: fast(x).block_until_ready(), repeats=repeats)
  t_dense = median_time(lambda: dense(x, h).block_until_ready(), repeats=repeats)
  return {"shape": list(shape), "factors": list(hadamard.hadamard_factors(n)), "fast_s": t_fast,
          "dense_s": t_dense, "speedup": t_dense / t_fast, "max_abs_diff": err}


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--quick", action="store_true", help="fewer tokens and repeats (smoke run)")
  args = p.parse_args()
  tokens, repeats = (2048, 2) if args.quick else (8192, 5)

  info = machine()
  print(info)
  results, table = layer_table(tokens)
  print(table)
  fits = fit_time(4096, repeats)
  print(f"\nblock CAT k=128 fit, d=4096: {fits}")
  had = [hadamard_vs_dense(s, repeats) for s in [(2048, 4096), (2048, 11008)]]
  for r in had:
    print(f"hadamard {r['shape']} factors {r['factors']}: fast {r['fast_s']*1e3:.1f} ms, "
          f"dense {r['dense_s']*1e3:.1f} ms, speedup {r['speedup']:.1f}x, max diff {r['max_abs_diff']:.1e}")

  md = [f"# Layer SQNR benchmark\n\nMachine: {info}\n",
        f"## Synthetic 768->2048 layer with outliers ({tokens} calibration + {tokens} held-out tokens)\n",
        table, "\n## Block CAT (k=128) fit time, d=4096 (median)\n",
        "| fit dtype | seconds |", "|---|---|"]
  md += [f"| {k} | {v:.3f} |" for k, v in fits.items()]
  md += ["\n## Fast Hadamard vs dense matmul (median, jitted, float32)\n",
         "| x shape | factors | fast ms | dense ms | speedup |", "|---|---|---|---|---|"]
  md += [f"| {tuple(r['shape'])} | {'x'.join(map(str, r['factors']))} | {r['fast_s']*1e3:.1f} | "
         f"{r['dense_s']*1e3:.1f} | {r['speedup']:.1f}x |" for r in had]
  payload = {
      "machine": info, "tokens": tokens,
      "layer": [{"method": r.label, "bits": r.bits, **r.terms.to_dict()} for r in results],
      "cat_fit_seconds_d4096_k128": fits, "hadamard": had,
  }
  write("layer_sqnr" + ("_quick" if args.quick else ""), payload, "\n".join(md))


if __name__ == "__main__":
  main()
