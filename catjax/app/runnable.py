""""""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


from catjax.models.llama import Llama
from catjax.ptq.quantized import QuantizedModel
from catjax.artifacts.checkpoint import CheckpointError, is_quantized_checkpoint, load_quantized
from catjax.app.assets import resolve_model


@dataclasses.dataclass(frozen=True)
class Runnable:
  """A model ready to run: full precision or quantized, with its tokenizer.

  Run it with `forward(r.model, tokens, hook=r.hook, hook_state=r.hook_state)`
  (hook None for a full-precision model).
  """

  model: Llama
  tokenizer: Any
  path: Path
  hook: Any = None
  hook_state: Any = None
  quantized: QuantizedModel | None = None


def load_runnable(model: str | Path, *, dtype="float32", mesh=None) -> Runnable:
  """What `catjax eval --model` takes: a quantized checkpoint folder
  (`load_quantized`; `dtype` is the checkpoint's own), a model name, a `.gguf`
  file or a Hugging Face folder (`catjax.app.runnable.load_pretrained`)."""
  if is_quantized_checkpoint(model):
    qm, tokenizer = load_quantized(model)
    if tokenizer is None:
      raise CheckpointError(f"{model}: the checkpoint has no tokenizer files")
    return Runnable(qm.model, tokenizer, Path(model), qm.hook, qm.transforms, qm)
  m, tokenizer, path = load_pretrained(model, dtype=dtype, mesh=mesh)
  return Runnable(m, tokenizer, path)


def load_pretrained(model: str | Path, *, dtype="float32", mesh=None):
  """`(model, tokenizer, path)` for a name such as "smollm2-135m" (fetched and
  cached here), a `.gguf` file or a Hugging Face folder; with a `mesh`, every
  parameter is loaded straight onto its sharding (`catjax.models.sharding.placement`)."""
  import jax.numpy as jnp

  from catjax.app.data import load_tokenizer
  from catjax.models import load_model
  from catjax.models.sharding import placement
  path = resolve_model(str(model))
  place = None if mesh is None else placement(mesh)
  return load_model(path, dtype=jnp.dtype(dtype), place=place), load_tokenizer(path), path
