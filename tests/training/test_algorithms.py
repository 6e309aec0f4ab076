"""SFT and GRPO baselines: losses on hand-built inputs, and real steps on a tiny model.

The modules here are built from the parts `conf/algorithm/grpo.yaml` and `sft.yaml` compose; a test composes
those recipes and checks that the local factories build the same parts."""

from __future__ import annotations

import functools

import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from opsd_lightning.contexts.renderer import ContextRenderer
from opsd_lightning.objectives import NLL, ClippedPolicy, KLToReference
from opsd_lightning.objectives.policy_gradient import clipped_policy_loss, group_advantages, k3_kl
from opsd_lightning.rollout.samplers import GroupSampler, ReferenceSampler
from opsd_lightning.teachers.modes import FixedTeacher
from opsd_lightning.training.module import OnPolicyModule
from tests.cli.test_configs import compose_train
from tests.conftest import policy_module
from tests.training.test_hybrid import (
    EVALUATION,
    composed_parts,
    describe,
    grade_by_parity,
    one_step,
    train_batch,
)
from tests.training.test_opsd_module import fit


def grpo_parts(group_size: int = 2, clip: float = 0.2, kl_coef: float = 0.0) -> tuple[GroupSampler, list]:
    """The sampler and the terms `conf/algorithm/grpo.yaml` builds (the tests' group size: 2)."""
    return GroupSampler(group_size=group_size), [ClippedPolicy(clip=clip), KLToReference(weight=kl_coef)]


def grpo_module(loaded, group_size: int = 2, clip: float = 0.2, kl_coef: float = 0.0, **overrides):
    """`algorithm=grpo` on `loaded`; `overrides` are the module's arguments (`micro_batch_size`, ...)."""
    sampler, terms = grpo_parts(group_size, clip, kl_coef)
    return policy_module(loaded, terms, sampler, **{"evaluation": EVALUATION, **overrides})


def sft_parts() -> tuple[ReferenceSampler, list]:
    """`conf/algorithm/sft.yaml`: the references as episodes, [NLL]."""
    return ReferenceSampler(), [NLL()]


def sft_module(loaded, **overrides):
    sampler, terms = sft_parts()
    return policy_module(loaded, terms, sampler, **overrides)


@pytest.fixture()
def mixed_rewards(monkeypatch):
    grade_by_parity(monkeypatch)


def num_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("overrides", "local"),
    [
        (["algorithm=grpo", "algorithm.group_size=2"], lambda: (*grpo_parts(), None)),
        (["algorithm=sft"], lambda: (*sft_parts(), None)),
    ],
    ids=["grpo", "sft"],
)
def test_the_local_modules_are_built_from_the_recipes_parts(overrides, local, tmp_path):
    assert describe(list(composed_parts(overrides, tmp_path))) == describe(list(local()))


# ---- closed forms ---------------------------------------------------------------------------------------
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


# ---- SFT ------------------------------------------------------------------------------------------------
def test_sft_trains_on_solution_tokens_only(fresh_tiny):
    """The summed loss equals the cross-entropy of solution+EOS tokens computed on each example alone."""
    tok, model = fresh_tiny.tokenizer, fresh_tiny.model.eval()
    contexts = ContextRenderer(tok)
    module = sft_module(fresh_tiny, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
    assert module.teacher is None  # nothing to distill: no teacher weights
    batch = {"problem": ["Ava has 3 apples.", "What is 12 + 7 in total?"], "solution": ["3 + 1 = 4", "19"]}
    result = module.micro_batch_loss(batch, 0)
    expected_sum, expected_count = 0.0, 0
    for problem, solution in zip(batch["problem"], batch["solution"], strict=True):
        prompt = contexts.student_ids(problem)
        target = tok.encode(solution, add_special_tokens=False) + [tok.eos_token_id]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1]
        expected_sum += float(
            torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="sum")
        )
        expected_count += len(target)
    assert int(result.num_tokens) == expected_count
    assert float(result.loss_sum) == pytest.approx(expected_sum, rel=1e-4)
    assert result.stats["nll"] == pytest.approx(expected_sum / expected_count, rel=1e-4)
    assert "rollout_tokens_per_s" not in result.stats  # nothing generated


# ---- GRPO -----------------------------------------------------------------------------------------------
def test_grpo_with_all_equal_rewards_leaves_the_policy_unchanged(fresh_tiny, tmp_path):
    """A random tiny model never answers correctly: every group is all-zero, every advantage is zero."""
    module = grpo_module(
        fresh_tiny, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.0)
    )
    before = {k: v.clone() for k, v in fresh_tiny.model.state_dict().items()}
    trainer = fit(module, steps=2, tmp_path=tmp_path)
    assert trainer.global_step == 2
    assert float(trainer.callback_metrics["train/reward"]) == 0.0
    assert float(trainer.callback_metrics["train/generated_tokens_total"]) > 0
    assert all(torch.equal(v, before[k]) for k, v in fresh_tiny.model.state_dict().items())


GRPO_OPTION_ERRORS = [
    ("group_size", 1, "algorithm.group_size=1 must be an integer >= 2"),
    ("clip", 1.5, r"algorithm.clip=1.5 must be in \(0, 1\)"),
    (
        "kl_coef",
        -0.1,
        r"KLToReference's weight=-0.1 must be >= 0 \(in the shipped recipes: .*algorithm.kl_coef",
    ),
]


@pytest.mark.parametrize(
    ("name", "value", "message"), GRPO_OPTION_ERRORS, ids=[e[0] for e in GRPO_OPTION_ERRORS]
)
def test_grpo_options_are_validated(fresh_tiny, tmp_path, name, value, message):
    with pytest.raises(ValueError, match=message):
        grpo_module(fresh_tiny, **{name: value})
    algorithm = compose_train(["algorithm=grpo", f"algorithm.{name}={value}"], tmp_path).algorithm
    with pytest.raises((ValueError, InstantiationException), match=message):
        OnPolicyModule.check_options(OmegaConf.to_container(algorithm, resolve=True))


@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_grpo_micro_batches_give_the_whole_batch_gradients(fresh_tiny, mixed_rewards, kl_coef):
    batch = train_batch()
    whole = one_step(grpo_module(fresh_tiny, kl_coef=kl_coef), batch)
    sliced = one_step(grpo_module(fresh_tiny, kl_coef=kl_coef, micro_batch_size=1), batch)
    assert whole["model.embed_tokens.weight"].abs().sum() > 0, "the test needs a group with a signal"
    assert whole["stats"]["reward"] == sliced["stats"]["reward"]  # the same rollouts, graded alike
    whole.pop("stats"), sliced.pop("stats")
    assert sliced.keys() == whole.keys() and len(whole) > 10
    for name, value in sliced.items():
        torch.testing.assert_close(value, whole[name], rtol=1e-4, atol=1e-6, msg=name)


def test_grpo_keeps_no_teacher_even_when_given_one(fresh_tiny):
    """No GRPO term reads a teacher: a FixedTeacher passed in (as `teacher=${teacher}` would) is dropped, not
    attached, so the model is not copied; only KL(π‖π_0) keeps a frozen copy, its reference."""
    weights = num_parameters(fresh_tiny.model)
    module = grpo_module(fresh_tiny, teacher=FixedTeacher())
    assert module.teacher is None and module.teacher_context is None and not module.needs_teacher
    assert num_parameters(module) == weights  # the student's weights, no copy
    with_kl = grpo_module(fresh_tiny, teacher=FixedTeacher(), kl_coef=0.1)
    assert with_kl.teacher is None
    assert num_parameters(with_kl) == 2 * weights  # the student and KLToReference's frozen reference
