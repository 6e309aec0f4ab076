"""Teacher modes: which weights score the teacher context.

- `DynamicTeacher`: the current weights (no grad).
- `FixedTeacher`: the initial weights. With LoRA the adapters are switched off for the teacher pass
  (free); without LoRA a frozen copy is kept.
- `EMATeacher`: an exponential moving average of the trainable weights, swapped in for the teacher
  pass and updated after every optimizer step.

Every teacher is an `nn.Module`, so its state (frozen copy, EMA shadow) moves with the LightningModule
to the device and is saved in and restored from checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class Teacher(nn.Module):
    """Base class: `attach(model)` once, `scoring_model(model)` around each teacher pass."""

    def attach(self, model: nn.Module) -> None:  # noqa: B027 - optional hook
        """Called once with the student model, before training."""

    @contextlib.contextmanager
    def scoring_model(self, model: nn.Module) -> Iterator[nn.Module]:
        yield model

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module) -> None:  # noqa: B027 - optional hook
        """Called after every optimizer step."""


class DynamicTeacher(Teacher):
    """The teacher is the student's current weights."""


class FixedTeacher(Teacher):
    """The teacher keeps the initial weights `θ0` (the paper's recommendation)."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen: nn.Module | None = None

    def attach(self, model: nn.Module) -> None:
        if is_peft_model(model):
            return  # the base weights under the adapters are θ0
        self.frozen = copy.deepcopy(model).eval().requires_grad_(False)

    @contextlib.contextmanager
    def scoring_model(self, model: nn.Module) -> Iterator[nn.Module]:
        if self.frozen is not None:
            yield self.frozen
        elif is_peft_model(model):
            with model.disable_adapter():
                yield model
        else:
            raise RuntimeError("FixedTeacher.attach(model) was not called before the first teacher pass")

    def train(self, mode: bool = True) -> FixedTeacher:
        # The frozen copy never trains: no dropout, whatever Lightning does to the parent module.
        super().train(mode)
        if self.frozen is not None:
            self.frozen.eval()
        return self


class EMATeacher(Teacher):
    """θ_T ← decay·θ_T + (1 − decay)·θ after each optimizer step, over the trainable weights only."""

    def __init__(self, decay: float = 0.99) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"teacher.decay={decay} must be in the open interval (0, 1)")
        self.decay = decay
        self.shadow = nn.ParameterDict()

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")  # ParameterDict keys cannot hold dots

    def _trainable(self, model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
        return ((name, p) for name, p in model.named_parameters() if p.requires_grad)

    def attach(self, model: nn.Module) -> None:
        for name, param in self._trainable(model):
            self.shadow[self._key(name)] = nn.Parameter(param.detach().clone(), requires_grad=False)

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module) -> None:
        for name, param in self._trainable(model):
            self.shadow[self._key(name)].lerp_(param.detach(), 1.0 - self.decay)

    @contextlib.contextmanager
    def scoring_model(self, model: nn.Module) -> Iterator[nn.Module]:
        # Swap EMA weights in, score, swap the live weights back; costs two copies of the trainable set.
        pairs = [(param, self.shadow[self._key(name)]) for name, param in self._trainable(model)]
        live = [param.detach().clone() for param, _ in pairs]
        try:
            with torch.no_grad():
                for param, ema in pairs:
                    param.copy_(ema)
            yield model
        finally:
            with torch.no_grad():
                for (param, _), saved in zip(pairs, live, strict=True):
                    param.copy_(saved)
