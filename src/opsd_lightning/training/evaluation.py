"""Benchmark evaluation inside training: the validation and test loops score each benchmark's problems with
the run's engine and accumulate `BenchmarkMetrics` over batches and ranks (the scoring of `opsd-eval`). A run
with an environment evaluates multi-turn episodes in it, as opsd-eval does, and logs the tool metrics too."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from opsd_lightning.contexts.renderer import ContextRenderer
from opsd_lightning.environments.base import Environment
from opsd_lightning.evaluation.grading import answers_equivalent
from opsd_lightning.evaluation.metrics import BenchmarkMetrics
from opsd_lightning.evaluation.runner import EvalSettings, score_problems
from opsd_lightning.rollout import RolloutEngine


class BenchmarkEvaluation(nn.Module):
    """One `BenchmarkMetrics` per stage (`val`, `test`) and benchmark, in the order of `benchmarks`.

    With `environment` (the run's, when it has one), each sample is an episode in it (the prompts' renderer
    must carry its tools, as the module's does) and `tool_calls`, `tool_error_rate` and `turns` are logged.
    """

    def __init__(
        self, settings: EvalSettings, benchmarks: Sequence[str], environment: Environment | None = None
    ) -> None:
        super().__init__()
        self.settings = settings
        self.benchmarks = list(benchmarks)
        self.environment = environment
        episodes = environment is not None
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_{index}": BenchmarkMetrics(
                    ks=settings.ks, equivalent=answers_equivalent, episodes=episodes
                )
                for stage in ("val", "test")
                for index in range(len(self.benchmarks))
            }
        )

    def update(
        self,
        stage: str,
        index: int,
        batch: Mapping,
        batch_idx: int,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        contexts: ContextRenderer,
        eos_ids: Sequence[int],
        engine: RolloutEngine,
        seed: int,
    ) -> None:
        # Seeded by position, as opsd-eval does: every evaluation of the same model draws the same samples,
        # and before/after comparisons share their random numbers.
        seed = seed + batch_idx * (self.settings.problems_per_batch or 0)  # None: one batch
        results = score_problems(
            model, tokenizer, contexts, batch, self.settings, eos_ids, seed, engine, self.environment
        )
        self.metrics[f"{stage}_{index}"].update(results)

    def compute(self, stage: str) -> Iterator[tuple[str, torch.Tensor]]:
        """(`<stage>/<benchmark>/<metric>`, value) over all batches and ranks of each updated benchmark, then
        resets."""
        for index, name in enumerate(self.benchmarks):
            metric = self.metrics[f"{stage}_{index}"]
            if not metric.update_called:
                continue
            for key, value in metric.compute().items():
                yield f"{stage}/{name}/{self.settings.metric_name(key)}", value
            metric.reset()
