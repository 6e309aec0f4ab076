"""The training order: seeded, sharded over DDP ranks, and able to resume where a checkpoint left it."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import DistributedSampler, RandomSampler


class ResumableRandomSampler(DistributedSampler):
    """The training order: `RandomSampler`'s (the same as `DataLoader(shuffle=True, generator=...)`), sharded
    over `num_replicas` ranks, and able to skip ahead to an epoch and a position so a resumed run sees the
    problems it would have seen.

    Every rank draws the same permutation from its own copy of the seeded generator and keeps every
    `num_replicas`-th index from `rank` on, after padding with the first indices to a multiple of
    `num_replicas` (as `DistributedSampler` does), so all ranks run the same number of batches. It is a
    `DistributedSampler`, so Lightning keeps it instead of swapping in its own (which would ignore the
    resume position). With one replica it yields exactly `RandomSampler`'s order.
    """

    def __init__(
        self, data_source: Sized, generator: torch.Generator, num_replicas: int = 1, rank: int = 0
    ) -> None:
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.generator = generator
        self._order = RandomSampler(data_source, generator=generator)
        self._skip_epochs, self._skip_samples = 0, 0

    def fast_forward(self, epochs: int, samples: int) -> None:
        """Skip `epochs` whole epochs, then the first `samples` indices of this rank's shard."""
        self._skip_epochs, self._skip_samples = epochs, samples

    def set_epoch(self, epoch: int) -> None:
        # The order advances with the generator, epoch after epoch; Lightning's epoch number adds nothing.
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        # Replay the generator's draws of each finished epoch: the sampler's order, then the seed the next
        # epoch's DataLoader iterator draws from the same generator before asking for indices.
        while self._skip_epochs:
            self._skip_epochs -= 1
            for _ in self._order:
                pass
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        order = list(self._order)
        if self.num_replicas > 1:
            order += order[: self.total_size - len(order)]
            order = order[self.rank : self.total_size : self.num_replicas]
        skip, self._skip_samples = self._skip_samples, 0
        yield from order[skip:]
