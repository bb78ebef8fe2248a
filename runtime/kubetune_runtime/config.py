"""RunConfig: what one runtime process is told to do (the operator-to-runtime contract).

The operator renders it from a FineTuneJob or EvalJob (``kubetune_operator.render``) and
mounts it as JSON; ``kubetune run`` renders the same file locally; the runtime validates it
again on start. It is the runtime's own schema, in Hugging Face / PEFT / trl terms
(snake_case, floats), versioned separately from the Kubernetes API so both can evolve.

Schema module: pydantic and the standard library only. Credentials never appear here: they
reach the process as environment variables named by ``*_env`` fields.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION: Final = "kubetune.io/runconfig/v1"


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunIdentity(_Config):
    """Which resource and run this process belongs to (for manifests, logs and progress)."""

    kind: Literal["FineTuneJob", "EvalJob"]
    namespace: str
    name: str
    uid: str | None = None
    run_id: str | None = None


class StorageConfig(_Config):
    """S3 connection; keys come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY env or identity."""

    endpoint_url: str | None = None
    region: str | None = None
    path_style: bool = False
    ca_bundle_file: str | None = None


class ModelConfig(_Config):
    """The base model: a URI (hf://, s3://, pvc:// mounted path, file://) and loading options."""

    uri: str
    trust_remote_code: bool = False
    token_env: str | None = Field(
        default=None, description="Name of the env var holding a Hugging Face token."
    )


class SourceConfig(_Config):
    """One data source and its row format (see kubetune_runtime data formats)."""

    uri: str
    format: Literal[
        "auto", "messages", "sharegpt", "alpaca", "promptCompletion", "preference", "oasst", "text"
    ] = "auto"
    columns: dict[str, str] = Field(
        default_factory=dict, description="canonical name -> source column name"
    )
    split: str | None = None
    subset: str | None = None
    max_samples: int | None = Field(default=None, ge=1)
    token_env: str | None = None


class DataConfig(_Config):
    """Training data and tokenization."""

    train: SourceConfig
    eval: SourceConfig | None = None
    eval_split_fraction: float | None = Field(default=None, gt=0, le=0.5)
    max_seq_length: int = Field(default=2048, ge=16)
    packing: bool = False
    overlength: Literal["truncate", "drop", "error"] = "truncate"
    chat_template: str | None = None
    system_prompt: str | None = None
    completion_only_loss: bool = True


class ObjectiveConfig(_Config):
    """sft, dpo (beta, loss_type, label_smoothing) or orpo (beta)."""

    type: Literal["sft", "dpo", "orpo"] = "sft"
    beta: float = Field(default=0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    label_smoothing: float = Field(default=0.0, ge=0, le=0.5)


class LoraConfig(_Config):
    """PEFT LoraConfig fields."""

    r: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False
    modules_to_save: list[str] | None = None


class QuantizationConfig(_Config):
    """bitsandbytes 4-bit settings (BitsAndBytesConfig)."""

    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"


class TrainingConfig(_Config):
    """transformers TrainingArguments fields (num_train_epochs, learning_rate, ...)."""

    num_train_epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    learning_rate: float = Field(default=2e-4, gt=0)
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float | None = Field(default=None, ge=0, le=0.5)
    warmup_steps: int | None = Field(default=None, ge=0)
    per_device_train_batch_size: int = Field(default=1, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    gradient_checkpointing: bool = False
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    optim: str = "adamw_torch"
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, ge=0)
    seed: int = 42
    logging_steps: int = Field(default=10, ge=1)
    eval_steps: int | None = Field(default=None, ge=1)


class DeepSpeedConfig(_Config):
    """ZeRO settings; the runtime generates the DeepSpeed JSON from them."""

    zero_stage: Literal[0, 1, 2, 3]
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_params: Literal["none", "cpu"] = "none"


class DistributedConfig(_Config):
    """Process layout; rank and rendezvous come from the launcher's environment."""

    nodes: int = Field(default=1, ge=1)
    processes_per_node: int = Field(default=1, ge=1)
    deepspeed: DeepSpeedConfig | None = None


class CheckpointConfig(_Config):
    """Checkpoint cadence and location."""

    every_steps: int = Field(default=100, ge=1)
    keep_last: int = Field(default=2, ge=1)
    uri: str


class OutputConfig(_Config):
    """Where results are published."""

    uri: str
    merge: bool = False


class SuiteConfig(_Config):
    """One evaluation suite (fields used depend on type)."""

    name: str
    type: Literal["perplexity", "taskAccuracy", "lmEval", "judge"]
    max_samples: int | None = Field(default=None, ge=1)
    dataset: SourceConfig | None = None
    answer_extraction: Literal["gsm8k", "lastNumber", "exact", "regex"] = "lastNumber"
    answer_pattern: str | None = None
    few_shot: int = Field(default=0, ge=0)
    tasks: list[str] = Field(default_factory=list)
    num_fewshot: int | None = None
    allow_online: bool = False
    allow_code_execution: bool = False
    judge_url: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str | None = None
    rubric: str | None = None


class GateConfig(_Config):
    """A pass/fail rule: ``value (or value - base) <comparison> threshold``."""

    suite: str
    metric: str
    comparison: Literal["gte", "gt", "lte", "lt"]
    threshold: float
    baseline: Literal["none", "base"] = "none"


class EvaluationConfig(_Config):
    """Suites, gates and decoding settings."""

    suites: list[SuiteConfig] = Field(min_length=1)
    gates: list[GateConfig] = Field(default_factory=list)
    compare_to_base: bool = True
    max_new_tokens: int = Field(default=256, ge=1)
    batch_size: int = Field(default=8, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    output_uri: str


class AdapterRef(_Config):
    """An adapter to evaluate: URI and the expected sha256 of its manifest.json."""

    uri: str
    digest: str | None = None


class ProgressConfig(_Config):
    """Where progress is POSTed: the operator's endpoint, with a bearer token read from a file."""

    url: str
    token_file: str
    min_interval_seconds: float = Field(default=5.0, ge=1)


class RunConfig(_Config):
    """Everything one runtime process needs; rendered by the operator, validated on start.

    ``task`` selects the program: ``train`` (FineTuneJob: train, publish, then evaluate when
    ``evaluation`` is set) or ``evaluate`` (EvalJob: evaluate ``adapter`` against ``model``).
    """

    schema_version: Literal["kubetune.io/runconfig/v1"] = SCHEMA_VERSION
    task: Literal["train", "evaluate"]
    run: RunIdentity
    model: ModelConfig
    storage: StorageConfig = StorageConfig()
    data: DataConfig | None = None
    objective: ObjectiveConfig = ObjectiveConfig()
    method: Literal["lora", "qlora", "full"] = "lora"
    lora: LoraConfig | None = None
    quantization: QuantizationConfig | None = None
    training: TrainingConfig = TrainingConfig()
    distributed: DistributedConfig = DistributedConfig()
    checkpoint: CheckpointConfig | None = None
    output: OutputConfig | None = None
    evaluation: EvaluationConfig | None = None
    adapter: AdapterRef | None = None
    progress: ProgressConfig | None = None
    result_path: Annotated[str, Field(description="Termination-message file.")] = (
        "/dev/termination-log"
    )

    @model_validator(mode="after")
    def _complete_for_task(self) -> RunConfig:
        """Each task's required sections are present, and method-specific ones match."""
        if self.task == "train":
            missing = [n for n in ("data", "output", "checkpoint") if getattr(self, n) is None]
            if missing:
                raise ValueError(f"task train needs {', '.join(missing)}")
        else:
            missing = [n for n in ("evaluation", "adapter") if getattr(self, n) is None]
            if missing:
                raise ValueError(f"task evaluate needs {', '.join(missing)}")
        if (self.method == "qlora") != (self.quantization is not None):
            raise ValueError("quantization is required by, and only allowed for, method qlora")
        if self.method == "full" and self.lora is not None:
            raise ValueError("method full takes no lora section")
        return self
