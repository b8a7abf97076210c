"""catjax's CAT in qwix's pipeline, and catjax's quantized weights as qwix's parameters.

qwix (Google's JAX quantization library) quantizes a Flax model by intercepting
`jax.lax.dot_general` / `jnp.einsum` while it runs, under rules with a
`module_path` regex (first match wins). This module gives it what it lacks, an
online input transform, in its own terms; it needs `pip install qwix` (only
this module imports it).

- `CatRule`: a `qwix.QuantizationRule` carrying a catjax `Recipe`; its
  `weight_qtype` follows the recipe's integer weight bits (`int4`, `int8`).
  catjax quantizes the activations itself, after the transform, so `act_qtype`
  stays None (a qwix activation quantizer would run on the transformed input a
  second time).
- `CatCalibrationProvider`: for `qwix.quantize_model(model, provider, sample)`;
  while the returned model runs (eagerly or under `nnx.jit`), each matched
  linear accumulates its input's second moment in the `quant_stats` collection
  (`<weight>_cat`, a `catjax.core.stats.SecondMoment` of the flattened input),
  and the provider records which linears read the very same input array in one
  forward: those are a site (q/k/v, gate/up) and share one transform.
- `CatPtqProvider`: qwix's `PtqProvider` whose ops also take a `WithCatInput`
  weight: the weight as qwix's `QArray` (integer codes in the weight's shape,
  per-output-channel scales) plus catjax's input quantizer (`x Tᵀ`, then
  per-token fake quantization), run on the op's input first; `integer=True`
  hands qwix the input's integer codes and per-token scales instead, so its
  product multiplies integers (a W4A4 / W8A8 integer forward).
- `fit(ptq_model, model, calibrated, provider)`: fit each site's transform from
  the collected statistics and the summed weight Gram, merge, round, and write
  the weights into the model `qwix.quantize_model(model, CatPtqProvider(...))`
  made — calibrate → fit → quantize, in qwix's order.
- `export(quantized, ptq_model)`: the same writing step from a model
  `catjax.quantize` returned (any recipe the rule path takes: GPTQ with
  quantized-input Hessians, trained CAT, ...), where the formats meet: integer
  weights with per-channel scales.

The weights' flattening is the rule path's (`catjax.ptq.foreign`): a linear is
an `nnx.Linear` or a module with one einsum equation and one weight, its input
axes flatten to `d_in`, the others to `d_out`. qwix's calibration providers
skip einsums that contract several axes (o_proj `BTNH,NHD->BTD`); this one
takes them.

Linen models: the same providers under `qwix.quantize_model(linen_model, ...)`.
A linen linear is an op whose weight is a parameter of the module running it
(qwix's `find_param`), flattened as the op contracts it (`dot_general` over the
input's trailing axes, or an einsum, by the same rule); the statistics live in
the `quant_stats` collection (apply with `mutable=["quant_stats"]`), and
`fit_params(abstract, params, quant_stats, provider)` returns the parameters of
qwix's PTQ model, as `qwix.quantize_params` does for its own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import qwix
from flax import nnx
from tqdm.auto import tqdm
from qwix._src.providers import ptq as qwix_ptq
from qwix._src.utils import flax_util

from catjax.core.quant import quantize
from catjax.core.stats import SecondMoment
from catjax.ptq import foreign
from catjax.ptq.foreign import InputQuantizer, Linear, Site
from catjax.ptq.recipe import Recipe
from catjax.ptq.rules import Rule, first_match

_SUFFIX = "_cat"


# ---------------------------------------------------------------------------
# Rules


def _unfit(w) -> str | None:
  """Why weights quantized by `w` (a QuantConfig or None) have no qwix format, or None."""
  if w is None:
    return "no weight quantization"
  if w.format != "int":
    return f"{w.format} weights"
  if not w.symmetric or w.bits not in (4, 8):
    return f"{'' if w.symmetric else 'asymmetric '}{w.bits}-bit integer weights"
  return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class CatRule(qwix.QuantizationRule):
  """A qwix rule whose linears get a catjax `recipe` (transform, bits, rounding)."""

  recipe: Recipe | None = None

  def __post_init__(self):
    if not isinstance(self.recipe, Recipe):
      raise ValueError(f"CatRule({self.module_path!r}): recipe must be a catjax Recipe, got "
                       f"{self.recipe!r}")
    if self.act_qtype is not None:
      raise ValueError(f"CatRule({self.module_path!r}): act_qtype={self.act_qtype!r}: catjax "
                       "quantizes the activations itself, after the transform (the recipe's "
                       "a_bits); leave act_qtype None")
    why = _unfit(self.recipe.w_config)
    if why:
      raise ValueError(f"CatRule({self.module_path!r}): recipe {self.recipe.label!r} has {why}; "
                       "qwix's parameters take symmetric int4 / int8 weights")
    w = self.recipe.w_config
    qtype = f"int{w.bits}"
    if self.weight_qtype is not None and str(jnp.dtype(self.weight_qtype)) != qtype:
      raise ValueError(f"CatRule({self.module_path!r}): weight_qtype={self.weight_qtype!r} "
                       f"but the recipe's weights are {qtype}")
    object.__setattr__(self, "weight_qtype", qtype)


def qwix_rules(rules: Rule | Recipe | Sequence[Rule]) -> list[qwix.QuantizationRule]:
  """catjax `Rule`s as qwix rules: a recipe becomes a `CatRule`, a float rule a qwix rule
  that quantizes nothing (it keeps the first-match order)."""
  return [qwix.QuantizationRule(module_path=r.module_path) if r.recipe is None
          else CatRule(module_path=r.module_path, recipe=r.recipe)
          for r in foreign.as_rules(rules)]


def _rules(rules) -> list[qwix.QuantizationRule]:
  if isinstance(rules, (Rule, Recipe)) or (
      isinstance(rules, (list, tuple)) and any(isinstance(r, Rule) for r in rules)):
    return qwix_rules(rules)
  return list(rules)


def _current_linear(w, axes) -> Linear | None:
  """The linear whose op qwix intercepted (its weight `w`; `axes`, the op's reading of
  the weight's input axes), or None. NNX: the rule path's reading of the module. Linen:
  the module's parameter that is `w`, flattened as the op contracts it (a `Linear`
  over a holder of that parameter)."""
  module = flax_util.get_current_module()
  if isinstance(module, nnx.Module):
    lin = foreign.as_linear("/".join(map(str, getattr(module, "qwix_path", ()))), module)
    return lin if isinstance(lin, Linear) and tuple(w.shape) == lin.weight[...].shape else None
  if not isinstance(module, flax.linen.Module) or not isinstance(axes, tuple):
    return None
  param = flax_util.find_param(w)
  if param is None:
    return None
  return _held_linear("/".join(map(str, module.path)), param, jax.ShapeDtypeStruct(w.shape, w.dtype),
                      *axes)


class _Held:
  """Holds one linen parameter as an `nnx.Param` attribute, for a `Linear` to read."""


def _held_linear(path: str, param: str, value, in_axes, in_ndim) -> Linear:
  holder = _Held()
  setattr(holder, param, nnx.Param(value))
  return Linear(path, holder, param, tuple(in_axes), in_ndim)


# ---------------------------------------------------------------------------
# Calibration


class CatCalibrationProvider(qwix.QuantizationProvider):
  """Collects each `CatRule` linear's input second moment and the sites (see the module)."""

  def __init__(self, rules, **kwargs):
    self.rules = _rules(rules)  # in qwix's precedence order
    super().__init__(self.rules, **kwargs)
    self.sites: list[tuple[str, ...]] | None = None  # linear paths per site, in call order
    self.linears: dict[str, tuple[str, tuple[int, ...], int]] = {}  # path: param, axes, ndim
    self._calls: dict[int, list[str]] = {}
    self._keep: list[Any] = []  # the inputs of one forward: their ids stay unique

  def process_model_inputs(self, model, model_args, model_kwargs):
    self._calls, self._keep = {}, []
    return super().process_model_inputs(model, model_args, model_kwargs)

  def process_model_output(self, method_name, model_output):
    if self.sites is None and self._calls:
      self.sites = [tuple(paths) for paths in self._calls.values()]
    self._calls, self._keep = {}, []
    return super().process_model_output(method_name, model_output)

  def _record(self, op: str, x: jax.Array, w: jax.Array, axes) -> None:
    rule, _ = self._get_current_rule_and_op_id(op)
    if not isinstance(rule, CatRule):
      return
    lin = _current_linear(w, axes)
    if lin is None:
      return
    self.linears[lin.path] = (lin.param, lin.in_axes, lin.in_ndim)
    self._keep.append(x)
    paths = self._calls.setdefault(id(x), [])
    if lin.path in paths or any(lin.path in p for p in self._calls.values() if p is not paths):
      raise ValueError(f"linear {lin.path!r} ran more than once in one forward; catjax needs "
                       "each quantized linear to run once per forward (one input, one site)")
    paths.append(lin.path)
    v = foreign.flat_input(x, lin)
    var = flax_util.get_or_create_variable("quant_stats", lin.param + _SUFFIX,
                                           lambda: SecondMoment.zeros(v.shape[-1]))
    if flax_util.should_update_quant_stats():
      var.value = var.value.update(v)

  def dot_general(self, lhs, rhs, dimension_numbers, *args, **kwargs):
    self._record("dot_general", lhs, rhs, foreign.dot_general_axes(dimension_numbers, lhs.ndim))
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, *args, **kwargs)

  def einsum(self, equation, *operands, **kwargs):
    if len(operands) == 2 and isinstance(equation, str):
      self._record("einsum", *operands, foreign.einsum_axes(equation, operands[1].ndim))
    return jnp.einsum(equation, *operands, **kwargs)

  def get_intercept_map(self):
    return super().get_intercept_map() | {"jax.lax.dot_general": self.dot_general,
                                          "jax.numpy.einsum": self.einsum}


