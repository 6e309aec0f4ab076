"""Teacher modes: which weights score the teacher context.

- `DynamicTeacher`: the current weights (no grad).
- `FixedTeacher`: the initial weights. With LoRA the adapters are switched off for the teacher pass
  (free); without LoRA a frozen copy is kept.
- `EMATeacher`: an exponential moving average of the trainable weights, swapped in for the teacher
  pass and updated after every optimizer step.
- `ModelTeacher`: a separate frozen causal LM with the student's vocabulary (e.g. a larger model of the
  same family); with `teacher_context=student` it scores the student's own prompt (classic on-policy
  distillation).

What the teacher reads is not the teacher's business: see the teacher contexts
(`contexts/teacher.py`).

Every teacher is scored the same way: `with teacher.scoring(model) as view:` gives a `ScoringView` under
`no_grad`, in eval mode, with the teacher's weights in place. Every teacher is an `nn.Module`, so its state
(frozen copy, EMA shadow) moves with the LightningModule to the device and is saved in checkpoints; a
`ModelTeacher`'s model moves with it too but stays out of checkpoints (it is loaded again from its config).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from opsd_lightning.models.scoring import output_layer
from opsd_lightning.rollout import eval_mode

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@dataclass(frozen=True)
class ScoringView:
    """What scores the teacher context.

    `model`: call it inside the `with` block only (an EMA teacher swaps the live weights back on exit).
    `head_weight` / `head_bias`: the teacher's output layer, valid after the block too, for losses that form
    logits later from hidden states; `head_weight=None` means the student's own output layer.
    """

    model: nn.Module
    head_weight: Tensor | None = None
    head_bias: Tensor | None = None


class Teacher(nn.Module):
    """Base class: `attach(model)` once, `scoring(model)` around each teacher pass,
    `after_optimizer_step(model)` after each step."""

    def attach(self, model: nn.Module) -> None:  # noqa: B027 - optional hook
        """Called once with the student model, before training."""

    @contextlib.contextmanager
    def scoring(self, model: nn.Module) -> Iterator[ScoringView]:
        """No grad, no dropout, this teacher's weights in place."""
        with torch.no_grad(), self._weights_in_place(model) as scoring_model, eval_mode(scoring_model):
            yield self._view(model, scoring_model)

    @contextlib.contextmanager
    def _weights_in_place(self, model: nn.Module) -> Iterator[nn.Module]:
        yield model

    def _view(self, model: nn.Module, scoring_model: nn.Module) -> ScoringView:
        return ScoringView(scoring_model)

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
        self._attached = False

    def attach(self, model: nn.Module) -> None:
        self._attached = True
        if is_peft_model(model):
            return  # the base weights under the adapters are θ0
        self.frozen = copy.deepcopy(model).eval().requires_grad_(False)

    @contextlib.contextmanager
    def _weights_in_place(self, model: nn.Module) -> Iterator[nn.Module]:
        if not self._attached:
            raise RuntimeError("FixedTeacher.attach(model) was not called before the first teacher pass")
        if self.frozen is not None:
            yield self.frozen
            return
        with model.disable_adapter():
            yield model

    def _view(self, model: nn.Module, scoring_model: nn.Module) -> ScoringView:
        head = output_layer(self.frozen) if self.frozen is not None else None
        if head is None:  # adapters disabled: the student's own output layer
            return ScoringView(scoring_model)
        return ScoringView(scoring_model, head.weight, head.bias)

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
    def _weights_in_place(self, model: nn.Module) -> Iterator[nn.Module]:
        # Point each trainable parameter at its EMA values, score, point it back: `.data` is swapped, never
        # written into, so a student graph that saved these parameters for its backward (an earlier term of
        # the same micro-batch) still finds them unchanged, and nothing is copied.
        pairs = [(param, self.shadow[self._key(name)]) for name, param in self._trainable(model)]
        live = [param.data for param, _ in pairs]
        try:
            for param, ema in pairs:
                param.data = ema.data
            yield model
        finally:
            for (param, _), data in zip(pairs, live, strict=True):
                param.data = data

    def _view(self, model: nn.Module, scoring_model: nn.Module) -> ScoringView:
        # A trainable output layer is swapped back on exit: the view keeps its EMA values (the shadow itself).
        head = output_layer(model)
        if head is None:
            return ScoringView(scoring_model)
        shadow_of = {id(param): self._key(name) for name, param in self._trainable(model)}
        weight, bias = (
            self.shadow[shadow_of[id(p)]] if p is not None and id(p) in shadow_of else p
            for p in (head.weight, head.bias)
        )
        if weight is head.weight:  # a frozen output layer: the student's own
            return ScoringView(scoring_model)
        return ScoringView(scoring_model, weight, bias)


