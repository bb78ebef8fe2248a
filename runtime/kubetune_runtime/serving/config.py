"""ServingConfig: what the adapter agent beside a serving engine is told to do.

The operator renders it from an AdapterDeployment into a ConfigMap that is mounted as a file
(``/etc/kubetune/serving/config.json``) into every serving pod. When the adapter list changes
the operator updates the ConfigMap **in place**; the kubelet swaps the mounted file (a symlink
swap, typically within a minute) and the agent picks the new content up without a restart.
Pods restart only when something the engine is launched with changes.

Like RunConfig it is the runtime's own contract (snake_case, seconds as floats), validated
again on every read; unknown fields are an error. It never holds a secret: the engine's API
key, where there is one, is read from ``engine.api_key_file``; storage credentials come from
the pod's environment (``AWS_*``) exactly as for training.

Schema module: pydantic, the standard library, ``kubetune_runtime.config`` and (for the
error :func:`load_config` raises) ``kubetune_runtime.errors`` only. :func:`read_config` /
:func:`load_config` read the mounted file for the agent and ``fetch-model``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from kubetune_runtime.config import StorageConfig
from kubetune_runtime.errors import ConfigInvalid

SCHEMA_VERSION: Final = "kubetune.io/servingconfig/v1"

AdapterName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
]
Digest = Annotated[str, StringConstraints(pattern=r"^sha256:[a-f0-9]{64}$")]
HttpURL = Annotated[str, StringConstraints(pattern=r"^https?://[^\s/]+(/\S*)?$", max_length=2048)]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineConfig(_Config):
    """The engine beside the agent and the adapters it can take.

    The capacity and ``allow_*`` fields mirror what the engine was launched with (vLLM's
    ``--max-lora-rank`` / ``--max-loras``); the agent checks adapters against them *before*
    asking the engine, so an incompatible adapter fails with a precise reason and no load call.
    """

    type: Literal["vllm", "lorax", "builtin"] = Field(
        description=(
            "vllm: the OpenAI-compatible server started with --enable-lora and "
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (adapters are loaded through "
            "/v1/load_lora_adapter); builtin: kubetune's own engine, same admin contract; "
            "lorax: LoRAX has no load API, adapters are staged on the shared disk and loaded by "
            "LoRAX on first use (see kubetune_runtime.serving.agent_engine)."
        )
    )
    admin_url: HttpURL = Field(
        description=(
            "Base URL of the engine's adapter API on localhost, e.g. http://127.0.0.1:8000 for "
            "vLLM (its own port) or http://127.0.0.1:8001 for the builtin engine's admin port. "
            "For lorax: the launcher's URL (only GET /health is used)."
        )
    )
    api_key_file: str | None = Field(
        default=None,
        description=(
            "File holding the engine's API key (vLLM --api-key), sent as a bearer token; the "
            "file is read when the agent starts and whenever the config changes."
        ),
    )
    max_lora_rank: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Highest adapter rank the engine accepts (vLLM --max-lora-rank; its "
        "default is 16). Adapters with a higher r or rank_pattern value fail before loading.",
    )
    max_loras: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description=(
            "Most adapters the agent keeps registered with the engine at once; pinned adapters "
            "take slots first, then the others in list order, and adapters beyond it stay "
            "Pending. None: no limit (vLLM swaps registered adapters in and out of its "
            "--max-loras GPU slots by itself, so it needs none)."
        ),
    )
    allow_dora: bool = Field(
        default=False,
        description="Whether the engine serves DoRA adapters (use_dora); vLLM does not.",
    )
    allow_modules_to_save: bool = Field(
        default=False,
        description=(
            "Whether the engine serves adapters that also carry fully trained modules "
            "(modules_to_save, e.g. a resized embedding); vLLM does not."
        ),
    )


class BaseModelRef(_Config):
    """The base model the engine serves; every adapter must have been trained on it."""

    uri: str = Field(
        min_length=1,
        description="The base model's URI as AdapterDeployment.spec.baseModel.uri says it "
        "(hf://org/name[@revision], s3://..., pvc://..., file://...).",
    )
    revision: str | None = Field(
        default=None,
        description="The Hub revision served when the URI does not pin one (@revision wins).",
    )
    name: str = Field(
        min_length=1,
        description="The served model name (vLLM --served-model-name): requests with this "
        "model go to the base model, and the engine's model list shows it.",
    )
    aliases: list[str] = Field(
        default_factory=list,
        description=(
            "Other URIs of the same weights (e.g. an s3:// mirror of an hf:// model) that "
            "adapters may name as their base model."
        ),
    )


class AdapterEntry(_Config):
    """One adapter to serve: requests select it with ``model=<name>``."""

    name: AdapterName = Field(description="Adapter name (a DNS label), the model name in requests.")
    uri: str = Field(
        min_length=1, description="The adapter artifact in storage (s3://, pvc://, ...)."
    )
    digest: Digest = Field(
        description="sha256 of the artifact's manifest.json; every file is verified against it "
        "before the adapter is loaded."
    )
    pinned: bool = Field(
        default=True,
        description="Pinned adapters gate the pod's readiness (GET /readyz); others are loaded "
        "best effort.",
    )


class ReconcileConfig(_Config):
    """Timing of the agent's loop and its retry policy (all durations in seconds)."""

    config_poll_seconds: float = Field(
        default=2.0, gt=0, description="How often the config file is checked for changes."
    )
    resync_seconds: float = Field(
        default=10.0,
        gt=0,
        description="How often the engine's loaded set is observed and reconciled even when "
        "nothing changed (this is what notices an engine restart).",
    )
    backoff_initial_seconds: float = Field(
        default=1.0, gt=0, description="Delay before the first retry of a transient failure."
    )
    backoff_max_seconds: float = Field(
        default=30.0, gt=0, description="Cap of the exponential retry delay."
    )
    backoff_jitter: float = Field(
        default=0.2,
        ge=0,
        lt=1,
        description="Each delay is shortened by a random fraction up to this (spreads the "
        "replicas' retries).",
    )
    max_attempts: int = Field(
        default=8,
        ge=1,
        description="Attempts of one step (download or load) before a transient failure "
        "becomes Failed.",
    )
    failed_retry_seconds: float = Field(
        default=1800.0,
        gt=0,
        description="A Failed adapter is tried again after this cool-down (and at once when "
        "its uri or digest, or the engine or base model settings, change).",
    )
    request_timeout_seconds: float = Field(
        default=10.0, gt=0, description="Timeout of the engine's list and unload calls."
    )
    load_timeout_seconds: float = Field(
        default=600.0, gt=0, description="Timeout of one load call (a large adapter takes long)."
    )
    max_parallel_downloads: int = Field(
        default=4, ge=1, le=64, description="Adapters downloaded and verified at the same time."
    )


