"""The kubelet + Job controller harness (``tests/support/kubelet.py``) against the fake API alone.

No operator runs here: each test creates a ConfigMap and a batch/v1 Job exactly as the operator
builds them (``manifests.finetunejob.build`` from an example manifest), lets the harness move
them, and checks the shapes the operator reads (Job status and conditions, pod phases, container
states, termination messages). Tests that depend on timing use a fake clock and ``tick()``.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_operator.api import FineTuneJob
from kubetune_operator.manifests import finetunejob as finetunejob_manifests
from kubetune_operator.manifests.common import OperatorSettings
from kubetune_operator.validation import parse_manifest
from tests.support.kube_api import KubeApi
from tests.support.kubelet import (
    COMPLETION_INDEX,
    CONTROLLER_UID_LABEL,
    JOB_NAME_LABEL,
    JOBS,
    Evict,
    Fail,
    Hang,
    ImagePullBackOff,
    Kubelet,
    OOMKill,
    RunCommand,
    Succeed,
    Unschedulable,
    by_attempt,
    container_status,
    job_condition,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
LORA = "finetunejob-lora-gsm8k.yaml"
TWO_NODES = "finetunejob-full-zero3-2x8.yaml"
RESULT = {"status": "Succeeded", "reason": "TrainingSucceeded", "message": "ok"}

Obj = dict[str, Any]


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def api() -> Iterator[KubeApi]:
    with KubeApi() as server:
        yield server


@pytest.fixture
def make_kubelet(api: KubeApi) -> Iterator[Callable[..., Kubelet]]:
    """Build harnesses that are always stopped (threads and processes) at teardown."""
    made: list[Kubelet] = []

    def make(*args: Any, **kwargs: Any) -> Kubelet:
        kubelet = Kubelet(api, *args, **kwargs)
        made.append(kubelet)
        return kubelet

    yield make
    for kubelet in made:
        kubelet.stop()
        assert kubelet.errors == []
    assert [t.name for t in threading.enumerate() if t.name.startswith("kubelet")] == []


def run_objects(
    example: str = LORA,
    *,
    namespace: str = "team-a",
    settings: OperatorSettings | None = None,
) -> tuple[Obj, Obj]:
    """The ConfigMap and batch/v1 Job the operator builds for an example FineTuneJob."""
    doc = yaml.safe_load((EXAMPLES / example).read_text(encoding="utf-8"))
    doc["metadata"].update(namespace=namespace, uid="0d6c7a1e-5f43-4c29-8a53-3b1f2e9d7c10")
    model = parse_manifest(doc)
    assert isinstance(model, FineTuneJob)
    objects = finetunejob_manifests.build(model, settings or OperatorSettings())
    config_map = next(o for o in objects if o["kind"] == "ConfigMap")
    job = next(o for o in objects if o["kind"] == "Job")
    return config_map, job


def submit(api: KubeApi, example: str = LORA, edit: Callable[[Obj], None] | None = None) -> Obj:
    """Create an example's ConfigMap and Job (after ``edit(job)``); returns the created Job."""
    config_map, job = run_objects(example)
    if edit is not None:
        edit(job)
    api.create("v1/configmaps", config_map)
    created: Obj = api.create(JOBS, job)
    return created


def job_now(api: KubeApi, job: Obj) -> Obj:
    current = api.get(JOBS, job["metadata"]["namespace"], job["metadata"]["name"])
    assert current is not None
    return current


def finished(api: KubeApi, job: Obj) -> Callable[[], Obj | None]:
    """A ``wait_for`` predicate: the Job's Complete or Failed condition."""

    def check() -> Obj | None:
        current = job_now(api, job)
        return job_condition(current, "Complete") or job_condition(current, "Failed")

    return check


def tick(kubelet: Kubelet, times: int) -> None:
    for _ in range(times):
        kubelet.tick()


def condition_types(pod: Obj) -> dict[str, str]:
    return {c["type"]: c["status"] for c in pod["status"]["conditions"]}


