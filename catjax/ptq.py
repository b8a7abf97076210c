"""Post-training quantization pipeline: calibrate -> fit -> transform -> quantize.

The one table of the pipeline is `SITE_LINEARS`: which linears of a decoder
block read each quantization site (DESIGN §2). Everything else — Grams for
shared inputs, where the inverse transforms are merged — is derived from it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from catjax.models.config import ModelConfig
from catjax.models.llama import SITES, Llama
from catjax.stats import SecondMoment

# site -> the linears (paths under the stacked `layers`) whose input it is.
SITE_LINEARS: dict[str, tuple[tuple[str, str], ...]] = {
    "attn_in": (("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj")),
    "o_in": (("attn", "o_proj"),),
    "mlp_in": (("mlp", "gate_proj"), ("mlp", "up_proj")),
    "down_in": (("mlp", "down_proj"),),
}
assert tuple(SITE_LINEARS) == SITES


def site_dims(cfg: ModelConfig) -> dict[str, int]:
  """Input width of every site."""
  return {"attn_in": cfg.hidden_size, "o_in": cfg.num_heads * cfg.head_dim,
          "mlp_in": cfg.hidden_size, "down_in": cfg.intermediate_size}


def init_stats(cfg: ModelConfig) -> dict[str, SecondMoment]:
  """Empty per-site statistics, stacked over the `num_layers` blocks."""
  return {site: jax.tree.map(lambda a: jnp.broadcast_to(a, (cfg.num_layers, *a.shape)),
                             SecondMoment.zeros(d, dtype=jnp.float32))
          for site, d in site_dims(cfg).items()}


def _stats_hook(site, x, state):
  return x, state.update(x)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("stats",))
def _calibration_step(graphdef, params, tokens, stats):
  _, stats = nnx.merge(graphdef, params)(tokens, hook=_stats_hook, hook_state=stats)
  return stats


def calibrate(model: Llama, windows: np.ndarray, *, batch_size: int = 1,
              stats: dict[str, SecondMoment] | None = None,
              progress: bool = True) -> dict[str, SecondMoment]:
  """Accumulate `Σ x xᵀ`, per-channel `max |x|` and token counts of every site.

  One jitted forward per batch of windows updates the statistics inside the
  model's site hook; memory is that of the statistics (`L · Σ d²` floats),
  whatever the number of tokens. Pass `stats` to continue an accumulation.

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
    stats = _calibration_step(graphdef, params, jnp.asarray(windows[i:i + batch_size]), stats)
  return stats
