"""The fake Kubernetes API (tests/support/kube_api.py) behaves like a real one where we rely on it.

Driven over HTTP by the official ``kubernetes`` client, plain urllib, and a real kopf operator.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import queue
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import kmock
import kopf
import kubernetes.client as k8s
import kubernetes.watch
import pytest
from kmock._internal import parsing as kmock_parsing

from tests.support.kube_api import KubeApi, RbacRequest

GROUP, VERSION, FTJ = "kubetune.io", "v1alpha1", "finetunejobs"
FTJ_RES = f"{GROUP}/{VERSION}/{FTJ}"


@pytest.fixture
def api() -> Iterator[KubeApi]:
    with KubeApi() as fake:
        yield fake
    assert fake.unexpected_errors == []


@pytest.fixture
def client(api: KubeApi) -> Iterator[k8s.ApiClient]:
    with k8s.ApiClient(k8s.Configuration(host=api.url)) as api_client:
        yield api_client


@pytest.fixture
def crs(client: k8s.ApiClient) -> k8s.CustomObjectsApi:
    return k8s.CustomObjectsApi(client)


def ftj(name: str, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": spec or {"method": "lora"},
    }


def call(api: KubeApi, method: str, path: str, body: Any = None, ctype: str = "") -> Any:
    """A raw request: (status, JSON body), or (status, [events]) for a watch (JSON lines)."""
    url = urllib.parse.urlsplit(api.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    try:
        payload = None if body is None else json.dumps(body)
        conn.request(method, path, payload, {"Content-Type": ctype or "application/json"})
        rsp = conn.getresponse()
        lines = [json.loads(line) for line in rsp.read().splitlines() if line.strip()]
    finally:
        conn.close()
    return rsp.status, lines if "watch=" in path else (lines or [None])[0]


def status_of(exc: pytest.ExceptionInfo[k8s.ApiException]) -> tuple[int, str]:
    return exc.value.status, json.loads(exc.value.body)["reason"]


def watched(api: KubeApi, path: str) -> list[tuple[str, str]]:
    """(type, name) of every event of a short raw watch (fractional timeoutSeconds: fast)."""
    status, events = call(api, "GET", f"{path}{'&' if '?' in path else '?'}timeoutSeconds=0.2")
    assert status == 200
    return [(e["type"], e["object"]["metadata"]["name"]) for e in events]


# ------------------------------------------------------------------------------ discovery
def test_discovery_namespaces_openapi_and_version(api: KubeApi, client: k8s.ApiClient) -> None:
    assert call(api, "GET", "/api")[1]["versions"] == ["v1"]
    core = call(api, "GET", "/api/v1")[1]
    assert core["groupVersion"] == "v1"
    by_name = {r["name"]: r for r in core["resources"]}
    assert by_name["namespaces"]["namespaced"] is False
    assert {"pods", "pods/status", "configmaps", "secrets", "services", "events"} <= set(by_name)
    assert {"serviceaccounts"} <= set(by_name)
    groups = {g["name"] for g in call(api, "GET", "/apis")[1]["groups"]}
    assert {GROUP, "batch", "events.k8s.io", "coordination.k8s.io"} <= groups
    assert "apiextensions.k8s.io" in groups
    ours = {r["name"]: r for r in call(api, "GET", f"/apis/{GROUP}/{VERSION}")[1]["resources"]}
    assert {"finetunejobs/status", "evaljobs/status", "adapterdeployments/status"} <= set(ours)
    assert ours["finetunejobs"]["kind"] == "FineTuneJob"
    assert ours["finetunejobs"]["namespaced"] is True
    assert {"list", "watch", "patch", "create"} <= set(ours["finetunejobs"]["verbs"])
    jobs = {r["name"]: r for r in call(api, "GET", "/apis/batch/v1")[1]["resources"]}
    assert jobs["jobs"]["kind"] == "Job"
    assert "jobs/status" in jobs

    names = [ns.metadata.name for ns in k8s.CoreV1Api(client).list_namespace().items]
    assert names == ["default", "kube-system"]
    status, watched = call(api, "GET", "/api/v1/namespaces?watch=true&timeoutSeconds=0.2")
    assert status == 200
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in watched] == [
        ("ADDED", "default"),
        ("ADDED", "kube-system"),
    ]
    crds = call(api, "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")[1]
    assert len(crds["items"]) == 3
    assert call(api, "GET", "/openapi/v2")[1]["swagger"] == "2.0"
    assert "api/v1" in call(api, "GET", "/openapi/v3")[1]["paths"]
    assert call(api, "GET", f"/openapi/v3/apis/{GROUP}/{VERSION}")[1]["openapi"].startswith("3.")
    assert call(api, "GET", "/version")[1]["major"] == "1"


def test_path_fix_is_scoped_to_the_emulator() -> None:
    # Plain kmock elsewhere in the process keeps its own parsing of namespaced URLs.
    assert kmock_parsing.parse_path("/api/v1/namespaces/default").namespace == "default"


def test_http_watch_any_truthy_spelling(api: KubeApi) -> None:
    started = time.monotonic()
    lines = call(api, "GET", "/api/v1/namespaces?watch=1&timeoutSeconds=0.3")[1]
    assert [e["object"]["metadata"]["name"] for e in lines] == ["default", "kube-system"]
    assert 0.25 < time.monotonic() - started < 3


# ------------------------------------------------------------------------------ create/get/list
def test_create_get_list_and_selectors(api: KubeApi, crs: k8s.CustomObjectsApi) -> None:
    created, status, _ = crs.create_namespaced_custom_object_with_http_info(
        GROUP, VERSION, "default", FTJ, ftj("a", {"tier": "gold", "team": "x"})
    )
    assert status == 201
    meta = created["metadata"]
    assert meta["namespace"] == "default"  # from the URL
    assert meta["generation"] == 1
    assert len(meta["uid"]) == 36
    assert meta["creationTimestamp"].endswith("Z")
    assert int(meta["resourceVersion"]) > 0
    assert crs.get_namespaced_custom_object(GROUP, VERSION, "default", FTJ, "a") == created

    generated = crs.create_namespaced_custom_object(
        GROUP, VERSION, "default", FTJ, {"metadata": {"generateName": "gen-"}, "spec": {}}
    )
    assert generated["metadata"]["name"].startswith("gen-")
    assert len(generated["metadata"]["name"]) == 9
    assert int(generated["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    crs.create_namespaced_custom_object(GROUP, VERSION, "default", FTJ, ftj("b", {"tier": "s"}))
    crs.create_namespaced_custom_object(GROUP, VERSION, "other", FTJ, ftj("c", {"tier": "gold"}))

    with pytest.raises(k8s.ApiException) as exc:
        crs.create_namespaced_custom_object(GROUP, VERSION, "default", FTJ, ftj("a"))
    assert status_of(exc) == (409, "AlreadyExists")

    def names(ns: str | None = None, **kwargs: Any) -> list[str]:
        if ns is None:
            listed = crs.list_cluster_custom_object(GROUP, VERSION, FTJ, **kwargs)
        else:
            listed = crs.list_namespaced_custom_object(GROUP, VERSION, ns, FTJ, **kwargs)
        assert listed["kind"] == "FineTuneJobList"
        assert listed["apiVersion"] == f"{GROUP}/{VERSION}"
        assert listed["metadata"]["resourceVersion"] == str(api.emulator._rv)
        return [item["metadata"]["name"] for item in listed["items"]]

    assert names("default") == ["a", "b", "gen-" + generated["metadata"]["name"][4:]]
    assert names() == ["a", "b", names("default")[2], "c"]
    assert names(label_selector="tier=gold") == ["a", "c"]
    assert names(label_selector="tier==gold,team=x") == ["a"]
    assert names(label_selector="tier!=gold") == ["b", names("default")[2]]
    assert names(label_selector="tier in (gold, s)") == ["a", "b", "c"]
    assert names(label_selector="tier notin (gold),tier") == ["b"]
    assert names(label_selector="team") == ["a"]
    assert names(label_selector="!team,tier") == ["b", "c"]
    assert names(field_selector="metadata.name=b") == ["b"]
    assert names(field_selector="metadata.namespace!=default") == ["c"]
    with pytest.raises(k8s.ApiException) as exc:
        names(label_selector="tier in gold")
    assert status_of(exc) == (400, "BadRequest")


def test_not_found_is_a_proper_status(api: KubeApi, crs: k8s.CustomObjectsApi) -> None:
    calls: list[Callable[[], Any]] = [
        lambda: crs.get_namespaced_custom_object(GROUP, VERSION, "default", FTJ, "nope"),
        lambda: crs.patch_namespaced_custom_object(GROUP, VERSION, "default", FTJ, "nope", {}),
        lambda: crs.replace_namespaced_custom_object(
            GROUP, VERSION, "default", FTJ, "nope", ftj("nope")
        ),
        lambda: crs.delete_namespaced_custom_object(GROUP, VERSION, "default", FTJ, "nope"),
    ]
    for attempt in calls:
        with pytest.raises(k8s.ApiException) as exc:
            attempt()
        body = json.loads(exc.value.body)
        assert exc.value.status == 404
        assert body["apiVersion"] == "v1"
        assert body["kind"] == "Status"
        assert body["status"] == "Failure"
        assert body["code"] == 404
        assert body["reason"] == "NotFound"
        assert body["details"] == {"name": "nope", "kind": FTJ}
        assert "not found" in body["message"]
    assert call(api, "GET", "/apis/nope.io/v1/things")[0] == 404
    assert api.get(FTJ_RES, "default", "nope") is None


# ------------------------------------------------------------------------------ updates
def test_merge_patch_generation_and_status(api: KubeApi, crs: k8s.CustomObjectsApi) -> None:
    args = (GROUP, VERSION, "default", FTJ, "a")
    first = crs.create_namespaced_custom_object(*args[:4], ftj("a", lr=1))
    rv = int(first["metadata"]["resourceVersion"])

    labelled = crs.patch_namespaced_custom_object(*args, {"metadata": {"labels": {"k": "v"}}})
    assert labelled["metadata"]["generation"] == 1  # metadata only
    assert int(labelled["metadata"]["resourceVersion"]) > rv

    respecced = crs.patch_namespaced_custom_object(*args, {"spec": {"lr": 2, "method": None}})
    assert respecced["spec"] == {"lr": 2}  # RFC 7386: null removes
    assert respecced["metadata"]["generation"] == 2

    ignored = crs.patch_namespaced_custom_object(*args, {"status": {"phase": "Hacked"}})
    assert "status" not in ignored  # the main resource never writes the status
    assert ignored["metadata"]["resourceVersion"] == respecced["metadata"]["resourceVersion"]

    statused = crs.patch_namespaced_custom_object_status(
        *args, {"status": {"phase": "Running"}, "spec": {"lr": 99}}
    )
    assert statused["status"] == {"phase": "Running"}
    assert statused["spec"] == {"lr": 2}  # /status changes only the status
    assert statused["metadata"]["generation"] == 2
    assert int(statused["metadata"]["resourceVersion"]) > int(
        respecced["metadata"]["resourceVersion"]
    )

    same = crs.patch_namespaced_custom_object(*args, {"spec": {"lr": 2}})
    assert same["metadata"]["resourceVersion"] == statused["metadata"]["resourceVersion"]

    # Strategic merge patch is accepted (as a merge patch) and PUT replaces the object.
    status, body = call(
        api,
        "PATCH",
        f"/apis/{GROUP}/{VERSION}/namespaces/default/{FTJ}/a",
        {"spec": {"epochs": 3}},
        "application/strategic-merge-patch+json",
    )
    assert status == 200
    assert body["spec"] == {"lr": 2, "epochs": 3}
    replaced = crs.replace_namespaced_custom_object(*args, {**body, "spec": {"lr": 5}})
    assert replaced["spec"] == {"lr": 5}
    assert replaced["status"] == {"phase": "Running"}  # PUT on the main resource keeps status
    assert replaced["metadata"]["generation"] == 4
    assert replaced["metadata"]["uid"] == first["metadata"]["uid"]


def test_stale_resource_version_is_a_conflict(api: KubeApi, crs: k8s.CustomObjectsApi) -> None:
    args = (GROUP, VERSION, "default", FTJ, "a")
    old = crs.create_namespaced_custom_object(*args[:4], ftj("a"))
    new = crs.patch_namespaced_custom_object(*args, {"spec": {"x": 1}})
    stale = {"metadata": {"resourceVersion": old["metadata"]["resourceVersion"]}}

    for attempt in (
        lambda: crs.patch_namespaced_custom_object(*args, {**stale, "spec": {"x": 2}}),
        lambda: crs.patch_namespaced_custom_object_status(*args, {**stale, "status": {"a": 1}}),
        lambda: crs.replace_namespaced_custom_object(*args, {**old, "spec": {"x": 3}}),
    ):
        with pytest.raises(k8s.ApiException) as exc:
            attempt()
        assert status_of(exc) == (409, "Conflict")
    assert api.get(FTJ_RES, "default", "a") == new

    fresh = {"metadata": {"resourceVersion": new["metadata"]["resourceVersion"]}}
    assert crs.patch_namespaced_custom_object(*args, {**fresh, "spec": {"x": 4}})["spec"]["x"] == 4


def test_json_patch_test_op_as_kopf_expects(api: KubeApi, crs: k8s.CustomObjectsApi) -> None:
    obj = crs.create_namespaced_custom_object(GROUP, VERSION, "default", FTJ, ftj("a"))
    url = f"/apis/{GROUP}/{VERSION}/namespaces/default/{FTJ}/a"
    rv = obj["metadata"]["resourceVersion"]
    ops = [{"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]}]
    ctype = "application/json-patch+json"

    wrong = [{"op": "test", "path": "/metadata/resourceVersion", "value": "999"}, *ops]
    status, body = call(api, "PATCH", url, wrong, ctype)
    assert (status, body["reason"]) == (422, "Invalid")  # kopf: APIUnprocessableEntityError
    assert api.get(FTJ_RES, "default", "a") == obj

    right = [{"op": "test", "path": "/metadata/resourceVersion", "value": rv}, *ops]
    status, body = call(api, "PATCH", url, right, ctype)
    assert status == 200
    assert body["metadata"]["finalizers"] == ["x/y"]
    assert call(api, "PATCH", url, {"spec": {}}, "application/apply-patch+yaml")[0] == 415


# ------------------------------------------------------------------------------ deletion
def test_delete_finalizers_and_owner_gc(api: KubeApi, client: k8s.ApiClient) -> None:
    crs, core = k8s.CustomObjectsApi(client), k8s.CoreV1Api(client)
    parent = crs.create_namespaced_custom_object(
        GROUP, VERSION, "default", FTJ, {**ftj("p"), "metadata": {"name": "p", "finalizers": ["f"]}}
    )
    since = parent["metadata"]["resourceVersion"]

    def owned_by(obj: dict[str, Any], kind: str) -> list[dict[str, Any]]:
        meta = obj["metadata"]
        return [{"apiVersion": "v1", "kind": kind, "name": meta["name"], "uid": meta["uid"]}]

    cm = api.create(
        "v1/configmaps",
        {"metadata": {"name": "cm", "ownerReferences": owned_by(parent, "FineTuneJob")}},
        namespace="default",
    )
    pod = {"metadata": {"name": "pod", "ownerReferences": owned_by(cm, "ConfigMap")}}
    core.create_namespaced_pod("default", pod)
    owner = core.create_namespaced_secret("default", {"metadata": {"name": "owner"}}).to_dict()
    kept = {"metadata": {"name": "kept", "ownerReferences": owned_by(owner, "Secret")}}
    core.create_namespaced_config_map("default", kept)
    core.delete_namespaced_secret("owner", "default", propagation_policy="Orphan")
    assert api.get("v1/configmaps", "default", "kept") is not None  # orphaned, not collected

    marked = crs.delete_namespaced_custom_object(GROUP, VERSION, "default", FTJ, "p")
    assert marked["metadata"]["deletionTimestamp"].endswith("Z")
    assert api.get("v1/configmaps", "default", "cm") is not None  # the owner is still there
    crs.patch_namespaced_custom_object(
        GROUP, VERSION, "default", FTJ, "p", {"metadata": {"finalizers": None}}
    )
    assert api.get(FTJ_RES, "default", "p") is None
    assert api.get("v1/configmaps", "default", "cm") is None  # collected
    assert api.get("v1/pods", "default", "pod") is None  # recursively

    ftj_url = f"/apis/{GROUP}/{VERSION}/namespaces/default/{FTJ}?watch=1&resourceVersion={since}"
    _, events = call(api, "GET", ftj_url + "&timeoutSeconds=0.2")
    assert [(e["type"], "deletionTimestamp" in e["object"]["metadata"]) for e in events] == [
        ("MODIFIED", True),
        ("DELETED", True),
    ]
    pod_events = watched(api, f"/api/v1/pods?watch=1&resourceVersion={since}")
    assert pod_events == [("ADDED", "pod"), ("DELETED", "pod")]


def test_delete_immediately_answers_a_success_status(api: KubeApi, client: k8s.ApiClient) -> None:
    core = k8s.CoreV1Api(client)
    core.create_namespaced_config_map("default", {"metadata": {"name": "cm"}})
    status = core.delete_namespaced_config_map("cm", "default", propagation_policy="Background")
    assert status["status"] == "Success"  # the client hands back a dict here
    with pytest.raises(k8s.ApiException) as exc:
        core.delete_namespaced_config_map("cm", "default")
    assert status_of(exc) == (404, "NotFound")
    core.create_namespaced_config_map(
        "default", {"metadata": {"name": "cm2", "labels": {"a": "b"}}}
    )
    core.delete_collection_namespaced_config_map("default", label_selector="a=b")
    assert api.list("v1/configmaps", "default") == []


# ------------------------------------------------------------------------------ watching
def test_watch_from_resource_version_with_timeout(api: KubeApi, crs: k8s.CustomObjectsApi) -> None:
    make = crs.create_namespaced_custom_object
    make(GROUP, VERSION, "default", FTJ, ftj("a", {"w": "1"}))
    make(GROUP, VERSION, "default", FTJ, ftj("b"))
    listed = crs.list_namespaced_custom_object(GROUP, VERSION, "default", FTJ)
    since = listed["metadata"]["resourceVersion"]
    make(GROUP, VERSION, "other", FTJ, ftj("c", {"w": "1"}))
    crs.patch_namespaced_custom_object(GROUP, VERSION, "default", FTJ, "a", {"spec": {"x": 1}})
    api.patch(FTJ_RES, "default", "b", {"status": {"phase": "Done"}}, subresource="status")
    api.delete(FTJ_RES, "other", "c")

    started = time.monotonic()
    stream = kubernetes.watch.Watch().stream(
        crs.list_cluster_custom_object, GROUP, VERSION, FTJ, resource_version=since,
        timeout_seconds=1,
    )  # fmt: skip
    cluster = [(e["type"], e["raw_object"]["metadata"]["name"]) for e in stream]
    assert 0.9 < time.monotonic() - started < 3  # timeoutSeconds closes the stream cleanly
    assert cluster == [("ADDED", "c"), ("MODIFIED", "a"), ("MODIFIED", "b"), ("DELETED", "c")]
    url = f"/apis/{GROUP}/{VERSION}/namespaces/default/{FTJ}?watch=true"
    assert watched(api, f"{url}&resourceVersion={since}") == [("MODIFIED", "a"), ("MODIFIED", "b")]
    selected = f"/apis/{GROUP}/{VERSION}/{FTJ}?watch=1&resourceVersion={since}&labelSelector=w%3D1"
    assert watched(api, selected) == [("ADDED", "c"), ("MODIFIED", "a"), ("DELETED", "c")]
    fields = f"{url}&resourceVersion={since}&fieldSelector=metadata.name%3Db"
    assert watched(api, fields) == [("MODIFIED", "b")]
    assert watched(api, url) == [("ADDED", "a"), ("ADDED", "b")]  # no RV: the current state
    assert watched(api, f"/apis/{GROUP}/{VERSION}/namespaces/default/{FTJ}/a?watch=1") == [
        ("ADDED", "a")
    ]


def test_watch_too_old_resource_version_is_gone() -> None:
    with KubeApi(event_history=2) as small:
        for name in "abc":
            small.create("v1/configmaps", {"metadata": {"name": name}}, namespace="default")
        status, events = call(small, "GET", "/api/v1/configmaps?watch=true&resourceVersion=1")
    assert status == 200
    assert [(e["type"], e["object"]["code"]) for e in events] == [("ERROR", 410)]


def test_initial_events_end_with_a_bookmark(api: KubeApi) -> None:
    url = "/api/v1/namespaces?watch=true&sendInitialEvents=true&timeoutSeconds=0.2"
    events = call(api, "GET", url)[1]
    assert [e["type"] for e in events] == ["ADDED", "ADDED", "BOOKMARK"]
    annotations = events[-1]["object"]["metadata"]["annotations"]
    assert annotations == {"k8s.io/initial-events-end": "true"}


def test_stall_watches(api: KubeApi, crs: k8s.CustomObjectsApi) -> None:
    def watch_into(sink: queue.Queue[Any], **kwargs: Any) -> threading.Thread:
        def run() -> None:
            try:
                stream = kubernetes.watch.Watch().stream(
                    crs.list_namespaced_custom_object, GROUP, VERSION, "default", FTJ, **kwargs
                )
                for event in stream:
                    sink.put(event["raw_object"]["metadata"]["name"])
            except Exception as exc:  # noqa: BLE001 -- the stalled one times out client-side
                sink.put(type(exc).__name__)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    old: queue.Queue[Any] = queue.Queue()
    old_thread = watch_into(old, _request_timeout=1.5)
    api.create(FTJ_RES, ftj("before"), namespace="default")
    assert old.get(timeout=5) == "before"

    api.stall_watches()
    rv = api.get(FTJ_RES, "default", "before")["metadata"]["resourceVersion"]  # type: ignore[index]
    new: queue.Queue[Any] = queue.Queue()
    new_thread = watch_into(new, resource_version=rv, timeout_seconds=1)
    time.sleep(0.2)
    api.create(FTJ_RES, ftj("after"), namespace="default")
    assert new.get(timeout=5) == "after"
    new_thread.join(timeout=5)
    old_thread.join(timeout=5)
    assert not old_thread.is_alive()
    assert "Timeout" in old.get_nowait()  # nothing came: the client gave up waiting
    assert old.empty()


def test_strict_namespaces_and_no_crds() -> None:
    with KubeApi(crd_dir=None, strict_namespaces=True) as strict:
        with pytest.raises(kmock.KubernetesError) as exc:
            strict.create("v1/configmaps", {"metadata": {"name": "x"}}, namespace="nope")
        assert (exc.value.status, exc.value.reason) == (404, "NotFound")
        strict.create("v1/namespaces", {"metadata": {"name": "nope"}})
        strict.create("v1/configmaps", {"metadata": {"name": "x"}}, namespace="nope")
        assert call(strict, "GET", f"/apis/{GROUP}/{VERSION}/{FTJ}")[0] == 404


def test_kmock_reactions_still_take_precedence(api: KubeApi) -> None:
    api.emulator["get /version"] << {"major": "9", "minor": "9"}
    api.emulator["get", "/api/v1/namespaces/default/pods/pinned"] << 418
    assert call(api, "GET", "/version")[1]["major"] == "9"
    status = call(api, "GET", "/api/v1/namespaces/default/pods/pinned", ctype="text/plain")[0]
    assert status == 418


# ------------------------------------------------------------------------------ in-process & ops
def test_fail_next_and_request_counts(api: KubeApi, crs: k8s.CustomObjectsApi) -> None:
    crs.create_namespaced_custom_object(GROUP, VERSION, "default", FTJ, ftj("a"))
    api.reset_counts()
    api.fail_next("PATCH", FTJ_RES, subresource="status", count=2)
    for _ in range(2):
        with pytest.raises(k8s.ApiException) as exc:
            crs.patch_namespaced_custom_object_status(
                GROUP, VERSION, "default", FTJ, "a", {"status": {"phase": "X"}}
            )
        assert status_of(exc) == (409, "Conflict")
    assert "status" not in api.get(FTJ_RES, "default", "a")  # type: ignore[operator]
    patched = crs.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", FTJ, "a", {"status": {"phase": "X"}}
    )
    assert patched["status"] == {"phase": "X"}
    api.fail_next("GET", "v1/configmaps", status=503)
    with pytest.raises(k8s.ApiException) as exc:
        k8s.CoreV1Api(crs.api_client).list_namespaced_config_map("default")
    assert status_of(exc) == (503, "ServiceUnavailable")

    api.patch(FTJ_RES, "default", "a", {"spec": {"in": "process"}})  # not counted
    counts = api.request_counts()
    assert counts == {
        ("PATCH", FTJ_RES, "status"): 3,
        ("GET", "v1/configmaps", None): 1,
    }
    assert api.writes == 3
    api.reset_counts()
    assert api.writes == 0
    assert api.request_counts() == {}


def test_rbac_requests_name_each_request_as_rbac_authorizes_it(api: KubeApi) -> None:
    cms, cm = "/api/v1/namespaces/default/configmaps", {"metadata": {"name": "c"}}
    ftjs = f"/apis/{GROUP}/{VERSION}/namespaces/default/{FTJ}"
    api.create(FTJ_RES, ftj("a"), "default")  # in-process: not recorded
    requests = [
        ("POST", cms, cm, ""),
        ("GET", f"{cms}/c", None, ""),
        ("GET", cms, None, ""),
        ("GET", f"{cms}?watch=true&timeoutSeconds=0.1", None, ""),
        ("PUT", f"{cms}/c", {**cm, "data": {"k": "v"}}, ""),
        ("PATCH", f"{ftjs}/a/status", {"status": {}}, "application/merge-patch+json"),
        ("DELETE", f"{cms}/c", None, ""),
        ("DELETE", cms, None, ""),
        ("GET", "/apis/batch/v1/jobs", None, ""),
        ("GET", "/api/v1/namespaces", None, ""),
        ("GET", "/version", None, ""),
    ]
    for method, path, body, ctype in requests:
        status, _ = call(api, method, path, body, ctype)
        assert status < 300, (method, path, status)
    assert api.rbac_requests() == {
        RbacRequest("create", "", "configmaps", "default"),
        RbacRequest("get", "", "configmaps", "default", name="c"),
        RbacRequest("list", "", "configmaps", "default"),
        RbacRequest("watch", "", "configmaps", "default"),
        RbacRequest("update", "", "configmaps", "default", name="c"),
        RbacRequest("patch", GROUP, f"{FTJ}/status", "default", name="a"),
        RbacRequest("delete", "", "configmaps", "default", name="c"),
        RbacRequest("deletecollection", "", "configmaps", "default"),
        RbacRequest("list", "batch", "jobs", None),
        RbacRequest("list", "", "namespaces", None),
        RbacRequest("get", "", "", None, "/version"),
    }


def test_in_process_api_is_thread_safe_and_emits_events(api: KubeApi) -> None:
    since = api.list("v1/namespaces")[0]["metadata"]["resourceVersion"]

    def make(i: int) -> None:
        api.create("v1/configmaps", {"metadata": {"name": f"cm{i}", "labels": {"i": str(i)}}}, "ns")

    threads = [threading.Thread(target=make, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    items = api.list("v1/configmaps", "ns")
    assert len(items) == 20
    assert len({item["metadata"]["resourceVersion"] for item in items}) == 20
    assert [i["metadata"]["name"] for i in api.list("v1/configmaps", label_selector="i=7")] == [
        "cm7"
    ]
    with pytest.raises(kmock.KubernetesError) as exc:
        make(1)
    assert (exc.value.status, exc.value.reason) == (409, "AlreadyExists")
    with pytest.raises(kmock.KubernetesError) as exc:
        api.delete("v1/configmaps", "ns", "nope")
    assert (exc.value.status, exc.value.reason) == (404, "NotFound")
    copy = api.get("v1/configmaps", "ns", "cm1")
    assert copy is not None
    copy["data"] = {"mutated": "locally"}
    assert "data" not in api.get("v1/configmaps", "ns", "cm1")  # type: ignore[operator]

    url = f"/api/v1/namespaces/ns/configmaps?watch=true&resourceVersion={since}&timeoutSeconds=0"
    assert [e["type"] for e in call(api, "GET", url)[1]] == ["ADDED"] * 20
    api.delete("v1/namespaces", None, "default")  # takes its content with it
    assert api.get("v1/namespaces", None, "default") is None


# ------------------------------------------------------------------------------ kopf
def test_a_real_kopf_operator_runs_against_it(api: KubeApi, client: k8s.ApiClient) -> None:
    registry = kopf.OperatorRegistry()
    created: list[str] = []
    deleted: list[str] = []

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=api.url, insecure=True)

    @kopf.on.create(GROUP, VERSION, FTJ, registry=registry)
    def on_create(name: str, namespace: str, body: Any, patch: Any, **_: Any) -> dict[str, str]:
        created.append(name)
        owner = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "name": name}
        meta = {"name": f"{name}-cfg", "ownerReferences": [{**owner, "uid": body.meta.uid}]}
        k8s.CoreV1Api(client).create_namespaced_config_map(namespace, {"metadata": meta})
        patch.status["phase"] = "Configured"
        return {"configMap": f"{name}-cfg"}

    @kopf.on.delete(GROUP, VERSION, FTJ, registry=registry)
    def on_delete(name: str, **_: Any) -> None:
        deleted.append(name)

    settings = kopf.OperatorSettings()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kubetune.io")
    settings.posting.enabled = False
    settings.watching.server_timeout = 10
    settings.watching.client_timeout = 15
    settings.watching.connect_timeout = 5

    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(logging.DEBUG)
    kopf_logger = logging.getLogger("kopf")
    old_level = kopf_logger.level
    kopf_logger.addHandler(handler)
    kopf_logger.setLevel(logging.DEBUG)
    stop_flag, ready_flag = threading.Event(), threading.Event()
    operator = kopf.operator(
        registry=registry,
        settings=settings,
        clusterwide=True,
        standalone=True,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
    thread = threading.Thread(target=asyncio.run, args=(operator,), daemon=True)
    thread.start()
    try:
        assert ready_flag.wait(timeout=10)
        crs = k8s.CustomObjectsApi(client)
        crs.create_namespaced_custom_object(GROUP, VERSION, "default", FTJ, ftj("job1"))

        def handled() -> bool:  # kopf patches the main resource, then the status
            obj = api.get(FTJ_RES, "default", "job1") or {}
            annotations = obj.get("metadata", {}).get("annotations") or {}
            return "kubetune.io/last-handled-configuration" in annotations and "status" in obj

        wait_for(handled)
        obj = api.get(FTJ_RES, "default", "job1")
        assert obj is not None
        assert obj["status"]["phase"] == "Configured"
        assert {"configMap": "job1-cfg"} in obj["status"].values()  # the handler's result
        assert obj["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
        assert api.get("v1/configmaps", "default", "job1-cfg") is not None

        crs.delete_namespaced_custom_object(GROUP, VERSION, "default", FTJ, "job1")
        wait_for(lambda: api.get(FTJ_RES, "default", "job1") is None)
        assert api.get("v1/configmaps", "default", "job1-cfg") is None  # garbage-collected
    finally:
        stop_flag.set()
        thread.join(timeout=10)
        kopf_logger.removeHandler(handler)
        kopf_logger.setLevel(old_level)

    assert not thread.is_alive(), "kopf did not stop"
    assert created == ["job1"]
    assert deleted == ["job1"]
    json_patches = [
        r for r in api.emulator if r.headers.get("Content-Type") == "application/json-patch+json"
    ]
    assert json_patches  # the finalizer went in and out through resourceVersion-tested patches
    counts = api.request_counts()
    assert counts["PATCH", FTJ_RES, "status"] >= 1
    messages = [r.getMessage() for r in records]
    assert not [m for m in messages if "Could not apply the patch" in m or "nconsisten" in m]
    problems = [
        r.getMessage()
        for r in records
        if r.levelno >= logging.WARNING and "OS signals are ignored" not in r.getMessage()
    ]
    assert problems == []


def wait_for(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
