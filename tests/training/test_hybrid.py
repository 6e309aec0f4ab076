"""The hybrid of the verifiable reward and the self-teacher (`algorithm=hybrid`, `algorithm=ssopd`): its two
limits equal OPSD and GRPO exactly, RLSD's token weights in closed form, the self-generated context
(SSOPD) on hand-built groups, the options' errors, and real Lightning fits on the tiny model.

The modules here are built from the parts `conf/algorithm/hybrid.yaml` and `ssopd.yaml` compose (a
`GroupSampler`, [`Distill`, `ClippedPolicy`], a teacher context); a test composes those recipes and checks
that the local factories build the same parts."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from opsd_lightning.cli.checks import check_config
from opsd_lightning.contexts.teacher import OwnRolloutContext, ReferenceContext, shortest_correct
from opsd_lightning.data import ArithDataModule
from opsd_lightning.objectives import ClippedPolicy, Distill, ForwardKL, NoWeighting
from opsd_lightning.objectives.policy_gradient import group_advantages
from opsd_lightning.objectives.terms import rlsd_weights
from opsd_lightning.rollout import samplers as sampling
from opsd_lightning.rollout.core import rollout_from_token_lists
from opsd_lightning.rollout.episodes import Episodes
from opsd_lightning.rollout.samplers import GroupSampler
from opsd_lightning.training.module import OnPolicyModule
from tests.cli.test_configs import compose_train
from tests.conftest import distill_sum, opsd_module, policy_module
from tests.training.test_opsd_module import fit

EVALUATION = {"sampling": {"temperature": 0.0, "max_new_tokens": 6}, "num_samples": 1}
# The hybrid recipe's own options (`conf/algorithm/hybrid.yaml`), which its parts read; the tests' group size.
HYBRID_OPTIONS = {
    "group_size": 2,
    "clip": 0.2,
    "mode": "sum",
    "reward_weight": 1.0,
    "distill_weight": 1.0,
    "log_ratio_clip": 1.0,
    "mask_truncated": False,
    "loss": None,
    "diagnostics": True,
}


def hybrid_parts(divergence=None, weighting=None, **options) -> tuple[GroupSampler, list]:
    """The sampler and the terms `conf/algorithm/hybrid.yaml` builds from its options (default divergence
    forward KL, no token weighting, as `conf/train.yaml` composes)."""
    unknown = options.keys() - HYBRID_OPTIONS.keys()
    assert not unknown, f"not a hybrid option: {unknown}"
    o = {**HYBRID_OPTIONS, **options}
    sampler = GroupSampler(group_size=o["group_size"], mask_truncated=o["mask_truncated"])
    terms = [
        Distill(
            divergence=divergence or ForwardKL(),
            weighting=weighting or NoWeighting(),
            loss=o["loss"],
            diagnostics=o["diagnostics"],
            weight=o["distill_weight"],
        ),
        ClippedPolicy(
            clip=o["clip"], mode=o["mode"], log_ratio_clip=o["log_ratio_clip"], weight=o["reward_weight"]
        ),
    ]
    return sampler, terms


def hybrid_module(loaded, teacher_context=None, divergence=None, weighting=None, **options) -> OnPolicyModule:
    """`algorithm=hybrid` on `loaded`: the recipe's options (`HYBRID_OPTIONS`) shape its parts, the rest are
    the module's arguments (`micro_batch_size`, `teacher`, ...). The teacher reads the reference by default
    (`conf/teacher_context/reference.yaml`)."""
    recipe = {key: options.pop(key) for key in HYBRID_OPTIONS if key in options}
    sampler, terms = hybrid_parts(divergence, weighting, **recipe)
    settings = {"evaluation": EVALUATION, "teacher_context": teacher_context or ReferenceContext()}
    return policy_module(loaded, terms, sampler, **{**settings, **options})


def ssopd_module(loaded, no_correct_rollout: str = "skip", **options) -> OnPolicyModule:
    """`algorithm=ssopd`: the hybrid with reward_weight 0 and the own-rollout teacher context."""
    settings = {"reward_weight": 0.0, "distill_weight": 1.0}
    context = OwnRolloutContext(no_correct_rollout=no_correct_rollout)
    return hybrid_module(loaded, teacher_context=context, **{**settings, **options})


def grade_by_parity(monkeypatch) -> None:
    """A random tiny model never answers correctly; grade by the parity of the completion's characters
    instead, so groups hold correct and wrong rollouts (the same text always gets the same reward)."""
    monkeypatch.setattr(sampling, "extract_answer", lambda text: text)
    monkeypatch.setattr(sampling, "grade", lambda text, answer: sum(map(ord, text)) % 2 == 0)


@pytest.fixture()
def mixed_rewards(monkeypatch):
    grade_by_parity(monkeypatch)


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


def capture_episodes(module, monkeypatch) -> list[Episodes]:
    """The episodes the module's sampler returns, appended as it samples them."""
    sampled: list[Episodes] = []
    original = module.sampler.sample
    monkeypatch.setattr(
        module.sampler, "sample", lambda *a, **k: sampled.append(original(*a, **k)) or sampled[-1]
    )
    return sampled


