"""RBAC derived from the code: the chart grants exactly the API calls the operator makes.

The real operator (``operator_support.operator``, what ``kubetune operator`` runs) works
against the API emulator and the kubelet harness through every path of its code that calls the
API: start-up with its own namespace set (reads, or creates, the progress key Secret there), a
multi-node run that succeeds and is cleaned up by its TTL (ConfigMap, Service, Job, Events,
status; the token Secret is only created), an EvalJob resolved from that FineTuneJob, the
progress endpoint (derives the token from the key, patches status), suspension (patches the
Job), an image that cannot be pulled (deletes the Job and ConfigMap), a Job deleted behind the
operator's back (GETs it), a new ``runId`` (deletes the old run), AdapterDeployments (their
ConfigMap, Service and Deployment created, then replaced with PUT when an adapter list, the
Service or the engine changes and when the ConfigMap is edited or the Deployment scaled by hand;
status, Events; a ``fineTuneJobRef`` adapter and ``promotion.requirePassedEval`` read the
FineTuneJob and EvalJob caches; a deletion, left to garbage collection), and a restart. The emulator
records every HTTP request as RBAC sees it (``KubeApi.rbac_requests``: verb, API group,
resource[/subresource], namespace, name).

Then the chart is rendered in the same mode (all namespaces, or ``watchNamespaces`` with the
scenarios in the watched namespaces) and the permissions of the operator's ServiceAccount are
computed from its (Cluster)Roles and bindings. The test fails when:

* a request is not allowed: cluster-wide requests need a ClusterRole, namespaced ones a Role in
  that namespace or a ClusterRole (the operator would get 403 Forbidden);
* a permission is granted that no request used ("no more"), apart from ``ADMISSION_ONLY``.
"""

from __future__ import annotations

import base64
import fnmatch
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from kubetune_operator.controller.handlers import OWNER_KINDS
from kubetune_operator.manifests import adapterdeployment as serving
from tests.integration.operator_support import (
    EVJ,
    FTJ,
    JOBS,
    OperatorThread,
    condition,
    jobs_of,
    operator,
    wait_condition,
    wait_for,
)
from tests.support.helm import Grant, Helm, allows, granted, session_helm
from tests.support.kube_api import KubeApi, RbacRequest
from tests.support.kubelet import Fail, Hang, ImagePullBackOff, Kubelet, Succeed
from tests.support.manifests import small_evaljob

pytestmark = pytest.mark.integration

Obj = dict[str, Any]
TEAM_A, TEAM_B = "team-a", "team-b"
RELEASE_NS, ACCOUNT = "kubetune-system", "kubetune"  # `helm install kubetune -n kubetune-system`
KEY_SECRET = "kubetune-progress-key"  # noqa: S105 - a name; the chart's default: <fullname>-progress-key
TIMEOUT = 30.0
DIGEST = "sha256:" + "5e" * 32
D1, D2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
ADS = "kubetune.io/v1alpha1/adapterdeployments"
DEPLOYMENTS = "apps/v1/deployments"
TRAINED = json.dumps(
    {
        "status": "Succeeded",
        "reason": "TrainingSucceeded",
        "message": "published",
        "artifact": {"uri": "s3://models/x/adapter", "digest": DIGEST, "sizeBytes": 10},
    }
)
EVALUATED = json.dumps(
    {
        "status": "Succeeded",
        "reason": "EvaluationSucceeded",
        "message": "no gates",
        "evaluation": {"summary": [], "gates": [], "passed": True},
    }
)
DATA_INVALID = json.dumps({"status": "Failed", "reason": "DataInvalid", "message": "row 3"})

# Permissions no request can show, but that the code provably needs. Children carry owner
# references with blockOwnerDeletion=true (manifests.common.owner_reference, checked below):
# Jobs, ConfigMaps, Services and Secrets of FineTuneJobs and EvalJobs, the ConfigMap, Service
# and Deployment of AdapterDeployments. Where the OwnerReferencesPermissionEnforcement
# admission plugin runs (OpenShift), the API server allows that only with `update` on the
# owner's `finalizers` subresource. The emulator has no admission plugins, so no request ever
# asks for it.
ADMISSION_ONLY = {
    ("kubetune.io", f"{plural}/finalizers", "update") for plural in OWNER_KINDS.values()
}

