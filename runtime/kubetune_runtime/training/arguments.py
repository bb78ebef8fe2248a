"""TrainingArguments from the RunConfig (pure): one mapping shared by SFT, DPO and ORPO."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune_runtime.config import RunConfig
from kubetune_runtime.models.loading import Precision


def training_arguments(
    config: RunConfig,
    *,
    output_dir: Path,
    precision: Precision,
    deepspeed: dict[str, Any] | None,
    has_eval: bool,
    cuda: bool,
    world_size: int = 1,
    use_configured_state: bool = False,
) -> dict[str, Any]:
    """Keyword arguments for ``transformers.TrainingArguments`` (and trl's configs).

    Choices beyond a plain mapping, each for a reason:

    * ``logging_nan_inf_filter=False`` so a NaN loss is seen (and the run aborted), not hidden;
    * ``include_num_input_tokens_seen="non_padding"`` for an honest tokens/s;
    * ``save_only_model=False`` so checkpoints hold optimizer, scheduler and RNG state and a
      resumed run continues the same loss curve;
    * warm-up as ``warmup_steps`` (transformers 5 takes a float in [0, 1) as a ratio);
    * ``gloo`` for multi-process runs on CPU; no reporting integrations (progress has its own
      sinks) and no tqdm bar (the local executor draws one from the progress stream).
    """
    t = config.training
    checkpoint = config.checkpoint
    if checkpoint is None:
        raise ValueError("a training RunConfig has a checkpoint section")
    warmup: float | int = t.warmup_steps if t.warmup_steps is not None else (t.warmup_ratio or 0.0)
    return {
        "output_dir": str(output_dir),
        "num_train_epochs": t.num_train_epochs,
        "max_steps": t.max_steps if t.max_steps is not None else -1,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler_type,
        "warmup_steps": warmup,
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "per_device_eval_batch_size": t.per_device_train_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        # transformers 5 names gradient checkpointing "activation checkpointing".
        "activation_checkpointing": t.gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False}
        if t.gradient_checkpointing
        else None,
        "bf16": precision.bf16,
        "fp16": precision.fp16,
        "optim": t.optim,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "seed": t.seed,
        "data_seed": t.seed,
        "logging_steps": t.logging_steps,
        "logging_nan_inf_filter": False,
        "eval_strategy": "steps" if has_eval and t.eval_steps else "no",
        "eval_steps": t.eval_steps if has_eval else None,
        "save_strategy": "steps",
        "save_steps": checkpoint.every_steps,
        "save_total_limit": checkpoint.keep_last,
        "save_only_model": False,
        "report_to": [],
        "disable_tqdm": True,
        "include_num_input_tokens_seen": "non_padding",
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
        "deepspeed": deepspeed,
        "ddp_backend": "gloo" if world_size > 1 and not cuda else None,
        "log_level": "warning",
        # Set when the process state was created beforehand (DeepSpeed on CPU, see
        # training.distributed.configure_cpu_deepspeed).
        "accelerator_config": {"use_configured_state": True} if use_configured_state else None,
    }
