"""SFT baseline: next-token loss on the reference solutions, in the student context (off-policy)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from opsd_lightning.algorithms.base import MicroBatchLoss, PolicyModule
from opsd_lightning.batches import build_scoring_batch
from opsd_lightning.rollout import completion_mask_from_ids
from opsd_lightning.scoring import completion_logits


class SFTModule(PolicyModule):
    """Supervised fine-tuning on `[student prompt | reference solution + EOS]`; prompt tokens are not trained.

    It shares the model, contexts, evaluation and step-level token mean with OPSD; it generates nothing
    in training, so it has no `sampling` (a `sampling` given to it is not used).
    """

    nested_settings = {}

    def micro_batch_loss(self, batch: Mapping, micro_index: int) -> MicroBatchLoss:
        prompt = self.contexts.student_batch(batch["problem"]).to(self.device)
        completion_ids, completion_mask = self.reference_completions(batch["solution"])
        scoring = build_scoring_batch(prompt, completion_ids, completion_mask)
        logits = completion_logits(self.model, scoring)
        log_probs = torch.log_softmax(logits[completion_mask].float(), dim=-1)
        token_nll = -log_probs.gather(-1, completion_ids[completion_mask].unsqueeze(-1)).squeeze(-1)
        stats = {"completion_length": float(completion_mask.sum(1).float().mean())}
        return MicroBatchLoss(loss_sum=token_nll.sum(), num_tokens=completion_mask.sum(), stats=stats)

    def reference_completions(self, solutions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference solutions as completion ids (text + EOS), right-padded, with their mask."""
        encoded = [self.tokenizer.encode(s, add_special_tokens=False) + [self.eos_ids[0]] for s in solutions]
        width = max(len(ids) for ids in encoded)
        ids = torch.full((len(encoded), width), self.tokenizer.pad_token_id, dtype=torch.long)
        for row, tokens in enumerate(encoded):
            ids[row, : len(tokens)] = torch.tensor(tokens)
        mask, _ = completion_mask_from_ids(ids, self.eos_ids)
        return ids.to(self.device), mask.to(self.device)
