"""The real operator reconciling AdapterDeployments against the API emulator (no pods here).

What the operator writes and when: the three children, in-place ConfigMap updates for adapter
changes (the Deployment untouched), a rollout only for engine changes, the promotion rule
gating what the agents are told to load, and a status that says why nothing serves yet. The
end-to-end tests with real serving pods are in ``test_serving_e2e.py``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kubetune_operator.manifests import adapterdeployment as m
from tests.integration.operator_support import (
    EVJ,
    FTJ,
    OperatorThread,
    condition,
    operator,
    wait_condition,
    wait_for,
)
from tests.support.kube_api import KubeApi
from tests.support.kubelet import Behaviour, Kubelet, Succeed
from tests.support.manifests import small_evaljob, small_finetunejob
from tests.support.serving_kubelet import FakeAgent, ServingKubelet

pytestmark = pytest.mark.integration

Obj = dict[str, Any]
NS = "team-a"
ADS = "kubetune.io/v1alpha1/adapterdeployments"
DEPLOYMENTS = "apps/v1/deployments"
CONFIGMAPS = "v1/configmaps"
SERVICES = "v1/services"
D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
TIMEOUT = 30.0


def adapter(name: str, digest: str = D1, **extra: Any) -> Obj:
    return {"name": name, "source": {"uri": f"s3://adapters/{name}", "digest": digest}, **extra}


def manifest(name: str = "chat", **spec: Any) -> Obj:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "baseModel": {"uri": "s3://models/tiny-base"},
            "engine": {"type": "builtin"},
            "adapters": [adapter("math")],
            **spec,
        },
    }


@pytest.fixture
def api() -> Iterator[KubeApi]:
    with KubeApi() as server:
        yield server
        assert server.unexpected_errors == []
    wait_for(
        lambda: not [t for t in threading.enumerate() if t.name.startswith("kubetune-operator")],
        timeout=10,
        what="operator threads to end",
    )


@pytest.fixture
def op(api: KubeApi) -> Iterator[OperatorThread]:
    with operator(api, serving_resync_seconds=0.5, agent_timeout_seconds=3.0) as running:
        yield running


def served(api: KubeApi, name: str = "chat") -> list[tuple[str, str]]:
    """(name, digest) of the adapters the ConfigMap tells the agents to serve."""
    config_map = api.get(CONFIGMAPS, NS, m.config_map_name(name))
    if config_map is None:
        return []
    config = json.loads(config_map["data"][m.SERVING_CONFIG_KEY])
    return [(a["name"], a["digest"]) for a in config.get("adapters", [])]


def test_children_status_and_in_place_adapter_changes(api: KubeApi, op: OperatorThread) -> None:
    api.create(ADS, manifest(adapters=[adapter("math"), adapter("code", D2, pinned=False)]))
    ad = wait_condition(api, ADS, NS, "chat", "Ready", "False", "NoReadyReplicas", TIMEOUT)
    status = ad["status"]
    assert status["observedGeneration"] == 1
    assert status["endpoint"] == f"http://chat-serving.{NS}.svc:8000/v1"
    assert [(a["name"], a["phase"]) for a in status["adapters"]] == [
        ("math", "Pending"),
        ("code", "Pending"),
    ]
    assert condition(ad, "Progressing")["reason"] == "RollingOut"  # type: ignore[index]
    deployment = api.get(DEPLOYMENTS, NS, m.deployment_name("chat"))
    service = api.get(SERVICES, NS, m.service_name("chat"))
    assert deployment is not None
    assert service is not None
    assert served(api) == [("math", D1), ("code", D2)]
    version = deployment["metadata"]["resourceVersion"]

    # Adding and removing adapters rewrites the ConfigMap only.
    ad = api.get(ADS, NS, "chat")
    assert ad is not None
    api.patch(ADS, NS, "chat", {"spec": {"adapters": [adapter("math"), adapter("sql", D2)]}})
    wait_for(lambda: served(api) == [("math", D1), ("sql", D2)], TIMEOUT, "sql in the config")
    wait_for(
        lambda: (api.get(ADS, NS, "chat") or {}).get("status", {}).get("observedGeneration") == 2,
        TIMEOUT,
        "observedGeneration 2",
    )
    names = [a["name"] for a in api.get(ADS, NS, "chat")["status"]["adapters"]]  # type: ignore[index]
    assert names == ["math", "sql"]
    after = api.get(DEPLOYMENTS, NS, m.deployment_name("chat"))
    assert after is not None
    assert after["metadata"]["resourceVersion"] == version

    # An engine setting rolls the pods (the template changes).
    api.patch(ADS, NS, "chat", {"spec": {"engine": {"type": "builtin", "maxBatchSize": 4}}})

    def rolled() -> bool:
        live = api.get(DEPLOYMENTS, NS, m.deployment_name("chat")) or {}
        args = live["spec"]["template"]["spec"]["containers"][0]["args"]
        return bool(args[args.index("--max-batch-size") + 1] == "4")

    wait_for(rolled, TIMEOUT, "the Deployment to take the new batch size")

    # A hand edit of a child is reverted; kubectl scale too.
    api.patch(CONFIGMAPS, NS, m.config_map_name("chat"), {"data": {"config.json": "{}"}})
    api.patch(DEPLOYMENTS, NS, m.deployment_name("chat"), {"spec": {"replicas": 7}})
    wait_for(lambda: served(api) == [("math", D1), ("sql", D2)], TIMEOUT, "config restored")
    wait_for(
        lambda: (
            (api.get(DEPLOYMENTS, NS, m.deployment_name("chat")) or {})["spec"]["replicas"] == 1
        ),
        TIMEOUT,
        "replicas restored",
    )
    # The operator never wrote the spec.
    assert api.get(ADS, NS, "chat")["metadata"]["generation"] == 3  # type: ignore[index]


def test_promotion_gates_what_the_agents_load(api: KubeApi, op: OperatorThread) -> None:
    """An adapter trained by a FineTuneJob is served once an EvalJob passed for its digest."""
    trained = {
        "status": "Succeeded",
        "reason": "TrainingSucceeded",
        "message": "published",
        "artifact": {"uri": f"s3://models/{NS}/train-math/adapter", "digest": D2, "sizeBytes": 1},
    }
    evaluated = {
        "status": "Succeeded",
        "reason": "EvaluationSucceeded",
        "message": "gates passed",
        "evaluation": {"summary": [], "gates": [], "passed": True},
    }
    hold_eval = threading.Event()

    def behaviour(job: Obj, pod: Obj, attempt: int) -> Behaviour:
        if job["metadata"]["labels"].get("kubetune.io/evaljob"):
            hold_eval.wait(TIMEOUT)
            return Succeed(json.dumps(evaluated))
        return Succeed(json.dumps(trained))

    api.create(
        ADS,
        manifest(
            adapters=[
                adapter("base-style"),
                {"name": "math", "source": {"fineTuneJobRef": {"name": "train-math"}}},
            ],
            promotion={"requirePassedEval": True},
        ),
    )
    ad = wait_condition(api, ADS, NS, "chat", "Ready", "False", timeout=TIMEOUT)
    wait_for(lambda: api.get(CONFIGMAPS, NS, m.config_map_name("chat")), TIMEOUT, "ConfigMap")
    assert served(api) == []  # nothing has passed an evaluation
    phases = {a["name"]: (a["phase"], a.get("message", "")) for a in ad["status"]["adapters"]}
    assert phases["math"] == ("Blocked", "FineTuneJob team-a/train-math does not exist (yet)")
    assert phases["base-style"][0] == "Blocked"
    assert "awaits a passed EvalJob" in phases["base-style"][1]
    assert "no EvalJob has evaluated it" in phases["base-style"][1]

    with Kubelet(api, behaviour, namespace=NS) as kubelet:
        api.create(FTJ, small_finetunejob("train-math", NS))
        api.create(EVJ, small_evaljob("eval-math", NS, "train-math"))

        def math_phase() -> tuple[str, str] | None:
            status = (api.get(ADS, NS, "chat") or {}).get("status") or {}
            for a in status.get("adapters") or []:
                if a["name"] == "math" and a.get("digest") == D2:
                    return a["phase"], a.get("message", "")
            return None

        phase = wait_for(math_phase, TIMEOUT, "math resolved to the trained digest")
        assert phase[0] == "Blocked"
        assert "awaits a passed EvalJob" in phase[1]
        assert served(api) == []
        hold_eval.set()
        wait_for(lambda: served(api) == [("math", D2)], TIMEOUT, "math promoted")
        assert kubelet.errors == []


def test_a_deleted_adapterdeployment_does_not_get_its_children_back(
    api: KubeApi, op: OperatorThread
) -> None:
    """Garbage collection's child deletions can reach the operator before the owner's own
    deletion; a reconcile from that stale cache must not recreate the children."""
    api.create(ADS, manifest())
    wait_condition(api, ADS, NS, "chat", "Ready", "False", "NoReadyReplicas", TIMEOUT)
    children = (
        (CONFIGMAPS, m.config_map_name("chat")),
        (SERVICES, m.service_name("chat")),
        (DEPLOYMENTS, m.deployment_name("chat")),
    )
    api.delete(ADS, NS, "chat")
    wait_for(
        lambda: all(api.get(r, NS, c) is None for r, c in children), TIMEOUT, "children collected"
    )
    time.sleep(1.5)  # three serving resyncs
    assert [c for r, c in children if api.get(r, NS, c) is not None] == []


def test_replicas_agents_and_an_operator_restart(api: KubeApi, op: OperatorThread) -> None:
    """Three replicas report through their agents; one failing adapter on one pod degrades
    the deployment naming pod and adapter; restarting the operator writes nothing and
    restarts no pod (an operator upgrade never rolls the serving pods)."""
    broken: set[str] = set()

    def status_fn(pod: Obj) -> Obj:
        config_map = api.get(CONFIGMAPS, NS, m.config_map_name("chat")) or {"data": {}}
        text = config_map["data"].get(m.SERVING_CONFIG_KEY, "{}")
        adapters = json.loads(text).get("adapters", [])
        name = pod["metadata"]["name"]
        return {
            "engineReady": True,
            "ready": True,
            "configDigest": m.config_digest(text),
            "adapters": [
                {
                    "name": a["name"],
                    "digest": a["digest"],
                    "pinned": a["pinned"],
                    "phase": "Failed" if (name, a["name"]) in broken else "Loaded",
                    "lastError": "EngineRejected: no such target module"
                    if (name, a["name"]) in broken
                    else None,
                    "loadSeconds": 0.25,
                }
                for a in adapters
            ],
        }

    with ServingKubelet(api, FakeAgent(status_fn), namespace=NS) as kubelet:
        api.create(
            ADS, manifest(replicas=3, adapters=[adapter("math"), adapter("code", D2, pinned=False)])
        )
        wait_condition(api, ADS, NS, "chat", "Ready", "True", timeout=TIMEOUT)
        # Ready as soon as one pod serves every pinned adapter; Complete once all three do.
        ad = wait_condition(api, ADS, NS, "chat", "Progressing", "False", "Complete", TIMEOUT)
        assert ad["status"]["readyReplicas"] == 3
        assert [(a["name"], a["readyReplicas"]) for a in ad["status"]["adapters"]] == [
            ("math", 3),
            ("code", 3),
        ]
        pods = sorted(p["metadata"]["name"] for p in kubelet.pods(NS))
        broken.add((pods[1], "code"))
        ad = wait_condition(api, ADS, NS, "chat", "Degraded", "True", "AdaptersFailed", TIMEOUT)
        assert condition(ad, "Degraded")["message"] == (  # type: ignore[index]
            f"code: {pods[1]}: EngineRejected: no such target module"
        )
        assert condition(ad, "Ready")["status"] == "True"  # type: ignore[index] # code is unpinned

        time.sleep(1.5)  # settle
        api.reset_counts()
        op.stop()
        op.start()
        time.sleep(2.0)  # four serving resyncs after the restart
        assert api.writes == 0, api.counts
        assert sorted(p["metadata"]["name"] for p in kubelet.pods(NS)) == pods
        assert len(kubelet.records) == 3
        assert kubelet.errors == []
