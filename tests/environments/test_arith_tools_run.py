"""`opsd-train data=arith_tools` end to end through the real Hydra config, on a tiny model: multi-turn
episodes with the calculator, the tool metrics logged, and the bad options refused by name."""

from __future__ import annotations

import pytest
from hydra.errors import InstantiationException

from opsd_lightning.environments.base import ArithToolsEnvironment
from opsd_lightning.rollout.multi_turn import MultiTurnSampler, environment_sampler
from opsd_lightning.rollout.samplers import GroupSampler, ReferenceSampler
from tests.cli.test_configs import compose_train
from tests.cli.test_train import TINY


def tools_run(tmp_path, *extra: str):
    return compose_train(
        [
            "data=arith_tools",
            *TINY,
            f"paths.log_dir={tmp_path}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            "++algorithm.sampling.max_new_tokens=24",
            "environment.max_tokens=32",
            "context.max_prompt_tokens=2000",
            "validate_before=false",
            *extra,
        ],
        tmp_path,
    )


def test_arith_tools_trains_end_to_end(tmp_path) -> None:
    from opsd_lightning.cli.train import train

    cfg = tools_run(tmp_path)
    assert cfg.model.tools and cfg.environment.max_turns == 4 and cfg.data.train_size == 16
    metrics = train(cfg)
    assert metrics["optimizer_steps"] == 2 and metrics["generated_tokens"] > 0
    logged = (tmp_path / "csv").rglob("metrics.csv")
    header = next(iter(logged)).read_text().splitlines()[0].split(",")
    assert {"train/tool_calls", "train/tool_errors", "train/turns"} <= set(header)


def test_bad_environment_options_are_named(tmp_path) -> None:
    from opsd_lightning.cli.train import train

    with pytest.raises((ValueError, InstantiationException), match="environment.max_turns=0"):
        train(tools_run(tmp_path, "environment.max_turns=0"))
    with pytest.raises((ValueError, InstantiationException), match="model.tools=true"):
        train(tools_run(tmp_path, "model.tools=false"))


def test_environment_sampler_follows_the_recipe() -> None:
    env = ArithToolsEnvironment()
    sampler = environment_sampler(env, GroupSampler(4, mask_truncated=True))
    assert isinstance(sampler, MultiTurnSampler) and (sampler.group_size, sampler.mask_truncated) == (4, True)
    with pytest.raises(ValueError, match="generates nothing"):
        environment_sampler(env, ReferenceSampler())
