"""Token-batch plumbing: left padding, position ids, and `[prompt | completion]` scoring batches.

Completion ids are appended as ids, never decoded and re-encoded, so the teacher scores exactly the
student's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class TokenBatch:
    """Left-padded token ids with their attention mask, `[B, L]` each."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device))

    def rows(self, rows: slice) -> TokenBatch:
        """A slice of rows, without the padding columns no row in it needs."""
        mask = self.attention_mask[rows]
        lengths = mask.sum(-1)
        width = int(lengths.max()) if len(lengths) else 0
        return TokenBatch(self.input_ids[rows, mask.shape[1] - width :], mask[:, mask.shape[1] - width :])


@dataclass
class ScoringBatch:
    """`[prompt | completion]` for one context, ready for a forward pass.

    `logit_slice` selects the positions whose next-token logits predict completion tokens 0..Lc-1:
    prompts are left-padded to a common width, so it is the same slice for every example.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    logit_slice: slice


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> TokenBatch:
    """Stack id lists into a left-padded batch (generation needs the prompt's last token aligned)."""
    width = max((len(ids) for ids in sequences), default=0)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, width - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return TokenBatch(input_ids, attention_mask)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded example starts at position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def build_scoring_batch(
    prompt: TokenBatch, completion_ids: torch.Tensor, completion_mask: torch.Tensor
) -> ScoringBatch:
    """Append completion ids to a left-padded prompt batch.

    The result is `[pads | prompt | completion | trailing pads]`: no padding in the middle, so causal
    attention plus the mask is exact. Logits at index `Lp - 1 + j` predict completion token `j`.
    """
    prompt_width = prompt.input_ids.shape[1]
    input_ids = torch.cat([prompt.input_ids, completion_ids.to(prompt.input_ids.device)], dim=1)
    attention_mask = torch.cat([prompt.attention_mask, completion_mask.to(prompt.attention_mask)], dim=1)
    return ScoringBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logit_slice=slice(prompt_width - 1, prompt_width - 1 + completion_ids.shape[1]),
    )
