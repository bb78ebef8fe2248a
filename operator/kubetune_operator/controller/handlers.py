"""kopf wiring: watch caches (indexes), the triggers of each reconcile, and carrying plans out.

One reconcile per kind (:meth:`Controller.reconcile`) runs on every trigger: the resource's
create/update/resume, a periodic resync while the run is unfinished (or its TTL pending),
and any change of a child Job or Pod. Triggers of one resource are serialized by a lock, so
concurrent triggers cannot interleave their writes. Children are read from kopf indexes
(the operator's informer caches, filled before any handler runs, which is what makes a
restart safe: the existing Job is known before anything could create a second one).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import kopf

from kubetune_operator.api import GROUP, VERSION
from kubetune_operator.api.evaljob import EvalJob
from kubetune_operator.api.finetunejob import FineTuneJob
from kubetune_operator.controller import desired
from kubetune_operator.controller.conditions import find
from kubetune_operator.controller.config import ControllerSettings
from kubetune_operator.controller.kube import Kube, KubeError
from kubetune_operator.controller.metrics import Metrics
from kubetune_operator.controller.observe import (
    IMAGE_PULL_REASONS,
    JobView,
    PodView,
    job_view,
    pod_view,
)
from kubetune_operator.controller.reconcile import Desire, Observed, Plan, is_finished, plan_run
from kubetune_operator.controller.serving_handlers import (
    CHILD_RESOURCES,
    SERVING_LABELS,
    ServingReconciler,
)
from kubetune_operator.controller.tokens import new_key, progress_token
from kubetune_operator.manifests.common import labels as child_labels
from kubetune_operator.manifests.common import owner_reference
from kubetune_operator.validation import ManifestInvalid

log = logging.getLogger(__name__)
T = TypeVar("T")

MANAGED = {"app.kubernetes.io/managed-by": "kubetune-operator"}
KEY_LABELS = {
    "app.kubernetes.io/name": "kubetune",
    "app.kubernetes.io/component": "progress-key",
    **MANAGED,
}
RUN_KINDS = {"FineTuneJob": "finetunejobs", "EvalJob": "evaljobs"}
OWNER_LABELS = {
    f"{GROUP}/finetunejob": "FineTuneJob",
    f"{GROUP}/evaljob": "EvalJob",
    f"{GROUP}/adapterdeployment": "AdapterDeployment",
}
OWNER_KINDS = {**RUN_KINDS, "AdapterDeployment": "adapterdeployments"}


def snapshot(body: Any) -> dict[str, Any]:
    """A detached copy of a resource body with what reconciling needs (no managedFields)."""
    meta = body.get("metadata") or {}
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {
            k: copy.deepcopy(meta[k])
            for k in (
                "name",
                "namespace",
                "uid",
                "generation",
                "resourceVersion",
                "labels",
                "deletionTimestamp",
            )
            if k in meta
        },
        "spec": copy.deepcopy(dict(body.get("spec") or {})),
        "status": copy.deepcopy(dict(body.get("status") or {})),
    }


def controller_uid(body: Any, kind: str) -> str | None:
    """The uid of the controlling owner of ``kind``, from ownerReferences."""
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == kind:
            return str(ref.get("uid"))
    return None


def needs_resync(body: Any) -> bool:
    """Resync while the run is unfinished, or finished with a TTL still to apply."""
    status = dict(body.get("status") or {})
    spec = body.get("spec") or {}
    return not is_finished(status) or spec.get("ttlSecondsAfterFinished") is not None


@dataclass
class Caches:
    """The indexes a reconcile reads, as plain lookups (kopf passes them per handler call)."""

    owners: dict[str, Any]
    jobs: Any
    pods: Any
    serving_children: dict[str, Any] = field(default_factory=dict)
    serving_pods: Any = None

    def owner(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The cached body of a kubetune resource, or None."""
        index = self.owners.get(kind)
        if index is None:
            return None
        for body in index.get((namespace, name), []):
            return dict(body)
        return None

    def namespace_owners(self, kind: str, namespace: str) -> list[dict[str, Any]]:
        """The cached bodies of one kind in a namespace."""
        index = self.owners.get(kind) or {}
        return [
            dict(body)
            for (ns, _), store in list(index.items())
            if ns == namespace
            for body in list(store)
        ]

    def serving_children_of(self, namespace: str, uid: str) -> dict[str, dict[str, Any]]:
        """An AdapterDeployment's Deployment, ConfigMap and Service views, keyed by kind."""
        out: dict[str, dict[str, Any]] = {}
        for index in self.serving_children.values():
            for view in index.get((namespace, uid), []):
                out[str(view["kind"])] = dict(view)
        return out

    def serving_pods_of(self, namespace: str, name: str) -> list[dict[str, Any]]:
        """The pod views of an AdapterDeployment's serving pods."""
        if self.serving_pods is None:
            return []
        return [dict(v) for v in self.serving_pods.get((namespace, name), [])]

    def jobs_of(self, namespace: str, uid: str) -> tuple[JobView, ...]:
        """The Jobs controlled by the resource with ``uid``."""
        return tuple(self.jobs.get((namespace, uid), []))

    def pods_of(self, namespace: str, job_uid: str) -> tuple[PodView, ...]:
        """The Pods of the Job with ``job_uid``."""
        return tuple(self.pods.get((namespace, job_uid), []))


