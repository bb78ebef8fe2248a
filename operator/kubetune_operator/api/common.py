"""Building blocks shared by the three kinds: base model, URIs, references, scheduling, status.

This is a schema module: it imports only pydantic and the standard library. The CRDs in
`crds/` are generated from these models (`kubetune crds`), so every constraint written here is
enforced twice with one source: by pydantic (the operator, `kubetune validate`) and by the API
server (OpenAPI bounds, patterns and the CEL rules declared with :func:`cel`).

Conventions (Kubernetes API conventions, Kubebuilder markers expressed in pydantic):

* camelCase on the wire, snake_case in Python; unknown fields are an error.
* Every field has a description; it becomes `kubectl explain` text.
* No floats in spec: decimals (learning rate, ratios) are strings such as ``"2e-4"``, bounded by
  CEL rules that call ``double()``.
* Optional means "may be omitted"; ``null`` is treated as omitted, as the API server does for
  fields that are not ``nullable`` (it prunes them before validation).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION: Final = "kubetune.io/v1alpha1"  # GROUP/VERSION, spelled out for typing
CATEGORY = "kubetune"

# ----------------------------------------------------------------------------------- helpers


def cel(
    rule: str, message: str, *, field_path: str | None = None, reason: str | None = None
) -> dict[str, str]:
    """Return one ``x-kubernetes-validations`` entry (a CEL rule the API server evaluates).

    Args:
        rule: CEL expression over ``self`` (and ``oldSelf`` for transition rules).
        message: one sentence shown to the user when the rule fails.
        field_path: JSONPath-like path relative to the node, e.g. ``.quantization``, naming the
            field the error is about (Kubernetes >= 1.28 reports it; `kubetune validate` too).
        reason: ``FieldValueInvalid`` (default), ``FieldValueRequired``,
            ``FieldValueForbidden`` or ``FieldValueDuplicate``.

    Returns:
        A dict ready to be placed in a schema's ``x-kubernetes-validations`` list.
    """
    entry = {"rule": rule, "message": message}
    if field_path is not None:
        entry["fieldPath"] = field_path
    if reason is not None:
        entry["reason"] = reason
    return entry


def rules(*entries: dict[str, str]) -> dict[str, Any]:
    """Wrap CEL entries as pydantic ``json_schema_extra`` for a model or a field."""
    return {"x-kubernetes-validations": list(entries)}


class ApiModel(BaseModel):
    """Base of every API object and sub-object: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
    )


# ------------------------------------------------------------------------------- string types

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNSLabel = Annotated[str, StringConstraints(pattern=DNS_LABEL_PATTERN, min_length=1, max_length=63)]
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNSSubdomain = Annotated[
    str, StringConstraints(pattern=DNS_SUBDOMAIN_PATTERN, min_length=1, max_length=253)
]

# Kubernetes resource.Quantity, exactly as the API server's OpenAPI publishes it.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
Quantity = Annotated[str, StringConstraints(pattern=QUANTITY_PATTERN, max_length=64)]

# A non-negative decimal written as a string ("0.1", "2e-4"); bounds are CEL rules on the field.
DECIMAL_PATTERN = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?$"
Decimal = Annotated[str, StringConstraints(pattern=DECIMAL_PATTERN, max_length=32)]
SIGNED_DECIMAL_PATTERN = r"^[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?$"
SignedDecimal = Annotated[str, StringConstraints(pattern=SIGNED_DECIMAL_PATTERN, max_length=32)]

_HF = r"hf://[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}(@[A-Za-z0-9._/-]{1,128})?"
_S3 = r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s@]*)?"
_PVC = r"pvc://[a-z0-9]([-a-z0-9]{0,251}[a-z0-9])?(/[^\s@]*)?"
_FILE = r"file:///[^\s]*"

MODEL_URI_PATTERN = f"^({_HF}|{_S3}|{_PVC}|{_FILE})$"
ModelURI = Annotated[str, StringConstraints(pattern=MODEL_URI_PATTERN, max_length=1024)]
DATA_URI_PATTERN = MODEL_URI_PATTERN
DataURI = Annotated[str, StringConstraints(pattern=DATA_URI_PATTERN, max_length=1024)]
OUTPUT_URI_PATTERN = f"^({_S3}|{_PVC}|{_FILE})$"
OutputURI = Annotated[str, StringConstraints(pattern=OUTPUT_URI_PATTERN, max_length=1024)]
ARTIFACT_URI_PATTERN = f"^({_S3}|{_PVC}|{_FILE})$"
ArtifactURI = Annotated[str, StringConstraints(pattern=ARTIFACT_URI_PATTERN, max_length=1024)]

