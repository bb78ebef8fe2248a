"""Names, labels, owner references and security defaults shared by every child object."""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kubetune_operator.api import API_VERSION, GROUP

MAX_NAME = 63


class OperatorSettings(BaseModel):
    """What the operator (or `kubetune run`) adds to every child: images, defaults, endpoints."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    runtime_image: str = Field(
        default="ghcr.io/kubetune/runtime:0.1.0", description="Image running kubetune-runtime."
    )
    image_pull_policy: str = Field(default="IfNotPresent", description="Pull policy.")
    progress_base_url: str | None = Field(
        default=None,
        description="Operator progress endpoint; pods POST to <base>/<namespace>/<name>.",
    )
    termination_grace_period_seconds: int = Field(
        default=120, description="Time between SIGTERM and SIGKILL: one step plus a checkpoint."
    )
    master_port: int = Field(default=29500, description="torchrun rendezvous port.")
    vllm_image: str = Field(
        default="vllm/vllm-openai:v0.11.0",
        description="vLLM's OpenAI-compatible server image (AdapterDeployment engine vllm).",
    )
    lorax_image: str = Field(
        default="ghcr.io/predibase/lorax:0.12.1",
        description="LoRAX launcher image (AdapterDeployment engine lorax).",
    )
    gateway_image: str = Field(
        default="nginxinc/nginx-unprivileged:1.27.5-alpine",
        description="nginx in front of vLLM: forwards inference routes only, never the "
        "adapter load/unload API.",
    )


def child_name(owner: str, suffix: str, *, max_length: int = MAX_NAME) -> str:
    """``<owner>-<suffix>``, hash-truncated to stay a valid DNS label of ``max_length`` chars.

    Deterministic (controller-runtime's advice: no generateName) and unique per owner and
    suffix: a shortened name carries 8 hex characters of sha256(owner/suffix). A long suffix
    (e.g. ``train-<runId>``) is shortened too, keeping its first word.
    """
    name = f"{owner}-{suffix}"
    if len(name) <= max_length:
        return name
    digest = hashlib.sha256(f"{owner}/{suffix}".encode()).hexdigest()[:8]
    if len(suffix) + len(digest) + 3 > max_length:  # not even one owner character would fit
        suffix = suffix.split("-", 1)[0][: max_length // 4]
    keep = max(1, max_length - len(suffix) - len(digest) - 2)
    head = owner[:keep].rstrip("-") or owner[0]
    return f"{head}-{digest}-{suffix}"[:max_length].rstrip("-")


def labels(kind: str, name: str, component: str) -> dict[str, str]:
    """The app.kubernetes.io set plus ``kubetune.io/<kind>: <name>`` for selection."""
    return {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "kubetune-operator",
        "app.kubernetes.io/part-of": "kubetune",
        f"{GROUP}/{kind.lower()}": name,
    }


def owner_reference(kind: str, name: str, uid: str | None) -> dict[str, Any]:
    """A controller owner reference, so deleting the resource garbage-collects its children."""
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "name": name,
        "uid": uid or "",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def restricted_pod_security() -> dict[str, Any]:
    """Pod-level securityContext meeting the Pod Security Standard "restricted"."""
    return {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def restricted_container_security() -> dict[str, Any]:
    """Container securityContext meeting "restricted" (read-only root, no privilege, no caps)."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
