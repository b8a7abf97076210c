"""Checkpoints in and out: Hugging Face safetensors folders and GGUF files.

One table, the architecture spec's `hf_table` (`catjax.models.spec`), maps
checkpoint tensor names to catjax parameter paths. Per-block tensors (`model.layers.{i}...`) are stacked along the
leading `num_layers` axis of the stacked block parameters; linear weights are
transposed (PyTorch stores `(out, in)`, catjax `kernel` is `(in, out)`).
GGUF files are first read into the same Hugging Face names
(`catjax.models.gguf`), so both formats go through the table.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from catjax.base.errors import InputError, check_finite, read_json
from catjax.models.config import ModelConfig
from catjax.models.lazy import LazyTensors
from catjax.models.llama import Llama, abstract_model
from catjax.models.spec import ArchSpec, spec_for

# `(spec, parameter path, shape) -> Sharding`: where a loaded parameter goes.
Place = Callable[[ArchSpec, tuple[str, ...], tuple[int, ...]], jax.sharding.Sharding]

# Buffers some checkpoints carry that are recomputed here.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _flat_params(model: Llama) -> dict[tuple[str, ...], nnx.Variable]:
  return {tuple(str(k) for k in path): var
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def params_from_hf(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], *, dtype=jnp.float32,
                   source: str = "checkpoint", place: Place | None = None) -> Llama:
  """Build a model from Hugging Face-named tensors (`(out, in)` weights).

  Every name is checked before any tensor is read. Then tensors are read one
  at a time (`tensors[name]`; a `LazyTensors` reads from the file only then),
  converted to the target dtype and written straight into their parameter on
  its device(s): the sharding `place(spec, path, shape)` when given
  (`catjax.models.sharding.placement`; each device receives only its slice), else
  the default device. A stacked parameter is allocated there once and each
  block's tensor is written into it in place (a donated update), so host
  memory peaks near the model in `dtype` plus one tensor. Each tensor is
  checked as it is converted: a float dtype, and finite values (NaN or Inf
  in the file, or an overflow of `dtype`, is refused). Finite garbage cannot
  be told from weights here.

  Raises:
    InputError: naming the file (`source` unless `tensors` knows it) and the
      tensor, for an unknown or missing tensor, a shape that does not match
      the config, a non-float dtype, or NaN / Inf values.
  """
  model = abstract_model(cfg, dtype=dtype)
  slots = _flat_params(model)
  left = set(tensors)
  if cfg.tie_embeddings:
    left.discard("lm_head.weight")  # some tied checkpoints store the copy
  spec = spec_for(cfg)
  prefix = spec.hf_block_prefix
  layer_re = re.compile(re.escape(prefix).replace(re.escape("{i}"), r"(\d+)") + "(.+)")
  by_name = {}
  for name in left:
    m = layer_re.fullmatch(name)
    by_name.setdefault(prefix + m.group(2) if m else name, []).append(name)
  plan = []
  for hf_name, path, transpose in spec.hf_table:
    if path not in slots:
      if hf_name in by_name:
        raise InputError(source, f"tensor {sorted(by_name[hf_name])[0]!r} has no place in a "
                         f"model with this config (qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}, "
                         f"tie_embeddings={cfg.tie_embeddings})")
      continue
    stacked = "{i}" in hf_name
    names = [hf_name.format(i=i) for i in range(cfg.num_layers)] if stacked else [hf_name]
    missing = [n for n in names if n not in left]
    if missing:
      raise InputError(source, f"tensor {missing[0]!r} is missing "
                       f"({len(missing)} missing for {hf_name!r})")
    left.difference_update(names)
    plan.append((path, names, stacked, transpose))
  unknown = sorted(n for n in left if not _IGNORED.fullmatch(n))
  if unknown:
    raise InputError(source, f"unknown tensor {unknown[0]!r} ({len(unknown)} unknown in all)")
  np_dtype = jnp.dtype(dtype)
  if isinstance(tensors, LazyTensors):  # the shapes files state, checked before allocating
    for path, names, stacked, transpose in plan:
      want = tuple(slots[path].shape[1:] if stacked else slots[path].shape)
      for n in names:
        got = tensors.header_shape(n)
        if got is not None and (got[::-1] if transpose else got) != want:
          raise InputError(tensors.file(n) or source, f"tensor {tensors.label(n)} has shape "
                           f"{got}, expected {want[::-1] if transpose else want} for "
                           f"{'/'.join(path)} (from the config)")
  if place is None:
    check_memory(sum(int(np.prod(v.shape)) for v in slots.values()) * np_dtype.itemsize,
                 jax.devices()[0], source=source, dtype=np_dtype.name)
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  for path, names, stacked, transpose in plan:
    var = slots[path]
    want = tuple(var.shape[1:] if stacked else var.shape)
    sharding = default if place is None else place(spec, path, var.shape)

    def read(n):
      lazy = isinstance(tensors, LazyTensors)
      file = (tensors.file(n) if lazy else None) or source
      label = tensors.label(n) if lazy else repr(n)
      a = tensors[n]
      if not jnp.issubdtype(a.dtype, jnp.floating):
        raise InputError(file, f"tensor {label} has dtype {a.dtype}; expected a float type")
      got = a.shape[::-1] if transpose else a.shape
      if got != want:
        raise InputError(file, f"tensor {label} has shape {a.shape}, expected "
                         f"{want[::-1] if transpose else want} for {'/'.join(path)}")
      with np.errstate(over="ignore"):
        out = np.asarray(a.T if transpose else a, np_dtype)
      if not np.isfinite(out).all():
        check_finite(f"tensor {label}", a, where=file)
        big = float(np.max(np.abs(np.asarray(a, np.float32))))
        raise InputError(file, f"tensor {label} overflows {np_dtype.name} (largest magnitude "
                         f"{big:.4g}); load it in float32")
      return out

    if not stacked:
      var.set_value(_on(read(names[0]), sharding))
      continue
    value = _zeros(var.shape, np_dtype, sharding)
    for i, n in enumerate(names):
      value = _write_block(value, _on(read(n)[None], sharding), i)
    var.set_value(value)
  return model


def available_bytes(device: jax.Device) -> int | None:
  """Memory free for new arrays on `device`: an accelerator's allocator limit less
  what is in use; on CPU, Linux's MemAvailable; None when unknown."""
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001  backends without allocator statistics
    stats = None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  if device.platform == "cpu":
    try:
      for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
      return None
  return None


