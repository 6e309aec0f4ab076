"""A complete small environment of one's own: a unit converter tool and its task (docs/environments.md).

    PYTHONPATH=experiments/custom_environment opsd-train data=arith_tools \
        environment._target_=lengths_environment.LengthsEnvironment
"""

from __future__ import annotations

from fractions import Fraction

from opsd_lightning.environments import MathEnvironment, Tool

# Centimetres per unit, exact.
CENTIMETRES = {"mm": Fraction(1, 10), "cm": Fraction(1), "m": Fraction(100), "km": Fraction(100_000)}


class UnitConverter(Tool):
    """Convert a length between mm, cm, m and km, exactly (`{"value": "3/2", "unit": "km", "to": "m"}`)."""

    name = "convert"
    description = "Convert a length between mm, cm, m and km (exact)."
    parameters = {
        "type": "object",
        "properties": {
            "value": {"type": "string", "description": "a number, e.g. 3/2 or 2.5"},
            "unit": {"type": "string", "enum": sorted(CENTIMETRES)},
            "to": {"type": "string", "enum": sorted(CENTIMETRES)},
        },
        "required": ["value", "unit", "to"],
    }

    def run(self, value: str, unit: str, to: str) -> str:
        if unit not in CENTIMETRES or to not in CENTIMETRES:
            raise ValueError(f"units are {sorted(CENTIMETRES)}")
        if len(value) > 30:
            raise ValueError("the value is longer than 30 characters")
        result = Fraction(value) * CENTIMETRES[unit] / CENTIMETRES[to]
        return (
            str(result.numerator) if result.denominator == 1 else f"{result.numerator}/{result.denominator}"
        )


class LengthsEnvironment(MathEnvironment):
    """Problems whose answer is a length; the reward grades the last `\\boxed{}` (MathEnvironment's)."""

    tools = (UnitConverter(),)

    def __init__(
        self, max_turns: int = 3, max_tokens: int | None = None, tool_timeout_s: float = 2.0
    ) -> None:
        super().__init__(max_turns, max_tokens, tool_timeout_s)
