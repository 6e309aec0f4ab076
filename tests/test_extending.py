"""The worked extensions of docs/extending.md (experiments/extending/), run here so that they cannot rot: a
new objective term (skew KL), a new teacher context (OP²SD's other-problem context) and a new datamodule,
each checked on its own and trained through `opsd-train`'s composition on the tiny model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli.test_configs import compose_train
from tests.cli.test_train import TINY
from tests.conftest import REPO_ROOT

EXTENDING = REPO_ROOT / "experiments" / "extending"
SEARCHPATH = f"hydra.searchpath=[file://{EXTENDING / 'conf'}]"
# test_train's tiny, fast job, minus its arith data and checkpoint settings; no base validation.
FAST = [o for o in TINY if not o.startswith(("data.", "callbacks.", "trainer.max_steps"))] + [
    "validate_before=false"
]
ARITH = [o for o in TINY if o.startswith("data.")]


@pytest.fixture()
def extending(monkeypatch):
    """experiments/extending on the import path, as `PYTHONPATH=experiments/extending` puts it."""
    monkeypatch.syspath_prepend(str(EXTENDING))


def run(overrides: list[str], tmp_path: Path) -> dict:
    """One `opsd-train` job in this process, its config composed and left unresolved as the app leaves it."""
    from opsd_lightning.cli.train import train

    return train(compose_train([SEARCHPATH, *overrides], tmp_path, resolve=False))


# ---- 1. an objective term: skew KL -------------------------------------------------------------------
def test_skew_kl_matches_its_closed_forms(extending):
    from skew_kl import skew_kl

    from opsd_lightning.objectives import ForwardKL

    torch.manual_seed(0)
    student = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    ids = torch.zeros(5, dtype=torch.long)
    p_s, p_t = student.softmax(-1), teacher.softmax(-1)
    for alpha in (0.1, 0.5):
        mixture = alpha * p_t + (1 - alpha) * p_s
        expected = (p_t * (p_t.log() - mixture.log())).sum(-1)
        value = skew_kl(student, teacher, alpha)
        torch.testing.assert_close(value, expected.float())
        assert bool((value <= -math.log(alpha) + 1e-6).all())  # the skew bounds it by -log α
    torch.testing.assert_close(
        skew_kl(student, teacher, 0.0), ForwardKL().per_token(student, teacher, ids).float()
    )
    torch.testing.assert_close(skew_kl(student, teacher, 1.0), torch.zeros(5))
    skew_kl(student, teacher, 0.1).sum().backward()
    assert student.grad is not None and teacher.grad is None  # gradient into the student only


def test_skew_kl_rejects_an_alpha_outside_its_range(extending):
    from skew_kl import SkewKL

    for alpha in (-0.1, 1.0):
        with pytest.raises(ValueError, match="alpha"):
            SkewKL(alpha=alpha)


def test_skew_kl_recipe_trains_one_step(extending, tmp_path):
    metrics = run(
        ["algorithm=skew_kl", "algorithm.alpha=0.2", *FAST, *ARITH, "trainer.max_steps=1"], tmp_path
    )
    assert metrics["optimizer_steps"] == 1
    assert math.isfinite(metrics["train"]["train/skew_kl"]) and metrics["train"]["train/skew_kl"] >= 0
    assert "train/divergence" not in metrics["train"]  # the recipe's only term


def test_skew_kl_plugs_into_opsd_from_the_command_line(extending, tmp_path, caplog):
    from opsd_lightning.cli.checks import check_config

    terms = "algorithm.terms=[{_target_: skew_kl.SkewKL, alpha: 0.1}]"
    # OPSD's Distill options have no reader once its terms are replaced: the pre-flight check says so...
    with caplog.at_level("WARNING", logger="opsd_lightning.training.recipes"):
        check_config(compose_train([terms], tmp_path, resolve=False))
    assert "algorithm.diagnostics, algorithm.loss: neither an argument" in caplog.text
    # ...and deleting them silences it.
    caplog.clear()
    with caplog.at_level("WARNING", logger="opsd_lightning.training.recipes"):
        check_config(
            compose_train([terms, "~algorithm.loss", "~algorithm.diagnostics"], tmp_path, resolve=False)
        )
    assert "neither an argument" not in caplog.text


# ---- 2. a teacher context: OP²SD's -------------------------------------------------------------------
def context_tools(loaded):
    from opsd_lightning.contexts.renderer import ContextRenderer
    from opsd_lightning.contexts.teacher import ContextTools
    from opsd_lightning.teachers.modes import DynamicTeacher

    return ContextTools(
        ContextRenderer(loaded.tokenizer),
        loaded.tokenizer,
        loaded.model,
        DynamicTeacher(),
        [0],
        torch.device("cpu"),
        0,
    )


def episodes_of(problems: list[str], group_size: int):
    from opsd_lightning.contexts.batches import left_pad
    from opsd_lightning.rollout.episodes import Episodes

    rows = len(problems) * group_size
    ones = torch.ones(rows, 2, dtype=torch.bool)
    return Episodes(
        left_pad([[1]] * rows, 0),
        torch.ones(rows, 2, dtype=torch.long),
        ones,
        ones,
        torch.zeros(rows, dtype=torch.bool),
        problems=problems,
        solutions=[None] * len(problems),
        answers=[None] * len(problems),
        group_size=group_size,
    )


def test_other_problem_context_shows_the_next_problems_solution_not_its_own(extending, tiny):
    from other_problem_context import OtherProblemContext

    problems = [f"Problem number {n}: what is {n} + {n}?" for n in range(3)]
    batch = {"problem": problems, "solution": [f"Reference {n}: \\boxed{{{2 * n}}}." for n in range(3)]}
    prompts = OtherProblemContext().build(batch, episodes_of(problems, group_size=2), context_tools(tiny))
    texts = tiny.tokenizer.batch_decode(prompts.prompt.input_ids, skip_special_tokens=True)
    for row, text in enumerate(texts):
        own, other = row // 2, (row // 2 + 1) % 3
        assert problems[own] in text and batch["solution"][other] in text and problems[other] in text
        assert batch["solution"][own] not in text
        assert "a worked solution of a different problem" in text and "reference solution" not in text
    assert prompts.rows.all() and prompts.stats == {"rows_without_other_problem": 0.0}
    # One problem has no other one: its rows leave the teacher's terms.
    single = OtherProblemContext().build(
        {"problem": problems[:1], "solution": batch["solution"][:1]},
        episodes_of(problems[:1], 2),
        context_tools(tiny),
    )
    assert not single.rows.any() and single.stats == {"rows_without_other_problem": 1.0}


def test_other_problem_context_trains_one_step(extending, tmp_path):
    metrics = run(["teacher_context=other_problem", *FAST, *ARITH, "trainer.max_steps=1"], tmp_path)
    assert metrics["optimizer_steps"] == 1
    assert metrics["train"]["train/rows_without_other_problem"] == 0.0
    assert math.isfinite(metrics["train"]["train/divergence"])


# ---- 3. a datamodule ----------------------------------------------------------------------------------
def test_blocks_datamodule_reads_every_block_and_names_a_bad_one(extending, tmp_path):
    from blocks_datamodule import TextBlocksDataModule, read_blocks

    rows = read_blocks(EXTENDING / "problems.txt")
    assert len(rows) == 16 and all(set(row) == {"problem", "solution", "answer"} for row in rows)
    data = TextBlocksDataModule(str(EXTENDING / "problems.txt"), held_out=4, batch_size=3)
    data.setup("fit")
    assert data.val_rows == rows[:4] and data.train_rows == rows[4:]
    assert next(iter(data.train_dataloader()))["problem"][0] in [row["problem"] for row in rows[4:]]
    bad = tmp_path / "bad.txt"
    bad.write_text("Problem: 1 + 1?\nSolution: \\boxed{2}\n\nProblem: 2 + 2?\nAnswer: 4\n")
    with pytest.raises(ValueError, match="block 2 needs"):
        read_blocks(bad)


def test_blocks_datamodule_trains_through_opsd_train(extending, tmp_path):
    overrides = ["data=blocks", f"data.path={EXTENDING / 'problems.txt'}", "data.batch_size=2"]
    metrics = run(
        [*overrides, *FAST, "trainer.max_steps=1", "callbacks.model_checkpoint.every_n_train_steps=1"],
        tmp_path,
    )
    assert metrics["optimizer_steps"] == 1 and metrics["benchmarks"] == {"heldout": 4}
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["final"]["test/heldout/avg@2"] == metrics["final"]["test/heldout/avg@2"]
    assert (tmp_path / "csv" / "metrics.csv").is_file() and (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_the_data_target_override_builds_the_datamodule(extending, tmp_path):
    from opsd_lightning.cli.app import instantiate_datamodule

    overrides = [
        "data._target_=blocks_datamodule.TextBlocksDataModule",
        f"+data.path={EXTENDING / 'problems.txt'}",
    ]
    data = instantiate_datamodule(compose_train(overrides, tmp_path, resolve=False).data)
    assert type(data).__name__ == "TextBlocksDataModule"


# ---- all three, through the documented command ---------------------------------------------------------
@pytest.mark.slow  # a subprocess: ~25 s of imports and one tiny job on 2 cores
def test_the_documented_command_runs_all_three_extensions(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": "experiments/extending",
        "OPSD_CACHE_DIR": str(tmp_path),
    }
    command = [
        sys.executable, "-m", "opsd_lightning.cli.train", "hydra.searchpath=[file://experiments/extending/conf]",
        "algorithm=skew_kl", "teacher_context=other_problem", "data=blocks", "data.batch_size=2",
        f"hydra.run.dir={tmp_path / 'run'}", "logger=none", "callbacks=none", *FAST, "trainer.max_steps=1",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    train = json.loads((tmp_path / "run" / "metrics.json").read_text())["train"]
    assert math.isfinite(train["train/skew_kl"]) and train["train/rows_without_other_problem"] == 0.0
