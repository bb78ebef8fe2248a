"""AdapterDeployment reconcile, the pure part: resolve adapters, plan children, compute status.

One reconcile reads (from caches) the resource, its FineTuneJobs and EvalJobs, its
ConfigMap/Service/Deployment and its pods, plus each pod's agent ``/status``, and produces:

1. :func:`resolve_adapters`: what each listed adapter is (URI and digest; from its
   FineTuneJob's published artifact) and whether it may be served (the promotion rule:
   ``spec.promotion.requirePassedEval`` serves a digest only once an EvalJob in the namespace
   passed for it; a newer digest waiting for its evaluation does not take an already served,
   promoted one out of service);
2. :func:`plan_children`: which children to create and which to replace, by comparing the
   rendered objects' :data:`~kubetune_operator.manifests.adapterdeployment.DESIRED_HASH`
   with what the caches show (the ConfigMap by its data, so a hand edit is reverted);
3. :func:`serving_status`: ``status.adapters[]`` aggregated over the pods that serve
   (Ready pods: the Service routes to them, whatever template they run) and the conditions
   ``Ready``, ``Progressing`` and ``Degraded`` with reasons and messages.

Nothing here does I/O; ``handlers`` carries the results out. Status timestamps change only
on transitions, so a settled AdapterDeployment's reconcile writes nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Final

from kubetune_operator.api.adapterdeployment import AdapterDeployment
from kubetune_operator.controller.conditions import Desired, find, merge
from kubetune_operator.controller.observe import format_time
from kubetune_operator.controller.reconcile import EventSpec
from kubetune_operator.manifests import adapterdeployment as manifests
from kubetune_operator.manifests.adapterdeployment import Capacity, ServedAdapter

Lookup = Callable[[str, str], dict[str, Any] | None]

PHASE_ORDER: Final = {"Pending": 0, "Downloading": 1, "Loading": 2, "Loaded": 3}
FAILING_WAIT_REASONS: Final = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)
MAX_LISTED: Final = 5


# ------------------------------------------------------------------------------ resolution


@dataclass(frozen=True)
class Resolved:
    """One listed adapter after resolution.

    Attributes:
        name: adapter name (the ``model`` of requests).
        pinned: gates readiness.
        uri, digest: what to serve (None when not known yet).
        blocked: not servable now; ``message`` says why.
        message: why it is blocked, or which older digest is served meanwhile.
        rank: LoRA rank r where the FineTuneJob tells it (capacity derivation).
    """

    name: str
    pinned: bool
    uri: str | None = None
    digest: str | None = None
    blocked: bool = False
    message: str | None = None
    rank: int | None = None

    def served(self) -> ServedAdapter | None:
        """The agent's entry, when servable."""
        if self.blocked or self.uri is None or self.digest is None:
            return None
        return ServedAdapter(self.name, self.uri, self.digest, self.pinned)


def _short(digest: str) -> str:
    return digest[: len("sha256:") + 12]


def passed_digests(evaljobs: Sequence[Mapping[str, Any]]) -> set[str]:
    """Digests some EvalJob passed for (``Passed=True`` with ``status.adapterDigest``)."""
    out: set[str] = set()
    for ej in evaljobs:
        status = ej.get("status") or {}
        passed = find(status.get("conditions"), "Passed")
        if passed and passed.get("status") == "True" and status.get("adapterDigest"):
            out.add(str(status["adapterDigest"]))
    return out


def _eval_note(digest: str, evaljobs: Sequence[Mapping[str, Any]]) -> str:
    """What the EvalJobs of one digest say (for a Blocked message)."""
    notes = []
    for ej in evaljobs:
        status = ej.get("status") or {}
        if status.get("adapterDigest") != digest:
            continue
        name = (ej.get("metadata") or {}).get("name")
        passed = find(status.get("conditions"), "Passed")
        if passed and passed.get("status") == "False":
            notes.append(f"EvalJob {name} did not pass ({passed.get('reason')})")
        else:
            notes.append(f"EvalJob {name} has not finished")
    return "; ".join(notes[:MAX_LISTED]) or "no EvalJob has evaluated it"


