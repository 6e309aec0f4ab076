"""Final answers: the boxed answer of a completion, and the normalised string two answers are compared by.

`extract_answer` takes the last `\\boxed{...}` of a completion in one linear pass, whatever its nesting;
`normalize_answer` is the fast path of `grading.grade` (equal strings need no symbolic check).
"""

from __future__ import annotations

import re

__all__ = ["extract_answer", "normalize_answer"]


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
