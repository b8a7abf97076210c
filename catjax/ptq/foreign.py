"""CAT on any NNX model: rules over module paths, sites found from the model.

`quantize(model, rules, calibration)` works on a Flax NNX model it knows nothing
about (tunix's `Llama3`, your own):

1. **Linears** are the modules that multiply their first argument by one weight
   parameter: `nnx.Linear` (`kernel (in, out)`) and any module holding one
   einsum equation `"lhs,rhs->out"` (a string attribute) and one parameter of
   `len(rhs)` dimensions, the weight (tunix's `Einsum`: `w (D, N, H)` for
   `BTD,DNH->BTNH`, `(N, H, D)` for `BTNH,NHD->BTD`). The flattening rule: the
   weight's *input axes* are the letters it contracts with the input (in the
   input's order), which must be the input's trailing axes; they flatten, in
   that order, to `d_in`, and the weight's other axes, in order, to `d_out`.
   A module path is `"/".join` of the attribute names and indices from the
   root (`layers/3/attn/q_proj`).
2. **Rules** (`catjax.ptq.rules.Rule`) decide what each linear gets; the
   first match wins; linears no rule matches stay in float.
3. **Sites** are the linears that read the same input: during the first
   calibration batch every quantized linear records the array it was called
   with, and linears called with the very same array object (q/k/v after one
   norm, gate/up) form one site, in the order of their first call. A site
   shares one transform, fitted from the input's second moment and the summed
   weight Gram of its linears; its Hadamard signs come from the recipe's seed
   and the site's position in that order (for catjax's own decoder that is
   `layer · sites + site`, its own keys).
4. The model comes back with the merged, fake-quantized weights in place and
   each quantized linear transforming and fake-quantizing its own input before
   its original `__call__` (its class is swapped for a subclass that adds just
   that step). The transform is applied once per linear, not once per site.

5. **Blocks** (`blocks=`, a module-path regex such as `r"layers/\\d+"`) turn on
   the block-sequential walk, the one catjax's own decoder goes through
   (`catjax.ptq.walk`; `ModuleBlocks` is this model's adapter): the inputs of the
   first block are recorded (the forward stops there), then each block in turn is
   calibrated on its inputs, fitted, merged and rounded, and run again to give the
   next block its inputs: the quantized block's outputs when the recipes
   propagate quantized outputs (GPTQ: Hessians of quantized inputs, as in
   `catjax.quantize_model`), else the float block's. A block is called as
   `block(h, *args, **kwargs)` with the hidden state first; every block gets the
   other arguments the first one got (positions, mask: checked on the first
   batch), and its result is `h` or holds exactly one array shaped like `h`
   (tunix: `(cache, h)`). Without `blocks` the whole model calibrates at once,
   on full-precision inputs, which closed-form recipes need (the same walk, over
   the whole model as its one block).

   Trained CAT (`train.steps`) trains each block's transforms in the walk, as
   catjax's own engine does (`catjax.ptq.foreign_train`).

Calibration runs the model eagerly (the linears' inputs are read on the host);
the quantized model runs under `nnx.jit` like the original. KV-cache
quantization is catjax's own decoder's for now (refused here). A Linen
`(module, params)` pair goes through qwix's interception instead
(`catjax.ptq.qwix_interop.quantize_linen`: closed-form recipes, calibrated whole).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
import re
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx
from tqdm.auto import tqdm

from catjax.core.quant import QuantConfig
from catjax.core.stats import SecondMoment, weight_gram
from catjax.core.transforms import Transform, fit_transform, fold_block_hadamard
from catjax.ptq import rounding
from catjax.ptq.blocks import merge_kernel, transformed_sigma
from catjax.ptq.hooks import fake_quantize_ste
from catjax.ptq.recipe import Recipe
from catjax.ptq.rules import Rule, as_rules, first_match
from catjax.ptq.walk import walk

_EINSUM = re.compile(r"\s*([A-Za-z]+)\s*,\s*([A-Za-z]+)\s*->\s*([A-Za-z]+)\s*")
_CAPTURE: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("catjax_capture",
                                                                           default=None)
_BLOCK_CAPTURE: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "catjax_block_capture", default=None)


@dataclasses.dataclass(frozen=True, eq=False)
class Linear:
  """One linear of a model: where its weight is and how it flattens.

  Attributes:
    path: the module path, `layers/3/attn/q_proj`.
    module: the module.
    param: the attribute name of its weight parameter.
    in_axes: the weight's input axes, in the input's order.
    in_ndim: how many trailing axes of the input it contracts.
  """

  path: str
  module: nnx.Module
  param: str
  in_axes: tuple[int, ...]
  in_ndim: int

  @property
  def weight(self) -> nnx.Param:
    return getattr(self.module, self.param)

  def _order(self) -> tuple[int, ...]:
    nd = self.weight[...].ndim
    return self.in_axes + tuple(a for a in range(nd) if a not in self.in_axes)

  def flatten(self, w) -> jax.Array:
    """An array shaped like the weight as a `(d_in, d_out)` kernel (its dtype kept)."""
    w = jnp.transpose(jnp.asarray(w), self._order())
    return w.reshape(math.prod(w.shape[:len(self.in_axes)]), -1)

  def unflatten(self, kernel) -> jax.Array:
    """A `(d_in, d_out)` kernel in the weight's own shape (its dtype kept)."""
    order = self._order()
    shape = self.weight[...].shape
    moved = jnp.reshape(jnp.asarray(kernel), tuple(shape[a] for a in order))
    return jnp.transpose(moved, tuple(order.index(a) for a in range(len(shape))))

  def kernel(self) -> jax.Array:
    """The weight as a float32 `(d_in, d_out)` kernel."""
    return self.flatten(self.weight[...]).astype(jnp.float32)

  def set_kernel(self, kernel: jax.Array) -> None:
    """Store a `(d_in, d_out)` kernel back in the weight's own shape and dtype."""
    self.weight[...] = self.unflatten(kernel).astype(self.weight[...].dtype)

  def codes(self, scale) -> np.ndarray | None:
    """The weight's int8 codes on the per-output-channel grid `scale (d_out,)`, in the
    weight's shape, or None when the weight is not exactly `codes · scale` (in its dtype)."""
    weight = self.weight[...]
    s = np.asarray(scale, np.float32)
    codes = np.rint(np.asarray(self.kernel()) / np.where(s == 0, 1, s))
    back = jnp.asarray(codes.astype(np.float32) * s).astype(weight.dtype)
    if np.abs(codes).max(initial=0) > 127 or not bool(jnp.array_equal(back, self.flatten(weight))):
      return None
    return np.asarray(self.unflatten(codes.astype(np.int8)))


