"""Render a resource's spec into the runtime's RunConfig (pure: no I/O, no clock).

The operator mounts the result into the pod and `kubetune run` writes the same file locally,
so both execute identical configurations. Decimal strings of the API become floats, API
names become Hugging Face / PEFT / trl names, and defaults that depend on other fields are
resolved here (checkpoint location, processes per node, post-training evaluation output).

Secrets never enter the RunConfig: a Secret key reference becomes the *name* of an
environment variable (:func:`secret_env_name`) that the pod spec fills from that Secret.
"""

from __future__ import annotations

import hashlib

from kubetune_operator.api.common import BaseModelSpec, SecretKeyRef, StorageSpec
from kubetune_operator.api.data import DataSource
from kubetune_operator.api.evaljob import EvalJob
from kubetune_operator.api.evaluation import (
    EvaluationPlan,
    JudgeSuite,
    LmEvalSuite,
    TaskAccuracySuite,
)
from kubetune_operator.api.finetunejob import FineTuneJob, LoraSpec
from kubetune_runtime.config import (
    AdapterRef,
    CheckpointConfig,
    DataConfig,
    DeepSpeedConfig,
    DistributedConfig,
    EvaluationConfig,
    GateConfig,
    LoraConfig,
    ModelConfig,
    ObjectiveConfig,
    OutputConfig,
    ProgressConfig,
    QuantizationConfig,
    RunConfig,
    RunIdentity,
    SourceConfig,
    StorageConfig,
    SuiteConfig,
    TrainingConfig,
)

CA_BUNDLE_PATH = "/etc/kubetune/ca/ca.crt"


def secret_env_name(ref: SecretKeyRef) -> str:
    """Deterministic environment variable name for one Secret key (``KUBETUNE_SECRET_<hash>``).

    The pod spec sets this variable from the Secret with ``valueFrom.secretKeyRef``; the
    RunConfig only carries the name, so secret values never reach ConfigMaps or logs.
    """
    digest = hashlib.sha256(f"{ref.name}/{ref.key}".encode()).hexdigest()[:10].upper()
    return f"KUBETUNE_SECRET_{digest}"


def join_uri(prefix: str, *parts: str) -> str:
    """Join URI path segments with exactly one slash (``s3://b/p`` + ``adapter``)."""
    return "/".join([prefix.rstrip("/"), *(p.strip("/") for p in parts)])


def _model(spec: BaseModelSpec) -> ModelConfig:
    return ModelConfig(
        uri=spec.uri,
        trust_remote_code=spec.trust_remote_code,
        token_env=secret_env_name(spec.token_secret_ref) if spec.token_secret_ref else None,
    )


def storage_config(spec: StorageSpec | None) -> StorageConfig:
    """The runtime's StorageConfig for a spec's storage section (the CA bundle as a file)."""
    if spec is None:
        return StorageConfig()
    return StorageConfig(
        endpoint_url=spec.endpoint,
        region=spec.region,
        path_style=spec.path_style,
        ca_bundle_file=CA_BUNDLE_PATH if spec.ca_bundle else None,
    )


def _source(spec: DataSource) -> SourceConfig:
    columns = spec.columns.model_dump(exclude_none=True) if spec.columns else {}
    return SourceConfig(
        uri=spec.uri,
        format=spec.format,
        columns=columns,
        split=spec.split,
        subset=spec.subset,
        max_samples=spec.max_samples,
        token_env=secret_env_name(spec.token_secret_ref) if spec.token_secret_ref else None,
    )


