"""The chunked objective's autograd kernel: logits, values and gradients one chunk of positions at a time.

`ChunkedObjectiveSum` walks the rows of the hidden states a chunk at a time: each chunk's fp32 logits are
formed from the lm_head weight(s), reduced to the objective at once and freed, so peak memory is
O(chunk_size × V). Gradients w.r.t. each chunk's logits come from a closed form for the unclipped KL family
(rows times the token weights) and from autograd through `per_token` otherwise; for `TopK` without a tail
the student's logits are formed at the teacher's top-k entries only. The lm_head's backward is done by hand.
An outer autocast (Lightning's `*-mixed` precision) is switched off inside, forward and backward, so the
kernel gives the same numbers with or without one. The public entry points are in `objectives/chunked.py`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from opsd_lightning.objectives.closed_form import forward_kl_rows, kl_family_rows
from opsd_lightning.objectives.diagnostics import TokenDiagnostics, token_diagnostics
from opsd_lightning.objectives.divergences import Divergence, TopK
from opsd_lightning.objectives.objective import token_terms, weighted_sum
from opsd_lightning.objectives.weighting import TokenFeatures, TokenWeighting


def _autocast_off(device: torch.device) -> AbstractContextManager:
    """No autocast on `device` in this block: under an outer bf16/fp16 autocast the logits would be rounded
    to it and clash with the float32 grad buffers (`mm(..., out=)` refuses a bf16 result)."""
    return torch.autocast(device_type=device.type, enabled=False)


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """At least float32 (bf16 logits are too coarse); float64 stays float64, e.g. for gradcheck."""
    dtype = torch.float32
    for tensor in tensors:
        if tensor is not None:
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


@dataclass(frozen=True)
class ChunkObjective:
    """What each chunk computes: the divergence, its token weighting, and whether to gather diagnostics."""

    divergence: Divergence
    weighting: TokenWeighting | None = None
    features: TokenFeatures | None = None
    diagnostics: bool = False

    def sparse_top_k(self, vocabulary: int) -> bool:
        """Whether a chunk may form the student's logits at the teacher's top-k columns only."""
        divergence = self.divergence
        # `type is`, not isinstance: a subclass may read more than the top-k columns. The tail needs the
        # student's full normaliser and an added forward KL its full distribution: both take the full path.
        return (
            type(divergence) is TopK
            and not divergence.tail
            and divergence.k < vocabulary
            and not (self.weighting is not None and self.weighting.adds_forward_kl)
        )


class _ChunkLogits(NamedTuple):
    """A chunk's logits over the vocabulary columns the divergence reads, and how to map them back."""

    student: Tensor  # [c, V], or [c, k] at `indices`
    teacher: Tensor
    divergence: Divergence  # what to apply to these columns
    indices: Tensor | None  # [c, k] vocabulary ids of the columns; None: all V
    weight_rows: Tensor | None  # [c, k, H] lm_head rows at `indices`
    full_student: Tensor | None  # [c, V] (no grad), when the diagnostics need it; `student` if full width
    full_teacher: Tensor  # [c, V]; `teacher` if full width


def _mm_out(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """`a @ b` of low-precision CUDA tensors with a `dtype` (float32) result, accumulated in float32."""
    try:
        return torch.mm(a, b, out_dtype=dtype)
    except (TypeError, RuntimeError, NotImplementedError):  # torch without mm's out_dtype
        return torch.mm(a, b).to(dtype)


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """`x · weightᵀ + bias` in `dtype`. A bf16/fp16 CUDA weight is multiplied as it is with a float32
    result (`out_dtype`), so no float32 copy of the [V, H] weight is ever made."""
    if weight.dtype != dtype:
        logits = _mm_out(x.to(weight.dtype), weight.T, dtype)
        return logits if bias is None else logits + bias.to(dtype)
    return F.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype))


def _chunk_logits(
    objective: ChunkObjective,
    student_chunk: Tensor,
    teacher_chunk: Tensor,
    heads: tuple[Tensor, Tensor | None, Tensor, Tensor | None],
    dtype: torch.dtype,
) -> _ChunkLogits:
    """The chunk's student and teacher logits (in `dtype`), full width or top-k only."""
    weight, bias, teacher_weight, teacher_bias = heads
    divergence = objective.divergence
    teacher_logits = _linear(teacher_chunk, teacher_weight, teacher_bias, dtype)
    if objective.sparse_top_k(weight.shape[0]):
        assert isinstance(divergence, TopK)
        # Only the teacher's top-k columns are read, so the student's logits are formed there alone:
        # k dot products per position instead of a [c, V] matmul, and a k-sparse backward.
        indices = teacher_logits.topk(divergence.k, dim=-1).indices
        weight_rows = weight[indices].to(dtype)
        student_logits = torch.bmm(weight_rows, student_chunk.to(dtype).unsqueeze(-1)).squeeze(-1)
        if bias is not None:
            student_logits = student_logits + bias[indices].to(dtype)
        full_student = _linear(student_chunk, weight, bias, dtype) if objective.diagnostics else None
        return _ChunkLogits(
            student_logits,
            teacher_logits.gather(-1, indices),
            divergence.base,
            indices,
            weight_rows,
            full_student,
            teacher_logits,
        )
    student_logits = _linear(student_chunk, weight, bias, dtype)
    return _ChunkLogits(
        student_logits, teacher_logits, divergence, None, None, student_logits, teacher_logits
    )


