"""Forward passes that score a completion under a context: logits or final hidden states at the positions
that predict the completion tokens, from any (possibly PEFT-wrapped) Hugging Face causal LM."""

from __future__ import annotations

from torch import Tensor, nn

from opsd_lightning.contexts.batches import ScoringBatch


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (LoRA layers sit in it, so they still apply)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_layer(model: nn.Module) -> nn.Module | None:
    """The LM head (`get_output_embeddings`), or None for a model that does not expose one."""
    get_head = getattr(base_model(model), "get_output_embeddings", None)
    return get_head() if get_head is not None else None


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack and the output layer of a causal LM.

    Calling the decoder directly yields final hidden states without running the LM head: the chunked
    loss then computes logits a chunk at a time.
    """
    base = base_model(model)
    get_decoder, head = getattr(base, "get_decoder", None), output_layer(base)
    decoder = get_decoder() if get_decoder is not None else None
    if decoder is None or decoder is base or head is None:
        raise ValueError(
            f"{type(base).__name__} does not expose a decoder and an output layer "
            "(get_decoder / get_output_embeddings); use algorithm.loss.backend=full_logits"
        )
    if getattr(base.config, "final_logit_softcapping", None):
        raise ValueError(
            f"{type(base).__name__} soft-caps its logits, which the chunked loss does not model; "
            "use algorithm.loss.backend=full_logits"
        )
    return decoder, head


def completion_logits(model: nn.Module, batch: ScoringBatch) -> Tensor:
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


def completion_hidden(model: nn.Module, batch: ScoringBatch) -> Tensor:
    """Final hidden states at the positions that predict the completion tokens, `[B, Lc, H]`."""
    decoder, _ = causal_lm_parts(model)
    output = decoder(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    return output.last_hidden_state[:, batch.logit_slice]
