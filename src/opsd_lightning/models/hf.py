"""Any Hugging Face causal LM and its tokenizer, by local folder or hub name, and what every model shares:
the `LoadedModel` pair, EOS ids, and generation defaults that leave sampling to our config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerBase,
)


@dataclass
class LoadedModel:
    """A causal LM and its tokenizer, as every model config builds them."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase


def torch_dtype_of(dtype: str) -> torch.dtype:
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"model.dtype={dtype!r} is not a torch dtype (use float32, bfloat16 or float16)")
    return torch_dtype


def enable_gradient_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Recompute activations in backward. Generation is unaffected: it runs in eval mode, where
    transformers skips checkpointing and keeps the KV cache, and training mode comes back after it."""
    if enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_pretrained(
    name_or_path: str,
    dtype: str = "bfloat16",
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
    revision: str | None = None,
    gradient_checkpointing: bool = False,
) -> LoadedModel:
    """Any causal LM + tokenizer by local folder or hub name (hub downloads happen only for hub names)."""
    if not name_or_path:
        raise ValueError("model.name_or_path is empty: set it to a local folder or a hub model id")
    torch_dtype = torch_dtype_of(dtype)
    tokenizer = AutoTokenizer.from_pretrained(
        name_or_path, trust_remote_code=trust_remote_code, revision=revision
    )
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        dtype=torch_dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        revision=revision,
    )
    if tokenizer.pad_token_id is None:
        # Generation with left padding needs a pad id; EOS is the usual stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    set_generation_defaults(model, tokenizer)
    enable_gradient_checkpointing(model, gradient_checkpointing)
    return LoadedModel(model=model, tokenizer=tokenizer)


def save_pretrained(loaded: LoadedModel, folder: str | Path) -> Path:
    """Write model and tokenizer as a standard Hugging Face folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends an assistant turn: the tokenizer's EOS plus the generation config's."""
    ids = {tokenizer.eos_token_id}
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def set_generation_defaults(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """A fresh generation config holding only the special ids: every other setting comes from our sampling
    config. A checkpoint's own (`generation_config.json`: repetition_penalty, temperature, top_p, ...) would
    reach HF `generate` but not vLLM, and the two engines would sample differently."""
    eos_ids = eos_token_ids(model, tokenizer)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids, bos_token_id=None
    )
