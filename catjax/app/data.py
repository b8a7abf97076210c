"""Text, tokenization and evaluation windows (docs/design.md §3–4).

Named text sources:

- `wiki-eval`, `wiki-calib`: the ~10k Wikipedia "vital articles" lead
  paragraphs (`catjax.app.assets`, asset `wiki-vital-en`), split **by article**:
  an article belongs to the calibration part when the first byte of
  `sha256(title)` is odd, else to the evaluation part (about half each; no
  article is in both). Within a part, articles are ordered by that hash, so
  any prefix of the part is a random sample of topics, the same on every
  machine.
- `brown`: the Brown corpus, POS tags stripped (out-of-domain calibration).
- any other string is read as a local UTF-8 text file.

Documents are joined with "\\n\\n", tokenized without special tokens (the
tokens of the last few texts are cached, keyed on the text's sha256, so an
edited file is tokenized again), and cut into non-overlapping windows of
`seqlen` tokens (tail dropped).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from catjax.app import assets
from catjax.base.errors import InputError
from catjax.models.hf import import_transformers

log = logging.getLogger("catjax")

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
  try:
    text = path.read_bytes().decode("utf-8")
  except UnicodeDecodeError as e:
    raise InputError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
  if not text.strip():
    raise InputError(path, "text file is empty")
  return text


def load_tokenizer(model_path: str | Path):
  """The model's own tokenizer: from GGUF metadata or a Hugging Face folder."""
  path = Path(model_path)
  if path.suffix == ".gguf":
    from catjax.models.gguf import tokenizer_from_gguf
    return tokenizer_from_gguf(path)
  return import_transformers().AutoTokenizer.from_pretrained(str(path))


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


_TOKEN_CACHE: collections.OrderedDict = collections.OrderedDict()


def _tokens(tokenizer, source: str) -> np.ndarray:
  """`tokenize(tokenizer, load_text(source))`, the last 8 cached by the text's sha256."""
  text = load_text(source)
  key = (tokenizer, hashlib.sha256(text.encode("utf-8")).digest())
  if key in _TOKEN_CACHE:
    _TOKEN_CACHE.move_to_end(key)
  else:
    _TOKEN_CACHE[key] = tokenize(tokenizer, text)
    while len(_TOKEN_CACHE) > 8:
      _TOKEN_CACHE.popitem(last=False)
  return _TOKEN_CACHE[key]


def check_seqlen(seqlen: int, max_positions: int | None) -> None:
  """Warn (logger "catjax") when windows of `seqlen` tokens are longer than the
  model's `max_position_embeddings`: positions past it were never trained."""
  if max_positions is not None and seqlen > max_positions:
    log.warning("seqlen=%d exceeds the model's max_position_embeddings=%d; results past "
                "position %d are unreliable", seqlen, max_positions, max_positions)


def text_windows(tokenizer, source: str, *, seqlen: int, max_tokens: int | None = None,
                 max_positions: int | None = None) -> Windows:
  """Windows of `seqlen` tokens of a named source or a text file.

  `max_positions`: the model's `max_position_embeddings`, to warn about
  (`check_seqlen`). Raises `ValueError` naming the source (`InputError`, the
  file) and the numbers when not even one window fits.
  """
  check_seqlen(seqlen, max_positions)
  tokens = _tokens(tokenizer, source)
  try:
    return Windows(make_windows(tokens, seqlen, max_tokens=max_tokens), source)
  except ValueError as e:
    if seqlen < 2:
      raise
    if source in SOURCES:
      raise ValueError(f"text source {source!r} is too short: {e}") from None
    raise InputError(Path(source).expanduser(), f"text file is too short: {e}") from None
