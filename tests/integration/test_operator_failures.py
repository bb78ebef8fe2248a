"""The real operator against the API emulator and the kubelet harness: every failure reason.

Each test starts its own fake API server (``tests.support.kube_api.KubeApi``), the operator
exactly as ``kubetune operator`` runs it (``operator_support.operator``: resync 1 s, image pull
grace 2 s) and a scripted kubelet + Job controller (``tests.support.kubelet.Kubelet``), creates a
FineTuneJob and asserts what a user sees: the ``Succeeded`` summary condition (status, reason, a
message that explains it), the other conditions, the Job and its pods, Events, metrics and the
progress endpoint. Nothing is shared between tests; teardown stops every thread it started.

Where a test must see a short-lived state, it freezes the harness instead of racing it: a fake
harness clock (pods stay Running until the test moves the clock), or ``pause()`` called from the
behaviour chooser at the exact moment the Job controller creates the retry pod.
"""

from __future__ import annotations

import base64
import collections
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.operator_support import (
    FTJ,
    JOBS,
    PODS,
    OperatorThread,
    condition,
    jobs_of,
    operator,
    wait_condition,
    wait_for,
)
from tests.support.kube_api import KubeApi
from tests.support.kubelet import (
    Behaviour,
    BehaviourFn,
    Evict,
    Fail,
    Hang,
    ImagePullBackOff,
    Kubelet,
    OOMKill,
    Succeed,
    Unschedulable,
    by_attempt,
)
from tests.support.manifests import small_finetunejob

pytestmark = pytest.mark.integration

Obj = dict[str, Any]
NS = "team-a"
CONFIGMAPS = "v1/configmaps"
SECRETS = "v1/secrets"
OPERATOR_NS = "kubetune-system"  # the operator's own namespace, when a test sets one
EVENTS = "v1/events"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
TIMEOUT = 30.0  # generous for a loaded CI machine; each wait normally ends in well under 2 s
RESYNC = 1.0  # operator_support's resync period
DIGEST = "sha256:" + "3f" * 32
RESULT = {
    "status": "Succeeded",
    "reason": "TrainingSucceeded",
    "message": "published s3://models/x/adapter",
    "artifact": {"uri": "s3://models/x/adapter", "digest": DIGEST, "sizeBytes": 123},
    "metrics": {"trainLoss": 1.2},
}
SUCCESS = json.dumps(RESULT)
OPERATOR_THREADS = ("kubelet", "kubetune-operator", "kube-api")


def manifest(name: str, **spec: Any) -> Obj:
    """A small valid LoRA SFT FineTuneJob (the quickstart's shape) with ``spec`` overrides."""
    return small_finetunejob(name, NS, **spec)


def runtime_result(reason: str, message: str) -> str:
    """A failed run's termination message, as ``kubetune_runtime.result`` writes it."""
    return json.dumps({"status": "Failed", "reason": reason, "message": message})


