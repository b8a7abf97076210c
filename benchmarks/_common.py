"""Shared helpers for benchmarks: timing medians, machine description, output."""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(fn, *, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time of `fn()` in seconds; `fn` must block until done."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def machine() -> dict:
  dev = jax.devices()[0]
  return {
      "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "device": f"{dev.platform}: {getattr(dev, 'device_kind', str(dev))}",
  }


def smollm2_parser(description: str) -> argparse.ArgumentParser:
  """The flags every SmolLM2 run of the benchmarks shares (model, calibration,
  evaluation budget, batch size), with the CPU-sized defaults."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--model", default="smollm2-135m")
  p.add_argument("--calib-windows", type=int, default=8)
  p.add_argument("--seqlen", type=int, default=512)
  p.add_argument("--eval-max-tokens", type=int, default=4096)
  p.add_argument("--batch-size", type=int, default=4)
  return p


def write(name: str, payload: dict, markdown: str) -> None:
  """Write `results/{name}.json` and `results/{name}.md` side by side."""
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
  (RESULTS / f"{name}.md").write_text(markdown + "\n")
  print(f"\nwrote {RESULTS / name}.json and .md")
