"""EvalJob: evaluate base vs base + adapter, and decide promotion with gates.

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
    Digest,
    DNSLabel,
    ImageRef,
    LocalObjectReference,
    ObjectMeta,
    OutputURI,
    ResourcesSpec,
    RunPolicy,
    SchedulingSpec,
    StorageSpec,
    cel,
    rules,
)
from kubetune_operator.api.evaluation import EVALUATION_RULES, EvaluationPlan, EvaluationResult


class PinnedArtifact(ApiModel):
    """An artifact in storage, pinned by the sha256 of its manifest.json."""

    uri: ArtifactURI = Field(description="Prefix of the adapter directory (holds manifest.json).")
    digest: Digest = Field(
        description="Expected sha256 of manifest.json; the artifact is refused if it differs."
    )


class AdapterDeploymentTarget(ApiModel):
    """One adapter served by a live AdapterDeployment, evaluated through its endpoint."""

    name: DNSLabel = Field(description="Name of the AdapterDeployment, in the same namespace.")
    adapter: DNSLabel = Field(description="Adapter name within it (its spec.adapters[].name).")


class EvalTarget(ApiModel):
    """What to evaluate: exactly one of a FineTuneJob's artifact, a pinned URI, or a deployment."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "(has(self.fineTuneJobRef) ? 1 : 0) + (has(self.adapter) ? 1 : 0) + "
                "(has(self.adapterDeploymentRef) ? 1 : 0) == 1",
                "set exactly one of fineTuneJobRef, adapter or adapterDeploymentRef",
            )
        )
    )

    fine_tune_job_ref: LocalObjectReference | None = Field(
        default=None,
        description="A FineTuneJob whose published artifact (URI and digest) is evaluated.",
    )
    adapter: PinnedArtifact | None = Field(
        default=None, description="An adapter in storage, pinned by digest."
    )
    adapter_deployment_ref: AdapterDeploymentTarget | None = Field(
        default=None, description="An adapter served by an AdapterDeployment in this namespace."
    )


class EvalOutputSpec(ApiModel):
    """Where full results go."""

    uri: OutputURI = Field(
        description="Prefix for summary.json and per-sample results (<suite>.jsonl)."
    )


class EvalJobSpec(RunPolicy, EvaluationPlan):
    """Desired state of an EvalJob."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            *EVALUATION_RULES,
            cel(
                "!has(self.target.adapter) || has(self.baseModel)",
                "baseModel is required when the target is an adapter URI",
                field_path=".baseModel",
            ),
        )
    )

    target: EvalTarget = Field(description="The adapter to evaluate.")
    base_model: BaseModelSpec | None = Field(
        default=None,
        description=(
            "The base model. Default: the referenced FineTuneJob's or AdapterDeployment's "
            "base; required for an adapter URI."
        ),
    )
    output: EvalOutputSpec = Field(description="Where full results are written.")
    storage: StorageSpec | None = Field(
        default=None, description="Object-storage connection for s3:// URIs."
    )
    resources: ResourcesSpec | None = Field(default=None, description="Compute for the pod.")
    scheduling: SchedulingSpec | None = Field(
        default=None, description="Node selection, tolerations, priority and Kueue queue."
    )
    image: ImageRef | None = Field(
        default=None, description="Runtime image override. Default: the operator's runtime image."
    )


class EvalJobStatus(EvaluationResult):
    """Observed state of an EvalJob."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation this status reflects."
    )
    conditions: list[Condition] | None = Field(
        default=None,
        max_length=16,
        description="Succeeded (summary), Running, Suspended, Queued, Passed (the gates' verdict).",
        json_schema_extra=CONDITIONS_FIELD_EXTRA,
    )
    run_id: Annotated[str, StringConstraints(max_length=63)] | None = Field(
        default=None, description="The spec.runId this status describes."
    )
    job_name: Annotated[str, StringConstraints(max_length=63)] | None = Field(
        default=None, description="Name of the batch Job running the evaluation."
    )
    start_time: datetime | None = Field(default=None, description="When evaluation started.")
    completion_time: datetime | None = Field(default=None, description="When it finished.")
    adapter_uri: ArtifactURI | None = Field(default=None, description="The adapter evaluated.")
    adapter_digest: Digest | None = Field(
        default=None, description="Digest of the adapter evaluated; promotion keys on it."
    )


class EvalJob(ApiModel):
    """An evaluation of an adapter against its base, with gates deciding promotion."""

    api_version: Literal["kubetune.io/v1alpha1"] = Field(
        default=API_VERSION, description="API version."
    )
    kind: Literal["EvalJob"] = Field(default="EvalJob", description="Kind.")
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    spec: EvalJobSpec = Field(description="Desired state.")
    status: EvalJobStatus | None = Field(default=None, description="Observed state.")
