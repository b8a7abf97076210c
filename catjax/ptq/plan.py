"""Per-site quantization plans: what each site of each block gets, and the hook
that runs a model quantized that way.

A `Plan` names, for every `(layer, site)`, the transform (`none`, `hadamard`
or `cat` with its block size `k`) and the weight and activation bits and
formats; everything else (weight rounding, GPTQ settings, KV bits, seeds)
comes from one base `Recipe`. `Plan.recipe(layer, site)` is the recipe that
site is quantized with: the block engine (`catjax.ptq.engine.quantize_model(...,
plan=)`) fits, merges and rounds each site exactly as a whole-model run of that
recipe would. `catjax.ptq.planner` chooses plans; the JSON form is the CLI's
`plan --json` / `quantize --plan` file.

A plan is a per-site policy (`catjax.ptq.policy`), as a recipe is: the engine,
the hook and the reports treat both alike.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

from catjax.base.errors import InputError, read_json, write_text
from catjax.core import hadamard as hd
from catjax.core import transforms as tf
from catjax.core.quant import FORMATS, FP4_GROUP
from catjax.models.config import ModelConfig
from catjax.models.spec import spec_for
from catjax.ptq.recipe import Recipe

PLAN_METHODS = ("none", "hadamard", "cat")
SITE_KEYS = ("method", "block_size", "w_bits", "a_bits", "w_format", "a_format")


def format_bits(bits: int | None, fmt: str) -> float:
  """Storage bits per element: the integer width, or 4 plus the FP4 block
  scale's 8 bits shared by its block (MXFP4 4.25, NVFP4 4.5); 16 unquantized."""
  if bits is None:
    return 16.0
  return float(bits) if fmt == "int" else 4.0 + 8.0 / FP4_GROUP[fmt]


def transform_flops(method: str, block_size: int | None, dim: int) -> int:
  """Multiply-adds per token of a site's online transform: `d·k` for CAT's
  blocks plus `d·Σ factors` for the fast Hadamard (`catjax.core.hadamard`), 0 for none."""
  if method == "none":
    return 0
  had = dim * sum(hd.hadamard_factors(dim))
  return had + (dim * block_size if tf.REGISTRY[method].takes_block_size else 0)


