"""Rules over module paths: what the linears of any Flax model get.

A rule pairs a regular expression over a module's path (`"/".join` of its
attribute names and indices, e.g. `layers/3/attn/q_proj`, matched with
`re.fullmatch`) with a `Recipe`; the first rule that matches a linear decides
it, as in qwix. `recipe=None` keeps the matched linears in float (e.g. a
first rule `Rule(r".*lm_head", None)`). No Flax here: `catjax.ptq.foreign`
applies the rules to a model.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from catjax.ptq.recipe import Recipe


@dataclasses.dataclass(frozen=True)
class Rule:
  """The linears whose module path fully matches `module_path` get `recipe`.

  Attributes:
    module_path: a regular expression, matched with `re.fullmatch` against the
      module path (`layers/3/mlp/down_proj`).
    recipe: the transform, bits, formats and weight method of those linears'
      sites, or None to leave them in float.
  """

  module_path: str
  recipe: Recipe | None = Recipe()

  def __post_init__(self):
    if not isinstance(self.module_path, str):
      raise ValueError(f"Rule.module_path={self.module_path!r}: expected a regular expression string")
    try:
      re.compile(self.module_path)
    except re.error as e:
      raise ValueError(f"Rule.module_path={self.module_path!r} is not a regular expression: {e}") from None
    if self.recipe is not None and not isinstance(self.recipe, Recipe):
      raise ValueError(f"Rule({self.module_path!r}).recipe={self.recipe!r}: expected a Recipe or None")

  def matches(self, path: str) -> bool:
    return re.fullmatch(self.module_path, path) is not None


def as_rules(rules: Rule | Recipe | Sequence[Rule]) -> tuple[Rule, ...]:
  """`rules` as a tuple: one rule, a recipe for every linear (`Rule(".*", recipe)`) or
  a sequence of rules."""
  if isinstance(rules, Recipe):
    return (Rule(".*", rules),)
  if isinstance(rules, Rule):
    return (rules,)
  rules = tuple(rules)
  bad = [r for r in rules if not isinstance(r, Rule)]
  if not rules or bad:
    raise ValueError(f"rules must be a Recipe, a Rule or a non-empty sequence of Rules, got {rules!r}")
  return rules


def first_match(rules: Sequence, path: str) -> int | None:
  """The index of the first rule whose `module_path` fully matches `path`, or None
  (catjax's `Rule`s or any with a `module_path` regex, e.g. qwix's)."""
  return next((i for i, r in enumerate(rules) if re.fullmatch(r.module_path, path)), None)
