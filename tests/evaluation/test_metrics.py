"""Pin pass@k, majority voting and BenchmarkMetrics with hand-computed tables and a 2-process DDP sync."""

from __future__ import annotations

import datetime
import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from opsd_lightning.evaluation.metrics import BenchmarkMetrics, majority_vote, pass_at_k
from opsd_lightning.evaluation.runner import ProblemResult


def _float_equal(first: str, second: str) -> bool:
    return float(first) == float(second)


def _exact(first: str, second: str) -> bool:
    return first == second


# ---------------------------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 0.4),
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2) = 0.7
        (5, 0, 3, 0.0),
        (5, 5, 3, 1.0),
        (5, 3, 3, 1.0),  # n - c = 2 < k: every 3-subset holds a correct sample
        (4, 1, 4, 1.0),
        (1, 0, 1, 0.0),
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("n", "k"), [(n, k) for n in range(1, 8) for k in range(1, n + 1)])
def test_pass_at_k_matches_enumerating_every_k_subset(n, k):
    for c in range(n + 1):
        # Samples 0..c-1 are the correct ones; pass@k is the share of k-subsets that hold one of them.
        subsets = list(itertools.combinations(range(n), k))
        brute_force = sum(min(subset) < c for subset in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute_force, abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5, abs=1e-12)
    assert pass_at_k(1000, 0, 500) == 0.0


@pytest.mark.parametrize(("n", "c", "k"), [(3, 0, 4), (3, 1, 0), (3, 4, 1), (3, -1, 1)])
def test_pass_at_k_rejects_invalid_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# ---------------------------------------------------------------------------------------- majority vote


def test_majority_vote_tie_goes_to_the_first_group():
    assert majority_vote(["a", "b", "b", "a"], [False, True, True, False], _exact) is False
    assert majority_vote(["b", "a", "a", "b"], [True, False, False, True], _exact) is True


def test_majority_vote_wrong_majority_with_a_right_sample_is_false():
    assert majority_vote(["3", "3", "4"], [False, False, True], _exact) is False


def test_majority_vote_ignores_missing_answers():
    # The two None samples are graded correct but do not vote, so the lone wrong answer wins.
    assert majority_vote([None, None, "x"], [True, True, False], _exact) is False
    assert majority_vote([None, "y", None, "x", "y"], [False, True, False, False, True], _exact) is True
    assert majority_vote([None, None], [False, False], _exact) is False
    assert majority_vote([], [], _exact) is False


def test_majority_vote_groups_equivalent_but_different_strings():
    answers, correct = ["1", "0.5", ".5"], [False, False, True]
    # "0.5" and ".5" form the largest group; it is correct because one member is.
    assert majority_vote(answers, correct, _float_equal) is True
    # Under string equality all three are singletons and the first ("1", wrong) wins the tie.
    assert majority_vote(answers, correct, _exact) is False


def test_majority_vote_compares_with_the_group_representative_only():
    def within_one(first: str, second: str) -> bool:
        return abs(int(first) - int(second)) <= 1

    # "2" joins "1"'s group; "3" is compared with the representative "1" only, so it opens a group that
    # "3" and "3" grow to size 3, beating {"1", "2"}.
    assert majority_vote(["1", "2", "3", "3", "3"], [True, True, False, False, False], within_one) is False


def test_majority_vote_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        majority_vote(["a"], [True, False], _exact)


# ------------------------------------------------------------------------------------ BenchmarkMetrics

