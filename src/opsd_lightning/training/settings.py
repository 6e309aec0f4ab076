"""The training module's scalar options (`conf/algorithm/shared/policy.yaml`), each range checked here.

The module builds these in `__init__`; the pre-flight check (`opsd_lightning.cli.checks`) builds the same
objects from the resolved config before any model loads, through `OnPolicyModule.check_options`.
"""

from __future__ import annotations

from dataclasses import dataclass

from opsd_lightning.options import at_least


@dataclass(frozen=True)
class StepSettings:
    """How micro-batches become one optimizer step.

    `accumulate_grad_batches`: micro-batches per optimizer step (the loss is a token mean over all of them).
    `gradient_clip_val`: max global grad norm, or None.
    `max_nonfinite_steps_in_a_row`: skipped non-finite steps in a row before the run stops.
    `micro_batch_size`: episode rows per forward/backward; a batch is sampled at once (None = all rows).
    """

    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    max_nonfinite_steps_in_a_row: int = 3
    micro_batch_size: int | None = None

    def __post_init__(self) -> None:
        at_least("accumulate_grad_batches", self.accumulate_grad_batches, 1)
        at_least("max_nonfinite_steps_in_a_row", self.max_nonfinite_steps_in_a_row, 1)
        if self.micro_batch_size is not None:
            at_least("micro_batch_size", self.micro_batch_size, 1)
        if self.gradient_clip_val is not None and not self.gradient_clip_val > 0:
            raise ValueError(
                f"algorithm.gradient_clip_val={self.gradient_clip_val} must be > 0 (or null for no clipping)"
            )

    def row_slices(self, num_rows: int) -> list[slice]:
        """The micro-batches of `num_rows` episode rows."""
        size = self.micro_batch_size or num_rows
        return [slice(start, min(start + size, num_rows)) for start in range(0, num_rows, size)]
