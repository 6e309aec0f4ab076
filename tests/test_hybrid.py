"""The hybrid of the verifiable reward and the self-teacher (`algorithm=hybrid`, `algorithm=ssopd`): its two
limits equal OPSD and GRPO exactly, RLSD's token weights in closed form, the self-generated context
(SSOPD) on hand-built groups, the options' errors, and real Lightning fits on the tiny model."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from opsd_lightning.algorithms import GRPOModule, HybridModule
from opsd_lightning.algorithms import groups as group_sampling
from opsd_lightning.algorithms.groups import GroupedRollouts
from opsd_lightning.algorithms.hybrid import rlsd_weights, shortest_correct
from opsd_lightning.batches import TokenBatch
from opsd_lightning.contexts import ContextRenderer
from opsd_lightning.data import ArithDataModule
from opsd_lightning.losses import ForwardKL
from opsd_lightning.losses.policy_gradient import group_advantages
from opsd_lightning.rollout.core import rollout_from_token_lists
from opsd_lightning.teachers import FixedTeacher

from .conftest import opsd_module
from .test_opsd_module import fit

SAMPLING = {"temperature": 1.0, "max_new_tokens": 6}


def hybrid_module(loaded, **overrides) -> HybridModule:
    settings = {
        "optimizer": functools.partial(torch.optim.SGD, lr=0.1),
        "divergence": ForwardKL(),
        "teacher": FixedTeacher(),
        "sampling": SAMPLING,
        "evaluation": {"sampling": {"temperature": 0.0, "max_new_tokens": 6}, "num_samples": 1},
        "group_size": 2,
    }
    return HybridModule(
        loaded.model, loaded.tokenizer, ContextRenderer(loaded.tokenizer), **{**settings, **overrides}
    )


@pytest.fixture()
def mixed_rewards(monkeypatch):
    """A random tiny model never answers correctly; grade by the parity of the completion's characters
    instead, so groups hold correct and wrong rollouts (the same text always gets the same reward)."""
    monkeypatch.setattr(group_sampling, "extract_answer", lambda text: text)
    monkeypatch.setattr(group_sampling, "grade", lambda text, answer: sum(map(ord, text)) % 2 == 0)


def train_batch(batch_size: int = 4) -> dict:
    data = ArithDataModule(train_size=16, val_size=4, batch_size=batch_size, seed=0)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def one_step(module, batch) -> dict[str, torch.Tensor]:
    """One micro-batch's loss sum, token count and gradients (no trainer: backward by hand)."""
    module.count_generated = lambda rollout: rollout.num_tokens
    module.manual_backward = lambda loss: loss.backward()
    module.model.zero_grad(set_to_none=True)
    result = module.micro_batch_loss(batch, 0)
    if not result.backward_done:
        result.loss_sum.backward()
    out = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
    out["loss_sum"], out["tokens"] = result.loss_sum.detach(), result.num_tokens.float()
    out["stats"] = result.stats
    return out


def assert_same_step(ours: dict, theirs: dict) -> None:
    ours, theirs = dict(ours), dict(theirs)
    ours.pop("stats"), theirs.pop("stats")
    assert ours.keys() == theirs.keys() and len(ours) > 10
    for name, value in ours.items():
        torch.testing.assert_close(value, theirs[name], rtol=1e-6, atol=1e-8, msg=name)


def test_rlsd_weights_match_the_closed_form():
    advantages = torch.tensor([1.5, 1.5, -0.5, -0.5, 0.0, 2.0])
    log_ratio = torch.tensor([0.4, -3.0, 0.4, -3.0, 0.7, 2.5], requires_grad=True)
    weights = rlsd_weights(advantages, log_ratio, clip=1.0)
    # exp(sign(A) * clamp(δ, -1, 1)): a favoured token gets more credit when A > 0, less blame when A < 0.
    expected = [math.exp(0.4), math.exp(-1.0), math.exp(-0.4), math.exp(1.0), 1.0, math.exp(1.0)]
    torch.testing.assert_close(weights, torch.tensor(expected))
    torch.testing.assert_close(advantages * weights, torch.tensor(expected) * advantages)
    assert not weights.requires_grad  # stop-gradient: the teacher sets magnitudes, not a gradient path
    torch.testing.assert_close(
        rlsd_weights(advantages, log_ratio, clip=0.1)[:2], torch.exp(torch.tensor([0.1, -0.1]))
    )


