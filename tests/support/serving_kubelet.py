"""A scripted "Deployment controller + ReplicaSet controller + kubelet" for long-running pods.

The fake API server (``kube_api.KubeApi``) only stores objects; nothing moves an apps/v1
Deployment forward. :class:`ServingKubelet` plays the cluster components an AdapterDeployment's
serving pods depend on, for the parts our operator reads (``kubelet.Kubelet`` does the same for
batch/v1 Jobs):

* the **Deployment controller**: one ReplicaSet per pod template (``<deploy>-<hash>``, label
  ``pod-template-hash``, controller owner reference, ``deployment.kubernetes.io/revision``,
  ``desired-replicas`` and ``max-replicas`` annotations), scaling with ``spec.replicas``, rolling
  out template changes with ``RollingUpdate`` (``maxSurge`` / ``maxUnavailable``, 25% by default,
  surge rounded up and unavailability down, old pods go only as new ones become available) or
  ``Recreate`` (old pods gone before new ones are created); old ReplicaSets are scaled to 0 and
  kept. Deployment status through ``/status``: ``observedGeneration``, ``replicas``,
  ``updatedReplicas``, ``readyReplicas``, ``availableReplicas``, ``unavailableReplicas`` (zeros
  omitted, as the API omits them) and the conditions ``Available``
  (``MinimumReplicasAvailable`` / ``MinimumReplicasUnavailable``) and ``Progressing``
  (``NewReplicaSetCreated``, ``ReplicaSetUpdated``, ``NewReplicaSetAvailable``,
  ``ProgressDeadlineExceeded`` after ``progressDeadlineSeconds`` without progress,
  ``DeploymentPaused``);
* the **ReplicaSet controller**: creates pods ``<rs>-<random5>`` (template labels, controller
  owner reference) and deletes surplus ones (not ready first, then newest); ReplicaSet status
  (``replicas``, ``fullyLabeledReplicas``, ``readyReplicas``, ``availableReplicas``,
  ``observedGeneration``);
* the **kubelet** for pods owned by a ReplicaSet: ``initContainers`` run to completion in order
  (a native sidecar, ``restartPolicy: Always``, only has to start), then every container starts;
  ``restartPolicy: Always``: a container that exits is restarted after a back-off (waiting
  ``CrashLoopBackOff``, ``restartCount`` + 1, ``lastState.terminated``), a failing init container
  too (the pod stays Pending). ``httpGet`` and ``tcpSocket`` readiness, liveness and startup
  probes against the pod's IP (``port`` by number or container-port name; ``successThreshold``,
  ``failureThreshold``); real-shaped ``containerStatuses`` / ``initContainerStatuses`` and the
  conditions ``PodReadyToStartContainers``, ``Initialized``, ``ContainersReady``, ``Ready``,
  ``PodScheduled``; ``podIP`` / ``podIPs`` / ``hostIP`` / ``hostIPs``.

The test chooses each pod's behaviour with a callable ``behaviour(deployment, pod, ordinal)``
(the owning Deployment, ``{}`` for a bare ReplicaSet; the Pod as created; ``ordinal``: pods
created before it for the same Deployment), or one behaviour for every pod:

========================  ====================================================================
behaviour                 what the pod does
========================  ====================================================================
``Serve(ready_after)``    Running with no process; Ready ``ready_after`` seconds later
``FakeAgent(status_fn)``  like ``Serve``, and an HTTP server on the pod's IP at the container
                          port named ``agent-status`` (else 8090): ``GET /status`` answers
                          ``status_fn(pod)``; ``/readyz`` 200/503 from its ``ready`` field,
                          ``/healthz`` from ``healthy`` (default true). Probes on that port
                          are real (the pod turns unready when ``ready`` is false)
``CrashLoop(exit_code)``  its containers exit ``after`` seconds after each start, for ever
``ImagePullBackOff()``    Pending for ever, waiting ``ErrImagePull`` / ``ImagePullBackOff``
``RunContainers(wd)``     runs every container's real command on this machine (below)
========================  ====================================================================

``RunContainers`` maps the pod's volumes to folders under ``<workdir>/pods/<ns>/<pod>/volumes``
(one folder per volume, shared by the containers that mount it: an ``emptyDir`` is one folder
per pod). ConfigMap and Secret volumes are written out as the kubelet's atomic writer does
(``..<stamp>/`` holding the files, a ``..data`` symlink swapped with ``os.replace``, a top-level
symlink per key) and **refreshed in place** when the object's data changes in the API (after
``configmap_sync_delay`` seconds), without restarting anything. Like ``kubelet.RunCommand`` it
resolves ``env`` / ``envFrom`` (Secret and ConfigMap keys from the emulator, ``environ`` taking
precedence for Secret-backed values, ``fieldRef`` from the pod), replaces ``kubetune-runtime``
with this interpreter's ``-m kubetune_runtime.entrypoint``, sets ``HF_HUB_OFFLINE=1`` and
``KUBETUNE_LOCAL_S3_ROOT`` (``<workdir>/s3``, unless ``AWS_ENDPOINT_URL`` is set), maps
container paths in the command, ``env`` values and the string values of mounted ``*.json``
files to the local folders, and keeps each container's output in ``<pod folder>/<container>.log``
(appended across restarts).

**Per-pod network.** Every pod gets its own loopback address, ``127.0.0.2``, ``127.0.0.3``, ...
(never reused within this test process, by any harness; Linux routes all of 127.0.0.0/8 to
the loopback interface) as ``status.podIP``. For ``RunContainers``, the literal addresses
``127.0.0.1`` and ``0.0.0.0`` (also inside URLs, ``http://127.0.0.1:8001``) in the command,
``env`` values and mounted ConfigMap/Secret text files become the pod's address (except with a
port listed in ``host_ports``: services of the test itself), and a ``sitecustomize`` shim on
``PYTHONPATH`` rewrites ``bind()`` of Python processes to ``127.0.0.1``, ``0.0.0.0``,
``localhost`` or ``""`` into a bind to the pod's address (for addresses hard-coded in code, such
as the engine's admin listener; it shadows any other ``sitecustomize``). So two pods of one
Deployment can both listen on port 8000 and on 127.0.0.1:8001. Connections to a hard-coded
``127.0.0.1`` are not rewritten (they reach the host).

Deleting a pod sends SIGTERM to its processes, SIGKILL ``terminationGracePeriodSeconds`` later
(capped by ``RunContainers.grace``); no process outlives :meth:`ServingKubelet.stop`.
:meth:`ServingKubelet.kill_container` kills a container (SIGKILL), as a crash would: the kubelet
restarts it.

Driving, records and error handling follow ``kubelet.Kubelet``: ``start()``/``stop()`` (or a
``with`` block) tick in a background thread, ``tick()`` steps synchronously, ``pause()`` /
``resume()`` freeze the harness clock, ``wait_for`` polls; ``records`` (every pod created),
``restart_count``, ``history``, ``log_path``, ``pid``, ``pod_ip``, ``endpoints`` (the Ready pods'
IPs for a label selector: what a Service routes to), and ``errors`` (anything unexpected; assert
it is empty). Objects vanishing underneath (the operator deleting them, garbage collection) are
logged and the step goes on.

Simplifications: no scheduler (every pod binds at once to ``node_name``), no
``minReadySeconds`` (ready is available), no proportional scaling of several active
ReplicaSets (a replica change during a rollout goes to the new one), no revision history limit
(old ReplicaSets stay at 0), no ``collisionCount``, no pod-deletion cost or ranking by node;
the ReplicaSet controller counts pods by controller owner reference (not by selector) and
deletes the pods of ours whose ReplicaSet is gone. Restart back-off is ``backoff`` seconds
(doubling up to ``backoff_max``), not 10 s to 5 min, and never resets. Probes run every
``min(periodSeconds, probe_period)`` seconds; ``initialDelaySeconds`` is honoured for liveness
probes only; a liveness or startup failure restarts a container only after ``failureThreshold``
failures spanning ``(failureThreshold - 1) * periodSeconds`` (never sooner than in a cluster);
``timeoutSeconds`` is capped at 2 s; ``exec`` and ``grpc`` probes always pass; HTTPS probes are
sent as HTTP. Other volume types (``persistentVolumeClaim``, ``hostPath``, ``projected``, ...)
are empty folders; ``subPath`` mounts of a ConfigMap are refreshed too (real ones are not). A
deleted pod is gone from the API at once (no graceful ``Terminating`` phase, unless someone
else's finalizer keeps it); its processes get their grace period in the background.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import hashlib
import http.client
import http.server
import json
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import kmock

from kubetune_operator.localrun import _local_path
from tests.support.kubelet import (
    CONFIGMAPS,
    NAME_ALPHABET,
    PODS,
    SECRETS,
    ImagePullBackOff,
    _map_json_paths,
    _object_data,
    _Process,
    _random_name,
    _status_patch,
    field_value,
    pod_condition,
    rfc3339,
)
from tests.support.stepping import SteppingHarness

log = logging.getLogger(__name__)

T = TypeVar("T")
Obj = dict[str, Any]

DEPLOYMENTS = "apps/v1/deployments"
REPLICASETS = "apps/v1/replicasets"
TEMPLATE_HASH = "pod-template-hash"
REVISION = "deployment.kubernetes.io/revision"
DESIRED_REPLICAS = "deployment.kubernetes.io/desired-replicas"
MAX_REPLICAS = "deployment.kubernetes.io/max-replicas"
AGENT_PORT_NAME = "agent-status"
AGENT_DEFAULT_PORT = 8090
HOST_IP = "127.0.0.1"  # the "node": this machine
POD_IP_ENV = "SERVING_KUBELET_POD_IP"  # read by the sitecustomize bind shim
PROBE_TIMEOUT_CAP = 2.0
_ip_lock = threading.Lock()
_next_ip = 2  # 127.0.0.2 first (127.0.0.1 is the host's)
_ADDRESS = re.compile(r"(?<![\w.])(?:127\.0\.0\.1|0\.0\.0\.0)(?![\w.])(?::(\d+))?")

SHIM = '''"""serving_kubelet: bind() to loopback/any becomes a bind to this pod's own address."""
import os as _os
import socket as _socket

