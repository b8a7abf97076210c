"""The rule path on tunix's Llama3 and Qwen2 (foreign models): transforms keep the
logits, and fp / W4A4 perplexities and site reports equal catjax's own decoder's on the
same windows.
Runs where google-tunix is installed (scripts/test.sh's tunix stage)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tunix")

import tiny  # noqa: E402
import catjax as cj  # noqa: E402
from catjax.analysis.evaluate import perplexity, token_nll  # noqa: E402
from catjax.artifacts.foreign import load_foreign, save_foreign  # noqa: E402
from catjax.analysis.sites import SITE_FIELDS, foreign_site_report, site_report  # noqa: E402
from catjax.models import tunix as tx  # noqa: E402
from catjax.ptq.configs import TrainConfig  # noqa: E402

CALIB = tiny.tokens((8, 32), 128, seed=2)
EVAL = tiny.tokens((8, 32), 128, seed=9)
FOREIGN_SITES = {"attn_in": "attn/{q_proj,k_proj,v_proj}", "o_in": "attn/o_proj",
                 "mlp_in": "mlp/{gate_proj,up_proj}", "down_in": "mlp/down_proj"}


def _rules(recipe):
  return [cj.Rule("lm_head", None), cj.Rule(r"layers/\d+/.*", recipe)]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def models(request, tmp_path_factory):
  kw = {"model_type": "qwen2", "qkv_bias": True} if request.param == "qwen2" else {}
  folder = tmp_path_factory.mktemp(request.param) / "m"
  own = tiny.hf_folder(folder, seed=3, **kw)
  return own, tx.load_tunix(folder), kw


def _foreign(model, recipe, blocks=None):
  return cj.quantize(model, _rules(recipe), [CALIB[i:i + 1] for i in range(len(CALIB))],
                     forward=tx.forward, blocks=blocks, progress=False)


def test_transforms_keep_the_logits(models):
  _, model, _ = models
  q = _foreign(model, cj.Recipe(method="cat", block_size=16, w_bits=None, a_bits=None))
  np.testing.assert_allclose(tx.forward(q, EVAL), tx.forward(model, EVAL), atol=2e-5, rtol=1e-5)
  assert q.layers[0].attn.o_proj.catjax_input.in_ndim == 2  # BTNH,NHD->BTD


# Measured on the tiny models: relative differences below 2e-5 (float rounding of two
# implementations, through W4A4 rounding). GPTQ with fp Hessians (propagate="fp") runs
# on the whole model at once; GPTQ on quantized inputs (the default) and one closed form
# walk tunix's decoder layers block by block, as catjax's own engine does.
@pytest.mark.parametrize("recipe, blocks", [
    (cj.Recipe(method="fp"), None), (cj.Recipe(method="cat", block_size=16), None),
    (cj.Recipe(method="hadamard"), None),
    (cj.Recipe(method="cat", block_size=16, weights="gptq", propagate="fp"), None),
    (cj.Recipe(method="cat", block_size=16, weights="gptq"), r"layers/\d+"),
    (cj.Recipe(method="hadamard"), r"layers/\d+"),
], ids=lambda v: v.label if isinstance(v, cj.Recipe) else ("blocks" if v else "whole"))
def test_perplexity_equals_catjax_own_model(models, recipe, blocks):
  own, model, _ = models
  qo = cj.quantize_model(own, CALIB, recipe, progress=False)
  want = perplexity(qo.model, EVAL, hook=qo.hook, hook_state=qo.transforms, progress=False)
  q = model if recipe.method == "fp" else _foreign(model, recipe, blocks)
  got = math.exp(float(token_nll(tx.forward(q, EVAL), jnp.asarray(EVAL)).mean()))
  assert got == pytest.approx(want.perplexity, rel=1e-4)


@pytest.mark.parametrize("recipe", [cj.Recipe(method="cat", block_size=16), cj.Recipe(method="hadamard")],
                         ids=lambda r: r.label)
def test_site_report_equals_catjax_own_model(models, recipe):
  """Per site, in call order: measured and predicted SQNR, C(x), C(W), A, each equal to
  1e-3 dB (the same inputs and kernels up to float rounding)."""
  own, model, _ = models
  qo = cj.quantize_model(own, CALIB, recipe, progress=False)
  want = site_report(own, qo, EVAL)
  got = foreign_site_report(model, _foreign(model, recipe), [EVAL[i:i + 2] for i in range(0, 8, 2)],
                            forward=tx.forward, label=recipe.label)
  assert [r.site for r in got] == [f"layers/{w.layer}/{FOREIGN_SITES[w.site]}" for w in want]
  for g, w in zip(got, want):
    for field in SITE_FIELDS:
      assert getattr(g, field) == pytest.approx(getattr(w, field), abs=1e-3), (g.site, field)


def test_checkpoint_loads_onto_a_fresh_tunix_model(models, tmp_path):
  """What a user needs to rebuild the model: its float structure (load_tunix of the same
  architecture); every parameter, transform and quantizer comes from the checkpoint."""
  _, model, kw = models
  q = _foreign(model, cj.Recipe(method="cat", block_size=16, weights="gptq"), r"layers/\d+")
  save_foreign(q, tmp_path / "ck")
  tiny.hf_folder(tmp_path / "other", seed=4, **kw)  # the same architecture, other weights
  back = load_foreign(tx.load_tunix(tmp_path / "other"), tmp_path / "ck")
  np.testing.assert_array_equal(tx.forward(back, EVAL), tx.forward(q, EVAL))


def test_trained_cat_solves_catjax_own_training_problem(models):
  """The same loss, seeds and batches as quantize_model's trained CAT: the first block's
  closed-form and first-step losses agree to float rounding (measured 1e-7 relative); Adam's
  trajectory then amplifies rounding (the next blocks read the trained blocks' outputs),
  so the perplexity agrees to 1% (measured 0.1%)."""
  own, model, _ = models
  recipe = cj.Recipe(method="cat", block_size=16, train=TrainConfig(steps=10, batch=2))
  qo = cj.quantize_model(own, CALIB, recipe, progress=False)
  info = {}
  q = cj.quantize(model, _rules(recipe), [CALIB[i:i + 1] for i in range(len(CALIB))],
                  forward=tx.forward, blocks=r"layers/\d+", info=info, progress=False)
  assert [r["kept"] for r in info["train"]] == [r["kept"] for r in qo.info["train"]] == [True, True]
  for key in ("closed_form_loss", "first_step_loss"):
    assert info["train"][0][key] == pytest.approx(qo.info["train"][0][key], rel=1e-5), key
  want = perplexity(qo.model, EVAL, hook=qo.hook, hook_state=qo.transforms, progress=False)
  got = math.exp(float(token_nll(tx.forward(q, EVAL), jnp.asarray(EVAL)).mean()))
  assert got == pytest.approx(want.perplexity, rel=1e-2)


@pytest.mark.parametrize("integer", [False, True], ids=["fake", "integer"])
def test_qwix_runs_catjax_weights(models, integer):
  """tunix's model quantized by catjax (GPTQ through the blocks), exported as qwix's
  parameters (int4 codes, per-channel scales, the input quantizers) into the model qwix's
  own `quantize_model` made: the same logits as catjax's, with fake-quantized inputs or
  with integer ones (W4A4 integer products in qwix)."""
  qwix = pytest.importorskip("qwix")
  from catjax.ptq import qwix_interop as cq

  _, model, _ = models
  recipe = cj.Recipe(method="cat", block_size=16, weights="gptq")
  q = _foreign(model, recipe, r"layers/\d+")
  ptq = qwix.quantize_model(model, cq.CatPtqProvider(_rules(recipe), integer=integer),
                            *tx.call_args(EVAL[:2]))
  theirs = cq.export(q, ptq)
  assert isinstance(theirs.layers[0].attn.o_proj.w, cq.WithCatInput)
  want = tx.forward(q, EVAL)
  np.testing.assert_allclose(tx.forward(theirs, EVAL), want, rtol=1e-5,
                             atol=1e-5 * float(jnp.abs(want).max()))
