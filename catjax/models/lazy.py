"""Checkpoint tensors by name, each read only when it is asked for.

Loaders hand `catjax.models.loading.params_from_hf` a `LazyTensors`: it reads
one tensor (memory-mapped from its file), converts it into the model's buffer
in the target dtype and drops it before reading the next, so loading never
holds the checkpoint and the model at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np


class LazyTensors(Mapping):
  """A read-only `{name: np.ndarray}` whose values are read on every access (not cached).

  Args:
    loaders: `{name: () -> array}`.
    shapes: optional `{name: shape}` known without reading (file headers).
  """

  def __init__(self, loaders: Mapping[str, Callable[[], np.ndarray]],
               shapes: Mapping[str, tuple[int, ...]] | None = None):
    self._loaders = dict(loaders)
    self._shapes = dict(shapes or {})

  def __getitem__(self, name: str) -> np.ndarray:
    return np.asarray(self._loaders[name]())

  def __iter__(self) -> Iterator[str]:
    return iter(self._loaders)

  def __len__(self) -> int:
    return len(self._loaders)

  def shape(self, name: str) -> tuple[int, ...]:
    """The tensor's shape, from the header when known, else by reading it."""
    if name not in self._loaders:
      raise KeyError(name)
    return tuple(self._shapes[name]) if name in self._shapes else self[name].shape
