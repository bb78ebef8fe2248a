"""The pure builders: FineTuneJob / EvalJob -> ConfigMap (+ headless Service) + batch/v1 Job.

Every built object is also checked against the Kubernetes 1.30 OpenAPI schema
(``kubernetes_validate``, strict: unknown fields are errors), so a typo in a field name or a
wrong type fails here rather than on the API server.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from kubetune_operator.api import EvalJob, FineTuneJob
from kubetune_operator.api.common import BaseModelSpec, SecretKeyRef
from kubetune_operator.manifests import evaljob as evaljob_manifests
from kubetune_operator.manifests import finetunejob as finetunejob_manifests
from kubetune_operator.manifests.common import OperatorSettings, child_name
from kubetune_operator.manifests.jobs import run_config_of
from kubetune_operator.render import render_eval, render_finetune, secret_env_name
from kubetune_operator.validation import load_documents, parse_manifest
from kubetune_runtime.config import AdapterRef

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

UID = "6f1c2a4e-0b7d-4c1e-9a43-1d2e3f405162"
DIGEST = "sha256:" + "ab" * 32
SETTINGS = OperatorSettings()
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
K8S_VERSION = "1.30"

# Secret names distinctive enough that a substring search cannot match anything else.
S3_CREDS = "s3-creds-zq81x"
HF_CREDS = "hf-token-zq81x"
DATA_CREDS = "data-token-zq81x"
JUDGE_CREDS = "judge-key-zq81x"
CA_CREDS = "minio-ca-zq81x"


# ------------------------------------------------------------------------------ manifests


def finetune_doc(
    name: str = "gsm8k", namespace: str | None = "team-a", **spec: Any
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "uid": UID}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": metadata,
        "spec": {
            "baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct@main"},
            "dataset": {"train": {"uri": "s3://data/gsm8k/train.jsonl"}},
            "output": {"uri": "s3://models/team-a/gsm8k"},
            **spec,
        },
    }


def finetune(name: str = "gsm8k", namespace: str | None = "team-a", **spec: Any) -> FineTuneJob:
    job = parse_manifest(finetune_doc(name, namespace, **spec))
    assert isinstance(job, FineTuneJob)
    return job


def eval_doc(name: str = "gsm8k-eval", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "EvalJob",
        "metadata": {"name": name, "namespace": "team-a", "uid": UID},
        "spec": {
            "target": {"adapter": {"uri": "s3://models/team-a/gsm8k/adapter", "digest": DIGEST}},
            "baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct@main"},
            "suites": [
                {
                    "name": "heldout",
                    "type": "perplexity",
                    "dataset": {"uri": "s3://data/gsm8k/test.jsonl"},
                }
            ],
            "output": {"uri": "s3://eval/team-a/gsm8k"},
            **spec,
        },
    }


def evaljob(name: str = "gsm8k-eval", **spec: Any) -> EvalJob:
    job = parse_manifest(eval_doc(name, **spec))
    assert isinstance(job, EvalJob)
    return job


def example(name: str) -> Any:
    """An example manifest as the operator sees it: stored, so with a uid."""
    doc = load_documents((EXAMPLES / name).read_text(encoding="utf-8"))[0]
    doc["metadata"]["uid"] = UID
    return parse_manifest(doc)


ADAPTER = AdapterRef(uri="s3://models/team-a/gsm8k/adapter", digest=DIGEST)
BASE = BaseModelSpec.model_validate({"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct@main"})

FULL_STORAGE = {
    "endpoint": "https://minio.minio.svc:9000",
    "region": "us-east-1",
    "pathStyle": True,
    "caBundle": {"name": CA_CREDS, "key": "ca.crt"},
    "credentials": {
        "secretRef": {
            "name": S3_CREDS,
            "accessKeyIdKey": "access-key",
            "secretAccessKeyKey": "secret-key",
            "sessionTokenKey": "session-token",
        }
    },
}
EVALUATION_WITH_JUDGE = {
    "suites": [
        {"name": "heldout", "type": "perplexity", "dataset": {"uri": "s3://data/test.jsonl"}},
        {
            "name": "helpful",
            "type": "judge",
            "dataset": {"uri": "s3://data/golden.jsonl", "format": "promptCompletion"},
            "judge": {
                "url": "http://judge.llm.svc:8000/v1",
                "model": "judge",
                "apiKeySecretRef": {"name": JUDGE_CREDS, "key": "api-key"},
            },
        },
    ]
}


def secrets_job() -> FineTuneJob:
    """Every kind of Secret reference: S3 keys, CA bundle, HF token (model + data), judge key."""
    return finetune(
        baseModel={
            "uri": "hf://meta-llama/Llama-3.1-8B@main",
            "tokenSecretRef": {"name": HF_CREDS, "key": "token"},
        },
        dataset={
            "train": {
                "uri": "hf://org/private-data",
                "tokenSecretRef": {"name": DATA_CREDS, "key": "token"},
            },
            "eval": {
                "uri": "hf://org/private-eval",
                # The same Secret key as the base model's: one env var, not two.
                "tokenSecretRef": {"name": HF_CREDS, "key": "token"},
            },
        },
        evaluation=EVALUATION_WITH_JUDGE,
        storage=FULL_STORAGE,
    )


def gpu_job() -> FineTuneJob:
    return finetune(
        resources={
            "gpu": {"count": 2, "product": "NVIDIA-H100-80GB-HBM3"},
            "cpu": "16",
            "memory": "128Gi",
            "ephemeralStorage": "200Gi",
        },
        scheduling={
            "nodeSelector": {"pool": "training"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                {
                    "key": "spot",
                    "operator": "Equal",
                    "value": "true",
                    "effect": "NoExecute",
                    "tolerationSeconds": 30,
                },
            ],
            "priorityClassName": "training-high",
        },
        activeDeadlineSeconds=3600,
        backoffLimit=5,
    )


def multinode_job(name: str = "llama-full", **extra: Any) -> FineTuneJob:
    return finetune(
        name,
        method="full",
        distributed={"nodes": 2, "processesPerNode": 8, "deepspeed": {"zeroStage": 3}},
        resources={"gpu": {"count": 8}, "memory": "1000Gi", "sharedMemory": "64Gi"},
        storage={"credentials": {"serviceAccountName": "kubetune-trainer"}},
        scheduling={"queueName": "research-h100"},
        **extra,
    )


Built = tuple[Any, list[dict[str, Any]]]


def _ftj(make: Callable[[], FineTuneJob]) -> Callable[[], Built]:
    def build() -> Built:
        job = make()
        return job, finetunejob_manifests.build(job, SETTINGS)

    return build


def _eval(make: Callable[[], EvalJob]) -> Callable[[], Built]:
    def build() -> Built:
        job = make()
        return job, evaljob_manifests.build(job, SETTINGS, adapter=ADAPTER, base_model=BASE)

    return build


CASES = [
    pytest.param(_ftj(finetune), id="ftj-minimal-cpu"),
    pytest.param(_ftj(lambda: finetune(namespace=None)), id="ftj-default-namespace"),
    pytest.param(_ftj(secrets_job), id="ftj-all-secrets"),
    pytest.param(_ftj(gpu_job), id="ftj-gpu-scheduling"),
    pytest.param(_ftj(lambda: finetune(scheduling={"queueName": "q"})), id="ftj-kueue"),
    pytest.param(_ftj(lambda: finetune(suspend=True)), id="ftj-suspended"),
    pytest.param(_ftj(lambda: finetune(runId="rerun-2")), id="ftj-run-id"),
    pytest.param(_ftj(lambda: finetune("x" * 63)), id="ftj-63-char-name"),
    pytest.param(_ftj(multinode_job), id="ftj-2x8-multinode"),
    pytest.param(
        _ftj(lambda: finetune(image="registry.example.com/kubetune/runtime:dev")), id="ftj-image"
    ),
    pytest.param(_ftj(lambda: example("finetunejob-lora-gsm8k.yaml")), id="example-lora-gsm8k"),
    pytest.param(_ftj(lambda: example("finetunejob-qlora-sft.yaml")), id="example-qlora-sft"),
    pytest.param(_ftj(lambda: example("finetunejob-dpo-hh-rlhf.yaml")), id="example-dpo"),
    pytest.param(_ftj(lambda: example("finetunejob-full-zero3-2x8.yaml")), id="example-full-2x8"),
    pytest.param(_ftj(lambda: example("quickstart/finetunejob.yaml")), id="example-quickstart"),
    pytest.param(_eval(evaljob), id="eval-adapter-uri"),
    pytest.param(
        _eval(lambda: evaljob(suites=EVALUATION_WITH_JUDGE["suites"], storage=FULL_STORAGE)),
        id="eval-judge-storage",
    ),
    pytest.param(_eval(lambda: example("evaljob-gates.yaml")), id="example-evaljob-gates"),
]


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, [o["kind"] for o in objects]
    return found[0]


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = by_kind(objects, "Job")["spec"]["template"]["spec"]
    return spec


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = pod_spec(objects)["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def env_of(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    env = container(objects)["env"]
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), f"duplicate env vars: {names}"
    return {e["name"]: e for e in env}


def env_names_in(value: Any) -> set[str]:
    """Every ``*_env`` value of a RunConfig dump: variables the runtime will read."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            if key.endswith("_env") and isinstance(item, str):
                found.add(item)
            else:
                found |= env_names_in(item)
    elif isinstance(value, list):
        for item in value:
            found |= env_names_in(item)
    return found


