"""The training recipe (FineTuneJob): setup -> train -> save and publish -> merge -> evaluate.

Read top to bottom: :func:`run` is the whole program. SFT and the preference objectives (DPO,
ORPO) differ only in how data becomes a dataset and which trl trainer runs; those two steps are
the functions right below it. Everything else is a shared step from a small module.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

from kubetune_runtime.config import RunConfig
from kubetune_runtime.data.formats import convert_rows
from kubetune_runtime.data.sources import load_source
from kubetune_runtime.data.tokenize import (
    PackedRowsCollator,
    PaddedCollator,
    pack_examples,
    prepare_tokenizer,
    tokenize_dataset,
)
from kubetune_runtime.errors import ConfigInvalid, DataInvalid
from kubetune_runtime.models.adapters import build_lora_config, check_target_modules
from kubetune_runtime.models.loading import (
    ModelSource,
    device_precision,
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from kubetune_runtime.models.merge import merge_adapter
from kubetune_runtime.progress import (
    HttpSink,
    JsonlSink,
    LogSink,
    ProgressReporter,
    ProgressUpdate,
)
from kubetune_runtime.recipes.evaluate import evaluate_adapter
from kubetune_runtime.result import RunResult
from kubetune_runtime.storage import uris
from kubetune_runtime.storage.artifacts import publish_dir, write_manifest
from kubetune_runtime.storage.fetch import fetch, storage_for
from kubetune_runtime.training.arguments import training_arguments
from kubetune_runtime.training.callbacks import GracefulStop, NonFiniteLossGuard, ProgressCallback
from kubetune_runtime.training.checkpoints import CheckpointSync, restore_latest
from kubetune_runtime.training.distributed import (
    configure_cpu_deepspeed,
    deepspeed_config,
    process_info,
)
from kubetune_runtime.training.loss import lean_loss_applies, trained_positions_loss

log = logging.getLogger(__name__)


def run(config: RunConfig, *, workdir: Path) -> RunResult:
    """Fine-tune as ``config`` says and publish a verified adapter (or model).

    SIGTERM/SIGINT are handled for the whole run: during training they checkpoint and stop at
    the next step; before training they stop before the first step; once training is done the
    run still publishes (publishing is atomic, so a kill midway leaves nothing half-visible).

    Returns:
        Succeeded with the artifact and metrics, or Interrupted (SIGTERM/SIGINT) after a
        checkpoint was published; the next run with the same config resumes from it.

    Raises:
        DataInvalid, ConfigInvalid, TrainingFailed, StorageFailure, ArtifactInvalid: before
            or during training, with a one-sentence reason (the entry point reports it).
    """
    stopper = GracefulStop()
    stopper.install()
    try:
        return _train(config, workdir=workdir, stopper=stopper)
    finally:
        stopper.uninstall()


def _train(config: RunConfig, *, workdir: Path, stopper: GracefulStop) -> RunResult:  # noqa: PLR0915 - one readable program
    """The program behind :func:`run`, top to bottom."""
    import torch  # noqa: PLC0415
    from transformers import PrinterCallback  # noqa: PLC0415

    # RunConfig guarantees these sections for task train.
    assert config.data is not None  # noqa: S101
    assert config.output is not None  # noqa: S101
    assert config.checkpoint is not None  # noqa: S101
    if config.evaluation is not None and config.lora is None:  # refuse before any work
        raise ConfigInvalid("evaluation after a full fine-tune is not supported yet")
    proc = process_info()
    cache = workdir / "cache"
    output_dir = workdir / "trainer"
    reporter = _reporter(config, workdir, enabled=proc.is_main)

    # --- setup: model source, tokenizer, data, model ------------------------------------
    precision = device_precision(config.training.precision)
    source = resolve_model_source(config.model, lambda uri: fetch(uri, config.storage, cache))
    tokenizer = prepare_tokenizer(
        load_tokenizer(source, trust_remote_code=config.model.trust_remote_code),
        chat_template=config.data.chat_template,
    )
    train_rows = load_source(config.data.train, config.storage, cache)
    eval_rows = load_source(config.data.eval, config.storage, cache) if config.data.eval else []
    objective = config.objective.type
    train_examples, conversion = convert_rows(
        train_rows,
        config.data.train.format,
        config.data.train.columns,
        objective=objective,
        system_prompt=config.data.system_prompt,
    )
    eval_examples: list[Any] = []
    if eval_rows:
        assert config.data.eval is not None  # noqa: S101
        eval_examples, _ = convert_rows(
            eval_rows,
            config.data.eval.format,
            config.data.eval.columns,
            objective=objective,
            system_prompt=config.data.system_prompt,
        )
    elif config.data.eval_split_fraction:
        train_examples, eval_examples = _split(
            train_examples, config.data.eval_split_fraction, config.training.seed
        )
    dataset_digest = _digest(train_examples)
    log.info(
        "Data format=%s rows=%d examples=%d eval=%d dropped=%s",
        conversion.format,
        conversion.rows_read,
        len(train_examples),
        len(eval_examples),
        dict(conversion.dropped),
    )

    # The trainer's arguments exist before the model is loaded: with ZeRO-3 that makes
    # from_pretrained partition the weights as they load (transformers' HfDeepSpeedConfig).
    trainer_args = _trainer_args(
        config,
        training_arguments(
            config,
            output_dir=output_dir,
            precision=precision,
            deepspeed=deepspeed_config(config.distributed),
            has_eval=bool(eval_examples),
            cuda=torch.cuda.is_available(),
            world_size=proc.world_size,
            use_configured_state=configure_cpu_deepspeed(
                config.distributed, cuda=torch.cuda.is_available(), world_size=proc.world_size
            ),
        ),
    )
    model = load_model(
        source,
        precision=precision,
        quantization=config.quantization,
        trust_remote_code=config.model.trust_remote_code,
        gradient_checkpointing=config.training.gradient_checkpointing,
    )
    peft_config = None
    if config.lora is not None:
        check_target_modules(config.lora, model.named_modules())
        peft_config = build_lora_config(config.lora)

    # --- train ---------------------------------------------------------------------------
    progress = ProgressCallback(reporter, enabled=proc.is_main)
    # Checkpoints live under a folder named after the training configuration's digest: a rerun
    # of the same configuration resumes, a changed one (new hyperparameters, data or model)
    # starts fresh instead of resuming from an incompatible state.
    checkpoint_uri = uris.join(config.checkpoint.uri, f"run-{_config_digest(config)[7:19]}")
    storage = storage_for(checkpoint_uri, config.storage)
    sync = CheckpointSync(
        storage, checkpoint_uri, keep_last=config.checkpoint.keep_last, enabled=proc.is_main
    )
    callbacks = [NonFiniteLossGuard(), progress, stopper, sync]  # abort before reporting NaN
    if objective == "sft":
        trainer, data_summary = _sft_trainer(
            config,
            model=model,
            tokenizer=tokenizer,
            train_examples=train_examples,
            eval_examples=eval_examples,
            trainer_args=trainer_args,
            peft_config=peft_config,
            callbacks=callbacks,
        )
    else:
        trainer, data_summary = _preference_trainer(
            config,
            model=model,
            tokenizer=tokenizer,
            train_examples=train_examples,
            eval_examples=eval_examples,
            trainer_args=trainer_args,
            peft_config=peft_config,
            callbacks=callbacks,
        )
    trainer.remove_callback(PrinterCallback)  # our progress sinks replace its raw dict prints
    resume_from = restore_latest(storage, checkpoint_uri, output_dir)
    baseline: dict[str, float] = {}
    # The base's eval loss, to show the improvement. Not with DeepSpeed: an evaluation before
    # train() leaves the Trainer with an inference-only engine that cannot train.
    if eval_examples and resume_from is None and config.distributed.deepspeed is None:
        baseline = {"evalLossBefore": float(trainer.evaluate()["eval_loss"])}
    if stopper.stop_requested:  # signalled while preparing: nothing trained, nothing to save
        return RunResult(
            status="Interrupted",
            reason=stopper.stop_requested,
            message="stopped before training; starting the run again starts it",
        )
    train_output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    signal_name = stopper.requested()
    if signal_name and trainer.state.global_step < trainer.state.max_steps:
        return RunResult(
            status="Interrupted",
            reason=signal_name,
            message=f"stopped at step {trainer.state.global_step} after checkpointing; "
            "starting the run again resumes from the checkpoint",
            checkpoint=sync.last,
        )
    metrics = {
        **baseline,
        **_final_metrics(train_output.metrics, trainer, eval_examples),
        # The data summary travels with the result: what was read, dropped and trained on.
        "rowsRead": float(conversion.rows_read),
        "rowsDropped": float(conversion.rows_dropped),
        **{
            key: float(data_summary[name])
            for key, name in (
                ("trainTokens", "tokens"),
                ("trainedTokens", "trained_tokens"),
                ("truncatedSamples", "truncated"),
            )
            if isinstance(data_summary.get(name), int | float)
        },
    }

    # --- save and publish (rank 0) ------------------------------------------------------
    kind = "adapter" if config.lora is not None else "model"  # a full fine-tune is a model
    adapter_dir = workdir / "artifact" / kind
    trainer.save_model(str(adapter_dir))
    if not proc.is_main:
        return RunResult(status="Succeeded", reason="TrainingSucceeded")
    tokenizer.save_pretrained(str(adapter_dir))
    # The Trainer also writes training_args.bin, a pickle: never publish executable data.
    (adapter_dir / "training_args.bin").unlink(missing_ok=True)
    metadata = _artifact_metadata(config, source, dataset_digest, metrics, data_summary)
    write_manifest(adapter_dir, metadata=metadata)
    adapter_uri = uris.join(config.output.uri, kind)
    published = publish_dir(storage_for(adapter_uri, config.storage), adapter_dir, adapter_uri)
    log.info("Published artifact uri=%s digest=%s", published.uri, published.digest)
    artifact: dict[str, Any] = {
        "uri": published.uri,
        "digest": published.digest,
        "sizeBytes": published.size_bytes,
        "baseModel": config.model.uri,
        **_adapter_facts(config),
    }

    # --- merge (optional) ----------------------------------------------------------------
    if config.output.merge and config.lora is not None:
        merged_dir = workdir / "artifact" / "merged"
        merge_adapter(
            source,
            adapter_dir,
            merged_dir,
            tokenizer=tokenizer,
            quantization=config.quantization,
            trust_remote_code=config.model.trust_remote_code,
        )
        write_manifest(merged_dir, metadata={**metadata, "merged": True})
        merged_uri = uris.join(config.output.uri, "merged")
        merged = publish_dir(storage_for(merged_uri, config.storage), merged_dir, merged_uri)
        artifact["mergedUri"] = merged.uri

    # --- evaluate (optional): base vs base + the adapter just published ------------------
    final_step, max_steps, epoch = (
        trainer.state.global_step,
        trainer.state.max_steps,
        trainer.state.epoch,
    )
    evaluation = None
    if config.evaluation is not None:
        del trainer, model  # free the training copy: evaluation loads the base once more
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        evaluation = evaluate_adapter(
            config,
            adapter_dir,
            source,
            tokenizer,
            workdir=workdir,
            adapter_uri=published.uri,
            adapter_digest=published.digest,
            result_budget_bytes=2048,
        )

    reporter.report(
        ProgressUpdate(
            step=final_step,
            total_steps=max_steps,
            epoch=epoch,
            loss=metrics.get("trainLoss"),
            eval_loss=metrics.get("evalLoss"),
            final=True,
        )
    )
    return RunResult(
        status="Succeeded",
        reason="TrainingSucceeded",
        message=f"published {published.uri}",
        artifact=artifact,
        metrics=metrics,
        evaluation=evaluation,
    )


# --------------------------------------------------------------------- objective-specific


def _sft_trainer(
    config: RunConfig,
    *,
    model: Any,
    tokenizer: Any,
    train_examples: list[Any],
    eval_examples: list[Any],
    trainer_args: Any,
    peft_config: Any,
    callbacks: list[Any],
) -> tuple[Any, dict[str, Any]]:
    """SFT on our own tokenization: assistant-only labels, optional padding-free packing."""
    from datasets import Dataset  # noqa: PLC0415

    assert config.data is not None  # noqa: S101
    data = config.data

    def tokenized(examples: list[Any]) -> tuple[list[dict[str, list[int]]], dict[str, Any]]:
        samples = [e.get("messages", e) for e in examples]
        rows, summary = tokenize_dataset(
            tokenizer,
            samples,
            max_seq_length=data.max_seq_length,
            overlength=data.overlength,
            completion_only_loss=data.completion_only_loss,
        )
        return rows, summary.to_dict()

    train_rows, summary = tokenized(train_examples)
    log.info("Tokenized %s", json.dumps(summary, sort_keys=True))
    eval_rows = tokenized(eval_examples)[0] if eval_examples else []
    if data.packing:
        train_rows = pack_examples(train_rows, data.max_seq_length)
        eval_rows = pack_examples(eval_rows, data.max_seq_length) if eval_rows else []
        # One row per packed sequence (not one concatenated row): the attention mask stays
        # per row, which is what makes packing pay off with sdpa (bench/train_throughput.py).
        collator: Any = PackedRowsCollator(pad_token_id=tokenizer.pad_token_id)
    else:
        collator = PaddedCollator(pad_token_id=tokenizer.pad_token_id)
    trainer = _sft_trainer_class()(
        model=model,
        args=trainer_args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        data_collator=collator,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    return trainer, summary


def _sft_trainer_class() -> Any:
    """Trl's SFTTrainer, with the lean trained-positions loss where it applies (CPU)."""
    from trl import SFTTrainer  # noqa: PLC0415

    class LeanSFTTrainer(SFTTrainer):
        """SFTTrainer whose training loss skips untrained positions (training/loss.py)."""

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            unwrapped = self.accelerator.unwrap_model(model)
            if return_outputs or not lean_loss_applies(unwrapped):
                return super().compute_loss(  # type: ignore[no-untyped-call]
                    model, inputs, return_outputs, num_items_in_batch
                )
            return trained_positions_loss(unwrapped, inputs, num_items_in_batch)

    return LeanSFTTrainer


