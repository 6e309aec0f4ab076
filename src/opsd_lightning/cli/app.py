"""What the Hydra apps (`opsd-train`, `opsd-eval`) share: output folder, datamodule, model, benchmarks."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from opsd_lightning.evaluation.benchmarks import Benchmark
from opsd_lightning.models import LoadedModel, load_pretrained
from opsd_lightning.models.warmup import WarmupConfig, prepare_tiny_base
from opsd_lightning.teachers.modes import ModelTeacher, check_same_tokenizer

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
        # Resolved first: a masked copy is cut off from the root, where `seed: ${seed}` would point at itself.
        kept = {k: v for k, v in OmegaConf.to_container(data_cfg, resolve=True).items() if k not in unknown}
        data_cfg = OmegaConf.create(kept)
    elif unknown:
        raise ValueError(
            f"data: {data_cfg._target_} does not accept the option(s) {unknown}; "
            f"it takes {[k for k in parameters if k != 'self']}"
        )
    return instantiate(data_cfg)


def warmup_on(cfg: DictConfig) -> bool:
    # `warmup=none` with an experiment's pinned `warmup.context` left over still means no warm-up.
    return bool(cfg.get("warmup")) and any(key != "context" for key in cfg.warmup)


def build_model(
    cfg: DictConfig,
    datamodule: L.LightningDataModule,
    check_tokenizer: Callable[[PreTrainedTokenizerBase], None] | None = None,
) -> LoadedModel:
    """The configured model; for the tiny default, the cached warm-up base (trained on first use).

    `check_tokenizer` sees the tokenizer before the weights are trained or loaded, where it can be read first
    (the warm-up's, or a model folder's / hub id's); a tiny model's own is only built with it.
    """
    is_tiny = str(cfg.model.get("_target_", "")).endswith("build_tiny")
    if not warmup_on(cfg) or not is_tiny or cfg.model.get("checkpoint"):
        if warmup_on(cfg) and not is_tiny:
            log.info(
                "warmup applies to model=tiny only; %s is loaded as it is", cfg.model.get("name_or_path")
            )
        source = tokenizer_source(cfg.model)
        if check_tokenizer is not None and source:
            options = {key: cfg.model[key] for key in ("trust_remote_code", "revision") if key in cfg.model}
            check_tokenizer(AutoTokenizer.from_pretrained(str(source), **options))
        return instantiate(cfg.model)
    held_out = [row["problem"] for row in getattr(datamodule, "val_rows", [])]
    model_kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    warmup = WarmupConfig(**OmegaConf.to_container(cfg.warmup, resolve=True))
    context_kwargs = warmup.context or OmegaConf.to_container(cfg.context, resolve=True)
    folder = prepare_tiny_base(model_kwargs, warmup, context_kwargs, held_out, check_tokenizer)
    return load_pretrained(
        str(folder),
        dtype="float32",
        attn_implementation=cfg.model.get("attn_implementation"),
        gradient_checkpointing=bool(cfg.model.get("gradient_checkpointing", False)),
    )


def tokenizer_source(model: DictConfig) -> str | None:
    """Where a model config's tokenizer is read from (a folder or hub id); None for a tiny model's own."""
    source = model.get("tokenizer_path") or model.get("checkpoint") or model.get("name_or_path")
    return str(source) if source else None


def is_model_teacher(teacher: DictConfig | None) -> bool:
    """Whether a teacher config builds a `ModelTeacher`, whose model the app builds from `teacher.model`."""
    target = get_object(teacher._target_) if teacher and teacher.get("_target_") else None
    return isinstance(target, type) and issubclass(target, ModelTeacher)


def teacher_model_config(cfg: DictConfig) -> DictConfig:
    """What `build_model` builds a ModelTeacher's model from: `teacher.model`, the run's context, and the
    run's warm-up with `teacher.warmup` merged over it (none when the run has none)."""
    warmup = None
    if warmup_on(cfg):
        warmup = OmegaConf.merge(
            OmegaConf.to_container(cfg.warmup, resolve=True),
            OmegaConf.to_container(cfg.teacher.get("warmup") or {}, resolve=True),
        )
    return OmegaConf.create(
        {
            "model": OmegaConf.to_container(cfg.teacher.model, resolve=True),
            "warmup": warmup,
            "context": OmegaConf.to_container(cfg.context, resolve=True),
        }
    )


def build_teacher(
    cfg: DictConfig, datamodule: L.LightningDataModule, student: LoadedModel
) -> ModelTeacher | None:
    """teacher=model: the teacher LM built as the student is (a tiny one by the cached warm-up, trained with
    `teacher.warmup`), its tokenizer checked against the student's before its weights load. None for other
    teachers, and for algorithms without one: the algorithm config builds those."""
    if not is_model_teacher(cfg.get("teacher")) or "teacher" not in cfg.algorithm:
        return None
    model_cfg = teacher_model_config(cfg)
    source = model_cfg.model.get("name_or_path") or model_cfg.model.get("checkpoint") or "the tiny warm-up"

    def check(tokenizer: PreTrainedTokenizerBase) -> None:
        check_same_tokenizer(student.tokenizer, tokenizer, teacher_source=str(source))

    loaded = build_model(model_cfg, datamodule, check_tokenizer=check)
    check(loaded.tokenizer)
    return instantiate(cfg.teacher, model=loaded.model, _convert_="all")


def build_benchmarks(cfg: DictConfig) -> list[Benchmark]:
    """The configured benchmarks (`benchmark=[a,b]` composes several)."""
    benchmarks = [instantiate(node) for node in (cfg.get("benchmark") or {}).values()]
    if not benchmarks:
        raise ValueError("no benchmark configured: set e.g. benchmark=heldout or benchmark=[heldout,math500]")
    return benchmarks