# ------------------------------------------------------------------------------ child names


@pytest.mark.parametrize(
    ("owner", "suffix", "expected"),
    [
        pytest.param("gsm8k", "train", "gsm8k-train", id="short"),
        pytest.param("x" * 57, "train", "x" * 57 + "-train", id="exactly-63-untouched"),
        pytest.param(
            "a" * 63,
            "train",
            "a" * 48 + "-cae19c59-train",
            id="63-char-owner-train",
        ),
        pytest.param(
            "a" * 63,
            "workers",
            "a" * 46 + "-007b3702-workers",
            id="63-char-owner-workers",
        ),
        pytest.param(
            "a" * 63,
            "evaluate",
            "a" * 45 + "-2f418c63-evaluate",
            id="63-char-owner-evaluate",
        ),
        pytest.param("a" * 63, "train-rerun-2", None, id="63-char-owner-run-id"),
        pytest.param("b" * 47 + "-" + "c" * 15, "train", None, id="cut-at-a-dash"),
        pytest.param(
            "job",
            "train-" + "r" * 60,
            None,
            id="long-run-id",
        ),
        pytest.param("a" * 63, "train-" + "r" * 40, None, id="long-owner-40-char-run-id"),
        pytest.param(
            "a" * 63,
            "train-" + "r" * 50,
            None,
            id="long-owner-50-char-run-id",
        ),
    ],
)
def test_child_name_is_a_bounded_stable_dns_label(
    owner: str, suffix: str, expected: str | None
) -> None:
    name = child_name(owner, suffix)
    assert len(name) <= 63
    assert DNS_LABEL.match(name), name
    assert "--" not in name
    assert child_name(owner, suffix) == name  # deterministic
    if expected is not None:
        assert name == expected  # stable across releases: renaming would orphan children
    if len(f"{owner}-{suffix}") > 63:
        if len(suffix) + 11 <= 63:  # the whole suffix fits beside the hash
            assert name.endswith(f"-{suffix}")
        else:  # a suffix too long to keep: its first word stays, the hash keeps it unique
            assert name.endswith("-" + suffix.split("-", maxsplit=1)[0])


