"""A stateful fake Kubernetes API server for tests: kmock 0.8 plus the rules our operator relies on.

``KubeApi`` runs :class:`KubeEmulator` (a subclass of ``kmock.KubernetesEmulator``) over HTTP in
its own thread and event loop, so the real kopf operator, the official ``kubernetes`` client and
synchronous test code (``api.get/list/create/patch/delete``, thread-safe, same rules and watch
events as HTTP) can all use it at once without deadlocks::

    with KubeApi() as api:  # registers every CRD in <repo>/crds
        client = kubernetes.client.ApiClient(kubernetes.client.Configuration(host=api.url))

kmock stays the HTTP server (``aiohttp`` ``RawTestServer``), the request parser, the reaction
router (user reactions such as ``api.emulator['get /version'] << {...}`` still take precedence),
the discovery endpoints and the object store (``api.emulator.objects`` keeps each object's latest
versions for kmock-style assertions); ``rbac_requests()`` names every distinct HTTP request as
RBAC authorizes it (verb, API group, resource, namespace). Fault injection: ``fail_next()``
answers the next matching requests with an error; ``stall_watches()`` silences the open watch
streams (kept open, deaf to ``timeoutSeconds``), as a stalled TCP stream would; clients recover
only by their own timeouts.

Isolation from a real cluster: the ``kubernetes`` package only copies ``$KUBECONFIG`` into a
default path at import and loads nothing unless asked, and a kopf registry of our own has no
default login handlers; so with clients configured explicitly (``Configuration(host=api.url)``,
``@kopf.on.login`` returning ``ConnectionInfo(server=api.url)``) nothing reads a kubeconfig (set
``KUBECONFIG=/dev/null`` before any code calls ``load_kube_config()``).

Deviations from plain kmock 0.8 (each closes a gap measured against kopf / the client):

* ``/api/v1/namespaces[/NAME[/status|finalize]]`` parse as the cluster-scoped ``namespaces``
  resource (kmock's ``parse_path`` crashes on the list URL). The fix patches
  ``kmock._internal.parsing.parse_path`` but only acts inside this emulator's requests.
* Writes follow API-server rules (below) instead of kmock's "merge every dict" updates; PUT,
  ``deletecollection`` and ``watch=True`` (any truthy spelling) are routed; create answers 201.
* Watches replay from ``resourceVersion`` out of a bounded per-resource event history (410 Gone
  as an ERROR event when too old), honour ``timeoutSeconds``, ``sendInitialEvents`` (closing
  BOOKMARK) and selectors, instead of kmock's per-resource bus from "now".
* Errors are k8s ``Status`` bodies with real reasons (``NotFound``, ``AlreadyExists``,
  ``Conflict``, ``Invalid``, ``BadRequest``) and ``details{name, kind}``; expected API errors are
  not kept in ``emulator.errors`` (only server bugs are: see ``KubeApi.unexpected_errors``).
* No global DNS interception and no client session (kmock's ``Server`` adds both); request
  records and object histories are trimmed so long benchmarks do not grow without bound.
* Added ``/openapi/v2`` and ``/openapi/v3`` (minimal valid documents); ``/version`` is kmock's.

Simplifications compared with a real API server (none matters to kopf or our operator):

* No admission, defaulting, schema validation, RBAC, managedFields, server-side apply (415),
  ``dryRun``, list pagination (``limit`` is ignored, never a ``continue`` token) or periodic
  watch bookmarks. Strategic merge patch is treated as a JSON merge patch (lists are replaced).
* ``generation`` (1 on create) bumps when anything outside ``apiVersion/kind/metadata/status``
  changes, for every resource (real built-ins without a spec never bump it). Resources with a
  ``status`` subresource drop ``status`` on create and change it only through ``/status``
  (real pods and jobs get an initial status; here it starts empty, namespaces get ``Active``).
* A failed JSON-patch ``test`` answers 422 ``Invalid`` (what kopf's patching expects); a stale
  ``metadata.resourceVersion`` in a merge patch or PUT answers 409 ``Conflict``.
* Deleting an object with finalizers sets ``deletionTimestamp`` and answers 200 (real: 202);
  an immediate delete answers a ``Status`` "Success"; removing the last finalizer of a deleted
  object emits only DELETED. Garbage collection is immediate background
  propagation by ``ownerReferences[*].uid``; ``Orphan`` skips it (dependents keep their owner
  references); ``Foreground`` behaves as ``Background``. Deleting a namespace removes it at once
  and deletes everything in it. Creating in a missing namespace is accepted unless
  ``strict_namespaces=True`` (then 404, as real servers do).
* Watches filter events by the new object only (no synthetic DELETED when an object stops
  matching a selector); field selectors accept any dotted path (real servers allow few);
  ``timeoutSeconds`` may be fractional (real servers: whole seconds), which keeps tests fast.
* CRDs created over the API are served immediately (no ``Established`` condition); deleting a
  CRD does not stop serving its resource.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import copy
import datetime
import functools
import json
import re
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

import aiohttp.web
import attrs
import jsonpatch
import kmock
import yaml
from jsonpointer import JsonPointerException
from kmock._internal import parsing as kmock_parsing

KMOCK_VERSION: str = getattr(kmock, "__version__", "?")
if not KMOCK_VERSION.startswith("0.8"):
    raise ImportError(
        f"tests/support/kube_api.py patches kmock 0.8 internals, but kmock {KMOCK_VERSION} is"
        " installed: install kmock==0.8 (the dev extra pins it) or port this module."
    )

Obj = dict[str, Any]
ObjList = list[Obj]
T = TypeVar("T")

CRD_DIR = Path(__file__).resolve().parents[2] / "crds"
CRDS = "apiextensions.k8s.io/v1/customresourcedefinitions"
VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
NON_SPEC_KEYS = frozenset({"apiVersion", "kind", "metadata", "status"})
# fmt: off
REASONS = {400: "BadRequest", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
           409: "Conflict", 410: "Gone", 415: "UnsupportedMediaType", 422: "Invalid",
           429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}
# Identity and lifecycle fields that clients cannot change by updating an object.
SERVER_OWNED = ("name", "namespace", "uid", "creationTimestamp", "generation", "resourceVersion",
                "deletionTimestamp", "deletionGracePeriodSeconds")
MERGE_PATCHES = ("application/merge-patch+json", "application/strategic-merge-patch+json")
OPENAPI_INFO = {"title": "Kubernetes", "version": "v1.26.4"}
# fmt: on
REQUEST_RECORDS = 5_000  # kmock records every request; keep the latest ones only
OBJECT_VERSIONS = 20  # versions of each object kept in ``emulator.objects[...].history``


class RbacRequest(NamedTuple):
    """One HTTP request as RBAC authorizes it (the API server's ``RequestInfo``).

    Resource requests: ``verb`` is get (GET with a name), list (GET of a collection), watch
    (``?watch=true``, with or without a name), create (POST), update (PUT), patch (PATCH),
    delete (DELETE with a name) or deletecollection (DELETE of a collection); ``resource`` is
    the plural, with ``/subresource`` when there is one; ``namespace`` is None for a
    cluster-scoped resource or a request across all namespaces. Other requests (discovery,
    ``/version``, ``/openapi``) are non-resource URLs: ``resource`` is empty, ``path`` is the
    URL path and ``verb`` the lower-case HTTP method. ``name`` is the object's name from the URL
    (what ``resourceNames`` rules match); empty for creates and collections.
    """

    verb: str
    api_group: str
    resource: str
    namespace: str | None
    path: str = ""
    name: str = ""


def rbac_request(request: kmock.Request) -> RbacRequest:
    """The :class:`RbacRequest` of an HTTP request as kmock parsed it."""
    method, ref = request.method.value, request.resource
    if ref is None or not ref.plural:
        return RbacRequest(method.lower(), "", "", None, request.url.path)
    verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())
    if method == "GET":
        watch = _truthy(request.params.get("watch"))
        verb = "watch" if watch else "get" if request.name else "list"
    elif method == "DELETE":
        verb = "delete" if request.name else "deletecollection"
    sub = request.subresource
    resource = f"{ref.plural}/{sub}" if sub else ref.plural
    return RbacRequest(verb, ref.group or "", resource, request.namespace, name=request.name or "")


@dataclass(frozen=True)
class Resource:
    """One served resource (group/version/plural) with what discovery reports about it."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status: bool = False  # has the ``status`` subresource
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        """``group/version/plural``, core as ``v1/plural``: the form the public API takes."""
        return f"{self.api_version}/{self.plural}"

    @functools.cached_property
    def ref(self) -> kmock.resource:
        return kmock.resource(self.group, self.version, self.plural)


# fmt: off
BUILTINS = (
    Resource("", "v1", "namespaces", "Namespace", namespaced=False, status=True),
    Resource("", "v1", "configmaps", "ConfigMap", short_names=("cm",)),
    Resource("", "v1", "secrets", "Secret"),
    Resource("", "v1", "services", "Service", status=True, short_names=("svc",)),
    Resource("", "v1", "pods", "Pod", status=True, short_names=("po",)),
    Resource("", "v1", "events", "Event", short_names=("ev",)),
    Resource("", "v1", "serviceaccounts", "ServiceAccount", short_names=("sa",)),
    Resource("batch", "v1", "jobs", "Job", status=True),
    Resource("apps", "v1", "deployments", "Deployment", status=True, short_names=("deploy",)),
    Resource("apps", "v1", "replicasets", "ReplicaSet", status=True, short_names=("rs",)),
    Resource("events.k8s.io", "v1", "events", "Event", short_names=("ev",)),
    Resource("coordination.k8s.io", "v1", "leases", "Lease"),
    Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
             namespaced=False, status=True, short_names=("crd", "crds")),
)
# fmt: on


