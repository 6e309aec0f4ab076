"""Every option of every config group, and every experiment, composes; every `_target_`'s keyword
arguments bind to its signature (so `divergence.betta=0.5` fails here, not in hour three of a sweep)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from opsd_lightning._paths import config_dir
from opsd_lightning.training.recipes import recipe_options

CONF = config_dir()
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]
RESERVED = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# Arguments train.py passes itself (built objects, not config).
PROVIDED = {"model", "tokenizer", "contexts", "benchmarks", "logger", "callbacks", "corpus"}


def compose_train(overrides: list[str], tmp_path: Path, resolve: bool = True) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=[*overrides, f"hydra.run.dir={tmp_path}"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)  # what the Hydra app sets at launch
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    if resolve:
        OmegaConf.resolve(cfg)  # every interpolation must resolve
    return cfg


def effective_signature(target) -> inspect.Signature:
    """The keyword arguments a target really takes: a class whose __init__ forwards **kwargs to its base
    also takes the base's (so a typo is still caught, not swallowed by **kwargs)."""
    if not isinstance(target, type) or not target.__module__.startswith("opsd_lightning"):
        return inspect.signature(target)  # only our own classes are known to forward to their base
    collected: dict[str, inspect.Parameter] = {}
    for cls in target.__mro__:
        if "__init__" not in vars(cls):
            continue
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
        for p in parameters:
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in collected:
                collected[p.name] = p.replace(kind=p.KEYWORD_ONLY)
        # `**kwargs` forwards to the base; a named catch-all (`**recipe_options`) is the class's own.
        if not any(p.kind is p.VAR_KEYWORD and p.name == "kwargs" for p in parameters):
            break
    return inspect.Signature(sorted(collected.values(), key=lambda p: p.default is not p.empty))


def check_binds(node, where: str, knobs: frozenset[str] = frozenset()) -> None:
    """Recursively bind each `_target_` node's keys to the target's signature; `knobs`: the recipe's own
    options, which its parts read (`training/recipes.py`) and its module's `**recipe_options` takes."""
    if isinstance(node, ListConfig):
        for index, item in enumerate(node):
            check_binds(item, f"{where}[{index}]")
        return
    if not isinstance(node, DictConfig):
        return
    if "_target_" in node:
        target = get_object(node._target_)
        own = knobs if where == "cfg.algorithm" else frozenset()
        kwargs = {k: v for k, v in node.items() if k not in RESERVED and k not in own}
        signature = effective_signature(target)
        try:
            signature.bind_partial(**kwargs)
        except TypeError as err:
            raise AssertionError(f"{where}: {node._target_} does not accept {sorted(kwargs)}: {err}") from err
        missing = [
            name
            for name, p in signature.parameters.items()
            if p.default is p.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and name not in kwargs
            and name not in PROVIDED
            and not node.get("_partial_", False)
        ]
        assert not missing, f"{where}: {node._target_} needs {missing}"
    for key, value in node.items():
        check_binds(value, f"{where}.{key}", knobs)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_and_binds(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "model" and option == "hf":
        overrides += ["model.name_or_path=some/model"]
    if group == "experiment" and "qwen3" in option:
        overrides += ["data.path=train.jsonl"]  # the recipes leave the training data to the user (???)
    if option in ("qwen3_recipe", "opsd_qwen3"):  # what the recipes share; each names its model
        overrides += ["model.name_or_path=some/model"]
    cfg = compose_train(overrides, tmp_path, resolve=False)
    knobs = frozenset(recipe_options(cfg.algorithm)) if cfg.get("algorithm") else frozenset()
    OmegaConf.resolve(cfg)  # every interpolation must resolve
    check_binds(cfg, "cfg", knobs)
    if cfg.get("warmup"):
        from opsd_lightning.models.warmup import WarmupConfig

        WarmupConfig(**cfg.warmup)
    from opsd_lightning.contexts.renderer import ContextRenderer

    context_params = inspect.signature(ContextRenderer).parameters
    assert set(cfg.context) <= set(context_params), (
        f"unknown context options {set(cfg.context) - set(context_params)}"
    )
    if cfg.get("peft"):
        from peft import LoraConfig

        assert set(cfg.peft) <= set(inspect.signature(LoraConfig).parameters)


def test_a_typo_in_an_option_is_caught(tmp_path):
    cfg = compose_train(["+divergence.betta=0.5"], tmp_path)
    with pytest.raises(AssertionError, match="betta"):
        check_binds(cfg, "cfg")
    # An algorithm forwards its base options through **kwargs; a typo there is still caught.
    cfg = compose_train(["+algorithm.acumulate_grad_batches=2"], tmp_path)
    with pytest.raises(AssertionError, match="acumulate_grad_batches"):
        check_binds(cfg, "cfg")


def test_divergence_options_build_the_expected_objects(tmp_path):
    from hydra.utils import instantiate

    from opsd_lightning.objectives import Divergence

    for option in ("forward_kl", "reverse_kl", "jsd", "topk", "sampled_token"):
        cfg = compose_train([f"divergence={option}"], tmp_path)
        assert isinstance(instantiate(cfg.divergence), Divergence)
