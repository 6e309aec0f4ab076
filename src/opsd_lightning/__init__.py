"""opsd-lightning: On-Policy Self-Distillation of language models with PyTorch Lightning and Hydra."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__", "extract_answer", "grade"]


def __getattr__(name: str):
    # Lazy, so that importing a submodule (the losses, the rollouts) does not need the grading stack.
    if name in ("extract_answer", "grade"):
        from opsd_lightning.evaluation import grading

        return getattr(grading, name)
    raise AttributeError(f"module 'opsd_lightning' has no attribute {name!r}")
