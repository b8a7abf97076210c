"""Architecture specs: the one place that knows a model family's structure.

An `ArchSpec` lists the quantization **sites** of a decoder block (the inputs
of its linears), which linears read each site, the site widths as functions of
the config, the KV-cache hook sites, and how checkpoint tensor names map onto
parameter paths. Every other table — the site → linears map of the PTQ layer,
the site widths, the Hugging Face name table of the loaders, which inputs are
shared — is derived from it. Adding an architecture family means one new spec
(and its model code).

Parameter paths are tuples of names under the model; per-block parameters live
under `layers` with a leading `num_layers` axis. `get_path` / `set_path` walk a
path on a module (attributes) or on a pure parameter dict (keys) alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from catjax.models.config import ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Site:
  """A quantization site: the input of `linears` (paths under the stacked block).

  `row_parallel`: under tensor parallelism the site's input is split over its
  features (it comes out of column-parallel linears), so its linears split
  their input axis (`catjax.models.sharding`).
  `norm`: the RMSNorm (path under the stacked block) whose output the site reads,
  for methods that fold its scale into the linears (SpinQuant), or None.
  """

  name: str
  linears: tuple[Path, ...]
  width: Callable[[ModelConfig], int]
  row_parallel: bool = False
  norm: Path | None = None

  @property
  def shared(self) -> bool:
    """One activation feeds several linears: one transform with the summed Gram."""
    return len(self.linears) > 1


@dataclasses.dataclass(frozen=True)
class ArchSpec:
  """The structure of one architecture family.

  Attributes:
    family: name of the family, e.g. "llama".
    model_types: the `ModelConfig.model_type` values it covers.
    sites: the quantization sites of a block, in forward order.
    kv_sites: hook sites of the keys (after RoPE) and values entering the KV cache.
    hf_globals: `(checkpoint name, parameter path, transposed)` of tensors
      outside the blocks.
    hf_block_prefix: checkpoint prefix of block `{i}`, e.g. "model.layers.{i}.".
    hf_block_norms: `(checkpoint suffix, path under the block)` of block norms.
    hf_groups: `(module group under the block, its checkpoint name)` pairs.

  Specs are frozen and hashable (static arguments of jitted functions).
  """

  family: str
  model_types: tuple[str, ...]
  sites: tuple[Site, ...]
  kv_sites: tuple[str, ...]
  hf_globals: tuple[tuple[str, Path, bool], ...]
  hf_block_prefix: str
  hf_block_norms: tuple[tuple[str, Path], ...]
  hf_groups: tuple[tuple[str, str], ...]

  @property
  def site_names(self) -> tuple[str, ...]:
    return tuple(s.name for s in self.sites)

  def site(self, name: str) -> Site:
    for s in self.sites:
      if s.name == name:
        return s
    raise ValueError(f"unknown site {name!r}; {self.family} has {self.site_names}")

  @property
  def site_linears(self) -> dict[str, tuple[Path, ...]]:
    """site -> the linears (paths under the block) whose input it is."""
    return {s.name: s.linears for s in self.sites}

  @property
  def linears(self) -> tuple[tuple[str, Path], ...]:
    """Every quantized linear of a block as `(site, path)`, in forward order."""
    return tuple((s.name, p) for s in self.sites for p in s.linears)

  def site_dims(self, cfg: ModelConfig) -> dict[str, int]:
    """Input width of every site of `cfg`."""
    return {s.name: int(s.width(cfg)) for s in self.sites}

  @property
  def hf_table(self) -> tuple[tuple[str, Path, bool], ...]:
    """`(checkpoint name, parameter path, transposed)`; "{i}" marks a per-block
    tensor, stacked on the leading axis of `layers/...`. Linear weights are
    transposed (checkpoints store `(out, in)`, kernels are `(in, out)`)."""
    rows = list(self.hf_globals)
    rows += [(self.hf_block_prefix + name, ("layers", *path), False)
             for name, path in self.hf_block_norms]
    for _, (group, name) in self.linears:
      stem = f"{self.hf_block_prefix}{dict(self.hf_groups)[group]}.{name}"
      rows.append((f"{stem}.weight", ("layers", group, name, "kernel"), True))
      rows.append((f"{stem}.bias", ("layers", group, name, "bias"), False))
    return tuple(rows)


LLAMA = ArchSpec(
    family="llama",
    model_types=("llama", "qwen2"),
    sites=(
        Site("attn_in", (("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj")),
             lambda c: c.hidden_size, norm=("attn_norm",)),
        Site("o_in", (("attn", "o_proj"),), lambda c: c.num_heads * c.head_dim, row_parallel=True),
        Site("mlp_in", (("mlp", "gate_proj"), ("mlp", "up_proj")), lambda c: c.hidden_size,
             norm=("mlp_norm",)),
        Site("down_in", (("mlp", "down_proj"),), lambda c: c.intermediate_size, row_parallel=True),
    ),
    kv_sites=("keys", "values"),
    hf_globals=(("model.embed_tokens.weight", ("embed",), False),
                ("model.norm.weight", ("norm", "scale"), False),
                ("lm_head.weight", ("lm_head", "kernel"), True)),
    hf_block_prefix="model.layers.{i}.",
    hf_block_norms=(("input_layernorm.weight", ("attn_norm", "scale")),
                    ("post_attention_layernorm.weight", ("mlp_norm", "scale"))),
    hf_groups=(("attn", "self_attn"), ("mlp", "mlp")),
)

# Gemma 3: Llama's sites and linears; four norms per block (pre and post attention
# and MLP) and RMSNorms of the query and key heads.
GEMMA3 = dataclasses.replace(
    LLAMA, family="gemma3", model_types=("gemma3_text",),
    hf_block_norms=(("input_layernorm.weight", ("attn_norm", "scale")),
                    ("post_attention_layernorm.weight", ("attn_post_norm", "scale")),
                    ("pre_feedforward_layernorm.weight", ("mlp_norm", "scale")),
                    ("post_feedforward_layernorm.weight", ("mlp_post_norm", "scale")),
                    ("self_attn.q_norm.weight", ("attn", "q_norm", "scale")),
                    ("self_attn.k_norm.weight", ("attn", "k_norm", "scale"))),
)

SPECS = (LLAMA, GEMMA3)


def spec_for(cfg: ModelConfig) -> ArchSpec:
  """The spec of `cfg.model_type`."""
  for s in SPECS:
    if cfg.model_type in s.model_types:
      return s
  raise ValueError(f"model_type={cfg.model_type!r} has no architecture spec; "
                   f"known: {sorted(t for s in SPECS for t in s.model_types)}")


def get_path(tree: Any, path: Path) -> Any:
  """`tree[a][b]...` on dicts, `tree.a.b...` on modules."""
  for key in path:
    tree = tree[key] if isinstance(tree, dict) else getattr(tree, key)
  return tree


def set_path(tree: Any, path: Path, value: Any) -> None:
  """Set the leaf (or submodule) at `path` in place."""
  parent = get_path(tree, path[:-1])
  if isinstance(parent, dict):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)
