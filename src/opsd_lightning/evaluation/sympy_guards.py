"""What sympy must never see: `safe_for_sympy` refuses answers that could build enormous integers.

Big-integer arithmetic runs in C, where no timer can interrupt it, so such answers (and deeply nested ones)
are refused before parsing; `grading.grade` then keeps the verdict of its string comparison.
"""

from __future__ import annotations

import re

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


def safe_for_sympy(answer: str) -> bool:
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
