"""Checkpoints in and out: Hugging Face safetensors folders and GGUF files.

One table, the architecture spec's `hf_table` (`catjax.models.spec`), maps
checkpoint tensor names to catjax parameter paths. Per-block tensors (`model.layers.{i}...`) are stacked along the
leading `num_layers` axis of the stacked block parameters; linear weights are
transposed (PyTorch stores `(out, in)`, catjax `kernel` is `(in, out)`).
GGUF files are first read into the same Hugging Face names
(`catjax.models.gguf`), so both formats go through the table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from catjax.models.config import ModelConfig
from catjax.models.llama import Llama, abstract_model
from catjax.models.spec import spec_for

# Buffers some checkpoints carry that are recomputed here.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _flat_params(model: Llama) -> dict[tuple[str, ...], nnx.Variable]:
  return {tuple(str(k) for k in path): var
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def params_from_hf(cfg: ModelConfig, tensors: dict[str, np.ndarray], *, dtype=jnp.float32,
                   source: str = "checkpoint") -> Llama:
  """Build a model from Hugging Face-named tensors (`(out, in)` weights).

  Raises:
    ValueError: naming the tensor, for an unknown or missing tensor or a
      shape that does not match the config.
  """
  model = abstract_model(cfg, dtype=dtype)
  slots = _flat_params(model)
  tensors = dict(tensors)
  if cfg.tie_embeddings:
    tensors.pop("lm_head.weight", None)  # some tied checkpoints store the copy
  spec = spec_for(cfg)
  prefix = spec.hf_block_prefix
  layer_re = re.compile(re.escape(prefix).replace(re.escape("{i}"), r"(\d+)") + "(.+)")
  by_name = {}
  for name in tensors:
    m = layer_re.fullmatch(name)
    key = prefix + m.group(2) if m else name
    by_name.setdefault(key, []).append(name)
  values = {}
  for hf_name, path, transpose in spec.hf_table:
    if path not in slots:
      if hf_name in by_name:
        raise ValueError(f"{source}: tensor {by_name[hf_name][0]!r} has no place in a model with "
                         f"this config (qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}, "
                         f"tie_embeddings={cfg.tie_embeddings})")
      continue
    stacked = "{i}" in hf_name
    names = [hf_name.format(i=i) for i in range(cfg.num_layers)] if stacked else [hf_name]
    missing = [n for n in names if n not in tensors]
    if missing:
      raise ValueError(f"{source}: tensor {missing[0]!r} is missing "
                       f"({len(missing)} missing for {hf_name!r})")
    want = tuple(slots[path].shape[1:] if stacked else slots[path].shape)
    want = want[::-1] if transpose else want
    arrays = []
    for n in names:
      a = np.asarray(tensors.pop(n), np.float32)
      if a.shape != want:
        raise ValueError(f"{source}: tensor {n!r} has shape {a.shape}, expected {want} "
                         f"for {'/'.join(path)}")
      arrays.append(a.T if transpose else a)
    value = np.stack(arrays) if stacked else arrays[0]
    values[path] = jnp.asarray(value, dtype)
  unknown = sorted(n for n in tensors if not _IGNORED.fullmatch(n))
  if unknown:
    raise ValueError(f"{source}: unknown tensor {unknown[0]!r} ({len(unknown)} unknown in all)")
  for path, var in slots.items():
    var.set_value(values[path])
  return model


def read_safetensors(folder: Path) -> dict[str, np.ndarray]:
  """All tensors of `model.safetensors` or of the shards listed in its index."""
  from safetensors import safe_open
  index = folder / "model.safetensors.index.json"
  if index.exists():
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
  elif (folder / "model.safetensors").exists():
    files = ["model.safetensors"]
  else:
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
  tensors = {}
  for f in files:
    with safe_open(str(folder / f), framework="flax") as fh:
      for name in fh.keys():
        tensors[name] = fh.get_tensor(name)
  return tensors


def load_hf(folder: str | Path, *, dtype=jnp.float32) -> Llama:
  """Load a Hugging Face folder: `config.json` + (sharded) safetensors, bf16/f16/f32."""
  folder = Path(folder)
  config_file = folder / "config.json"
  if not config_file.exists():
    raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder)")
  cfg = ModelConfig.from_hf(json.loads(config_file.read_text()))
  return params_from_hf(cfg, read_safetensors(folder), dtype=dtype, source=str(folder))


def load_gguf(path: str | Path, *, dtype=jnp.float32) -> Llama:
  """Load a llama-architecture GGUF file (dequantized; q/k rows un-permuted)."""
  from catjax.models.gguf import read_gguf
  hf_config, tensors = read_gguf(path)
  cfg = ModelConfig.from_hf(hf_config)
  return params_from_hf(cfg, tensors, dtype=dtype, source=str(path))


def load_model(path: str | Path, *, dtype=jnp.float32) -> Llama:
  """A model from a GGUF file or a Hugging Face folder."""
  path = Path(path)
  if path.is_dir():
    return load_hf(path, dtype=dtype)
  if path.suffix == ".gguf":
    return load_gguf(path, dtype=dtype)
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


def save_hf(model: Llama, folder: str | Path, *, tokenizer=None) -> Path:
  """Write `config.json` + `model.safetensors` (+ tokenizer files) that transformers loads."""
  from safetensors.flax import save_file
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  hf = {**model.config.to_hf(), "torch_dtype": str(jnp.dtype(model.dtype))}
  (folder / "config.json").write_text(json.dumps(hf, indent=2))
  tensors = {k: jnp.asarray(v) for k, v in hf_tensors(model).items()}
  save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
  if tokenizer is not None:
    tokenizer.save_pretrained(str(folder))
  return folder
