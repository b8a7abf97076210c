"""Public names of a package that load on first use: importing a package costs
nothing until a name is asked for, and packages never import each other in cycles."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_names(package: str, names: dict[str, str], modules: tuple[str, ...] = ()
               ) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
  """`(__getattr__, __dir__, __all__)` for `package`: `names` maps each public name
  to the module it comes from (relative to `package` when it starts with ".");
  `modules` are public submodules, given by their names."""
  public = sorted({*names, *modules})

  def __getattr__(name: str) -> Any:
    if name in modules:
      return importlib.import_module(f"{package}.{name}")
    if name in names:
      return getattr(importlib.import_module(names[name], package), name)
    raise AttributeError(f"module {package!r} has no attribute {name!r}")

  def __dir__() -> list[str]:
    return public

  return __getattr__, __dir__, public
