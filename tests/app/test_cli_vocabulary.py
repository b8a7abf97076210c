"""The CLI's choices and defaults come from the library's constants, and it
does not print jax's TPU probe on a machine without one."""

import logging

import pytest

from catjax.app.cli import build_parser, quiet_backend_probe
from catjax.core.quant import FORMATS
from catjax.ptq.planner import DEFAULT_BITS, DEFAULT_BLOCK_SIZES, OBJECTIVES
from catjax.ptq.recipe import PROPAGATE, PTQ_METHODS, WEIGHT_METHODS, Recipe
from catjax.app.specs import parse_spec


def _actions(command):
  parser = build_parser()
  (sub,) = [a for a in parser._actions if isinstance(a.choices, dict)]
  return {a.dest: a for a in sub.choices[command]._actions}


def test_quantize_choices_and_defaults_are_the_library_constants():
  a = _actions("quantize")
  assert tuple(a["method"].choices) == PTQ_METHODS and a["method"].default == Recipe.method
  assert tuple(a["weights"].choices) == WEIGHT_METHODS and a["weights"].default == Recipe.weights
  assert tuple(a["propagate"].choices) == PROPAGATE
  assert tuple(a["w_format"].choices) == FORMATS == tuple(a["a_format"].choices)
  assert a["block_size"].default == Recipe.block_size


def test_plan_choices_and_defaults_are_the_planners():
  a = _actions("plan")
  assert tuple(a["objective"].choices) == tuple(OBJECTIVES)
  assert tuple(a["bits"].default) == DEFAULT_BITS
  assert tuple(a["block_sizes"].default) == DEFAULT_BLOCK_SIZES


def test_save_stats_help_states_the_triangle_size():
  help_text = _actions("quantize")["save_stats"].help
  assert "upper triangle" in help_text and "400 MB" not in help_text


@pytest.mark.parametrize("platforms, level", [("", logging.ERROR), ("cpu", logging.ERROR),
                                              ("tpu,cpu", logging.NOTSET)])
def test_backend_probe_is_quiet_unless_a_tpu_is_asked_for(monkeypatch, platforms, level):
  logger = logging.getLogger("jax._src.xla_bridge")
  monkeypatch.setattr(logger, "level", logging.NOTSET)
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  quiet_backend_probe()
  assert logger.level == level


def test_the_gains_table_is_shown_only_with_its_baselines():
  from catjax.analysis.sites import SQNRGain
  from catjax.app.pipeline import Comparison, has_gains
  assert not has_gains([])
  assert not has_gains([Comparison("cat k=64 W4A4")])  # a single method: no baselines ran
  assert has_gains([Comparison("cat k=64 W4A4", ppl_gap_fraction_of_hadamard=0.2)])
  gain = SQNRGain(mean_db=1.0, median_db=1.0, max_db=2.0, fraction_at_least=0.5, sites=8)
  assert has_gains([Comparison("cat k=64 W4A4", vs_none_w6a6=gain)])


EXAMPLES = {"wNaM": "w6a8", "kN": "k32", "kvN": "kv4", "dX": "d0.05", "tN": "t2", "acX": "ac0.9", "lac": "t2@lac"}


def test_every_spec_option_is_parsed_and_in_the_help():
  from catjax.app.specs import SPEC_OPTIONS
  (methods,) = [a for a in _actions("compare").values() if a.dest == "methods"]
  for syntax, meaning in SPEC_OPTIONS:
    assert f"{syntax}: {meaning}" in methods.help
    for opt in syntax.split("|"):
      parse_spec(f"cat@{EXAMPLES.get(opt, opt)}", Recipe(method="cat", block_size=32))
  with pytest.raises(ValueError, match="unknown option 'x3'; expected one of wNaM, kN"):
    parse_spec("cat@x3")