def api_error(
    status: int, message: str, *, reason: str = "", name: str | None = "", kind: str | None = ""
) -> kmock.KubernetesError:
    """A k8s ``Status`` error; kmock renders it as the response body with this HTTP status."""
    reason = reason or REASONS.get(status, "Unknown")
    details = {"name": name or "", "kind": kind or ""}
    return kmock.KubernetesError(status=status, reason=reason, message=message, details=details)


def status_body(code: int, reason: str = "", message: str = "", **details: Any) -> Obj:
    """A k8s ``Status`` object (as in watch ERROR events and delete answers)."""
    body = {"apiVersion": "v1", "kind": "Status", "metadata": {}, "code": code, "reason": reason}
    body.update(status="Success" if code < 400 else "Failure", message=message, details=details)
    return body


def _not_found(res: Resource, name: str | None) -> kmock.KubernetesError:
    what = f"{res.plural}.{res.group}" if res.group else res.plural
    return api_error(404, f'{what} "{name}" not found', name=name, kind=res.plural)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in {"true", "1", "yes"}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (returns a new value; ``None`` removes a key)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# ------------------------------------------------------------------------------------ selectors
_TERM = re.compile(
    r"\s*(?:(?P<nkey>!\s*[\w./-]+)"
    r"|(?P<skey>[\w./-]+)\s+(?P<sop>in|notin)\s*\((?P<svals>[^()]*)\)"
    r"|(?P<ekey>[\w./-]+)\s*(?P<eop>==|=|!=)\s*(?P<eval>[\w./-]*)"
    r"|(?P<key>[\w./-]+))\s*"
)
Requirement = tuple[str, str, frozenset[str]]  # (key, op, values)


