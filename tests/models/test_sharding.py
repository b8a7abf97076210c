"""Sharding over a Mesh: partitions, errors, and equality with one device (8 host CPUs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from catjax.models import LLAMA
from catjax.models.sharding import make_mesh, param_partition

# Data parallel, and data × model with the model axis over 4 devices (one worker run
# computes them all; model=2 exercised nothing model=4 does not).
MESHES = ["data=8,model=1", "data=2,model=4"]
# Not a speed limit: a worker that runs this long has hung (a collective waiting for a peer);
# the slowest run seen, on a 2-core machine under load average ~10, took under 10 minutes.
HANG = 3600


def test_partition_table():
  assert param_partition(LLAMA, ("layers", "attn", "q_proj", "kernel"), 3) == P(None, None, "model")
  assert param_partition(LLAMA, ("layers", "attn", "o_proj", "kernel"), 3) == P(None, "model", None)
  assert param_partition(LLAMA, ("layers", "mlp", "down_proj", "kernel"), 3) == P(None, "model", None)
  assert param_partition(LLAMA, ("layers", "attn", "k_proj", "bias"), 2) == P(None, "model")
  assert param_partition(LLAMA, ("embed",), 2) == P("model", None)
  assert param_partition(LLAMA, ("layers", "attn_norm", "scale"), 2) == P(None, None)


def test_mesh_specs_and_errors():
  n = len(jax.devices())
  assert make_mesh().shape == {"data": n, "model": 1}
  assert make_mesh("model=1").shape == {"data": n, "model": 1}
  for bad, match in [("data=0", "positive sizes"), ("pipe=2", "expected 'data=N,model=M'"),
                     (f"data={n + 1}", "there are"), (f"model={n + 1}", "does not divide")]:
    with pytest.raises(ValueError, match=match):
      make_mesh(bad)


@pytest.fixture(scope="module")
def mesh_results():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  worker = Path(__file__).with_name("mesh_worker.py")
  try:
    out = subprocess.run([sys.executable, str(worker), *MESHES], env=env, capture_output=True,
                         text=True, timeout=HANG)
  except subprocess.TimeoutExpired:
    pytest.fail(f"the mesh worker ran {HANG} s: it hung (no run takes that long)")
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", MESHES)
def test_mesh_equals_single_device(mesh_results, mesh):
  # Only the order of float32 sums differs (all-reduces over the mesh): fp
  # perplexity and second moments agree to float32 rounding; the quantized
  # perplexity too, unless a value sits on a rounding boundary (it did not).
  one, got = mesh_results["None"], mesh_results[mesh]
  assert got["n_devices"] == 8
  assert got["ppl"] == pytest.approx(one["ppl"], rel=1e-5)
  for site, sigma in one["sigma"].items():
    a, b = np.asarray(sigma), np.asarray(got["sigma"][site])
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max(), err_msg=site)
  assert got["quantized_ppl"] == pytest.approx(one["quantized_ppl"], rel=1e-4)
  assert got["walked_ppl"] == pytest.approx(one["walked_ppl"], rel=1e-4)
  assert got["generated"] == one["generated"]
  assert got["loaded_partitions"] == got["partitions"]  # placed while loading
  assert got["loaded_ppl"] == pytest.approx(one["ppl"], rel=1e-5)
  # 2 blocks × 4 sites, site i of block b on device (4b + i) mod 8.
  assert one["fit_devices"] == 1 and got["fit_devices"] == 8
  if mesh != "data=8,model=1":
    assert [None, "model", None] in got["partitions"], got["partitions"]  # o/down kernels
    assert [None, None, "model"] in got["partitions"], got["partitions"]  # q/k/v/gate/up


def test_site_fits_spread_over_devices_equal_one_device(mesh_results):
  assert mesh_results["spread_fits_equal"] is True


def test_indivisible_parameter_is_named(mesh_results):
  assert "embed of shape (127, 64)" in mesh_results["indivisible"]
  assert "'model' of size 2" in mesh_results["indivisible"]


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_compute_the_single_process_statistics_and_perplexity(tmp_path):
  # jax.distributed on a 127.0.0.1 coordinator, one CPU device per process,
  # gloo all-reduces: the same second moments as one process alone.
  import tiny
  from catjax.models import random_model
  from catjax.ptq.calibration import calibrate
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  worker = str(Path(__file__).with_name("distributed_worker.py"))
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, worker, str(i), "2", port, str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=HANG) for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail(f"the two processes ran {HANG} s: they hung (a collective waiting for a peer)")
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  got = json.loads(outs[0][0].strip().splitlines()[-1])
  assert got["devices"] == 2
  from catjax.analysis.evaluate import perplexity
  model, windows = random_model(tiny.config(), seed=2), tiny.tokens((8, 32), 128, seed=3)
  one = calibrate(model, windows, batch_size=4, progress=False)
  assert got["perplexity"] == pytest.approx(
      perplexity(model, windows, batch_size=4, progress=False).perplexity, rel=1e-5)
  for site, st in one.items():
    assert got["count"][site] == int(st.count[0]) == 8 * 32
    a = np.asarray(st.sigma)
    np.testing.assert_allclose(np.asarray(got["sigma"][site]), a, rtol=1e-4,
                               atol=1e-5 * np.abs(a).max(), err_msg=site)
  # Both processes saved into one folder: process 0 wrote every file once (no
  # clash, nothing partial), the checkpoint's tensors gathered from both.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["quantized", "stats.npz", "writer.txt"]
  assert (tmp_path / "writer.txt").read_text() == "0"
  from safetensors.numpy import load_file
  from catjax.artifacts.checkpoint import _tensors
  from catjax.ptq.engine import quantize_model
  from catjax.ptq.recipe import Recipe
  from catjax.artifacts.stats_file import load_stats
  from catjax.ptq.realization import realize
  stats, _ = load_stats(tmp_path / "stats.npz", model.config)
  qm = quantize_model(model, None, Recipe(method="cat", block_size=16), stats=stats, progress=False)
  want = {k: np.asarray(v) for k, v in _tensors(realize(model, qm)).items()}
  got = load_file(str(tmp_path / "quantized" / "model.safetensors"))
  assert sorted(got) == sorted(want)
  for name, a in want.items():
    assert got[name].shape == a.shape and got[name].dtype == a.dtype, name
    np.testing.assert_allclose(got[name].astype(np.float64), a.astype(np.float64), rtol=1e-5,
                               atol=1e-6, err_msg=name)
