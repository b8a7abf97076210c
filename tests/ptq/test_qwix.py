"""qwix interop (catjax.ptq.qwix_interop): catjax's weights run by qwix's PTQ provider, and
qwix's calibrate → fit → quantize pipeline with catjax's providers, on the small NNX net.
Runs where qwix is installed (scripts/test.sh's tunix stage; google-tunix brings it)."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

qwix = pytest.importorskip("qwix")

from flax import nnx  # noqa: E402

from catjax.ptq import qwix_interop as cq  # noqa: E402
from catjax.ptq.foreign import quantize  # noqa: E402
from catjax.ptq.recipe import Recipe  # noqa: E402
from catjax.ptq.rules import Rule  # noqa: E402
from foreign_net import CALIB, TOKENS, Net  # noqa: E402

CAT = Recipe(method="cat", block_size=8)
RULES = [Rule(r"blocks/\d+/.*", CAT)]


def _ptq(net, rules=RULES, integer=False):
  return qwix.quantize_model(net, cq.CatPtqProvider(rules, integer=integer), TOKENS[:1])


def _calibrated(net, rules=RULES, jit=False):
  provider = cq.CatCalibrationProvider(rules)
  model = qwix.quantize_model(net, provider, TOKENS[:1])
  run = nnx.jit(lambda m, t: m(t)) if jit else (lambda m, t: m(t))
  for batch in CALIB:
    run(model, batch)
  return model, provider


@pytest.mark.parametrize("integer", [False, True], ids=["fake", "integer"])
@pytest.mark.parametrize("recipe, blocks", [
    (CAT, None), (Recipe(method="hadamard", w_bits=8, a_bits=8), None),
    (Recipe(method="cat", block_size=8, weights="gptq"), r"blocks/\d+"),
], ids=["cat", "hadamard-w8a8", "cat-gptq-blocks"])
def test_export_runs_catjax_weights_in_qwix(recipe, blocks, integer):
  """The qwix model with catjax's exported weights computes catjax's quantized logits —
  with fake-quantized inputs, or (integer=True) with integer inputs: qwix then multiplies
  integer codes (its dot_generals give int32) — and its weights are qwix's: int codes in
  the weight's shape, scales per output channel."""
  net = Net()
  rules = [Rule(r"blocks/\d+/.*", recipe)]
  ours = quantize(net, rules, CALIB, blocks=blocks, progress=False)
  theirs = cq.export(ours, _ptq(net, rules, integer))
  products = [line for line in str(jax.make_jaxpr(theirs)(TOKENS)).splitlines()
              if "dot_general[" in line and ":i32[" in line.replace(" ", "")]
  assert len(products) == (14 if integer else 0)  # 2 blocks × 7 linears
  w = theirs.blocks[0].o.w
  assert isinstance(w, cq.WithCatInput) and w.array.qvalue.dtype == jnp.dtype(f"int{recipe.w_bits}")
  assert w.array.qvalue.shape == (4, 8, 32) and w.array.scale.shape == (1, 1, 32)
  assert w.quantizer.transform is not None and w.quantizer.in_ndim == 2
  want = ours(TOKENS)
  # Float rounding differs between the two products (qwix dequantizes the codes, catjax
  # merged them); where a later activation lies at a rounding boundary, that flips one
  # code by one step (seen at W8A8 on some CPUs), and the flip reaches the tokens after
  # it. So: most logits agree to float rounding, none by more than such a flip.
  diff, top = np.abs(np.asarray(theirs(TOKENS)) - np.asarray(want)), float(jnp.abs(want).max())
  assert np.median(diff) <= 1e-5 * top and diff.max() <= 5e-3 * top, (np.median(diff), diff.max())
  # qwix's own RTN weights without the transform are another model: the check can fail.
  assert float(jnp.abs(_ptq(net, rules)(TOKENS) - want).max()) > 1e-2 * float(jnp.abs(want).max())


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_qwix_pipeline_equals_catjax_quantize(jit):
  """calibrate (qwix.quantize_model with CatCalibrationProvider, run on the batches, eagerly
  or under nnx.jit) → fit → the PTQ model: catjax.quantize's model on the same batches, to
  float rounding (the statistics are summed in another order)."""
  net = Net()
  calibrated, provider = _calibrated(net, jit=jit)
  assert provider.sites[:4] == [("blocks/0/q", "blocks/0/k", "blocks/0/v"), ("blocks/0/o",),
                                ("blocks/0/gate", "blocks/0/up"), ("blocks/0/down",)]
  got = cq.fit(_ptq(net), net, calibrated, provider)(TOKENS)
  want = quantize(net, RULES, CALIB, progress=False)(TOKENS)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))
  np.testing.assert_array_equal(net(TOKENS), Net()(TOKENS))  # the float model is not changed


