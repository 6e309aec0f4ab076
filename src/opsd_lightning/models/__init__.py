"""Models: the tiny default (`tiny`), any Hugging Face causal LM (`hf`), the tiny model's warm-up (`warmup`),
optional LoRA (`lora`), and forward passes that score a completion (`scoring`)."""

from opsd_lightning.models.hf import LoadedModel, eos_token_ids, load_pretrained, save_pretrained
from opsd_lightning.models.tiny import QWEN3_STYLE_CHAT_TEMPLATE, build_tiny, build_tiny_tokenizer

__all__ = [
    "QWEN3_STYLE_CHAT_TEMPLATE",
    "LoadedModel",
    "build_tiny",
    "build_tiny_tokenizer",
    "eos_token_ids",
    "load_pretrained",
    "save_pretrained",
]
