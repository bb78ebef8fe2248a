"""One reconcile per kind, as pure functions: (resource, observed children, now) -> Plan.

Nothing here talks to the API server. :func:`plan_run` decides, for a FineTuneJob or an
EvalJob, which children must exist, what to do with the run's Job and what the status must
say; :mod:`kubetune_operator.controller.kube` carries the plan out. Calling it twice with the
same inputs gives the same plan, and a plan for a settled run is empty (no writes).

Lifecycle rules (the run is identified by ``spec.runId``):

* children are created only for a run that has not started: a run whose Job was recorded in
  ``status.jobName`` and then vanished fails with ``JobMissing`` instead of silently running
  again, so neither an operator restart nor a deleted Job can start a second run;
* a finished run is final: spec edits never re-run it; a new ``spec.runId`` starts a new run;
* spec changes that cannot reach a started Job (a pod template is immutable) leave the run
  as it is and set ``SpecApplied=False``; before the Job has started (e.g. queued in Kueue)
  the Job is recreated with the new spec instead;
* ``ttlSecondsAfterFinished`` deletes the children, never the resource or its status.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import ValidationError

from kubetune_operator.api.evaluation import EvaluationResult, GateResult, MetricSummary
from kubetune_operator.api.finetunejob import Artifact, CheckpointRef
from kubetune_operator.controller.conditions import Desired, find, is_true, merge
from kubetune_operator.controller.observe import (
    SPEC_HASH_ANNOTATION,
    Assessment,
    JobView,
    PodView,
    assess,
    format_time,
    parse_time,
)
from kubetune_runtime.result import RunResult

# Spec fields that may change during a run: they are applied to it, not frozen with it.
MUTABLE_FIELDS = frozenset({"suspend", "ttlSecondsAfterFinished", "runId"})
TERMINAL = ("True", "False")
# Summary reasons that deserve a Warning Event, and those that deserve any Event at all.
WARNING_REASONS = frozenset(
    {"Unschedulable", "ImagePullBackOff", "Preempted", "Evicted", "Retrying", "InvalidSpec"}
)
NOTABLE_REASONS = WARNING_REASONS | {"Queued", "Suspended", "Recreating", "FineTuneJobNotFound"}
# Status fields that belong to one run and are cleared when a new run starts.
RUN_FIELDS = (
    "startTime",
    "completionTime",
    "progress",
    "artifact",
    "lastCheckpoint",
    "metrics",
    "evaluation",
    "summary",
    "gates",
    "passed",
    "resultsUri",
    "adapterUri",
    "adapterDigest",
)


@dataclass(frozen=True)
class EventSpec:
    """A Kubernetes Event to post about the resource (on transitions only)."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Plan:
    """What the API layer must do for one resource; empty fields mean nothing to do.

    Attributes:
        status: the complete new status, or None when it is unchanged.
        create: child objects to create when absent, in order.
        progress_secret: name of the Secret with the job's progress token to create when
            absent (the token is derived from the operator's key by the API layer, never here).
        delete_jobs: Jobs (and their same-named ConfigMaps) to delete, e.g. a run that can
            never pull its image or a previous run's Job.
        suspend_job: set the run Job's ``spec.suspend`` to this value.
        cleanup: delete the run's children (TTL after finishing); the resource itself stays,
            and so does the progress Secret (it goes with the resource).
        confirm_missing: name of a Job the caches do not show although status records it;
            the API layer must GET it and reconcile again with ``job_missing`` confirmed.
        confirm_pods: name of a finished Job whose pods the cache shows without a result;
            the API layer must list them and reconcile again with ``pods_confirmed``.
        events: Events to post.
    """

    status: dict[str, Any] | None = None
    create: tuple[dict[str, Any], ...] = ()
    progress_secret: str | None = None
    delete_jobs: tuple[str, ...] = ()
    suspend_job: bool | None = None
    cleanup: bool = False
    confirm_missing: str | None = None
    confirm_pods: str | None = None
    events: tuple[EventSpec, ...] = ()

    @property
    def empty(self) -> bool:
        """True when carrying the plan out would write nothing."""
        return self == Plan()


