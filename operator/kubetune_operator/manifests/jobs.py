"""FineTuneJob / EvalJob -> ConfigMap (RunConfig) + batch/v1 Job (+ headless Service).

The pod contract (what `kubetune-runtime` relies on):

* command ``kubetune-runtime <task> --config /etc/kubetune/run.json --workdir /workspace``;
* ``/workspace``: scratch (emptyDir) for downloads and local checkpoints; ``HOME`` and caches
  point there because the root filesystem is read-only;
* credentials as environment variables from Secrets (``AWS_*`` for S3, and one
  ``KUBETUNE_SECRET_<hash>`` per other Secret key the spec references), never in the ConfigMap;
* multi-node: an Indexed Job; ``MASTER_ADDR`` is index 0's stable DNS name through a headless
  Service, the node rank is ``JOB_COMPLETION_INDEX`` (set by Kubernetes);
* exit code 3 means a permanent failure (invalid data or config): ``podFailurePolicy`` fails
  the Job at once instead of retrying; pods disrupted by preemption or eviction are retried
  without counting against ``backoffLimit``.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from kubetune_operator.api import GROUP
from kubetune_operator.api.common import ResourcesSpec, SchedulingSpec, SecretKeyRef, StorageSpec
from kubetune_operator.api.evaljob import EvalJob
from kubetune_operator.api.finetunejob import FineTuneJob
from kubetune_operator.manifests.common import (
    OperatorSettings,
    child_name,
    labels,
    owner_reference,
    restricted_container_security,
    restricted_pod_security,
)
from kubetune_operator.render import CA_BUNDLE_PATH, secret_env_name
from kubetune_runtime.config import RunConfig

CONFIG_DIR = "/etc/kubetune"
CONFIG_FILE = f"{CONFIG_DIR}/run.json"
WORKDIR = "/workspace"
CONTAINER = "runtime"
PROGRESS_DIR = f"{CONFIG_DIR}/progress"
PROGRESS_TOKEN_FILE = f"{PROGRESS_DIR}/token"
EXIT_CONFIG = 2
EXIT_PERMANENT = 3
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def _secret_refs(spec: Any) -> list[SecretKeyRef]:
    """Every SecretKeyRef anywhere in the spec (tokens, API keys), in a stable order."""
    found: dict[tuple[str, str], SecretKeyRef] = {}

    def walk(value: Any) -> None:
        if isinstance(value, SecretKeyRef):
            found[(value.name, value.key)] = value
        elif isinstance(value, BaseModel):
            for field in type(value).model_fields:
                walk(getattr(value, field))
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item)

    walk(spec)
    return [found[k] for k in sorted(found)]


def env_for(spec: Any, storage: StorageSpec | None, extra: Any = None) -> list[dict[str, Any]]:
    """Environment of a kubetune container (workdir, caches, S3 keys, referenced Secrets).

    Every Secret key the spec references becomes one variable set with
    ``valueFrom.secretKeyRef``: values never appear in the spec.
    """
    env: list[dict[str, Any]] = [
        {"name": "KUBETUNE_WORKDIR", "value": WORKDIR},
        {"name": "HOME", "value": WORKDIR},
        {"name": "XDG_CACHE_HOME", "value": f"{WORKDIR}/.cache"},
        {"name": "HF_HOME", "value": f"{WORKDIR}/.cache/huggingface"},
        {"name": "TORCH_EXTENSIONS_DIR", "value": f"{WORKDIR}/.cache/torch_extensions"},
        {"name": "TRITON_CACHE_DIR", "value": f"{WORKDIR}/.cache/triton"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    credentials = storage.credentials if storage else None
    if credentials is not None and credentials.secret_ref is not None:
        ref = credentials.secret_ref
        keys = [
            ("AWS_ACCESS_KEY_ID", ref.access_key_id_key),
            ("AWS_SECRET_ACCESS_KEY", ref.secret_access_key_key),
        ]
        if ref.session_token_key:
            keys.append(("AWS_SESSION_TOKEN", ref.session_token_key))
        env += [
            {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": key}}}
            for name, key in keys
        ]
    if storage is not None and storage.ca_bundle is not None:
        env.append({"name": "AWS_CA_BUNDLE", "value": CA_BUNDLE_PATH})
    env += [
        {
            "name": secret_env_name(ref),
            "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
        }
        for ref in _secret_refs([spec, extra])
        if storage is None or ref != storage.ca_bundle
    ]
    return env


def resources_for(resources: ResourcesSpec | None) -> dict[str, Any]:
    """Container resources: requests, and limits equal to requests for memory and GPUs."""
    if resources is None:
        return {}
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if resources.cpu:
        requests["cpu"] = resources.cpu  # no CPU limit: throttling a training loop helps nobody
    if resources.memory:
        requests["memory"] = limits["memory"] = resources.memory
    if resources.ephemeral_storage:
        requests["ephemeral-storage"] = limits["ephemeral-storage"] = resources.ephemeral_storage
    if resources.gpu and resources.gpu.count:
        limits[resources.gpu.resource_name] = str(resources.gpu.count)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _volumes(
    config_map: str, resources: ResourcesSpec | None, storage: StorageSpec | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_map}},
        {"name": "workspace", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "workspace", "mountPath": WORKDIR},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - a private emptyDir, not shared /tmp
    ]
    gpus = resources.gpu.count if resources and resources.gpu else 0
    shm = resources.shared_memory if resources else None
    if shm or gpus:
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": shm or "1Gi"}})
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})  # noqa: S108 - a private emptyDir
    if storage is not None and storage.ca_bundle is not None:
        volumes.append(
            {
                "name": "ca",
                "secret": {
                    "secretName": storage.ca_bundle.name,
                    "items": [{"key": storage.ca_bundle.key, "path": "ca.crt"}],
                },
            }
        )
        mounts.append(
            {"name": "ca", "mountPath": CA_BUNDLE_PATH.rsplit("/", 1)[0], "readOnly": True}
        )
    return volumes, mounts


def scheduling_for(
    scheduling: SchedulingSpec | None, resources: ResourcesSpec | None
) -> dict[str, Any]:
    """Pod fields for node selection (GPU product), tolerations and priority."""
    pod: dict[str, Any] = {}
    selector = dict(scheduling.node_selector or {}) if scheduling else {}
    if resources and resources.gpu and resources.gpu.product:
        selector["nvidia.com/gpu.product"] = resources.gpu.product
    if selector:
        pod["nodeSelector"] = selector
    if scheduling and scheduling.tolerations:
        pod["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in scheduling.tolerations
        ]
    if scheduling and scheduling.priority_class_name:
        pod["priorityClassName"] = scheduling.priority_class_name
    return pod


def build_run_objects(
    job: FineTuneJob | EvalJob,
    run_config: RunConfig,
    settings: OperatorSettings,
    *,
    nodes: int = 1,
    resolved: Any = None,
    progress_secret: str | None = None,
) -> list[dict[str, Any]]:
    """The objects that run one FineTuneJob or EvalJob, in apply order.

    Args:
        job: the validated resource (metadata.uid is used for owner references).
        run_config: its rendered RunConfig (``kubetune_operator.render``).
        settings: operator-wide images and defaults.
        nodes: pods of the run; more than one gives an Indexed Job and a headless Service.
        resolved: objects resolved outside the spec whose Secret references the pod needs
            too (an EvalJob's base model taken from its FineTuneJob).
        progress_secret: Secret holding the per-run progress token (key ``token``), mounted
            at ``/etc/kubetune/progress/token`` where the RunConfig expects it.

    Returns:
        ``[ConfigMap, (Service,) Job]`` as plain dicts ready for server-side apply.
    """
    kind = job.kind
    name = job.metadata.name
    namespace = job.metadata.namespace or "default"
    spec = job.spec
    task = "train" if isinstance(job, FineTuneJob) else "evaluate"
    component = "training" if task == "train" else "evaluation"
    # Pods of an Indexed Job are named <job>-<index>: leave room for the index in 63 chars.
    run_name = child_name(
        name,
        task if not spec.run_id else f"{task}-{spec.run_id}",
        max_length=63 - len(f"-{nodes - 1}") if nodes > 1 else 63,
    )
    owner = [owner_reference(kind, name, job.metadata.uid)]
    meta_labels = labels(kind, name, component)
    # Service names are DNS-1035 labels: they must start with a letter.
    service = child_name(name if name[0].isalpha() else f"w{name}", "workers")

    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": run_name,
            "namespace": namespace,
            "labels": meta_labels,
            "ownerReferences": owner,
        },
        "data": {"run.json": run_config.model_dump_json(indent=2)},
    }
    volumes, mounts = _volumes(run_name, spec.resources, spec.storage)
    if progress_secret is not None:
        volumes.append(
            {"name": "progress", "secret": {"secretName": progress_secret, "defaultMode": 0o400}}
        )
        mounts.append({"name": "progress", "mountPath": PROGRESS_DIR, "readOnly": True})
    env = env_for(spec, spec.storage, resolved)
    if nodes > 1:
        env += [
            {"name": "MASTER_ADDR", "value": f"{run_name}-0.{service}.{namespace}.svc"},
            {"name": "MASTER_PORT", "value": str(settings.master_port)},
        ]
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image or settings.runtime_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["kubetune-runtime"],
        "args": [task, "--config", CONFIG_FILE, "--workdir", WORKDIR],
        "env": env,
        "volumeMounts": mounts,
        "securityContext": restricted_container_security(),
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    resources = resources_for(spec.resources)
    if resources:
        container["resources"] = resources
    if nodes > 1:
        container["ports"] = [{"name": "rendezvous", "containerPort": settings.master_port}]
    credentials = spec.storage.credentials if spec.storage else None
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": volumes,
        "securityContext": restricted_pod_security(),
        "terminationGracePeriodSeconds": settings.termination_grace_period_seconds,
        "enableServiceLinks": False,
        **scheduling_for(spec.scheduling, spec.resources),
    }
    if credentials is not None and credentials.service_account_name:
        pod_spec["serviceAccountName"] = credentials.service_account_name
    else:
        pod_spec["automountServiceAccountToken"] = False  # the runtime never calls the API
    if nodes > 1:
        pod_spec["subdomain"] = service
    queue = spec.scheduling.queue_name if spec.scheduling else None
    job_labels = {**meta_labels, **({QUEUE_LABEL: queue} if queue else {})}
    batch_job: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": run_name,
            "namespace": namespace,
            "labels": job_labels,
            "ownerReferences": owner,
        },
        "spec": {
            # Kueue admits a queued Job by unsuspending it; otherwise the spec decides.
            "suspend": bool(spec.suspend or queue),
            "backoffLimit": spec.backoff_limit,
            "completions": nodes,
            "parallelism": nodes,
            "completionMode": "Indexed" if nodes > 1 else "NonIndexed",
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": CONTAINER,
                            "operator": "In",
                            # 2: unusable RunConfig, 3: invalid data/config/artifact.
                            "values": [EXIT_CONFIG, EXIT_PERMANENT],
                        },
                    },
                    {
                        "action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    },
                ]
            },
            "template": {"metadata": {"labels": meta_labels}, "spec": pod_spec},
        },
    }
    if spec.active_deadline_seconds:
        batch_job["spec"]["activeDeadlineSeconds"] = spec.active_deadline_seconds
    objects: list[dict[str, Any]] = [config_map]
    if nodes > 1:
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": service,
                    "namespace": namespace,
                    "labels": meta_labels,
                    "ownerReferences": owner,
                },
                "spec": {
                    "clusterIP": "None",
                    "publishNotReadyAddresses": True,  # rendezvous happens before readiness
                    # The resource's pods, not one run's: the Service is shared by every
                    # run (a new runId reuses it), and only one run's pods exist at a time.
                    "selector": {
                        f"{GROUP}/{kind.lower()}": name,
                        "app.kubernetes.io/component": component,
                    },
                    "ports": [{"name": "rendezvous", "port": settings.master_port}],
                },
            }
        )
    objects.append(batch_job)
    return objects


def run_config_of(objects: list[dict[str, Any]]) -> RunConfig:
    """The RunConfig carried by a built object list (its ConfigMap's run.json)."""
    for obj in objects:
        if obj["kind"] == "ConfigMap":
            return RunConfig.model_validate(json.loads(obj["data"]["run.json"]))
    raise ValueError("no ConfigMap with run.json among the objects")
