"""A scripted "kubelet + Job controller" for tests against the fake API (``kube_api.KubeApi``).

The fake API server only stores objects; nothing moves a batch/v1 Job forward. :class:`Kubelet`
plays the two cluster components our operator depends on, for the parts the operator reads:

* the **Job controller** (kube-controller-manager): creates the Pods of every Job that is not
  suspended and not finished (``<job>-<random5>``, Indexed: ``<job>-<index>-<random5>``, with
  the real labels, completion-index annotation, ``hostname`` and ``JOB_COMPLETION_INDEX`` env,
  and a controller owner reference), counts their outcomes with the Job's ``podFailurePolicy``
  (``FailJob`` / ``Ignore`` / ``Count`` on exit codes and pod conditions), and writes the Job's
  status through ``/status``: ``startTime``, ``active``, ``ready``, ``succeeded``, ``failed``,
  ``completedIndexes``, ``completionTime`` and the conditions ``Suspended``, ``Complete``
  (reason ``CompletionsReached``), ``FailureTarget`` + ``Failed`` (reasons
  ``PodFailurePolicy``, ``BackoffLimitExceeded``, ``DeadlineExceeded``). Suspending a Job deletes
  its active pods (not counted as failures); resuming it resets ``startTime``. A failed Job's
  active pods are deleted;
* the **kubelet**: moves each Pod through Pending (scheduled, then ``ContainerCreating``) to
  Running and on to Succeeded/Failed, with real-shaped ``containerStatuses`` and the
  ``PodScheduled`` / ``PodReadyToStartContainers`` / ``Initialized`` / ``ContainersReady`` /
  ``Ready`` / ``DisruptionTarget`` conditions, as scripted per pod by a *behaviour*.

The test chooses each pod's behaviour with a callable ``behaviour(job, pod, attempt)`` (the
Job and Pod objects as created, and ``attempt``: how many pods were created before this one for
the same Job, or the same Job index when Indexed), or one behaviour for every pod:

======================  ======================================================================
behaviour               what the pod does
======================  ======================================================================
``Succeed(message)``    Running, then exit 0 (reason Completed) with ``message`` as its
                        termination message ``after`` seconds later
``Fail(exit_code)``     Running, then exits with that code (reason ``Error`` by default)
``OOMKill()``           Running, then exit 137 reason ``OOMKilled``
``ImagePullBackOff()``  Pending for ever, waiting ``ErrImagePull`` / ``ImagePullBackOff`` in turn
``Unschedulable()``     Pending for ever, ``PodScheduled=False`` reason ``Unschedulable``
``Evict(reason)``       Running, then ``DisruptionTarget=True`` (that reason), phase Failed, exit
                        137 reason Error, as preemption or the Eviction API leave a pod
``Hang()``              Running for ever (deadlines, suspension, operator restarts)
``RunCommand(workdir)`` runs the container's real command on this machine (below)
======================  ======================================================================

``RunCommand`` maps the pod's volumes to folders under ``<workdir>/pods/<ns>/<pod>/volumes``
(ConfigMap and Secret volumes are written out from the emulator's objects, ``emptyDir`` is a
fresh folder: a retried pod starts with an empty ``/workspace``, as in a cluster), resolves
``env`` (values with mount paths mapped, Secret/ConfigMap keys and field references from the
emulator, ``RunCommand.environ`` taking precedence for Secret-backed values), and runs the
command in a thread; the pod is Running meanwhile. Like ``kubetune run``
(:mod:`kubetune_operator.localrun`) it replaces ``kubetune-runtime`` with this interpreter's
``-m kubetune_runtime.entrypoint``, sets ``KUBETUNE_RESULT_PATH`` (the container's
termination-message file), ``KUBETUNE_LOCAL_S3_ROOT`` (``<workdir>/s3``, when run.json names no
S3 endpoint) and ``HF_HUB_OFFLINE=1``. Container paths inside a mounted ``*.json`` file (such as
run.json's progress token file and CA bundle) are mapped too, so the runtime finds them. On exit
the termination message is the file's content (at most 4096 bytes; with
``FallbackToLogsOnError`` and a failure, the log tail instead) and the exit code the process's.

Driving: ``start()``/``stop()`` (or ``with Kubelet(api, ...) as kubelet:``) tick in a background
thread every ``interval`` seconds; ``tick()`` does one step synchronously for deterministic tests
(``wait_for`` ticks by itself when the thread is not running). ``pause()``/``resume()`` freeze
the harness: nothing moves and its clock (``after`` delays, ``activeDeadlineSeconds``, image
pull back-off) stands still. Each step survives objects vanishing under it (the operator
deleting a Job, garbage collection deleting pods): API errors are logged and the step goes on;
anything unexpected is logged and kept in ``errors`` (assert it is empty).

Records for assertions: ``records`` / ``pods_created(job)`` (every pod created, with its
attempt and behaviour), ``pods(namespace, job)`` (the API's pods, oldest first), ``history``
(one line per action) and ``log_path(namespace, pod)`` (a RunCommand process's output). A
harness started on an API that already holds Jobs and live pods adopts them (attempts count
from the pods it finds).

Simplifications (none matters to our operator): no pod-creation back-off delay, no
``backoffLimitPerIndex``/``successPolicy``/``podReplacementPolicy``, no ``ttlSecondsAfterFinished``,
no finalizers on pods (a pod someone else deletes before it terminated counts as failed, as the
Job controller counts it), no restarts (``restartPolicy: Never`` only), one container per pod
matters (the first, or ``runtime``), ``startTime`` is kept while suspended (reset on resume),
and terminated pods stay until their Job is deleted (evicted and preempted pods too). A pod of
this harness whose Job is gone is deleted (the garbage collector's part when a Job is deleted
while its pod is being created; unlike Kubernetes, pods orphaned on purpose go too).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import kmock

from kubetune_operator.localrun import _local_path, container_environment
from tests.support.stepping import SteppingHarness

log = logging.getLogger(__name__)

T = TypeVar("T")
Obj = dict[str, Any]

JOBS = "batch/v1/jobs"
PODS = "v1/pods"
CONFIGMAPS = "v1/configmaps"
SECRETS = "v1/secrets"

JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
LEGACY_JOB_NAME_LABEL = "job-name"
CONTROLLER_UID_LABEL = "batch.kubernetes.io/controller-uid"
LEGACY_CONTROLLER_UID_LABEL = "controller-uid"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # annotation and label
TERMINATION_MESSAGE_BYTES = 4096  # kubelet's limit for one container's message file
LOG_FALLBACK_LINES = 80  # FallbackToLogsOnError: the last 80 lines ...
LOG_FALLBACK_BYTES = 2048  # ... and at most 2 KiB of them
NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # k8s utilrand, as in generateName suffixes


def rfc3339(moment: datetime.datetime | None = None) -> str:
    """An RFC 3339 UTC timestamp with second precision, as the API server writes them."""
    moment = moment or datetime.datetime.now(datetime.UTC)
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


# ------------------------------------------------------------------------------- behaviours
@dataclass(frozen=True)
class Succeed:
    """Run for ``after`` seconds, then exit 0 (reason ``Completed``) leaving ``message``."""

    message: str = ""
    after: float = 0.0


@dataclass(frozen=True)
class Fail:
    """Run for ``after`` seconds, then exit ``exit_code`` with ``reason`` and ``message``."""

    exit_code: int = 1
    message: str = ""
    reason: str = "Error"
    after: float = 0.0


@dataclass(frozen=True)
class OOMKill:
    """Run for ``after`` seconds, then get OOM-killed (exit 137, reason ``OOMKilled``)."""

    after: float = 0.0


@dataclass(frozen=True)
class ImagePullBackOff:
    """Never start: waiting ``ErrImagePull`` and ``ImagePullBackOff`` in turn (``period`` each).

    ``image`` defaults to the container's image.
    """

    image: str | None = None
    period: float = 0.5


@dataclass(frozen=True)
class Unschedulable:
    """Never scheduled: ``PodScheduled=False`` with reason ``Unschedulable`` and ``message``."""

    message: str = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."


EVICTION_MESSAGES = {
    "EvictionByEvictionAPI": "Eviction API: evicting",
    "PreemptionByScheduler": "Kubernetes default scheduler: preempting to accommodate a higher "
    "priority pod",
    "DeletionByTaintManager": "Taint manager: deleting due to NoExecute taint",
    "TerminationByKubelet": "The node was low on resource: memory.",
}


@dataclass(frozen=True)
class Evict:
    """Run for ``after`` seconds, then get disrupted (``DisruptionTarget=True``, exit 137).

    ``reason`` is the DisruptionTarget reason (``EvictionByEvictionAPI``,
    ``PreemptionByScheduler``, ``DeletionByTaintManager`` or ``TerminationByKubelet``; the last
    one also sets the pod's ``status.reason`` to ``Evicted``, as node-pressure eviction does).
    """

    reason: str = "EvictionByEvictionAPI"
    after: float = 0.0
    message: str | None = None


@dataclass(frozen=True)
class Hang:
    """Run for ever (until the pod is deleted)."""


@dataclass(frozen=True)
class RunCommand:
    """Run the pod's real container command on this machine (see the module docstring).

    Args:
        workdir: root of the pods' local folders (``pods/<ns>/<pod>``) and of embedded S3
            storage (``s3``).
        environ: variables for the process: values of Secret-backed ``env`` entries (taking
            precedence over the emulator's Secrets) and extra ones (e.g. ``AWS_ENDPOINT_URL``).
        inherit_environ: start from this process's environment (``PATH``, the virtualenv).
        grace: seconds between SIGTERM and SIGKILL when the pod is deleted (capped by the pod's
            ``terminationGracePeriodSeconds``).
    """

    workdir: Path
    environ: dict[str, str] = field(default_factory=dict)
    inherit_environ: bool = True
    grace: float = 5.0


Behaviour = Succeed | Fail | OOMKill | ImagePullBackOff | Unschedulable | Evict | Hang | RunCommand
BehaviourFn = Callable[[Obj, Obj, int], Behaviour]


def by_attempt(*behaviours: Behaviour) -> BehaviourFn:
    """Attempt ``n`` gets ``behaviours[n]``; later attempts get the last one.

    ``by_attempt(Fail(1), Succeed("ok"))`` fails the first pod (of each index) and succeeds after.
    """
    if not behaviours:
        raise ValueError("by_attempt needs at least one behaviour")

    def choose(job: Obj, pod: Obj, attempt: int) -> Behaviour:
        del job, pod
        return behaviours[min(attempt, len(behaviours) - 1)]

    return choose


# ------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class PodRecord:
    """One pod the harness created: for assertions such as "exactly one pod per attempt"."""

    namespace: str
    job: str
    job_uid: str
    name: str
    uid: str
    index: int | None
    attempt: int
    behaviour: Behaviour


def job_condition(job: Obj | None, kind: str) -> Obj | None:
    """The Job's condition of type ``kind`` when its status is ``True``, else None."""
    for cond in ((job or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return dict(cond)
    return None


def container_status(pod: Obj | None) -> Obj:
    """The pod's first container status (``{}`` when it has none yet)."""
    statuses = ((pod or {}).get("status") or {}).get("containerStatuses") or []
    return dict(statuses[0]) if statuses else {}


def _terminal(pod: Obj) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def _pod_index(pod: Obj) -> int | None:
    value = ((pod.get("metadata") or {}).get("annotations") or {}).get(COMPLETION_INDEX)
    return int(value) if isinstance(value, str) and value.isdigit() else None


def _format_indexes(indexes: set[int]) -> str:
    """``{0, 1, 2, 5}`` -> ``"0-2,5"`` (the Job's ``completedIndexes`` format)."""
    parts: list[str] = []
    ordered = sorted(indexes)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def pod_condition(
    transitions: dict[str, tuple[str, str]],
    kind: str,
    status: bool,
    reason: str | None = None,
    message: str | None = None,
) -> Obj:
    """A pod condition; ``lastTransitionTime`` moves only when its status changes.

    ``transitions`` (condition type -> (status, time)) is the pod's memory of them.
    """
    value = "True" if status else "False"
    previous = transitions.get(kind)
    if previous is None or previous[0] != value:
        previous = transitions[kind] = (value, rfc3339())
    cond: Obj = {"type": kind, "status": value, "lastProbeTime": None}
    cond["lastTransitionTime"] = previous[1]
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    return cond


def _status_patch(current: Obj, desired: Obj) -> Obj | None:
    """A merge patch turning status ``current`` into ``desired`` (None when equal)."""
    if current == desired:
        return None
    patch: Obj = {k: v for k, v in desired.items() if current.get(k) != v}
    for key in current:
        if key not in desired:
            patch[key] = None
    return patch


# ------------------------------------------------------------------------------- processes
class _ContainerConfigError(Exception):
    """The container cannot be created yet (missing Secret, ConfigMap or key): kubelet retries."""


class _Process:
    """A container's command running locally in a thread (own session, so its group is killed)."""

    def __init__(
        self,
        name: str,
        command: list[str],
        env: dict[str, str],
        cwd: Path,
        log_path: Path,
        *,
        append: bool = False,
    ) -> None:
        self.command, self.env, self.cwd, self.log_path = command, env, cwd, log_path
        self.append = append  # keep the log of earlier runs (restarted containers)
        self.pid: int | None = None
        self.exit_code: int | None = None
        self.start_error: str | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._kill_at: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"kubelet-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def started(self) -> bool:
        """Whether the process thread was started."""
        return self._thread.ident is not None

    def _run(self) -> None:
        try:
            with self.log_path.open("ab" if self.append else "wb") as out:
                try:
                    with self._lock:
                        if self._kill_at is not None:  # deleted before it could start
                            self.exit_code = 137
                            return
                        proc = self._proc = subprocess.Popen(
                            self.command,
                            env=self.env,
                            cwd=self.cwd,
                            stdin=subprocess.DEVNULL,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                        self.pid = proc.pid
                except OSError as exc:  # the runtime's StartError: exit 128
                    self.start_error = f"failed to start container process: {exc}"
                    out.write(f"{self.start_error}\n".encode())
                    self.exit_code = 128
                    return
                while True:
                    try:
                        code = proc.wait(timeout=0.05)
                        break
                    except subprocess.TimeoutExpired:
                        kill_at = self._kill_deadline()
                        if kill_at is not None and time.monotonic() >= kill_at:
                            self._signal(signal.SIGKILL)
                self.exit_code = 128 - code if code < 0 else code  # killed by signal N: 128+N
        except Exception as exc:  # reported as the container's failure
            log.exception("running %s failed", self.command)
            self.start_error = f"kubelet harness: {exc!r}"
            self.exit_code = 128 if self.exit_code is None else self.exit_code
        finally:
            self.done.set()

    def _kill_deadline(self) -> float | None:
        with self._lock:
            return self._kill_at

    def kill(self) -> None:
        """SIGKILL the whole process group now (a crash, as a test simulates one)."""
        self._signal(signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)

    def cancel(self, grace: float) -> None:
        """SIGTERM now (the whole process group), SIGKILL after ``grace`` seconds."""
        with self._lock:
            if self._kill_at is None:
                self._kill_at = time.monotonic() + grace
        self._signal(signal.SIGTERM)

    def join(self, timeout: float) -> bool:
        """Wait for the thread (and process) to end; False if it is still running."""
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()


# ------------------------------------------------------------------------------- state
@dataclass
class _PodState:
    """What the kubelet knows of one pod."""

    namespace: str
    name: str
    uid: str
    job_uid: str
    index: int | None
    behaviour: Behaviour
    container: str
    image: str
    stage: str = "scheduled"  # scheduled | unschedulable | pending | running | terminated
    scheduled_wall: str = field(default_factory=rfc3339)
    pending_at: float = 0.0
    running_at: float = 0.0
    start_wall: str | None = None
    running_wall: str | None = None
    waiting: tuple[str, str | None] = ("ContainerCreating", None)
    terminated: Obj | None = None
    disruption: tuple[str, str] | None = None
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)
    process: _Process | None = None
    root: Path | None = None
    result_path: Path | None = None
    fallback_to_logs: bool = False
    grace: float = 5.0
    pod_ip: str = ""


@dataclass
class _JobState:
    """What the Job controller keeps between steps (k8s keeps it in status and pod finalizers)."""

    uid: str
    started: float | None = None  # harness clock at startTime
    succeeded: dict[str, int | None] = field(default_factory=dict)  # pod uid -> index
    failed: set[str] = field(default_factory=set)
    ignored: set[str] = field(default_factory=set)
    failure: tuple[str, str] | None = None  # a FailJob rule matched: (reason, message)
    active: set[str] = field(default_factory=set)  # non-terminal pods seen last step
    deleted_by_us: set[str] = field(default_factory=set)
    lost: set[str] = field(default_factory=set)  # deleted by someone else before terminating


# ------------------------------------------------------------------------------- harness
class Kubelet(SteppingHarness):
    """Moves batch/v1 Jobs and their Pods through their lifecycle in a ``KubeApi`` emulator.

    Args:
        api: the running ``tests.support.kube_api.KubeApi``.
        behaviour: one behaviour for every pod, or ``behaviour(job, pod, attempt)`` choosing
            per pod (``attempt``: pods created before it for that Job, or Job index).
        interval: seconds between background steps.
        namespace: manage Jobs of this namespace only (default: all).
        job_selector: manage Jobs matching this label selector only (default: all).
        clock: monotonic seconds (default ``time.monotonic``); a fake one makes ``after``
            delays and deadlines deterministic with ``tick()``.
        node_name: the node every scheduled pod lands on.
    """

    thread_name = "kubelet-harness"
    wait_history = 15

    def __init__(
        self,
        api: Any,
        behaviour: Behaviour | BehaviourFn | None = None,
        *,
        interval: float = 0.05,
        namespace: str | None = None,
        job_selector: str | None = None,
        clock: Callable[[], float] | None = None,
        node_name: str = "kind-worker",
    ) -> None:
        self.api = api
        self._choose: BehaviourFn
        if behaviour is None or not callable(behaviour):
            fixed: Behaviour = behaviour if behaviour is not None else Succeed()
            self._choose = lambda job, pod, attempt: fixed
        else:
            self._choose = behaviour
        self._init_stepping(interval, clock)
        self.namespace = namespace
        self.job_selector = job_selector
        self.node_name = node_name
        self._pods: dict[str, _PodState] = {}
        self._jobs: dict[str, _JobState] = {}
        self._attempts: dict[tuple[str, int | None], int] = {}
        self._records: list[PodRecord] = []
        self._reaping: list[_Process] = []

    # ------------------------------------------------------------------------ driving
    def stop(self) -> None:
        """Stop ticking, then kill every process a ``RunCommand`` pod started (pods stay)."""
        self._stop_thread()
        with self._lock:
            processes = [
                s.process for s in self._pods.values() if s.process and s.process.started
            ] + self._reaping
            self._reaping = []
            for state in self._pods.values():
                state.process = None
        for proc in processes:
            proc.cancel(grace=2.0)
        for proc in processes:
            if not proc.join(timeout=10):
                self._error(f"a RunCommand process did not end: {proc.command}")

    # ------------------------------------------------------------------------ records
    @property
    def records(self) -> list[PodRecord]:
        """Every pod this harness created, in creation order."""
        with self._lock:
            return list(self._records)

    def pods_created(self, job: str, namespace: str | None = None) -> list[PodRecord]:
        """The pods this harness created for the Job named ``job`` (any namespace by default)."""
        return [
            r
            for r in self.records
            if r.job == job and (namespace is None or r.namespace == namespace)
        ]

    def pods(self, namespace: str, job: str) -> list[Obj]:
        """The Job's pods as the API has them now, oldest first."""
        order = {r.uid: i for i, r in enumerate(self.records)}
        found = self.api.list(PODS, namespace, label_selector=f"{JOB_NAME_LABEL}={job}")
        return sorted(
            found,
            key=lambda p: (order.get(p["metadata"]["uid"], len(order)), p["metadata"]["name"]),
        )

    def log_path(self, namespace: str, pod: str) -> Path | None:
        """The output file of a RunCommand pod's process (None for other pods)."""
        with self._lock:
            for state in self._pods.values():
                if (state.namespace, state.name) == (namespace, pod) and state.root is not None:
                    return state.root / "container.log"
        return None

    # ------------------------------------------------------------------------ one step
    def tick(self) -> None:
        """One step: the kubelet moves every pod on, then the Job controller syncs every Job."""
        with self._lock:
            self.ticks += 1
            self._reap()
            jobs = self.api.list(JOBS, self.namespace, label_selector=self.job_selector)
            jobs_by_uid = {j["metadata"]["uid"]: j for j in jobs}
            pods = self.api.list(PODS, self.namespace, label_selector=CONTROLLER_UID_LABEL)
            for job in jobs:  # first seen: what happened before this harness (or a restart)
                if job["metadata"]["uid"] not in self._jobs:
                    self._seed_job(job, pods)
            by_job: dict[str, list[Obj]] = {}
            for pod in pods:
                job_uid = pod["metadata"]["labels"][CONTROLLER_UID_LABEL]
                job = jobs_by_uid.get(job_uid)
                if job is None:
                    if pod["metadata"]["uid"] in self._pods:  # created as its Job was deleted
                        self._guard(f"pod {self._id(pod)}", self._collect, pod)
                    continue  # not a Job we manage
                stepped = self._guard(f"pod {self._id(pod)}", self._kubelet_step, job, pod)
                by_job.setdefault(job_uid, []).append(stepped or pod)
            present = {p["metadata"]["uid"] for p in pods}
            for uid in [u for u in self._pods if u not in present]:
                self._forget_pod(uid, "deleted")
            for job in jobs:
                uid = job["metadata"]["uid"]
                self._guard(f"job {self._id(job)}", self._sync_job, job, by_job.get(uid, []))
            for uid in [u for u in self._jobs if u not in jobs_by_uid]:
                del self._jobs[uid]

    def _collect(self, pod: Obj) -> None:
        """The garbage collector's part: a pod of ours whose Job is gone is deleted."""
        self._forget_pod(pod["metadata"]["uid"], "garbage-collected (its Job is gone)")
        with contextlib.suppress(kmock.KubernetesError):
            self.api.delete(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"])

    # ------------------------------------------------------------------------ kubelet
    def _kubelet_step(self, job: Obj, pod: Obj) -> Obj:
        meta = pod["metadata"]
        if _terminal(pod):
            return pod
        state = self._pods.get(meta["uid"]) or self._adopt(job, pod)
        now = self.now()
        if meta.get("deletionTimestamp") and state.stage != "terminated":
            # Someone else's finalizer keeps the pod while it terminates: stop it (SIGTERM).
            if state.process is not None:
                self._forget_process(state)
            self._terminate(state, 143, "Error", "")
        elif state.stage == "scheduled":
            self._enter_pending(state, pod)
        elif state.stage == "pending":
            self._step_pending(state, pod)
        elif state.stage == "running":
            self._step_running(state, now)
        return self._write_pod_status(state, pod)

    def _adopt(self, job: Obj, pod: Obj) -> _PodState:
        """A live pod this harness did not create (a restarted harness): script it now."""
        key = (job["metadata"]["uid"], _pod_index(pod))
        attempt = self._attempts.get(key, 0)
        self._attempts[key] = attempt + 1
        state = self._new_state(job, pod, self._choose(job, pod, attempt))
        phase = (pod.get("status") or {}).get("phase")
        if phase == "Running":
            state.stage, state.running_at = "running", self.now()
            state.start_wall = state.running_wall = rfc3339()
            if isinstance(state.behaviour, RunCommand):  # its process is gone: start again
                state.stage = "pending"
        self._pods[state.uid] = state
        self._note(f"adopted pod {self._id(pod)} ({state.behaviour})")
        return state

    def _new_state(self, job: Obj, pod: Obj, behaviour: Behaviour) -> _PodState:
        container = self._container(pod)
        return _PodState(
            namespace=pod["metadata"]["namespace"],
            name=pod["metadata"]["name"],
            uid=pod["metadata"]["uid"],
            job_uid=job["metadata"]["uid"],
            index=_pod_index(pod),
            behaviour=behaviour,
            container=container.get("name", "runtime"),
            image=container.get("image", ""),
            stage="unschedulable" if isinstance(behaviour, Unschedulable) else "scheduled",
            pod_ip=f"10.244.{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 2}",
        )

    @staticmethod
    def _container(pod: Obj) -> Obj:
        containers = (pod.get("spec") or {}).get("containers") or [{}]
        return next((c for c in containers if c.get("name") == "runtime"), containers[0])

    def _enter_pending(self, state: _PodState, pod: Obj) -> None:
        state.stage, state.pending_at, state.start_wall = "pending", self.now(), rfc3339()
        self._note(f"pod {state.namespace}/{state.name} Pending (creating its container)")
        if isinstance(state.behaviour, RunCommand):
            self._prepare_command(state, pod)

    def _step_pending(self, state: _PodState, pod: Obj) -> None:
        behaviour = state.behaviour
        if isinstance(behaviour, ImagePullBackOff):
            return  # waiting for ever: the status renders the current back-off phase
        if isinstance(behaviour, RunCommand):
            if state.process is None and not self._prepare_command(state, pod):
                return  # CreateContainerConfigError: retried every step
            assert state.process is not None
            state.process.start()
        state.stage, state.running_at, state.running_wall = "running", self.now(), rfc3339()
        self._note(f"pod {state.namespace}/{state.name} Running ({behaviour})")

    def _step_running(self, state: _PodState, now: float) -> None:
        behaviour = state.behaviour
        elapsed = now - state.running_at
        if isinstance(behaviour, Succeed) and elapsed >= behaviour.after:
            self._terminate(state, 0, "Completed", behaviour.message)
        elif isinstance(behaviour, Fail) and elapsed >= behaviour.after:
            self._terminate(state, behaviour.exit_code, behaviour.reason, behaviour.message)
        elif isinstance(behaviour, OOMKill) and elapsed >= behaviour.after:
            self._terminate(state, 137, "OOMKilled", "")
        elif isinstance(behaviour, Evict) and elapsed >= behaviour.after:
            message = behaviour.message or EVICTION_MESSAGES.get(behaviour.reason, "evicting")
            state.disruption = (behaviour.reason, message)
            self._terminate(state, 137, "Error", "")
        elif isinstance(behaviour, RunCommand) and state.process and state.process.done.is_set():
            self._finish_command(state)

    def _terminate(self, state: _PodState, exit_code: int, reason: str, message: str) -> None:
        state.stage = "terminated"
        state.terminated = {
            "exitCode": exit_code,
            "reason": reason,
            **({"message": message} if message else {}),
            "startedAt": state.running_wall or rfc3339(),
            "finishedAt": rfc3339(),
            "containerID": f"containerd://{secrets.token_hex(32)}",
        }
        phase = "Succeeded" if exit_code == 0 else "Failed"
        self._note(f"pod {state.namespace}/{state.name} {phase} (exit {exit_code} {reason})")

    def _render(self, state: _PodState) -> Obj:
        """The pod's full status for its current stage, as the kubelet reports it."""
        if state.stage == "unschedulable":
            assert isinstance(state.behaviour, Unschedulable)
            cond = pod_condition(
                state.transitions, "PodScheduled", False, "Unschedulable", state.behaviour.message
            )
            return {"phase": "Pending", "conditions": [cond], "qosClass": "Burstable"}
        if state.stage == "scheduled":
            return {
                "phase": "Pending",
                "conditions": [pod_condition(state.transitions, "PodScheduled", True)],
                "qosClass": "Burstable",
            }
        base: Obj = {
            "hostIP": "172.18.0.2",
            "hostIPs": [{"ip": "172.18.0.2"}],
            "podIP": state.pod_ip,
            "podIPs": [{"ip": state.pod_ip}],
            "startTime": state.start_wall,
            "qosClass": "Burstable",
        }
        container: Obj = {
            "name": state.container,
            "image": state.image,
            "imageID": "",
            "restartCount": 0,
            "ready": False,
            "started": False,
        }
        unready = f"containers with unready status: [{state.container}]"
        if state.stage == "pending":
            reason, message = self._waiting(state)
            waiting: Obj = {"reason": reason}
            if message:
                waiting["message"] = message
            container["state"] = {"waiting": waiting}
            conditions = [
                pod_condition(
                    state.transitions, "PodReadyToStartContainers", reason != "ContainerCreating"
                ),
                pod_condition(state.transitions, "Initialized", True),
                pod_condition(state.transitions, "Ready", False, "ContainersNotReady", unready),
                pod_condition(
                    state.transitions, "ContainersReady", False, "ContainersNotReady", unready
                ),
                pod_condition(state.transitions, "PodScheduled", True),
            ]
            return {
                "phase": "Pending",
                "conditions": conditions,
                **base,
                "containerStatuses": [container],
            }
        container["imageID"] = f"{state.image.split(':')[0]}@sha256:{'0' * 64}"
        if state.stage == "running":
            container.update(
                ready=True,
                started=True,
                containerID=f"containerd://{state.uid.replace('-', '')}",
                state={"running": {"startedAt": state.running_wall}},
            )
            conditions = [
                pod_condition(state.transitions, "PodReadyToStartContainers", True),
                pod_condition(state.transitions, "Initialized", True),
                pod_condition(state.transitions, "Ready", True),
                pod_condition(state.transitions, "ContainersReady", True),
                pod_condition(state.transitions, "PodScheduled", True),
            ]
            return {
                "phase": "Running",
                "conditions": conditions,
                **base,
                "containerStatuses": [container],
            }
        terminated = dict(state.terminated or {})
        container["containerID"] = terminated.pop("containerID", "")
        container["state"] = {"terminated": terminated}
        phase = "Succeeded" if terminated.get("exitCode") == 0 else "Failed"
        done = "PodCompleted" if phase == "Succeeded" else "PodFailed"
        conditions = [
            pod_condition(state.transitions, "PodReadyToStartContainers", False),
            pod_condition(
                state.transitions,
                "Initialized",
                True,
                "PodCompleted" if phase == "Succeeded" else None,
            ),
            pod_condition(state.transitions, "Ready", False, done),
            pod_condition(state.transitions, "ContainersReady", False, done),
            pod_condition(state.transitions, "PodScheduled", True),
        ]
        status: Obj = {"phase": phase, "conditions": conditions, **base}
        if state.disruption is not None:
            reason, message = state.disruption
            conditions.append(
                pod_condition(state.transitions, "DisruptionTarget", True, reason, message)
            )
            if reason == "TerminationByKubelet":
                status.update(reason="Evicted", message=message)
        status["containerStatuses"] = [container]
        return status

    def _waiting(self, state: _PodState) -> tuple[str, str | None]:
        behaviour = state.behaviour
        if isinstance(behaviour, ImagePullBackOff):
            image = behaviour.image or state.image
            turn = int((self.now() - state.pending_at) / max(behaviour.period, 1e-6)) % 2
            if turn == 0:
                return "ErrImagePull", (
                    f'failed to pull and unpack image "{image}": failed to resolve reference '
                    f'"{image}": not found'
                )
            return "ImagePullBackOff", f'Back-off pulling image "{image}"'
        return state.waiting

    def _write_pod_status(self, state: _PodState, pod: Obj) -> Obj:
        current = pod.get("status") or {}
        patch = _status_patch(current, self._render(state))
        if patch is None:
            return pod
        updated: Obj = self.api.patch(
            PODS, state.namespace, state.name, {"status": patch}, subresource="status"
        )
        return updated

    def _forget_pod(self, uid: str, why: str) -> None:
        state = self._pods.pop(uid)
        if state.process is not None:
            self._note(f"pod {state.namespace}/{state.name} {why}: stopping its process")
            self._forget_process(state)

    def _forget_process(self, state: _PodState) -> None:
        process, state.process = state.process, None
        if process is not None and process.started and not process.done.is_set():
            process.cancel(state.grace)
            self._reaping.append(process)

    def _reap(self) -> None:
        self._reaping = [p for p in self._reaping if not p.done.is_set()]

    # ------------------------------------------------------------------------ RunCommand
    def _prepare_command(self, state: _PodState, pod: Obj) -> bool:
        """Materialize volumes and env and create the (not yet started) process.

        Returns False (and sets the waiting reason) when something the pod needs is missing.
        """
        behaviour = state.behaviour
        assert isinstance(behaviour, RunCommand)
        try:
            process = self._build_process(state, pod, behaviour)
        except _ContainerConfigError as exc:
            if state.waiting != ("CreateContainerConfigError", str(exc)):
                self._note(f"pod {state.namespace}/{state.name}: {exc}")
            state.waiting = ("CreateContainerConfigError", str(exc))
            return False
        state.process, state.waiting = process, ("ContainerCreating", None)
        return True

    def _build_process(self, state: _PodState, pod: Obj, behaviour: RunCommand) -> _Process:
        spec = pod.get("spec") or {}
        container = self._container(pod)
        workdir = Path(behaviour.workdir).resolve()
        root = workdir / "pods" / state.namespace / state.name
        volumes_dir = root / "volumes"
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        result_path = root / "termination-log"
        message_path = container.get("terminationMessagePath") or "/dev/termination-log"
        mounts: dict[str, Path] = {message_path: result_path}
        files: list[tuple[Path, bytes, int | None]] = []
        for mount in container.get("volumeMounts") or []:
            local = volumes_dir / mount["name"]
            mounts[mount["mountPath"]] = local
            volume = volumes.get(mount["name"])
            if volume is None:
                raise _ContainerConfigError(f'volume "{mount["name"]}" is not in the pod spec')
            files += [
                (local / rel, data, mode) for rel, data, mode in self._volume_files(state, volume)
            ]
        if not container.get("command"):
            raise _ContainerConfigError("no command: image entrypoints are unknown here")
        resolved = self._resolve_env(state, pod, container, behaviour.environ)
        # Everything the container needs exists: write its volumes out.
        root.mkdir(parents=True, exist_ok=True)
        for path in mounts.values():
            if path != result_path:
                path.mkdir(parents=True, exist_ok=True)
        for path, data, mode in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)  # a read-only file from an earlier try
            path.write_bytes(_map_json_paths(data, mounts) if path.suffix == ".json" else data)
            if mode is not None:
                path.chmod(mode)
        result_path.write_bytes(b"")
        usable = {
            **container,
            "env": [v for v in container.get("env") or [] if "value" in v or v["name"] in resolved],
        }
        env = dict(os.environ) if behaviour.inherit_environ else {}
        env.update(behaviour.environ)
        env.update(container_environment(usable, mounts, resolved))
        env["KUBETUNE_RESULT_PATH"] = str(result_path)
        env["HF_HUB_OFFLINE"] = behaviour.environ.get("HF_HUB_OFFLINE", "1")
        if "KUBETUNE_LOCAL_S3_ROOT" not in env and not self._has_s3_endpoint(files, env):
            env["KUBETUNE_LOCAL_S3_ROOT"] = str(workdir / "s3")
        # Container paths in the arguments map to the pod's local folders. The executable and
        # anything inside this Python installation are host paths already: a checkout under
        # /tmp (CI) must not have its interpreter mapped into the pod's /tmp volume.
        host = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})
        command = [
            a if i == 0 or a.startswith(host) else _local_path(a, mounts)
            for i, a in enumerate(
                [*(container.get("command") or []), *(container.get("args") or [])]
            )
        ]
        if command[0] == "kubetune-runtime":  # this installation's runtime, not one on PATH
            command = [sys.executable, "-m", "kubetune_runtime.entrypoint", *command[1:]]
        cwd = (
            Path(_local_path(container["workingDir"], mounts))
            if container.get("workingDir")
            else root
        )
        cwd.mkdir(parents=True, exist_ok=True)
        state.root, state.result_path = root, result_path
        state.fallback_to_logs = (
            container.get("terminationMessagePolicy") == "FallbackToLogsOnError"
        )
        grace = spec.get("terminationGracePeriodSeconds")
        state.grace = min(behaviour.grace, float(grace)) if grace is not None else behaviour.grace
        self._note(f"pod {state.namespace}/{state.name}: {' '.join(command)}")
        return _Process(state.name, command, env, cwd, root / "container.log")

    @staticmethod
    def _has_s3_endpoint(files: list[tuple[Path, bytes, int | None]], env: dict[str, str]) -> bool:
        if env.get("AWS_ENDPOINT_URL"):
            return True
        for path, data, _ in files:
            if path.name == "run.json":
                with contextlib.suppress(ValueError, AttributeError):
                    storage = json.loads(data).get("storage") or {}
                    return bool(storage.get("endpoint_url") or storage.get("endpointUrl"))
        return False

    def _source(self, state: _PodState, resource: str, name: str, optional: bool) -> Obj | None:
        obj: Obj | None = self.api.get(resource, state.namespace, name)
        if obj is None and not optional:
            kind = "secret" if resource == SECRETS else "configmap"
            raise _ContainerConfigError(f'{kind} "{name}" not found')
        return obj

    def _volume_files(
        self, state: _PodState, volume: Obj
    ) -> Iterator[tuple[str, bytes, int | None]]:
        """``(relative path, content, mode)`` of a ConfigMap or Secret volume's files."""
        if "configMap" in volume or "secret" in volume:
            is_secret = "secret" in volume
            source = volume["secret"] if is_secret else volume["configMap"]
            name = source.get("secretName" if is_secret else "name", "")
            obj = self._source(
                state, SECRETS if is_secret else CONFIGMAPS, name, source.get("optional", False)
            )
            data = _object_data(obj) if obj is not None else {}
            mode = source.get("defaultMode")
            items = source.get("items")
            if items:
                for item in items:
                    if item["key"] not in data:
                        if source.get("optional"):
                            continue
                        kind = "Secret" if is_secret else "ConfigMap"
                        raise _ContainerConfigError(
                            f"couldn't find key {item['key']} in {kind} {state.namespace}/{name}"
                        )
                    yield item["path"], data[item["key"]], item.get("mode", mode)
            else:
                for key, value in data.items():
                    yield key, value, mode
        # emptyDir and everything else: an empty folder (made by the caller)

    def _resolve_env(
        self, state: _PodState, pod: Obj, container: Obj, environ: dict[str, str]
    ) -> dict[str, str]:
        """Values of the container's ``valueFrom`` variables (missing optional ones left out)."""
        resolved: dict[str, str] = {}
        for var in container.get("env") or []:
            source = var.get("valueFrom")
            if "value" in var or not source:
                continue
            if "secretKeyRef" in source or "configMapKeyRef" in source:
                is_secret = "secretKeyRef" in source
                ref = source["secretKeyRef" if is_secret else "configMapKeyRef"]
                if is_secret and var["name"] in environ:
                    resolved[var["name"]] = environ[var["name"]]
                    continue
                optional = bool(ref.get("optional"))
                obj = self._source(
                    state, SECRETS if is_secret else CONFIGMAPS, ref["name"], optional
                )
                data = _object_data(obj) if obj is not None else {}
                if ref["key"] in data:
                    resolved[var["name"]] = data[ref["key"]].decode("utf-8")
                elif not optional:
                    kind = "Secret" if is_secret else "ConfigMap"
                    raise _ContainerConfigError(
                        f"couldn't find key {ref['key']} in {kind} {state.namespace}/{ref['name']}"
                    )
            elif "fieldRef" in source:
                resolved[var["name"]] = _field_value(pod, source["fieldRef"]["fieldPath"], state)
        return resolved

    def _finish_command(self, state: _PodState) -> None:
        process = state.process
        assert process is not None
        assert state.result_path is not None
        code = process.exit_code if process.exit_code is not None else 128
        raw = (
            state.result_path.read_bytes()[:TERMINATION_MESSAGE_BYTES]
            if state.result_path.is_file()
            else b""
        )
        message = raw.decode("utf-8", errors="replace")
        if not message.strip() and code != 0 and state.fallback_to_logs:
            lines = process.log_path.read_bytes().splitlines()[-LOG_FALLBACK_LINES:]
            message = b"\n".join(lines)[-LOG_FALLBACK_BYTES:].decode("utf-8", errors="replace")
        if process.start_error:
            self._terminate(state, code, "StartError", process.start_error)
        else:
            self._terminate(state, code, "Completed" if code == 0 else "Error", message)
        state.process = None

    # ------------------------------------------------------------------------ Job controller
    def _sync_job(self, job: Obj, pods: list[Obj]) -> None:
        meta, spec = job["metadata"], job.get("spec") or {}
        if meta.get("deletionTimestamp"):
            return
        state = self._jobs.get(meta["uid"]) or self._seed_job(job, pods)
        status: Obj = copy.deepcopy(job.get("status") or {})
        if job_condition(job, "Complete") or job_condition(job, "Failed"):
            self._delete_active(job, pods, state, "the Job is finished")
            return

        present = {p["metadata"]["uid"] for p in pods}
        for gone in state.active - present - state.deleted_by_us:
            state.lost.add(gone)
            self._note(f"job {self._id(job)}: pod {gone} vanished before terminating (failed)")
        self._account(job, pods, state)
        active = [
            p for p in pods if not _terminal(p) and not p["metadata"].get("deletionTimestamp")
        ]
        conditions: list[Obj] = list(status.get("conditions") or [])
        now_wall = rfc3339()

        if spec.get("suspend"):
            for pod in active:
                self._delete_pod(pod, state, "the Job is suspended")
            active = []
            state.started = None
            _set_condition(conditions, "Suspended", "True", "JobSuspended", "Job suspended")
        else:
            if _set_condition(
                conditions,
                "Suspended",
                "False",
                "JobResumed",
                "Job resumed",
                only_update=True,
            ):
                status.pop("startTime", None)  # resuming restarts the clock (and the deadline)
                state.started = None
            finished = self._finish(job, state, conditions)
            if finished is not None:
                status.pop("completionTime", None)
                if finished == "Complete":
                    status["completionTime"] = now_wall
                for pod in active:
                    self._delete_pod(pod, state, f"the Job {finished.lower()}")
                active = []
            else:
                active += self._create_pods(job, active, state)
                if state.started is None:  # (re)started now: the deadline counts from here
                    state.started = self.now()
                    status["startTime"] = now_wall
        state.active = {p["metadata"]["uid"] for p in active}
        self._write_job_status(job, status, conditions, active, state)

    def _seed_job(self, job: Obj, pods: list[Obj]) -> _JobState:
        """State for a Job first seen now (created earlier, or this harness restarted).

        Its deadline counts from its ``startTime``; attempts count its terminated pods (a live
        pod is adopted by the kubelet step as the next attempt).
        """
        state = self._jobs[job["metadata"]["uid"]] = _JobState(uid=job["metadata"]["uid"])
        started = _parse_time((job.get("status") or {}).get("startTime"))
        if started is not None:
            age = (datetime.datetime.now(datetime.UTC) - started).total_seconds()
            state.started = self.now() - max(age, 0.0)
        for pod in pods:
            if pod["metadata"]["labels"].get(CONTROLLER_UID_LABEL) == state.uid and _terminal(pod):
                key = (state.uid, _pod_index(pod))
                self._attempts[key] = self._attempts.get(key, 0) + 1
        self._note(f"job {self._id(job)}: managing it")
        return state

    def _account(self, job: Obj, pods: list[Obj], state: _JobState) -> None:
        """Count every newly terminated pod: succeeded, failed, or ignored by the policy."""
        rules = ((job.get("spec") or {}).get("podFailurePolicy") or {}).get("rules") or []
        counted = state.failed | state.ignored | set(state.succeeded)
        for pod in pods:
            uid = pod["metadata"]["uid"]
            phase = (pod.get("status") or {}).get("phase")
            if uid in counted or phase not in ("Succeeded", "Failed"):
                continue
            if phase == "Succeeded":
                state.succeeded[uid] = _pod_index(pod)
                continue
            action, message = _match_failure_policy(rules, pod)
            if action == "Ignore":
                state.ignored.add(uid)
                self._note(f"job {self._id(job)}: pod {self._id(pod)} failure ignored ({message})")
                continue
            state.failed.add(uid)
            if action == "FailJob" and state.failure is None:
                state.failure = ("PodFailurePolicy", message)

    def _finish(self, job: Obj, state: _JobState, conditions: list[Obj]) -> str | None:
        """Add the terminal conditions when the Job is done; returns Complete, Failed or None."""
        spec = job.get("spec") or {}
        completions = int(spec.get("completions") or 1)
        failure: tuple[str, str] | None = state.failure
        failed = len(state.failed) + len(state.lost)
        if failure is None and failed > int(spec.get("backoffLimit", 6)):
            failure = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
        deadline = spec.get("activeDeadlineSeconds")
        if (
            failure is None
            and deadline is not None
            and state.started is not None
            and self.now() - state.started >= float(deadline)
        ):
            failure = ("DeadlineExceeded", "Job was active longer than specified deadline")
        if failure is not None:
            reason, message = failure
            _set_condition(conditions, "FailureTarget", "True", reason, message)
            _set_condition(conditions, "Failed", "True", reason, message)
            self._note(f"job {self._id(job)} Failed: {reason}: {message}")
            return "Failed"
        if self._succeeded_count(job, state) >= completions:
            _set_condition(
                conditions,
                "Complete",
                "True",
                "CompletionsReached",
                "Reached expected number of succeeded pods",
            )
            self._note(f"job {self._id(job)} Complete")
            return "Complete"
        return None

    @staticmethod
    def _indexed(job: Obj) -> bool:
        return (job.get("spec") or {}).get("completionMode") == "Indexed"

    def _succeeded_count(self, job: Obj, state: _JobState) -> int:
        if self._indexed(job):
            return len({i for i in state.succeeded.values() if i is not None})
        return len(state.succeeded)

    def _create_pods(self, job: Obj, active: list[Obj], state: _JobState) -> list[Obj]:
        spec = job.get("spec") or {}
        completions = int(spec.get("completions") or 1)
        parallelism = int(spec["parallelism"]) if spec.get("parallelism") is not None else 1
        room = parallelism - len(active)
        wanted: list[int | None]
        if self._indexed(job):
            busy = {_pod_index(p) for p in active}
            done = {i for i in state.succeeded.values() if i is not None}
            free = [i for i in range(completions) if i not in busy and i not in done]
            wanted = list(free[: max(room, 0)])
        else:
            left = completions - self._succeeded_count(job, state)
            wanted = [None] * max(min(room, left - len(active)), 0)
        return [self._create_pod(job, index) for index in wanted]

    def _create_pod(self, job: Obj, index: int | None) -> Obj:
        meta = job["metadata"]
        name, uid, namespace = meta["name"], meta["uid"], meta["namespace"]
        template = copy.deepcopy((job.get("spec") or {}).get("template") or {})
        tmeta = template.get("metadata") or {}
        labels = {
            **(tmeta.get("labels") or {}),
            JOB_NAME_LABEL: name,
            LEGACY_JOB_NAME_LABEL: name,
            CONTROLLER_UID_LABEL: uid,
            LEGACY_CONTROLLER_UID_LABEL: uid,
        }
        annotations = dict(tmeta.get("annotations") or {})
        pod_spec: Obj = template.get("spec") or {}
        prefix = f"{name}-"
        if index is not None:
            labels[COMPLETION_INDEX] = annotations[COMPLETION_INDEX] = str(index)
            prefix = f"{name}-{index}-"
            pod_spec.setdefault("hostname", f"{name}-{index}")
            for container in pod_spec.get("containers") or []:
                env = container.setdefault("env", [])
                if not any(v.get("name") == "JOB_COMPLETION_INDEX" for v in env):
                    path = f"metadata.annotations['{COMPLETION_INDEX}']"
                    env.append(
                        {
                            "name": "JOB_COMPLETION_INDEX",
                            "valueFrom": {"fieldRef": {"fieldPath": path}},
                        }
                    )
        key = (uid, index)
        attempt = self._attempts.get(key, 0)
        pod: Obj = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": prefix,
                "name": "",
                "namespace": namespace,
                "labels": labels,
                **({"annotations": annotations} if annotations else {}),
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": name,
                        "uid": uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": pod_spec,
        }
        pod["metadata"]["name"] = _random_name(prefix)
        behaviour = self._choose(job, copy.deepcopy(pod), attempt)
        if not isinstance(behaviour, Unschedulable):
            pod_spec["nodeName"] = self.node_name  # bound at once (scheduler and kubelet in one)
        created: Obj | None = None
        for _ in range(5):
            try:
                created = self.api.create(PODS, pod, namespace)
                break
            except kmock.KubernetesError as exc:
                if exc.status != 409 or exc.reason != "AlreadyExists":
                    raise
                pod["metadata"]["name"] = _random_name(prefix)
        if created is None:
            raise RuntimeError(f"could not find a free pod name for {prefix}*")
        self._attempts[key] = attempt + 1
        state = self._new_state(job, created, behaviour)
        self._pods[state.uid] = state
        self._records.append(
            PodRecord(namespace, name, uid, state.name, state.uid, index, attempt, behaviour)
        )
        self._note(
            f"job {namespace}/{name}: created pod {state.name} (attempt {attempt}, {behaviour})"
        )
        # The API server gives a new pod phase Pending; the scheduler then binds it (or not).
        return self._write_pod_status(state, created)

    def _delete_pod(self, pod: Obj, state: _JobState, why: str) -> None:
        uid = pod["metadata"]["uid"]
        state.deleted_by_us.add(uid)
        try:
            self.api.delete(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"])
        except kmock.KubernetesError as exc:
            if exc.status != 404:
                raise
        self._note(f"deleted pod {self._id(pod)}: {why}")
        if uid in self._pods:
            self._forget_pod(uid, why)

    def _delete_active(self, job: Obj, pods: list[Obj], state: _JobState, why: str) -> None:
        for pod in pods:
            if not _terminal(pod) and not pod["metadata"].get("deletionTimestamp"):
                self._delete_pod(pod, state, why)
        status = job.get("status") or {}
        if status.get("active") or status.get("ready"):
            patch = {"active": None, "ready": 0}
            self.api.patch(
                JOBS,
                job["metadata"]["namespace"],
                job["metadata"]["name"],
                {"status": patch},
                subresource="status",
            )
        state.active = set()

    def _write_job_status(
        self, job: Obj, status: Obj, conditions: list[Obj], active: list[Obj], state: _JobState
    ) -> None:
        desired = dict(status)
        counts = {
            "active": len(active),
            "succeeded": len(state.succeeded),
            "failed": len(state.failed) + len(state.lost),
        }
        for key, value in counts.items():  # omitted when zero, as the API omits them
            if value:
                desired[key] = value
            else:
                desired.pop(key, None)
        desired["ready"] = sum(
            1
            for p in active
            if any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in (p.get("status") or {}).get("conditions") or []
            )
        )
        if self._indexed(job):
            done = {i for i in state.succeeded.values() if i is not None}
            if done:
                desired["completedIndexes"] = _format_indexes(done)
        if conditions:
            desired["conditions"] = conditions
        desired.setdefault("uncountedTerminatedPods", {})
        patch = _status_patch(job.get("status") or {}, desired)
        if patch is not None:
            meta = job["metadata"]
            self.api.patch(
                JOBS, meta["namespace"], meta["name"], {"status": patch}, subresource="status"
            )


# ------------------------------------------------------------------------------- helpers
def _random_name(prefix: str) -> str:
    return prefix + "".join(secrets.choice(NAME_ALPHABET) for _ in range(5))


def _object_data(obj: Obj) -> dict[str, bytes]:
    """A ConfigMap's or Secret's keys as bytes (Secret ``data`` is base64; ``stringData`` too)."""
    if obj.get("kind") == "Secret":
        data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        data.update({k: str(v).encode() for k, v in (obj.get("stringData") or {}).items()})
        return data
    data = {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
    data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return data


def _map_json_paths(data: bytes, mounts: dict[str, Path]) -> bytes:
    """Container paths in a JSON document's string values, mapped to their local folders."""
    try:
        doc = json.loads(data)
    except ValueError:
        return data

    def walk(value: Any) -> Any:
        if isinstance(value, str) and value.startswith("/"):
            return _local_path(value, mounts)
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return json.dumps(walk(doc), indent=2).encode()


def _field_value(pod: Obj, path: str, state: _PodState) -> str:
    """The downward API value of ``fieldPath`` for this pod."""
    return field_value(pod, path, state.pod_ip)


def field_value(pod: Obj, path: str, pod_ip: str, host_ip: str = "172.18.0.2") -> str:
    """The downward API value of ``fieldPath`` for this pod."""
    meta = pod.get("metadata") or {}
    for prefix, source in (("metadata.labels", "labels"), ("metadata.annotations", "annotations")):
        if path.startswith(prefix + "['") and path.endswith("']"):
            return str((meta.get(source) or {}).get(path[len(prefix) + 2 : -2], ""))
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": (pod.get("spec") or {}).get("nodeName", ""),
        "spec.serviceAccountName": (pod.get("spec") or {}).get("serviceAccountName", "default"),
        "status.podIP": pod_ip,
        "status.hostIP": host_ip,
    }
    return str(simple.get(path, ""))


def _match_failure_policy(rules: list[Obj], pod: Obj) -> tuple[str | None, str]:
    """The first ``podFailurePolicy`` rule matching a Failed pod: (action, k8s message)."""
    meta, status = pod["metadata"], pod.get("status") or {}
    where = f"{meta.get('namespace')}/{meta.get('name')}"
    for i, rule in enumerate(rules):
        action = rule.get("action")
        on_codes = rule.get("onExitCodes")
        if on_codes:
            values = {int(v) for v in on_codes.get("values") or []}
            for cs in status.get("containerStatuses") or []:
                term = (cs.get("state") or {}).get("terminated")
                if term is None or on_codes.get("containerName") not in (None, cs.get("name")):
                    continue
                code = int(term.get("exitCode", 0))
                if code == 0:
                    continue  # exit code 0 never matches a rule
                if (code in values) == (on_codes.get("operator", "In") == "In"):
                    return action, (
                        f"Container {cs.get('name')} for pod {where} failed with exit code "
                        f"{code} matching {action} rule at index {i}"
                    )
        for pattern in rule.get("onPodConditions") or []:
            for cond in status.get("conditions") or []:
                if cond.get("type") == pattern.get("type") and cond.get("status") == pattern.get(
                    "status", "True"
                ):
                    return action, (
                        f"Pod {where} has condition {cond.get('type')} matching {action} rule "
                        f"at index {i}"
                    )
    return None, ""


def _set_condition(
    conditions: list[Obj],
    kind: str,
    status: str,
    reason: str,
    message: str,
    *,
    only_update: bool = False,
) -> bool:
    """Set a Job condition in place; returns whether its status changed.

    ``only_update`` changes an existing condition but never adds one (e.g. ``Suspended=False``
    for a Job that was never suspended).
    """
    now = rfc3339()
    for cond in conditions:
        if cond.get("type") == kind:
            if cond.get("status") == status:
                return False
            cond.update(
                status=status,
                reason=reason,
                message=message,
                lastProbeTime=now,
                lastTransitionTime=now,
            )
            return True
    if only_update:
        return False
    conditions.append(
        {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message,
            "lastProbeTime": now,
            "lastTransitionTime": now,
        }
    )
    return True


__all__ = [
    "Behaviour",
    "BehaviourFn",
    "Evict",
    "Fail",
    "Hang",
    "ImagePullBackOff",
    "Kubelet",
    "OOMKill",
    "PodRecord",
    "RunCommand",
    "Succeed",
    "Unschedulable",
    "by_attempt",
    "container_status",
    "job_condition",
    "rfc3339",
]
