"""Property-based tests (hypothesis) for code that must hold on any input, not just hand-picked cases.

Pinned here:
- grading: `extract_answer` never raises on any text, returns a stripped substring of it or None, and
  finds the last complete box behind any noise and at any nesting depth; `normalize_answer` returns a
  string without whitespace, `$`, `%` or a trailing period; `grade` returns a bool within its deadline,
  is reflexive, and with `timeout_s=0` is exactly the normalised string comparison.
- per-token divergences (ForwardKL, ReverseKL, GeneralizedJSD(β), TopK(base, k)): >= 0, zero with a zero
  gradient for identical distributions, never above the unclipped value when clipped, and finite in
  value and gradient for logits of ±1e4 with -inf masks shared by student and teacher (masked entries
  get no gradient). SampledToken, a single-sample estimate that may be negative: zero for identical
  distributions, finite, |value| <= clip, and its expectation under the student (value and gradient)
  is reverse KL.
- the chunked hidden-state loss: the same value and gradients as the naive reference (float64), >= 0,
  zero for identical hidden states, and finite with large hidden states / weights and -inf bias masks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from opsd_lightning.evaluation.grading import extract_answer, grade, normalize_answer
from opsd_lightning.objectives.chunked import chunked_divergence_sum, naive_divergence_sum
from opsd_lightning.objectives.divergences import (
    Divergence,
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    SampledToken,
    TopK,
)

# ---------------------------------------------------------------------------------------------
# Grading
# ---------------------------------------------------------------------------------------------

# Fragments that stress the brace matcher and the box regexes; mixed with arbitrary short text.
_FRAGMENTS = st.sampled_from(
    [
        "\\boxed{",
        "\\boxed",
        "\\boxed ",
        "\\fbox{",
        "\\boxedfoo{",
        "\\fbox",
        "{",
        "}",
        "\\{",
        "\\}",
        "\\",
        "\\\\",
        "$",
        "$$",
        " ",
        "\n",
        "\t",
        "x",
        "42",
        "-3.5",
        "\\frac",
        "^",
        "!",
        "\\left(",
        "\\right)",
        ".",
        "..",
        "x=",
        "\\in",
        "%",
        "\\%",
        "\\$",
        "\\text{",
        "\\dfrac",
        "^\\circ",
        "\\!",
        "\\,",
        "é",
        "∞",
        "🙂",
        "\u200b",
        "\u3000",
        "\x00",
    ]
)
TRICKY_TEXT = st.lists(_FRAGMENTS | st.text(max_size=3), max_size=60).map("".join)
# No braces and no backslash: neither opens a group nor starts a command.
PLAIN_TEXT = st.text(alphabet=st.characters(blacklist_characters="{}\\"), max_size=8)
BALANCED = st.recursive(
    PLAIN_TEXT,
    lambda inner: st.lists(inner | inner.map(lambda text: "{" + text + "}"), max_size=3).map("".join),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(TRICKY_TEXT | st.text())
def test_extract_answer_returns_a_stripped_substring_or_none(text: str) -> None:
    answer = extract_answer(text)
    assert answer is None or isinstance(answer, str)
    if answer is not None:
        assert answer == answer.strip()
        assert answer in text
        assert "\\boxed" in text or "\\fbox" in text


@settings(max_examples=200, deadline=None)
@given(
    TRICKY_TEXT,
    st.sampled_from(["\\boxed", "\\fbox", "\\boxed ", "\\boxed\t"]),
    BALANCED,
    st.sampled_from(["", " ", "\n ", "\t", "\u3000"]),
    PLAIN_TEXT,
)
def test_extract_answer_finds_the_last_complete_box_behind_any_noise(
    prefix: str, command: str, content: str, padding: str, suffix: str
) -> None:
    """Whatever comes before (unclosed boxes, stray or escaped braces), the last closed box wins."""
    text = prefix + command + "{" + padding + content + padding + "}" + suffix
    assert extract_answer(text) == content.strip()


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 5000), st.text(alphabet=st.characters(blacklist_characters="{}\\"), max_size=5))
def test_extract_answer_handles_deep_nesting(depth: int, inner: str) -> None:
    nested = "{" * depth + inner + "}" * depth
    assert extract_answer("\\boxed{" + nested + "}") == nested.strip()
    # Never closed: no complete box, and no bare `\boxed 5` token either.
    assert extract_answer("\\boxed{" * (depth + 1) + inner) is None


@settings(max_examples=300, deadline=None)
@given(TRICKY_TEXT | st.text())
def test_normalize_answer_drops_whitespace_dollars_percent_and_final_period(answer: str) -> None:
    normalized = normalize_answer(answer)
    assert isinstance(normalized, str)
    assert not any(char.isspace() for char in normalized)
    assert "$" not in normalized and "%" not in normalized
    assert not normalized.endswith(".")


@settings(max_examples=200, deadline=None)
@given(TRICKY_TEXT | st.text(max_size=20), TRICKY_TEXT | st.text(max_size=20))
def test_grade_without_symbolic_step_is_the_normalised_string_comparison(
    prediction: str, reference: str
) -> None:
    normalized = normalize_answer(prediction)
    expected = normalized != "" and normalized == normalize_answer(reference)
    assert grade(prediction, reference, timeout_s=0) is expected
    # Reflexive whenever there is an answer at all (the string fast path, no sympy).
    assert grade(prediction, prediction, timeout_s=0) is (normalized != "")
    assert grade(None, reference, timeout_s=0) is False


GRADE_TIMEOUT_S = 0.2
# Generous slack for 2 shared CPU cores; a hang (e.g. a huge integer built in C) would be far longer.
GRADE_SLACK_S = 5.0
MATHY_TEXT = st.text(alphabet="0123456789.,-+*/^!{}()[]\\fracsqrtimesxe$ ", max_size=30)


@settings(max_examples=30, deadline=None)
@given(MATHY_TEXT | TRICKY_TEXT | st.text(max_size=20), MATHY_TEXT | st.text(max_size=20))
def test_grade_returns_a_bool_within_its_deadline(prediction: str, reference: str) -> None:
    started = time.monotonic()
    result = grade(prediction, reference, timeout_s=GRADE_TIMEOUT_S)
    elapsed = time.monotonic() - started
    assert isinstance(result, bool)
    assert elapsed < GRADE_TIMEOUT_S + GRADE_SLACK_S


# ---------------------------------------------------------------------------------------------
# Per-token divergences
# ---------------------------------------------------------------------------------------------

LOGIT_BOUND = 1e4
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
TEMPERATURES = [0.25, 1.0, 2.0]


def _tolerance(dtype: torch.dtype) -> float:
    """Round-off allowed around 0 for one token; bf16 inputs are computed in float32."""
    return 1e-10 if dtype == torch.float64 else 1e-4


BETAS = st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0)


@st.composite
def vocabulary_divergences(draw: st.DrawFn, v: int, clip: float | None = None) -> Divergence:
    """ForwardKL, ReverseKL, GeneralizedJSD(β) or TopK over one of them, at a drawn temperature."""
    temperature = draw(st.sampled_from(TEMPERATURES))
    kind = draw(st.sampled_from(["forward", "reverse", "jsd"]))
    if kind == "forward":
        base: Divergence = ForwardKL(temperature=temperature, clip=clip)
    elif kind == "reverse":
        base = ReverseKL(temperature=temperature, clip=clip)
    else:
        base = GeneralizedJSD(beta=draw(BETAS), temperature=temperature, clip=clip)
    if draw(st.booleans()):
        return TopK(base, k=draw(st.integers(1, v + 2)))
    return base


def _clone_divergence(divergence: Divergence, clip: float | None) -> Divergence:
    """The same divergence (and TopK k) with another clip."""
    if isinstance(divergence, TopK):
        return TopK(_clone_divergence(divergence.base, clip), k=divergence.k)
    if isinstance(divergence, GeneralizedJSD):
        return GeneralizedJSD(beta=divergence.beta, temperature=divergence.temperature, clip=clip)
    return type(divergence)(temperature=divergence.temperature, clip=clip)


class LogitCase:
    """Student and teacher logits [N, V] with -inf at the same entries (one finite entry per row)."""

    def __init__(self, student: np.ndarray, teacher: np.ndarray, token_ids: np.ndarray, dtype: torch.dtype):
        self.student_np, self.teacher_np, self.dtype = student, teacher, dtype
        self.mask = torch.from_numpy(np.isneginf(student))
        self.token_ids = torch.from_numpy(token_ids)

    def student(self) -> torch.Tensor:
        """A fresh leaf that requires grad."""
        return torch.from_numpy(self.student_np).to(self.dtype).requires_grad_()

    def teacher(self) -> torch.Tensor:
        return torch.from_numpy(self.teacher_np).to(self.dtype)

    def __repr__(self) -> str:
        return (
            f"LogitCase(student={self.student_np.tolist()}, teacher={self.teacher_np.tolist()}, "
            f"token_ids={self.token_ids.tolist()}, dtype={self.dtype})"
        )


_LOGIT_VALUES = st.floats(-LOGIT_BOUND, LOGIT_BOUND, width=32) | st.sampled_from(
    [LOGIT_BOUND, -LOGIT_BOUND, 0.0]
)


@st.composite
def logit_cases(draw: st.DrawFn, max_n: int = 4, max_v: int = 12) -> LogitCase:
    """Extreme logits: anything in ±1e4, the bounds themselves, teachers near or far from the student,
    and a shared -inf mask over part of the vocabulary."""
    n, v = draw(st.integers(1, max_n)), draw(st.integers(1, max_v))
    student = draw(arrays(np.float64, (n, v), elements=_LOGIT_VALUES))
    relation = draw(st.sampled_from(["independent", "perturbed"]))
    if relation == "independent":
        teacher = draw(arrays(np.float64, (n, v), elements=_LOGIT_VALUES))
    else:  # close to the student, where round-off could push a divergence below zero
        noise = draw(arrays(np.float64, (n, v), elements=st.floats(-1.0, 1.0)))
        teacher = student + draw(st.sampled_from([1e-3, 1e-1, 1.0])) * noise
    mask = draw(arrays(np.bool_, (n, v)))
    mask[np.arange(n), draw(arrays(np.int64, (n,), elements=st.integers(0, v - 1)))] = False
    student[mask] = -math.inf
    teacher[mask] = -math.inf
    token_ids = draw(arrays(np.int64, (n,), elements=st.integers(0, v - 1)))
    return LogitCase(student, teacher, token_ids, draw(st.sampled_from(DTYPES)))


def _assert_masked_entries_get_no_gradient(case: LogitCase, grad: torch.Tensor) -> None:
    assert torch.isfinite(grad).all(), grad
    assert (grad[case.mask] == 0).all(), grad


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_vocabulary_divergences_are_nonnegative_and_finite(data: st.DataObject) -> None:
    case = data.draw(logit_cases())
    divergence = data.draw(vocabulary_divergences(v=case.student_np.shape[1]))
    student = case.student()
    values = divergence.per_token(student, case.teacher(), case.token_ids)
    assert values.shape == case.token_ids.shape
    assert torch.isfinite(values).all(), values
    assert (values >= -_tolerance(case.dtype)).all(), values
    values.sum().backward()
    _assert_masked_entries_get_no_gradient(case, student.grad)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_vocabulary_divergences_are_zero_with_zero_gradient_for_identical_distributions(
    data: st.DataObject,
) -> None:
    case = data.draw(logit_cases())
    divergence = data.draw(vocabulary_divergences(v=case.student_np.shape[1]))
    student = case.student()
    values = divergence.per_token(student, student.detach().clone(), case.token_ids)
    tolerance = _tolerance(case.dtype)
    torch.testing.assert_close(values, torch.zeros_like(values), rtol=0, atol=tolerance)
    values.sum().backward()
    _assert_masked_entries_get_no_gradient(case, student.grad)
    # A minimum: the gradient vanishes too (up to round-off, which grows with 1/temperature).
    grad = student.grad.to(torch.float64)
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=tolerance / divergence.temperature)


@settings(max_examples=100, deadline=None)
@given(st.data(), st.sampled_from([1e-3, 0.1, 1.0]))
def test_clipped_vocabulary_divergences_never_exceed_the_unclipped_value(
    data: st.DataObject, clip: float
) -> None:
    """Each term is capped, not the sum, so a clipped value may be negative: only `<=` is pinned."""
    case = data.draw(logit_cases())
    clipped = data.draw(vocabulary_divergences(v=case.student_np.shape[1], clip=clip))
    unclipped = _clone_divergence(clipped, clip=None)
    student = case.student()
    values = clipped.per_token(student, case.teacher(), case.token_ids)
    reference = unclipped.per_token(student.detach(), case.teacher(), case.token_ids)
    assert torch.isfinite(values).all(), values
    assert (values <= reference + _tolerance(case.dtype)).all(), (values, reference)
    same = clipped.per_token(student.detach(), student.detach().clone(), case.token_ids)
    torch.testing.assert_close(same, torch.zeros_like(same), rtol=0, atol=_tolerance(case.dtype))
    values.sum().backward()
    _assert_masked_entries_get_no_gradient(case, student.grad)


@settings(max_examples=150, deadline=None)
@given(logit_cases(), st.sampled_from(TEMPERATURES), st.none() | st.sampled_from([1e-2, 1.0, 10.0]))
def test_sampled_token_is_finite_bounded_by_clip_and_zero_for_identical(
    case: LogitCase, temperature: float, clip: float | None
) -> None:
    """A single-sample estimate `log pS(ŷ) − log pT(ŷ)`: negative per token is fine, so no `>= 0` here."""
    divergence = SampledToken(temperature=temperature, clip=clip)
    student = case.student()
    values = divergence.per_token(student, case.teacher(), case.token_ids)
    assert torch.isfinite(values).all(), values
    if clip is not None:
        assert (values.abs() <= clip).all(), values
    values.sum().backward()
    _assert_masked_entries_get_no_gradient(case, student.grad)

    student = case.student()
    same = divergence.per_token(student, student.detach().clone(), case.token_ids)
    assert (same == 0).all(), same
    same.sum().backward()
    assert (student.grad == 0).all(), student.grad


@settings(max_examples=100, deadline=None)
@given(logit_cases(), st.sampled_from(TEMPERATURES))
def test_sampled_token_expectation_under_the_student_is_reverse_kl(
    case: LogitCase, temperature: float
) -> None:
    """Σ_y pS(y)·value(y) = KL(S‖T) >= 0, and Σ_y pS(y)·∇value(y) = ∇KL(S‖T): the estimator is unbiased
    in value and gradient (the policy-gradient identity). Checked in float64 against ReverseKL."""
    case = LogitCase(case.student_np, case.teacher_np, case.token_ids.numpy(), torch.float64)
    n, v = case.student_np.shape
    student = case.student()
    teacher = case.teacher()
    # Every row paired with every token y of the vocabulary, weighted by the (fixed) pS(y).
    tokens = torch.arange(v).repeat(n)
    values = SampledToken(temperature=temperature).per_token(
        student.repeat_interleave(v, dim=0), teacher.repeat_interleave(v, dim=0), tokens
    )
    weights = torch.softmax(student.detach() / temperature, dim=-1)
    expectation = (weights * values.view(n, v)).sum(dim=-1)
    (expectation_grad,) = torch.autograd.grad(expectation.sum(), student)

    student_again = case.student()
    reverse_kl = ReverseKL(temperature=temperature).per_token(student_again, teacher, case.token_ids)
    (reverse_kl_grad,) = torch.autograd.grad(reverse_kl.sum(), student_again)
    torch.testing.assert_close(expectation, reverse_kl.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(expectation_grad, reverse_kl_grad, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Chunked hidden-state loss
# ---------------------------------------------------------------------------------------------


class HiddenCase:
    """Hidden states [N, H], an lm_head [V, H] and an optional bias [V] with -inf entries (a mask shared by
    student and teacher, at least one finite entry)."""

    def __init__(
        self,
        student: np.ndarray,
        teacher: np.ndarray,
        weight: np.ndarray,
        bias: np.ndarray | None,
        token_ids: np.ndarray,
        dtype: torch.dtype,
    ):
        self.arrays = (student, teacher, weight, bias)
        self.token_ids = torch.from_numpy(token_ids)
        self.dtype = dtype

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Fresh (student, teacher, weight, bias) leaves; all but the teacher require grad."""
        student, teacher, weight, bias = (
            None if array is None else torch.from_numpy(array).to(self.dtype) for array in self.arrays
        )
        student.requires_grad_()
        weight.requires_grad_()
        if bias is not None:
            bias.requires_grad_()
        return student, teacher, weight, bias

    def __repr__(self) -> str:
        student, teacher, weight, bias = (None if a is None else a.tolist() for a in self.arrays)
        return (
            f"HiddenCase(student={student}, teacher={teacher}, weight={weight}, bias={bias}, "
            f"token_ids={self.token_ids.tolist()}, dtype={self.dtype})"
        )


