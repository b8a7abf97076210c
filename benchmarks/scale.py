"""Models end to end on this machine: load, fp32 vs bf16, the block engine's CAT W4A4,
and sharded vs single device (the 8B / 70B memory model is `engine_memory.py`'s).

Every measurement runs in a fresh subprocess, so each peak RSS is that step's:

* `load` (float32 and bfloat16): parameters, load seconds and peak RSS of the
  streaming loader (GGUF read and dequantized tensor by tensor, each written
  into its parameter on the device), against the process's RSS before the load,
  the model's bytes and its largest tensor.
* `eval`: fp perplexity in float32 and in bfloat16 (parameters and compute).
* `quant`: the block engine's CAT k=64 W4A4 (RTN weights, fp propagation) from a
  float32 model: calibration + fit + quantize seconds, peak RSS, and the
  quantized perplexity.
* `shard` (SmolLM2 only, 8 forced host devices): perplexity, statistics and the
  engine's quantized perplexity on one device and on meshes `data=8` and
  `data=2,model=4`; the largest differences and the time ratio (2 cores
  emulate 8 devices: the ratio is overhead, not a speedup).

All on Wikipedia windows of 512 tokens (calibration: wiki-calib, eval:
wiki-eval).

    python benchmarks/scale.py [--models smollm2-135m,gemma3-270m,qwen2.5-coder-1.5b]
        [--calib-windows 8] [--eval-windows 8] [--skip-shard]

Writes `results/scale.{json,md}`.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write  # noqa: E402

GiB = 2**30
SEQLEN = 512
MESHES = ("data=8", "data=2,model=4")


def _rss() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB


def _windows(tok, split, n):
  from catjax.app import text_windows
  return text_windows(tok, split, seqlen=SEQLEN, max_tokens=n * SEQLEN).tokens


def _load(name, dtype="float32"):
  import jax

  from catjax.app import load_pretrained
  t0 = time.perf_counter()
  model, tok, path = load_pretrained(name, dtype=dtype)
  jax.block_until_ready(jax.tree.leaves(model))
  return model, tok, time.perf_counter() - t0


def _ppl(model, windows, qm=None, mesh=None):
  from catjax.analysis import perplexity
  kw = {} if qm is None else {"hook": qm.hook, "hook_state": qm.transforms}
  return perplexity(model, windows, batch_size=8 if mesh else 1, progress=False, mesh=mesh,
                    **kw).perplexity


def step_load(name, args, dtype):
  import jax
  import jax.numpy as jnp

  import catjax.models  # noqa: F401  (the loaders imported before the baseline)
  jnp.zeros(1).block_until_ready()
  before = _rss()
  model, _, secs = _load(name, dtype)
  cfg = model.config
  leaves = jax.tree.leaves(model)
  # The largest single checkpoint tensor: one block's slice of a stacked
  # parameter, or an unstacked one (the embedding).
  largest = max(x.nbytes // (cfg.num_layers if x.ndim >= 2 and x.shape[0] == cfg.num_layers
                             else 1) for x in leaves)
  return {"dtype": dtype, "load_seconds": secs, "peak_rss_GiB": _rss(),
          "rss_before_GiB": before, "model_GiB": sum(x.nbytes for x in leaves) / GiB,
          "largest_tensor_GiB": largest / GiB,
          "parameters": sum(x.size for x in leaves),
          "model_type": cfg.model_type, "layers": cfg.num_layers, "hidden": cfg.hidden_size}


def step_eval(name, args):
  out = {}
  for dtype in ("float32", "bfloat16"):
    model, tok, _ = _load(name, dtype)
    t0 = time.perf_counter()
    out[dtype] = _ppl(model, _windows(tok, "wiki-eval", args.eval_windows))
    out[f"{dtype}_eval_seconds"] = time.perf_counter() - t0
    del model
  return out


def step_quant(name, args):
  import jax

  from catjax.ptq import quantize_model
  from catjax.app import parse_spec
  model, tok, _ = _load(name)
  calib = _windows(tok, "wiki-calib", args.calib_windows)
  rss_before = _rss()
  recipe = parse_spec(args.method)
  t0 = time.perf_counter()
  qm = quantize_model(model, calib, recipe, batch_size=1, progress=False)
  jax.block_until_ready(jax.tree.leaves(qm.model))
  secs = time.perf_counter() - t0
  peak = _rss()
  return {"recipe": recipe.label, "quantize_seconds": secs, "rss_before_GiB": rss_before,
          "peak_rss_GiB": peak,
          "quantized": _ppl(qm.model, _windows(tok, "wiki-eval", args.eval_windows), qm)}


def step_shard(name, args):
  import jax
  import numpy as np

  from catjax.ptq import quantize_model
  from catjax.app import parse_spec
  from catjax.ptq import calibrate
  from catjax.models import make_mesh, shard_model
  recipe = parse_spec(args.method)
  out = {"devices": len(jax.devices())}
  for spec in (None, *MESHES):
    model, tok, _ = _load(name)
    mesh = None if spec is None else make_mesh(spec)
    if mesh is not None:
      shard_model(model, mesh)
    calib = _windows(tok, "wiki-calib", args.calib_windows)
    ev = _windows(tok, "wiki-eval", args.eval_windows)
    t0 = time.perf_counter()
    ppl = _ppl(model, ev, mesh=mesh)
    stats = calibrate(model, calib, batch_size=8, progress=False, mesh=mesh)
    qm = quantize_model(model, calib, recipe, batch_size=8, progress=False, mesh=mesh)
    qmodel = qm.model if mesh is None else shard_model(qm.model, mesh)
    qppl = _ppl(qmodel, ev, qm, mesh=mesh)
    out[str(spec)] = {"seconds": time.perf_counter() - t0, "ppl": ppl, "quantized": qppl,
                      "sigma": {s: np.asarray(st.sigma) for s, st in stats.items()}}
  one = out["None"]
  for spec in MESHES:
    r = out[spec]
    r["sigma_max_rel_diff"] = max(
        float(np.abs(r["sigma"][s] - one["sigma"][s]).max() / np.abs(one["sigma"][s]).max())
        for s in one["sigma"])
    r["ppl_rel_diff"] = r["ppl"] / one["ppl"] - 1
    r["quantized_rel_diff"] = r["quantized"] / one["quantized"] - 1
    r["time_ratio"] = r["seconds"] / one["seconds"]
  for r in out.values():
    if isinstance(r, dict):
      r.pop("sigma", None)
  return out


STEPS = {"load": step_load, "eval": step_eval, "quant": step_quant, "shard": step_shard}


def _child(step, name, args, extra=(), env=None):
  cmd = [sys.executable, __file__, "--step", step, "--models", name, "--calib-windows",
         str(args.calib_windows), "--eval-windows", str(args.eval_windows), "--method",
         args.method, *extra]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if proc.returncode != 0:
    raise SystemExit(f"{step} {name} failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="smollm2-135m,gemma3-270m,qwen2.5-coder-1.5b")
  p.add_argument("--calib-windows", type=int, default=8)
  p.add_argument("--eval-windows", type=int, default=8)
  p.add_argument("--method", default="cat@k64")
  p.add_argument("--skip-shard", action="store_true")
  p.add_argument("--step", default=None, help=argparse.SUPPRESS)
  p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.step:
    extra = (args.dtype,) if args.step == "load" else ()
    print(json.dumps(STEPS[args.step](args.models, args, *extra)))
    return
  rows = []
  for name in args.models.split(","):
    row = {"model": name}
    for dtype in ("float32", "bfloat16"):
      row[f"load_{dtype}"] = _child("load", name, args, ("--dtype", dtype))
    row["eval"] = _child("eval", name, args)
    row["quant"] = _child("quant", name, args)
    rows.append(row)
    lf, lb, q = row["load_float32"], row["load_bfloat16"], row["quant"]
    print(f"{name}: {lf['parameters'] / 1e9:.3f} B params; load f32 {lf['load_seconds']:.0f} s "
          f"{lf['peak_rss_GiB']:.2f} GiB, bf16 {lb['load_seconds']:.0f} s "
          f"{lb['peak_rss_GiB']:.2f} GiB; ppl f32 {row['eval']['float32']:.3f} bf16 "
          f"{row['eval']['bfloat16']:.3f}; {q['recipe']} {q['quantized']:.3f} "
          f"({q['quantize_seconds']:.0f} s, {q['peak_rss_GiB']:.2f} GiB)", flush=True)
  shard = None
  if not args.skip_shard:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    shard = _child("shard", "smollm2-135m", args, env=env)

  lines = [f"# Models end to end\n\nCalibration {args.calib_windows} × {SEQLEN} tokens "
           f"(wiki-calib), evaluation {args.eval_windows} × {SEQLEN} tokens (wiki-eval); "
           f"W4A4 recipe `{args.method}` (block engine, RTN weights, fp propagation). Peak "
           "RSS is the whole process's (Python, JAX and the tokenizer included).\n",
           "| model | params | load f32: s / peak RSS GiB | load bf16: s / peak RSS GiB | "
           "fp32 ppl | bf16 ppl | bf16 vs fp32 | W4A4 ppl | calibrate + fit + quantize s | "
           "its peak RSS GiB |", "|" + "---|" * 10]
  for r in rows:
    lf, lb, e, q = r["load_float32"], r["load_bfloat16"], r["eval"], r["quant"]
    lines.append(
        f"| {r['model']} ({lf['model_type']}, {lf['layers']} blocks) | "
        f"{lf['parameters'] / 1e9:.3f} B | {lf['load_seconds']:.1f} / {lf['peak_rss_GiB']:.2f} | "
        f"{lb['load_seconds']:.1f} / {lb['peak_rss_GiB']:.2f} | {e['float32']:.3f} | "
        f"{e['bfloat16']:.3f} | {100 * (e['bfloat16'] / e['float32'] - 1):+.2f}% | "
        f"{q['quantized']:.3f} | {q['quantize_seconds']:.0f} | {q['peak_rss_GiB']:.2f} |")
  lines += ["", "## Host memory of a load\n",
            "Peak RSS of the load minus the process's RSS before it (Python and JAX "
            "started), against the parameters' bytes in the target dtype and the largest "
            "single tensor (GiB). The load also builds the tokenizer.\n",
            "| model | dtype | before | peak | peak − before | model | largest tensor | "
            "excess over model + largest |", "|" + "---|" * 8]
  for r in rows:
    for dtype in ("float32", "bfloat16"):
      ld = r[f"load_{dtype}"]
      grown = ld["peak_rss_GiB"] - ld["rss_before_GiB"]
      lines.append(f"| {r['model']} | {dtype} | {ld['rss_before_GiB']:.2f} | "
                   f"{ld['peak_rss_GiB']:.2f} | {grown:.2f} | {ld['model_GiB']:.2f} | "
                   f"{ld['largest_tensor_GiB']:.3f} | "
                   f"{grown - ld['model_GiB'] - ld['largest_tensor_GiB']:+.2f} |")
  if shard is not None:
    one = shard["None"]
    lines += ["", f"## SmolLM2-135M sharded over {shard['devices']} forced host devices "
              "(2 real cores)\n",
              "Perplexity, calibration statistics and the block engine's W4A4 under each mesh, "
              "against one device. Batches of 8 windows. The time ratio is emulation "
              "overhead on 2 cores, not a speedup.\n",
              "| mesh | fp ppl | rel. diff | W4A4 ppl | rel. diff | max rel. diff of Σ_x | "
              "seconds | time ratio |", "|" + "---|" * 8,
              f"| one device | {one['ppl']:.4f} | — | {one['quantized']:.4f} | — | — | "
              f"{one['seconds']:.0f} | 1.00 |"]
    for spec in MESHES:
      r = shard[spec]
      lines.append(f"| {spec} | {r['ppl']:.4f} | {r['ppl_rel_diff']:+.1e} | {r['quantized']:.4f} | "
                   f"{r['quantized_rel_diff']:+.1e} | {r['sigma_max_rel_diff']:.1e} | "
                   f"{r['seconds']:.0f} | {r['time_ratio']:.2f} |")
  info = machine()
  md = "\n".join(lines) + f"\n\nMachine: {info}.\n"
  print(md)
  write("scale", {"machine": info, "args": vars(args), "rows": rows, "shard": shard}, md)


if __name__ == "__main__":
  main()
