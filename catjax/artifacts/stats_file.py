"""The statistics file: calibration second moments in one `.npz`, with metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from catjax.models.config import ModelConfig
from catjax.models.spec import spec_for
from catjax.core.stats import SecondMoment


def save_stats(path: str | Path, stats: dict[str, SecondMoment], *,
               fingerprint: str | None = None, **meta: Any) -> Path:
  """Write calibration statistics (and JSON-able `meta`) to one `.npz` file,
  atomically (multi-process runs: process 0 writes). `fingerprint`
  (`model_fingerprint`): the model they came from; `load_stats` refuses them
  for any other model. A second moment that is exactly symmetric (as
  `calibrate`'s are) is stored as its upper triangle (`SITE.xx_upper`, half
  the bytes), any other in full (`SITE.xx`): either way `load_stats` gives
  back the same values bit for bit."""
  from catjax.base.errors import atomic_write, is_writer
  from catjax.models.sharding import host_value
  if fingerprint is not None:
    meta = {**meta, "model_fingerprint": fingerprint}
  arrays = {}
  for site, st in stats.items():
    xx = host_value(st.xx)
    if np.array_equal(xx, np.swapaxes(xx, -1, -2)):
      rows, cols = np.triu_indices(xx.shape[-1])
      arrays[f"{site}.xx_upper"] = xx[..., rows, cols]
    else:
      arrays[f"{site}.xx"] = xx
    arrays[f"{site}.absmax"] = host_value(st.absmax)
    arrays[f"{site}.count"] = host_value(st.count)
  if is_writer():  # other processes gathered with it; they need not serialize gigabytes
    with atomic_write(path) as tmp, open(tmp, "wb") as fh:  # numpy must not append ".npz"
      np.savez(fh, meta=np.asarray(json.dumps(meta)), **arrays)
  return Path(path)


def _unpack_upper(packed: np.ndarray, d: int, name: str) -> np.ndarray:
  """The symmetric `(..., d, d)` matrices whose upper triangles `packed` holds."""
  if packed.shape[-1:] != (d * (d + 1) // 2,):
    raise ValueError(f"{name} has shape {packed.shape}: the upper triangle of a {d} x {d} "
                     f"matrix has {d * (d + 1) // 2} entries")
  full = np.empty(packed.shape[:-1] + (d, d), packed.dtype)
  rows, cols = np.triu_indices(d)
  full[..., rows, cols] = packed
  full[..., cols, rows] = packed
  return full


_META_TYPES = {"data": str, "windows": int, "seqlen": int, "tokens": int}
# Second moments up to this width get the full positive-semidefinite check (a float64
# Cholesky, O(d³)); wider ones the O(d²) necessary conditions only.
_PSD_CHECK_MAX_DIM = 4096


def _not_a_second_moment(xx: np.ndarray) -> str | None:
  """Why `xx` (`(d, d)` or stacked `(L, d, d)`) is no second moment (" in layer i is
  ..."), or None. Symmetric to float rounding; every 2 × 2 minor within
  Cauchy–Schwarz; up to `_PSD_CHECK_MAX_DIM`, positive semidefinite (Cholesky of
  `xx + 1e-6 · max diag · I` in float64)."""
  mats = np.asarray(xx, np.float64).reshape(-1, *xx.shape[-2:])
  layered = xx.ndim == 3
  for i, m in enumerate(mats):
    where = f" in layer {i}" if layered else ""
    diag = np.diagonal(m)
    scale = max(float(diag.max(initial=0.0)), 1e-30)
    if np.abs(m - m.T).max(initial=0.0) > 1e-5 * scale:
      return f"{where} are not symmetric (off by {np.abs(m - m.T).max():.3g})"
    bound = np.sqrt(np.outer(diag, diag))
    if (np.abs(m) > bound * (1 + 1e-4) + 1e-6 * scale).any():
      return f"{where} break Cauchy–Schwarz (|Σ_ij| > √(Σ_ii Σ_jj))"
    if m.shape[-1] <= _PSD_CHECK_MAX_DIM:
      try:
        np.linalg.cholesky(m + 1e-6 * scale * np.eye(m.shape[-1]))
      except np.linalg.LinAlgError:
        return f"{where} are indefinite (a negative eigenvalue)"
  return None


def load_stats(path: str | Path, cfg: ModelConfig | None = None, *,
               fingerprint: str | None = None) -> tuple[dict[str, SecondMoment], dict[str, Any]]:
  """Read statistics written by `save_stats`; with `cfg`, check they fit that
  model; with `fingerprint` (`model_fingerprint`), that they came from it.

  Raises:
    FileNotFoundError: no such file.
    InputError (a ValueError): the file is truncated or not a statistics file,
      lacks a site, holds non-finite or impossible (negative second moment)
      values, or does not fit `cfg` / `fingerprint`.
  """
  import zipfile
  from catjax.base.errors import InputError
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no calibration statistics at {path}")
  try:
    with np.load(path) as z:
      sites = sorted({f.split(".")[0] for f in z.files if f.endswith((".xx", ".xx_upper"))})
      if cfg is not None:
        sites = list(spec_for(cfg).site_names)
      xx_key = {s: f"{s}.xx_upper" if f"{s}.xx_upper" in z.files else f"{s}.xx" for s in sites}
      missing = [name for s in sites for name in (xx_key[s], f"{s}.absmax", f"{s}.count")
                 if name not in z.files] + ([] if "meta" in z.files else ["meta"])
      if missing or not sites:
        raise InputError(path, f"lacks {missing or 'statistics of any site'}; was it written "
                               "by save_stats?")
      raw = {s: {"xx": z[xx_key[s]], "absmax": z[f"{s}.absmax"], "count": z[f"{s}.count"]}
             for s in sites}
      meta = json.loads(str(z["meta"]))
    for s, r in raw.items():
      if xx_key[s].endswith("_upper"):
        r["xx"] = _unpack_upper(r["xx"], r["absmax"].shape[-1], xx_key[s])
  except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
    if isinstance(e, (InputError, FileNotFoundError)):
      raise
    raise InputError(path, f"not a readable statistics file (truncated, or not written by "
                           f"save_stats): {type(e).__name__}: {e}") from None
  if not isinstance(meta, dict):
    raise InputError(path, f"its metadata is a JSON {type(meta).__name__}, expected an object "
                           "(was it written by save_stats?)")
  for key, want in _META_TYPES.items():
    v = meta.get(key)
    if v is not None and not (isinstance(v, str) if want is str else
                              isinstance(v, int) and not isinstance(v, bool) and v > 0):
      raise InputError(path, f"its metadata {key}={v!r}: expected "
                             f"{'a string' if want is str else 'a positive integer'}")
  for site, r in raw.items():
    xx = r["xx"]
    if not np.isfinite(xx).all() or not np.isfinite(r["absmax"]).all():
      raise InputError(path, f"statistics of {site} hold non-finite values")
    if (np.diagonal(xx, axis1=-2, axis2=-1) < 0).any() or (r["absmax"] < 0).any() \
        or (r["count"] <= 0).any():
      raise InputError(path, f"statistics of {site} are impossible (negative second moment or "
                             "absmax, or no tokens counted); was the file altered?")
    why = _not_a_second_moment(xx)
    if why:
      raise InputError(path, f"statistics of {site}{why}; a second moment is symmetric "
                             "positive semidefinite: was the file altered?")
  stats = {s: SecondMoment(xx=jnp.asarray(r["xx"]), absmax=jnp.asarray(r["absmax"]),
                           count=jnp.asarray(r["count"])) for s, r in raw.items()}
  if cfg is not None:
    for site, d in spec_for(cfg).site_dims(cfg).items():
      want = (cfg.num_layers, d, d)
      if stats[site].xx.shape != want:
        raise InputError(path, f"statistics do not fit this model: {site} has shape "
                               f"{stats[site].xx.shape}, expected {want}")
  saved = meta.get("model_fingerprint")
  if fingerprint is not None and saved is not None and saved != fingerprint:
    raise InputError(path, f"statistics come from another model (model "
                           f"{meta.get('model', '?')!r}, fingerprint {saved}; this model's is "
                           f"{fingerprint}); recalibrate, or load the model they came from")
  return stats, meta
