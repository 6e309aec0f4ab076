"""LightningModules: one per training algorithm."""

from opsd_lightning.algorithms.base import PolicyModule
from opsd_lightning.algorithms.grpo import GRPOModule
from opsd_lightning.algorithms.hybrid import HybridModule
from opsd_lightning.algorithms.opsd import OPSDModule
from opsd_lightning.algorithms.sft import SFTModule

__all__ = ["GRPOModule", "HybridModule", "OPSDModule", "PolicyModule", "SFTModule"]
