"""The error policy, in one place.

User errors (a bad file, value, flag or configuration) raise `ValueError` (or
`FileNotFoundError` / another `OSError` for the file system) with a message
that names the file, tensor, key or argument and says what was expected.
`InputError` is the `ValueError` catjax raises for bad *input files*; it
carries the path. The CLI prints any of these as one line and exits 2
(`--debug` shows the traceback); anything else is a bug and keeps its
traceback.

Outputs are checked writable before any work (`check_writable`) and written
atomically (`atomic_write`: a temporary file beside the target, renamed over
it once complete), so an interrupted run never leaves a partial file that a
later run would read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np


class InputError(ValueError):
  """A bad input file: `path` and what is wrong with it."""

  def __init__(self, path: str | Path, problem: str):
    self.path = str(path)
    self.problem = problem
    super().__init__(f"{path}: {problem}")


def check_finite(name: str, array, *, where: str | Path | None = None) -> None:
  """Raise `ValueError` (`InputError` when `where` names a file) if `array`
  holds NaN or ±Inf, naming `name` and how many values are bad."""
  a = np.asarray(array)
  if not np.issubdtype(a.dtype, np.floating) and a.dtype.kind != "V":
    return
  finite = np.isfinite(a.astype(np.float32, copy=False))
  if finite.all():
    return
  bad = int(finite.size - np.count_nonzero(finite))
  problem = f"{name} has {bad} non-finite value(s) (NaN or Inf) out of {a.size}"
  raise InputError(where, problem) if where is not None else ValueError(problem)


def check_writable(path: str | Path, *, what: str = "output") -> Path:
  """Check, before any work, that `path` can be written: not a folder, and its
  folder exists (or can be created) and is writable. Returns the path."""
  path = Path(path)
  if path.is_dir():
    raise IsADirectoryError(f"{what} {path} is a folder; expected a file path")
  folder = path.parent
  existing = folder
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise NotADirectoryError(f"{what} {path}: {existing} is not a folder")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise PermissionError(f"{what} {path}: folder {existing} is not writable")
  if path.exists() and not os.access(path, os.W_OK):
    raise PermissionError(f"{what} {path} exists and is not writable")
  return path


@contextlib.contextmanager
def atomic_write(path: str | Path, *, suffix: str | None = None) -> Iterator[Path]:
  """Yield a temporary path beside `path`; on success rename it over `path`,
  on any error (or interrupt) remove it. `suffix`: the temporary file's
  suffix (default: `path`'s, for writers that insist on one). Outside
  process 0 of a multi-process run the file is discarded (`is_writer`)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix if suffix is None
                             else suffix, dir=path.parent)
  os.close(fd)
  tmp = Path(tmp)
  try:
    yield tmp
    if is_writer():
      if tmp.is_file():  # mkstemp made it 0600: give it the mode open() would
        os.chmod(tmp, 0o666 & ~_umask())
      os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def is_writer() -> bool:
  """Whether this process writes the run's files: in a multi-process
  (`jax.distributed`) run only process 0 does; the others compute alike and
  discard what they would have written."""
  import jax
  return jax.process_index() == 0


def write_text(path: str | Path, text: str) -> Path:
  """`Path.write_text`, atomically."""
  with atomic_write(path) as tmp:
    tmp.write_text(text)
  return Path(path)


def read_json(path: str | Path):
  """The JSON value in the file `path`: an `OSError` naming it when it cannot
  be read, `InputError` when it is not UTF-8 JSON."""
  path = Path(path)
  data = path.read_bytes()
  try:
    return json.loads(data.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise InputError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise InputError(path, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def sha256_file(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()
