"""Operator settings: what to watch, how often to resync, where to listen (one typed place)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kubetune_operator.manifests.common import OperatorSettings

ANNOTATION_PREFIX = "kubetune.io"
FIELD_MANAGER = "kubetune-operator"


class ControllerSettings(BaseModel):
    """Settings of one operator process; defaults suit a cluster, tests shorten the timers.

    Watch timeouts matter: a watch stream that stalls silently (a dead TCP peer, a proxy
    holding the connection) would freeze the operator. ``watch_server_timeout_seconds`` asks
    the API server to end each watch, and ``watch_client_timeout_seconds`` abandons a watch
    that has not ended by then, so every stream is renewed at least that often.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    children: OperatorSettings = Field(
        default_factory=OperatorSettings, description="Images and defaults of child objects."
    )
    namespaces: tuple[str, ...] = Field(
        default=(), description="Namespaces to watch; empty means every namespace."
    )
    server: str | None = Field(
        default=None,
        description="API server URL without credentials (development and tests); default: "
        "in-cluster service account, else the kubeconfig.",
    )
    field_manager: str = Field(default=FIELD_MANAGER, description="fieldManager of our writes.")
    resync_seconds: float = Field(
        default=30.0, gt=0, description="Periodic reconcile of unfinished runs (and TTLs)."
    )
    image_pull_grace_seconds: float = Field(
        default=300.0, ge=0, description="How long a pod may fail to pull before the run fails."
    )
    progress_min_interval_seconds: float = Field(
        default=5.0, ge=0, description="At most one status.progress patch per job this often."
    )
    watch_server_timeout_seconds: int = Field(default=300, gt=0)
    watch_client_timeout_seconds: int = Field(default=330, gt=0)
    watch_connect_timeout_seconds: int = Field(default=10, gt=0)
    watch_inactivity_timeout_seconds: float = Field(
        default=70.0, gt=0, description="A watch with no event for this long is renewed."
    )
    http_host: str = Field(
        default="0.0.0.0",  # noqa: S104 - pods must reach the progress endpoint
        description="Address of the HTTP server (progress endpoint and /metrics).",
    )
    http_port: int = Field(default=8080, ge=0, description="Its port; 0 picks a free one.")
    liveness_port: int | None = Field(
        default=8081, description="kopf's liveness probe port (/healthz); None disables it."
    )
    workers: int = Field(default=16, gt=0, description="Threads for blocking API calls.")
    serving_resync_seconds: float = Field(
        default=10.0,
        gt=0,
        description="How often every AdapterDeployment is reconciled and its pods' agents "
        "are read (their adapter states raise no Kubernetes event).",
    )
    agent_timeout_seconds: float = Field(
        default=5.0, gt=0, description="Timeout of one read of an agent's /status."
    )
    operator_namespace: str | None = Field(
        default=None,
        description="The operator's own namespace (the chart sets it from the downward API): "
        "where the progress key Secret lives. None: an in-memory key (development), so "
        "progress tokens of jobs started before a restart stop validating.",
    )
    progress_key_secret: str = Field(
        default="kubetune-progress-key",
        min_length=1,
        description="Name of the Secret (key ``key``) holding the key progress tokens are "
        "derived from, in ``operator_namespace``; created by the operator when absent.",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ControllerSettings:
        """Settings from ``KUBETUNE_<FIELD>`` variables (how the Helm chart configures a pod).

        Child settings use the names of :class:`OperatorSettings` fields, e.g.
        ``KUBETUNE_RUNTIME_IMAGE``; ``KUBETUNE_NAMESPACES`` is comma-separated.

        Raises:
            pydantic.ValidationError: a value has the wrong type (the variable is named).
        """

        def pick(model: type[BaseModel]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for name in model.model_fields:
                value = environ.get(f"KUBETUNE_{name.upper()}")
                if value is not None:
                    out[name] = value
            return out

        values = pick(cls)
        values.pop("children", None)
        if "namespaces" in values:
            values["namespaces"] = tuple(
                n.strip() for n in values["namespaces"].split(",") if n.strip()
            )
        if "liveness_port" in values and values["liveness_port"] in ("", "none"):
            values["liveness_port"] = None
        if not (values.get("operator_namespace") or "").strip():
            values.pop("operator_namespace", None)
        children = pick(OperatorSettings)
        return cls.model_validate({**values, "children": children})

    def describe(self) -> str:
        """The settings as one JSON line for the startup log (no credentials live here)."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)
