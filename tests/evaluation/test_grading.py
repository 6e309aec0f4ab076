"""Answer extraction and grading: hand-built cases, the shared benchmarks, and adversarial completions.

Run with `pytest -s tests/evaluation/test_grading.py` to see the acceptance numbers.
"""

from __future__ import annotations

import json
import random
import signal
import string
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opsd_lightning.evaluation import grading
from opsd_lightning.evaluation.grading import answers_equivalent, extract_answer, grade, normalize_answer

BENCHMARKS = Path(__file__).resolve().parents[3] / "shared" / "benchmarks"
BENCHMARK_NAMES = ["math500", "aime24", "aime25", "amc23", "hmmt_feb25", "minerva", "train_sample"]
# Rows graded per benchmark in the default (fast) run; `-m slow` grades them all.
FAST_ROWS = 100


def load_rows(name: str) -> list[dict]:
    """The rows of one shared benchmark, or a clean skip where ../shared is absent (a fresh clone)."""
    path = BENCHMARKS / f"{name}.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present (../shared is only in the developers' and CI checkouts)")
    with path.open() as lines:
        return [json.loads(line) for line in lines if line.strip()]


def row_id(row: dict, index: int) -> str:
    return str(row.get("unique_id", row.get("id", row.get("idx", index))))


def timed(function, *args):
    started = time.monotonic()
    result = function(*args)
    return result, time.monotonic() - started


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("first \\boxed{1}, then \\boxed{ 2 }", "2"),
        ("The answer is $\\boxed 5$.", "5"),
        ("\\boxed 17 is it", "17"),
        ("\\fbox{3}", "3"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed{\\text{(C)}}", "\\text{(C)}"),
        ("\\boxed{x^{2^{3}} + {y}}", "x^{2^{3}} + {y}"),
        ("no box here: 42", None),
        ("\\boxed{3} and then \\boxed{4", "3"),
        ("\\boxed{4", None),
        ("\\boxed{}", ""),
        ("\\boxedfoo{1}", None),
        ("stray } brace \\boxed{7} {", "7"),
    ],
)
def test_extract_answer_cases(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_is_fast_on_huge_and_deeply_nested_text():
    rng = random.Random(0)
    noise = "".join(rng.choices(string.printable + "\\{}$" * 20, k=100_000))
    nested = "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}"
    unclosed = "\\boxed{" * 10_000
    for text in (noise, nested, unclosed, "\\boxed{1}" * 10_000):
        _, seconds = timed(extract_answer, text)
        assert seconds < 1.0
    assert extract_answer(nested) == "{" * 10_000 + "1" + "}" * 10_000
    assert extract_answer(unclosed) is None


@settings(max_examples=300, deadline=None)
@given(st.text() | st.text(alphabet="\\boxedfbx{}$ 1\n", max_size=200))
def test_extract_answer_never_raises(text):
    answer = extract_answer(text)
    assert answer is None or isinstance(answer, str)


# ---------------------------------------------------------------------------------------------
# Normalisation and grading
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("$\\dfrac{3}{4}$", "\\frac{3}{4}"),
        ("\\frac34", "\\frac{3}{4}"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90"),
        ("x = 3.", "3"),
        ("x \\in [-2,7]", "[-2,7]"),
        ("\\text{Evelyn}", "Evelyn"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("10,\\!080", "10,080"),
        ("\\$32,\\!348", "32,348"),
        ("50\\%", "50"),
        ("SRAC=LRAC", "SRAC=LRAC"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "\\frac{1}{2}"),
        ("\\frac{1}{2}", "0.5"),
        ("3", "x=3"),
        ("x=3", "3"),
        ("(1,2]", "(1, 2]"),
        ("\\{2,1\\}", "\\{1,2\\}"),
        ("3.83\\times 10^{35}", "3.83e35"),
        ("-\\frac{1}{3}", "-1./3"),
        ("\\frac34", "\\dfrac{3}{4}"),
        ("90", "90^\\circ"),
        ("evelyn", "\\text{Evelyn}"),
        ("\\text{(C)}", "\\text{(C)}"),
        ("0.333333", "\\frac{1}{3}"),
        ("3\\sqrt{13}", "\\sqrt{117}"),
        ("-2, 1", "1,-2"),
        ("73", "\\textbf{(073)}"),
        ("1.6e-19", "1.6\\times10^{-19}"),
    ],
)
def test_equivalent_answers_grade_true(prediction, reference):
    assert grade(prediction, reference) is True


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("2", "3"),
        ("\\frac{1}{3}", "\\frac{1}{2}"),
        ("[1,2]", "(1,2]"),
        ("\\text{Navin}", "\\text{Evelyn}"),
        ("0.33", "\\frac{1}{3}"),
        # six decimal places would call these equal; six significant figures do not
        ("2.55e-10", "3.89e-10"),
        ("0.0000671", ".0000672"),
        ("1", "10^{10^{10^{10}}}"),
        ("", "0"),
        (None, "3"),
    ],
)
def test_different_answers_grade_false(prediction, reference):
    assert grade(prediction, reference) is False


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40), st.text(alphabet="0123456789.,-+/^{}()[]\\frac xe$", max_size=40))
def test_grade_never_raises(prediction, reference):
    assert isinstance(grade(prediction, reference, timeout_s=1.0), bool)


