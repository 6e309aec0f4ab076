"""opsd-lightning: On-Policy Self-Distillation of language models with PyTorch Lightning and Hydra."""

from opsd_lightning.evaluation.answers import extract_answer

__version__ = "0.1.0"
__all__ = ["extract_answer", "__version__"]
