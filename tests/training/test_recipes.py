"""The recipes (`experiment=opsd_qwen3_*`, the SFT and GRPO baselines) hold the settings they name, and run a
few steps on CPU with a stand-in: the same experiment with the model swapped for a tiny random Qwen3 that uses
the real Qwen3 tokenizer and chat template, and the benchmarks read from ../shared files.

`opsd_qwen3_1p7b` is what the upstream code runs now (its March 2026 rewrite, ../shared/docs/OPSD.md); the
`*_paper_v1` recipes and the baselines are the paper's settings."""

from __future__ import annotations

import re

import pytest
import torch

from tests.cli.test_configs import compose_train
from tests.conftest import shared_path

UPSTREAM = "opsd_qwen3_1p7b"
PAPER_OPSD = ["opsd_qwen3_1p7b_paper_v1", "opsd_qwen3_4b_paper_v1", "opsd_qwen3_8b_paper_v1"]
PAPER = [*PAPER_OPSD, "sft_qwen3_1p7b", "grpo_qwen3_1p7b"]
RECIPES = [UPSTREAM, *PAPER]
MODELS = {"1p7b": "Qwen/Qwen3-1.7B", "4b": "Qwen/Qwen3-4B", "8b": "Qwen/Qwen3-8B"}
ALL_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
# Everything the upstream recipe changes in the paper's 1.7B recipe (flattened keys); nothing else may differ.
UPSTREAM_CHANGES = {
    "task_name",
    "algorithm.gradient_clip_val",
    "algorithm.optimizer.lr",
    "algorithm.sampling.max_new_tokens",
    "algorithm.terms.0.divergence.clip",  # the distill term's divergence, like evaluation and engine,
    # copies a top-level node
    "divergence.clip",
    "trainer.devices",
    "rollout.gpu_memory_utilization",
    "algorithm.engine.gpu_memory_utilization",  # ${rollout}
    "evaluation.num_samples",
    "evaluation.ks",
    "evaluation.sampling.max_new_tokens",
    "algorithm.evaluation.num_samples",
    "algorithm.evaluation.ks",
    "algorithm.evaluation.sampling.max_new_tokens",
    "optimized_metric",  # test/aime24/avg@12 instead of avg@16
}


def model_of(recipe: str) -> str:
    """The checkpoint a recipe names, from the size in its name (`opsd_qwen3_4b_paper_v1`: Qwen3-4B)."""
    return MODELS[re.search(r"_(1p7b|4b|8b)(_|$)", recipe).group(1)]


def stand_in(recipe: str) -> list[str]:
    benchmarks = {"aime24": "aime24.jsonl", "aime25": "aime25.jsonl", "hmmt25": "hmmt_feb25.jsonl"}
    return [
        f"experiment={recipe}",
        "model=tiny",
        "~model.name_or_path",  # the recipe's checkpoint name; the stand-in builds its own weights
        f"model.tokenizer_path={shared_path('tokenizers', 'qwen3')}",
        "model.hidden_size=32",
        "model.num_layers=2",
        "model.num_heads=2",
        "model.num_kv_heads=1",
        "model.intermediate_size=64",
        "model.dtype=float32",  # CPU
        "trainer=cpu",
        "rollout=hf",  # the stand-in's heads (16) are below what vLLM's CPU attention takes
        # The upstream recipe sets a vLLM option on the rollout node, which rollout=hf would not take.
        "trainer.devices=1",
        "trainer.max_steps=2",
        "trainer.val_check_interval=null",
        f"data.path={shared_path('benchmarks', 'train_sample.jsonl')}",
        "data.max_train_samples=16",
        "data.max_val_samples=2",
        *([] if recipe.startswith("sft") else ["algorithm.sampling.max_new_tokens=6"]),  # SFT samples nothing
        "evaluation.sampling.max_new_tokens=6",
        "evaluation.num_samples=2",
        "evaluation.ks=[1,2]",
        "logger=none",
        "callbacks=none",
        "validate_before=false",
        *[f"benchmark.{name}.path={shared_path('benchmarks', file)}" for name, file in benchmarks.items()],
        *[f"benchmark.{name}.limit=2" for name in benchmarks],
    ]