# ---------------------------------------------------------------------------
# The quantized weight and the provider that runs it


@flax.struct.dataclass(kw_only=True)
class WithCatInput(qwix_ptq.WithAux[qwix.QArray]):
  """A qwix quantized weight (`array`, `how`) with catjax's input quantizer, run on the
  op's input before the product."""

  quantizer: InputQuantizer


nnx.register_data_type(WithCatInput)


def _integer_input(q: InputQuantizer, x: jax.Array) -> qwix.QArray | None:
  """`x Tᵀ` on catjax's activation grid as a qwix `QArray` (codes in `x`'s shape, one
  scale per token), or None when the grid is not symmetric int4 / int8."""
  c = q.config
  if c is None or c.format != "int" or not c.symmetric or c.bits not in (4, 8) \
      or c.granularity != "token" or c.group_size is not None:
    return None
  if q.transform is not None:
    x = q.transform.apply(x, in_ndim=q.in_ndim)
  lead = x.shape[:x.ndim - q.in_ndim]
  codes = quantize(x.reshape(*lead, -1), c)
  return qwix.QArray(qvalue=codes.values.reshape(x.shape).astype(f"int{c.bits}"),
                     scale=codes.scale.reshape(*lead, *(1,) * q.in_ndim).astype(x.dtype),
                     qtype=f"int{c.bits}")


