"""What every on-policy algorithm shares: rollouts, a token-mean loss over the whole optimizer step,
manual optimization, accounting, and held-out accuracy in the validation/test loops.

Subclasses implement `micro_batch_loss(batch)` returning the SUM of per-token losses and the token
count; the base class turns those into one token-mean gradient per optimizer step, across gradient
accumulation and across DDP ranks (trap 4 in docs: averaging per micro-batch weights short and long
completions differently).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric
from transformers import PreTrainedTokenizerBase

from opsd_lightning.contexts import ContextRenderer, ScoringBatch, TokenBatch
from opsd_lightning.evaluation.answers import answers_match, extract_answer
from opsd_lightning.models import eos_token_ids
from opsd_lightning.rollout import Rollout, SamplingConfig, eval_mode, generate_rollouts

RAW_BATCH_KEYS = ("problem", "solution")


@dataclass
class MicroBatchLoss:
    """A micro-batch's summed loss, its token count, and scalar statistics to log (means over the step)."""

    loss_sum: torch.Tensor
    num_tokens: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


def check_raw_batch(batch: Mapping) -> None:
    """A user datamodule must yield raw text; say exactly what is expected when it does not."""
    missing = [key for key in RAW_BATCH_KEYS if key not in batch]
    if missing or not isinstance(batch.get("problem"), list | tuple):
        raise ValueError(
            f"a training batch has keys {sorted(batch)}; expected raw text "
            '{"problem": list[str], "solution": list[str], "answer": list[str] (optional)}'
            f"{' (missing: ' + ', '.join(missing) + ')' if missing else ''}. "
            "See README, 'Your own datamodule'."
        )


def completion_logits(model: nn.Module, batch: ScoringBatch) -> torch.Tensor:
    """Next-token logits at the completion positions only, `[B, Lc, V]`.

    `logits_to_keep` skips the LM head on prompt positions (the teacher prompt holds the whole reference).
    """
    num_completion = batch.logit_slice.stop - batch.logit_slice.start
    output = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        logits_to_keep=num_completion + 1,
    )
    return output.logits[:, :num_completion]


class HeldOutMetrics(nn.Module):
    """Held-out accuracy (exact match of the last boxed answer), format rate, length, truncation."""

    names = ("accuracy", "format_rate", "completion_length", "truncation_rate")

    def __init__(self) -> None:
        super().__init__()
        self.metrics = nn.ModuleDict({name: MeanMetric() for name in self.names})

    def update(self, correct: torch.Tensor, formatted: torch.Tensor, rollout: Rollout) -> None:
        self.metrics["accuracy"].update(correct.float())
        self.metrics["format_rate"].update(formatted.float())
        self.metrics["completion_length"].update(rollout.lengths.float())
        self.metrics["truncation_rate"].update(rollout.truncated.float())


