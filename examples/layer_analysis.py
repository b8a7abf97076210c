"""Why does a layer quantize badly, and what fixes it?

Builds a synthetic linear layer whose activations have outlier channels that
meet small weights (poor concentration *and* poor alignment), fits every
transform on calibration tokens, and prints the SQNR decomposition of
arXiv 2603.04359 on held-out tokens at W4A4 and W6A6.

    python examples/layer_analysis.py [--d-in 576] [--tokens 8192]
"""

import argparse

import jax

import catjax as cj
from catjax.analysis import compare_methods, markdown_table
from catjax.core import synthetic


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--d-in", type=int, default=576, help="input width (SmolLM2-135M hidden size)")
  p.add_argument("--d-out", type=int, default=1536)
  p.add_argument("--tokens", type=int, default=8192, help="calibration tokens (same again held out)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()

  key = jax.random.PRNGKey(args.seed)
  x, kernel = synthetic.synthetic_layer(key, tokens=2 * args.tokens, d_in=args.d_in, d_out=args.d_out)
  x_calib, x_eval = x[: args.tokens], x[args.tokens:]

  plain = cj.sqnr_decomposition(x_eval, kernel)
  print(f"layer {args.d_in}->{args.d_out}, {args.tokens} calibration + {args.tokens} held-out tokens")
  print(f"no transform, W4A4: measured {plain.measured_sqnr_db:.2f} dB, predicted {plain.predicted_sqnr_db:.2f} dB")
  a_star = cj.optimal_alignment(cj.second_moment(x_calib), cj.weight_gram(kernel))
  print(f"best reachable alignment gain d·A* = {10 * jax.numpy.log10(args.d_in * a_star):.2f} dB\n")
  print(markdown_table(compare_methods(x_calib, x_eval, kernel, key=key)))


if __name__ == "__main__":
  main()
