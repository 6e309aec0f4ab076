"""Option ranges are checked once, by the settings objects the modules build; the pre-flight check builds
those same objects from the resolved config, so it reports exactly what the module would, before loading."""

from __future__ import annotations

import re

import pytest
from hydra.errors import InstantiationException

from tests.cli.test_configs import compose_train
from tests.conftest import build_small_tiny, policy_module


def fails_before_loading(overrides: list[str], tmp_path, monkeypatch) -> str:
    """The message `train()` stops with, asserting that no datamodule or model was built first."""
    from opsd_lightning.cli import train as train_module

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model or datamodule was loaded before the bad option was reported")

    monkeypatch.setattr(train_module, "instantiate_datamodule", must_not_load)
    monkeypatch.setattr(train_module, "build_model", must_not_load)
    with pytest.raises((ValueError, InstantiationException)) as caught:
        train_module.train(compose_train(overrides, tmp_path))
    return str(caught.value)


GRPO_OPTIONS = [  # (option, bad value, the message as a regex: it names the option the user set)
    ("group_size", 1, r"algorithm\.group_size=1"),
    ("clip", 1.5, r"algorithm\.clip=1\.5 must be in \(0, 1\)"),
    # The KL term's weight: the term names itself and the recipe options that set a term's weight.
    ("kl_coef", -0.1, r"KLToReference's weight=-0\.1 must be >= 0 .*algorithm\.kl_coef"),
]


def grpo_module(loaded, group_size: int = 4, clip: float = 0.2, kl_coef: float = 0.0):
    """GRPO's parts (`conf/algorithm/grpo.yaml`): [ClippedPolicy, KLToReference] on group rollouts."""
    from opsd_lightning.objectives import ClippedPolicy, KLToReference
    from opsd_lightning.rollout.samplers import GroupSampler

    terms = [ClippedPolicy(clip=clip), KLToReference(weight=kl_coef)]
    return policy_module(loaded, terms, GroupSampler(group_size=group_size))


@pytest.mark.parametrize(("name", "value", "message"), GRPO_OPTIONS, ids=["group_size", "clip", "kl_coef"])
def test_grpo_options_fail_early_with_the_modules_own_message(name, value, message, tmp_path, monkeypatch):
    early = fails_before_loading(["algorithm=grpo", f"algorithm.{name}={value}"], tmp_path, monkeypatch)
    with pytest.raises(ValueError) as late:
        grpo_module(build_small_tiny(), **{name: value})
    assert str(late.value) == early  # one message, written once
    assert len(re.findall(message, early)) == 1 or pytest.fail(early)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["teacher_context=reason_first", "+teacher_context.rationale_sampling.top_p=0"],
            r"teacher_context.rationale_sampling.top_p=0 must be in \(0, 1\]",
        ),
        (["algorithm.sampling.top_k=-1"], "algorithm.sampling.top_k=-1 must be >= 0"),
        (["evaluation.sampling.max_new_tokens=0"], "evaluation.sampling.max_new_tokens=0 must be >= 1"),
        (["algorithm.loss.backend=dense"], "algorithm.loss.backend='dense'"),
        (
            ["algorithm.accumulate_grad_batches=1.5"],
            "algorithm.accumulate_grad_batches=1.5 must be an integer",
        ),
    ],
    ids=["rationale_sampling", "sampling", "evaluation", "loss", "accumulate"],
)
def test_nested_options_are_named_by_their_full_path(overrides, message, tmp_path, monkeypatch):
    assert re.search(message, fails_before_loading(overrides, tmp_path, monkeypatch))


def test_sft_checks_only_the_options_it_has(tmp_path):
    from opsd_lightning.cli.checks import check_config

    check_config(compose_train(["algorithm=sft"], tmp_path))  # no sampling to check, nothing raised


def test_a_user_algorithm_without_check_options_is_not_checked_by_us(tmp_path):
    from omegaconf import open_dict

    from opsd_lightning.cli.checks import check_config

    cfg = compose_train([], tmp_path)
    with open_dict(cfg):
        cfg.algorithm._target_ = "lightning.LightningModule"
    check_config(cfg)


def test_rollout_options_fail_before_anything_is_loaded(tmp_path, monkeypatch):
    # With vLLM installed the range error; without it, the error naming the extra: both before any loading.
    message = fails_before_loading(["rollout=vllm", "rollout.max_num_seqs=0"], tmp_path, monkeypatch)
    assert "rollout.max_num_seqs=0 must be >= 1" in message or "rollout=vllm needs vLLM" in message


@pytest.mark.parametrize(
    "strategy",
    [
        ["+trainer.strategy=deepspeed_stage_3"],
        [
            "+trainer.strategy._target_=lightning.pytorch.strategies.DeepSpeedStrategy",
            "+trainer.strategy.stage=3",
        ],
    ],
)
def test_zero3_with_vllm_is_refused_before_anything_is_loaded(strategy, tmp_path, monkeypatch):
    message = fails_before_loading(["rollout=vllm", "trainer=gpu", *strategy], tmp_path, monkeypatch)
    if "rollout=vllm needs vLLM" in message:  # without vLLM the engine's own refusal comes first
        return
    assert "(DeepSpeed ZeRO-3) with rollout=vllm" in message and "trainer=fsdp" in message


def test_zero2_with_vllm_gets_the_training_modules_refusal(tmp_path, monkeypatch):
    message = fails_before_loading(
        ["rollout=vllm", "trainer=gpu", "+trainer.strategy=deepspeed_stage_2"], tmp_path, monkeypatch
    )
    assert "DeepSpeed keeps gradients" in message or "rollout=vllm needs vLLM" in message