DIGEST_PATTERN = r"^sha256:[a-f0-9]{64}$"
Digest = Annotated[str, StringConstraints(pattern=DIGEST_PATTERN, max_length=71)]

# http(s)://host[:port][/path]; userinfo (user:password@) is rejected: credentials go in Secrets.
ENDPOINT_PATTERN = r"^https?://[A-Za-z0-9.\-\[\]:]+(/[^\s@?#]*)?$"
EndpointURL = Annotated[str, StringConstraints(pattern=ENDPOINT_PATTERN, max_length=2048)]

IMAGE_PATTERN = (
    r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._/-][a-z0-9]+)*)*"
    r"(:[\w][\w.-]{0,127})?(@sha256:[a-f0-9]{64})?$"
)
ImageRef = Annotated[str, StringConstraints(pattern=IMAGE_PATTERN, max_length=512)]

# What a human should read when a pattern does not match (used by `kubetune validate`).
PATTERN_HINTS: dict[str, str] = {
    DNS_LABEL_PATTERN: "a DNS label: lowercase letters, digits and '-', at most 63 characters",
    DNS_SUBDOMAIN_PATTERN: "a DNS subdomain: lowercase letters, digits, '-' and '.'",
    QUANTITY_PATTERN: "a Kubernetes quantity such as '500m', '4', '16Gi'",
    DECIMAL_PATTERN: "a non-negative decimal number written as a string, such as '0.1' or '2e-4'",
    SIGNED_DECIMAL_PATTERN: "a decimal number written as a string, such as '-0.01' or '0.5'",
    MODEL_URI_PATTERN: (
        "a URI hf://org/name[@revision], s3://bucket/prefix, pvc://claim/path or file:///path"
        " (no credentials in the URI)"
    ),
    OUTPUT_URI_PATTERN: "a URI s3://bucket/prefix, pvc://claim/path or file:///path",
    DIGEST_PATTERN: "a digest 'sha256:' followed by 64 lowercase hex digits",
    ENDPOINT_PATTERN: (
        "an http(s)://host[:port][/path] URL without user:password@ (credentials go in a Secret)"
    ),
    IMAGE_PATTERN: "a container image reference such as 'ghcr.io/org/image:tag'",
}

# ----------------------------------------------------------------------------- references


class LocalObjectReference(ApiModel):
    """A reference to an object of a known kind in the same namespace."""

    name: DNSSubdomain = Field(description="Name of the object, in the same namespace.")


class SecretKeyRef(ApiModel):
    """One key of a Secret in the same namespace."""

    name: DNSSubdomain = Field(description="Name of the Secret, in the same namespace.")
    key: Annotated[str, StringConstraints(pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)] = Field(
        description="Key within the Secret's data."
    )


class S3SecretRef(ApiModel):
    """A Secret holding S3 access keys, read by the pod as environment variables."""

    name: DNSSubdomain = Field(description="Name of the Secret, in the same namespace.")
    access_key_id_key: str = Field(
        default="AWS_ACCESS_KEY_ID",
        max_length=253,
        description="Key in the Secret holding the access key id. Default: AWS_ACCESS_KEY_ID.",
    )
    secret_access_key_key: str = Field(
        default="AWS_SECRET_ACCESS_KEY",
        max_length=253,
        description=(
            "Key in the Secret holding the secret access key. Default: AWS_SECRET_ACCESS_KEY."
        ),
    )
    session_token_key: str | None = Field(
        default=None,
        max_length=253,
        description="Key in the Secret holding a session token, for temporary credentials.",
    )