def as_linear(path: str, module: nnx.Module) -> Linear | str | None:
  """The module as a `Linear`, None when it is not one, or why a module that looks like
  a linear cannot be read (for the error when a rule names it)."""
  if isinstance(module, nnx.Linear):
    return Linear(path, module, "kernel", (0,), 1)
  attrs = vars(module)
  equations = [v for v in attrs.values() if isinstance(v, str) and "->" in v]
  params = [n for n, v in attrs.items() if isinstance(v, nnx.Param) and v[...].ndim >= 2]
  if len(equations) != 1 or len(params) != 1:
    return None
  axes = einsum_axes(equations[0], getattr(module, params[0])[...].ndim)
  return Linear(path, module, params[0], *axes) if isinstance(axes, tuple) else axes


def einsum_axes(equation: str, weight_ndim: int) -> tuple[tuple[int, ...], int] | str | None:
  """`(in_axes, in_ndim)` of a weight of `weight_ndim` axes, the second operand of
  `equation` (the flattening rule above); None when the operand has other axes; or why
  the einsum is no linear."""
  m = _EINSUM.fullmatch(equation)
  if m is None:
    return f"its einsum {equation!r} is not of the form 'lhs,rhs->out'"
  lhs, rhs, out = m.groups()
  if weight_ndim != len(rhs):
    return None
  shared = [c for c in rhs if c in lhs and c in out]
  contracted = [c for c in lhs if c in rhs and c not in out]
  if shared or not contracted or lhs[len(lhs) - len(contracted):] != "".join(contracted):
    return f"its einsum {equation!r} does not contract trailing input axes with the weight alone"
  return tuple(rhs.index(c) for c in contracted), len(contracted)


def dot_general_axes(dimension_numbers, lhs_ndim: int) -> tuple[tuple[int, ...], int] | None:
  """`(in_axes, in_ndim)` of the weight (right operand) of a `jax.lax.dot_general`
  that contracts the input's trailing axes with it and batches none, else None."""
  (lc, rc), (lb, rb) = dimension_numbers
  pairs = sorted((int(a) % lhs_ndim, int(b)) for a, b in zip(lc, rc))
  if lb or rb or not pairs or [a for a, _ in pairs] != list(range(lhs_ndim - len(pairs), lhs_ndim)):
    return None
  return tuple(b for _, b in pairs), len(pairs)


def module_path(path: Sequence[Any]) -> str:
  return "/".join(str(p) for p in path)