class FakeClock:
    """The harness's monotonic clock, moved by the test: ``after`` delays wait for it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture
def api() -> Iterator[KubeApi]:
    with KubeApi() as server:
        yield server
        assert server.unexpected_errors == []
    # Every thread the fixtures started is gone (the operator's, the harness's, the server's).
    wait_for(
        lambda: not [t for t in threading.enumerate() if t.name.startswith(OPERATOR_THREADS)],
        timeout=10,
        what="test threads to end",
    )


@pytest.fixture
def op(api: KubeApi, request: pytest.FixtureRequest) -> Iterator[OperatorThread]:
    """The operator; ``indirect`` parametrization passes settings changes."""
    with operator(api, **getattr(request, "param", {})) as running:
        yield running


@pytest.fixture
def make_kubelet(api: KubeApi, op: OperatorThread) -> Iterator[Callable[..., Kubelet]]:
    """Start harnesses on ``api``; they stop (before the operator) at teardown, error-free."""
    made: list[Kubelet] = []

    def make(behaviour: Behaviour | BehaviourFn, **kwargs: Any) -> Kubelet:
        kubelet = Kubelet(api, behaviour, namespace=NS, **kwargs)
        made.append(kubelet)
        return kubelet.start()

    yield make
    for kubelet in made:
        kubelet.stop()
    for kubelet in made:
        assert kubelet.errors == []


# ------------------------------------------------------------------------------------ helpers
def create(api: KubeApi, name: str, **spec: Any) -> Obj:
    return api.create(FTJ, manifest(name, **spec), NS)


def wait_summary(
    api: KubeApi, name: str, status: str, reason: str | None = None, timeout: float = TIMEOUT
) -> Obj:
    """The FineTuneJob once its ``Succeeded`` condition has ``status`` (and ``reason``)."""
    return wait_condition(api, FTJ, NS, name, "Succeeded", status, reason, timeout)


def summary(obj: Obj) -> Obj:
    cond = condition(obj, "Succeeded")
    assert cond is not None, obj.get("status")
    return cond


def current(api: KubeApi, resource: str, name: str) -> Obj:
    obj = api.get(resource, NS, name)
    assert obj is not None, f"{resource} {NS}/{name} is missing"
    return obj


def events_of(api: KubeApi, name: str) -> list[Obj]:
    """The Events posted about the FineTuneJob ``name``."""
    return [
        e
        for e in api.list(EVENTS, NS)
        if e.get("involvedObject", {}).get("kind") == "FineTuneJob"
        and e["involvedObject"].get("name") == name
    ]


def event_reasons(api: KubeApi, name: str) -> collections.Counter[tuple[str, str]]:
    return collections.Counter((e["type"], e["reason"]) for e in events_of(api, name))


def wait_event(api: KubeApi, name: str, kind: str, reason: str) -> Obj:
    def posted() -> Obj | None:
        return next(
            (e for e in events_of(api, name) if (e["type"], e["reason"]) == (kind, reason)), None
        )

    return wait_for(posted, TIMEOUT, f"a {kind} Event {reason} about {name}")


def job_of(api: KubeApi, name: str) -> Obj:
    """The run's single batch Job."""
    jobs = wait_for(lambda: jobs_of(api, NS, name), TIMEOUT, f"the Job of {name}")
    assert len(jobs) == 1, [j["metadata"]["name"] for j in jobs]
    return jobs[0]


def steady(seconds: float) -> None:
    """Let a few resync periods pass (the thing under test is that nothing happens)."""
    time.sleep(seconds)


def progress_token(api: KubeApi, name: str) -> str:
    secret = current(api, SECRETS, f"{name}-progress")
    if "token" in (secret.get("data") or {}):
        return base64.b64decode(secret["data"]["token"]).decode()
    return str(secret["stringData"]["token"])


