"""Pinned behaviour: what a dozen recipes produce on a tiny model, recorded.

Each case quantizes one fixed tiny model and records, per output, a SHA-256 of
the bytes and float64 projections (sum, sum of squares, a fixed random
projection) of: the quantized kernels, the transforms (hook state) and the
logits of the quantized forward on held-out tokens.

XLA's CPU code rounds float32 sums differently on different processors (one
AVX2-only EPYC and another EPYC give other bits for the same jax, and trained
CAT amplifies the difference), so the recording (`tests/ptq/pinned/jax-<version>.json`)
holds one *variant* per kind of machine, each tagged with its CPU fingerprint
(vendor, family, model, SIMD flags). A case passes when its hashes equal one
variant's; a machine whose fingerprint is recorded must equal its own variant
exactly. A machine of a kind not recorded (or a jax version without a
recording) is skipped, naming its fingerprint: record it with
`CATJAX_PIN_RECORD=1 pytest tests/ptq/test_pinned.py` on a tree whose numbers
are known to be right (e.g. the last landed commit); that adds or replaces this
machine's variant and keeps the others.

A restructuring that changes no number keeps this green.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import tiny
from catjax.ptq.engine import quantize_model
from catjax.models import forward, random_model
from catjax.models.spec import spec_for
from catjax.ptq.plan import Plan, SitePlan
from catjax.ptq.configs import TrainConfig
from catjax.ptq.recipe import Recipe
from catjax.app.specs import parse_spec

PIN_DIR = Path(__file__).parent / "pinned"
RECORD = os.environ.get("CATJAX_PIN_RECORD") == "1"

# Every transform; RTN, clip and GPTQ weights; trained CAT; block Hadamard; FP4; KV4.
SPECS = ("none", "hadamard", "cat@k16", "cat_full", "smoothquant", "smoothquant_hadamard",
         "cat@k16@clip", "hadamard@gptq", "cat@k16@gptq@act", "cat@k16@t3", "cat@k16@bh",
         "none@mxfp4", "hadamard@nvfp4", "cat@k16@kv4", "cat@k16@w6a6@pq")


_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_tile")


def _fingerprint() -> dict:
  """The processor traits that decide XLA's CPU code: vendor, family, model, SIMD flags."""
  fields = {}
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      key, _, value = line.partition(":")
      key = key.strip()
      if key in ("vendor_id", "cpu family", "model", "model name", "flags") and key not in fields:
        fields[key] = value.strip()
  except OSError:
    pass
  flags = set(fields.get("flags", "").split())
  return {"machine": platform.machine(), "vendor": fields.get("vendor_id", platform.processor()),
          "family": fields.get("cpu family"), "model": fields.get("model"),
          "name": fields.get("model name"), "simd": [f for f in _FLAGS if f in flags]}


def _record(tree) -> dict:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.asarray(leaf)
    name = jax.tree_util.keystr(path)
    v = a.astype(np.float64).ravel()
    proj = np.random.RandomState(0).standard_normal(v.size)
    out[name] = {"sha256": hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest(),
                 "shape": list(a.shape), "dtype": str(a.dtype),
                 "proj": [float(v.sum()), float((v * v).sum()), float(v @ proj)]}
  return out


def _plan(cfg) -> Plan:
  spec = spec_for(cfg)
  choice = {0: ("cat", 16, 4, 4, "int", "int"), 1: ("hadamard", None, 8, 8, "int", "int")}
  sites = []
  for b in range(cfg.num_layers):
    for s in spec.site_names:
      m = ("none", None, 4, 4, "int", "mxfp4") if (b, s) == (1, "down_in") else choice[b]
      sites.append(SitePlan(b, s, *m))
  return Plan(tuple(sites), Recipe(weights="gptq"))


@pytest.fixture(scope="module")
def setup():
  model = random_model(tiny.config(num_layers=2), seed=5)
  return model, tiny.tokens((10, 16), 128, seed=5)


@pytest.fixture(scope="module")
def pinned():
  """This jax version's recorded variants (`[]` when none); records this machine's when asked."""
  path = PIN_DIR / f"jax-{jax.__version__}.json"
  variants = json.loads(path.read_text())["variants"] if path.exists() else []
  if not RECORD:
    yield variants
    return
  mine = {"fingerprint": _fingerprint(), "cases": {}}
  yield [mine]
  variants = [v for v in variants if v["fingerprint"] != mine["fingerprint"]] + [mine]
  PIN_DIR.mkdir(exist_ok=True)
  path.write_text(json.dumps({"jax": jax.__version__, "variants": variants}, indent=1,
                             sort_keys=True) + "\n")


def _differences(got: dict, want: dict) -> list[str]:
  """Where `got` differs from a recorded case: other leaves, shapes, dtypes or bits."""
  out = []
  for part in ("kernels", "transforms", "logits"):
    if sorted(got[part]) != sorted(want[part]):
      out.append(f"{part}: other leaves")
      continue
    for name, g in got[part].items():
      w = want[part][name]
      if (g["shape"], g["dtype"]) != (w["shape"], w["dtype"]):
        out.append(f"{part} {name}: {g['shape']} {g['dtype']}, recorded {w['shape']} {w['dtype']}")
      elif g["sha256"] != w["sha256"]:
        out.append(f"{part} {name}: bits changed (projections {g['proj']}, recorded {w['proj']})")
  return out


@pytest.mark.parametrize("case", SPECS + ("plan",))
def test_pinned_behaviour(setup, pinned, case):
  model, windows = setup
  policy = _plan(model.config) if case == "plan" else parse_spec(case, Recipe(train=TrainConfig(batch=2)))
  qm = quantize_model(model, windows[:8], policy, batch_size=4, progress=False)
  logits = forward(qm.model, windows[8:], hook=qm.hook, hook_state=qm.transforms)[0]
  got = {"kernels": _record(nnx.to_pure_dict(nnx.state(qm.model))), "transforms": _record(qm.transforms),
         "logits": _record(logits)}
  if RECORD:
    pinned[0]["cases"][case] = got
    return
  if any(not _differences(got, v["cases"][case]) for v in pinned if case in v["cases"]):
    return
  here = _fingerprint()
  own = [v for v in pinned if v["fingerprint"] == here]
  if not own:
    pytest.skip(f"no recording of jax {jax.__version__} on a machine like this one ({here}) and "
                "no recorded variant's bits: record with CATJAX_PIN_RECORD=1")
  assert case in own[0]["cases"], f"{case}: not in this machine's recording"
  diff = _differences(got, own[0]["cases"][case])
  assert not diff, f"{case}: " + "; ".join(diff[:3])
