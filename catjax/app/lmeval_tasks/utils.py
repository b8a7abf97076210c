"""Datasets of catjax's offline lm-eval tasks: the JSON files next to this one
(built by scripts/make_lmeval_tasks.py from the Wikipedia eval split)."""

import json
from pathlib import Path


def _load(name):
  import datasets
  rows = json.loads((Path(__file__).with_name(f"{name}.json")).read_text(encoding="utf-8"))
  return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def wiki_lastword(**_):
  return _load("wiki_lastword")


def wiki_cloze(**_):
  return _load("wiki_cloze")