# ---- the recipes' parts ---------------------------------------------------------------------------------
def describe(part) -> object:
    """A part's class and its options (public attributes), nested parts described alike: equal for two
    parts built with the same options."""
    if part is None or isinstance(part, bool | int | float | str) or dataclasses.is_dataclass(part):
        return part
    if isinstance(part, list | tuple):
        return [describe(item) for item in part]
    options = {k: v for k, v in vars(part).items() if not k.startswith("_") and k != "training"}
    options.update(getattr(part, "_modules", {}))
    return type(part).__name__, {name: describe(value) for name, value in sorted(options.items())}


def composed_parts(overrides: list[str], tmp_path) -> tuple:
    """The sampler, the terms and the teacher context the composed `conf/algorithm/` recipe builds."""
    algorithm = compose_train(overrides, tmp_path).algorithm
    context = algorithm.get("teacher_context")
    return (
        instantiate(algorithm.sampler),
        [instantiate(term) for term in algorithm.terms],
        instantiate(context) if context is not None else None,
    )


@pytest.mark.parametrize(
    ("recipe", "local"),
    [
        ("hybrid", lambda: (*hybrid_parts(), ReferenceContext())),
        ("ssopd", lambda: (*hybrid_parts(reward_weight=0.0), OwnRolloutContext())),
    ],
)
def test_the_local_modules_are_built_from_the_recipes_parts(recipe, local, tmp_path):
    composed = composed_parts([f"algorithm={recipe}", "algorithm.group_size=2"], tmp_path)
    assert describe(list(composed)) == describe(list(local()))


# ---- closed forms ---------------------------------------------------------------------------------------
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


# ---- the two limits -------------------------------------------------------------------------------------
def test_reward_weight_zero_is_opsd_on_the_same_rollouts(fresh_tiny):
    """OPSD on a batch whose problems are each repeated G times samples the same rollouts (same prompts,
    same seed), so the hybrid without its reward term must give the same loss and gradients."""
    batch = train_batch()
    repeated = {key: [v for v in values for _ in range(2)] for key, values in batch.items()}
    opsd = one_step(opsd_module(fresh_tiny), repeated)
    module = hybrid_module(fresh_tiny, reward_weight=0.0)
    assert [type(term) for term in module.terms] == [Distill]  # the weight-0 term is left out
    hybrid = one_step(module, batch)
    assert_same_step(hybrid, opsd)
    assert hybrid["stats"]["divergence"] == pytest.approx(float(opsd["loss_sum"] / opsd["tokens"]))
    assert "policy_loss" not in hybrid["stats"]