@pytest.mark.parametrize(
    "owner", [pytest.param("gsm8k", id="short"), pytest.param("a" * 63, id="truncated")]
)
def test_child_name_unique_per_suffix(owner: str) -> None:
    suffixes = ["train", "evaluate", "workers", "train-r1", "train-r2", "evaluate-r1"]
    names = {child_name(owner, s) for s in suffixes}
    assert len(names) == len(suffixes)


def test_child_name_unique_per_owner_when_truncated() -> None:
    owners = ["a" * 60 + "xyz", "a" * 60 + "xyw", "a" * 62 + "b", "a" * 63]
    names = {child_name(o, "train") for o in owners}
    assert len(names) == len(owners)
    assert all(len(n) == 63 for n in names)


# ----------------------------------------------------------------------- every built object


@pytest.mark.parametrize("make", CASES)
def test_build_is_deterministic(make: Callable[[], Built]) -> None:
    job, first = make()
    _, second = make()
    assert first == second
    assert json.dumps(first, sort_keys=False) == json.dumps(second, sort_keys=False)
    # Building does not depend on (or change) the model it is given.
    before = job.model_dump()
    again = (
        finetunejob_manifests.build(job, SETTINGS)
        if isinstance(job, FineTuneJob)
        else evaljob_manifests.build(job, SETTINGS, adapter=ADAPTER, base_model=BASE)
    )
    assert again == first
    assert job.model_dump() == before