class CatPtqProvider(qwix.PtqProvider):
  """qwix's `PtqProvider`, whose ops run a `WithCatInput` weight's input quantizer first.

  `rules`: qwix rules (`CatRule`s for catjax's linears, any qwix rule besides) or
  catjax `Rule`s (converted by `qwix_rules`). `integer=True`: the transformed input
  goes to qwix's product as integer codes with per-token scales (catjax's grid), so
  qwix multiplies integers by integers (W4A4 / W8A8) and scales the result; where
  the activations are not symmetric int4 / int8 per token, they stay fake-quantized.
  Either way the result is catjax's fake-quantized product up to float rounding."""

  def __init__(self, rules, *, integer: bool = False, **kwargs):
    super().__init__(_rules(rules), **kwargs)
    self.integer = integer

  def _input(self, x, w: WithCatInput):
    q = _integer_input(w.quantizer, x) if self.integer else None
    return (w.quantizer(x) if q is None else q), qwix_ptq.WithAux(w.array, w.how)

  def dot_general(self, lhs, rhs, dimension_numbers, *args, **kwargs):
    if isinstance(rhs, WithCatInput):
      lhs, rhs = self._input(lhs, rhs)
    return super().dot_general(lhs, rhs, dimension_numbers, *args, **kwargs)

  def einsum(self, equation, *operands, **kwargs):
    if len(operands) == 2 and isinstance(operands[1], WithCatInput):
      operands = self._input(*operands)
    return super().einsum(equation, *operands, **kwargs)

  def astype(self, x, dtype, *args, **kwargs):
    """`jnp.astype` of a quantized weight casts its dequantized type (tunix's Qwen2 casts
    its einsum weights before the product; qwix's own provider refuses that)."""
    if isinstance(x, qwix_ptq.WithAux):
      return x.replace(array=x.array.astype(dtype))
    return jnp.astype(x, dtype, *args, **kwargs)

  def get_intercept_map(self):
    return super().get_intercept_map() | {"jax.numpy.astype": self.astype}