# 3 problems, n = 4 samples each.
HAND_CORRECT = [
    [True, False, True, False],
    [False, True, False, False],
    [False, True, True, True],
]
HAND_ANSWERS = [
    ["4", "5", "4", None],
    ["7", "3", "7", "8"],
    [None, "2", "2", "2"],
]
HAND_LENGTHS = [[10, 20, 30, 40], [5, 5, 5, 5], [1, 2, 3, 4]]
HAND_TRUNCATED = [
    [False, False, False, True],
    [False, False, False, False],
    [False, True, False, True],
]
# Per problem: c = 2, 1, 3.
#   pass@1 = c/4          = 1/2, 1/4, 3/4               -> mean 1/2
#   pass@2 = 1 - C(4-c,2)/6 = 5/6, 1/2, 1               -> mean 7/9
#   pass@4 = 1 for all (c >= 1)                         -> 1
#   maj@1: "4" right, "7" wrong, None (no vote) -> F    -> 1/3
#   maj@2: {4,5} tie -> "4" right; {7,3} tie -> "7" wrong; [None, "2"] -> "2" right -> 2/3
#   maj@4: "4"x2 right; "7"x2 wrong (beats "3", "8"); "2"x3 right -> 2/3
#   pass@8 / maj@8: no problem has 8 samples -> nan
HAND_EXPECTED = {
    "avg@n": 6 / 12,
    "pass@1": 1 / 2,
    "pass@2": 7 / 9,
    "pass@4": 1.0,
    "pass@8": math.nan,
    "maj@1": 1 / 3,
    "maj@2": 2 / 3,
    "maj@4": 2 / 3,
    "maj@8": math.nan,
    "format_rate": 10 / 12,
    "completion_length": (100 + 20 + 10) / 12,
    "truncation_rate": 3 / 12,
}
HAND_KS = (1, 2, 4, 8)


def _assert_values(values: dict[str, torch.Tensor], expected: dict[str, float]) -> None:
    assert set(values) == set(expected)
    for name, value in values.items():
        assert value.dtype == torch.float32 and value.shape == (), name
        torch.testing.assert_close(value, torch.tensor(expected[name]), equal_nan=True, msg=name)


def _hand_metric(**kwargs) -> BenchmarkMetrics:
    return BenchmarkMetrics(ks=HAND_KS, **kwargs)


def scored(correct, answers, lengths, truncated) -> list[ProblemResult]:
    """`ProblemResult`s (what `update` takes) from per-problem columns."""
    return [
        ProblemResult(
            str(index), "p", "r", [""] * len(flags), list(said), list(flags), list(sizes), list(cut)
        )
        for index, (flags, said, sizes, cut) in enumerate(
            zip(correct, answers, lengths, truncated, strict=True)
        )
    ]


HAND = scored(HAND_CORRECT, HAND_ANSWERS, HAND_LENGTHS, HAND_TRUNCATED)


def test_benchmark_metrics_hand_table():
    metric = _hand_metric()
    metric.update(HAND)
    _assert_values(metric.compute(), HAND_EXPECTED)


def test_benchmark_metrics_several_updates_equal_one():
    metric = _hand_metric()
    for start, stop in [(0, 1), (1, 1), (1, 3)]:
        metric.update(HAND[start:stop])
    single = _hand_metric()
    single.update(HAND)
    split_values, single_values = metric.compute(), single.compute()
    for name in single_values:
        assert torch.equal(split_values[name], single_values[name]) or (
            split_values[name].isnan() and single_values[name].isnan()
        ), name


def test_benchmark_metrics_reset_forgets_earlier_updates():
    metric = _hand_metric()
    metric.update(scored([[False] * 4] * 5, [[None] * 4] * 5, [[99] * 4] * 5, [[True] * 4] * 5))
    metric.compute()
    metric.reset()
    metric.update(HAND)
    _assert_values(metric.compute(), HAND_EXPECTED)


