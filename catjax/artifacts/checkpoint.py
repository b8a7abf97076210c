"""Quantized checkpoints: a realized (integer) model as a folder, and back.

    DIR/
      quantization.json                 manifest (format, version, config, recipe, sites,
                                        tensor table, sha256 of every other file)
      model.safetensors                 or model-0000i-of-0000n.safetensors + index
      tokenizer.json, tokenizer_config.json, ...   (when a tokenizer is given)

Tensors are named by their parameter paths joined with dots: the float
parameters (`embed`, `norm.scale`, `layers.attn_norm.scale`, `lm_head.kernel`,
...), per block linear `layers.<path>.values` (int8; for `w_bits <= 4` two
signed nibbles per byte, K-major split halves as `catjax.kernels` stores them),
`.scale` (float32 per output channel), `.blocks` (the block-diagonal transform
the kernel applies), `.clips` (learned activation clip ratios, one per layer) and
`.bias`; and per site with a full-width Hadamard the
online transform `transforms.<site>.signs` (`(L, d)` ±1), `.blocks` (when
it has a block part), `.perm` (`(L, d)` int32, when it reorders the channels;
such a transform stays online even without a Hadamard) and `.a_clip` (`(L,)`). Everything is stacked
over the layers.

`save_quantized` writes into a temporary sibling folder and renames it into
place when complete, so an interrupted save leaves no folder that
`load_quantized` would accept. `load_quantized` checks the manifest's own
checksum, the format and version, every file's sha256, and every tensor's
name, shape and dtype against what the config and recipe imply, and that float
tensors are finite; each failure raises one `CheckpointError` naming the file
and the problem.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from catjax.base.errors import sha256_file
from catjax.base.errors import is_writer, read_json
from catjax.kernels import QuantizedWeight
from catjax.models.config import ModelConfig
from catjax.models.llama import Llama
from catjax.models.loading import MAX_SHARD_BYTES, write_tensors
from catjax.models.spec import get_path, set_path, spec_for
from catjax.ptq.quantized import QuantizedModel
from catjax.ptq.recipe import Recipe
from catjax.ptq.realization import QLinear
from catjax.models.sharding import barrier
from catjax.core.transforms import Transform

FORMAT = "catjax-quantized"
VERSION = 1
MANIFEST = "quantization.json"
ONLINE_PARTS = ("blocks", "signs", "perm", "a_clip")  # what a site hook needs of a transform


class CheckpointError(ValueError):
  """A quantized checkpoint that cannot be trusted: names the file and the problem."""


def _checksum(manifest: dict) -> str:
  body = {k: v for k, v in manifest.items() if k != "checksum"}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _site_layout(qm: QuantizedModel) -> dict[str, dict[str, Any]]:
  """Per site: the transform, whether the kernel applies it (block-diagonal)
  or the hook does (with a Hadamard), its block size and Hadamard order."""
  spec = spec_for(qm.model.config)
  out = {}
  for site, dim in spec.site_dims(qm.model.config).items():
    lin = get_path(qm.model.layers, next(p for s, p in spec.linears if s == site))
    fused = lin.blocks is not None
    online = None if qm.transforms is None else qm.transforms.get(site)
    k = (lin.blocks.shape[-1] if fused else
         None if online is None or online.blocks is None else online.blocks.shape[-1])
    out[site] = {"dim": dim, "block_size": k, "in_kernel": fused, "online": online is not None,
                 "hadamard": dim if online is not None and online.signs is not None else None}
    if online is not None and online.perm is not None:
      out[site]["perm"] = True
    if lin.clips is not None:  # learned activation clips, one per layer
      out[site]["a_clip"] = True
  return out


def _tensors(qm: QuantizedModel) -> dict[str, jax.Array]:
  out = {".".join(str(k) for k in path): var[...]
         for path, var in nnx.to_flat_state(nnx.state(qm.model, nnx.Param))}
  for site, t in (qm.transforms or {}).items():
    for field in ONLINE_PARTS:
      if getattr(t, field) is not None:
        out[f"transforms.{site}.{field}"] = getattr(t, field)
  return out


def check_new_folder(folder: str | Path) -> Path:
  """`folder` as a Path, if it does not exist and its parent can be created and
  written (checked before any long work).

  Raises:
    FileExistsError: the folder exists.
    ValueError: its parent is not a writable folder.
  """
  folder = Path(folder)
  if folder.exists():
    raise FileExistsError(f"{folder} exists; a quantized checkpoint goes to a new folder")
  parent = folder.parent
  try:
    parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f"{folder}: cannot create its parent folder ({e.strerror})") from None
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"{folder}: its parent folder {parent} is not writable")
  return folder


def save_quantized(qm: QuantizedModel, folder: str | Path, *, tokenizer=None,
                   max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
  """Write the real quantized model `qm` (`catjax.ptq.realization.realize`) to `folder`.

  The folder must not exist. Everything is written into a temporary sibling
  and renamed into place at the end (atomic on one filesystem). Multi-process
  runs: every process calls it (tensors split across processes are gathered
  shard by shard); process 0 writes, and all return once the folder is there.

  Raises:
    ValueError: `qm` is not a realized model.
    FileExistsError: `folder` exists.
  """
  if not qm.real:
    raise ValueError("save_quantized needs a real quantized model: catjax.ptq.realization.realize(...)")
  folder = check_new_folder(folder)
  tmp = folder.parent / f".{folder.name}.partial-{uuid.uuid4().hex[:8]}"
  tensors = _tensors(qm)
  if not is_writer():  # another process of a multi-process run: gather only
    write_tensors(tmp, tensors, max_shard_bytes=max_shard_bytes)
    barrier("catjax save_quantized")
    return folder
  tmp.mkdir()
  try:
    cfg = qm.model.config
    write_tensors(tmp, tensors, max_shard_bytes=max_shard_bytes, metadata={"format": FORMAT})
    if tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    manifest = {
        "format": FORMAT, "format_version": VERSION,
        "config": cfg.to_hf(), "dtype": str(jnp.dtype(qm.model.dtype)),
        "recipe": dataclasses.asdict(qm.recipe), "label": qm.recipe.label,
        "weights": {"bits": qm.recipe.w_bits, "grid": "symmetric, per output channel",
                    "layout": "values (L, d_out, d_in) int8; bits <= 4: (L, d_out, d_in/2), "
                              "two signed nibbles per byte (catjax.kernels)"},
        "activations": {"bits": qm.recipe.a_bits, "clip": qm.recipe.a_clip,
                        "grid": "symmetric, per token"},
        "kv": {"bits": qm.recipe.kv_bits, "grid": "asymmetric, per token and head"},
        "sites": _site_layout(qm),
        "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype)}
                    for name, t in tensors.items()},
        "files": {name: sha256_file(tmp / name) for name in files},
    }
    manifest["checksum"] = _checksum(manifest)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    umask = os.umask(0)
    os.umask(umask)
    for p in tmp.iterdir():
      os.chmod(p, 0o666 & ~umask)  # some writers create 0600 files
      with open(p, "rb") as f:
        os.fsync(f.fileno())
    os.rename(tmp, folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  barrier("catjax save_quantized")
  return folder


def is_quantized_checkpoint(path: str | Path) -> bool:
  """Whether `path` is a folder with a quantized-checkpoint manifest."""
  return (Path(path) / MANIFEST).is_file()


def _read_manifest(folder: Path) -> dict:
  file = folder / MANIFEST
  if not file.is_file():
    raise CheckpointError(f"{file}: no such file ({folder} is not a catjax quantized checkpoint)")
  try:
    manifest = json.loads(file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{file}: not valid JSON ({e})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise CheckpointError(f"{file}: not a {FORMAT} manifest (format="
                          f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
  if manifest.get("format_version") != VERSION:
    raise CheckpointError(f"{file}: format version {manifest.get('format_version')!r}; this "
                          f"catjax reads version {VERSION}")
  if manifest.get("checksum") != _checksum(manifest):
    raise CheckpointError(f"{file}: its checksum does not match its content (edited by hand?)")
  for key in ("files", "tensors", "config", "recipe", "sites", "dtype"):
    if key not in manifest:
      raise CheckpointError(f"{file}: key {key!r} is missing")
  files = manifest["files"]
  if not isinstance(files, dict) or not all(isinstance(d, str) for d in files.values()):
    raise CheckpointError(f"{file}: \"files\" must map file names to sha256 digests")
  for name in files:
    if Path(name).name != name or name in (".", ".."):
      raise CheckpointError(f"{file}: lists file {name!r}, which is not in the checkpoint folder")
  if not {"model.safetensors", "model.safetensors.index.json"} & set(files):
    raise CheckpointError(f"{file}: lists neither model.safetensors nor "
                          "model.safetensors.index.json")
  if not isinstance(manifest["tensors"], dict):
    raise CheckpointError(f"{file}: \"tensors\" must map tensor names to shapes and dtypes")
  return manifest


def _weight_map(folder: Path, manifest: dict) -> dict[str, str]:
  """`{tensor name: file}` from the index (sharded) or the manifest's tensor table; every
  file it names must be one the manifest checksums."""
  index = folder / "model.safetensors.index.json"
  if "model.safetensors.index.json" not in manifest["files"]:
    return dict.fromkeys(manifest["tensors"], "model.safetensors")
  try:
    data = read_json(index)
  except ValueError as e:
    raise CheckpointError(str(e)) from None
  weight_map = data.get("weight_map") if isinstance(data, dict) else None
  if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
    raise CheckpointError(f'{index}: expected a "weight_map" object of {{tensor name: file name}}')
  for name, f in weight_map.items():
    if f not in manifest["files"]:
      raise CheckpointError(f"{index}: tensor {name!r} is in {f!r}, which "
                            f"{folder / MANIFEST} does not list")
  return weight_map


def _load_tokenizer(folder: Path):
  """The saved tokenizer, or None; an unreadable one raises `CheckpointError` naming its file."""
  names = [n for n in ("tokenizer.json", "tokenizer_config.json") if (folder / n).is_file()]
  if not names:
    return None
  for name in names:
    try:
      read_json(folder / name)
    except ValueError as e:
      raise CheckpointError(str(e)) from None
  from catjax.models.hf import import_transformers
  try:
    return import_transformers().AutoTokenizer.from_pretrained(str(folder))
  except Exception as e:  # noqa: BLE001 (any tokenizer library error: a bad file)
    raise CheckpointError(f"{folder / names[0]}: the tokenizer cannot be loaded "
                          f"({type(e).__name__}: {e})") from None


def _expected(cfg: ModelConfig, dtype, recipe: Recipe, sites: dict, implementation):
  """The realized model's structure (`ShapeDtypeStruct` leaves) and online transforms."""
  spec = spec_for(cfg)
  L = cfg.num_layers

  def build():
    model = Llama(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    for site, path in spec.linears:
      lin = get_path(model.layers, path)
      d_in, d_out = lin.kernel.shape[-2:]
      packed = recipe.w_bits <= 4
      qw = QuantizedWeight(jnp.zeros((L, d_out, d_in // 2 if packed else d_in), jnp.int8),
                           jnp.zeros((L, d_out), jnp.float32), recipe.w_bits, (d_in, d_out))
      k = sites[site]["block_size"]
      blocks = jnp.zeros((L, d_in // k, k, k), jnp.float32) if sites[site]["in_kernel"] else None
      clips = jnp.zeros((L,), jnp.float32) if sites[site].get("a_clip") else None
      set_path(model.layers, path, QLinear(
          qw, bias=None if lin.bias is None else lin.bias[...], blocks=blocks,
          a_bits=recipe.a_bits, a_clip=float(recipe.a_clip), implementation=implementation,
          clips=clips))
    return model

  model = nnx.eval_shape(build)
  online = {}
  for site, s in sites.items():
    if s["online"]:
      d, k = s["dim"], s["block_size"]
      online[site] = Transform(
          None if k is None else jax.ShapeDtypeStruct((L, d // k, k, k), jnp.float32), None,
          None if s["hadamard"] is None else jax.ShapeDtypeStruct((L, d), jnp.float32),
          recipe.transform_method, d,
          jax.ShapeDtypeStruct((L, d), jnp.int32) if s.get("perm") else None,
          jax.ShapeDtypeStruct((L,), jnp.float32) if s.get("a_clip") else None)
  return model, online


def load_quantized(folder: str | Path, *, implementation: str | None = None
                   ) -> tuple[QuantizedModel, Any]:
  """A quantized checkpoint written by `save_quantized`: `(QuantizedModel, tokenizer)`.

  The model is real (integer linears); run it like `realize`'s result. Its
  outputs equal those of the model that was saved, bit for bit on the same
  device. The tokenizer is None when none was saved.

  Raises:
    CheckpointError: naming the file and the problem, for a missing, corrupt,
      truncated, hand-edited or version-mismatched checkpoint.
  """
  from safetensors import SafetensorError, safe_open
  folder = Path(folder)
  manifest = _read_manifest(folder)
  where = folder / MANIFEST
  for name, digest in manifest["files"].items():
    f = folder / name
    if not f.is_file():
      raise CheckpointError(f"{f}: missing (listed in {where})")
    if sha256_file(f) != digest:
      raise CheckpointError(f"{f}: sha256 differs from {where} (corrupt or modified)")
  try:
    cfg = ModelConfig.from_hf(manifest["config"])
    recipe = Recipe.from_dict(manifest["recipe"])
    dtype = jnp.dtype(manifest["dtype"])
    sites = manifest["sites"]
    model, online = _expected(cfg, dtype, recipe, sites, implementation)
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{where}: inconsistent manifest ({type(e).__name__}: {e})") from None
  slots = {".".join(str(k) for k in path): var
           for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for site, t in online.items():
    for field in ONLINE_PARTS:
      if getattr(t, field) is not None:
        slots[f"transforms.{site}.{field}"] = getattr(t, field)
  table = manifest["tensors"]
  if set(table) != set(slots):
    extra, missing = sorted(set(table) - set(slots)), sorted(set(slots) - set(table))
    raise CheckpointError(f"{where}: tensors do not match the config and recipe (unexpected "
                          f"{extra[:3]}, missing {missing[:3]})")
  weight_map = _weight_map(folder, manifest)
  values = {}
  for file in sorted(set(weight_map.values())):
    path = folder / file
    try:
      with safe_open(str(path), framework="flax") as fh:
        names = [n for n in fh.keys() if weight_map.get(n) == file]
        for name in names:
          values[name] = fh.get_tensor(name)
    except (SafetensorError, OSError) as e:
      raise CheckpointError(f"{path}: unreadable safetensors ({e})") from None
  for name, slot in slots.items():
    file = folder / weight_map.get(name, "model.safetensors")
    if name not in values:
      raise CheckpointError(f"{file}: tensor {name!r} is missing")
    v, want = values[name], slot if isinstance(slot, jax.ShapeDtypeStruct) else slot.get_value()
    if v.shape != want.shape or v.dtype != want.dtype:
      raise CheckpointError(f"{file}: tensor {name!r} is {v.dtype}{list(v.shape)}, expected "
                            f"{want.dtype}{list(want.shape)}")
    if jnp.issubdtype(v.dtype, jnp.floating) and not bool(jnp.isfinite(v).all()):
      raise CheckpointError(f"{file}: tensor {name!r} has non-finite values")
  for name, var in slots.items():
    if not name.startswith("transforms."):
      var.set_value(values[name])
  transforms = {site: Transform(values.get(f"transforms.{site}.blocks"), None,
                                values.get(f"transforms.{site}.signs"), t.method, t.dim,
                                values.get(f"transforms.{site}.perm"),
                                values.get(f"transforms.{site}.a_clip"))
                for site, t in online.items()}
  tokenizer = _load_tokenizer(folder)
  return QuantizedModel(model, transforms or None, recipe, real=True,
                        info={"checkpoint": str(folder)}), tokenizer




