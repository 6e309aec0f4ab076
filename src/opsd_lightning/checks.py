"""Config checks that run before any data or model is loaded, so a typo in a sweep fails in a second with
the option's name and its valid range, not after minutes of loading (or, worse, not at all)."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from opsd_lightning.evaluation.runner import EvalSettings
from opsd_lightning.options import build_settings
from opsd_lightning.prompt_budget import PromptBudget

log = logging.getLogger(__name__)

# Config groups whose options are alternatives: a list of them (teacher=[fixed,ema]) would silently merge.
EXCLUSIVE_GROUPS = ("algorithm", "divergence", "teacher", "model", "peft", "data", "trainer")


def check_config(cfg: DictConfig) -> None:
    """Raise ValueError/ImportError naming the option for anything wrong that can be seen from the config.

    Every range is checked by the object that owns the option, built here from the resolved config exactly
    as the run will build it: nothing is restated here.
    """
    _check_one_choice_per_group()
    divergence = instantiate(cfg.divergence) if cfg.get("divergence") else None
    for group in ("teacher", "rollout"):  # their constructors hold their ranges; engines start lazily
        if cfg.get(group):
            instantiate(cfg[group])
    build_settings(EvalSettings, _resolved(cfg.evaluation), "evaluation")
    algorithm = get_class(cfg.algorithm._target_)
    if hasattr(algorithm, "check_options"):  # a user's own LightningModule may have none
        algorithm.check_options(_resolved(cfg.algorithm))
    context = _resolved(cfg.get("context") or {})
    PromptBudget(**{key: context[key] for key in ("max_prompt_tokens", "overlong") if key in context})
    if cfg.get("peft") and importlib.util.find_spec("peft") is None:
        raise ImportError(
            "peft=lora needs the `peft` package (the fixed teacher is the model with its adapters disabled): "
            "pip install peft, or choose peft=none"
        )
    vocabulary = vocabulary_size(cfg.model)
    if divergence is not None and vocabulary is not None:
        divergence.check_vocabulary(vocabulary)


def _resolved(node: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]


def _check_one_choice_per_group() -> None:
    if not HydraConfig.initialized():
        return
    # Hydra records no choice for a list, so read the command line's overrides.
    for override in HydraConfig.get().overrides.task:
        group, _, choice = override.lstrip("+~").partition("=")
        if group in EXCLUSIVE_GROUPS and choice.startswith("["):
            raise ValueError(
                f"{group}={choice} selects several {group} configs at once, and Hydra would merge them into "
                f"one; choose one (to compare them, sweep: opsd-train -m {group}=a,b)"
            )


def vocabulary_size(model: DictConfig) -> int | None:
    """The vocabulary from the config alone (no weights); None when that needs a download."""
    target = str(model.get("_target_", ""))
    if target.endswith("build_tiny") and not model.get("tokenizer_path"):
        return int(model.tokenizer_vocab_size)
    folder = model.get("tokenizer_path") or model.get("name_or_path")
    config = Path(str(folder)) / "config.json" if folder else None
    if config is not None and config.is_file():
        return json.loads(config.read_text()).get("vocab_size")
    tokenizer = Path(str(folder)) / "tokenizer.json" if folder else None
    if tokenizer is not None and tokenizer.is_file():
        content = json.loads(tokenizer.read_text())
        return len(content["model"]["vocab"]) + len(content.get("added_tokens", []))
    return None