def test_qwix_rules_keep_float_rules_and_order():
  rules = cq.qwix_rules([Rule("blocks/0/.*", None), Rule(r"blocks/\d+/.*", CAT)])
  assert type(rules[0]) is qwix.QuantizationRule and rules[0].weight_qtype is None
  assert isinstance(rules[1], cq.CatRule) and rules[1].weight_qtype == "int4"
  net = Net()
  ours = quantize(net, [Rule("blocks/0/.*", None), Rule(r"blocks/\d+/.*", CAT)], CALIB,
                  progress=False)
  theirs = cq.export(ours, _ptq(net, rules))
  assert not isinstance(theirs.blocks[0].q.w, cq.WithCatInput)
  np.testing.assert_allclose(theirs(TOKENS), ours(TOKENS), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kw, match", [
    ({"act_qtype": "int4"}, "act_qtype='int4': catjax quantizes the activations itself"),
    ({"recipe": Recipe(method="cat", w_format="mxfp4", a_bits=None)}, "mxfp4 weights"),
    ({"recipe": Recipe(method="cat", w_bits=3)}, "3-bit integer weights"),
    ({"recipe": Recipe(method="cat", w_bits=None)}, "no weight quantization"),
    ({"recipe": "cat"}, "recipe must be a catjax Recipe, got 'cat'"),
    ({"weight_qtype": "int8"}, "weight_qtype='int8' but the recipe's weights are int4"),
])
def test_bad_cat_rule(kw, match):
  with pytest.raises(ValueError, match=match):
    cq.CatRule(module_path=".*", **({"recipe": CAT} | kw))


def test_bad_export():
  net = Net()
  ours = quantize(net, RULES, CALIB, progress=False)
  with pytest.raises(ValueError, match=r"'blocks/1/\w+', quantized by catjax, is not a "
                                       "quantized weight of qwix's model"):
    cq.export(ours, _ptq(net, [Rule(r"blocks/0/.*", CAT)]))
  with pytest.raises(ValueError, match=r"qwix's model quantizes \['head'\], which catjax did not"):
    cq.export(ours, _ptq(net, [Rule(r"(blocks/\d+/.*|head)", CAT)]))
  with pytest.raises(ValueError, match="the model has no linear catjax quantized"):
    cq.export(net, _ptq(net))
  ours.blocks[0].q.w[...] = ours.blocks[0].q.w[...] * 1.01
  with pytest.raises(ValueError, match="'blocks/0/q': its weight is not on its grid"):
    cq.export(ours, _ptq(net))


def test_bad_fit():
  net = Net()
  provider = cq.CatCalibrationProvider(RULES)
  calibrated = qwix.quantize_model(net, provider, TOKENS[:1])
  with pytest.raises(ValueError, match="no calibration tokens were seen"):
    cq.fit(_ptq(net), net, calibrated, provider)
  with pytest.raises(ValueError, match="the calibration provider saw no forward"):
    cq.fit(_ptq(net), net, calibrated, cq.CatCalibrationProvider(RULES))
  calibrated, provider = _calibrated(net, [Rule("blocks/0/q", CAT), Rule(r"blocks/\d+/.*", CAT)])
  with pytest.raises(ValueError, match="two rules on one site"):
    cq.fit(_ptq(net), net, calibrated, provider)


def _doc_cat_linen():
  """docs/api.md's Linen block (`cat_linen`), run as written."""
  page = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
  block = next(b for b in re.findall(r"```python\n(.*?)```", page, flags=re.S) if "def cat_linen" in b)
  namespace = {}
  exec(block, namespace)  # noqa: S102 - the docs' own code
  return namespace["cat_linen"]


