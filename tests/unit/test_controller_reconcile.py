"""The operator's pure core: Job/Pod views -> verdict, and (spec, children, status) -> plan.

These run without any API server; the end-to-end behaviour (the same rules driven through
kopf, the API emulator and the kubelet harness) is in tests/integration/test_operator*.py.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_operator.controller import desired
from kubetune_operator.controller.conditions import find
from kubetune_operator.controller.observe import (
    JobView,
    PodView,
    Terminated,
    assess,
    job_view,
    pod_view,
    read_result,
)
from kubetune_operator.controller.reconcile import (
    Desire,
    Observed,
    Plan,
    evaluation_status,
    plan_run,
    spec_hash,
)
from kubetune_operator.manifests.common import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
UID = "0f9e8d7c-1111-2222-3333-444455556666"
DIGEST = "sha256:" + "cd" * 32
SETTINGS = OperatorSettings(progress_base_url="http://kubetune-operator.kubetune:8080/progress")
GRACE = 300.0


def body(**spec_changes: Any) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "examples/finetunejob-lora-gsm8k.yaml").read_text())
    doc["metadata"].update(uid=UID, namespace="team-a", generation=1)
    doc["spec"].update(spec_changes)
    return doc


def desire_of(doc: dict[str, Any]) -> Desire:
    model = desired.parse(doc)
    assert not isinstance(model, desired.ManifestInvalid), model
    return desired.finetune_desire(doc, model, SETTINGS)  # type: ignore[arg-type]


def plan(
    doc: dict[str, Any],
    status: dict[str, Any],
    jobs: tuple[JobView, ...] = (),
    pods: tuple[PodView, ...] = (),
    *,
    now: datetime = NOW,
    missing: bool = False,
    pods_confirmed: bool = True,
) -> Plan:
    return plan_run(
        "FineTuneJob",
        generation=doc["metadata"]["generation"],
        old_status=status,
        desire=desire_of(doc),
        observed=Observed(jobs=jobs, pods=pods, job_missing=missing, pods_confirmed=pods_confirmed),
        now=now,
        image_pull_grace_seconds=GRACE,
    )


def job_for(doc: dict[str, Any], **fields: Any) -> JobView:
    d = desire_of(doc)
    return JobView(name=d.job_name, uid="job-uid", spec_hash=d.spec_hash, **fields)


def result_message(**fields: Any) -> str:
    return json.dumps({"status": "Succeeded", "reason": "TrainingSucceeded", **fields})


def cond(status: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    found = find((status or {}).get("conditions"), kind)
    assert found is not None, f"no {kind} condition in {status}"
    return found


# ---------------------------------------------------------------------------- views


def test_views_read_the_fields_the_status_depends_on() -> None:
    job = job_view(
        {
            "metadata": {"name": "j", "uid": "u", "annotations": {"kubetune.io/spec-hash": "h"}},
            "spec": {"suspend": False, "completions": 2},
            "status": {
                "active": 1,
                "failed": 1,
                "startTime": "2026-11-29T11:00:00Z",
                "conditions": [
                    {"type": "Failed", "status": "True", "reason": "DeadlineExceeded"},
                    {"type": "Complete", "status": "False"},
                ],
            },
        }
    )
    assert (job.completions, job.failed_reason, job.complete, job.spec_hash) == (
        2,
        "DeadlineExceeded",
        False,
        "h",
    )
    assert job.start_time == datetime(2026, 11, 29, 11, tzinfo=UTC)
    pod = pod_view(
        {
            "metadata": {
                "name": "p",
                "annotations": {"batch.kubernetes.io/job-completion-index": "1"},
            },
            "status": {
                "phase": "Failed",
                "conditions": [
                    {
                        "type": "DisruptionTarget",
                        "status": "True",
                        "reason": "PreemptionByScheduler",
                    }
                ],
                "containerStatuses": [
                    {"name": "sidecar", "state": {"running": {}}},
                    {
                        "name": "runtime",
                        "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
                    },
                ],
            },
        }
    )
    assert pod.index == 1
    assert pod.disruption == "PreemptionByScheduler"
    assert pod.terminated == Terminated(exit_code=137, reason="OOMKilled")


def test_read_result_ignores_log_lines_left_by_fallback_to_logs_on_error() -> None:
    assert read_result("Traceback (most recent call last):\n  boom") is None
    assert read_result("") is None
    parsed = read_result(result_message(message="published s3://b/a"))
    assert parsed is not None
    assert parsed.message == "published s3://b/a"


# ---------------------------------------------------------------------------- verdicts


def verdict(
    job: JobView, *pods: PodView, now: datetime = NOW, queued: bool = False
) -> tuple[str, str]:
    a = assess(
        job,
        list(pods),
        now=now,
        image_pull_grace_seconds=GRACE,
        backoff_limit=2,
        queued=queued,
        pods_confirmed=True,
    )
    return a.phase, a.reason


BASE = JobView(name="j", uid="u", start_time=NOW - timedelta(minutes=5))


@pytest.mark.parametrize(
    ("job", "pods", "expected"),
    [
        (replace(BASE, failed_reason="DeadlineExceeded"), [], ("Failed", "DeadlineExceeded")),
        (
            replace(BASE, failed_reason="BackoffLimitExceeded", failed=3),
            [PodView("p", "Failed", terminated=Terminated(137, "OOMKilled"))],
            ("Failed", "OOMKilled"),
        ),
        (
            replace(BASE, failed_reason="PodFailurePolicy", failed=1),
            [
                PodView(
                    "p",
                    "Failed",
                    terminated=Terminated(
                        3,
                        "Error",
                        json.dumps(
                            {"status": "Failed", "reason": "DataInvalid", "message": "row 7"}
                        ),
                    ),
                )
            ],
            ("Failed", "DataInvalid"),
        ),
        (
            replace(BASE, failed_reason="BackoffLimitExceeded", failed=3),
            [
                PodView(
                    "p",
                    "Failed",
                    terminated=Terminated(
                        1,
                        "Error",
                        json.dumps(
                            {"status": "Failed", "reason": "TrainingFailed", "message": "nan"}
                        ),
                    ),
                )
            ],
            ("Failed", "TrainingFailed"),
        ),
        (
            replace(BASE, failed_reason="BackoffLimitExceeded", failed=3),
            [PodView("p", "Failed", terminated=Terminated(139, "Error", "Segmentation fault"))],
            ("Failed", "BackoffLimitExceeded"),
        ),
        (
            replace(BASE, complete=True),
            [PodView("p", "Succeeded", terminated=Terminated(0, "Completed", "garbage"))],
            ("Failed", "ResultMissing"),
        ),
        (
            replace(BASE, complete=True),
            [PodView("p", "Succeeded", terminated=Terminated(0, "Completed", result_message()))],
            ("Succeeded", "Succeeded"),
        ),
        (
            BASE,
            [PodView("p", "Pending", unschedulable="0/3 nodes are available")],
            ("Pending", "Unschedulable"),
        ),
        (
            BASE,
            [
                PodView(
                    "p",
                    "Pending",
                    start_time=NOW - timedelta(seconds=60),
                    waiting_reason="ImagePullBackOff",
                )
            ],
            ("Pending", "ImagePullBackOff"),
        ),
        (
            BASE,
            [
                PodView(
                    "p",
                    "Pending",
                    start_time=NOW - timedelta(seconds=301),
                    waiting_reason="ErrImagePull",
                )
            ],
            ("Failed", "ImagePullFailed"),
        ),
        (
            BASE,
            [PodView("p", "Pending", start_time=NOW, waiting_reason="InvalidImageName")],
            ("Failed", "ImagePullFailed"),
        ),
        (
            BASE,
            [
                PodView(
                    "p", "Failed", disruption="EvictionByEvictionAPI", terminated=Terminated(137)
                )
            ],
            ("Pending", "Evicted"),
        ),
        (
            BASE,
            [
                PodView(
                    "p", "Failed", disruption="PreemptionByScheduler", terminated=Terminated(137)
                )
            ],
            ("Pending", "Preempted"),
        ),
        (
            replace(BASE, failed=1, active=1),
            [PodView("a", "Failed", terminated=Terminated(1)), PodView("b", "Running")],
            ("Running", "Running"),
        ),
        (replace(BASE, active=1), [PodView("p", "Running")], ("Running", "Running")),
        (replace(BASE, suspended=True), [], ("Pending", "Suspended")),
    ],
)
def test_failure_taxonomy(job: JobView, pods: list[PodView], expected: tuple[str, str]) -> None:
    assert verdict(job, *pods) == expected


def test_queued_job_is_not_reported_as_suspended() -> None:
    a = assess(
        replace(BASE, suspended=True),
        [],
        now=NOW,
        image_pull_grace_seconds=GRACE,
        backoff_limit=2,
        queued=True,
    )
    assert (a.reason, a.queued, a.suspended) == ("Queued", True, False)


def test_image_pull_failure_asks_to_stop_the_job_and_names_the_pod() -> None:
    a = assess(
        BASE,
        [
            PodView(
                "p-1",
                "Pending",
                start_time=NOW - timedelta(hours=1),
                waiting_reason="ImagePullBackOff",
                waiting_message='Back-off pulling image "x"',
            )
        ],
        now=NOW,
        image_pull_grace_seconds=GRACE,
        backoff_limit=2,
    )
    assert a.stop_job
    assert "p-1" in a.message
    assert 'pulling image "x"' in a.message


# ---------------------------------------------------------------------------- plans


def test_new_job_creates_children_records_the_job_and_is_idempotent() -> None:
    doc = body()
    first = plan(doc, {})
    kinds = [o["kind"] for o in first.create]
    assert kinds == ["ConfigMap", "Job"]
    assert first.progress_secret == f"{doc['metadata']['name']}-progress"
    job = next(o for o in first.create if o["kind"] == "Job")
    assert job["metadata"]["annotations"]["kubetune.io/spec-hash"] == spec_hash(doc["spec"])
    status = first.status
    assert status is not None
    assert status["jobName"] == job["metadata"]["name"]
    assert status["observedGeneration"] == 1
    assert cond(status, "Succeeded")["status"] == "Unknown"
    assert [e.reason for e in first.events] == ["Created"]
    assert cond(status, "Succeeded")["reason"] == "Pending"
    # The Job now exists, no pods yet: the status already says so, nothing to write.
    seen = (job_for(doc),)
    assert plan(doc, status, seen).empty
    running = plan(
        doc, status, (job_for(doc, active=1, start_time=NOW),), (PodView("p", "Running"),)
    )
    assert running.status is not None
    assert [e.reason for e in running.events] == ["Started"]
    assert plan(
        doc, running.status, (job_for(doc, active=1, start_time=NOW),), (PodView("p", "Running"),)
    ).empty


def test_last_transition_time_moves_only_when_the_status_changes() -> None:
    doc = body()
    status = plan(doc, {}).status
    assert status is not None
    later = NOW + timedelta(minutes=3)
    pending = plan(doc, status, (job_for(doc, start_time=later),), now=later).status
    assert pending is not None
    assert (
        cond(pending, "Succeeded")["lastTransitionTime"]
        == cond(status, "Succeeded")["lastTransitionTime"]
    )
    running = plan(
        doc,
        pending,
        (job_for(doc, active=1, start_time=later),),
        (PodView("p", "Running"),),
        now=later,
    ).status
    assert running is not None
    assert cond(running, "Running")["status"] == "True"
    assert cond(running, "Running")["lastTransitionTime"] == "2026-11-29T12:03:00Z"
    assert (
        cond(running, "Succeeded")["lastTransitionTime"]
        == cond(status, "Succeeded")["lastTransitionTime"]
    )


def test_success_copies_artifact_and_metrics_from_the_termination_message() -> None:
    doc = body()
    status = plan(doc, {}).status
    artifact = {
        "uri": "s3://bucket/runs/gsm8k/adapter",
        "digest": DIGEST,
        "sizeBytes": 1234,
        "baseModel": "hf://x/y",
        "peftType": "LORA",
        "rank": 16,
        "targetModules": ["q_proj"],
        "unknownKey": 1,
    }
    message = result_message(message="published", artifact=artifact, metrics={"trainLoss": 1.5})
    job = job_for(doc, complete=True, succeeded=1, completion_time=NOW)
    pod = PodView("p", "Succeeded", terminated=Terminated(0, "Completed", message))
    done = plan(doc, status or {}, (job,), (pod,)).status
    assert done is not None
    assert done["artifact"]["digest"] == DIGEST
    assert "unknownKey" not in done["artifact"]
    assert done["metrics"] == {"trainLoss": 1.5}
    assert cond(done, "Succeeded")["status"] == "True"
    assert done["completionTime"] == "2026-11-29T12:00:00Z"


def test_a_recorded_job_that_vanished_is_confirmed_then_fails_the_run_without_a_rerun() -> None:
    doc = body()
    status = plan(doc, {}).status or {}
    first = plan(doc, status)  # caches show no Job, status says one was created
    assert first.confirm_missing == status["jobName"]
    assert not first.create
    failed = plan(doc, status, missing=True)
    assert not failed.create
    assert cond(failed.status, "Succeeded")["reason"] == "JobMissing"


def test_finished_run_never_runs_again_and_ttl_deletes_children_only() -> None:
    doc = body(ttlSecondsAfterFinished=60)
    job = job_for(doc, complete=True, succeeded=1, completion_time=NOW)
    pod = PodView("p", "Succeeded", terminated=Terminated(0, "Completed", result_message()))
    done = plan(doc, plan(doc, {}).status or {}, (job,), (pod,)).status or {}
    assert plan(doc, done, (job,), (pod,), now=NOW + timedelta(seconds=30)).empty
    expired = plan(doc, done, (job,), (pod,), now=NOW + timedelta(seconds=61))
    assert expired.cleanup
    assert not expired.create
    assert expired.status is None
    gone = plan(doc, done, now=NOW + timedelta(hours=1))  # children deleted: nothing to do
    assert gone.empty
    edited = body(ttlSecondsAfterFinished=60, backoffLimit=5)
    edited["metadata"]["generation"] = 2
    after_edit = plan(edited, done, now=NOW + timedelta(hours=1))
    assert not after_edit.create
    assert after_edit.status is not None
    assert cond(after_edit.status, "SpecApplied")["reason"] == "RunFinished"
    assert after_edit.status["observedGeneration"] == 2


def test_new_run_id_starts_a_new_run_and_removes_the_old_one() -> None:
    doc = body()
    old_job = job_for(doc, failed_reason="BackoffLimitExceeded", failed=3)
    failed = plan(doc, plan(doc, {}).status or {}, (old_job,)).status or {}
    assert cond(failed, "Succeeded")["status"] == "False"
    rerun = body(runId="second")
    rerun["metadata"]["generation"] = 2
    p = plan(rerun, failed, (old_job,))
    assert [o["kind"] for o in p.create] == ["ConfigMap", "Job"]
    assert p.delete_jobs == (old_job.name,)
    assert p.status is not None
    assert p.status["runId"] == "second"
    assert cond(p.status, "Succeeded")["status"] == "Unknown"


def test_spec_change_is_refused_for_a_started_run_and_applied_before_start() -> None:
    doc = body()
    status = plan(doc, {}).status or {}
    changed = body(backoffLimit=4)
    changed["metadata"]["generation"] = 2
    started = job_for(doc, active=1, start_time=NOW)
    p = plan(changed, status, (started,), (PodView("p", "Running"),))
    assert not p.delete_jobs
    assert not p.create
    assert cond(p.status, "SpecApplied")["status"] == "False"
    unstarted = job_for(doc, suspended=True)
    p = plan(changed, status, (unstarted,))
    assert p.delete_jobs == (unstarted.name,)
    assert p.status is not None
    assert "jobName" not in p.status


def test_suspend_is_applied_to_the_job_and_reported() -> None:
    doc = body(suspend=True)
    running = job_for(doc, active=1, start_time=NOW)
    p = plan(doc, plan(body(), {}).status or {}, (running,), (PodView("p", "Running"),))
    assert p.suspend_job is True
    suspended = plan(doc, p.status or {}, (replace(running, suspended=True, active=0),))
    assert cond(suspended.status, "Suspended")["status"] == "True"
    resumed = plan(body(), suspended.status or {}, (replace(running, suspended=True, active=0),))
    assert resumed.suspend_job is False


def test_invalid_spec_fails_without_children() -> None:
    doc = body()
    doc["spec"]["method"] = "sparse"
    model = desired.parse(doc)
    assert isinstance(model, desired.ManifestInvalid)
    d = desired.finetune_desire(doc, model, SETTINGS)
    p = plan_run(
        "FineTuneJob",
        generation=1,
        old_status={},
        desire=d,
        observed=Observed(),
        now=NOW,
        image_pull_grace_seconds=GRACE,
    )
    assert not p.create
    assert cond(p.status, "Succeeded")["reason"] == "InvalidSpec"
    assert "spec.method" in cond(p.status, "Succeeded")["message"]


def test_runtime_evaluation_summary_maps_onto_the_api_and_drops_extra_keys() -> None:
    mapped = evaluation_status(
        {
            "summary": [
                {
                    "suite": "gsm8k",
                    "metric": "exactMatch",
                    "candidate": 0.3,
                    "base": 0.2,
                    "delta": 0.1,
                    "n": 50,
                }
            ],
            "gates": [
                {"suite": "gsm8k", "metric": "exactMatch", "passed": True, "message": "0.3 >= 0.25"}
            ],
            "passed": True,
            "resultsUri": "s3://bucket/eval/results.jsonl",
            "adapterDigest": DIGEST,
            "truncated": True,
        }
    )
    assert mapped == {
        "summary": [
            {"suite": "gsm8k", "metric": "exactMatch", "candidate": 0.3, "base": 0.2, "delta": 0.1}
        ],
        "gates": [
            {"suite": "gsm8k", "metric": "exactMatch", "passed": True, "message": "0.3 >= 0.25"}
        ],
        "passed": True,
        "resultsUri": "s3://bucket/eval/results.jsonl",
    }


def test_a_spec_fixed_after_invalid_spec_starts_the_run() -> None:
    """InvalidSpec ends nothing that ran: fixing the spec (same runId) starts the run."""
    doc = body()
    doc["spec"]["method"] = "sparse"
    model = desired.parse(doc)
    assert isinstance(model, desired.ManifestInvalid)
    invalid = desired.finetune_desire(doc, model, SETTINGS)
    rejected = plan_run(
        "FineTuneJob",
        generation=1,
        old_status={},
        desire=invalid,
        observed=Observed(),
        now=NOW,
        image_pull_grace_seconds=GRACE,
    ).status
    assert rejected is not None
    fixed = body()
    fixed["metadata"]["generation"] = 2
    p = plan(fixed, rejected)
    assert [o["kind"] for o in p.create] == ["ConfigMap", "Job"]
    assert cond(p.status, "Succeeded")["status"] == "Unknown"


def test_a_finished_job_whose_pods_lag_is_confirmed_before_any_verdict() -> None:
    """The Job's and the Pods' watches are not ordered: never judge a finished run blind."""
    doc = body()
    status = plan(doc, {}).status or {}
    complete = job_for(doc, complete=True, succeeded=1, completion_time=NOW)
    still_running = PodView("p", "Running")
    blind = plan(doc, status, (complete,), (still_running,), pods_confirmed=False)
    assert blind == Plan(confirm_pods=complete.name)  # no status written, no Event
    listed = PodView("p", "Succeeded", terminated=Terminated(0, "Completed", result_message()))
    seen = plan(doc, status, (complete,), (listed,))
    assert cond(seen.status, "Succeeded")["status"] == "True"
    gone = plan(doc, status, (complete,), ())
    assert cond(gone.status, "Succeeded")["reason"] == "ResultMissing"
    failed = job_for(doc, failed_reason="PodFailurePolicy", failed=1)
    assert plan(doc, status, (failed,), (), pods_confirmed=False).confirm_pods == failed.name


def test_suspend_is_not_applied_to_a_queued_job() -> None:
    """Kueue unsuspends admitted Jobs: the operator must not fight it."""
    doc = body(suspend=True, scheduling={"queueName": "team-a"})
    status = plan(body(scheduling={"queueName": "team-a"}), {}).status or {}
    admitted = job_for(doc, active=1, start_time=NOW)
    p = plan(doc, status, (admitted,), (PodView("p", "Running"),))
    assert p.suspend_job is None
    assert cond(p.status, "SpecApplied")["reason"] == "QueueOwnsSuspension"


def test_image_pull_grace_counts_from_the_first_seen_error_not_the_pod_start() -> None:
    """A slow but working pull (long past the grace) then one transient error: keep waiting."""
    slow = PodView(
        "p",
        "Pending",
        start_time=NOW - timedelta(minutes=20),
        waiting_reason="ErrImagePull",
        waiting_since=NOW - timedelta(seconds=30),
    )
    assert verdict(BASE, slow) == ("Pending", "ImagePullBackOff")
    stuck = replace(slow, waiting_since=NOW - timedelta(seconds=GRACE + 1))
    assert verdict(BASE, stuck) == ("Failed", "ImagePullFailed")