@st.composite
def hidden_cases(
    draw: st.DrawFn, dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)
) -> HiddenCase:
    """Logits up to H·scale² ≈ 4e4 in magnitude with `scale` = 100; teachers near or far from the student."""
    n, h, v = draw(st.integers(0, 6)), draw(st.integers(1, 4)), draw(st.integers(1, 10))
    scale = draw(st.sampled_from([1.0, 100.0]))
    values = st.floats(-scale, scale) | st.sampled_from([scale, -scale])
    student = draw(arrays(np.float64, (n, h), elements=values))
    if draw(st.booleans()):
        teacher = draw(arrays(np.float64, (n, h), elements=values))
    else:
        teacher = student + 1e-2 * draw(arrays(np.float64, (n, h), elements=st.floats(-1.0, 1.0)))
    weight = draw(arrays(np.float64, (v, h), elements=values))
    bias = None
    if draw(st.booleans()):
        bias = draw(arrays(np.float64, (v,), elements=st.floats(-10.0, 10.0)))
        masked = draw(arrays(np.bool_, (v,)))
        masked[draw(st.integers(0, v - 1))] = False
        bias[masked] = -math.inf
    token_ids = draw(arrays(np.int64, (n,), elements=st.integers(0, v - 1)))
    return HiddenCase(student, teacher, weight, bias, token_ids, draw(st.sampled_from(dtypes)))


