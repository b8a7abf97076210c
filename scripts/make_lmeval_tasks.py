"""Build catjax's two offline lm-eval tasks from the Wikipedia eval split
(the `wiki` asset, `catjax.app.data.wiki_documents("eval")`), deterministically:

* `wiki_lastword.json` — LAMBADA-style last-word prediction: the first
  sentences of an article (40–120 words) whose last word (alphabetic, at least
  4 letters) already occurs earlier in the passage, so context can predict it;
  `context` is the passage up to that word, `target` the word.
* `wiki_cloze.json` — multiple-choice cloze: a sentence of an article (after
  up to two preceding sentences as context) cut before one of its words
  (alphabetic, at least 5 letters, not the first); four choices, the word and
  three other words of the same article (same length class), shuffled.

    python scripts/make_lmeval_tasks.py [--n 500]

Writes catjax/app/lmeval_tasks/{wiki_lastword,wiki_cloze}.json.
"""

import argparse
import json
import random
import re
from pathlib import Path

from catjax.app import wiki_documents

OUT = Path(__file__).resolve().parents[1] / "catjax" / "app" / "lmeval_tasks"
SENTENCE = re.compile(r"(?<=[.!?])\s+")
WORD = re.compile(r"[A-Za-z]+")


def lastword(docs, n, rng):
  rows = []
  for doc in docs:
    passage = []
    for s in SENTENCE.split(doc):
      passage.append(s)
      words = " ".join(passage).split()
      if len(words) >= 40:
        break
    words = " ".join(passage).split()
    if not 40 <= len(words) <= 120:
      continue
    last = words[-1].rstrip(".!?,;:\"')")
    if not (WORD.fullmatch(last) and len(last) >= 4):
      continue
    earlier = " ".join(words[:-1])
    if not re.search(rf"\b{re.escape(last)}\b", earlier):
      continue
    rows.append({"context": earlier, "target": last})
  rng.shuffle(rows)
  return rows[:n]


def cloze(docs, n, rng):
  rows = []
  for doc in docs:
    sents = SENTENCE.split(doc)
    vocab = sorted({w for w in WORD.findall(doc) if len(w) >= 5})
    if len(sents) < 2 or len(vocab) < 8:
      continue
    i = rng.randrange(1, len(sents))
    words = sents[i].split()
    spots = [j for j, w in enumerate(words[1:], 1) if WORD.fullmatch(w) and len(w) >= 5]
    if not spots:
      continue
    j = rng.choice(spots)
    answer = words[j]
    pool = [w for w in vocab if w.lower() != answer.lower() and abs(len(w) - len(answer)) <= 2]
    if len(pool) < 3:
      continue
    choices = rng.sample(pool, 3) + [answer]
    rng.shuffle(choices)
    context = " ".join(sents[max(0, i - 2):i] + [" ".join(words[:j])])
    rows.append({"context": context, "choices": choices, "label": choices.index(answer)})
  rng.shuffle(rows)
  return rows[:n]


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=500)
  args = p.parse_args()
  docs = wiki_documents("eval")
  for name, build in (("wiki_lastword", lastword), ("wiki_cloze", cloze)):
    rows = build(docs, args.n, random.Random(0))
    (OUT / f"{name}.json").write_text(json.dumps(rows, indent=0, ensure_ascii=False) + "\n")
    print(f"{name}: {len(rows)} examples")


if __name__ == "__main__":
  main()
