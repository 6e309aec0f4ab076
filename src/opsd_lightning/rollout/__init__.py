"""On-policy rollouts: one engine interface (`RolloutEngine`), one file per engine (`hf`, `vllm`)."""

from opsd_lightning.rollout.core import (
    Rollout,
    SamplingConfig,
    completion_mask_from_ids,
    rollout_from_token_lists,
)
from opsd_lightning.rollout.engine import RolloutEngine
from opsd_lightning.rollout.hf import HFEngine, eval_mode, generate_rollouts, seeded
from opsd_lightning.rollout.vllm import VLLMEngine

__all__ = [
    "HFEngine",
    "Rollout",
    "RolloutEngine",
    "SamplingConfig",
    "VLLMEngine",
    "completion_mask_from_ids",
    "eval_mode",
    "generate_rollouts",
    "rollout_from_token_lists",
    "seeded",
]
