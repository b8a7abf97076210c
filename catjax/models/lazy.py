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
    files: optional `{name: file}` each tensor is read from (for messages).
    labels: optional `{name: how to name it}` in messages (default `repr(name)`).
  """

  def __init__(self, loaders: Mapping[str, Callable[[], np.ndarray]],
               shapes: Mapping[str, tuple[int, ...]] | None = None, *,
               files: Mapping[str, str] | None = None, labels: Mapping[str, str] | None = None):
    self._loaders = dict(loaders)
    self._shapes = dict(shapes or {})
    self._files = dict(files or {})
    self._labels = dict(labels or {})

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

  def header_shape(self, name: str) -> tuple[int, ...] | None:
    """The tensor's shape when its file's header gives it (nothing read), else None."""
    return tuple(self._shapes[name]) if name in self._shapes else None

  def file(self, name: str) -> str | None:
    """The file the tensor is read from, when known."""
    return self._files.get(name)

  def label(self, name: str) -> str:
    """The tensor's name for messages (with its name in the file where that differs)."""
    return self._labels.get(name, repr(name))