@pytest.mark.parametrize("recipe", PAPER)
def test_recipe_holds_the_papers_settings(recipe, tmp_path):
    cfg = compose_train([f"experiment={recipe}", "data.path=train.jsonl"], tmp_path)
    assert cfg.model.name_or_path == model_of(recipe)
    assert cfg.model.dtype == "bfloat16" and cfg.model.gradient_checkpointing
    assert (cfg.peft.r, cfg.peft.lora_alpha) == (64, 128) and set(cfg.peft.target_modules) == ALL_LINEAR
    # The paper's per-device batch 2 x 4 accumulation steps: 8 prompts per device and step, generated in one
    # call (one optimizer step per batch), trained a micro-batch at a time.
    assert cfg.algorithm.optimizer.lr == 2e-4 and cfg.algorithm.accumulate_grad_batches == 1
    assert cfg.data.batch_size == 8 and cfg.algorithm.gradient_clip_val == 1.0
    rows_per_backward = {"opsd": 1, "sft": 2, "grpo": 2 * 8}  # OPSD's memory setting; GRPO: 2 prompts x G
    assert cfg.algorithm.micro_batch_size == rows_per_backward[recipe.split("_")[0]]
    sampling = cfg.algorithm.sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (1.1, 0.95, 20)
    assert cfg.context.student_enable_thinking and cfg.context.teacher_enable_thinking
    assert list(cfg.benchmark) == ["aime24", "aime25", "hmmt25"] and cfg.evaluation.num_samples == 16
    assert (
        cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 8 and cfg.trainer.precision == "bf16-mixed"
    )
    assert cfg.evaluation.sampling.max_new_tokens == 32768 and cfg.optimized_metric == "test/aime24/avg@16"
    if recipe.startswith("opsd"):
        assert cfg.teacher._target_.endswith("FixedTeacher") and cfg.divergence._target_.endswith("ForwardKL")
        assert cfg.divergence.clip is None and sampling.max_new_tokens == 2048
    if recipe.startswith("grpo"):
        assert cfg.algorithm.group_size == 8 and sampling.max_new_tokens == 16384
    assert cfg.rollout._target_ == "opsd_lightning.rollout.VLLMEngine"


def test_the_upstream_recipe_holds_what_upstream_runs_now(tmp_path):
    cfg = compose_train([f"experiment={UPSTREAM}", "data.path=train.jsonl"], tmp_path)
    algorithm, sampling, evaluation = cfg.algorithm, cfg.algorithm.sampling, cfg.evaluation
    assert cfg.model.name_or_path == "Qwen/Qwen3-1.7B" and cfg.model.dtype == "bfloat16"
    # 32 prompts per optimizer step: 4 GPUs x 8 (upstream's per-device batch 4 x 2 accumulation steps).
    assert (cfg.trainer.devices, cfg.data.batch_size, algorithm.accumulate_grad_batches) == (4, 8, 1)
    assert cfg.trainer.devices * cfg.data.batch_size * algorithm.accumulate_grad_batches == 32
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.precision == "bf16-mixed"
    assert algorithm.optimizer.lr == 5e-6 and algorithm.gradient_clip_val == 0.1
    assert cfg.divergence._target_.endswith("ForwardKL") and cfg.divergence.clip == 0.05
    assert cfg.divergence.clip_mode == "entry"  # per vocabulary entry, not per token
    assert algorithm.terms[0].divergence == cfg.divergence and cfg.teacher._target_.endswith("FixedTeacher")
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (1.1, 0.95, 20)
    assert sampling.max_new_tokens == 1024
    assert (cfg.peft.r, cfg.peft.lora_alpha) == (64, 128) and set(cfg.peft.target_modules) == ALL_LINEAR
    assert cfg.rollout._target_ == "opsd_lightning.rollout.VLLMEngine" and algorithm.engine == cfg.rollout
    assert cfg.rollout.gpu_memory_utilization == 0.6  # colocated with training
    assert evaluation.num_samples == 12 and list(evaluation.ks) == [1, 8, 12]
    assert evaluation.sampling.max_new_tokens == 38912 and evaluation.sampling.temperature == 1.0
    assert cfg.context.student_enable_thinking and cfg.context.teacher_enable_thinking
    assert list(cfg.benchmark) == ["aime24", "aime25", "hmmt25"]
    assert cfg.optimized_metric == "test/aime24/avg@12"


