"""The tool warm-up's episodes: calculator calls in the Qwen3 format, slips in the student format only, and
the tool responses never targets."""

from __future__ import annotations

import random

from opsd_lightning.contexts.renderer import ContextRenderer
from opsd_lightning.data.arith import generate_problems
from opsd_lightning.environments.format import ToolFormat
from opsd_lightning.models.tiny import build_tiny_tokenizer
from opsd_lightning.models.tool_warmup import tool_schemas, tool_warmup_pair


def test_tool_warmup_episodes() -> None:
    tokenizer = build_tiny_tokenizer(tools=True)
    renderer = ContextRenderer(tokenizer).with_tools(tool_schemas())
    fmt = ToolFormat(tokenizer, renderer.tools, enable_thinking=False)
    problems = generate_problems(40, seed=0)
    rng = random.Random(0)
    correct = {True: 0, False: 0}
    for problem in problems:
        for teacher in (True, False):
            prompt, ids, mask = tool_warmup_pair(
                problem, renderer, tokenizer, fmt, rng, float(teacher), 0.5, "steps"
            )
            model_text = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
            env_text = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if not m])
            assert model_text.count("<tool_call>") == env_text.count("<tool_response>")
            assert "<tool_response>" not in model_text and "calculator" not in env_text
            assert ids[-1] == tokenizer.eos_token_id and mask[-1]
            assert ("calculator" in tokenizer.decode(prompt)) and (
                ("reference" in tokenizer.decode(prompt)) == teacher
            )
            correct[teacher] += f"\\boxed{{{problem.answer}}}" in model_text
    # The teacher format never slips; the student format slips (about half the steps may go wrong).
    assert correct[True] == len(problems) and correct[False] < 0.8 * len(problems)
