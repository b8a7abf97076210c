"""Quantized checkpoints of a model quantized by `catjax.quantize` (any NNX model).

    DIR/
      quantization.json     manifest: format, version, per quantized linear its weight's
                            name, flattening, input quantizer and weight grid, per site
                            its transform; the tensor table; sha256 of every other file
      model.safetensors     every parameter of the model, named by its own path

Tensors are named by the model's parameter paths joined with "/"
(`layers/3/attn/q_proj/w`). A quantized linear's weight on an integer grid is
stored as its integer codes `<path>.values` (int8, in the weight's own shape)
and the per-output-channel scales `<path>.scale` (float32, `(d_out,)`); on any
other grid (FP4) as the rounded weight itself. A site's transform is
`sites/<i>/{blocks,inv_blocks,signs,perm,a_clip}`.

To load one, rebuild the float model's structure (its class and config, e.g.
`catjax.models.tunix.load_tunix(folder)` or the same constructor under
`nnx.eval_shape`): `load_foreign(model, folder)` fills every parameter, puts
the transforms and quantizers back on the linears and returns the quantized
model, equal to the saved one. Every file's sha256, every tensor's name,
shape and dtype and the manifest's own checksum are checked; each failure is a
`CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from catjax.artifacts.checkpoint import CheckpointError, check_new_folder
from catjax.base.errors import sha256_file
from catjax.core.quant import QuantConfig
from catjax.core.transforms import Transform
from catjax.models.loading import write_tensors
from catjax.ptq import foreign

FORMAT = "catjax-foreign-quantized"
VERSION = 1
MANIFEST = "quantization.json"
_PARTS = ("blocks", "inv_blocks", "signs", "perm", "a_clip")


def _checksum(manifest: dict) -> str:
  body = {k: v for k, v in manifest.items() if k != "checksum"}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _key(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _params(model: nnx.Module) -> dict[str, jax.Array]:
  """`{path: array}` of every parameter of `model`."""
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return {_key(p): a for p, a in jax.tree_util.tree_flatten_with_path(pure)[0]}


def _config(c: QuantConfig | None) -> dict | None:
  return None if c is None else dataclasses.asdict(c)


def save_foreign(model: nnx.Module, folder: str | Path) -> Path:
  """Write `model` (the result of `catjax.quantize`) to the new folder `folder`
  (written into a temporary sibling, renamed into place when complete).

  Raises:
    ValueError: `model` has no linear quantized by `catjax.quantize`.
    FileExistsError: `folder` exists.
  """
  qlinears = foreign.quantized_linears(model)
  if not qlinears:
    raise ValueError("save_foreign needs a model quantized by catjax.quantize (no quantized linear)")
  folder = check_new_folder(folder)
  tensors = dict(_params(model))
  sites: dict[int, Transform] = {}
  seen: dict[tuple, int] = {}  # a site's transform by content (nnx.jit copies the objects)
  linears = {}
  for path, lin in qlinears.items():
    iq = vars(lin.module)["catjax_input"]
    name = f"{path}/{lin.param}"
    codes = None if iq.w_scale is None else lin.codes(iq.w_scale)
    if codes is not None:
      del tensors[name]
      tensors[f"{name}.values"] = codes
      tensors[f"{name}.scale"] = np.asarray(iq.w_scale, np.float32)
    site = None
    if iq.transform is not None:
      t = iq.transform
      key = (t.method, t.dim) + tuple(None if getattr(t, part) is None
                                      else hashlib.sha256(np.asarray(getattr(t, part)).tobytes()).digest()
                                      for part in _PARTS)
      site = seen.setdefault(key, len(seen))
      sites[site] = t
    linears[path] = {"param": lin.param, "in_axes": list(lin.in_axes), "in_ndim": lin.in_ndim,
                     "dtype": str(lin.weight[...].dtype), "integer": codes is not None,
                     "site": site, "activations": _config(iq.config), "weights": _config(iq.weights)}
  for i, t in sites.items():
    for part in _PARTS:
      if getattr(t, part) is not None:
        tensors[f"sites/{i}/{part}"] = getattr(t, part)
  tmp = folder.parent / f".{folder.name}.partial-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  try:
    write_tensors(tmp, {k: jnp.asarray(v) for k, v in tensors.items()},
                  max_shard_bytes=1 << 62, metadata={"format": FORMAT})
    manifest = {
        "format": FORMAT, "format_version": VERSION, "linears": linears,
        "sites": {str(i): {"method": t.method, "dim": t.dim} for i, t in sites.items()},
        "tensors": {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)}
                    for k, v in tensors.items()},
        "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir())},
    }
    manifest["checksum"] = _checksum(manifest)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    os.rename(tmp, folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return folder


def _manifest(folder: Path) -> dict:
  file = folder / MANIFEST
  try:
    manifest = json.loads(file.read_text())
  except FileNotFoundError:
    raise CheckpointError(f"{file}: no such file ({folder} is not a catjax quantized checkpoint "
                          "of a foreign model)") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{file}: not valid JSON ({e})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    got = manifest.get("format") if isinstance(manifest, dict) else None
    raise CheckpointError(f"{file}: format={got!r}, expected {FORMAT!r}")
  if manifest.get("format_version") != VERSION:
    raise CheckpointError(f"{file}: format version {manifest.get('format_version')!r}; this "
                          f"catjax reads version {VERSION}")
  if manifest.get("checksum") != _checksum(manifest):
    raise CheckpointError(f"{file}: its checksum does not match its content (edited by hand?)")
  for name, digest in manifest["files"].items():
    if Path(name).name != name or not (folder / name).is_file():
      raise CheckpointError(f"{folder / name}: listed in the manifest, missing")
    if sha256_file(folder / name) != digest:
      raise CheckpointError(f"{folder / name}: sha256 differs from the manifest's (corrupted?)")
  return manifest


def load_foreign(model: nnx.Module, folder: str | Path) -> nnx.Module:
  """The quantized model saved in `folder`, built on `model` (the float model's
  structure: the same class and config; changed in place and returned).

  Raises:
    CheckpointError: a missing or altered file, another format or version, or a
      tensor whose name, shape or dtype does not fit `model`.
  """
  from safetensors.numpy import load_file

  folder = Path(folder)
  manifest = _manifest(folder)
  tensors = load_file(str(folder / "model.safetensors"))
  if sorted(tensors) != sorted(manifest["tensors"]):
    raise CheckpointError(f"{folder / 'model.safetensors'}: its tensors differ from the manifest's")
  params = _params(model)
  linears = foreign.find_linears(model)
  values = {}
  for path, info in manifest["linears"].items():
    lin = linears.get(path)
    if lin is None or lin.param != info["param"] or list(lin.in_axes) != info["in_axes"]:
      raise CheckpointError(f"{folder / MANIFEST}: linear {path!r} is not a linear of the model "
                            f"with weight {info['param']!r} (its linears: {list(linears)[:6]}...)")
    name = f"{path}/{info['param']}"
    if info["integer"]:
      codes, scale = tensors.pop(f"{name}.values"), tensors.pop(f"{name}.scale")
      want = lin.weight[...].shape
      if codes.shape != want or scale.shape != (lin.kernel().shape[1],):
        raise CheckpointError(f"{folder}: {name}.values {list(codes.shape)} and .scale "
                              f"{list(scale.shape)} do not fit the model's weight {list(want)}")
      values[path] = (lin.flatten(codes).astype(jnp.float32) * scale, jnp.asarray(scale))
  for name, a in tensors.items():
    if name.startswith("sites/"):
      continue
    if name not in params:
      raise CheckpointError(f"{folder}: tensor {name!r} is not a parameter of the model "
                            f"(its parameters start {list(params)[:4]})")
    if tuple(a.shape) != tuple(params[name].shape) or str(a.dtype) != str(params[name].dtype):
      raise CheckpointError(f"{folder}: tensor {name!r} is {a.dtype}{list(a.shape)}; the model's "
                            f"parameter is {params[name].dtype}{list(params[name].shape)}")
    params[name] = a
  # Every parameter comes from the checkpoint: as floats or as a quantized weight's codes.
  coded = {f"{path}/{manifest['linears'][path]['param']}" for path in values}
  missing = [n for n in params if n not in tensors and n not in coded]
  if missing:
    raise CheckpointError(f"{folder}: no tensor for the model's parameters {missing[:4]} (another "
                          "model than the one saved?)")
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(
      treedef, [jnp.asarray(params[_key(p)]) for p, _ in leaves]))
  nnx.update(model, state)
  sites = {i: Transform(**{part: jnp.asarray(tensors[f"sites/{i}/{part}"])
                           if f"sites/{i}/{part}" in tensors else None for part in _PARTS},
                        method=s["method"], dim=s["dim"])
           for i, s in manifest["sites"].items()}
  assigned = {}
  for path, info in manifest["linears"].items():
    lin = linears[path]
    scale = None
    if path in values:
      kernel, scale = values[path]
      lin.set_kernel(kernel)
    assigned[path] = (lin, 0)
    transform = None if info["site"] is None else sites[str(info["site"])]
    lin.module.catjax_input = foreign.InputQuantizer(
        transform, _quant(info["activations"]), info["in_ndim"], _quant(info["weights"]), scale)
  foreign.instrument(assigned)
  return model


def _quant(d: dict | None) -> QuantConfig | None:
  return None if d is None else QuantConfig(**d)