def test_answers_equivalent_is_symmetric_and_rejects_none():
    assert answers_equivalent("\\frac{1}{2}", "0.5") and answers_equivalent("0.5", "\\frac{1}{2}")
    assert not answers_equivalent(None, None) and not answers_equivalent("1", None)
    for a, b in [("x=3", "3"), ("(1,2)", "[1,2]"), ("2", "3"), ("\\{1,2\\}", "\\{2,1\\}")]:
        assert answers_equivalent(a, b) == answers_equivalent(b, a)


# ---------------------------------------------------------------------------------------------
# Deadlines, threads and adversarial completions
# ---------------------------------------------------------------------------------------------


def _slow_symbolic_equal(prediction: str, reference: str) -> bool:
    """Stands in for a sympy call that takes too long (a pure-Python loop, as sympy's are)."""
    until = time.monotonic() + 2.0
    while time.monotonic() < until:
        pass
    return True


def test_deadline_in_the_main_thread_restores_the_alarm_handler(monkeypatch):
    monkeypatch.setattr(grading, "_symbolic_equal", _slow_symbolic_equal)
    handler_before = signal.getsignal(signal.SIGALRM)
    result, seconds = timed(grade, "1", "2", 0.3)
    assert result is False and seconds < 1.5
    assert signal.getsignal(signal.SIGALRM) is handler_before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_deadline_in_a_worker_thread(monkeypatch):
    monkeypatch.setattr(grading, "_symbolic_equal", _slow_symbolic_equal)
    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(timed(grade, "1", "2", 0.3)))
    worker.start()
    worker.join(10)
    (result, seconds) = outcome[0]
    assert result is False and seconds < 1.5


def test_grading_from_a_worker_thread_returns_bools():
    cases = [("\\frac{1}{2}", "0.5"), ("x=3", "3"), ("2", "3"), ("1", "10^{10^{10^{10}}}"), (None, "1")]
    outcome: list = []
    errors: list = []

    def work() -> None:
        try:
            outcome.extend(grade(prediction, reference) for prediction, reference in cases)
        except BaseException as error:  # noqa: B036 - the test reports it below
            errors.append(error)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(60)
    assert not errors and outcome == [True, True, False, False, False]


def _adversarial_completions() -> list[tuple[str, str, str]]:
    rng = random.Random(1)
    noise = "".join(rng.choices(string.printable + "\\{}$^" * 20, k=100_000))
    five_k_digits = "".join(rng.choices("123456789", k=5_000))
    return [
        ("100 kB of random text", noise, "1"),
        ("100 kB of random text, then a box", noise + "\\boxed{1}", "1"),
        ("10k nested braces", "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}", "1"),
        ("power tower", "\\boxed{10^{10^{10^{10}}}}", "1"),
        ("power tower, plain", "\\boxed{9**9**9**9}", "1"),
        ("factorial of a factorial", "\\boxed{(10!)!}", "1"),
        ("huge exponent", "\\boxed{2^{123456789}}", "2"),
        ("unbalanced box", "so \\boxed{" + "x+" * 1_000, "1"),
        ("10k boxes", "\\boxed{1}" * 10_000, "1"),
        ("5k-digit number vs itself", f"\\boxed{{{five_k_digits}}}", five_k_digits),
        ("5k-digit number vs another", f"\\boxed{{{five_k_digits}}}", five_k_digits[::-1]),
    ]


@pytest.mark.parametrize(("name", "completion", "reference"), _adversarial_completions())
def test_adversarial_completions_grade_quickly(name, completion, reference):
    started = time.monotonic()
    answer = extract_answer(completion)
    result = grade(answer, reference)
    seconds = time.monotonic() - started
    print(f"adversarial {name}: {result} in {seconds:.3f}s")
    assert isinstance(result, bool) and seconds < 10.0
    if name in ("100 kB of random text, then a box", "10k boxes", "5k-digit number vs itself"):
        assert result is True


