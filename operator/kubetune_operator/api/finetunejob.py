"""FineTuneJob: fine-tune a causal LM (SFT, DPO, ORPO) with LoRA, QLoRA or full fine-tuning.

Schema module: pydantic and the standard library only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StringConstraints

from kubetune_operator.api.common import (
    API_VERSION,
    CONDITIONS_FIELD_EXTRA,
    ApiModel,
    ArtifactURI,
    BaseModelSpec,
    Condition,
    Decimal,
    Digest,
    ImageRef,
    ObjectMeta,
    OutputURI,
    ResourcesSpec,
    RunPolicy,
    SchedulingSpec,
    StorageSpec,
    cel,
    rules,
)
from kubetune_operator.api.data import DataSource
from kubetune_operator.api.evaluation import EvaluationPlan, EvaluationResult

ModuleName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.*\-]+$", max_length=128)]


def _decimal_range(low: str, high: str, *, low_open: bool, name: str) -> dict[str, Any]:
    """CEL bounds for a decimal-string field: ``low < x <= high`` or ``low <= x <= high``."""
    op = ">" if low_open else ">="
    return rules(
        cel(
            f"double(self) {op} {low} && double(self) <= {high}",
            f"{name} must be {op} {low} and <= {high}",
        )
    )


class DatasetSpec(ApiModel):
    """Training and evaluation data, and how samples become token sequences."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "!(has(self.eval) && has(self.evalSplitFraction))",
                "set at most one of eval and evalSplitFraction",
                field_path=".evalSplitFraction",
            )
        )
    )

    train: DataSource = Field(description="Training data.")
    eval: DataSource | None = Field(
        default=None, description="Held-out data for eval loss during and after training."
    )
    eval_split_fraction: Decimal | None = Field(
        default=None,
        description="Hold out this fraction of the training rows (seeded) instead of eval.",
        json_schema_extra=_decimal_range("0.0", "0.5", low_open=True, name="evalSplitFraction"),
    )
    max_seq_length: int = Field(
        default=2048,
        ge=16,
        le=131_072,
        description="Maximum tokens per sample (or per packed sequence). Default: 2048.",
    )
    packing: bool = Field(
        default=False,
        description=(
            "Pack several samples into one sequence without attention across samples "
            "(position ids restart per sample; padding-free). Default: false."
        ),
    )
    overlength: Literal["truncate", "drop", "error"] = Field(
        default="truncate",
        description=(
            "What to do with a sample longer than maxSeqLength: truncate (reported in the "
            "data summary), drop, or error (stop before training naming the row). "
            "Default: truncate."
        ),
    )
    chat_template: Annotated[str, StringConstraints(min_length=1, max_length=32768)] | None = Field(
        default=None,
        description=(
            "Jinja chat template overriding the tokenizer's; required when the tokenizer "
            "has none. It must mark assistant turns with {% generation %} for "
            "completion-only loss."
        ),
    )
    system_prompt: Annotated[str, StringConstraints(max_length=8192)] | None = Field(
        default=None, description="System message added to every conversation that has none."
    )
    completion_only_loss: bool = Field(
        default=True,
        description=(
            "Compute the loss on assistant (completion) tokens only, not on prompts. Default: true."
        ),
    )


class SFTObjective(ApiModel):
    """Supervised fine-tuning (next-token cross-entropy on the completions)."""

    type: Literal["sft"] = Field(description="Objective type.")


class DPOObjective(ApiModel):
    """Direct Preference Optimization (Rafailov et al., 2023) via trl's DPOTrainer."""

    type: Literal["dpo"] = Field(description="Objective type.")
    beta: Decimal = Field(
        default="0.1",
        description="Strength of the KL penalty toward the reference model. Default: 0.1.",
        json_schema_extra=_decimal_range("0.0", "10.0", low_open=True, name="beta"),
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        default="sigmoid", description="DPO loss variant (trl's loss_type). Default: sigmoid."
    )
    label_smoothing: Decimal = Field(
        default="0",
        description="Assumed label noise for conservative DPO (0 to 0.5). Default: 0.",
        json_schema_extra=_decimal_range("0.0", "0.5", low_open=False, name="labelSmoothing"),
    )


class ORPOObjective(ApiModel):
    """Odds Ratio Preference Optimization (Hong et al., 2024), no reference model needed."""

    type: Literal["orpo"] = Field(description="Objective type.")
    beta: Decimal = Field(
        default="0.1",
        description="Weight of the odds-ratio term (lambda in the paper). Default: 0.1.",
        json_schema_extra=_decimal_range("0.0", "10.0", low_open=True, name="beta"),
    )


