"""One process of test_sharding.py's two-process run: jax.distributed on a
127.0.0.1 coordinator with CPU (gloo) collectives; each process owns one CPU
device, the mesh spans both, and calibration statistics are all-reduced over
`data`. Process 0 prints the second moments as one JSON line. Then the
run's outputs, written by every process into one shared FOLDER: the
statistics, and a quantized checkpoint of the model split over `model`
(tensor parallel across the processes).

    python distributed_worker.py PROCESS_ID NUM_PROCESSES PORT FOLDER
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for tiny
import jax  # noqa: E402
import numpy as np  # noqa: E402

from catjax.models.sharding import initialize_distributed  # noqa: E402


def main():
  pid, n, port = (int(a) for a in sys.argv[1:4])
  folder = sys.argv[4]
  initialize_distributed(f"127.0.0.1:{port}", num_processes=n, process_id=pid)
  import tiny
  from catjax.models import random_model
  from catjax.ptq.calibration import calibrate
  from catjax.models.sharding import make_mesh, shard_model
  assert jax.process_count() == n and len(jax.devices()) == n, jax.devices()
  model = random_model(tiny.config(), seed=2)
  mesh = make_mesh()
  shard_model(model, mesh)
  windows = tiny.tokens((8, 32), 128, seed=3)
  stats = calibrate(model, windows, batch_size=2 * n, progress=False, mesh=mesh)
  out = {s: np.asarray(st.sigma).tolist() for s, st in stats.items()}
  from catjax.analysis.evaluate import perplexity
  ppl = perplexity(model, windows, batch_size=2 * n, progress=False, mesh=mesh).perplexity
  count = {s: int(st.count[0]) for s, st in stats.items()}
  from flax import nnx
  from catjax.artifacts.checkpoint import save_quantized
  from catjax.ptq.engine import quantize_model
  from catjax.base.errors import write_text
  from catjax.ptq.recipe import Recipe
  from catjax.artifacts.stats_file import save_stats
  from catjax.ptq.realization import realize
  tp = shard_model(random_model(tiny.config(), seed=2), make_mesh(f"data=1,model={n}"))
  assert not all(a.is_fully_addressable for a in jax.tree.leaves(nnx.state(tp)))
  qm = quantize_model(tp, None, Recipe(method="cat", block_size=16), stats=stats, progress=False)
  save_quantized(realize(tp, qm), os.path.join(folder, "quantized"))
  save_stats(os.path.join(folder, "stats.npz"), stats)
  write_text(os.path.join(folder, "writer.txt"), str(pid))
  if pid == 0:
    print(json.dumps({"sigma": out, "count": count, "devices": len(jax.devices()),
                      "perplexity": ppl}))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
