"""Final-answer extraction and robust, time-bounded grading of math answers.

`extract_answer` takes the last `\\boxed{...}` of a completion; `grade` says whether that answer is
mathematically equivalent to a reference, first by a normalised string comparison and then with
`math_verify`. Grading runs on untrusted model output, so it never raises and never hangs: inputs
that would make sympy build astronomically large integers are refused before parsing, and the
symbolic check runs under a wall-clock deadline (a `SIGALRM` timer in the main thread, an
abandoned daemon thread elsewhere).
"""

from __future__ import annotations

import functools
import logging
import re
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["answers_equivalent", "extract_answer", "grade", "normalize_answer"]

# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

# `(?![A-Za-z])` keeps `\boxedfoo` (another command) out; `\fbox` is what some models write.
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# A backslash escapes the next character, so `\{` and `\}` (set braces) are not grouping braces.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
# `\boxed 5$` in MATH solutions: the box holds one token, up to whitespace, `$` or a brace.
_BARE_TOKEN = re.compile(r"(?:\\?[^\s${}\\])+")
_SPACES = re.compile(r"[ \t]*")


def _matching_braces(text: str) -> dict[int, int]:
    """Position of each `{` that is closed mapped to its `}`, in one linear pass (no recursion)."""
    closing: dict[int, int] = {}
    open_positions: list[int] = []
    for token in _BRACE_TOKEN.finditer(text):
        char = token.group()
        if char == "{":
            open_positions.append(token.start())
        elif char == "}" and open_positions:
            closing[open_positions.pop()] = token.start()
    return closing


