"""`opsd-train`: the Hydra app. Compose -> (warm-up) -> validate base -> fit -> validate -> metrics.json.

Returns the configured `optimized_metric` so Hydra sweepers (Optuna, Ax, ...) can optimise it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from opsd_lightning._paths import config_dir
from opsd_lightning.cli.app import (
    build_benchmarks,
    build_model,
    build_teacher,
    instantiate_datamodule,
    output_dir,
)
from opsd_lightning.cli.checks import check_config
from opsd_lightning.contexts.renderer import ContextRenderer
from opsd_lightning.data import RawTextDataModule
from opsd_lightning.evaluation.loaders import WithBenchmarks
from opsd_lightning.evaluation.runner import EvalSettings
from opsd_lightning.models.lora import apply_peft
from opsd_lightning.rollout.multi_turn import environment_sampler
from opsd_lightning.training.callbacks import TrainingInterrupted

log = logging.getLogger(__name__)


def environment_sampler_option(cfg: DictConfig) -> dict[str, Any]:
    """With an `environment` (e.g. data=arith_tools), the recipe's sampler runs multi-turn episodes in it."""
    if not cfg.get("environment"):
        return {}
    recipe_sampler = instantiate(cfg.algorithm.sampler) if cfg.algorithm.get("sampler") else None
    return {"sampler": environment_sampler(instantiate(cfg.environment), recipe_sampler)}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one job and return its metrics (also written to `<output_dir>/metrics.json`)."""
    start = time.perf_counter()
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    # Cheap checks first, so a bad option (divergence.beta=2, teacher.decay=1) fails before the warm-up,
    # the data or the model are loaded.
    check_config(cfg)
    settings = EvalSettings(**OmegaConf.to_container(cfg.evaluation, resolve=True))

    data = WithBenchmarks(
        instantiate_datamodule(cfg.data), build_benchmarks(cfg), settings.problems_per_batch
    )
    # The rows now: a bad file or benchmark fails before the model loads, and the warm-up keeps the
    # held-out problems out of the tiny base's training.
    data.setup("fit")

    loaded = build_model(cfg, data.datamodule)
    teacher = build_teacher(cfg, data.datamodule, loaded)  # teacher=model: a separate frozen LM, else None
    loaded.model = apply_peft(loaded.model, cfg.get("peft"))
    contexts = ContextRenderer(loaded.tokenizer, **cfg.context)
    connect_renderer(data.datamodule, contexts)
    module = instantiate(
        cfg.algorithm,
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        contexts=contexts,
        benchmarks=data.names,
        _convert_="all",
        **({"teacher": teacher} if teacher is not None else {}),
        **environment_sampler_option(cfg),
    )
    module.engine.check_model(module.model)  # e.g. rollout=vllm with a head size its CPU build rejects

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    if not loggers:  # LearningRateMonitor refuses to run without a logger; logger=none should just work
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    metrics = fit_and_test(cfg, trainer, module, data)
    metrics["wall_seconds"] = round(time.perf_counter() - start, 1)
    metrics["output_dir"] = str(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(format_summary(cfg, metrics))
    return metrics


def connect_renderer(datamodule: L.LightningDataModule, renderer: ContextRenderer) -> None:
    """Hand the run's renderer to the training data, whose `setup` fits its rows to the prompt budget."""
    if isinstance(datamodule, RawTextDataModule):
        datamodule.connect(renderer)
    elif renderer.budget.max_prompt_tokens is not None:
        log.warning(
            "%s has no connect(renderer), so context.overlong cannot fit its rows in advance: a prompt over "
            "context.max_prompt_tokens=%d will raise when rendered",
            type(datamodule).__name__,
            renderer.budget.max_prompt_tokens,
        )


