"""Optional LoRA through `peft` (`conf/peft/lora.yaml`); `peft=none` leaves the model as it is."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn


def apply_peft(model: nn.Module, peft_cfg: Mapping[str, Any] | None) -> nn.Module:
    """Wrap `model` with LoRA adapters when a peft config is given (the base weights are then θ0)."""
    if not peft_cfg:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:  # pragma: no cover - peft is a dependency, but may be removed by a user
        raise ImportError("peft=lora needs the `peft` package: pip install peft") from err
    settings = dict(peft_cfg)
    settings.pop("_target_", None)
    settings["target_modules"] = list(settings.get("target_modules") or [])
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **settings))
