"""Tools an environment offers the model, and the one path a tool call takes: parsed from the model's JSON,
its arguments checked against the tool's schema, run under a per-call time limit. Whatever goes wrong (bad
JSON, an unknown tool or argument, an exception, a timeout) becomes an error message the model reads as the
tool's response: a tool never stops training, and its errors are counted.

Nothing the model writes reaches a shell, `eval` or the filesystem: a call is a name and a JSON object, and a
tool receives those arguments as Python values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

# JSON-schema type name -> the Python types a JSON value of that type decodes to.
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


class Tool:
    """A tool of one's own: a name, a description and a JSON schema of its arguments (an `object` schema with
    `properties` and `required`), and `run(**arguments) -> str`, the text the model reads back.

    `run` may raise: the message becomes the tool response (`error: ...`) and the call counts as an error.
    """

    name: str = "tool"
    description: str = ""
    parameters: Mapping[str, Any] = {"type": "object", "properties": {}, "required": []}

    def run(self, **arguments: Any) -> str:
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        """The tool as chat templates take it (OpenAI's function format)."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass
class ToolCall:
    """What the model asked for, and what it got back (`error` True when the response is an error message)."""

    text: str
    name: str | None
    response: str
    error: bool


class ToolCallError(ValueError):
    """A call the environment answers with an error message instead of a result."""


def parse_call(text: str) -> tuple[str, dict[str, Any]]:
    """The JSON inside `<tool_call>...</tool_call>` (`{"name": ..., "arguments": {...}}`) -> name, args."""
    try:
        call = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ToolCallError(f"the tool call is not valid JSON ({err})") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ToolCallError('a tool call is a JSON object {"name": <tool>, "arguments": {...}}')
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as err:
            raise ToolCallError(f"the tool call's arguments are not valid JSON ({err})") from None
    if not isinstance(arguments, dict):
        raise ToolCallError("a tool call's arguments are a JSON object")
    return call["name"], arguments


def check_arguments(tool: Tool, arguments: Mapping[str, Any]) -> None:
    """The arguments against the tool's schema: no unknown names, every required one, each of its type."""
    properties = dict(tool.parameters.get("properties", {}))
    unknown = sorted(set(arguments) - set(properties))
    if unknown:
        raise ToolCallError(
            f"{tool.name} has no argument {unknown[0]!r} (its arguments: {sorted(properties)})"
        )
    missing = [name for name in tool.parameters.get("required", []) if name not in arguments]
    if missing:
        raise ToolCallError(f"{tool.name} needs the argument {missing[0]!r}")
    for name, value in arguments.items():
        expected = _JSON_TYPES.get(properties[name].get("type", ""))
        bad_bool = isinstance(value, bool) and properties[name].get("type") in ("integer", "number")
        if expected is not None and (not isinstance(value, expected) or bad_bool):
            raise ToolCallError(f"{tool.name}: argument {name!r} must be a {properties[name]['type']}")


class ToolBox:
    """The tools of an environment by name, and `call(text)`: a call's JSON in, a `ToolCall` out, never an
    exception. A tool runs in a worker thread and is abandoned after `timeout_s` (a thread cannot be killed:
    a runaway tool keeps its worker, so a tool must bound its own work, as `Calculator` does)."""

    def __init__(self, tools: Sequence[Tool], timeout_s: float = 2.0) -> None:
        if not timeout_s > 0:
            raise ValueError(f"environment.tool_timeout_s={timeout_s} must be > 0")
        names = [tool.name for tool in tools]
        if len(set(names)) != len(names):
            raise ValueError(f"environment tools: two tools share a name ({names})")
        self.tools = {tool.name: tool for tool in tools}
        self.timeout_s = timeout_s

    def schemas(self) -> list[dict[str, Any]]:
        return [tool.schema() for tool in self.tools.values()]

    def call(self, text: str) -> ToolCall:
        name = None
        try:
            name, arguments = parse_call(text)
            if name not in self.tools:
                raise ToolCallError(f"there is no tool {name!r} (tools: {sorted(self.tools)})")
            tool = self.tools[name]
            check_arguments(tool, arguments)
            return ToolCall(text, name, str(self._run(tool, arguments)), error=False)
        except Exception as err:  # noqa: BLE001 - any failure is the model's tool response, never a crash
            return ToolCall(text, name, f"error: {err}", error=True)

    def _run(self, tool: Tool, arguments: dict[str, Any]) -> str:
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            return pool.submit(tool.run, **arguments).result(timeout=self.timeout_s)
        except FutureTimeout:
            raise ToolCallError(f"{tool.name} took longer than {self.timeout_s} s") from None
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
