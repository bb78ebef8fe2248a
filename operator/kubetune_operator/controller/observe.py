"""What the operator sees of a run: small views of its batch Job and Pods, and their verdict.

Pure functions only. The operator's watch caches (kopf indexes) hold these views rather than
whole objects, so a thousand jobs cost little memory; :func:`assess` turns them into one
:class:`Assessment` (phase, reason, message) that the status is computed from.

The failure taxonomy (reason tokens), read from the Job and its Pods:

=======================  ======================================================  ===========
reason                   evidence                                                outcome
=======================  ======================================================  ===========
ImagePullFailed          ErrImagePull/ImagePullBackOff past the grace period,    Failed
                         or InvalidImageName at once
Unschedulable            PodScheduled=False with reason Unschedulable            reported
OOMKilled                container terminated with reason OOMKilled (137)        Failed
DeadlineExceeded         Job Failed with reason DeadlineExceeded                 Failed
BackoffLimitExceeded     Job Failed after its retries, no runtime result         Failed
Preempted / Evicted      DisruptionTarget condition or pod reason Evicted        retried
DataInvalid, ...         the runtime's termination message (RunResult.reason)    Failed
TrainingFailed           the runtime's result after retries ran out              Failed
ResultMissing            Job Complete but no readable result                     Failed
=======================  ======================================================  ===========

Preempted and evicted pods are retried by the Job controller without consuming
``backoffLimit`` (the Job's ``podFailurePolicy`` ignores ``DisruptionTarget``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from kubetune_operator.manifests.jobs import CONTAINER
from kubetune_runtime.result import RunResult

Phase = Literal["Pending", "Running", "Succeeded", "Failed"]
SPEC_HASH_ANNOTATION = "kubetune.io/spec-hash"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff"})
PENDING_MESSAGE = "waiting for the run's pods to start"
RUNTIME_FAILURE_REASONS = frozenset(
    {"DataInvalid", "ConfigInvalid", "ArtifactInvalid", "TrainingFailed", "EvaluationFailed"}
)


def parse_time(value: Any) -> datetime | None:
    """An RFC 3339 timestamp (``2026-01-02T03:04:05Z``) as an aware datetime; None if absent."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def format_time(value: datetime) -> str:
    """RFC 3339 with second precision and ``Z``, as the API server writes timestamps."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Terminated:
    """A terminated container: exit code, kubelet reason and termination message."""

    exit_code: int
    reason: str | None = None
    message: str | None = None
    finished_at: datetime | None = None


@dataclass(frozen=True)
class PodView:
    """The parts of a Pod of a run that matter for its status."""

    name: str
    phase: str = "Pending"
    created: datetime | None = None
    start_time: datetime | None = None
    deleting: bool = False
    index: int | None = None
    unschedulable: str | None = None
    waiting_reason: str | None = None
    waiting_message: str | None = None
    terminated: Terminated | None = None
    disruption: str | None = None
    disruption_message: str | None = None
    waiting_since: datetime | None = None  # when the operator first saw an image-pull error


@dataclass(frozen=True)
class JobView:
    """The parts of a batch/v1 Job that matter for its owner's status."""

    name: str
    uid: str
    suspended: bool = False
    active: int = 0
    ready: int = 0
    succeeded: int = 0
    failed: int = 0
    completions: int = 1
    start_time: datetime | None = None
    completion_time: datetime | None = None
    complete: bool = False
    failed_reason: str | None = None
    failed_message: str | None = None
    spec_hash: str | None = None
    deleting: bool = False


