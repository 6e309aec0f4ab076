"""The synthetic task: deterministic from the seed, answers right, held-out problems never trained on."""

from __future__ import annotations

import re

import pytest

from opsd_lightning.data import ArithDataModule
from opsd_lightning.data.arith import generate_examples


def test_examples_are_deterministic_and_correct():
    first, again = generate_examples(50, seed=3), generate_examples(50, seed=3)
    assert first == again and first != generate_examples(50, seed=4)
    for row in first:
        numbers = [int(n) for n in re.findall(r"\d+", row["problem"])]
        gains = re.findall(r"(buys|finds|gets|is given) (\d+) more", row["problem"])
        losses = re.findall(r"(gives away|loses|sells|uses) (\d+)", row["problem"])
        expected = numbers[0] + sum(int(n) for _, n in gains) - sum(int(n) for _, n in losses)
        assert row["answer"] == str(expected)
        assert row["solution"].endswith(f"\\boxed{{{expected}}}.")


def test_validation_problems_are_held_out_and_batches_are_raw_text():
    data = ArithDataModule(train_size=300, val_size=50, batch_size=4, seed=0)
    data.setup("fit")
    assert not {r["problem"] for r in data.train_rows} & {r["problem"] for r in data.val_rows}
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"problem", "solution", "answer"} and len(batch["problem"]) == 4
    assert all(isinstance(text, str) for text in batch["solution"])


def test_net_change_references_use_another_order_and_the_same_answer():
    from opsd_lightning.data.arith import ArithProblem

    problem = ArithProblem("Ava", "apples", 7, (5, -3), ("buys 5 more", "loses 3"))
    assert problem.reference_text("net_change") == (
        "The changes add up to 5 - 3 = 2. So Ava has 7 + 2 = 9. Final answer: \\boxed{9}."
    )
    assert problem.reference_text("steps") == problem.solution_text()
    data = ArithDataModule(train_size=20, val_size=5, reference_style="net_change")
    data.setup("fit")
    assert all(row["solution"].startswith("The changes add up to") for row in data.train_rows)
    assert [r["answer"] for r in data.val_rows] == [
        r["answer"] for r in ArithDataModule(val_size=5).build_splits()[1]
    ]


def test_task_seed_fixes_the_problems_while_seed_moves_the_training_order():
    a = ArithDataModule(train_size=64, val_size=8, batch_size=64, seed=1, task_seed=0)
    b = ArithDataModule(train_size=64, val_size=8, batch_size=64, seed=2, task_seed=0)
    for data in (a, b):
        data.setup("fit")
    assert a.val_rows == b.val_rows and a.train_rows == b.train_rows
    assert a.val_rows == ArithDataModule(train_size=64, val_size=8, seed=0).build_splits()[1]
    order_a = next(iter(a.train_dataloader()))["problem"]
    order_b = next(iter(b.train_dataloader()))["problem"]
    assert sorted(order_a) == sorted(order_b) and order_a != order_b


def test_the_arith_benchmark_is_the_held_out_split_when_task_seed_differs_from_seed():
    from opsd_lightning.evaluation import ArithBenchmark

    data = ArithDataModule(train_size=16, val_size=12, seed=0, task_seed=3)
    data.setup("fit")
    rows = ArithBenchmark(num_problems=12, seed=0, task_seed=3).load()
    assert [{k: v for k, v in row.items() if k != "id"} for row in rows] == data.val_rows
    assert rows != ArithBenchmark(num_problems=12, seed=0).load()  # the task seed, not the seed, decides


@pytest.mark.parametrize("app", ["train", "eval"])
def test_composed_benchmark_arith_yields_the_datamodules_validation_problems(app, tmp_path):
    """Through Hydra, as `opsd-train`/`opsd-eval data.task_seed=3 seed=0 benchmark=arith` builds them."""
    from hydra.utils import instantiate

    from tests.cli.test_configs import compose_train
    from tests.evaluation.test_evaluation import compose_eval

    compose = compose_train if app == "train" else compose_eval
    cfg = compose(["benchmark=arith", "data.task_seed=3", "seed=0", "data.val_size=12"], tmp_path)
    data = instantiate(cfg.data)
    data.setup("fit")
    problems = [row["problem"] for row in instantiate(cfg.benchmark.arith).load(data)]
    assert problems == [row["problem"] for row in data.val_rows] and len(problems) == 12


def test_the_task_knobs_are_stated_once_and_match_the_python_defaults(tmp_path):
    from omegaconf import OmegaConf

    from opsd_lightning._paths import config_dir
    from opsd_lightning.data import arith
    from tests.cli.test_configs import compose_train

    stated = OmegaConf.load(config_dir() / "data" / "shared" / "arith_task.yaml")
    assert dict(stated) == {
        "num_steps": list(arith.NUM_STEPS),
        "max_start": arith.MAX_START,
        "max_change": arith.MAX_CHANGE,
    }
    cfg = compose_train(["benchmark=[heldout,arith]"], tmp_path)
    for node in (cfg.data, cfg.warmup, cfg.benchmark.arith):
        assert {key: node[key] for key in stated} == dict(stated)
    assert cfg.data.val_size == cfg.benchmark.arith.num_problems == arith.HELDOUT_SIZE
    # An override of the data's task reaches the benchmark that is its held-out split.
    cfg = compose_train(["benchmark=arith", "data.max_start=20", "data.val_size=50"], tmp_path)
    assert (cfg.benchmark.arith.max_start, cfg.benchmark.arith.num_problems) == (20, 50)
