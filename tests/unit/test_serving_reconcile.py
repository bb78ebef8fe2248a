"""The pure core of the AdapterDeployment reconcile: resolution, promotion, children, status."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubetune_operator.api.adapterdeployment import AdapterDeployment, AdapterDeploymentStatus
from kubetune_operator.controller.conditions import find
from kubetune_operator.controller.serving import (
    ChildView,
    DeploymentView,
    Resolved,
    ServingPod,
    content_hash,
    invalid_status,
    plan_children,
    resolve_adapters,
    serving_status,
)
from kubetune_operator.manifests import adapterdeployment as m
from kubetune_operator.manifests.common import OperatorSettings
from kubetune_operator.validation import parse_manifest

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
D1, D2, D3 = ("sha256:" + c * 64 for c in "123")
CONFIG = "sha256:" + "c" * 64
Obj = dict[str, Any]


def model(adapters: list[Obj], *, replicas: int = 2, promotion: bool = False) -> AdapterDeployment:
    spec: Obj = {
        "baseModel": {"uri": "s3://models/tiny-base"},
        "engine": {"type": "builtin"},
        "replicas": replicas,
        "adapters": adapters,
    }
    if promotion:
        spec["promotion"] = {"requirePassedEval": True}
    parsed = parse_manifest(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "AdapterDeployment",
            "metadata": {"name": "chat", "namespace": "ns", "uid": "u", "generation": 3},
            "spec": spec,
        }
    )
    assert isinstance(parsed, AdapterDeployment)
    return parsed


def by_uri(name: str, digest: str = D1, *, pinned: bool = True) -> Obj:
    return {
        "name": name,
        "pinned": pinned,
        "source": {"uri": f"s3://adapters/{name}", "digest": digest},
    }


def by_job(name: str, job: str) -> Obj:
    return {"name": name, "source": {"fineTuneJobRef": {"name": job}}}


def ftj(status: str | None, *, digest: str = D1, reason: str = "", r: int = 8) -> Obj:
    conditions = (
        [] if status is None else [{"type": "Succeeded", "status": status, "reason": reason}]
    )
    body: Obj = {"spec": {"lora": {"r": r}}, "status": {"conditions": conditions}}
    if status == "True":
        body["status"]["artifact"] = {"uri": "s3://out/job/adapter", "digest": digest}
    return body


def evaljob(name: str, digest: str, passed: str | None, reason: str = "GatesPassed") -> Obj:
    conditions = [] if passed is None else [{"type": "Passed", "status": passed, "reason": reason}]
    return {
        "metadata": {"name": name},
        "status": {"adapterDigest": digest, "conditions": conditions},
    }


def agent(*adapters: tuple[str, str, str], config: str = CONFIG, **extra: Any) -> Obj:
    return {
        "engineReady": True,
        "configDigest": config,
        "adapters": [
            {"name": n, "digest": d, "phase": p, "loadSeconds": 0.5, **extra}
            for n, d, p in adapters
        ],
    }


def pod(name: str, *adapters: tuple[str, str, str], ready: bool = True, **kw: Any) -> ServingPod:
    return ServingPod(name=name, ready=ready, current=True, agent=agent(*adapters), **kw)


ROLLED = DeploymentView(generation=1, observed_generation=1, replicas=2, updated_replicas=2)


def status_of(
    ad: AdapterDeployment,
    pods: list[ServingPod],
    *,
    resolved: list[Resolved] | None = None,
    old: Obj | None = None,
    now: datetime = NOW,
    deployment: DeploymentView | None = ROLLED,
) -> tuple[Obj, list[Any]]:
    if resolved is None:
        resolved = resolve_adapters(ad, lambda ns, n: None, [], old)
    result = serving_status(
        ad,
        resolved,
        pods,
        deployment,
        config_digest=CONFIG,
        old_status=old,
        generation=3,
        now=now,
    )
    AdapterDeploymentStatus.model_validate(result.status)  # the CRD's status schema
    return result.status, list(result.events)


def cond(status: Obj, kind: str) -> tuple[str, str, str]:
    c = find(status["conditions"], kind)
    assert c is not None
    return c["status"], c["reason"], c["message"]


def adapter(status: Obj, name: str) -> Obj:
    return next(a for a in status["adapters"] if a["name"] == name)


# ------------------------------------------------------------------------------ resolution


def test_fine_tune_job_sources_resolve_to_the_published_artifact() -> None:
    ad = model([by_job("math", "train-math")])
    jobs = {"train-math": ftj("True", r=32)}
    [r] = resolve_adapters(ad, lambda ns, n: jobs.get(n), [], None)
    assert (r.uri, r.digest, r.blocked, r.rank) == ("s3://out/job/adapter", D1, False, 32)


@pytest.mark.parametrize(
    ("job", "expected"),
    [
        (None, "does not exist"),
        (ftj(None), "waiting for FineTuneJob ns/train-math to succeed"),
        (ftj("Unknown"), "waiting for FineTuneJob ns/train-math to succeed"),
        (ftj("False", reason="OOMKilled"), "failed (OOMKilled): no adapter"),
    ],
)
def test_unfinished_or_failed_jobs_block_their_adapter(job: Obj | None, expected: str) -> None:
    ad = model([by_job("math", "train-math")])
    [r] = resolve_adapters(ad, lambda ns, n: job, [], None)
    assert r.blocked
    assert r.served() is None
    assert r.message is not None
    assert expected in r.message


def test_promotion_blocks_until_an_evaljob_passed_for_that_digest() -> None:
    ad = model([by_uri("math", D1)], promotion=True)
    failing = [evaljob("eval-1", D1, "False", "GateFailed"), evaljob("eval-other", D2, "True")]
    [r] = resolve_adapters(ad, lambda ns, n: None, failing, None)
    assert r.blocked
    assert r.message is not None
    assert "requirePassedEval" in r.message
    assert "EvalJob eval-1 did not pass (GateFailed)" in r.message
    assert "eval-other" not in r.message  # it evaluated another digest
    [r] = resolve_adapters(ad, lambda ns, n: None, [evaljob("eval-1", D1, None)], None)
    assert r.blocked
    assert r.message is not None
    assert "eval-1 has not finished" in r.message
    [r] = resolve_adapters(ad, lambda ns, n: None, [*failing, evaljob("eval-2", D1, "True")], None)
    assert not r.blocked
    assert r.served() == m.ServedAdapter("math", "s3://adapters/math", D1, True)


def test_a_promoted_digest_keeps_serving_while_its_successor_waits_for_evaluation() -> None:
    ad = model([by_uri("math", D2)], promotion=True)
    old = {
        "adapters": [{"name": "math", "phase": "Loaded", "uri": "s3://adapters/old", "digest": D1}]
    }
    passed = [evaljob("eval-old", D1, "True")]
    [r] = resolve_adapters(ad, lambda ns, n: None, passed, old)
    assert r.served() == m.ServedAdapter("math", "s3://adapters/old", D1, True)
    assert r.message is not None
    assert "serving sha256:111111111111 meanwhile" in r.message
    # Still kept when the last reconcile saw it not Loaded everywhere (a new pod, a slow read).
    for phase in ("Pending", "Loading", "Failed"):
        moment = {"adapters": [{**old["adapters"][0], "phase": phase}]}
        [r] = resolve_adapters(ad, lambda ns, n: None, passed, moment)
        assert r.served() == m.ServedAdapter("math", "s3://adapters/old", D1, True), phase
    # A digest that was only ever Blocked was never served: nothing to keep.
    blocked = {"adapters": [{**old["adapters"][0], "phase": "Blocked"}]}
    [r] = resolve_adapters(ad, lambda ns, n: None, passed, blocked)
    assert r.blocked
    # Without an evaluated predecessor there is nothing to keep serving.
    [r] = resolve_adapters(ad, lambda ns, n: None, [], old)
    assert r.blocked


# ------------------------------------------------------------------------------ children


def test_children_are_created_replaced_or_left_alone() -> None:
    ad = model([by_uri("math")])
    objects = m.build(ad, OperatorSettings(), [], m.Capacity(4, 32, 16))
    assert plan_children(objects, {}).create == tuple(objects)
    live = {
        o["kind"]: ChildView(o["kind"], o["metadata"]["name"], content_hash(o), 2) for o in objects
    }
    assert plan_children(objects, live).create == ()
    assert plan_children(objects, live).replace == ()
    # A hand edit of the ConfigMap's data is reverted; so is `kubectl scale` on the Deployment.
    edited = dict(live, ConfigMap=ChildView("ConfigMap", live["ConfigMap"].name, "edited"))
    assert [o["kind"] for o in plan_children(objects, edited).replace] == ["ConfigMap"]
    scaled = dict(
        live,
        Deployment=ChildView("Deployment", live["Deployment"].name, live["Deployment"].hash, 5),
    )
    assert [o["kind"] for o in plan_children(objects, scaled).replace] == ["Deployment"]


# ------------------------------------------------------------------------------ status


def test_ready_only_when_every_pinned_adapter_is_loaded_on_every_ready_pod() -> None:
    ad = model([by_uri("math"), by_uri("code", D2), by_uri("style", D3, pinned=False)])
    full = (("math", D1, "Loaded"), ("code", D2, "Loaded"))
    status, events = status_of(ad, [pod("p1", *full), pod("p2", *full)])
    assert cond(status, "Ready")[:2] == ("True", "AllPinnedAdaptersLoaded")
    assert adapter(status, "math")["readyReplicas"] == 2
    assert adapter(status, "style")["phase"] == "Pending"  # unpinned: best effort
    assert status["loadedAdapters"] == 2
    assert status["readyReplicas"] == 2
    assert status["endpoint"] == "http://chat-serving.ns.svc:8000/v1"
    assert [e.reason for e in events] == ["Ready", "AdapterLoaded", "AdapterLoaded"]

    half = (("math", D1, "Loaded"), ("code", D2, "Loading"))
    status, _ = status_of(ad, [pod("p1", *full), pod("p2", *half)])
    assert cond(status, "Ready")[:2] == ("False", "PinnedAdaptersNotLoaded")
    assert "code (Loading)" in cond(status, "Ready")[2]
    assert cond(status, "Progressing")[:2] == ("True", "LoadingAdapters")
    assert adapter(status, "code")["readyReplicas"] == 1

    # A pod that is not Ready gets no requests: it does not count.
    status, _ = status_of(ad, [pod("p1", *full), pod("p2", *half, ready=False)])
    assert cond(status, "Ready")[0] == "True"


def test_a_stale_digest_is_not_loaded() -> None:
    ad = model([by_uri("math", D2)])
    status, _ = status_of(ad, [pod("p1", ("math", D1, "Loaded"))])
    assert adapter(status, "math")["phase"] == "Pending"
    assert cond(status, "Ready")[:2] == ("False", "PinnedAdaptersNotLoaded")


def test_a_failed_adapter_degrades_and_is_named_while_the_others_serve() -> None:
    ad = model([by_uri("math"), by_uri("bad-rank", D2)])
    error = "rank 64 exceeds the engine's max_lora_rank 16 (spec.capacity.maxLoraRank)"
    pods = [
        ServingPod(
            "p1",
            True,
            True,
            agent=agent(("math", D1, "Loaded"))
            | {
                "adapters": [
                    {"name": "math", "digest": D1, "phase": "Loaded"},
                    {"name": "bad-rank", "digest": D2, "phase": "Failed", "lastError": error},
                ]
            },
        )
    ]
    status, events = status_of(ad, pods)
    assert cond(status, "Degraded")[:2] == ("True", "AdaptersFailed")
    assert cond(status, "Degraded")[2] == f"bad-rank: p1: {error}"
    assert adapter(status, "bad-rank")["phase"] == "Failed"
    assert adapter(status, "bad-rank")["lastError"] == f"p1: {error}"
    assert adapter(status, "math")["phase"] == "Loaded"
    assert cond(status, "Ready")[:2] == ("False", "PinnedAdaptersNotLoaded")
    assert ("Warning", "AdapterFailed") in [(e.type, e.reason) for e in events]


def test_blocked_pinned_adapters_keep_ready_false_and_say_why() -> None:
    ad = model([by_uri("math"), by_job("fresh", "train-fresh")])
    resolved = resolve_adapters(ad, lambda ns, n: ftj(None), [], None)
    status, _ = status_of(ad, [pod("p1", ("math", D1, "Loaded"))], resolved=resolved)
    assert adapter(status, "fresh")["phase"] == "Blocked"
    assert cond(status, "Ready")[:2] == ("False", "PinnedAdaptersBlocked")
    assert "waiting for FineTuneJob ns/train-fresh" in cond(status, "Ready")[2]
    assert cond(status, "Degraded")[0] == "False"  # policy, not a failure


def test_no_ready_pod_names_what_the_pods_wait_for() -> None:
    ad = model([by_uri("math")])
    waiting = ServingPod("p1", False, True, waiting=("CrashLoopBackOff",), agent_error="refused")
    status, _ = status_of(ad, [waiting])
    assert cond(status, "Ready") == (
        "False",
        "NoReadyReplicas",
        "0/2 serving pods are ready; waiting: p1 (CrashLoopBackOff)",
    )
    assert cond(status, "Degraded")[:2] == ("True", "PodsFailing")
    status, _ = status_of(model([by_uri("math")], replicas=0), [])
    assert cond(status, "Ready")[:2] == ("False", "ScaledToZero")


def test_pods_that_have_not_read_the_new_config_are_named() -> None:
    ad = model([by_uri("math"), by_uri("new", D2)])
    old_config = ServingPod(
        "p1", True, True, agent=agent(("math", D1, "Loaded"), config="sha256:" + "0" * 64)
    )
    status, _ = status_of(ad, [old_config])
    assert adapter(status, "new")["message"] == (
        "waiting for the kubelet to refresh the mounted configuration on p1"
    )


def test_rollout_is_progressing_and_unreachable_agents_degrade() -> None:
    ad = model([by_uri("math")])
    rolling = DeploymentView(generation=2, observed_generation=2, replicas=3, updated_replicas=1)
    old_pod = ServingPod("p0", True, False, agent=agent(("math", D1, "Loaded")))
    status, _ = status_of(ad, [old_pod, pod("p1", ("math", D1, "Loaded"))], deployment=rolling)
    assert cond(status, "Progressing")[:2] == ("True", "RollingOut")
    assert cond(status, "Ready")[0] == "True"  # both serving pods have the adapter
    lost = ServingPod("p1", True, True, agent_error="GET /status timed out after 3s")
    status, _ = status_of(ad, [lost])
    assert cond(status, "Degraded")[:2] == ("True", "AgentUnreachable")
    assert "p1 (GET /status timed out after 3s)" in cond(status, "Degraded")[2]


def test_a_settled_status_is_stable_and_transition_times_move_only_on_change() -> None:
    ad = model([by_uri("math")])
    pods = [pod("p1", ("math", D1, "Loaded")), pod("p2", ("math", D1, "Loaded"))]
    first, _ = status_of(ad, pods)
    again, events = status_of(ad, pods, old=first, now=NOW + timedelta(minutes=5))
    assert again == first
    assert events == []
    broken = [pod("p1", ("math", D1, "Loaded")), pod("p2", ("math", D1, "Failed"))]
    later = NOW + timedelta(minutes=9)
    changed, events = status_of(ad, broken, old=first, now=later)
    assert adapter(changed, "math")["lastTransitionTime"] == "2026-11-30T12:09:00Z"
    assert find(changed["conditions"], "Progressing") == find(first["conditions"], "Progressing")
    assert [e.reason for e in events] == ["NotReady", "AdapterFailed"]


def test_an_invalid_spec_is_reported_without_losing_the_rest_of_the_status() -> None:
    old = {"endpoint": "http://x/v1", "adapters": []}
    status = invalid_status("spec.engine.type: unknown", old, 4, NOW)
    assert status["endpoint"] == "http://x/v1"
    assert status["observedGeneration"] == 4
    assert cond(status, "Ready") == ("False", "InvalidSpec", "spec.engine.type: unknown")
    assert cond(status, "Degraded")[:2] == ("True", "InvalidSpec")


def test_adapters_on_a_claim_are_blocked_and_ranks_are_known_before_the_job_ends() -> None:
    ad = model([by_job("math", "train-math")])
    job = ftj("True")
    job["status"]["artifact"]["uri"] = "pvc://models/train-math/adapter"
    [r] = resolve_adapters(ad, lambda ns, n: job, [], None)
    assert r.blocked
    assert r.message is not None
    assert "PersistentVolumeClaim" in r.message
    [r] = resolve_adapters(ad, lambda ns, n: ftj(None, r=64), [], None)
    assert r.blocked
    assert r.rank == 64  # capacity derived now fits the adapter the job will publish


def test_an_isolated_failed_agent_read_is_ridden_out() -> None:
    from types import SimpleNamespace

    from kubetune_operator.controller.agents import AgentReading
    from kubetune_operator.controller.serving_handlers import UNREACHABLE_AFTER, ServingReconciler

    reconciler = ServingReconciler(SimpleNamespace(forget_hooks=[]))  # type: ignore[arg-type]
    good = AgentReading({"adapters": []}, None)
    slow = AgentReading(None, "GET /status timed out after 5s")
    assert reconciler._smooth("u", {"p1": good}) == {"p1": good}
    for _ in range(UNREACHABLE_AFTER - 1):
        assert reconciler._smooth("u", {"p1": slow}) == {"p1": good}
    assert reconciler._smooth("u", {"p1": slow}) == {"p1": slow}  # now it is unreachable
    assert reconciler._smooth("u", {"p1": good}) == {"p1": good}
    assert reconciler._smooth("u", {"p2": slow}) == {"p2": slow}  # no history: reported at once
    assert "p1" not in reconciler.agent_memory["u"]  # gone pods are forgotten


@pytest.mark.parametrize("promotion", [False, True])
def test_a_rerun_of_the_fine_tune_job_keeps_the_served_adapter(promotion: bool) -> None:
    """A new runId clears the job's artifact while it trains: the served digest stays."""
    ad = model([by_job("math", "train-math")], promotion=promotion)
    evaluated = [evaljob("eval-1", D1, "True")]
    old = {"adapters": [{"name": "math", "phase": "Loaded", "uri": "s3://out/v1", "digest": D1}]}
    for job in (ftj("Unknown"), ftj(None), ftj("False", reason="OOMKilled"), None):
        [r] = resolve_adapters(ad, lambda ns, n, job=job: job, evaluated, old)
        assert r.served() == m.ServedAdapter("math", "s3://out/v1", D1, True)
        assert r.message is not None
        assert r.message.startswith("serving sha256:111111111111 meanwhile; ")
    # With the promotion rule, only while the served digest is still promoted.
    [r] = resolve_adapters(ad, lambda ns, n: ftj("Unknown"), [], old)
    assert r.blocked is promotion