class StorageCredentials(ApiModel):
    """How pods authenticate to object storage: exactly one of a Secret or a service account."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "has(self.secretRef) != has(self.serviceAccountName)",
                "set exactly one of secretRef or serviceAccountName",
            )
        )
    )

    secret_ref: S3SecretRef | None = Field(
        default=None,
        description=(
            "A Secret with static access keys. The keys are injected as environment variables; "
            "they never appear in the spec, status, events or logs."
        ),
    )
    service_account_name: DNSSubdomain | None = Field(
        default=None,
        description=(
            "A ServiceAccount bound to a cloud identity (IRSA, GKE or Azure workload identity); "
            "the pods run as it and receive short-lived credentials."
        ),
    )


class StorageSpec(ApiModel):
    """Connection to S3-compatible object storage for s3:// URIs (AWS S3, MinIO, SeaweedFS...)."""

    endpoint: EndpointURL | None = Field(
        default=None,
        description=(
            "S3 endpoint URL, e.g. https://minio.storage.svc:9000. Omit for AWS S3's regional "
            "endpoint."
        ),
    )
    region: Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]+$", max_length=64)] | None = (
        Field(default=None, description="Region, e.g. us-east-1. Default: the SDK's default.")
    )
    path_style: bool = Field(
        default=False,
        description=(
            "Address buckets as endpoint/bucket (path-style), as MinIO and SeaweedFS expect, "
            "instead of bucket.endpoint. Default: false."
        ),
    )
    ca_bundle: SecretKeyRef | None = Field(
        default=None,
        description="A Secret key holding a PEM CA bundle to trust for the endpoint's TLS.",
    )
    credentials: StorageCredentials | None = Field(
        default=None,
        description=(
            "How to authenticate. Omit to use the pod's ambient identity. Inline keys are not "
            "accepted anywhere in the API."
        ),
    )


# ------------------------------------------------------------------------------ base model


class BaseModelSpec(ApiModel):
    """The base (foundation) model to start from."""

    uri: ModelURI = Field(
        description=(
            "Where the base model is: hf://org/name[@revision] (Hugging Face Hub; pin a "
            "revision for reproducible runs), s3://bucket/prefix, pvc://claim/path or "
            "file:///path, pointing at a directory in Hugging Face format."
        )
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="A Secret key holding a Hugging Face token, for gated or private models.",
    )
    trust_remote_code: bool = Field(
        default=False,
        description=(
            "Allow the model repository's own Python code to run. Off by default: it executes "
            "code from the model's source inside your cluster."
        ),
    )


# ------------------------------------------------------------------------- pods: resources


class GPUSpec(ApiModel):
    """GPUs for each pod (each node of a distributed run)."""

    count: int = Field(ge=0, le=16, description="GPUs per pod (per node). 0 runs on CPU.")
    resource_name: Annotated[
        str, StringConstraints(pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$", max_length=253)
    ] = Field(
        default="nvidia.com/gpu",
        description="Extended resource name of the device. Default: nvidia.com/gpu.",
    )
    product: Annotated[str, StringConstraints(max_length=128)] | None = Field(
        default=None,
        description=(
            "GPU model required, e.g. NVIDIA-H100-80GB-HBM3; becomes a node selector on the "
            "nvidia.com/gpu.product label."
        ),
    )


class ResourcesSpec(ApiModel):
    """Compute for each pod. Requests equal limits for GPUs and memory (no overcommit)."""

    gpu: GPUSpec | None = Field(default=None, description="GPUs per pod. Omit to run on CPU.")
    cpu: Quantity | None = Field(default=None, description="CPU per pod, e.g. '8'.")
    memory: Quantity | None = Field(default=None, description="Memory per pod, e.g. '64Gi'.")
    ephemeral_storage: Quantity | None = Field(
        default=None,
        description="Local scratch per pod for downloads and checkpoints before upload.",
    )
    shared_memory: Quantity | None = Field(
        default=None,
        description=(
            "Size of /dev/shm (a memory-backed emptyDir). PyTorch data loaders and NCCL need "
            "more than the container default of 64Mi. Default: 1Gi with GPUs."
        ),
    )


class Toleration(ApiModel):
    """A core/v1 Toleration."""

    key: Annotated[str, StringConstraints(max_length=316)] | None = Field(
        default=None, description="Taint key to tolerate; empty with operator Exists means all."
    )
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists or Equal. Default: Equal."
    )
    value: Annotated[str, StringConstraints(max_length=63)] | None = Field(
        default=None, description="Taint value to match with operator Equal."
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty means all effects."
    )
    toleration_seconds: int | None = Field(
        default=None,
        ge=0,
        description="For NoExecute: how long the pod stays bound after the taint appears.",
    )


class SchedulingSpec(ApiModel):
    """Where and in which order pods are scheduled."""

    node_selector: dict[str, Annotated[str, StringConstraints(max_length=63)]] | None = Field(
        default=None, max_length=32, description="Node labels the pods require."
    )
    tolerations: list[Toleration] | None = Field(
        default=None, max_length=32, description="Taints the pods tolerate."
    )
    priority_class_name: DNSSubdomain | None = Field(
        default=None, description="PriorityClass of the pods (preemption order)."
    )
    queue_name: DNSSubdomain | None = Field(
        default=None,
        description=(
            "Kueue LocalQueue to submit to. The Job is created suspended and Kueue admits it "
            "against the queue's quota; the resource reports Queued until then."
        ),
    )