# ---------------------------------------------------------------------------
# Writing catjax's weights into qwix's model


def _scale_shape(lin: Linear) -> tuple[int, ...]:
  return tuple(1 if a in lin.in_axes else n for a, n in enumerate(lin.weight[...].shape))


def _with_cat_input(lin: Linear, target: Any, path: str) -> WithCatInput:
  """`lin` (a linear `catjax.quantize` quantized) as qwix's weight, in `target`'s format."""
  q: InputQuantizer = lin.module.catjax_input
  why = _unfit(q.weights) or (None if q.w_scale is not None else "no per-channel scales")
  if why:
    raise ValueError(f"linear {path!r}: its weights have {why}; qwix's parameters take "
                     "symmetric int4 / int8 weights with per-channel scales")
  qtype = jnp.dtype(target.how.qtype)
  if str(qtype) != f"int{q.weights.bits}":
    raise ValueError(f"linear {path!r}: catjax's weights are int{q.weights.bits}, qwix's model "
                     f"quantizes it to {qtype}: give it a rule with weight_qtype "
                     f"'int{q.weights.bits}'")
  if sorted(set(range(lin.weight[...].ndim)) - set(target.how.channelwise_axes)) != sorted(
      lin.in_axes) or target.how.tiled_axes:
    raise ValueError(f"linear {path!r}: qwix's weight is quantized along axes "
                     f"{target.how.channelwise_axes} (tiles {dict(target.how.tiled_axes)}); "
                     "catjax's scales are per output channel, over the input axes "
                     f"{lin.in_axes}")
  codes = lin.codes(q.w_scale)
  if codes is None:
    raise ValueError(f"linear {path!r}: its weight is not on its grid (codes · scale); was it "
                     "changed after catjax.quantize?")
  array = qwix.QArray(qvalue=jnp.asarray(codes).astype(qtype),
                      scale=jnp.asarray(q.w_scale, jnp.float32).reshape(_scale_shape(lin)),
                      qtype=qtype)
  return WithCatInput(array=array, how=target.how,
                      quantizer=dataclasses.replace(q, weights=None, w_scale=None))