def check_memory(need: int, device: jax.Device, *, source: str, dtype: str) -> None:
  """Refuse, in one line naming `source`, parameters of `need` bytes in `dtype` that do not
  fit the free memory of `device` (before any is allocated)."""
  have = available_bytes(device)
  if have is not None and need > have:
    raise InputError(source, f"its parameters need {need / 2**30:.1f} GiB in {dtype}; "
                     f"{device.platform} device {device.id} has {have / 2**30:.1f} GiB free: "
                     "load in bfloat16 (--dtype bfloat16), shard over a mesh (--mesh), or check "
                     "the config's sizes")


def _on(a: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """Host array `a` on `sharding` (each device gets its slice; any number of processes)."""
  return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def _zeros(shape, dtype, sharding) -> jax.Array:
  return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)()


@functools.partial(jax.jit, donate_argnums=0)
def _write_block(stacked: jax.Array, block: jax.Array, i) -> jax.Array:
  """`stacked[i] = block[0]`, in place (the donated `stacked`'s buffer is reused)."""
  return jax.lax.dynamic_update_slice_in_dim(stacked, block, i, axis=0)


def read_safetensors(folder: Path) -> LazyTensors:
  """The tensors of `model.safetensors` or of the shards its index lists, read lazily.

  Every file's header is read here, before any tensor: an unreadable or
  truncated file, an index that is not JSON, has no `weight_map` or names a
  missing file or tensor, a tensor stored twice or of a non-float dtype each
  raise `InputError` naming the file.
  """
  from safetensors import SafetensorError, safe_open
  index = folder / "model.safetensors.index.json"
  weight_map = {}
  if index.exists():
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
      raise InputError(index, 'expected a "weight_map" object of {tensor name: file name}')
    files = sorted(set(weight_map.values()))
    for f in files:
      if not (folder / f).is_file():
        name = next(n for n, g in weight_map.items() if g == f)
        raise InputError(index, f"weight_map names file {f!r} (for tensor {name!r}), which is "
                         f"not in {folder}")
  elif (folder / "model.safetensors").exists():
    files = ["model.safetensors"]
  else:
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
  loaders, shapes, where = {}, {}, {}

  def read(file, name):
    try:
      with safe_open(str(file), framework="flax") as fh:
        return np.asarray(fh.get_tensor(name))
    except (SafetensorError, OSError) as e:
      raise InputError(file, f"cannot read tensor {name!r} ({e})") from None

  for f in files:
    path = folder / f
    try:
      with safe_open(str(path), framework="flax") as fh:
        for name in fh.keys():
          if name in loaders:
            raise InputError(folder, f"tensor {name!r} is stored twice ({f} and another shard)")
          info = fh.get_slice(name)
          dtype = info.get_dtype()
          if not dtype.startswith(("F", "BF")) and not _IGNORED.fullmatch(name):
            raise InputError(path, f"tensor {name!r} has dtype {dtype}; expected a float type "
                             "(F32, F16, BF16, ...)")
          loaders[name] = functools.partial(read, path, name)
          shapes[name] = tuple(info.get_shape())
          where[name] = str(path)
    except (SafetensorError, OSError) as e:
      raise InputError(path, f"not a readable safetensors file ({e})") from None
  for name, f in weight_map.items():
    if name not in loaders:
      raise InputError(folder / f, f"tensor {name!r} is missing (the index lists it here)")
  return LazyTensors(loaders, shapes, files=where)


