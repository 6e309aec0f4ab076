"""Robust, time-bounded grading of math answers.

`grade` says whether an extracted answer is mathematically equivalent to a reference, first by a normalised
string comparison and then with `math_verify`. Grading runs on untrusted model output, so it never raises
and never hangs: inputs that would make sympy build astronomically large integers are refused before
parsing (`sympy_guards.py`), and the symbolic check runs under a wall-clock deadline (`deadline.py`: a
`SIGALRM` timer in the main thread, an abandoned daemon thread elsewhere). `extract_answer` and
`normalize_answer` (`answers.py`) are part of this API, so the grader's functions have one home to import.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

from opsd_lightning.evaluation.answers import extract_answer, normalize_answer
from opsd_lightning.evaluation.deadline import call_with_deadline
from opsd_lightning.evaluation.sympy_guards import safe_for_sympy

__all__ = ["answers_equivalent", "extract_answer", "grade", "normalize_answer"]

# ---------------------------------------------------------------------------------------------
# Symbolic comparison with math_verify
# ---------------------------------------------------------------------------------------------

# `3.83e35` would parse as 3.83*e*35 in LaTeX; written as a power of ten it is a number.
_SCIENTIFIC = re.compile(r"(?<![\w.\\])(\d+(?:\.\d*)?|\.\d+)[eE]([+-]?\d+)(?![\w.])")
# `-1./3` (numpy style) is not LaTeX; `-1/3` is.
_BARE_POINT = re.compile(r"(\d)\.(?![\d.])")
# `\textbf{(113)}` (an AIME answer) would become the symbol "113"; text without letters is maths.
_TEXT_WITHOUT_LETTERS = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}A-Za-z]*)\}")
_NUMPY = re.compile(r"\bnp\.(pi|arcsin|arccos|arctan|sin|cos|tan|exp|log)\b")
# Six significant figures: the scale-free version of math_verify's six decimal places, so that
# 3.89e-10 and 2.55e-10 differ and 1/3 equals 0.333333.
_RELATIVE_TOLERANCE = 5e-6


class _NoTimeoutWarning(logging.Filter):
    """Hides math_verify's 'timeout is disabled' warning: the deadline is enforced here instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _logger_name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_logger_name).addFilter(_NoTimeoutWarning())


def _to_latex(answer: str) -> str:
    """Rewrites notations math_verify misreads (`3.83e35`, `-1./3`, `np.pi`, `\\text{(113)}`)."""
    latex = answer.replace("\\$", "").replace("$", "").strip()
    latex = _TEXT_WITHOUT_LETTERS.sub(r"\1", latex)
    latex = _SCIENTIFIC.sub(r"\1\\times 10^{\2}", latex)
    latex = _BARE_POINT.sub(r"\1", latex)
    return _NUMPY.sub(r"\\\1", latex)


