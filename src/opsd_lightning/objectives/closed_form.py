"""Per-token values and logit gradients of the unclipped KL family in closed form.

Against autograd through `Divergence.per_token` these keep about half as many [c, V] buffers alive
(autograd saves most intermediates) and run fewer passes over them; the chunked objective uses them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from opsd_lightning.objectives.divergences import Divergence, ForwardKL, GeneralizedJSD, ReverseKL

__all__ = ["forward_kl_rows", "kl_family_rows"]


def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
    """`_log_probs`' tempered, floored log-softmax (same ops, same numbers); divides `logits` in place."""
    # One fused kernel: a logsumexp-based in-place version saves a buffer but costs two more passes.
    return torch.log_softmax(logits.div_(temperature), dim=-1).clamp_(min=torch.finfo(logits.dtype).min)


def kl_family_rows(
    divergence: Divergence, student_logits: Tensor, teacher_logits: Tensor
) -> tuple[Tensor, Tensor] | None:
    """Per-token values [c] and d values / d student_logits [c, V] for the unclipped KL family, else None.

    Overwrites both logits. Row i of the gradient is the gradient of value i alone (rows are independent),
    so a per-token weight scales its row.
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
        values = teacher_logp.sub_(student_logp).mul_(teacher_p).sum(dim=-1)
        return values, student_logp.exp_().sub_(teacher_p).div_(temperature)
    student_p = student_logp.exp()
    if beta == 1.0:
        # KL(S‖T) = Σ pS·r with r = log pS − log pT; d/dz = pS · (r − Σ pS r) / τ.
        log_ratio = student_logp.sub_(teacher_logp)
        values = (student_p * log_ratio).sum(dim=-1, keepdim=True)
        return values.squeeze(-1), log_ratio.sub_(values).mul_(student_p).div_(temperature)
    # JSD_β = β·KL(T‖M) + (1 − β)·KL(S‖M). Since d JSD / d pS = (1 − β)·log(pS / M), the softmax Jacobian
    # gives the reverse-KL form with r = (1 − β)·(log pS − log M).
    mixture_logp = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log(1.0 - beta))
    teacher_p = teacher_logp.exp()
    teacher_kl = teacher_logp.sub_(mixture_logp).mul_(teacher_p).sum(dim=-1, keepdim=True)
    log_ratio = student_logp.sub_(mixture_logp)
    del teacher_p, mixture_logp
    student_kl = (student_p * log_ratio).sum(dim=-1, keepdim=True)
    values = (beta * teacher_kl + (1.0 - beta) * student_kl).squeeze(-1)
    return values, log_ratio.sub_(student_kl).mul_(student_p).mul_((1.0 - beta) / temperature)


def forward_kl_rows(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """KL(T‖S) per token [c] at `temperature` and its logit gradient (pS − pT) / τ, [c, V].

    Leaves both logits as they are (the divergence's closed form may overwrite them afterwards).
    """
    rows = kl_family_rows(ForwardKL(temperature), student_logits.clone(), teacher_logits.clone())
    assert rows is not None  # an unclipped ForwardKL always has a closed form
    return rows
