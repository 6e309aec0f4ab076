"""teacher=model: a separate frozen causal LM (another hidden size, the student's tokenizer) scores the
teacher context with its own output layer, stays frozen and out of checkpoints, sees the student's prompt
with `teacher_context=student`, and a teacher with another vocabulary (or none to load) fails before any
model is built."""

from __future__ import annotations

import json
import types

import pytest
import torch
from hydra.errors import InstantiationException

from opsd_lightning.contexts.batches import build_scoring_batch
from opsd_lightning.contexts.teacher import ReferenceContext, StudentContext
from opsd_lightning.data import ArithDataModule
from opsd_lightning.models import build_tiny, save_pretrained
from opsd_lightning.models.scoring import completion_logits
from opsd_lightning.objectives import ForwardKL
from opsd_lightning.teachers.modes import ModelTeacher
from tests.cli.test_configs import compose_train
from tests.conftest import build_small_tiny, distill_sum, opsd_module, quiet_trainer, sample


def wider_teacher(seed: int = 1):
    """A tiny Qwen3 with hidden size 48 (the student's is 32) and the same locally built tokenizer."""
    return build_tiny(
        hidden_size=48, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=96, seed=seed
    )


def problems_batch(size: int = 3) -> dict:
    data = ArithDataModule(train_size=16, val_size=4, batch_size=size, seed=0)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def test_the_view_is_the_teacher_model_and_its_own_output_layer(fresh_tiny):
    teacher_lm = wider_teacher().model
    teacher = ModelTeacher(teacher_lm)
    teacher.train()  # Lightning switches the parent to train mode: the teacher LM must stay in eval
    input_ids = torch.tensor([[5, 40, 41, 42, 43]])
    with torch.no_grad():
        expected = teacher_lm(input_ids=input_ids).logits
        hidden = teacher_lm.model(input_ids=input_ids).last_hidden_state
    with teacher.scoring(fresh_tiny.model) as view:
        assert view.model is teacher_lm and not view.model.training and not torch.is_grad_enabled()
        logits = view.model(input_ids=input_ids).logits
    assert view.head_weight is teacher_lm.lm_head.weight and view.head_weight.shape[1] == 48
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(hidden @ view.head_weight.T, expected, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in teacher_lm.parameters())


def test_fit_trains_the_student_keeps_the_teacher_and_checkpoints_leave_it_out(fresh_tiny, tmp_path):
    teacher_lm = wider_teacher().model
    teacher_before = {k: v.clone() for k, v in teacher_lm.state_dict().items()}
    student_before = {k: v.clone() for k, v in fresh_tiny.model.state_dict().items()}
    module = opsd_module(fresh_tiny, teacher=ModelTeacher(teacher_lm))
    trainer = quiet_trainer(tmp_path, max_steps=2)
    trainer.fit(module, datamodule=ArithDataModule(train_size=16, val_size=4, batch_size=2, seed=0))
    assert trainer.global_step == 2
    student_after = fresh_tiny.model.state_dict()
    assert (
        sum(not torch.equal(v, student_after[k]) for k, v in student_before.items())
        > len(student_before) // 2
    )
    for key, value in teacher_lm.state_dict().items():
        assert torch.equal(value, teacher_before[key]), f"teacher weight {key} changed"

    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert not any(key.startswith("teacher.") for key in saved)
    assert any(key.startswith("model.") for key in saved)
    # A resumed run loads strictly: the teacher LM (loaded again from its config) is not "missing".
    fresh = opsd_module(build_small_tiny(), teacher=ModelTeacher(wider_teacher().model))
    fresh.load_state_dict(saved, strict=True)
    torch.testing.assert_close(fresh.teacher.model.lm_head.weight, teacher_lm.lm_head.weight)


@pytest.mark.parametrize("backend", ["full_logits", "chunked"])
def test_a_wider_teacher_gives_the_forward_kl_to_its_own_logits(fresh_tiny, backend):
    """The loss is KL(teacher ‖ student) from the teacher model's own logits, in both loss backends."""
    teacher_lm = wider_teacher().model
    module = opsd_module(fresh_tiny, teacher=ModelTeacher(teacher_lm), loss={"backend": backend})
    batch = problems_batch()
    prompt = module.contexts.student_batch(batch["problem"])
    teacher_prompt = module.contexts.teacher_batch(batch["problem"], batch["solution"])
    rollout = sample(module, prompt, seed=0)
    mask = rollout.completion_mask
    with torch.no_grad():
        teacher_logits = completion_logits(
            teacher_lm, build_scoring_batch(teacher_prompt, rollout.completion_ids, mask)
        )[mask]
        student_logits = completion_logits(
            fresh_tiny.model, build_scoring_batch(prompt, rollout.completion_ids, mask)
        )[mask]
    expected = ForwardKL().per_token(student_logits, teacher_logits, rollout.completion_ids[mask]).sum()
    assert expected > 0.01  # two different models: a comparison that can fail
    loss_sum = distill_sum(module, prompt, teacher_prompt, rollout.completion_ids, mask, mask).loss_sum
    torch.testing.assert_close(loss_sum.detach(), expected, rtol=1e-4, atol=1e-5)


