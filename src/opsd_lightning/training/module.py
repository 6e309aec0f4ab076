"""One on-policy training module, built from parts (see docs/design.md):

    raw batch -> sampler (through the rollout engine) -> episodes
              -> teacher context (when a term needs a teacher) -> teacher prompts
              -> per `micro_batch_size` rows: each objective term's (token sum, token mask) -> backward
              -> over the optimizer step and all ranks: Σ weight·sum / #tokens any term supervised

Every algorithm is a recipe of parts (`conf/algorithm/`): OPSD is [Distill] on single rollouts with the
reference context; GRPO [ClippedPolicy, KLToReference] on groups; the hybrid both families; SSOPD [Distill]
on groups with the own-rollout context; SFT [NLL] on reference episodes. The optimizer step, the token mean
and non-finite skipping live in the base class (`training/stepper.py`), evaluation in `BenchmarkEvaluation`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.strategies import ParallelStrategy
from torch import nn
from transformers import PreTrainedTokenizerBase

from opsd_lightning.contexts.batches import TokenBatch
from opsd_lightning.contexts.renderer import ContextRenderer
from opsd_lightning.contexts.teacher import (
    ContextTools,
    ReferenceContext,
    StudentContext,
    TeacherContext,
    TeacherPrompts,
)
from opsd_lightning.evaluation.runner import EvalSettings, as_settings
from opsd_lightning.models import eos_token_ids
from opsd_lightning.objectives.diagnostics import TokenDiagnostics
from opsd_lightning.objectives.terms import ObjectiveTerm, TermInputs, TermSum
from opsd_lightning.options import build_settings
from opsd_lightning.rollout import HFEngine, Rollout, RolloutEngine, SamplingConfig
from opsd_lightning.rollout.episodes import Episodes
from opsd_lightning.rollout.lifecycle import EngineLifecycle
from opsd_lightning.rollout.ranks import refuse_together
from opsd_lightning.rollout.samplers import RolloutSource, Sampler, SingleSampler
from opsd_lightning.teachers.modes import DynamicTeacher, Teacher
from opsd_lightning.training.evaluation import BenchmarkEvaluation
from opsd_lightning.training.settings import StepSettings
from opsd_lightning.training.stepper import MicroBatchLoss, OptimizerStepper, check_raw_batch

STEP_OPTIONS = tuple(f.name for f in dataclasses.fields(StepSettings))


class OnPolicyModule(OptimizerStepper):
    """A causal LM trained on the episodes its sampler draws, by the sum of its objective terms.

    Args:
        model / tokenizer: the policy (and, with a self-teacher, the teacher).
        contexts: renders the student's prompts (and the teacher contexts' templates).
        optimizer: a partial taking the trainable parameters (Hydra `_partial_: true`).
        sampler: how a batch becomes episodes (`SingleSampler`, `GroupSampler`, `ReferenceSampler`).
        terms: the objective terms; a term of weight 0 is left out (and its needs with it).
        teacher: whose weights score the teacher context (`conf/teacher/`); default the current weights. Only
            kept (and, for `fixed`, copied) when a term needs a teacher.
        teacher_context: what the teacher reads (`conf/teacher_context/`); default the reference.
        sampling: training rollout settings (temperature, top_p, top_k, max_new_tokens).
        evaluation / benchmarks: how benchmarks are evaluated, and their names (`val/<name>/...`).
        scheduler: optional partial taking the optimizer; stepped once per optimizer step.
        accumulate_grad_batches / gradient_clip_val / max_nonfinite_steps_in_a_row / micro_batch_size: see
            `StepSettings`.
        seed: rollouts are seeded by (seed, step, micro-batch, rank), so resumes reproduce them.
        engine: what generates every rollout and evaluation sample (`conf/rollout/`); default HF `generate`.
        name: how the run's summary names the recipe (`OPSD`, `GRPO`, ...).
        recipe_options: a recipe's own options (`group_size`, `loss`, `mode`, ...), which its parts read as
            `${algorithm.<option>}` in `conf/algorithm/`; kept for the record (`hparams`), unused here.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        contexts: ContextRenderer,
        optimizer: Callable[..., torch.optim.Optimizer],
        terms: Sequence[ObjectiveTerm],
        sampler: Sampler | None = None,
        teacher: Teacher | None = None,
        teacher_context: TeacherContext | None = None,
        sampling: SamplingConfig | Mapping | None = None,
        evaluation: EvalSettings | Mapping | None = None,
        benchmarks: Sequence[str] = ("heldout",),
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = 1.0,
        max_nonfinite_steps_in_a_row: int = 3,
        micro_batch_size: int | None = None,
        seed: int = 0,
        engine: RolloutEngine | None = None,
        name: str | None = None,
        **recipe_options: Any,
    ) -> None:
        steps = StepSettings(
            accumulate_grad_batches, gradient_clip_val, max_nonfinite_steps_in_a_row, micro_batch_size
        )
        super().__init__(steps, optimizer, scheduler)
        self.name = name
        self.recipe_options = recipe_options
        self.model = model
        self.tokenizer = tokenizer
        self.contexts = contexts
        self.sampler = sampler if sampler is not None else SingleSampler()
        self.contexts = self.sampler.contexts_for(contexts)
        self.terms = nn.ModuleList(active_terms(terms, self.sampler))
        self.sampling = build_settings(SamplingConfig, sampling, "algorithm.sampling")
        self.engine = engine if engine is not None else HFEngine()
        environment = getattr(self.sampler, "environment", None)  # a multi-turn run evaluates episodes
        self.evaluation = BenchmarkEvaluation(as_settings(evaluation), benchmarks, environment)
        self.seed = seed
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.needs_teacher = any(term.needs_teacher for term in self.terms)
        self.teacher = (teacher if teacher is not None else DynamicTeacher()) if self.needs_teacher else None
        self.teacher_context = (teacher_context or ReferenceContext()) if self.needs_teacher else None
        if self.teacher_context is not None:
            check_context(self.teacher_context, self.sampler)
            if isinstance(self.teacher_context, StudentContext) and isinstance(self.teacher, DynamicTeacher):
                raise ValueError(
                    "teacher_context=student with teacher=dynamic scores the student's tokens with its own "
                    "weights in its own context: the divergence is 0. Use teacher=model (classic "
                    "distillation) or teacher=fixed (the initial weights), or another teacher_context"
                )
        if self.teacher is not None:
            self.teacher.attach(self.model)
        for term in self.terms:
            term.attach(self.model)

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Build, from the resolved `algorithm` config, every part `__init__` builds except the models (the
        sampler, the terms, the teacher context, the settings), so a bad option fails before any model loads,
        with the message `__init__` would give."""
        StepSettings(**{key: options[key] for key in STEP_OPTIONS if key in options})
        sampler = build_part(options["sampler"]) if options.get("sampler") else SingleSampler()
        terms = [build_part(term) for term in options.get("terms") or []]
        active = active_terms(terms, sampler)
        if options.get("teacher_context") and any(term.needs_teacher for term in active):
            check_context(build_part(options["teacher_context"]), sampler)
        if sampler.generates and options.get("sampling") is not None:
            build_settings(SamplingConfig, options["sampling"], "algorithm.sampling")

    # ---- one micro-batch ------------------------------------------------------------------------
    def micro_batch_loss(self, batch: Mapping, micro_index: int) -> MicroBatchLoss:
        seed = self.rollout_seed(micro_index)

        def sample() -> tuple[Episodes, TeacherPrompts | None]:
            episodes = self.sampler.sample(batch, self.rollout_source(), seed)
            return episodes, self.teacher_prompts(batch, episodes, seed) if self.needs_teacher else None

        # Under DDP a refusal on one rank is raised on every rank: alone, it would hang the others. The batch
        # is checked in a phase of its own, before sampling's collectives (an engine's own prompt check).
        refuse_together(lambda: check_raw_batch(batch))
        episodes, prompts = refuse_together(sample)
        slices = self.steps.row_slices(len(episodes))
        loss_sum = torch.zeros((), device=self.device)
        totals: list[TermTotals] = [TermTotals() for _ in self.terms]
        supervised = torch.zeros((), dtype=torch.long)
        for rows in slices:
            inputs = TermInputs(self.model, episodes.rows(rows), self.teacher)
            if prompts is not None:
                inputs.teacher_prompt, inputs.teacher_rows = prompts.prompt.rows(rows), prompts.rows[rows]
            results = [term(inputs) for term in self.terms]
            part = sum_weighted(self.terms, results)
            if len(slices) > 1:
                with self.gradient_sync(rows is slices[-1]):
                    self.manual_backward(part)  # frees this slice's graph before the next one
                part = part.detach()
            loss_sum = loss_sum + part
            for total, result in zip(totals, results, strict=True):
                total.add(result)
            supervised = supervised + union(results).sum().cpu()
        stats = episodes.rollout_stats()
        if prompts is not None:
            stats.update(prompts.stats)
        for term, total in zip(self.terms, totals, strict=True):
            stats.update(total.means(term.name))
        return MicroBatchLoss(loss_sum, supervised, stats, backward_done=len(slices) > 1)

    def rollout_source(self) -> RolloutSource:
        def generate(prompt: TokenBatch, seed: int | None) -> Rollout:
            return self.engine.generate(
                self.model, prompt, self.sampling, self.eos_ids, self.tokenizer.pad_token_id, seed
            )

        def generate_with(
            prompt: TokenBatch, sampling: SamplingConfig, stop_ids: Sequence[int], seed: int | None
        ) -> Rollout:
            return self.engine.generate(
                self.model, prompt, sampling, stop_ids, self.tokenizer.pad_token_id, seed
            )

        return RolloutSource(
            self.contexts,
            self.tokenizer,
            self.eos_ids,
            self.device,
            generate,
            self.count_generated,
            self.sampling,
            generate_with,
        )

    def teacher_prompts(self, batch: Mapping, episodes: Episodes, seed: int) -> TeacherPrompts:
        tools = ContextTools(
            self.contexts,
            self.tokenizer,
            self.model,
            self.teacher,
            self.eos_ids,
            self.device,
            seed,
            self.count_generated,
        )
        return self.teacher_context.build(batch, episodes, tools)

    def gradient_sync(self, sync: bool) -> AbstractContextManager:
        """Around a backward: with `sync=False` under DDP its gradients only accumulate locally (`no_sync`),
        and the next synced backward all-reduces their sum. A no-op on one device or another strategy."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if sync or not isinstance(strategy, ParallelStrategy):
            return nullcontext()
        return strategy.block_backward_sync()

    def after_optimizer_step(self) -> None:
        if self.teacher is not None:
            self.teacher.after_optimizer_step(self.model)

    # ---- benchmark evaluation ------------------------------------------------------------------
    def _evaluate(self, batch: Mapping, batch_idx: int, stage: str, dataloader_idx: int) -> None:
        self.evaluation.update(
            stage,
            dataloader_idx,
            batch,
            batch_idx,
            self.model,
            self.tokenizer,
            self.contexts,
            self.eos_ids,
            self.engine,
            self.seed,
        )

    def _log_eval_metrics(self, stage: str) -> None:
        for name, value in self.evaluation.compute(stage):
            prog_bar = name.rsplit("/", 1)[-1].startswith("avg@")
            self.log(name, value, prog_bar=prog_bar, add_dataloader_idx=False, sync_dist=False)

    def validation_step(self, batch: Mapping, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, batch_idx, "val", dataloader_idx)

    def test_step(self, batch: Mapping, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, batch_idx, "test", dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_eval_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval_metrics("test")

    def configure_callbacks(self) -> list[L.Callback]:
        # Lightning asks again at every fit/validate/test on the same trainer; attaching it once keeps its
        # "callbacks ... will override existing callbacks" notice out of the run's output.
        trainer = self._trainer
        attached = trainer is not None and any(
            isinstance(callback, EngineLifecycle) and callback.engine is self.engine
            for callback in trainer.callbacks
        )
        return [] if attached else [EngineLifecycle(self.engine)]


def active_terms(terms: Sequence[ObjectiveTerm], sampler: Sampler) -> list[ObjectiveTerm]:
    """The terms of weight > 0 (at least one), each of whose needs the sampler meets."""
    active = [term for term in terms if term.weight > 0]
    if not active:
        raise ValueError(
            "algorithm.terms: no objective term with a weight > 0, so nothing would be trained (e.g. "
            "algorithm.reward_weight=0 and algorithm.distill_weight=0: one of them must be > 0)"
        )
    for term in active:
        if term.needs_advantages and sampler.group_size < 2:
            raise ValueError(
                f"the {type(term).__name__} term needs group advantages, which {type(sampler).__name__} does "
                "not compute: use algorithm.sampler=GroupSampler (as algorithm=grpo and algorithm=hybrid do)"
            )
    return active


def check_context(context: TeacherContext, sampler: Sampler) -> None:
    """A context that reads the episodes' groups needs a sampler that draws groups."""
    if context.needs_groups and sampler.group_size < 2:
        raise ValueError(
            f"{type(context).__name__} reads each group's graded rollouts; {type(sampler).__name__} draws "
            "one rollout per problem: use it with a group sampler (algorithm=ssopd or algorithm=hybrid)"
        )


def build_part(node: Mapping) -> Any:
    """A part from its config node, raising the part's own error (not Hydra's wrapper around it), so the
    pre-flight check says what building the module would say."""
    try:
        return instantiate(node)
    except InstantiationException as err:
        if isinstance(err.__cause__, ValueError):
            raise err.__cause__ from None
        raise


def sum_weighted(terms: Sequence[ObjectiveTerm], results: Sequence[TermSum]) -> torch.Tensor:
    """Σ weight · term sum, a term of weight 1 taken as it is."""
    parts = [
        result.loss_sum if term.weight == 1 else term.weight * result.loss_sum
        for term, result in zip(terms, results, strict=True)
    ]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def union(results: Sequence[TermSum]) -> torch.Tensor:
    """The tokens any term supervised: the step's token mean divides by their count."""
    mask = results[0].mask
    for result in results[1:]:
        mask = mask | result.mask
    return mask


@dataclasses.dataclass
class TermTotals:
    """A term's sums over a micro-batch's slices: its loss, its statistics, its tokens, its diagnostics."""

    loss: float = 0.0
    tokens: int = 0
    sums: dict[str, float] = dataclasses.field(default_factory=dict)
    diagnostics: TokenDiagnostics | None = None

    def add(self, result: TermSum) -> None:
        self.loss += float(result.loss_sum.detach())
        self.tokens += int(result.mask.sum())
        for key, value in result.sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        if result.diagnostics is not None:
            self.diagnostics = (
                result.diagnostics if self.diagnostics is None else self.diagnostics + result.diagnostics
            )

    def means(self, name: str) -> dict[str, float]:
        """Per token of this term: its loss as `name`, each statistic, and the diagnostics' means."""
        tokens = max(self.tokens, 1)
        means = {name: self.loss / tokens, **{key: value / tokens for key, value in self.sums.items()}}
        if self.diagnostics is not None:
            means.update(self.diagnostics.means())
        return means
