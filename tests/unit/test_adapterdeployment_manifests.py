"""AdapterDeployment rendering: what the pods run, what the Service exposes, what restarts them."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from kubetune_operator.api.adapterdeployment import AdapterDeployment
from kubetune_operator.controller.serving import Resolved, choose_capacity
from kubetune_operator.manifests import adapterdeployment as m
from kubetune_operator.manifests.common import OperatorSettings
from kubetune_operator.validation import parse_manifest
from kubetune_runtime.serving.config import ServingConfig

K8S_VERSION = "1.30.0"
DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64
Obj = dict[str, Any]


def deployment(engine: Obj | None = None, **spec: Any) -> AdapterDeployment:
    body = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": "chat", "namespace": "team-a", "uid": "uid-1", "generation": 1},
        "spec": {
            "baseModel": {"uri": "s3://models/tiny-base"},
            "engine": engine or {"type": "builtin"},
            "adapters": [
                {"name": "math", "source": {"uri": "s3://adapters/math", "digest": DIGEST_A}}
            ],
            **spec,
        },
    }
    model = parse_manifest(body)
    assert isinstance(model, AdapterDeployment)
    return model


MATH = m.ServedAdapter("math", "s3://adapters/math", DIGEST_A)
CHAT = m.ServedAdapter("chat-style", "s3://adapters/chat", DIGEST_B, pinned=False)
CAPACITY = m.Capacity(max_loras=4, max_cpu_loras=32, max_lora_rank=16)


def build(model: AdapterDeployment, adapters: list[m.ServedAdapter] | None = None) -> list[Obj]:
    return m.build(model, OperatorSettings(), [MATH] if adapters is None else adapters, CAPACITY)


def by_kind(objects: list[Obj], kind: str) -> Obj:
    return next(o for o in objects if o["kind"] == kind)


def containers(objects: list[Obj]) -> dict[str, Obj]:
    pod = by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    return {c["name"]: c for c in [*pod.get("initContainers", []), *pod["containers"]]}


@pytest.mark.parametrize(
    "engine",
    [{"type": "builtin"}, {"type": "vllm"}, {"type": "lorax"}],
    ids=["builtin", "vllm", "lorax"],
)
def test_rendered_objects_are_valid_kubernetes_1_30(engine: Obj) -> None:
    model = deployment(engine, resources={"gpu": {"count": 1}, "memory": "32Gi"})
    for obj in build(model):
        kubernetes_validate.validate(copy.deepcopy(obj), K8S_VERSION, strict=True)
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        assert obj["metadata"]["ownerReferences"][0]["controller"] is True


@pytest.mark.parametrize("engine", ["builtin", "vllm", "lorax"])
def test_every_container_is_restricted(engine: str) -> None:
    objects = build(deployment({"type": engine}))
    pod = by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    for c in containers(objects).values():
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize("engine", ["builtin", "vllm", "lorax"])
def test_service_exposes_only_the_inference_port(engine: str) -> None:
    objects = build(deployment({"type": engine}))
    service = by_kind(objects, "Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    exposing = [
        (c["name"], p["containerPort"])
        for c in containers(objects).values()
        for p in c.get("ports", [])
        if p["name"] == "http"
    ]
    assert len(exposing) == 1
    assert exposing[0][1] == m.INFERENCE_PORT
    assert (
        service["spec"]["selector"]
        == by_kind(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    )


def test_builtin_admin_api_binds_loopback_only() -> None:
    args = containers(build(deployment()))["engine"]["args"]
    assert args[args.index("--admin-host") + 1] == "127.0.0.1"
    assert args[args.index("--admin-port") + 1] == str(m.ENGINE_LOCAL_PORT)
    assert args[args.index("--model") + 1] == m.BASE_MODEL_DIR
    config = ServingConfig.model_validate_json(
        by_kind(build(deployment()), "ConfigMap")["data"]["config.json"]
    )
    assert config.engine.admin_url == f"http://127.0.0.1:{m.ENGINE_LOCAL_PORT}"


def test_vllm_runs_behind_a_gateway_that_refuses_the_adapter_api() -> None:
    model = deployment({"type": "vllm", "gpuMemoryUtilization": "0.85", "extraArgs": ["--x"]})
    objects = build(model)
    engine = containers(objects)["engine"]
    args = engine["args"]
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert "--enable-lora" in args
    assert args[args.index("--max-loras") + 1] == "4"
    assert args[args.index("--max-cpu-loras") + 1] == "32"
    assert args[args.index("--max-lora-rank") + 1] == "16"
    assert args[args.index("--gpu-memory-utilization") + 1] == "0.85"
    assert args[-1] == "--x"
    env = {e["name"]: e.get("value") for e in engine["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "ports" not in engine or all(p["name"] != "http" for p in engine["ports"])
    gateway = by_kind(objects, "ConfigMap")["data"][m.GATEWAY_CONFIG_KEY]
    assert "load_lora_adapter" not in gateway
    assert "location = /v1/chat/completions { proxy_pass http://engine; }" in gateway
    assert f"server 127.0.0.1:{m.ENGINE_LOCAL_PORT}" in gateway
    assert "location / {" in gateway
    assert "return 404" in gateway


def test_hub_models_are_downloaded_by_vllm_other_sources_by_the_init_container() -> None:
    hub = build(deployment({"type": "vllm"}, baseModel={"uri": "hf://Qwen/Qwen2.5-0.5B@abc123"}))
    assert "fetch-model" not in containers(hub)
    args = containers(hub)["engine"]["args"]
    assert args[:3] == ["Qwen/Qwen2.5-0.5B", "--revision", "abc123"]  # positional model
    assert args[args.index("--served-model-name") + 1] == "Qwen/Qwen2.5-0.5B"
    s3 = build(deployment({"type": "vllm"}))
    assert containers(s3)["fetch-model"]["args"][-1] == m.BASE_MODEL_DIR
    assert containers(s3)["engine"]["args"][0] == m.BASE_MODEL_DIR
    # The builtin engine always reads a local folder.
    builtin = build(deployment(baseModel={"uri": "hf://Qwen/Qwen2.5-0.5B"}))
    assert "fetch-model" in containers(builtin)


def test_lorax_stages_adapters_locally() -> None:
    objects = build(deployment({"type": "lorax"}))
    args = containers(objects)["engine"]["args"]
    assert args[args.index("--adapter-source") + 1] == "local"
    config = ServingConfig.model_validate_json(by_kind(objects, "ConfigMap")["data"]["config.json"])
    assert config.engine.type == "lorax"
    assert config.engine.admin_url.endswith(f":{m.INFERENCE_PORT}")


def test_config_lists_the_served_adapters_and_the_agent_reads_it() -> None:
    objects = build(deployment(), [MATH, CHAT])
    config_map = by_kind(objects, "ConfigMap")
    config = ServingConfig.model_validate_json(config_map["data"]["config.json"])
    assert [(a.name, a.uri, a.digest, a.pinned) for a in config.adapters] == [
        ("math", "s3://adapters/math", DIGEST_A, True),
        ("chat-style", "s3://adapters/chat", DIGEST_B, False),
    ]
    assert config.base_model.uri == "s3://models/tiny-base"
    assert config.base_model.name == "tiny-base"
    assert config.cache_dir == m.CACHE_DIR
    agent = containers(objects)["agent"]
    assert agent["args"] == ["agent", "--config", m.SERVING_CONFIG_FILE]
    assert {"name": "config", "mountPath": m.SERVING_DIR, "readOnly": True} in agent["volumeMounts"]
    engine_cache = [
        v for v in containers(objects)["engine"]["volumeMounts"] if v["name"] == "cache"
    ]
    assert engine_cache == [{"name": "cache", "mountPath": m.CACHE_DIR}]
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "agent-status"}
    assert m.config_digest(config_map["data"]["config.json"]).startswith("sha256:")


def test_changing_the_adapter_list_changes_only_the_configmap() -> None:
    one = build(deployment(), [MATH])
    two = build(
        deployment(
            adapters=[
                {"name": "math", "source": {"uri": "s3://adapters/math", "digest": DIGEST_A}},
                {"name": "chat-style", "source": {"uri": "s3://adapters/chat", "digest": DIGEST_B}},
            ]
        ),
        [MATH, CHAT],
    )
    assert by_kind(one, "Deployment") == by_kind(two, "Deployment")
    assert by_kind(one, "Service") == by_kind(two, "Service")
    assert by_kind(one, "ConfigMap") != by_kind(two, "ConfigMap")


@pytest.mark.parametrize(
    "change",
    [
        {"engine": {"type": "builtin", "maxBatchSize": 16}},
        {"baseModel": {"uri": "s3://models/other-base"}},
        {"resources": {"memory": "8Gi"}},
        {"agentImage": "registry.example/kubetune-runtime:9"},
    ],
    ids=["engine", "base-model", "resources", "agent-image"],
)
def test_engine_settings_change_the_pod_template(change: Obj) -> None:
    before = by_kind(build(deployment()), "Deployment")
    engine = change.pop("engine", None)
    after = by_kind(build(deployment(engine, **change)), "Deployment")
    key = m.TEMPLATE_HASH
    assert (
        before["spec"]["template"]["metadata"]["annotations"][key]
        != after["spec"]["template"]["metadata"]["annotations"][key]
    )
    assert (
        before["metadata"]["annotations"][m.DESIRED_HASH]
        != after["metadata"]["annotations"][m.DESIRED_HASH]
    )


def test_capacity_is_derived_from_adapters_and_ranks() -> None:
    adapters = [
        {"name": f"a{i}", "source": {"uri": f"s3://adapters/a{i}", "digest": DIGEST_A}}
        for i in range(5)
    ]
    model = deployment(adapters=adapters)
    assert m.derive_capacity(model) == m.Capacity(8, 32, 16)
    assert m.derive_capacity(model, {"a0": 8}).max_lora_rank == 16  # never below vLLM's default
    assert m.derive_capacity(model, {"a0": 24}).max_lora_rank == 32  # rounded up to a vLLM rank
    many = deployment(
        adapters=[
            {"name": f"a{i}", "source": {"uri": f"s3://adapters/a{i}", "digest": DIGEST_A}}
            for i in range(40)
        ]
    )
    assert m.derive_capacity(many) == m.Capacity(16, 64, 16)
    given = deployment(capacity={"maxLoras": 2, "maxCpuLoras": 3, "maxLoraRank": 64})
    assert m.derive_capacity(given, {"math": 8}) == m.Capacity(2, 3, 64)


def test_capacity_is_kept_while_engine_settings_stay_the_same() -> None:
    model = deployment()
    live = by_kind(m.build(model, OperatorSettings(), [MATH], m.Capacity(4, 32, 16)), "Deployment")
    annotations = live["metadata"]["annotations"]
    grown = deployment(
        adapters=[
            {"name": f"a{i}", "source": {"uri": f"s3://adapters/a{i}", "digest": DIGEST_A}}
            for i in range(40)
        ]
    )
    ranks = [Resolved("a0", True, rank=64)]
    # 40 adapters and a rank-64 one would derive (16, 64, 64), which would restart the pods.
    assert choose_capacity(grown, ranks, annotations) == m.Capacity(4, 32, 16)
    # Once the engine settings change anyway (a rollout is due), it is derived anew.
    changed = deployment(
        {"type": "builtin", "maxBatchSize": 4},
        adapters=[
            {"name": f"a{i}", "source": {"uri": f"s3://adapters/a{i}", "digest": DIGEST_A}}
            for i in range(40)
        ],
    )
    assert choose_capacity(changed, ranks, annotations) == m.Capacity(16, 64, 64)
    assert choose_capacity(grown, ranks, None) == m.Capacity(16, 64, 64)
    assert m.Capacity.from_annotation("{not json") is None


def test_names_are_dns_safe_and_the_endpoint_names_the_service() -> None:
    model = deployment()
    service = by_kind(build(model), "Service")
    assert m.endpoint(model) == f"http://{service['metadata']['name']}.team-a.svc:8000/v1"
    assert m.service_name("9lives")[0].isalpha()
    assert len(m.deployment_name("x" * 63)) <= 63
    assert json.loads(
        by_kind(build(model), "Deployment")["metadata"]["annotations"][m.CAPACITY]
    ) == {"max_cpu_loras": 32, "max_lora_rank": 16, "max_loras": 4}


@pytest.mark.parametrize(
    "example", ["adapterdeployment-three-adapters.yaml", "adapterdeployment-builtin-cpu.yaml"]
)
def test_the_examples_render_to_valid_objects(example: str) -> None:
    import yaml

    root = Path(__file__).resolve().parents[2]
    doc = yaml.safe_load((root / "examples" / example).read_text())
    doc["metadata"]["uid"] = "uid-1"
    model = parse_manifest(doc)
    assert isinstance(model, AdapterDeployment)
    adapters = [
        m.ServedAdapter(a.name, a.source.uri or "s3://adapters/x", a.source.digest or DIGEST_A)
        for a in model.spec.adapters or []
    ]
    objects = m.build(model, OperatorSettings(), adapters, m.derive_capacity(model))
    for obj in objects:
        kubernetes_validate.validate(copy.deepcopy(obj), K8S_VERSION, strict=True)
    ServingConfig.model_validate_json(by_kind(objects, "ConfigMap")["data"]["config.json"])


@pytest.mark.parametrize("engine", ["builtin", "vllm", "lorax"])
def test_probes_reach_what_they_check(engine: str) -> None:
    """The kubelet sends httpGet probes to the pod IP: never to a port bound to 127.0.0.1."""
    objects = build(deployment({"type": engine}))
    reachable = {"http", "agent-status"}  # bound to 0.0.0.0 (the agent's by its config)
    probes = 0
    for c in containers(objects).values():
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = c.get(kind)
            if probe is None:
                continue
            probes += 1
            if "httpGet" in probe:
                assert probe["httpGet"]["port"] in reachable, (c["name"], kind)
            else:  # vLLM on 127.0.0.1: checked from inside its container
                assert engine == "vllm"
                assert c["name"] == "engine"
                assert f"127.0.0.1:{m.ENGINE_LOCAL_PORT}/health" in probe["exec"]["command"][-1]
    assert probes >= 4
    config = ServingConfig.model_validate_json(by_kind(objects, "ConfigMap")["data"]["config.json"])
    assert config.status_bind_address == "0.0.0.0"  # noqa: S104 - what the kubelet probes
    assert config.status_port == m.AGENT_STATUS_PORT


@pytest.mark.parametrize("engine", ["builtin", "vllm", "lorax"])
def test_storage_credentials_reach_only_the_containers_that_download(engine: str) -> None:
    model = deployment(
        {"type": engine},
        storage={"credentials": {"secretRef": {"name": "s3-keys"}}},
        baseModel={"uri": "s3://models/tiny-base", "tokenSecretRef": {"name": "hf", "key": "t"}},
    )
    by_name = containers(build(model))

    def secrets(container: Obj) -> set[str]:
        return {
            e["valueFrom"]["secretKeyRef"]["name"]
            for e in container.get("env", [])
            if "valueFrom" in e
        }

    assert secrets(by_name["agent"]) >= {"s3-keys"}
    assert secrets(by_name["fetch-model"]) >= {"s3-keys"}
    assert secrets(by_name["engine"]) == {"hf"}  # the Hub token only
    assert "gateway" not in by_name or secrets(by_name["gateway"]) == set()


def test_a_base_model_on_a_claim_is_mounted_read_only() -> None:
    objects = build(deployment(baseModel={"uri": "pvc://models-pvc/tiny-base"}))
    pod = by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    assert {
        "name": "base-model",
        "persistentVolumeClaim": {"claimName": "models-pvc", "readOnly": True},
    } in pod["volumes"]
    for name in ("fetch-model", "engine"):
        assert {
            "name": "base-model",
            "mountPath": "/mnt/pvc/models-pvc",
            "readOnly": True,
        } in containers(objects)[name]["volumeMounts"]


def test_a_given_cpu_slot_count_caps_the_derived_batch_slots() -> None:
    adapters = [
        {"name": f"a{i}", "source": {"uri": f"s3://adapters/a{i}", "digest": DIGEST_A}}
        for i in range(12)
    ]
    capacity = m.derive_capacity(deployment(adapters=adapters, capacity={"maxCpuLoras": 2}))
    assert (capacity.max_loras, capacity.max_cpu_loras) == (2, 2)


def test_base_model_aliases_reach_the_agent_and_the_engine() -> None:
    model = deployment(baseModelAliases=["hf://org/tiny@abc", "s3://mirror/tiny"])
    objects = build(model)
    config = ServingConfig.model_validate_json(by_kind(objects, "ConfigMap")["data"]["config.json"])
    assert config.base_model.aliases == ["hf://org/tiny@abc", "s3://mirror/tiny"]
    args = containers(objects)["engine"]["args"]
    named = [args[i + 1] for i, a in enumerate(args) if a == "--base-model-uri"]
    assert named == ["s3://models/tiny-base", "hf://org/tiny@abc", "s3://mirror/tiny"]


@pytest.mark.parametrize("engine", ["builtin", "vllm", "lorax"])
def test_inference_containers_drain_before_stopping(engine: str) -> None:
    objects = build(deployment({"type": engine}))
    serving_port = [
        c
        for c in containers(objects).values()
        if any(p["name"] == "http" for p in c.get("ports", []))
    ]
    assert len(serving_port) == 1
    for c in [*serving_port, containers(objects)["engine"]]:
        assert c["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}
    pod = by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > 5