@dataclass(frozen=True)
class Observed:
    """The resource's children as the operator's caches show them.

    ``jobs`` are every Job the resource controls (any run); ``pods`` the pods of the current
    run's Job. ``job_missing`` is set after a direct GET confirmed a recorded Job is gone.
    """

    jobs: tuple[JobView, ...] = ()
    pods: tuple[PodView, ...] = ()
    job_missing: bool = False
    pods_confirmed: bool = False


@dataclass(frozen=True)
class Desire:
    """What the spec asks for, prepared by the kind-specific caller.

    ``children`` is None when the run cannot start yet; then ``waiting`` says why (a
    condition reason and message) and whether that is final (``waiting_failed``).
    """

    run_id: str
    job_name: str
    spec_hash: str
    suspend: bool
    queue: bool
    backoff_limit: int
    ttl_seconds: int | None
    children: tuple[dict[str, Any], ...] | None
    progress_secret: str | None = None
    waiting: tuple[str, str] | None = None
    waiting_failed: bool = False
    extra_status: dict[str, Any] = field(default_factory=dict)


def spec_hash(spec: dict[str, Any]) -> str:
    """sha256 (16 hex) of the spec without the fields a run may change while it runs."""
    kept = {k: v for k, v in spec.items() if k not in MUTABLE_FIELDS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def _fit(model: Any, data: Any) -> dict[str, Any] | None:
    """``data`` reduced to the fields ``model`` accepts, validated; None when it does not fit."""
    if not isinstance(data, dict):
        return None
    aliases = {f.alias or name for name, f in model.model_fields.items()}
    try:
        parsed = model.model_validate({k: v for k, v in data.items() if k in aliases})
    except ValidationError:
        return None
    dumped: dict[str, Any] = parsed.model_dump(by_alias=True, exclude_none=True, mode="json")
    return dumped


def evaluation_status(evaluation: dict[str, Any] | None) -> dict[str, Any] | None:
    """The runtime's evaluation summary mapped onto the API's EvaluationResult fields."""
    if not evaluation:
        return None
    data = {
        "summary": [
            r for r in (_fit(MetricSummary, x) for x in evaluation.get("summary") or []) if r
        ],
        "gates": [r for r in (_fit(GateResult, x) for x in evaluation.get("gates") or []) if r],
        "passed": evaluation.get("passed"),
        "resultsUri": evaluation.get("resultsUri"),
    }
    return _fit(EvaluationResult, {k: v for k, v in data.items() if v not in (None, [])})


def result_status(kind: str, result: RunResult | None) -> dict[str, Any]:
    """Status fields copied from the runtime's result (artifact, metrics, evaluation)."""
    if result is None:
        return {}
    out: dict[str, Any] = {}
    if kind == "FineTuneJob":
        if (artifact := _fit(Artifact, result.artifact)) is not None:
            out["artifact"] = artifact
        if result.metrics:
            out["metrics"] = dict(result.metrics)
        if (evaluation := evaluation_status(result.evaluation)) is not None:
            out["evaluation"] = evaluation
        if (checkpoint := _fit(CheckpointRef, result.checkpoint)) is not None:
            out["lastCheckpoint"] = checkpoint
    elif (evaluation := evaluation_status(result.evaluation)) is not None:
        out.update(evaluation)
    return out


def _events(old: list[dict[str, Any]] | None, new: list[dict[str, Any]]) -> tuple[EventSpec, ...]:
    """Events for transitions worth a line in ``kubectl describe``.

    The run finishing (Succeeded becomes True or False), the summary's reason turning into
    one that needs attention or explains a wait (:data:`NOTABLE_REASONS`), and the pods
    starting to run. Routine reasons (Pending) produce no Event.
    """
    events = []
    succeeded, prev = find(new, "Succeeded"), find(old, "Succeeded")
    if succeeded is not None:
        finished = succeeded["status"] in TERMINAL and (
            prev is None or prev["status"] != succeeded["status"]
        )
        notable = succeeded["reason"] in NOTABLE_REASONS and (
            prev is None or prev["reason"] != succeeded["reason"]
        )
        if finished or notable:
            warning = succeeded["status"] == "False" or succeeded["reason"] in WARNING_REASONS
            events.append(
                EventSpec(
                    "Warning" if warning else "Normal", succeeded["reason"], succeeded["message"]
                )
            )
    running, prev = find(new, "Running"), find(old, "Running")
    if running and running["status"] == "True" and (prev is None or prev["status"] != "True"):
        events.append(EventSpec("Normal", "Started", running["message"]))
    return tuple(events)


def _conditions(a: Assessment, desire: Desire, *, spec_applied: Desired | None) -> list[Desired]:
    summary = {"Succeeded": "True", "Failed": "False"}.get(a.phase, "Unknown")
    out = [
        Desired("Succeeded", summary, a.reason, a.message),
        Desired(
            "Running",
            "True" if a.phase == "Running" else "False",
            a.reason
            if a.phase in ("Running", "Pending")
            else ("Completed" if a.phase == "Succeeded" else "Failed"),
            a.message if a.phase in ("Running", "Pending") else "the run has finished",
        ),
        Desired(
            "Suspended",
            "True" if a.suspended else "False",
            "Suspended" if a.suspended else "NotSuspended",
            "the run is suspended (spec.suspend)" if a.suspended else "the run is not suspended",
        ),
    ]
    if desire.queue:
        out.append(
            Desired(
                "Queued",
                "True" if a.queued else "False",
                "WaitingForAdmission" if a.queued else "Admitted",
                "waiting for Kueue to admit the Job" if a.queued else "Kueue admitted the Job",
            )
        )
    if spec_applied is not None:
        out.append(spec_applied)
    return out


def _finish_status(
    status: dict[str, Any], old: dict[str, Any], generation: int | None
) -> dict[str, Any] | None:
    """``status`` with observedGeneration, or None when it equals ``old`` (nothing to write)."""
    if generation is not None:
        status["observedGeneration"] = generation
    return None if status == old else status


def _run_finished(conditions: list[dict[str, Any]] | None, status: dict[str, Any]) -> bool:
    """Whether the run is over for good.

    A spec rejected before anything ran (InvalidSpec, no Job recorded) is not a finished run:
    once the spec is fixed, the run starts.
    """
    summary = find(conditions, "Succeeded")
    if summary is None or summary["status"] not in TERMINAL:
        return False
    return not (summary["reason"] == "InvalidSpec" and not status.get("jobName"))


def plan_run(
    kind: str,
    *,
    generation: int | None,
    old_status: dict[str, Any],
    desire: Desire,
    observed: Observed,
    now: datetime,
    image_pull_grace_seconds: float,
) -> Plan:
    """The plan for one FineTuneJob or EvalJob run.

    Args:
        kind: "FineTuneJob" or "EvalJob" (selects which result fields go to status).
        generation: the resource's ``metadata.generation``.
        old_status: the freshest known status (what the operator last wrote, else the body's).
        desire: the spec's wishes for this run, see :class:`Desire`.
        observed: the children seen in the caches.
        now: current time (aware).
        image_pull_grace_seconds: see :func:`~kubetune_operator.controller.observe.assess`.

    Returns:
        A :class:`Plan`; ``Plan().empty`` when everything is as it should be.
    """
    old_conditions = old_status.get("conditions")
    same_run = (old_status.get("runId") or "") == desire.run_id and bool(
        old_status.get("conditions")
    )
    base: dict[str, Any] = (
        dict(old_status)
        if same_run
        else {k: v for k, v in old_status.items() if k not in RUN_FIELDS and k != "conditions"}
    )
    if not same_run:
        old_conditions = None
    status = {**base, **({"runId": desire.run_id} if desire.run_id else {})}
    if not desire.run_id:
        status.pop("runId", None)
    run_job = next((j for j in observed.jobs if j.name == desire.job_name), None)
    stale = tuple(j.name for j in observed.jobs if j.name != desire.job_name and not j.deleting)
    finished = _run_finished(old_conditions, status)

    def apply(status: dict[str, Any], a: Assessment, applied: Desired | None) -> Plan:
        return _apply(
            kind,
            status=status,
            old_status=old_status,
            old_conditions=old_conditions,
            a=a,
            desire=desire,
            applied=applied,
            stale=stale,
            generation=generation,
            now=now,
        )

    if finished:
        return _plan_finished(
            status=status,
            old_status=old_status,
            old_conditions=old_conditions,
            desire=desire,
            run_job=run_job,
            stale=stale,
            generation=generation,
            now=now,
        )

    if run_job is None:
        if status.get("jobName") == desire.job_name and same_run:
            if not observed.job_missing:
                return Plan(confirm_missing=desire.job_name)
            a = Assessment(
                "Failed",
                "JobMissing",
                f"Job {desire.job_name} was deleted outside the operator before the run "
                "finished; set a new spec.runId to run again",
            )
            return apply(status, a, None)
        if desire.children is None:
            reason, message = desire.waiting or ("Pending", "waiting")
            a = Assessment("Failed" if desire.waiting_failed else "Pending", reason, message)
            status.pop("jobName", None)
            return apply(status, a, None)
        # The verdict on the Job about to exist, so the next reconcile finds nothing to write.
        a = assess(
            JobView(name=desire.job_name, uid="", suspended=desire.suspend or desire.queue),
            [],
            now=now,
            image_pull_grace_seconds=image_pull_grace_seconds,
            backoff_limit=desire.backoff_limit,
            queued=desire.queue,
        )
        status["jobName"] = desire.job_name
        status.update(desire.extra_status)
        applied = Desired("SpecApplied", "True", "Applied", "the run uses the current spec")
        plan = apply(status, a, applied)
        created = EventSpec("Normal", "Created", f"created Job {desire.job_name}")
        return Plan(
            status=plan.status,
            create=desire.children,
            progress_secret=desire.progress_secret,
            delete_jobs=plan.delete_jobs,
            events=(created, *plan.events),
        )

    if run_job.deleting:
        return Plan()  # wait until it is gone
    started = (
        run_job.start_time is not None or run_job.active or run_job.failed or run_job.succeeded
    )
    if run_job.spec_hash != desire.spec_hash and not started:
        # Nothing ran yet (e.g. still queued): apply the new spec by recreating the Job.
        status.pop("jobName", None)
        a = Assessment(
            "Pending", "Recreating", "the spec changed before the run started; recreating its Job"
        )
        plan = apply(status, a, None)
        return Plan(status=plan.status, delete_jobs=(run_job.name, *stale), events=plan.events)
    a = assess(
        run_job,
        list(observed.pods),
        now=now,
        image_pull_grace_seconds=image_pull_grace_seconds,
        backoff_limit=desire.backoff_limit,
        queued=desire.queue,
        pods_confirmed=observed.pods_confirmed,
    )
    if a.confirm_pods:
        return Plan(confirm_pods=run_job.name)
    applied = (
        Desired("SpecApplied", "True", "Applied", "the run uses the current spec")
        if run_job.spec_hash == desire.spec_hash
        else Desired(
            "SpecApplied",
            "False",
            "RunInProgress",
            "the spec changed after the run started and a running Job cannot take the change; "
            "it applies to the next run (set a new spec.runId)",
        )
    )
    status["jobName"] = run_job.name  # adopts a Job whose creation status never recorded
    status.update(desire.extra_status)
    if desire.queue and desire.suspend and a.phase not in ("Succeeded", "Failed"):
        applied = Desired(
            "SpecApplied",
            "False",
            "QueueOwnsSuspension",
            "spec.suspend is not applied to a job in a Kueue queue (Kueue suspends and admits "
            "it); deactivate its Workload instead: kubectl patch workload <name> --type merge "
            '-p \'{"spec":{"active":false}}\'',
        )
    if run_job.start_time is not None:
        status["startTime"] = format_time(run_job.start_time)
    if a.phase in ("Succeeded", "Failed"):
        status["completionTime"] = format_time(run_job.completion_time or now)
        status.update(result_status(kind, a.result))
    plan = apply(status, a, applied)
    return Plan(
        status=plan.status,
        delete_jobs=((run_job.name,) if a.stop_job else ()) + plan.delete_jobs,
        suspend_job=_suspend_change(a, desire, run_job),
        events=plan.events,
    )


def _suspend_change(a: Assessment, desire: Desire, run_job: JobView) -> bool | None:
    """The Job's new ``spec.suspend``, or None to leave it.

    With a queue, Kueue owns the Job's suspension (it unsuspends admitted Jobs): the operator
    never toggles it, or the two would fight (SpecApplied says so instead).
    """
    if a.phase in ("Succeeded", "Failed") or desire.queue:
        return None
    if desire.suspend and not run_job.suspended:
        return True
    if not desire.suspend and run_job.suspended:
        return False
    return None


def _apply(
    kind: str,
    *,
    status: dict[str, Any],
    old_status: dict[str, Any],
    old_conditions: list[dict[str, Any]] | None,
    a: Assessment,
    desire: Desire,
    applied: Desired | None,
    stale: tuple[str, ...],
    generation: int | None,
    now: datetime,
) -> Plan:
    if applied is None and (prev := find(old_conditions, "SpecApplied")) is not None:
        applied = Desired("SpecApplied", prev["status"], prev["reason"], prev["message"])
    if kind == "EvalJob" and a.phase == "Succeeded":
        passed = status.get("passed")
        extra = Desired(
            "Passed",
            "True" if passed is not False else "False",
            "GatesPassed" if passed is not False else "GatesFailed",
            "every gate passed" if passed is not False else "at least one gate failed",
        )
    else:
        extra = None
    conditions = merge(
        old_conditions,
        [*_conditions(a, desire, spec_applied=applied), *([extra] if extra else [])],
        generation=generation,
        now=now,
    )
    if a.phase == "Failed" and "completionTime" not in status:
        status["completionTime"] = format_time(now)
    status["conditions"] = conditions
    new = _finish_status(status, old_status, generation)
    events = _events(old_conditions, conditions)
    return Plan(status=new, delete_jobs=stale, events=events)


def _plan_finished(
    *,
    status: dict[str, Any],
    old_status: dict[str, Any],
    old_conditions: list[dict[str, Any]] | None,
    desire: Desire,
    run_job: JobView | None,
    stale: tuple[str, ...],
    generation: int | None,
    now: datetime,
) -> Plan:
    """A finished run: never run again; apply the TTL; say whether later edits took effect."""
    prev_applied = find(old_conditions, "SpecApplied")
    if run_job is not None and run_job.spec_hash is not None:
        current = run_job.spec_hash == desire.spec_hash
    else:  # the Job is gone (TTL): any later generation is an edit the run never saw
        current = prev_applied is None or (
            prev_applied["status"] == "True" and old_status.get("observedGeneration") == generation
        )
    applied = (
        Desired("SpecApplied", "True", "Applied", "the run uses the current spec")
        if current
        else Desired(
            "SpecApplied",
            "False",
            "RunFinished",
            "the spec changed after the run finished; a finished run never runs again, set a "
            "new spec.runId to start one",
        )
    )
    kept = [
        Desired(c["type"], c["status"], c["reason"], c["message"])
        for c in old_conditions or []
        if c["type"] != "SpecApplied"
    ]
    conditions = merge(old_conditions, [*kept, applied], generation=generation, now=now)
    status["conditions"] = conditions
    new = _finish_status(status, old_status, generation)
    cleanup = False
    done = parse_time(status.get("completionTime"))
    if desire.ttl_seconds is not None and done is not None and run_job is not None:
        cleanup = now >= done + timedelta(seconds=desire.ttl_seconds)
    return Plan(status=new, cleanup=cleanup, delete_jobs=stale)


def is_finished(status: dict[str, Any] | None) -> bool:
    """Whether the status records a finished run (Succeeded is True or False)."""
    cond = find((status or {}).get("conditions"), "Succeeded")
    return cond is not None and cond.get("status") in TERMINAL


def succeeded(status: dict[str, Any] | None) -> bool:
    """Whether the status records a successful run."""
    return is_true((status or {}).get("conditions"), "Succeeded")


__all__ = [
    "SPEC_HASH_ANNOTATION",
    "Desire",
    "EventSpec",
    "Observed",
    "Plan",
    "is_finished",
    "plan_run",
    "spec_hash",
    "succeeded",
]
