"""The package's floors: every import inside `catjax` points down (or sideways
within a floor), read from the modules' own source, so the rule keeps holding
as modules are added."""

import ast
from pathlib import Path

import pytest

import catjax

PKG = Path(catjax.__file__).parent
# Bottom to top. A module may import from its own floor and the floors below it.
FLOORS = ("base", "core", "kernels", "models", "ptq", "artifacts", "analysis", "app")
# Floors that may not import Flax (the math core and below; kernels are pure JAX).
NO_FLAX = ("base", "core", "kernels")


def _modules():
  for path in sorted(PKG.rglob("*.py")):
    rel = path.relative_to(PKG)
    if len(rel.parts) > 1:  # catjax/__init__.py and __main__.py are the top, above every floor
      yield rel.parts[0], ".".join(("catjax", *rel.with_suffix("").parts)), path


def _imports(path: Path, module: str):
  """`(line, imported module, imported names)` of every import, also those inside functions."""
  tree = ast.parse(path.read_text(), str(path))
  package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        yield node.lineno, a.name, ()
    elif isinstance(node, ast.ImportFrom):
      name = node.module or ""
      if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        name = ".".join(base + ([name] if name else []))
      yield node.lineno, name, tuple(a.name for a in node.names)


def _floor(name: str) -> str | None:
  parts = name.split(".")
  return parts[1] if parts[0] == "catjax" and len(parts) > 1 and parts[1] in FLOORS else None


def test_every_module_lives_on_a_floor():
  loose = [p.name for p in PKG.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
  assert not loose, f"modules outside the floors {FLOORS}: {loose}"
  assert sorted(p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__") == \
      sorted(FLOORS)


@pytest.mark.parametrize("floor", FLOORS)
def test_imports_point_down(floor):
  rank = FLOORS.index(floor)
  bad = []
  for f, module, path in _modules():
    if f != floor:
      continue
    for line, name, names in _imports(path, module):
      target = _floor(name)
      if name == "catjax" and names:  # `from catjax import X`: the top, above every floor
        bad.append(f"{module}:{line} imports from the package top ({', '.join(names)})")
      elif target is not None and FLOORS.index(target) > rank:
        bad.append(f"{module}:{line} imports {name} (floor {target!r} is above {floor!r})")
      if floor in NO_FLAX and name.split(".")[0] == "flax":
        bad.append(f"{module}:{line} imports Flax")
  assert not bad, "\n".join(bad)


def test_no_private_names_cross_modules():
  bad = []
  for _, module, path in _modules():
    for line, name, names in _imports(path, module):
      private = [n for n in names if n.startswith("_")]
      if name.startswith("catjax") and private:
        bad.append(f"{module}:{line} imports {private} from {name}")
  assert not bad, "\n".join(bad)


def test_the_rule_sees_an_upward_import(tmp_path):
  """The checker itself: an import from a higher floor, inside a function, is found."""
  src = tmp_path / "m.py"
  src.write_text("def f():\n  from catjax.app.cli import main\n  from ..ptq import recipe\n")
  got = [(n, _floor(n)) for _, n, _ in _imports(src, "catjax.core.m")]
  assert got == [("catjax.app.cli", "app"), ("catjax.ptq", "ptq")]


# -- benchmarks, examples and scripts use the public API only ------------------------

ROOT = PKG.parent
PUBLIC_PACKAGES = ("catjax", *(f"catjax.{f}" for f in FLOORS))


def _public_uses(path: Path):
  """`(line, what)` of every use of catjax outside the public names: `from X import n`
  with X not `catjax` or a floor package or `n` not in X's `__all__`, `import
  catjax.X.Y`, and `alias.n` on `import catjax as alias` with `n` not public."""
  import importlib
  tree = ast.parse(path.read_text(), str(path))
  aliases = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "catjax":
      if node.module not in PUBLIC_PACKAGES:
        yield node.lineno, f"from {node.module} import ..."
        continue
      public = importlib.import_module(node.module).__all__
      for a in node.names:
        if a.name not in public and not (node.module == "catjax" and a.name in FLOORS):
          yield node.lineno, f"from {node.module} import {a.name}"
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split(".")[0] == "catjax":
          if a.name not in PUBLIC_PACKAGES:
            yield node.lineno, f"import {a.name}"
          aliases[a.asname or "catjax"] = a.name
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
        and aliases.get(node.value.id) == "catjax" and node.attr not in catjax.__all__:
      yield node.lineno, f"{node.value.id}.{node.attr}"


@pytest.mark.parametrize("folder", ["benchmarks", "examples", "scripts"])
def test_outside_code_uses_only_public_names(folder):
  bad = [f"{p.relative_to(ROOT)}:{line}: {what}" for p in sorted((ROOT / folder).rglob("*.py"))
         for line, what in _public_uses(p)]
  assert not bad, "use the public API (catjax.__all__ or a floor package's __all__):\n" + \
      "\n".join(bad)


def test_floor_packages_export_what_they_list():
  import importlib
  for name in PUBLIC_PACKAGES:
    package = importlib.import_module(name)
    for n in package.__all__:
      if n in ("lmeval", "qwix_interop"):  # need the optional extras
        continue
      value = getattr(package, n)
      # a submodule of the same name would shadow the name once it is imported
      folder = Path(package.__file__).parent
      assert isinstance(value, type(catjax)) or not (
          (folder / f"{n}.py").exists() or (folder / n).is_dir()), f"{name}.{n} is also a module"
