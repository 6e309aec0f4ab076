"""Benchmarks load from the shared files, compose as lists, opsd-eval writes its outputs, and the
evaluation prompt is the training student context rendered by the chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict
from transformers import AutoTokenizer

from opsd_lightning._paths import config_dir
from opsd_lightning.contexts.renderer import ContextRenderer
from opsd_lightning.evaluation.runner import EvalSettings, score_problems
from opsd_lightning.rollout import Rollout, RolloutEngine
from tests.cli.test_configs import compose_train
from tests.conftest import shared_path

SHARED_FILES = {
    "math500": ("math500.jsonl", 500),
    "aime24": ("aime24.jsonl", 30),
    "aime25": ("aime25.jsonl", 30),
    "hmmt25": ("hmmt_feb25.jsonl", 30),
    "amc23": ("amc23.jsonl", 40),
    "minerva": ("minerva.jsonl", 272),
}


@pytest.mark.parametrize("name", sorted(SHARED_FILES))
def test_each_benchmark_config_reads_its_shared_file(name, tmp_path):
    file, rows = SHARED_FILES[name]
    path = shared_path("benchmarks", file)
    cfg = compose_train([f"benchmark={name}", f"benchmark.{name}.path={path}"], tmp_path)
    benchmark = instantiate(cfg.benchmark[name])
    loaded = benchmark.load()
    assert len(loaded) == rows
    assert all(row["problem"] and row["answer"] for row in loaded)
    assert len({row["id"] for row in loaded}) == rows  # ids are unique
    limited = instantiate(cfg.benchmark[name], limit=7).load()
    assert len(limited) == 7 and limited == instantiate(cfg.benchmark[name], limit=7).load()


def test_benchmarks_compose_as_a_list(tmp_path):
    cfg = compose_train(["benchmark=[heldout,math500,aime24]"], tmp_path)
    assert list(cfg.benchmark) == ["heldout", "math500", "aime24"]
    assert cfg.benchmark.aime24.hub_id == "HuggingFaceH4/aime_2024"


def test_a_missing_benchmark_column_names_the_file_columns_and_option(tmp_path):
    from opsd_lightning.evaluation import DatasetBenchmark

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1+1?", "solution": "2"}) + "\n")
    with pytest.raises(
        ValueError,
        match=r"bad.jsonl has no column 'problem'.*available columns.*benchmark.mine.columns.problem",
    ):
        DatasetBenchmark(name="mine", path=str(bad)).load()


def test_a_local_copy_in_the_canonical_layout_loads_with_the_hub_configs_columns(tmp_path):
    """amc23's hub copy names the problem `question`; a local copy may use `problem`. math500's optional
    `solution` may be missing."""
    local = tmp_path / "local.jsonl"
    local.write_text(
        "".join(json.dumps({"problem": f"p{i}", "answer": str(i), "id": f"x{i}"}) + "\n" for i in range(3))
    )
    for name in ("amc23", "math500"):
        cfg = compose_train([f"benchmark={name}", f"benchmark.{name}.path={local}"], tmp_path)
        rows = instantiate(cfg.benchmark[name]).load()
        assert [row["problem"] for row in rows] == ["p0", "p1", "p2"] and "solution" not in rows[0]
    assert [row["id"] for row in rows] == ["x0", "x1", "x2"]  # `id` stands in for math500's `unique_id`


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(config_dir()) / "benchmark").glob("*.yaml")))
def test_every_benchmark_is_a_benchmark(name, tmp_path):
    """One protocol: `load(datamodule)` for the hub, the synthetic task and the held-out split alike."""
    from opsd_lightning.evaluation import Benchmark

    cfg = compose_train([f"benchmark={name}"], tmp_path)
    assert isinstance(instantiate(cfg.benchmark[name]), Benchmark)


def test_the_held_out_split_needs_the_datamodule():
    from opsd_lightning.data import ArithDataModule
    from opsd_lightning.evaluation import HeldOutSplit

    data = ArithDataModule(train_size=8, val_size=5)
    data.setup("fit")
    rows = HeldOutSplit(limit=3).load(data)
    assert len(rows) == 3 and {row["problem"] for row in rows} <= {row["problem"] for row in data.val_rows}
    with pytest.raises(ValueError, match="validation split"):
        HeldOutSplit().load()


class _FakeModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))


class _RecordingEngine(RolloutEngine):
    """An engine that records the prompt it is given and answers every row with `completion`."""

    def __init__(self, completion: list[int]) -> None:
        self.completion, self.seen = completion, {}

    def generate(self, model, prompt, sampling, eos_ids, pad_id, seed=None):
        self.seen["prompt"] = prompt
        ids = torch.tensor(self.completion).repeat(prompt.input_ids.shape[0], 1)
        return Rollout(
            ids, torch.ones_like(ids, dtype=torch.bool), torch.zeros(len(ids), dtype=torch.bool), 0.0
        )


@pytest.mark.parametrize("thinking", [True, False])
def test_evaluation_prompt_is_the_chat_template_student_context(thinking):
    """With the real Qwen3 tokenizer, what evaluation feeds `generate` is exactly the chat template."""
    tokenizer = AutoTokenizer.from_pretrained(str(shared_path("tokenizers", "qwen3")))
    tokenizer.padding_side = "left"
    contexts = ContextRenderer(tokenizer, student_enable_thinking=thinking)

    engine = _RecordingEngine(tokenizer.encode("so \\boxed{4}<|im_end|>"))
    batch = {"id": ["a"], "problem": ["What is $2+2$?"], "answer": ["4"]}
    results = score_problems(
        _FakeModel(), tokenizer, contexts, batch, EvalSettings(num_samples=2), [151645], 0, engine
    )
    seen = engine.seen
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": contexts.student_template.replace("{problem}", "What is $2+2$?")}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=thinking,
    )
    row = seen["prompt"].input_ids[0][seen["prompt"].attention_mask[0].bool()].tolist()
    assert tokenizer.decode(row) == expected
    assert row == tokenizer.encode(expected, add_special_tokens=False)
    assert results[0].answers == ["4", "4"] and results[0].correct == [True, True]


def test_teacher_context_evaluation_puts_the_reference_in_view_and_needs_one():
    tokenizer = AutoTokenizer.from_pretrained(str(shared_path("tokenizers", "qwen3")))
    tokenizer.padding_side = "left"
    contexts = ContextRenderer(tokenizer)
    engine = _RecordingEngine(tokenizer.encode("\\boxed{4}<|im_end|>"))
    seen = engine.seen
    settings = EvalSettings(num_samples=1, context="teacher")
    batch = {"id": ["a"], "problem": ["What is $2+2$?"], "answer": ["4"], "solution": ["2+2=4 REF"]}
    score_problems(_FakeModel(), tokenizer, contexts, batch, settings, [151645], 0, engine)
    row = seen["prompt"].input_ids[0][seen["prompt"].attention_mask[0].bool()].tolist()
    assert row == contexts.teacher_ids("What is $2+2$?", "2+2=4 REF")
    without = {k: v for k, v in batch.items() if k != "solution"}
    with pytest.raises(ValueError, match="evaluation.context=teacher needs reference solutions"):
        score_problems(_FakeModel(), tokenizer, contexts, without, settings, [151645], 0, engine)
    with pytest.raises(ValueError, match="evaluation.context='oracle'"):
        EvalSettings(context="oracle")


def compose_eval(overrides: list[str], tmp_path: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose("eval", overrides=[*overrides, f"hydra.run.dir={tmp_path}"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


SMALL = [
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.num_kv_heads=1",
    "model.intermediate_size=64",
    "evaluation.sampling.max_new_tokens=8",
    "evaluation.num_samples=2",
    "evaluation.ks=[1,2]",
]


def test_opsd_eval_of_a_training_checkpoint_reproduces_the_training_test_metrics(tmp_path):
    from opsd_lightning.cli.evaluate import evaluate
    from opsd_lightning.cli.train import train

    run = tmp_path / "train"
    trained = train(
        compose_train(
            [
                "warmup=none",
                *SMALL,
                "data.train_size=16",
                "data.val_size=6",
                "data.batch_size=2",
                "trainer.max_steps=2",
                "algorithm.sampling.max_new_tokens=8",
                "logger=none",
                "validate_before=false",
            ],
            run,
        )
    )
    checkpoint = run / "checkpoints" / "last.ckpt"
    out = tmp_path / "eval"
    summary = evaluate(
        compose_eval(
            ["warmup=none", *SMALL, "data.val_size=6", "benchmark=heldout", f"checkpoint={checkpoint}"], out
        )
    )
    assert summary["heldout"]["problems"] == 6
    assert summary["heldout"]["avg@2"] == pytest.approx(trained["final"]["test/heldout/avg@2"])
    lines = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and set(lines[0]) == {
        "id",
        "problem",
        "reference",
        "completions",
        "answers",
        "correct",
        "lengths",
        "truncated",
    }
    assert len(lines[0]["completions"]) == 2
    saved = json.loads((out / "summary.json").read_text())
    assert saved["benchmarks"]["heldout"]["avg@2"] == summary["heldout"]["avg@2"]


def test_opsd_eval_rejects_a_missing_checkpoint(tmp_path):
    from opsd_lightning.cli.evaluate import evaluate

    with pytest.raises(FileNotFoundError, match="checkpoint=.*does not exist"):
        evaluate(compose_eval(["warmup=none", *SMALL, f"checkpoint={tmp_path / 'nope.ckpt'}"], tmp_path))


def test_an_adapter_folder_loads_with_peft_and_reproduces_the_student(tmp_path):
    from opsd_lightning.cli.evaluate import load_weights
    from opsd_lightning.models import build_tiny
    from opsd_lightning.models.lora import apply_peft

    small = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
    student = build_tiny(**small, seed=0)
    student.model = apply_peft(
        student.model, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    )
    with torch.no_grad():
        for name, param in student.model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    student.model.save_pretrained(tmp_path / "adapter")
    probe = torch.tensor([[1, 20, 21, 22, 23]])
    reloaded = load_weights(build_tiny(**small, seed=0), checkpoint=None, adapter=str(tmp_path / "adapter"))
    with torch.no_grad():
        expected = student.model.eval()(input_ids=probe).logits
        torch.testing.assert_close(reloaded.model.eval()(input_ids=probe).logits, expected)


def test_a_null_batch_size_sends_the_whole_shard_in_one_call_and_scores_the_same(tmp_path):
    """`evaluation.batch_size=null` (conf/evaluation/paper.yaml, for vLLM): one `generate` per benchmark shard
    instead of one per `batch_size` sequences; greedy completions, records and metrics are the same."""
    from opsd_lightning.cli.evaluate import score_benchmark
    from opsd_lightning.data.arith import generate_examples
    from opsd_lightning.models import eos_token_ids
    from opsd_lightning.rollout import HFEngine
    from tests.conftest import build_small_tiny

    loaded = build_small_tiny()
    contexts = ContextRenderer(loaded.tokenizer)
    rows = [{"id": str(i), **row} for i, row in enumerate(generate_examples(5, seed=0))]
    greedy = {"temperature": 0.0, "max_new_tokens": 6}
    outcomes = {}
    for batch_size in (2, None):  # 1 problem x 2 samples per call; all 5 problems at once
        settings = EvalSettings(sampling=greedy, num_samples=2, ks=[1, 2], batch_size=batch_size)
        calls: list[int] = []

        def score(batch, seed, settings=settings, calls=calls):
            calls.append(len(batch["problem"]))
            eos = eos_token_ids(loaded.model, loaded.tokenizer)
            return score_problems(
                loaded.model, loaded.tokenizer, contexts, batch, settings, eos, seed, HFEngine()
            )

        out = tmp_path / str(batch_size)
        out.mkdir()
        metrics = score_benchmark("arith", rows, score, settings, 0, out)
        outcomes[batch_size] = (calls, metrics, (out / "arith.jsonl").read_text())
    (calls_by_2, metrics_by_2, records_by_2), (calls_whole, metrics_whole, records_whole) = outcomes.values()
    assert calls_by_2 == [1] * 5 and calls_whole == [5]
    assert metrics_whole == metrics_by_2 and records_whole == records_by_2
    with pytest.raises(ValueError, match=r"evaluation.batch_size=0 must be >= 1 \(or null"):
        EvalSettings(batch_size=0)