def resolve_adapters(
    model: AdapterDeployment,
    lookup: Lookup,
    evaljobs: Sequence[Mapping[str, Any]],
    old_status: Mapping[str, Any] | None,
) -> list[Resolved]:
    """Resolve every ``spec.adapters`` entry to a URI and digest and apply the promotion rule.

    Args:
        model: the validated resource.
        lookup: (namespace, name) -> a FineTuneJob body (with the freshest status) or None.
        evaljobs: the EvalJobs of the resource's namespace.
        old_status: the current status (a promoted digest stays served while a newer one
            waits for its evaluation).

    Returns:
        One :class:`Resolved` per listed adapter, in spec order.
    """
    namespace = model.metadata.namespace or "default"
    require_eval = bool(model.spec.promotion and model.spec.promotion.require_passed_eval)
    promoted = passed_digests(evaljobs) if require_eval else set()
    old = {a.get("name"): a for a in (old_status or {}).get("adapters") or []}
    out: list[Resolved] = []
    for spec in model.spec.adapters or []:
        name, pinned = spec.name, spec.pinned
        rank: int | None = None
        if spec.source.uri is not None and spec.source.digest is not None:
            uri, digest = spec.source.uri, spec.source.digest
        else:
            ref = spec.source.fine_tune_job_ref.name if spec.source.fine_tune_job_ref else "?"
            ftj = lookup(namespace, ref)
            # The rank is known from the spec before the job finishes: capacity derived now
            # must fit the adapter it will publish.
            lora = (((ftj or {}).get("spec") or {}).get("lora") or {}).get("r")
            rank = int(lora) if isinstance(lora, int) else None
            blocked = _ftj_block(namespace, ref, ftj)
            if blocked is not None:
                # A rerun (new runId) clears the job's artifact while it trains: what was
                # served keeps serving meanwhile.
                kept = _kept(old.get(name), require_eval, promoted)
                out.append(
                    _meanwhile(kept, name, pinned, blocked, rank)
                    if kept is not None
                    else Resolved(name, pinned, blocked=True, message=blocked, rank=rank)
                )
                continue
            assert ftj is not None  # noqa: S101 - _ftj_block returned None
            artifact = (ftj.get("status") or {}).get("artifact") or {}
            uri, digest = str(artifact["uri"]), str(artifact["digest"])
        if uri.startswith("pvc://"):
            message = (
                f"{uri}: adapters on a PersistentVolumeClaim cannot be served (serving pods "
                "mount no claim for adapters); publish the adapter to s3://"
            )
            out.append(Resolved(name, pinned, uri, digest, blocked=True, message=message))
            continue
        if require_eval and digest not in promoted:
            waiting = (
                f"{_short(digest)} awaits a passed EvalJob (spec.promotion.requirePassedEval): "
                f"{_eval_note(digest, evaljobs)}"
            )
            kept = _kept(old.get(name), require_eval, promoted)
            out.append(
                _meanwhile(kept, name, pinned, waiting, rank)
                if kept is not None
                else Resolved(name, pinned, uri, digest, blocked=True, message=waiting, rank=rank)
            )
            continue
        out.append(Resolved(name, pinned, uri, digest, rank=rank))
    return out


def _kept(
    before: Mapping[str, Any] | None, require_eval: bool, promoted: set[str]
) -> Resolved | None:
    """What was served before, if it may keep serving while its successor is not servable.

    Served means any phase but Blocked (a digest that was only ever waiting was never
    served), whatever the phase at this moment (a new pod still loading it, a slow agent
    read); with the promotion rule it must still be promoted.
    """
    if not before or before.get("phase") == "Blocked":
        return None
    uri, digest = before.get("uri"), before.get("digest")
    if not uri or not digest or (require_eval and digest not in promoted):
        return None
    return Resolved(str(before.get("name")), True, uri=str(uri), digest=str(digest))


def _meanwhile(kept: Resolved, name: str, pinned: bool, why: str, rank: int | None) -> Resolved:
    """The served digest kept for ``name``, saying why its successor is not served yet."""
    return replace(
        kept,
        name=name,
        pinned=pinned,
        message=f"serving {_short(str(kept.digest))} meanwhile; {why}",
        rank=rank,
    )