def extract_answer(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}` / `\\boxed 5` of `text`, stripped.

    Nested braces are balanced and escaped braces (`\\{`) ignored. A box that is never closed is
    skipped in favour of an earlier complete one; with none, the answer is None. Linear in the length
    of `text`, whatever its nesting.
    """
    boxes = [match.end() for match in _BOX_COMMAND.finditer(text)]
    if not boxes:
        return None
    closing = _matching_braces(text)
    for after_command in reversed(boxes):
        start = _SPACES.match(text, after_command).end()
        if start < len(text) and text[start] == "{":
            end = closing.get(start)
            if end is not None:
                return text[start + 1 : end].strip()
            continue
        token = _BARE_TOKEN.match(text, start)
        if token is not None:
            return token.group()
    return None


# ---------------------------------------------------------------------------------------------
# Normalisation (the fast path and the fallback)
# ---------------------------------------------------------------------------------------------

_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|textup|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_NOISE = re.compile(
    r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree"  # degree signs
    r"|\\left(?![A-Za-z])|\\right(?![A-Za-z])"  # sizing of delimiters
    r"|\\[!,;:> ]"  # LaTeX spacing
    r"|\\%|%|\\\$|\$"  # percent and dollar signs
    r"|\s+"
)
_FRAC_VARIANT = re.compile(r"\\[dt]frac(?![A-Za-z])")
_FRAC_DIGITS = re.compile(r"\\frac(\d)(\d)")
_SQRT_DIGIT = re.compile(r"\\sqrt(\d)")
# `x=3`, `y_1 = 3`, `x \in [1,2]`: a single variable named on the left of the only relation.
_ASSIGNMENT = re.compile(r"^[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?(?:=|\\in(?![A-Za-z]))")


def normalize_answer(answer: str) -> str:
    """A canonical string for exact comparison of two answers.

    Unwraps `\\text{...}`-style wrappers (keeping their content), drops `$`, `%`, degree signs,
    `\\left`/`\\right`, LaTeX spacing (`\\!`, `\\,`, ...) and all whitespace, maps `\\dfrac`/`\\tfrac` to
    `\\frac`, braces the one-digit shorthands `\\frac34` and `\\sqrt2`, strips trailing periods, and a
    leading single-variable assignment (`x=3` -> `3`, `x \\in [1,2]` -> `[1,2]`). Nothing mathematical
    (fractions vs decimals, ordering) is decided here: that is `grade`'s symbolic step.
    """
    normalized = _TEXT_WRAPPER.sub(r"\1", answer)
    normalized = _NOISE.sub("", normalized)
    normalized = _FRAC_VARIANT.sub(r"\\frac", normalized)
    normalized = _FRAC_DIGITS.sub(r"\\frac{\1}{\2}", normalized)
    normalized = _SQRT_DIGIT.sub(r"\\sqrt{\1}", normalized)
    normalized = normalized.rstrip(".")
    assignment = _ASSIGNMENT.match(normalized)
    if assignment is not None and "=" not in normalized[assignment.end() :]:
        normalized = normalized[assignment.end() :]
    return normalized


# ---------------------------------------------------------------------------------------------
# Guards: what sympy must never see
# ---------------------------------------------------------------------------------------------

# Longer answers are compared as strings only: real answers are short, and parse time grows with length.
_MAX_SYMBOLIC_CHARS = 1000
_MAX_NESTING = 40
# `10^{1000000}` has a million digits: big-integer arithmetic in C cannot be interrupted by a timer.
_MAX_OPERAND_DIGITS = 5
_POWER = re.compile(r"\^|\*\*")
_INTEGER = re.compile(r"\d+")
# Commands that are arithmetic, not symbols: an exponent made only of these and digits is a number.
_ARITHMETIC_COMMANDS = re.compile(r"\\(?:times|cdot|frac|dfrac|tfrac|left|right|sqrt)(?![A-Za-z])")
_LETTER = re.compile(r"[A-Za-z]")
_CLOSERS = {"{": "}", "(": ")", "[": "]"}


def _group_after(text: str, start: int) -> tuple[str, int]:
    """The operand starting at `start`, and its end: a balanced group, digits, a command onwards, one char."""
    while start < len(text) and text[start] == " ":
        start += 1
    if start >= len(text):
        return "", start
    opener = text[start]
    if opener in _CLOSERS:
        depth = 0
        for index in range(start, len(text)):
            if text[index] == opener:
                depth += 1
            elif text[index] == _CLOSERS[opener]:
                depth -= 1
                if depth == 0:
                    return text[start + 1 : index], index + 1
        return text[start + 1 :], len(text)
    if opener == "\\":
        # `10^\frac{...}{...}`: rather than parse LaTeX arguments, judge everything that follows.
        return text[start:], len(text)
    digits = _INTEGER.match(text, start)
    return (digits.group(), digits.end()) if digits else (opener, start + 1)


def _group_before(text: str, end: int) -> str:
    """The operand that ends just before `end` (for a postfix `!`): a balanced group or a run of digits."""
    if end <= 0:
        return ""
    closer = text[end - 1]
    openers = {close: open_ for open_, close in _CLOSERS.items()}
    if closer in openers:
        depth = 0
        for index in range(end - 1, -1, -1):
            if text[index] == closer:
                depth += 1
            elif text[index] == openers[closer]:
                depth -= 1
                if depth == 0:
                    return text[index + 1 : end - 1]
        return text[: end - 1]
    start = end
    while start > 0 and text[start - 1].isdigit():
        start -= 1
    return text[start:end]


def _is_numeric_tower(operand: str) -> bool:
    """An operand whose value can be astronomical: a power or factorial with no symbols, or a long integer."""
    operand = operand.replace("\\!", "")  # LaTeX negative space, not a factorial
    arithmetic_only = _ARITHMETIC_COMMANDS.sub("", operand)
    return (
        _LETTER.search(arithmetic_only) is None and (_POWER.search(operand) is not None or "!" in operand)
    ) or any(len(digits) > _MAX_OPERAND_DIGITS for digits in _INTEGER.findall(operand))


def _safe_for_sympy(answer: str) -> bool:
    """False for answers whose symbolic evaluation could build enormous integers or recurse deeply.

    Refused: long strings, deep nesting, numeric power towers (`10^{10^{10}}`), exponents with more
    than five digits, factorials of factorials or powers, and factorials of numbers above 99,999.
    Symbolic exponents (`e^{-x^2}`) are fine: sympy keeps them unevaluated.
    """
    if len(answer) > _MAX_SYMBOLIC_CHARS:
        return False
    depth = deepest = 0
    for char in answer:
        if char in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "})]":
            depth -= 1
    if deepest > _MAX_NESTING:
        return False
    for power in _POWER.finditer(answer):
        exponent, end = _group_after(answer, power.end())
        # `9**9**9` is right-associative: a bare exponent followed by another power is a tower too.
        chained = _POWER.match(answer, len(answer) - len(answer[end:].lstrip()))
        if _is_numeric_tower(exponent) or (chained and _LETTER.search(exponent) is None):
            return False
    for bang in re.finditer("!", answer):
        if bang.start() > 0 and answer[bang.start() - 1] == "\\":
            continue
        if _is_numeric_tower(_group_before(answer, bang.start())):
            return False
    return True


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


class _GradingTimeout(BaseException):
    """Raised by the alarm handler; a BaseException so that library `except Exception` cannot swallow it."""


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


def _call_with_deadline(function: Callable[[], bool], timeout_s: float) -> bool:
    """`function()` or False once `timeout_s` seconds have passed.

    In the main thread a one-shot `SIGALRM` timer interrupts pure-Python work (the previous handler is
    restored, and a timer armed before is re-armed with what was left of it). Signals are main-thread
    only, so elsewhere the work runs in a daemon thread that is abandoned, still running, at the
    deadline; `_safe_for_sympy` keeps the known unbounded cases (huge integers, which also hold the
    GIL) from ever starting.
    """
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        return _call_with_alarm(function, timeout_s)
    outcome: list[bool] = []

    def run() -> None:
        try:
            outcome.append(function())
        except BaseException:  # noqa: B036 - a daemon thread must not die noisily on bad input
            outcome.append(False)

    worker = threading.Thread(target=run, name="opsd-grading", daemon=True)
    worker.start()
    worker.join(timeout_s)
    return bool(outcome and outcome[0])


def _call_with_alarm(function: Callable[[], bool], timeout_s: float) -> bool:
    """`function()` under a one-shot real-time timer; the handler disarms itself so it fires at most once."""
    armed = [True]

    def on_alarm(signum: int, frame: Any) -> None:
        if armed[0]:
            armed[0] = False
            raise _GradingTimeout

    started = time.monotonic()
    previous_delay, previous_interval = 0.0, 0.0
    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    try:
        previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return function()
        finally:
            armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _GradingTimeout:
        return False
    finally:
        # None: a handler installed from C, which cannot be reinstated; ours stays, disarmed and inert.
        if previous_handler is not None:
            signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay > 0:
            left = max(previous_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, previous_interval)


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
        if timeout_s <= 0 or not (_safe_for_sympy(prediction) and _safe_for_sympy(reference)):
            return False
        return _call_with_deadline(lambda: _symbolic_equal(prediction, reference), timeout_s)
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