Objective = Annotated[SFTObjective | DPOObjective | ORPOObjective, Field(discriminator="type")]


class LoraSpec(ApiModel):
    """LoRA adapter hyperparameters (Hu et al., 2021), in PEFT's terms."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "!self.targetModules.exists(m, m == 'all-linear') || size(self.targetModules) == 1",
                "all-linear cannot be combined with other target modules",
                field_path=".targetModules",
            )
        )
    )

    r: int = Field(
        default=16, ge=1, le=1024, description="Rank of the update matrices. Default: 16."
    )
    alpha: int = Field(
        default=32,
        ge=1,
        le=4096,
        description="lora_alpha: the update is scaled by alpha / r (alpha / sqrt(r) with "
        "rsLoRA). Default: 32.",
    )
    dropout: Decimal = Field(
        default="0.05",
        description="Dropout on the LoRA input. Default: 0.05.",
        json_schema_extra=rules(cel("double(self) < 1.0", "dropout must be below 1")),
    )
    target_modules: list[ModuleName] = Field(
        default=["all-linear"],
        min_length=1,
        max_length=64,
        description=(
            "Module names (or name suffixes) to adapt, e.g. [q_proj, v_proj], or [all-linear] "
            "for every linear layer except the output head. Checked against the model's "
            "actual modules before training. Default: [all-linear]."
        ),
    )
    use_dora: bool = Field(
        default=False, description="Weight-Decomposed LoRA (DoRA, Liu et al., 2024)."
    )
    use_rslora: bool = Field(
        default=False, description="Rank-stabilized LoRA scaling alpha / sqrt(r) (Kalajdzievski)."
    )
    modules_to_save: list[ModuleName] | None = Field(
        default=None,
        max_length=16,
        description=(
            "Modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head); "
            "some serving engines refuse such adapters."
        ),
    )


class QuantizationSpec(ApiModel):
    """4-bit base weights for QLoRA (Dettmers et al., 2023) through bitsandbytes."""

    quant_type: Literal["nf4", "fp4"] = Field(
        default="nf4", description="4-bit data type: nf4 (NormalFloat) or fp4. Default: nf4."
    )
    double_quant: bool = Field(
        default=True, description="Also quantize the quantization constants. Default: true."
    )
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description="dtype of the matmuls; auto is bfloat16 on GPUs that support it, else "
        "float16 on GPU and float32 on CPU. Default: auto.",
    )


class TrainingSpec(ApiModel):
    """Optimization hyperparameters, in transformers' TrainingArguments terms."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "!(has(self.epochs) && has(self.maxSteps))",
                "set at most one of epochs and maxSteps",
                field_path=".maxSteps",
            ),
            cel(
                "!(has(self.warmupRatio) && has(self.warmupSteps))",
                "set at most one of warmupRatio and warmupSteps",
                field_path=".warmupSteps",
            ),
        )
    )

    epochs: int | None = Field(
        default=None, ge=1, le=1000, description="Passes over the training data. Default: 1."
    )
    max_steps: int | None = Field(
        default=None, ge=1, le=10_000_000, description="Optimizer steps; replaces epochs."
    )
    learning_rate: Decimal = Field(
        default="2e-4",
        description="Peak learning rate. Default: 2e-4 (a LoRA default; use ~1e-5 for full).",
        json_schema_extra=_decimal_range("0.0", "1.0", low_open=True, name="learningRate"),
    )
    lr_scheduler: Literal[
        "linear",
        "cosine",
        "cosine_with_min_lr",
        "constant",
        "constant_with_warmup",
        "inverse_sqrt",
        "warmup_stable_decay",
    ] = Field(default="cosine", description="Learning-rate schedule. Default: cosine.")
    warmup_ratio: Decimal | None = Field(
        default=None,
        description="Fraction of steps spent warming up. Default: 0.03 when no warmupSteps.",
        json_schema_extra=_decimal_range("0.0", "0.5", low_open=False, name="warmupRatio"),
    )
    warmup_steps: int | None = Field(default=None, ge=0, description="Warm-up steps.")
    per_device_train_batch_size: int = Field(
        default=1, ge=1, le=4096, description="Samples per process per micro-step. Default: 1."
    )
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, le=4096, description="Micro-steps per optimizer step. Default: 1."
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute activations in the backward pass to save memory. Default: false.",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto",
        description=(
            "Training precision; auto is bf16 on GPUs that support it, fp16 on older GPUs, "
            "fp32 on CPU. Default: auto."
        ),
    )
    optimizer: Literal[
        "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd"
    ] = Field(
        default="adamw_torch", description="Optimizer (transformers' optim). Default: adamw_torch."
    )
    weight_decay: Decimal = Field(
        default="0",
        description="Decoupled weight decay. Default: 0.",
        json_schema_extra=_decimal_range("0.0", "1.0", low_open=False, name="weightDecay"),
    )
    max_grad_norm: Decimal = Field(
        default="1.0",
        description="Gradient clipping norm; 0 disables clipping. Default: 1.0.",
        json_schema_extra=_decimal_range("0.0", "1000.0", low_open=False, name="maxGradNorm"),
    )
    seed: int = Field(
        default=42, ge=0, le=2_147_483_647, description="Seed for data order and init. Default: 42."
    )
    logging_steps: int = Field(
        default=10, ge=1, description="Report loss and progress every N steps. Default: 10."
    )
    eval_steps: int | None = Field(
        default=None, ge=1, description="Compute eval loss every N steps (needs eval data)."
    )


