"""A divergence loss computed from hidden states chunk by chunk, never holding `N × V` logits at once.

`chunked_divergence_sum` takes the final hidden states of the student and the teacher and the lm_head
weight, and forms fp32 logits for `chunk_size` positions at a time. Peak memory is O(chunk_size × V)
instead of O(N × V); `naive_divergence_sum` is the one-go reference with the same numbers.
Gradients w.r.t. each chunk's logits come from a closed form for the unclipped KL family and from
autograd through `per_token` otherwise; for `TopK` the student's logits are formed at the teacher's top-k
entries only. The chunked sum chooses its own dtypes: an outer autocast (Lightning's `*-mixed` precision)
is switched off inside it, forward and backward, so it gives the same numbers with or without one.
"""

from __future__ import annotations

import math
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from opsd_lightning.losses.divergences import Divergence, ForwardKL, GeneralizedJSD, ReverseKL, TopK

__all__ = ["LossSettings", "chunked_divergence_sum", "naive_divergence_sum"]


_BACKENDS = ("chunked", "full_logits")
# Old names still accepted for one release, with a FutureWarning naming the new one.
_DEPRECATED_BACKENDS = {"naive": "full_logits"}


@dataclass
class LossSettings:
    """How OPSD computes its divergence (`algorithm.loss`).

    `backend`: `chunked` (hidden states, logits `chunk_size` positions at a time: memory O(chunk × V))
    or `full_logits` (full `[tokens, V]` logits from the model for both contexts; the reference, and for
    models whose logits are not `hidden · Wᵀ + b`, e.g. soft-capped ones). `naive` is its deprecated name.
    """

    backend: str = "chunked"
    chunk_size: int = 1024

    def __post_init__(self) -> None:
        if self.backend in _DEPRECATED_BACKENDS:
            new_name = _DEPRECATED_BACKENDS[self.backend]
            warnings.warn(
                f"algorithm.loss.backend={self.backend!r} is deprecated and will be removed in the next "
                f"release: use algorithm.loss.backend={new_name!r} (the same loss)",
                FutureWarning,
                stacklevel=3,  # the caller that built the settings, past the dataclass __init__
            )
            self.backend = new_name
        if self.backend not in _BACKENDS:
            accepted = " or ".join(repr(name) for name in _BACKENDS)
            raise ValueError(f"algorithm.loss.backend={self.backend!r}: use {accepted}")
        if self.chunk_size < 1:
            raise ValueError(f"algorithm.loss.chunk_size={self.chunk_size} must be >= 1")


def _autocast_off(device: torch.device) -> AbstractContextManager:
    """No autocast on `device` in this block: under an outer bf16/fp16 autocast the logits would be rounded
    to it and clash with the float32 grad buffers (`mm(..., out=)` refuses a bf16 result)."""
    return torch.autocast(device_type=device.type, enabled=False)


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """At least float32 (bf16 logits are too coarse); float64 stays float64, e.g. for gradcheck."""
    dtype = torch.float32
    for tensor in tensors:
        if tensor is not None:
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _validate(
    student_hidden: Tensor, teacher_hidden: Tensor, weight: Tensor, token_ids: Tensor, bias: Tensor | None
) -> None:
    if student_hidden.dim() != 2 or student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden {tuple(teacher_hidden.shape)} "
            "must have the same shape [N, H]"
        )
    if weight.dim() != 2 or weight.shape[1] != student_hidden.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [V, H] with H = {student_hidden.shape[1]}")
    if token_ids.shape != student_hidden.shape[:1]:
        raise ValueError(f"token_ids {tuple(token_ids.shape)} must be [N] with N = {student_hidden.shape[0]}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias {tuple(bias.shape)} must be [V] with V = {weight.shape[0]}")


class _ChunkLogits(NamedTuple):
    """A chunk's logits over the vocabulary columns the divergence reads, and how to map them back."""

    student: Tensor  # [c, V], or [c, k] at `indices`
    teacher: Tensor
    divergence: Divergence  # what to apply to these columns
    indices: Tensor | None  # [c, k] vocabulary ids of the columns; None: all V
    weight_rows: Tensor | None  # [c, k, H] lm_head rows at `indices`


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
    divergence: Divergence,
    student_chunk: Tensor,
    teacher_chunk: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    teacher_weight: Tensor,
    teacher_bias: Tensor | None,
    dtype: torch.dtype,
) -> _ChunkLogits:
    """The chunk's student and teacher logits (in `dtype`), full width or top-k only."""
    teacher_logits = _linear(teacher_chunk, teacher_weight, teacher_bias, dtype)
    # `type is`, not isinstance: a subclass may read more than the top-k columns.
    if type(divergence) is TopK and divergence.k < weight.shape[0]:
        # Only the teacher's top-k columns are read, so the student's logits are formed there alone:
        # k dot products per position instead of a [c, V] matmul, and a k-sparse backward.
        indices = teacher_logits.topk(divergence.k, dim=-1).indices
        weight_rows = weight[indices].to(dtype)
        student_logits = torch.bmm(weight_rows, student_chunk.to(dtype).unsqueeze(-1)).squeeze(-1)
        if bias is not None:
            student_logits = student_logits + bias[indices].to(dtype)
        teacher_logits = teacher_logits.gather(-1, indices)
        return _ChunkLogits(student_logits, teacher_logits, divergence.base, indices, weight_rows)
    student_logits = _linear(student_chunk, weight, bias, dtype)
    return _ChunkLogits(student_logits, teacher_logits, divergence, None, None)


