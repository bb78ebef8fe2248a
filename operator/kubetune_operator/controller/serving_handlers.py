"""kopf wiring of AdapterDeployments: caches of their children and pods, and the reconcile.

The reconcile (:func:`reconcile_serving`) runs on every event of the resource, of its
Deployment, ConfigMap, Service and pods, when a FineTuneJob or EvalJob it depends on
finishes, and every ``serving_resync_seconds`` (agents' state changes raise no Kubernetes
event). It reads only caches plus the agents' ``/status``, and writes only what changed:
children whose rendering changed (the ConfigMap in place when adapters change; the
Deployment only when engine settings change) and the status. It never writes ``spec``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import aiohttp
import kopf

from kubetune_operator.api import GROUP
from kubetune_operator.api.adapterdeployment import AdapterDeployment
from kubetune_operator.controller import serving
from kubetune_operator.controller.agents import AgentReading, AgentTarget, read_agents
from kubetune_operator.controller.desired import _manifest
from kubetune_operator.controller.serving import ChildView, DeploymentView, ServingPod
from kubetune_operator.manifests import adapterdeployment as manifests
from kubetune_operator.validation import ManifestInvalid, parse_manifest

if TYPE_CHECKING:
    from kubetune_operator.controller.handlers import Caches, Controller

log = logging.getLogger(__name__)

KIND: Final = "AdapterDeployment"
SERVING_LABELS: Final = {
    "app.kubernetes.io/managed-by": "kubetune-operator",
    "app.kubernetes.io/component": manifests.COMPONENT,
}
CHILD_RESOURCES: Final = (
    ("apps", "v1", "deployments"),
    ("", "v1", "configmaps"),
    ("", "v1", "services"),
)
UNREACHABLE_AFTER: Final = 3  # failed reads in a row before an agent counts as unreachable
# Container waiting reasons that are normal on the way up, not failures.
STARTING: Final = frozenset({"ContainerCreating", "PodInitializing"})


def parse(body: dict[str, Any]) -> AdapterDeployment | ManifestInvalid:
    """The typed resource, or the validation error (types only; CEL ran at admission)."""
    try:
        model = parse_manifest(_manifest(body), check_rules=False)
    except ManifestInvalid as exc:
        return exc
    if not isinstance(model, AdapterDeployment):
        raise TypeError(f"not an AdapterDeployment: {type(model).__name__}")
    return model


def child_view(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the caches keep of a Deployment, ConfigMap or Service (no data, no spec)."""
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    kind = str(body.get("kind") or "")
    annotations = meta.get("annotations") or {}
    view: dict[str, Any] = {
        "kind": kind,
        "name": meta.get("name"),
        "hash": serving.content_hash(body),
    }
    if kind == "Deployment":
        conditions = status.get("conditions") or []
        view.update(
            replicas=(body.get("spec") or {}).get("replicas"),
            annotations={
                k: v
                for k, v in annotations.items()
                if k in (manifests.CAPACITY, manifests.ENGINE_HASH)
            },
            generation=meta.get("generation"),
            observedGeneration=status.get("observedGeneration"),
            statusReplicas=status.get("replicas") or 0,
            updatedReplicas=status.get("updatedReplicas") or 0,
            readyReplicas=status.get("readyReplicas") or 0,
            deadlineExceeded=any(
                c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded"
                for c in conditions
            ),
        )
    return view