class DeepSpeedSpec(ApiModel):
    """DeepSpeed ZeRO (Rajbhandari et al., 2020); kubetune generates the DeepSpeed config."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "self.offloadParams == 'none' || self.zeroStage == 3",
                "offloadParams needs zeroStage 3",
                field_path=".offloadParams",
            ),
            cel(
                "self.offloadOptimizer == 'none' || self.zeroStage >= 1",
                "offloadOptimizer needs zeroStage 1, 2 or 3",
                field_path=".offloadOptimizer",
            ),
        )
    )

    zero_stage: Literal[0, 1, 2, 3] = Field(
        description="ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."
    )
    offload_optimizer: Literal["none", "cpu"] = Field(
        default="none", description="Keep optimizer state in CPU memory. Default: none."
    )
    offload_params: Literal["none", "cpu"] = Field(
        default="none", description="Keep parameters in CPU memory (ZeRO-3). Default: none."
    )


class DistributedSpec(ApiModel):
    """Data-parallel training across processes and nodes."""

    nodes: int = Field(
        default=1,
        ge=1,
        le=256,
        description=(
            "Nodes (pods); more than one runs an Indexed Job with a headless Service for "
            "rendezvous. GPUs per node are resources.gpu.count. Default: 1."
        ),
    )
    processes_per_node: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Training processes per node. Default: resources.gpu.count, or 1 on CPU.",
    )
    deepspeed: DeepSpeedSpec | None = Field(
        default=None, description="Shard training state with DeepSpeed ZeRO. Omit for DDP."
    )


class CheckpointSpec(ApiModel):
    """Periodic checkpoints, used to resume after preemption, eviction or a retry."""

    every_steps: int = Field(
        default=100, ge=1, description="Checkpoint every N optimizer steps. Default: 100."
    )
    keep_last: int = Field(
        default=2, ge=1, le=100, description="Checkpoints kept; older ones are deleted. Default: 2."
    )
    uri: OutputURI | None = Field(
        default=None, description="Where checkpoints go. Default: <output.uri>/checkpoints."
    )


class OutputSpec(ApiModel):
    """Where the trained adapter (or model) is published."""

    uri: OutputURI = Field(
        description=(
            "Destination prefix, e.g. s3://models/team-a/gsm8k. The adapter appears under "
            "<uri>/adapter, complete with manifest.json, only once fully uploaded."
        )
    )
    merge: bool = Field(
        default=False,
        description=(
            "Also publish the adapter merged into the base (a standard HF model) under "
            "<uri>/merged; QLoRA merges into a de-quantized 16-bit base. Default: false."
        ),
    )


_TRAINING_FIELDS = (
    "baseModel",
    "dataset",
    "objective",
    "method",
    "lora",
    "quantization",
    "training",
    "distributed",
    "checkpointing",
    "output",
    "storage",
)


def _unchanged(field: str) -> str:
    return (
        f"(has(self.spec.{field}) == has(oldSelf.spec.{field}) && "
        f"(!has(self.spec.{field}) || self.spec.{field} == oldSelf.spec.{field}))"
    )


TRAINING_IMMUTABLE_RULE = cel(
    "!has(oldSelf.status) || !has(oldSelf.status.startTime) || "
    "(has(self.spec.runId) ? self.spec.runId : '') != "
    "(has(oldSelf.spec.runId) ? oldSelf.spec.runId : '') || ("
    + " && ".join(_unchanged(f) for f in _TRAINING_FIELDS)
    + ")",
    "the training spec cannot change once the job has started; change spec.runId to start "
    "a new run with it",
    field_path=".spec",
)


class FineTuneJobSpec(RunPolicy):
    """Desired state of a FineTuneJob."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "self.method == 'qlora' ? has(self.quantization) : !has(self.quantization)",
                "method qlora requires spec.quantization, and only qlora accepts it",
                field_path=".quantization",
            ),
            cel(
                "self.method != 'full' || !has(self.evaluation)",
                "spec.evaluation evaluates adapters; for method full run an EvalJob later",
                field_path=".evaluation",
            ),
            cel(
                "self.method != 'full' || !has(self.lora)",
                "method full trains all weights; remove spec.lora or use method lora",
                field_path=".lora",
            ),
            cel(
                "self.objective.type == 'sft' ? self.dataset.train.format != 'preference' : "
                "self.dataset.train.format in ['auto', 'preference']",
                "dpo and orpo need preference data (prompt/chosen/rejected); sft needs "
                "non-preference data",
                field_path=".dataset.train.format",
            ),
            cel(
                "!has(self.training) || !has(self.training.evalSteps) || "
                "has(self.dataset.eval) || has(self.dataset.evalSplitFraction)",
                "training.evalSteps needs dataset.eval or dataset.evalSplitFraction",
                field_path=".training.evalSteps",
            ),
            cel(
                "!has(self.distributed) || !has(self.distributed.processesPerNode) || "
                "!has(self.resources) || !has(self.resources.gpu) || "
                "self.resources.gpu.count == 0 || "
                "self.distributed.processesPerNode == self.resources.gpu.count",
                "distributed.processesPerNode must equal resources.gpu.count when GPUs are "
                "requested (one process per GPU)",
                field_path=".distributed.processesPerNode",
            ),
        )
    )

    base_model: BaseModelSpec = Field(description="The model to fine-tune.")
    dataset: DatasetSpec = Field(description="Training data and tokenization.")
    objective: Objective = Field(
        default=SFTObjective(type="sft"),
        description="Training objective: sft, dpo or orpo, with its parameters. Default: sft.",
    )
    method: Literal["lora", "qlora", "full"] = Field(
        default="lora",
        description=(
            "lora trains a low-rank adapter; qlora does so over a 4-bit quantized base "
            "(needs quantization); full trains every weight (use distributed.deepspeed for "
            "large models). Default: lora."
        ),
    )
    lora: LoraSpec | None = Field(
        default=None, description="LoRA hyperparameters for lora and qlora. Default: r 16."
    )
    quantization: QuantizationSpec | None = Field(
        default=None, description="Base-model quantization; required by (and only for) qlora."
    )
    training: TrainingSpec | None = Field(default=None, description="Optimization settings.")
    distributed: DistributedSpec | None = Field(
        default=None, description="Multi-process and multi-node settings. Default: 1 process."
    )
    checkpointing: CheckpointSpec | None = Field(
        default=None, description="Checkpoint policy. Default: every 100 steps, keep 2."
    )
    output: OutputSpec = Field(description="Where the result is published.")
    evaluation: EvaluationPlan | None = Field(
        default=None,
        description="Evaluate the trained adapter against the base after training (as an EvalJob).",
    )
    storage: StorageSpec | None = Field(
        default=None, description="Object-storage connection for s3:// URIs."
    )
    resources: ResourcesSpec | None = Field(
        default=None, description="Compute per pod (per node). Default: CPU only."
    )
    scheduling: SchedulingSpec | None = Field(
        default=None, description="Node selection, tolerations, priority and Kueue queue."
    )
    image: ImageRef | None = Field(
        default=None, description="Runtime image override. Default: the operator's runtime image."
    )


