"""LLaMA-family models: configuration, the Flax NNX decoder, checkpoint I/O."""

from catjax.models.config import ModelConfig, RopeScaling
from catjax.models.llama import (KV_SITES, SITES, Hook, Llama, abstract_model, capture, forward, generate,
                                 init_cache, random_model)
from catjax.models.loading import (HF_TABLE, load_gguf, load_hf, load_model, load_pretrained,
                                   save_hf)

__all__ = [
    "HF_TABLE", "KV_SITES", "SITES", "Hook", "Llama", "ModelConfig", "RopeScaling", "abstract_model",
    "capture", "forward", "generate", "init_cache", "load_gguf", "load_hf", "load_model",
    "load_pretrained", "random_model", "save_hf",
]