def record_decoder_inputs(model: torch.nn.Module, only_with_grad: bool) -> list[torch.Tensor]:
    """The input ids each forward of `model`'s decoder sees (only the grad-carrying ones if asked)."""
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        if torch.is_grad_enabled() or not only_with_grad:
            seen.append(kwargs["input_ids"].clone())

    model.model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("privileged", [False, True], ids=["student", "reference"])
def test_the_student_context_gives_the_teacher_exactly_the_students_input(fresh_tiny, privileged):
    teacher_lm = wider_teacher().model
    context = ReferenceContext() if privileged else StudentContext()
    module = opsd_module(fresh_tiny, teacher=ModelTeacher(teacher_lm), teacher_context=context)
    student_inputs = record_decoder_inputs(fresh_tiny.model, only_with_grad=True)
    teacher_inputs = record_decoder_inputs(teacher_lm, only_with_grad=False)
    module.micro_batch_loss(problems_batch(), 0)
    assert len(student_inputs) == len(teacher_inputs) == 1
    if privileged:  # the reference solution is in the teacher's context
        assert teacher_inputs[0].shape[1] > student_inputs[0].shape[1]
    else:
        assert torch.equal(teacher_inputs[0], student_inputs[0])


def test_the_teacher_stays_in_eval_mode_and_what_it_reads_is_the_teacher_context_option(tmp_path):
    from hydra.errors import ConfigCompositionException
    from hydra.utils import instantiate

    from opsd_lightning.cli.checks import check_config

    teacher = ModelTeacher(torch.nn.Dropout(0.5))
    teacher.train()
    assert teacher.training and not teacher.model.training
    # What the teacher reads is `teacher_context`, not a teacher option: classic distillation composes and
    # passes the pre-flight check, and the removed teacher option fails at composition, not silently.
    cfg = compose_train(["teacher=model", "teacher_context=student"], tmp_path / "run")
    check_config(cfg)
    assert isinstance(instantiate(cfg.algorithm.teacher_context), StudentContext)
    with pytest.raises(ConfigCompositionException, match="privileged_context"):
        compose_train(["teacher=model", "teacher.privileged_context=false"], tmp_path / "old")


def test_a_teacher_with_another_output_vocabulary_is_rejected_when_attached(fresh_tiny):
    other = build_tiny(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, tokenizer_vocab_size=300)
    with pytest.raises(ValueError, match="teacher.model has an output vocabulary of 300 tokens"):
        opsd_module(fresh_tiny, teacher=ModelTeacher(other.model))


# ---- pre-flight: nothing is built before a bad teacher is reported ---------------------------------------


def fails_before_any_model(overrides: list[str], tmp_path, monkeypatch) -> str:
    """The message `train()` stops with; every data and model loading function is made to fail."""
    import transformers

    from opsd_lightning.cli import app
    from opsd_lightning.cli import train as train_module
    from opsd_lightning.models import hf, tiny

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model or datamodule was loaded before the bad teacher was reported")

    for owner, name in [
        (train_module, "instantiate_datamodule"),
        (train_module, "build_model"),
        (train_module, "build_teacher"),
        (app, "load_pretrained"),
        (hf, "load_pretrained"),
        (tiny, "load_pretrained"),
        (tiny, "build_tiny"),
        (transformers.AutoModelForCausalLM, "from_pretrained"),
    ]:
        monkeypatch.setattr(owner, name, must_not_load)
    with pytest.raises((ValueError, InstantiationException)) as caught:
        train_module.train(compose_train(overrides, tmp_path / "run"))
    return str(caught.value)


def save_tiny(folder, vocab_size: int = 512, corpus: list[str] | None = None) -> str:
    loaded = build_tiny(
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=32,
        tokenizer_vocab_size=vocab_size,
        corpus=corpus,
    )
    return str(save_pretrained(loaded, folder))


def hf_pair(student: str, teacher: str) -> list[str]:
    return [
        "model=hf",
        f"model.name_or_path={student}",
        "teacher=model",
        "model@teacher.model=hf",
        f"teacher.model.name_or_path={teacher}",
    ]


OTHER_CORPUS = ["Zebras quickly jump over lazy dogs while {braces} and [brackets] collect merges. " * 3]


@pytest.mark.parametrize(
    ("student_vocab", "teacher_tokenizer", "message"),
    [  # the default corpus gives 370 tokens at most
        (
            512,
            {"vocab_size": 300},
            "teacher.model has an output vocabulary of 300 tokens and the student (model) 370",
        ),
        (
            300,
            {"vocab_size": 300, "corpus": OTHER_CORPUS},
            "does not share the student's tokenizer: 300 vs 300",
        ),
    ],
    ids=["output-size", "token-ids"],
)
def test_another_vocabulary_fails_before_any_model_is_built(
    student_vocab, teacher_tokenizer, message, tmp_path, monkeypatch
):
    student = save_tiny(tmp_path / "student", vocab_size=student_vocab)
    teacher = save_tiny(tmp_path / "teacher", **teacher_tokenizer)
    error = fails_before_any_model(hf_pair(student, teacher), tmp_path, monkeypatch)
    assert message in error and "teacher.model" in error