def _evaluation(plan: EvaluationPlan, output_uri: str) -> EvaluationConfig:
    suites = []
    for suite in plan.suites:
        fields: dict[str, object] = {
            "name": suite.name,
            "type": suite.type,
            "max_samples": suite.max_samples,
        }
        if not isinstance(suite, LmEvalSuite):
            fields["dataset"] = _source(suite.dataset)
        if isinstance(suite, TaskAccuracySuite):
            fields.update(
                answer_extraction=suite.answer_extraction,
                answer_pattern=suite.answer_pattern,
                few_shot=suite.few_shot,
            )
        elif isinstance(suite, LmEvalSuite):
            fields.update(
                tasks=list(suite.tasks),
                num_fewshot=suite.num_fewshot,
                allow_online=suite.allow_online,
                allow_code_execution=suite.allow_code_execution,
            )
        elif isinstance(suite, JudgeSuite):
            key = suite.judge.api_key_secret_ref
            fields.update(
                judge_url=suite.judge.url,
                judge_model=suite.judge.model,
                judge_api_key_env=secret_env_name(key) if key else None,
                rubric=suite.rubric,
            )
        suites.append(SuiteConfig.model_validate(fields))
    gates = [
        GateConfig(
            suite=g.suite,
            metric=g.metric,
            comparison=g.comparison,
            threshold=float(g.threshold),
            baseline=g.baseline,
        )
        for g in plan.gates or []
    ]
    gen = plan.generation
    return EvaluationConfig(
        suites=suites,
        gates=gates,
        compare_to_base=plan.compare_to_base,
        max_new_tokens=gen.max_new_tokens if gen else 256,
        batch_size=gen.batch_size if gen else 8,
        temperature=float(gen.temperature) if gen else 0.0,
        output_uri=output_uri,
    )


def _progress(url: str | None, token_file: str | None) -> ProgressConfig | None:
    if url is None:
        return None
    if token_file is None:
        raise ValueError("a progress url needs a token file")
    return ProgressConfig(url=url, token_file=token_file)