def pod_view(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the caches keep of a serving pod."""
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    spec = body.get("spec") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    waiting = sorted(
        {
            str(reason)
            for cs in [
                *(status.get("initContainerStatuses") or []),
                *(status.get("containerStatuses") or []),
            ]
            if (reason := ((cs.get("state") or {}).get("waiting") or {}).get("reason"))
            and reason not in STARTING
        }
    )
    port = manifests.AGENT_STATUS_PORT
    for container in spec.get("containers") or []:
        for p in container.get("ports") or []:
            if p.get("name") == "agent-status":
                port = int(p.get("containerPort") or port)
    return {
        "name": meta.get("name"),
        "uid": meta.get("uid"),
        "ip": status.get("podIP"),
        "ready": ready,
        "templateHash": (meta.get("annotations") or {}).get(manifests.TEMPLATE_HASH),
        "waiting": tuple(waiting),
        "deleting": bool(meta.get("deletionTimestamp")),
        "agentPort": port,
    }


def _deployment_view(view: Mapping[str, Any] | None) -> DeploymentView | None:
    if view is None:
        return None
    return DeploymentView(
        generation=view.get("generation"),
        observed_generation=view.get("observedGeneration"),
        replicas=int(view.get("statusReplicas") or 0),
        updated_replicas=int(view.get("updatedReplicas") or 0),
        ready_replicas=int(view.get("readyReplicas") or 0),
        deadline_exceeded=bool(view.get("deadlineExceeded")),
    )


class ServingReconciler:
    """The AdapterDeployment half of the operator (uses the Controller's plumbing)."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.session: aiohttp.ClientSession | None = None
        self.parsed: dict[str, tuple[Any, AdapterDeployment | ManifestInvalid]] = {}
        # Per AdapterDeployment uid: pod name -> (last good reading, failed reads since).
        self.agent_memory: dict[str, dict[str, tuple[AgentReading | None, int]]] = {}
        controller.forget_hooks.append(self.forget)

    def forget(self, uid: str) -> None:
        """Drop what is remembered of a deleted AdapterDeployment."""
        self.parsed.pop(uid, None)
        self.agent_memory.pop(uid, None)

    def model(self, body: dict[str, Any]) -> AdapterDeployment | ManifestInvalid:
        """Parsed once per (uid, generation)."""
        uid = body["metadata"]["uid"]
        generation = body["metadata"].get("generation")
        cached = self.parsed.get(uid)
        if cached is None or cached[0] != generation:
            cached = (generation, parse(body))
            self.parsed[uid] = cached
        return cached[1]

    async def close(self) -> None:
        """Close the HTTP session used for the agents."""
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def reconcile(self, body: dict[str, Any], caches: Caches, trigger: str) -> None:
        """One idempotent reconcile of an AdapterDeployment (serialized per resource)."""
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return
        await self.controller.serialized(
            KIND, meta["uid"], trigger, lambda: self._reconcile(body, caches)
        )

    async def _reconcile(self, body: dict[str, Any], caches: Caches) -> None:
        ctl = self.controller
        meta = body["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        generation = meta.get("generation")
        old = ctl.statuses.get(uid) or dict(body.get("status") or {})
        now = datetime.now(UTC)
        model = self.model(body)
        if isinstance(model, ManifestInvalid):
            status = serving.invalid_status(str(model), old, generation, now)
            if status != old:
                await ctl.write_status(body, status)
            return
        resolved = serving.resolve_adapters(
            model,
            lambda ns, n: ctl._owner(caches, ns, n),
            caches.namespace_owners("EvalJob", namespace),
            old,
        )
        children = caches.serving_children_of(namespace, uid)
        live = children.get("Deployment")
        capacity = serving.choose_capacity(
            model, resolved, live.get("annotations") if live else None
        )
        served = [s for r in resolved if (s := r.served()) is not None]
        objects = manifests.build(model, ctl.settings.children, served, capacity)
        plan = serving.plan_children(
            objects,
            {
                kind: ChildView(kind, str(v["name"]), v.get("hash"), v.get("replicas"))
                for kind, v in children.items()
            },
        )
        kube = ctl.api()
        if plan.create and not await self._still_exists(body):
            return
        for obj in plan.create:
            await ctl.call(kube.create, obj)
            ctl.metrics.writes.labels("create").inc()
        for obj in plan.replace:
            await ctl.call(kube.replace, obj)
            ctl.metrics.writes.labels("update").inc()
            log.info("%s %s/%s: updated %s", KIND, namespace, name, obj["kind"])

        config_map, _, workload = objects
        template_hash = workload["spec"]["template"]["metadata"]["annotations"][
            manifests.TEMPLATE_HASH
        ]
        views = [p for p in caches.serving_pods_of(namespace, name) if not p["deleting"]]
        readings = self._smooth(uid, await self._read_agents(views))
        pods = [
            ServingPod(
                name=str(p["name"]),
                ready=bool(p["ready"]),
                current=p["templateHash"] == template_hash,
                waiting=tuple(p["waiting"]),
                agent=readings[p["name"]].status if p["name"] in readings else None,
                agent_error=readings[p["name"]].error if p["name"] in readings else None,
            )
            for p in sorted(views, key=lambda v: str(v["name"]))
        ]
        result = serving.serving_status(
            model,
            resolved,
            pods,
            _deployment_view(live),
            config_digest=manifests.config_digest(config_map["data"][manifests.SERVING_CONFIG_KEY]),
            old_status=old,
            generation=generation,
            now=now,
        )
        if result.status != old:
            await ctl.write_status(body, result.status)
        for event in result.events:
            await ctl.call(kube.post_event, body, event, ctl.settings.field_manager)
            ctl.metrics.writes.labels("event").inc()

    async def _still_exists(self, body: dict[str, Any]) -> bool:
        """Whether the resource still exists (a direct GET, not the cache).

        A missing child is recreated only after this check: when an AdapterDeployment is
        deleted, the garbage collector's deletions of its children may reach the operator
        before the resource's own deletion does, and the cached resource would have them
        recreated (owned by a uid that no longer exists).
        """
        meta = body["metadata"]
        live = await self.controller.call(
            self.controller.api().get_resource, KIND, meta["namespace"], meta["name"]
        )
        live_meta = (live or {}).get("metadata") or {}
        if (
            live is None
            or live_meta.get("uid") != meta["uid"]
            or live_meta.get("deletionTimestamp")
        ):
            log.info(
                "%s %s/%s is gone or going: not recreating its children",
                KIND,
                meta["namespace"],
                meta["name"],
            )
            return False
        return True

    def _smooth(self, uid: str, readings: dict[str, AgentReading]) -> dict[str, AgentReading]:
        """Ride out an isolated failed read of an agent with its previous answer.

        One slow answer (a busy engine) must not flip Ready or Degraded: a pod's agent counts
        as unreachable after :data:`UNREACHABLE_AFTER` failed reads in a row; until then its
        last good status stands in.
        """
        memory = self.agent_memory.setdefault(uid, {})
        for pod in [p for p in memory if p not in readings]:
            del memory[pod]  # the pod is gone
        out: dict[str, AgentReading] = {}
        for pod, reading in readings.items():
            last, failures = memory.get(pod, (None, 0))
            if reading.status is not None:
                memory[pod] = (reading, 0)
                out[pod] = reading
                continue
            failures += 1
            memory[pod] = (last, failures)
            out[pod] = last if last is not None and failures < UNREACHABLE_AFTER else reading
        return out

    async def _read_agents(self, views: list[dict[str, Any]]) -> dict[str, AgentReading]:
        targets = [
            AgentTarget(str(v["name"]), str(v["ip"]), int(v["agentPort"]))
            for v in views
            if v.get("ip")
        ]
        if not targets:
            return {}
        if self.session is None:
            self.session = aiohttp.ClientSession()
        return await read_agents(
            self.session, targets, timeout=self.controller.settings.agent_timeout_seconds
        )

    # -------------------------------------------------------------------------- wiring

    def wake(self, caches: Caches, namespace: str) -> None:
        """Reconcile the namespace's AdapterDeployments now.

        Called when a FineTuneJob or EvalJob they may depend on finished.
        """
        for body in caches.namespace_owners(KIND, namespace):
            task = asyncio.create_task(self._reconcile_logged(dict(body), caches, "dependency"))
            self.controller.background.add(task)
            task.add_done_callback(self.controller.background.discard)

    async def _reconcile_logged(self, body: dict[str, Any], caches: Caches, trigger: str) -> None:
        try:
            await self.reconcile(body, caches, trigger)
        except Exception:  # the resync retries
            log.exception(
                "reconcile of %s %s/%s failed",
                KIND,
                body["metadata"].get("namespace"),
                body["metadata"].get("name"),
            )

    async def resync_forever(self) -> None:
        """Reconcile every AdapterDeployment each ``serving_resync_seconds``."""
        while True:
            await asyncio.sleep(self.controller.settings.serving_resync_seconds)
            caches = self.controller.caches
            if caches is None:
                continue
            for store in list(caches.owners[KIND].values()):
                for body in list(store):
                    await self._reconcile_logged(dict(body), caches, "resync")

    def register(self, registry: kopf.OperatorRegistry) -> None:
        """Register the indexes of serving children and pods.

        The owner index and the event handlers are registered with the other kinds in
        ``handlers``.
        """

        def children_index(body: kopf.Body, namespace: str | None, **_: Any) -> Any:
            for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
                if ref.get("controller") and ref.get("kind") == KIND:
                    return {(namespace, str(ref.get("uid"))): child_view(dict(body))}
            return None

        for group, version, plural in CHILD_RESOURCES:
            resource = (group, version, plural) if group else (version, plural)
            kopf.index(
                *resource, labels=SERVING_LABELS, id=f"serving_{plural}_index", registry=registry
            )(children_index)

        @kopf.index("v1", "pods", labels=SERVING_LABELS, id="serving_pods_index", registry=registry)
        def serving_pods_index(body: kopf.Body, namespace: str | None, **_: Any) -> Any:
            owner = ((body.get("metadata") or {}).get("labels") or {}).get(
                f"{GROUP}/{KIND.lower()}"
            )
            if not owner:
                return None
            return {(namespace, owner): pod_view(dict(body))}
