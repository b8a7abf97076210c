"""Text, tokenization and evaluation windows (docs/design.md §3–4).

Named text sources:

- `wiki-eval`, `wiki-calib`: the ~10k Wikipedia "vital articles" lead
  paragraphs (`catjax.assets`, asset `wiki-vital-en`), split **by article**:
  an article belongs to the calibration part when the first byte of
  `sha256(title)` is odd, else to the evaluation part (about half each; no
  article is in both). Within a part, articles are ordered by that hash, so
  any prefix of the part is a random sample of topics, the same on every
  machine.
- `brown`: the Brown corpus, POS tags stripped (out-of-domain calibration).
- any other string is read as a local UTF-8 text file.

Documents are joined with "\\n\\n", tokenized once without special tokens,
and cut into non-overlapping windows of `seqlen` tokens (tail dropped).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import numpy as np

from catjax import assets

SOURCES = ("wiki-eval", "wiki-calib", "brown")
_SEP = "\n\n"


def _hash(title: str) -> bytes:
  return hashlib.sha256(title.encode("utf-8")).digest()


def split_articles(articles: dict[str, dict], part: str) -> list[str]:
  """One part ("eval" or "calib") of `{title: {"title", "extract"}}`, in hash order."""
  if part not in ("eval", "calib"):
    raise ValueError(f"part={part!r}; expected 'eval' or 'calib'")
  chosen = [a for a in articles.values()
            if a["extract"].strip() and (_hash(a["title"])[0] % 2 == 1) == (part == "calib")]
  chosen.sort(key=lambda a: _hash(a["title"]))
  return [a["extract"].strip() for a in chosen]


def wiki_documents(part: str, **fetch_kw) -> list[str]:
  """The lead paragraphs of one part ("eval" or "calib") of the Wikipedia split."""
  path = assets.fetch("wiki-vital-en", **fetch_kw)
  return split_articles(json.loads(path.read_text(encoding="utf-8")), part)


def load_text(source: str, **fetch_kw) -> str:
  """The text of a named source (`SOURCES`) or of a local file."""
  if source in ("wiki-eval", "wiki-calib"):
    return _SEP.join(wiki_documents(source.removeprefix("wiki-"), **fetch_kw))
  if source == "brown":
    return assets.fetch("brown", **fetch_kw).read_text(encoding="utf-8")
  path = Path(source).expanduser()
  if not path.is_file():
    raise ValueError(f"text source {source!r} is neither one of {SOURCES} nor an existing file")
  text = path.read_text(encoding="utf-8")
  if not text.strip():
    raise ValueError(f"text file {path} is empty")
  return text


def load_tokenizer(model_path: str | Path):
  """The model's own tokenizer: from GGUF metadata or a Hugging Face folder."""
  path = Path(model_path)
  if path.suffix == ".gguf":
    from catjax.models.gguf import tokenizer_from_gguf
    return tokenizer_from_gguf(path)
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(str(path))


def tokenize(tokenizer, text: str) -> np.ndarray:
  """Token ids of `text` (no special tokens added) as int32."""
  return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)


def make_windows(tokens: np.ndarray, seqlen: int, *, max_tokens: int | None = None) -> np.ndarray:
  """Non-overlapping `(n, seqlen)` windows; at most `max_tokens` tokens in all.

  Raises:
    ValueError: for `seqlen < 2` or when not even one window fits.
  """
  if seqlen < 2:
    raise ValueError(f"seqlen={seqlen} must be >= 2 (a window predicts seqlen-1 tokens)")
  n = len(tokens) // seqlen
  if max_tokens is not None:
    n = min(n, max_tokens // seqlen)
  if n < 1:
    raise ValueError(f"no window of seqlen={seqlen} fits: {len(tokens)} tokens available, "
                     f"max_tokens={max_tokens}")
  return np.asarray(tokens[: n * seqlen], np.int32).reshape(n, seqlen)


@dataclasses.dataclass(frozen=True)
class Windows:
  """Token windows and where they came from (for reports)."""

  tokens: np.ndarray
  source: str

  def to_dict(self) -> dict:
    n, t = self.tokens.shape
    return {"data": self.source, "seqlen": t, "windows": n, "tokens": n * t}


@functools.lru_cache(maxsize=8)
def _tokens(tokenizer, source: str) -> np.ndarray:
  return tokenize(tokenizer, load_text(source))


def text_windows(tokenizer, source: str, *, seqlen: int, max_tokens: int | None = None,
                 ) -> Windows:
  """Windows of `seqlen` tokens of a named source or a text file."""
  tokens = _tokens(tokenizer, source)
  return Windows(make_windows(tokens, seqlen, max_tokens=max_tokens), source)
