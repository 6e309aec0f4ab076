"""Models and tokenizers: a tiny Qwen3 built locally, or any Hugging Face causal LM.

The tiny path is deliberately the real thing in miniature: a `transformers` Qwen3 model and a
byte-level BPE tokenizer with Qwen's special tokens and a Qwen3-style chat template, so prompts,
EOS handling and thinking flags run through exactly the code a 8B model uses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

log = logging.getLogger(__name__)

PAD_TOKEN = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TINY_SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, THINK_OPEN, THINK_CLOSE]

# Qwen2/3 pre-tokenizer split: single digits, words with a leading space, punctuation runs, newlines.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The Qwen3 hybrid-thinking template restricted to system/user/assistant turns (no tools): for those
# turns it renders byte-for-byte what Qwen3's own template renders (a test checks this).
QWEN3_STYLE_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# Used when no task corpus is given: enough text that common words and LaTeX get merges.
_DEFAULT_CORPUS = [
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Here is a reference solution to this problem. The answer is 42. So the total is 7 + 5 = 12.",
    "Now solve the problem yourself, step by step, and reach the same final answer.",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) { } \\frac{1}{2} x^2 \\sqrt{2}",
]


@dataclass
class LoadedModel:
    """A causal LM and its tokenizer, as every model config builds them."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase


def build_tiny_tokenizer(
    corpus: Iterable[str] | None = None, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE with Qwen's pre-tokenizer, special tokens and chat template.

    Byte-level means any text encodes (unseen words fall back to bytes); training is deterministic
    for a given corpus, so the same corpus always gives the same ids.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus or _DEFAULT_CORPUS), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, THINK_OPEN, THINK_CLOSE],
        chat_template=QWEN3_STYLE_CHAT_TEMPLATE,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def build_tiny(
    hidden_size: int = 64,
    num_layers: int = 3,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 192,
    max_position_embeddings: int = 1024,
    tokenizer_vocab_size: int = 512,
    checkpoint: str | None = None,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    tokenizer_path: str | None = None,
    gradient_checkpointing: bool = False,
    dtype: str = "float32",
    attn_implementation: str | None = None,
) -> LoadedModel:
    """A tiny Qwen3: from a saved folder (`checkpoint`, e.g. the warm-up's base) or randomly initialised.

    `tokenizer_path`: use a real tokenizer folder (e.g. Qwen3's, for a stand-in of a real recipe)
    instead of the locally trained one; the embedding then has that tokenizer's vocabulary.
    `dtype` / `attn_implementation` as for `load_pretrained`, so a recipe's model settings apply to it.
    """
    if checkpoint is not None:
        return load_pretrained(
            checkpoint,
            dtype=dtype,
            attn_implementation=attn_implementation,
            gradient_checkpointing=gradient_checkpointing,
        )
    if tokenizer_path is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer = build_tiny_tokenizer(corpus, tokenizer_vocab_size)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config).to(_torch_dtype(dtype))
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    _set_generation_defaults(model, tokenizer)
    enable_gradient_checkpointing(model, gradient_checkpointing)
    return LoadedModel(model=model, tokenizer=tokenizer)


def _torch_dtype(dtype: str) -> torch.dtype:
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
    torch_dtype = _torch_dtype(dtype)
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
    _set_generation_defaults(model, tokenizer)
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


def _set_generation_defaults(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    # Sampling settings always come from our config; clear the checkpoint's so nothing leaks in silently.
    generation_config = model.generation_config
    generation_config.pad_token_id = tokenizer.pad_token_id
    generation_config.eos_token_id = eos_token_ids(model, tokenizer)
    generation_config.bos_token_id = None