def find_linears(model: nnx.Module) -> dict[str, Linear]:
  """`{module path: Linear}` of every linear of `model`, in graph order."""
  return {lin.path: lin for p, m in nnx.iter_modules(model)
          if isinstance(lin := as_linear(module_path(p), m), Linear)}


# ---------------------------------------------------------------------------
# The quantized linear: its input transformed and fake-quantized, then its own call.


@functools.partial(jax.tree_util.register_dataclass, data_fields=["transform", "w_scale"],
                   meta_fields=["config", "in_ndim", "weights", "ste"])
@dataclasses.dataclass(frozen=True)
class InputQuantizer:
  """What a quantized linear does to its input: `x Tᵀ`, then per-token fake quantization
  with `config`. Its weight's grid rides along, for site reports and checkpoints:
  `weights` (the quantizer) and `w_scale` (per-output-channel scales of an integer grid)."""

  transform: Transform | None
  config: QuantConfig | None
  in_ndim: int
  weights: QuantConfig | None = None
  w_scale: jax.Array | None = None
  ste: bool = False  # straight-through rounding (trained CAT's loss)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.transform is not None:
      x = self.transform.apply(x, in_ndim=self.in_ndim)
    if self.config is None:
      return x
    shape = x.shape
    flat = x.reshape(*shape[:x.ndim - self.in_ndim], -1)
    clip = None if self.transform is None else self.transform.a_clip
    return fake_quantize_ste(flat, self.config, ste=self.ste, clip=clip).reshape(shape)


nnx.register_data_type(InputQuantizer)
nnx.register_data_type(Transform)


@functools.cache
def _quantizing_class(cls: type) -> type:
  """`cls` with a `__call__` that first records its input (during calibration) and runs
  its `catjax_input` quantizer, if set, on it."""

  def __call__(self, x, *args, **kwargs):
    capture = _CAPTURE.get()
    if capture is not None:
      capture(self, x)
    quantizer = vars(self).get("catjax_input")
    if quantizer is not None:
      x = quantizer(x)
    return cls.__call__(self, x, *args, **kwargs)

  return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                     "__qualname__": cls.__qualname__, "catjax_base": cls})


# ---------------------------------------------------------------------------
# Rules -> linears -> sites


def _assign(model: nnx.Module, rules: tuple[Rule, ...]) -> dict[str, tuple[Linear, int]]:
  """`{path: (linear, rule index)}` of the linears a rule with a recipe takes first.

  Rules are matched against the linears' paths. A rule that takes no linear is an
  error, naming a module it matches that is not a linear, if there is one; so is a
  rule with a recipe on a module that looks like a linear but cannot be read."""
  taken: dict[int, list[Linear]] = {i: [] for i in range(len(rules))}
  others: dict[int, tuple[str, nnx.Module, str | None]] = {}
  for p, m in nnx.iter_modules(model):
    path = module_path(p)
    lin = as_linear(path, m)
    if isinstance(lin, Linear):
      i = first_match(rules, path)
      if i is not None:
        taken[i].append(lin)
      continue
    for i, r in enumerate(rules):
      if r.matches(path):
        if isinstance(lin, str) and r.recipe is not None:
          raise ValueError(f"Rule({r.module_path!r}) matches module {path!r} "
                           f"({type(m).__name__}), which is not a linear catjax can read: {lin}")
        others.setdefault(i, (path, m, lin))
  for i, found in taken.items():
    if found:
      continue
    if i in others:
      path, m, _ = others[i]
      raise ValueError(f"Rule({rules[i].module_path!r}) matches module {path or '(the model)'!r} "
                       f"({type(m).__name__}), which is not a linear, and no linear: a linear is "
                       "an nnx.Linear or a module with one einsum equation and one weight")
    paths = list(find_linears(model))
    sample = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
    raise ValueError(f"Rule({rules[i].module_path!r}) matches no linear of the model (or an "
                     f"earlier rule takes them); its linears are: {sample or 'none'}")
  return {lin.path: (lin, i) for i, found in taken.items() for lin in found
          if rules[i].recipe is not None}


@dataclasses.dataclass
class Site:
  """Linears that read one input, in the order of their first call, and its statistics."""

  name: str
  linears: list[Linear]
  rule: int
  stats: SecondMoment | None = None
  inputs: list[jax.Array] | None = None


_update = jax.jit(lambda s, x: s.update(x))


def flat_input(x: jax.Array, lin: Linear) -> jax.Array:
  return jnp.reshape(x, (-1, math.prod(x.shape[x.ndim - lin.in_ndim:]))).astype(jnp.float32)