def _condition(conditions: Any, kind: str) -> dict[str, Any] | None:
    for cond in conditions or []:
        if isinstance(cond, dict) and cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def job_view(job: dict[str, Any]) -> JobView:
    """Summarize a batch/v1 Job object (a dict as the API returns it)."""
    meta = job.get("metadata") or {}
    spec = job.get("spec") or {}
    status = job.get("status") or {}
    conditions = status.get("conditions")
    failed = _condition(conditions, "Failed")
    return JobView(
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        suspended=bool(spec.get("suspend")),
        active=int(status.get("active") or 0),
        ready=int(status.get("ready") or 0),
        succeeded=int(status.get("succeeded") or 0),
        failed=int(status.get("failed") or 0),
        completions=int(spec.get("completions") or 1),
        start_time=parse_time(status.get("startTime")),
        completion_time=parse_time(status.get("completionTime")),
        complete=_condition(conditions, "Complete") is not None,
        failed_reason=(failed.get("reason") or "Failed") if failed else None,
        failed_message=failed.get("message") if failed else None,
        spec_hash=(meta.get("annotations") or {}).get(SPEC_HASH_ANNOTATION),
        deleting=bool(meta.get("deletionTimestamp")),
    )


def _container_status(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == CONTAINER:
            return dict(status)
    return dict(statuses[0]) if statuses else {}


def pod_view(pod: dict[str, Any]) -> PodView:
    """Summarize a Pod of a run (a dict as the API returns it)."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    container = _container_status(pod)
    state = container.get("state") or {}
    waiting = state.get("waiting") or {}
    term = state.get("terminated")
    terminated = (
        Terminated(
            exit_code=int(term.get("exitCode", 0)),
            reason=term.get("reason"),
            message=term.get("message"),
            finished_at=parse_time(term.get("finishedAt")),
        )
        if isinstance(term, dict)
        else None
    )
    scheduled = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), None
    )
    unschedulable = (
        scheduled.get("message") or "no node fits the pod"
        if scheduled
        and scheduled.get("status") == "False"
        and scheduled.get("reason") == "Unschedulable"
        else None
    )
    disruption = _condition(status.get("conditions"), "DisruptionTarget")
    disruption_reason = disruption.get("reason") if disruption else None
    disruption_message = disruption.get("message") if disruption else None
    if disruption_reason is None and status.get("reason") == "Evicted":
        disruption_reason, disruption_message = "Evicted", status.get("message")
    index = (meta.get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION)
    return PodView(
        name=meta.get("name", ""),
        phase=status.get("phase") or "Pending",
        created=parse_time(meta.get("creationTimestamp")),
        start_time=parse_time(status.get("startTime")),
        deleting=bool(meta.get("deletionTimestamp")),
        index=int(index) if isinstance(index, str) and index.isdigit() else None,
        unschedulable=unschedulable,
        waiting_reason=waiting.get("reason"),
        waiting_message=waiting.get("message"),
        terminated=terminated,
        disruption=disruption_reason,
        disruption_message=disruption_message,
    )


def read_result(message: str | None) -> RunResult | None:
    """The runtime's RunResult from a termination message; None when absent or not ours.

    With ``terminationMessagePolicy: FallbackToLogsOnError`` a crash leaves log lines there
    instead, so anything that is not a RunResult JSON object is ignored.
    """
    if not message:
        return None
    text = message.strip()
    if text.startswith("KUBETUNE_RESULT "):
        text = text[len("KUBETUNE_RESULT ") :]
    try:
        data = json.loads(text)
        return RunResult.model_validate(data)
    except ValueError:
        return None


@dataclass(frozen=True)
class Assessment:
    """The verdict on one run: what the summary condition and ``Running`` should say.

    ``phase`` is Pending (nothing running yet, or waiting), Running, Succeeded or Failed;
    ``reason`` is a CamelCase token and ``message`` one sentence. ``result`` is the runtime's
    result when the run finished with one. ``stop_job`` asks the caller to delete the Job
    (a failure that Kubernetes itself would wait on forever, e.g. an image that never pulls).
    """

    phase: Phase
    reason: str
    message: str
    result: RunResult | None = None
    stop_job: bool = False
    suspended: bool = False
    queued: bool = False
    disruptions: tuple[str, ...] = field(default_factory=tuple)
    confirm_pods: bool = False


def _last_failure(pods: list[PodView]) -> PodView | None:
    failed = [p for p in pods if p.terminated is not None and p.terminated.exit_code != 0]
    if not failed:
        return None
    epoch = datetime.min.replace(tzinfo=UTC)
    # Timestamps have one-second precision: creation order breaks ties (pods are listed in
    # any order, so compare creation times too, then names, which are unique).
    return max(
        failed,
        key=lambda p: (
            (p.terminated.finished_at if p.terminated else None) or epoch,
            p.created or epoch,
            p.name,
        ),
    )


def _lead_pod(pods: list[PodView]) -> PodView | None:
    """The pod whose termination message carries the result: index 0, else the newest."""
    done = [p for p in pods if p.terminated is not None and p.terminated.exit_code == 0]
    for pod in done:
        if pod.index in (None, 0):
            return pod
    return done[0] if done else None


def _disruption_reason(pod: PodView) -> str:
    return "Preempted" if pod.disruption == "PreemptionByScheduler" else "Evicted"


FINISHING = Assessment(
    "Running",
    "Finishing",
    "the Job finished; reading its pods' results",
    confirm_pods=True,
)


def _failure(
    job: JobView, pods: list[PodView], backoff_limit: int, *, pods_confirmed: bool
) -> Assessment:
    last = _last_failure(pods)
    term = last.terminated if last else None
    if term is None and job.failed_reason != "DeadlineExceeded" and not pods_confirmed:
        return FINISHING  # the pods' watch may lag the Job's: look before judging
    if job.failed_reason == "DeadlineExceeded":
        return Assessment(
            "Failed",
            "DeadlineExceeded",
            "the run exceeded spec.activeDeadlineSeconds and was stopped"
            + (f" ({job.failed_message})" if job.failed_message else ""),
        )
    if term is not None and (
        term.reason == "OOMKilled" or (term.exit_code == 137 and term.reason == "OOMKilled")
    ):
        return Assessment(
            "Failed",
            "OOMKilled",
            f"pod {last.name if last else '?'} was killed for exceeding its memory limit "
            "(exit 137); raise spec.resources.memory or lower the batch size or sequence length",
        )
    result = read_result(term.message) if term else None
    if result is not None and result.reason in RUNTIME_FAILURE_REASONS:
        message = result.message or result.reason
        if job.failed_reason == "BackoffLimitExceeded":
            attempts = backoff_limit + 1
            message = f"{message} (gave up after {attempts} attempts: backoffLimit {backoff_limit})"
        return Assessment("Failed", result.reason, message, result=result)
    if job.failed_reason == "BackoffLimitExceeded":
        detail = (
            f"; the last pod {last.name} exited with code {term.exit_code}"
            + (f" ({term.reason})" if term.reason and term.reason != "Error" else "")
            if last and term
            else ""
        )
        return Assessment(
            "Failed",
            "BackoffLimitExceeded",
            f"the run failed {backoff_limit + 1} times and spec.backoffLimit is {backoff_limit}"
            + detail,
        )
    reason = job.failed_reason or "Failed"
    return Assessment("Failed", reason, job.failed_message or f"the Job failed ({reason})")


def assess(  # noqa: PLR0911 - one return per verdict, in priority order
    job: JobView,
    pods: list[PodView],
    *,
    now: datetime,
    image_pull_grace_seconds: float,
    backoff_limit: int,
    queued: bool = False,
    pods_confirmed: bool = False,
) -> Assessment:
    """The verdict on a run from its Job and Pods.

    Args:
        job: the run's batch Job.
        pods: its Pods (any order; deleted ones may be included).
        now: the current time (aware).
        image_pull_grace_seconds: how long a pod may fail to pull its image before the run
            fails with ``ImagePullFailed`` instead of waiting forever, counted from when the
            failure was first seen (``PodView.waiting_since``; the pod's start if unknown).
        backoff_limit: the spec's retry budget (for messages).
        queued: the Job waits for Kueue admission (its suspension is Kueue's, not the user's).
        pods_confirmed: ``pods`` were just listed from the API server, not from the watch
            cache. Without it, a finished Job whose pods show no result yet gives a
            ``Finishing`` verdict with ``confirm_pods`` set: the Job's and the Pods' watches
            are not ordered, and a finished run's verdict is final.
    """
    if job.complete:
        lead = _lead_pod(pods)
        result = read_result(lead.terminated.message) if lead and lead.terminated else None
        if (result is None or result.status != "Succeeded") and not pods_confirmed:
            return FINISHING
        if result is None or result.status != "Succeeded":
            return Assessment(
                "Failed",
                "ResultMissing",
                "the Job completed but its pod left no readable result in the termination "
                "message, so the artifact is unknown",
            )
        return Assessment(
            "Succeeded", "Succeeded", result.message or "the run succeeded", result=result
        )
    if job.failed_reason is not None:
        return _failure(job, pods, backoff_limit, pods_confirmed=pods_confirmed)
    live = [
        p
        for p in pods
        if not p.deleting and p.terminated is None and p.phase in ("Pending", "Running")
    ]
    disrupted = tuple(
        f"{_disruption_reason(p)}: pod {p.name}"
        + (f" ({p.disruption_message})" if p.disruption_message else "")
        for p in pods
        if p.disruption
    )
    if job.suspended:
        if queued:
            return Assessment(
                "Pending",
                "Queued",
                "waiting for Kueue to admit the Job",
                queued=True,
                disruptions=disrupted,
            )
        return Assessment(
            "Pending", "Suspended", "the run is suspended (spec.suspend)", suspended=True
        )
    for pod in live:
        if pod.waiting_reason == "InvalidImageName" or (
            pod.waiting_reason in IMAGE_PULL_REASONS
            and (now - (pod.waiting_since or pod.start_time or pod.created or now)).total_seconds()
            >= image_pull_grace_seconds
        ):
            return Assessment(
                "Failed",
                "ImagePullFailed",
                f"pod {pod.name} cannot pull its image ({pod.waiting_reason}: "
                f"{pod.waiting_message or 'no detail'}); check spec.image and imagePullSecrets",
                stop_job=True,
            )
    running = [p for p in live if p.phase == "Running"]
    attempt = f" (attempt {job.failed + 1} of {backoff_limit + 1})" if job.failed else ""
    if running and len(running) >= job.completions - job.succeeded:
        return Assessment(
            "Running",
            "Running",
            f"{len(running)} of {job.completions} pods running{attempt}",
            disruptions=disrupted,
        )
    for pod in live:
        if pod.waiting_reason in IMAGE_PULL_REASONS:
            return Assessment(
                "Pending",
                "ImagePullBackOff",
                f"pod {pod.name} is retrying its image pull "
                f"({pod.waiting_message or pod.waiting_reason})",
                disruptions=disrupted,
            )
        if pod.unschedulable:
            return Assessment(
                "Pending",
                "Unschedulable",
                f"pod {pod.name} cannot be scheduled: {pod.unschedulable}",
                disruptions=disrupted,
            )
    if disrupted and not running:
        last = [p for p in pods if p.disruption][-1]
        reason = _disruption_reason(last)
        return Assessment(
            "Pending",
            reason,
            f"pod {last.name} was {'preempted' if reason == 'Preempted' else 'evicted'}; "
            "Kubernetes retries it without counting against spec.backoffLimit",
            disruptions=disrupted,
        )
    last_failed = _last_failure(pods)
    if last_failed is not None and job.failed:
        term = last_failed.terminated
        return Assessment(
            "Running" if running else "Pending",
            "Retrying",
            f"attempt {job.failed + 1} of {backoff_limit + 1}: pod {last_failed.name} exited with "
            f"code {term.exit_code if term else '?'}",
            disruptions=disrupted,
        )
    if running:
        return Assessment(
            "Running",
            "Running",
            f"{len(running)} of {job.completions} pods running",
            disruptions=disrupted,
        )
    return Assessment("Pending", "Pending", PENDING_MESSAGE, disruptions=disrupted)
