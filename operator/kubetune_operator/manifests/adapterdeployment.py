"""AdapterDeployment -> ConfigMap (ServingConfig) + Deployment (engine + adapter agent) + Service.

The pod contract (what ``kubetune-runtime serve``/``agent``/``fetch-model``, vLLM and LoRAX
rely on):

* ``/etc/kubetune/serving/config.json``: the :class:`ServingConfig` from the ConfigMap
  ``<name>-serving``. The operator updates it **in place** when the adapter list changes; the
  kubelet swaps the mounted file and the agent applies it. Nothing in the pod template depends
  on the adapter list, so adapter changes never restart a pod: the template changes (and the
  Deployment rolls) only when the base model, the engine, its capacity, resources, scheduling
  or images change.
* ``/var/cache/kubetune``: an emptyDir shared by the agent (downloads and verifies adapters
  there) and the engine (loads them from there, same path).
* ``/models/base``: the base model, fetched by the init container ``fetch-model`` (builtin
  always; vLLM and LoRAX unless the model is on the Hub, which they download themselves).
* Ports: ``http`` 8000 is the only one the Service exposes (OpenAI-compatible inference);
  the agent's ``agent-status`` 8090 (``/status``, ``/readyz``, ``/healthz``) is read by the
  kubelet and the operator; the adapter load API is on 127.0.0.1 only:

  - builtin: its admin listener on ``127.0.0.1:8001``;
  - vLLM: vLLM itself listens on ``127.0.0.1:8001`` (its load API shares the port with
    inference, and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` would otherwise let any client load
    or unload adapters); an nginx ``gateway`` container on 8000 forwards an allow-list of
    inference routes to it and answers 404 for everything else;
  - LoRAX has no load API (the agent stages adapters on the shared disk).

* The pod is Ready when the engine answers and the agent's ``/readyz`` says every pinned
  adapter is loaded; the operator reads every pod's ``/status`` for ``status.adapters``.

Capacity (``--max-loras``, ``--max-cpu-loras``, ``--max-lora-rank``) comes from
``spec.capacity`` or is derived (:func:`derive_capacity`); a derived value is *kept* while the
engine settings stay the same (the caller passes the capacity it rendered last), because
re-deriving it from a changed adapter list would restart the pods. An adapter beyond the kept
capacity fails in the agent's compatibility check (rank above ``max_lora_rank``) before any
load call; raising ``spec.capacity`` (a rollout) fixes it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Final

from kubetune_operator.api import GROUP
from kubetune_operator.api.adapterdeployment import (
    VLLM_LORA_RANKS,
    AdapterDeployment,
    LoRAXEngine,
    VLLMEngine,
)
from kubetune_operator.manifests.common import (
    OperatorSettings,
    child_name,
    labels,
    owner_reference,
    restricted_container_security,
    restricted_pod_security,
)
from kubetune_operator.manifests.jobs import env_for, resources_for, scheduling_for
from kubetune_operator.render import CA_BUNDLE_PATH, secret_env_name, storage_config
from kubetune_runtime.config import StorageConfig
from kubetune_runtime.serving.config import (
    AdapterEntry,
    BaseModelRef,
    EngineConfig,
    ServingConfig,
)

KIND: Final = "AdapterDeployment"
COMPONENT: Final = "serving"
SERVING_DIR: Final = "/etc/kubetune/serving"
SERVING_CONFIG_KEY: Final = "config.json"
GATEWAY_CONFIG_KEY: Final = "gateway.conf"
SERVING_CONFIG_FILE: Final = f"{SERVING_DIR}/{SERVING_CONFIG_KEY}"
CACHE_DIR: Final = "/var/cache/kubetune"
MODELS_DIR: Final = "/models"
BASE_MODEL_DIR: Final = f"{MODELS_DIR}/base"
WORKDIR: Final = "/workspace"
PVC_ROOT: Final = "/mnt/pvc"  # the runtime's KUBETUNE_PVC_ROOT default
INFERENCE_PORT: Final = 8000
ENGINE_LOCAL_PORT: Final = 8001  # builtin admin listener / vLLM behind the gateway
AGENT_STATUS_PORT: Final = 8090
TEMPLATE_HASH: Final = f"{GROUP}/template-hash"
DESIRED_HASH: Final = f"{GROUP}/desired-hash"
CAPACITY: Final = f"{GROUP}/capacity"
ENGINE_HASH: Final = f"{GROUP}/engine-hash"

# Routes the vLLM gateway forwards (exact paths); everything else, the adapter API above
# all, answers 404.
GATEWAY_ROUTES: Final = (
    "/health",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/tokenize",
    "/detokenize",
    "/metrics",
)

# Keep answering for a few seconds after deletion while Services stop routing to the pod
# (endpoint removal and SIGTERM race); the sleep action needs no binary in the image.
DRAIN: Final = {"preStop": {"sleep": {"seconds": 5}}}

DEFAULT_RANK: Final = 16  # vLLM's --max-lora-rank default
MIN_SLOTS: Final = 4
MAX_DERIVED_SLOTS: Final = 16
MIN_CPU_SLOTS: Final = 32


@dataclass(frozen=True)
class ServedAdapter:
    """One adapter the agent should serve: resolved source, pinned or best effort."""

    name: str
    uri: str
    digest: str
    pinned: bool = True


@dataclass(frozen=True)
class Capacity:
    """Adapter slots of the engine.

    Attributes:
        max_loras: adapters usable in one batch (vLLM ``--max-loras``; GPU slots).
        max_cpu_loras: adapters kept loaded (vLLM ``--max-cpu-loras``; the builtin engine's
            ``--max-loras``, and the agent's cap on registered adapters for it).
        max_lora_rank: highest rank accepted (``--max-lora-rank``).
    """

    max_loras: int
    max_cpu_loras: int
    max_lora_rank: int

    def to_annotation(self) -> str:
        """Compact JSON for the Deployment annotation :data:`CAPACITY`."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_annotation(cls, text: str | None) -> Capacity | None:
        """The capacity an annotation records, or None when absent or unreadable."""
        if not text:
            return None
        try:
            data = json.loads(text)
            return cls(
                max_loras=int(data["max_loras"]),
                max_cpu_loras=int(data["max_cpu_loras"]),
                max_lora_rank=int(data["max_lora_rank"]),
            )
        except (ValueError, KeyError, TypeError):
            return None


def _next_power_of_two(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def derive_capacity(
    deployment: AdapterDeployment, known_ranks: dict[str, int] | None = None
) -> Capacity:
    """Capacity from ``spec.capacity``, each omitted field derived from the adapter list.

    Derivation (the operator cannot read an adapter's rank before it is trained, so ranks
    come from the referenced FineTuneJobs' ``spec.lora.r``; an adapter given by URI counts as
    rank 16, vLLM's default):

    * ``max_lora_rank``: the highest known rank, at least 16, rounded up to a rank vLLM
      accepts (1, 8, 16, 32, 64, 128, 256, 320, 512);
    * ``max_loras``: the number of adapters rounded up to a power of two, clamped to
      [4, 16] (each GPU slot costs memory for a rank-``max_lora_rank`` adapter);
    * ``max_cpu_loras``: the number of adapters rounded up to a power of two, at least
      ``max_loras`` and at least 32 (adapters are megabytes in CPU memory), so adapters
      added later fit without a restart.

    Args:
        deployment: the validated resource.
        known_ranks: adapter name -> LoRA rank r, where known.

    Returns:
        The capacity to launch the engine with.
    """
    spec = deployment.spec
    given = spec.capacity
    count = len(spec.adapters or [])
    rank = max([DEFAULT_RANK, *(known_ranks or {}).values()])
    allowed = [r for r in VLLM_LORA_RANKS if r >= rank]
    derived_rank = allowed[0] if allowed else rank
    max_lora_rank = given.max_lora_rank if given and given.max_lora_rank else derived_rank
    max_loras = (
        given.max_loras
        if given and given.max_loras
        else min(MAX_DERIVED_SLOTS, max(MIN_SLOTS, _next_power_of_two(count)))
    )
    if given and given.max_cpu_loras:
        max_cpu_loras = given.max_cpu_loras
        max_loras = min(max_loras, max_cpu_loras)  # vLLM requires max-cpu-loras >= max-loras
    else:
        max_cpu_loras = max(max_loras, MIN_CPU_SLOTS, _next_power_of_two(count))
    return Capacity(max_loras, max_cpu_loras, max_lora_rank)


def engine_hash(deployment: AdapterDeployment) -> str:
    """Hash of everything the pods are launched with except the adapter list.

    While it stays the same, a derived capacity is kept (see the module docstring).
    """
    spec = deployment.spec.model_dump(
        mode="json", by_alias=True, exclude={"adapters", "promotion", "replicas", "service"}
    )
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def config_map_name(name: str) -> str:
    """The ConfigMap holding the ServingConfig."""
    return child_name(name, "serving")


def deployment_name(name: str) -> str:
    """The Deployment of the serving pods."""
    return child_name(name, "serving")


def service_name(name: str) -> str:
    """The inference Service (a DNS-1035 label: it starts with a letter)."""
    return child_name(name if name[0].isalpha() else f"a{name}", "serving")


def selector(name: str) -> dict[str, str]:
    """Labels selecting the serving pods of one AdapterDeployment."""
    return {f"{GROUP}/{KIND.lower()}": name, "app.kubernetes.io/component": COMPONENT}


def served_model_name(uri: str) -> str:
    """The base model's name in requests: ``org/name`` for the Hub, else the last segment."""
    if uri.startswith("hf://"):
        return uri.removeprefix("hf://").partition("@")[0]
    return uri.rstrip("/").rsplit("/", 1)[-1] or "base"


def endpoint(deployment: AdapterDeployment) -> str:
    """The in-cluster base URL of the OpenAI-compatible API."""
    namespace = deployment.metadata.namespace or "default"
    port = deployment.spec.service.port if deployment.spec.service else INFERENCE_PORT
    return f"http://{service_name(deployment.metadata.name)}.{namespace}.svc:{port}/v1"


def _fetches_base_model(deployment: AdapterDeployment) -> bool:
    """Whether an init container downloads the base model (vLLM/LoRAX read the Hub)."""
    engine = deployment.spec.engine
    hub = deployment.spec.base_model.uri.startswith("hf://")
    return not (hub and isinstance(engine, VLLMEngine | LoRAXEngine))


def serving_config(
    deployment: AdapterDeployment, adapters: list[ServedAdapter], capacity: Capacity
) -> ServingConfig:
    """The agent's configuration: the engine's contract, the base model, the adapters.

    Raises:
        pydantic.ValidationError: only on an internal inconsistency (names are DNS labels
            and unique, which the CRD guarantees).
    """
    spec = deployment.spec
    engine = spec.engine
    uri = spec.base_model.uri
    revision = uri.partition("@")[2] or None if uri.startswith("hf://") else None
    if isinstance(engine, VLLMEngine):
        engine_config = EngineConfig(
            type="vllm",
            admin_url=f"http://127.0.0.1:{ENGINE_LOCAL_PORT}",
            max_lora_rank=capacity.max_lora_rank,
        )
    elif isinstance(engine, LoRAXEngine):
        engine_config = EngineConfig(
            type="lorax",
            admin_url=f"http://127.0.0.1:{INFERENCE_PORT}",
            max_lora_rank=capacity.max_lora_rank,
        )
    else:
        engine_config = EngineConfig(
            type="builtin",
            admin_url=f"http://127.0.0.1:{ENGINE_LOCAL_PORT}",
            max_lora_rank=capacity.max_lora_rank,
            max_loras=capacity.max_cpu_loras,
        )
    storage: StorageConfig = storage_config(spec.storage)
    return ServingConfig(
        engine=engine_config,
        base_model=BaseModelRef(
            uri=uri,
            revision=revision,
            name=served_model_name(uri),
            aliases=list(spec.base_model_aliases or []),
        ),
        storage=storage,
        adapters=[
            AdapterEntry(name=a.name, uri=a.uri, digest=a.digest, pinned=a.pinned) for a in adapters
        ],
        cache_dir=CACHE_DIR,
        status_port=AGENT_STATUS_PORT,
        status_bind_address="0.0.0.0",  # noqa: S104 - probes and the operator read it
    )


def config_json(config: ServingConfig) -> str:
    """The exact bytes (as text) of config.json; the agent reports their sha256."""
    return config.model_dump_json(indent=2)


def config_digest(text: str) -> str:
    """``sha256:<hex>`` of config.json as the agent computes it (``configDigest``)."""
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


NOT_FOUND: Final = '{"error": {"message": "not found", "type": "NotFoundError", "code": 404}}'


def gateway_config(upstream_port: int = ENGINE_LOCAL_PORT) -> str:
    """The nginx configuration forwarding :data:`GATEWAY_ROUTES` to vLLM on 127.0.0.1.

    Streaming responses pass through unbuffered; the temp paths live on the /tmp emptyDir
    (the root filesystem is read-only).
    """
    locations = "\n".join(
        f"        location = {route} {{ proxy_pass http://engine; }}" for route in GATEWAY_ROUTES
    )
    return f"""worker_processes 2;
pid /tmp/nginx.pid;
error_log /dev/stderr warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path /tmp/client_temp;
    proxy_temp_path /tmp/proxy_temp;
    fastcgi_temp_path /tmp/fastcgi_temp;
    uwsgi_temp_path /tmp/uwsgi_temp;
    scgi_temp_path /tmp/scgi_temp;
    client_max_body_size 16m;
    upstream engine {{ server 127.0.0.1:{upstream_port}; keepalive 32; }}
    server {{
        listen {INFERENCE_PORT};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_buffering off;
        proxy_read_timeout 3600s;
{locations}
        location / {{
            default_type application/json;
            return 404 '{NOT_FOUND}';
        }}
    }}
}}
"""


def _probe(
    path: str, port: str, *, period: int = 5, failures: int = 3, timeout: int = 2
) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def _exec_probe(*, period: int = 5, failures: int = 3) -> dict[str, Any]:
    """GET /health of an engine bound to 127.0.0.1, from inside its container (python3)."""
    url = f"http://127.0.0.1:{ENGINE_LOCAL_PORT}/health"
    return {
        "exec": {
            "command": [
                "python3",
                "-c",
                f"import urllib.request; urllib.request.urlopen({url!r}, timeout=4)",
            ]
        },
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def _pvc_claim(uri: str) -> str | None:
    """The claim of a ``pvc://claim/path`` URI."""
    return uri.removeprefix("pvc://").split("/", 1)[0] if uri.startswith("pvc://") else None


def _pvc_mounts(deployment: AdapterDeployment) -> list[dict[str, Any]]:
    """A base model on a PersistentVolumeClaim, read-only at /mnt/pvc/<claim>."""
    claim = _pvc_claim(deployment.spec.base_model.uri)
    if claim is None:
        return []
    return [{"name": "base-model", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True}]


def _engine_containers(
    deployment: AdapterDeployment, settings: OperatorSettings, capacity: Capacity
) -> list[dict[str, Any]]:
    """The engine container (and, for vLLM, the gateway in front of it)."""
    spec = deployment.spec
    engine = spec.engine
    uri = spec.base_model.uri
    hub_repo, _, hub_revision = uri.removeprefix("hf://").partition("@")
    model_arg = BASE_MODEL_DIR if _fetches_base_model(deployment) else hub_repo
    name = served_model_name(uri)
    mounts = [
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "models", "mountPath": MODELS_DIR},
        {"name": "workspace", "mountPath": WORKDIR},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - a private emptyDir
    ]
    gpus = spec.resources.gpu.count if spec.resources and spec.resources.gpu else 0
    if gpus or (spec.resources and spec.resources.shared_memory):
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})  # noqa: S108 - private emptyDir
    # No storage credentials: the engines never read object storage (the agent and the
    # init container do); only the Hub token, for engines that download the base model.
    env = env_for(spec.base_model, None)
    token = spec.base_model.token_secret_ref
    if token is not None:
        env.append({"name": "HF_TOKEN", "value": f"$({secret_env_name(token)})"})
    mounts += _pvc_mounts(deployment)
    container: dict[str, Any] = {
        "name": "engine",
        "imagePullPolicy": settings.image_pull_policy,
        "env": env,
        "volumeMounts": mounts,
        "securityContext": restricted_container_security(),
        "lifecycle": DRAIN,
        **({"resources": resources_for(spec.resources)} if spec.resources else {}),
    }
    # Model loading takes minutes: liveness waits for the first successful startup probe.
    startup = _probe("/health", "http", period=5, failures=360)
    if isinstance(engine, VLLMEngine):
        args = [
            model_arg,  # positional: `vllm serve --model` is deprecated (an error in 0.8-0.9)
            *(["--revision", hub_revision] if hub_revision and model_arg == hub_repo else []),
            "--served-model-name",
            name,
            "--host",
            "127.0.0.1",
            "--port",
            str(ENGINE_LOCAL_PORT),
            "--enable-lora",
            "--max-loras",
            str(capacity.max_loras),
            "--max-cpu-loras",
            str(capacity.max_cpu_loras),
            "--max-lora-rank",
            str(capacity.max_lora_rank),
        ]
        if engine.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", str(engine.gpu_memory_utilization)]
        if engine.max_model_len is not None:
            args += ["--max-model-len", str(engine.max_model_len)]
        if spec.base_model.trust_remote_code:
            args.append("--trust-remote-code")
        args += list(engine.extra_args or [])
        container.update(
            image=engine.image or settings.vllm_image,
            command=["vllm", "serve"],
            args=args,
            ports=[{"name": "engine", "containerPort": ENGINE_LOCAL_PORT}],
        )
        container["env"] = [
            *env,
            {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"},
            {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
            # getpass.getuser() (torch inductor) fails for a uid without a passwd entry.
            {"name": "USER", "value": "vllm"},
        ]
        # vLLM listens on 127.0.0.1 only, which the kubelet's httpGet probes (sent to the pod
        # IP) cannot reach: probe from inside the container instead.
        container["startupProbe"] = _exec_probe(period=5, failures=360)
        container["livenessProbe"] = _exec_probe(period=10, failures=6)
        container["readinessProbe"] = _exec_probe(period=5)
        gateway = {
            "name": "gateway",
            "image": settings.gateway_image,
            "imagePullPolicy": settings.image_pull_policy,
            "args": ["nginx", "-c", f"{SERVING_DIR}/{GATEWAY_CONFIG_KEY}", "-g", "daemon off;"],
            "ports": [{"name": "http", "containerPort": INFERENCE_PORT}],
            "volumeMounts": [
                {"name": "config", "mountPath": SERVING_DIR, "readOnly": True},
                {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - a private emptyDir
            ],
            "securityContext": restricted_container_security(),
            "lifecycle": DRAIN,
            "resources": {
                "requests": {"cpu": "50m", "memory": "32Mi"},
                "limits": {"memory": "128Mi"},
            },
            "readinessProbe": _probe("/health", "http", period=5),
        }
        return [container, gateway]
    if isinstance(engine, LoRAXEngine):
        args = [
            "--model-id",
            model_arg,
            *(["--revision", hub_revision] if hub_revision and model_arg == hub_repo else []),
            "--hostname",
            "0.0.0.0",  # noqa: S104 - the inference port, behind the Service
            "--port",
            str(INFERENCE_PORT),
            "--adapter-source",
            "local",
            *(engine.extra_args or []),
        ]
        # LoRAX's image points the Hub cache at /data; the root filesystem is read-only.
        container["env"] = [
            *env,
            {"name": "HUGGINGFACE_HUB_CACHE", "value": f"{WORKDIR}/.cache/huggingface/hub"},
        ]
        container.update(
            image=engine.image or settings.lorax_image,
            command=["lorax-launcher"],
            args=args,
            ports=[{"name": "http", "containerPort": INFERENCE_PORT}],
            startupProbe=startup,
            livenessProbe=_probe("/health", "http", period=10, failures=6),
            readinessProbe=_probe("/health", "http", period=5),
        )
        return [container]
    container.update(
        image=settings.runtime_image,
        command=["kubetune-runtime"],
        args=[
            "serve",
            "--model",
            BASE_MODEL_DIR,
            "--served-model-name",
            name,
            *(
                arg
                for alias in [uri, *(spec.base_model_aliases or [])]
                for arg in ("--base-model-uri", alias)
            ),
            "--host",
            "0.0.0.0",  # noqa: S104 - the inference port, behind the Service
            "--port",
            str(INFERENCE_PORT),
            "--admin-host",
            "127.0.0.1",
            "--admin-port",
            str(ENGINE_LOCAL_PORT),
            "--max-loras",
            str(capacity.max_cpu_loras),
            "--max-lora-rank",
            str(capacity.max_lora_rank),
            "--max-batch-size",
            str(engine.max_batch_size),
            "--max-batch-delay-ms",
            str(engine.max_batch_delay_milliseconds),
        ],
        ports=[{"name": "http", "containerPort": INFERENCE_PORT}],
        startupProbe=startup,
        livenessProbe=_probe("/health", "http", period=10, failures=6),
        readinessProbe=_probe("/health", "http", period=5),
    )
    return [container]


def _agent_container(deployment: AdapterDeployment, settings: OperatorSettings) -> dict[str, Any]:
    spec = deployment.spec
    return {
        "name": "agent",
        "image": spec.agent_image or settings.runtime_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["kubetune-runtime"],
        "args": ["agent", "--config", SERVING_CONFIG_FILE],
        "env": env_for(spec, spec.storage),
        "ports": [{"name": "agent-status", "containerPort": AGENT_STATUS_PORT}],
        "volumeMounts": [
            {"name": "config", "mountPath": SERVING_DIR, "readOnly": True},
            {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "workspace", "mountPath": WORKDIR},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - a private emptyDir
            *_ca_mounts(deployment),
        ],
        "securityContext": restricted_container_security(),
        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
        # /readyz observes the engine afresh (waiting at most a second): a 3 s timeout and
        # two failures keep one slow engine answer from taking every pod out at once.
        "readinessProbe": _probe("/readyz", "agent-status", period=2, failures=2, timeout=3),
        "livenessProbe": _probe("/healthz", "agent-status", period=10, failures=6),
    }


def _ca_mounts(deployment: AdapterDeployment) -> list[dict[str, Any]]:
    storage = deployment.spec.storage
    if storage is None or storage.ca_bundle is None:
        return []
    return [{"name": "ca", "mountPath": CA_BUNDLE_PATH.rsplit("/", 1)[0], "readOnly": True}]


def _fetch_container(deployment: AdapterDeployment, settings: OperatorSettings) -> dict[str, Any]:
    spec = deployment.spec
    env = env_for(spec, spec.storage)
    token = spec.base_model.token_secret_ref
    if token is not None:
        env.append({"name": "HF_TOKEN", "value": f"$({secret_env_name(token)})"})
    return {
        "name": "fetch-model",
        "image": spec.agent_image or settings.runtime_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["kubetune-runtime"],
        "args": ["fetch-model", "--config", SERVING_CONFIG_FILE, "--dest", BASE_MODEL_DIR],
        "env": env,
        "volumeMounts": [
            {"name": "config", "mountPath": SERVING_DIR, "readOnly": True},
            {"name": "models", "mountPath": MODELS_DIR},
            {"name": "workspace", "mountPath": WORKDIR},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 - a private emptyDir
            *_ca_mounts(deployment),
            *_pvc_mounts(deployment),
        ],
        "securityContext": restricted_container_security(),
    }


def _volumes(deployment: AdapterDeployment) -> list[dict[str, Any]]:
    spec = deployment.spec
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_map_name(deployment.metadata.name)}},
        {"name": "cache", "emptyDir": {}},
        {"name": "models", "emptyDir": {}},
        {"name": "workspace", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    resources = spec.resources
    gpus = resources.gpu.count if resources and resources.gpu else 0
    if gpus or (resources and resources.shared_memory):
        size = (resources.shared_memory if resources else None) or "1Gi"
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": size}})
    claim = _pvc_claim(spec.base_model.uri)
    if claim is not None:
        volumes.append(
            {"name": "base-model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
    if spec.storage is not None and spec.storage.ca_bundle is not None:
        volumes.append(
            {
                "name": "ca",
                "secret": {
                    "secretName": spec.storage.ca_bundle.name,
                    "items": [{"key": spec.storage.ca_bundle.key, "path": "ca.crt"}],
                },
            }
        )
    return volumes


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def build(
    deployment: AdapterDeployment,
    settings: OperatorSettings,
    adapters: list[ServedAdapter],
    capacity: Capacity,
) -> list[dict[str, Any]]:
    """The objects serving one AdapterDeployment, in apply order.

    Args:
        deployment: the validated resource (metadata.uid is used for owner references).
        settings: operator-wide images and defaults.
        adapters: the adapters to serve now (resolved, promoted); the rest are left out.
        capacity: the engine's adapter slots (:func:`derive_capacity`, or the kept value).

    Returns:
        ``[ConfigMap, Service, Deployment]``. Each carries the annotation
        :data:`DESIRED_HASH` (a hash of what is rendered), so a reconcile updates a child
        only when its rendering changed; the pod template carries :data:`TEMPLATE_HASH`, so
        the operator knows which pods run the current engine settings.
    """
    name = deployment.metadata.name
    namespace = deployment.metadata.namespace or "default"
    spec = deployment.spec
    owner = [owner_reference(KIND, name, deployment.metadata.uid)]
    meta_labels = labels(KIND, name, COMPONENT)
    config = serving_config(deployment, adapters, capacity)
    data = {SERVING_CONFIG_KEY: config_json(config)}
    if isinstance(spec.engine, VLLMEngine):
        data[GATEWAY_CONFIG_KEY] = gateway_config()
    config_map: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": config_map_name(name),
            "namespace": namespace,
            "labels": meta_labels,
            "annotations": {DESIRED_HASH: _hash(data)},
            "ownerReferences": owner,
        },
        "data": data,
    }
    service_spec = spec.service
    service: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(name),
            "namespace": namespace,
            "labels": meta_labels,
            "annotations": dict(service_spec.annotations or {}) if service_spec else {},
            "ownerReferences": owner,
        },
        "spec": {
            "type": service_spec.type if service_spec else "ClusterIP",
            "selector": selector(name),
            "ports": [
                {
                    "name": "http",
                    "port": service_spec.port if service_spec else INFERENCE_PORT,
                    "targetPort": "http",
                    "protocol": "TCP",
                    "appProtocol": "http",
                }
            ],
        },
    }
    service["metadata"]["annotations"][DESIRED_HASH] = _hash(service["spec"])

    credentials = spec.storage.credentials if spec.storage else None
    pod_spec: dict[str, Any] = {
        "containers": [
            *_engine_containers(deployment, settings, capacity),
            _agent_container(deployment, settings),
        ],
        "volumes": _volumes(deployment),
        "securityContext": restricted_pod_security(),
        "terminationGracePeriodSeconds": 30,
        "enableServiceLinks": False,
        **scheduling_for(spec.scheduling, spec.resources),
    }
    if _fetches_base_model(deployment):
        pod_spec["initContainers"] = [_fetch_container(deployment, settings)]
    if credentials is not None and credentials.service_account_name:
        pod_spec["serviceAccountName"] = credentials.service_account_name
    else:
        pod_spec["automountServiceAccountToken"] = False  # nothing in the pod calls the API
    template: dict[str, Any] = {"metadata": {"labels": meta_labels}, "spec": pod_spec}
    template["metadata"]["annotations"] = {TEMPLATE_HASH: _hash(template)}
    workload: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": deployment_name(name),
            "namespace": namespace,
            "labels": meta_labels,
            "annotations": {
                CAPACITY: capacity.to_annotation(),
                ENGINE_HASH: engine_hash(deployment),
            },
            "ownerReferences": owner,
        },
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector(name)},
            "revisionHistoryLimit": 3,
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0},
            },
            "template": template,
        },
    }
    workload["metadata"]["annotations"][DESIRED_HASH] = _hash(workload["spec"])
    return [config_map, service, workload]