def calibrate_sites(model: nnx.Module, assigned: dict[str, tuple[Linear, int]],
                    rules: tuple[Rule, ...], calibration: Iterable, forward: Callable,
                    *, keep_inputs: bool = False, progress: bool = True) -> list[Site]:
  """Run `forward(model, batch)` on every calibration batch, group the linears into
  sites on the first and accumulate each site's input second moment (and keep the
  inputs themselves, `Site.inputs`, with `keep_inputs`)."""
  sites: list[Site] | None = None
  first_of: dict[str, Site] = {}
  batches = 0
  for batch in tqdm(calibration, desc="calibrate", unit="batch", disable=not progress,
                    leave=False):
    calls: list[tuple[Linear, jax.Array]] = []  # holds the inputs: their ids stay unique

    def capture(module, x):
      lin, _ = assigned.get(vars(module).get("catjax_path"), (None, None))
      if lin is None:
        return
      if isinstance(x, jax.core.Tracer):
        raise ValueError(f"linear {lin.path!r} ran under a jax transformation during "
                         "calibration; calibration runs the model eagerly: pass a forward that "
                         "does not jit, scan or remat the layers")
      if sites is None or lin.path in first_of:
        calls.append((lin, x))

    token = _CAPTURE.set(capture)
    try:
      forward(model, batch)
    finally:
      _CAPTURE.reset(token)
    if sites is None:
      sites = _group(calls, assigned, rules)
      first_of = {s.linears[0].path: s for s in sites}
    for lin, x in calls:
      site = first_of.get(lin.path)
      if site is not None:
        v = flat_input(x, lin)
        site.stats = _update(SecondMoment.zeros(v.shape[-1]) if site.stats is None
                             else site.stats, v)
        if keep_inputs:
          site.inputs = (site.inputs or []) + [x]
    batches += 1
  if not batches:
    raise ValueError("calibration holds no batch")
  return sites


def _group(calls, assigned, rules) -> list[Site]:
  groups: dict[int, list[Linear]] = {}
  seen: dict[str, int] = {}
  for lin, x in calls:
    if lin.path in seen:
      raise ValueError(f"linear {lin.path!r} ran more than once in one forward; catjax needs "
                       "each quantized linear to run once per forward (one input, one site)")
    seen[lin.path] = id(x)
    groups.setdefault(id(x), []).append(lin)
  missing = [p for p in assigned if p not in seen]
  if missing:
    raise ValueError(f"linears {missing[:4]} did not run in the forward; their rules match "
                     "modules the forward does not call")
  sites = []
  for linears in groups.values():
    idx = {assigned[lin.path][1] for lin in linears}
    if len(idx) > 1:
      named = ", ".join(f"Rule({rules[i].module_path!r}) on {[l.path for l in linears if assigned[l.path][1] == i]}"
                        for i in sorted(idx))
      raise ValueError(f"two rules on one site (linears that read the same input): {named}; "
                       "a site shares one transform: give its linears one rule")
    sites.append(Site(site_name(linears), linears, idx.pop()))
  return sites


def site_name(linears: list[Linear]) -> str:
  """`layers/3/attn/{q_proj,k_proj,v_proj}`-style name of a site."""
  if len(linears) == 1:
    return linears[0].path
  heads, tails = zip(*(lin.path.rpartition("/")[::2] for lin in linears))
  if len(set(heads)) == 1:
    return f"{heads[0]}/{{{','.join(tails)}}}" if heads[0] else f"{{{','.join(tails)}}}"
  return "{" + ",".join(lin.path for lin in linears) + "}"


# ---------------------------------------------------------------------------
# Fit, merge, quantize


def _check_recipe(recipe: Recipe, rule: Rule) -> None:
  if recipe.kv_bits is not None:
    raise ValueError(f"Rule({rule.module_path!r}): kv_bits={recipe.kv_bits}: KV-cache "
                     "quantization needs catjax's own decoder (its key/value hook sites)")
  if recipe.train.steps and recipe.transform is not None and recipe.transform.end_to_end:
    raise ValueError(f"Rule({rule.module_path!r}): {recipe.method!r} with train.steps learns its "
                     "rotations end to end through catjax's own decoder (its residual readers "
                     "and heads); the rules take its closed form (train.steps=0)")


def fit_site(site: Site, recipe: Recipe, ordinal: int) -> Transform | None:
  """The site's transform from its statistics and the summed Gram of its kernels."""
  method = recipe.transform_method
  if method is None:
    return None
  kernels = [lin.kernel() for lin in site.linears]
  gram = sum(weight_gram(k) for k in kernels)
  weight = jnp.concatenate(kernels, axis=-1)
  t = fit_transform(
      method, site.stats.sigma, gram, block_size=recipe.block_size,
      key=jax.random.fold_in(jax.random.PRNGKey(recipe.seed), ordinal),
      act_absmax=site.stats.absmax, alpha=recipe.smoothquant.alpha,
      weight_absmax=jnp.abs(weight).max(-1), eps=recipe.eps, x64=recipe.fit_x64,
      name=site.name, weight=weight)
  return fold_block_hadamard(t) if recipe.hadamard == "block" else t


