"""Calibration: the site statistics equal direct second moments; continued and bad input."""

import numpy as np
import pytest

import tiny
from catjax.models import SITES, capture, random_model
from catjax.models import LLAMA, get_path, spec_for
from catjax.models.loading import hf_tensors
from catjax.ptq.calibration import calibrate


def test_spec_matches_the_model_and_the_checkpoint_names():
  cfg = tiny.config(num_layers=2, qkv_bias=True)
  model = random_model(cfg)
  spec = spec_for(cfg)
  assert spec is LLAMA and spec.site_names == SITES
  dims = spec.site_dims(cfg)
  for site, path in spec.linears:
    assert get_path(model.layers, path).kernel[...].shape[1] == dims[site], (site, path)
  assert [s.name for s in spec.sites if s.shared] == ["attn_in", "mlp_in"]
  # Every parameter has exactly one checkpoint name, derived from the spec.
  names = set(hf_tensors(model))
  assert "model.layers.1.self_attn.q_proj.bias" in names
  assert "model.layers.0.mlp.down_proj.weight" in names
  assert len(names) == 2 + 2 * (2 + 7 + 3) + 1  # embed, norm, lm_head; per block 2 norms, 7 W, 3 b


def test_calibration_equals_direct_second_moments():
  model = random_model(tiny.config(num_layers=2), seed=1)
  windows = tiny.tokens((5, 16), 128, seed=1)
  stats = calibrate(model, windows, batch_size=2, progress=False)
  acts = capture(model, windows)
  for site in SITES:
    x = np.asarray(acts[site], np.float64)  # (L, B, T, d)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    expected = np.einsum("lni,lnj->lij", x, x) / x.shape[1]
    st = stats[site]
    assert st.xx.shape == (2, x.shape[-1], x.shape[-1])
    np.testing.assert_array_equal(np.asarray(st.count), [80, 80])
    sigma = np.asarray(st.xx) / 80
    np.testing.assert_allclose(sigma, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    np.testing.assert_allclose(np.asarray(st.absmax), np.abs(x).max(axis=1), rtol=1e-6)


def test_calibration_can_continue_and_rejects_bad_input():
  model = random_model(tiny.config(num_layers=1), seed=2)
  windows = tiny.tokens((4, 8), 128, seed=2)
  whole = calibrate(model, windows, progress=False)
  part = calibrate(model, windows[:2], progress=False)
  part = calibrate(model, windows[2:], stats=part, progress=False)
  np.testing.assert_allclose(np.asarray(part["down_in"].xx), np.asarray(whole["down_in"].xx),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="batch_size=0"):
    calibrate(model, windows, batch_size=0)
  with pytest.raises(ValueError, match="windows.shape"):
    calibrate(model, windows[0])
