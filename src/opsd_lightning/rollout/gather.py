"""Full parameters of a sharded model, a piece at a time, for a weight sync (`weights.py`).

- FSDP (v1, `FullyShardedDataParallel`, Lightning's `FSDPStrategy`): each FSDP unit's own flat parameter
  is gathered on entering the unit (`summon_full_params(unit, recurse=False)`) and released on leaving it,
  so at most one unit and its ancestors' own parameters are whole at once. A unit whose forward is running
  (the root, when Lightning calls `training_step` through it) has its parameters gathered already: read
  as they are.
- FSDP2 (`fully_shard`): every parameter is a `DTensor`; `full_tensor()` gathers one parameter at a time.

Both are collectives: every rank must read the same parameters in the same order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

# Where FSDP (v1) keeps a unit's parameters as one flat tensor; the original names are read instead.
FLAT_PARAMETER = "_flat_param"


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a `DTensor` (FSDP2) gathered from every rank, anything else as it is."""
    if not torch.distributed.is_available():
        return tensor
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@contextlib.contextmanager
def unit_gathered(module: nn.Module) -> Iterator[None]:
    """For as long as it is open: `module`'s own FSDP (v1) flat parameter gathered, when `module` is an
    FSDP unit that is not already running its forward; nothing written back."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._common_utils import TrainingState

    if not isinstance(module, FullyShardedDataParallel) or module.training_state != TrainingState.IDLE:
        yield
        return
    with FullyShardedDataParallel.summon_full_params(module, recurse=False, writeback=False):
        yield
