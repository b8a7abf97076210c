"""Transforms are a registry: a method added as one entry (here a test-only one,
per-channel RMS normalisation) is taken by the recipe checks, the spec language,
the CLI and the engine without touching them."""

import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from catjax.app.specs import parse_spec
from catjax.core import transforms as tf
from catjax.models import random_model
from catjax.ptq.engine import quantize_model
from catjax.ptq.recipe import Recipe, ptq_methods


def _rms_fit(inp: tf.FitInputs):
  rms = jnp.sqrt(jnp.maximum(jnp.diagonal(inp.sigma_x), 1e-12))
  return (1.0 / rms)[:, None, None], rms[:, None, None]


@pytest.fixture
def rms_method(monkeypatch):
  monkeypatch.setitem(tf.REGISTRY, "rms", tf.Method("rms", "diagonal", False, _rms_fit,
                                                    "divide each channel by its RMS"))


def test_a_transform_is_one_entry_in_the_registry(rms_method):
  assert "rms" in ptq_methods()
  recipe = parse_spec("rms@w8a8")
  assert recipe.label == "rms W8A8" and recipe.site_block_size is None
  with pytest.raises(ValueError, match="needs a method with trainable blocks"):
    parse_spec("hadamard@t5")
  assert parse_spec("rms@t5").train.steps == 5  # its blocks are trainable
  with pytest.raises(ValueError, match="hadamard='block' applies to 'cat' and 'cat_full' and 'cat_perm'"):
    parse_spec("rms@bh")
  from catjax.app.cli import build_parser
  q = build_parser()._subparsers._group_actions[0].choices["quantize"]
  assert "rms" in next(a for a in q._actions if a.dest == "method").choices

  model = random_model(tiny.config(num_layers=2), seed=3)
  windows = tiny.tokens((4, 16), 128, seed=3)
  qm = quantize_model(model, windows, recipe, batch_size=2, progress=False)
  plain = quantize_model(model, windows, Recipe(method="none", w_bits=8, a_bits=8),
                         batch_size=2, progress=False)
  for site, t in qm.transforms.items():
    assert t.method == "rms" and t.signs is None, site
    b, inv = np.asarray(t.blocks), np.asarray(t.inv_blocks)
    np.testing.assert_allclose(b * inv, 1.0, rtol=1e-5)
    assert np.all(b > 0) and not np.allclose(b, 1.0), site  # fitted, not the identity
  k = lambda m: np.asarray(m.model.layers.mlp.down_proj.kernel[...])
  assert not np.array_equal(k(qm), k(plain))  # the merged kernels differ from no transform