# ------------------------------------------------------------------------------ lifecycle


class RunPolicy(ApiModel):
    """Fields shared by FineTuneJob and EvalJob that govern one run's lifecycle."""

    suspend: bool = Field(
        default=False,
        description=(
            "Suspend the run: running pods are stopped (checkpointing first) and nothing new "
            "starts until it is set back to false. Kueue also uses it."
        ),
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        le=31_536_000,
        description=(
            "Wall-clock limit of the run in seconds, counted while it is not suspended; then "
            "it fails with reason DeadlineExceeded."
        ),
    )
    backoff_limit: int = Field(
        default=2,
        ge=0,
        le=20,
        description=(
            "Retries after a failed pod before the run fails (each retry resumes from the "
            "latest checkpoint). Pods preempted or evicted do not count, invalid data is never "
            "retried. Default: 2."
        ),
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Delete the run's pods, Jobs and config this many seconds after it finishes. The "
            "resource itself and its status are kept, so GitOps tools do not recreate it."
        ),
    )
    run_id: Annotated[str, StringConstraints(pattern=DNS_LABEL_PATTERN, max_length=40)] | None = (
        Field(
            default=None,
            description=(
                "Rerun token. A finished run never runs again because its spec changed or the "
                "operator restarted; changing runId starts a new run (and allows the training "
                "spec of a started job to change)."
            ),
        )
    )


# --------------------------------------------------------------------------------- status

CONDITION_TYPE_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"


class Condition(ApiModel):
    """The metav1.Condition shape, with its patterns and maximum lengths."""

    type: Annotated[str, StringConstraints(pattern=CONDITION_TYPE_PATTERN, max_length=316)] = Field(
        description="Type of condition in CamelCase, e.g. Succeeded, Ready."
    )
    status: Literal["True", "False", "Unknown"] = Field(
        description="Status of the condition: True, False or Unknown."
    )
    observed_generation: int | None = Field(
        default=None,
        ge=0,
        description="The .metadata.generation this condition was computed from.",
    )
    last_transition_time: datetime = Field(
        description="When the condition last changed status (not reason or message)."
    )
    reason: Annotated[
        str, StringConstraints(pattern=REASON_PATTERN, min_length=1, max_length=1024)
    ] = Field(description="Programmatic CamelCase token for the condition's last transition.")
    message: Annotated[str, StringConstraints(max_length=32768)] = Field(
        description="Human-readable sentence about the transition."
    )


CONDITIONS_FIELD_EXTRA: dict[str, Any] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}


class ObjectMeta(ApiModel):
    """metav1.ObjectMeta: the fields kubetune reads are typed, the rest are accepted as-is.

    Unknown fields are rejected, as kubectl's strict field validation does (``metadata.lables``
    is a typo, not a new field).
    """

    name: Annotated[str, StringConstraints(pattern=DNS_LABEL_PATTERN, max_length=63)] = Field(
        description=(
            "Name of the resource: a DNS label of at most 63 characters (child objects and "
            "pod hostnames are derived from it)."
        )
    )
    generate_name: str | None = Field(default=None, description="Name prefix (not supported).")
    namespace: DNSLabel | None = Field(default=None, description="Namespace of the resource.")
    uid: str | None = Field(default=None, description="UID assigned by the API server.")
    generation: int | None = Field(default=None, description="Spec generation.")
    resource_version: str | None = Field(default=None, description="Resource version.")
    creation_timestamp: str | None = Field(default=None, description="Creation time.")
    deletion_timestamp: str | None = Field(default=None, description="Deletion time.")
    deletion_grace_period_seconds: int | None = Field(default=None, description="Grace period.")
    labels: dict[str, str] | None = Field(default=None, description="Labels.")
    annotations: dict[str, str] | None = Field(default=None, description="Annotations.")
    owner_references: list[dict[str, Any]] | None = Field(default=None, description="Owners.")
    finalizers: list[str] | None = Field(default=None, description="Finalizers.")
    managed_fields: list[dict[str, Any]] | None = Field(
        default=None, description="Server-side apply field ownership."
    )
    self_link: str | None = Field(default=None, description="Deprecated self link.")
