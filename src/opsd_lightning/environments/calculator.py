"""`calculator`: exact arithmetic on integers and fractions.

The expression is parsed with `ast` and walked node by node; only number literals, `+ - * / // % **`,
unary signs and parentheses are accepted (never `eval`: a name, a call or an attribute is an error). Numbers
are `fractions.Fraction`s, so `1/3 + 1/6` is `1/2` exactly. Bounds keep a call cheap: the expression's
length and node count, the digits of every number on the way, and the size of an exponent.
"""

from __future__ import annotations

import ast
import operator
from fractions import Fraction
from typing import Any

from opsd_lightning.environments.tools import Tool, ToolCallError

MAX_EXPRESSION_CHARS = 200
MAX_NODES = 100
MAX_DIGITS = 40  # of a numerator or denominator, on the way and in the result
MAX_EXPONENT = 64

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


def _checked(value: Fraction) -> Fraction:
    for part in (value.numerator, value.denominator):
        # bit length bounds the digits without converting a huge integer to text
        if part.bit_length() > MAX_DIGITS * 3.33:
            raise ToolCallError(f"a number has more than {MAX_DIGITS} digits")
    return value


def _walk(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _walk(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _checked(Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _walk(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        base, exponent = _walk(node.left), _walk(node.right)
        if exponent.denominator != 1 or abs(exponent) > MAX_EXPONENT:
            raise ToolCallError(f"an exponent must be an integer of at most {MAX_EXPONENT} in size")
        if base == 0 and exponent < 0:
            raise ToolCallError("division by zero")
        if base != 0 and max(abs(base.numerator), base.denominator).bit_length() * abs(exponent) > 140:
            raise ToolCallError(f"a number has more than {MAX_DIGITS} digits")
        return _checked(base ** int(exponent))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _walk(node.left), _walk(node.right)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise ToolCallError("division by zero")
        return _checked(Fraction(_BINARY[type(node.op)](left, right)))
    raise ToolCallError(f"only numbers and + - * / // % ** ( ) are allowed, not {type(node).__name__}")


def evaluate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression; `ToolCallError` for anything else or over a bound."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolCallError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError) as err:
        raise ToolCallError(f"not an arithmetic expression ({type(err).__name__})") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ToolCallError(f"the expression has more than {MAX_NODES} parts")
    return _walk(tree)


def format_number(value: Fraction) -> str:
    """`12`, `-7/2`: an integer as itself, any other rational as numerator/denominator."""
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


class Calculator(Tool):
    """Exact arithmetic on integers and fractions: `{"expression": "3*(4+5) - 1/2"}` -> `53/2`."""

    name = "calculator"
    description = (
        "Evaluate an arithmetic expression exactly (integers and fractions; + - * / // % ** and ( ))."
    )
    parameters: dict[str, Any] = {
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "e.g. 3*(4+5) - 1/2"}},
        "required": ["expression"],
    }

    def run(self, expression: str) -> str:
        return format_number(evaluate(expression))
