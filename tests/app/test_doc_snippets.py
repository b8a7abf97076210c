"""Every Python block of the README and docs/api.md runs as written, top to bottom
in one namespace per page (a page reads like a notebook), on a tiny model: the
named models load a tiny Hugging Face folder and named texts a tiny text file,
so the names, arguments and attributes the docs use are the library's."""

import re
from pathlib import Path

import pytest

import tiny
from catjax.app import data, runnable

ROOT = Path(__file__).resolve().parents[2]
PAGES = ["README.md", "docs/api.md"]
LMEVAL = "# needs the optional extra"


def blocks(page: str) -> list[str]:
  return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), flags=re.S)


@pytest.fixture
def tiny_world(tmp_path, monkeypatch):
  folder = tmp_path / "tiny-model"
  tiny.hf_folder(folder, seed=5, intermediate_size=128)
  text = tmp_path / "text.txt"
  text.write_text(tiny.TEXT * 40)
  real_load, real_windows = runnable.load_pretrained, data.text_windows
  monkeypatch.setattr(runnable, "load_pretrained", lambda name, **kw: real_load(folder, **kw))
  # the docs' window sizes, scaled down to a few short windows of the tiny text
  monkeypatch.setattr(data, "text_windows", lambda tok, source, *, seqlen, max_tokens=None, **kw:
                      real_windows(tok, str(text), seqlen=32, max_tokens=4 * 32))
  monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("page", PAGES)
def test_page_blocks_run_as_written(page, tiny_world, capsys):
  found = blocks(page)
  assert found, f"{page} has no Python blocks"
  namespace = {"__name__": "__doc_snippet__"}
  for i, code in enumerate(found):
    compiled = compile(code, f"{page} block {i + 1}", "exec")
    if code.startswith(LMEVAL):
      continue  # lm-eval on its tasks: tests/app/test_lmeval.py runs the model type
    exec(compiled, namespace)  # noqa: S102 - the docs' own code
  assert "out" in {p.name for p in Path.cwd().iterdir()}  # the pages write their outputs here
