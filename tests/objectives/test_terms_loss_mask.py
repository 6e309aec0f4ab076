"""Every objective term supervises a multi-turn episode's `loss_mask` (the model's tokens), never the tool
responses and template scaffolding that `completion_mask` also holds."""

from __future__ import annotations

import torch

from opsd_lightning.objectives import NLL, ClippedPolicy, Distill, ForwardKL, KLToReference
from opsd_lightning.objectives.terms import TermInputs
from opsd_lightning.teachers.modes import DynamicTeacher
from tests.rollout.test_multi_turn import run_episodes, two_call_script


def test_every_term_supervises_the_loss_mask_only() -> None:
    loaded, contexts, _, episodes, _ = run_episodes([two_call_script(), ["\\boxed{5}<|im_end|>"]])
    model = loaded.model.eval()
    episodes.advantages = torch.tensor([1.0, -1.0])
    teacher = DynamicTeacher()
    teacher.attach(model)
    inputs = TermInputs(
        model,
        episodes,
        teacher,
        contexts.teacher_batch(episodes.problems, ["2+3=5, 5*4=20"] * 2),
        torch.tensor([True, True]),
    )
    loss_mask, completion_mask = episodes.loss_mask, episodes.completion_mask
    assert int(loss_mask.sum()) < int(completion_mask.sum())  # the episode has environment tokens
    terms = [
        Distill(ForwardKL(), diagnostics=True),
        ClippedPolicy(importance_correction=False),
        KLToReference(weight=0.1),
        NLL(),
    ]
    for term in terms:
        term.attach(model)
        result = term(inputs)
        assert torch.equal(result.mask, loss_mask), type(term).__name__
    logp = inputs.student_token_logp().detach()
    nll = NLL()(inputs).loss_sum.detach()
    torch.testing.assert_close(nll, -logp[loss_mask].sum())
    # Over completion_mask it would be larger by the environment's tokens' NLL (> 0 each).
    assert float(-logp[completion_mask].sum() - nll) > 1.0