def test_shortest_correct_rollout_per_group_ties_go_to_the_first():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    lengths = torch.tensor([9, 1, 4, 4, 2, 3, 5, 7, 7, 1, 2, 3])
    # shortest correct (not the shortest: row 1 is wrong), the only correct, a tie, none correct
    assert shortest_correct(rewards, lengths, group_size=3) == [2, 3, 7, None]


def test_reward_weight_zero_is_opsd_on_the_same_rollouts(fresh_tiny):
    """OPSD on a batch whose problems are each repeated G times samples the same rollouts (same prompts,
    same seed), so the hybrid without its reward term must give the same loss and gradients."""
    batch = train_batch()
    repeated = {key: [v for v in values for _ in range(2)] for key, values in batch.items()}
    opsd = one_step(opsd_module(fresh_tiny), repeated)
    hybrid = one_step(hybrid_module(fresh_tiny, reward_weight=0.0), batch)
    assert_same_step(hybrid, opsd)
    assert hybrid["stats"]["distill_loss"] == pytest.approx(float(opsd["loss_sum"] / opsd["tokens"]))


def test_distill_weight_zero_is_grpo(fresh_tiny, mixed_rewards):
    batch = train_batch()
    grpo = GRPOModule(
        fresh_tiny.model,
        fresh_tiny.tokenizer,
        ContextRenderer(fresh_tiny.tokenizer),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        group_size=2,
        sampling=SAMPLING,
    )
    expected = one_step(grpo, batch)
    hybrid = one_step(hybrid_module(fresh_tiny, distill_weight=0.0), batch)
    assert expected["model.embed_tokens.weight"].abs().sum() > 0, "the test needs a group with a signal"
    assert_same_step(hybrid, expected)
    assert hybrid["stats"]["reward"] == expected["stats"]["reward"]


def test_sum_mode_is_the_weighted_sum_of_its_two_limits(fresh_tiny, mixed_rewards):
    batch = train_batch()
    policy = one_step(hybrid_module(fresh_tiny, distill_weight=0.0), batch)
    distill = one_step(hybrid_module(fresh_tiny, reward_weight=0.0), batch)
    both = one_step(hybrid_module(fresh_tiny, reward_weight=0.5, distill_weight=2.0), batch)
    assert both["tokens"] == policy["tokens"] == distill["tokens"]  # the same supervised tokens
    for name in policy.keys() - {"stats", "tokens"}:
        torch.testing.assert_close(both[name], 0.5 * policy[name] + 2.0 * distill[name], msg=name)
    assert both["stats"]["policy_loss"] == pytest.approx(policy["stats"]["policy_loss"], rel=1e-6)
    assert both["stats"]["distill_loss"] == pytest.approx(distill["stats"]["distill_loss"], rel=1e-6)


def test_rlsd_loss_is_minus_the_advantage_times_the_teachers_weight(fresh_tiny, mixed_rewards, monkeypatch):
    """At ratio 1 the clipped surrogate of a token is -A·w, w from the teacher's and the student's log-prob
    of the token, each computed here on one unpadded [context | completion] sequence."""
    from opsd_lightning.algorithms import hybrid

    sampled = []
    original = hybrid.sample_groups
    monkeypatch.setattr(
        hybrid, "sample_groups", lambda *a, **k: sampled.append(original(*a, **k)) or sampled[0]
    )
    batch = train_batch()
    module = hybrid_module(fresh_tiny, mode="rlsd", distill_weight=0.0, log_ratio_clip=0.05)
    result = one_step(module, batch)
    groups, model, contexts = sampled[0], fresh_tiny.model, module.contexts
    expected, weights = 0.0, []
    for row in range(len(groups.rewards)):
        problem, solution = batch["problem"][row // 2], batch["solution"][row // 2]
        completion = groups.rollout.completion_ids[row][groups.rollout.completion_mask[row]].tolist()
        logps = []
        for prompt in (contexts.teacher_ids(problem, solution), contexts.student_ids(problem)):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
            logps.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0])
        advantage = float(groups.advantages[row])
        weight = torch.exp(
            float(torch.sign(groups.advantages[row])) * (logps[0] - logps[1]).clamp(-0.05, 0.05)
        )
        expected -= float((advantage * weight).sum())
        weights.extend(weight.tolist())
    assert groups.advantages.abs().sum() > 0 and any(w != pytest.approx(1.0, abs=1e-3) for w in weights)
    # Equal lengths and advantages summing to 0 per group: without the weights the sum would be ~0.
    assert abs(expected) > 1e-3
    assert float(result["loss_sum"]) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert result["stats"]["rlsd_weight"] == pytest.approx(sum(weights) / len(weights), rel=1e-5)


