"""Config checks that run before any data or model is loaded, so a typo in a sweep fails in a second with
the option's name and its valid range, not after minutes of loading (or, worse, not at all)."""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from opsd_lightning.contexts import OVERLONG_POLICIES
from opsd_lightning.evaluation.runner import EvalSettings
from opsd_lightning.losses import TopK
from opsd_lightning.losses.chunked import LossSettings
from opsd_lightning.rollout import SamplingConfig

log = logging.getLogger(__name__)

# Config groups whose options are alternatives: a list of them (teacher=[fixed,ema]) would silently merge.
EXCLUSIVE_GROUPS = ("algorithm", "divergence", "teacher", "model", "peft", "data", "trainer")


def check_config(cfg: DictConfig) -> None:
    """Raise ValueError/ImportError naming the option for anything wrong that can be seen from the config."""
    _check_one_choice_per_group()
    for group in ("divergence", "teacher"):  # their constructors hold the range checks (beta, decay, k)
        if cfg.get(group):
            instantiate(cfg[group])
    EvalSettings(**OmegaConf.to_container(cfg.evaluation, resolve=True))
    _check_algorithm(cfg.algorithm)
    _check_context(cfg.get("context") or {})
    if cfg.get("peft") and importlib.util.find_spec("peft") is None:
        raise ImportError(
            "peft=lora needs the `peft` package (the fixed teacher is the model with its adapters disabled): "
            "pip install peft, or choose peft=none"
        )
    _check_top_k_against_vocabulary(cfg)


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


def _check_algorithm(algorithm: DictConfig) -> None:
    settings: dict[str, Any] = OmegaConf.to_container(algorithm, resolve=True)  # type: ignore[assignment]
    for name in ("sampling", "rationale_sampling"):
        if isinstance(settings.get(name), Mapping):
            try:
                SamplingConfig(**settings[name])
            except ValueError as err:
                raise ValueError(str(err).replace("sampling.", f"algorithm.{name}.", 1)) from err
    if isinstance(settings.get("loss"), Mapping):
        LossSettings(**settings["loss"])
    at_least_one = (
        "accumulate_grad_batches",
        "micro_batch_size",
        "max_nonfinite_steps_in_a_row",
        "group_size",
    )
    for name in at_least_one:
        value = settings.get(name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"algorithm.{name}={value!r} must be an integer >= 1")
    clip = settings.get("gradient_clip_val")
    if clip is not None and not clip > 0:
        raise ValueError(f"algorithm.gradient_clip_val={clip} must be > 0 (or null for no clipping)")


def _check_context(context: Mapping) -> None:
    overlong = context.get("overlong", OVERLONG_POLICIES[0])
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"context.overlong={overlong!r}: use one of {list(OVERLONG_POLICIES)}")
    limit = context.get("max_prompt_tokens")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"context.max_prompt_tokens={limit!r} must be an integer >= 1 (or null)")


def _check_top_k_against_vocabulary(cfg: DictConfig) -> None:
    divergence = cfg.get("divergence")
    if not divergence or not str(divergence.get("_target_", "")).endswith(TopK.__name__):
        return
    vocabulary = vocabulary_size(cfg.model)
    if vocabulary is not None and divergence.k > vocabulary:
        raise ValueError(
            f"divergence.k={divergence.k} exceeds the model's vocabulary of {vocabulary} tokens; "
            f"use 1 <= divergence.k <= {vocabulary}"
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