def parse_selector(text: str | None, *, labels: bool = True) -> list[Requirement]:
    """Parse a label selector (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``).

    Field selectors (``labels=False``) allow only ``=``, ``==`` and ``!=``.
    """
    terms = [t for t in re.split(r",(?![^()]*\))", text or "") if t.strip()]
    result: list[Requirement] = []
    for term in terms:
        match = _TERM.fullmatch(term)
        if match is None or (not labels and match["ekey"] is None):
            raise api_error(400, f"unable to parse requirement: {term!r}")
        if match["nkey"]:
            result.append((match["nkey"].lstrip("!").strip(), "!", frozenset()))
        elif match["skey"]:
            values = frozenset(v.strip() for v in match["svals"].split(",") if v.strip())
            result.append((match["skey"], match["sop"], values))
        elif match["ekey"]:
            op = "!=" if match["eop"] == "!=" else "="
            result.append((match["ekey"], op, frozenset({match["eval"]})))
        else:
            result.append((match["key"], "exists", frozenset()))
    return result


def _requirement_holds(values: dict[str, str], req: Requirement) -> bool:
    key, op, allowed = req
    present, value = key in values, values.get(key)
    return {
        "=": present and value in allowed,
        "in": present and value in allowed,
        "!=": not present or value not in allowed,
        "notin": not present or value not in allowed,
        "exists": present,
        "!": not present,
    }[op]


def _field_values(obj: Obj, reqs: Iterable[Requirement]) -> dict[str, str]:
    values = {}
    for key, _, _ in reqs:
        value: Any = obj
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        values[key] = "" if value is None else str(value)
    return values


def matches(obj: Obj, labels: list[Requirement], fields: list[Requirement]) -> bool:
    """Whether an object passes parsed label and field selectors."""
    obj_labels = obj.get("metadata", {}).get("labels") or {}
    field_values = _field_values(obj, fields)
    return all(_requirement_holds(obj_labels, r) for r in labels) and all(
        _requirement_holds(field_values, r) for r in fields
    )


# ------------------------------------------------------------------------ kmock path-parser fix
_OUR_REQUEST: contextvars.ContextVar[bool] = contextvars.ContextVar("kube_api", default=False)
_kmock_parse_path = kmock_parsing.parse_path
_NAMESPACES_PATH = re.compile(
    r"/api/(?P<v>[^/]+)/namespaces(?:/(?P<name>[^/]+)(?:/(?P<sub>status|finalize))?)?/?"
)


def _parse_path(path: str) -> kmock_parsing.ParsedPath:
    """kmock's parser, except that namespaces themselves parse as a cluster-scoped resource."""
    if _OUR_REQUEST.get() and (m := _NAMESPACES_PATH.fullmatch(path)):
        return kmock_parsing.ParsedPath("", m["v"], "namespaces", None, m["name"], m["sub"])
    return _kmock_parse_path(path)


kmock_parsing.parse_path = _parse_path  # kmock's request parser looks it up at call time