# ------------------------------------------------------------------------------ Job controller


def test_success_path_completes_the_job_with_the_termination_message(
    api: KubeApi, make_kubelet: Callable[..., Kubelet]
) -> None:
    message = json.dumps(RESULT)
    with make_kubelet(Succeed(message=message)) as kubelet:
        job = submit(api)
        done = kubelet.wait_for(finished(api, job), timeout=10)

    assert done["type"] == "Complete"
    assert done["reason"] == "CompletionsReached"
    status = job_now(api, job)["status"]
    assert status["succeeded"] == 1
    assert "failed" not in status
    assert "active" not in status
    assert status["ready"] == 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", status["completionTime"])
    assert status["startTime"] <= status["completionTime"]

    name, namespace, uid = (job["metadata"][k] for k in ("name", "namespace", "uid"))
    (pod,) = kubelet.pods(namespace, name)
    assert re.fullmatch(rf"{re.escape(name)}-[a-z0-9]{{5}}", pod["metadata"]["name"])
    labels = pod["metadata"]["labels"]
    template_labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels.items() >= template_labels.items()
    assert labels[JOB_NAME_LABEL] == labels["job-name"] == name
    assert labels[CONTROLLER_UID_LABEL] == labels["controller-uid"] == uid
    assert labels["app.kubernetes.io/managed-by"] == "kubetune-operator"
    (owner,) = pod["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert pod["spec"]["containers"] == job["spec"]["template"]["spec"]["containers"]
    assert pod["status"]["phase"] == "Succeeded"
    assert condition_types(pod) == {
        "PodReadyToStartContainers": "False",
        "Initialized": "True",
        "Ready": "False",
        "ContainersReady": "False",
        "PodScheduled": "True",
    }
    container = container_status(pod)
    assert container["name"] == "runtime"
    assert container["ready"] is False
    assert container["restartCount"] == 0
    assert container["image"] == job["spec"]["template"]["spec"]["containers"][0]["image"]
    terminated = container["state"]["terminated"]
    assert terminated["exitCode"] == 0
    assert terminated["reason"] == "Completed"
    assert json.loads(terminated["message"]) == RESULT
    assert terminated["startedAt"] <= terminated["finishedAt"]
    assert [(r.name, r.attempt, r.index) for r in kubelet.pods_created(name)] == [
        (pod["metadata"]["name"], 0, None)
    ]


def test_pods_pass_through_pending_and_running(
    api: KubeApi, make_kubelet: Callable[..., Kubelet]
) -> None:
    clock = FakeClock()
    kubelet = make_kubelet(Succeed(message="done", after=30), clock=clock)
    job = submit(api)
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]

    kubelet.tick()  # the Job controller creates the pod; the scheduler binds it
    (pod,) = kubelet.pods(namespace, name)
    assert pod["status"]["phase"] == "Pending"
    assert condition_types(pod) == {"PodScheduled": "True"}
    assert pod["spec"]["nodeName"] == "kind-worker"
    status = job_now(api, job)["status"]
    assert status["active"] == 1
    assert status["ready"] == 0
    assert "startTime" in status

    kubelet.tick()  # the kubelet creates the container
    (pod,) = kubelet.pods(namespace, name)
    assert pod["status"]["phase"] == "Pending"
    assert container_status(pod)["state"] == {"waiting": {"reason": "ContainerCreating"}}
    assert "startTime" in pod["status"]

    kubelet.tick()
    (pod,) = kubelet.pods(namespace, name)
    assert pod["status"]["phase"] == "Running"
    assert set(condition_types(pod).values()) == {"True"}
    container = container_status(pod)
    assert container["ready"] is True
    assert set(container["state"]) == {"running"}
    assert job_now(api, job)["status"]["ready"] == 1

    clock.advance(29)
    kubelet.tick()
    assert kubelet.pods(namespace, name)[0]["status"]["phase"] == "Running"
    clock.advance(1)
    kubelet.tick()
    assert kubelet.pods(namespace, name)[0]["status"]["phase"] == "Succeeded"
    assert job_condition(job_now(api, job), "Complete") is not None