def test_building_raises_no_deprecation_warning() -> None:
    job = secrets_job()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finetunejob_manifests.build(job, SETTINGS)
        evaljob_manifests.build(evaljob(), SETTINGS, adapter=ADAPTER, base_model=BASE)
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("make", CASES)
def test_objects_validate_against_kubernetes_openapi(make: Callable[[], Built]) -> None:
    _, objects = make()
    for obj in objects:
        kubernetes_validate.validate(copy.deepcopy(obj), K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        pytest.param(("spec", "template", "spec", "restartPolicyy"), "Never", id="unknown-field"),
        pytest.param(("spec", "backoffLimit"), "2", id="wrong-type"),
    ],
)
def test_openapi_validation_is_not_vacuous(path: tuple[str, ...], value: Any) -> None:
    """Negative control: the schema check above really rejects a broken Job."""
    batch_job = copy.deepcopy(by_kind(finetunejob_manifests.build(finetune(), SETTINGS), "Job"))
    node = batch_job
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(batch_job, K8S_VERSION, strict=True)


@pytest.mark.parametrize("make", CASES)
def test_labels_owner_references_and_names(make: Callable[[], Built]) -> None:
    job, objects = make()
    kind = job.kind
    name = job.metadata.name
    namespace = job.metadata.namespace or "default"
    component = "training" if kind == "FineTuneJob" else "evaluation"
    expected_labels = {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "kubetune-operator",
        "app.kubernetes.io/part-of": "kubetune",
        f"kubetune.io/{kind.lower()}": name,
    }
    owner = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": kind,
        "name": name,
        "uid": UID,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert objects[0]["kind"] == "ConfigMap"
    assert objects[-1]["kind"] == "Job"
    for obj in objects:
        meta = obj["metadata"]
        assert meta["namespace"] == namespace
        assert expected_labels.items() <= meta["labels"].items(), obj["kind"]
        assert meta["ownerReferences"] == [owner], obj["kind"]
        assert len(meta["name"]) <= 63
        assert DNS_LABEL.match(meta["name"]), meta["name"]
        assert all(len(v) <= 63 for v in meta["labels"].values())
    template = by_kind(objects, "Job")["spec"]["template"]
    assert expected_labels.items() <= template["metadata"]["labels"].items()
    # The ConfigMap mounted is the one built alongside.
    config_map = by_kind(objects, "ConfigMap")
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]


@pytest.mark.parametrize("make", CASES)
def test_pod_is_restricted_and_runs_the_runtime(make: Callable[[], Built]) -> None:
    job, objects = make()
    task = "train" if isinstance(job, FineTuneJob) else "evaluate"
    pod = pod_spec(objects)
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["enableServiceLinks"] is False
    c = container(objects)
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in sc
    assert c["command"] == ["kubetune-runtime"]
    assert c["args"] == [task, "--config", "/etc/kubetune/run.json", "--workdir", "/workspace"]
    assert c["image"] == (job.spec.image or SETTINGS.runtime_image)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/etc/kubetune"]["readOnly"] is True
    assert {"/workspace", "/tmp"} <= mounts.keys()  # writable scratch; the root is read-only
    env = env_of(objects)
    assert env["HOME"]["value"] == "/workspace"
    assert env["HF_HOME"]["value"].startswith("/workspace/")


@pytest.mark.parametrize("make", CASES)
def test_no_secret_values_and_every_env_reference_is_provided(make: Callable[[], Built]) -> None:
    _, objects = make()
    assert not [o for o in objects if o["kind"] == "Secret"]
    env = env_of(objects)
    for var in env.values():
        assert ("value" in var) != ("valueFrom" in var), var
        if var["name"].startswith(("KUBETUNE_SECRET_", "AWS_ACCESS", "AWS_SECRET", "AWS_SESSION")):
            assert set(var) == {"name", "valueFrom"}, var
            assert set(var["valueFrom"]) == {"secretKeyRef"}, var
    # Every variable the RunConfig tells the runtime to read exists in the pod.
    config = json.loads(by_kind(objects, "ConfigMap")["data"]["run.json"])
    assert env_names_in(config) <= env.keys()


@pytest.mark.parametrize("make", CASES)
def test_run_json_is_the_rendered_run_config(make: Callable[[], Built]) -> None:
    job, objects = make()
    expected = (
        render_finetune(job)
        if isinstance(job, FineTuneJob)
        else render_eval(job, adapter=ADAPTER, base_model=BASE)
    )
    config_map = by_kind(objects, "ConfigMap")
    assert set(config_map["data"]) == {"run.json"}
    assert json.loads(config_map["data"]["run.json"]) == json.loads(expected.model_dump_json())
    assert run_config_of(objects) == expected


# -------------------------------------------------------------------------------- secrets


