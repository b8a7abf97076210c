"""The Flax decoder against transformers' PyTorch models (Llama, Qwen2, Gemma 3),
generation, site hook."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from catjax.models import (SITES, ModelConfig, capture, forward, generate, generate_batch, load_hf,
                           random_model, save_hf)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
VARIANTS = {
    "llama-mha": ("LlamaForCausalLM", dict(num_key_value_heads=4)),
    "llama-gqa": ("LlamaForCausalLM", dict(num_key_value_heads=2)),
    "llama3-rope-tied": ("LlamaForCausalLM", dict(rope_scaling=LLAMA3_ROPE,
                                                  tie_word_embeddings=True)),
    "llama-attention-bias": ("LlamaForCausalLM", dict(attention_bias=True)),
    "qwen2-bias": ("Qwen2ForCausalLM", dict(num_key_value_heads=1)),
    # Windows of 8 tokens in layer 0 (40-token inputs; 16-token generation) and
    # a query scale that is not head_dim's.
    "gemma3-sliding": ("Gemma3ForCausalLM", dict(
        head_dim=16, sliding_window=8, query_pre_attn_scalar=12,
        layer_types=["sliding_attention", "full_attention"])),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
  """(torch model, catjax model loaded from its save_pretrained folder)."""
  pytest.importorskip("torch")
  cls, kw = VARIANTS[request.param]
  ref = tiny.torch_model(cls, **kw)
  folder = tmp_path_factory.mktemp(request.param)
  ref.save_pretrained(folder)
  return ref, load_hf(folder)


def _torch_logits(ref, toks):
  import torch
  with torch.no_grad():
    return ref(torch.tensor(toks, dtype=torch.long)).logits.numpy()


def test_logits_match_transformers(pair):
  ref, ours = pair
  toks = tiny.tokens((2, 40), ref.config.vocab_size)
  np.testing.assert_allclose(np.asarray(forward(ours, toks)), _torch_logits(ref, toks),
                             atol=1e-4, rtol=0)


def test_greedy_generation_with_cache_matches_transformers(pair):
  ref, ours = pair
  import torch
  prompt = tiny.tokens((1, 6), ref.config.vocab_size, seed=1)
  expected = ref.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=10,
                          do_sample=False, eos_token_id=None, pad_token_id=0)[0, 6:].tolist()
  assert generate(ours, prompt[0], max_new_tokens=10, eos_token_id=None) == expected


def test_batched_generation_of_prompts_of_different_lengths_equals_one_at_a_time(pair):
  """Left padding is masked and RoPE is relative: each row generates what it would
  alone (the sliding-window variant included: 20 prompt + 10 new tokens > window)."""
  _, ours = pair
  vocab = ours.config.vocab_size
  prompts = [tiny.tokens((n,), vocab, seed=n) for n in (20, 7, 13)]
  batched = generate_batch(ours, prompts, max_new_tokens=10, eos_token_id=None)
  assert batched == [generate(ours, p, max_new_tokens=10, eos_token_id=None) for p in prompts]


def test_saved_folder_loads_in_transformers(pair, tmp_path):
  ref, ours = pair
  import transformers
  save_hf(ours, tmp_path)
  back = getattr(transformers, type(ref).__name__).from_pretrained(tmp_path).eval()
  toks = tiny.tokens((1, 24), ref.config.vocab_size, seed=2)
  np.testing.assert_allclose(_torch_logits(back, toks), _torch_logits(ref, toks), atol=1e-6)


def test_kv_cache_decoding_equals_full_forward():
  model = random_model(tiny.config(), seed=3)
  toks = tiny.tokens((2, 12), 128, seed=3)
  full = np.asarray(forward(model, toks))
  from catjax.models import init_cache
  cache = init_cache(model.config, 2, 16)
  first, cache = forward(model, toks[:, :8], cache=cache)
  steps = [np.asarray(first)]
  for t in range(8, 12):
    logits, cache = forward(model, toks[:, t:t + 1], cache=cache)
    steps.append(np.asarray(logits))
  assert int(cache["index"]) == 12
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5)


def test_generation_stops_at_eos():
  model = random_model(tiny.config(), seed=4)
  first = generate(model, [1, 2, 3], max_new_tokens=5, eos_token_id=None)
  assert len(first) == 5
  assert generate(model, [1, 2, 3], max_new_tokens=5, eos_token_id=first[1]) == first[:2]
  # by default the config's end of sequence stops it, as the CLI does
  import dataclasses
  eos_model = random_model(dataclasses.replace(tiny.config(), eos_token_id=first[2]), seed=4)
  stop = first[:first.index(first[2]) + 1]
  assert generate(eos_model, [1, 2, 3], max_new_tokens=5) == stop
  assert generate_batch(eos_model, [[1, 2, 3]], max_new_tokens=5) == [stop]
  with pytest.raises(ValueError, match="eos_token_id='tokenizer'"):
    generate(model, [1, 2, 3], eos_token_id="tokenizer")
  with pytest.raises(ValueError, match="prompt 0 is empty"):
    generate(model, [], max_new_tokens=3)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    generate_batch(model, [[1], []], max_new_tokens=3)
  with pytest.raises(ValueError, match="prompts is empty"):
    generate_batch(model, [], max_new_tokens=3)
  # Rows stop on their own: the second row's end-of-sequence ends it alone.
  other = generate(model, [5, 6], max_new_tokens=5)
  both = generate_batch(model, [[1, 2, 3], [5, 6]], max_new_tokens=5, eos_token_id=other[1])
  assert both[1] == other[:2] and both[0] == generate(model, [1, 2, 3], max_new_tokens=5,
                                                      eos_token_id=other[1])


@pytest.mark.parametrize("dtype, tol", [(jnp.bfloat16, 0.05), (jnp.float16, 0.01)])
def test_half_precision_model_tracks_float32(dtype, tol):
  cfg = tiny.config()
  f32 = random_model(cfg, seed=5)
  half = random_model(cfg, seed=5, dtype=dtype)
  assert half.dtype == dtype
  toks = tiny.tokens((1, 32), cfg.vocab_size, seed=5)
  a, b = np.asarray(forward(f32, toks)), np.asarray(forward(half, toks))
  assert b.dtype == np.float32
  assert np.abs(a - b).max() < tol * np.abs(a).max()


def test_capture_records_site_inputs():
  model = random_model(tiny.config(num_layers=3), seed=6)
  toks = tiny.tokens((2, 10), 128, seed=6)
  acts = capture(model, toks)
  assert sorted(acts) == sorted(SITES)
  assert acts["attn_in"].shape == (3, 2, 10, 64)
  assert acts["down_in"].shape == (3, 2, 10, 96)
  # Layer 0's attn_in is the attention RMSNorm of the embeddings.
  h = np.asarray(model.embed[...])[toks]
  expected = h / np.sqrt((h * h).mean(-1, keepdims=True) + model.config.rms_norm_eps)
  expected = expected * np.asarray(model.layers.attn_norm.scale[...][0])
  np.testing.assert_allclose(np.asarray(acts["attn_in"][0]), expected, rtol=1e-5, atol=1e-6)
  # Layer 0's down_in feeds down_proj: projecting it reproduces the MLP output path.
  assert np.all(np.isfinite(np.asarray(acts["down_in"])))
  with pytest.raises(ValueError, match="unknown sites"):
    capture(model, toks, sites=("attn_in", "qkv"))


def test_hook_state_is_sliced_per_layer():
  """A hook scaling `down_in` by a per-layer factor: factor 1 is the identity, and
  scaling layer 1 only changes the logits."""
  model = random_model(tiny.config(num_layers=2), seed=7)
  toks = tiny.tokens((1, 8), 128, seed=7)

  def scale_hook(site, x, factor):
    return (x * factor if factor is not None else x), None

  base = np.asarray(forward(model, toks))
  ones, _ = forward(model, toks, hook=scale_hook, hook_state={"down_in": jnp.ones(2)})
  np.testing.assert_allclose(np.asarray(ones), base, atol=1e-6)
  scaled, _ = forward(model, toks, hook=scale_hook,
                      hook_state={"down_in": jnp.array([1.0, 0.0])})
  assert np.abs(np.asarray(scaled) - base).max() > 1e-3


def test_config_round_trip_and_errors():
  cfg = tiny.config(rope_scaling=None, tie_embeddings=True, qkv_bias=True, model_type="qwen2")
  assert ModelConfig.from_hf(cfg.to_hf()) == cfg
  hf = tiny.config().to_hf()
  with pytest.raises(ValueError, match="model_type='gpt2'"):
    ModelConfig.from_hf({**hf, "model_type": "gpt2"})
  with pytest.raises(ValueError, match="rope_type='yarn'"):
    ModelConfig.from_hf({**hf, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}})
  with pytest.raises(ValueError, match="num_heads=4 is not a multiple of num_kv_heads=3"):
    tiny.config(num_kv_heads=3)


def test_gemma3_config_round_trip_and_errors():
  hf = {"model_type": "gemma3_text", "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 7, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 16, "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": 8, "rope_theta": 1e6, "rope_local_base_freq": 1e4}
  cfg = ModelConfig.from_hf(hf)
  # transformers' default pattern: every 6th layer is global.
  assert cfg.layer_kinds.tolist() == [1, 1, 1, 1, 1, 0, 1] and cfg.tie_embeddings
  assert (cfg.rope_theta, cfg.rope_local_theta, cfg.attention_scale) == (1e6, 1e4, 256 ** -0.5)
  assert ModelConfig.from_hf(cfg.to_hf()) == cfg
  with pytest.raises(ValueError, match="final_logit_softcapping=30.0 is not supported"):
    ModelConfig.from_hf({**hf, "final_logit_softcapping": 30.0})
  with pytest.raises(ValueError, match="hidden_act='silu' for model_type='gemma3_text'"):
    ModelConfig.from_hf({**hf, "hidden_activation": "silu"})
  with pytest.raises(ValueError, match="layer_types=.*expected num_layers=7"):
    ModelConfig.from_hf({**hf, "layer_types": ["full_attention"] * 6})


def test_chunked_causal_attention_equals_masked_attention():
  from catjax.models.llama import attend, causal_attention
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(ks[0], (2, 40, 2, 3, 8))
  k, v = (jax.random.normal(kk, (2, 40, 2, 8)) for kk in ks[1:])
  mask = np.tril(np.ones((40, 40), bool))
  np.testing.assert_allclose(np.asarray(causal_attention(q, k, v, chunk=16)),
                             np.asarray(attend(q, k, v, mask)), atol=1e-6)
  # A sliding window of 5 keys, given as a Python int and traced, and another query scale.
  band = mask & ~np.tril(np.ones((40, 40), bool), -5)
  want = np.asarray(attend(q, k, v, band, 0.3))
  np.testing.assert_allclose(np.asarray(causal_attention(q, k, v, scale=0.3, window=5, chunk=16)),
                             want, atol=1e-6)
  traced = jax.jit(lambda w: causal_attention(q, k, v, scale=0.3, window=w, chunk=16))(5)
  np.testing.assert_allclose(np.asarray(traced), want, atol=1e-6)