def flat(recipe: str, tmp_path) -> dict:
    """A recipe's resolved config as {dotted key: value}."""
    from omegaconf import OmegaConf

    def walk(node, prefix: str) -> dict:
        if isinstance(node, list) and all(isinstance(item, dict) for item in node):
            node = dict(enumerate(node))  # a list of parts (algorithm.terms): key by position
        if not isinstance(node, dict):
            return {prefix: node}
        return {k: v for key, value in node.items() for k, v in walk(value, f"{prefix}{key}.").items()}

    cfg = compose_train([f"experiment={recipe}", "data.path=train.jsonl"], tmp_path)
    config = OmegaConf.to_container(cfg)
    return {key.removesuffix("."): value for key, value in walk(config, "").items()}


def test_the_upstream_recipe_changes_the_paper_recipe_only_where_upstream_did(tmp_path):
    upstream, paper = flat(UPSTREAM, tmp_path), flat("opsd_qwen3_1p7b_paper_v1", tmp_path)
    assert upstream.keys() == paper.keys()
    assert {key for key in upstream if upstream[key] != paper[key]} == UPSTREAM_CHANGES


def test_the_paper_opsd_recipes_differ_only_in_their_model(tmp_path):
    from omegaconf import OmegaConf

    def without_model_name(recipe: str) -> dict:
        cfg = OmegaConf.to_container(
            compose_train([f"experiment={recipe}", "data.path=train.jsonl"], tmp_path)
        )
        assert cfg.pop("task_name") == recipe
        assert cfg["model"].pop("name_or_path") == model_of(recipe)
        return cfg

    first, *others = (without_model_name(r) for r in PAPER_OPSD)
    assert all(other == first for other in others)
    assert first["algorithm"]["micro_batch_size"] == 1 and first["algorithm"]["loss"]["backend"] == "chunked"


def test_sft_carries_no_sampling_settings(tmp_path):
    assert "sampling" not in compose_train(["algorithm=sft"], tmp_path).algorithm


def test_a_recipe_without_training_data_names_the_missing_option(tmp_path):
    from hydra.errors import InstantiationException

    from opsd_lightning.cli.app import instantiate_datamodule

    cfg = compose_train(["experiment=opsd_qwen3_1p7b"], tmp_path)
    with pytest.raises(
        InstantiationException, match=r"(?s)one of `path` \(local files\) or `name`.*full_key: data"
    ):
        instantiate_datamodule(cfg.data)


@pytest.mark.parametrize(
    "recipe", [pytest.param(r, marks=[] if r == UPSTREAM else pytest.mark.slow) for r in RECIPES]
)
def test_recipe_runs_on_a_stand_in_with_the_real_qwen3_tokenizer(recipe, tmp_path):
    from opsd_lightning.cli.train import metric_value, train

    cfg = compose_train(stand_in(recipe), tmp_path)
    metrics = train(cfg)
    assert metrics["optimizer_steps"] == 2
    assert metrics["benchmarks"] == {"aime24": 2, "aime25": 2, "hmmt25": 2}
    assert all(0.0 <= metrics["final"][f"test/{b}/avg@2"] <= 1.0 for b in metrics["benchmarks"])
    # What opsd-train returns to a sweeper is among the recipe's metrics (its test set is not `heldout`).
    assert metric_value(metrics, cfg.optimized_metric) == metrics["final"]["test/aime24/avg@2"]
    if not recipe.startswith("sft"):
        assert metrics["generated_tokens"] > 0
    assert torch.isfinite(torch.tensor(metrics["train"]["train/loss"]))