def quantize_site(site: Site, recipe: Recipe, transform: Transform | None,
                  w_clip: dict[str, jax.Array] | None = None) -> dict[str, jax.Array]:
  """Merge `T⁻ᵀ` into each kernel of the site, round it onto its grid (with trained CAT's
  learned clip ratios `w_clip`, `{linear path: (d_out,)}`, where given), attach the input
  quantizer. Returns `{linear path: per-output-channel scales}` of integer grids."""
  scales = {}
  sigma = []

  def hessian():
    if not sigma:
      sigma.append(transformed_sigma(site.stats.sigma.astype(jnp.float32), transform))
    return sigma[0]

  for lin in site.linears:
    k = lin.kernel()
    if transform is not None:
      k = merge_kernel(transform, k)
    if recipe.w_config is not None:
      try:
        k, scale = rounding.REGISTRY[recipe.weights].quantize(
            k, recipe.w_config, hessian=hessian, ratio=(w_clip or {}).get(lin.path),
            recipe=recipe)
      except FloatingPointError as e:  # GPTQ's Cholesky: say which linear
        raise FloatingPointError(f"{lin.path} (site {site.name}): {e}") from None
      if scale is not None:
        scales[lin.path] = scale
    lin.set_kernel(k)
    lin.module.catjax_input = InputQuantizer(transform, recipe.a_config, lin.in_ndim,
                                             recipe.w_config, scales.get(lin.path))
  return scales


# ---------------------------------------------------------------------------
# The block-sequential engine


class _StopForward(Exception):
  """Ends a calibration forward once the first block's inputs are recorded."""


@functools.cache
def _recording_class(cls: type) -> type:
  """`cls` whose `__call__` first reports its arguments to the block capture."""

  def __call__(self, *args, **kwargs):
    capture = _BLOCK_CAPTURE.get()
    if capture is not None:
      capture(self, args, kwargs)
    return cls.__call__(self, *args, **kwargs)

  return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                     "__qualname__": cls.__qualname__, "catjax_base": cls})


def find_blocks(model: nnx.Module, pattern: str) -> list[tuple[str, nnx.Module]]:
  """`[(path, module)]` of the modules whose path fully matches `pattern`, in graph order."""
  if not isinstance(pattern, str):
    raise ValueError(f"blocks={pattern!r} must be a module-path regex such as r'layers/\\d+'")
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"blocks={pattern!r} is not a valid regex: {e}") from None
  found = [(module_path(p), m) for p, m in nnx.iter_modules(model)
           if regex.fullmatch(module_path(p))]
  if not found:
    paths = [module_path(p) for p, _ in nnx.iter_modules(model)][1:9]
    raise ValueError(f"blocks={pattern!r} matches no module of the model; its modules start "
                     f"{', '.join(paths) or 'with none'}")
  paths = {path for path, _ in found}
  for inner, _ in found:
    parts = inner.split("/")
    outer = next((o for o in ("/".join(parts[:k]) for k in range(len(parts))) if o in paths), None)
    if outer is not None:
      raise ValueError(f"blocks={pattern!r} matches {outer!r} and {inner!r} inside it: "
                       "blocks must not nest")
  return found


def _same(a, b) -> bool:
  """Whether two argument trees are equal: the same structure, arrays equal or identical."""
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  if ta != tb:
    return False
  for x, y in zip(la, lb):
    if x is y:
      continue
    if hasattr(x, "shape"):
      if getattr(y, "shape", None) != x.shape or not bool(jnp.array_equal(x, y)):
        return False
    elif x != y:
      return False
  return True