def post(url: str, body: Obj, token: str | None) -> int:
    """POST JSON; the HTTP status code."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - local URL
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


# ------------------------------------------------------------------------------------ success
def test_success_copies_the_runtime_result_into_status(
    api: KubeApi, make_kubelet: Callable[..., Kubelet]
) -> None:
    make_kubelet(Succeed(SUCCESS, after=0.2))
    create(api, "ok")

    obj = wait_summary(api, "ok", "True")

    status = obj["status"]
    cond = summary(obj)
    assert cond["reason"] == "Succeeded"
    assert "published s3://models/x/adapter" in cond["message"]
    assert status["artifact"] == {
        "uri": "s3://models/x/adapter",
        "digest": DIGEST,
        "sizeBytes": 123,
    }
    assert status["metrics"] == {"trainLoss": 1.2}
    assert status["completionTime"]
    assert status["startTime"] <= status["completionTime"]
    assert status["jobName"] == "ok-train"
    running = condition(obj, "Running")
    assert running is not None
    assert (running["status"], running["reason"]) == ("False", "Completed")
    suspended = condition(obj, "Suspended")
    assert suspended is not None
    assert suspended["status"] == "False"
    assert condition(obj, "Queued") is None  # no queueName: no Queued condition at all


# ------------------------------------------------------------------------------------ pending
def test_image_pull_backoff_is_reported_then_fails_after_the_grace_period(
    api: KubeApi, make_kubelet: Callable[..., Kubelet]
) -> None:
    kubelet = make_kubelet(ImagePullBackOff(period=0.3))
    create(api, "pull")

    # Within the grace period (2 s) it is a wait, not a failure.
    waiting = summary(wait_summary(api, "pull", "Unknown", "ImagePullBackOff"))
    assert "retrying its image pull" in waiting["message"]
    assert jobs_of(api, NS, "pull")

    obj = wait_summary(api, "pull", "False", "ImagePullFailed")
    cond = summary(obj)
    assert "cannot pull its image" in cond["message"]
    assert "ghcr.io/kubetune/runtime:test" in cond["message"]
    assert obj["status"]["completionTime"]
    running = condition(obj, "Running")
    assert running is not None
    assert running["status"] == "False"
    # The operator stops the run (Kubernetes would retry the pull for ever): Job and config go.
    wait_for(lambda: not jobs_of(api, NS, "pull"), TIMEOUT, "the Job to be deleted")
    # delete_run deletes the Job, then its ConfigMap: the second DELETE may still be on its way.
    wait_for(
        lambda: api.get(CONFIGMAPS, NS, "pull-train") is None, TIMEOUT, "the ConfigMap deleted"
    )
    wait_for(lambda: not api.list(PODS, NS), TIMEOUT, "the pods to be gone")
    wait_event(api, "pull", "Warning", "ImagePullBackOff")
    wait_event(api, "pull", "Warning", "ImagePullFailed")

    steady(2.5 * RESYNC)  # a failed run is final: no new Job, no new pod
    assert jobs_of(api, NS, "pull") == []
    assert len(kubelet.pods_created("pull-train")) == 1
    assert summary(current(api, FTJ, "pull"))["reason"] == "ImagePullFailed"


def test_unschedulable_is_reported_not_failed(
    api: KubeApi, make_kubelet: Callable[..., Kubelet]
) -> None:
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    kubelet = make_kubelet(Unschedulable(message))
    create(api, "nogpu")

    cond = summary(wait_summary(api, "nogpu", "Unknown", "Unschedulable"))
    assert message in cond["message"]
    event = wait_event(api, "nogpu", "Warning", "Unschedulable")
    assert message in event["message"]

    steady(3 * RESYNC)  # still waiting for capacity, never failed
    obj = current(api, FTJ, "nogpu")
    cond = summary(obj)
    assert (cond["status"], cond["reason"]) == ("Unknown", "Unschedulable")
    assert message in cond["message"]
    running = condition(obj, "Running")
    assert running is not None
    assert running["status"] == "False"
    assert "completionTime" not in obj["status"]
    assert job_of(api, "nogpu")["spec"].get("suspend") is False
    assert len(kubelet.pods_created("nogpu-train")) == 1
    # Reported once, on the transition, not on every resync.
    assert event_reasons(api, "nogpu")[("Warning", "Unschedulable")] == 1


# ------------------------------------------------------------------------------------ failures
def test_oom_killed_fails_the_run(api: KubeApi, make_kubelet: Callable[..., Kubelet]) -> None:
    kubelet = make_kubelet(OOMKill(after=0.1))
    create(api, "oom", backoffLimit=0)

    obj = wait_summary(api, "oom", "False", "OOMKilled")

    cond = summary(obj)
    assert "exceeding its memory limit" in cond["message"]
    assert "exit 137" in cond["message"]
    (pod,) = kubelet.pods_created("oom-train")
    assert pod.name in cond["message"]
    assert obj["status"]["completionTime"]
    assert job_of(api, "oom")["status"]["failed"] == 1
    wait_event(api, "oom", "Warning", "OOMKilled")


def test_deadline_exceeded_fails_the_run(
    api: KubeApi, make_kubelet: Callable[..., Kubelet]
) -> None:
    kubelet = make_kubelet(Hang())
    create(api, "slow", activeDeadlineSeconds=1)

    obj = wait_summary(api, "slow", "False", "DeadlineExceeded")

    assert "spec.activeDeadlineSeconds" in summary(obj)["message"]
    assert job_of(api, "slow")["spec"]["activeDeadlineSeconds"] == 1
    # The Job controller stops the hanging pod; nothing is retried.
    assert len(kubelet.pods_created("slow-train")) == 1
    wait_for(
        lambda: all(p["metadata"].get("deletionTimestamp") for p in api.list(PODS, NS)),
        TIMEOUT,
        "the hanging pod to be stopped",
    )


def test_backoff_limit_exceeded_after_every_retry_crashed(
    api: KubeApi, make_kubelet: Callable[..., Kubelet]
) -> None:
    kubelet = make_kubelet(Fail(exit_code=139, message="Segmentation fault", after=0.1))
    create(api, "crash", backoffLimit=1)

    obj = wait_summary(api, "crash", "False", "BackoffLimitExceeded")

    message = summary(obj)["message"]
    assert "failed 2 times" in message
    assert "spec.backoffLimit is 1" in message
    assert "exited with code 139" in message
    pods = kubelet.pods_created("crash-train")
    assert len(pods) == 2
    assert [p.attempt for p in pods] == [0, 1]
    # finishedAt has one-second precision, so "the last pod" may be either when both crashed
    # within the same second.
    assert any(p.name in message for p in pods)
    assert job_of(api, "crash")["status"]["failed"] == 2


def test_training_failed_after_retries_keeps_the_runtime_message(
    api: KubeApi, make_kubelet: Callable[..., Kubelet]
) -> None:
    reason = "loss became NaN at step 7"
    kubelet = make_kubelet(Fail(1, message=runtime_result("TrainingFailed", reason), after=0.1))
    create(api, "nan", backoffLimit=1)

    obj = wait_summary(api, "nan", "False", "TrainingFailed")

    message = summary(obj)["message"]
    assert reason in message
    assert "gave up after 2 attempts" in message
    assert "backoffLimit 1" in message
    assert len(kubelet.pods_created("nan-train")) == 2


@pytest.mark.parametrize(
    ("reason", "exit_code", "detail"),
    [
        ("DataInvalid", 3, "row 17 of s3://datasets/gsm8k/train.jsonl has no column 'answer'"),
        ("ConfigInvalid", 2, "run.json: training.learningRate must be positive"),
    ],
    ids=["DataInvalid", "ConfigInvalid"],
)
def test_permanent_runtime_failure_fails_at_once(
    api: KubeApi,
    make_kubelet: Callable[..., Kubelet],
    reason: str,
    exit_code: int,
    detail: str,
) -> None:
    kubelet = make_kubelet(Fail(exit_code, message=runtime_result(reason, detail), after=0.1))
    create(api, "bad", backoffLimit=2)

    obj = wait_summary(api, "bad", "False", reason)

    message = summary(obj)["message"]
    assert detail in message
    assert "gave up" not in message  # not retried: podFailurePolicy FailJob
    job = job_of(api, "bad")
    failed = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PodFailurePolicy"
    steady(RESYNC)
    assert len(kubelet.pods_created("bad-train")) == 1


# ------------------------------------------------------------------------------------ disruption
@pytest.mark.parametrize(
    ("disruption", "reason"),
    [
        ("PreemptionByScheduler", "Preempted"),
        ("EvictionByEvictionAPI", "Evicted"),
        ("TerminationByKubelet", "Evicted"),  # node-pressure eviction: pod reason Evicted too
    ],
)
def test_disrupted_pod_is_retried_without_spending_the_backoff_limit(
    api: KubeApi, make_kubelet: Callable[..., Kubelet], disruption: str, reason: str
) -> None:
    script = by_attempt(Evict(reason=disruption, after=0.2), Succeed(SUCCESS, after=0.2))
    harness: list[Kubelet] = []

    def choose(job: Obj, pod: Obj, attempt: int) -> Behaviour:
        if attempt == 1:  # the Job controller is replacing the disrupted pod: freeze here
            harness[0].pause()
        return script(job, pod, attempt)

    kubelet = make_kubelet(choose)
    harness.append(kubelet)
    create(api, "bumped", backoffLimit=0)

    # While the replacement pod has not started, the run reports the disruption.
    obj = wait_summary(api, "bumped", "Unknown", reason)
    assert kubelet.paused
    first = kubelet.pods_created("bumped-train")[0]
    message = summary(obj)["message"]
    assert first.name in message
    assert "without counting against spec.backoffLimit" in message
    event = wait_event(api, "bumped", "Warning", reason)
    assert first.name in event["message"]
    job = job_of(api, "bumped")
    assert job["status"].get("failed", 0) == 0

    kubelet.resume()
    obj = wait_summary(api, "bumped", "True", "Succeeded")
    assert obj["status"]["artifact"]["digest"] == DIGEST
    assert [p.attempt for p in kubelet.pods_created("bumped-train")] == [0, 1]
    assert job_of(api, "bumped")["status"].get("failed", 0) == 0


# ------------------------------------------------------------------------------------ spec
def test_invalid_spec_fails_without_creating_children(
    api: KubeApi, make_kubelet: Callable[..., Kubelet]
) -> None:
    kubelet = make_kubelet(Succeed(SUCCESS))
    create(api, "typo", method="sparse")  # the emulator does no schema validation

    obj = wait_summary(api, "typo", "False", "InvalidSpec")

    assert "spec.method" in summary(obj)["message"]
    assert "jobName" not in obj["status"]
    wait_event(api, "typo", "Warning", "InvalidSpec")
    steady(1.5 * RESYNC)
    assert jobs_of(api, NS, "typo") == []
    assert api.list(CONFIGMAPS, NS) == []
    assert api.get(SECRETS, NS, "typo-progress") is None
    assert kubelet.records == []


# ------------------------------------------------------------------------------------ suspend
def test_created_suspended_then_resumed(api: KubeApi, make_kubelet: Callable[..., Kubelet]) -> None:
    kubelet = make_kubelet(Succeed(SUCCESS, after=0.2))
    create(api, "later", suspend=True)

    obj = wait_condition(api, FTJ, NS, "later", "Suspended", "True", timeout=TIMEOUT)
    assert (summary(obj)["status"], summary(obj)["reason"]) == ("Unknown", "Suspended")
    assert job_of(api, "later")["spec"]["suspend"] is True
    steady(1.5 * RESYNC)
    assert kubelet.pods_created("later-train") == []
    assert job_of(api, "later")["spec"]["suspend"] is True

    api.patch(FTJ, NS, "later", {"spec": {"suspend": False}})

    wait_for(lambda: job_of(api, "later")["spec"]["suspend"] is False, TIMEOUT, "the Job to resume")
    obj = wait_summary(api, "later", "True", "Succeeded")
    suspended = condition(obj, "Suspended")
    assert suspended is not None
    assert suspended["status"] == "False"
    assert obj["status"]["artifact"]["digest"] == DIGEST
    assert len(kubelet.pods_created("later-train")) == 1


def test_suspending_a_running_job_stops_its_pods(
    api: KubeApi, make_kubelet: Callable[..., Kubelet]
) -> None:
    kubelet = make_kubelet(by_attempt(Hang(), Succeed(SUCCESS, after=0.2)))
    create(api, "pausable")
    wait_condition(api, FTJ, NS, "pausable", "Running", "True", timeout=TIMEOUT)
    (first,) = kubelet.pods_created("pausable-train")

    api.patch(FTJ, NS, "pausable", {"spec": {"suspend": True}})

    obj = wait_condition(api, FTJ, NS, "pausable", "Suspended", "True", timeout=TIMEOUT)
    assert summary(obj)["status"] == "Unknown"
    assert job_of(api, "pausable")["spec"]["suspend"] is True
    wait_for(lambda: api.get(PODS, NS, first.name) is None, TIMEOUT, "the pod to be deleted")
    obj = wait_condition(api, FTJ, NS, "pausable", "Running", "False", timeout=TIMEOUT)
    assert len(kubelet.pods_created("pausable-train")) == 1
    assert job_of(api, "pausable")["status"].get("failed", 0) == 0  # stopped, not failed

    api.patch(FTJ, NS, "pausable", {"spec": {"suspend": False}})

    obj = wait_summary(api, "pausable", "True", "Succeeded")
    assert [p.attempt for p in kubelet.pods_created("pausable-train")] == [0, 1]
    suspended = condition(obj, "Suspended")
    assert suspended is not None
    assert suspended["status"] == "False"


def test_kueue_queued_job_waits_for_admission(
    api: KubeApi, make_kubelet: Callable[..., Kubelet]
) -> None:
    kubelet = make_kubelet(Succeed(SUCCESS, after=0.2))
    create(api, "queued", scheduling={"queueName": "team-a"})

    obj = wait_condition(api, FTJ, NS, "queued", "Queued", "True", timeout=TIMEOUT)
    assert (summary(obj)["status"], summary(obj)["reason"]) == ("Unknown", "Queued")
    suspended = condition(obj, "Suspended")
    assert suspended is not None
    assert suspended["status"] == "False"  # Kueue's suspension is not the user's
    job = job_of(api, "queued")
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][QUEUE_LABEL] == "team-a"
    steady(1.5 * RESYNC)  # the operator never admits it by itself
    assert job_of(api, "queued")["spec"]["suspend"] is True
    assert kubelet.pods_created("queued-train") == []

    api.reset_counts()
    api.patch(JOBS, NS, "queued-train", {"spec": {"suspend": False}})  # Kueue admits it

    obj = wait_summary(api, "queued", "True", "Succeeded")
    queued = condition(obj, "Queued")
    assert queued is not None
    assert (queued["status"], queued["reason"]) == ("False", "Admitted")
    assert job_of(api, "queued")["spec"]["suspend"] is False
    # The operator never touched the Job's suspension after admission (it is Kueue's).
    assert api.request_counts()[("PATCH", JOBS, None)] == 0
    assert len(kubelet.pods_created("queued-train")) == 1


# ------------------------------------------------------------------------------------ TTL
def test_ttl_deletes_the_children_and_keeps_the_result(
    api: KubeApi, make_kubelet: Callable[..., Kubelet]
) -> None:
    kubelet = make_kubelet(Succeed(SUCCESS, after=0.1))
    create(api, "brief", ttlSecondsAfterFinished=1)
    wait_summary(api, "brief", "True", "Succeeded")
    assert api.get(CONFIGMAPS, NS, "brief-train") is not None
    assert api.get(SECRETS, NS, "brief-progress") is not None

    wait_for(lambda: not jobs_of(api, NS, "brief"), TIMEOUT, "the TTL to delete the Job")
    wait_for(
        lambda: api.get(CONFIGMAPS, NS, "brief-train") is None,
        TIMEOUT,
        "the TTL to delete the ConfigMap",
    )
    assert api.list(PODS, NS) == []
    # The TTL never touches Secrets: the token Secret goes with the resource (owner reference).
    assert api.get(SECRETS, NS, "brief-progress") is not None
    assert not {r for r in api.rbac_requests() if r.resource == "secrets" and r.verb != "create"}

    api.reset_counts()
    steady(3 * RESYNC)  # finished is final: nothing is re-created, nothing is written
    assert jobs_of(api, NS, "brief") == []
    assert api.writes == 0
    obj = current(api, FTJ, "brief")
    cond = summary(obj)
    assert (cond["status"], cond["reason"]) == ("True", "Succeeded")
    assert obj["status"]["artifact"]["digest"] == DIGEST
    assert obj["status"]["metrics"] == {"trainLoss": 1.2}
    applied = condition(obj, "SpecApplied")
    assert applied is not None
    assert applied["status"] == "True"
    assert len(kubelet.pods_created("brief-train")) == 1

    api.delete(FTJ, NS, "brief")  # garbage collection takes the token Secret with it
    assert api.get(SECRETS, NS, "brief-progress") is None


# ------------------------------------------------------------------------------------ API faults
@pytest.mark.parametrize("conflicts", [2, 7], ids=["retried", "beyond-retries"])
def test_status_conflicts_still_converge(
    api: KubeApi, make_kubelet: Callable[..., Kubelet], conflicts: int
) -> None:
    clock = FakeClock()
    make_kubelet(Succeed(SUCCESS, after=60), clock=clock)
    create(api, "contested")
    wait_condition(api, FTJ, NS, "contested", "Running", "True", timeout=TIMEOUT)

    # The pod runs until the clock moves: the next status change is the run finishing.
    api.reset_counts()
    api.fail_next("PATCH", FTJ, subresource="status", status=409, count=conflicts)
    clock.advance(60)

    obj = wait_summary(api, "contested", "True", "Succeeded")
    assert obj["status"]["artifact"]["digest"] == DIGEST
    assert api.request_counts()[("PATCH", FTJ, "status")] >= conflicts + 1
    wait_event(api, "contested", "Normal", "Succeeded")
    steady(RESYNC)
    assert event_reasons(api, "contested")[("Normal", "Succeeded")] == 1


# ------------------------------------------------------------------------------------ events
def test_events_only_on_transitions_and_no_writes_at_steady_state(
    api: KubeApi, make_kubelet: Callable[..., Kubelet]
) -> None:
    clock = FakeClock()
    make_kubelet(Succeed(SUCCESS, after=60), clock=clock)
    create(api, "quiet")
    wait_condition(api, FTJ, NS, "quiet", "Running", "True", timeout=TIMEOUT)
    wait_event(api, "quiet", "Normal", "Started")
    steady(1.5 * RESYNC)  # running, nothing changes: resyncs write nothing
    assert event_reasons(api, "quiet") == {("Normal", "Created"): 1, ("Normal", "Started"): 1}

    clock.advance(60)
    wait_summary(api, "quiet", "True", "Succeeded")
    wait_event(api, "quiet", "Normal", "Succeeded")
    expected = {("Normal", "Created"): 1, ("Normal", "Started"): 1, ("Normal", "Succeeded"): 1}
    assert event_reasons(api, "quiet") == expected

    api.reset_counts()
    steady(3 * RESYNC)
    assert api.writes == 0, api.request_counts()
    assert event_reasons(api, "quiet") == expected


# ------------------------------------------------------------------------------------ HTTP
def test_metrics_count_reconciles_and_runs_by_outcome(
    api: KubeApi, op: OperatorThread, make_kubelet: Callable[..., Kubelet]
) -> None:
    make_kubelet(Succeed(SUCCESS, after=0.1))
    create(api, "counted")
    wait_summary(api, "counted", "True", "Succeeded")

    url = f"http://127.0.0.1:{op.settings.http_port}/metrics"
    expected = 'kubetune_jobs{condition="Succeeded",kind="FineTuneJob",status="True"} 1.0'

    def scrape() -> str | None:
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            text = response.read().decode()
        return text if expected in text else None

    text = wait_for(scrape, TIMEOUT, "the metrics to show the finished run")
    assert "kubetune_reconcile_total{" in text
    assert 'kind="FineTuneJob"' in text
    assert 'result="error"' not in text
    assert 'kubetune_api_writes_total{verb="create"}' in text


@pytest.mark.parametrize("op", [{"operator_namespace": OPERATOR_NS}], indirect=True)
def test_progress_endpoint(
    api: KubeApi, op: OperatorThread, make_kubelet: Callable[..., Kubelet]
) -> None:
    clock = FakeClock()
    make_kubelet(Succeed(SUCCESS, after=60), clock=clock)
    create(api, "chatty")
    wait_condition(api, FTJ, NS, "chatty", "Running", "True", timeout=TIMEOUT)
    base = op.settings.children.progress_base_url
    assert base is not None
    url = f"{base}/{NS}/chatty"
    token = progress_token(api, "chatty")
    report = {"step": 5, "totalSteps": 10, "percent": 50, "loss": 1.5}

    assert post(url, report, token) == 204
    obj = wait_for(
        lambda: (o := api.get(FTJ, NS, "chatty")) and (o["status"].get("progress") or {}) and o,
        TIMEOUT,
        "status.progress",
    )
    progress = obj["status"]["progress"]
    assert (progress["step"], progress["totalSteps"], progress["percent"]) == (5, 10, 50)
    assert progress["loss"] == 1.5
    assert progress["updateTime"]
    assert summary(obj)["status"] == "Unknown"  # the conditions were kept

    assert post(url, {**report, "step": 6}, token + "x") == 401
    assert post(url, {**report, "step": 6}, None) == 401
    assert post(url, {**report, "step": 6}, "") == 401
    # An unknown job answers like a wrong token: its existence is not revealed.
    assert post(f"{base}/{NS}/nobody", report, token) == 401
    assert post(f"{base}/{NS}/nobody", report, None) == 401
    assert post(f"{base}/other-ns/chatty", report, token) == 401  # tokens are per namespace
    steady(0.6)  # past the write interval: a rejected report never reached the status
    assert current(api, FTJ, "chatty")["status"]["progress"]["step"] == 5

    clock.advance(60)
    wait_summary(api, "chatty", "True", "Succeeded")
    assert post(url, {**report, "step": 10}, token) == 409
    steady(0.6)
    assert current(api, FTJ, "chatty")["status"]["progress"]["step"] == 5

    # Reports were checked without reading any Secret: the only Secret read is the operator's
    # key, by name, in its own namespace (created there on start-up).
    secret_requests = {r for r in api.rbac_requests() if r.resource == "secrets"}
    reads = {(r.verb, r.namespace, r.name) for r in secret_requests if r.verb != "create"}
    assert reads == {("get", OPERATOR_NS, "kubetune-progress-key")}
    assert {r.namespace for r in secret_requests if r.verb == "create"} == {NS, OPERATOR_NS}
    assert api.request_counts()[("GET", SECRETS, None)] == 1
    assert api.get(SECRETS, OPERATOR_NS, "kubetune-progress-key") is not None
