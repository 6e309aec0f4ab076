"""Answers, grading and held-out accuracy."""

from opsd_lightning.evaluation.answers import answers_match, extract_answer

__all__ = ["answers_match", "extract_answer"]