def block_inputs(model: nnx.Module, blocks: list[tuple[str, nnx.Module]], calibration: Iterable,
                 forward: Callable, *, progress: bool = True) -> tuple[list[jax.Array], tuple, dict]:
  """The hidden states entering the first block, one per batch, and the other arguments
  every block is called with.

  On the first batch the forward runs through: each block must run once, in graph
  order, with the first block's other arguments; on the others it stops at the
  first block."""
  hidden: list[jax.Array] = []
  rest: list[tuple[tuple, dict]] = []
  order: list[int] = []
  first = [True]

  def capture(module, args, kwargs):
    i = vars(module).get("catjax_block")  # an attribute: nnx.jit's copies carry it too
    if i is None:
      return
    path = blocks[i][0]
    if not args or not hasattr(args[0], "shape"):
      raise ValueError(f"block {path!r} was called without an array as its first argument "
                       "(its hidden state): blocks are called as block(h, *args, **kwargs)")
    if isinstance(args[0], jax.core.Tracer):
      raise ValueError(f"block {path!r} ran under a jax transformation during calibration; "
                       "calibration runs the model eagerly: pass a forward that does not jit, "
                       "scan or remat the layers")
    order.append(i)
    if first[0] and i != len(order) - 1:
      raise ValueError(f"the forward ran the blocks in the order {order[:8]} (indices into "
                       f"{[p for p, _ in blocks[:4]]}...): each block must run once, in "
                       "graph order")
    if i == 0:
      hidden.append(args[0])
      rest.append((args[1:], kwargs))
    elif not _same((args[1:], kwargs), rest[-1]):
      raise ValueError(f"block {path!r} got other arguments than {blocks[0][0]!r} (besides its "
                       "hidden state); the block engine calls every block with the first "
                       "block's arguments")
    if not first[0]:
      raise _StopForward

  swapped = [(m, type(m)) for _, m in blocks]
  for i, (m, cls) in enumerate(swapped):
    m.__class__ = _recording_class(cls)
    m.catjax_block = i
  token = _BLOCK_CAPTURE.set(capture)
  try:
    for batch in tqdm(calibration, desc="block inputs", unit="batch", disable=not progress,
                      leave=False):
      try:
        forward(model, batch)
      except _StopForward:
        pass
      if first[0]:
        if len(order) != len(blocks):
          raise ValueError(f"the forward ran {len(order)} of the {len(blocks)} blocks "
                           f"{blocks[0][0]!r}...{blocks[-1][0]!r}: each must run once")
        first[0] = False
  finally:
    _BLOCK_CAPTURE.reset(token)
    for m, cls in swapped:
      m.__class__ = cls
      del m.catjax_block
  if not hidden:
    raise ValueError("calibration holds no batch")
  return hidden, rest[0][0], rest[0][1]


def hidden_of(out, h: jax.Array, path: str) -> jax.Array:
  if hasattr(out, "shape") and out.shape == h.shape:
    return out
  like = [a for a in jax.tree.leaves(out) if getattr(a, "shape", None) == h.shape]
  if len(like) != 1:
    raise ValueError(f"block {path!r} returned {jax.tree.structure(out)} with {len(like)} arrays "
                     f"shaped like its input {tuple(h.shape)}; the block engine needs exactly "
                     "one (the hidden state)")
  return like[0]


class ModuleBlocks:
  """Any NNX model as the block engine's adapter (`catjax.ptq.walk.BlockAdapter`): its
  blocks, found by module path, each called as `block(h, *args, **kwargs)`; or, with
  `forward`, the whole model as one block called as `forward(model, batch)` (the
  stream is then the calibration batches themselves). A block's sites are found in its
  calibration, from the identity of its linears' inputs; the stream is one hidden state
  per batch."""

  def __init__(self, blocks: list[tuple[str, nnx.Module]], assigned: dict[str, tuple[Linear, int]],
               rules: tuple[Rule, ...], inputs, *, args: tuple = (), kwargs: dict | None = None,
               forward: Callable | None = None, progress: bool = False):
    self.blocks, self.assigned, self.rules, self._inputs = blocks, assigned, rules, inputs
    self.args, self.kwargs, self.forward = args, kwargs or {}, forward
    self.num_blocks = len(blocks)
    self.progress = progress  # the sites' progress bars (the whole model: its only block)
    self.sites: list[Site] = []  # the current block's
    self.ordinal = 0  # sites before the current block's (their Hadamard keys)

  def name(self, b):
    path = self.blocks[b][0]
    return f"block {path!r}" if path else "the model"

  def inputs(self):
    return self._inputs

  def call(self, block: nnx.Module, h, path: str):
    if self.forward is not None:
      return self.forward(block, h)
    return hidden_of(block(h, *self.args, **self.kwargs), h, path)

  def calibrate(self, b, x, *, outputs):
    path, block = self.blocks[b]
    mine = {p: a for p, a in self.assigned.items() if not path or p.startswith(path + "/")}
    outs: list[jax.Array] = []

    def run(blk, h):
      out = self.call(blk, h, path)
      if outputs:
        outs.append(out)

    self.sites = []
    if mine:
      self.sites = calibrate_sites(block, mine, self.rules, x, run, progress=self.progress)
    elif outputs:
      for h in x:
        run(block, h)
    return (outs if outputs else None), {s.name: s.stats for s in self.sites}

  def run(self, b, x):
    path, block = self.blocks[b]
    return [self.call(block, h, path) for h in x]

  def recipes(self) -> list[Recipe]:
    return [self.rules[site.rule].recipe for site in self.sites]

  def fit(self, b, stats):
    return [fit_site(site, r, self.ordinal + i)
            for i, (site, r) in enumerate(zip(self.sites, self.recipes()))]

  def train(self, b, transforms, x, target):
    from catjax.ptq.foreign_train import train_sites

    recipes = self.recipes()
    if not self.sites or not recipes[0].train.steps:
      return transforms, None, None
    path, block = self.blocks[b]
    return train_sites(block, path, self.sites, transforms, recipes, x, target, self.args,
                       self.kwargs, layer=b)

  def quantize(self, b, transforms, stats, w_clip):
    for site, r, t in tqdm(list(zip(self.sites, self.recipes(), transforms)), desc="quantize",
                           unit="site", disable=not self.progress, leave=False):
      quantize_site(site, r, t, w_clip)
    self.ordinal += len(self.sites)
    return bool(self.sites)


