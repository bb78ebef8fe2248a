"""AdapterDeployment: one base model in memory, many LoRA adapters chosen per request.

Schema module: pydantic and the standard library only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

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
    DNSLabel,
    ImageRef,
    LocalObjectReference,
    ModelURI,
    ObjectMeta,
    ResourcesSpec,
    SchedulingSpec,
    StorageSpec,
    cel,
    rules,
)

EngineArg = Annotated[str, StringConstraints(min_length=1, max_length=1024)]

# vLLM accepts only these ranks for --max-lora-rank (vllm/config/lora.py).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class VLLMEngine(ApiModel):
    """vLLM's OpenAI-compatible server with LoRA enabled and runtime adapter loading."""

    type: Literal["vllm"] = Field(description="Engine type.")
    image: ImageRef | None = Field(default=None, description="Image override for vLLM.")
    gpu_memory_utilization: Decimal | None = Field(
        default=None,
        description="Fraction of GPU memory vLLM may use (--gpu-memory-utilization).",
        json_schema_extra=rules(
            cel("double(self) > 0.0 && double(self) <= 1.0", "must be in (0, 1]")
        ),
    )
    max_model_len: int | None = Field(
        default=None, ge=16, le=1_048_576, description="Context length (--max-model-len)."
    )
    extra_args: list[EngineArg] | None = Field(
        default=None, max_length=64, description="Further vLLM arguments, appended verbatim."
    )


class LoRAXEngine(ApiModel):
    """LoRAX (Predibase) launcher; adapters are fetched per request from its adapter source."""

    type: Literal["lorax"] = Field(description="Engine type.")
    image: ImageRef | None = Field(default=None, description="Image override for LoRAX.")
    extra_args: list[EngineArg] | None = Field(
        default=None, max_length=64, description="Further launcher arguments, appended verbatim."
    )


class BuiltinEngine(ApiModel):
    """kubetune's own server on transformers + peft: CPU clusters, development and tests."""

    type: Literal["builtin"] = Field(description="Engine type.")
    max_batch_size: int = Field(
        default=8, ge=1, le=256, description="Requests batched into one forward pass. Default: 8."
    )
    max_batch_delay_milliseconds: int = Field(
        default=10,
        ge=0,
        le=1000,
        description="How long a request waits for others to batch with. Default: 10.",
    )


Engine = Annotated[VLLMEngine | LoRAXEngine | BuiltinEngine, Field(discriminator="type")]


class AdapterSource(ApiModel):
    """Where an adapter comes from: a FineTuneJob's artifact, or a URI pinned by digest."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "has(self.fineTuneJobRef) != has(self.uri)",
                "set exactly one of fineTuneJobRef or uri",
            ),
            cel(
                "has(self.uri) == has(self.digest)",
                "uri must be pinned by digest (and digest needs uri)",
                field_path=".digest",
            ),
        )
    )

    fine_tune_job_ref: LocalObjectReference | None = Field(
        default=None,
        description="A FineTuneJob in this namespace; its published artifact and digest are used.",
    )
    uri: ArtifactURI | None = Field(default=None, description="Adapter directory in storage.")
    digest: Digest | None = Field(
        default=None, description="sha256 of the adapter's manifest.json; verified before loading."
    )


class AdapterSpec(ApiModel):
    """One adapter to serve; requests select it with model=<name>."""

    name: DNSLabel = Field(description="Adapter name, used as the model name in requests.")
    source: AdapterSource = Field(description="Where the adapter comes from.")
    pinned: bool = Field(
        default=True,
        description=(
            "Pinned adapters are loaded on every replica and gate readiness; unpinned ones are "
            "loaded best effort. Default: true."
        ),
    )


class CapacitySpec(ApiModel):
    """Adapter slots; each is derived from the adapter list when omitted."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "!has(self.maxLoras) || !has(self.maxCpuLoras) || "
                "self.maxCpuLoras >= self.maxLoras",
                "maxCpuLoras must be at least maxLoras",
                field_path=".maxCpuLoras",
            )
        )
    )

    max_loras: int | None = Field(
        default=None, ge=1, le=1024, description="Adapters usable in one batch (--max-loras)."
    )
    max_cpu_loras: int | None = Field(
        default=None, ge=1, le=4096, description="Adapters cached in CPU memory (--max-cpu-loras)."
    )
    max_lora_rank: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="Highest adapter rank accepted (--max-lora-rank); vLLM allows "
        "1, 8, 16, 32, 64, 128, 256, 320, 512.",
    )


class PromotionSpec(ApiModel):
    """Which adapters may be loaded."""

    require_passed_eval: bool = Field(
        default=False,
        description=(
            "Load an adapter only once an EvalJob in this namespace passed for its digest; "
            "until then it is Blocked and its status says why. Default: false."
        ),
    )


