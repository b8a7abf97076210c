"""Weight rounding methods are a registry: every registered method runs through the
engine, and a method added as one entry (here: a test-only one) is taken by the
recipe checks, the spec language, the CLI and the engine without touching them."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from catjax.app.specs import parse_spec
from catjax.core.quant import weight_config
from catjax.models import random_model, spec_for
from catjax.models.spec import get_path
from catjax.ptq import rounding
from catjax.ptq.engine import quantize_model
from catjax.ptq.recipe import Recipe
from catjax.ptq.rounding import channel_clipped_quantize
from operands import check_nan_case, nan_cases


@pytest.fixture(scope="module")
def setup():
  return random_model(tiny.config(num_layers=2), seed=7), tiny.tokens((6, 16), 128, seed=7)


def _kernels(qm):
  spec = spec_for(qm.model.config)
  return {p: np.asarray(get_path(qm.model.layers, p).kernel[...]) for _, p in spec.linears}


@pytest.mark.parametrize("name", list(rounding.REGISTRY))
def test_every_registered_method_quantizes_onto_its_grid(setup, name):
  model, windows = setup
  qm = quantize_model(model, windows, Recipe(method="none", weights=name), batch_size=3,
                      progress=False)
  assert qm.label == parse_spec(f"none@{name}").label
  qmax = weight_config(4).qmax
  for path, k in _kernels(qm).items():
    scale = np.asarray(qm.w_scales[path])[:, None, :]
    levels = k / scale
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3, err_msg=f"{name} {path}")
    assert np.abs(np.round(levels)).max() <= qmax


def _toward_zero(kernel, config, *, hessian, ratio, recipe):
  """Round toward zero on the per-channel grid (worse than nearest: a test method)."""
  scale = jnp.maximum(jnp.abs(kernel).max(0), 1e-12) / config.qmax
  return (jnp.trunc(kernel / scale) * scale).astype(kernel.dtype), scale


def test_a_method_is_one_entry_in_the_registry(setup, monkeypatch):
  model, windows = setup
  method = rounding.WeightMethod("trunc", "round toward zero", _toward_zero,
                                 integer_only="is a test of integer grids",
                                 label=lambda r: " trunc")
  monkeypatch.setitem(rounding.REGISTRY, "trunc", method)
  recipe = parse_spec("none@trunc")
  assert recipe.weights == "trunc" and recipe.label == "none trunc W4A4"
  with pytest.raises(ValueError, match="'trunc' is a test of integer grids"):
    dataclasses.replace(recipe, w_format="mxfp4")
  from catjax.app.cli import build_parser
  q = build_parser()._subparsers._group_actions[0].choices["quantize"]
  weights = next(a for a in q._actions if a.dest == "weights")
  assert "trunc" in weights.choices and "round toward zero" in weights.help
  got = _kernels(quantize_model(model, windows, recipe, batch_size=3, progress=False))
  rtn = _kernels(quantize_model(model, windows, Recipe(method="none"), batch_size=3,
                                progress=False))
  for path, k in got.items():
    layers = np.asarray(get_path(model.layers, path).kernel[...])
    scale = np.abs(layers).max(1, keepdims=True) / weight_config(4).qmax
    levels = k / scale  # integers of magnitude at most the weight's, less than one step below
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert np.all(np.abs(k) <= np.abs(layers) * (1 + 1e-6) + 1e-9)
    assert np.all(np.abs(layers - k) < scale * (1 + 1e-5))
    assert not np.array_equal(k, rtn[path])  # the engine ran the new method, not RTN


@nan_cases(cols={"channel_clipped_quantize":
                 lambda k: channel_clipped_quantize(k, jnp.full((8,), 0.9), 7)[0]})
def test_a_nan_channel_quantizes_to_nan(f, bad, token):
  check_nan_case(f, bad, token)
