"""`Recipe`'s dict form: nested configs round trip, files of earlier versions load; every
field is checked, the error naming the field and its value."""

import pytest

from catjax.ptq.configs import GPTQConfig, SmoothQuantConfig, TrainConfig
from catjax.ptq.recipe import Recipe


def test_round_trip_through_the_dict_form():
  r = Recipe(method="cat", weights="gptq", gptq=GPTQConfig(damping=0.05, act_order=True),
             train=TrainConfig(steps=7, lr=2e-3, batch=2, w_clip=False),
             smoothquant=SmoothQuantConfig(alpha=0.3))
  d = r.to_dict()
  assert d["gptq"] == {"damping": 0.05, "lazy_batch": 128, "act_order": True}
  assert d["train"]["steps"] == 7 and d["label"] == r.label
  assert Recipe.from_dict(d) == r


def test_flat_fields_of_earlier_versions_load():
  old = {"method": "cat", "weights": "gptq", "gptq_damping": 0.05, "gptq_block": 64,
         "act_order": True, "train_steps": 7, "train_lr": 2e-3, "train_batch": 2,
         "train_w_clip": False, "alpha": 0.3, "label": "ignored"}
  assert Recipe.from_dict(old) == Recipe(
      method="cat", weights="gptq", gptq=GPTQConfig(damping=0.05, lazy_batch=64, act_order=True),
      train=TrainConfig(steps=7, lr=2e-3, batch=2, w_clip=False),
      smoothquant=SmoothQuantConfig(alpha=0.3))


def test_unknown_fields_are_named():
  with pytest.raises(TypeError, match="bogus"):
    Recipe.from_dict({"method": "cat", "bogus": 1})
  with pytest.raises(TypeError, match="bogus"):
    Recipe.from_dict({"train": {"steps": 1, "bogus": 1}})


def test_with_fields_reaches_into_the_configs():
  r = Recipe().with_fields({"train.steps": 3, "gptq.damping": 0.2, "w_bits": 8})
  assert (r.train.steps, r.train.lr, r.gptq.damping, r.w_bits) == (3, 1e-3, 0.2, 8)
  with pytest.raises(ValueError, match="train.lr=0"):
    r.with_fields({"train.lr": 0})
  with pytest.raises(ValueError, match="'gptqq'"):
    r.with_fields({"gptqq.damping": 0.1})


CONFIG_CASES = [
    (Recipe, {"eps": -1.0}, "eps=-1.0"),
    (Recipe, {"eps": float("nan")}, "eps=nan"),
    (Recipe, {"a_clip": True}, "a_clip=True"),
    (Recipe, {"a_clip": "0.5"}, "a_clip='0.5'"),
    (Recipe, {"seed": "0"}, "seed='0'"),
    (Recipe, {"seed": 1.5}, "seed=1.5"),
    (Recipe, {"fit_x64": 1}, "fit_x64=1"),
    (GPTQConfig, {"damping": True}, "gptq.damping=True"),
    (GPTQConfig, {"damping": -1.0}, "gptq.damping=-1.0"),
    (GPTQConfig, {"lazy_batch": 0}, "gptq.lazy_batch=0"),
    (GPTQConfig, {"act_order": "yes"}, "gptq.act_order='yes'"),
    (TrainConfig, {"lr": True}, "train.lr=True"),
    (TrainConfig, {"lr": 0.0}, "train.lr=0.0"),
    (TrainConfig, {"steps": -1}, "train.steps=-1"),
    (TrainConfig, {"steps": 2**31}, r"train.steps=2147483648: expected an integer in 0\.\.2147483647"),
    (TrainConfig, {"batch": 0}, "train.batch=0"),
    (TrainConfig, {"w_clip": None}, "train.w_clip=None"),
    (SmoothQuantConfig, {"alpha": True}, "smoothquant.alpha=True"),
]


@pytest.mark.parametrize("cls,kw,words", CONFIG_CASES,
                         ids=[f"{c.__name__}-{next(iter(k))}={k[next(iter(k))]!r}" for c, k, _ in CONFIG_CASES])
def test_bad_values_are_named(cls, kw, words):
  with pytest.raises(ValueError, match=words):
    cls(**kw)