def test_s3_keys_come_only_from_the_secret() -> None:
    objects = finetunejob_manifests.build(secrets_job(), SETTINGS)
    env = env_of(objects)
    for var, key in [
        ("AWS_ACCESS_KEY_ID", "access-key"),
        ("AWS_SECRET_ACCESS_KEY", "secret-key"),
        ("AWS_SESSION_TOKEN", "session-token"),
    ]:
        assert env[var] == {
            "name": var,
            "valueFrom": {"secretKeyRef": {"name": S3_CREDS, "key": key}},
        }
    # The CA bundle is a mounted file, not an environment variable with the certificate.
    assert env["AWS_CA_BUNDLE"] == {"name": "AWS_CA_BUNDLE", "value": "/etc/kubetune/ca/ca.crt"}
    ca = next(v for v in pod_spec(objects)["volumes"] if v["name"] == "ca")
    assert ca["secret"] == {"secretName": CA_CREDS, "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    # The Secret names never reach the ConfigMap (which anyone with ConfigMap read can see).
    run_json = by_kind(objects, "ConfigMap")["data"]["run.json"]
    for secret in (S3_CREDS, HF_CREDS, DATA_CREDS, JUDGE_CREDS, CA_CREDS):
        assert secret not in run_json


@pytest.mark.parametrize(
    ("make", "refs"),
    [
        pytest.param(
            secrets_job,
            [(HF_CREDS, "token"), (DATA_CREDS, "token"), (JUDGE_CREDS, "api-key")],
            id="hf-data-judge",
        ),
        pytest.param(finetune, [], id="none"),
        pytest.param(
            lambda: finetune(storage={"caBundle": {"name": CA_CREDS, "key": "ca.crt"}}),
            [],
            id="ca-bundle-is-not-env",
        ),
    ],
)
def test_one_env_var_per_referenced_secret_key(
    make: Callable[[], FineTuneJob], refs: list[tuple[str, str]]
) -> None:
    objects = finetunejob_manifests.build(make(), SETTINGS)
    env = env_of(objects)
    secret_vars = {n: v for n, v in env.items() if n.startswith("KUBETUNE_SECRET_")}
    assert len(secret_vars) == len(refs)
    for name, key in refs:
        var = secret_env_name(SecretKeyRef(name=name, key=key))
        assert secret_vars[var]["valueFrom"] == {"secretKeyRef": {"name": name, "key": key}}
    config = run_config_of(objects)
    if refs:
        assert config.model.token_env == secret_env_name(SecretKeyRef(name=HF_CREDS, key="token"))
        assert config.data is not None
        assert config.data.train.token_env == secret_env_name(
            SecretKeyRef(name=DATA_CREDS, key="token")
        )


@pytest.mark.parametrize(
    ("storage", "service_account"),
    [
        pytest.param(None, None, id="no-storage"),
        pytest.param({"region": "us-east-1"}, None, id="ambient"),
        pytest.param({"credentials": {"secretRef": {"name": S3_CREDS}}}, None, id="secret"),
        pytest.param(
            {"credentials": {"serviceAccountName": "trainer-irsa"}},
            "trainer-irsa",
            id="workload-identity",
        ),
    ],
)
def test_service_account_token_only_with_workload_identity(
    storage: dict[str, Any] | None, service_account: str | None
) -> None:
    job = finetune(**({"storage": storage} if storage else {}))
    pod = pod_spec(finetunejob_manifests.build(job, SETTINGS))
    if service_account is None:
        assert pod["automountServiceAccountToken"] is False
        assert "serviceAccountName" not in pod
    else:
        assert pod["serviceAccountName"] == service_account
        assert pod.get("automountServiceAccountToken") is not False


# ------------------------------------------------------------------- resources, scheduling


@pytest.mark.parametrize(
    ("resources", "expected", "shm"),
    [
        pytest.param(None, None, None, id="none"),
        pytest.param({"cpu": "4"}, {"requests": {"cpu": "4"}}, None, id="cpu-no-limit"),
        pytest.param(
            {"gpu": {"count": 2}, "cpu": "8", "memory": "64Gi"},
            {
                "requests": {"cpu": "8", "memory": "64Gi"},
                "limits": {"memory": "64Gi", "nvidia.com/gpu": "2"},
            },
            "1Gi",
            id="gpu-default-shm",
        ),
        pytest.param(
            {"gpu": {"count": 1}, "memory": "32Gi", "ephemeralStorage": "50Gi"},
            {
                "requests": {"memory": "32Gi", "ephemeral-storage": "50Gi"},
                "limits": {"memory": "32Gi", "ephemeral-storage": "50Gi", "nvidia.com/gpu": "1"},
            },
            "1Gi",
            id="ephemeral-request-equals-limit",
        ),
        pytest.param(
            {"gpu": {"count": 8, "resourceName": "amd.com/gpu"}, "sharedMemory": "64Gi"},
            {"limits": {"amd.com/gpu": "8"}},
            "64Gi",
            id="other-vendor-explicit-shm",
        ),
        pytest.param(
            {"gpu": {"count": 0}, "cpu": "2"}, {"requests": {"cpu": "2"}}, None, id="gpu-count-0"
        ),
        pytest.param({"sharedMemory": "2Gi"}, None, "2Gi", id="cpu-with-shm"),
    ],
)
def test_resources_mapping(
    resources: dict[str, Any] | None, expected: dict[str, Any] | None, shm: str | None
) -> None:
    job = finetune(**({"resources": resources} if resources else {}))
    objects = finetunejob_manifests.build(job, SETTINGS)
    c = container(objects)
    assert c.get("resources") == expected
    if expected:
        assert "cpu" not in expected.get("limits", {})  # never throttle the training loop
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    if shm is None:
        assert "shm" not in volumes
        assert "shm" not in mounts
    else:
        assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": shm}
        assert mounts["shm"] == "/dev/shm"


def test_scheduling_fields() -> None:
    pod = pod_spec(finetunejob_manifests.build(gpu_job(), SETTINGS))
    assert pod["nodeSelector"] == {
        "pool": "training",
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
    }
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {
            "key": "spot",
            "operator": "Equal",
            "value": "true",
            "effect": "NoExecute",
            "tolerationSeconds": 30,
        },
    ]
    assert pod["priorityClassName"] == "training-high"