def test_backoff_limit_exceeded_after_three_failures(
    api: KubeApi, make_kubelet: Callable[..., Kubelet]
) -> None:
    with make_kubelet(Fail(exit_code=1, message="boom")) as kubelet:
        job = submit(api)  # the example's backoffLimit is 2
        assert job["spec"]["backoffLimit"] == 2
        done = kubelet.wait_for(finished(api, job), timeout=10)

    assert (done["type"], done["reason"]) == ("Failed", "BackoffLimitExceeded")
    assert done["message"] == "Job has reached the specified backoff limit"
    current = job_now(api, job)
    assert (job_condition(current, "FailureTarget") or {}).get("reason") == "BackoffLimitExceeded"
    assert current["status"]["failed"] == 3
    assert "succeeded" not in current["status"]
    assert "completionTime" not in current["status"]
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    assert [r.attempt for r in kubelet.pods_created(name)] == [0, 1, 2]
    pods = kubelet.pods(namespace, name)
    assert [p["status"]["phase"] for p in pods] == ["Failed"] * 3
    terminated = container_status(pods[-1])["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"], terminated["message"]) == (
        1,
        "Error",
        "boom",
    )


def test_exit_code_3_fails_the_job_at_once_through_the_pod_failure_policy(
    api: KubeApi, make_kubelet: Callable[..., Kubelet]
) -> None:
    with make_kubelet(by_attempt(Fail(exit_code=3), Succeed())) as kubelet:
        job = submit(api)
        done = kubelet.wait_for(finished(api, job), timeout=10)

    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    (pod,) = kubelet.pods(namespace, name)
    assert (done["type"], done["reason"]) == ("Failed", "PodFailurePolicy")
    assert done["message"] == (
        f"Container runtime for pod {namespace}/{pod['metadata']['name']} failed with exit "
        "code 3 matching FailJob rule at index 0"
    )
    assert job_now(api, job)["status"]["failed"] == 1
    assert len(kubelet.pods_created(name)) == 1