class ServiceSpec(ApiModel):
    """The Service in front of the inference port (the adapter API is never exposed)."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        default="ClusterIP", description="Service type. Default: ClusterIP."
    )
    port: int = Field(default=8000, ge=1, le=65535, description="Service port. Default: 8000.")
    annotations: dict[str, Annotated[str, StringConstraints(max_length=4096)]] | None = Field(
        default=None, max_length=32, description="Annotations for the Service."
    )


class AdapterDeploymentSpec(ApiModel):
    """Desired state of an AdapterDeployment."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "self.engine.type != 'vllm' || !has(self.capacity) || "
                "!has(self.capacity.maxLoraRank) || self.capacity.maxLoraRank in "
                f"[{', '.join(str(r) for r in VLLM_LORA_RANKS)}]",
                "vLLM accepts maxLoraRank 1, 8, 16, 32, 64, 128, 256, 320 or 512",
                field_path=".capacity.maxLoraRank",
            ),
        )
    )

    base_model: BaseModelSpec = Field(description="The base model every adapter was trained on.")
    base_model_aliases: list[ModelURI] | None = Field(
        default=None,
        max_length=16,
        description=(
            "Other URIs of the same base weights that adapters may name as their base model "
            "(e.g. the hf:// original of an s3:// mirror): an adapter trained on one of them is "
            "compatible. Changing the list restarts the pods."
        ),
    )
    engine: Engine = Field(description="Serving engine: vllm, lorax or builtin.")
    replicas: int = Field(default=1, ge=0, le=128, description="Serving pods. Default: 1.")
    adapters: list[AdapterSpec] | None = Field(
        default=None,
        max_length=256,
        description="Adapters to serve. Changing the list never restarts pods.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
    )
    capacity: CapacitySpec | None = Field(default=None, description="Adapter slots.")
    promotion: PromotionSpec | None = Field(default=None, description="Promotion rule.")
    storage: StorageSpec | None = Field(
        default=None, description="Object-storage connection for s3:// URIs."
    )
    resources: ResourcesSpec | None = Field(default=None, description="Compute per replica.")
    scheduling: SchedulingSpec | None = Field(
        default=None, description="Node selection, tolerations and priority."
    )
    service: ServiceSpec | None = Field(default=None, description="The inference Service.")
    agent_image: ImageRef | None = Field(
        default=None,
        description="Adapter agent image override. Default: the operator's runtime image.",
    )


class AdapterStatus(ApiModel):
    """Observed state of one adapter across the replicas."""

    name: DNSLabel = Field(description="Adapter name.")
    phase: Literal["Pending", "Blocked", "Downloading", "Loading", "Loaded", "Failed"] = Field(
        description="Blocked: waiting for promotion or its FineTuneJob; Failed: gave up, see "
        "lastError."
    )
    uri: ArtifactURI | None = Field(default=None, description="Resolved adapter URI.")
    digest: Digest | None = Field(default=None, description="Resolved manifest digest.")
    ready_replicas: int = Field(default=0, ge=0, description="Replicas serving it.")
    message: Annotated[str, StringConstraints(max_length=1024)] | None = Field(
        default=None,
        description="Why it is Blocked or Pending, or which older digest is served meanwhile.",
    )
    last_error: Annotated[str, StringConstraints(max_length=1024)] | None = Field(
        default=None, description="Last load error, as the engine or the agent reported it."
    )
    load_seconds: float | None = Field(
        default=None, description="Storage-to-servable time of the last load."
    )
    last_transition_time: datetime | None = Field(
        default=None, description="When the phase last changed."
    )


class AdapterDeploymentStatus(ApiModel):
    """Observed state of an AdapterDeployment."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation this status reflects."
    )
    conditions: list[Condition] | None = Field(
        default=None,
        max_length=16,
        description="Ready (every pinned adapter answers on the ready replicas), Progressing, "
        "Degraded (names the failing adapters).",
        json_schema_extra=CONDITIONS_FIELD_EXTRA,
    )
    endpoint: Annotated[str, StringConstraints(max_length=1024)] | None = Field(
        default=None, description="In-cluster URL of the OpenAI-compatible API."
    )
    replicas: int | None = Field(default=None, ge=0, description="Serving pods.")
    ready_replicas: int | None = Field(default=None, ge=0, description="Ready serving pods.")
    adapters: list[AdapterStatus] | None = Field(
        default=None,
        max_length=256,
        description="Per-adapter state.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
    )
    loaded_adapters: int | None = Field(
        default=None, ge=0, description="Adapters loaded on every ready replica."
    )


class AdapterDeployment(ApiModel):
    """A multi-LoRA inference service: one base model, many adapters, hot-swapped."""

    api_version: Literal["kubetune.io/v1alpha1"] = Field(
        default=API_VERSION, description="API version."
    )
    kind: Literal["AdapterDeployment"] = Field(default="AdapterDeployment", description="Kind.")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: AdapterDeploymentSpec = Field(description="Desired state.")
    status: AdapterDeploymentStatus | None = Field(default=None, description="Observed state.")