def test_no_scheduling_fields_by_default() -> None:
    pod = pod_spec(finetunejob_manifests.build(finetune(), SETTINGS))
    assert not {"nodeSelector", "tolerations", "priorityClassName"} & pod.keys()


def test_gpu_product_alone_is_a_node_selector() -> None:
    job = finetune(resources={"gpu": {"count": 1, "product": "NVIDIA-L40S"}})
    pod = pod_spec(finetunejob_manifests.build(job, SETTINGS))
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L40S"}


# ---------------------------------------------------------------------- Job lifecycle fields


@pytest.mark.parametrize(
    ("spec", "suspended", "queue"),
    [
        pytest.param({}, False, None, id="runs"),
        pytest.param({"suspend": True}, True, None, id="suspended"),
        pytest.param({"scheduling": {"queueName": "team-a"}}, True, "team-a", id="kueue"),
        pytest.param(
            {"suspend": True, "scheduling": {"queueName": "team-a"}}, True, "team-a", id="both"
        ),
    ],
)
def test_suspend_and_kueue(spec: dict[str, Any], suspended: bool, queue: str | None) -> None:
    batch_job = by_kind(finetunejob_manifests.build(finetune(**spec), SETTINGS), "Job")
    assert batch_job["spec"]["suspend"] is suspended
    labels = batch_job["metadata"]["labels"]
    if queue is None:
        assert "kueue.x-k8s.io/queue-name" not in labels
    else:
        assert labels["kueue.x-k8s.io/queue-name"] == queue


@pytest.mark.parametrize(
    ("spec", "deadline", "backoff"),
    [
        pytest.param({}, None, 2, id="defaults"),
        pytest.param({"activeDeadlineSeconds": 7200, "backoffLimit": 0}, 7200, 0, id="set"),
        pytest.param({"backoffLimit": 20}, None, 20, id="max-backoff"),
    ],
)
def test_deadline_and_backoff_are_copied(
    spec: dict[str, Any], deadline: int | None, backoff: int
) -> None:
    batch_job = by_kind(finetunejob_manifests.build(finetune(**spec), SETTINGS), "Job")
    assert batch_job["spec"].get("activeDeadlineSeconds") == deadline
    assert batch_job["spec"]["backoffLimit"] == backoff


@pytest.mark.parametrize("make", CASES)
def test_pod_failure_policy(make: Callable[[], Built]) -> None:
    _, objects = make()
    rules = by_kind(objects, "Job")["spec"]["podFailurePolicy"]["rules"]
    assert {
        "action": "FailJob",
        "onExitCodes": {"containerName": "runtime", "operator": "In", "values": [2, 3]},
    } in rules
    assert {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    } in rules
    assert container(objects)["name"] == "runtime"


# ------------------------------------------------------------------------------ multi-node


