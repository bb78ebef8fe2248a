"""A leaner SFT loss for CPU: the LM head and cross-entropy on trained positions only.

trl's ``SFTTrainer.compute_loss`` runs its chunked log-prob head (with entropy and top-1
metrics) on *every* position when there is no Triton (CPU) and recomputes the logits in
backward. With assistant-only labels most positions are prompts that are never trained, so
projecting only the positions whose next-token label is trained and using plain
cross-entropy gives the same loss for a fraction of the work and memory (measured by
``bench/train_throughput.py``). On GPUs trl's fused head stays: materialising
``[trained positions, vocab]`` logits there can cost gigabytes for large vocabularies.
"""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100


def lean_loss_applies(model: Any) -> bool:
    """True when the plain cross-entropy equals the model's own loss and saves work.

    Not on CUDA (trl's fused head is better there), and not for models whose loss is more than
    cross-entropy on the output projection: final-logit soft-capping (Gemma 2), logit scaling
    (Cohere) or a mixture-of-experts auxiliary loss.
    """
    import torch  # noqa: PLC0415

    if torch.cuda.is_available():
        return False
    config = getattr(model, "config", None)
    for attribute in ("final_logit_softcapping", "logit_scale", "output_router_logits"):
        if getattr(config, attribute, None):
            return False
    return not getattr(config, "num_experts", None) and not getattr(
        config, "num_local_experts", None
    )


def trained_positions_loss(
    causal_lm: Any, inputs: dict[str, Any], num_items_in_batch: Any = None
) -> Any:
    """Mean next-token cross-entropy over trained positions (``labels != -100``).

    Args:
        causal_lm: the (unwrapped) causal LM; a PEFT model is reduced to its base model, whose
            LoRA layers stay active.
        inputs: the batch (``input_ids``, ``labels`` ``[batch, seq]``, ``position_ids``...).
        num_items_in_batch: trained tokens across gradient accumulation (the Trainer's
            normaliser), or None to average over this batch.

    Returns:
        A scalar tensor, equal to ``ForCausalLMLoss`` on the same batch.
    """
    import torch.nn.functional as F  # noqa: N812, PLC0415

    if hasattr(causal_lm, "get_base_model"):  # PEFT
        causal_lm = causal_lm.get_base_model()
    backbone_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    backbone_inputs["use_cache"] = False
    hidden = causal_lm.base_model(**backbone_inputs).last_hidden_state[:, :-1]
    targets = inputs["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    logits = causal_lm.get_output_embeddings()(hidden[mask])
    loss = F.cross_entropy(logits.float(), targets[mask], reduction="sum")
    return loss / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