def _ftj_block(namespace: str, ref: str, ftj: Mapping[str, Any] | None) -> str | None:
    """Why a FineTuneJob's adapter cannot be served yet, or None when it can."""
    if ftj is None:
        return f"FineTuneJob {namespace}/{ref} does not exist (yet)"
    status = ftj.get("status") or {}
    summary = find(status.get("conditions"), "Succeeded")
    if summary is not None and summary.get("status") == "False":
        return f"FineTuneJob {namespace}/{ref} failed ({summary.get('reason')}): no adapter"
    artifact = status.get("artifact") or {}
    if summary is None or summary.get("status") != "True" or not artifact.get("uri"):
        return f"waiting for FineTuneJob {namespace}/{ref} to succeed"
    if not artifact.get("digest"):
        return f"FineTuneJob {namespace}/{ref} published no digest; it cannot be verified"
    return None


def known_ranks(resolved: Sequence[Resolved]) -> dict[str, int]:
    """Adapter name -> rank, where the FineTuneJob says it."""
    return {r.name: r.rank for r in resolved if r.rank is not None}


def choose_capacity(
    model: AdapterDeployment,
    resolved: Sequence[Resolved],
    live_annotations: Mapping[str, str] | None,
) -> Capacity:
    """The capacity to render: kept from the live Deployment, or derived anew.

    The live Deployment's capacity is kept while the engine settings are unchanged, so the
    adapter list never restarts pods; otherwise it is derived from the spec.
    """
    if live_annotations is not None and live_annotations.get(
        manifests.ENGINE_HASH
    ) == manifests.engine_hash(model):
        kept = Capacity.from_annotation(live_annotations.get(manifests.CAPACITY))
        if kept is not None:
            return kept
    return manifests.derive_capacity(model, known_ranks(resolved))


# ------------------------------------------------------------------------------ children


@dataclass(frozen=True)
class ChildView:
    """A child object as the caches show it: name and the hash to compare."""

    kind: str
    name: str
    hash: str | None
    replicas: int | None = None


def content_hash(obj: Mapping[str, Any]) -> str | None:
    """The hash :func:`plan_children` compares: a ConfigMap's data, else the annotation."""
    if obj.get("kind") == "ConfigMap":
        data = obj.get("data") or {}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    value = annotations.get(manifests.DESIRED_HASH)
    return str(value) if value is not None else None


@dataclass(frozen=True)
class ChildPlan:
    """Children to create (absent) and to replace (rendering changed), in apply order."""

    create: tuple[dict[str, Any], ...] = ()
    replace: tuple[dict[str, Any], ...] = ()


def plan_children(
    desired: Sequence[dict[str, Any]], observed: Mapping[str, ChildView]
) -> ChildPlan:
    """Compare rendered children with the cached ones (keyed by kind).

    A Deployment is also replaced when its ``spec.replicas`` was changed by hand (the
    AdapterDeployment owns it; ``kubectl scale`` on the child is reverted).
    """
    create: list[dict[str, Any]] = []
    replace: list[dict[str, Any]] = []
    for obj in desired:
        live = observed.get(obj["kind"])
        if live is None or live.name != obj["metadata"]["name"]:
            create.append(obj)
            continue
        drifted = obj["kind"] == "Deployment" and live.replicas != obj["spec"]["replicas"]
        if live.hash != content_hash(obj) or drifted:
            replace.append(obj)
    return ChildPlan(tuple(create), tuple(replace))


# ------------------------------------------------------------------------------ status


@dataclass(frozen=True)
class ServingPod:
    """One serving pod and what its agent reported.

    Attributes:
        name: pod name.
        ready: the pod's Ready condition (the Service routes to it).
        current: runs the current pod template (its :data:`TEMPLATE_HASH` matches).
        waiting: reasons of containers waiting (e.g. CrashLoopBackOff), sorted.
        agent: the agent's ``/status`` document, or None.
        agent_error: why it could not be read (None when read or not attempted).
    """

    name: str
    ready: bool
    current: bool
    waiting: tuple[str, ...] = ()
    agent: Mapping[str, Any] | None = None
    agent_error: str | None = None

    def entry(self, adapter: str) -> Mapping[str, Any] | None:
        """The agent's entry for an adapter, or None."""
        for item in (self.agent or {}).get("adapters") or []:
            if item.get("name") == adapter:
                return dict(item)
        return None


