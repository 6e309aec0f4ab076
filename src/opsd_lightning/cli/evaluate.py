"""`opsd-eval`: evaluate a model on one or more benchmarks and write per-problem results.

Writes `<output_dir>/<benchmark>.jsonl` (one line per problem: id, problem, reference, completions,
extracted answers, correctness, lengths, truncation) and `summary.json`, and prints a table. With an
`environment` (e.g. data=arith_tools) each sample is a multi-turn episode with tools: the lines gain
`episodes` (every turn, tool call and response) and the metrics `tool_calls`, `tool_error_rate` and `turns`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from opsd_lightning._paths import config_dir
from opsd_lightning.cli.app import build_benchmarks, build_model, instantiate_datamodule, output_dir
from opsd_lightning.contexts.renderer import ContextRenderer
from opsd_lightning.evaluation.grading import answers_equivalent
from opsd_lightning.evaluation.loaders import problem_batches
from opsd_lightning.evaluation.metrics import BenchmarkMetrics
from opsd_lightning.evaluation.runner import EvalSettings, ProblemResult, score_problems
from opsd_lightning.models import LoadedModel, eos_token_ids
from opsd_lightning.models.lora import apply_peft
from opsd_lightning.rollout.multi_turn import environment_contexts

log = logging.getLogger(__name__)


def load_weights(loaded: LoadedModel, checkpoint: str | None, adapter: str | None) -> LoadedModel:
    """Apply a Lightning checkpoint from opsd-train (its `model.*` weights) or a PEFT adapter folder."""
    if checkpoint:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint={checkpoint} does not exist")
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        missing, unexpected = loaded.model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise ValueError(
                f"checkpoint={checkpoint} does not match the configured model (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}); use the same model= and peft= as the training run"
            )
    if adapter:
        from peft import PeftModel

        loaded.model = PeftModel.from_pretrained(loaded.model, adapter)
    return loaded


def evaluate(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Evaluate and write the outputs; returns {benchmark: {metric: value}}."""
    start = time.perf_counter()
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    datamodule = instantiate_datamodule(cfg.data)
    datamodule.setup("fit")
    # Before the model: a bad environment option fails before any warm-up.
    environment = instantiate(cfg.environment) if cfg.get("environment") else None
    loaded = build_model(cfg, datamodule)
    loaded.model = apply_peft(loaded.model, cfg.get("peft"))
    loaded = load_weights(loaded, cfg.get("checkpoint"), cfg.get("adapter"))
    model = loaded.model.eval()
    contexts = ContextRenderer(loaded.tokenizer, **cfg.context)
    if environment is not None:
        contexts = environment_contexts(environment, contexts)  # the tools in the prompts, as in training
    settings = EvalSettings(**OmegaConf.to_container(cfg.evaluation, resolve=True))
    eos_ids = eos_token_ids(model, loaded.tokenizer)

    engine = instantiate(cfg.rollout) if cfg.get("rollout") else None  # loads the weights once, at first use
    if engine is not None:
        engine.check_model(model)
    score = functools.partial(
        score_problems,
        model,
        loaded.tokenizer,
        contexts,
        settings=settings,
        eos_ids=eos_ids,
        engine=engine,
        environment=environment,
    )
    summary = {
        benchmark.name: score_benchmark(
            benchmark.name,
            benchmark.load(datamodule),
            score,
            settings,
            cfg.seed,
            out,
            environment is not None,
        )
        for benchmark in build_benchmarks(cfg)
    }
    (out / "summary.json").write_text(
        json.dumps(
            {
                "benchmarks": summary,
                "num_samples": settings.num_samples,
                "sampling": vars(settings.sampling),
                "checkpoint": cfg.get("checkpoint"),
                "adapter": cfg.get("adapter"),
                **(
                    {"environment": OmegaConf.to_container(cfg.environment, resolve=True)}
                    if environment
                    else {}
                ),
                "wall_seconds": round(time.perf_counter() - start, 1),
            },
            indent=2,
        )
    )
    print(format_table(summary, settings, out))
    return summary


def score_benchmark(
    name: str,
    rows: list[dict[str, str]],
    score: Callable[..., list[ProblemResult]],
    settings: EvalSettings,
    seed: int,
    out: Path,
    episodes: bool = False,
) -> dict[str, float]:
    """Score a benchmark's rows with `score(batch, seed=...)` and write `<out>/<name>.jsonl`; its problem
    count and metrics (with the tool metrics when `episodes`: the samples are episodes in an environment)."""
    metric = BenchmarkMetrics(ks=settings.ks, equivalent=answers_equivalent, episodes=episodes)
    with (
        (out / f"{name}.jsonl").open("w") as jsonl,
        tqdm(total=len(rows), desc=f"eval {name}", unit="problem", dynamic_ncols=True) as progress,
    ):
        for index, batch in enumerate(problem_batches(rows, settings.problems_per_batch)):
            # Seeded by position, as the evaluation during training is.
            results = score(batch, seed=seed + index * (settings.problems_per_batch or 0))
            metric.update(results)
            jsonl.writelines(json.dumps(result.to_json()) + "\n" for result in results)
            progress.update(len(results))
    values = {settings.metric_name(k): float(v) for k, v in metric.compute().items()}
    return {"problems": len(rows), **values}


def format_table(summary: dict[str, dict[str, float]], settings: EvalSettings, out: Path) -> str:
    names = [n for n in next(iter(summary.values())) if n != "problems"]
    lines = [
        "",
        f"{settings.num_samples} samples per problem, temperature {settings.sampling.temperature} "
        f"(avg@{settings.num_samples} = mean correctness over the samples)",
        "| benchmark | problems | " + " | ".join(f"{n:>10}" for n in names) + " |",
        "|---|---:|" + "|".join("---:" for _ in names) + "|",
    ]
    for name, values in summary.items():
        lines.append(
            f"| {name} | {int(values['problems'])} | "
            + " | ".join(f"{values[n]:>10.3f}" for n in names)
            + " |"
        )
    lines.append(f"Per-problem results and summary.json in {out}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="eval")
def main(cfg: DictConfig) -> None:
    sys.path.insert(0, os.getcwd())  # user datamodules/benchmarks in the launch directory
    evaluate(cfg)


if __name__ == "__main__":
    main()
