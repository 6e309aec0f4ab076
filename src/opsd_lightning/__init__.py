"""opsd-lightning: On-Policy Self-Distillation of language models with PyTorch Lightning and Hydra."""

from opsd_lightning.evaluation.grading import extract_answer, grade

__version__ = "0.1.0"
__all__ = ["__version__", "extract_answer", "grade"]