def test_oom_kill_counts_as_a_failure(api: KubeApi, make_kubelet: Callable[..., Kubelet]) -> None:
    with make_kubelet(by_attempt(OOMKill(), Succeed(message="ok"))) as kubelet:
        job = submit(api)
        done = kubelet.wait_for(finished(api, job), timeout=10)

    assert done["type"] == "Complete"
    assert job_now(api, job)["status"]["failed"] == 1
    first = kubelet.pods(job["metadata"]["namespace"], job["metadata"]["name"])[0]
    terminated = container_status(first)["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (137, "OOMKilled")


@pytest.mark.parametrize("reason", ["PreemptionByScheduler", "EvictionByEvictionAPI"])
def test_disrupted_pods_are_replaced_without_counting(
    api: KubeApi, make_kubelet: Callable[..., Kubelet], reason: str
) -> None:
    with make_kubelet(by_attempt(Evict(reason=reason), Succeed(message="done"))) as kubelet:
        job = submit(api)
        done = kubelet.wait_for(finished(api, job), timeout=10)

    assert done["type"] == "Complete"
    status = job_now(api, job)["status"]
    assert "failed" not in status
    assert status["succeeded"] == 1
    evicted, replacement = kubelet.pods(job["metadata"]["namespace"], job["metadata"]["name"])
    assert evicted["status"]["phase"] == "Failed"
    disruption = next(c for c in evicted["status"]["conditions"] if c["type"] == "DisruptionTarget")
    assert (disruption["status"], disruption["reason"]) == ("True", reason)
    assert disruption["message"]
    terminated = container_status(evicted)["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (137, "Error")
    assert replacement["status"]["phase"] == "Succeeded"
    assert [r.attempt for r in kubelet.pods_created(job["metadata"]["name"])] == [0, 1]


def test_active_deadline_fails_the_job_and_deletes_its_pods(
    api: KubeApi, make_kubelet: Callable[..., Kubelet]
) -> None:
    clock = FakeClock()
    kubelet = make_kubelet(Hang(), clock=clock)
    job = submit(api, edit=lambda j: j["spec"].update(activeDeadlineSeconds=600))
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    tick(kubelet, 3)
    assert kubelet.pods(namespace, name)[0]["status"]["phase"] == "Running"

    clock.advance(599)
    kubelet.tick()
    assert job_condition(job_now(api, job), "Failed") is None
    clock.advance(1)
    kubelet.tick()

    current = job_now(api, job)
    failed = job_condition(current, "Failed")
    assert failed is not None
    assert (failed["reason"], failed["message"]) == (
        "DeadlineExceeded",
        "Job was active longer than specified deadline",
    )
    assert kubelet.pods(namespace, name) == []
    assert "active" not in current["status"]
    assert "failed" not in current["status"]  # deleted pods are not failures
    tick(kubelet, 3)
    assert len(kubelet.pods_created(name)) == 1  # a finished Job gets no new pods


def test_suspend_deletes_pods_and_resume_restarts(
    api: KubeApi, make_kubelet: Callable[..., Kubelet]
) -> None:
    clock = FakeClock()
    kubelet = make_kubelet(Hang(), clock=clock)
    job = submit(api)
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    tick(kubelet, 3)
    first_start = job_now(api, job)["status"]["startTime"]
    assert job_now(api, job)["status"]["ready"] == 1

    api.patch(JOBS, namespace, name, {"spec": {"suspend": True}})
    kubelet.tick()
    current = job_now(api, job)
    suspended = job_condition(current, "Suspended")
    assert suspended is not None
    assert (suspended["reason"], suspended["message"]) == ("JobSuspended", "Job suspended")
    assert kubelet.pods(namespace, name) == []
    assert "active" not in current["status"]
    assert "failed" not in current["status"]
    tick(kubelet, 2)
    assert len(kubelet.pods_created(name)) == 1

    clock.advance(5)
    api.patch(JOBS, namespace, name, {"spec": {"suspend": False}})
    kubelet.tick()
    current = job_now(api, job)
    resumed = next(c for c in current["status"]["conditions"] if c["type"] == "Suspended")
    assert (resumed["status"], resumed["reason"]) == ("False", "JobResumed")
    assert current["status"]["startTime"] >= first_start
    assert current["status"]["active"] == 1
    assert [r.attempt for r in kubelet.pods_created(name)] == [0, 1]


def test_a_job_created_suspended_gets_no_pods(
    api: KubeApi, make_kubelet: Callable[..., Kubelet]
) -> None:
    kubelet = make_kubelet(Succeed())
    job = submit(api, edit=lambda j: j["spec"].update(suspend=True))
    tick(kubelet, 3)
    current = job_now(api, job)
    assert job_condition(current, "Suspended") is not None
    assert "startTime" not in current["status"]
    assert kubelet.records == []


def test_indexed_job_runs_one_pod_per_index(
    api: KubeApi, make_kubelet: Callable[..., Kubelet]
) -> None:
    def behaviour(job: Obj, pod: Obj, attempt: int) -> Fail | Succeed:
        index = pod["metadata"]["annotations"][COMPLETION_INDEX]
        return Fail(exit_code=1) if (index, attempt) == ("1", 0) else Succeed(message=index)

    with make_kubelet(behaviour) as kubelet:
        # The example names a Kueue queue, so its Job starts suspended: Kueue admits it.
        job = submit(api, TWO_NODES, edit=lambda j: j["spec"].update(suspend=False))
        assert job["spec"]["completionMode"] == "Indexed"
        done = kubelet.wait_for(finished(api, job), timeout=10)

    assert done["type"] == "Complete"
    status = job_now(api, job)["status"]
    assert (status["succeeded"], status["failed"], status["completedIndexes"]) == (2, 1, "0-1")
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    records = kubelet.pods_created(name)
    assert sorted((r.index, r.attempt) for r in records) == [(0, 0), (1, 0), (1, 1)]
    for pod in kubelet.pods(namespace, name):
        index = pod["metadata"]["annotations"][COMPLETION_INDEX]
        assert pod["metadata"]["labels"][COMPLETION_INDEX] == index
        assert re.fullmatch(rf"{re.escape(name)}-{index}-[a-z0-9]{{5}}", pod["metadata"]["name"])
        assert pod["spec"]["hostname"] == f"{name}-{index}"
        env = {v["name"]: v for v in pod["spec"]["containers"][0]["env"]}
        assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
            f"metadata.annotations['{COMPLETION_INDEX}']"
        )
        if pod["status"]["phase"] == "Succeeded":
            assert container_status(pod)["state"]["terminated"]["message"] == index


# ------------------------------------------------------------------------------ pending shapes


def test_image_pull_backoff_shape(api: KubeApi, make_kubelet: Callable[..., Kubelet]) -> None:
    clock = FakeClock()
    kubelet = make_kubelet(
        ImagePullBackOff(image="registry.example/nope:1", period=10), clock=clock
    )
    job = submit(api)
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    tick(kubelet, 3)
    (pod,) = kubelet.pods(namespace, name)
    assert pod["status"]["phase"] == "Pending"
    assert "startTime" in pod["status"]
    waiting = container_status(pod)["state"]["waiting"]
    assert waiting["reason"] == "ErrImagePull"
    assert '"registry.example/nope:1"' in waiting["message"]

    clock.advance(10)
    kubelet.tick()
    (pod,) = kubelet.pods(namespace, name)
    waiting = container_status(pod)["state"]["waiting"]
    assert waiting == {
        "reason": "ImagePullBackOff",
        "message": 'Back-off pulling image "registry.example/nope:1"',
    }
    assert condition_types(pod)["Ready"] == "False"
    clock.advance(10)
    kubelet.tick()
    assert container_status(kubelet.pods(namespace, name)[0])["state"]["waiting"]["reason"] == (
        "ErrImagePull"
    )
    status = job_now(api, job)["status"]
    assert (status["active"], status["ready"]) == (1, 0)
    assert len(kubelet.records) == 1


def test_unschedulable_shape(api: KubeApi, make_kubelet: Callable[..., Kubelet]) -> None:
    kubelet = make_kubelet(Unschedulable())
    job = submit(api)
    tick(kubelet, 4)
    (pod,) = kubelet.pods(job["metadata"]["namespace"], job["metadata"]["name"])
    status = pod["status"]
    assert status["phase"] == "Pending"
    (scheduled,) = status["conditions"]
    assert scheduled["type"] == "PodScheduled"
    assert (scheduled["status"], scheduled["reason"]) == ("False", "Unschedulable")
    assert scheduled["message"] == "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    assert "startTime" not in status
    assert "containerStatuses" not in status
    assert "nodeName" not in pod["spec"]
    assert job_now(api, job)["status"]["active"] == 1


# ------------------------------------------------------------------------------ driving


def test_pause_freezes_the_clock(api: KubeApi, make_kubelet: Callable[..., Kubelet]) -> None:
    clock = FakeClock()
    kubelet = make_kubelet(Succeed(after=10), clock=clock)
    job = submit(api)
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    tick(kubelet, 3)
    kubelet.pause()
    clock.advance(60)
    kubelet.tick()
    assert kubelet.pods(namespace, name)[0]["status"]["phase"] == "Running"
    kubelet.resume()
    clock.advance(9)
    kubelet.tick()
    assert kubelet.pods(namespace, name)[0]["status"]["phase"] == "Running"
    clock.advance(1)
    kubelet.tick()
    assert kubelet.pods(namespace, name)[0]["status"]["phase"] == "Succeeded"


def test_paused_background_thread_does_nothing(
    api: KubeApi, make_kubelet: Callable[..., Kubelet]
) -> None:
    with make_kubelet(Succeed()) as kubelet:
        kubelet.pause()
        job = submit(api)
        ticks = kubelet.ticks
        time.sleep(0.3)
        assert kubelet.ticks == ticks
        assert kubelet.records == []
        kubelet.resume()
        kubelet.wait_for(finished(api, job), timeout=10)


def test_survives_the_job_disappearing(api: KubeApi, make_kubelet: Callable[..., Kubelet]) -> None:
    def behaviour(job: Obj, pod: Obj, attempt: int) -> Hang | Succeed:
        return Succeed() if job["metadata"]["name"] == "second" else Hang()

    with make_kubelet(behaviour) as kubelet:
        job = submit(api)
        name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
        kubelet.wait_for(lambda: job_now(api, job).get("status", {}).get("ready") == 1)
        api.delete(JOBS, namespace, name)  # garbage collection takes its pods
        api.delete("v1/configmaps", namespace, name)
        ticks = kubelet.ticks
        kubelet.wait_for(lambda: kubelet.ticks >= ticks + 5, timeout=10)
        assert kubelet.pods(namespace, name) == []
        assert kubelet.running

        second = submit(api, edit=lambda j: j["metadata"].update(name="second"))
        assert kubelet.wait_for(finished(api, second), timeout=10)["type"] == "Complete"
    assert [r.job for r in kubelet.records] == [name, "second"]


def test_a_new_harness_adopts_live_pods(api: KubeApi, make_kubelet: Callable[..., Kubelet]) -> None:
    first = make_kubelet(by_attempt(Fail(exit_code=1), Hang()))
    job = submit(api)
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    first.wait_for(lambda: len(first.pods_created(name)) == 2)
    tick(first, 3)
    first.stop()
    failed, running = first.pods(namespace, name)
    assert (failed["status"]["phase"], running["status"]["phase"]) == ("Failed", "Running")

    attempts: list[int] = []

    def behaviour(job: Obj, pod: Obj, attempt: int) -> Succeed:
        attempts.append(attempt)
        return Succeed(message="adopted")

    second = make_kubelet(behaviour)
    assert second.wait_for(finished(api, job))["type"] == "Complete"
    assert attempts == [1]
    assert second.records == []  # it created nothing
    status = job_now(api, job)["status"]
    assert (status["failed"], status["succeeded"]) == (1, 1)
    assert container_status(pod_now(api, running))["state"]["terminated"]["message"] == ("adopted")


def pod_now(api: KubeApi, pod: Obj) -> Obj:
    current = api.get("v1/pods", pod["metadata"]["namespace"], pod["metadata"]["name"])
    assert current is not None
    return current


def test_a_pod_whose_job_is_gone_is_collected(
    api: KubeApi, make_kubelet: Callable[..., Kubelet]
) -> None:
    kubelet = make_kubelet(Hang())
    job = submit(api)
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    tick(kubelet, 3)
    # An orphaning delete leaves the pod behind, as a Job deleted while the harness was
    # creating its pod would (the emulator collects only what exists at deletion time).
    url = f"{api.url}/apis/batch/v1/namespaces/{namespace}/jobs/{name}?propagationPolicy=Orphan"
    with urllib.request.urlopen(urllib.request.Request(url, method="DELETE")) as response:  # noqa: S310
        assert response.status == 200
    assert len(kubelet.pods(namespace, name)) == 1
    kubelet.tick()
    assert kubelet.pods(namespace, name) == []


def test_a_pod_deleted_by_someone_else_counts_as_failed(
    api: KubeApi, make_kubelet: Callable[..., Kubelet]
) -> None:
    kubelet = make_kubelet(by_attempt(Hang(), Succeed()))
    job = submit(api)
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    tick(kubelet, 3)
    (pod,) = kubelet.pods(namespace, name)
    api.delete("v1/pods", namespace, pod["metadata"]["name"])
    kubelet.wait_for(finished(api, job), timeout=10)
    status = job_now(api, job)["status"]
    assert (status["failed"], status["succeeded"]) == (1, 1)


# ------------------------------------------------------------------------------ RunCommand

CHECK_POD = textwrap.dedent(
    """
    import json, os, sys
    args = sys.argv[1:]
    config_path = args[args.index("--config") + 1]
    config = json.load(open(config_path))
    token = open(config["progress"]["token_file"]).read()
    workdir = args[args.index("--workdir") + 1]
    open(os.path.join(workdir, "pid"), "w").write(str(os.getpid()))
    seen = {
        "config_dir": os.path.dirname(config_path),
        "workdir": workdir,
        "home": os.environ["HOME"],
        "key_id": os.environ["AWS_ACCESS_KEY_ID"],
        "secret": os.environ["AWS_SECRET_ACCESS_KEY"],
        "ca": open(os.environ["AWS_CA_BUNDLE"]).read(),
        "token": token,
        "offline": os.environ["HF_HUB_OFFLINE"],
        "s3_root": os.environ.get("KUBETUNE_LOCAL_S3_ROOT"),
    }
    result = {"status": "Succeeded", "reason": "TrainingSucceeded", "message": json.dumps(seen)}
    open(os.environ["KUBETUNE_RESULT_PATH"], "w").write(json.dumps(result))
    """
)


def command_job(script: str) -> Callable[[Obj], None]:
    """Replace the runtime command by ``python -c script`` (arguments kept: mapped paths)."""

    def edit(job: Obj) -> None:
        container = job["spec"]["template"]["spec"]["containers"][0]
        container["command"] = [sys.executable, "-c", script]
        job["spec"]["backoffLimit"] = 0

    return edit


def create_secrets(api: KubeApi, namespace: str, progress: str) -> None:
    def encode(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    api.create(
        "v1/secrets",
        {
            "metadata": {"name": "minio-training-creds", "namespace": namespace},
            "data": {"AWS_ACCESS_KEY_ID": encode("minio"), "AWS_SECRET_ACCESS_KEY": encode("pw")},
        },
    )
    api.create(
        "v1/secrets",
        {"metadata": {"name": "minio-ca", "namespace": namespace}, "stringData": {"ca.crt": "CA"}},
    )
    api.create(
        "v1/secrets",
        {
            "metadata": {"name": "qwen25-05b-gsm8k-lora-progress", "namespace": namespace},
            "data": {"token": encode(progress)},
        },
    )


def test_run_command_runs_the_container_and_reports_its_result(
    api: KubeApi, make_kubelet: Callable[..., Kubelet], tmp_path: Path
) -> None:
    settings = OperatorSettings(progress_base_url="http://operator:8080/progress")
    config_map, job = run_objects(settings=settings)
    command_job(CHECK_POD)(job)
    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    create_secrets(api, namespace, progress="s3cret-token")
    api.create("v1/configmaps", config_map)
    created = api.create(JOBS, job)

    behaviour = RunCommand(tmp_path, environ={"AWS_SECRET_ACCESS_KEY": "from-environ"})
    with make_kubelet(behaviour) as kubelet:
        done = kubelet.wait_for(finished(api, created), timeout=20)

    (pod,) = kubelet.pods(namespace, name)
    terminated = container_status(pod)["state"]["terminated"]
    log_path = kubelet.log_path(namespace, pod["metadata"]["name"])
    assert log_path is not None
    assert done["type"] == "Complete", log_path.read_text()
    assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")
    result = json.loads(terminated["message"])
    assert result["status"] == "Succeeded"
    seen = json.loads(result["message"])
    volumes = tmp_path / "pods" / namespace / pod["metadata"]["name"] / "volumes"
    assert seen == {
        "config_dir": str(volumes / "config"),
        "workdir": str(volumes / "workspace"),
        "home": str(volumes / "workspace"),
        "key_id": "minio",
        "secret": "from-environ",
        "ca": "CA",
        "token": "s3cret-token",
        "offline": "1",
        "s3_root": None,  # run.json names an S3 endpoint (the example's MinIO)
    }
    assert json.loads((volumes / "config" / "run.json").read_text())["progress"]["token_file"] == (
        str(volumes / "progress" / "token")
    )
    assert oct((volumes / "progress" / "token").stat().st_mode & 0o777) == oct(0o400)


def test_run_command_failure_falls_back_to_the_log_tail(
    api: KubeApi, make_kubelet: Callable[..., Kubelet], tmp_path: Path
) -> None:
    script = "import sys; print('line one'); print('it broke', file=sys.stderr); sys.exit(4)"
    create_secrets(api, "team-a", progress="t")
    with make_kubelet(RunCommand(tmp_path)) as kubelet:
        job = submit(api, edit=command_job(script))
        done = kubelet.wait_for(finished(api, job), timeout=20)

    assert (done["type"], done["reason"]) == ("Failed", "BackoffLimitExceeded")
    (pod,) = kubelet.pods(job["metadata"]["namespace"], job["metadata"]["name"])
    terminated = container_status(pod)["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (4, "Error")
    assert terminated["message"] == "line one\nit broke"


def test_run_command_waits_for_a_missing_secret(
    api: KubeApi, make_kubelet: Callable[..., Kubelet], tmp_path: Path
) -> None:
    script = "import os; open(os.environ['KUBETUNE_RESULT_PATH'], 'w').write('{}')"
    kubelet = make_kubelet(RunCommand(tmp_path))
    job = submit(api, edit=command_job(script))
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    tick(kubelet, 4)
    (pod,) = kubelet.pods(namespace, name)
    waiting = container_status(pod)["state"]["waiting"]
    assert waiting["reason"] == "CreateContainerConfigError"
    assert waiting["message"] == 'secret "minio-ca" not found'

    create_secrets(api, namespace, progress="t")
    done = kubelet.wait_for(finished(api, job), timeout=20)
    assert done["type"] == "Complete"
    assert container_status(kubelet.pods(namespace, name)[0])["state"]["terminated"]["message"] == (
        "{}"
    )


def test_run_command_process_is_stopped_when_its_pod_goes(
    api: KubeApi, make_kubelet: Callable[..., Kubelet], tmp_path: Path
) -> None:
    script = textwrap.dedent(
        """
        import os, sys, time
        workdir = sys.argv[sys.argv.index("--workdir") + 1]
        open(os.path.join(workdir, "pid"), "w").write(str(os.getpid()))
        time.sleep(120)
        """
    )
    create_secrets(api, "team-a", progress="t")
    with make_kubelet(RunCommand(tmp_path, grace=1)) as kubelet:
        job = submit(api, edit=command_job(script))
        name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
        pid_files = lambda: list(tmp_path.glob("pods/*/*/volumes/workspace/pid"))  # noqa: E731
        (pid_file,) = kubelet.wait_for(pid_files, timeout=20)
        kubelet.wait_for(pid_file.read_text, timeout=5)
        pid = int(pid_file.read_text())
        api.patch(JOBS, namespace, name, {"spec": {"suspend": True}})
        kubelet.wait_for(lambda: not _alive(pid), timeout=10, message="process stopped")
        assert kubelet.pods(namespace, name) == []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_behaviour_sees_the_job_and_the_named_pod(
    api: KubeApi, make_kubelet: Callable[..., Kubelet]
) -> None:
    seen: list[tuple[str, str, int]] = []

    def behaviour(job: Obj, pod: Obj, attempt: int) -> Succeed:
        seen.append((job["metadata"]["name"], pod["metadata"]["name"], attempt))
        return Succeed(message=copy.deepcopy(pod["metadata"]["name"]))

    kubelet = make_kubelet(behaviour)
    job = submit(api)
    kubelet.wait_for(finished(api, job), timeout=10)
    (pod,) = kubelet.pods(job["metadata"]["namespace"], job["metadata"]["name"])
    assert seen == [(job["metadata"]["name"], pod["metadata"]["name"], 0)]
