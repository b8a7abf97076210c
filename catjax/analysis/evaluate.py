"""Perplexity in a jitted loop (docs/design.md §3).

Perplexity is token-level: `exp(mean NLL)` over every predicted token of every
window (each window of `seqlen` tokens predicts its last `seqlen - 1`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from catjax.models.llama import Hook, Llama
from catjax.models.sharding import host_value, shard_batch


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerplexityResult:
  """A perplexity and everything needed to reproduce it."""

  perplexity: float
  nll: float
  model: str
  data: str
  seqlen: int
  windows: int
  tokens: int
  predicted_tokens: int
  dtype: str
  batch_size: int
  seconds: float
  tokens_per_second: float

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def token_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Negative log-likelihood of `tokens[:, 1:]` under `logits[:, :-1]`, `(B, T-1)`."""
  logits = logits[:, :-1].astype(jnp.float32)
  target = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - target


@functools.partial(jax.jit, static_argnames=("graphdef", "hook"))
def _window_nll(graphdef, state, tokens, hook, hook_state):
  model = nnx.merge(graphdef, state)
  logits = model(tokens, hook=hook, hook_state=hook_state)
  if hook is not None:
    logits = logits[0]
  return token_nll(logits, tokens).sum(axis=-1)


def window_nll(model: Llama, *, hook: Hook | None = None, hook_state=None, mesh=None):
  """A function `tokens (B, T) -> (B,)` float64 summed NLL per window (jitted
  forward); with a `mesh` (`catjax.models.sharding`) the windows split over its data axis."""
  graphdef, state = nnx.split(model)
  return lambda tokens: np.asarray(host_value(_window_nll(
      graphdef, state, shard_batch(np.asarray(tokens, np.int32), mesh), hook, hook_state)),
      np.float64)


def perplexity(model: Llama, windows: np.ndarray, *, batch_size: int = 1,
               hook: Hook | None = None, hook_state=None, model_name: str = "model",
               data_name: str = "text", progress: bool = True, mesh=None) -> PerplexityResult:
  """Perplexity of `model` over `windows (n, seqlen)`, `batch_size` windows per step.

  `hook` / `hook_state` run the forward with a site hook (e.g. quantization).
  With a `mesh`, each batch splits over its data axis (place the model with
  `catjax.models.sharding.shard_model`). The NLL is summed in float64 on the host.
  """
  windows = np.asarray(windows, np.int32)
  if windows.ndim != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
    raise ValueError(f"windows.shape={windows.shape}; expected (n >= 1, seqlen >= 2)")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  n, seqlen = windows.shape
  nll_fn = window_nll(model, hook=hook, hook_state=hook_state, mesh=mesh)
  total = 0.0
  start = time.perf_counter()
  bar = tqdm(total=n, desc=f"perplexity {model_name} T={seqlen}", unit="win",
             disable=not progress, leave=False)
  for i in range(0, n, batch_size):
    batch = windows[i:i + batch_size]
    total += float(nll_fn(batch).sum())
    bar.update(len(batch))
    bar.set_postfix(ppl=f"{math.exp(total / ((i + len(batch)) * (seqlen - 1))):.3f}")
  bar.close()
  seconds = time.perf_counter() - start
  predicted = n * (seqlen - 1)
  nll = total / predicted
  return PerplexityResult(
      perplexity=math.exp(nll), nll=nll, model=model_name, data=data_name, seqlen=seqlen,
      windows=n, tokens=n * seqlen, predicted_tokens=predicted, dtype=str(model.dtype),
      batch_size=batch_size, seconds=seconds, tokens_per_second=n * seqlen / seconds)
