"""The Deployment + ReplicaSet controller and long-running kubelet harness.

``tests/support/serving_kubelet.py`` against the fake API alone: no operator runs here. Each test
creates apps/v1 Deployments (and ConfigMaps) as an operator would, lets the harness move them, and
checks the shapes an operator reads: Deployment and ReplicaSet status, pod conditions, container
statuses, pod IPs. Container commands are small Python scripts, so no model is needed.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.kube_api import KubeApi
from tests.support.serving_kubelet import (
    DEPLOYMENTS,
    REPLICASETS,
    TEMPLATE_HASH,
    CrashLoop,
    FakeAgent,
    ImagePullBackOff,
    RunContainers,
    Serve,
    ServingKubelet,
    by_ordinal,
    condition,
    pod_addresses,
    pod_ready,
    template_hash,
)

Obj = dict[str, Any]
NS = "serving"
PY = sys.executable

# A small server: GET /ready answers 200 once <state>/ready exists, /live 503 while <state>/dead
# exists (removed at start), anything else who answered. Listens on every --listen HOST:PORT, on
# the "admin" URL of the JSON file given with --config, and on a hard-coded 127.0.0.1:ADMIN+1.
SERVER = textwrap.dedent(
    """
    import http.server, json, os, pathlib, sys, threading, urllib.parse
    args = sys.argv[1:]
    state = pathlib.Path(args[args.index("--state") + 1])
    state.mkdir(parents=True, exist_ok=True)
    (state / "dead").unlink(missing_ok=True)
    listen = [a for i, a in enumerate(args) if i and args[i - 1] == "--listen"]
    if "--config" in args:
        config = json.loads(pathlib.Path(args[args.index("--config") + 1]).read_text())
        admin = urllib.parse.urlsplit(config["admin"])
        listen.append(f"{admin.hostname}:{admin.port}")
        listen.append(f"127.0.0.1:{admin.port + 1}")  # hard-coded in code: the bind shim
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code = 200
            if self.path == "/ready":
                code = 200 if (state / "ready").exists() else 503
            elif self.path == "/live":
                code = 503 if (state / "dead").exists() else 200
            body = json.dumps({
                "pod": os.environ.get("POD_NAME"), "podIP": os.environ.get("POD_IP"),
                "bound": "%s:%d" % self.server.server_address,
            }).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    for address in listen:
        host, port = address.rsplit(":", 1)
        server = http.server.ThreadingHTTPServer((host, int(port)), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        print("listening", server.server_address, flush=True)
    threading.Event().wait()
    """
)
SLEEP = "import time; print('up', flush=True); time.sleep(3600)"


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture
def api() -> Iterator[KubeApi]:
    with KubeApi() as server:
        yield server
    assert server.unexpected_errors == []


@pytest.fixture
def make_harness(api: KubeApi) -> Iterator[Callable[..., ServingKubelet]]:
    """Build harnesses that are always stopped at teardown (threads and processes)."""
    made: list[ServingKubelet] = []

    def make(*args: Any, **kwargs: Any) -> ServingKubelet:
        harness = ServingKubelet(api, *args, **kwargs)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.stop()
        assert harness.errors == []
    left = [t.name for t in threading.enumerate() if t.name.startswith("serving-kubelet")]
    assert left == []


def deployment(
    name: str,
    containers: list[Obj],
    *,
    replicas: int = 1,
    strategy: Obj | None = None,
    init: list[Obj] | None = None,
    volumes: list[Obj] | None = None,
    **spec: Any,
) -> Obj:
    labels = {"app": name}
    pod_spec: Obj = {"containers": containers, "terminationGracePeriodSeconds": 2}
    if init:
        pod_spec["initContainers"] = init
    if volumes:
        pod_spec["volumes"] = volumes
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
            **({"strategy": strategy} if strategy else {}),
            **spec,
        },
    }


def container(name: str = "main", command: list[str] | None = None, **extra: Any) -> Obj:
    return {"name": name, "image": "kubetune/runtime:dev", "command": command or [PY], **extra}


def pod_env() -> list[Obj]:
    return [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]


def get_deployment(api: KubeApi, name: str) -> Obj:
    found = api.get(DEPLOYMENTS, NS, name)
    assert found is not None
    return found


def live_pods(harness: ServingKubelet, name: str) -> list[Obj]:
    return harness.pods(NS, name)


def ready_count(harness: ServingKubelet, name: str, n: int) -> Callable[[], list[Obj] | None]:
    """A ``wait_for`` predicate: exactly ``n`` pods, all Ready."""

    def check() -> list[Obj] | None:
        pods = live_pods(harness, name)
        return pods if len(pods) == n and all(pod_ready(p) for p in pods) else None

    return check


def rolled_out(api: KubeApi, name: str) -> Callable[[], Obj | None]:
    """A ``wait_for`` predicate: the Deployment's Progressing reason is NewReplicaSetAvailable."""

    def check() -> Obj | None:
        dep = get_deployment(api, name)
        cond = condition(dep, "Progressing") or {}
        done = cond.get("reason") == "NewReplicaSetAvailable"
        current = dep["status"].get("observedGeneration") == dep["metadata"]["generation"]
        return dep if done and current else None

    return check


def fetch(url: str, timeout: float = 2.0) -> tuple[int, Obj]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as rsp:  # noqa: S310 - local URL
            return rsp.status, json.loads(rsp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def answered(url: str) -> Callable[[], tuple[int, Obj] | None]:
    """A ``wait_for`` predicate: ``fetch(url)`` once something listens there."""

    def check() -> tuple[int, Obj] | None:
        try:
            return fetch(url)
        except OSError:
            return None

    return check


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def status_of(pod: Obj, name: str, *, init: bool = False) -> Obj:
    key = "initContainerStatuses" if init else "containerStatuses"
    return next(s for s in pod["status"][key] if s["name"] == name)


# ------------------------------------------------------------------------------ pure helpers
def test_pod_addresses_rewrites_loopback_and_any_but_host_ports() -> None:
    text = "--host 0.0.0.0 --port 8000 http://127.0.0.1:8001/x 127.0.0.10 127.0.0.1:9000"
    assert pod_addresses(text, "127.0.0.7", host_ports={9000}) == (
        "--host 127.0.0.7 --port 8000 http://127.0.0.7:8001/x 127.0.0.10 127.0.0.1:9000"
    )
    template = {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": []}}
    assert template_hash(template) == template_hash(json.loads(json.dumps(template)))
    assert len(template_hash(template)) == 10
    assert template_hash(template) != template_hash({**template, "x": 1})


def test_apps_v1_is_served_with_status_subresources(api: KubeApi) -> None:
    status, doc = fetch(f"{api.url}/apis/apps/v1")
    assert status == 200
    names = {r["name"] for r in doc["resources"]}
    assert {"deployments", "deployments/status", "replicasets", "replicasets/status"} <= names
    created = api.create(DEPLOYMENTS, deployment("d", [container()]))
    assert created["metadata"]["generation"] == 1
    assert "status" not in created
    api.patch(DEPLOYMENTS, NS, "d", {"status": {"replicas": 1}}, subresource="status")
    bumped = api.patch(DEPLOYMENTS, NS, "d", {"spec": {"replicas": 2}})
    assert bumped["metadata"]["generation"] == 2
    assert bumped["status"] == {"replicas": 1}


# ------------------------------------------------------------------------------ controllers
def test_deployment_gets_a_replicaset_ready_pods_and_status(
    api: KubeApi, make_harness: Callable[..., ServingKubelet]
) -> None:
    harness = make_harness(Serve())
    dep = api.create(DEPLOYMENTS, deployment("web", [container()], replicas=3))
    pods = harness.wait_for(ready_count(harness, "web", 3), message="3 ready pods")
    done = harness.wait_for(rolled_out(api, "web"))

    (rs,) = harness.replicasets(NS, "web")
    digest = template_hash(dep["spec"]["template"])
    assert rs["metadata"]["name"] == f"web-{digest}"
    assert rs["metadata"]["labels"] == {"app": "web", TEMPLATE_HASH: digest}
    assert rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "1"
    (owner,) = rs["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == (
        "Deployment",
        dep["metadata"]["uid"],
        True,
    )
    assert rs["spec"]["selector"]["matchLabels"] == {"app": "web", TEMPLATE_HASH: digest}
    assert rs["status"]["replicas"] == rs["status"]["readyReplicas"] == 3
    for pod in pods:
        assert pod["metadata"]["name"].startswith(f"web-{digest}-")
        assert len(pod["metadata"]["name"]) == len(f"web-{digest}-") + 5
        assert pod["metadata"]["labels"] == {"app": "web", TEMPLATE_HASH: digest}
        (pod_owner,) = pod["metadata"]["ownerReferences"]
        assert (pod_owner["kind"], pod_owner["uid"]) == ("ReplicaSet", rs["metadata"]["uid"])
        assert pod["status"]["phase"] == "Running"
        assert {c["type"]: c["status"] for c in pod["status"]["conditions"]} == {
            "PodReadyToStartContainers": "True",
            "Initialized": "True",
            "Ready": "True",
            "ContainersReady": "True",
            "PodScheduled": "True",
        }
        main = status_of(pod, "main")
        assert main["ready"] is main["started"] is True
        assert main["restartCount"] == 0
        assert main["containerID"].startswith("containerd://")
        assert "running" in main["state"]
        assert main["lastState"] == {}
    ips = [p["status"]["podIP"] for p in pods]
    assert len(set(ips)) == 3
    assert all(ip.startswith("127.0.0.") and ip != "127.0.0.1" for ip in ips)
    assert [harness.pod_ip(NS, p["metadata"]["name"]) for p in pods] == ips
    assert harness.endpoints(NS, {"app": "web"}) == sorted(
        ips, key=lambda ip: int(ip.rsplit(".", 1)[1])
    )

    status = done["status"]
    assert status["observedGeneration"] == 1
    assert status["replicas"] == status["updatedReplicas"] == 3
    assert status["readyReplicas"] == status["availableReplicas"] == 3
    assert "unavailableReplicas" not in status
    available, progressing = status["conditions"]
    assert (available["type"], available["status"], available["reason"]) == (
        "Available",
        "True",
        "MinimumReplicasAvailable",
    )
    assert (progressing["type"], progressing["status"]) == ("Progressing", "True")
    assert progressing["message"] == f'ReplicaSet "web-{digest}" has successfully progressed.'
    assert done["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "1"
    assert [r.ordinal for r in harness.pods_created("web")] == [0, 1, 2]


def test_rolling_update_surges_and_removes_old_pods_only_after_new_ones_are_ready(
    api: KubeApi, make_harness: Callable[..., ServingKubelet]
) -> None:
    harness = make_harness(Serve(ready_after=0.2))
    strategy = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    api.create(DEPLOYMENTS, deployment("web", [container()], replicas=2, strategy=strategy))
    harness.wait_for(rolled_out(api, "web"))
    (old_rs,) = harness.replicasets(NS, "web")
    old_pods = {p["metadata"]["uid"] for p in live_pods(harness, "web")}

    patch = {"spec": {"template": {"metadata": {"annotations": {"rev": "2"}}}}}
    api.patch(DEPLOYMENTS, NS, "web", patch)
    seen: list[tuple[int, int]] = []

    def check() -> Obj | None:
        pods = live_pods(harness, "web")
        seen.append((len(pods), sum(1 for p in pods if pod_ready(p))))
        return rolled_out(api, "web")()

    done = harness.wait_for(check, message="rollout")
    assert max(total for total, _ in seen) == 3  # maxSurge 1
    assert min(ready for _, ready in seen) >= 2  # maxUnavailable 0: never fewer than 2 ready
    old_rs_now, new_rs = harness.replicasets(NS, "web")
    assert old_rs_now["metadata"]["uid"] == old_rs["metadata"]["uid"]
    assert old_rs_now["spec"]["replicas"] == 0  # kept, scaled to 0
    assert new_rs["spec"]["replicas"] == 2
    assert new_rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"
    new_pods = live_pods(harness, "web")
    assert not old_pods & {p["metadata"]["uid"] for p in new_pods}
    assert done["status"]["updatedReplicas"] == 2
    assert done["status"]["observedGeneration"] == 2
    assert done["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"

    # Rolling back to the first template reuses its ReplicaSet, as the next revision.
    back = {"spec": {"template": {"metadata": {"annotations": None}}}}
    api.patch(DEPLOYMENTS, NS, "web", back)
    done = harness.wait_for(rolled_out(api, "web"))
    replicasets = {rs["metadata"]["uid"]: rs for rs in harness.replicasets(NS, "web")}
    assert len(replicasets) == 2
    first = replicasets[old_rs["metadata"]["uid"]]
    assert first["spec"]["replicas"] == 2
    assert first["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "3"
    assert done["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "3"


def test_default_strategy_is_25_percent_and_recreate_never_overlaps(
    api: KubeApi, make_harness: Callable[..., ServingKubelet]
) -> None:
    harness = make_harness(Serve(ready_after=0.1))
    api.create(DEPLOYMENTS, deployment("web", [container()], replicas=4))
    api.create(
        DEPLOYMENTS, deployment("db", [container()], replicas=2, strategy={"type": "Recreate"})
    )
    harness.wait_for(lambda: rolled_out(api, "web")() and rolled_out(api, "db")())
    change = {"spec": {"template": {"metadata": {"annotations": {"rev": "2"}}}}}
    api.patch(DEPLOYMENTS, NS, "web", change)
    api.patch(DEPLOYMENTS, NS, "db", change)
    web: list[tuple[int, int]] = []
    db_hashes: list[set[str]] = []

    def check() -> bool:
        pods = live_pods(harness, "web")
        web.append((len(pods), sum(1 for p in pods if pod_ready(p))))
        db_hashes.append({p["metadata"]["labels"][TEMPLATE_HASH] for p in live_pods(harness, "db")})
        return bool(rolled_out(api, "web")() and rolled_out(api, "db")())

    harness.wait_for(check, message="both rollouts")
    assert max(total for total, _ in web) <= 5  # surge: 25% of 4 rounded up
    assert min(ready for _, ready in web) >= 3  # unavailable: 25% of 4 rounded down
    assert all(len(hashes) <= 1 for hashes in db_hashes)  # never old and new pods together
    assert set() in db_hashes  # everything old went first


def test_scaling_up_and_down_removes_unready_pods_first_then_newest(
    api: KubeApi, make_harness: Callable[..., ServingKubelet]
) -> None:
    harness = make_harness(by_ordinal(Serve(), Serve(), ImagePullBackOff(), Serve()))
    api.create(DEPLOYMENTS, deployment("web", [container()], replicas=1))
    harness.wait_for(ready_count(harness, "web", 1))
    api.patch(DEPLOYMENTS, NS, "web", {"spec": {"replicas": 4}})

    def three_ready_one_pulling() -> list[Obj] | None:
        pods = live_pods(harness, "web")
        ready = [p for p in pods if pod_ready(p)]
        return pods if len(pods) == 4 and len(ready) == 3 else None

    pods = harness.wait_for(three_ready_one_pulling)
    stuck = next(p for p in pods if not pod_ready(p))
    assert stuck["status"]["phase"] == "Pending"
    waiting = status_of(stuck, "main")["state"]["waiting"]
    assert waiting["reason"] in ("ErrImagePull", "ImagePullBackOff")
    dep = harness.wait_for(
        lambda: (d := get_deployment(api, "web"))["status"].get("readyReplicas") == 3 and d
    )
    assert dep["status"]["unavailableReplicas"] == 1
    available = condition(dep, "Available")
    assert available is not None
    assert available["status"] == "True"

    api.patch(DEPLOYMENTS, NS, "web", {"spec": {"replicas": 2}})
    two = harness.wait_for(ready_count(harness, "web", 2))
    records = {r.uid: r.ordinal for r in harness.records}
    # The pulling pod (ordinal 2) went first, then the newest ready one (ordinal 3).
    assert sorted(records[p["metadata"]["uid"]] for p in two) == [0, 1]
    assert len(harness.replicasets(NS, "web")) == 1
    done = harness.wait_for(rolled_out(api, "web"))
    assert done["status"]["replicas"] == 2


def test_deleting_the_deployment_collects_replicasets_and_pods(
    api: KubeApi, make_harness: Callable[..., ServingKubelet]
) -> None:
    harness = make_harness(Serve())
    api.create(DEPLOYMENTS, deployment("web", [container()], replicas=2))
    harness.wait_for(ready_count(harness, "web", 2))
    api.delete(DEPLOYMENTS, NS, "web")
    harness.wait_for(lambda: not api.list("v1/pods", NS) and not api.list(REPLICASETS, NS))
    for _ in range(5):
        harness.tick()
    assert api.list("v1/pods", NS) == []
    assert len(harness.records) == 2


# ------------------------------------------------------------------------------ kubelet
def test_fake_agents_answer_status_on_their_own_ip_and_readiness_follows_readyz(
    api: KubeApi, make_harness: Callable[..., ServingKubelet]
) -> None:
    ready: dict[str, bool] = {}

    def status(pod: Obj) -> Obj:
        name = pod["metadata"]["name"]
        return {"pod": name, "ready": ready.get(name, True), "adapters": []}

    harness = make_harness(FakeAgent(status))
    agent = container(
        "agent",
        ports=[{"name": "agent-status", "containerPort": 18090}],
        readinessProbe={"httpGet": {"path": "/readyz", "port": "agent-status"}, "periodSeconds": 1},
    )
    api.create(DEPLOYMENTS, deployment("llm", [container("engine"), agent], replicas=2))
    pods = harness.wait_for(ready_count(harness, "llm", 2))
    for pod in pods:
        ip = pod["status"]["podIP"]
        assert fetch(f"http://{ip}:18090/status") == (
            200,
            {"pod": pod["metadata"]["name"], "ready": True, "adapters": []},
        )
        assert fetch(f"http://{ip}:18090/healthz")[0] == 200
    first, second = (p["metadata"]["name"] for p in pods)
    ready[first] = False
    assert fetch(f"http://{harness.pod_ip(NS, first)}:18090/readyz")[0] == 503
    harness.wait_for(lambda: harness.endpoints(NS, "app=llm") == [harness.pod_ip(NS, second)])
    unready = next(p for p in live_pods(harness, "llm") if p["metadata"]["name"] == first)
    assert status_of(unready, "agent")["ready"] is False
    assert status_of(unready, "engine")["ready"] is True
    ready[first] = True
    harness.wait_for(lambda: len(harness.endpoints(NS, "app=llm")) == 2)

    harness.kill_container(NS, second, "agent")  # a fake container restarts too

    def agent_restarted() -> list[Obj] | None:
        if harness.restart_count(NS, second, "agent") != 1:
            return None
        return ready_count(harness, "llm", 2)()

    restarted = harness.wait_for(agent_restarted)
    pod = next(p for p in restarted if p["metadata"]["name"] == second)
    assert status_of(pod, "agent")["lastState"]["terminated"]["exitCode"] == 137


def test_crash_loop_backs_off_and_the_rollout_misses_its_deadline(
    api: KubeApi, make_harness: Callable[..., ServingKubelet]
) -> None:
    harness = make_harness(CrashLoop(exit_code=2, containers=("engine",)), backoff=0.1)
    spec = deployment("bad", [container("engine"), container("agent")], progressDeadlineSeconds=1)
    api.create(DEPLOYMENTS, spec)

    def looping() -> Obj | None:
        pods = live_pods(harness, "bad")
        if not pods:
            return None
        engine = status_of(pods[0], "engine")
        waiting = engine["state"].get("waiting") or {}
        return pods[0] if engine["restartCount"] >= 2 and waiting.get("reason") else None

    pod = harness.wait_for(looping)
    engine = status_of(pod, "engine")
    assert engine["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert engine["lastState"]["terminated"]["exitCode"] == 2
    assert engine["lastState"]["terminated"]["reason"] == "Error"
    assert status_of(pod, "agent")["restartCount"] == 0
    assert pod["status"]["phase"] == "Running"
    assert not pod_ready(pod)

    def missed() -> Obj | None:
        cond = condition(get_deployment(api, "bad"), "Progressing") or {}
        return cond if cond.get("reason") == "ProgressDeadlineExceeded" else None

    progressing = harness.wait_for(missed, timeout=10)
    assert progressing["status"] == "False"
    available = condition(get_deployment(api, "bad"), "Available")
    assert available is not None
    assert (available["status"], available["reason"]) == ("False", "MinimumReplicasUnavailable")


def test_init_containers_run_in_order_and_a_failing_one_is_retried(
    api: KubeApi, make_harness: Callable[..., ServingKubelet], tmp_path: Path
) -> None:
    append = "import pathlib, sys; p = pathlib.Path(sys.argv[1]); p.parent.mkdir(exist_ok=True)\n"
    append += "p.open('a').write(sys.argv[2] + '\\n')\n"
    fail_once = append + "m = p.with_name('marker')\nif not m.exists(): m.touch(); sys.exit(3)\n"
    mount = [{"name": "shared", "mountPath": "/work/shared"}]
    init = [
        container("first", [PY, "-c", append, "/work/shared/order", "first"], volumeMounts=mount),
        container(
            "second", [PY, "-c", fail_once, "/work/shared/order", "second"], volumeMounts=mount
        ),
    ]
    main = container(
        "main",
        [PY, "-c", append + SLEEP.replace("; ", "\n"), "/work/shared/order", "main"],
        volumeMounts=mount,
    )
    harness = make_harness(RunContainers(tmp_path), backoff=0.5)
    spec = deployment("init", [main], init=init, volumes=[{"name": "shared", "emptyDir": {}}])
    api.create(DEPLOYMENTS, spec)

    def backing_off() -> Obj | None:
        pods = live_pods(harness, "init")
        if not pods or "initContainerStatuses" not in pods[0]["status"]:
            return None
        second = status_of(pods[0], "second", init=True)
        waiting = second["state"].get("waiting") or {}
        return pods[0] if waiting.get("reason") == "CrashLoopBackOff" else None

    pod = harness.wait_for(backing_off)
    assert pod["status"]["phase"] == "Pending"
    initialized = condition(pod, "Initialized")
    assert initialized is not None
    assert (initialized["status"], initialized["reason"]) == ("False", "ContainersNotInitialized")
    assert initialized["message"] == "containers with incomplete status: [second]"
    first = status_of(pod, "first", init=True)
    assert first["state"]["terminated"]["reason"] == "Completed"
    assert status_of(pod, "second", init=True)["lastState"]["terminated"]["exitCode"] == 3
    assert status_of(pod, "main")["state"]["waiting"]["reason"] == "PodInitializing"

    (pod,) = harness.wait_for(ready_count(harness, "init", 1))
    name = pod["metadata"]["name"]
    order = tmp_path / "pods" / NS / name / "volumes" / "shared" / "order"
    harness.wait_for(lambda: order.is_file() and "main" in order.read_text())
    assert order.read_text().split() == ["first", "second", "second", "main"]
    assert status_of(pod, "second", init=True)["restartCount"] == 1
    assert status_of(pod, "second", init=True)["state"]["terminated"]["exitCode"] == 0
    assert harness.restart_count(NS, name, "second") == 1
    log = harness.log_path(NS, name, "main")
    assert log is not None
    harness.wait_for(lambda: "up" in log.read_text())


def test_killed_container_is_restarted_in_the_same_pod(
    api: KubeApi, make_harness: Callable[..., ServingKubelet], tmp_path: Path
) -> None:
    harness = make_harness(RunContainers(tmp_path), backoff=0.1)
    api.create(
        DEPLOYMENTS,
        deployment("svc", [container("a", [PY, "-c", SLEEP]), container("b", [PY, "-c", SLEEP])]),
    )
    (pod,) = harness.wait_for(ready_count(harness, "svc", 1))
    name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
    pid_a = harness.wait_for(lambda: harness.pid(NS, name, "a"))
    pid_b = harness.wait_for(lambda: harness.pid(NS, name, "b"))

    log = harness.log_path(NS, name, "a")
    assert log is not None
    harness.wait_for(lambda: "up" in log.read_text())
    harness.kill_container(NS, name, "a")
    (pod,) = harness.wait_for(
        lambda: (
            (pods := ready_count(harness, "svc", 1)())
            and status_of(pods[0], "a")["restartCount"] == 1
            and pods
        )
    )
    assert pod["metadata"]["uid"] == uid
    a = status_of(pod, "a")
    assert a["lastState"]["terminated"]["exitCode"] == 137
    assert a["lastState"]["terminated"]["reason"] == "Error"
    assert "running" in a["state"]
    new_pid = harness.wait_for(lambda: harness.pid(NS, name, "a"))
    assert new_pid != pid_a
    assert not alive(pid_a)
    assert harness.pid(NS, name, "b") == pid_b
    assert status_of(pod, "b")["restartCount"] == 0
    harness.wait_for(lambda: log.read_text().count("up") == 2)  # appended across restarts

    harness.stop()
    assert not alive(new_pid)
    assert not alive(pid_b)


def test_readiness_and_liveness_probes_hit_a_real_server(
    api: KubeApi, make_harness: Callable[..., ServingKubelet], tmp_path: Path
) -> None:
    harness = make_harness(RunContainers(tmp_path), backoff=0.1)
    server = container(
        "server",
        [PY, "-c", SERVER, "--state", "/state", "--listen", "0.0.0.0:28000"],
        ports=[{"name": "http", "containerPort": 28000}],
        volumeMounts=[{"name": "state", "mountPath": "/state"}],
        readinessProbe={"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1},
        livenessProbe={
            "httpGet": {"path": "/live", "port": 28000},
            "periodSeconds": 1,
            "failureThreshold": 2,
        },
    )
    spec = deployment("probed", [server], volumes=[{"name": "state", "emptyDir": {}}])
    api.create(DEPLOYMENTS, spec)
    (pod,) = harness.wait_for(lambda: live_pods(harness, "probed"))
    name = pod["metadata"]["name"]
    state = tmp_path / "pods" / NS / name / "volumes" / "state"
    log = tmp_path / "pods" / NS / name / "server.log"
    harness.wait_for(lambda: log.is_file() and "listening" in log.read_text())
    for _ in range(5):
        harness.tick()
        time.sleep(0.05)
    (pod,) = live_pods(harness, "probed")
    assert not pod_ready(pod)
    assert status_of(pod, "server")["started"] is True
    assert harness.endpoints(NS, "app=probed") == []

    (state / "ready").touch()
    (pod,) = harness.wait_for(ready_count(harness, "probed", 1))
    assert harness.endpoints(NS, "app=probed") == [pod["status"]["podIP"]]
    pid = harness.wait_for(lambda: harness.pid(NS, name, "server"))

    (state / "dead").touch()  # liveness fails twice, a second apart: restarted
    harness.wait_for(lambda: harness.restart_count(NS, name, "server") == 1, timeout=15)
    (pod,) = harness.wait_for(ready_count(harness, "probed", 1))
    assert pod["metadata"]["name"] == name
    assert harness.wait_for(lambda: harness.pid(NS, name, "server")) != pid
    assert status_of(pod, "server")["lastState"]["terminated"]["exitCode"] in (137, 143)
    assert not (state / "dead").exists()  # the restarted server removed it


def test_each_pod_has_its_own_address_for_args_mounted_files_and_hardcoded_binds(
    api: KubeApi, make_harness: Callable[..., ServingKubelet], tmp_path: Path
) -> None:
    harness = make_harness(RunContainers(tmp_path))
    config = {"admin": "http://127.0.0.1:28001", "cacheDir": "/var/cache/kubetune"}
    api.create(
        "v1/configmaps",
        {"metadata": {"name": "srv", "namespace": NS}, "data": {"config.json": json.dumps(config)}},
    )
    server = container(
        "server",
        [PY, "-c", SERVER, "--state", "/state", "--listen", "0.0.0.0:28000"],
        args=["--config", "/etc/srv/config.json"],
        env=pod_env(),
        ports=[{"name": "http", "containerPort": 28000}],
        volumeMounts=[
            {"name": "state", "mountPath": "/state"},
            {"name": "config", "mountPath": "/etc/srv"},
            {"name": "cache", "mountPath": "/var/cache/kubetune"},
        ],
        readinessProbe={"tcpSocket": {"port": "http"}, "periodSeconds": 1},
    )
    volumes = [
        {"name": "state", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
        {"name": "config", "configMap": {"name": "srv"}},
    ]
    api.create(DEPLOYMENTS, deployment("two", [server], replicas=2, volumes=volumes))
    pods = harness.wait_for(ready_count(harness, "two", 2))
    for pod in pods:
        name, ip = pod["metadata"]["name"], pod["status"]["podIP"]
        for port in (28000, 28001, 28002):
            code, body = harness.wait_for(answered(f"http://{ip}:{port}/"))
            assert (code, body) == (200, {"pod": name, "podIP": ip, "bound": f"{ip}:{port}"})
        mounted = tmp_path / "pods" / NS / name / "volumes" / "config" / "config.json"
        assert json.loads(mounted.read_text()) == {
            "admin": f"http://{ip}:28001",
            "cacheDir": str(tmp_path / "pods" / NS / name / "volumes" / "cache"),
        }


def test_configmap_changes_reach_running_pods_in_place(
    api: KubeApi, make_harness: Callable[..., ServingKubelet], tmp_path: Path
) -> None:
    harness = make_harness(RunContainers(tmp_path, configmap_sync_delay=0.3))
    cm = {"metadata": {"name": "cfg", "namespace": NS}, "data": {"config.json": '{"adapters": []}'}}
    api.create("v1/configmaps", cm)
    watcher = container(
        "agent",
        [PY, "-c", SLEEP],
        volumeMounts=[{"name": "config", "mountPath": "/etc/kubetune/serving", "readOnly": True}],
    )
    volumes = [{"name": "config", "configMap": {"name": "cfg"}}]
    api.create(DEPLOYMENTS, deployment("agent", [watcher], volumes=volumes))
    (pod,) = harness.wait_for(ready_count(harness, "agent", 1))
    name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
    pid = harness.wait_for(lambda: harness.pid(NS, name, "agent"))
    folder = tmp_path / "pods" / NS / name / "volumes" / "config"
    path = folder / "config.json"
    assert path.is_symlink()
    assert os.readlink(path) == "..data/config.json"
    assert json.loads(path.read_text()) == {"adapters": []}

    wanted = {"adapters": [{"name": "a", "uri": "s3://models/a"}]}
    api.patch("v1/configmaps", NS, "cfg", {"data": {"config.json": json.dumps(wanted)}})
    changed_at = time.monotonic()
    harness.wait_for(lambda: json.loads(path.read_text()) == wanted)
    assert time.monotonic() - changed_at >= 0.3  # configmap_sync_delay
    assert [p.name for p in folder.iterdir() if p.name.startswith("..2")].__len__() == 1
    (pod,) = live_pods(harness, "agent")
    assert pod["metadata"]["uid"] == uid
    assert harness.pid(NS, name, "agent") == pid
    assert status_of(pod, "agent")["restartCount"] == 0
    assert len(harness.records) == 1


def test_stop_leaves_no_process_behind_and_pod_deletion_terminates_its_processes(
    api: KubeApi, make_harness: Callable[..., ServingKubelet], tmp_path: Path
) -> None:
    harness = make_harness(RunContainers(tmp_path)).start()
    api.create(DEPLOYMENTS, deployment("gone", [container("a", [PY, "-c", SLEEP])], replicas=2))
    pods = harness.wait_for(ready_count(harness, "gone", 2))
    names: list[str] = [p["metadata"]["name"] for p in pods]
    pids = [harness.wait_for(functools.partial(harness.pid, NS, n, "a")) for n in names]
    api.delete("v1/pods", NS, pods[0]["metadata"]["name"])
    harness.wait_for(lambda: not alive(pids[0]), message="SIGTERM on deletion")

    def replaced_pods() -> list[Obj] | None:
        found = ready_count(harness, "gone", 2)()
        return found if found and pods[0]["metadata"]["uid"] not in str(found) else None

    replaced = harness.wait_for(replaced_pods)
    assert pods[0]["metadata"]["uid"] not in {p["metadata"]["uid"] for p in replaced}
    newest: str = replaced[-1]["metadata"]["name"]
    new_pid = harness.wait_for(lambda: harness.pid(NS, newest, "a"))
    harness.stop()
    assert not alive(pids[1])
    assert not alive(new_pid)
