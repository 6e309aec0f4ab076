"""The algorithms' scalar options (`conf/algorithm/*.yaml`), each range checked here and nowhere else.

The LightningModules build these in `__init__`; the pre-flight check (`opsd_lightning.checks`) builds the
same objects from the resolved config before any model loads, through `PolicyModule.check_options`.
"""

from __future__ import annotations

from dataclasses import dataclass


def _at_least(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"algorithm.{name}={value!r} must be an integer >= {minimum}")


@dataclass(frozen=True)
class StepSettings:
    """How micro-batches become one optimizer step (every algorithm).

    `accumulate_grad_batches`: micro-batches per optimizer step (the loss is a token mean over all of them).
    `gradient_clip_val`: max global grad norm, or None.
    `max_nonfinite_steps_in_a_row`: skipped non-finite steps in a row before the run stops.
    """

    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    max_nonfinite_steps_in_a_row: int = 3

    def __post_init__(self) -> None:
        _at_least("accumulate_grad_batches", self.accumulate_grad_batches, 1)
        _at_least("max_nonfinite_steps_in_a_row", self.max_nonfinite_steps_in_a_row, 1)
        if self.gradient_clip_val is not None and not self.gradient_clip_val > 0:
            raise ValueError(
                f"algorithm.gradient_clip_val={self.gradient_clip_val} must be > 0 (or null for no clipping)"
            )


@dataclass(frozen=True)
class MicroBatchSettings:
    """`micro_batch_size`: rows per forward/backward; the whole batch is generated at once (None = all)."""

    micro_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.micro_batch_size is not None:
            _at_least("micro_batch_size", self.micro_batch_size, 1)


@dataclass(frozen=True)
class GroupSettings:
    """GRPO: `group_size` rollouts per problem, the ratio clip ε, the KL weight to the initial policy."""

    group_size: int = 4
    clip: float = 0.2
    kl_coef: float = 0.0

    def __post_init__(self) -> None:
        _at_least("group_size", self.group_size, 2)
        if not 0 < self.clip < 1:
            raise ValueError(f"algorithm.clip={self.clip} must be in (0, 1)")
        if not self.kl_coef >= 0:
            raise ValueError(f"algorithm.kl_coef={self.kl_coef} must be >= 0")


HYBRID_MODES = ("sum", "rlsd")
PRIVILEGED_CONTEXTS = ("reference", "own_rollout")
NO_CORRECT_ROLLOUT = ("skip", "reference")


def _one_of(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"algorithm.{name}={value!r}: use one of {list(choices)}")


@dataclass(frozen=True)
class HybridSettings:
    """The hybrid of the verifiable reward and the self-teacher (`algorithm=hybrid`, `algorithm=ssopd`).

    `mode`: `sum` (per token reward_weight x clipped surrogate + distill_weight x divergence) or `rlsd`
    (the teacher's clamped log-ratio scales each token's advantage, `log_ratio_clip` being the clamp).
    `privileged_context`: what the teacher context holds, the dataset's `reference` solution or the group's
    shortest correct rollout (`own_rollout`); `no_correct_rollout`: a group without one is dropped from the
    distillation loss (`skip`) or falls back to the `reference`.
    """

    mode: str = "sum"
    reward_weight: float = 1.0
    distill_weight: float = 1.0
    log_ratio_clip: float = 1.0
    privileged_context: str = "reference"
    no_correct_rollout: str = "skip"

    def __post_init__(self) -> None:
        _one_of("mode", self.mode, HYBRID_MODES)
        _one_of("privileged_context", self.privileged_context, PRIVILEGED_CONTEXTS)
        _one_of("no_correct_rollout", self.no_correct_rollout, NO_CORRECT_ROLLOUT)
        for name in ("reward_weight", "distill_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"algorithm.{name}={getattr(self, name)} must be >= 0")
        if self.reward_weight == 0 and self.distill_weight == 0:
            raise ValueError(
                "algorithm.reward_weight=0 and algorithm.distill_weight=0: one of them must be > 0"
            )
        if self.mode == "rlsd" and self.reward_weight == 0:
            raise ValueError(
                "algorithm.mode=rlsd with algorithm.reward_weight=0: RLSD's teacher only scales the reward "
                "term, so it would do nothing (use mode=sum for pure distillation)"
            )
        if not self.log_ratio_clip > 0:
            raise ValueError(f"algorithm.log_ratio_clip={self.log_ratio_clip} must be > 0")