# Non-resource URLs (discovery, version, OpenAPI): every authenticated client may GET them
# through the built-in ClusterRole system:discovery; the chart grants none.
SYSTEM_DISCOVERY = ("/api", "/api/*", "/apis", "/apis/*", "/openapi", "/openapi/*", "/version")


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def helm(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return session_helm(pytestconfig, tmp_path_factory)


@pytest.fixture
def api() -> Iterator[KubeApi]:
    with KubeApi() as server:
        for name in (TEAM_A, TEAM_B):  # kopf watches a listed namespace once it exists
            server.create("v1/namespaces", {"metadata": {"name": name}})
        yield server
        assert server.unexpected_errors == []


# ------------------------------------------------------------------------------------ manifests
def finetunejob(name: str, namespace: str, **spec: Any) -> Obj:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "baseModel": {"uri": "s3://models/tiny-base"},
            "dataset": {
                "train": {
                    "uri": "s3://datasets/gsm8k/train.jsonl",
                    "format": "promptCompletion",
                    "columns": {"prompt": "question", "completion": "answer"},
                },
                "maxSeqLength": 256,
            },
            "method": "lora",
            "training": {"maxSteps": 20, "learningRate": "1e-3"},
            "output": {"uri": f"s3://models/{namespace}/{name}"},
            **spec,
        },
    }


def behaviour(job: Obj, pod: Obj, attempt: int) -> Any:
    """Each scenario's pods, chosen by the Job's name."""
    name = job["metadata"]["name"]
    if name.startswith("pull-"):
        return ImagePullBackOff(period=0.3)
    if name.startswith(("chatty-", "vanish-")):
        return Hang()
    if name == "rerun-train":
        return Fail(3, DATA_INVALID)
    if "-evaluate" in name:
        return Succeed(EVALUATED, after=0.1)
    return Succeed(TRAINED, after=0.1)


def adapterdeployment(name: str, namespace: str, *adapters: Obj, **spec: Any) -> Obj:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "baseModel": {"uri": "s3://models/tiny-base"},
            "engine": {"type": "builtin"},
            "adapters": list(adapters),
            **spec,
        },
    }


def by_uri(name: str, digest: str) -> Obj:
    return {"name": name, "source": {"uri": f"s3://adapters/{name}", "digest": digest}}


def by_job(name: str, finetunejob_name: str) -> Obj:
    return {"name": name, "source": {"fineTuneJobRef": {"name": finetunejob_name}}}


