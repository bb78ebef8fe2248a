"""Spec -> :class:`~kubetune_operator.controller.reconcile.Desire`, per kind (pure).

The resource is validated with the same parser as ``kubetune validate`` (the pydantic
models; the CRD's CEL rules are the API server's job at admission), then rendered with the
same builders as ``kubetune run``, so a pod gets exactly the RunConfig a local run would. A
spec that does not validate (possible when the CRD in the cluster is older than the operator)
fails the run with ``InvalidSpec``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubetune_operator.api.common import BaseModelSpec
from kubetune_operator.api.evaljob import EvalJob
from kubetune_operator.api.finetunejob import FineTuneJob
from kubetune_operator.controller.conditions import find
from kubetune_operator.controller.observe import SPEC_HASH_ANNOTATION
from kubetune_operator.controller.reconcile import Desire, spec_hash
from kubetune_operator.manifests import evaljob as evaljob_manifests
from kubetune_operator.manifests import finetunejob as finetunejob_manifests
from kubetune_operator.manifests.common import OperatorSettings, child_name
from kubetune_operator.validation import ManifestInvalid, parse_manifest
from kubetune_runtime.config import AdapterRef

# What the operator needs to know about another resource: its body (as cached), or None.
Lookup = Callable[[str, str], dict[str, Any] | None]


def _manifest(body: dict[str, Any]) -> dict[str, Any]:
    """The resource as a manifest: apiVersion, kind, metadata and spec (status dropped)."""
    meta = body.get("metadata") or {}
    keep = ("name", "namespace", "uid", "generation", "labels")
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: copy.deepcopy(meta[k]) for k in keep if k in meta},
        "spec": copy.deepcopy(body.get("spec")),
    }


def run_job_name(kind: str, name: str, run_id: str | None, nodes: int = 1) -> str:
    """The run's Job name, as :func:`~kubetune_operator.manifests.jobs.build_run_objects`."""
    task = "train" if kind == "FineTuneJob" else "evaluate"
    return child_name(
        name,
        task if not run_id else f"{task}-{run_id}",
        max_length=63 - len(f"-{nodes - 1}") if nodes > 1 else 63,
    )


def _annotate(objects: list[dict[str, Any]], digest: str) -> tuple[dict[str, Any], ...]:
    for obj in objects:
        if obj["kind"] == "Job":
            obj["metadata"].setdefault("annotations", {})[SPEC_HASH_ANNOTATION] = digest
    return tuple(objects)


def _common(body: dict[str, Any]) -> dict[str, Any]:
    spec = body.get("spec") or {}
    run_id = spec.get("runId") or ""
    scheduling = spec.get("scheduling") or {}
    nodes = int((spec.get("distributed") or {}).get("nodes") or 1)
    return {
        "run_id": run_id,
        "job_name": run_job_name(body["kind"], body["metadata"]["name"], run_id or None, nodes),
        "spec_hash": spec_hash(spec),
        "suspend": bool(spec.get("suspend")),
        "queue": bool(scheduling.get("queueName")),
        "backoff_limit": int(spec.get("backoffLimit", 2)),
        "ttl_seconds": spec.get("ttlSecondsAfterFinished"),
    }


def parse(body: dict[str, Any]) -> FineTuneJob | EvalJob | ManifestInvalid:
    """The typed resource, or the validation error (never raised).

    Types, enums, bounds and unknown fields are checked here (the API models, strict); the
    CRD's CEL rules were enforced by the API server when it admitted the object.
    """
    try:
        model = parse_manifest(_manifest(body), check_rules=False)
    except ManifestInvalid as exc:
        return exc
    if not isinstance(model, FineTuneJob | EvalJob):
        raise TypeError(f"not a run kind: {type(model).__name__}")
    return model


def finetune_desire(
    body: dict[str, Any], model: FineTuneJob | ManifestInvalid, settings: OperatorSettings
) -> Desire:
    """What a FineTuneJob asks for: its children, or why it cannot run."""
    common = _common(body)
    if isinstance(model, ManifestInvalid):
        return Desire(
            **common, children=None, waiting=("InvalidSpec", str(model)), waiting_failed=True
        )
    objects = finetunejob_manifests.build(model, settings)
    return Desire(
        **common,
        children=_annotate(objects, common["spec_hash"]),
        progress_secret=(
            finetunejob_manifests.progress_secret_name(model)
            if settings.progress_base_url
            else None
        ),
    )


@dataclass(frozen=True)
class Waiting:
    """Why an EvalJob cannot start yet: a reason token, a sentence, and whether it is final."""

    reason: str
    message: str
    final: bool


def _resolve(model: EvalJob, lookup: Lookup) -> tuple[AdapterRef, BaseModelSpec] | Waiting:
    """The adapter and base to evaluate, or (reason, message, final) when not yet known."""
    target = model.spec.target
    namespace = model.metadata.namespace or "default"
    if target.adapter is not None:
        if model.spec.base_model is None:
            return Waiting("InvalidSpec", "spec.baseModel is required with an adapter target", True)
        return AdapterRef(
            uri=target.adapter.uri, digest=target.adapter.digest
        ), model.spec.base_model
    if target.fine_tune_job_ref is not None:
        ref = target.fine_tune_job_ref.name
        ftj = lookup(namespace, ref)
        if ftj is None:
            return Waiting(
                "FineTuneJobNotFound",
                f"FineTuneJob {namespace}/{ref} does not exist (yet)",
                False,
            )
        status = ftj.get("status") or {}
        summary = find(status.get("conditions"), "Succeeded")
        if summary is not None and summary.get("status") == "False":
            return Waiting(
                "FineTuneJobFailed",
                f"FineTuneJob {namespace}/{ref} failed ({summary.get('reason')}): "
                "there is no adapter to evaluate",
                True,
            )
        artifact = status.get("artifact")
        if summary is None or summary.get("status") != "True" or not artifact:
            return Waiting(
                "WaitingForFineTuneJob",
                f"waiting for FineTuneJob {namespace}/{ref} to succeed",
                False,
            )
        base = model.spec.base_model or BaseModelSpec.model_validate(
            (ftj.get("spec") or {}).get("baseModel") or {}
        )
        return AdapterRef(uri=artifact["uri"], digest=artifact.get("digest")), base
    return Waiting(
        "AdapterDeploymentTargetUnsupported",
        "evaluating through an AdapterDeployment endpoint is not available in this operator "
        "version; target the adapter by uri and digest",
        True,
    )


def eval_desire(
    body: dict[str, Any],
    model: EvalJob | ManifestInvalid,
    settings: OperatorSettings,
    lookup: Lookup,
) -> Desire:
    """What an EvalJob asks for; its target is resolved through ``lookup`` (FineTuneJobs)."""
    common = _common(body)
    if isinstance(model, ManifestInvalid):
        return Desire(
            **common, children=None, waiting=("InvalidSpec", str(model)), waiting_failed=True
        )
    resolved = _resolve(model, lookup)
    if isinstance(resolved, Waiting):
        return Desire(
            **common,
            children=None,
            waiting=(resolved.reason, resolved.message),
            waiting_failed=resolved.final,
        )
    adapter, base = resolved
    objects = evaljob_manifests.build(model, settings, adapter=adapter, base_model=base)
    return Desire(
        **common,
        children=_annotate(objects, common["spec_hash"]),
        extra_status={
            "adapterUri": adapter.uri,
            **({"adapterDigest": adapter.digest} if adapter.digest else {}),
        },
    )
