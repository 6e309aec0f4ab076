"""Config checks that run before any data or model is loaded, so a typo in a sweep fails in a second with
the option's name and its valid range, not after minutes of loading (or, worse, not at all)."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from pathlib import Path
from typing import Any

from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import AutoTokenizer

from opsd_lightning.cli.app import is_model_teacher, teacher_model_config, tokenizer_source
from opsd_lightning.contexts.budget import PromptBudget
from opsd_lightning.evaluation.runner import EvalSettings
from opsd_lightning.models.warmup import WarmupConfig
from opsd_lightning.options import build_settings
from opsd_lightning.teachers.modes import check_output_vocabulary, check_same_tokenizer
from opsd_lightning.training.recipes import check_recipe_options
from opsd_lightning.training.stepper import check_strategy

log = logging.getLogger(__name__)

# Config groups whose options are alternatives: a list of them (teacher=[fixed,ema]) would silently merge.
EXCLUSIVE_GROUPS = (
    "algorithm",
    "divergence",
    "teacher",
    "teacher_context",
    "model",
    "peft",
    "data",
    "trainer",
    "weighting",
)
# A Hugging Face hub model id (`Qwen/Qwen3-8B`): what `name_or_path` may be when it is not a local folder.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def check_config(cfg: DictConfig) -> None:
    """Raise ValueError/ImportError naming the option for anything wrong that can be seen from the config.

    Every range is checked by the object that owns the option, built here from the resolved config exactly
    as the run will build it: nothing is restated here.
    """
    _check_one_choice_per_group()
    divergence = instantiate(cfg.divergence) if cfg.get("divergence") else None
    # Their constructors hold their ranges; engines start lazily; a teacher model is not loaded here.
    for group in ("teacher", "rollout", "weighting"):
        if cfg.get(group) and group == "teacher" and is_model_teacher(cfg.teacher):
            check_teacher_model(cfg)
        elif cfg.get(group):
            instantiate(cfg[group])
    build_settings(EvalSettings, _resolved(cfg.evaluation), "evaluation")
    check_recipe_options(cfg.algorithm)
    strategy = (cfg.get("trainer") or {}).get("strategy")
    check_rollout_strategy(cfg.get("rollout"), strategy)
    check_strategy(str(strategy.get("_target_", "") if isinstance(strategy, DictConfig) else strategy or ""))
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


def check_rollout_strategy(rollout: DictConfig | None, strategy: Any) -> None:
    """rollout=vllm copies the full weights into its engine at every sync: refuse a sharding it cannot gather.
    FSDP and FSDP2 are gathered a module at a time (`rollout/gather.py`); DeepSpeed ZeRO-3 is not (and the
    training module refuses DeepSpeed anyway: `training/stepper.py: check_strategy`)."""
    if rollout is None or not str(rollout.get("_target_", "")).endswith("VLLMEngine"):
        return
    if isinstance(strategy, DictConfig):
        name, stage = str(strategy.get("_target_", "")), strategy.get("stage")
    else:
        name, stage = str(strategy or ""), None
    if "deepspeed" in name.lower() and (stage == 3 or "stage_3" in name.lower()):
        raise ValueError(
            f"trainer.strategy={name} (DeepSpeed ZeRO-3) with rollout=vllm: ZeRO-3 partitions the "
            "parameters, and the engine's weight sync does not gather them (nor does the training module "
            "accept DeepSpeed: its partitioned gradients escape the token-mean rescale). Use trainer=fsdp, "
            "whose shards the sync gathers one module at a time, or trainer=ddp; or rollout=hf"
        )


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


def check_teacher_model(cfg: DictConfig) -> None:
    """teacher=model, before any model is built: its options, a model that can be found, and (where both
    tokenizers are in local folders) the student's vocabulary. Other cases are checked as the models load."""
    if OmegaConf.is_missing(cfg.teacher, "model") or not cfg.teacher.get("model"):
        raise ValueError("teacher=model needs teacher.model: a model config, as in conf/model/*.yaml")
    instantiate(cfg.teacher, model=nn.Identity())  # ModelTeacher's own checks, without its model
    warmup = teacher_model_config(cfg).warmup
    if warmup is not None and cfg.teacher.get("warmup"):
        try:
            WarmupConfig(**warmup)
        except TypeError as err:
            raise ValueError(f"teacher.warmup={cfg.teacher.warmup}: {err}") from err
    node = cfg.teacher.model
    sources = {"name_or_path": True, "checkpoint": True, "tokenizer_path": False}  # key: needs config.json
    for key, needs_config in sources.items():
        if OmegaConf.is_missing(node, key):
            raise ValueError(f"teacher.model.{key} is not set: a local model folder or a hub model id")
        if node.get(key):
            check_model_source(str(node[key]), f"teacher.model.{key}", needs_config)
    sizes = output_vocabulary_size(cfg.model), output_vocabulary_size(node)
    if None not in sizes:
        check_output_vocabulary(*sizes)
    folders = tokenizer_folder(cfg.model), tokenizer_folder(node)
    if None not in folders:
        tokenizers = [
            AutoTokenizer.from_pretrained(folder, trust_remote_code=bool(model.get("trust_remote_code")))
            for folder, model in zip(folders, (cfg.model, node), strict=True)
        ]
        check_same_tokenizer(*tokenizers, teacher_source=folders[1])


def check_model_source(name_or_path: str, option: str, needs_config: bool = True) -> None:
    """A local model folder (with `config.json` when `needs_config`) or a hub id that could be loaded."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if needs_config and not (path / "config.json").is_file():
            raise ValueError(
                f"{option}={name_or_path}: the folder has no config.json, so it is not a saved Hugging Face "
                "model (write one with save_pretrained)"
            )
        return
    if path.exists() or not _HUB_ID.fullmatch(name_or_path):
        raise ValueError(
            f"{option}={name_or_path}: no such folder (nor a hub model id such as Qwen/Qwen3-8B)"
        )
    if hub_constants.HF_HUB_OFFLINE and not isinstance(
        try_to_load_from_cache(name_or_path, "config.json"), str
    ):
        raise ValueError(
            f"{option}={name_or_path}: no such folder, and HF_HUB_OFFLINE=1 with no cached copy of that "
            "hub model"
        )


def output_vocabulary_size(model: DictConfig) -> int | None:
    """`vocab_size` from the `config.json` of a model config's local folder; None without one."""
    folder = model.get("checkpoint") or model.get("name_or_path")
    config = Path(str(folder)).expanduser() / "config.json" if folder else None
    if config is None or not config.is_file():
        return None
    return json.loads(config.read_text()).get("vocab_size")


def tokenizer_folder(model: DictConfig) -> str | None:
    """The local folder a model config's tokenizer is read from; None when it is built or downloaded."""
    source = tokenizer_source(model)
    return source if source and Path(source).expanduser().is_dir() else None