def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
    """`_log_probs`' tempered, floored log-softmax (same ops, same numbers); divides `logits` in place."""
    # One fused kernel: a logsumexp-based in-place version saves a buffer but costs two more passes.
    return torch.log_softmax(logits.div_(temperature), dim=-1).clamp_(min=torch.finfo(logits.dtype).min)


def _analytic_value_and_logit_grad(
    divergence: Divergence, student_logits: Tensor, teacher_logits: Tensor
) -> tuple[Tensor, Tensor] | None:
    """Σ values and d Σ / d student_logits in closed form for the unclipped KL family, else None.

    Overwrites both logits. Against autograd through `per_token` it keeps about half as many [c, V]
    buffers alive (autograd saves most intermediates) and runs fewer passes over them.
    """
    kind = type(divergence)  # not isinstance: a subclass may change `_terms`
    if divergence.clip is not None or kind not in (ForwardKL, ReverseKL, GeneralizedJSD):
        return None
    beta = divergence.beta if isinstance(divergence, GeneralizedJSD) else float(kind is ReverseKL)
    temperature = divergence.temperature
    student_logp = _log_softmax(student_logits, temperature)
    teacher_logp = _log_softmax(teacher_logits, temperature)
    if beta == 0.0:
        # KL(T‖S) = Σ pT (log pT − log pS); d/dz = (pS − pT) / τ.
        teacher_p = teacher_logp.exp()
        total = teacher_logp.sub_(student_logp).mul_(teacher_p).sum()
        return total, student_logp.exp_().sub_(teacher_p).div_(temperature)
    student_p = student_logp.exp()
    if beta == 1.0:
        # KL(S‖T) = Σ pS·r with r = log pS − log pT; d/dz = pS · (r − Σ pS r) / τ.
        log_ratio = student_logp.sub_(teacher_logp)
        values = (student_p * log_ratio).sum(dim=-1, keepdim=True)
        return values.sum(), log_ratio.sub_(values).mul_(student_p).div_(temperature)
    # JSD_β = β·KL(T‖M) + (1 − β)·KL(S‖M). Since d JSD / d pS = (1 − β)·log(pS / M), the softmax Jacobian
    # gives the reverse-KL form with r = (1 − β)·(log pS − log M).
    mixture_logp = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log(1.0 - beta))
    teacher_p = teacher_logp.exp()
    teacher_kl = teacher_logp.sub_(mixture_logp).mul_(teacher_p).sum(dim=-1, keepdim=True)
    log_ratio = student_logp.sub_(mixture_logp)
    del teacher_p, mixture_logp
    student_kl = (student_p * log_ratio).sum(dim=-1, keepdim=True)
    total = (beta * teacher_kl + (1.0 - beta) * student_kl).sum()
    return total, log_ratio.sub_(student_kl).mul_(student_p).mul_((1.0 - beta) / temperature)


