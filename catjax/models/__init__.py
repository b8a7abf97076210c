"""LLaMA-family models: architecture specs, configuration, the Flax NNX decoder,
checkpoint I/O. Nothing here quantizes or fetches assets."""

from catjax.models.config import ModelConfig, RopeScaling
from catjax.models.llama import (KV_SITES, SITES, Hook, Llama, abstract_model, capture, forward,
                                 generate, generate_batch, init_cache, random_model)
from catjax.models.loading import load_config, load_gguf, load_hf, load_model, save_hf
from catjax.models.sharding import make_mesh, shard_batch, shard_model
from catjax.models.spec import LLAMA, ArchSpec, Site, get_path, set_path, spec_for
from catjax.models import tunix  # tunix's Llama3 / Qwen2 (optional google-tunix), loaded on call

__all__ = [
    "KV_SITES", "LLAMA", "SITES", "ArchSpec", "Hook", "Llama", "ModelConfig", "RopeScaling",
    "Site", "abstract_model", "capture", "forward", "generate", "generate_batch", "get_path",
    "init_cache", "load_config", "load_gguf", "load_hf", "load_model", "make_mesh",
    "random_model", "save_hf", "set_path", "shard_batch", "shard_model", "spec_for", "tunix",
]
