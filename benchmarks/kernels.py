"""Quantized, transformed matmul kernel vs bf16 `jnp.dot` and XLA's int8 dot.

LLaMA-7B linear shapes (4096->4096, 4096->11008, 11008->4096) at
m in {1, 16, 256, 2048, 8192} tokens, all timed in one run (median of
`--repeats`, each call waited on with `block_until_ready`):

- `fused`: `catjax.kernels.quantized_matmul` with a k=128 block transform,
  W`bits`A`a_bits` (transform + per-token quantization pre-pass, then the
  Pallas Mosaic GPU integer matmul with the scale epilogue);
- `no_transform`: the same with `transform_blocks=None`;
- `full_hadamard`: a fast full-width Hadamard (`catjax.core.hadamard.apply_hadamard`,
  Kronecker factors, never the d×d matrix) then the kernel without transform:
  the other way CAT's Hadamard can reach the kernel (README, "Real integer weights");
- `bf16`: `jnp.dot` of bf16 operands (float32 accumulation);
- `int8`: `lax.dot_general` of pre-quantized int8 operands with int32
  accumulation (XLA's integer GEMM, no quantization or scales).

Reports TOPS (2·m·d_in·d_out / time) and ratios: speedup of `fused` over
`bf16` and `int8`, and the transform overheads `fused / no_transform - 1`
(block-diagonal, folded) and `full_hadamard / no_transform - 1`.
Without a GPU it refuses; `--allow-cpu` runs a tiny subset through the
reference implementation only to smoke-test this script (results go to
`kernels_cpu_smoke.*`, never to `kernels.*`).

    python benchmarks/kernels.py [--bits 4] [--a-bits 4] [--repeats 20]
    python benchmarks/kernels.py --allow-cpu
"""

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median_time, write  # noqa: E402

from catjax import apply_hadamard, kernels  # noqa: E402
from catjax.kernels import pallas_gpu  # noqa: E402

LLAMA_7B = ((4096, 4096), (4096, 11008), (11008, 4096))
TOKENS = (1, 16, 256, 2048, 8192)
BLOCK = 128


def _timer(fn, *args, repeats):
  jitted = jax.jit(fn)
  return median_time(lambda: jax.block_until_ready(jitted(*args)), repeats=repeats, warmup=2)


