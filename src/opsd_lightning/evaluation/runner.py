"""Scoring completions on benchmark problems: sample k completions per problem from the student
context (the same rendering as training), extract the last boxed answer, grade it.

`context=teacher` samples with the reference solution in view instead: how well the teacher solves
the problem, which bounds what OPSD can distil. With an `environment` (e.g. data=arith_tools), each sample is
a multi-turn episode with tools (`evaluation/episodes.py`), graded on its final answer the same way."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from opsd_lightning.contexts.renderer import ContextRenderer
from opsd_lightning.evaluation.answers import extract_answer
from opsd_lightning.evaluation.grading import grade
from opsd_lightning.options import build_settings
from opsd_lightning.rollout import HFEngine, RolloutEngine, SamplingConfig

if TYPE_CHECKING:
    from opsd_lightning.environments.base import Environment


@dataclass
class EvalSettings:
    """How benchmarks are evaluated (`evaluation:` in the configs).

    The paper samples at temperature 1.0 and reports avg@k; `ks` adds pass@k and maj@k.
    `batch_size` counts sequences per `generate` call (problems x num_samples); None sends a rank's whole
    shard of each benchmark in one call (for engines that schedule their own batches: vLLM).
    """

    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0))
    num_samples: int = 4
    ks: list[int] = field(default_factory=lambda: [1])
    batch_size: int | None = 256
    grade_timeout_s: float = 5.0
    context: str = "student"  # "teacher": the reference solution in view (an upper bound for OPSD)

    def __post_init__(self) -> None:
        self.sampling = build_settings(SamplingConfig, self.sampling, "sampling")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"evaluation.batch_size={self.batch_size} must be >= 1 (or null: a whole shard)")
        if self.num_samples < 1:
            raise ValueError(f"evaluation.num_samples={self.num_samples} must be >= 1")
        bad = [k for k in self.ks if not 1 <= k <= self.num_samples]
        if bad:
            raise ValueError(
                f"evaluation.ks={list(self.ks)}: each k must be in [1, num_samples={self.num_samples}]"
            )
        if self.context not in ("student", "teacher"):
            raise ValueError(f"evaluation.context={self.context!r}: use 'student' or 'teacher'")
        self.ks = list(dict.fromkeys(self.ks))  # [1, num_samples] with num_samples=1 is just [1]

    def metric_name(self, key: str) -> str:
        """`avg@n` from the metrics carries the actual number of samples in reports and logs."""
        return f"avg@{self.num_samples}" if key == "avg@n" else key

    @property
    def problems_per_batch(self) -> int | None:
        """Problems per `generate` call; None: all of them."""
        return None if self.batch_size is None else max(1, self.batch_size // self.num_samples)


@dataclass
class ProblemResult:
    """Everything evaluated for one problem (one line of the per-problem JSONL)."""

    id: str
    problem: str
    reference: str
    completions: list[str]
    answers: list[str | None]
    correct: list[bool]
    lengths: list[int]
    truncated: list[bool]
    # In an environment, each sample's episode record (evaluation/episodes.py); None for single-turn samples.
    episodes: list[dict[str, Any]] | None = None

    def to_json(self) -> dict:
        record = asdict(self)
        if self.episodes is None:
            del record["episodes"]  # single-turn records keep their keys
        return record


def as_settings(value: EvalSettings | Mapping | None) -> EvalSettings:
    if value is None:
        return EvalSettings()
    return value if isinstance(value, EvalSettings) else EvalSettings(**value)


@torch.no_grad()
def score_problems(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    contexts: ContextRenderer,
    batch: Mapping[str, Sequence[str]],
    settings: EvalSettings,
    eos_ids: Sequence[int],
    seed: int | None,
    engine: RolloutEngine | None = None,
    environment: Environment | None = None,
) -> list[ProblemResult]:
    """Sample `num_samples` completions for each problem of a raw-text batch (with `engine`, default
    Hugging Face `generate`) and grade them; with `environment`, each one is a multi-turn episode in it
    (`contexts` must then render its tools: `rollout.multi_turn.environment_contexts`)."""
    k = settings.num_samples
    problems = list(batch["problem"])
    references = list(batch.get("answer") or [""] * len(problems))
    ids = list(batch.get("id") or [str(index) for index in range(len(problems))])
    device = next(model.parameters()).device
    repeated = [p for p in problems for _ in range(k)]
    solutions = None
    if settings.context == "teacher":
        if not batch.get("solution"):
            raise ValueError(
                "evaluation.context=teacher needs reference solutions, and this benchmark has none "
                "(its rows carry no 'solution'); use evaluation.context=student"
            )
        solutions = [s for s in batch["solution"] for _ in range(k)]
    engine = engine if engine is not None else HFEngine()
    episodes = None
    if environment is not None:
        # Here, not at the top: the environments import evaluation.grading, which imports this package.
        from opsd_lightning.evaluation.episodes import sample_episodes

        texts, lengths, truncated, episodes = sample_episodes(
            model,
            tokenizer,
            contexts,
            repeated,
            solutions,
            settings.sampling,
            eos_ids,
            seed,
            engine,
            environment,
        )
    else:
        if solutions is not None:
            prompt = contexts.teacher_batch(repeated, solutions).to(device)
        else:
            prompt = contexts.student_batch(repeated).to(device)
        rollout = engine.generate(model, prompt, settings.sampling, eos_ids, tokenizer.pad_token_id, seed)
        texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        lengths, truncated = rollout.lengths.tolist(), rollout.truncated.tolist()
    results = []
    for index, (problem_id, problem, reference) in enumerate(zip(ids, problems, references, strict=True)):
        span = slice(index * k, (index + 1) * k)
        answers = [extract_answer(text) for text in texts[span]]
        results.append(
            ProblemResult(
                id=str(problem_id),
                problem=problem,
                reference=reference,
                completions=texts[span],
                answers=answers,
                correct=[grade(a, reference, timeout_s=settings.grade_timeout_s) for a in answers],
                lengths=[int(n) for n in lengths[span]],
                truncated=[bool(t) for t in truncated[span]],
                episodes=None if episodes is None else episodes[span],
            )
        )
    return results