def test_multi_node_indexed_job_with_headless_service() -> None:
    settings = OperatorSettings(master_port=29600)
    objects = finetunejob_manifests.build(multinode_job(), settings)
    assert [o["kind"] for o in objects] == ["ConfigMap", "Service", "Job"]
    batch_job = by_kind(objects, "Job")
    job_name = batch_job["metadata"]["name"]
    assert job_name == "llama-full-train"
    spec = batch_job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    service = by_kind(objects, "Service")
    service_name = service["metadata"]["name"]
    assert service_name == "llama-full-workers"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {
        "kubetune.io/finetunejob": "llama-full",
        "app.kubernetes.io/component": "training",
    }
    assert service["spec"]["ports"] == [{"name": "rendezvous", "port": 29600}]
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service_name
    env = env_of(objects)
    assert env["MASTER_ADDR"]["value"] == f"{job_name}-0.{service_name}.team-a.svc"
    assert env["MASTER_PORT"]["value"] == "29600"
    assert container(objects)["ports"] == [{"name": "rendezvous", "containerPort": 29600}]
    assert container(objects)["resources"]["limits"]["nvidia.com/gpu"] == "8"
    config = run_config_of(objects)
    assert (config.distributed.nodes, config.distributed.processes_per_node) == (2, 8)
    # Queued through Kueue: both pods are admitted together or not at all.
    assert spec["suspend"] is True
    assert pod["serviceAccountName"] == "kubetune-trainer"


def test_single_node_has_no_service_or_rendezvous() -> None:
    objects = finetunejob_manifests.build(gpu_job(), SETTINGS)
    assert [o["kind"] for o in objects] == ["ConfigMap", "Job"]
    spec = by_kind(objects, "Job")["spec"]
    assert spec["completionMode"] == "NonIndexed"
    assert spec["completions"] == spec["parallelism"] == 1
    assert "subdomain" not in spec["template"]["spec"]
    assert not {"MASTER_ADDR", "MASTER_PORT"} & env_of(objects).keys()
    assert "ports" not in container(objects)


def test_multi_node_pod_hostnames_fit_a_dns_label() -> None:
    objects = finetunejob_manifests.build(multinode_job("m" * 63), SETTINGS)
    batch_job = by_kind(objects, "Job")
    nodes = batch_job["spec"]["completions"]
    for index in range(nodes):
        hostname = f"{batch_job['metadata']['name']}-{index}"
        assert len(hostname) <= 63
        assert DNS_LABEL.match(hostname)
    master = env_of(objects)["MASTER_ADDR"]["value"]
    assert all(len(label) <= 63 for label in master.split("."))


def test_multi_node_service_name_is_a_dns_1035_label() -> None:
    objects = finetunejob_manifests.build(multinode_job("8b-full"), SETTINGS)
    service = by_kind(objects, "Service")
    assert DNS_1035_LABEL.match(service["metadata"]["name"])


# ------------------------------------------------------------------------------ run IDs


def test_run_id_makes_a_new_job() -> None:
    names = {}
    for run_id in (None, "r1", "r2"):
        job = finetune(**({"runId": run_id} if run_id else {}))
        objects = finetunejob_manifests.build(job, SETTINGS)
        names[run_id] = (
            by_kind(objects, "ConfigMap")["metadata"]["name"],
            by_kind(objects, "Job")["metadata"]["name"],
        )
        assert run_config_of(objects).run.run_id == run_id
    assert names[None] == ("gsm8k-train", "gsm8k-train")
    assert names["r1"] == ("gsm8k-train-r1", "gsm8k-train-r1")
    assert names["r2"] == ("gsm8k-train-r2", "gsm8k-train-r2")


def test_run_id_keeps_the_service_and_moves_its_selector() -> None:
    first = finetunejob_manifests.build(multinode_job(), SETTINGS)
    second = finetunejob_manifests.build(multinode_job(runId="retry"), SETTINGS)
    service_1, service_2 = by_kind(first, "Service"), by_kind(second, "Service")
    assert service_1["metadata"]["name"] == service_2["metadata"]["name"]
    job_2 = by_kind(second, "Job")["metadata"]["name"]
    assert job_2 == "llama-full-train-retry"
    # One selector for every run (the Service is created once and kept): the resource's pods.
    assert service_1["spec"]["selector"] == service_2["spec"]["selector"]
    pod_labels = by_kind(second, "Job")["spec"]["template"]["metadata"]["labels"]
    assert service_2["spec"]["selector"].items() <= pod_labels.items()
    assert env_of(second)["MASTER_ADDR"]["value"].startswith(f"{job_2}-0.")


