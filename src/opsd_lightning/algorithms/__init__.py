"""LightningModules: one per training algorithm."""

from opsd_lightning.algorithms.base import PolicyModule
from opsd_lightning.algorithms.opsd import OPSDModule

__all__ = ["OPSDModule", "PolicyModule"]
