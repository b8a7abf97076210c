"""Method specs: the CLI's short form of a recipe, `METHOD[@OPT...]`.

`parse_spec("cat@k32@gptq@w4a8")` is `Recipe(method="cat", block_size=32,
weights="gptq", w_bits=4, a_bits=8)`; options not given keep the base
recipe's values. The options, as the CLI's help and the spec errors name them,
are `SPEC_OPTIONS`.
"""

from __future__ import annotations

import re
from typing import Any

from catjax.core.quant import FORMATS
from catjax.ptq import rounding
from catjax.ptq.recipe import Recipe

_FORMATS = tuple(f for f in FORMATS if f != "int") + ("int",)

SPEC_OPTIONS = (("wNaM", "weight / activation bits, 16 = not quantized"), ("kN", "CAT block size"),
                ("kvN", "KV-cache bits"), ("bh", "block Hadamard"),
                ("|".join(rounding.REGISTRY), "weight rounding"), ("dX", "GPTQ damping"),
                ("act", "GPTQ act-order"), ("tN", "trained CAT, N steps per block"),
                ("nowc", "trained CAT without learned weight clips"),
                ("lac", "trained CAT also learns an activation clip per layer and site"),
                ("nofold", "trained SpinQuant keeps the norm scales in the activations"),
                ("acX", "activation clip ratio"), ("pfp|pq", "propagate fp / quantized outputs"),
                ("f32", "float32 fits"), ("|".join(_FORMATS), "number format of both operands"))

# Options that set one field to one value (and every weight method of the registry).
_FLAGS = {"bh": ("hadamard", "block"), "pfp": ("propagate", "fp"),
          "pq": ("propagate", "quantized"), "f32": ("fit_x64", False), "act": ("gptq.act_order", True),
          "nowc": ("train.w_clip", False), "lac": ("train.a_clip", True),
          "nofold": ("spinquant.fold_norms", False)}

# Options with a number: (pattern, how its groups set the fields).
_bits = lambda v: None if int(v) == 16 else int(v)  # 16 bits: not quantized
_NUMBERED = (
    (r"w(\d+)a(\d+)", lambda w, a: {"w_bits": _bits(w), "a_bits": _bits(a)}),
    (r"kv(\d+)", lambda v: {"kv_bits": _bits(v)}),
    (r"k(\d+)", lambda v: {"block_size": int(v)}),
    (r"t(\d+)", lambda v: {"train.steps": int(v)}),
    (r"d(\d*\.?\d+)", lambda v: {"gptq.damping": float(v)}),
    (r"ac(\d*\.?\d+)", lambda v: {"a_clip": float(v)}),
)


def spec_grammar() -> str:
  """`METHOD[@wNaM][@kN]...`: the method spec grammar, from `SPEC_OPTIONS`."""
  return "METHOD" + "".join(f"[@{o.replace('|', '|@')}]" for o, _ in SPEC_OPTIONS)


def parse_spec(spec: str, base: Recipe | None = None) -> Recipe:
  """`base` (default `Recipe()`) with a method spec applied: `METHOD[@OPT...]`,
  options `wNaM` (bits; 16 = not quantized), `kN` (block size), `kvN` (KV bits),
  `bh` (block Hadamard), `rtn` / `clip` / `gptq` (weight rounding), `tN`
  (trained CAT, N steps per block), `pfp` / `pq` (propagate fp / quantized
  outputs), `f32` (float32 fits), `dX` (GPTQ damping), `act` (GPTQ act-order),
  `nowc` (trained CAT without learned weight clips), `lac` (trained CAT also
  learns an activation clip per layer and site), `acX` (activation clip
  ratio), `mxfp4` / `nvfp4` (both formats, and 4 bits), `int` (both formats
  integer), e.g. "none@w6a6", "cat@k192", "cat@bh", "hadamard@gptq",
  "cat@gptq@d0.1@t200", "hadamard@ac0.9", "cat@mxfp4", "hadamard@nvfp4".

  Raises:
    ValueError: an unknown option (naming the options there are), or a recipe
      the options make invalid (`Recipe`'s own checks).
  """
  method, *opts = spec.strip().split("@")
  kw: dict[str, Any] = {"method": method}
  for opt in opts:
    o = opt.lower()
    if o in _FLAGS:
      kw[_FLAGS[o][0]] = _FLAGS[o][1]
      continue
    if o in rounding.REGISTRY:
      kw["weights"] = o
      continue
    if o in FORMATS:
      kw["w_format"] = kw["a_format"] = o
      if o != "int":
        kw["w_bits"] = kw["a_bits"] = 4
      continue
    for pattern, fields in _NUMBERED:
      m = re.fullmatch(pattern, o)
      if m:
        kw.update(fields(*m.groups()))
        break
    else:
      names = [o for opt_, _ in SPEC_OPTIONS for o in opt_.split("|")]
      names += [w for w in rounding.REGISTRY if w not in names]
      raise ValueError(f"method spec {spec!r}: unknown option {opt!r}; expected one of "
                       + ", ".join(names))
  return (Recipe() if base is None else base).with_fields(kw)
