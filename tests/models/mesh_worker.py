"""Run by test_sharding.py in a subprocess with 8 host CPU devices: perplexity,
statistics, quantized perplexity, the block engine's quantized perplexity and
greedy generation of a tiny model, single device and under meshes, and the
engine's site fits spread over the devices; prints one JSON line."""

import json
import os
import sys
import tempfile
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for tiny
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import tiny  # noqa: E402
from catjax.ptq.engine import quantize_model  # noqa: E402
from catjax.analysis.evaluate import perplexity  # noqa: E402
from catjax.models import generate, load_hf, random_model, save_hf  # noqa: E402
from catjax.models.spec import spec_for  # noqa: E402
from catjax.ptq.recipe import Recipe  # noqa: E402
from catjax.ptq import blocks  # noqa: E402
from catjax.ptq.blocks import fit_block  # noqa: E402
from catjax.ptq.calibration import calibrate  # noqa: E402
from catjax.core.transforms import fit_transform  # noqa: E402
from catjax.models.sharding import make_mesh, placement, shard_model  # noqa: E402

CFG = tiny.config(num_heads=4, num_kv_heads=4, head_dim=16, intermediate_size=128)
WINDOWS = tiny.tokens((16, 32), 128, seed=3)
RECIPE = Recipe(method="cat", block_size=16)


def run(mesh_spec):
  model = random_model(CFG, seed=2)
  mesh = None if mesh_spec is None else make_mesh(mesh_spec)
  if mesh is not None:
    shard_model(model, mesh)
  ppl = perplexity(model, WINDOWS, batch_size=8, progress=False, mesh=mesh).perplexity
  stats = calibrate(model, WINDOWS, batch_size=8, progress=False, mesh=mesh)
  qm = quantize_model(model, None, RECIPE, stats=stats, progress=False)
  qmodel = qm.model if mesh is None else shard_model(qm.model, mesh)
  qppl = perplexity(qmodel, WINDOWS, batch_size=8, hook=qm.hook, hook_state=qm.transforms,
                    progress=False, mesh=mesh).perplexity
  # The block engine under the mesh (each batch of 8 windows split over data;
  # each block's site fits spread over the devices: record where they ran).
  fit_devices = set()

  def spy(*args, **kw):
    fit_devices.add(str(jnp.zeros(()).devices()))
    return fit_transform(*args, **kw)

  with mock.patch.object(blocks, "fit_transform", spy):
    walked = quantize_model(model, WINDOWS, RECIPE, batch_size=8, progress=False, mesh=mesh)
  wppl = perplexity(walked.model if mesh is None else shard_model(walked.model, mesh), WINDOWS,
                    batch_size=8, hook=walked.hook, hook_state=walked.transforms, progress=False,
                    mesh=mesh).perplexity
  specs = lambda m: [list(v.value.sharding.spec)  # noqa: E731
                     for _, v in nnx.to_flat_state(nnx.state(m, nnx.Param))]
  sharded = loaded = [] if mesh is None else specs(model)
  loaded_ppl = ppl
  if mesh is not None:  # loaded straight onto the mesh
    with tempfile.TemporaryDirectory() as folder:
      save_hf(random_model(CFG, seed=2), folder)
      direct = load_hf(folder, place=placement(mesh))
    loaded = specs(direct)
    loaded_ppl = perplexity(direct, WINDOWS, batch_size=8, progress=False, mesh=mesh).perplexity
  tokens = generate(model, WINDOWS[0, :8], max_new_tokens=8)  # KV cache under the mesh
  return {"ppl": ppl, "quantized_ppl": qppl, "walked_ppl": wppl, "generated": tokens,
          "sigma": {s: np.asarray(st.sigma).tolist() for s, st in stats.items()},
          "n_devices": len(jax.devices()), "partitions": sharded, "loaded_partitions": loaded,
          "loaded_ppl": loaded_ppl, "fit_devices": len(fit_devices)}


def spread_fits_equal_one_device() -> bool:
  """`fit_block` spread over the 8 devices returns bit for bit the one-device transforms."""
  model = random_model(CFG, seed=2)
  stats = jax.device_get(calibrate(model, WINDOWS, batch_size=8, progress=False))
  block = jax.device_get(jax.tree.map(lambda a: a[1], nnx.to_pure_dict(nnx.state(model))["layers"]))
  stats = jax.tree.map(lambda a: a[1], stats)
  spec = spec_for(CFG)
  one = fit_block(block, stats, RECIPE, spec=spec, layer=1)
  spread = fit_block(block, stats, RECIPE, spec=spec, layer=1, devices=jax.devices())
  return all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(spread)))


if __name__ == "__main__":
  out = {str(spec): run(spec) for spec in [None] + sys.argv[1:]}
  out["spread_fits_equal"] = spread_fits_equal_one_device()
  try:
    shard_model(random_model(tiny.config(vocab_size=127), seed=0), make_mesh("model=2"))
    out["indivisible"] = "no error"
  except ValueError as e:
    out["indivisible"] = str(e)
  print(json.dumps(out))
