"""The paper's recipes (`experiment=opsd_qwen3_*`, the SFT and GRPO baselines) compose, and run a few steps on
CPU with a stand-in: the same experiment with the model swapped for a tiny random Qwen3 that uses the real
Qwen3 tokenizer and chat template, and the benchmarks read from ../shared files."""

from __future__ import annotations

import pytest
import torch

from .conftest import shared_path
from .test_configs import compose_train

RECIPES = ["opsd_qwen3_1p7b", "opsd_qwen3_4b", "opsd_qwen3_8b", "sft_qwen3_1p7b", "grpo_qwen3_1p7b"]
MODELS = {"1p7b": "Qwen/Qwen3-1.7B", "4b": "Qwen/Qwen3-4B", "8b": "Qwen/Qwen3-8B"}


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


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_holds_the_papers_settings(recipe, tmp_path):
    cfg = compose_train([f"experiment={recipe}", "data.path=train.jsonl"], tmp_path)
    assert cfg.model.name_or_path == MODELS[recipe.rsplit("_", 1)[-1]]
    assert cfg.model.dtype == "bfloat16" and cfg.model.gradient_checkpointing
    assert (cfg.peft.r, cfg.peft.lora_alpha) == (64, 128)
    assert set(cfg.peft.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert cfg.algorithm.optimizer.lr == 2e-4 and cfg.algorithm.accumulate_grad_batches == 4
    sampling = cfg.algorithm.sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (1.1, 0.95, 20)
    assert cfg.context.student_enable_thinking and cfg.context.teacher_enable_thinking
    assert list(cfg.benchmark) == ["aime24", "aime25", "hmmt25"] and cfg.evaluation.num_samples == 16
    assert (
        cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 8 and cfg.trainer.precision == "bf16-mixed"
    )
    if recipe.startswith("opsd"):
        assert cfg.teacher._target_.endswith("FixedTeacher") and cfg.divergence._target_.endswith("ForwardKL")
    if recipe.startswith("grpo"):
        assert cfg.algorithm.group_size == 8 and sampling.max_new_tokens == 16384
    assert cfg.rollout._target_ == "opsd_lightning.rollout.VLLMEngine"


def test_the_opsd_recipes_differ_only_in_their_model(tmp_path):
    from omegaconf import OmegaConf

    def without_model_name(recipe: str) -> dict:
        cfg = OmegaConf.to_container(
            compose_train([f"experiment={recipe}", "data.path=train.jsonl"], tmp_path)
        )
        assert cfg.pop("task_name") == recipe
        assert cfg["model"].pop("name_or_path") == MODELS[recipe.rsplit("_", 1)[-1]]
        return cfg

    first, *others = (without_model_name(r) for r in RECIPES if r.startswith("opsd"))
    assert all(other == first for other in others)
    assert first["algorithm"]["micro_batch_size"] == 1 and first["algorithm"]["loss"]["backend"] == "chunked"


def test_sft_carries_no_sampling_settings(tmp_path):
    assert "sampling" not in compose_train(["algorithm=sft"], tmp_path).algorithm


def test_a_recipe_without_training_data_names_the_missing_option(tmp_path):
    from hydra.errors import InstantiationException

    from opsd_lightning.app import instantiate_datamodule

    cfg = compose_train(["experiment=opsd_qwen3_1p7b"], tmp_path)
    with pytest.raises(
        InstantiationException, match=r"(?s)one of `path` \(local files\) or `name`.*full_key: data"
    ):
        instantiate_datamodule(cfg.data)


@pytest.mark.parametrize(
    "recipe", [pytest.param(r, marks=[] if r == "opsd_qwen3_1p7b" else pytest.mark.slow) for r in RECIPES]
)
def test_recipe_runs_on_a_stand_in_with_the_real_qwen3_tokenizer(recipe, tmp_path):
    from opsd_lightning.train import train

    cfg = compose_train(stand_in(recipe), tmp_path)
    metrics = train(cfg)
    assert metrics["optimizer_steps"] == 2
    assert metrics["benchmarks"] == {"aime24": 2, "aime25": 2, "hmmt25": 2}
    assert all(0.0 <= metrics["final"][f"test/{b}/avg@2"] <= 1.0 for b in metrics["benchmarks"])
    if not recipe.startswith("sft"):
        assert metrics["generated_tokens"] > 0
    assert torch.isfinite(torch.tensor(metrics["train"]["train/loss"]))