def test_distill_weight_zero_is_grpo(fresh_tiny, mixed_rewards):
    from tests.training.test_algorithms import grpo_module

    batch = train_batch()
    expected = one_step(grpo_module(fresh_tiny, group_size=2), batch)
    module = hybrid_module(fresh_tiny, distill_weight=0.0)
    assert module.teacher is None  # no term needs one: no teacher weights, no teacher context
    hybrid = one_step(module, batch)
    assert expected["model.embed_tokens.weight"].abs().sum() > 0, "the test needs a group with a signal"
    assert_same_step(hybrid, expected)
    assert hybrid["stats"]["reward"] == expected["stats"]["reward"]
    assert "divergence" not in hybrid["stats"]


def test_sum_mode_is_the_weighted_sum_of_its_two_limits(fresh_tiny, mixed_rewards):
    batch = train_batch()
    policy = one_step(hybrid_module(fresh_tiny, distill_weight=0.0), batch)
    distill = one_step(hybrid_module(fresh_tiny, reward_weight=0.0), batch)
    both = one_step(hybrid_module(fresh_tiny, reward_weight=0.5, distill_weight=2.0), batch)
    assert both["tokens"] == policy["tokens"] == distill["tokens"]  # the same supervised tokens
    for name in policy.keys() - {"stats", "tokens"}:
        torch.testing.assert_close(both[name], 0.5 * policy[name] + 2.0 * distill[name], msg=name)
    assert both["stats"]["policy_loss"] == pytest.approx(policy["stats"]["policy_loss"], rel=1e-6)
    assert both["stats"]["divergence"] == pytest.approx(distill["stats"]["divergence"], rel=1e-6)


def test_rlsd_loss_is_minus_the_advantage_times_the_teachers_weight(fresh_tiny, mixed_rewards, monkeypatch):
    """At ratio 1 the clipped surrogate of a token is -A·w, w from the teacher's and the student's log-prob
    of the token, each computed here on one unpadded [context | completion] sequence."""
    batch = train_batch()
    module = hybrid_module(fresh_tiny, mode="rlsd", distill_weight=0.0, log_ratio_clip=0.05)
    sampled = capture_episodes(module, monkeypatch)
    result = one_step(module, batch)
    episodes, model, contexts = sampled[0], fresh_tiny.model, module.contexts
    expected, weights = 0.0, []
    for row in range(len(episodes.rewards)):
        problem, solution = batch["problem"][row // 2], batch["solution"][row // 2]
        completion = episodes.completion_ids[row][episodes.completion_mask[row]].tolist()
        logps = []
        for prompt in (contexts.teacher_ids(problem, solution), contexts.student_ids(problem)):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
            logps.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0])
        advantage = float(episodes.advantages[row])
        weight = torch.exp(
            float(torch.sign(episodes.advantages[row])) * (logps[0] - logps[1]).clamp(-0.05, 0.05)
        )
        expected -= float((advantage * weight).sum())
        weights.extend(weight.tolist())
    assert episodes.advantages.abs().sum() > 0 and any(w != pytest.approx(1.0, abs=1e-3) for w in weights)
    # Equal lengths and advantages summing to 0 per group: without the weights the sum would be ~0.
    assert abs(expected) > 1e-3
    assert float(result["loss_sum"]) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert result["stats"]["rlsd_weight"] == pytest.approx(sum(weights) / len(weights), rel=1e-5)


# ---- the own-rollout context (SSOPD) on hand-built groups ------------------------------------------------
PROBLEMS = ["Ava has 12 apples and gets 7 more. How many?", "What is 3 + 4?"]


