"""The tiny default model: a `transformers` Qwen3 in miniature with a byte-level BPE tokenizer.

It is deliberately the real thing in miniature: Qwen's special tokens and a Qwen3-style chat template, so
prompts, EOS handling and thinking flags run through exactly the code a 8B model uses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from opsd_lightning.models.hf import (
    LoadedModel,
    enable_gradient_checkpointing,
    load_pretrained,
    set_generation_defaults,
    torch_dtype_of,
)
from opsd_lightning.models.tool_template import QWEN3_TOOL_CHAT_TEMPLATE, TOOL_TOKENS

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


def build_tiny_tokenizer(
    corpus: Iterable[str] | None = None, vocab_size: int = 512, tools: bool = False
) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE with Qwen's pre-tokenizer, special tokens and chat template.

    Byte-level means any text encodes (unseen words fall back to bytes); training is deterministic
    for a given corpus, so the same corpus always gives the same ids. With `tools`, the tool-call tokens are
    added after the trained vocabulary (every other id unchanged) and the chat template is Qwen3's own, tools
    included (`models/tool_template.py`).
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
        additional_special_tokens=[IM_START, THINK_OPEN, THINK_CLOSE, *(TOOL_TOKENS if tools else [])],
        chat_template=QWEN3_TOOL_CHAT_TEMPLATE if tools else QWEN3_STYLE_CHAT_TEMPLATE,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def build_tiny(
    hidden_size: int = 64,
    num_layers: int = 3,
    num_heads: int = 2,
    num_kv_heads: int = 1,
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
    tools: bool = False,
) -> LoadedModel:
    """A tiny Qwen3: from a saved folder (`checkpoint`, e.g. the warm-up's base) or randomly initialised.

    `tokenizer_path`: use a real tokenizer folder (e.g. Qwen3's, for a stand-in of a real recipe)
    instead of the locally trained one; the embedding then has that tokenizer's vocabulary.
    `dtype` / `attn_implementation` as for `load_pretrained`, so a recipe's model settings apply to it.
    `tools`: the local tokenizer gets the tool-call tokens and a tool-capable template (see
    `build_tiny_tokenizer`); off by default, so the default model is unchanged.
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
        tokenizer = build_tiny_tokenizer(corpus, tokenizer_vocab_size, tools)
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
        model = Qwen3ForCausalLM(config).to(torch_dtype_of(dtype))
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    set_generation_defaults(model, tokenizer)
    enable_gradient_checkpointing(model, gradient_checkpointing)
    return LoadedModel(model=model, tokenizer=tokenizer)