def test_run_id_with_a_long_name_is_truncated() -> None:
    objects = finetunejob_manifests.build(finetune("n" * 40, runId="r" * 40), SETTINGS)
    name = by_kind(objects, "Job")["metadata"]["name"]
    assert len(name) == 63
    assert name.endswith("-train-" + "r" * 40)


@pytest.mark.parametrize(
    ("name", "run_id"),
    [
        pytest.param("n" * 63, "r" * 40, id="63-char-name-40-char-run-id"),
        pytest.param("gsm8k", "r" * 40, id="40-char-run-id"),
    ],
)
def test_long_run_id_still_gives_valid_names(name: str, run_id: str) -> None:
    objects = finetunejob_manifests.build(finetune(name, runId=run_id), SETTINGS)
    for obj in objects:
        assert len(obj["metadata"]["name"]) <= 63
        assert DNS_LABEL.match(obj["metadata"]["name"])


# ------------------------------------------------------------------------------- progress


def test_progress_token_secret_is_mounted_where_the_runconfig_reads_it() -> None:
    settings = OperatorSettings(progress_base_url="https://kubetune-operator.kubetune.svc/p/")
    objects = finetunejob_manifests.build(finetune(), settings)
    config = run_config_of(objects)
    assert config.progress is not None
    assert config.progress.url == "https://kubetune-operator.kubetune.svc/p/team-a/gsm8k"
    mounts = {m["mountPath"]: m for m in container(objects)["volumeMounts"]}
    token_dir = config.progress.token_file.rsplit("/", 1)[0]
    assert mounts[token_dir]["readOnly"] is True
    volumes = {v["name"]: v for v in by_kind(objects, "Job")["spec"]["template"]["spec"]["volumes"]}
    secret = volumes[mounts[token_dir]["name"]]["secret"]
    assert secret["secretName"] == finetunejob_manifests.progress_secret_name(finetune())


def test_no_progress_endpoint_means_no_progress_config_or_token() -> None:
    objects = finetunejob_manifests.build(finetune(), SETTINGS)
    assert run_config_of(objects).progress is None
    assert all("progress" not in m["mountPath"] for m in container(objects)["volumeMounts"])


# -------------------------------------------------------------------------------- EvalJob


def test_evaljob_build_with_a_resolved_adapter() -> None:
    job = evaljob(suites=EVALUATION_WITH_JUDGE["suites"], storage=FULL_STORAGE, runId="again")
    adapter = AdapterRef(uri="s3://models/other/adapter", digest="sha256:" + "cd" * 32)
    base = BaseModelSpec.model_validate({"uri": "s3://models/mirror/base"})
    objects = evaljob_manifests.build(job, SETTINGS, adapter=adapter, base_model=base)
    assert [o["kind"] for o in objects] == ["ConfigMap", "Job"]
    batch_job = by_kind(objects, "Job")
    assert batch_job["metadata"]["name"] == "gsm8k-eval-evaluate-again"
    assert batch_job["metadata"]["labels"]["app.kubernetes.io/component"] == "evaluation"
    assert batch_job["metadata"]["labels"]["kubetune.io/evaljob"] == "gsm8k-eval"
    assert container(objects)["args"][0] == "evaluate"
    config = run_config_of(objects)
    assert config == render_eval(job, adapter=adapter, base_model=base)
    assert config.task == "evaluate"
    assert config.adapter == adapter
    assert config.model.uri == "s3://models/mirror/base"
    judge_env = secret_env_name(SecretKeyRef(name=JUDGE_CREDS, key="api-key"))
    assert env_of(objects)[judge_env]["valueFrom"] == {
        "secretKeyRef": {"name": JUDGE_CREDS, "key": "api-key"}
    }
    assert JUDGE_CREDS not in by_kind(objects, "ConfigMap")["data"]["run.json"]


def test_evaljob_resolved_base_model_token_reaches_the_pod() -> None:
    doc = eval_doc(target={"fineTuneJobRef": {"name": "gsm8k"}})
    del doc["spec"]["baseModel"]
    job = parse_manifest(doc)
    assert isinstance(job, EvalJob)
    base = BaseModelSpec.model_validate(
        {
            "uri": "hf://meta-llama/Llama-3.1-8B@main",
            "tokenSecretRef": {"name": HF_CREDS, "key": "t"},
        }
    )
    objects = evaljob_manifests.build(job, SETTINGS, adapter=ADAPTER, base_model=base)
    token_env = run_config_of(objects).model.token_env
    assert token_env is not None
    assert env_of(objects)[token_env]["valueFrom"] == {
        "secretKeyRef": {"name": HF_CREDS, "key": "t"}
    }