# ------------------------------------------------------------------------------------ scenarios
def report_progress(op: OperatorThread, api: KubeApi, namespace: str, name: str) -> None:
    """POST one progress report with the job's token (the operator does not read the Secret)."""
    secret = api.get("v1/secrets", namespace, f"{name}-progress")
    assert secret is not None
    token = (
        base64.b64decode(secret["data"]["token"]).decode()
        if "token" in (secret.get("data") or {})
        else str(secret["stringData"]["token"])
    )
    base = op.settings.children.progress_base_url
    request = urllib.request.Request(  # noqa: S310 - the local operator
        f"{base}/{namespace}/{name}",
        data=json.dumps({"step": 3, "totalSteps": 20, "percent": 15}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        assert response.status == 204


def exercise(api: KubeApi, **settings: Any) -> None:
    """Every API-calling path of the operator, then a restart; asserts each outcome."""
    a, b = TEAM_A, TEAM_B
    settings = {
        "operator_namespace": RELEASE_NS,
        "progress_key_secret": KEY_SECRET,
        "serving_resync_seconds": 0.5,
        "agent_timeout_seconds": 1.0,
        **settings,
    }
    with operator(api, **settings) as op, Kubelet(api, behaviour):
        # Multi-node (headless Service) with a TTL: success, then every child is deleted.
        api.create(
            FTJ,
            finetunejob(
                "done",
                b,
                distributed={"nodes": 2, "processesPerNode": 1},
                ttlSecondsAfterFinished=1,
            ),
        )
        api.create(EVJ, small_evaljob("eval", b, "done"))  # waits for "done", then runs
        api.create(FTJ, finetunejob("chatty", a))  # progress report, then suspended
        api.create(FTJ, finetunejob("pull", a))  # ImagePullFailed: Job and ConfigMap deleted
        api.create(FTJ, finetunejob("vanish", a))  # its Job deleted by hand: JobMissing
        api.create(FTJ, finetunejob("rerun", a))  # DataInvalid, then a new runId

        wait_condition(api, FTJ, a, "chatty", "Running", "True", timeout=TIMEOUT)
        report_progress(op, api, a, "chatty")
        wait_for(
            lambda: ((api.get(FTJ, a, "chatty") or {}).get("status") or {}).get("progress"),
            TIMEOUT,
            "status.progress",
        )
        api.patch(FTJ, a, "chatty", {"spec": {"suspend": True}})
        wait_condition(api, FTJ, a, "chatty", "Suspended", "True", timeout=TIMEOUT)
        assert api.get(JOBS, a, "chatty-train")["spec"]["suspend"] is True

        wait_condition(api, FTJ, a, "vanish", "Running", "True", timeout=TIMEOUT)
        api.delete(JOBS, a, "vanish-train")
        wait_condition(api, FTJ, a, "vanish", "Succeeded", "False", "JobMissing", TIMEOUT)

        wait_condition(api, FTJ, a, "rerun", "Succeeded", "False", "DataInvalid", TIMEOUT)
        api.patch(FTJ, a, "rerun", {"spec": {"runId": "fixed"}})
        rerun = wait_condition(api, FTJ, a, "rerun", "Succeeded", "True", timeout=TIMEOUT)
        assert rerun["status"]["jobName"] == "rerun-train-fixed"
        wait_for(lambda: api.get(JOBS, a, "rerun-train") is None, TIMEOUT, "the old run's Job")

        wait_condition(api, FTJ, a, "pull", "Succeeded", "False", "ImagePullFailed", TIMEOUT)
        wait_for(lambda: not jobs_of(api, a, "pull"), TIMEOUT, "the unpullable Job's deletion")

        wait_condition(api, FTJ, b, "done", "Succeeded", "True", timeout=TIMEOUT)
        selector = "kubetune.io/finetunejob=done"
        wait_for(
            lambda: (
                not any(
                    api.list(resource, b, selector)
                    for resource in ("v1/configmaps", "v1/services", JOBS)
                )
            ),
            TIMEOUT,
            "the TTL to delete the run's children of 'done'",
        )
        # The token Secret is left to garbage collection with its FineTuneJob.
        assert api.get("v1/secrets", b, "done-progress") is not None
        evaluated = wait_condition(api, EVJ, b, "eval", "Succeeded", "True", timeout=TIMEOUT)
        assert condition(evaluated, "Passed")["status"] == "True"

        exercise_serving(api, b)

    # A restart: kopf lists everything again, the operator re-reads its caches.
    with operator(api, **settings):
        time.sleep(2.5)  # two resync periods


def served(api: KubeApi, namespace: str, name: str) -> list[tuple[str, str]]:
    """(name, digest) of the adapters an AdapterDeployment's ConfigMap tells the agents to serve."""
    config_map = api.get("v1/configmaps", namespace, serving.config_map_name(name))
    if config_map is None:
        return []
    config = json.loads(config_map["data"][serving.SERVING_CONFIG_KEY])
    return [(a["name"], a["digest"]) for a in config.get("adapters", [])]


def exercise_serving(api: KubeApi, namespace: str) -> None:
    """AdapterDeployments: children created, replaced on every kind of change, status, deletion.

    Runs once the FineTuneJob ``done`` succeeded and the EvalJob ``eval`` passed for its
    artifact (``DIGEST``); no serving pods run, so Ready stays False (NoReadyReplicas).
    """
    ns = namespace
    chat, gated = "chat", "gated"
    api.create(ADS, adapterdeployment(chat, ns, by_uri("math", D1), by_job("tuned", "done")))
    # Only what an EvalJob passed is served: the FineTuneJob's artifact, not "math".
    api.create(
        ADS,
        adapterdeployment(
            gated,
            ns,
            by_uri("math", D1),
            by_job("tuned", "done"),
            promotion={"requirePassedEval": True},
        ),
    )
    wait_condition(api, ADS, ns, chat, "Ready", "False", "NoReadyReplicas", TIMEOUT)
    wait_for(
        lambda: served(api, ns, chat) == [("math", D1), ("tuned", DIGEST)],
        TIMEOUT,
        "chat's adapters in its ConfigMap",
    )
    wait_for(lambda: served(api, ns, gated) == [("tuned", DIGEST)], TIMEOUT, "the promoted adapter")
    status = wait_condition(api, ADS, ns, gated, "Ready", "False", timeout=TIMEOUT)["status"]
    assert {a["name"]: a["phase"] for a in status["adapters"]}["math"] == "Blocked"

    # Adapters change: the ConfigMap is replaced.
    api.patch(ADS, ns, chat, {"spec": {"adapters": [by_uri("math", D1), by_uri("sql", D2)]}})
    wait_for(lambda: served(api, ns, chat) == [("math", D1), ("sql", D2)], TIMEOUT, "sql served")
    # The Service's port changes: the Service is replaced.
    api.patch(ADS, ns, chat, {"spec": {"service": {"port": 8080}}})

    def service_port() -> int:
        live = api.get("v1/services", ns, serving.service_name(chat)) or {}
        return int(live["spec"]["ports"][0]["port"])

    wait_for(lambda: service_port() == 8080, TIMEOUT, "the Service's new port")
    # The engine changes: the Deployment is replaced (a rollout).
    api.patch(ADS, ns, chat, {"spec": {"engine": {"type": "builtin", "maxBatchSize": 4}}})

    def rolled() -> bool:
        live = api.get(DEPLOYMENTS, ns, serving.deployment_name(chat)) or {}
        return "4" in live["spec"]["template"]["spec"]["containers"][0]["args"]

    wait_for(rolled, TIMEOUT, "the Deployment to take the new batch size")
    # Hand edits of the children are reverted (PUT): the ConfigMap's data, `kubectl scale`.
    api.patch("v1/configmaps", ns, serving.config_map_name(chat), {"data": {"config.json": "{}"}})
    api.patch(DEPLOYMENTS, ns, serving.deployment_name(chat), {"spec": {"replicas": 7}})
    wait_for(
        lambda: served(api, ns, chat) == [("math", D1), ("sql", D2)], TIMEOUT, "config restored"
    )
    wait_for(
        lambda: (
            (api.get(DEPLOYMENTS, ns, serving.deployment_name(chat)) or {})["spec"]["replicas"] == 1
        ),
        TIMEOUT,
        "replicas restored",
    )
    generation = api.get(ADS, ns, chat)["metadata"]["generation"]  # type: ignore[index]
    wait_for(
        lambda: (
            (api.get(ADS, ns, chat) or {}).get("status", {}).get("observedGeneration") == generation
        ),
        TIMEOUT,
        "the status of the last generation",
    )

    # Deleted: its children go by garbage collection; the operator deletes nothing.
    children = (
        ("v1/configmaps", serving.config_map_name(chat)),
        ("v1/services", serving.service_name(chat)),
        (DEPLOYMENTS, serving.deployment_name(chat)),
    )
    api.delete(ADS, ns, chat)

    wait_for(
        lambda: all(api.get(resource, ns, child) is None for resource, child in children),
        TIMEOUT,
        "chat's children to be garbage-collected",
    )
    # Its children's DELETED events may be handled before its own: the operator confirms the
    # resource still exists before recreating a child, so nothing comes back (three resyncs).
    time.sleep(1.5)
    assert [c for r, c in children if api.get(r, ns, c) is not None] == []


def owner_kinds_blocking_deletion(api: KubeApi) -> set[str]:
    """Kinds of owner references with blockOwnerDeletion=true on the remaining children."""
    kinds = set()
    for resource in (JOBS, "v1/configmaps", "v1/services", "v1/secrets", DEPLOYMENTS):
        for obj in api.list(resource):
            for ref in obj["metadata"].get("ownerReferences") or []:
                if ref.get("blockOwnerDeletion"):
                    kinds.add(ref["kind"])
    return kinds


# ------------------------------------------------------------------------------------ checks
def discovery_allows(path: str) -> bool:
    return any(
        fnmatch.fnmatchcase(path, pattern) if "*" in pattern else path == pattern
        for pattern in SYSTEM_DISCOVERY
    )


def check(observed: frozenset[RbacRequest], grants: set[Grant]) -> set[tuple[str, str, str]]:
    """Asserts (a) and (b); returns the observed (apiGroup, resource, verb) set."""
    resource_requests = {r for r in observed if r.resource}
    forbidden = sorted(
        r
        for r in resource_requests
        if not allows(grants, r.api_group, r.resource, r.verb, r.namespace, r.name)
    )
    assert forbidden == [], "the chart's RBAC forbids requests the operator makes"
    others = sorted(r.path for r in observed if not r.resource and not discovery_allows(r.path))
    assert others == [], "non-resource requests beyond discovery"

    used = {(r.api_group, r.resource, r.verb) for r in resource_requests}
    unused = sorted({(g.api_group, g.resource, g.verb) for g in grants} - used - ADMISSION_ONLY)
    assert unused == [], "the chart grants permissions the operator never uses"
    assert not ADMISSION_ONLY & used, "an allowlisted permission is observed: drop it from the list"
    assert {(g.api_group, g.resource, g.verb) for g in grants} >= ADMISSION_ONLY
    return used


def test_the_chart_grants_exactly_what_the_operator_uses_in_all_namespaces(
    api: KubeApi, helm: Helm
) -> None:
    exercise(api)
    assert owner_kinds_blocking_deletion(api) == set(OWNER_KINDS)  # ADMISSION_ONLY's proof

    observed = api.rbac_requests()
    grants = granted(helm.template(namespace=RELEASE_NS), ACCOUNT, RELEASE_NS)
    check(observed, grants)
    # One ClusterRole, and the Role of the progress key in the release namespace.
    assert {g.namespace for g in grants} == {None, RELEASE_NS}
    assert_secret_requests(observed, {TEAM_A, TEAM_B})


def test_the_chart_grants_exactly_what_the_operator_uses_in_watched_namespaces(
    api: KubeApi, helm: Helm
) -> None:
    watched = [TEAM_A, TEAM_B]
    exercise(api, namespaces=tuple(watched))

    observed = api.rbac_requests()
    docs = helm.template(values={"watchNamespaces": watched}, namespace=RELEASE_NS)
    check(observed, granted(docs, ACCOUNT, RELEASE_NS))
    # Namespaced requests stay in the watched namespaces, but for the progress key Secret in
    # the release namespace; cluster-wide ones are only kopf's start-up reads of
    # cluster-scoped resources.
    assert {r.namespace for r in observed if r.resource and r.namespace} == {*watched, RELEASE_NS}
    assert {(r.resource, r.verb) for r in observed if r.resource and r.namespace == RELEASE_NS} == {
        ("secrets", "get"),
        ("secrets", "create"),
    }
    assert_secret_requests(observed, set(watched))
    cluster_wide = {
        (r.api_group, r.resource, r.verb) for r in observed if r.resource and not r.namespace
    }
    assert cluster_wide == {
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
        ("", "namespaces", "list"),
        ("", "namespaces", "watch"),
    }


def assert_secret_requests(observed: frozenset[RbacRequest], job_namespaces: set[str]) -> None:
    """Secrets: created in job namespaces; read only by name, the key, in the release namespace."""
    secrets = {r for r in observed if (r.api_group, r.resource) == ("", "secrets")}
    assert {(r.verb, r.namespace, r.name) for r in secrets if r.verb != "create"} == {
        ("get", RELEASE_NS, KEY_SECRET)
    }
    assert {r.namespace for r in secrets if r.verb == "create"} == {*job_namespaces, RELEASE_NS}


def test_the_comparison_is_not_vacuous() -> None:
    """Negative controls: a missing, a misplaced and an unused permission each fail ``check``."""
    admission = {Grant(g, r, v, None) for g, r, v in ADMISSION_ONLY}
    observed = frozenset(
        {RbacRequest("create", "", "secrets", TEAM_A), RbacRequest("get", "", "", None, "/apis")}
    )
    grants = {Grant("", "secrets", "create", TEAM_A), *admission}
    check(observed, grants)
    with pytest.raises(AssertionError, match="forbids"):
        check(observed, admission)
    with pytest.raises(AssertionError, match="forbids"):
        check(observed, {Grant("", "secrets", "create", TEAM_B), *admission})
    with pytest.raises(AssertionError, match="never uses"):
        check(observed, {*grants, Grant("", "secrets", "list", None)})
    with pytest.raises(AssertionError, match="beyond discovery"):
        check(observed | {RbacRequest("get", "", "", None, "/metrics")}, grants)
    # resourceNames: a grant for one name allows neither another name nor a create.
    key = RbacRequest("get", "", "secrets", RELEASE_NS, name=KEY_SECRET)
    by_name = {Grant("", "secrets", "get", RELEASE_NS, frozenset({KEY_SECRET})), *grants}
    check(observed | {key}, by_name)
    with pytest.raises(AssertionError, match="forbids"):
        check(observed | {key._replace(name="other")}, by_name)
    named_create = {Grant("", "secrets", "create", TEAM_A, frozenset({"x"})), *admission}
    with pytest.raises(AssertionError, match="forbids"):
        check(observed, named_create)
