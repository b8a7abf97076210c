"""The calibration statistics file: round trip, upper-triangle storage, refusals, and an
interrupted save that keeps the old file."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from catjax.artifacts.stats_file import load_stats, save_stats
from catjax.models import SITES, random_model
from catjax.ptq.calibration import calibrate


def test_stats_save_and_load_round_trip(tmp_path):
  model = random_model(tiny.config(num_layers=2), seed=4)
  stats = calibrate(model, tiny.tokens((2, 8), 128, seed=4), progress=False)
  path = save_stats(tmp_path / "s" / "stats.npz", stats, data="x", windows=2)
  back, meta = load_stats(path, model.config)
  assert meta == {"data": "x", "windows": 2}
  for site in SITES:
    for f in ("xx", "absmax", "count"):
      np.testing.assert_array_equal(np.asarray(getattr(back[site], f)),
                                    np.asarray(getattr(stats[site], f)))
  with pytest.raises(ValueError, match=r"do not fit this model: attn_in has shape \(2, 64, 64\)"):
    load_stats(path, tiny.config(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1))
  with pytest.raises(FileNotFoundError, match="no calibration statistics"):
    load_stats(tmp_path / "nope.npz")


def test_stats_store_symmetric_second_moments_as_upper_triangles(tmp_path):
  # calibrate's second moments are exactly symmetric: half the bytes on disk.
  # One made asymmetric by one ulp is stored in full. Both come back bit for bit.
  model = random_model(tiny.config(num_layers=2), seed=4)
  stats = calibrate(model, tiny.tokens((2, 8), 128, seed=4), progress=False)
  xx = np.array(stats["down_in"].xx)
  xx[1, 0, 5] = np.nextafter(xx[1, 0, 5], np.inf)
  stats["down_in"] = dataclasses.replace(stats["down_in"], xx=jnp.asarray(xx))
  path = save_stats(tmp_path / "stats.npz", stats)
  with np.load(path) as z:
    d = model.config.hidden_size
    assert z["attn_in.xx_upper"].shape == (2, d * (d + 1) // 2) and "attn_in.xx" not in z.files
    assert z["down_in.xx"].shape == xx.shape and "down_in.xx_upper" not in z.files
    arrays = {k: z[k] for k in z.files}
  back, _ = load_stats(path, model.config)
  for site in SITES:
    np.testing.assert_array_equal(np.asarray(back[site].xx), np.asarray(stats[site].xx))
  arrays["attn_in.xx_upper"] = arrays["attn_in.xx_upper"][..., :-1]
  bad = tmp_path / "bad.npz"
  np.savez(bad, **arrays)
  with pytest.raises(ValueError, match=r"attn_in.xx_upper has shape .* upper triangle of a"):
    load_stats(bad, model.config)


def test_interrupted_save_stats_keeps_the_old_file(tmp_path, monkeypatch):
  model = random_model(tiny.config(num_layers=2), seed=4)
  stats = calibrate(model, tiny.tokens((2, 8), 128, seed=4), progress=False)
  stats_path = save_stats(tmp_path / "old" / "stats.npz", stats, data="x", windows=2)
  stats, meta = load_stats(stats_path)
  target = tmp_path / "new" / "s.npz"
  target.parent.mkdir()
  target.write_bytes(stats_path.read_bytes())

  def interrupted(fh, **arrays):
    fh.write(b"PK partial")
    raise KeyboardInterrupt
  monkeypatch.setattr(np, "savez", interrupted)
  with pytest.raises(KeyboardInterrupt):
    save_stats(target, stats, **meta)
  assert target.read_bytes() == stats_path.read_bytes()
  assert sorted(p.name for p in target.parent.iterdir()) == ["s.npz"]