def _values_and_logit_grad(logits: _ChunkLogits, token_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token values [c] and the gradient of their sum w.r.t. the chunk's student logits (rows are
    independent, so row i is value i's gradient). May overwrite the logits."""
    rows = kl_family_rows(logits.divergence, logits.student, logits.teacher)
    if rows is not None:
        return rows
    with torch.enable_grad():
        student_logits = logits.student.detach().requires_grad_()
        values = logits.divergence.per_token(student_logits, logits.teacher, token_ids)
        (logit_grad,) = torch.autograd.grad(values.sum(), student_logits, allow_unused=True)
    if logit_grad is None:
        logit_grad = torch.zeros_like(student_logits)
    return values.detach(), logit_grad


class _ChunkResult(NamedTuple):
    total: Tensor
    logit_grad: Tensor | None
    diagnostics: TokenDiagnostics | None


def _chunk_objective(
    objective: ChunkObjective, logits: _ChunkLogits, token_ids: Tensor, rows: slice, need_grad: bool
) -> _ChunkResult:
    """The chunk's Σ l_i, its logit gradient (when `need_grad`) and diagnostics (when asked for)."""
    divergence = objective.divergence
    features = None if objective.features is None else objective.features.rows(rows)
    # Everything that reads the logits as they are comes first: the closed form overwrites them.
    terms = token_terms(
        logits.full_student,
        logits.full_teacher,
        divergence,
        objective.weighting,
        features,
        objective.diagnostics,
    )
    clipped = (
        logits.divergence.clipped(logits.student, logits.teacher, token_ids)
        if objective.diagnostics
        else None
    )
    forward_kl = forward_kl_grad = None
    if terms.forward_kl_weights is not None:
        assert logits.full_student is logits.student  # an added forward KL takes the full-width path
        forward_kl, forward_kl_grad = forward_kl_rows(logits.student, logits.teacher, divergence.temperature)
    if need_grad:
        values, logit_grad = _values_and_logit_grad(logits, token_ids)
        if terms.divergence_weights is not None:
            logit_grad.mul_(terms.divergence_weights.to(logit_grad.dtype).unsqueeze(-1))
        if forward_kl_grad is not None and terms.forward_kl_weights is not None:
            logit_grad.add_(forward_kl_grad.mul_(terms.forward_kl_weights.to(logit_grad.dtype).unsqueeze(-1)))
    else:
        values = logits.divergence.per_token(logits.student, logits.teacher, token_ids).detach()
        logit_grad = None
    total = weighted_sum(values, terms, forward_kl)
    summary = None
    if objective.diagnostics:
        assert terms.stats is not None and clipped is not None
        summary = token_diagnostics(terms.stats, values, clipped, terms.features)
    return _ChunkResult(total, logit_grad, summary)


def _lm_head_backward(
    logits: _ChunkLogits,
    logit_grad: Tensor,
    student_chunk: Tensor,
    weight: Tensor,
    grad_hidden: Tensor | None,
    grad_weight: Tensor | None,
    grad_bias: Tensor | None,
) -> None:
    """The lm_head's backward by hand for `logits = h · Wᵀ + b`, into the given grad buffers."""
    if logits.indices is None:
        if grad_hidden is not None:
            if weight.dtype != grad_hidden.dtype:  # bf16/fp16 CUDA weight, see `_linear`
                grad_hidden.copy_(_mm_out(logit_grad.to(weight.dtype), weight, grad_hidden.dtype))
            else:
                torch.mm(logit_grad, weight, out=grad_hidden)
        if grad_weight is not None:
            grad_weight.addmm_(logit_grad.T, student_chunk.to(grad_weight.dtype))
        if grad_bias is not None:
            grad_bias += logit_grad.sum(dim=0)
        return
    # Top-k: only the k gathered rows of W got a gradient.
    rows = logits.indices.flatten()
    if grad_hidden is not None:
        torch.bmm(logit_grad.unsqueeze(1), logits.weight_rows, out=grad_hidden.unsqueeze(1))
    # index_put_ with accumulate sums repeated rows (and is far faster than index_add_ on CPU).
    if grad_weight is not None:
        row_grads = (logit_grad.unsqueeze(-1) * student_chunk.to(logit_grad.dtype).unsqueeze(1)).flatten(0, 1)
        grad_weight.index_put_((rows,), row_grads, accumulate=True)
    if grad_bias is not None:
        grad_bias.index_put_((rows,), logit_grad.flatten(), accumulate=True)


def _compute_weight(weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """The weight the chunks multiply with: cast once (a per-chunk cast would copy [V, H] every chunk),
    except a bf16/fp16 CUDA weight, used as it is with float32 outputs (`_linear`)."""
    if weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16) and dtype == torch.float32:
        return weight.detach(), None if bias is None else bias.detach()
    return weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype)


