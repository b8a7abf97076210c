"""The docs keep up with the code: every CLI flag is in docs/cli.md, every public
name in docs/api.md, the README stays short and every link points at a file."""

import re
from pathlib import Path

import pytest

import catjax
from catjax.app.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _subcommands():
  parser = build_parser()
  (sub,) = [a for a in parser._actions if a.choices and isinstance(a.choices, dict)]
  return sub.choices


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_cli_flag_is_documented(command):
  text = (DOCS / "cli.md").read_text()
  flags = [s for a in _subcommands()[command]._actions for s in a.option_strings
           if s.startswith("--") and s != "--help"]
  assert flags, command
  missing = [f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", text)]
  assert not missing, f"catjax {command}: flags missing from docs/cli.md: {missing}"


def test_every_public_name_is_documented():
  text = (DOCS / "api.md").read_text()
  missing = [n for n in catjax.__all__ if not re.search(rf"\b{re.escape(n)}\b", text)]
  assert not missing, f"public names missing from docs/api.md: {missing}"


def test_readme_is_short_and_links_resolve():
  readme = (ROOT / "README.md").read_text()
  assert len(readme.splitlines()) <= 200
  for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
    for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
      if "://" not in link:
        assert (page.parent / link).exists(), f"{page.name}: broken link {link}"