_POD_IP = _os.environ.get("SERVING_KUBELET_POD_IP")
if _POD_IP:
    _bind = _socket.socket.bind

    def _pod_bind(self, address):
        if (
            self.family == _socket.AF_INET
            and isinstance(address, tuple)
            and address[0] in ("", "0.0.0.0", "127.0.0.1", "localhost")
        ):
            address = (_POD_IP, *address[1:])
        return _bind(self, address)

    _socket.socket.bind = _pod_bind
'''


# ------------------------------------------------------------------------------- behaviours
@dataclass(frozen=True)
class Serve:
    """Running with no process, Ready ``ready_after`` seconds after its containers start."""

    ready_after: float = 0.0


def _always_ready(pod: Obj) -> Obj:
    del pod
    return {"ready": True}


@dataclass(frozen=True, eq=False)
class FakeAgent:
    """Like :class:`Serve`, plus an HTTP server on the pod's IP answering ``/status``.

    Args:
        status_fn: ``status_fn(pod)`` (the pod as the harness last saw it) returns the JSON-able
            body of ``GET /status``; its ``ready`` field (default true) decides ``/readyz``,
            ``healthy`` (default true) ``/healthz`` (200 or 503). Called from a server thread.
        ready_after: seconds after the start before the containers report ready.
        port: the port to serve (default: the container port named ``agent-status``, else
            8090).
    """

    status_fn: Callable[[Obj], Obj] = _always_ready
    ready_after: float = 0.0
    port: int | None = None


@dataclass(frozen=True)
class CrashLoop:
    """Containers exit ``exit_code`` ``after`` seconds after each start (restarted for ever).

    ``containers`` names the crashing containers (default: every regular container; the others
    serve like :class:`Serve`).
    """

    exit_code: int = 1
    after: float = 0.0
    containers: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunContainers:
    """Run every container's real command on this machine (see the module docstring).

    Args:
        workdir: root of the pods' local folders (``pods/<ns>/<pod>``) and of embedded S3
            storage (``s3``).
        environ: variables for every process (not rewritten): values of Secret-backed ``env``
            entries (taking precedence over the emulator's Secrets) and extra ones.
        inherit_environ: start from this process's environment (``PATH``, the virtualenv).
        grace: seconds between SIGTERM and SIGKILL when a pod is deleted or a container killed
            by its liveness probe (capped by ``terminationGracePeriodSeconds``).
        configmap_sync_delay: seconds between a ConfigMap's (or Secret's) change in the API
            and its files changing in the pods that mount it.
        host_ports: ports whose ``127.0.0.1:PORT`` / ``0.0.0.0:PORT`` addresses are the test's
            own services (an S3 server, ...) and are kept as they are.
        socket_shim: put the ``bind()`` shim on the processes' ``PYTHONPATH``.
    """

    workdir: Path
    environ: dict[str, str] = field(default_factory=dict)
    inherit_environ: bool = True
    grace: float = 5.0
    configmap_sync_delay: float = 0.0
    host_ports: frozenset[int] = frozenset()
    socket_shim: bool = True


Behaviour = Serve | FakeAgent | CrashLoop | ImagePullBackOff | RunContainers
BehaviourFn = Callable[[Obj, Obj, int], Behaviour]


def by_ordinal(*behaviours: Behaviour) -> BehaviourFn:
    """Pod ``n`` of a Deployment gets ``behaviours[n]``; later pods get the last one."""
    if not behaviours:
        raise ValueError("by_ordinal needs at least one behaviour")

    def choose(deployment: Obj, pod: Obj, ordinal: int) -> Behaviour:
        del deployment, pod
        return behaviours[min(ordinal, len(behaviours) - 1)]

    return choose


# ------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class PodRecord:
    """One pod the harness created (or adopted)."""

    namespace: str
    deployment: str  # "" for a ReplicaSet without a Deployment
    replicaset: str
    name: str
    uid: str
    ordinal: int
    behaviour: Behaviour
    created: float  # harness clock
    created_wall: str


def condition(obj: Obj | None, kind: str) -> Obj | None:
    """The object's status condition of type ``kind`` (any status), or None."""
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return None


def pod_ready(pod: Obj) -> bool:
    """Whether the pod has ``Ready=True`` and is not being deleted."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    cond = condition(pod, "Ready")
    return cond is not None and cond.get("status") == "True"


def template_hash(template: Obj) -> str:
    """A stable 10-character hash of a pod template (the ``pod-template-hash`` label)."""
    text = json.dumps(template, sort_keys=True, separators=(",", ":"))
    number = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    chars = []
    for _ in range(10):
        number, digit = divmod(number, len(NAME_ALPHABET))
        chars.append(NAME_ALPHABET[digit])
    return "".join(chars)


def pod_addresses(text: str, pod_ip: str, host_ports: Iterable[int] = ()) -> str:
    """``127.0.0.1`` and ``0.0.0.0`` (with any port but ``host_ports``) replaced by ``pod_ip``."""
    keep = {str(p) for p in host_ports}

    def swap(match: re.Match[str]) -> str:
        port = match.group(1)
        if port is not None and port in keep:
            return match.group(0)
        return pod_ip + (f":{port}" if port is not None else "")

    return _ADDRESS.sub(swap, text)


def _scaled(value: Any, total: int, *, round_up: bool) -> int:
    """``maxSurge``/``maxUnavailable``: an int, or a percentage of ``total``."""
    if value is None:
        value = "25%"
    if isinstance(value, str) and value.endswith("%"):
        share = total * int(value[:-1])
        return -(-share // 100) if round_up else share // 100
    return int(value)


def _controller_of(obj: Obj) -> Obj | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return dict(ref)
    return None


def _deleting(obj: Obj) -> bool:
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


# ------------------------------------------------------------------------------- state
class _ContainerConfigError(Exception):
    """Something the container needs is missing (Secret, ConfigMap, key): retried each step."""


@dataclass
class _Probe:
    """Consecutive results of one probe of one container run."""

    successes: int = 0
    failures: int = 0
    failing_since: float | None = None
    last_run: float | None = None
    passing: bool = False
    future: concurrent.futures.Future[bool] | None = None


@dataclass
class _Container:
    spec: Obj
    init: bool
    phase: str = "waiting"  # waiting | running | terminated (a completed init container)
    reason: str = "ContainerCreating"
    message: str | None = None
    restart_count: int = 0
    started_at: float = 0.0
    started_wall: str | None = None
    container_id: str = ""
    terminated: Obj | None = None
    last_terminated: Obj | None = None
    restart_at: float | None = None
    process: _Process | None = None
    started: bool = False
    ready: bool = False
    killing: bool = False  # a liveness kill or kill_container in progress
    kill_requested: bool = False  # a fake container's crash, for the next step
    probes: dict[str, _Probe] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.spec.get("name", ""))

    @property
    def image(self) -> str:
        return str(self.spec.get("image", ""))

    @property
    def sidecar(self) -> bool:
        return self.init and self.spec.get("restartPolicy") == "Always"


@dataclass
class _PodState:
    namespace: str
    name: str
    uid: str
    rs_uid: str
    behaviour: Behaviour
    ip: str
    init: list[_Container]
    main: list[_Container]
    scheduled_wall: str = field(default_factory=rfc3339)
    start_wall: str | None = None
    sandbox: bool = False  # volumes set up (PodReadyToStartContainers)
    sandbox_error: str | None = None
    was_running: bool = False
    terminating: bool = False
    created_at: float = 0.0
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)
    root: Path | None = None
    mounts: dict[str, Path] = field(default_factory=dict)  # every container's mount paths
    volumes: dict[str, str] = field(default_factory=dict)  # volume -> digest written
    pending_volumes: dict[str, tuple[str, float]] = field(default_factory=dict)
    grace: float = 5.0
    agent: _AgentServer | None = None
    agent_port: int | None = None
    snapshot: Obj = field(default_factory=dict)  # the pod as last seen (for FakeAgent)

    @property
    def containers(self) -> list[_Container]:
        return [*self.init, *self.main]


@dataclass
class _DeploymentState:
    progress_key: Any = None
    progress_at: float = 0.0
    created_rs: str | None = None


# ------------------------------------------------------------------------------- agent
class _AgentServer:
    """A tiny threaded HTTP server answering an agent's ``/status``, ``/readyz``, ``/healthz``."""

    def __init__(
        self, host: str, port: int, body: Callable[[], Obj], on_error: Callable[[str], None]
    ) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                try:
                    doc = body()
                except Exception as exc:  # the test's status_fn failed
                    log.exception("FakeAgent status_fn failed")
                    on_error(f"FakeAgent status_fn failed: {exc!r}")
                    self._answer(500, {"error": repr(exc)})
                    return
                if path == "/status":
                    self._answer(200, doc)
                elif path == "/readyz":
                    ok = bool(doc.get("ready", True))
                    self._answer(200 if ok else 503, {"ready": ok})
                elif path == "/healthz":
                    ok = bool(doc.get("healthy", True))
                    self._answer(200 if ok else 503, {"healthy": ok})
                else:
                    self._answer(404, {"error": "not found"})

            def _answer(self, code: int, doc: Obj) -> None:
                data = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                del format, args

        self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"serving-kubelet-agent-{host}:{port}",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _probe_once(
    kind: str, host: str, port: int, *, path: str, headers: Obj, timeout: float
) -> bool:
    """One ``httpGet`` (2xx/3xx passes) or ``tcpSocket`` (a connection passes) probe."""
    try:
        if kind == "tcpSocket":
            with socket.create_connection((host, port), timeout=timeout):
                return True
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", path or "/", headers=headers)
            return 200 <= conn.getresponse().status < 400
        finally:
            conn.close()
    except (OSError, http.client.HTTPException):
        return False


# ------------------------------------------------------------------------------- harness
class ServingKubelet(SteppingHarness):
    """Moves apps/v1 Deployments, their ReplicaSets and Pods through their lifecycle.

    Args:
        api: the running ``tests.support.kube_api.KubeApi``.
        behaviour: one behaviour for every pod, or ``behaviour(deployment, pod, ordinal)``
            choosing per pod (default :class:`Serve`).
        interval: seconds between background steps.
        namespace: manage objects of this namespace only (default: all).
        clock: monotonic seconds (default ``time.monotonic``).
        node_name: the node every pod lands on.
        backoff: the first restart back-off in seconds (doubles at each restart).
        backoff_max: the longest restart back-off.
        probe_period: the longest time between two runs of one probe (``periodSeconds`` when
            shorter).
    """

    thread_name = "serving-kubelet"
    wait_history = 20

    def __init__(
        self,
        api: Any,
        behaviour: Behaviour | BehaviourFn | None = None,
        *,
        interval: float = 0.05,
        namespace: str | None = None,
        clock: Callable[[], float] | None = None,
        node_name: str = "kind-worker",
        backoff: float = 0.2,
        backoff_max: float = 2.0,
        probe_period: float = 0.1,
    ) -> None:
        self.api = api
        self._choose: BehaviourFn
        if behaviour is None or not callable(behaviour):
            fixed: Behaviour = behaviour if behaviour is not None else Serve()
            self._choose = lambda deployment, pod, ordinal: fixed
        else:
            self._choose = behaviour
        self._init_stepping(interval, clock)
        self.namespace = namespace
        self.node_name = node_name
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.probe_period = probe_period
        self._pods: dict[str, _PodState] = {}
        self._deployments: dict[str, _DeploymentState] = {}
        self._ordinals: dict[str, int] = {}
        self._records: list[PodRecord] = []
        self._restarts: dict[tuple[str, str, str], int] = {}
        self._ips: dict[tuple[str, str], str] = {}
        self._reaping: list[_Process] = []
        self._prober = concurrent.futures.ThreadPoolExecutor(
            max_workers=16, thread_name_prefix="serving-kubelet-probe"
        )
        self._cache: dict[tuple[str, str, str], Obj | None] = {}

    # ------------------------------------------------------------------------ driving
    def stop(self) -> None:
        """Stop ticking; kill every process and agent server the harness started (pods stay)."""
        self._stop_thread()
        with self._lock:
            processes = list(self._reaping)
            self._reaping = []
            agents = []
            for state in self._pods.values():
                for c in state.containers:
                    if c.process is not None and c.process.started:
                        processes.append(c.process)
                    c.process = None
                if state.agent is not None:
                    agents.append(state.agent)
                    state.agent = None
        for agent in agents:
            agent.close()
        for proc in processes:
            proc.cancel(grace=2.0)
        for proc in processes:
            if not proc.join(timeout=10):
                self._error(f"a RunContainers process did not end: {proc.command}")
        self._prober.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------------ records
    @property
    def records(self) -> list[PodRecord]:
        """Every pod this harness created (or adopted), in creation order."""
        with self._lock:
            return list(self._records)

    def pods_created(self, deployment: str, namespace: str | None = None) -> list[PodRecord]:
        """The pods this harness created for the Deployment named ``deployment``."""
        return [
            r
            for r in self.records
            if r.deployment == deployment and (namespace is None or r.namespace == namespace)
        ]

    def pods(self, namespace: str, deployment: str | None = None) -> list[Obj]:
        """Pods of the Deployment (all of the harness's pods by default), oldest first."""
        order = {r.uid: i for i, r in enumerate(self.records)}
        wanted = {
            r.uid
            for r in self.records
            if r.namespace == namespace and deployment in (None, r.deployment)
        }
        found = [p for p in self.api.list(PODS, namespace) if p["metadata"]["uid"] in wanted]
        return sorted(found, key=lambda p: order[p["metadata"]["uid"]])

    def replicasets(self, namespace: str, deployment: str) -> list[Obj]:
        """The Deployment's ReplicaSets, oldest revision first."""
        found = [
            rs
            for rs in self.api.list(REPLICASETS, namespace)
            if (_controller_of(rs) or {}).get("name") == deployment
            and (_controller_of(rs) or {}).get("kind") == "Deployment"
        ]
        return sorted(found, key=_revision)

    def restart_count(self, namespace: str, pod: str, container: str) -> int:
        """How often the container was restarted (kept after the pod is gone)."""
        with self._lock:
            return self._restarts.get((namespace, pod, container), 0)

    def log_path(self, namespace: str, pod: str, container: str) -> Path | None:
        """The output file of a RunContainers container (None for other pods)."""
        with self._lock:
            for state in self._pods.values():
                if (state.namespace, state.name) == (namespace, pod) and state.root is not None:
                    return state.root / f"{container}.log"
        return None

    def pid(self, namespace: str, pod: str, container: str) -> int | None:
        """The process id of a RunContainers container's current process (None if none)."""
        with self._lock:
            c = self._find(namespace, pod, container)
            if c is None or c.process is None or c.process.done.is_set():
                return None
            return c.process.pid

    def pod_ip(self, namespace: str, pod: str) -> str | None:
        """The pod's IP (kept after the pod is gone; None for a pod the harness never saw)."""
        with self._lock:
            return self._ips.get((namespace, pod))

    def endpoints(self, namespace: str, selector: str | dict[str, str]) -> list[str]:
        """IPs of the Ready pods matching a label selector (a Service's endpoints), sorted."""
        if isinstance(selector, dict):
            selector = ",".join(f"{k}={v}" for k, v in selector.items())
        pods = self.api.list(PODS, namespace, label_selector=selector)
        ips = [p["status"]["podIP"] for p in pods if pod_ready(p) and p["status"].get("podIP")]
        return sorted(ips, key=lambda ip: tuple(int(x) for x in ip.split(".")))

    def kill_container(self, namespace: str, pod: str, container: str) -> None:
        """Kill the container (SIGKILL for a process), as a crash would; it is restarted.

        Raises:
            KeyError: no such live pod or container here.
        """
        with self._lock:
            c = self._find(namespace, pod, container)
            if c is None or c.phase != "running":
                raise KeyError(f"no running container {container} in pod {namespace}/{pod}")
            self._note(f"pod {namespace}/{pod}: killing container {container} (test)")
            if c.process is not None:
                c.process.kill()
            else:
                c.kill_requested = True

    def _find(self, namespace: str, pod: str, container: str) -> _Container | None:
        for state in self._pods.values():
            if (state.namespace, state.name) == (namespace, pod):
                return next((c for c in state.containers if c.name == container), None)
        return None

    # ------------------------------------------------------------------------ one step
    def tick(self) -> None:
        """One step: the kubelet, then the ReplicaSet and the Deployment controllers."""
        with self._lock:
            self.ticks += 1
            self._cache = {}
            self._reaping = [p for p in self._reaping if not p.done.is_set()]
            deployments = self.api.list(DEPLOYMENTS, self.namespace)
            replicasets = self.api.list(REPLICASETS, self.namespace)
            rs_by_uid = {rs["metadata"]["uid"]: rs for rs in replicasets}
            pods = [
                p
                for p in self.api.list(PODS, self.namespace)
                if (_controller_of(p) or {}).get("kind") == "ReplicaSet"
            ]
            by_rs: dict[str, list[Obj]] = {}
            for pod in pods:
                owner = _controller_of(pod) or {}
                uid = pod["metadata"]["uid"]
                if owner.get("uid") not in rs_by_uid:
                    if uid in self._pods:  # created as its ReplicaSet went away
                        self._guard(f"pod {self._id(pod)}", self._collect, pod)
                    continue
                stepped = self._guard(f"pod {self._id(pod)}", self._kubelet_step, pod)
                by_rs.setdefault(owner["uid"], []).append(stepped or pod)
            present = {p["metadata"]["uid"] for p in pods}
            for uid in [u for u in self._pods if u not in present]:
                self._forget_pod(uid, "deleted")
            deploy_by_uid = {d["metadata"]["uid"]: d for d in deployments}
            for rs in replicasets:
                owner = _controller_of(rs) or {}
                deployment = deploy_by_uid.get(owner.get("uid", ""))
                if owner.get("kind") == "Deployment" and deployment is None:
                    continue  # its Deployment is gone: garbage collection takes it
                self._guard(
                    f"replicaset {self._id(rs)}",
                    self._sync_replicaset,
                    rs,
                    deployment,
                    by_rs.get(rs["metadata"]["uid"], []),
                )
            for deployment in deployments:
                uid = deployment["metadata"]["uid"]
                owned = [rs for rs in replicasets if (_controller_of(rs) or {}).get("uid") == uid]
                self._guard(
                    f"deployment {self._id(deployment)}",
                    self._sync_deployment,
                    deployment,
                    owned,
                    {rs["metadata"]["uid"]: by_rs.get(rs["metadata"]["uid"], []) for rs in owned},
                )
            for uid in [u for u in self._deployments if u not in deploy_by_uid]:
                del self._deployments[uid]

    def _collect(self, pod: Obj) -> None:
        """The garbage collector's part: a pod of ours whose ReplicaSet is gone is deleted."""
        self._forget_pod(pod["metadata"]["uid"], "garbage-collected (its ReplicaSet is gone)")
        with contextlib.suppress(kmock.KubernetesError):
            self.api.delete(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"])

    # ------------------------------------------------------------------------ Deployments
    def _sync_deployment(
        self, deployment: Obj, owned: list[Obj], pods_by_rs: dict[str, list[Obj]]
    ) -> None:
        meta, spec = deployment["metadata"], deployment.get("spec") or {}
        if _deleting(deployment):
            return
        state = self._deployments.setdefault(meta["uid"], _DeploymentState())
        replicas = int(spec.get("replicas", 1))
        template = spec.get("template") or {}
        digest = template_hash(template)
        new_rs = next(
            (rs for rs in owned if rs["metadata"].get("labels", {}).get(TEMPLATE_HASH) == digest),
            None,
        )
        old = [rs for rs in owned if rs is not new_rs]
        strategy = spec.get("strategy") or {}
        recreate = strategy.get("type") == "Recreate"
        rolling = strategy.get("rollingUpdate") or {}
        surge = 0 if recreate else _scaled(rolling.get("maxSurge"), replicas, round_up=True)
        unavailable = (
            replicas
            if recreate
            else _scaled(rolling.get("maxUnavailable"), replicas, round_up=False)
        )
        if not recreate and surge == 0 and unavailable == 0:
            unavailable = 1
        paused = bool(spec.get("paused"))

        def ready(rs: Obj) -> int:
            return sum(1 for p in pods_by_rs.get(rs["metadata"]["uid"], []) if pod_ready(p))

        def pods_of(rs: Obj) -> int:
            return len([p for p in pods_by_rs.get(rs["metadata"]["uid"], []) if not _deleting(p)])

        def want(rs: Obj) -> int:
            return int((rs.get("spec") or {}).get("replicas", 0))

        if not paused:
            if new_rs is None:
                if recreate:
                    start = 0 if any(want(rs) or pods_of(rs) for rs in old) else replicas
                else:
                    total = sum(want(rs) for rs in old)
                    start = max(min(replicas + surge - total, replicas), 0)
                new_rs = self._create_replicaset(deployment, digest, old, start, surge)
                state.created_rs = new_rs["metadata"]["name"]
                pods_by_rs[new_rs["metadata"]["uid"]] = []
            elif recreate:
                for rs in old:
                    if want(rs):
                        self._scale(rs, 0, deployment, surge)
                if not any(want(rs) or pods_of(rs) for rs in old) and want(new_rs) != replicas:
                    self._scale(new_rs, replicas, deployment, surge)
            else:
                self._roll(
                    deployment,
                    new_rs,
                    old,
                    replicas=replicas,
                    surge=surge,
                    unavailable=unavailable,
                    ready=ready,
                    want=want,
                )
            self._annotate(deployment, new_rs, old)
        self._write_deployment_status(
            deployment,
            state,
            new_rs,
            owned,
            pods_by_rs=pods_by_rs,
            replicas=replicas,
            unavailable=unavailable,
            paused=paused,
        )

    def _roll(
        self,
        deployment: Obj,
        new_rs: Obj,
        old: list[Obj],
        *,
        replicas: int,
        surge: int,
        unavailable: int,
        ready: Callable[[Obj], int],
        want: Callable[[Obj], int],
    ) -> None:
        """One RollingUpdate step (the real reconcileNewReplicaSet, reconcileOldReplicaSets)."""
        if want(new_rs) > replicas:
            self._scale(new_rs, replicas, deployment, surge)
        elif want(new_rs) < replicas:
            total = want(new_rs) + sum(want(rs) for rs in old)
            room = replicas + surge - total
            if room > 0:
                self._scale(
                    new_rs, want(new_rs) + min(room, replicas - want(new_rs)), deployment, surge
                )
        active_old = [rs for rs in old if want(rs) > 0]
        if not active_old:
            return
        all_pods = want(new_rs) + sum(want(rs) for rs in old)
        min_available = replicas - unavailable
        new_unavailable = max(want(new_rs) - ready(new_rs), 0)
        budget = all_pods - min_available - new_unavailable
        if budget <= 0:
            return
        # First the old replicas that are not available anyway, oldest first.
        for rs in sorted(active_old, key=_revision):
            unhealthy = want(rs) - ready(rs)
            if unhealthy <= 0 or budget <= 0:
                continue
            cut = min(unhealthy, budget)
            self._scale(rs, want(rs) - cut, deployment, surge)
            budget -= cut
        available = ready(new_rs) + sum(ready(rs) for rs in old)
        budget = available - min_available
        for rs in sorted(active_old, key=_revision):
            current = want(rs)
            if budget <= 0 or current == 0:
                continue
            cut = min(current, budget)
            self._scale(rs, current - cut, deployment, surge)
            budget -= cut

    def _create_replicaset(
        self, deployment: Obj, digest: str, old: list[Obj], replicas: int, surge: int
    ) -> Obj:
        meta, spec = deployment["metadata"], deployment.get("spec") or {}
        template = copy.deepcopy(spec.get("template") or {})
        tmeta = template.setdefault("metadata", {})
        tmeta["labels"] = {**(tmeta.get("labels") or {}), TEMPLATE_HASH: digest}
        selector = copy.deepcopy(spec.get("selector") or {})
        selector["matchLabels"] = {**(selector.get("matchLabels") or {}), TEMPLATE_HASH: digest}
        revision = max((_revision(rs) for rs in old), default=0) + 1
        desired = int(spec.get("replicas", 1))
        rs: Obj = {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {
                "name": f"{meta['name']}-{digest}",
                "namespace": meta["namespace"],
                "labels": dict(tmeta["labels"]),
                "annotations": {
                    REVISION: str(revision),
                    DESIRED_REPLICAS: str(desired),
                    MAX_REPLICAS: str(desired + surge),
                },
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": {"replicas": replicas, "selector": selector, "template": template},
        }
        created: Obj = self.api.create(REPLICASETS, rs, meta["namespace"])
        self._note(
            f"deployment {self._id(deployment)}: created replicaset {rs['metadata']['name']} "
            f"(revision {revision}, {replicas} replicas)"
        )
        return created

    def _scale(self, rs: Obj, replicas: int, deployment: Obj, surge: int) -> None:
        spec = deployment.get("spec") or {}
        desired = int(spec.get("replicas", 1))
        annotations = {DESIRED_REPLICAS: str(desired), MAX_REPLICAS: str(desired + surge)}
        meta = rs["metadata"]
        patch = {"metadata": {"annotations": annotations}, "spec": {"replicas": replicas}}
        updated = self.api.patch(REPLICASETS, meta["namespace"], meta["name"], patch)
        self._note(
            f"replicaset {self._id(rs)}: scaled {rs['spec'].get('replicas', 0)} -> {replicas}"
        )
        rs.clear()
        rs.update(updated)

    def _annotate(self, deployment: Obj, new_rs: Obj, old: list[Obj]) -> None:
        """The newest revision is the current template's (a rollback gets the next number)."""
        newest = max((_revision(rs) for rs in old), default=0)
        if _revision(new_rs) <= newest:
            rs_meta = new_rs["metadata"]
            patch = {"metadata": {"annotations": {REVISION: str(newest + 1)}}}
            updated = self.api.patch(REPLICASETS, rs_meta["namespace"], rs_meta["name"], patch)
            new_rs.clear()
            new_rs.update(updated)
        revision = (new_rs["metadata"].get("annotations") or {}).get(REVISION)
        meta = deployment["metadata"]
        if revision and (meta.get("annotations") or {}).get(REVISION) != revision:
            patch = {"metadata": {"annotations": {REVISION: revision}}}
            self.api.patch(DEPLOYMENTS, meta["namespace"], meta["name"], patch)

    def _write_deployment_status(
        self,
        deployment: Obj,
        state: _DeploymentState,
        new_rs: Obj | None,
        owned: list[Obj],
        *,
        pods_by_rs: dict[str, list[Obj]],
        replicas: int,
        unavailable: int,
        paused: bool,
    ) -> None:
        meta, spec = deployment["metadata"], deployment.get("spec") or {}
        live = [p for pods in pods_by_rs.values() for p in pods if not _deleting(p)]
        new_uid = new_rs["metadata"]["uid"] if new_rs is not None else None
        updated = len([p for p in pods_by_rs.get(new_uid or "", []) if not _deleting(p)])
        ready = sum(1 for p in live if pod_ready(p))
        counts = {
            "replicas": len(live),
            "updatedReplicas": updated,
            "readyReplicas": ready,
            "availableReplicas": ready,
            "unavailableReplicas": max(replicas - ready, 0),
        }
        status: Obj = {"observedGeneration": meta.get("generation", 1)}
        status.update({k: v for k, v in counts.items() if v})
        now, wall = self.now(), rfc3339()
        previous = {c["type"]: c for c in (deployment.get("status") or {}).get("conditions") or []}
        rs_name = new_rs["metadata"]["name"] if new_rs is not None else ""
        if ready >= replicas - unavailable:
            available = ("True", "MinimumReplicasAvailable", "Deployment has minimum availability.")
        else:
            available = (
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
            )
        complete = (
            updated == replicas and len(live) == replicas and ready == replicas
        ) and not any((rs.get("spec") or {}).get("replicas", 0) for rs in owned if rs is not new_rs)
        key = (rs_name, tuple(sorted(counts.items())))
        if key != state.progress_key:
            state.progress_key, state.progress_at = key, now
        deadline = float(spec.get("progressDeadlineSeconds", 600))
        if paused:
            progressing = ("Unknown", "DeploymentPaused", "Deployment is paused")
        elif complete:
            progressing = (
                "True",
                "NewReplicaSetAvailable",
                f'ReplicaSet "{rs_name}" has successfully progressed.',
            )
        elif now - state.progress_at > deadline:
            progressing = (
                "False",
                "ProgressDeadlineExceeded",
                f'ReplicaSet "{rs_name}" has timed out progressing.',
            )
        elif state.created_rs == rs_name and updated == 0:
            progressing = ("True", "NewReplicaSetCreated", f'Created new replica set "{rs_name}"')
        else:
            progressing = ("True", "ReplicaSetUpdated", f'ReplicaSet "{rs_name}" is progressing.')
        conditions = []
        for kind, (value, reason, message) in (
            ("Available", available),
            ("Progressing", progressing),
        ):
            before = previous.get(kind) or {}
            same = before.get("status") == value
            changed = not same or before.get("reason") != reason or before.get("message") != message
            conditions.append(
                {
                    "type": kind,
                    "status": value,
                    "lastUpdateTime": wall if changed else before.get("lastUpdateTime", wall),
                    "lastTransitionTime": before.get("lastTransitionTime", wall) if same else wall,
                    "reason": reason,
                    "message": message,
                }
            )
        status["conditions"] = conditions
        patch = _status_patch(deployment.get("status") or {}, status)
        if patch is not None:
            self.api.patch(
                DEPLOYMENTS,
                meta["namespace"],
                meta["name"],
                {"status": patch},
                subresource="status",
            )

    # ------------------------------------------------------------------------ ReplicaSets
    def _sync_replicaset(self, rs: Obj, deployment: Obj | None, pods: list[Obj]) -> None:
        if _deleting(rs):
            return
        meta = rs["metadata"]
        want = int((rs.get("spec") or {}).get("replicas", 1))
        live = [p for p in pods if not _deleting(p)]
        if len(live) < want:
            for _ in range(want - len(live)):
                live.append(self._create_pod(rs, deployment))
        elif len(live) > want:
            order = {r.uid: i for i, r in enumerate(self._records)}
            victims = sorted(
                live,
                key=lambda p: (
                    pod_ready(p),
                    (p.get("status") or {}).get("phase") == "Running",
                    -order.get(p["metadata"]["uid"], -1),
                ),
            )[: len(live) - want]
            for pod in victims:
                self._delete_pod(pod, f"replicaset {meta['name']} scaled down")
                live.remove(pod)
        ready = sum(1 for p in live if pod_ready(p))
        status: Obj = {"replicas": len(live), "observedGeneration": meta.get("generation", 1)}
        if live:
            status["fullyLabeledReplicas"] = len(live)
        if ready:
            status.update(readyReplicas=ready, availableReplicas=ready)
        patch = _status_patch(rs.get("status") or {}, status)
        if patch is not None:
            self.api.patch(
                REPLICASETS,
                meta["namespace"],
                meta["name"],
                {"status": patch},
                subresource="status",
            )

    def _create_pod(self, rs: Obj, deployment: Obj | None) -> Obj:
        meta = rs["metadata"]
        template = copy.deepcopy((rs.get("spec") or {}).get("template") or {})
        tmeta = template.get("metadata") or {}
        pod_spec: Obj = template.get("spec") or {}
        pod_spec["nodeName"] = self.node_name
        prefix = f"{meta['name']}-"
        pod: Obj = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": _random_name(prefix),
                "generateName": prefix,
                "namespace": meta["namespace"],
                "labels": dict(tmeta.get("labels") or {}),
                **({"annotations": dict(tmeta["annotations"])} if tmeta.get("annotations") else {}),
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "ReplicaSet",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": pod_spec,
        }
        created: Obj | None = None
        for _ in range(5):
            try:
                created = self.api.create(PODS, pod, meta["namespace"])
                break
            except kmock.KubernetesError as exc:
                if exc.status != 409 or exc.reason != "AlreadyExists":
                    raise
                pod["metadata"]["name"] = _random_name(prefix)
        if created is None:
            raise RuntimeError(f"could not find a free pod name for {prefix}*")
        state = self._admit(created, rs, deployment)
        return self._write_pod_status(state, created)

    def _admit(self, pod: Obj, rs: Obj, deployment: Obj | None) -> _PodState:
        """Script a pod: choose its behaviour, give it an address, record it."""
        meta = pod["metadata"]
        key = (deployment or rs)["metadata"]["uid"]
        ordinal = self._ordinals.get(key, 0)
        self._ordinals[key] = ordinal + 1
        behaviour = self._choose(copy.deepcopy(deployment or {}), copy.deepcopy(pod), ordinal)
        spec = pod.get("spec") or {}
        state = _PodState(
            namespace=meta["namespace"],
            name=meta["name"],
            uid=meta["uid"],
            rs_uid=rs["metadata"]["uid"],
            behaviour=behaviour,
            ip=self._allocate_ip(),
            init=[_Container(dict(c), True) for c in spec.get("initContainers") or []],
            main=[_Container(dict(c), False) for c in spec.get("containers") or []],
            created_at=self.now(),
            snapshot=pod,
        )
        for c in state.main if state.init else ():
            c.reason = "PodInitializing"
        grace = spec.get("terminationGracePeriodSeconds")
        if isinstance(behaviour, RunContainers):
            state.grace = (
                min(behaviour.grace, float(grace)) if grace is not None else behaviour.grace
            )
        self._pods[state.uid] = state
        self._ips[state.namespace, state.name] = state.ip
        deploy_name = (deployment or {}).get("metadata", {}).get("name", "")
        self._records.append(
            PodRecord(
                state.namespace,
                deploy_name,
                rs["metadata"]["name"],
                state.name,
                state.uid,
                ordinal,
                behaviour,
                state.created_at,
                rfc3339(),
            )
        )
        self._note(
            f"replicaset {self._id(rs)}: pod {state.name} ({state.ip}, ordinal {ordinal}, "
            f"{type(behaviour).__name__})"
        )
        return state

    @staticmethod
    def _allocate_ip() -> str:
        """The next free loopback address (process-wide: two harnesses never share one)."""
        global _next_ip
        with _ip_lock:
            while True:
                n, _next_ip = _next_ip, _next_ip + 1
                if 0 < n % 256 < 255:
                    return f"127.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"

    def _delete_pod(self, pod: Obj, why: str) -> None:
        try:
            self.api.delete(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"])
        except kmock.KubernetesError as exc:
            if exc.status != 404:
                raise
        self._note(f"deleted pod {self._id(pod)}: {why}")
        if pod["metadata"]["uid"] in self._pods:
            self._forget_pod(pod["metadata"]["uid"], why)

    def _forget_pod(self, uid: str, why: str) -> None:
        state = self._pods.pop(uid)
        self._note(f"pod {state.namespace}/{state.name} {why}: stopping it")
        self._stop_pod(state)

    def _stop_pod(self, state: _PodState) -> None:
        for c in state.containers:
            self._forget_process(c, state.grace)
        if state.agent is not None:
            state.agent.close()
            state.agent = None

    def _forget_process(self, c: _Container, grace: float) -> None:
        process, c.process = c.process, None
        if process is not None and process.started and not process.done.is_set():
            process.cancel(grace)
            self._reaping.append(process)

    # ------------------------------------------------------------------------ kubelet
    def _kubelet_step(self, pod: Obj) -> Obj:
        uid = pod["metadata"]["uid"]
        state = self._pods.get(uid)
        if state is None:  # a live pod this harness did not create (a restarted harness)
            rs = self.api.get(
                REPLICASETS, pod["metadata"]["namespace"], (_controller_of(pod) or {})["name"]
            )
            if rs is None:
                return pod
            owner = _controller_of(rs) or {}
            deployment = None
            if owner.get("kind") == "Deployment":
                deployment = self.api.get(DEPLOYMENTS, pod["metadata"]["namespace"], owner["name"])
            state = self._admit(pod, rs, deployment)
        state.snapshot = pod
        behaviour = state.behaviour
        if _deleting(pod):
            if not state.terminating:  # someone else's finalizer keeps it while it terminates
                state.terminating = True
                self._stop_pod(state)
                for c in state.containers:
                    if c.phase == "running":
                        self._exited(state, c, 143, "Error", restart=False)
            return self._write_pod_status(state, pod)
        if isinstance(behaviour, ImagePullBackOff):
            return self._write_pod_status(state, pod)
        if not state.sandbox:
            self._create_sandbox(state, pod)
            if not state.sandbox:
                return self._write_pod_status(state, pod)
        elif isinstance(behaviour, RunContainers):
            self._refresh_volumes(state, pod, behaviour)
        if state.start_wall is None:
            state.start_wall = rfc3339()
        initialized = True
        for c in state.init:
            self._step_container(state, pod, c)
            done = c.phase == "terminated" or (c.sidecar and c.phase == "running" and c.started)
            if not done:
                initialized = False
                break
        if initialized:
            for c in state.main:
                self._step_container(state, pod, c)
            if not state.was_running and all(
                c.phase != "waiting" or c.restart_count for c in state.main
            ):
                state.was_running = True
                self._note(f"pod {state.namespace}/{state.name} Running")
        return self._write_pod_status(state, pod)

    def _create_sandbox(self, state: _PodState, pod: Obj) -> None:
        behaviour = state.behaviour
        try:
            if isinstance(behaviour, RunContainers):
                self._setup_volumes(state, pod, behaviour)
            elif isinstance(behaviour, FakeAgent):
                port = behaviour.port or self._agent_port(pod)
                state.agent_port = port
                state.agent = _AgentServer(
                    state.ip,
                    port,
                    lambda: behaviour.status_fn(copy.deepcopy(state.snapshot)),
                    self._error,
                )
        except _ContainerConfigError as exc:
            if state.sandbox_error != str(exc):
                self._note(f"pod {state.namespace}/{state.name}: {exc}")
            state.sandbox_error = str(exc)
            return
        state.sandbox, state.sandbox_error = True, None

    @staticmethod
    def _agent_port(pod: Obj) -> int:
        spec = pod.get("spec") or {}
        for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
            for port in c.get("ports") or []:
                if port.get("name") == AGENT_PORT_NAME:
                    return int(port["containerPort"])
        return AGENT_DEFAULT_PORT

    def _step_container(self, state: _PodState, pod: Obj, c: _Container) -> None:
        now = self.now()
        if c.phase == "waiting":
            if c.restart_at is not None and now < c.restart_at:
                return
            if not self._start_container(state, pod, c):
                return
        if c.phase != "running":
            return
        exit_code, reason = self._exit_of(state, c, now)
        if exit_code is not None:
            self._exited(state, c, exit_code, reason, restart=True)
            return
        self._run_probes(state, c, now)

    def _start_container(self, state: _PodState, pod: Obj, c: _Container) -> bool:
        behaviour = state.behaviour
        if isinstance(behaviour, RunContainers):
            try:
                process = self._build_process(state, pod, c, behaviour)
            except _ContainerConfigError as exc:
                if (c.reason, c.message) != ("CreateContainerConfigError", str(exc)):
                    self._note(f"pod {state.namespace}/{state.name} {c.name}: {exc}")
                c.reason, c.message = "CreateContainerConfigError", str(exc)
                return False
            c.process = process
            process.start()
        c.phase, c.reason, c.message = "running", "", None
        c.started_at, c.started_wall = self.now(), rfc3339()
        c.container_id = f"containerd://{secrets.token_hex(32)}"
        c.restart_at, c.killing, c.kill_requested = None, False, False
        c.probes = {}
        c.started = "startupProbe" not in c.spec
        c.ready = False
        self._note(
            f"pod {state.namespace}/{state.name}: started {'init ' if c.init else ''}container "
            f"{c.name} (restarts {c.restart_count})"
        )
        return True

    def _exit_of(self, state: _PodState, c: _Container, now: float) -> tuple[int | None, str]:
        behaviour = state.behaviour
        if c.process is not None:
            if not c.process.done.is_set():
                return None, ""
            code = c.process.exit_code if c.process.exit_code is not None else 128
            if c.process.start_error:
                return code, "StartError"
            return code, "Completed" if code == 0 else "Error"
        if c.kill_requested:
            return 137, "Error"
        if c.init and not c.sidecar:  # a fake pod's init container (fetch-model) succeeds
            return 0, "Completed"
        if isinstance(behaviour, CrashLoop) and not c.init:
            crashing = not behaviour.containers or c.name in behaviour.containers
            if crashing and now - c.started_at >= behaviour.after:
                return behaviour.exit_code, "Completed" if behaviour.exit_code == 0 else "Error"
        return None, ""

    def _exited(
        self, state: _PodState, c: _Container, code: int, reason: str, *, restart: bool
    ) -> None:
        term: Obj = {
            "exitCode": code,
            "reason": reason,
            "startedAt": c.started_wall,
            "finishedAt": rfc3339(),
            "containerID": c.container_id,
        }
        if c.process is not None and c.process.start_error:
            term["message"] = c.process.start_error
        c.process = None
        c.ready = c.started = False
        c.probes = {}
        where = f"pod {state.namespace}/{state.name}"
        if c.init and not c.sidecar and code == 0:
            c.phase, c.terminated = "terminated", term
            self._note(f"{where}: init container {c.name} completed")
            return
        if not restart:
            c.phase, c.terminated = "terminated", term
            return
        c.last_terminated = term
        c.restart_count += 1
        self._restarts[state.namespace, state.name, c.name] = c.restart_count
        delay = min(self.backoff * 2 ** (c.restart_count - 1), self.backoff_max)
        c.phase, c.restart_at = "waiting", self.now() + delay
        c.reason = "CrashLoopBackOff"
        c.message = (
            f"back-off {delay:g}s restarting failed container={c.name} "
            f"pod={state.name}_{state.namespace}({state.uid})"
        )
        self._note(f"{where}: container {c.name} exited {code} ({reason}); restart in {delay:g}s")

    # ------------------------------------------------------------------------ probes
    def _run_probes(self, state: _PodState, c: _Container, now: float) -> None:
        behaviour = state.behaviour
        if isinstance(behaviour, Serve | FakeAgent):
            warm = now - c.started_at >= behaviour.ready_after
        else:
            warm = True
        kinds = ["startupProbe"] if not c.started else ["livenessProbe", "readinessProbe"]
        for kind in kinds:
            probe = c.spec.get(kind)
            if not probe:
                continue
            result = self._probe(state, c, kind, probe, now)
            if result is None:
                continue
            ps = c.probes[kind]
            period = float(probe.get("periodSeconds", 10))
            threshold = int(probe.get("failureThreshold", 3))
            if kind == "readinessProbe":
                if result and ps.successes >= int(probe.get("successThreshold", 1)):
                    ps.passing = True
                elif not result and ps.failures >= threshold:
                    ps.passing = False
                continue
            if result:
                if kind == "startupProbe":
                    c.started = True
                    self._note(f"pod {state.namespace}/{state.name}: {c.name} started (probe)")
                continue
            span = now - (ps.failing_since if ps.failing_since is not None else now)
            if ps.failures >= threshold and span >= (threshold - 1) * period and not c.killing:
                what = "liveness" if kind == "livenessProbe" else "startup"
                self._note(
                    f"pod {state.namespace}/{state.name}: container {c.name} failed its {what} "
                    f"probe {ps.failures} times, will be restarted"
                )
                c.killing = True
                if c.process is not None:
                    c.process.cancel(state.grace)
                else:
                    c.kill_requested = True
        if "readinessProbe" in c.spec and self._probe_is_real(state, c, c.spec["readinessProbe"]):
            passing = c.probes.get("readinessProbe", _Probe()).passing
        else:
            passing = True
        c.ready = c.started and warm and passing and not c.killing

    def _probe_is_real(self, state: _PodState, c: _Container, probe: Obj) -> bool:
        behaviour = state.behaviour
        if isinstance(behaviour, RunContainers):
            return True
        if isinstance(behaviour, FakeAgent):
            action = probe.get("httpGet") or probe.get("tcpSocket")
            return action is not None and self._port(c, action.get("port")) == state.agent_port
        return False

    def _probe(
        self, state: _PodState, c: _Container, kind: str, probe: Obj, now: float
    ) -> bool | None:
        """The result of a finished run of the probe (None while none finished)."""
        ps = c.probes.setdefault(kind, _Probe())
        if not self._probe_is_real(state, c, probe):
            ps.successes, ps.failures, ps.passing = ps.successes + 1, 0, True
            return True
        result: bool | None = None
        if ps.future is not None:
            if not ps.future.done():
                return None
            result = ps.future.result()
            ps.future = None
            if result:
                ps.successes, ps.failures, ps.failing_since = ps.successes + 1, 0, None
            else:
                ps.failures, ps.successes = ps.failures + 1, 0
                if ps.failing_since is None:
                    ps.failing_since = ps.last_run
        period = min(float(probe.get("periodSeconds", 10)), self.probe_period)
        delay = float(probe.get("initialDelaySeconds", 0)) if kind == "livenessProbe" else 0.0
        due = now - c.started_at >= delay and (ps.last_run is None or now - ps.last_run >= period)
        action_kind = next((k for k in ("httpGet", "tcpSocket") if k in probe), None)
        if due and action_kind is None:  # exec, grpc: pass
            ps.last_run = now
            ps.successes, ps.failures, ps.passing = ps.successes + 1, 0, True
            return True
        if due and action_kind is not None:
            action = probe[action_kind]
            port = self._port(c, action.get("port"))
            if port is None:
                self._error(f"pod {state.namespace}/{state.name} {c.name}: bad probe port {action}")
                return result
            headers = {h["name"]: h["value"] for h in action.get("httpHeaders") or []}
            timeout = min(float(probe.get("timeoutSeconds", 1)), PROBE_TIMEOUT_CAP)
            ps.last_run = now
            with contextlib.suppress(RuntimeError):  # shut down (stopping)
                ps.future = self._prober.submit(
                    _probe_once,
                    action_kind,
                    action.get("host") or state.ip,
                    port,
                    path=action.get("path", "/"),
                    headers=headers,
                    timeout=timeout,
                )
        return result

    @staticmethod
    def _port(c: _Container, port: Any) -> int | None:
        if isinstance(port, int):
            return port
        if isinstance(port, str) and port.isdigit():
            return int(port)
        for p in c.spec.get("ports") or []:
            if p.get("name") == port:
                return int(p["containerPort"])
        return None

    # ------------------------------------------------------------------------ status
    def _container_status(self, state: _PodState, c: _Container, pulling: Obj | None) -> Obj:
        image = c.image
        status: Obj = {
            "name": c.name,
            "image": image,
            "imageID": "",
            "ready": c.ready and c.phase == "running",
            "started": c.phase == "running" and c.started,
            "restartCount": c.restart_count,
            "lastState": {"terminated": dict(c.last_terminated)} if c.last_terminated else {},
        }
        if c.container_id:
            status["containerID"] = c.container_id
            status["imageID"] = f"{image.split(':')[0]}@sha256:{'0' * 64}"
        if pulling is not None:
            status["state"] = {"waiting": pulling}
        elif c.phase == "running":
            status["state"] = {"running": {"startedAt": c.started_wall}}
        elif c.phase == "terminated":
            status["state"] = {"terminated": dict(c.terminated or {})}
        else:
            waiting: Obj = {"reason": c.reason}
            if c.message:
                waiting["message"] = c.message
            status["state"] = {"waiting": waiting}
        return status

    def _pulling(self, state: _PodState) -> Obj | None:
        behaviour = state.behaviour
        if not isinstance(behaviour, ImagePullBackOff):
            return None
        image = behaviour.image or (state.init or state.main)[0].image
        turn = int((self.now() - state.created_at) / max(behaviour.period, 1e-6)) % 2
        if turn == 0:
            return {
                "reason": "ErrImagePull",
                "message": f'failed to pull and unpack image "{image}": failed to resolve '
                f'reference "{image}": not found',
            }
        return {"reason": "ImagePullBackOff", "message": f'Back-off pulling image "{image}"'}

    def _render(self, state: _PodState) -> Obj:
        pulling = self._pulling(state)
        first = (state.init or state.main)[0] if state.containers else None
        init_statuses = [
            self._container_status(state, c, pulling if c is first else None) for c in state.init
        ]
        statuses = [
            self._container_status(state, c, pulling if c is first else None) for c in state.main
        ]
        incomplete = [
            c.name
            for c in state.init
            if not (c.phase == "terminated" or (c.sidecar and c.phase == "running" and c.started))
        ]
        gates = [*(c for c in state.init if c.sidecar), *state.main]
        unready = [c.name for c in gates if not (c.phase == "running" and c.ready)]
        ready = not unready and not incomplete and not state.terminating
        not_ready_msg = f"containers with unready status: [{' '.join(unready)}]"
        conditions = [
            pod_condition(
                state.transitions,
                "PodReadyToStartContainers",
                state.sandbox and not state.terminating,
            ),
            pod_condition(
                state.transitions,
                "Initialized",
                not incomplete,
                None if not incomplete else "ContainersNotInitialized",
                None
                if not incomplete
                else f"containers with incomplete status: [{' '.join(incomplete)}]",
            ),
            pod_condition(
                state.transitions,
                "Ready",
                ready,
                None if ready else "ContainersNotReady",
                None if ready else not_ready_msg,
            ),
            pod_condition(
                state.transitions,
                "ContainersReady",
                ready,
                None if ready else "ContainersNotReady",
                None if ready else not_ready_msg,
            ),
            pod_condition(state.transitions, "PodScheduled", True),
        ]
        status: Obj = {
            "phase": "Running" if state.was_running else "Pending",
            "conditions": conditions,
            "hostIP": HOST_IP,
            "hostIPs": [{"ip": HOST_IP}],
            "podIP": state.ip,
            "podIPs": [{"ip": state.ip}],
            "startTime": state.start_wall or state.scheduled_wall,
            "qosClass": "Burstable",
        }
        if init_statuses:
            status["initContainerStatuses"] = init_statuses
        status["containerStatuses"] = statuses
        return status

    def _write_pod_status(self, state: _PodState, pod: Obj) -> Obj:
        patch = _status_patch(pod.get("status") or {}, self._render(state))
        if patch is None:
            return pod
        updated: Obj = self.api.patch(
            PODS, state.namespace, state.name, {"status": patch}, subresource="status"
        )
        state.snapshot = updated
        return updated

    # ------------------------------------------------------------------------ RunContainers
    def _get(self, resource: str, namespace: str, name: str) -> Obj | None:
        key = (resource, namespace, name)
        if key not in self._cache:
            self._cache[key] = self.api.get(resource, namespace, name)
        return self._cache[key]

    def _source(self, namespace: str, resource: str, name: str, optional: bool) -> Obj | None:
        obj = self._get(resource, namespace, name)
        if obj is None and not optional:
            kind = "secret" if resource == SECRETS else "configmap"
            raise _ContainerConfigError(f'{kind} "{name}" not found')
        return obj

    def _volume_files(self, namespace: str, volume: Obj) -> list[tuple[str, bytes, int | None]]:
        """``(relative path, content, mode)`` of a ConfigMap or Secret volume's files."""
        if "configMap" not in volume and "secret" not in volume:
            return []
        is_secret = "secret" in volume
        source = volume["secret"] if is_secret else volume["configMap"]
        name = source.get("secretName" if is_secret else "name", "")
        resource = SECRETS if is_secret else CONFIGMAPS
        obj = self._source(namespace, resource, name, source.get("optional", False))
        data = _object_data(obj) if obj is not None else {}
        mode = source.get("defaultMode")
        files: list[tuple[str, bytes, int | None]] = []
        for item in source.get("items") or [{"key": k, "path": k} for k in data]:
            if item["key"] not in data:
                if source.get("optional"):
                    continue
                kind = "Secret" if is_secret else "ConfigMap"
                raise _ContainerConfigError(
                    f"couldn't find key {item['key']} in {kind} {namespace}/{name}"
                )
            files.append((item["path"], data[item["key"]], item.get("mode", mode)))
        return files

    def _rendered_volume(
        self, state: _PodState, volume: Obj, behaviour: RunContainers
    ) -> list[tuple[str, bytes, int | None]]:
        """A volume's files as the pod's processes see them (paths and addresses mapped)."""
        rendered = []
        for rel, data, mode in self._volume_files(state.namespace, volume):
            content = _map_json_paths(data, state.mounts) if rel.endswith(".json") else data
            try:
                text = content.decode("utf-8")
            except UnicodeDecodeError:
                rendered.append((rel, content, mode))
                continue
            mapped = pod_addresses(text, state.ip, behaviour.host_ports).encode()
            rendered.append((rel, mapped, mode))
        return rendered

    def _setup_volumes(self, state: _PodState, pod: Obj, behaviour: RunContainers) -> None:
        spec = pod.get("spec") or {}
        root = Path(behaviour.workdir).resolve() / "pods" / state.namespace / state.name
        volumes_dir = root / "volumes"
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        mounts: dict[str, Path] = {}
        for c in state.containers:
            for mount in c.spec.get("volumeMounts") or []:
                if mount["name"] not in volumes:
                    raise _ContainerConfigError(f'volume "{mount["name"]}" is not in the pod spec')
                local = volumes_dir / mount["name"]
                if mount.get("subPath"):
                    local = local / mount["subPath"]
                mounts.setdefault(mount["mountPath"], local)
        state.mounts = mounts
        rendered = {
            name: self._rendered_volume(state, volume, behaviour)
            for name, volume in volumes.items()
        }
        root.mkdir(parents=True, exist_ok=True)
        for name, files in rendered.items():
            target = volumes_dir / name
            if "configMap" in volumes[name] or "secret" in volumes[name]:
                _atomic_write(target, files)
                state.volumes[name] = _digest(files)
            else:
                target.mkdir(parents=True, exist_ok=True)
        for c in state.containers:
            for mount in c.spec.get("volumeMounts") or []:
                if mount.get("subPath"):
                    local = volumes_dir / mount["name"] / mount["subPath"]
                    if not local.exists():
                        local.mkdir(parents=True, exist_ok=True)
        state.root = root
        if behaviour.socket_shim:
            shim = Path(behaviour.workdir).resolve() / ".serving-kubelet" / "sitecustomize.py"
            if not shim.is_file() or shim.read_text(encoding="utf-8") != SHIM:
                shim.parent.mkdir(parents=True, exist_ok=True)
                shim.write_text(SHIM, encoding="utf-8")
        self._note(f"pod {state.namespace}/{state.name}: volumes ready under {root}")

    def _refresh_volumes(self, state: _PodState, pod: Obj, behaviour: RunContainers) -> None:
        """ConfigMap and Secret volumes follow their objects (in place, no restart)."""
        volumes = {v["name"]: v for v in (pod.get("spec") or {}).get("volumes") or []}
        now = self.now()
        for name in list(state.volumes):
            try:
                files = self._rendered_volume(state, volumes[name], behaviour)
            except _ContainerConfigError as exc:  # deleted: the kubelet keeps the last files
                if name not in state.pending_volumes:
                    self._note(f"pod {state.namespace}/{state.name}: volume {name}: {exc}")
                    state.pending_volumes[name] = ("", now)
                continue
            digest = _digest(files)
            if digest == state.volumes[name]:
                state.pending_volumes.pop(name, None)
                continue
            pending = state.pending_volumes.get(name)
            if pending is None or pending[0] != digest:
                state.pending_volumes[name] = pending = (digest, now)
            if now - pending[1] >= behaviour.configmap_sync_delay:
                assert state.root is not None
                _atomic_write(state.root / "volumes" / name, files)
                state.volumes[name] = digest
                del state.pending_volumes[name]
                self._note(f"pod {state.namespace}/{state.name}: volume {name} updated")

    def _build_process(
        self, state: _PodState, pod: Obj, c: _Container, behaviour: RunContainers
    ) -> _Process:
        assert state.root is not None
        container = c.spec
        if not container.get("command"):
            raise _ContainerConfigError("no command: image entrypoints are unknown here")
        root = state.root
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts") or []:
            local = root / "volumes" / mount["name"]
            mounts[mount["mountPath"]] = local / mount["subPath"] if mount.get("subPath") else local
        message_path = container.get("terminationMessagePath") or "/dev/termination-log"
        result_path = root / f"{c.name}.termination-log"
        mounts[message_path] = result_path
        env_values = self._resolve_env(state, pod, container, behaviour)
        env = dict(os.environ) if behaviour.inherit_environ else {}
        env.update(behaviour.environ)
        for name, value in env_values.items():
            env[name] = pod_addresses(_local_path(value, mounts), state.ip, behaviour.host_ports)
        env["KUBETUNE_RESULT_PATH"] = str(result_path)
        env["HF_HUB_OFFLINE"] = behaviour.environ.get("HF_HUB_OFFLINE", "1")
        if "KUBETUNE_LOCAL_S3_ROOT" not in env and not env.get("AWS_ENDPOINT_URL"):
            env["KUBETUNE_LOCAL_S3_ROOT"] = str(Path(behaviour.workdir).resolve() / "s3")
        env[POD_IP_ENV] = state.ip
        if behaviour.socket_shim:
            shim = str(Path(behaviour.workdir).resolve() / ".serving-kubelet")
            env["PYTHONPATH"] = os.pathsep.join(p for p in (shim, env.get("PYTHONPATH")) if p)
        host = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})
        command = [
            a
            if i == 0 or a.startswith(host)
            else pod_addresses(_local_path(a, mounts), state.ip, behaviour.host_ports)
            for i, a in enumerate([*container["command"], *(container.get("args") or [])])
        ]
        if command[0] == "kubetune-runtime":
            command = [sys.executable, "-m", "kubetune_runtime.entrypoint", *command[1:]]
        cwd = (
            Path(_local_path(container["workingDir"], mounts))
            if container.get("workingDir")
            else root
        )
        cwd.mkdir(parents=True, exist_ok=True)
        result_path.write_bytes(b"")
        self._note(f"pod {state.namespace}/{state.name} {c.name}: {' '.join(command)}")
        return _Process(
            f"{state.name}-{c.name}", command, env, cwd, root / f"{c.name}.log", append=True
        )

    def _resolve_env(
        self, state: _PodState, pod: Obj, container: Obj, behaviour: RunContainers
    ) -> dict[str, str]:
        """The container's ``envFrom`` and ``env`` values (missing optional ones left out)."""
        resolved: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            is_secret = "secretRef" in source
            ref = source.get("secretRef" if is_secret else "configMapRef") or {}
            obj = self._source(
                state.namespace, SECRETS if is_secret else CONFIGMAPS, ref.get("name", ""),
                bool(ref.get("optional")),
            )  # fmt: skip
            for key, value in (_object_data(obj) if obj is not None else {}).items():
                resolved[source.get("prefix", "") + key] = value.decode("utf-8")
        for var in container.get("env") or []:
            source = var.get("valueFrom")
            if "value" in var or not source:
                resolved[var["name"]] = str(var.get("value", ""))
                continue
            if "secretKeyRef" in source or "configMapKeyRef" in source:
                is_secret = "secretKeyRef" in source
                ref = source["secretKeyRef" if is_secret else "configMapKeyRef"]
                if is_secret and var["name"] in behaviour.environ:
                    resolved[var["name"]] = behaviour.environ[var["name"]]
                    continue
                optional = bool(ref.get("optional"))
                obj = self._source(
                    state.namespace, SECRETS if is_secret else CONFIGMAPS, ref["name"], optional
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
                path = source["fieldRef"]["fieldPath"]
                resolved[var["name"]] = field_value(pod, path, state.ip, HOST_IP)
        return resolved


# ------------------------------------------------------------------------------- helpers
def _revision(rs: Obj) -> int:
    value = ((rs.get("metadata") or {}).get("annotations") or {}).get(REVISION, "0")
    return int(value) if str(value).isdigit() else 0


def _digest(files: list[tuple[str, bytes, int | None]]) -> str:
    digest = hashlib.sha256()
    for rel, data, mode in sorted(files, key=lambda f: f[0]):
        digest.update(f"{rel}\0{mode}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def _atomic_write(target: Path, files: list[tuple[str, bytes, int | None]]) -> None:
    """Write a ConfigMap/Secret volume as the kubelet's AtomicWriter does.

    The files go to a fresh ``..<stamp>`` folder; the ``..data`` symlink is swapped to it with
    ``os.replace`` (readers see the old or the new set, never a mix); each top-level entry is a
    symlink through ``..data``; the previous folder is removed.
    """
    target.mkdir(parents=True, exist_ok=True)
    stamp = target / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{secrets.token_hex(4)}"
    stamp.mkdir()
    for rel, data, mode in files:
        path = stamp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if mode is not None:
            path.chmod(mode)
    data_link = target / "..data"
    previous = os.readlink(data_link) if data_link.is_symlink() else None
    tmp = target / "..data_tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(stamp.name)
    os.replace(tmp, data_link)
    wanted = {rel.split("/", 1)[0] for rel, _, _ in files}
    for name in wanted:
        link = target / name
        if not link.is_symlink():
            if link.is_dir():
                shutil.rmtree(link)
            else:
                link.unlink(missing_ok=True)
            link.symlink_to(f"..data/{name}")
    for entry in target.iterdir():
        if not entry.name.startswith("..") and entry.name not in wanted and entry.is_symlink():
            entry.unlink()
    if previous and previous != stamp.name:
        shutil.rmtree(target / previous, ignore_errors=True)


__all__ = [
    "AGENT_PORT_NAME",
    "DEPLOYMENTS",
    "REPLICASETS",
    "TEMPLATE_HASH",
    "Behaviour",
    "BehaviourFn",
    "CrashLoop",
    "FakeAgent",
    "ImagePullBackOff",
    "PodRecord",
    "RunContainers",
    "Serve",
    "ServingKubelet",
    "by_ordinal",
    "condition",
    "pod_addresses",
    "pod_ready",
    "template_hash",
]
