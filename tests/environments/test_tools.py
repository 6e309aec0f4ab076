"""The calculator (exact, bounded, never eval) and the tool-call path (every failure is a counted message)."""

from __future__ import annotations

import json
import time
from fractions import Fraction

import pytest

from opsd_lightning.environments.calculator import Calculator, evaluate
from opsd_lightning.environments.tools import Tool, ToolBox


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("3*(4+5) - 1/2", Fraction(53, 2)),
        ("1/3 + 1/6", Fraction(1, 2)),
        ("-2**10", -1024),
        ("7 // 2", 3),
        ("2.5 * 4", 10),
        ("(1/2)**-3", 8),
        ("17 % 5", 2),
    ],
)
def test_calculator_is_exact(expression: str, value: Fraction) -> None:
    assert evaluate(expression) == value


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("__import__('os').system('ls')", "not Call"),
        ("x + 1", "not Name"),
        ("(1).real", "not Attribute"),
        ("2**65", "exponent"),
        ("9**60", "digits"),
        ("1/0", "division by zero"),
        ("1+" * 150 + "1", "longer"),
        ("1 +", "not an arithmetic"),
        ("[1]", "not List"),
        ("'a'", "not Constant"),
    ],
)
def test_calculator_refuses(expression: str, message: str) -> None:
    call = ToolBox([Calculator()]).call(
        json.dumps({"name": "calculator", "arguments": {"expression": expression}})
    )
    assert call.error and message in call.response, call.response


class Raises(Tool):
    name = "raises"

    def run(self) -> str:
        raise RuntimeError("broken tool")


class Sleeps(Tool):
    name = "sleeps"

    def run(self) -> str:
        time.sleep(1.0)
        return "late"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"name": "calculator", "arguments": {"expression": "2+3"', "not valid JSON"),
        ('{"name": "calculator", "arguments": {"expr": "2+3"}}', "no argument 'expr'"),
        ('{"name": "calculator", "arguments": {}}', "needs the argument 'expression'"),
        ('{"name": "calculator", "arguments": {"expression": 5}}', "must be a string"),
        ('{"name": "shell", "arguments": {"cmd": "rm -rf /"}}', "there is no tool 'shell'"),
        ('{"name": "raises", "arguments": {}}', "broken tool"),
        ('{"name": "sleeps", "arguments": {}}', "took longer than 0.2 s"),
        ('["calculator"]', "a tool call is a JSON object"),
    ],
)
def test_failures_become_error_responses(text: str, message: str) -> None:
    box = ToolBox([Calculator(), Raises(), Sleeps()], timeout_s=0.2)
    started = time.perf_counter()
    call = box.call(text)
    assert call.error and call.response.startswith("error: ") and message in call.response
    assert time.perf_counter() - started < 0.9  # the timeout does not wait for the tool


def test_a_good_call_and_its_schema() -> None:
    box = ToolBox([Calculator()])
    call = box.call('{"name": "calculator", "arguments": "{\\"expression\\": \\"6*7\\"}"}')
    assert (call.error, call.name, call.response) == (False, "calculator", "42")
    schema = box.schemas()[0]["function"]
    assert schema["name"] == "calculator" and schema["parameters"]["required"] == ["expression"]


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="tool_timeout_s"):
        ToolBox([Calculator()], timeout_s=0)
    with pytest.raises(ValueError, match="share a name"):
        ToolBox([Calculator(), Calculator()])