@functools.lru_cache(maxsize=4096)
def _parse(answer: str) -> tuple[Any, ...]:
    """math_verify parses of one bare answer: as LaTeX, else as a plain expression matching it whole."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    from sympy import Basic, MatrixBase

    latex = _to_latex(answer)
    # A box makes math_verify take the whole answer rather than hunt for a number inside it.
    parsed = parse(f"\\boxed{{{latex}}}", [LatexExtractionConfig()], parsing_timeout=None)
    if any(isinstance(item, (Basic, MatrixBase)) for item in parsed):
        return tuple(parsed)
    # The plain-expression extractor finds any number in a string, so only a full match counts.
    expression = parse(latex, [ExprExtractionConfig()], parsing_timeout=None)
    if len(expression) == 2 and expression[1].replace(" ", "") == latex.replace(" ", ""):
        return tuple(expression)
    return tuple(parsed)


def _is_decimal(parsed: tuple[Any, ...]) -> bool:
    """Whether a parse is a single constant number written with a decimal point (`0.5`, `3.8e3`)."""
    from sympy import Expr, Float, UnevaluatedExpr

    expression = next((item for item in parsed if not isinstance(item, str)), None)
    return bool(
        isinstance(expression, Expr)
        and expression.is_number
        and expression.has(Float)
        and not expression.has(UnevaluatedExpr)  # percentages: math_verify treats `9\%` as 9
    )


def _exact_number(parsed: tuple[Any, ...]) -> Any | None:
    """The value of a parse that is a single constant number (`\\sqrt{2}`, `\\frac{1}{3}`), else None."""
    from sympy import Expr, UnevaluatedExpr

    expression = next((item for item in parsed if not isinstance(item, str)), None)
    if isinstance(expression, Expr) and expression.is_number and not expression.has(UnevaluatedExpr):
        return expression.evalf(30)
    return None


def _constant_versus_formula(gold: tuple[Any, ...], target: tuple[Any, ...]) -> bool:
    """True when one side is a constant and the other a formula in free symbols: never equal, and
    skipping math_verify's `simplify(a - b)` on such pairs saves up to a second each."""
    from sympy import Expr

    expressions = [
        next((item for item in parsed if not isinstance(item, str)), None) for parsed in (gold, target)
    ]
    if not all(isinstance(expression, Expr) for expression in expressions):
        return False
    has_symbols = [bool(expression.free_symbols) for expression in expressions]
    return has_symbols[0] != has_symbols[1]


def _symbolic_equal(prediction: str, reference: str) -> bool:
    """math_verify's verdict, except that a decimal number is compared to six significant figures."""
    from math_verify import verify

    gold, target = _parse(reference), _parse(prediction)
    if not gold or not target:
        return False
    if _is_decimal(gold) or _is_decimal(target):
        gold_value, target_value = _exact_number(gold), _exact_number(target)
        if gold_value is not None and target_value is not None:
            scale = max(abs(gold_value), abs(target_value))
            return bool(abs(gold_value - target_value) <= _RELATIVE_TOLERANCE * scale)
    if _constant_versus_formula(gold, target):
        return False
    return bool(verify(list(gold), list(target), timeout_seconds=None))


# ---------------------------------------------------------------------------------------------
# Public grading API
# ---------------------------------------------------------------------------------------------


def grade(prediction: str | None, reference: str, timeout_s: float = 5.0) -> bool:
    """Whether the extracted answer `prediction` is mathematically equivalent to `reference`.

    Equal `normalize_answer` strings are a match without further work. Otherwise both are parsed with
    math_verify (LaTeX first, then a plain expression such as `-1./3`; `3.83e35` is rewritten as
    `3.83\\times 10^{35}`) and compared with `verify`, the reference as gold; when either side is a
    decimal number, two numbers are instead compared to six significant figures. The symbolic step
    has `timeout_s` seconds of wall clock in all (values <= 0 skip it); a timeout, an exception or an
    answer refused by the size guards counts as "not equivalent", the verdict of the string
    comparison. A None prediction is never correct, nor is an empty one. Never raises.
    """
    if prediction is None:
        return False
    try:
        prediction, reference = str(prediction), str(reference)
        normalized = normalize_answer(prediction)
        if not normalized:
            return False
        if normalized == normalize_answer(reference):
            return True
        if timeout_s <= 0 or not (safe_for_sympy(prediction) and safe_for_sympy(reference)):
            return False
        return call_with_deadline(lambda: _symbolic_equal(prediction, reference), timeout_s)
    except Exception:
        return False


def answers_equivalent(a: str | None, b: str | None, timeout_s: float = 5.0) -> bool:
    """Symmetric equivalence of two predicted answers, for majority voting; None matches nothing.

    math_verify's `verify` is not quite symmetric (gold vs target), so the pair is put in a fixed
    (sorted) order first: `answers_equivalent(a, b) == answers_equivalent(b, a)` always.
    """
    if a is None or b is None:
        return False
    first, second = sorted((str(a), str(b)))
    return grade(first, second, timeout_s=timeout_s)
