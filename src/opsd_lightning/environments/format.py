"""The tool-call format of a chat template, read from the template itself.

Qwen3's template (and the tiny model's with `model.tools=true`) writes a call as
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` inside an assistant turn, and a tool's result
as `<tool_response>\n...\n</tool_response>` in a user turn. `ToolFormat` renders a probe conversation with the
template to find the text between a closed call and the next assistant turn, so the ids appended after a
call are exactly what the template would render there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
# Stands for the tool's result while the probe conversation is rendered.
RESULT_SENTINEL = "\u27e6opsd-tool-result\u27e7"


class ToolFormat:
    """Where a call opens and closes (one token each), and the ids of a tool response as the template renders
    it after a closed call (the end of the assistant turn, the user turn with the response, the next
    assistant header).

    Raises, before training, when the template cannot render tool calls.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, tools: Sequence[dict[str, Any]], enable_thinking: bool
    ) -> None:
        hint = (
            "environment tools need a chat template that renders them (`apply_chat_template(tools=...)`) "
            f"with {CALL_OPEN}/{CALL_CLOSE} as single tokens: with model=tiny set model.tools=true "
            "(data=arith_tools "
            f"does), or use a tool-capable model (Qwen3). Tokenizer {tokenizer.name_or_path!r}: "
        )
        self.tokenizer = tokenizer
        ids = [tokenizer.convert_tokens_to_ids(token) for token in (CALL_OPEN, CALL_CLOSE)]
        if any(i is None or i == tokenizer.unk_token_id for i in ids) or any(
            tokenizer.encode(t, add_special_tokens=False) != [i]
            for t, i in zip((CALL_OPEN, CALL_CLOSE), ids, strict=True)
        ):
            raise ValueError(hint + f"{CALL_OPEN} / {CALL_CLOSE} are not single tokens")
        self.open_id, self.close_id = ids
        name = tools[0]["function"]["name"] if tools else "probe"
        probe = [
            {"role": "user", "content": "probe"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": name, "arguments": {}}}],
            },
            {"role": "tool", "content": RESULT_SENTINEL},
        ]
        try:
            text = tokenizer.apply_chat_template(
                probe,
                tools=list(tools) or None,
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=enable_thinking,
            )
        except Exception as err:  # noqa: BLE001 - a template error becomes the option's message
            raise ValueError(hint + f"rendering a tool call failed ({err})") from None
        if tools and name not in text.split(CALL_CLOSE)[0] or CALL_CLOSE not in text:
            raise ValueError(hint + "its chat template does not render the tools or the tool call")
        after_call = text.rsplit(CALL_CLOSE, 1)[1]
        if after_call.count(RESULT_SENTINEL) != 1:
            raise ValueError(hint + "its chat template does not render a tool response after a call")
        self.response_prefix, self.response_suffix = after_call.split(RESULT_SENTINEL)

    def response_ids(self, content: str) -> list[int]:
        """The ids after a closed call: the rest of the turn, the response `content`, the next turn's
        header."""
        text = self.response_prefix + content + self.response_suffix
        return self.tokenizer.encode(text, add_special_tokens=False)

    def call_text(self, turn_ids: Sequence[int]) -> str | None:
        """The JSON of the call a turn closed (between its last open and its close), or None without one."""
        ids = list(turn_ids)
        if not ids or ids[-1] != self.close_id or self.open_id not in ids:
            return None
        start = len(ids) - 1 - ids[::-1].index(self.open_id)
        return self.tokenizer.decode(ids[start + 1 : -1], skip_special_tokens=False).strip()
