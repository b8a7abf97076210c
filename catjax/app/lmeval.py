"""An lm-eval-harness model type "catjax": any model catjax runs, scored by lm-eval.

`import catjax.app.lmeval` registers it, after which

    lm_eval.simple_evaluate(model="catjax", model_args="model=DIR_OR_NAME", tasks=[...],
                            task_manager=lm_eval.tasks.TaskManager(include_path=TASKS_DIR))

works. `model=` takes what `catjax eval --model` takes: a quantized checkpoint
folder (real integer model), a model name, a `.gguf` file or a Hugging Face
folder. `recipe=SPEC` (e.g. `cat@k64`, `hadamard`, `none@w6a6`) fake-quantizes
a full-precision model on the fly with the block engine, calibrated on
`calib_windows` × 512 wiki-calib tokens. Other arguments: `dtype`,
`batch_size`, `max_length` (default 2048).

lm-eval has no plugin entry point for model types, so its own command line
cannot see this one; `python -m catjax.app.lmeval ARGS` (or `catjax-lm-eval ARGS`)
is lm-eval's command line with "catjax" registered and catjax's offline
tasks (`TASKS_DIR`: `catjax_wiki_lastword`, `catjax_wiki_cloze`) on the
include path.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import lm_eval.models  # noqa: F401  lm-eval's own models first: its registry loads them only while empty
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from catjax.app.runnable import Runnable, load_runnable
from catjax.models import forward, generate_batch
from catjax.app.specs import parse_spec

TASKS_DIR = Path(__file__).with_name("lmeval_tasks")
_LENGTH_BUCKET = 64  # padded lengths are multiples of this (few compiled shapes)


@jax.jit
def _score(logits, targets, mask):
  """Per row: the sum of target log-probabilities over `mask`, and whether every
  masked target is the argmax."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  greedy = jnp.argmax(logits, axis=-1) == targets
  return (jnp.sum(jnp.where(mask, picked, 0.0), axis=-1),
          jnp.all(jnp.where(mask, greedy, True), axis=-1))