@dataclass
class Controller:
    """The operator: settings, API access, caches of what it wrote, and its kopf registry."""

    settings: ControllerSettings
    kube: Kube | None = None
    metrics: Metrics = field(default_factory=Metrics)
    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    parsed: dict[tuple[str, Any], Any] = field(default_factory=dict)
    executor: concurrent.futures.ThreadPoolExecutor | None = None
    caches: Caches | None = None
    pull_errors_since: dict[str, datetime] = field(default_factory=dict)
    forget_hooks: list[Callable[[str], None]] = field(default_factory=list)
    background: set[asyncio.Task[None]] = field(default_factory=set)
    resync_task: asyncio.Task[None] | None = None
    http_port: int | None = None
    progress_key: bytes | None = None
    serving: ServingReconciler | None = None
    serving_task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        if self.serving is None:
            self.serving = ServingReconciler(self)

    # ------------------------------------------------------------------ plumbing

    def api(self) -> Kube:
        """The API client (connected on first use)."""
        if self.kube is None:
            self.kube = Kube.connect(self.settings.server, self.settings.field_manager)
        return self.kube

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking API call in the operator's worker threads."""
        if self.executor is None:
            self.executor = concurrent.futures.ThreadPoolExecutor(
                self.settings.workers, thread_name_prefix="kubetune-api"
            )
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def load_progress_key(self) -> bytes:
        """The key progress tokens derive from (:mod:`tokens`), loaded once at start-up.

        With ``operator_namespace`` set (the chart does), it is the Secret
        ``progress_key_secret`` there, created on first start, so tokens survive restarts.
        Without it, a random key lives in memory only.
        """
        if self.progress_key is not None:
            return self.progress_key
        namespace = self.settings.operator_namespace
        if namespace:
            name = self.settings.progress_key_secret
            self.progress_key = await self.call(
                self.api().progress_key, namespace, name, KEY_LABELS
            )
            log.info("progress key: Secret %s/%s", namespace, name)
        else:
            self.progress_key = new_key()
            log.warning(
                "no operator namespace (KUBETUNE_OPERATOR_NAMESPACE): the progress key is kept "
                "in memory, so progress reports of jobs started before a restart of the "
                "operator will be rejected (their runs are unaffected)"
            )
        return self.progress_key

    def progress_token(self, namespace: str, name: str, uid: str) -> str:
        """The progress token of a resource (requires :meth:`load_progress_key` first)."""
        if self.progress_key is None:
            raise RuntimeError("the progress key is not loaded yet")
        return progress_token(self.progress_key, namespace, name, uid)

    def lock(self, uid: str) -> asyncio.Lock:
        """The lock serializing reconciles of one resource."""
        return self.locks.setdefault(uid, asyncio.Lock())

    def forget(self, uid: str) -> None:
        """Drop what is remembered of a deleted resource."""
        for hook in self.forget_hooks:
            hook(uid)
        self.statuses.pop(uid, None)
        self.locks.pop(uid, None)
        self.metrics.jobs.states.pop(uid, None)
        for key in [k for k in self.parsed if k[0] == uid]:
            del self.parsed[key]

    def close(self) -> None:
        """Stop worker threads and close connections."""
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None
        if self.kube is not None:
            self.kube.close()
            self.kube = None

    # ------------------------------------------------------------------ reconcile

    def _model(self, body: dict[str, Any]) -> FineTuneJob | EvalJob | ManifestInvalid:
        """Parsed once per (uid, generation): CEL evaluation is the costly part."""
        key = (body["metadata"]["uid"], body["metadata"].get("generation"))
        if key not in self.parsed:
            for stale in [k for k in self.parsed if k[0] == key[0]]:
                del self.parsed[stale]
            self.parsed[key] = desired.parse(body)
        model: FineTuneJob | EvalJob | ManifestInvalid = self.parsed[key]
        return model

    def _desire(self, body: dict[str, Any], caches: Caches) -> Desire:
        model = self._model(body)
        children = self.settings.children
        if isinstance(model, FineTuneJob) or (
            body["kind"] == "FineTuneJob" and isinstance(model, ManifestInvalid)
        ):
            return desired.finetune_desire(body, model, children)
        if isinstance(model, FineTuneJob):  # pragma: no cover - narrowed above
            raise TypeError(body["kind"])
        return desired.eval_desire(
            body, model, children, lambda ns, name: self._owner(caches, ns, name)
        )

    def _owner(self, caches: Caches, namespace: str, name: str) -> dict[str, Any] | None:
        """A FineTuneJob from the cache, with the status this operator last wrote (fresher)."""
        body = caches.owner("FineTuneJob", namespace, name)
        if body is not None and (mine := self.statuses.get(body["metadata"]["uid"])) is not None:
            body = {**body, "status": mine}
        return body

    def _plan(
        self,
        body: dict[str, Any],
        desire: Desire,
        caches: Caches,
        *,
        confirmed: JobView | None,
        missing: bool,
        listed_pods: tuple[PodView, ...] | None = None,
    ) -> Plan:
        meta = body["metadata"]
        namespace, uid = meta["namespace"], meta["uid"]
        jobs = caches.jobs_of(namespace, uid)
        if confirmed is not None and all(j.name != confirmed.name for j in jobs):
            jobs = (*jobs, confirmed)
        run_job = next((j for j in jobs if j.name == desire.job_name), None)
        pods = caches.pods_of(namespace, run_job.uid) if run_job else ()
        if listed_pods is not None:
            pods = listed_pods
        return plan_run(
            body["kind"],
            generation=meta.get("generation"),
            old_status=self.statuses.get(uid) or dict(body.get("status") or {}),
            desire=desire,
            observed=Observed(
                jobs=jobs, pods=pods, job_missing=missing, pods_confirmed=listed_pods is not None
            ),
            now=datetime.now(UTC),
            image_pull_grace_seconds=self.settings.image_pull_grace_seconds,
        )

    async def reconcile(self, body: dict[str, Any], caches: Caches, trigger: str) -> None:
        """The reconcile of one resource (idempotent; writes only on change)."""
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return
        if body["kind"] == "AdapterDeployment":
            assert self.serving is not None  # noqa: S101 - set in __post_init__
            await self.serving.reconcile(body, caches, trigger)
            return
        await self.serialized(
            body["kind"], meta["uid"], trigger, lambda: self._reconcile_run(body, caches)
        )

    async def serialized(
        self, kind: str, uid: str, trigger: str, work: Callable[[], Awaitable[None]]
    ) -> None:
        """Run one reconcile of a resource under its lock, with the reconcile metrics.

        Queue time (waiting for the lock), duration, and one count per outcome (ok/error)
        labelled with the kind and the trigger.
        """
        queued = time.monotonic()
        async with self.lock(uid):
            started = time.monotonic()
            self.metrics.queue.labels(kind).observe(started - queued)
            try:
                await work()
            except Exception:
                self.metrics.reconciles.labels(kind, trigger, "error").inc()
                raise
            finally:
                self.metrics.duration.labels(kind).observe(time.monotonic() - started)
            self.metrics.reconciles.labels(kind, trigger, "ok").inc()

    async def _reconcile_run(self, body: dict[str, Any], caches: Caches) -> None:
        """Plan a FineTuneJob's or EvalJob's run (confirming what the caches cannot show)."""
        meta = body["metadata"]
        desire = self._desire(body, caches)
        plan = self._plan(body, desire, caches, confirmed=None, missing=False)
        if plan.confirm_missing:
            found = await self.call(self.api().get_job, meta["namespace"], plan.confirm_missing)
            confirmed = job_view(found) if found else None
            plan = self._plan(body, desire, caches, confirmed=confirmed, missing=found is None)
        if plan.confirm_pods:
            listed = await self.call(self.api().list_pods, meta["namespace"], plan.confirm_pods)
            views = tuple(pod_view(p) for p in listed)
            plan = self._plan(
                body, desire, caches, confirmed=None, missing=False, listed_pods=views
            )
        await self._execute(body, desire, plan)

    async def _execute(self, body: dict[str, Any], desire: Desire, plan: Plan) -> None:
        if plan.empty:
            return
        kube = self.api()
        meta = body["metadata"]
        kind, namespace, name, uid = body["kind"], meta["namespace"], meta["name"], meta["uid"]
        writes = self.metrics.writes
        if plan.progress_secret:
            await self.call(
                kube.ensure_progress_secret,
                namespace,
                plan.progress_secret,
                self.progress_token(namespace, name, uid),
                child_labels(kind, name, "progress"),
                owner_reference(kind, name, uid),
            )
            writes.labels("create").inc()
        for obj in plan.create:
            await self.call(kube.create, obj)
            writes.labels("create").inc()
        # The status goes first: a verdict or a forgotten jobName must be recorded before the
        # Job it concerns is deleted, or a crash in between would read as JobMissing.
        if plan.status is not None:
            await self.write_status(body, plan.status)
        for job_name in plan.delete_jobs:
            await self.call(kube.delete_run, namespace, job_name)
            writes.labels("delete").inc()
        if plan.suspend_job is not None:
            await self.call(kube.set_job_suspend, namespace, desire.job_name, plan.suspend_job)
            writes.labels("patch").inc()
        if plan.cleanup:
            # The progress Secret stays: it goes with the resource (owner reference).
            deleted = await self.call(kube.cleanup, namespace, kind, name, uid)
            writes.labels("delete").inc(deleted)
            log.info("%s %s/%s finished: TTL deleted %d children", kind, namespace, name, deleted)
        for event in plan.events:
            await self.call(kube.post_event, body, event, self.settings.field_manager)
            writes.labels("event").inc()

    async def write_status(self, body: dict[str, Any], status: dict[str, Any]) -> None:
        """Merge-patch the whole status (keys no longer present are removed) and remember it."""
        meta = body["metadata"]
        uid = meta["uid"]
        old = self.statuses.get(uid) or dict(body.get("status") or {})
        patch: dict[str, Any] = {k: None for k in old if k not in status}
        patch.update(status)
        try:
            stored = await self.call(
                self.api().patch_status, body["kind"], meta["namespace"], meta["name"], patch
            )
        except KubeError as exc:
            if exc.status == 404:  # deleted meanwhile: nothing to report on
                self.forget(uid)
                return
            raise
        self.metrics.writes.labels("patch").inc()
        self.statuses[uid] = dict(stored.get("status") or status)
        if body["kind"] not in RUN_KINDS:
            return
        summary = find(self.statuses[uid].get("conditions"), "Succeeded")
        self.metrics.jobs.states[uid] = (body["kind"], summary["status"] if summary else "Unknown")
        if is_finished(self.statuses[uid]) and not is_finished(old):
            if body["kind"] == "FineTuneJob":
                self._wake_dependents(meta["namespace"], meta["name"])
            if self.caches is not None and self.serving is not None:
                # AdapterDeployments may serve this job's adapter, or wait for this evaluation.
                self.serving.wake(self.caches, meta["namespace"])

    def _wake_dependents(self, namespace: str, name: str) -> None:
        """Reconcile EvalJobs waiting on this FineTuneJob now rather than at the next resync."""
        caches = self.caches
        if caches is None:
            return
        for store in list(caches.owners["EvalJob"].values()):
            for evaljob in list(store):
                ref = ((evaljob.get("spec") or {}).get("target") or {}).get("fineTuneJobRef")
                same = evaljob["metadata"].get("namespace") == namespace
                if (
                    same
                    and ref
                    and ref.get("name") == name
                    and not is_finished(evaljob.get("status"))
                ):
                    task = asyncio.create_task(self._reconcile_logged(dict(evaljob), caches))
                    self.background.add(task)
                    task.add_done_callback(self.background.discard)

    async def _reconcile_logged(self, body: dict[str, Any], caches: Caches) -> None:
        try:
            await self.reconcile(body, caches, "dependency")
        except Exception:  # the resync retries
            log.exception(
                "reconcile of %s %s/%s failed",
                body["kind"],
                body["metadata"].get("namespace"),
                body["metadata"]["name"],
            )

    # ------------------------------------------------------------------ registration

    async def resync_forever(self) -> None:
        """Reconcile every unfinished run (or one with a TTL pending) each resync period.

        Like controller-runtime's SyncPeriod: it catches what no event announces (a pull
        that never succeeds, a deadline, a TTL coming due) and retries failed reconciles. A
        settled run's reconcile reads only caches and writes nothing.
        """
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            caches = self.caches
            if caches is None:
                continue
            for kind in RUN_KINDS:
                for (_, _), store in list(caches.owners[kind].items()):
                    for body in list(store):
                        if not needs_resync(body):
                            continue
                        try:
                            await self.reconcile(dict(body), caches, "resync")
                        except Exception:  # logged; the next period retries
                            log.exception(
                                "resync of %s %s/%s failed",
                                kind,
                                body["metadata"].get("namespace"),
                                body["metadata"].get("name"),
                            )

    def register(self, registry: kopf.OperatorRegistry) -> None:
        """Register every handler on ``registry`` (kopf's default one for ``kopf run``).

        Triggers are kopf *event* handlers (level-based: every ADDED/MODIFIED event of the
        resource, including the initial listing after a restart, runs the same reconcile),
        not kopf's change-detection handlers: those would store progress and the last
        handled spec in annotations (a write per change) and kopf's timers add a finalizer
        to every object. With events, kopf writes nothing to our resources and deleting one
        is never blocked by the operator being down.
        """

        def owner_index(body: kopf.Body, namespace: str | None, name: str | None, **_: Any) -> Any:
            return {(namespace, name): snapshot(body)}

        for plural in OWNER_KINDS.values():
            kopf.index(GROUP, VERSION, plural, id=f"{plural}_index", registry=registry)(owner_index)
        assert self.serving is not None  # noqa: S101 - set in __post_init__
        self.serving.register(registry)

        @kopf.index("batch", "v1", "jobs", labels=MANAGED, id="jobs_index", registry=registry)
        def jobs_index(body: kopf.Body, namespace: str | None, **_: Any) -> Any:
            for owner_kind in RUN_KINDS:
                uid = controller_uid(body, owner_kind)
                if uid is not None:
                    return {(namespace, uid): job_view(dict(body))}
            return None

        @kopf.index("v1", "pods", labels=MANAGED, id="pods_index", registry=registry)
        def pods_index(body: kopf.Body, namespace: str | None, **_: Any) -> Any:
            uid = controller_uid(body, "Job")
            if not uid:
                return None
            view = pod_view(dict(body))
            pod_uid = str(body.get("metadata", {}).get("uid"))
            if view.waiting_reason in IMAGE_PULL_REASONS:
                # A pull error's age counts from when it was first seen, not from the pod's
                # start: a slow (but working) multi-GB pull must not eat the grace period.
                # After an operator restart it counts again from then (later, never sooner).
                since = self.pull_errors_since.setdefault(pod_uid, datetime.now(UTC))
                view = replace(view, waiting_since=since)
            else:
                self.pull_errors_since.pop(pod_uid, None)
            return {(namespace, uid): view}

        def caches(kwargs: dict[str, Any]) -> Caches:
            found = Caches(
                owners={kind: kwargs[f"{plural}_index"] for kind, plural in OWNER_KINDS.items()},
                jobs=kwargs["jobs_index"],
                pods=kwargs["pods_index"],
                serving_children={
                    plural: kwargs[f"serving_{plural}_index"] for _, _, plural in CHILD_RESOURCES
                },
                serving_pods=kwargs["serving_pods_index"],
            )
            self.caches = found
            return found

        async def owner_changed(body: kopf.Body, type: str | None, **kwargs: Any) -> None:
            if type == "DELETED":
                self.forget(str(body.get("metadata", {}).get("uid")))
                return
            trigger = {None: "resume", "ADDED": "create"}.get(type, "update")
            await self.reconcile(snapshot(body), caches(kwargs), trigger)

        for plural in OWNER_KINDS.values():
            kopf.on.event(GROUP, VERSION, plural, id=f"{plural}-changed", registry=registry)(
                owner_changed
            )

        async def child_changed(body: kopf.Body, type: str | None, **kwargs: Any) -> None:
            if type == "DELETED":
                self.pull_errors_since.pop(str(body.get("metadata", {}).get("uid")), None)
            labels = body.get("metadata", {}).get("labels") or {}
            namespace = body.get("metadata", {}).get("namespace")
            for label, kind in OWNER_LABELS.items():
                owner_name = labels.get(label)
                if not owner_name or not namespace:
                    continue
                c = caches(kwargs)
                owner = c.owner(kind, namespace, owner_name)
                if owner is None or owner["metadata"].get("deletionTimestamp"):
                    return
                await self.reconcile(owner, c, "child")
                return

        kopf.on.event("batch", "v1", "jobs", labels=MANAGED, id="jobs-changed", registry=registry)(
            child_changed
        )
        kopf.on.event("v1", "pods", labels=MANAGED, id="pods-changed", registry=registry)(
            child_changed
        )
        for group, version, plural in CHILD_RESOURCES:
            resource = (group, version, plural) if group else (version, plural)
            kopf.on.event(
                *resource, labels=SERVING_LABELS, id=f"serving-{plural}-changed", registry=registry
            )(child_changed)

        self._register_lifecycle(registry, caches)

    def _register_lifecycle(
        self, registry: kopf.OperatorRegistry, caches: Callable[[dict[str, Any]], Caches]
    ) -> None:
        """Start-up (progress key, resync loops) and clean-up handlers."""

        @kopf.on.startup(registry=registry)
        async def load_progress_key(**_: Any) -> None:
            # Before any watch starts: every reconcile may create a job's token Secret.
            await self.load_progress_key()

        @kopf.on.startup(registry=registry)
        async def start_resync(**kwargs: Any) -> None:
            caches(kwargs)  # the indexes exist (empty) already; kopf fills them in place
            self.resync_task = asyncio.create_task(self.resync_forever(), name="kubetune-resync")
            if self.serving is not None:
                self.serving_task = asyncio.create_task(
                    self.serving.resync_forever(), name="kubetune-serving-resync"
                )

        @kopf.on.cleanup(registry=registry)
        async def closing(**_: Any) -> None:
            for task in (self.resync_task, self.serving_task):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if self.serving is not None:
                await self.serving.close()
            self.close()
