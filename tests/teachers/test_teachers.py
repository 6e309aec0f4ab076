"""Teacher modes: EMA arithmetic, the fixed teacher's frozen copy, LoRA adapters disabled."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from opsd_lightning.teachers.modes import DynamicTeacher, EMATeacher, FixedTeacher


def test_ema_update_follows_the_closed_form():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    teacher = EMATeacher(decay=0.9)
    teacher.attach(model)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 0.0]]))
    teacher.after_optimizer_step(model)
    # 0.9 * old + 0.1 * new
    torch.testing.assert_close(teacher.shadow["weight"], torch.tensor([[1.2, 1.8]]))
    with teacher.scoring(model) as view:
        torch.testing.assert_close(view.model.weight, torch.tensor([[1.2, 1.8]]))
    torch.testing.assert_close(model.weight, torch.tensor([[3.0, 0.0]]))  # live weights are back


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5])
def test_ema_decay_outside_open_interval_is_rejected(decay):
    with pytest.raises(ValueError, match="teacher.decay"):
        EMATeacher(decay=decay)


def test_fixed_teacher_keeps_initial_weights_and_never_trains():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    teacher = FixedTeacher()
    teacher.attach(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    teacher.train()
    with teacher.scoring(model) as view:
        assert view.model is not model and not view.model.training and not torch.is_grad_enabled()
        assert not torch.equal(view.model[0].weight, model[0].weight)
        assert not any(p.requires_grad for p in view.model.parameters())


def test_fixed_teacher_with_lora_disables_adapters(fresh_tiny):
    from opsd_lightning.models.lora import apply_peft

    base_input = torch.tensor([[1, 20, 21, 22]])
    with torch.no_grad():
        base_logits = fresh_tiny.model(input_ids=base_input).logits
    model = apply_peft(fresh_tiny.model, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    teacher = FixedTeacher()
    teacher.attach(model)
    assert teacher.frozen is None  # no copy: the base weights under the adapters are θ0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.5)  # make the adapters matter
        student_logits = model(input_ids=base_input).logits
        with teacher.scoring(model) as view:
            teacher_logits = view.model(input_ids=base_input).logits
            assert view.head_weight is None  # the adapters are off: the student's own output layer
    torch.testing.assert_close(teacher_logits, base_logits)
    assert not torch.allclose(student_logits, base_logits)


def test_dynamic_teacher_is_the_model_itself():
    model = nn.Linear(2, 2)
    model.train()
    with DynamicTeacher().scoring(model) as view:
        assert view.model is model and view.head_weight is None
        assert not model.training and not torch.is_grad_enabled()  # no dropout, no graph
    assert model.training  # the mode it had comes back


def test_ema_view_keeps_the_teachers_output_layer_after_the_swap_back(fresh_tiny):
    """The chunked loss forms teacher logits after the block: an EMA view must hand it the EMA head, not the
    live one the block restores on exit."""
    model = fresh_tiny.model
    teacher = EMATeacher(decay=0.5)
    teacher.attach(model)
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.add_(1.0)  # the live head moves away from the EMA one
    with teacher.scoring(model) as view:
        ema_head = view.model.get_output_embeddings().weight.clone()
    assert torch.equal(view.head_weight, ema_head)
    assert not torch.equal(view.head_weight, head.weight)


def test_fixed_view_without_lora_is_the_frozen_copy_and_its_head(fresh_tiny):
    teacher = FixedTeacher()
    teacher.attach(fresh_tiny.model)
    with teacher.scoring(fresh_tiny.model) as view:
        assert view.model is teacher.frozen
    assert view.head_weight is teacher.frozen.get_output_embeddings().weight


def test_fixed_teacher_must_be_attached_before_scoring():
    with pytest.raises(RuntimeError, match="attach"), FixedTeacher().scoring(nn.Linear(2, 2)):
        pass
