"""experiments/custom_environment: a user's environment with its own tool, run through the tool path and
through `opsd-train`'s composition on the tiny model."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO_ROOT
from tests.environments.test_arith_tools_run import tools_run


@pytest.fixture()
def lengths(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "experiments" / "custom_environment"))
    import lengths_environment

    return lengths_environment


def test_the_tool_converts_and_its_errors_are_responses(lengths) -> None:
    env = lengths.LengthsEnvironment()
    call = env.toolbox.call(
        json.dumps({"name": "convert", "arguments": {"value": "3/2", "unit": "km", "to": "m"}})
    )
    assert (call.error, call.response) == (False, "1500")
    bad = env.toolbox.call(
        json.dumps({"name": "convert", "arguments": {"value": "1", "unit": "mi", "to": "m"}})
    )
    assert bad.error and "units are" in bad.response
    assert env.reward("so \\boxed{1500}", "1500") == 1.0 and env.max_turns == 3


@pytest.mark.slow  # the path is the arith_tools smoke test's (test_arith_tools_run.py); this adds ~10-40 s
def test_it_trains_through_opsd_train(lengths, tmp_path) -> None:
    from opsd_lightning.cli.train import train

    cfg = tools_run(
        tmp_path, "environment._target_=lengths_environment.LengthsEnvironment", "environment.max_turns=2"
    )
    metrics = train(cfg)
    assert metrics["optimizer_steps"] == 2 and metrics["generated_tokens"] > 0