@attrs.mutable
class _Server(kmock.Server):
    """kmock's server without its global DNS interception and its client session."""

    async def __aenter__(self) -> _Server:
        self._managed_server = self._server_cls(self.handler, host=self._host, port=self._port)
        await self._managed_server.start_server()
        self.handler.servers.append(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.handler.servers.remove(self)
        assert self._managed_server is not None
        await self._managed_server.close()
        self._managed_server = None


# ------------------------------------------------------------------------------------ emulator
@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """kmock's emulator with API-server write, watch and error semantics (see module docstring).

    Everything here runs on the server's event loop; ``KubeApi`` marshals calls onto it.
    """

    strict_namespaces: bool = False
    event_history: int = 10_000  # events kept per resource for watches from a resourceVersion

    _registry: dict[tuple[str, str, str], Resource] = attrs.field(factory=dict, init=False)
    _rv: int = attrs.field(default=0, init=False)
    _events: dict[str, collections.deque[tuple[int, str, Obj]]] = attrs.field(
        factory=dict, init=False
    )
    _evicted: dict[str, int] = attrs.field(factory=dict, init=False)  # newest dropped event RV
    _changed: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _stopping: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    _stall_epoch: int = attrs.field(default=0, init=False)
    _watchers: int = attrs.field(default=0, init=False)
    # Shared with other threads (guarded by _meta_lock): counters and injected failures.
    _meta_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _counts: collections.Counter[tuple[str, str, str | None]] = attrs.field(
        factory=collections.Counter, init=False
    )
    _writes: int = attrs.field(default=0, init=False)
    _failures: list[list[Any]] = attrs.field(factory=list, init=False)
    _unexpected: list[Exception] = attrs.field(factory=list, init=False)  # bugs of this fake
    _rbac: set[RbacRequest] = attrs.field(factory=set, init=False)  # every distinct request
    # Fast path: the reactions serving resource requests, called directly while no user
    # reaction exists (kmock otherwise evaluates every reaction's filters for each request,
    # which dominated the CPU time of the operator benchmark).
    _routes: dict[str, Any] = attrs.field(factory=dict, init=False)
    _builtin_payloads: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        # The scaffold's discovery routes only: kmock's emulator routes change state in its
        # _handle() and answer 200 to creates. Statuses are fixed per route (``<< 201``): a
        # callable that returned a kmock Response would overwrite the shared route's status.
        kmock.KubernetesScaffold.__attrs_post_init__(self)
        action, method = kmock.action, kmock.method
        routes = self._routes
        routes["list"] = self.fallback[action.LIST] << self._serve_list
        routes["watch"] = (
            self.fallback[action.WATCH] << {"Content-Type": "application/json"} << self._serve_watch
        )
        routes["fetch"] = self.fallback[action.FETCH] << self._serve_fetch
        routes["create"] = self.fallback[action.CREATE] << 201 << self._serve_create
        routes["update"] = self.fallback[action.UPDATE] << self._serve_update
        routes["delete"] = self.fallback[action.DELETE] << self._serve_delete
        routes["put"] = self.fallback[method.PUT] << self._serve_replace
        routes["deletecollection"] = self.fallback[method.DELETE] << self._serve_delete_collection
        self.fallback["get /openapi/v2"] << self._serve_openapi_v2
        self.fallback["get", re.compile(r"/openapi/v3(/.*)?")] << self._serve_openapi_v3
        for res in BUILTINS:
            self.register(res)
        for name in ("default", "kube-system"):
            self.do_create(self.lookup("v1/namespaces"), None, {"metadata": {"name": name}})
        self._builtin_payloads = len(self._payloads)

    # ------------------------------------------------------------------------ registry
    def register(self, res: Resource) -> None:
        """Serve a resource and announce it in discovery (kmock's ``resources``)."""
        self._registry[res.group, res.version, res.plural] = res
        self._resources[res.ref] = kmock.ResourceInfo(
            namespaced=res.namespaced,
            kind=res.kind,
            singular=res.singular or res.kind.lower(),
            verbs=VERBS,
            shortnames=res.short_names,
            categories=res.categories,
            subresources={"status"} if res.status else set(),
        )

    def register_crd(self, crd: Obj) -> None:
        """Serve every served version of a CustomResourceDefinition."""
        spec, names = crd["spec"], crd["spec"]["names"]
        for version in spec["versions"]:
            if version.get("served", True):
                res = Resource(
                    spec["group"], version["name"], names["plural"], names["kind"],
                    namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                    status="status" in (version.get("subresources") or {}),
                    singular=names.get("singular", ""),
                    short_names=tuple(names.get("shortNames", ())),
                    categories=tuple(names.get("categories", ())),
                )  # fmt: skip
                self.register(res)

    def lookup(self, key: str) -> Resource:
        """Look up ``group/version/plural`` (core: ``v1/plural``)."""
        parts = key.strip("/").split("/")
        group, version, plural = parts if len(parts) == 3 else ["", *parts]
        try:
            return self._registry[group, version, plural]
        except KeyError:
            raise api_error(404, f"the server could not find the resource {key}") from None

    # ------------------------------------------------------------------------ state access
    def _current(self, res: Resource, ns: str | None, name: str) -> Obj | None:
        key = (res.ref, ns if res.namespaced else None, name)
        if key not in self._objects or self._objects[key].deleted:
            return None
        raw: Obj = self._objects[key].last.raw
        return raw

    def _resource_of(self, ref: kmock.resource | None) -> Resource | None:
        if ref is None:
            return None
        return self._registry.get((ref.group or "", ref.version or "", ref.plural or ""))

    def _store(self, res: Resource, obj: Obj | None, ns: str | None, name: str) -> None:
        key = (res.ref, ns, name)
        if key not in self._objects:
            self._objects[key] = obj or {}
            return
        history = self._objects[key].history
        history.append(obj)
        if len(history) > OBJECT_VERSIONS:
            del history[:-OBJECT_VERSIONS]

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _emit(self, res: Resource, event_type: str, obj: Obj) -> None:
        events = self._events.setdefault(res.key, collections.deque(maxlen=self.event_history))
        if len(events) == events.maxlen:
            self._evicted[res.key] = events[0][0]
        events.append((int(obj["metadata"]["resourceVersion"]), event_type, obj))
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _all_current(self) -> list[tuple[Resource, str | None, str, Obj]]:
        found = []
        for (ref, ns, name), obj in list(self._objects.items()):
            res = self._resource_of(ref)
            if res is not None and not obj.deleted:
                found.append((res, ns, name, obj.last.raw))
        return found

    # ------------------------------------------------------------------------ operations
    def do_get(self, res: Resource, ns: str | None, name: str) -> Obj:
        obj = self._current(res, ns, name)
        if obj is None:
            raise _not_found(res, name)
        return obj

    def do_list(
        self,
        res: Resource,
        ns: str | None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> Obj:
        labels = parse_selector(label_selector)
        fields = parse_selector(field_selector, labels=False)
        items = [
            obj
            for (ref, obj_ns, _), entry in self._objects.items()
            if ref == res.ref and (ns is None or obj_ns == ns) and not entry.deleted
            for obj in [entry.last.raw]
            if matches(obj, labels, fields)
        ]
        items.sort(key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        return {
            "apiVersion": res.api_version,
            "kind": f"{res.kind}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    def do_create(self, res: Resource, ns: str | None, body: Any) -> Obj:
        if not isinstance(body, dict):
            raise api_error(400, "the body of the request must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            meta = obj["metadata"] = {}
        if res.namespaced:
            if ns and meta.get("namespace", ns) != ns:
                raise api_error(400, "the namespace of the object does not match the request")
            ns = ns or meta.get("namespace")
            if not ns:
                raise api_error(400, f"{res.kind} is namespaced: a namespace is required")
            if (
                self.strict_namespaces
                and self._current(self.lookup("v1/namespaces"), None, ns) is None
            ):
                raise api_error(404, f'namespaces "{ns}" not found', name=ns, kind="namespaces")
            meta["namespace"] = ns
        else:
            ns = None
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            suffix = "".join(secrets.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
            meta["name"] = meta["generateName"] + suffix
        name = meta.get("name")
        if not name:
            raise api_error(422, "metadata.name or metadata.generateName is required")
        if self._current(res, ns, name) is not None:
            what = f"{res.plural}.{res.group}" if res.group else res.plural
            message = f'{what} "{name}" already exists'
            raise api_error(409, message, reason="AlreadyExists", name=name, kind=res.plural)
        for key in ("deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
            meta.pop(key, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        meta["resourceVersion"] = self._next_rv()
        obj.update(apiVersion=res.api_version, kind=res.kind)
        if res.status:
            obj.pop("status", None)
        if res.key == "v1/namespaces":
            obj["status"] = {"phase": "Active"}
        self._store(res, obj, ns, name)
        self._emit(res, "ADDED", obj)
        if res.key == CRDS:
            self.register_crd(obj)
        return obj

    def do_update(
        self,
        res: Resource,
        ns: str | None,
        name: str,
        desired: Callable[[Obj], Any],
        *,
        subresource: str | None = None,
        precondition: str | None = None,
    ) -> Obj:
        """Replace an object by ``desired(current copy)`` under API-server rules; no-op if same."""
        ns = ns if res.namespaced else None
        current = self.do_get(res, ns, name)
        old_meta = current["metadata"]
        if precondition is not None and str(precondition) != old_meta["resourceVersion"]:
            message = (
                f'Operation cannot be fulfilled on {res.plural} "{name}": the object has been'
                " modified; please apply your changes to the latest version and try again"
            )
            raise api_error(409, message, name=name, kind=res.plural)
        new = desired(copy.deepcopy(current))
        if not isinstance(new, dict) or not isinstance(new.get("metadata", {}), dict):
            raise api_error(422, "the object and its metadata must be JSON objects", name=name)
        if subresource == "status":  # only the status changes through /status
            new = {**copy.deepcopy(current), "status": new.get("status")}
        elif res.status:  # the main resource never changes the status
            new["status"] = copy.deepcopy(current.get("status"))
        if new.get("status") is None:
            new.pop("status", None)
        meta = new.setdefault("metadata", {})
        for key in SERVER_OWNED:
            if key in old_meta:
                meta[key] = old_meta[key]
            else:
                meta.pop(key, None)
        new.update(apiVersion=res.api_version, kind=res.kind)
        if new == current:
            return current  # a no-op: no new resourceVersion, no watch event
        spec = {k: v for k, v in new.items() if k not in NON_SPEC_KEYS}
        if spec != {k: v for k, v in current.items() if k not in NON_SPEC_KEYS}:
            meta["generation"] = old_meta.get("generation", 1) + 1
        meta["resourceVersion"] = self._next_rv()
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._remove(res, ns, name, new)  # the last finalizer is gone: DELETED only
            return new
        self._store(res, new, ns, name)
        self._emit(res, "MODIFIED", new)
        return new

    def do_delete(
        self, res: Resource, ns: str | None, name: str, options: Obj | None = None
    ) -> Obj:
        """Delete (or mark for deletion while finalizers remain); answers what the server would."""
        options, ns = options or {}, ns if res.namespaced else None
        current = self.do_get(res, ns, name)
        meta = current["metadata"]
        expected = options.get("preconditions") or {}
        for key in ("uid", "resourceVersion"):
            if expected.get(key) and expected[key] != meta.get(key):
                raise api_error(
                    409, f"Precondition failed: {key} does not match", name=name, kind=res.plural
                )
        if meta.get("deletionTimestamp"):
            return current
        if meta.get("finalizers"):
            new = copy.deepcopy(current)
            new["metadata"].update(
                deletionTimestamp=_now(),
                deletionGracePeriodSeconds=0,
                resourceVersion=self._next_rv(),
            )
            self._store(res, new, ns, name)
            self._emit(res, "MODIFIED", new)
            return new
        final = copy.deepcopy(current)
        final["metadata"]["resourceVersion"] = self._next_rv()
        self._remove(res, ns, name, final, orphan=options.get("propagationPolicy") == "Orphan")
        return status_body(200, name=name, group=res.group, kind=res.plural, uid=meta["uid"])

    def _remove(
        self, res: Resource, ns: str | None, name: str, final: Obj, *, orphan: bool = False
    ) -> None:
        """Really remove an object (``final`` carries its new RV), then collect its garbage."""
        self._store(res, final, ns, name)
        self._objects[res.ref, ns, name].delete()
        self._emit(res, "DELETED", final)
        if orphan:
            return
        uid = final["metadata"]["uid"]
        for dep_res, dep_ns, dep_name, dep in self._all_current():
            owners = dep["metadata"].get("ownerReferences") or []
            in_namespace = res.key == "v1/namespaces" and dep_ns == name
            owned = in_namespace or any(ref.get("uid") == uid for ref in owners)
            if owned and self._current(dep_res, dep_ns, dep_name) is not None:  # still there
                self.do_delete(dep_res, dep_ns, dep_name)

    # ------------------------------------------------------------------------ HTTP routing
    @property
    def counts(self) -> collections.Counter[tuple[str, str, str | None]]:
        with self._meta_lock:
            return collections.Counter(self._counts)

    @property
    def writes(self) -> int:
        with self._meta_lock:
            return self._writes

    def reset_counts(self) -> None:
        with self._meta_lock:
            self._counts.clear()
            self._writes = 0

    @property
    def rbac_requests(self) -> frozenset[RbacRequest]:
        with self._meta_lock:
            return frozenset(self._rbac)

    def fail_next(
        self, method: str, resource: str, subresource: str | None, status: int, count: int
    ) -> None:
        key = self.lookup(resource).key  # fails early on typos
        with self._meta_lock:
            self._failures.append([method.upper(), key, subresource, status, count])

    def stall_watches(self) -> None:
        """Every watch open now stops delivering (stays open); later watches are unaffected."""
        self._stall_epoch += 1
        self._wake()

    def begin_shutdown(self) -> None:
        self._stopping.set()
        self._wake()

    async def wait_watchers_gone(self, timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while self._watchers and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        _OUR_REQUEST.set(True)  # this task only: switches on the namespaces path fix
        return await super().__call__(raw_request)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # Count and maybe fail the request, then route it through kmock's reactions, skipping
        # KubernetesEmulator._handle (it changes state its own way before routing).
        ref = request.resource
        res = self._resource_of(ref)
        key = (
            request.method.value,
            res.key if res else request.url.path,
            request.subresource if res else None,
        )
        rbac = rbac_request(request)
        with self._meta_lock:
            self._rbac.add(rbac)
            self._counts[key] += 1
            self._writes += key[0] in WRITE_METHODS
            failure = next((f for f in self._failures if tuple(f[:3]) == key and f[4] > 0), None)
            if failure is not None:
                failure[4] -= 1
                self._failures = [f for f in self._failures if f[4] > 0]
        if len(self._requests) > 2 * REQUEST_RECORDS:  # kmock keeps every request otherwise
            del self._requests[:-REQUEST_RECORDS]
            for reaction in self._payloads:
                del reaction._requests[:-REQUEST_RECORDS]
        if failure is not None:
            raise api_error(
                failure[3],
                f"injected failure of {key}",
                name=request.name,
                kind=res.plural if res else None,
            )
        if res is not None and len(self._payloads) == self._builtin_payloads:
            route = self._fast_route(request)
            if route is not None:
                return await self._routes[route](request)  # type: ignore[no-any-return]
        return await super(kmock.KubernetesEmulator, self)._handle(request)

    @staticmethod
    def _fast_route(request: kmock.Request) -> str | None:
        """The reaction kmock's routing would pick for a resource request, or None if unsure."""
        method = request.method.value
        if method == "PUT":
            return "put"
        if method == "DELETE" and request.name is None:
            return "deletecollection"
        action = request.action
        names = {
            kmock.action.LIST: "list",
            kmock.action.WATCH: "watch",
            kmock.action.FETCH: "fetch",
            kmock.action.CREATE: "create",
            kmock.action.UPDATE: "update",
            kmock.action.DELETE: "delete",
        }
        return names.get(action) if action is not None else None

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        # kmock keeps every error for re-raising at exit; API errors are answers, not failures.
        if self._errors and self._errors[-1] and self._errors[-1][-1] is exc:
            self._errors[-1].pop()
        if not isinstance(exc, kmock.KubernetesError):
            self._unexpected.append(exc)
        return await super()._render_error(exc)

    async def _stream_error(self, exc: Exception, raw: aiohttp.web.StreamResponse) -> None:
        if self._errors and self._errors[-1] and self._errors[-1][-1] is exc:
            self._errors[-1].pop()
        self._unexpected.append(exc)
        await super()._stream_error(exc, raw)

    @property
    def unexpected_errors(self) -> list[Exception]:
        return list(self._unexpected)

    def _target(self, request: kmock.Request) -> tuple[Resource, str | None]:
        ref = request.resource
        res = self._resource_of(ref)
        if res is None:
            raise api_error(404, f"the server could not find the requested resource {ref}")
        if request.subresource is not None and (request.subresource != "status" or not res.status):
            raise api_error(
                404,
                f"{res.plural}/{request.subresource} is not served",
                name=request.name,
                kind=res.plural,
            )
        if not res.namespaced and request.namespace is not None:
            raise api_error(404, f"{res.plural} is cluster-scoped", kind=res.plural)
        return res, request.namespace

    @staticmethod
    def _body(request: kmock.Request) -> Any:
        try:
            return json.loads(request.body) if request.body.strip() else None
        except ValueError:
            raise api_error(400, "the request body is not valid JSON") from None

    async def _serve_list(self, request: kmock.Request) -> kmock.Payload:
        if _truthy(request.params.get("watch")):
            return await self._serve_watch(request)
        res, ns = self._target(request)
        return self.do_list(
            res, ns, request.params.get("labelSelector"), request.params.get("fieldSelector")
        )

    async def _serve_fetch(self, request: kmock.Request) -> kmock.Payload:
        if _truthy(request.params.get("watch")):
            return await self._serve_watch(request)
        res, ns = self._target(request)
        assert request.name is not None
        return self.do_get(res, ns, request.name)

    async def _serve_create(self, request: kmock.Request) -> kmock.Payload:
        res, ns = self._target(request)
        return self.do_create(res, ns, self._body(request))

    async def _serve_update(self, request: kmock.Request) -> kmock.Payload:
        res, ns = self._target(request)
        assert request.name is not None
        patch, sub = self._body(request), request.subresource
        headers = {key.lower(): value for key, value in request.headers.items()}
        content_type = headers.get("content-type", "").split(";")[0].strip()
        if content_type == "application/json-patch+json":
            if not isinstance(patch, list):
                raise api_error(400, "a JSON patch must be a list of operations")

            def desired(current: Obj) -> Any:
                try:
                    return jsonpatch.apply_patch(current, patch)
                except (jsonpatch.JsonPatchException, JsonPointerException) as exc:
                    raise api_error(
                        422, f"the JSON patch failed: {exc}", name=request.name, kind=res.plural
                    ) from None

            return self.do_update(res, ns, request.name, desired, subresource=sub)
        if content_type not in MERGE_PATCHES:
            raise api_error(415, f"unsupported patch type: {content_type!r}")
        if not isinstance(patch, dict):
            raise api_error(400, "a merge patch must be a JSON object")
        rv = (patch.get("metadata") or {}).get("resourceVersion")
        merged = functools.partial(merge_patch, patch=patch)
        return self.do_update(res, ns, request.name, merged, subresource=sub, precondition=rv)

    async def _serve_replace(self, request: kmock.Request) -> kmock.Payload:
        res, ns = self._target(request)
        body = self._body(request)
        if request.name is None or not isinstance(body, dict):
            raise api_error(405 if request.name is None else 400, "PUT needs a name and a body")
        rv, sub = (body.get("metadata") or {}).get("resourceVersion"), request.subresource
        return self.do_update(
            res, ns, request.name, lambda _: body, subresource=sub, precondition=rv
        )

    def _delete_options(self, request: kmock.Request) -> Obj:
        body = self._body(request)
        options = dict(body) if isinstance(body, dict) else {}
        if "propagationPolicy" in request.params:
            options["propagationPolicy"] = request.params["propagationPolicy"]
        return options

    async def _serve_delete(self, request: kmock.Request) -> kmock.Payload:
        res, ns = self._target(request)
        assert request.name is not None
        return self.do_delete(res, ns, request.name, self._delete_options(request))

    async def _serve_delete_collection(self, request: kmock.Request) -> kmock.Payload:
        res, ns = self._target(request)
        listed = self.do_list(
            res, ns, request.params.get("labelSelector"), request.params.get("fieldSelector")
        )
        options = self._delete_options(request)
        for obj in listed["items"]:
            if self._current(res, obj["metadata"].get("namespace"), obj["metadata"]["name"]):
                self.do_delete(
                    res, obj["metadata"].get("namespace"), obj["metadata"]["name"], options
                )
        return status_body(200)

    async def _serve_version(self, request: kmock.Request) -> kmock.Payload:
        doc = await super()._serve_version(request)
        if isinstance(doc, dict):  # kmock says "/v1" for the core group
            doc["groupVersion"] = doc["groupVersion"].lstrip("/")
        return doc

    async def _serve_openapi_v2(self, request: kmock.Request) -> kmock.Payload:
        return {"swagger": "2.0", "info": OPENAPI_INFO, "paths": {}, "definitions": {}}

    async def _serve_openapi_v3(self, request: kmock.Request) -> kmock.Payload:
        if request.url.path.rstrip("/") == "/openapi/v3":
            versions = {
                f"api/{r.version}" if not r.group else f"apis/{r.api_version}"
                for r in self._registry.values()
            }
            return {"paths": {v: {"serverRelativeURL": f"/openapi/v3/{v}"} for v in versions}}
        return {"openapi": "3.0.0", "info": OPENAPI_INFO, "paths": {}, "components": {}}

    # ------------------------------------------------------------------------ watching
    async def _serve_watch(self, request: kmock.Request) -> kmock.Payload:  # type: ignore[override]
        # Validate before streaming: errors here are plain HTTP errors, not in-stream ones.
        res, ns = self._target(request)
        params = request.params
        labels = parse_selector(params.get("labelSelector"))
        fields = parse_selector(params.get("fieldSelector"), labels=False)
        if request.name is not None:
            fields.append(("metadata.name", "=", frozenset({request.name})))
        since = params.get("resourceVersion") or "0"
        if not since.isdigit():
            raise api_error(400, f"invalid resourceVersion: {since!r}")
        try:
            timeout = float(params["timeoutSeconds"]) if "timeoutSeconds" in params else None
        except ValueError:
            raise api_error(400, "invalid timeoutSeconds") from None
        mark = _truthy(params.get("sendInitialEvents"))
        return self._watch(res, ns, (labels, fields), int(since), timeout=timeout, bookmark=mark)

    async def _watch(
        self,
        res: Resource,
        ns: str | None,
        selectors: tuple[list[Requirement], list[Requirement]],
        since: int,
        *,
        timeout: float | None,
        bookmark: bool,
    ) -> AsyncIterator[kmock.Payload]:
        labels, fields = selectors
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        epoch = self._stall_epoch
        self._watchers += 1
        try:
            yield b""  # send the headers now, as real servers do
            if since == 0:  # no resourceVersion: synthetic ADDED events for what exists now
                since = self._rv
                for obj in self.do_list(res, ns)["items"]:
                    if matches(obj, labels, fields):
                        yield {"type": "ADDED", "object": obj}
                if bookmark:  # the end of the initial events (kopf's initial_streaming)
                    ends = {"k8s.io/initial-events-end": "true"}
                    meta = {"resourceVersion": str(since), "annotations": ends}
                    obj = {"apiVersion": res.api_version, "kind": res.kind, "metadata": meta}
                    yield {"type": "BOOKMARK", "object": obj}
            elif since < self._evicted.get(res.key, 0):
                message = f"too old resource version: {since} ({self._rv})"
                yield {"type": "ERROR", "object": status_body(410, "Expired", message)}
                return
            while not self._stopping.is_set():
                if self._stall_epoch != epoch:  # stalled: silent, open, deaf to timeoutSeconds
                    await self._stopping.wait()
                    return
                changed = self._changed
                events = self._events_since(res.key, since)
                for rv, event_type, obj in events:
                    if self._stall_epoch != epoch or self._stopping.is_set():
                        break
                    since = rv
                    obj_ns = obj["metadata"].get("namespace")
                    if (ns is None or obj_ns == ns) and matches(obj, labels, fields):
                        yield {"type": event_type, "object": obj}
                if events:
                    continue
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    return
                try:
                    async with asyncio.timeout(left):
                        await changed.wait()
                except TimeoutError:
                    return
        finally:
            self._watchers -= 1

    def _events_since(self, key: str, rv: int) -> list[tuple[int, str, Obj]]:
        newer: list[tuple[int, str, Obj]] = []
        for event in reversed(self._events.get(key, ())):
            if event[0] <= rv:
                break
            newer.append(event)
        return newer[::-1]


# ------------------------------------------------------------------------------------ threads
class KubeApi:
    """The emulator served over HTTP from its own thread and event loop; a context manager.

    The synchronous methods are thread-safe and apply exactly the HTTP rules (and emit the same
    watch events); they raise ``kmock.KubernetesError`` (``.status``, ``.reason``) on API errors.
    They are not counted in ``request_counts()``.
    """

    def __init__(
        self,
        crd_dir: Path | None = CRD_DIR,
        *,
        strict_namespaces: bool = False,
        event_history: int = 10_000,
    ) -> None:
        self.emulator = KubeEmulator(
            strict_namespaces=strict_namespaces, event_history=event_history
        )
        for path in sorted(crd_dir.glob("*.yaml")) if crd_dir is not None else []:
            for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
                if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                    crds = self.emulator.lookup(CRDS)
                    self.emulator.do_create(crds, None, doc)  # registers it, too
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._stop_requested: asyncio.Event | None = None

    # ------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("KubeApi can be started only once")
        self._thread = threading.Thread(target=self._run, name="kube-api", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError("the fake Kubernetes API did not start within 30 s")
        if self._startup_error is not None:
            raise RuntimeError("the fake Kubernetes API failed to start") from self._startup_error

    def stop(self) -> None:
        loop, stop = self._loop, self._stop_requested
        if self._thread is None or loop is None or stop is None:
            return
        if not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout=30)

    def __enter__(self) -> KubeApi:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 -- reported to start()
            self._startup_error = exc
        finally:
            self._ready.set()
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            asyncio.set_event_loop(None)
            loop.close()

    async def _serve(self) -> None:
        self._stop_requested = asyncio.Event()
        async with self.emulator, _Server(self.emulator) as server:
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop_requested.wait()
            self.emulator.begin_shutdown()  # ends every watch stream, stalled ones included
            await self.emulator.wait_watchers_gone(timeout=5)

    def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop (atomically, between requests) and return its result."""
        loop = self._loop
        if loop is None or loop.is_closed() or not self._ready.is_set():
            raise RuntimeError("KubeApi is not running")
        if self._thread is threading.current_thread():
            return fn()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 -- re-raised in the calling thread
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return future.result(timeout=30)

    # ------------------------------------------------------------------------ in-process API
    def get(self, resource: str, namespace: str | None, name: str) -> Obj | None:
        def fn() -> Obj | None:
            obj = self.emulator._current(self.emulator.lookup(resource), namespace, name)
            return copy.deepcopy(obj)

        return self._call(fn)

    def list(
        self, resource: str, namespace: str | None = None, label_selector: str | None = None
    ) -> ObjList:
        def fn() -> ObjList:
            res = self.emulator.lookup(resource)
            items: ObjList = self.emulator.do_list(res, namespace, label_selector)["items"]
            return copy.deepcopy(items)

        return self._call(fn)

    def create(self, resource: str, obj: Obj, namespace: str | None = None) -> Obj:
        def fn() -> Obj:
            res = self.emulator.lookup(resource)
            return copy.deepcopy(self.emulator.do_create(res, namespace, obj))

        return self._call(fn)

    def patch(
        self,
        resource: str,
        namespace: str | None,
        name: str,
        patch: Obj,
        *,
        subresource: str | None = None,
    ) -> Obj:
        """JSON merge patch (``subresource="status"`` for the status subresource)."""

        def fn() -> Obj:
            res = self.emulator.lookup(resource)
            if subresource is not None and (subresource != "status" or not res.status):
                raise api_error(404, f"{res.plural}/{subresource} is not served", name=name)
            rv = (patch.get("metadata") or {}).get("resourceVersion")
            merged = functools.partial(merge_patch, patch=patch)
            obj = self.emulator.do_update(
                res, namespace, name, merged, subresource=subresource, precondition=rv
            )
            return copy.deepcopy(obj)

        return self._call(fn)

    def delete(self, resource: str, namespace: str | None, name: str) -> None:
        """Delete like ``DELETE`` does (finalizers, GC); raises a 404 error if absent."""
        self._call(lambda: self.emulator.do_delete(self.emulator.lookup(resource), namespace, name))

    # ------------------------------------------------------------------------ observability
    def request_counts(self) -> collections.Counter[tuple[str, str, str | None]]:
        """HTTP requests by ``(METHOD, "group/version/plural", subresource)`` since the last reset.

        Watches and lists count as ``GET``; requests answered with errors (injected ones too)
        count; requests outside resources (discovery, ``/version``) count as
        ``(METHOD, path, None)``.
        """
        return self.emulator.counts

    def reset_counts(self) -> None:
        self.emulator.reset_counts()

    def rbac_requests(self) -> frozenset[RbacRequest]:
        """Every distinct HTTP request since the start, as RBAC sees it (:class:`RbacRequest`).

        What a client needs RBAC for: ``{(r.api_group, r.resource, r.verb) for r in ...}``;
        the in-process methods (``get``, ``create``, ...) are not recorded.
        """
        return self.emulator.rbac_requests

    @property
    def writes(self) -> int:
        """HTTP POST/PUT/PATCH/DELETE requests since the last ``reset_counts()``."""
        return self.emulator.writes

    @property
    def unexpected_errors(self) -> ObjList:
        """Server-side crashes (bugs of this fake, not API errors), as ``{"error": repr}``."""
        return [{"error": repr(exc)} for exc in self.emulator.unexpected_errors]

    # ------------------------------------------------------------------------ fault injection
    def stall_watches(self) -> None:
        """Open watch streams stay open but deliver nothing more; new watches work normally."""
        self._call(self.emulator.stall_watches)

    def fail_next(
        self,
        method: str,
        resource: str,
        *,
        subresource: str | None = None,
        status: int = 409,
        count: int = 1,
    ) -> None:
        """The next ``count`` matching HTTP requests answer a ``Status`` error, changing nothing."""
        self.emulator.fail_next(method, resource, subresource, status, count)