class PolicyModule(L.LightningModule):
    """Base LightningModule for algorithms that train a causal LM on its own rollouts.

    Args:
        model / tokenizer: the policy (and, for OPSD, also the teacher).
        contexts: renders student (and teacher) prompts with the chat template.
        sampling: rollout settings for training (temperature, top_p, top_k, max_new_tokens).
        eval_sampling: settings for held-out evaluation (temperature 0 = greedy).
        eval_num_samples: completions per held-out problem; `accuracy` is their mean (avg@k).
        optimizer: a partial taking the trainable parameters (Hydra `_partial_: true`).
        scheduler: optional partial taking the optimizer; stepped once per optimizer step.
        accumulate_grad_batches: micro-batches per optimizer step (the loss is a token mean over all of them).
        gradient_clip_val: max global grad norm, or None.
        seed: base seed; rollouts are seeded by (seed, step, micro-batch, rank), so resumes reproduce them.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        contexts: ContextRenderer,
        optimizer: Callable[..., torch.optim.Optimizer],
        sampling: SamplingConfig | Mapping | None = None,
        eval_sampling: SamplingConfig | Mapping | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = 1.0,
        eval_num_samples: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if eval_num_samples < 1:
            raise ValueError(f"algorithm.eval_num_samples={eval_num_samples} must be >= 1")
        self.eval_num_samples = eval_num_samples
        if accumulate_grad_batches < 1:
            raise ValueError(f"algorithm.accumulate_grad_batches={accumulate_grad_batches} must be >= 1")
        self.automatic_optimization = False  # we own the step-level token normalisation
        self.model = model
        self.tokenizer = tokenizer
        self.contexts = contexts
        self.sampling = _sampling(sampling, SamplingConfig())
        self.eval_sampling = _sampling(eval_sampling, SamplingConfig(temperature=0.0))
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.seed = seed
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.val_metrics = HeldOutMetrics()
        self.test_metrics = HeldOutMetrics()
        self.generated_tokens = 0  # cumulative over all ranks, saved in checkpoints
        self._window: dict[str, float] = {}
        self._window_stats: dict[str, list[float]] = {}

    # ---- what subclasses provide -------------------------------------------------------------
    def micro_batch_loss(self, batch: Mapping, micro_index: int) -> MicroBatchLoss:
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Hook for subclasses (e.g. the EMA teacher update)."""

    def on_train_start(self) -> None:
        # from_pretrained leaves models in eval mode and Lightning keeps modes as it finds them.
        self.train()

    # ---- shared pieces ----------------------------------------------------------------------
    def configure_optimizers(self):
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters (check peft / freezing settings)")
        optimizer = self.optimizer_factory(trainable)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def rollout_seed(self, micro_index: int) -> int:
        return hash((self.seed, self.global_step, micro_index, self.global_rank)) % (2**31)

    def rollout(self, prompt: TokenBatch, sampling: SamplingConfig, seed: int | None) -> Rollout:
        return generate_rollouts(
            self.model, prompt, sampling, self.eos_ids, self.tokenizer.pad_token_id, seed
        )

    def training_step(self, batch: Mapping, batch_idx: int) -> torch.Tensor:
        check_raw_batch(batch)
        micro_index = batch_idx % self.accumulate_grad_batches
        if micro_index == 0:
            self._window = {"loss_sum": 0.0, "num_tokens": 0.0, "start": time.perf_counter()}
            self._window_stats = {}
        result = self.micro_batch_loss(batch, micro_index)
        self.manual_backward(result.loss_sum)
        self._window["loss_sum"] += float(result.loss_sum.detach())
        self._window["num_tokens"] += float(result.num_tokens)
        for name, value in result.stats.items():
            self._window_stats.setdefault(name, []).append(value)
        if micro_index + 1 == self.accumulate_grad_batches or self._is_last_batch(batch_idx):
            self._optimizer_step()
        return result.loss_sum.detach()

    def _is_last_batch(self, batch_idx: int) -> bool:
        num_batches = self.trainer.num_training_batches
        return isinstance(num_batches, int) and batch_idx + 1 == num_batches

    def _optimizer_step(self) -> None:
        optimizer = self.optimizers()
        totals = torch.tensor([self._window["loss_sum"], self._window["num_tokens"]], device=self.device)
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        loss_sum, num_tokens = float(totals[0]), float(totals[1])
        if num_tokens > 0:
            # Each rank back-propagated its token SUM and DDP averaged over ranks: rescale to a global mean.
            scale = self.trainer.world_size / num_tokens
            for param in self.model.parameters():
                if param.grad is not None:
                    param.grad.mul_(scale)
            if self.gradient_clip_val:
                self.clip_gradients(
                    optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm"
                )
            optimizer.step()
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()
            self.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds = time.perf_counter() - self._window["start"]
        self.log("train/loss", loss_sum / max(num_tokens, 1.0), prog_bar=True)
        self.log("train/trained_tokens", num_tokens)
        self.log("train/step_seconds", step_seconds)
        self.log("train/generated_tokens_total", float(self.generated_tokens), prog_bar=True)
        for name, values in self._window_stats.items():
            self.log(f"train/{name}", sum(values) / len(values), prog_bar=name == "completion_length")

    def count_generated(self, rollout: Rollout) -> int:
        """Add this micro-batch's generated tokens, summed over ranks, to the running total."""
        local = torch.tensor(float(rollout.num_tokens), device=self.device)
        total = (
            int(self.trainer.strategy.reduce(local, reduce_op="sum")) if self._trainer else rollout.num_tokens
        )
        self.generated_tokens += total
        return total

    # ---- held-out evaluation ----------------------------------------------------------------
    def _evaluate(self, batch: Mapping, metrics: HeldOutMetrics, prefix: str) -> None:
        k = self.eval_num_samples
        problems = [problem for problem in batch["problem"] for _ in range(k)]
        references = [
            answer for answer in (batch.get("answer") or [""] * len(batch["problem"])) for _ in range(k)
        ]
        prompt = self.contexts.student_batch(problems).to(self.device)
        # The same seed before and after training: both evaluations draw the same random numbers.
        rollout = self.rollout(prompt, self.eval_sampling, seed=self.seed)
        texts = self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        predictions = [extract_answer(text) for text in texts]
        correct = torch.tensor([answers_match(p, r) for p, r in zip(predictions, references, strict=True)])
        formatted = torch.tensor([p is not None for p in predictions])
        metrics.update(correct.to(self.device), formatted.to(self.device), rollout)
        for name, metric in metrics.metrics.items():
            self.log(
                f"{prefix}/{name}",
                metric,
                on_step=False,
                on_epoch=True,
                prog_bar=name == "accuracy",
                batch_size=len(texts),
            )

    def validation_step(self, batch: Mapping, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: Mapping, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    # ---- checkpoint state that is not a tensor ------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["opsd_generated_tokens"] = self.generated_tokens

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.generated_tokens = checkpoint.get("opsd_generated_tokens", 0)


def _sampling(value: SamplingConfig | Mapping | None, default: SamplingConfig) -> SamplingConfig:
    if value is None:
        return default
    return value if isinstance(value, SamplingConfig) else SamplingConfig(**value)


__all__ = ["MicroBatchLoss", "PolicyModule", "completion_logits", "check_raw_batch", "eval_mode"]