@register_model("catjax")
class CatjaxLM(TemplateLM):
  """lm-eval's `LM` over a catjax model (full precision, fake- or real-quantized)."""

  def __init__(self, model: str | Runnable = "smollm2-135m", dtype: str = "float32",
               batch_size: int | str = 8, max_length: int | None = None,
               recipe: str | None = None, calib_windows: int = 32, **kwargs):
    super().__init__()
    r = model if isinstance(model, Runnable) else load_runnable(model, dtype=dtype)
    if recipe:
      if r.quantized is not None:
        raise ValueError(f"recipe={recipe!r} given for the quantized checkpoint {r.path}")
      from catjax.app.data import text_windows
      from catjax.ptq.engine import quantize_model
      calib = text_windows(r.tokenizer, "wiki-calib", seqlen=512,
                           max_tokens=int(calib_windows) * 512).tokens
      qm = quantize_model(r.model, calib, parse_spec(recipe))
      r = Runnable(qm.model, r.tokenizer, r.path, qm.hook if qm.policy.quantized else None,
                   qm.transforms, qm)
    self.runnable, self.tokenizer = r, r.tokenizer
    self.batch_size = 8 if batch_size == "auto" else int(batch_size)
    if self.batch_size < 1:
      raise ValueError(f"batch_size={batch_size!r}: expected a positive integer")
    self._max_length = int(max_length or min(2048, r.model.config.max_position_embeddings))

  @property
  def eot_token_id(self) -> int:
    eos = self.tokenizer.eos_token_id
    if eos is None:
      eos = self.runnable.model.config.eos_token_id
    return int(eos[0] if isinstance(eos, (list, tuple)) else eos)

  @property
  def max_length(self) -> int:
    return self._max_length

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    if add_special_tokens is None:
      return self.tokenizer.encode(string)
    return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

  def tok_decode(self, tokens) -> str:
    return self.tokenizer.decode(tokens)

  def _logits(self, tokens: np.ndarray):
    r = self.runnable
    out = forward(r.model, tokens, hook=r.hook, hook_state=r.hook_state)
    return out[0] if isinstance(out, tuple) else out

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """Batched: requests sorted by length, right-padded to a multiple of 64 tokens
    (causal attention: padding never reaches the scored positions)."""
    rows = []
    for _, context, continuation in requests:
      whole = (list(context) + list(continuation))[-(self.max_length + 1):]
      rows.append((whole[:-1], whole[1:], min(len(continuation), len(whole) - 1)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results = [None] * len(rows)
    for start in tqdm(range(0, len(order), self.batch_size), desc="catjax loglikelihood",
                      disable=disable_tqdm):
      idx = order[start:start + self.batch_size]
      longest = max(len(rows[i][0]) for i in idx)
      width = min(-(-longest // _LENGTH_BUCKET) * _LENGTH_BUCKET, self.max_length)
      tokens = np.zeros((self.batch_size, width), np.int32)
      targets = np.zeros_like(tokens)
      mask = np.zeros(tokens.shape, bool)
      for b, i in enumerate(idx):
        inp, tgt, n = rows[i]
        tokens[b, :len(inp)], targets[b, :len(tgt)] = inp, tgt
        mask[b, len(tgt) - n:len(tgt)] = True
      logp, greedy = jax.device_get(_score(self._logits(tokens), targets, mask))
      for b, i in enumerate(idx):
        results[i] = (float(logp[b]), bool(greedy[b]))
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Whole-document log-likelihoods: disjoint windows of `max_length` tokens,
    the first conditioned on the end-of-text token; all documents' windows
    are scored in one batched pass."""
    windows, owner = [], []
    for i, (string,) in enumerate(r.args for r in requests):
      for c, t in map(make_disjoint_window, get_rolling_token_windows(
          self.tok_encode(string), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)):
        windows.append((None, c, t))
        owner.append(i)
    out = [0.0] * len(requests)
    # Every document's windows in one batched pass.
    for i, (lp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
      out[i] += lp
    return out

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy (or sampled, with `do_sample` and `temperature`) continuation of each
    context, cut at the first stop string of `until` or the end-of-text token.
    Batched: requests with the same generation arguments, longest prompts
    first, `batch_size` at a time (`models.generate_batch`, left padding
    masked); each row stops on its own."""
    r = self.runnable
    eot = self.tok_decode([self.eot_token_id])
    jobs = []
    for i, (context, gen_kwargs) in enumerate(q.args for q in requests):
      kw = dict(gen_kwargs)
      until = kw.get("until", [])
      until = [until] if isinstance(until, str) else list(until)
      until += [eot] if eot not in until else []  # as HFLM: the end-of-text text never shows
      max_new = int(kw.get("max_gen_toks", 256))
      temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
      ids = self.tok_encode(context)[-(self.max_length - max_new):]
      jobs.append((i, ids, until, max_new, temperature))
    groups: dict[tuple, list] = {}
    for job in sorted(jobs, key=lambda j: -len(j[1])):
      groups.setdefault((job[3], job[4]), []).append(job)
    out = [""] * len(jobs)
    batches = [g[k:k + self.batch_size] for g in groups.values()
               for k in range(0, len(g), self.batch_size)]
    for batch in tqdm(batches, desc="catjax generate", disable=disable_tqdm):
      new = [[] for _ in batch]

      def stop(row, token):
        new[row].append(token)
        return any(s in self.tok_decode(new[row]) for s in batch[row][2])

      generate_batch(r.model, [j[1] for j in batch], max_new_tokens=batch[0][3], hook=r.hook,
                     hook_state=r.hook_state, eos_token_id=self.eot_token_id,
                     temperature=batch[0][4], on_token=stop)
      for job, tokens in zip(batch, new):
        text = self.tok_decode(tokens)
        for s in job[2]:
          text = text.split(s)[0]
        out[job[0]] = text
    return out


def main(argv: list[str] | None = None) -> None:
  """lm-eval's command line with the "catjax" model type and catjax's tasks."""
  from lm_eval.__main__ import cli_evaluate

  from catjax.app.cli import quiet_backend_probe
  quiet_backend_probe()
  args = sys.argv[1:] if argv is None else list(argv)
  if not any(a.startswith("--include_path") for a in args):
    args += ["--include_path", str(TASKS_DIR)]
  sys.argv = ["lm_eval", *args]
  cli_evaluate()


if __name__ == "__main__":
  main()