@st.composite
def any_divergences(draw: st.DrawFn, v: int) -> Divergence:
    """Every kind, clipped or not: the chunked path takes the closed form or autograd accordingly."""
    if draw(st.integers(0, 4)) == 0:
        return SampledToken(
            temperature=draw(st.sampled_from(TEMPERATURES)), clip=draw(st.none() | st.just(1.0))
        )
    return draw(vocabulary_divergences(v=v, clip=draw(st.none() | st.just(0.05))))


def _loss_and_grads(
    loss_fn: Callable[..., torch.Tensor],
    case: HiddenCase,
    divergence: Divergence,
    same_hidden: bool,
    **kwargs,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    student, teacher, weight, bias = case.tensors()
    if same_hidden:
        teacher = student.detach().clone()
    loss = loss_fn(student, teacher, weight, case.token_ids, divergence, bias=bias, **kwargs)
    params = [student, weight] + ([] if bias is None else [bias])
    return loss.detach(), list(torch.autograd.grad(loss, params))


def _chunked_kwargs(data: st.DataObject, n: int) -> dict[str, int | bool]:
    return {"chunk_size": data.draw(st.integers(1, n + 1)), "recompute": data.draw(st.booleans())}


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_chunked_matches_naive_in_float64(data: st.DataObject) -> None:
    case = data.draw(hidden_cases(dtypes=(torch.float64,)))
    divergence = data.draw(any_divergences(v=case.arrays[2].shape[0]))
    kwargs = _chunked_kwargs(data, case.arrays[0].shape[0])
    value, grads = _loss_and_grads(chunked_divergence_sum, case, divergence, False, **kwargs)
    expected, expected_grads = _loss_and_grads(naive_divergence_sum, case, divergence, False)
    assert torch.isfinite(value), value
    # Absolute round-off follows the magnitudes, not the result: SampledToken's gradient is A·∇log pS(ŷ)
    # with |A| up to the logit range, so a ∇log pS(ŷ) that cancels to ~0 is still off by ~eps·|A|·|W|
    # (found by hypothesis: a 1.4e-9 difference on a ~0 gradient entry with |A| ≈ 9e3, |W| = 78).
    student, teacher, weight, bias = case.arrays
    hidden_max = max(1.0, float(np.abs(student).max(initial=0.0)), float(np.abs(teacher).max(initial=0.0)))
    weight_max = max(1.0, float(np.abs(weight).max()))
    finite_bias = 0.0 if bias is None else float(np.abs(bias[np.isfinite(bias)]).max())
    logit_range = 1.0 + (student.shape[1] * hidden_max * weight_max + finite_bias) / divergence.temperature
    atol = 1e-13 * logit_range * max(1, student.shape[0])
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=atol)
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.isfinite(got).all(), got
        torch.testing.assert_close(got, want, rtol=1e-7, atol=atol * hidden_max * weight_max)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_chunked_is_nonnegative_and_finite(data: st.DataObject) -> None:
    case = data.draw(hidden_cases())
    divergence = data.draw(vocabulary_divergences(v=case.arrays[2].shape[0]))
    n = case.arrays[0].shape[0]
    value, grads = _loss_and_grads(
        chunked_divergence_sum, case, divergence, False, **_chunked_kwargs(data, n)
    )
    assert torch.isfinite(value), value
    assert value >= -n * _tolerance(case.dtype), value
    for grad in grads:
        assert torch.isfinite(grad).all(), grad


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_chunked_is_zero_with_zero_gradient_for_identical_hidden_states(data: st.DataObject) -> None:
    case = data.draw(hidden_cases())
    divergence = data.draw(any_divergences(v=case.arrays[2].shape[0]))
    n = case.arrays[0].shape[0]
    value, grads = _loss_and_grads(chunked_divergence_sum, case, divergence, True, **_chunked_kwargs(data, n))
    tolerance = n * _tolerance(case.dtype)
    torch.testing.assert_close(value, torch.zeros_like(value), rtol=0, atol=tolerance)
    # d/dlogits is ~0; the chain rule scales it by up to H·scale (hidden and weight magnitudes).
    student, _, weight, _ = case.arrays
    scale = max(1.0, float(np.abs(student).max(initial=0.0)), float(np.abs(weight).max(initial=0.0)))
    grad_tolerance = tolerance * scale * student.shape[1] / divergence.temperature
    for grad in grads:
        assert torch.isfinite(grad).all(), grad
        torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=grad_tolerance)