@dataclass(frozen=True)
class DeploymentView:
    """The serving Deployment as cached (None fields: not reported yet)."""

    generation: int | None = None
    observed_generation: int | None = None
    replicas: int = 0
    updated_replicas: int = 0
    ready_replicas: int = 0
    deadline_exceeded: bool = False


@dataclass(frozen=True)
class ServingStatus:
    """The new status and the Events its transitions call for."""

    status: dict[str, Any]
    events: tuple[EventSpec, ...] = field(default_factory=tuple)


def _adapter_status(
    r: Resolved,
    pods: Sequence[ServingPod],
    config_digest: str | None,
    old: Mapping[str, Any] | None,
    now: datetime,
) -> dict[str, Any]:
    ready = [p for p in pods if p.ready]
    reporting = [p for p in pods if p.agent is not None]
    out: dict[str, Any] = {"name": r.name}
    if r.uri:
        out["uri"] = r.uri
    if r.digest:
        out["digest"] = r.digest
    message = r.message
    last_error: str | None = None
    load_seconds: float | None = None
    if r.blocked:
        phase, count = "Blocked", 0
    else:
        entries = [(p, p.entry(r.name)) for p in reporting]
        same = [(p, e) for p, e in entries if e is not None and e.get("digest") == r.digest]
        failed = [(p, e) for p, e in same if e.get("phase") == "Failed"]
        loaded = [p for p, e in same if p.ready and e.get("phase") == "Loaded"]
        count = len(loaded)
        seconds = [float(e["loadSeconds"]) for p, e in same if e.get("loadSeconds") is not None]
        load_seconds = max(seconds) if seconds else None
        if failed:
            phase = "Failed"
            pod, entry = failed[0]
            last_error = f"{pod.name}: {entry.get('lastError') or 'failed'}"
        elif ready and count == len(ready):
            phase = "Loaded"
        else:
            progress = [str(e.get("phase")) for _, e in same if e.get("phase") in PHASE_ORDER]
            progress = [p for p in progress if p != "Loaded"] or ["Pending"]
            phase = max(progress, key=lambda p: PHASE_ORDER[p])
            if message is None:
                message = _pending_reason(r, ready, reporting, config_digest)
    out["phase"] = phase
    out["readyReplicas"] = count
    if message:
        out["message"] = message[:1024]
    if last_error:
        out["lastError"] = last_error[:1024]
    if load_seconds is not None:
        out["loadSeconds"] = round(load_seconds, 3)
    kept = old.get("lastTransitionTime") if old and old.get("phase") == phase else None
    out["lastTransitionTime"] = kept or format_time(now)
    return out


