"""The weights an inference engine copies from the training model, under plain Hugging Face checkpoint names
(`model.layers.0.self_attn.q_proj.weight`), whatever wraps the model in training:

- full fine-tune: the parameters as they are (views, no copy);
- PEFT LoRA: each adapted weight merged on the fly, `W + delta`, one layer at a time and never written back
  (`merge_adapter`/`unmerge_adapter` would drift the base weights by rounding on every cycle);
- FSDP: the full parameters gathered on every rank for the duration (untested without a GPU).

Parameters only: buffers such as rotary frequencies are computed by the engine itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

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
    """`(name, tensor)` for every weight of `model` as a plain checkpoint holds it, LoRA merged in.

    A generator: under FSDP the full parameters stay gathered until it is exhausted, so consume it at once
    and on every rank together.
    """
    with _full_parameters(model):
        adapted = {plain_name(f"{name}.base_layer.weight"): layer for name, layer in _lora_layers(model)}
        for name, tensor in model.named_parameters():
            if ".lora_" in name:
                continue
            name = plain_name(name)
            layer = adapted.get(name)
            delta = _lora_delta(layer, name) if layer is not None else None
            # PEFT's own merge adds in the promoted dtype and rounds to the base weight's: the same here.
            yield name, tensor.detach() if delta is None else (tensor + delta).to(tensor.dtype)


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft, no adapters
        return
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _lora_delta(layer: nn.Module, name: str) -> torch.Tensor | None:
    """The sum of the active adapters' `B @ A * scale` for one layer; None when the layer adds nothing."""
    if layer.merged or layer.disable_adapters:
        return None
    delta = None
    for adapter in (adapter for adapter in layer.active_adapters if adapter in layer.scaling):
        if layer.use_dora.get(adapter, False):
            raise NotImplementedError(
                f"{name}: a DoRA adapter (peft.use_dora=true) is not W + B @ A, so rollout=vllm cannot merge "
                "it; use rollout=hf"
            )
        adapter_delta = layer.get_delta_weight(adapter)
        delta = adapter_delta if delta is None else delta + adapter_delta
    return delta


@contextlib.contextmanager
def _full_parameters(model: nn.Module) -> Iterator[None]:
    """Under FSDP each rank holds a shard of every parameter: gather the full ones (a collective) for as
    long as the weights are being read, without writing anything back."""
    if not torch.distributed.is_available():
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        yield
        return
    with FullyShardedDataParallel.summon_full_params(model, writeback=False):
        yield
