"""What every rollout engine shares: sampling settings, and the `Rollout` result with its EOS/truncation
semantics (a completion ends at its first EOS, inclusive; a row without one is truncated)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class SamplingConfig:
    """Sampling settings for `generate`; `temperature=0` means greedy decoding.

    Errors name the field alone (`top_p=0 ...`); `build_settings` adds where in the config it is.
    `cache_implementation` is passed to `generate` when set: `static` pre-allocates the KV cache and lets
    transformers compile the decode step (about 2x faster rollouts on a GPU after the first call).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    cache_implementation: str | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")

    def generate_kwargs(self) -> dict:
        cache = {"cache_implementation": self.cache_implementation} if self.cache_implementation else {}
        if self.temperature == 0:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, **cache}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k or None,
            **cache,
        }


@dataclass
class Rollout:
    """Sampled completions, right-padded: `completion_ids [B, Lc]`, `completion_mask [B, Lc]` (True up to
    and including the first EOS), `truncated [B]` (no EOS within the budget)."""

    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    truncated: torch.Tensor
    seconds: float

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum())


def completion_mask_from_ids(
    completion_ids: torch.Tensor, eos_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask every token up to and including the first EOS; a row without EOS is truncated (all kept)."""
    is_eos = torch.isin(completion_ids, torch.as_tensor(list(eos_ids), device=completion_ids.device))
    eos_seen_before = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    truncated = ~is_eos.any(dim=1)
    return ~eos_seen_before, truncated


def rollout_from_token_lists(
    completions: Sequence[Sequence[int]], eos_ids: Sequence[int], pad_id: int, seconds: float
) -> Rollout:
    """A `Rollout` from per-row completion ids (an engine that returns lists, e.g. vLLM), with the semantics
    of `generate_rollouts`: each row is cut after its first EOS, right-padded with `pad_id`, and truncated
    when it has no EOS (read from the row itself, so a pad id that is also an EOS id cannot end a row)."""
    eos = set(eos_ids)
    rows = []
    for ids in completions:
        ends = [index for index, token in enumerate(ids) if token in eos]
        rows.append(list(ids[: ends[0] + 1]) if ends else list(ids))
    width = max((len(ids) for ids in rows), default=0)
    completion_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for row, ids in enumerate(rows):
        completion_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        completion_mask[row, : len(ids)] = True
    truncated = torch.tensor([not any(token in eos for token in ids) for ids in rows], dtype=torch.bool)
    return Rollout(completion_ids, completion_mask, truncated, seconds)