def render_finetune(
    job: FineTuneJob,
    *,
    progress_url: str | None = None,
    progress_token_file: str | None = None,
) -> RunConfig:
    """The RunConfig of a FineTuneJob's training pod(s).

    Args:
        job: a validated FineTuneJob.
        progress_url: the operator's progress endpoint for this job, if any.
        progress_token_file: path of the mounted bearer token for that endpoint.

    Returns:
        A RunConfig with ``task: train``; processes per node default to the GPU count (or 1),
        checkpoints default to ``<output.uri>/checkpoints``, and post-training evaluation
        results go to ``<output.uri>/eval``.
    """
    spec = job.spec
    gpus = spec.resources.gpu.count if spec.resources and spec.resources.gpu else 0
    dist = spec.distributed
    training = spec.training
    lora = spec.lora
    if lora is None and spec.method != "full":
        lora = LoraSpec()
    checkpointing = spec.checkpointing
    dataset = spec.dataset
    objective = spec.objective
    return RunConfig(
        task="train",
        run=RunIdentity(
            kind="FineTuneJob",
            namespace=job.metadata.namespace or "default",
            name=job.metadata.name,
            uid=job.metadata.uid,
            run_id=spec.run_id,
        ),
        model=_model(spec.base_model),
        storage=storage_config(spec.storage),
        data=DataConfig(
            train=_source(dataset.train),
            eval=_source(dataset.eval) if dataset.eval else None,
            eval_split_fraction=(
                float(dataset.eval_split_fraction) if dataset.eval_split_fraction else None
            ),
            max_seq_length=dataset.max_seq_length,
            packing=dataset.packing,
            overlength=dataset.overlength,
            chat_template=dataset.chat_template,
            system_prompt=dataset.system_prompt,
            completion_only_loss=dataset.completion_only_loss,
        ),
        objective=ObjectiveConfig(
            type=objective.type,
            beta=float(getattr(objective, "beta", "0.1")),
            loss_type=getattr(objective, "loss_type", "sigmoid"),
            label_smoothing=float(getattr(objective, "label_smoothing", "0")),
        ),
        method=spec.method,
        lora=(
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=float(lora.dropout),
                target_modules=(
                    "all-linear"
                    if lora.target_modules == ["all-linear"]
                    else list(lora.target_modules)
                ),
                use_dora=lora.use_dora,
                use_rslora=lora.use_rslora,
                modules_to_save=list(lora.modules_to_save) if lora.modules_to_save else None,
            )
            if lora is not None
            else None
        ),
        quantization=(
            QuantizationConfig(
                bnb_4bit_quant_type=spec.quantization.quant_type,
                bnb_4bit_use_double_quant=spec.quantization.double_quant,
                bnb_4bit_compute_dtype=spec.quantization.compute_dtype,
            )
            if spec.quantization
            else None
        ),
        training=(
            TrainingConfig(
                num_train_epochs=training.epochs or 1,
                max_steps=training.max_steps,
                learning_rate=float(training.learning_rate),
                lr_scheduler_type=training.lr_scheduler,
                warmup_ratio=(
                    float(training.warmup_ratio)
                    if training.warmup_ratio is not None
                    else (0.03 if training.warmup_steps is None else None)
                ),
                warmup_steps=training.warmup_steps,
                per_device_train_batch_size=training.per_device_train_batch_size,
                gradient_accumulation_steps=training.gradient_accumulation_steps,
                gradient_checkpointing=training.gradient_checkpointing,
                precision=training.precision,
                optim=training.optimizer,
                weight_decay=float(training.weight_decay),
                max_grad_norm=float(training.max_grad_norm),
                seed=training.seed,
                logging_steps=training.logging_steps,
                eval_steps=training.eval_steps,
            )
            if training
            else TrainingConfig(warmup_ratio=0.03)
        ),
        distributed=DistributedConfig(
            nodes=dist.nodes if dist else 1,
            processes_per_node=(
                dist.processes_per_node if dist and dist.processes_per_node else None
            )
            or max(gpus, 1),
            deepspeed=(
                DeepSpeedConfig(
                    zero_stage=dist.deepspeed.zero_stage,
                    offload_optimizer=dist.deepspeed.offload_optimizer,
                    offload_params=dist.deepspeed.offload_params,
                )
                if dist and dist.deepspeed
                else None
            ),
        ),
        checkpoint=CheckpointConfig(
            every_steps=checkpointing.every_steps if checkpointing else 100,
            keep_last=checkpointing.keep_last if checkpointing else 2,
            uri=(checkpointing.uri if checkpointing and checkpointing.uri else None)
            or join_uri(spec.output.uri, "checkpoints"),
        ),
        output=OutputConfig(uri=spec.output.uri, merge=spec.output.merge),
        evaluation=(
            _evaluation(spec.evaluation, join_uri(spec.output.uri, "eval"))
            if spec.evaluation
            else None
        ),
        progress=_progress(progress_url, progress_token_file),
    )


def render_eval(
    job: EvalJob,
    *,
    adapter: AdapterRef,
    base_model: BaseModelSpec,
    progress_url: str | None = None,
    progress_token_file: str | None = None,
) -> RunConfig:
    """The RunConfig of an EvalJob's pod.

    Args:
        job: a validated EvalJob.
        adapter: the adapter to evaluate, resolved by the caller (from ``target.adapter``, or
            the referenced FineTuneJob's ``status.artifact``).
        base_model: the base, from ``spec.baseModel`` or the referenced resource.
        progress_url: the operator's progress endpoint, if any.
        progress_token_file: path of the mounted bearer token for that endpoint.

    Returns:
        A RunConfig with ``task: evaluate``.
    """
    spec = job.spec
    return RunConfig(
        task="evaluate",
        run=RunIdentity(
            kind="EvalJob",
            namespace=job.metadata.namespace or "default",
            name=job.metadata.name,
            uid=job.metadata.uid,
            run_id=spec.run_id,
        ),
        model=_model(base_model),
        storage=storage_config(spec.storage),
        evaluation=_evaluation(spec, spec.output.uri),
        adapter=adapter,
        progress=_progress(progress_url, progress_token_file),
    )
