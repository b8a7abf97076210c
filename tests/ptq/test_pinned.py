"""Pinned behaviour: what a dozen recipes produce on a tiny model, recorded.

Each case quantizes one fixed tiny model and records, per output, a SHA-256 of
the bytes and float64 projections (sum, sum of squares, a fixed random
projection) of: the quantized kernels, the transforms (hook state) and the
logits of the quantized forward on held-out tokens. The recording
(`tests/pinned/jax-<version>.json`) is compared:
- exactly (the hashes) when this run has the recording's jax version and CPU;
- otherwise the projections to 1e-6 relative (a CPU of another kind may
  round a few float32 sums differently).

A restructuring that changes no number keeps this green. To record anew after
an intended numerical change: `CATJAX_PIN_RECORD=1 pytest tests/test_pinned.py`.
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


def _cpu() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


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
  path = PIN_DIR / f"jax-{jax.__version__}.json"
  if RECORD:
    data = {"jax": jax.__version__, "cpu": _cpu(), "cases": {}}
    yield data
    PIN_DIR.mkdir(exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return
  if not path.exists():
    # Another jax version: compare with the newest recording, projections only.
    have = sorted(PIN_DIR.glob("jax-*.json"))
    assert have, f"no recording in {PIN_DIR}"
    path = have[-1]
  yield json.loads(path.read_text())


@pytest.mark.parametrize("case", SPECS + ("plan",))
def test_pinned_behaviour(setup, pinned, case):
  model, windows = setup
  policy = _plan(model.config) if case == "plan" else parse_spec(case, Recipe(train=TrainConfig(batch=2)))
  qm = quantize_model(model, windows[:8], policy, batch_size=4, progress=False)
  logits = forward(qm.model, windows[8:], hook=qm.hook, hook_state=qm.transforms)[0]
  got = {"kernels": _record(nnx.to_pure_dict(nnx.state(qm.model))), "transforms": _record(qm.transforms),
         "logits": _record(logits)}
  if RECORD:
    pinned["cases"][case] = got
    return
  want = pinned["cases"][case]
  exact = pinned["jax"] == jax.__version__ and pinned["cpu"] == _cpu()
  for part in ("kernels", "transforms", "logits"):
    assert sorted(got[part]) == sorted(want[part]), f"{case} {part}: other leaves"
    for name, g in got[part].items():
      w = want[part][name]
      assert (g["shape"], g["dtype"]) == (w["shape"], w["dtype"]), f"{case} {part} {name}"
      if exact:
        assert g["sha256"] == w["sha256"], f"{case} {part} {name}: bits changed"
      else:
        np.testing.assert_allclose(g["proj"], w["proj"], rtol=1e-6, atol=1e-9,
                                   err_msg=f"{case} {part} {name}")