def load_hf(folder: str | Path, *, dtype=jnp.float32, place: Place | None = None) -> Llama:
  """Load a Hugging Face folder: `config.json` + (sharded) safetensors, bf16/f16/f32
  (`place`: see `params_from_hf`). A bad `config.json` (not JSON, a missing
  required key, an impossible value) raises `InputError` naming it and the key."""
  folder = Path(folder)
  return params_from_hf(load_config(folder), read_safetensors(folder), dtype=dtype,
                        source=str(folder), place=place)


def load_config(path: str | Path) -> ModelConfig:
  """The configuration of a Hugging Face folder or GGUF file, without reading
  any weight: to check a run against the model before loading it."""
  path = Path(path)
  if path.is_dir():
    config_file = path / "config.json"
    if not config_file.exists():
      raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model folder)")
    return _config(read_json(config_file), config_file)
  if path.suffix == ".gguf":
    from catjax.models.gguf import read_gguf
    return _config(read_gguf(path)[0], path)
  raise ValueError(f"{path}: expected a Hugging Face model folder or a .gguf file")


def _config(hf, where) -> ModelConfig:
  """`ModelConfig.from_hf(hf)`, its errors naming the file `where`."""
  try:
    return ModelConfig.from_hf(hf)
  except (TypeError, ValueError) as e:
    raise InputError(where, str(e)) from None


def load_gguf(path: str | Path, *, dtype=jnp.float32, place: Place | None = None) -> Llama:
  """Load a llama, qwen2 or gemma3 GGUF file (dequantized tensor by tensor;
  `place`: see `params_from_hf`)."""
  from catjax.models.gguf import read_gguf
  hf_config, tensors = read_gguf(path)
  cfg = _config(hf_config, path)
  return params_from_hf(cfg, tensors, dtype=dtype, source=str(path), place=place)


