"""A new objective term: skew forward KL, KL(p_T ‖ α·p_T + (1−α)·p_S) (DistiLLM, Ko et al., 2024).

Mixing a little of the teacher into the student's side bounds the divergence (at most −log α per token) where
the student puts almost no mass on a token the teacher likes. α=0 is forward KL; α=1 compares the teacher
with itself (0). Its recipe is `conf/algorithm/skew_kl.yaml` beside this file; from the repository root
(see docs/extending.md):

    PYTHONPATH=experiments/extending opsd-train hydra.searchpath=[file://experiments/extending/conf] \
        algorithm=skew_kl algorithm.alpha=0.2
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from opsd_lightning.contexts.batches import build_scoring_batch
from opsd_lightning.models.scoring import completion_logits
from opsd_lightning.objectives import ObjectiveTerm, TermInputs, TermSum


def skew_kl(student_logits: Tensor, teacher_logits: Tensor, alpha: float) -> Tensor:
    """KL(p_T ‖ α·p_T + (1−α)·p_S) at each position, `[N, V], [N, V] -> [N]` (fp32; grad into the student)."""
    student_logp = torch.log_softmax(student_logits.float(), dim=-1)
    teacher_logp = torch.log_softmax(teacher_logits.detach().float(), dim=-1)
    # log(α·p_T + (1−α)·p_S) without leaving log space; log 0 = -inf drops a side exactly.
    log_alpha = math.log(alpha) if alpha > 0 else -math.inf
    log_rest = math.log1p(-alpha) if alpha < 1 else -math.inf
    mixture_logp = torch.logaddexp(teacher_logp + log_alpha, student_logp + log_rest)
    return (teacher_logp.exp() * (teacher_logp - mixture_logp)).sum(dim=-1)


class SkewKL(ObjectiveTerm):
    """Σ skew KL(p_T ‖ α·p_T + (1−α)·p_S) over the supervised tokens of the rows with a teacher context.

    Args:
        alpha: the teacher's share of the mixture, in [0, 1).
        weight: the term's weight in the recipe's sum.
    """

    name = "skew_kl"  # logged as train/skew_kl
    needs_teacher = True  # the module then builds the teacher and the teacher prompts

    def __init__(self, alpha: float = 0.1, weight: float = 1.0) -> None:
        super().__init__(weight)
        if not 0 <= alpha < 1:
            raise ValueError(f"algorithm.terms: SkewKL's alpha={alpha} must be in [0, 1) (1 makes it 0)")
        self.alpha = alpha

    def forward(self, inputs: TermInputs) -> TermSum:
        episodes, mask = inputs.episodes, inputs.teacher_mask()
        completion = (episodes.completion_ids, episodes.completion_mask)
        # Same completion tokens, two prefixes: the teacher's prompt (no grad) and the student's.
        with inputs.teacher.scoring(inputs.model) as teacher:
            teacher_batch = build_scoring_batch(inputs.teacher_prompt, *completion)
            teacher_logits = completion_logits(teacher.model, teacher_batch)
        student_logits = completion_logits(inputs.model, build_scoring_batch(episodes.prompt, *completion))
        per_token = skew_kl(student_logits[mask], teacher_logits[mask], self.alpha)
        return TermSum(per_token.sum(), mask)