def test_benchmark_metrics_counts_problems_per_k():
    metric = BenchmarkMetrics(ks=(1, 3))
    # Problem 1 has n = 1 (too few for k = 3), problem 2 has n = 3 with c = 1.
    metric.update(
        scored(
            correct=[[True], [False, True, False]],
            answers=[["1"], ["2", "3", "2"]],
            lengths=[[4], [1, 2, 3]],
            truncated=[[False], [False, False, True]],
        )
    )
    values = metric.compute()
    torch.testing.assert_close(values["pass@1"], torch.tensor((1 + 1 / 3) / 2))
    torch.testing.assert_close(values["pass@3"], torch.tensor(1.0))  # over problem 2 only
    torch.testing.assert_close(values["maj@1"], torch.tensor(0.5))
    torch.testing.assert_close(values["maj@3"], torch.tensor(0.0))  # "2" x2 wrong over "3" right
    torch.testing.assert_close(values["avg@n"], torch.tensor(2 / 4))
    torch.testing.assert_close(values["completion_length"], torch.tensor(10 / 4))


def test_benchmark_metrics_uses_the_given_equivalence():
    results = scored([[False, False, True]], [["1", "0.5", ".5"]], [[1, 1, 1]], [[False] * 3])
    exact, numeric = BenchmarkMetrics(ks=(3,)), BenchmarkMetrics(ks=(3,), equivalent=_float_equal)
    exact.update(results)
    numeric.update(results)
    assert exact.compute()["maj@3"].item() == 0.0
    assert numeric.compute()["maj@3"].item() == 1.0


def test_benchmark_metrics_validates_inputs():
    with pytest.raises(ValueError, match="ks"):
        BenchmarkMetrics(ks=(0, 1))
    with pytest.raises(ValueError, match="ks"):
        BenchmarkMetrics(ks=())
    assert BenchmarkMetrics(ks=(2, 1, 2)).ks == [2, 1]
    metric = BenchmarkMetrics()
    with pytest.raises(ValueError, match="same number"):
        metric.update(scored([[True, False]], [["1"]], [[1, 2]], [[False, False]]))
    with pytest.raises(ValueError, match="same number"):
        metric.update(scored([[True]], [["1"]], [[1]], [[]]))
    with pytest.raises(ValueError, match="same number"):
        metric.update(scored([[]], [[]], [[]], [[]]))


# ------------------------------------------------------------------------------------------------- DDP

DDP_KS = (1, 2, 4)


def _ddp_problems() -> list[tuple[list[bool], list[str | None], list[int], list[bool]]]:
    """A deterministic mix of problems with n from 2 to 6, so k = 4 skips some of them."""
    generator = torch.Generator().manual_seed(0)
    problems = []
    for index in range(13):
        n = 2 + index % 5
        answer_ids = torch.randint(0, 4, (n,), generator=generator).tolist()
        answers = [None if answer_id == 0 else str(answer_id) for answer_id in answer_ids]
        correct = [answer == "1" for answer in answers]
        lengths = torch.randint(1, 100, (n,), generator=generator).tolist()
        truncated = (torch.rand(n, generator=generator) < 0.3).tolist()
        problems.append((correct, answers, lengths, truncated))
    return problems


def _update_with(metric: BenchmarkMetrics, problems) -> None:
    # Two calls per rank with uneven sizes, so per-rank call counts differ too.
    for chunk in (problems[:2], problems[2:]):
        metric.update(scored(*zip(*chunk, strict=True)))


def _ddp_worker(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        metric = BenchmarkMetrics(ks=DDP_KS)
        _update_with(metric, _ddp_problems()[rank::world_size])
        torch.save(metric.compute(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_benchmark_metrics_sync_across_two_processes(tmp_path):
    mp.spawn(
        _ddp_worker,
        args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)),
        nprocs=2,
        join=True,
    )
    single = BenchmarkMetrics(ks=DDP_KS)
    _update_with(single, _ddp_problems())
    expected = single.compute()
    assert not any(value.isnan() for value in expected.values())
    # Guard against a vacuous pass: one rank's half alone must give different values.
    half = BenchmarkMetrics(ks=DDP_KS)
    _update_with(half, _ddp_problems()[0::2])
    assert any(not torch.equal(value, expected[name]) for name, value in half.compute().items())
    for rank in range(2):
        values = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(values) == set(expected)
        for name, value in values.items():
            assert torch.equal(value, expected[name]), (rank, name, value, expected[name])