def _pending_reason(
    r: Resolved,
    ready: Sequence[ServingPod],
    reporting: Sequence[ServingPod],
    config_digest: str | None,
) -> str:
    if not ready:
        return "no ready serving pod yet"
    stale = [p.name for p in ready if (p.agent or {}).get("configDigest") != config_digest]
    if stale:
        return (
            "waiting for the kubelet to refresh the mounted configuration on "
            f"{', '.join(stale[:MAX_LISTED])}"
        )
    missing = [p.name for p in ready if p not in reporting]
    if missing:
        return f"agent status unavailable on {', '.join(missing[:MAX_LISTED])}"
    not_loaded = [
        p.name
        for p in ready
        if (e := p.entry(r.name)) is None
        or e.get("digest") != r.digest
        or e.get("phase") != "Loaded"
    ]
    return f"not loaded yet on {', '.join(not_loaded[:MAX_LISTED])}"


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def serving_status(
    model: AdapterDeployment,
    resolved: Sequence[Resolved],
    pods: Sequence[ServingPod],
    deployment: DeploymentView | None,
    *,
    config_digest: str | None,
    old_status: Mapping[str, Any] | None,
    generation: int | None,
    now: datetime,
) -> ServingStatus:
    """The AdapterDeployment's status from its adapters, pods and their agents.

    Per adapter (``status.adapters[]``): ``Blocked`` (promotion or FineTuneJob), ``Failed``
    when any pod's agent gave up on this digest (``lastError`` names the pod and carries the
    engine's or the agent's message), ``Loaded`` when every Ready pod serves this digest,
    else the furthest phase reached (``Pending``/``Downloading``/``Loading``) and a message.

    Conditions:

    * ``Ready``: True when at least one pod is Ready and every pinned adapter is ``Loaded``
      (on every Ready pod: any of them may get a request). Reasons ``AllPinnedAdaptersLoaded``,
      ``ScaledToZero``, ``NoReadyReplicas``, ``PinnedAdaptersBlocked``,
      ``PinnedAdaptersNotLoaded``.
    * ``Progressing``: True while the Deployment rolls out (``RollingOut``), fewer pods are
      Ready than ``spec.replicas`` (``WaitingForPods``: starting, or failing, which Degraded
      says) or adapters are being loaded (``LoadingAdapters``); else False ``Complete``.
    * ``Degraded``: True with ``AdaptersFailed`` (names each failed adapter and why: the
      others keep serving), ``RolloutStuck`` (progress deadline exceeded), ``PodsFailing``
      (containers in CrashLoopBackOff, image pull errors...) or ``AgentUnreachable``; else
      False ``AsExpected``.

    Args:
        model: the validated resource.
        resolved: :func:`resolve_adapters`' result.
        pods: the serving pods that are not terminating.
        deployment: the Deployment as cached, or None before it exists.
        config_digest: sha256 of the config.json just rendered (the agents report theirs).
        old_status: the current status (transition times are kept when nothing changed).
        generation: ``metadata.generation`` (``observedGeneration``).
        now: the reconcile's clock.

    Returns:
        The complete status and the Events of its transitions.
    """
    old_status = old_status or {}
    old_adapters = {a.get("name"): a for a in old_status.get("adapters") or []}
    adapters = [
        _adapter_status(r, pods, config_digest, old_adapters.get(r.name), now) for r in resolved
    ]
    by_name = {a["name"]: a for a in adapters}
    ready_pods = [p for p in pods if p.ready]
    replicas = model.spec.replicas
    pinned = [r for r in resolved if r.pinned]
    blocked = [r.name for r in pinned if r.blocked]
    not_loaded = [
        f"{r.name} ({by_name[r.name]['phase']})"
        for r in pinned
        if not r.blocked and by_name[r.name]["phase"] != "Loaded"
    ]
    if replicas == 0:
        ready = Desired("Ready", "False", "ScaledToZero", "spec.replicas is 0: nothing serves")
    elif not ready_pods:
        ready = Desired(
            "Ready",
            "False",
            "NoReadyReplicas",
            f"0/{replicas} serving pods are ready{_pod_summary(pods)}",
        )
    elif blocked:
        ready = Desired(
            "Ready",
            "False",
            "PinnedAdaptersBlocked",
            "; ".join(f"{n}: {by_name[n].get('message')}" for n in blocked[:MAX_LISTED]),
        )
    elif not_loaded:
        ready = Desired(
            "Ready",
            "False",
            "PinnedAdaptersNotLoaded",
            f"pinned adapters not loaded on every ready pod: {_names(not_loaded)}",
        )
    else:
        ready = Desired(
            "Ready",
            "True",
            "AllPinnedAdaptersLoaded",
            f"{len(pinned)} pinned adapter(s) loaded on {len(ready_pods)}/{replicas} ready pod(s)",
        )

    rolling = deployment is None or (
        (deployment.observed_generation or 0) < (deployment.generation or 0)
        or deployment.updated_replicas < replicas
        or deployment.replicas > replicas
        or any(not p.current for p in pods)
    )
    loading = [a["name"] for a in adapters if a["phase"] in ("Pending", "Downloading", "Loading")]
    if rolling and replicas > 0:
        progressing = Desired(
            "Progressing",
            "True",
            "RollingOut",
            f"{deployment.updated_replicas if deployment else 0}/{replicas} pods run the "
            "current engine settings",
        )
    elif 0 < len(ready_pods) < replicas or (replicas > 0 and not ready_pods):
        progressing = Desired(
            "Progressing",
            "True",
            "WaitingForPods",
            f"{len(ready_pods)}/{replicas} serving pods are ready{_pod_summary(pods)}",
        )
    elif loading and ready_pods:
        progressing = Desired(
            "Progressing", "True", "LoadingAdapters", f"loading {_names(loading)}"
        )
    else:
        progressing = Desired("Progressing", "False", "Complete", "nothing is changing")

    failed = [a for a in adapters if a["phase"] == "Failed"]
    failing_pods = [f"{p.name} ({', '.join(p.waiting)})" for p in pods if p.waiting]
    unreachable = [f"{p.name} ({p.agent_error})" for p in ready_pods if p.agent_error]
    if failed:
        degraded = Desired(
            "Degraded",
            "True",
            "AdaptersFailed",
            "; ".join(f"{a['name']}: {a.get('lastError')}" for a in failed[:MAX_LISTED])
            + (f"; and {len(failed) - MAX_LISTED} more" if len(failed) > MAX_LISTED else ""),
        )
    elif deployment is not None and deployment.deadline_exceeded:
        degraded = Desired(
            "Degraded",
            "True",
            "RolloutStuck",
            "the serving Deployment exceeded its progress deadline" + _pod_summary(pods),
        )
    elif failing_pods:
        degraded = Desired("Degraded", "True", "PodsFailing", _names(failing_pods))
    elif unreachable:
        degraded = Desired(
            "Degraded", "True", "AgentUnreachable", f"agent status: {_names(unreachable)}"
        )
    else:
        degraded = Desired("Degraded", "False", "AsExpected", "no adapter or pod is failing")

    conditions = merge(
        old_status.get("conditions"),
        [ready, progressing, degraded],
        generation=generation,
        now=now,
    )
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": conditions,
        "endpoint": manifests.endpoint(model),
        "replicas": len(pods),
        "readyReplicas": len(ready_pods),
        "adapters": adapters,
        "loadedAdapters": sum(1 for a in adapters if a["phase"] == "Loaded"),
    }
    if generation is None:
        del status["observedGeneration"]
    return ServingStatus(status, tuple(_events(old_status, status, old_adapters)))