def _value_and_logit_grad(logits: _ChunkLogits, token_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Σ per_token over the chunk and its gradient w.r.t. the chunk's student logits (may overwrite them)."""
    analytic = _analytic_value_and_logit_grad(logits.divergence, logits.student, logits.teacher)
    if analytic is not None:
        return analytic
    with torch.enable_grad():
        student_logits = logits.student.detach().requires_grad_()
        total = logits.divergence.per_token(student_logits, logits.teacher, token_ids).sum()
        (logit_grad,) = torch.autograd.grad(total, student_logits, allow_unused=True)
    if logit_grad is None:
        logit_grad = torch.zeros_like(student_logits)
    return total.detach(), logit_grad


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
    divergence: Divergence,
    chunk_size: int,
    needs_grad: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The summed divergence and, where `needs_grad` says so, its grads for (hidden, weight, bias)."""
    dtype = _compute_dtype(student_hidden, teacher_hidden, weight, bias)
    weight_c, bias_c = _compute_weight(weight, bias, dtype)
    if teacher_weight is None or teacher_weight is weight:
        teacher_weight_c, teacher_bias_c = weight_c, bias_c
    else:
        teacher_weight_c, teacher_bias_c = _compute_weight(teacher_weight, teacher_bias, dtype)
    need_hidden, need_weight, need_bias = needs_grad
    total = torch.zeros((), dtype=dtype, device=student_hidden.device)
    grad_hidden = (
        torch.zeros(student_hidden.shape, dtype=dtype, device=student_hidden.device) if need_hidden else None
    )
    grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(weight.shape[:1], dtype=dtype, device=weight.device) if need_bias else None
    with _autocast_off(student_hidden.device):
        for start in range(0, student_hidden.shape[0], chunk_size):
            end = start + chunk_size
            student_chunk = student_hidden[start:end].detach()
            teacher_chunk = teacher_hidden[start:end].detach()
            teacher_head = (teacher_weight_c, teacher_bias_c)
            logits = _chunk_logits(
                divergence, student_chunk, teacher_chunk, weight_c, bias_c, *teacher_head, dtype
            )
            if any(needs_grad):
                chunk_total, logit_grad = _value_and_logit_grad(logits, token_ids[start:end])
                grad_hidden_chunk = None if grad_hidden is None else grad_hidden[start:end]
                grads = (grad_hidden_chunk, grad_weight, grad_bias)
                _lm_head_backward(logits, logit_grad, student_chunk.to(dtype), weight_c, *grads)
                del logit_grad
            else:
                chunk_total = logits.divergence.per_token(
                    logits.student, logits.teacher, token_ids[start:end]
                ).sum()
            total += chunk_total
            # Free this chunk's [c, V] buffers before the next chunk allocates its own.
            del logits
    return total, grad_hidden, grad_weight, grad_bias


class _ChunkedDivergenceSum(torch.autograd.Function):
    """Autograd wrapper: gradients computed in forward and handed over in backward, or recomputed there."""

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
        divergence: Divergence,
        chunk_size: int,
        needs_grad: tuple[bool, bool, bool],
        recompute: bool,
    ) -> Tensor:
        ctx.divergence = divergence
        ctx.chunk_size = chunk_size
        ctx.needs_grad = needs_grad
        ctx.dtypes = (student_hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        inputs = (student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, token_ids)
        # Kept in both modes: without recompute, a second backward (retain_graph=True) recomputes.
        ctx.save_for_backward(*inputs)
        ctx.grads = None
        if recompute or not any(needs_grad):
            return _chunked_pass(*inputs, divergence, chunk_size, (False, False, False))[0]
        # One pass for value and grads: the logits are formed once instead of again in backward.
        total, *ctx.grads = _chunked_pass(*inputs, divergence, chunk_size, needs_grad)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        # Hand the forward's grads over (and drop them here) so that no [V, H] copy of them is made.
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            _, *grads = _chunked_pass(*ctx.saved_tensors, ctx.divergence, ctx.chunk_size, ctx.needs_grad)
        # In place: the buffers are this call's own.
        grad_hidden, grad_weight, grad_bias = (
            None if grad is None else grad.mul_(grad_output).to(dtype)
            for grad, dtype in zip(grads, ctx.dtypes, strict=True)
        )
        return grad_hidden, None, grad_weight, grad_bias, None, None, None, None, None, None, None


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
    """Σ over the N positions of `divergence.per_token` on logits `hidden · weightᵀ + bias`, chunk by chunk.

    `student_hidden`, `teacher_hidden` are [N, H], `weight` is the lm_head's [V, H], `token_ids` [N].
    Logits are formed in at least float32 for `chunk_size` positions at a time and reduced at once, so
    peak memory is O(chunk_size × V). Gradients reach `student_hidden`, `weight` and `bias` (where they
    require grad), never the teacher, and come back in their dtypes. By default they are computed during
    forward, as fused kernels do: the logits are formed once, and the grads (as large as `student_hidden`
    and `weight`) are held until backward. `recompute=True` holds nothing but the inputs and forms every
    chunk's logits again in backward: one more pass of lm_head matmuls. A second backward through a
    retained graph recomputes in either mode. Not twice differentiable.

    `teacher_weight` / `teacher_bias`: the teacher's own lm_head when it is not the student's (a frozen
    copy after a full fine-tune moved the student's head); default: the student's.

    Returns a scalar in the compute dtype: float32, or float64 for float64 inputs.
    """
    if chunk_size < 1:
        raise ValueError(f"loss.chunk_size must be >= 1, got {chunk_size}")
    _validate(student_hidden, teacher_hidden, weight, token_ids, bias)
    grad_enabled = torch.is_grad_enabled()
    needs_grad = (
        grad_enabled and student_hidden.requires_grad,
        grad_enabled and weight.requires_grad,
        grad_enabled and bias is not None and bias.requires_grad,
    )
    if teacher_weight is not None and teacher_weight.shape != weight.shape:
        raise ValueError(
            f"teacher_weight {tuple(teacher_weight.shape)} must match weight {tuple(weight.shape)}"
        )
    return _ChunkedDivergenceSum.apply(
        student_hidden,
        teacher_hidden,
        weight,
        bias,
        None if teacher_weight is None else teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        token_ids,
        divergence,
        chunk_size,
        needs_grad,
        recompute,
    )


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
    _validate(student_hidden, teacher_hidden, weight, token_ids, bias)
    dtype = _compute_dtype(student_hidden, teacher_hidden, weight, bias)
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
    return divergence.per_token(student_logits, teacher_logits, token_ids).sum()