def _preference_trainer(
    config: RunConfig,
    *,
    model: Any,
    tokenizer: Any,
    train_examples: list[Any],
    eval_examples: list[Any],
    trainer_args: Any,
    peft_config: Any,
    callbacks: list[Any],
) -> tuple[Any, dict[str, Any]]:
    """DPO (trl.DPOTrainer) or ORPO (trl.experimental.orpo.ORPOTrainer) on preference pairs.

    trl tokenizes the conversational pairs with the chat template; with LoRA the reference
    model for DPO is the base with the adapter disabled (no second copy in memory).
    """
    from datasets import Dataset  # noqa: PLC0415
    from trl import DPOTrainer  # noqa: PLC0415

    trainer_cls: Any = DPOTrainer if config.objective.type == "dpo" else _orpo().ORPOTrainer
    trainer = trainer_cls(
        model=model,
        args=trainer_args,
        train_dataset=Dataset.from_list(train_examples),
        eval_dataset=Dataset.from_list(eval_examples) if eval_examples else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    return trainer, {"pairs": len(train_examples), "evalPairs": len(eval_examples)}


def _trainer_args(config: RunConfig, args: dict[str, Any]) -> Any:
    """The trl config for the objective: SFTConfig, DPOConfig or ORPOConfig."""
    assert config.data is not None  # noqa: S101
    objective = config.objective
    if objective.type == "sft":
        from trl import SFTConfig  # noqa: PLC0415

        # Our own tokenization and packing: trl must not re-process the dataset.
        return SFTConfig(**args, dataset_kwargs={"skip_prepare_dataset": True}, max_length=None)
    common = {**args, "max_length": config.data.max_seq_length}
    if objective.type == "dpo":
        from trl import DPOConfig  # noqa: PLC0415

        return DPOConfig(
            **common,
            beta=objective.beta,
            loss_type=[objective.loss_type],
            label_smoothing=objective.label_smoothing,
        )
    return _orpo().ORPOConfig(**common, beta=objective.beta)


def _orpo() -> Any:
    """trl.experimental.orpo (where ORPO lives in trl 1.x), without its experimental warning."""
    import warnings  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental import orpo  # noqa: PLC0415
    return orpo


# ----------------------------------------------------------------------------- helpers


def _reporter(config: RunConfig, workdir: Path, *, enabled: bool) -> ProgressReporter:
    if not enabled:
        return ProgressReporter([])
    sinks: list[Any] = [LogSink(), JsonlSink(workdir / "progress.jsonl")]
    if config.progress is not None:
        sinks.append(
            HttpSink(
                config.progress.url,
                Path(config.progress.token_file),
                min_interval=config.progress.min_interval_seconds,
            )
        )
    return ProgressReporter(sinks)


def _split(examples: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Seeded hold-out: the same rows are held out on every run (and every rank)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)  # noqa: S311 - a data split, not cryptography
    n_eval = max(1, int(len(examples) * fraction))
    if n_eval >= len(examples):
        raise DataInvalid(
            f"evalSplitFraction {fraction} leaves no training rows out of {len(examples)}"
        )
    held = set(order[:n_eval])
    return (
        [e for i, e in enumerate(examples) if i not in held],
        [e for i, e in enumerate(examples) if i in held],
    )


def _digest(examples: list[Any]) -> str:
    """sha256 of the converted examples (canonical JSON): what the model was trained on."""
    h = hashlib.sha256()
    for example in examples:
        h.update(json.dumps(example, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return f"sha256:{h.hexdigest()}"


def _config_digest(config: RunConfig) -> str:
    """sha256 of what determines the trained weights (not the run's name, outputs or eval)."""
    stable = config.model_dump(
        mode="json",
        include={
            "model",
            "data",
            "objective",
            "method",
            "lora",
            "quantization",
            "training",
            "distributed",
        },
    )
    text = json.dumps(stable, sort_keys=True)
    return f"sha256:{hashlib.sha256(text.encode()).hexdigest()}"


def _final_metrics(
    raw: dict[str, float], trainer: Any, eval_examples: list[Any]
) -> dict[str, float]:
    metrics = {"trainLoss": float(raw.get("train_loss", float("nan")))}
    metrics["trainRuntimeSeconds"] = float(raw.get("train_runtime", 0.0))
    metrics["steps"] = float(trainer.state.global_step)
    if eval_examples:
        evaluation = trainer.evaluate()
        if "eval_loss" in evaluation:
            metrics["evalLoss"] = float(evaluation["eval_loss"])
    tokens = trainer.state.num_input_tokens_seen or 0
    if tokens and metrics["trainRuntimeSeconds"] > 0:
        metrics["tokensPerSecond"] = tokens / metrics["trainRuntimeSeconds"]
    return metrics


def _adapter_facts(config: RunConfig) -> dict[str, Any]:
    if config.lora is None:
        return {}
    target = config.lora.target_modules
    return {
        "peftType": "LORA",
        "rank": config.lora.r,
        "targetModules": [target] if isinstance(target, str) else list(target),
    }


def _artifact_metadata(
    config: RunConfig,
    source: ModelSource,
    dataset_digest: str,
    metrics: dict[str, float],
    data_summary: dict[str, Any],
) -> dict[str, Any]:
    import peft  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    import trl  # noqa: PLC0415

    return {
        "kind": "adapter" if config.lora is not None else "model",
        "baseModel": config.model.uri,
        "baseRevision": source.revision,
        "method": config.method,
        "objective": config.objective.model_dump(),
        "trainingConfigDigest": _config_digest(config),
        "datasetDigest": dataset_digest,
        "data": data_summary,
        "metrics": metrics,
        "run": config.run.model_dump(exclude_none=True),
        "libraries": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "trl": trl.__version__,
        },
        **_adapter_facts(config),
    }