def export(quantized: nnx.Module, ptq_model: nnx.Module) -> nnx.Module:
  """Write the weights of `quantized` (from `catjax.quantize`) into `ptq_model` (from
  `qwix.quantize_model(model, CatPtqProvider(rules), sample)` on the same float model),
  in place, and return it: each quantized linear's weight becomes a `WithCatInput`
  (integer codes, per-channel scales, its input quantizer). Every linear catjax
  quantized must be a quantized weight of `ptq_model` at the same path, and no other."""
  modules = {foreign.module_path(p): m for p, m in nnx.iter_modules(ptq_model)}
  theirs = {path for path, m in modules.items()
            if any(isinstance(v, qwix_ptq.WithAux) for v in vars(m).values())}
  ours = foreign.quantized_linears(quantized)
  if not ours:
    raise ValueError("the model has no linear catjax quantized (pass catjax.quantize's result)")
  for path, lin in ours.items():
    if not isinstance(vars(modules.get(path, object())).get(lin.param), qwix_ptq.WithAux):
      raise ValueError(f"linear {path!r}, quantized by catjax, is not a quantized weight of "
                       f"qwix's model: its rules must quantize the same linears (qwix's: "
                       f"{sorted(theirs)[:4]}...)")
  extra = sorted(theirs - set(ours))
  if extra:
    raise ValueError(f"qwix's model quantizes {extra[:4]}, which catjax did not: its rules must "
                     "quantize the same linears")
  for path, lin in ours.items():
    setattr(modules[path], lin.param, _with_cat_input(lin, vars(modules[path])[lin.param], path))
  return ptq_model


def _fit_sites(provider: CatCalibrationProvider, linear, stats) -> list[Linear]:
  """Fit, merge and round every site `provider` saw, in its call order (the Hadamard
  keys), as `catjax.quantize` without `blocks` does; `linear(path)` gives a linear to
  write into, `stats(lin)` its statistics. Returns the quantized linears."""
  if provider.sites is None:
    raise ValueError("the calibration provider saw no forward: run the model qwix.quantize_model "
                     "returned on the calibration batches first")
  rules, done = provider.rules, []
  for ordinal, paths in enumerate(provider.sites):
    idx = {first_match(rules, p) for p in paths}
    if len(idx) > 1:
      raise ValueError(f"two rules on one site (linears that read the same input): {paths}; a "
                       "site shares one transform: give its linears one rule")
    rule = rules[idx.pop()]
    lins = [linear(p) for p in paths]
    st = stats(lins[0])
    if int(st.count) == 0:
      raise ValueError(f"site {paths}: no calibration tokens were seen (run the calibrated model "
                       "on the batches; its first call, inside qwix.quantize_model, counts none)")
    site = Site(foreign.site_name(lins), lins, 0, stats=st)
    foreign.quantize_site(site, rule.recipe, foreign.fit_site(site, rule.recipe, ordinal))
    done += lins
  return done


def fit(ptq_model: nnx.Module, model: nnx.Module, calibrated: nnx.Module,
        provider: CatCalibrationProvider) -> nnx.Module:
  """Fit, merge, round and write catjax's weights into `ptq_model`, in place.

  Args:
    ptq_model: `qwix.quantize_model(model, CatPtqProvider(rules), sample)`.
    model: the float model both came from (not changed).
    calibrated: `qwix.quantize_model(model, provider, sample)` after running it on the
      calibration batches: its `quant_stats` hold each linear's statistics.
    provider: that `CatCalibrationProvider` (its `sites`, its rules).

  Every site's transform is fitted on full-precision inputs, as `catjax.quantize`
  without `blocks` does (its Hadamard keys follow the sites' call order), so the
  result equals `export(catjax.quantize(model, rules, batches), ptq_model)`.
  Linen models: `fit_params`.
  """
  work = nnx.clone(model)
  linears = foreign.find_linears(work)
  stats_of = {foreign.module_path(p): m for p, m in nnx.iter_modules(calibrated)}
  _fit_sites(provider, linears.__getitem__,
             lambda lin: getattr(stats_of[lin.path], lin.param + _SUFFIX).value)
  return export(work, ptq_model)


def _at(tree, path: str) -> dict:
  """The sub-dict of a linen variable tree at module path `a/b/c`."""
  for name in path.split("/"):
    tree = tree[name]
  return tree


