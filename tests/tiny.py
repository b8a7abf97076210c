"""Tiny LLaMA-family models, checkpoints and tokenizers for tests (no network)."""

from __future__ import annotations

import functools

import numpy as np

from catjax.models import ModelConfig, random_model, save_hf

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 +
        "Paris is the capital of France, Berlin of Germany and Rome of Italy. " * 2 +
        "Numbers 12345 and words, words, words.\n\n") * 4


def config(**kw) -> ModelConfig:
  base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=256)
  return ModelConfig(**{**base, **kw})


@functools.lru_cache(maxsize=None)
def tokenizer():
  """A byte-level BPE tokenizer with 128 tokens trained on `TEXT`. The same every
  run: `ByteLevel.alphabet()` comes from a hash set, in a new order each call."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<eos>"],
                                initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet())[:100])
  tok.train_from_iterator([TEXT], trainer)
  return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def hf_folder(path, *, seed=0, **kw):
  """A Hugging Face folder (config, safetensors, tokenizer) of a random tiny model."""
  model = random_model(config(**kw), seed=seed)
  save_hf(model, path, tokenizer=tokenizer())
  return model


def folder_and_text(tmp_path_factory, name, *, seed=12):
  """`(Hugging Face folder of a tiny model, text file of TEXT)` for CLI tests."""
  path = tmp_path_factory.mktemp(name) / "tiny"
  hf_folder(path, seed=seed)
  text = path.parent / "text.txt"
  text.write_text(TEXT * 3)
  return path, text


def torch_model(cls_name: str, seed: int = 0, **kw):
  """A random transformers model with weights ~N(0, 0.1) (larger than init: nontrivial logits)."""
  import torch
  import transformers
  base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=101, max_position_embeddings=256)
  config_cls = (getattr(transformers, cls_name.replace("ForCausalLM", "TextConfig"), None)
                or getattr(transformers, cls_name.replace("ForCausalLM", "Config")))
  torch.manual_seed(seed)
  model = getattr(transformers, cls_name)(config_cls(**{**base, **kw})).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0, 0.1)
  return model


def tokens(shape, vocab, seed=0):
  return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


def raises(exc, words, fn, *args, path=None, **kw):
  """`fn(*args, **kw)` raises `exc` whose message holds every word (and `path`); an
  `InputError` also carries `path`."""
  import pytest

  from catjax.base.errors import InputError
  with pytest.raises(exc) as e:
    fn(*args, **kw)
  msg = str(e.value)
  for w in [*words, *([str(path)] if path is not None else [])]:
    assert w in msg, f"{w!r} not in {msg!r}"
  if path is not None and isinstance(e.value, InputError):
    assert e.value.path == str(path)
  return e.value


def write_edit(name, data):
  """An edit of a folder: replace its file `name` by `data` (bytes or text)."""
  return lambda folder: (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())