@dataclasses.dataclass(frozen=True)
class SitePlan:
  """One site of one block (see `Plan`); `predicted_sqnr_db` as the planner saw it."""

  layer: int
  site: str
  method: str
  block_size: int | None
  w_bits: int | None
  a_bits: int | None
  w_format: str = "int"
  a_format: str = "int"
  predicted_sqnr_db: float | None = None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Per-site choices over a base recipe.

  Attributes:
    sites: one `SitePlan` per block and site, in (layer, site) order.
    base: the recipe the sites' recipes start from (weight rounding, GPTQ,
      KV bits, seeds, clip); its method, block size, bits and formats are
      replaced per site.
    info: what the planner reports beside the sites (budgets, objective).
  """

  sites: tuple[SitePlan, ...]
  base: Recipe = Recipe()
  info: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

  def __post_init__(self):
    if self.base.train.steps:
      raise ValueError(f"a plan takes closed-form recipes; the base recipe {self.base.label!r} "
                       f"trains (train.steps={self.base.train.steps})")
    seen = set()
    for s in self.sites:
      if (s.layer, s.site) in seen:
        raise ValueError(f"plan lists layer {s.layer} site {s.site!r} twice")
      seen.add((s.layer, s.site))
    for s in self.sites:
      self.recipe(s.layer, s.site)  # validates the site

  def recipe(self, layer: int, site: str) -> Recipe:
    """The recipe block `layer`'s `site` is quantized with."""
    s = self._table.get((layer, site))
    if s is None:
      raise ValueError(f"the plan has no entry for layer {layer} site {site!r}")
    if s.method not in PLAN_METHODS:
      raise ValueError(f"layer {s.layer} site {s.site!r}: method={s.method!r}, expected one of "
                       f"{PLAN_METHODS}")
    takes_k = s.method in tf.REGISTRY and tf.REGISTRY[s.method].takes_block_size
    if takes_k and (isinstance(s.block_size, bool) or not isinstance(s.block_size, int)):
      raise ValueError(f"layer {s.layer} site {s.site!r}: {s.method} needs an integer "
                       f"block_size, got {s.block_size!r}")
    try:
      return dataclasses.replace(
          self.base, method=s.method, block_size=s.block_size if takes_k else
          self.base.block_size, w_bits=s.w_bits, a_bits=s.a_bits, w_format=s.w_format,
          a_format=s.a_format, hadamard=self.base.hadamard if takes_k else "full")
    except (TypeError, ValueError) as e:
      raise ValueError(f"layer {s.layer} site {s.site!r}: {e}") from None

  @functools.cached_property
  def _table(self) -> dict[tuple[int, str], SitePlan]:
    return {(s.layer, s.site): s for s in self.sites}

  def check_model(self, cfg: ModelConfig) -> None:
    """Raise ValueError, before any work, unless the plan covers exactly `cfg`'s
    blocks and sites with recipes its widths take."""
    spec = spec_for(cfg)
    want = {(b, s) for b in range(cfg.num_layers) for s in spec.site_names}
    have = set(self._table)
    if have != want:
      missing, extra = sorted(want - have), sorted(have - want)
      raise ValueError(f"the plan does not fit this model ({cfg.num_layers} blocks, sites "
                       f"{spec.site_names}): missing {missing[:4]}{'...' if len(missing) > 4 else ''}"
                       f", unknown {extra[:4]}{'...' if len(extra) > 4 else ''}")
    for s in self.sites:
      try:
        self.recipe(s.layer, s.site).check_model(cfg, sites=(s.site,))
      except ValueError as e:
        raise ValueError(f"layer {s.layer} site {s.site!r}: {e}") from None

  # -- summaries --------------------------------------------------------------

  def summary(self, cfg: ModelConfig, out_dims: dict[str, int]) -> dict[str, float]:
    """`avg_w_bits` (over weight elements), `avg_a_bits` (over the elements the
    linears read: a site's width times its linears), `transform_flops_ratio`
    (online transform multiply-adds per token over those of the linears).
    `out_dims`: `{site: Σ d_out over its linears}`."""
    dims = spec_for(cfg).site_dims(cfg)
    n_lin = {s.name: len(s.linears) for s in spec_for(cfg).sites}
    w_num = w_den = a_num = a_den = t_num = lin = 0.0
    for s in self.sites:
      d, o = dims[s.site], out_dims[s.site]
      w_num += d * o * format_bits(s.w_bits, s.w_format)
      w_den += d * o
      a_num += d * n_lin[s.site] * format_bits(s.a_bits, s.a_format)
      a_den += d * n_lin[s.site]
      t_num += transform_flops(s.method, s.block_size, d)
      lin += d * o
    return {"avg_w_bits": w_num / w_den, "avg_a_bits": a_num / a_den,
            "transform_flops_ratio": t_num / lin}

  # -- JSON ---------------------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    return {"sites": [s.to_dict() for s in self.sites], **self.info,
            "base_recipe": self.base.to_dict()}

  def save(self, path: str | Path) -> None:
    write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

  @classmethod
  def from_dict(cls, d: Any, *, base: Recipe | None = None, where: str = "plan") -> "Plan":
    """A plan from its JSON form; `base` replaces the file's base recipe."""
    if not isinstance(d, dict) or not isinstance(d.get("sites"), list) or not d["sites"]:
      raise InputError(where, "expected an object with a non-empty list \"sites\"")
    sites = []
    for i, s in enumerate(d["sites"]):
      if not isinstance(s, dict):
        raise InputError(where, f"sites[{i}] is {type(s).__name__}, expected an object")
      missing = [k for k in ("layer", "site", *SITE_KEYS) if k not in s]
      if missing:
        raise InputError(where, f"sites[{i}] lacks {missing}")
      kw = {k: s[k] for k in ("layer", "site", *SITE_KEYS)}
      if isinstance(kw["layer"], bool) or not isinstance(kw["layer"], int) or kw["layer"] < 0:
        raise InputError(where, f"sites[{i}].layer={kw['layer']!r}: expected an integer >= 0")
      for k in ("w_format", "a_format"):
        if kw[k] not in FORMATS:
          raise InputError(where, f"sites[{i}].{k}={kw[k]!r}: expected one of {FORMATS}")
      sites.append(SitePlan(**kw, predicted_sqnr_db=s.get("predicted_sqnr_db")))
    if base is None:
      base = Recipe()
      if isinstance(d.get("base_recipe"), dict):
        try:
          base = Recipe.from_dict(d["base_recipe"])
        except (TypeError, ValueError) as e:
          raise InputError(where, f"base_recipe: {e}") from None
    info = {k: v for k, v in d.items() if k not in ("sites", "base_recipe")}
    try:
      return cls(tuple(sites), base, info)
    except ValueError as e:
      raise InputError(where, str(e)) from None

  @classmethod
  def load(cls, path: str | Path, *, base: Recipe | None = None) -> "Plan":
    return cls.from_dict(read_json(Path(path)), base=base, where=str(path))

  @property
  def label(self) -> str:
    return "plan " + self.info.get("name", f"{len(self.sites)} sites")

  # -- the per-site policy interface (`catjax.ptq.policy`) ----------------------

  @functools.cached_property
  def uniform(self) -> Recipe | None:
    """The recipe of every site if they all share one, else None."""
    recipes = {self.recipe(s.layer, s.site) for s in self.sites}
    return recipes.pop() if len(recipes) == 1 else None

  @property
  def quantized(self) -> bool:
    return any(self.recipe(s.layer, s.site).quantized for s in self.sites)

  @property
  def propagates_quantized(self) -> bool:
    return self.base.propagates_quantized

  def predicted_db(self) -> dict[tuple[int, str], float]:
    """`{(layer, site): the planner's predicted SQNR in dB}` of the sites it predicted."""
    return {(s.layer, s.site): s.predicted_sqnr_db for s in self.sites
            if s.predicted_sqnr_db is not None}


def uniform_plan(recipe: Recipe, cfg: ModelConfig) -> Plan:
  """The plan that gives every site `recipe` (a method of `PLAN_METHODS`)."""
  spec = spec_for(cfg)
  sites = tuple(SitePlan(b, s, recipe.method, recipe.site_block_size,
                         recipe.w_bits, recipe.a_bits, recipe.w_format, recipe.a_format)
                for b in range(cfg.num_layers) for s in spec.site_names)
  return Plan(sites, recipe, {"name": recipe.label})
