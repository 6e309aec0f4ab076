"""What the Hydra apps (`opsd-train`, `opsd-eval`) share: output folder, datamodule, model, benchmarks."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from opsd_lightning.evaluation.benchmarks import Benchmark
from opsd_lightning.models import LoadedModel, load_pretrained
from opsd_lightning.warmup import WarmupConfig, prepare_tiny_base

log = logging.getLogger(__name__)


def output_dir(cfg: DictConfig) -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


def instantiate_datamodule(data_cfg: DictConfig) -> L.LightningDataModule:
    """Build the datamodule; with `data._target_=pkg.MyDataModule` on the command line, the options the
    default data config carried for a different class are dropped (and named) instead of failing."""
    target = get_object(data_cfg._target_)
    parameters = inspect.signature(target).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return instantiate(data_cfg)
    unknown = [key for key in data_cfg if not key.startswith("_") and key not in parameters]
    overridden = HydraConfig.initialized() and any(
        o.startswith("data._target_=") for o in HydraConfig.get().overrides.task
    )
    if unknown and overridden:
        log.info(
            "data._target_=%s does not take %s from the data config; leaving them out",
            data_cfg._target_,
            unknown,
        )
        data_cfg = OmegaConf.masked_copy(data_cfg, [k for k in data_cfg if k not in unknown])
    elif unknown:
        raise ValueError(
            f"data: {data_cfg._target_} does not accept the option(s) {unknown}; "
            f"it takes {[k for k in parameters if k != 'self']}"
        )
    return instantiate(data_cfg)


def build_model(cfg: DictConfig, datamodule: L.LightningDataModule) -> LoadedModel:
    """The configured model; for the tiny default, the cached warm-up base (trained on first use)."""
    is_tiny = str(cfg.model.get("_target_", "")).endswith("build_tiny")
    # `warmup=none` with an experiment's pinned `warmup.context` left over still means no warm-up.
    warmup_on = bool(cfg.get("warmup")) and any(key != "context" for key in cfg.warmup)
    if not warmup_on or not is_tiny or cfg.model.get("checkpoint"):
        if warmup_on and not is_tiny:
            log.info(
                "warmup applies to model=tiny only; %s is loaded as it is", cfg.model.get("name_or_path")
            )
        return instantiate(cfg.model)
    held_out = [row["problem"] for row in getattr(datamodule, "val_rows", [])]
    model_kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    warmup = WarmupConfig(**OmegaConf.to_container(cfg.warmup, resolve=True))
    context_kwargs = warmup.context or OmegaConf.to_container(cfg.context, resolve=True)
    folder = prepare_tiny_base(model_kwargs, warmup, context_kwargs, held_out)
    return load_pretrained(
        str(folder),
        dtype="float32",
        attn_implementation=cfg.model.get("attn_implementation"),
        gradient_checkpointing=bool(cfg.model.get("gradient_checkpointing", False)),
    )


def build_benchmarks(cfg: DictConfig) -> list[Benchmark]:
    """The configured benchmarks (`benchmark=[a,b]` composes several)."""
    benchmarks = [instantiate(node) for node in (cfg.get("benchmark") or {}).values()]
    if not benchmarks:
        raise ValueError("no benchmark configured: set e.g. benchmark=heldout or benchmark=[heldout,math500]")
    return benchmarks
