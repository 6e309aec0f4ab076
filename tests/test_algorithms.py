"""SFT and GRPO baselines: losses on hand-built inputs, and real steps on a tiny model."""

from __future__ import annotations

import functools

import pytest
import torch

from opsd_lightning.algorithms import GRPOModule, SFTModule
from opsd_lightning.contexts import ContextRenderer
from opsd_lightning.losses.policy_gradient import clipped_policy_loss, group_advantages, k3_kl

from .test_opsd_module import fit


def test_group_advantages_are_normalised_per_group_and_zero_for_equal_rewards():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    advantages = group_advantages(rewards, group_size=4)
    torch.testing.assert_close(advantages[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5, rtol=0)
    assert torch.equal(advantages[4:], torch.zeros(4))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, group_size=3)


def test_clipped_objective_matches_the_closed_form():
    logp_old = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5]))
    # ratios 1.5, 1.5, 0.5, 1.0 with advantages +1, -1, -1, +2 and ε = 0.2
    logp_new = torch.log(torch.tensor([0.75, 0.75, 0.25, 0.5]))
    advantages = torch.tensor([1.0, -1.0, -1.0, 2.0])
    loss = clipped_policy_loss(logp_new, logp_old, advantages, clip=0.2)
    # -min(ρA, clip(ρ)A): -min(1.5, 1.2) = -1.2; -min(-1.5, -1.2) = 1.5; -min(-0.5, -0.8) = 0.8; -2
    torch.testing.assert_close(loss, torch.tensor([-1.2, 1.5, 0.8, -2.0]))
    # With ρ = 1 (one update per rollout batch) the gradient is the plain policy gradient -A ∇logp.
    logp = torch.tensor([-0.3, -1.2], requires_grad=True)
    clipped_policy_loss(logp, logp.detach(), torch.tensor([2.0, -1.0]), 0.2).sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-2.0, 1.0]))


def test_k3_kl_is_zero_at_equality_and_positive_otherwise():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    assert torch.equal(k3_kl(logp, logp), torch.zeros(3))
    assert (k3_kl(logp, logp + torch.tensor([0.3, -0.7, 1.0])) > 0).all()


def test_sft_trains_on_solution_tokens_only(fresh_tiny):
    """The summed loss equals the cross-entropy of solution+EOS tokens computed on each example alone."""
    tok, model = fresh_tiny.tokenizer, fresh_tiny.model.eval()
    contexts = ContextRenderer(tok)
    module = SFTModule(model, tok, contexts, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
    batch = {"problem": ["Ava has 3 apples.", "What is 12 + 7 in total?"], "solution": ["3 + 1 = 4", "19"]}
    result = module.micro_batch_loss(batch, 0)
    expected_sum, expected_count = 0.0, 0
    for problem, solution in zip(batch["problem"], batch["solution"], strict=True):
        prompt = contexts.student_ids(problem)
        target = tok.encode(solution, add_special_tokens=False) + [tok.eos_token_id]
        logits = model(input_ids=torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1]
        expected_sum += float(
            torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="sum")
        )
        expected_count += len(target)
    assert int(result.num_tokens) == expected_count
    assert float(result.loss_sum) == pytest.approx(expected_sum, rel=1e-4)


def test_grpo_with_all_equal_rewards_leaves_the_policy_unchanged(fresh_tiny, tmp_path):
    """A random tiny model never answers correctly: every group is all-zero, every advantage is zero."""
    module = GRPOModule(
        fresh_tiny.model,
        fresh_tiny.tokenizer,
        ContextRenderer(fresh_tiny.tokenizer),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.0),
        group_size=2,
        sampling={"temperature": 1.0, "max_new_tokens": 6},
        evaluation={"sampling": {"temperature": 0.0, "max_new_tokens": 6}, "num_samples": 1},
    )
    before = {k: v.clone() for k, v in fresh_tiny.model.state_dict().items()}
    trainer = fit(module, steps=2, tmp_path=tmp_path)
    assert trainer.global_step == 2
    assert float(trainer.callback_metrics["train/reward"]) == 0.0
    assert float(trainer.callback_metrics["train/generated_tokens_total"]) > 0
    assert all(torch.equal(v, before[k]) for k, v in fresh_tiny.model.state_dict().items())


def test_grpo_options_are_validated(fresh_tiny):
    make = functools.partial(
        GRPOModule,
        fresh_tiny.model,
        fresh_tiny.tokenizer,
        ContextRenderer(fresh_tiny.tokenizer),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
    )
    with pytest.raises(ValueError, match="group_size"):
        make(group_size=1)
    with pytest.raises(ValueError, match="algorithm.clip"):
        make(clip=1.5)