def _pod_summary(pods: Sequence[ServingPod]) -> str:
    waiting = [f"{p.name} ({', '.join(p.waiting)})" for p in pods if p.waiting]
    return f"; waiting: {_names(waiting)}" if waiting else ""


def _events(
    old: Mapping[str, Any], new: Mapping[str, Any], old_adapters: Mapping[str, Any]
) -> list[EventSpec]:
    events: list[EventSpec] = []
    was_ready = (find(old.get("conditions"), "Ready") or {}).get("status") == "True"
    now_ready = find(new["conditions"], "Ready") or {}
    if now_ready.get("status") == "True" and not was_ready:
        events.append(EventSpec("Normal", "Ready", str(now_ready.get("message"))))
    elif was_ready and now_ready.get("status") != "True":
        events.append(EventSpec("Warning", "NotReady", str(now_ready.get("message"))))
    for adapter in new["adapters"]:
        before = (old_adapters.get(adapter["name"]) or {}).get("phase")
        phase = adapter["phase"]
        if phase == before:
            continue
        if phase == "Failed":
            events.append(
                EventSpec(
                    "Warning", "AdapterFailed", f"{adapter['name']}: {adapter.get('lastError')}"
                )
            )
        elif phase == "Loaded":
            events.append(
                EventSpec(
                    "Normal",
                    "AdapterLoaded",
                    f"{adapter['name']} ({_short(str(adapter.get('digest')))}) serves on "
                    f"{adapter['readyReplicas']} pod(s)",
                )
            )
    return events


def invalid_status(
    message: str,
    old_status: Mapping[str, Any] | None,
    generation: int | None,
    now: datetime,
) -> dict[str, Any]:
    """The status of a spec the API models reject (the CRD's schema let it through)."""
    old_status = old_status or {}
    conditions = merge(
        old_status.get("conditions"),
        [
            Desired("Ready", "False", "InvalidSpec", message),
            Desired("Progressing", "False", "InvalidSpec", "fix the spec"),
            Desired("Degraded", "True", "InvalidSpec", message),
        ],
        generation=generation,
        now=now,
    )
    status = {**dict(old_status), "conditions": conditions}
    if generation is not None:
        status["observedGeneration"] = generation
    return status
