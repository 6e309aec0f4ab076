"""Answers, grading, benchmarks, metrics and the evaluation loop."""

from opsd_lightning.evaluation.answers import extract_answer
from opsd_lightning.evaluation.benchmarks import ArithBenchmark, Benchmark, DatasetBenchmark, HeldOutSplit
from opsd_lightning.evaluation.grading import answers_equivalent, grade
from opsd_lightning.evaluation.loaders import WithBenchmarks
from opsd_lightning.evaluation.metrics import BenchmarkMetrics, majority_vote, pass_at_k
from opsd_lightning.evaluation.runner import EvalSettings, ProblemResult, score_problems

__all__ = [
    "ArithBenchmark",
    "Benchmark",
    "BenchmarkMetrics",
    "DatasetBenchmark",
    "EvalSettings",
    "HeldOutSplit",
    "ProblemResult",
    "WithBenchmarks",
    "answers_equivalent",
    "extract_answer",
    "grade",
    "majority_vote",
    "pass_at_k",
    "score_problems",
]
