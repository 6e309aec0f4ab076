"""A weight sync that proves itself. vLLM's `reload_weights` only logs a warning for a weight it did not
receive, and fills a fused parameter (`qkv_proj`) from whichever of its parts arrive. Two checks close both:

- on our side, the names (and shapes) sent equal those of a Hugging Face checkpoint of the architecture
  (`checkpoint_shapes` in `weights.py`): a missing layer, a part of a fused weight, an unmapped adapter
  name all show here;
- on the engine's side, every parameter of vLLM's model was loaded, and every name sent has a parameter to
  load into (`reload_and_report`, run on each worker): vLLM skips an unknown `...bias` without a word.

A mismatch raises `WeightSyncError`, naming what is missing and what is unexpected.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from typing import Any

import torch

SHOWN = 8  # names listed per difference in an error; the rest are counted


class WeightSyncError(RuntimeError):
    """The engine did not receive exactly the training model's weights."""


def recorded(
    weights: Iterable[tuple[str, torch.Tensor]], shapes: dict[str, tuple[int, ...]], names: list[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """`weights` as they are, with each name appended to `names` as it is taken; a weight whose shape is not
    the checkpoint's is refused before the engine sees it (vLLM would fail on an assertion, or worse)."""
    for name, tensor in weights:
        expected = shapes.get(name)
        if expected is not None and tuple(tensor.shape) != expected:
            raise WeightSyncError(
                f"{name} has shape {tuple(tensor.shape)}, the model's config says {expected}: a sharded "
                "parameter that was not gathered. Under FSDP the sync gathers the units inside the model it "
                "is given, and the root unit only while its forward runs (Lightning's training_step); "
                "generate inside a step, or use rollout=hf"
            )
        names.append(name)
        yield name, tensor


def reload_and_report(worker: Any, weights_iterator: Iterable[tuple[str, torch.Tensor]]) -> tuple[set, set]:
    """On an engine worker (`LLM.collective_rpc`): vLLM's own in-place reload, then (the engine's parameters
    that received nothing, the names sent that the engine holds no parameter for and so dropped).

    `reload_weights` drops the set of loaded names that the model's `load_weights` returns: it is caught on
    the way out by shadowing the method for this one call. vLLM skips a name it has no parameter for when it
    ends in `.bias` (GPTQ leftovers), without a word: hence the second set.
    """
    model = worker.model_runner.get_model()
    expected = {name for name, _ in model.named_parameters()}  # a tied head appears once, as the embedding
    loaded: set[str] = set()
    sent: list[str] = []
    load_weights = model.load_weights

    def load_and_record(weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        names = load_weights(weights)
        loaded.update(names or ())
        return names

    model.load_weights = load_and_record
    try:
        worker.reload_weights(weights_iterator=recorded(weights_iterator, {}, sent))
    finally:
        del model.load_weights
    dropped = {name for name in sent if engine_parameter_name(model, name) not in expected}
    return expected - loaded, dropped


def engine_parameter_name(model: torch.nn.Module, name: str) -> str | None:
    """The vLLM parameter a checkpoint weight loads into (`q_proj` into the fused `qkv_proj`), by the
    model's own renaming and fusing tables; None for a name vLLM ignores."""
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    if mapper is not None and (name := mapper.map_name(name)) is None:
        return None
    fused = {
        part: whole for whole, parts in getattr(model, "packed_modules_mapping", {}).items() for part in parts
    }
    module, _, leaf = name.rpartition(".")
    parents, _, last = module.rpartition(".")
    return ".".join(part for part in (parents, fused.get(last, last), leaf) if part)


def check_sync(sent: list[str], checkpoint: set[str], engine_missing: set, engine_dropped: set) -> None:
    """Raise `WeightSyncError` unless the names sent are a checkpoint's, each once, and the engine loaded
    every parameter it has and dropped nothing."""
    twice = sorted(name for name, count in collections.Counter(sent).items() if count > 1)
    missing, unexpected = checkpoint - set(sent), set(sent) - checkpoint
    problems = [
        _listed("missing from the weights sent", missing),
        _listed("sent but not in a checkpoint of this model", unexpected),
        _listed("sent more than once", twice),
        _listed("engine parameters that received nothing", engine_missing),
        _listed("sent but dropped by the engine, which has no such parameter", engine_dropped),
    ]
    problems = [problem for problem in problems if problem]
    if problems:
        raise WeightSyncError(
            "the weight sync is incomplete, so the engine would generate with other weights than the "
            "model's: "
            + "; ".join(problems)
            + ". A wrapper or adapter whose names are not mapped (rollout/weights.py) shows here; use "
            "rollout=hf for such a model"
        )


def _listed(what: str, names: Iterable[str]) -> str:
    names = sorted(names)
    if not names:
        return ""
    shown = ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")
    return f"{len(names)} {what} ({shown})"