def bench_one(m, d_in, d_out, *, bits, a_bits, implementation, repeats, key):
  kx, kw, kt = jax.random.split(key, 3)
  x = jax.random.normal(kx, (m, d_in), jnp.bfloat16)
  w = jax.random.normal(kw, (d_in, d_out), jnp.float32) / np.sqrt(d_in)
  tb = jnp.eye(BLOCK) + 0.1 * jax.random.normal(kt, (d_in // BLOCK, BLOCK, BLOCK))
  qw = kernels.quantize_weight(w, bits=bits)
  w_bf16 = w.astype(jnp.bfloat16)
  x_i8 = jnp.clip(jnp.round(x.astype(jnp.float32) * 20), -127, 127).astype(jnp.int8)
  w_i8 = jnp.clip(jnp.round(w * 400), -127, 127).astype(jnp.int8)

  def fused(x, tb, qw):
    return kernels.quantized_matmul(x, tb, qw, a_bits=a_bits, implementation=implementation,
                                    out_dtype=jnp.bfloat16)

  times = {
      "fused": _timer(fused, x, tb, qw, repeats=repeats),
      "no_transform": _timer(lambda x, qw: fused(x, None, qw), x, qw, repeats=repeats),
      "full_hadamard": _timer(lambda x, qw: fused(apply_hadamard(x), None, qw), x, qw,
                              repeats=repeats),
      "bf16": _timer(jnp.dot, x, w_bf16, repeats=repeats),
      "int8": _timer(lambda a, b: jax.lax.dot_general(
          a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32), x_i8, w_i8,
          repeats=repeats),
  }
  ops = 2.0 * m * d_in * d_out
  cfg = pallas_gpu.choose_block_config(m, d_in, d_out, bits=bits, out_dtype=jnp.bfloat16)
  return {
      "m": m, "d_in": d_in, "d_out": d_out,
      "seconds": times,
      "tops": {k: ops / t / 1e12 for k, t in times.items()},
      "speedup_vs_bf16": times["bf16"] / times["fused"],
      "speedup_vs_int8": times["int8"] / times["fused"],
      "transform_overhead": times["fused"] / times["no_transform"] - 1.0,
      "full_hadamard_overhead": times["full_hadamard"] / times["no_transform"] - 1.0,
      "block_config": vars(cfg),
      "weight_bytes": {"quantized": qw.nbytes, "bf16": d_in * d_out * 2},
  }


def markdown(payload):
  info = payload["machine"]
  lines = [
      "# Quantized transformed matmul (catjax.kernels)", "",
      f"Device: {info['device']}; jax {info['jax']}, jaxlib {payload['jaxlib']}, "
      f"Python {info['python']}. Implementation: `{payload['implementation']}`, "
      f"W{payload['bits']}A{payload['a_bits']}, transform blocks k={BLOCK}, bf16 in/out; "
      f"median of {payload['repeats']} runs.", "",
      "| d_in→d_out | m | fused µs | no-transform µs | full-Hadamard µs | bf16 µs | int8 µs "
      "| fused TOPS | vs bf16 | vs int8 | block transform overhead | full Hadamard overhead |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  if payload["implementation"] == "reference":
    lines[2:2] = ["**CPU smoke test of the script (reference implementation, tiny shapes): "
                  "not a kernel measurement.**", ""]
  for r in payload["results"]:
    s = r["seconds"]
    lines.append(
        f"| {r['d_in']}→{r['d_out']} | {r['m']} | {s['fused'] * 1e6:.1f} | {s['no_transform'] * 1e6:.1f} "
        f"| {s['full_hadamard'] * 1e6:.1f} | {s['bf16'] * 1e6:.1f} | {s['int8'] * 1e6:.1f} "
        f"| {r['tops']['fused']:.2f} | {r['speedup_vs_bf16']:.2f}x | {r['speedup_vs_int8']:.2f}x "
        f"| {100 * r['transform_overhead']:+.0f}% | {100 * r['full_hadamard_overhead']:+.0f}% |")
  lines += ["", "`vs bf16` / `vs int8`: time of `jnp.dot` (bf16) / XLA int8 dot (int32 accumulation) "
            "divided by the fused time (>1: the fused kernel is faster). Overheads: the time with the "
            "k-block transform (fused) or with a fast full-width Hadamard before the kernel, over "
            "the same call with `transform_blocks=None`, minus one."]
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--bits", type=int, default=4)
  p.add_argument("--a-bits", type=int, default=4)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
  p.add_argument("--allow-cpu", action="store_true",
                 help="without a GPU, smoke-test this script on a tiny shape via the reference")
  args = p.parse_args(argv)
  dev = jax.devices()[0]
  if dev.platform != "gpu":
    if not args.allow_cpu:
      print(f"benchmarks/kernels.py times the Pallas GPU kernel, but the default JAX device is "
            f"{dev.platform!r}. Run it on an NVIDIA Hopper GPU, or pass --allow-cpu to smoke-test "
            f"the script on a tiny shape.", file=sys.stderr)
      return 2
    shapes, tokens, implementation, name = ((256, 128), (128, 256)), (1, 16), "reference", "kernels_cpu_smoke"
    repeats = min(args.repeats, 3)
  else:
    shapes, tokens, implementation, name = LLAMA_7B, tuple(args.tokens), "pallas", "kernels"
    repeats = args.repeats
    if (reason := pallas_gpu.unsupported_reason(1, 4096, 4096, bits=args.bits, out_dtype=jnp.bfloat16)):
      print(f"the Pallas kernel cannot run here: {reason}", file=sys.stderr)
      return 2
  results = []
  key = jax.random.PRNGKey(0)
  for d_in, d_out in shapes:
    for m in tokens:
      r = bench_one(m, d_in, d_out, bits=args.bits, a_bits=args.a_bits, implementation=implementation,
                    repeats=repeats, key=key)
      results.append(r)
      print(f"{d_in:>5}->{d_out:<5} m={m:<5} fused {r['seconds']['fused'] * 1e6:9.1f}us "
            f"{r['tops']['fused']:7.2f} TOPS | vs bf16 {r['speedup_vs_bf16']:.2f}x "
            f"vs int8 {r['speedup_vs_int8']:.2f}x | transform {100 * r['transform_overhead']:+.0f}% "
            f"full H {100 * r['full_hadamard_overhead']:+.0f}%",
            flush=True)
  payload = {"machine": machine(), "jaxlib": jaxlib.__version__, "implementation": implementation,
             "bits": args.bits, "a_bits": args.a_bits, "transform_block": BLOCK, "repeats": repeats,
             "results": results}
  write(name, payload, markdown(payload))
  return 0


if __name__ == "__main__":
  sys.exit(main())