class ModelTeacher(Teacher):
    """A separate, frozen causal LM scores the teacher context, with its own output layer.

    It must share the student's tokenizer (token ids and output vocabulary); its hidden size may differ.
    Its weights stay out of checkpoints: it is a frozen model that its config loads again (`attach` and
    a resumed run see the same weights), so a checkpoint holds the student's state only.

    Args:
        model: the teacher LM (the apps build it from `teacher.model`, see `app.build_teacher`).
        warmup: for a tiny `teacher.model`, what the app changes in the run's `warmup` to train it (e.g.
            `{steps: 3000}`: a stronger teacher); kept for the record, scoring does not use it.
    """

    def __init__(self, model: nn.Module, warmup: Mapping | None = None) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.warmup = dict(warmup or {})
        self._register_state_dict_hook(_drop_teacher_model)
        self.register_load_state_dict_pre_hook(_keep_teacher_model)

    def attach(self, model: nn.Module) -> None:
        student_head, teacher_head = output_layer(model), output_layer(self.model)
        if student_head is None or teacher_head is None:
            return
        check_output_vocabulary(student_head.weight.shape[0], teacher_head.weight.shape[0])

    @contextlib.contextmanager
    def _weights_in_place(self, model: nn.Module) -> Iterator[nn.Module]:
        yield self.model

    def _view(self, model: nn.Module, scoring_model: nn.Module) -> ScoringView:
        head = output_layer(self.model)
        if head is None:  # the chunked loss rejects such a model; full logits need no head
            return ScoringView(scoring_model)
        return ScoringView(scoring_model, head.weight, head.bias)

    def train(self, mode: bool = True) -> ModelTeacher:
        # The teacher never trains: no dropout, whatever Lightning does to the parent module.
        super().train(mode)
        self.model.eval()
        return self


def check_output_vocabulary(student_size: int, teacher_size: int) -> None:
    """Teacher and student logits must cover the same token ids."""
    if student_size != teacher_size:
        raise ValueError(
            f"teacher.model has an output vocabulary of {teacher_size} tokens and the student (model) "
            f"{student_size}: a separate teacher must share the student's tokenizer and vocabulary "
            "(the same model family)"
        )


def check_same_tokenizer(
    student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase, teacher_source: str
) -> None:
    """Raise naming `teacher.model` unless both tokenizers map the same tokens (special ones included) to
    the same ids: the teacher scores the student's token ids."""
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    if student_vocab == teacher_vocab:
        return
    token = min(set(student_vocab.items()) ^ set(teacher_vocab.items()))[0]
    raise ValueError(
        f"teacher.model ({teacher_source}) does not share the student's tokenizer: {len(teacher_vocab)} vs "
        f"{len(student_vocab)} tokens; e.g. {token!r} is id {teacher_vocab.get(token)} for the teacher and "
        f"{student_vocab.get(token)} for the student. A separate teacher must use the student's tokenizer "
        "(the same model family)"
    )


def _drop_teacher_model(module: ModelTeacher, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    # state_dict hook: the frozen teacher LM is reloaded from its config, not carried by every checkpoint.
    for key in [key for key in state_dict if key.startswith(prefix + "model.")]:
        del state_dict[key]


def _keep_teacher_model(module: ModelTeacher, state_dict: dict, prefix: str, *args) -> None:
    # load_state_dict pre-hook: a checkpoint without the teacher LM (see above) keeps the one loaded from its
    # config, and strict loading (a resumed run) does not report its weights as missing.
    for name, value in module.model.state_dict().items():
        state_dict.setdefault(prefix + "model." + name, value)
