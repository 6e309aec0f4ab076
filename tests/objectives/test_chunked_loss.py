"""Pin the chunked hidden-state loss against the one-go full-logits reference, value and gradients."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from opsd_lightning.objectives.chunked import chunked_divergence_sum, naive_divergence_sum
from opsd_lightning.objectives.divergences import (
    Divergence,
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    SampledToken,
    TopK,
)
from opsd_lightning.objectives.settings import LossSettings

H, V = 8, 50
CHUNK = 4  # divides none of the N below
TEMPERATURE = 0.7

DIVERGENCES: dict[str, Callable[[], Divergence]] = {
    "forward_kl": lambda: ForwardKL(temperature=TEMPERATURE),
    "reverse_kl": lambda: ReverseKL(temperature=TEMPERATURE),
    "jsd_0.1": lambda: GeneralizedJSD(beta=0.1, temperature=TEMPERATURE),
    "jsd_0.5": lambda: GeneralizedJSD(beta=0.5, temperature=TEMPERATURE),
    "jsd_0.9": lambda: GeneralizedJSD(beta=0.9, temperature=TEMPERATURE),
    # β = 0 and 1 are forward and reverse KL by definition (their own branches in the closed form).
    "jsd_0": lambda: GeneralizedJSD(beta=0.0, temperature=TEMPERATURE),
    "jsd_1": lambda: GeneralizedJSD(beta=1.0, temperature=TEMPERATURE),
    "topk5_forward_kl": lambda: TopK(ForwardKL(temperature=TEMPERATURE), k=5),
    "sampled_token": lambda: SampledToken(temperature=TEMPERATURE),
    # Clip values small enough that some terms (or advantages) are actually capped on this data.
    "forward_kl_clip": lambda: ForwardKL(temperature=TEMPERATURE, clip=0.02),
    "jsd_0.5_clip": lambda: GeneralizedJSD(beta=0.5, temperature=TEMPERATURE, clip=0.005),
    "topk5_reverse_kl_clip": lambda: TopK(ReverseKL(temperature=TEMPERATURE, clip=0.05), k=5),
    "sampled_token_clip": lambda: SampledToken(temperature=TEMPERATURE, clip=0.5),
}


def _inputs(
    n: int, dtype: torch.dtype = torch.float32, h: int = H, v: int = V, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(student_hidden, teacher_hidden, weight, token_ids); hidden and weight require grad."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(n, h, generator=generator)
    # A teacher close to the student, as in self-distillation, plus its own noise.
    teacher = student + 0.5 * torch.randn(n, h, generator=generator)
    weight = 0.5 * torch.randn(v, h, generator=generator)
    token_ids = torch.randint(0, v, (n,), generator=generator)
    return (
        student.to(dtype).requires_grad_(),
        teacher.to(dtype).requires_grad_(),
        weight.to(dtype).requires_grad_(),
        token_ids,
    )


def _value_and_grads(loss_fn, student, teacher, weight, token_ids, divergence, **kwargs):
    loss = loss_fn(student, teacher, weight, token_ids, divergence, **kwargs)
    grad_student, grad_teacher, grad_weight = torch.autograd.grad(
        loss, (student, teacher, weight), allow_unused=True
    )
    return loss.detach(), grad_student, grad_teacher, grad_weight


@pytest.mark.parametrize("recompute", [False, True], ids=["grad_in_forward", "recompute"])
@pytest.mark.parametrize("n", [0, 1, 7, 13])
@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_matches_full_logits_reference(name: str, n: int, recompute: bool) -> None:
    divergence = DIVERGENCES[name]()
    inputs = _inputs(n)
    expected, exp_student, exp_teacher, exp_weight = _value_and_grads(
        naive_divergence_sum, *inputs, divergence
    )
    value, grad_student, grad_teacher, grad_weight = _value_and_grads(
        chunked_divergence_sum, *inputs, divergence, chunk_size=CHUNK, recompute=recompute
    )
    assert value.dtype == torch.float32 and value.shape == ()
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_student, exp_student, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_weight, exp_weight, rtol=1e-5, atol=1e-6)
    # Gradients flow only into the student: the teacher is a fixed target.
    assert grad_teacher is None and exp_teacher is None
    if n == 0:
        assert value.item() == 0.0
        assert grad_student.shape == (0, H) and not grad_weight.any()


def test_clip_cases_actually_clip() -> None:
    """The clip cases above must differ from their unclipped forms, or they would pin nothing."""
    student, teacher, weight, token_ids = _inputs(13)
    for clipped, unclipped in [
        ("forward_kl_clip", "forward_kl"),
        ("jsd_0.5_clip", "jsd_0.5"),
        ("sampled_token_clip", "sampled_token"),
    ]:
        with torch.no_grad():
            a = naive_divergence_sum(student, teacher, weight, token_ids, DIVERGENCES[clipped]())
            b = naive_divergence_sum(student, teacher, weight, token_ids, DIVERGENCES[unclipped]())
        assert not torch.isclose(a, b), clipped


@pytest.mark.parametrize("chunk_size", [1, 13, 64])
def test_chunk_size_does_not_change_the_result(chunk_size: int) -> None:
    divergence = GeneralizedJSD(beta=0.5, temperature=TEMPERATURE)
    inputs = _inputs(13)
    expected = _value_and_grads(naive_divergence_sum, *inputs, divergence)
    got = _value_and_grads(chunked_divergence_sum, *inputs, divergence, chunk_size=chunk_size)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recompute", [False, True], ids=["grad_in_forward", "recompute"])
@pytest.mark.parametrize("name", ["forward_kl", "jsd_0.5", "topk5_forward_kl"])
def test_bias_gets_the_reference_gradient(name: str, recompute: bool) -> None:
    student, teacher, weight, token_ids = _inputs(7)
    bias = (0.3 * torch.randn(V, generator=torch.Generator().manual_seed(1))).requires_grad_()
    divergence = DIVERGENCES[name]()
    params = (student, weight, bias)
    expected = naive_divergence_sum(student, teacher, weight, token_ids, divergence, bias=bias)
    expected_grads = torch.autograd.grad(expected, params)
    value = chunked_divergence_sum(
        student, teacher, weight, token_ids, divergence, chunk_size=CHUNK, bias=bias, recompute=recompute
    )
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(value, params), expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recompute", [False, True], ids=["grad_in_forward", "recompute"])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd_0.5", "jsd_0.5_clip", "topk5_forward_kl"])
def test_gradcheck_float64(name: str, recompute: bool) -> None:
    # Only w.r.t. the student's hidden states: weight and bias also move the teacher's logits, which the
    # loss treats as a fixed target, so their grads are pinned against the reference above instead.
    # SampledToken is left out on purpose: its gradient is the policy-gradient surrogate's, not its value's.
    student, teacher, weight, token_ids = _inputs(5, dtype=torch.float64, h=3, v=7)
    bias = torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    divergence = DIVERGENCES[name]()

    def loss(student_hidden: torch.Tensor) -> torch.Tensor:
        return chunked_divergence_sum(
            student_hidden,
            teacher,
            weight.detach(),
            token_ids,
            divergence,
            chunk_size=2,
            bias=bias,
            recompute=recompute,
        )

    assert loss(student).dtype == torch.float64
    assert torch.autograd.gradcheck(loss, (student,), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_give_a_float32_result(dtype: torch.dtype) -> None:
    divergence = GeneralizedJSD(beta=0.5, temperature=TEMPERATURE)
    inputs = _inputs(13, dtype=dtype)
    expected, exp_student, _, exp_weight = _value_and_grads(naive_divergence_sum, *inputs, divergence)
    value, grad_student, _, grad_weight = _value_and_grads(
        chunked_divergence_sum, *inputs, divergence, chunk_size=CHUNK
    )
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    # Grads come back in the inputs' dtype (rounded from the same fp32 numbers).
    assert grad_student.dtype == dtype and grad_weight.dtype == dtype
    torch.testing.assert_close(grad_student, exp_student)
    torch.testing.assert_close(grad_weight, exp_weight)


def test_only_what_requires_grad_gets_grad() -> None:
    student, teacher, weight, token_ids = _inputs(7)
    frozen_weight = weight.detach()
    loss = chunked_divergence_sum(student, teacher, frozen_weight, token_ids, ForwardKL(), chunk_size=CHUNK)
    loss.backward()
    assert student.grad is not None and teacher.grad is None and frozen_weight.grad is None
    with torch.no_grad():
        value = chunked_divergence_sum(student, teacher, weight, token_ids, ForwardKL(), chunk_size=CHUNK)
    assert value.grad_fn is None
    torch.testing.assert_close(value, loss.detach())


def test_grad_output_scales_the_gradient() -> None:
    student, teacher, weight, token_ids = _inputs(7)
    divergence = ForwardKL(temperature=TEMPERATURE)
    (once,) = torch.autograd.grad(
        chunked_divergence_sum(student, teacher, weight, token_ids, divergence), student
    )
    scaled = 2.5 * chunked_divergence_sum(student, teacher, weight, token_ids, divergence)
    (twice,) = torch.autograd.grad(scaled, student)
    torch.testing.assert_close(twice, 2.5 * once)


@pytest.mark.parametrize("recompute", [False, True], ids=["grad_in_forward", "recompute"])
def test_second_backward_through_a_retained_graph(recompute: bool) -> None:
    student, teacher, weight, token_ids = _inputs(7)
    loss = chunked_divergence_sum(
        student, teacher, weight, token_ids, ForwardKL(), chunk_size=CHUNK, recompute=recompute
    )
    first = torch.autograd.grad(loss, (student, weight), retain_graph=True)
    second = torch.autograd.grad(loss, (student, weight))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["forward_kl", "jsd_0.5", "topk5_forward_kl", "sampled_token"])
def test_inputs_are_not_modified(name: str) -> None:
    inputs = _inputs(7)
    before = [tensor.detach().clone() for tensor in inputs]
    chunked_divergence_sum(*inputs, DIVERGENCES[name](), chunk_size=CHUNK).backward()
    for tensor, copy in zip(inputs, before, strict=True):
        assert torch.equal(tensor, copy)


@pytest.mark.parametrize("chunk_size", [0, -1])
def test_bad_chunk_size_is_rejected(chunk_size: int) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_divergence_sum(*_inputs(3), ForwardKL(), chunk_size=chunk_size)


def test_mismatched_shapes_are_rejected() -> None:
    student, teacher, weight, token_ids = _inputs(3)
    with pytest.raises(ValueError, match="teacher_hidden"):
        chunked_divergence_sum(student, teacher[:2], weight, token_ids, ForwardKL())
    with pytest.raises(ValueError, match="token_ids"):
        chunked_divergence_sum(student, teacher, weight, token_ids[:2], ForwardKL())


@pytest.mark.parametrize("name", ["forward_kl", "jsd_0.5_clip", "topk5_forward_kl"])
def test_a_separate_teacher_head_scores_the_teacher_and_gets_no_gradient(name):
    """A frozen teacher copy after a full fine-tune has its own lm_head: the teacher logits use it."""
    student, teacher, weight, token_ids = _inputs(9)
    teacher_weight = (weight.detach() + 0.3 * torch.randn_like(weight)).requires_grad_()
    divergence = DIVERGENCES[name]()
    chunked = chunked_divergence_sum(
        student, teacher, weight, token_ids, divergence, chunk_size=CHUNK, teacher_weight=teacher_weight
    )
    naive = naive_divergence_sum(
        student, teacher, weight, token_ids, divergence, teacher_weight=teacher_weight
    )
    same_head = chunked_divergence_sum(student, teacher, weight, token_ids, divergence, chunk_size=CHUNK)
    torch.testing.assert_close(chunked, naive, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(chunked, same_head)
    grads = torch.autograd.grad(chunked, (student, weight))
    expected = torch.autograd.grad(naive, (student, weight))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    chunked_again = chunked_divergence_sum(
        student, teacher, weight, token_ids, divergence, chunk_size=CHUNK, teacher_weight=teacher_weight
    )
    chunked_again.backward()
    assert teacher_weight.grad is None


def test_loss_settings_validate_their_options():
    with pytest.raises(ValueError, match="algorithm.loss.backend='fast': use 'chunked' or 'full_logits'"):
        LossSettings(backend="fast")
    with pytest.raises(ValueError, match="algorithm.loss.chunk_size=0"):
        LossSettings(chunk_size=0)


def test_full_logits_is_the_backend_once_called_naive():
    assert LossSettings(backend="full_logits").backend == "full_logits"
    with pytest.warns(FutureWarning, match=r"algorithm.loss.backend='naive' is deprecated.*'full_logits'"):
        alias = LossSettings(backend="naive", chunk_size=7)
    assert alias == LossSettings(backend="full_logits", chunk_size=7)


AUTOCAST_CASES = ["forward_kl", "jsd_0.5_clip", "topk5_forward_kl", "sampled_token"]


def _autocast_agrees(device: str, dtype: torch.dtype, name: str, recompute: bool) -> None:
    """The loss and its grads are the same numbers with and without an outer `dtype` autocast."""
    student, teacher, weight, token_ids = (t.to(device) for t in _inputs(13))
    student, weight = student.detach().requires_grad_(), weight.detach().requires_grad_()
    inputs = (student, teacher, weight, token_ids, DIVERGENCES[name]())
    expected = _value_and_grads(chunked_divergence_sum, *inputs, chunk_size=CHUNK, recompute=recompute)
    # Backward runs inside the autocast too, as in Lightning's training_step.
    with torch.autocast(device, dtype=dtype):
        got = _value_and_grads(chunked_divergence_sum, *inputs, chunk_size=CHUNK, recompute=recompute)
    assert got[0].dtype == torch.float32
    for a, b in zip(got, expected, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("recompute", [False, True], ids=["grad_in_forward", "recompute"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", AUTOCAST_CASES)
def test_an_outer_cpu_autocast_changes_nothing(name: str, dtype: torch.dtype, recompute: bool) -> None:
    """Lightning's `bf16-mixed` runs the loss under CPU autocast; it once crashed the chunked backward."""
    _autocast_agrees("cpu", dtype, name, recompute)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("recompute", [False, True], ids=["grad_in_forward", "recompute"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", AUTOCAST_CASES)
def test_an_outer_cuda_autocast_changes_nothing(name: str, dtype: torch.dtype, recompute: bool) -> None:
    _autocast_agrees("cuda", dtype, name, recompute)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["forward_kl", "jsd_0.5", "topk5_forward_kl", "sampled_token"])
def test_a_bf16_cuda_head_gives_float32_logits_without_a_float32_weight_copy(name):
    """On CUDA a bf16 weight is multiplied as it is with float32 results (mm's out_dtype)."""
    student, teacher, weight, token_ids = (t.cuda() for t in _inputs(37, v=500))
    weight = weight.detach().to(torch.bfloat16)
    student_bf16 = student.detach().to(torch.bfloat16).requires_grad_()
    divergence = DIVERGENCES[name]()
    loss = chunked_divergence_sum(student_bf16, teacher.to(torch.bfloat16), weight, token_ids, divergence, 8)
    (grad,) = torch.autograd.grad(loss, student_bf16)
    reference_student = student_bf16.detach().float().requires_grad_()
    reference = naive_divergence_sum(
        reference_student, teacher.to(torch.bfloat16).float(), weight.float(), token_ids, divergence
    )
    (reference_grad,) = torch.autograd.grad(reference, reference_student)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad.float(), reference_grad, rtol=2e-2, atol=2e-3)