# ---------------------------------------------------------------------------------- status


class Progress(ApiModel):
    """Live training progress, reported by the runtime at most every few seconds."""

    step: int = Field(ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, ge=0, description="Optimizer steps planned.")
    percent: int | None = Field(
        default=None, ge=0, le=100, description="step / totalSteps, in percent (rounded down)."
    )
    epoch: float | None = Field(default=None, description="Fractional epoch.")
    loss: float | None = Field(default=None, description="Latest training loss.")
    eval_loss: float | None = Field(default=None, description="Latest eval loss.")
    tokens_per_second: float | None = Field(
        default=None, description="Throughput in non-padding tokens per second, all processes."
    )
    eta_seconds: int | None = Field(default=None, ge=0, description="Estimated seconds left.")
    update_time: datetime | None = Field(default=None, description="When this was reported.")


class Artifact(ApiModel):
    """The published, verified result of a successful run."""

    uri: ArtifactURI = Field(description="Prefix of the adapter (or model) directory.")
    digest: Digest = Field(description="sha256 of manifest.json, which lists every file's sha256.")
    size_bytes: int | None = Field(default=None, ge=0, description="Total size of the files.")
    base_model: Annotated[str, StringConstraints(max_length=1024)] | None = Field(
        default=None, description="Base model URI it was trained on."
    )
    base_revision: Annotated[str, StringConstraints(max_length=256)] | None = Field(
        default=None, description="Resolved revision (commit) of the base model."
    )
    peft_type: Annotated[str, StringConstraints(max_length=32)] | None = Field(
        default=None, description="PEFT type, e.g. LORA; absent for full fine-tunes."
    )
    rank: int | None = Field(default=None, ge=0, description="LoRA rank r.")
    target_modules: list[ModuleName] | None = Field(
        default=None, max_length=256, description="Modules the adapter modifies."
    )
    merged_uri: ArtifactURI | None = Field(
        default=None, description="Prefix of the merged model, when output.merge is set."
    )