class ServingConfig(_Config):
    """Everything the adapter agent needs; rendered by the operator, re-validated on every read.

    Fields that shape the process itself (``cache_dir``, ``status_port``,
    ``status_bind_address``) take effect at start only; everything else, the adapter list
    above all, is applied when the mounted file changes.
    """

    schema_version: Literal["kubetune.io/servingconfig/v1"] = Field(
        default=SCHEMA_VERSION, description="Version of this contract."
    )
    engine: EngineConfig = Field(description="The engine beside the agent.")
    base_model: BaseModelRef = Field(description="The base model the engine serves.")
    storage: StorageConfig = Field(
        default_factory=StorageConfig, description="Object-storage connection for s3:// URIs."
    )
    adapters: list[AdapterEntry] = Field(
        default_factory=list, max_length=1024, description="Adapters to serve (unique names)."
    )
    cache_dir: str = Field(
        min_length=1,
        description=(
            "Directory for verified adapter copies, shared with the engine container at the "
            "same path (the engine loads from there): <cache_dir>/adapters/<digest hex>/."
        ),
    )
    status_port: int = Field(
        default=8090,
        ge=0,
        le=65535,
        description="Port of GET /status, /readyz and /healthz (0: any free port, for tests).",
    )
    status_bind_address: str = Field(
        # All interfaces: the kubelet (probes) and the operator (status) read it from outside
        # the pod. It serves no secret and no admin action.
        default="0.0.0.0",  # noqa: S104
        min_length=1,
        description="Address the status server binds to.",
    )
    reconcile: ReconcileConfig = Field(
        default_factory=ReconcileConfig, description="Loop timing and retry policy."
    )

    @model_validator(mode="after")
    def _names_are_unique(self) -> ServingConfig:
        """Adapter names are unique and differ from the served base model name."""
        seen: set[str] = set()
        for adapter in self.adapters:
            if adapter.name in seen:
                raise ValueError(f"adapter name {adapter.name!r} is listed twice")
            if adapter.name == self.base_model.name:
                raise ValueError(
                    f"adapter name {adapter.name!r} is the served base model name; pick another"
                )
            seen.add(adapter.name)
        if self.reconcile.backoff_max_seconds < self.reconcile.backoff_initial_seconds:
            raise ValueError("reconcile.backoff_max_seconds must be >= backoff_initial_seconds")
        return self


@dataclass(frozen=True)
class ConfigReading:
    """One read of the config file: its content hash and the model (or why there is none).

    Attributes:
        digest: ``sha256:<hex>`` of the file's bytes; ``""`` when it could not be read.
        config: the validated config, or ``None`` when the file is unreadable or invalid.
        error: why there is no config (names the path and the first invalid fields).
    """

    digest: str
    config: ServingConfig | None
    error: str | None


def read_config(path: Path) -> ConfigReading:
    """Read and validate a ServingConfig file; never raises (failures are in ``error``)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return ConfigReading("", None, f"cannot read {path}: {exc.strerror or exc}")
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    try:
        return ConfigReading(digest, ServingConfig.model_validate_json(data), None)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        return ConfigReading(digest, None, f"{path} is not a valid ServingConfig: {problems}")


def load_config(path: Path) -> ServingConfig:
    """Read and validate a ServingConfig file.

    Raises:
        ConfigInvalid: the file cannot be read or is not a valid ServingConfig (the message
            names the fields).
    """
    reading = read_config(path)
    if reading.config is None:
        raise ConfigInvalid(reading.error or f"{path}: unreadable")
    return reading.config