def fit_and_test(
    cfg: DictConfig, trainer: L.Trainer, module: L.LightningModule, data: WithBenchmarks
) -> dict:
    """Validate the base model (unless resuming), train, test: the run's metrics."""
    base = None
    if cfg.get("ckpt_path"):  # the base was measured by the run being resumed
        log.info("Resuming from %s: skipping the base model's validation", cfg.ckpt_path)
    elif cfg.get("validate_before", True):
        base = _merged(trainer.validate(module, datamodule=data, verbose=False))
    try:
        trainer.fit(module, datamodule=data, ckpt_path=cfg.get("ckpt_path"))
    except TrainingInterrupted as stop:
        # The exit status a shell or scheduler expects of a signalled job (130 Ctrl-C, 143 SIGTERM).
        log.error("%s. Resume with the same overrides plus ckpt_path=%s", stop, stop.checkpoint)
        raise SystemExit(128 + stop.signal_number) from stop
    metrics: dict[str, Any] = {"benchmarks": {name: len(rows) for name, rows in data.rows.items()}}
    if isinstance(data.datamodule, RawTextDataModule) and data.datamodule.overlong_counts is not None:
        metrics["overlong_training_rows"] = data.datamodule.overlong_counts
    if base is not None:
        metrics["base"] = base
    # Read the last training metrics before test() replaces trainer.callback_metrics.
    metrics["train"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    metrics["final"] = _merged(trainer.test(module, datamodule=data, verbose=False))
    metrics["optimizer_steps"] = trainer.global_step
    metrics["generated_tokens"] = module.generated_tokens
    return metrics


def _merged(results: list[dict]) -> dict[str, float]:
    """One dict from Lightning's per-dataloader result list."""
    return {k: float(v) for result in results for k, v in result.items()}


def format_summary(cfg: DictConfig, metrics: dict[str, Any]) -> str:
    """The short before/after table the main job prints: one row per benchmark and stage."""
    names = [f"avg@{cfg.evaluation.num_samples}"] + [
        f"{m}@{k}" for k in cfg.evaluation.ks for m in ("pass", "maj")
    ]
    names += ["format_rate", "completion_length", "truncation_rate"]
    names = list(dict.fromkeys(names))
    sampling = cfg.evaluation.sampling
    lines = [
        "",
        f"Evaluation: {cfg.evaluation.num_samples} samples per problem, temperature {sampling.temperature}",
        "| benchmark (problems) | model      | " + " | ".join(f"{n:>10}" for n in names) + " |",
        "|---|---|" + "|".join("---:" for _ in names) + "|",
    ]
    for benchmark, count in metrics["benchmarks"].items():
        for label, stage, values in (
            ("base", "val", metrics.get("base")),
            (f"after {algorithm_name(cfg)}", "test", metrics["final"]),
        ):
            if values:
                cells = " | ".join(
                    f"{values.get(f'{stage}/{benchmark}/{n}', float('nan')):>10.3f}" for n in names
                )
                lines.append(f"| {benchmark} ({count}) | {label:<10} | {cells} |")
    lines.append(
        f"{metrics['optimizer_steps']} optimizer steps, {metrics['generated_tokens']} generated tokens, "
        f"{metrics['wall_seconds']} s wall time. Outputs: {metrics['output_dir']}"
    )
    return "\n".join(lines)


def algorithm_name(cfg: DictConfig) -> str:
    """`OPSD`, `SFT`, `GRPO`, ...: the recipe's `name` (`conf/algorithm/*.yaml`), or a module's class name."""
    return str(cfg.algorithm.get("name") or cfg.algorithm._target_.rsplit(".", 1)[-1].removesuffix("Module"))


def metric_value(metrics: dict[str, Any], name: str | None) -> float | None:
    """Look up `optimized_metric`, e.g. `test/heldout/avg@4`, in the final (test) or last training metrics."""
    if not name:
        return None
    if name in metrics.get("final", {}):
        return metrics["final"][name]
    if name in metrics.get("train", {}):
        return metrics["train"][name]
    raise KeyError(
        f"optimized_metric={name!r} is not among the run's metrics: "
        f"{sorted(metrics.get('final', {})) + sorted(metrics.get('train', {}))}"
    )


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    # Let `data._target_=my_module.MyDataModule` find a module in the launch directory.
    sys.path.insert(0, os.getcwd())
    return metric_value(train(cfg), cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