def hand_built_episodes(module: OnPolicyModule, monkeypatch) -> tuple[Episodes, list[int]]:
    """Two groups of 3: group 0 has correct rows 0 (long) and 2 (shorter; its ids spell `nineteen` one
    character per token, which no text encoding gives) and a wrong, shortest row 1; group 1 has none.
    The module's sampler returns them; the chosen rollout's ids are returned too."""
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
    episodes = Episodes(
        prompt=module.contexts.student_batch([p for p in PROBLEMS for _ in range(3)]),
        completion_ids=rollout.completion_ids,
        completion_mask=rollout.completion_mask,
        loss_mask=rollout.completion_mask,
        truncated=rollout.truncated,
        problems=PROBLEMS,
        solutions=[None, None],
        answers=["19", "7"],
        group_size=3,
        rewards=rewards,
        advantages=group_advantages(rewards, 3),
        generated=rollout.num_tokens,
        seconds=rollout.seconds,
    )
    monkeypatch.setattr(module.sampler, "sample", lambda batch, source, seed: episodes)
    return episodes, chosen


def unpadded(prompt, row: int) -> list[int]:
    return prompt.input_ids[row][prompt.attention_mask[row].bool()].tolist()


def test_own_rollout_context_holds_the_shortest_correct_rollouts_ids_verbatim(fresh_tiny, monkeypatch):
    module = ssopd_module(fresh_tiny, group_size=3)
    episodes, chosen = hand_built_episodes(module, monkeypatch)
    batch = {"problem": PROBLEMS, "solution": ["", ""], "answer": ["19", "7"]}  # no reference solutions
    context = module.teacher_prompts(batch, episodes, 0)
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
    assert int(result["tokens"]) == int(episodes.completion_mask[:3].sum())
    with torch.no_grad():
        alone = distill_sum(
            module,
            episodes.prompt.rows(slice(0, 3)),
            context.prompt.rows(slice(0, 3)),
            episodes.completion_ids[:3],
            episodes.completion_mask[:3],
            episodes.completion_mask[:3],
        ).loss_sum
    torch.testing.assert_close(result["loss_sum"], alone, rtol=1e-5, atol=1e-7)
    assert result["stats"]["groups_without_correct"] == 0.5


def test_a_group_without_a_correct_rollout_can_fall_back_to_the_reference(fresh_tiny, monkeypatch):
    # The hybrid (both terms) with the own-rollout context, falling back to the reference.
    context = OwnRolloutContext(no_correct_rollout="reference")
    module = hybrid_module(fresh_tiny, group_size=3, teacher_context=context)
    episodes, chosen = hand_built_episodes(module, monkeypatch)
    batch = {"problem": PROBLEMS, "solution": ["12 + 7 = 19", "3 + 4 = 7"], "answer": ["19", "7"]}
    prompts = module.teacher_prompts(batch, episodes, 0)
    assert prompts.rows.all() and prompts.stats == {"groups_without_correct": 0.5}
    assert unpadded(prompts.prompt, 0) == module.contexts.teacher_ids_spliced(PROBLEMS[0], chosen)
    assert unpadded(prompts.prompt, 5) == module.contexts.teacher_ids(PROBLEMS[1], "3 + 4 = 7")
    with pytest.raises(ValueError, match="no_correct_rollout=reference"):
        module.teacher_prompts({"problem": PROBLEMS, "answer": ["19", "7"]}, episodes, 0)


# ---- options --------------------------------------------------------------------------------------------
# (algorithm options, teacher_context=own_rollout options or None, the message, whether the preflight check
# raises it from inside Hydra's `instantiate`)
OPTION_ERRORS = {
    "no-weight": (
        {"reward_weight": 0.0, "distill_weight": 0.0},
        None,
        "algorithm.reward_weight=0 and algorithm.distill_weight=0",
        False,
    ),
    "reward-weight": (
        {"reward_weight": -1.0},
        None,
        r"ClippedPolicy's weight=-1.0 must be >= 0 \(in the shipped recipes: .*algorithm.reward_weight",
        True,
    ),
    "distill-weight": (
        {"distill_weight": -0.5},
        None,
        r"Distill's weight=-0.5 must be >= 0 \(in the shipped recipes: algorithm.distill_weight",
        True,
    ),
    "mode": ({"mode": "mix"}, None, r"algorithm.mode='mix': use one of \['sum', 'rlsd'\]", True),
    "rlsd-no-reward": (
        {"mode": "rlsd", "reward_weight": 0.0},
        None,
        "algorithm.mode=rlsd with algorithm.reward_weight=0",
        True,
    ),
    "log-ratio-clip": ({"log_ratio_clip": 0.0}, None, "algorithm.log_ratio_clip=0.0 must be > 0", True),
    "no-correct-rollout": (
        {},
        {"no_correct_rollout": "drop"},
        "teacher_context.no_correct_rollout='drop'",
        True,
    ),
    "group-size": ({"group_size": 1}, None, "algorithm.group_size=1 must be an integer >= 2", True),
    "clip": ({"clip": 1.5}, None, "algorithm.clip=1.5 must be in", True),
}


