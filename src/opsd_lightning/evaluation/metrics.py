"""Benchmark metrics over n sampled completions per problem: avg@n, pass@k, maj@k and completion statistics.

`BenchmarkMetrics` is a `torchmetrics.Metric`, so its states are summed across DDP ranks in `compute()`.
Lightning cannot log a dict-valued metric object directly; at epoch end compute, log each value, then reset:

    values = self.benchmark_metrics.compute()
    self.log_dict({f"val/{name}": value for name, value in values.items()})
    self.benchmark_metrics.reset()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torchmetrics import Metric

if TYPE_CHECKING:
    from opsd_lightning.evaluation.runner import ProblemResult


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: `1 - C(n-c, k) / C(n, k)` (Chen et al. 2021).

    The chance that at least one of k samples drawn without replacement from the n is correct.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"k={k} is larger than the number of samples n={n}")
    # Exact integers; Python's int / int division rounds the ratio correctly even for huge binomials.
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_vote(
    answers: Sequence[str | None], correct: Sequence[bool], equivalent: Callable[[str, str], bool]
) -> bool:
    """Whether the most common answer is correct; samples without an answer (None) do not vote.

    Answers are grouped greedily: each joins the first group whose representative (first member) it is
    `equivalent` to. The largest group wins, ties going to the group that appeared first; it counts as
    correct when any of its members was graded correct. No answers at all gives False.
    """
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags")
    representatives: list[str] = []
    sizes: list[int] = []
    group_correct: list[bool] = []
    for answer, is_correct in zip(answers, correct, strict=True):
        if answer is None:
            continue
        for index, representative in enumerate(representatives):
            if equivalent(representative, answer):
                sizes[index] += 1
                group_correct[index] = group_correct[index] or bool(is_correct)
                break
        else:
            representatives.append(answer)
            sizes.append(1)
            group_correct.append(bool(is_correct))
    if not sizes:
        return False
    # list.index of the max returns the first group reaching it: ties go to the earliest group.
    return group_correct[sizes.index(max(sizes))]


def _exact_match(first: str, second: str) -> bool:
    return first == second


class BenchmarkMetrics(Metric):
    """avg@n, pass@k, maj@k, format rate, mean completion length and truncation rate of a benchmark.

    `update` takes scored problems (`ProblemResult`s): per problem, the n sampled completions' correctness,
    extracted answers (None when none was found), lengths in tokens and truncation flags. "avg@n" is named
    literally: n is the number of samples per problem, and the value is the mean correctness over all
    samples of all problems. pass@k and maj@k only average over problems with at least k samples; maj@k
    votes over the first k samples.
    Metrics with no data compute to nan. See the module docstring for logging from a LightningModule.

    With `episodes=True` (evaluation in an environment), every result carries its samples' episode records
    (`evaluation/episodes.py`) and three more metrics come out: `tool_calls` (calls run per episode),
    `tool_error_rate` (calls answered with an error / calls run; nan without calls) and `turns` (model turns
    per episode).

    Args:
        ks: the k values for pass@k and maj@k, each >= 1 (duplicates are dropped).
        equivalent: whether two extracted answers are the same for majority voting; exact string
            equality by default (pass a math-aware grader for real benchmarks).
        episodes: whether the results are multi-turn episodes, with the tool metrics above.
        **kwargs: forwarded to `torchmetrics.Metric` (e.g. `sync_on_compute`, `process_group`).
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    correct_sum: torch.Tensor
    sample_count: torch.Tensor
    pass_sum: torch.Tensor
    maj_sum: torch.Tensor
    problem_count: torch.Tensor
    format_sum: torch.Tensor
    length_sum: torch.Tensor
    truncated_sum: torch.Tensor
    tool_call_sum: torch.Tensor
    tool_error_sum: torch.Tensor
    turn_sum: torch.Tensor

    def __init__(
        self,
        ks: Sequence[int] = (1,),
        equivalent: Callable[[str, str], bool] | None = None,
        episodes: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.episodes = episodes
        self.ks = list(dict.fromkeys(int(k) for k in ks))
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be a non-empty sequence of integers >= 1, got {list(ks)}")
        self.equivalent = equivalent if equivalent is not None else _exact_match
        # float64 sums: counts stay exact far past float32's 2**24, and pass@k fractions add up cleanly.
        scalar_states = ("correct_sum", "sample_count", "format_sum", "length_sum", "truncated_sum")
        scalar_states += ("tool_call_sum", "tool_error_sum", "turn_sum") if episodes else ()
        for name in scalar_states:
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        # One entry per k: a k larger than some problems' n averages over the eligible problems only.
        for name in ("pass_sum", "maj_sum", "problem_count"):
            self.add_state(name, default=torch.zeros(len(self.ks), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, results: Sequence[ProblemResult]) -> None:
        """Add a batch of scored problems (each with the values of its n samples)."""
        correct_sum = sample_count = format_sum = length_sum = truncated_sum = 0
        pass_sum = [0.0] * len(self.ks)
        maj_sum = [0] * len(self.ks)
        problem_count = [0] * len(self.ks)
        tools = {"tool_call_sum": 0, "tool_error_sum": 0, "turn_sum": 0}
        for result in results:
            n = len(result.correct)
            if n == 0 or not n == len(result.answers) == len(result.lengths) == len(result.truncated):
                raise ValueError("every problem needs the same number (>= 1) of flags, answers and lengths")
            c = sum(bool(flag) for flag in result.correct)
            correct_sum += c
            sample_count += n
            format_sum += sum(answer is not None for answer in result.answers)
            length_sum += sum(int(length) for length in result.lengths)
            truncated_sum += sum(bool(flag) for flag in result.truncated)
            if self.episodes:
                _add_episodes(tools, result.episodes, n)
            for index, k in enumerate(self.ks):
                if n < k:
                    continue
                problem_count[index] += 1
                pass_sum[index] += pass_at_k(n, c, k)
                # The first k samples, not a random subset, so maj@k is deterministic.
                maj_sum[index] += majority_vote(result.answers[:k], result.correct[:k], self.equivalent)
        for name, value in (
            ("correct_sum", correct_sum),
            ("sample_count", sample_count),
            ("format_sum", format_sum),
            ("length_sum", length_sum),
            ("truncated_sum", truncated_sum),
            ("pass_sum", pass_sum),
            ("maj_sum", maj_sum),
            ("problem_count", problem_count),
            *(tools.items() if self.episodes else ()),
        ):
            state = getattr(self, name)
            setattr(self, name, state + torch.tensor(value, dtype=state.dtype, device=state.device))

    def compute(self) -> dict[str, torch.Tensor]:
        """avg@n, pass@{k}, maj@{k}, format_rate, completion_length, truncation_rate (and with `episodes`,
        tool_calls, tool_error_rate, turns) as float32 scalars."""
        values = {
            "avg@n": _ratio(self.correct_sum, self.sample_count),
            **{f"pass@{k}": _ratio(self.pass_sum[i], self.problem_count[i]) for i, k in enumerate(self.ks)},
            **{f"maj@{k}": _ratio(self.maj_sum[i], self.problem_count[i]) for i, k in enumerate(self.ks)},
            "format_rate": _ratio(self.format_sum, self.sample_count),
            "completion_length": _ratio(self.length_sum, self.sample_count),
            "truncation_rate": _ratio(self.truncated_sum, self.sample_count),
        }
        if self.episodes:
            values["tool_calls"] = _ratio(self.tool_call_sum, self.sample_count)
            values["tool_error_rate"] = _ratio(self.tool_error_sum, self.tool_call_sum)
            values["turns"] = _ratio(self.turn_sum, self.sample_count)
        # float32 so every logger and device (MPS has no float64) accepts the values.
        return {name: value.float() for name, value in values.items()}


def _add_episodes(sums: dict[str, int], episodes: Sequence[dict] | None, n: int) -> None:
    """Add one problem's episodes' tool calls, tool errors and turns to `sums`."""
    if episodes is None or len(episodes) != n:
        raise ValueError(
            f"BenchmarkMetrics(episodes=True) needs one episode record per sample ({n}), got "
            f"{'none' if episodes is None else len(episodes)}: score the problems with an environment"
        )
    for episode in episodes:
        calls = [turn["tool_call"] for turn in episode["turns"] if turn["tool_call"] is not None]
        sums["tool_call_sum"] += len(calls)
        sums["tool_error_sum"] += sum(bool(call["error"]) for call in calls)
        sums["turn_sum"] += len(episode["turns"])


def _ratio(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """`total / count`, nan where there is no data."""
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))