def fit_params(ptq_params, params, quant_stats, provider: CatCalibrationProvider) -> dict:
  """Linen: catjax's weights as the parameters of qwix's PTQ model (the Linen
  counterpart of `fit`, in the role of `qwix.quantize_params`).

  Args:
    ptq_params: the (abstract) parameters of `qwix.quantize_model(model,
      CatPtqProvider(rules))`: `jax.eval_shape(ptq_model.init, key, sample)["params"]`.
    params: the float model's parameters (not changed).
    quant_stats: the `"quant_stats"` collection after applying
      `qwix.quantize_model(model, provider)` to every calibration batch with
      `mutable=["quant_stats"]` (each call given the previous one's).
    provider: that `CatCalibrationProvider`.

  Returns:
    A copy of `params` whose quantized kernels are `WithCatInput`s (integer codes,
    per-channel scales, catjax's input quantizer): pass it to `ptq_model.apply`.
  """
  params = flax.core.unfreeze(params)
  out = jax.tree.map(lambda a: a, params)  # new containers, shared leaves
  ptq_params = flax.linen.unbox(flax.core.unfreeze(ptq_params))

  def linear(path):
    if path not in provider.linears:
      raise ValueError(f"linear {path!r} was not recorded by this provider")
    param, in_axes, in_ndim = provider.linears[path]
    return _held_linear(path, param, jnp.asarray(_at(params, path)[param]), in_axes, in_ndim)

  done = _fit_sites(provider, linear, lambda lin: _at(quant_stats, lin.path)[lin.param + _SUFFIX])
  theirs = {p for p, v in _with_aux(ptq_params)}
  ours = {f"{lin.path}/{lin.param}" for lin in done}
  if theirs != ours:
    why = [f"qwix's model quantizes {sorted(theirs - ours)[:4]}, which catjax did not"] * bool(
        theirs - ours) + [f"catjax quantized {sorted(ours - theirs)[:4]}, which qwix's model "
                          "does not"] * bool(ours - theirs)
    raise ValueError(f"{'; '.join(why)}: their rules must quantize the same linears")
  for lin in done:
    target = _at(ptq_params, lin.path)[lin.param]
    _at(out, lin.path)[lin.param] = _with_cat_input(lin, target, lin.path)
  return out


def _with_aux(tree, prefix: str = ""):
  """`(path, value)` of every qwix quantized weight in a nested parameter dict."""
  for name, v in tree.items():
    path = f"{prefix}{name}"
    if isinstance(v, qwix_ptq.WithAux):
      yield path, v
    elif isinstance(v, dict):
      yield from _with_aux(v, path + "/")


def quantize_linen(module: flax.linen.Module, params, rules, calibration, *,
                   integer: bool = False, progress: bool = True):
  """A Linen model quantized by catjax's `rules` through qwix (what `catjax.quantize`
  does with a `(module, params)` pair): calibrate on every batch
  (`module.apply({"params": params}, batch)`), fit, and return `(ptq_module,
  ptq_params)`; run it as `ptq_module.apply({"params": ptq_params}, x)`.
  `integer=True`: qwix multiplies integer inputs (see `CatPtqProvider`)."""
  provider = CatCalibrationProvider(rules)
  calibrated = qwix.quantize_model(module, provider)
  stats, sample = {}, None
  for batch in tqdm(calibration, desc="calibrate", unit="batch", disable=not progress,
                    leave=False):
    sample = batch if sample is None else sample
    _, stats = calibrated.apply({"params": params, **stats}, batch, mutable=["quant_stats"])
  if sample is None:
    raise ValueError("calibration holds no batch")
  ptq = qwix.quantize_model(module, CatPtqProvider(rules, integer=integer))
  abstract = jax.eval_shape(ptq.init, jax.random.key(0), sample)["params"]
  return ptq, fit_params(abstract, params, stats["quant_stats"], provider)