def build_with(loaded, options: dict, context: dict | None) -> OnPolicyModule:
    teacher_context = OwnRolloutContext(**context) if context is not None else None
    return hybrid_module(loaded, teacher_context=teacher_context, **options)


def preflight(options: dict, context: dict | None, tmp_path) -> None:
    """`OnPolicyModule.check_options` on the resolved `algorithm=hybrid` config with these overrides, as the
    pre-flight check calls it before any model loads."""
    overrides = ["algorithm=hybrid", *(f"algorithm.{k}={v}" for k, v in options.items())]
    if context is not None:
        overrides += [
            "teacher_context=own_rollout",
            *(f"teacher_context.{k}={v}" for k, v in context.items()),
        ]
    algorithm = compose_train(overrides, tmp_path).algorithm
    OnPolicyModule.check_options(OmegaConf.to_container(algorithm, resolve=True))


@pytest.mark.parametrize(
    ("options", "context", "message"), [case[:3] for case in OPTION_ERRORS.values()], ids=OPTION_ERRORS
)
def test_options_are_checked_on_construction_and_by_the_preflight_check(
    fresh_tiny, tmp_path, options, context, message
):
    with pytest.raises((ValueError, InstantiationException), match=message):
        preflight(options, context, tmp_path)
    with pytest.raises(ValueError, match=message):
        build_with(fresh_tiny, options, context)


@pytest.mark.parametrize(
    ("options", "context", "message"),
    [
        pytest.param(options, context, message, id=name)
        for name, (options, context, message, _) in OPTION_ERRORS.items()
    ],
)
def test_the_preflight_check_raises_the_modules_own_error(fresh_tiny, tmp_path, options, context, message):
    with pytest.raises(ValueError, match=message) as built:
        build_with(fresh_tiny, options, context)
    with pytest.raises(ValueError) as early:
        preflight(options, context, tmp_path)
    assert str(early.value) == str(built.value)  # one message, written once


def test_an_unknown_teacher_context_is_rejected_on_composition(tmp_path):
    """`teacher_context` is a config group: a context that does not exist fails before anything is built."""
    with pytest.raises(Exception, match="teacher_context") as caught:
        compose_train(["algorithm=hybrid", "teacher_context=self"], tmp_path)
    assert "own_rollout" in str(caught.value)  # the error lists the contexts there are


def test_two_teacher_contexts_at_once_are_rejected(tmp_path):
    """Was `privileged_context=own_rollout` with `reason_first=true`: two teacher contexts cannot both be."""
    cfg = compose_train(["algorithm=hybrid", "teacher_context=[own_rollout,reason_first]"], tmp_path)
    with pytest.raises(ValueError, match="selects several teacher_context configs"):
        check_config(cfg)