def _chunked_pass(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    teacher_weight: Tensor | None,
    teacher_bias: Tensor | None,
    token_ids: Tensor,
    objective: ChunkObjective,
    chunk_size: int,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[Tensor, tuple[Tensor | None, Tensor | None, Tensor | None], TokenDiagnostics | None]:
    """The summed objective, its grads for (hidden, weight, bias) where `needs_grad` says so, and the
    diagnostics where the objective asks for them."""
    dtype = compute_dtype(student_hidden, teacher_hidden, weight, bias)
    weight_c, bias_c = _compute_weight(weight, bias, dtype)
    if teacher_weight is None or teacher_weight is weight:
        teacher_weight_c, teacher_bias_c = weight_c, bias_c
    else:
        teacher_weight_c, teacher_bias_c = _compute_weight(teacher_weight, teacher_bias, dtype)
    heads = (weight_c, bias_c, teacher_weight_c, teacher_bias_c)
    need_hidden, need_weight, need_bias = needs_grad
    device = student_hidden.device
    total = torch.zeros((), dtype=dtype, device=device)
    grad_hidden = torch.zeros(student_hidden.shape, dtype=dtype, device=device) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(weight.shape[:1], dtype=dtype, device=weight.device) if need_bias else None
    summary: TokenDiagnostics | None = None
    with _autocast_off(device):
        for start in range(0, student_hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            student_chunk = student_hidden[rows].detach()
            logits = _chunk_logits(objective, student_chunk, teacher_hidden[rows].detach(), heads, dtype)
            result = _chunk_objective(objective, logits, token_ids[rows], rows, any(needs_grad))
            if result.logit_grad is not None:
                grad_hidden_chunk = None if grad_hidden is None else grad_hidden[rows]
                grads = (grad_hidden_chunk, grad_weight, grad_bias)
                _lm_head_backward(logits, result.logit_grad, student_chunk.to(dtype), weight_c, *grads)
            total += result.total
            if result.diagnostics is not None:
                summary = result.diagnostics if summary is None else summary + result.diagnostics
            # Free this chunk's [c, V] buffers before the next chunk allocates its own.
            del logits, result
    return total, (grad_hidden, grad_weight, grad_bias), summary


class ChunkedObjectiveSum(torch.autograd.Function):
    """Autograd wrapper: gradients computed in forward and handed over in backward, or recomputed there.
    The diagnostics (no grad) leave through `diagnostics_out`, a list the forward appends to."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        student_hidden: Tensor,
        teacher_hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        teacher_weight: Tensor | None,
        teacher_bias: Tensor | None,
        token_ids: Tensor,
        objective: ChunkObjective,
        chunk_size: int,
        needs_grad: tuple[bool, bool, bool],
        recompute: bool,
        diagnostics_out: list,
    ) -> Tensor:
        # A backward recompute needs no diagnostics: they were gathered here.
        ctx.objective = replace(objective, diagnostics=False)
        ctx.chunk_size = chunk_size
        ctx.needs_grad = needs_grad
        ctx.dtypes = (student_hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        inputs = (student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, token_ids)
        # Kept in both modes: without recompute, a second backward (retain_graph=True) recomputes.
        ctx.save_for_backward(*inputs)
        ctx.grads = None
        if recompute or not any(needs_grad):
            total, _, summary = _chunked_pass(*inputs, objective, chunk_size, (False, False, False))
        else:
            # One pass for value and grads: the logits are formed once instead of again in backward.
            total, ctx.grads, summary = _chunked_pass(*inputs, objective, chunk_size, needs_grad)
        diagnostics_out.append(summary)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        # Hand the forward's grads over (and drop them here) so that no [V, H] copy of them is made.
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            _, grads, _ = _chunked_pass(*ctx.saved_tensors, ctx.objective, ctx.chunk_size, ctx.needs_grad)
        # In place: the buffers are this call's own.
        grad_hidden, grad_weight, grad_bias = (
            None if grad is None else grad.mul_(grad_output).to(dtype)
            for grad, dtype in zip(grads, ctx.dtypes, strict=True)
        )
        return (grad_hidden, None, grad_weight, grad_bias, *([None] * 8))