def test_a_teacher_with_the_students_tokenizer_passes_the_preflight_check(tmp_path):
    from opsd_lightning.cli.checks import check_config

    student = save_tiny(tmp_path / "student")
    check_config(compose_train(hf_pair(student, save_tiny(tmp_path / "teacher")), tmp_path / "run"))


@pytest.mark.parametrize(
    ("name_or_path", "message"),
    [
        ("{tmp}/missing", "teacher.model.name_or_path={tmp}/missing: no such folder"),
        ("{tmp}/empty", "teacher.model.name_or_path={tmp}/empty: the folder has no config.json"),
        (
            "someone/not-cached",
            "teacher.model.name_or_path=someone/not-cached: no such folder, and HF_HUB_OFFLINE",
        ),
        ("???", "teacher.model.name_or_path is not set"),
    ],
    ids=["missing", "no-config", "hub-offline", "unset"],
)
def test_a_teacher_that_cannot_be_loaded_fails_early(name_or_path, message, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    (tmp_path / "empty").mkdir()
    student = save_tiny(tmp_path / "student")
    overrides = hf_pair(student, name_or_path.format(tmp=tmp_path))
    if name_or_path == "???":
        overrides = overrides[:-1]
    error = fails_before_any_model(overrides, tmp_path, monkeypatch)
    assert message.format(tmp=tmp_path) in error


def test_the_default_tiny_teacher_is_checked_without_building_anything(tmp_path, monkeypatch):
    from opsd_lightning.cli import app
    from opsd_lightning.cli.checks import check_config
    from opsd_lightning.models import tiny, warmup

    def must_not_build(*args, **kwargs):
        raise AssertionError("the pre-flight check built a model")

    for owner, name in [(app, "prepare_tiny_base"), (warmup, "build_tiny"), (tiny, "Qwen3ForCausalLM")]:
        monkeypatch.setattr(owner, name, must_not_build)
    check_config(compose_train(["teacher=model"], tmp_path))
    with pytest.raises(ValueError, match=r"teacher.warmup=.*stesp"):
        check_config(compose_train(["teacher=model", "+teacher.warmup.stesp=3"], tmp_path))


# ---- the tiny default: a second warm-up of the same corpus, trained longer -------------------------------


def tiny_warmup_run(tmp_path, *extra: str):
    return compose_train(
        [
            "teacher=model",
            f"paths.cache_dir={tmp_path / 'cache'}",
            "warmup.steps=2",
            "warmup.num_examples=64",
            "warmup.batch_size=2",
            "warmup.warmup_steps=1",
            "teacher.warmup.steps=3",
            *extra,
        ],
        tmp_path / "run",
    )


def test_the_tiny_teacher_is_a_longer_warm_up_with_the_students_tokenizer(tmp_path):
    from opsd_lightning.cli.app import build_model, build_teacher

    cfg = tiny_warmup_run(tmp_path)
    no_held_out = types.SimpleNamespace(val_rows=[])
    student = build_model(cfg, no_held_out)
    teacher = build_teacher(cfg, no_held_out, student)
    assert isinstance(teacher, ModelTeacher) and teacher.warmup == {"steps": 3}
    assert teacher.model.config.hidden_size == cfg.teacher.model.hidden_size
    assert len(list((tmp_path / "cache").glob("tiny-base-*"))) == 2  # its own cache entry, trained longer
    warmups = [json.loads((f / "warmup.json").read_text()) for f in (tmp_path / "cache").glob("tiny-base-*")]
    steps = sorted(entry["config"]["steps"] for entry in warmups)
    assert steps == [2, 3]
    assert not torch.equal(teacher.model.lm_head.weight, student.model.lm_head.weight)


def test_a_tiny_teacher_with_another_tokenizer_fails_before_its_warm_up(tmp_path, monkeypatch):
    from opsd_lightning.cli.app import build_model, build_teacher
    from opsd_lightning.models import warmup

    cfg = tiny_warmup_run(tmp_path, "teacher.model.tokenizer_vocab_size=300")
    no_held_out = types.SimpleNamespace(val_rows=[])
    student = build_model(cfg, no_held_out)

    def must_not_train(*args, **kwargs):
        raise AssertionError("the teacher's warm-up ran before its tokenizer was checked")

    monkeypatch.setattr(warmup, "train_supervised", must_not_train)
    with pytest.raises(ValueError, match="teacher.model .* does not share the student's tokenizer"):
        build_teacher(cfg, no_held_out, student)
