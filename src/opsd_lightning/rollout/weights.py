"""The weights an inference engine copies from the training model, under plain Hugging Face checkpoint names
(`model.layers.0.self_attn.q_proj.weight`), whatever wraps the model in training:

- full fine-tune: the parameters as they are (views, no copy);
- PEFT LoRA: each adapted weight (and bias, with `lora_bias`) merged on the fly, `W + delta`, one layer at a
  time and never written back (`merge_adapter`/`unmerge_adapter` would drift the base weights by rounding on
  every cycle); a `modules_to_save` module sends its trained copy under the plain name, never the original;
- FSDP / FSDP2: gathered a module at a time (`gather.py`).

What cannot be sent faithfully is refused: DoRA, a LoRA bias on a layer without a bias, and an adapter on an
embedding tied to the output layer (the engine would apply it to both, the training model to one).
Parameters only: buffers such as rotary frequencies are computed by the engine itself.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator

import torch
from torch import nn

from opsd_lightning.models.scoring import base_model
from opsd_lightning.rollout.gather import FLAT_PARAMETER, full, unit_gathered

PEFT_PREFIX = "base_model.model."
# Name segments that wrappers insert (FSDP, activation checkpointing, torch.compile).
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def plain_name(name: str) -> str:
    """A parameter's Hugging Face checkpoint name, without the prefixes and segments wrappers add."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


@torch.no_grad()
def engine_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` for every weight of `model` as a plain checkpoint holds it, adapters merged in, a
    tied weight once.

    A generator: under FSDP each module's parameters stay gathered until its weights have been taken, so
    consume it at once and on every rank together.
    """
    yield from _module_weights(model, "", _tied_embeddings(model), set())


def checkpoint_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The parameters a Hugging Face checkpoint of `model`'s architecture holds (a tied output layer once, as
    the embedding), name to shape: those of a fresh model of its class and config, built without memory."""
    hf_model = base_model(model)
    if hasattr(hf_model, "_fsdp_wrapped_module"):  # an FSDP (v1) unit around the whole model
        hf_model = hf_model.module
    config = hf_model.config
    return dict(_fresh_shapes(type(hf_model), type(config), config.to_json_string()))


@functools.cache
def _fresh_shapes(architecture: type, config_class: type, config_json: str) -> tuple:
    with torch.device("meta"):
        fresh = architecture(config_class.from_dict(json.loads(config_json)))
    return tuple((name, tuple(parameter.shape)) for name, parameter in fresh.named_parameters())


def _module_weights(
    module: nn.Module, prefix: str, tied: set[str], seen: set[int]
) -> Iterator[tuple[str, torch.Tensor]]:
    lora_layer, saved_copy_wrapper = _peft_types()
    if lora_layer is not None and isinstance(module, lora_layer):
        _refuse_tied(prefix, tied, "peft.target_modules")
        yield from _merged_lora_weights(module, prefix, seen)
        return
    if saved_copy_wrapper is not None and isinstance(module, saved_copy_wrapper):
        trained = _trained_copy(module)
        if trained is not module.original_module:
            _refuse_tied(prefix, tied, "peft.modules_to_save")
        yield from _module_weights(trained, prefix, tied, seen)
        return
    with unit_gathered(module):
        for name, tensor in module.named_parameters(recurse=False):
            if name == FLAT_PARAMETER or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            yield plain_name(prefix + name), full(tensor).detach()
        for name, child in module.named_children():
            yield from _module_weights(child, f"{prefix}{name}.", tied, seen)


def _merged_lora_weights(layer: nn.Module, prefix: str, seen: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """A LoRA layer's base weight and bias with its active adapters added, as PEFT's merge would."""
    base = layer.get_base_layer()
    adapters = _active_adapters(layer)
    for name, tensor in base.named_parameters(recurse=False):
        seen.add(id(tensor))
        merged = full(tensor).detach()
        if name == "weight":
            for adapter in adapters:
                # PEFT's own merge adds in the promoted dtype and rounds to the base weight's: the same here.
                merged = (merged + full(layer.get_delta_weight(adapter))).to(tensor.dtype)
        elif name == "bias":
            for adapter in (adapter for adapter in adapters if layer.lora_bias.get(adapter, False)):
                delta = full(layer.lora_B[adapter].bias) * layer.scaling[adapter]
                merged = (merged + delta).to(tensor.dtype)
        yield plain_name(f"{prefix}{name}"), merged
    if getattr(base, "bias", None) is None and any(layer.lora_bias.get(a, False) for a in adapters):
        raise ValueError(
            f"{plain_name(prefix)[:-1]}: peft.lora_bias=true on a layer without a bias, so the engine's "
            "layer has nowhere to hold it (PEFT cannot merge it either); set peft.lora_bias=false, or use "
            "rollout=hf"
        )


def _active_adapters(layer: nn.Module) -> list[str]:
    """The adapters that change a LoRA layer's output now; none when merged into it or disabled."""
    if layer.merged or layer.disable_adapters:
        return []
    adapters = [adapter for adapter in layer.active_adapters if adapter in layer.scaling]
    for adapter in adapters:
        if layer.use_dora.get(adapter, False):
            raise NotImplementedError(
                "a DoRA adapter (peft.use_dora=true) is not W + B @ A, so rollout=vllm cannot merge it; "
                "use rollout=hf"
            )
    return adapters


def _trained_copy(wrapper: nn.Module) -> nn.Module:
    """The module a PEFT `modules_to_save` wrapper runs: its active adapter's trained copy (the first active
    one, as PEFT's forward), or the original when adapters are disabled."""
    active = [] if wrapper.disable_adapters else list(wrapper.active_adapters)
    if active and active[0] in wrapper.modules_to_save:
        return wrapper.modules_to_save[active[0]]
    return wrapper.original_module


def _tied_embeddings(model: nn.Module) -> set[str]:
    """The name prefixes (`model.embed_tokens.`, `lm_head.`) of an input embedding and output layer that
    share one weight; empty when they do not."""
    hf_model = base_model(model)
    config = getattr(hf_model, "config", None)
    text_config = config.get_text_config() if config is not None else None
    if not getattr(text_config, "tie_word_embeddings", False):
        return set()
    embeddings = [hf_model.get_input_embeddings(), hf_model.get_output_embeddings()]
    return {
        plain_name(f"{name}.")
        for name, module in model.named_modules()
        if any(module is embedding for embedding in embeddings if embedding is not None)
    }


def _refuse_tied(prefix: str, tied: set[str], option: str) -> None:
    if plain_name(prefix) in tied:
        raise ValueError(
            f"{option} adapts {plain_name(prefix)[:-1]}, which shares its weight with the "
            f"{' and '.join(sorted(name[:-1] for name in tied))} (tie_word_embeddings=true): the engine "
            f"would apply it to both, the training model to one; leave it out of {option}, or use rollout=hf"
        )


@functools.cache
def _peft_types() -> tuple[type | None, type | None]:
    """PEFT's LoRA layer and `modules_to_save` wrapper classes; None without peft (then there are none)."""
    try:
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:
        return None, None
    return LoraLayer, ModulesToSaveWrapper
