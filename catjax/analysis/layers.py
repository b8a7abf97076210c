"""Compare transforms on one linear layer: the SQNR decomposition per method.

Fits every method on calibration activations and measures on held-out ones,
so block sizes that overfit show it. Used by `examples/layer_analysis.py` and
`benchmarks/layer_sqnr.py`.
"""

from __future__ import annotations

import dataclasses

import jax

from catjax.core import stats
from catjax.core.transforms import fit_transform

# (label, method, block_size)
DEFAULT_METHODS = (
    ("none", "identity", None),
    ("smoothquant", "smoothquant", None),
    ("smoothquant+H", "smoothquant_hadamard", None),
    ("hadamard", "hadamard", None),
    ("cat k=1", "cat", 1),
    ("cat k=16", "cat", 16),
    ("cat k=64", "cat", 64),
    ("cat k=128", "cat", 128),
    ("cat_full", "cat_full", None),
)

@dataclasses.dataclass(frozen=True)
class MethodResult:
  label: str
  bits: int
  terms: stats.SQNRDecomposition


def compare_methods(x_calib: jax.Array, x_eval: jax.Array, kernel: jax.Array, *,
                    methods=DEFAULT_METHODS, bits=(4, 6), key: jax.Array | None = None,
                    ) -> list[MethodResult]:
  """Fit each method on `x_calib`, decompose the W{b}A{b} SQNR on `x_eval`.

  Methods whose block size does not divide `d_in` are skipped.
  """
  sigma_x = stats.second_moment(x_calib)
  gram_w = stats.weight_gram(kernel)
  absmax = abs(x_calib.reshape(-1, x_calib.shape[-1])).max(axis=0)
  d = kernel.shape[0]
  out = []
  for label, method, block_size in methods:
    if block_size is not None and d % block_size:
      continue
    t = fit_transform(method, sigma_x, gram_w, block_size=block_size, key=key,
                      act_absmax=absmax, name=label)
    xt, kt = t.apply(x_eval), t.merge(kernel)
    for b in bits:
      out.append(MethodResult(label, b, stats.sqnr_decomposition(xt, kt, w_bits=b, a_bits=b)))
  return out


def markdown_table(results: list[MethodResult]) -> str:
  """One row per method, measured and predicted SQNR per bit width + factors."""
  bits = sorted({r.bits for r in results})
  labels = list(dict.fromkeys(r.label for r in results))
  by = {(r.label, r.bits): r.terms for r in results}
  head = (["method"] + [f"W{b}A{b} measured" for b in bits] + [f"W{b}A{b} predicted" for b in bits]
          + ["C(x) dB", "C(W) dB", "alignment gain dB"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for lab in labels:
    first = by[(lab, bits[0])]
    row = ([lab] + [f"{by[(lab, b)].measured_sqnr_db:.2f}" for b in bits]
           + [f"{by[(lab, b)].predicted_sqnr_db:.2f}" for b in bits]
           + [f"{first.concentration_x_db:.2f}", f"{first.concentration_w_db:.2f}",
              f"{first.alignment_gain_db:.2f}"])
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)