def _linen_pipeline(rules, *, jit=False, integer=False, ptq_rules=None):
  """qwix's Linen pipeline with catjax's providers: calibrate → fit_params → the PTQ
  model's logits; eagerly by the docs' own `cat_linen`, or with a jitted calibration
  (apply with a mutable quant_stats)."""
  from foreign_net import linen_net, linen_params

  net = Net()
  model, params = linen_net(), linen_params(net)
  if not jit and not integer and ptq_rules is None:
    ptq, qparams = _doc_cat_linen()(model, params, rules, CALIB)
    return net, model, params, qparams, ptq.apply({"params": qparams}, TOKENS)
  provider = cq.CatCalibrationProvider(rules)
  calibrated = qwix.quantize_model(model, provider)
  apply = lambda v, b: calibrated.apply(v, b, mutable=["quant_stats"])  # noqa: E731
  apply = jax.jit(apply) if jit else apply
  stats = {}
  for batch in CALIB:
    _, stats = apply({"params": params, **stats}, batch)
  ptq = qwix.quantize_model(model, cq.CatPtqProvider(ptq_rules or rules, integer=integer))
  abstract = jax.eval_shape(ptq.init, jax.random.key(0), TOKENS)["params"]
  qparams = cq.fit_params(abstract, params, stats["quant_stats"], provider)
  if jit:  # sites found by input identity under jit too
    assert provider.sites[:4] == [("blocks_0/q", "blocks_0/k", "blocks_0/v"), ("blocks_0/o",),
                                  ("blocks_0/gate", "blocks_0/up"), ("blocks_0/down",)]
  return net, model, params, qparams, ptq.apply({"params": qparams}, TOKENS)


@pytest.mark.parametrize("jit, integer", [(False, False), (True, True)],
                         ids=["eager-fake", "jit-integer"])
def test_linen_pipeline_equals_catjax_quantize(jit, integer):
  """A Linen model (the net written in Linen, same weights) through qwix with catjax's
  providers — calibrate → fit_params → qwix's PTQ model — computes what catjax.quantize
  makes of the NNX net, to float rounding, with fake-quantized or integer inputs; its
  sites are found by input identity as in NNX (q/k/v, gate/up). The eager case is
  docs/api.md's own block."""
  rules = [Rule(r"blocks.\d+/.*", CAT)]
  net, model, params, qparams, got = _linen_pipeline(rules, jit=jit, integer=integer)
  np.testing.assert_array_equal(model.apply({"params": params}, TOKENS), net(TOKENS))
  w = qparams["blocks_0"]["o"]["w"]
  assert isinstance(w, cq.WithCatInput) and w.array.qvalue.shape == (4, 8, 32)
  assert isinstance(params["blocks_0"]["o"]["w"], jax.Array)  # the float params are not changed
  want = quantize(net, rules, CALIB, progress=False)(TOKENS)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))
  assert float(jnp.abs(want - net(TOKENS)).max()) > 1e-2 * float(jnp.abs(want).max())


def test_linen_rules_must_agree():
  """qwix's PTQ model must quantize the linears catjax fitted, and no others."""
  with pytest.raises(ValueError, match=r"qwix's model quantizes \['blocks_0/down/kernel', "
                                       r"'blocks_1/down/kernel'\], which catjax did not: their "
                                       "rules must quantize the same linears"):
    _linen_pipeline([Rule(r"blocks.\d+/(q|k|v|o|gate|up)", CAT), Rule(".*", None)],
                    ptq_rules=[Rule(r"blocks.\d+/.*", CAT)])


def test_catjax_quantize_takes_a_linen_pair():
  """`catjax.quantize((module, params), rules, batches)`: the same pipeline behind the
  rule API, `(ptq_module, ptq_params)` out; the block walk and its recipes are refused."""
  from foreign_net import linen_net, linen_params

  net = Net()
  model, params = linen_net(), linen_params(net)
  rules = [Rule(r"blocks.\d+/.*", CAT)]
  ptq, qparams = quantize((model, params), rules, CALIB, progress=False)
  want = quantize(net, rules, CALIB, progress=False)(TOKENS)
  np.testing.assert_allclose(ptq.apply({"params": qparams}, TOKENS), want, rtol=1e-4,
                             atol=1e-5 * float(jnp.abs(want).max()))
  with pytest.raises(ValueError, match="blocks=: a Linen model is calibrated whole"):
    quantize((model, params), rules, CALIB, blocks=r"blocks_\d+")
  with pytest.raises(ValueError, match=r"Rule\('.\*'\): recipe .*gptq.*closed-form recipes"):
    quantize((model, params), Recipe(method="cat", block_size=8, weights="gptq"), CALIB)
  with pytest.raises(ValueError, match=r"pass \(module, params\)"):
    quantize(model, rules, CALIB)