def load_model(path: str | Path, *, dtype=jnp.float32, place: Place | None = None) -> Llama:
  """A model from a GGUF file or a Hugging Face folder (`place`: see `params_from_hf`)."""
  path = Path(path)
  if path.is_dir():
    return load_hf(path, dtype=dtype, place=place)
  if path.suffix == ".gguf":
    return load_gguf(path, dtype=dtype, place=place)
  raise ValueError(f"{path}: expected a Hugging Face model folder or a .gguf file")


def hf_tensors(model: Llama) -> dict[str, jax.Array]:
  """The model's parameters under Hugging Face names, in PyTorch layout."""
  slots = _flat_params(model)
  cfg = model.config
  out = {}
  for hf_name, path, transpose in spec_for(cfg).hf_table:
    if path not in slots:
      continue
    value = slots[path][...]
    stacked = "{i}" in hf_name
    parts = [value[i] for i in range(cfg.num_layers)] if stacked else [value]
    for i, part in enumerate(parts):
      out[hf_name.format(i=i)] = part.T if transpose else part
  return out


# Above this many bytes `save_hf` writes shards and an index (as transformers does).
MAX_SHARD_BYTES = 5 * 2**30


def write_tensors(folder: Path, tensors: Mapping[str, jax.Array], *,
                  max_shard_bytes: int = MAX_SHARD_BYTES,
                  metadata: dict[str, str] | None = None) -> list[str]:
  """Write `tensors` as safetensors into `folder`: `model.safetensors` up to
  `max_shard_bytes`, above that `model-0000i-of-0000n.safetensors` shards of at
  most that size (a larger single tensor gets a shard of its own) and
  `model.safetensors.index.json`. Returns the files written.

  Multi-process runs: every process calls it (each shard's tensors are
  gathered from all of them, one shard at a time); only process 0 writes."""
  from safetensors.flax import save_file

  from catjax.base.errors import is_writer
  from catjax.models.sharding import host_value
  writer = is_writer()
  shards, size = [[]], 0
  for name, t in tensors.items():
    if shards[-1] and size + t.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += t.nbytes
  files = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  for file, names in zip(files, shards):
    shard = {k: host_value(tensors[k]) for k in names}
    if writer:
      save_file({k: jnp.asarray(v) for k, v in shard.items()}, str(folder / file),
                metadata=metadata)
    del shard
  if len(shards) > 1 and writer:
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": {k: file for file, names in zip(files, shards) for k in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    files.append("model.safetensors.index.json")
  return files


def save_hf(model: Llama, folder: str | Path, *, tokenizer=None,
            max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
  """Write `config.json` and the weights (+ tokenizer files) that transformers loads.

  Up to `max_shard_bytes` the weights go to `model.safetensors`; above, to
  `model-0000i-of-0000n.safetensors` shards of at most that size (a larger
  single tensor gets a shard of its own) and `model.safetensors.index.json`.
  Multi-process runs: every process calls it; process 0 writes, and all
  return once the folder is complete.
  """
  if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
    raise ValueError(f"max_shard_bytes={max_shard_bytes!r}: expected a positive integer")
  from catjax.base.errors import is_writer
  from catjax.models.sharding import barrier
  folder = Path(folder)
  writer = is_writer()
  if writer:
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("model-*-of-*.safetensors"), folder / "model.safetensors",
                folder / "model.safetensors.index.json"]:
      old.unlink(missing_ok=True)  # the other layout's files would shadow or confuse
    hf = {**model.config.to_hf(), "torch_dtype": str(jnp.dtype(model.dtype))}
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
  write_tensors(folder, hf_tensors(model), max_shard_bytes=max_shard_bytes,
                metadata={"format": "pt"})
  if tokenizer is not None and writer:
    tokenizer.save_pretrained(str(folder))
  barrier("catjax save_hf")
  return folder