class CheckpointRef(ApiModel):
    """The latest complete checkpoint."""

    step: int = Field(ge=0, description="Optimizer step of the checkpoint.")
    uri: ArtifactURI = Field(description="Where it is.")
    time: datetime | None = Field(default=None, description="When it was written.")


class ResourceEstimate(ApiModel):
    """Size of the run, computed before training starts."""

    parameters: int | None = Field(default=None, ge=0, description="Parameters of the model.")
    trainable_parameters: int | None = Field(
        default=None, ge=0, description="Parameters being trained."
    )
    train_tokens: int | None = Field(
        default=None, ge=0, description="Tokens in one epoch of training data."
    )
    gpu_memory_bytes: int | None = Field(
        default=None, ge=0, description="Estimated peak GPU memory per GPU."
    )


class FineTuneJobStatus(ApiModel):
    """Observed state of a FineTuneJob."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation this status reflects."
    )
    conditions: list[Condition] | None = Field(
        default=None,
        max_length=16,
        description="Succeeded (summary: Unknown while pending or running), Running, Suspended, "
        "Queued.",
        json_schema_extra=CONDITIONS_FIELD_EXTRA,
    )
    run_id: Annotated[str, StringConstraints(max_length=63)] | None = Field(
        default=None, description="The spec.runId this status describes."
    )
    job_name: Annotated[str, StringConstraints(max_length=63)] | None = Field(
        default=None, description="Name of the batch Job running the training."
    )
    start_time: datetime | None = Field(default=None, description="When training started.")
    completion_time: datetime | None = Field(default=None, description="When the run finished.")
    progress: Progress | None = Field(default=None, description="Live progress.")
    artifact: Artifact | None = Field(default=None, description="The published result.")
    last_checkpoint: CheckpointRef | None = Field(default=None, description="Latest checkpoint.")
    metrics: dict[str, float] | None = Field(
        default=None, max_length=32, description="Final metrics, e.g. trainLoss, evalLoss."
    )
    evaluation: EvaluationResult | None = Field(
        default=None, description="Result of spec.evaluation, when set."
    )
    estimate: ResourceEstimate | None = Field(default=None, description="Size of the run.")


class FineTuneJob(ApiModel):
    """A fine-tuning run: base model + data + objective -> a published, verified adapter."""

    model_config = ConfigDict(json_schema_extra=rules(TRAINING_IMMUTABLE_RULE))

    api_version: Literal["kubetune.io/v1alpha1"] = Field(
        default=API_VERSION, description="API version."
    )
    kind: Literal["FineTuneJob"] = Field(default="FineTuneJob", description="Kind.")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: FineTuneJobSpec = Field(description="Desired state.")
    status: FineTuneJobStatus | None = Field(default=None, description="Observed state.")
