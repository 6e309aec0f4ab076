"""The distillation objective from hidden states chunk by chunk, never holding `N × V` logits at once.

`chunked_objective_sum` takes the final hidden states of the student and the teacher and the lm_head
weight(s), and forms fp32 logits for `chunk_size` positions at a time. Peak memory is O(chunk_size × V)
instead of O(N × V); `objective_sum` (objectives/objective.py) on `full_logits` is the one-go reference with
the same numbers. Token weights and diagnostics are computed per chunk (the kernel, with its gradients, is
`objectives/chunked_kernel.py`). `chunked_divergence_sum` / `naive_divergence_sum` are the unweighted sums.
The chunked sum chooses its own dtypes: an outer autocast (Lightning's `*-mixed` precision)
is switched off inside it, forward and backward, so it gives the same numbers with or without one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from opsd_lightning.objectives.chunked_kernel import ChunkedObjectiveSum, ChunkObjective, compute_dtype
from opsd_lightning.objectives.diagnostics import TokenDiagnostics
from opsd_lightning.objectives.divergences import Divergence
from opsd_lightning.objectives.objective import ObjectiveSum
from opsd_lightning.objectives.weighting import TokenFeatures, TokenWeighting

__all__ = [
    "chunked_divergence_sum",
    "chunked_objective_sum",
    "full_logits",
    "naive_divergence_sum",
]


def _validate(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor | None,
    bias: Tensor | None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
) -> None:
    """Same N and V for both models; the teacher's hidden size may differ when it has its own head."""
    if (
        student_hidden.dim() != 2
        or teacher_hidden.dim() != 2
        or student_hidden.shape[0] != teacher_hidden.shape[0]
    ):
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden {tuple(teacher_hidden.shape)} "
            "must be [N, H] and [N, H_T] with the same N"
        )
    if weight.dim() != 2 or weight.shape[1] != student_hidden.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [V, H] with H = {student_hidden.shape[1]}")
    if token_ids is not None and token_ids.shape != student_hidden.shape[:1]:
        raise ValueError(f"token_ids {tuple(token_ids.shape)} must be [N] with N = {student_hidden.shape[0]}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias {tuple(bias.shape)} must be [V] with V = {weight.shape[0]}")
    head = weight if teacher_weight is None else teacher_weight
    expected = (weight.shape[0], teacher_hidden.shape[1])
    if head.dim() != 2 or tuple(head.shape) != expected:
        name = "weight" if teacher_weight is None else "teacher_weight"
        raise ValueError(
            f"{name} {tuple(head.shape)} must be [V, H_T] = {expected} to score teacher_hidden "
            f"{tuple(teacher_hidden.shape)} (a teacher of another hidden size needs its own teacher_weight)"
        )
    if teacher_bias is not None and teacher_bias.shape != weight.shape[:1]:
        raise ValueError(f"teacher_bias {tuple(teacher_bias.shape)} must be [V] with V = {weight.shape[0]}")


def chunked_objective_sum(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    divergence: Divergence,
    weighting: TokenWeighting | None = None,
    features: TokenFeatures | None = None,
    diagnostics: bool = False,
    chunk_size: int = 1024,
    bias: Tensor | None = None,
    recompute: bool = False,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
) -> ObjectiveSum:
    """`objective_sum` on logits `hidden · weightᵀ + bias`, formed a chunk of positions at a time.

    `student_hidden` is [N, H], `teacher_hidden` [N, H_T], `weight` the lm_head's [V, H], `token_ids` [N].
    Logits are formed in at least float32 for `chunk_size` positions at a time and reduced at once, so
    peak memory is O(chunk_size × V). Gradients reach `student_hidden`, `weight` and `bias` (where they
    require grad), never the teacher, and come back in their dtypes. By default they are computed during
    forward, as fused kernels do: the logits are formed once, and the grads (as large as `student_hidden`
    and `weight`) are held until backward. `recompute=True` holds nothing but the inputs and forms every
    chunk's logits again in backward: one more pass of lm_head matmuls. A second backward through a
    retained graph recomputes in either mode. Not twice differentiable.

    `teacher_weight` [V, H_T] / `teacher_bias`: the teacher's own lm_head when it is not the student's (a
    frozen copy after a full fine-tune moved the student's head, or a separate teacher model, whose hidden
    size may differ); default: the student's. `weighting`, `features` and `diagnostics` as in
    `objective_sum`, computed per chunk. The loss sum is a scalar in the compute dtype (float32 or 64)."""
    if chunk_size < 1:
        raise ValueError(f"loss.chunk_size must be >= 1, got {chunk_size}")
    _validate(student_hidden, teacher_hidden, weight, token_ids, bias, teacher_weight, teacher_bias)
    grad_enabled = torch.is_grad_enabled()
    needs_grad = (
        grad_enabled and student_hidden.requires_grad,
        grad_enabled and weight.requires_grad,
        grad_enabled and bias is not None and bias.requires_grad,
    )
    diagnostics_out: list[TokenDiagnostics | None] = []
    loss_sum = ChunkedObjectiveSum.apply(
        student_hidden,
        teacher_hidden,
        weight,
        bias,
        None if teacher_weight is None else teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        token_ids,
        ChunkObjective(divergence, weighting, features, diagnostics),
        chunk_size,
        needs_grad,
        recompute,
        diagnostics_out,
    )
    summary = diagnostics_out[0]
    if diagnostics and summary is None:  # no tokens, so no chunk
        summary = TokenDiagnostics.empty(student_hidden.device)
    return ObjectiveSum(loss_sum, summary)


def chunked_divergence_sum(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    divergence: Divergence,
    chunk_size: int = 1024,
    bias: Tensor | None = None,
    recompute: bool = False,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
) -> Tensor:
    """Σ over the N positions of `divergence.per_token`, chunk by chunk: `chunked_objective_sum` without
    weights or diagnostics (see there for the arguments)."""
    return chunked_objective_sum(
        student_hidden,
        teacher_hidden,
        weight,
        token_ids,
        divergence,
        chunk_size=chunk_size,
        bias=bias,
        recompute=recompute,
        teacher_weight=teacher_weight,
        teacher_bias=teacher_bias,
    ).loss_sum


def full_logits(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The [N, V] logits of both models at once in the compute dtype (the teacher's without grad): the
    full-logits reference for tests and benches."""
    _validate(student_hidden, teacher_hidden, weight, None, bias, teacher_weight, teacher_bias)
    dtype = compute_dtype(student_hidden, teacher_hidden, weight, bias)
    if teacher_weight is None:
        teacher_weight, teacher_bias = weight, bias
    student_logits = F.linear(
        student_hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    )
    with torch.no_grad():
        teacher_logits = F.linear(
            teacher_hidden.to(dtype),
            teacher_weight.to(dtype),
            None if teacher_bias is None else teacher_bias.to(dtype),
        )
    return student_logits, teacher_logits


def naive_divergence_sum(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    divergence: Divergence,
    bias: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
) -> Tensor:
    """The same sum with full [N, V] logits for both models at once: the reference for tests and benches."""
    _validate(student_hidden, teacher_hidden, weight, token_ids, bias, teacher_weight, teacher_bias)
    logits = full_logits(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias)
    return divergence.per_token(*logits, token_ids).sum()
