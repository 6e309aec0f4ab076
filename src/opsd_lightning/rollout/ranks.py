"""Decisions every rank takes together. Under DDP a rank that raises alone leaves the others waiting in the
next collective until a timeout; a refusal found on any rank is raised on every rank, with one message."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


class RefusedOnEveryRank(ValueError):
    """A refusal that every rank raises together."""


def refuse_together(action: Callable[[], T]) -> T:
    """`action()`; a `ValueError` it raises on any rank (a refusal: a prompt too long, an id outside the
    vocabulary, a missing reference) is raised on every rank. A collective, as `raise_on_any_rank`."""
    try:
        result, refusal = action(), None
    except RefusedOnEveryRank:
        raise
    except ValueError as err:
        result, refusal = None, str(err)
    raise_on_any_rank(refusal)
    return result  # type: ignore[return-value] - None only when raised above


def raise_on_any_rank(refusal: str | None) -> None:
    """Raise `RefusedOnEveryRank(refusal)` on every rank when any rank has one (the lowest such rank's
    message, and how many ranks refused). A collective: every rank must call it at the same point."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size() > 1:
        refusals: list[str | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(refusals, refusal)
        found = [(rank, message) for rank, message in enumerate(refusals) if message is not None]
        if found:
            rank, message = found[0]
            raise RefusedOnEveryRank(f"rank {rank} (of {len(found)} refusing): {message}")
    elif refusal is not None:
        raise RefusedOnEveryRank(refusal)