PROBLEMS = ["Ava has 12 apples and gets 7 more. How many?", "What is 3 + 4?"]


def hand_built_groups(module: HybridModule, monkeypatch) -> tuple[GroupedRollouts, list[int]]:
    """Two groups of 3: group 0 has correct rows 0 (long) and 2 (shorter; its ids spell `nineteen` one
    character per token, which no text encoding gives) and a wrong, shortest row 1; group 1 has none.
    `sample_groups` returns them; the chosen rollout's ids are returned too."""
    tok, eos = module.tokenizer, module.eos_ids[0]
    chosen = [tok.convert_tokens_to_ids(ch) for ch in "nineteen"]
    encode = functools.partial(tok.encode, add_special_tokens=False)
    completions = [
        encode("12 + 7 = 19, so Ava has 19 apples") + [eos],
        encode("19") + [eos],
        [*chosen, eos],
        encode("3 + 4 = 8") + [eos],
        encode("8") + [eos],
        encode("9 apples and"),  # truncated
    ]
    rollout = rollout_from_token_lists(completions, module.eos_ids, tok.pad_token_id, seconds=1.0)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    prompt = module.contexts.student_batch([p for p in PROBLEMS for _ in range(3)])
    groups = GroupedRollouts(prompt, rollout, rewards, group_advantages(rewards, 3), rollout.num_tokens, 3)
    from opsd_lightning.algorithms import hybrid

    monkeypatch.setattr(hybrid, "sample_groups", lambda *args, **kwargs: groups)
    return groups, chosen


def unpadded(prompt, row: int) -> list[int]:
    return prompt.input_ids[row][prompt.attention_mask[row].bool()].tolist()


def test_own_rollout_context_holds_the_shortest_correct_rollouts_ids_verbatim(fresh_tiny, monkeypatch):
    module = hybrid_module(fresh_tiny, group_size=3, reward_weight=0.0, privileged_context="own_rollout")
    groups, chosen = hand_built_groups(module, monkeypatch)
    batch = {"problem": PROBLEMS, "answer": ["19", "7"]}  # no reference solutions at all
    context = module.teacher_context(batch, groups, 0)
    expected = module.contexts.teacher_ids_spliced(PROBLEMS[0], chosen)
    for row in range(3):
        ids = unpadded(context.prompt, row)
        assert ids == expected
        start = next(i for i in range(len(ids)) if ids[i : i + len(chosen)] == chosen)
        assert ids[start + len(chosen)] not in module.eos_ids  # the template goes on, no EOS inside
    assert context.rows.tolist() == [True, True, True, False, False, False]
    assert context.stats == {"groups_without_correct": 0.5}

    # The skipped group's tokens leave the loss: it is the distillation of group 0's rows alone.
    result = one_step(module, batch)
    assert int(result["tokens"]) == int(groups.rollout.completion_mask[:3].sum())
    teacher_prompt = TokenBatch(context.prompt.input_ids[:3], context.prompt.attention_mask[:3])
    with torch.no_grad():
        alone = module.divergence_sum(
            groups.prompt.rows(slice(0, 3)),
            teacher_prompt.rows(slice(0, 3)),
            groups.rollout.completion_ids[:3],
            groups.rollout.completion_mask[:3],
            groups.rollout.completion_mask[:3],
        ).loss_sum
    torch.testing.assert_close(result["loss_sum"], alone, rtol=1e-5, atol=1e-7)
    assert result["stats"]["groups_without_correct"] == 0.5


