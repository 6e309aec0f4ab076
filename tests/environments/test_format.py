"""The tool-call format: the tiny tool template renders what Qwen3's renders, and templates without tools are
refused before training, naming the option."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from opsd_lightning.environments.base import ArithToolsEnvironment, Environment, MathEnvironment
from opsd_lightning.environments.format import ToolFormat
from opsd_lightning.models.tiny import build_tiny_tokenizer
from tests.conftest import shared_path

TOOLS = ArithToolsEnvironment().toolbox.schemas()
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3, then times 4?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2+3"}}}
        ],
    },
    {"role": "tool", "content": "5"},
    {
        "role": "assistant",
        "content": "Now times 4.",
        "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "5*4"}}}
        ],
    },
    {"role": "tool", "content": "20"},
    {"role": "assistant", "content": "\\boxed{20}"},
]


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("cut", [2, 4, 6, 7])
def test_tiny_tool_template_renders_what_qwen3_renders(thinking: bool, cut: int) -> None:
    qwen3 = AutoTokenizer.from_pretrained(shared_path("tokenizers", "qwen3"))
    tiny = build_tiny_tokenizer(tools=True)
    options = {
        "tools": TOOLS,
        "tokenize": False,
        "add_generation_prompt": cut < 7,
        "enable_thinking": thinking,
    }
    expected = qwen3.apply_chat_template(CONVERSATION[:cut], **options)
    assert tiny.apply_chat_template(CONVERSATION[:cut], **options) == expected
    assert "<tool_response>\n5\n</tool_response>" in expected or cut < 4


def test_tool_format_of_the_tiny_tokenizer() -> None:
    tokenizer = build_tiny_tokenizer(tools=True)
    fmt = ToolFormat(tokenizer, TOOLS, enable_thinking=False)
    assert tokenizer.decode(fmt.response_ids("42")) == (
        "<|im_end|>\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    call = tokenizer.encode(
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"}}\n</tool_call>'
    )
    assert fmt.call_text(call) == '{"name": "calculator", "arguments": {"expression": "1+1"}}'
    assert fmt.call_text(call[:-1]) is None


def test_default_tiny_tokenizer_is_unchanged_and_refused_for_tools() -> None:
    default, tools = build_tiny_tokenizer(), build_tiny_tokenizer(tools=True)
    assert len(tools) == len(default) + 4 and tools.get_vocab().items() >= default.get_vocab().items()
    with pytest.raises(ValueError, match="model.tools=true"):
        ToolFormat(default, TOOLS, enable_thinking=False)


def test_environment_options_are_checked() -> None:
    with pytest.raises(ValueError, match="environment.max_turns=0"):
        ArithToolsEnvironment(max_turns=0)

    class NoReward(Environment):
        pass

    with pytest.raises(ValueError, match="NoReward defines no reward"):
        NoReward()
    assert MathEnvironment().reward("so \\boxed{7}", "7") == 1.0
    assert MathEnvironment().reward("so \\boxed{8}", "7") == 0.0
