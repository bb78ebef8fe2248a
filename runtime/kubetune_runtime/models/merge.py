"""Merge a LoRA adapter into its base and prove the merged model computes the same thing.

For QLoRA the adapter was trained against 4-bit weights, so the base is loaded exactly as in
training (same bitsandbytes settings), de-quantized to a dense model, and the adapter is
merged into that; merging into 4-bit weights would re-quantize the sum and lose the update.
Before anything is published the merged model's logits are compared with base + adapter
(unmerged) on a few prompts (PEFT's ``merge_and_unload``; the check is ours).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_runtime.config import QuantizationConfig
from kubetune_runtime.errors import TrainingFailed
from kubetune_runtime.models.loading import ModelSource, Precision, load_model

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "Natalia sold clips to 48 of her friends in April.",
    "What is 12 times 7?",
    "The quick brown fox",
)


@dataclass(frozen=True)
class MergeReport:
    """Largest absolute logit difference between merged and unmerged, per prompt, and the bound."""

    max_abs_diff: float
    tolerance: float
    prompts: int


def _logits(model: Any, tokenizer: Any, prompts: Sequence[str]) -> list[Any]:
    import torch  # noqa: PLC0415

    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").to(model.device)
            outputs.append(model(**ids).logits.float().cpu())
    return outputs


def _declared_dtype(source: ModelSource, *, trust_remote_code: bool) -> str:
    """The dtype the base checkpoint declares in its config (float32 when it declares none)."""
    from transformers import AutoConfig  # noqa: PLC0415

    config = AutoConfig.from_pretrained(
        source.name_or_path,
        revision=source.revision,
        token=source.token,
        trust_remote_code=trust_remote_code,
    )
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in ("float32", "float16", "bfloat16") else "float32"


def merge_adapter(
    source: ModelSource,
    adapter_dir: Path,
    out_dir: Path,
    *,
    tokenizer: Any,
    quantization: QuantizationConfig | None,
    trust_remote_code: bool,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    rtol: float = 1e-3,
) -> MergeReport:
    """Write base + adapter as one standard HF model (safetensors) to ``out_dir``.

    Args:
        source: the base model (as loaded for training).
        adapter_dir: a PEFT adapter folder (adapter_config.json, adapter_model.safetensors).
        out_dir: destination; receives the model, its config and the tokenizer.
        tokenizer: saved alongside so the folder is self-contained.
        quantization: the training-time 4-bit settings for QLoRA, else None.
        trust_remote_code: as for training.
        prompts: texts whose logits must agree.
        rtol: tolerance relative to the largest logit magnitude.

    Returns:
        A :class:`MergeReport`.

    Raises:
        TrainingFailed: merged and unmerged logits disagree beyond the tolerance; nothing is
            written in that case.
    """
    import torch  # noqa: PLC0415
    from peft import PeftModel  # noqa: PLC0415

    saved_dtype = _declared_dtype(source, trust_remote_code=trust_remote_code)
    fp32 = Precision("float32", bf16=False, fp16=False)
    base = load_model(
        source,
        precision=fp32,
        quantization=quantization,
        trust_remote_code=trust_remote_code,
        gradient_checkpointing=False,
    )
    if quantization is not None:
        base = base.dequantize()  # dense weights equal to what training saw
        base = base.to(torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    unmerged = _logits(model, tokenizer, prompts)
    merged_model = model.merge_and_unload()
    merged = _logits(merged_model, tokenizer, prompts)
    diff = max(float((a - b).abs().max()) for a, b in zip(unmerged, merged, strict=True))
    scale = max(float(a.abs().max()) for a in unmerged)
    tolerance = rtol * max(scale, 1.0)
    if diff > tolerance:
        raise TrainingFailed(
            f"merged model disagrees with base + adapter: max logit difference {diff:.3g} > "
            f"{tolerance:.3g}; the merged model was not published"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    # Keep the base's own dtype (read before loading in fp32 overwrote it); a de-quantized
    # QLoRA base is saved in 16-bit.
    dtype = torch.bfloat16 if quantization is not None else getattr(torch, saved_dtype)
    merged_model.to(dtype).save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    log.info("Merged adapter max_abs_logit_diff=%.3g tolerance=%.3g", diff, tolerance)
    return MergeReport(max_abs_diff=diff, tolerance=tolerance, prompts=len(prompts))
