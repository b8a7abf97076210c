"""Calibration: per-site second moments of every block in one jitted pass per batch."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from catjax.models.config import ModelConfig
from catjax.models.llama import Llama
from catjax.models.spec import spec_for
from catjax.models.sharding import shard_batch
from catjax.core.stats import SecondMoment


def init_stats(cfg: ModelConfig) -> dict[str, SecondMoment]:
  """Empty per-site statistics, stacked over the `num_layers` blocks."""
  n = cfg.num_layers
  return {site: jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)),
                             SecondMoment.zeros(d, dtype=jnp.float32))
          for site, d in spec_for(cfg).site_dims(cfg).items()}


def stats_hook(site, x, state):
  """Site hook that adds `x` to this site's `SecondMoment` (the hook state)."""
  return x, (None if state is None else state.update(x))


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("stats",))
def _calibration_step(graphdef, params, tokens, stats):
  _, out = nnx.merge(graphdef, params)(tokens, hook=stats_hook, hook_state=stats)
  return {site: out[site] for site in stats}


def calibrate(model: Llama, windows: np.ndarray, *, batch_size: int = 1,
              stats: dict[str, SecondMoment] | None = None,
              progress: bool = True, mesh=None) -> dict[str, SecondMoment]:
  """Accumulate `Σ x xᵀ`, per-channel `max |x|` and token counts of every site
  of every block at once, in full precision.

  One jitted forward per batch of windows updates the statistics inside the
  model's site hook; memory is that of the statistics (`L · Σ d²` floats),
  whatever the number of tokens. For analysis and `save_stats`; quantization
  walks the model block by block instead (`catjax.ptq.engine`), holding one
  block's statistics. Pass `stats` to continue an accumulation. With a
  `mesh` (`catjax.models.sharding`) the windows split over its data axis and the
  sums are all-reduced over it.

  Returns:
    `{site: SecondMoment}` with a leading `num_layers` axis.
  """
  windows = np.asarray(windows, np.int32)
  if windows.ndim != 2 or windows.shape[0] < 1:
    raise ValueError(f"windows.shape={windows.shape}; expected (n >= 1, seqlen)")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  stats = init_stats(model.config) if stats is None else stats
  graphdef, params = nnx.split(model)
  for i in tqdm(range(0, len(windows), batch_size), desc="calibration", unit="batch",
                disable=not progress, leave=False):
    stats = _calibration_step(graphdef, params, shard_batch(windows[i:i + batch_size], mesh), stats)
  return stats


def model_fingerprint(model: Llama) -> str:
  """A short hash of `model`'s configuration and weights, to tell which model
  statistics came from: every parameter's path, shape and first 1024 values
  rounded to bfloat16 (so the same checkpoint loaded in float32 or bfloat16
  has the same fingerprint)."""
  import hashlib
  h = hashlib.sha256(json.dumps(model.config.to_hf(), sort_keys=True, default=str).encode())
  for path, var in sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                          key=lambda kv: tuple(map(str, kv[0]))):
    value = var[...]
    head = np.asarray(value.reshape(-1)[:1024].astype(jnp.bfloat16))
    h.update(f"{'.'.join(map(str, path))}{tuple(value.shape)}".encode() + head.tobytes())
  return h.hexdigest()[:16]