def test_own_rollout_with_single_rollouts_is_rejected_before_training(fresh_tiny, tmp_path):
    """The own-rollout context reads graded groups: with OPSD's single rollouts it has none, which the
    pre-flight check and the module both say before any training step."""
    message = "OwnRolloutContext reads each group's graded rollouts; SingleSampler draws one rollout"
    cfg = compose_train(["algorithm=opsd", "teacher_context=own_rollout"], tmp_path)
    with pytest.raises(ValueError, match=message):
        OnPolicyModule.check_options(OmegaConf.to_container(cfg.algorithm, resolve=True))
    with pytest.raises(ValueError, match=message):
        opsd_module(fresh_tiny, teacher_context=OwnRolloutContext())


# ---- real fits ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build",
    [
        lambda loaded: hybrid_module(loaded, mode="sum", reward_weight=1.0, distill_weight=1.0),
        ssopd_module,
    ],
    ids=["hybrid", "ssopd"],
)
def test_a_real_fit_trains_the_student_and_logs_the_hybrids_stats(fresh_tiny, tmp_path, mixed_rewards, build):
    before = {k: v.clone() for k, v in fresh_tiny.model.state_dict().items()}
    module = build(fresh_tiny)
    own_rollout = isinstance(module.teacher_context, OwnRolloutContext)
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
        "divergence",
    }
    expected |= {"groups_without_correct"} if own_rollout else {"policy_loss"}
    assert {f"train/{name}" for name in expected} <= metrics.keys()
    assert all(torch.isfinite(metrics[f"train/{name}"]) for name in expected)
    if own_rollout:  # SSOPD's reward term has weight 0: left out, not logged
        assert "train/policy_loss" not in metrics
    # Every rollout counts: 2 steps x 4 problems x 2 rollouts of at most 6 tokens.
    assert 0 < module.generated_tokens <= 2 * 4 * 2 * 6


@pytest.mark.parametrize("mode", ["sum", "rlsd"])
def test_micro_batches_give_the_whole_batch_gradients(fresh_tiny, mixed_rewards, mode):
    batch = train_batch()
    whole = one_step(hybrid_module(fresh_tiny, mode=mode), batch)
    sliced = one_step(hybrid_module(fresh_tiny, mode=mode, micro_batch_size=3), batch)
    whole.pop("stats"), sliced.pop("stats")
    assert sliced.keys() == whole.keys()
    for name in ("loss_sum", "tokens"):
        torch.testing.assert_close(sliced.pop(name), whole.pop(name), rtol=1e-4, atol=1e-6, msg=name)
    # The slices sum the same fp32 per-token gradients in another order. Entry by entry those sums cancel to
    # ~0 in places, where a relative tolerance measures the CPU's summation order (0.56 of rtol 1e-4 under
    # ATEN_CPU_CAPABILITY=default): compare the whole gradient by its norm, which a dropped or doubled slice
    # moves by a fraction of itself and reordering by ~eps32 x the number of tokens summed (~100).
    difference = torch.cat([(sliced[name] - whole[name]).flatten() for name in whole]).norm()
    scale = torch.cat([value.flatten() for value in whole.values()]).norm()
    assert difference <= 100 * torch.finfo(torch.float32).eps * scale, f"{difference / scale:.2e} of the norm"


def test_rlsd_with_the_ema_teacher_takes_the_fixed_teachers_first_step(fresh_tiny, mixed_rewards):
    """The EMA teacher swaps its weights in while the distill term's student graph is alive (RLSD scores the
    teacher after the student). It once wrote them in place, and backward failed ("modified by an inplace
    operation"). At the first step the EMA is the initial weights, so the step is the fixed teacher's."""
    from opsd_lightning.teachers.modes import EMATeacher, FixedTeacher

    batch = train_batch()
    fixed = one_step(hybrid_module(fresh_tiny, mode="rlsd", teacher=FixedTeacher()), batch)
    ema = one_step(hybrid_module(fresh_tiny, mode="rlsd", teacher=EMATeacher(decay=0.5)), batch)
    fixed.pop("stats"), ema.pop("stats")
    for name, value in fixed.items():
        torch.testing.assert_close(ema[name], value, rtol=0, atol=0, msg=name)