def instrument(assigned: dict[str, tuple[Linear, int]]) -> None:
  """Give each assigned linear the quantizing class (records its input, runs its quantizer)."""
  for lin, _ in assigned.values():
    if not hasattr(type(lin.module), "catjax_base"):
      lin.module.__class__ = _quantizing_class(type(lin.module))
    lin.module.catjax_path = lin.path


def quantized_linears(model: nnx.Module) -> dict[str, Linear]:
  """`{path: Linear}` of the linears `catjax.quantize` quantized (those with an input quantizer)."""
  return {p: lin for p, lin in find_linears(model).items()
          if vars(lin.module).get("catjax_input") is not None}


def site_inputs(model: nnx.Module, paths: Sequence[str], batches: Iterable,
                forward: Callable | None = None) -> list[Site]:
  """The sites of the linears at `paths` in `model` (not changed) and their inputs, kept
  from `forward(model, batch)` on every batch (`Site.inputs`, as called)."""
  model = nnx.clone(model)
  linears = find_linears(model)
  missing = [p for p in paths if p not in linears]
  if missing:
    raise ValueError(f"linears {missing[:4]} are not linears of the model (its linears: "
                     f"{list(linears)[:6]}...)")
  assigned = {p: (linears[p], 0) for p in paths}
  instrument(assigned)
  return calibrate_sites(model, assigned, (Rule(".*"),), batches, forward or _default_forward,
                         keep_inputs=True, progress=False)


def _default_forward(model, batch):
  return model(batch)


def _propagation(rules: tuple[Rule, ...]) -> bool:
  """Whether the recipes propagate quantized outputs (they must agree)."""
  kinds = {r.recipe.propagates_quantized: r for r in rules if r.recipe is not None}
  if len(kinds) > 1:
    raise ValueError(f"Rule({kinds[True].module_path!r}) propagates quantized outputs and "
                     f"Rule({kinds[False].module_path!r}) full-precision ones; the block engine "
                     "walks the model one way: set the recipes' propagate to one value")
  return bool(kinds) and kinds.popitem()[0]


def _quantize_linen(model, rules, calibration, *, forward, blocks, progress):
  """A Linen `(module, params)` through qwix (`catjax.ptq.qwix_interop.quantize_linen`)."""
  if isinstance(model, linen.Module):
    raise ValueError("a Linen model comes with its parameters: pass (module, params)")
  why = ("blocks=" if blocks is not None else "forward=" if forward is not None else None)
  walking = [r for r in rules if r.recipe is not None
             and (r.recipe.propagates_quantized or r.recipe.train.steps)]
  if why or walking:
    raise ValueError(f"{why or f'Rule({walking[0].module_path!r}): recipe {walking[0].recipe.label!r}'}: "
                     "a Linen model is calibrated whole, as module.apply({'params': params}, "
                     "batch), with closed-form recipes that propagate full-precision outputs "
                     "(the block walk runs NNX modules)")
  try:
    from catjax.ptq import qwix_interop
  except ImportError as e:
    raise ImportError(f"a Linen model is quantized through qwix ({e}): pip install qwix") from None
  return qwix_interop.quantize_linen(*model, rules, calibration, progress=progress)


