"""tunix's Llama3 and Qwen2 loaded from a Hugging Face folder (`catjax.models.tunix`):
equal to catjax's own decoder, and tunix 0.1.7's RoPE theta shown to need the fix
and to be fixed by it. Runs where google-tunix is installed (scripts/test.sh's
tunix stage); skipped elsewhere."""

import numpy as np
import pytest

pytest.importorskip("tunix")

import jax.numpy as jnp  # noqa: E402

import tiny  # noqa: E402
from catjax.models import forward, load_gguf, save_hf  # noqa: E402
from catjax.models import tunix as tx  # noqa: E402

TOKENS = tiny.tokens((2, 32), 128, seed=1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("tunix")
  return {mt: (root / mt, tiny.hf_folder(root / mt, seed=3, **kw)) for mt, kw in
          (("llama", {}), ("qwen2", {"model_type": "qwen2", "qkv_bias": True}))}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_equals_catjax_own_decoder(folders, family):
  folder, own = folders[family]
  model = tx.load_tunix(folder)
  np.testing.assert_allclose(tx.forward(model, TOKENS), forward(own, TOKENS), atol=2e-5, rtol=1e-5)


def test_llama3_rope_needs_the_fix_on_the_tiny_model(folders):
  folder, own = folders["llama"]  # rope_theta 1e4; tunix 0.1.7 rotates by 1e6
  shipped = tx.load_tunix(folder, rope_fixed=False)
  assert float(jnp.abs(tx.forward(shipped, TOKENS) - forward(own, TOKENS)).max()) > 1e-3


def test_smollm2_against_transformers(tmp_path):
  """SmolLM2-135M (rope_theta 1e5) written as a Hugging Face folder: tunix as shipped is
  far from transformers, with the fix within 1e-3."""
  torch = pytest.importorskip("torch")
  import transformers

  from catjax.app import assets
  save_hf(load_gguf(assets.fetch("smollm2-135m-instruct-q4_1.gguf")), tmp_path / "smol")
  tokens = tiny.tokens((1, 64), 49152, seed=1)
  ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "smol"),
                                                          dtype=torch.float32).eval()
  with torch.no_grad():
    want = ref(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
  fixed = np.abs(np.asarray(tx.forward(tx.load_tunix(tmp_path / "smol"), tokens)) - want).max()
  shipped = np.abs(np.asarray(tx.forward(tx.load_tunix(tmp_path / "smol", rope_fixed=False),
                                         tokens)) - want).max()
  assert fixed < 1e-3 < 1.0 < shipped, (fixed, shipped)


def test_other_families_are_refused(tmp_path):
  from ptq.test_engine import GEMMA3
  tiny.hf_folder(tmp_path / "g", seed=0, **GEMMA3)
  with pytest.raises(ValueError, match="model_type='gemma3_text'; tunix adapters exist for"):
    tx.load_tunix(tmp_path / "g")