def test_a_group_without_a_correct_rollout_can_fall_back_to_the_reference(fresh_tiny, monkeypatch):
    module = hybrid_module(
        fresh_tiny, group_size=3, privileged_context="own_rollout", no_correct_rollout="reference"
    )
    groups, chosen = hand_built_groups(module, monkeypatch)
    batch = {"problem": PROBLEMS, "solution": ["12 + 7 = 19", "3 + 4 = 7"], "answer": ["19", "7"]}
    context = module.teacher_context(batch, groups, 0)
    assert context.rows.all() and context.stats == {"groups_without_correct": 0.5}
    assert unpadded(context.prompt, 0) == module.contexts.teacher_ids_spliced(PROBLEMS[0], chosen)
    assert unpadded(context.prompt, 5) == module.contexts.teacher_ids(PROBLEMS[1], "3 + 4 = 7")
    with pytest.raises(ValueError, match="no_correct_rollout=reference"):
        module.teacher_context({"problem": PROBLEMS, "answer": ["19", "7"]}, groups, 0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"reward_weight": 0.0, "distill_weight": 0.0},
            "algorithm.reward_weight=0 and algorithm.distill_weight=0",
        ),
        ({"reward_weight": -1.0}, r"algorithm.reward_weight=-1.0 must be >= 0"),
        ({"distill_weight": -0.5}, r"algorithm.distill_weight=-0.5 must be >= 0"),
        ({"mode": "mix"}, r"algorithm.mode='mix': use one of \['sum', 'rlsd'\]"),
        ({"mode": "rlsd", "reward_weight": 0.0}, "algorithm.mode=rlsd with algorithm.reward_weight=0"),
        ({"log_ratio_clip": 0.0}, "algorithm.log_ratio_clip=0.0 must be > 0"),
        ({"privileged_context": "self"}, "algorithm.privileged_context='self'"),
        ({"no_correct_rollout": "drop"}, "algorithm.no_correct_rollout='drop'"),
        ({"group_size": 1}, "algorithm.group_size=1 must be an integer >= 2"),
        ({"clip": 1.5}, "algorithm.clip=1.5 must be in"),
    ],
)
def test_options_are_checked_on_construction_and_by_the_preflight_check(fresh_tiny, options, message):
    with pytest.raises(ValueError, match=message):
        HybridModule.check_options({"group_size": 2, **options})
    with pytest.raises(ValueError, match=message):
        hybrid_module(fresh_tiny, **options)


def test_own_rollout_rejects_reason_first(fresh_tiny):
    with pytest.raises(ValueError, match="algorithm.reason_first=true"):
        hybrid_module(fresh_tiny, privileged_context="own_rollout", reason_first=True)


@pytest.mark.parametrize(
    "options",
    [
        {"mode": "sum", "reward_weight": 1.0, "distill_weight": 1.0},
        {"reward_weight": 0.0, "distill_weight": 1.0, "privileged_context": "own_rollout"},  # ssopd
    ],
    ids=["hybrid", "ssopd"],
)
def test_a_real_fit_trains_the_student_and_logs_the_hybrids_stats(
    fresh_tiny, tmp_path, mixed_rewards, options
):
    before = {k: v.clone() for k, v in fresh_tiny.model.state_dict().items()}
    module = hybrid_module(fresh_tiny, **options)
    trainer = fit(module, steps=2, tmp_path=tmp_path, batch_size=4)
    assert trainer.global_step == 2
    changed = [k for k, v in fresh_tiny.model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2, "the student should move"
    metrics = trainer.callback_metrics
    expected = {
        "loss",
        "reward",
        "completion_length",
        "truncation_rate",
        "rollout_tokens_per_s",
        "distill_loss",
    }
    expected |= {"groups_without_correct"} if "privileged_context" in options else {"policy_loss"}
    assert {f"train/{name}" for name in expected} <= metrics.keys()
    assert all(torch.isfinite(metrics[f"train/{name}"]) for name in expected)
    # Every rollout counts: 2 steps x 4 problems x 2 rollouts of at most 6 tokens.
    assert 0 < module.generated_tokens <= 2 * 4 * 2 * 6


@pytest.mark.parametrize("mode", ["sum", "rlsd"])
def test_micro_batches_give_the_whole_batch_gradients(fresh_tiny, mixed_rewards, mode):
    batch = train_batch()
    whole = one_step(hybrid_module(fresh_tiny, mode=mode), batch)
    sliced = one_step(hybrid_module(fresh_tiny, mode=mode, micro_batch_size=3), batch)
    whole.pop("stats"), sliced.pop("stats")
    assert sliced.keys() == whole.keys()
    for name, value in sliced.items():
        torch.testing.assert_close(value, whole[name], rtol=1e-4, atol=1e-6, msg=name)
