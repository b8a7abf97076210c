"""The "catjax" lm-eval model type against lm-eval's own HFLM (transformers) on one
tiny model: the same log-likelihoods, rolling log-likelihoods and greedy text;
the offline tasks run through `simple_evaluate`; fake- and real-quantized models."""

import json

import numpy as np
import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("torch")

import tiny  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from catjax.app.lmeval import TASKS_DIR, CatjaxLM  # noqa: E402

PAIRS = [("The quick brown fox", " jumps over the lazy dog."),
         ("Paris is the capital of", " France"),
         ("Numbers 12345 and", " words, words"),
         ("", "Berlin of Germany")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  from lm_eval.models.huggingface import HFLM
  folder = tmp_path_factory.mktemp("lmeval") / "tiny"
  # The model's end-of-text id is the tokenizer's, as in real checkpoints: HF's
  # generate then stops on it too (it stops on the model config's id only).
  tiny.hf_folder(folder, seed=21, eos_token_id=tiny.tokenizer().eos_token_id)
  ours = CatjaxLM(model=str(folder), batch_size=3)
  theirs = HFLM(pretrained=str(folder), device="cpu", batch_size=3, dtype="float32")
  return folder, ours, theirs


def _requests(kind, args):
  return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihoods_equal_hflm(models):
  _, ours, theirs = models
  got = ours.loglikelihood(_requests("loglikelihood", PAIRS))
  want = theirs.loglikelihood(_requests("loglikelihood", PAIRS))
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-3, atol=1e-3)
  assert [g[1] for g in got] == [w[1] for w in want]
  assert all(g[0] < 0 for g in got)


def _greedy_until_tie(lm, context, kw, tol=1e-3):
  """HF's greedy continuation of `context` up to the first step whose top-2 logit
  margin is below `tol` (a near tie that float rounding may flip), cut at the
  stop strings; and whether such a step came before the end."""
  import torch
  ids = torch.tensor([lm.tok_encode(context)])
  out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=kw["max_gen_toks"], output_scores=True,
                          return_dict_in_generate=True, pad_token_id=lm.eot_token_id)
  top2 = torch.stack(out.scores)[:, 0].topk(2).values
  ties = torch.nonzero(top2[:, 0] - top2[:, 1] < tol)
  n = int(ties[0, 0]) if len(ties) else len(top2)
  text = lm.tok_decode(out.sequences[0, ids.shape[1]:ids.shape[1] + n].tolist())
  for s in kw["until"]:
    text = text.split(s)[0]
  return text, bool(len(ties))


def test_rolling_and_generation_equal_hflm(models):
  _, ours, theirs = models
  docs = [(tiny.TEXT[:300],), (tiny.TEXT,)]
  ours._max_length = theirs._max_length = 64  # several windows per document
  np.testing.assert_allclose(ours.loglikelihood_rolling(_requests("loglikelihood_rolling", docs)),
                             theirs.loglikelihood_rolling(_requests("loglikelihood_rolling", docs)),
                             rtol=1e-3)
  ours._max_length = theirs._max_length = 256
  kw = {"until": [".", "\n\n"], "max_gen_toks": 12, "do_sample": False}
  gen = [("The quick brown", kw), ("Paris is", kw), ("Numbers 12345 and words,", kw),
         ("Berlin", {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False})]
  # Batches of 3 with prompts of different lengths (left padding) and a group of one.
  ours_text = ours.generate_until(_requests("generate_until", gen))
  theirs_text = theirs.generate_until(_requests("generate_until", gen))
  for (context, kw), a, b in zip(gen, ours_text, theirs_text):
    if a != b:  # allowed only past a greedy step that float noise can flip
      sure, tie = _greedy_until_tie(theirs, context, kw)
      assert tie and a.startswith(sure) and b.startswith(sure), (context, a, b, sure)
  ours.batch_size = 1  # one at a time: the same text
  assert ours.generate_until(_requests("generate_until", gen)) == ours_text
  ours.batch_size = 3


def test_offline_tasks_through_simple_evaluate(models):
  import lm_eval
  from lm_eval.tasks import TaskManager
  from lm_eval.api.registry import get_model
  from lm_eval.models.huggingface import HFLM
  folder, _, _ = models
  # Importing catjax's model type adds "catjax" to lm-eval's registry and keeps its own
  # models: both resolve by name in one process, and one simple_evaluate each runs.
  assert get_model("hf") is HFLM and get_model("catjax") is CatjaxLM
  tasks = ["catjax_wiki_lastword", "catjax_wiki_cloze"]
  manager = TaskManager(include_path=str(TASKS_DIR))
  runs = [lm_eval.simple_evaluate(model=name, model_args=args, tasks=tasks, limit=12,
                                  task_manager=manager)
          for name, args in (("catjax", f"model={folder},batch_size=3"),
                             ("hf", f"pretrained={folder},device=cpu,batch_size=3,dtype=float32"))]
  for task, metric in (("catjax_wiki_lastword", "acc,none"), ("catjax_wiki_cloze", "acc,none"),
                       ("catjax_wiki_cloze", "acc_norm,none")):
    assert runs[0]["results"][task][metric] == runs[1]["results"][task][metric]
  np.testing.assert_allclose(runs[0]["results"]["catjax_wiki_lastword"]["perplexity,none"],
                             runs[1]["results"]["catjax_wiki_lastword"]["perplexity,none"],
                             rtol=1e-3)
  rows = json.loads((TASKS_DIR / "wiki_cloze.json").read_text())
  assert len(rows) == 500 and all(len(r["choices"]) == 4 for r in rows)


def test_quantized_models(models, tmp_path):
  """A recipe fake-quantizes on the fly; a saved checkpoint runs as the real model:
  its log-likelihoods equal those of the in-memory real model."""
  from catjax.app.runnable import Runnable
  from catjax.artifacts.checkpoint import save_quantized
  from catjax.ptq.engine import quantize_model
  from catjax.models import load_hf
  from catjax.ptq.recipe import Recipe
  from catjax.ptq.realization import realize
  folder, ours, _ = models
  model = load_hf(folder)
  qm = quantize_model(model, tiny.tokens((4, 32), 128, seed=2),
                      Recipe(method="cat", block_size=16), progress=False)
  real = realize(model, qm)
  save_quantized(real, tmp_path / "q", tokenizer=ours.tokenizer)
  loaded = CatjaxLM(model=str(tmp_path / "q"), batch_size=3)
  memory = CatjaxLM(model=Runnable(real.model, ours.tokenizer, folder, real.hook,
                                   real.transforms, real), batch_size=3)
  reqs = _requests("loglikelihood", PAIRS)
  assert loaded.loglikelihood(reqs) == memory.loglikelihood(reqs)
  fp = [x[0] for x in ours.loglikelihood(reqs)]
  assert [x[0] for x in loaded.loglikelihood(reqs)] != fp
  with pytest.raises(ValueError, match="recipe='cat' given for the quantized checkpoint"):
    CatjaxLM(model=str(tmp_path / "q"), recipe="cat")