def quantize(model: nnx.Module, rules: Rule | Recipe | Sequence[Rule], calibration: Iterable,
             *, forward: Callable | None = None, blocks: str | None = None, copy: bool = True,
             progress: bool = True, info: dict | None = None) -> nnx.Module:
  """Quantize any NNX model (or Linen model) by rules over its module paths.

  Args:
    model: an `nnx.Module`; not changed unless `copy=False`. Or a Linen
      `(module, params)` pair, quantized through qwix (`pip install qwix`; closed-form
      recipes, calibrated whole as `module.apply({"params": params}, batch)`), which
      returns `(ptq_module, ptq_params)`: run `ptq_module.apply({"params": ptq_params}, x)`.
    rules: `Rule`s (first match wins), one `Rule`, or a `Recipe` for every linear.
    calibration: an iterable of batches, each passed to `forward`.
    forward: `forward(model, batch)` runs the model (its result is not used);
      default `model(batch)`.
    blocks: a regex of the decoder blocks' module paths (`r"layers/\\d+"`): walk
      the model block by block (needed by recipes that propagate quantized
      outputs, e.g. GPTQ: their Hessians come from the quantized blocks before);
      only linears inside the blocks are quantized then. None: calibrate the
      whole model at once, on full-precision inputs.
    copy: quantize a copy (`nnx.clone`) and leave `model` as it is.
    progress: show progress bars.
    info: a dict to receive what the walk reports: `info["train"]`, per trained
      block its losses (closed form, first and last step, trained), the largest
      condition number of `I + Δ` and whether the trained transforms were kept.

  Returns:
    The quantized model: the same classes, each quantized linear's weight merged
    and fake-quantized and its input transformed and fake-quantized in its call.

  Raises:
    ValueError: a rule that matches no linear or a module that is not a linear;
      two rules on the linears of one site; a linear the forward does not run, or
      runs twice; a recipe this path does not take (KV bits), trained CAT without
      `blocks` or with recipes that train differently; with
      `blocks`: a pattern that matches no module, a rule on a linear outside the
      blocks, blocks called in another order or with other arguments, recipes
      that disagree on propagation; without it, a recipe that propagates
      quantized outputs.
  """
  rules = as_rules(rules)
  for r in rules:
    if r.recipe is not None:
      _check_recipe(r.recipe, r)
  if isinstance(model, linen.Module) or (isinstance(model, tuple) and len(model) == 2
                                         and isinstance(model[0], linen.Module)):
    return _quantize_linen(model, rules, calibration, forward=forward, blocks=blocks,
                           progress=progress)
  if not isinstance(model, nnx.Module):
    raise ValueError(f"model must be an nnx.Module or a Linen (module, params) pair, got "
                     f"{type(model).__name__}")
  trains = {r.recipe.train for r in rules if r.recipe is not None}
  if len(trains) > 1 and any(t.steps for t in trains):
    raise ValueError(f"the rules' recipes train differently ({sorted(map(str, trains))}); trained "
                     "CAT trains each block once: give the recipes one TrainConfig")
  if blocks is None and any(t.steps for t in trains):
    raise ValueError("trained CAT (train.steps > 0) trains the model block by block: pass "
                     "blocks=<regex of the decoder blocks' paths>, e.g. r'layers/\\d+'")
  quantized_inputs = _propagation(rules)
  if blocks is None and quantized_inputs:
    r = next(r for r in rules if r.recipe is not None and r.recipe.propagates_quantized)
    raise ValueError(f"Rule({r.module_path!r}): recipe {r.recipe.label!r} propagates quantized "
                     "outputs (its Hessians come from the quantized blocks before): pass "
                     "blocks=<regex of the decoder blocks' paths>, e.g. r'layers/\\d+', or "
                     "set propagate='fp'")
  if copy:
    model = nnx.clone(model)
  assigned = _assign(model, rules)
  found = None if blocks is None else find_blocks(model, blocks)
  if found is not None:
    outside = [p for p in assigned if not any(p.startswith(b + "/") for b, _ in found)]
    if outside:
      r = rules[assigned[outside[0]][1]]
      raise ValueError(f"Rule({r.module_path!r}) quantizes {outside[0]!r}, outside the blocks "
                       f"{blocks!r}: with blocks, only linears inside them are quantized (give "
                       "the others a Rule(path, None))")
  instrument(assigned)
  forward = forward or _default_forward
  if found is not None:
    hidden, args, kwargs = block_inputs(model, found, calibration, forward, progress=progress)
    adapter = ModuleBlocks(found, assigned, rules, hidden, args=args, kwargs=kwargs)
  else:
    adapter = ModuleBlocks([("", model)], assigned, rules, calibration, forward=forward,
                           progress=progress)
  reports = walk(adapter, quantized_inputs=quantized_inputs,
                 train=any(t.steps for t in trains), progress=progress)
  if info is not None and found is not None:
    info["train"] = reports
  return model