# ---------------------------------------------------------------------------------------------
# Acceptance on the shared benchmarks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BENCHMARK_NAMES)
def test_every_reference_grades_as_its_own_answer(name):
    rows = load_rows(name)
    correct = sum(grade(row["answer"], row["answer"]) for row in rows)
    print(f"{name}: self-grading {correct}/{len(rows)} = {100 * correct / len(rows):.1f}%")
    assert correct == len(rows)


def _symbolic_self_grading(name: str, limit: int | None) -> None:
    # The string fast path settles self-grading; this shows math_verify parses every reference too.
    rows = load_rows(name)[:limit]
    misses = [row["answer"] for row in rows if not grading._symbolic_equal(row["answer"], row["answer"])]
    print(f"{name}: symbolic self-grading {len(rows) - len(misses)}/{len(rows)}, misses {misses}")
    assert not misses


@pytest.mark.parametrize("name", ["math500", "minerva", "hmmt_feb25"])
def test_every_reference_is_understood_by_the_symbolic_step_fast(name):
    _symbolic_self_grading(name, FAST_ROWS)


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARK_NAMES)
def test_every_reference_is_understood_by_the_symbolic_step_all_rows(name):
    _symbolic_self_grading(name, None)


def _solution_accuracy(name: str, limit: int | None) -> None:
    rows = load_rows(name)[:limit]
    misses = []
    for index, row in enumerate(rows):
        extracted = extract_answer(row["solution"])
        if not grade(extracted, row["answer"]):
            misses.append((row_id(row, index), extracted, row["answer"]))
    accuracy = 1 - len(misses) / len(rows)
    print(f"{name}: extract_answer(solution) vs answer {100 * accuracy:.1f}% of {len(rows)}, misses {misses}")
    assert accuracy >= 0.99


@pytest.mark.parametrize("name", ["math500", "minerva", "train_sample"])
def test_solution_box_grades_as_the_answer(name):
    _solution_accuracy(name, None)


def _decimal_renderings(name: str, limit: int | None) -> None:
    # Exercises the symbolic step on real references: `\\frac{3}{56}` must accept `0.05357142857`.
    rows = load_rows(name)[:limit]
    checked, misses = 0, []
    for row in rows:
        value = grading._exact_number(grading._parse(row["answer"]))
        if value is None or not value.is_real:
            continue
        checked += 1
        decimal = f"{float(value):.10g}"
        if not grade(decimal, row["answer"]):
            misses.append((row["answer"], decimal))
    print(f"{name}: 10-digit decimals of {checked} numeric references, misses {misses}")
    assert checked > 0 and not misses


@pytest.mark.parametrize("name", ["math500", "minerva"])
def test_decimal_renderings_of_numeric_references_grade_true_fast(name):
    _decimal_renderings(name, FAST_ROWS)


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARK_NAMES)
def test_decimal_renderings_of_numeric_references_grade_true_all_rows(name):
    _decimal_renderings(name, None)


def _derangement(keys: list[str], seed: int) -> list[int]:
    """A seeded permutation sending every row to a row with a different key.

    Groups of equal keys are laid out contiguously in a shuffled order and the layout is rotated by the
    largest group's size, so no row lands in its own group (needs that group to be under half the rows).
    """
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    ordered_groups = list(groups.values())
    rng.shuffle(ordered_groups)
    layout = [index for group in ordered_groups for index in rng.sample(group, len(group))]
    shift = max(len(group) for group in ordered_groups)
    assert 2 * shift <= len(layout)
    partner = [0] * len(keys)
    for position, index in enumerate(layout):
        partner[index] = layout[(position + shift) % len(layout)]
    return partner


def _shuffled_rate(name: str, limit: int | None) -> None:
    rows = load_rows(name)[:limit]
    answers = [row["answer"] for row in rows]
    partner = _derangement([normalize_answer(answer) for answer in answers], seed=0)
    hits = [
        (answers[partner[i]], answers[i]) for i in range(len(rows)) if grade(answers[partner[i]], answers[i])
    ]
    rate = len(hits) / len(rows)
    print(f"{name}: shuffled answers graded correct {100 * rate:.1f}% of {len(rows)}, hits {hits}")
    assert rate <= 0.02


@pytest.mark.parametrize("name", BENCHMARK_NAMES)
def test_shuffled_answers_grade_false_fast(name):
    _shuffled_rate(name, FAST_ROWS)


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHMARK_NAMES)
def test_shuffled_answers_grade_false_all_rows(name):
    _shuffled_rate(name, None)
