"""Final-answer extraction (the last `\\boxed{...}`) and exact-match comparison."""

from __future__ import annotations

import re

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_answer(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), nested braces balanced; None if absent."""
    starts = [match.end() for match in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for index in range(start, len(text)):
            char = text[index]
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    return text[start:index].strip()
    return None


def normalize_answer(answer: str) -> str:
    """Light normalisation for exact match: spaces, `$`, a trailing period, `\\text{}` wrappers."""
    answer = re.sub(r"\\text\{(.*?)\}", r"\1", answer)
    return answer.replace("$", "").replace(" ", "").rstrip(".")


def answers_match(prediction: str | None, reference: str) -> bool:
    """Exact match after normalisation (symbolic grading arrives with the benchmark layer)."""
    return prediction is not None and normalize_answer(prediction) == normalize_answer(reference)
