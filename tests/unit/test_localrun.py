"""`kubetune run`'s pure parts: manifest loading, pod environment and path mapping, targets.

Nothing here trains or starts a process: ``execute`` is covered by the integration tests.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_operator.api import EvalJob, FineTuneJob
from kubetune_operator.localrun import (
    LocalRunError,
    _local_path,
    build_objects,
    container_environment,
    load_manifest,
    run_dir,
)
from kubetune_operator.manifests import finetunejob as finetunejob_manifests
from kubetune_operator.manifests.common import OperatorSettings
from kubetune_operator.manifests.jobs import run_config_of
from kubetune_operator.validation import ManifestInvalid, parse_manifest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SETTINGS = OperatorSettings()
DIGEST = "sha256:" + "ab" * 32
OTHER_DIGEST = "sha256:" + "cd" * 32

CONFIG = Path("/local/jobs/ns/finetunejob/x/config")
WORKSPACE = Path("/local/jobs/ns/finetunejob/x/workspace")
TMP = Path("/local/tmp-123")
MOUNTS = {"/etc/kubetune": CONFIG, "/workspace": WORKSPACE, "/tmp": TMP}


def finetune_doc(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "gsm8k", "namespace": "team-a"},
        "spec": {
            "baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct@main"},
            "dataset": {"train": {"uri": "s3://data/gsm8k/train.jsonl"}},
            "output": {"uri": "s3://models/team-a/gsm8k"},
            **spec,
        },
    }


def eval_doc(target: dict[str, Any], namespace: str | None = "team-a", **spec: Any) -> Any:
    metadata: dict[str, Any] = {"name": "gsm8k-eval"}
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "EvalJob",
        "metadata": metadata,
        "spec": {
            "target": target,
            "suites": [
                {
                    "name": "heldout",
                    "type": "perplexity",
                    "dataset": {"uri": "s3://data/test.jsonl"},
                }
            ],
            "output": {"uri": "s3://eval/gsm8k"},
            **spec,
        },
    }


def write(tmp_path: Path, *docs: Any, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False), encoding="utf-8")
    return path


def load(tmp_path: Path, doc: Any, overrides: Sequence[str] = (), s3: str | None = None) -> Any:
    return load_manifest(write(tmp_path, doc), list(overrides), s3)


# ------------------------------------------------------------------------------ paths


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("/workspace", str(WORKSPACE), id="mount-itself"),
        pytest.param("/workspace/.cache/hf", f"{WORKSPACE}/.cache/hf", id="under-mount"),
        pytest.param("/etc/kubetune/run.json", f"{CONFIG}/run.json", id="config-file"),
        pytest.param("/tmp", str(TMP), id="tmp"),
        pytest.param("/tmp/x/y", f"{TMP}/x/y", id="under-tmp"),
        pytest.param("/workspacefoo", "/workspacefoo", id="prefix-is-not-a-parent"),
        pytest.param("/etc/kubetune.d/x", "/etc/kubetune.d/x", id="sibling-with-prefix"),
        pytest.param("/etc/hosts", "/etc/hosts", id="unmapped-absolute"),
        pytest.param("workspace/x", "workspace/x", id="relative"),
        pytest.param("s3://bucket/workspace/x", "s3://bucket/workspace/x", id="uri"),
        pytest.param("1", "1", id="plain-value"),
        pytest.param("", "", id="empty"),
    ],
)
def test_local_path(value: str, expected: str) -> None:
    assert _local_path(value, MOUNTS) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("/etc/kubetune/ca/ca.crt", "/local/ca/ca.crt", id="longest-wins"),
        pytest.param("/etc/kubetune/ca", "/local/ca", id="longest-exact"),
        pytest.param("/etc/kubetune/run.json", f"{CONFIG}/run.json", id="middle"),
        pytest.param("/etc/passwd", "/local/etc/passwd", id="shortest"),
        pytest.param("/etc/kubetune/cafe", f"{CONFIG}/cafe", id="not-the-ca-mount"),
    ],
)
def test_local_path_longest_prefix(value: str, expected: str) -> None:
    # Shortest first, so dict order alone would pick the wrong mount.
    mounts = {
        "/etc": Path("/local/etc"),
        "/etc/kubetune": CONFIG,
        "/etc/kubetune/ca": Path("/local/ca"),
    }
    assert _local_path(value, mounts) == expected


def test_run_dir_layout(tmp_path: Path) -> None:
    local = run_dir(tmp_path, "FineTuneJob", "team-a", "gsm8k")
    root = tmp_path / "jobs" / "team-a" / "finetunejob" / "gsm8k"
    assert local.root == root
    assert local.config_dir == root / "config"
    assert local.workspace == root / "workspace"
    assert local.result_file == root / "result.json"
    assert local.termination_log == root / "termination-log"
    assert local.log_file == root / "runtime.log"
    assert run_dir(tmp_path, "EvalJob", "default", "e").root == tmp_path / "jobs/default/evaljob/e"


# ----------------------------------------------------------------------- container env


def secret_var(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


CONTAINER = {
    "name": "runtime",
    "env": [
        {"name": "HOME", "value": "/workspace"},
        {"name": "HF_HOME", "value": "/workspace/.cache/huggingface"},
        {"name": "CONFIG", "value": "/etc/kubetune/run.json"},
        {"name": "SCRATCH", "value": "/tmp/scratch"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "UNMAPPED", "value": "/workspaces-not-mine"},
        secret_var("AWS_ACCESS_KEY_ID", "s3-creds", "access-key"),
        secret_var("AWS_SECRET_ACCESS_KEY", "s3-creds", "secret-key"),
        secret_var("KUBETUNE_SECRET_ABC", "hf-token", "token"),
    ],
}
ALL_SECRETS = {
    "AWS_ACCESS_KEY_ID": "local-id",
    "AWS_SECRET_ACCESS_KEY": "local-secret",
    "KUBETUNE_SECRET_ABC": "hf_local",
}


def test_container_environment_maps_paths_and_takes_secrets_from_environ() -> None:
    environ = {**ALL_SECRETS, "HOME": "/home/me", "PATH": "/usr/bin"}
    env = container_environment(CONTAINER, MOUNTS, environ)
    assert env == {
        "HOME": str(WORKSPACE),
        "HF_HOME": f"{WORKSPACE}/.cache/huggingface",
        "CONFIG": f"{CONFIG}/run.json",
        "SCRATCH": f"{TMP}/scratch",
        "PYTHONUNBUFFERED": "1",
        "UNMAPPED": "/workspaces-not-mine",
        **ALL_SECRETS,
    }
    # Only the container's own variables: the caller layers them over os.environ.
    assert "PATH" not in env


def test_container_environment_empty_secret_value_counts_as_set() -> None:
    env = container_environment(CONTAINER, MOUNTS, {**ALL_SECRETS, "KUBETUNE_SECRET_ABC": ""})
    assert env["KUBETUNE_SECRET_ABC"] == ""


@pytest.mark.parametrize(
    ("environ", "missing"),
    [
        pytest.param(
            {},
            [
                "AWS_ACCESS_KEY_ID (Secret s3-creds, key access-key)",
                "AWS_SECRET_ACCESS_KEY (Secret s3-creds, key secret-key)",
                "KUBETUNE_SECRET_ABC (Secret hf-token, key token)",
            ],
            id="all-missing",
        ),
        pytest.param(
            {"AWS_ACCESS_KEY_ID": "value-zq81x-1", "AWS_SECRET_ACCESS_KEY": "value-zq81x-2"},
            ["KUBETUNE_SECRET_ABC (Secret hf-token, key token)"],
            id="one-missing",
        ),
        pytest.param(
            {"KUBETUNE_SECRET_ABC": "value-zq81x-3", "aws_access_key_id": "value-zq81x-4"},
            [
                "AWS_ACCESS_KEY_ID (Secret s3-creds, key access-key)",
                "AWS_SECRET_ACCESS_KEY (Secret s3-creds, key secret-key)",
            ],
            id="names-are-case-sensitive",
        ),
    ],
)
def test_container_environment_lists_every_missing_secret(
    environ: dict[str, str], missing: list[str]
) -> None:
    with pytest.raises(LocalRunError) as raised:
        container_environment(CONTAINER, MOUNTS, environ)
    message = str(raised.value)
    for entry in missing:
        assert entry in message
    assert message.count("(Secret ") == len(missing)
    for value in environ.values():
        assert value not in message  # names the variables, never echoes values


def test_container_environment_of_a_built_pod() -> None:
    """The real container of the lora example: S3 keys from the environment, paths mapped."""
    doc = yaml.safe_load((EXAMPLES / "finetunejob-lora-gsm8k.yaml").read_text(encoding="utf-8"))
    job = load_manifest_from_doc(doc)
    objects = finetunejob_manifests.build(job, SETTINGS)
    job_obj = next(o for o in objects if o["kind"] == "Job")
    container = job_obj["spec"]["template"]["spec"]["containers"][0]
    with pytest.raises(LocalRunError) as raised:
        container_environment(container, MOUNTS, {})
    assert "AWS_ACCESS_KEY_ID (Secret minio-training-creds, key AWS_ACCESS_KEY_ID)" in str(
        raised.value
    )
    environ = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}
    env = container_environment(container, MOUNTS, environ)
    assert env["AWS_ACCESS_KEY_ID"] == "id"
    assert env["HOME"] == str(WORKSPACE)
    assert env["KUBETUNE_WORKDIR"] == str(WORKSPACE)
    assert env["TRITON_CACHE_DIR"] == f"{WORKSPACE}/.cache/triton"


def load_manifest_from_doc(doc: dict[str, Any]) -> FineTuneJob:
    job = parse_manifest(doc)
    assert isinstance(job, FineTuneJob)
    return job


# ---------------------------------------------------------------------------- load_manifest


def test_load_manifest_applies_overrides_before_validating(tmp_path: Path) -> None:
    job = load(
        tmp_path,
        finetune_doc(training={"epochs": 2}),
        ["spec.training.epochs=null", "spec.training.maxSteps=7", "spec.output.merge=true"],
    )
    assert isinstance(job, FineTuneJob)
    assert job.spec.training is not None
    assert job.spec.training.max_steps == 7
    assert job.spec.training.epochs is None  # epochs + maxSteps together would be invalid
    assert job.spec.output.merge is True


def test_load_manifest_override_makes_a_valid_manifest(tmp_path: Path) -> None:
    """An override can repair a manifest that would not validate on its own."""
    doc = finetune_doc()
    del doc["spec"]["output"]
    job = load(tmp_path, doc, ["spec.output.uri=s3://models/fixed"])
    assert job.spec.output.uri == "s3://models/fixed"


@pytest.mark.parametrize(
    ("overrides", "path", "text"),
    [
        pytest.param(["spec.training.maxSteps=abc"], "spec.training.maxSteps", "", id="type"),
        pytest.param(
            ["spec.training.learningRate=0.0002"],
            "spec.training.learningRate",
            "",
            id="yaml-float-for-decimal",
        ),
        pytest.param(["spec.training.maxStep=3"], "spec.training.maxStep", "unknown", id="typo"),
        pytest.param(
            ["spec.training.maxSteps=5", "spec.training.epochs=2"],
            "spec.training.maxSteps",
            "at most one of epochs and maxSteps",
            id="cel-rule",
        ),
        pytest.param(["spec.output=null"], "spec.output", "required", id="removed-required"),
        pytest.param(["spec.distributed.nodes=0"], "spec.distributed.nodes", "", id="out-of-range"),
    ],
)
def test_load_manifest_invalid_override_names_the_field(
    tmp_path: Path, overrides: list[str], path: str, text: str
) -> None:
    with pytest.raises(ManifestInvalid) as raised:
        load(tmp_path, finetune_doc(), overrides)
    problems = raised.value.problems
    assert any(p.path == path and text in p.message for p in problems), problems


@pytest.mark.parametrize(
    ("storage", "s3", "expected"),
    [
        pytest.param(
            None,
            "http://localhost:9000",
            {"endpoint": "http://localhost:9000", "pathStyle": True},
            id="no-storage",
        ),
        pytest.param(
            {"region": "eu-west-1"},
            "http://localhost:9000",
            {"endpoint": "http://localhost:9000", "pathStyle": True, "region": "eu-west-1"},
            id="keeps-other-fields",
        ),
        pytest.param(
            {"endpoint": "https://minio.svc:9000", "pathStyle": True},
            "http://localhost:9000",
            {"endpoint": "https://minio.svc:9000", "pathStyle": True},
            id="explicit-endpoint-wins",
        ),
        pytest.param(
            {"pathStyle": False},
            "http://localhost:9000",
            {"endpoint": "http://localhost:9000", "pathStyle": False},
            id="explicit-path-style-wins",
        ),
        pytest.param(
            {"endpoint": "https://s3.eu-west-1.amazonaws.com"},
            "http://localhost:9000",
            {"endpoint": "https://s3.eu-west-1.amazonaws.com", "pathStyle": False},
            id="explicit-endpoint-keeps-its-addressing",
        ),
        pytest.param(
            {"region": "eu-west-1"}, None, {"pathStyle": False, "region": "eu-west-1"}, id="no-s3"
        ),
        pytest.param(None, None, None, id="no-s3-no-storage"),
    ],
)
def test_load_manifest_s3_endpoint(
    tmp_path: Path,
    storage: dict[str, Any] | None,
    s3: str | None,
    expected: dict[str, Any] | None,
) -> None:
    doc = finetune_doc(**({"storage": storage} if storage is not None else {}))
    job = load(tmp_path, doc, [], s3)
    got = (
        job.spec.storage.model_dump(by_alias=True, exclude_none=True) if job.spec.storage else None
    )
    assert got == expected


def test_load_manifest_s3_endpoint_with_null_storage(tmp_path: Path) -> None:
    job = load(tmp_path, finetune_doc(storage=None), [], "http://localhost:9000")
    assert job.spec.storage is not None
    assert job.spec.storage.endpoint == "http://localhost:9000"


def test_load_manifest_override_beats_s3_endpoint(tmp_path: Path) -> None:
    job = load(
        tmp_path,
        finetune_doc(),
        ["spec.storage.endpoint=https://from-set:9000", "spec.storage.pathStyle=false"],
        "http://localhost:9000",
    )
    assert job.spec.storage.endpoint == "https://from-set:9000"
    assert job.spec.storage.path_style is False


def test_load_manifest_s3_endpoint_applies_to_evaljob(tmp_path: Path) -> None:
    doc = eval_doc(
        {"adapter": {"uri": "s3://models/a", "digest": DIGEST}},
        baseModel={"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct@main"},
    )
    job = load(tmp_path, doc, [], "http://127.0.0.1:9000")
    assert isinstance(job, EvalJob)
    assert job.spec.storage is not None
    assert job.spec.storage.endpoint == "http://127.0.0.1:9000"


def test_load_manifest_does_not_change_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, finetune_doc())
    before = path.read_text(encoding="utf-8")
    load_manifest(path, ["spec.training.maxSteps=3"], "http://localhost:9000")
    assert path.read_text(encoding="utf-8") == before


@pytest.mark.parametrize(
    ("docs", "count"),
    [
        pytest.param([finetune_doc(), finetune_doc()], 2, id="two"),
        pytest.param([], 0, id="empty"),
    ],
)
def test_load_manifest_refuses_other_than_one_document(
    tmp_path: Path, docs: list[Any], count: int
) -> None:
    path = write(tmp_path, *docs)
    with pytest.raises(LocalRunError, match=f"expected one manifest, found {count} documents"):
        load_manifest(path, [], None)


def test_load_manifest_refuses_an_adapter_deployment(tmp_path: Path) -> None:
    path = EXAMPLES / "adapterdeployment-three-adapters.yaml"
    with pytest.raises(LocalRunError, match="FineTuneJob and EvalJob, not AdapterDeployment"):
        load_manifest(path, [], None)


def test_load_manifest_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("spec: [unclosed\n", encoding="utf-8")
    with pytest.raises(ManifestInvalid, match="invalid YAML"):
        load_manifest(path, [], None)


def test_load_manifest_examples(tmp_path: Path) -> None:
    for name in ("finetunejob-lora-gsm8k.yaml", "quickstart/finetunejob.yaml"):
        job = load_manifest(EXAMPLES / name, [], None)
        assert isinstance(job, FineTuneJob)


# ---------------------------------------------------------------------------- build_objects


def test_build_objects_refuses_multi_node(tmp_path: Path) -> None:
    job = load_manifest(EXAMPLES / "finetunejob-full-zero3-2x8.yaml", [], None)
    with pytest.raises(LocalRunError) as raised:
        build_objects(job, tmp_path, SETTINGS)
    message = str(raised.value)
    assert "spec.distributed.nodes is 2" in message
    assert "--set spec.distributed.nodes=1" in message


def test_build_objects_single_node_after_the_hint(tmp_path: Path) -> None:
    job = load_manifest(
        EXAMPLES / "finetunejob-full-zero3-2x8.yaml", ["spec.distributed.nodes=1"], None
    )
    objects = build_objects(job, tmp_path, SETTINGS)
    assert [o["kind"] for o in objects] == ["ConfigMap", "Job"]
    assert objects == finetunejob_manifests.build(job, SETTINGS)  # the operator's own builder
    assert run_config_of(objects).distributed.nodes == 1


def test_build_objects_evaljob_adapter_uri(tmp_path: Path) -> None:
    doc = eval_doc(
        {"adapter": {"uri": "s3://models/x/adapter", "digest": DIGEST}},
        baseModel={"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct@main"},
    )
    job = load(tmp_path, doc)
    config = run_config_of(build_objects(job, tmp_path / "work", SETTINGS))
    assert config.task == "evaluate"
    assert config.adapter is not None
    assert (config.adapter.uri, config.adapter.digest) == ("s3://models/x/adapter", DIGEST)
    assert config.model.uri == "hf://Qwen/Qwen2.5-0.5B-Instruct@main"


def write_result(
    workdir: Path,
    namespace: str,
    name: str,
    artifact: dict[str, Any] | None,
    base_model: dict[str, Any] | None = None,
) -> Path:
    local = run_dir(workdir, "FineTuneJob", namespace, name)
    local.root.mkdir(parents=True)
    status = "Succeeded" if artifact else "Failed"
    record = {
        "exitCode": 0 if artifact else 1,
        "result": {"status": status, "reason": "Done", "artifact": artifact},
        "baseModel": base_model or {"uri": "s3://models/tiny-base"},
    }
    local.result_file.write_text(json.dumps(record), encoding="utf-8")
    return local.result_file


@pytest.mark.parametrize(
    ("namespace", "lookup"),
    [
        pytest.param("team-a", "team-a", id="namespaced"),
        pytest.param(None, "default", id="default"),
    ],
)
def test_build_objects_evaljob_from_an_earlier_local_run(
    tmp_path: Path, namespace: str | None, lookup: str
) -> None:
    artifact = {"uri": "s3://models/team-a/gsm8k/adapter", "digest": OTHER_DIGEST}
    write_result(tmp_path, lookup, "gsm8k", artifact)
    job = load(tmp_path, eval_doc({"fineTuneJobRef": {"name": "gsm8k"}}, namespace=namespace))
    config = run_config_of(build_objects(job, tmp_path, SETTINGS))
    assert config.adapter is not None
    assert (config.adapter.uri, config.adapter.digest) == (artifact["uri"], OTHER_DIGEST)
    assert config.model.uri == "s3://models/tiny-base"  # the FineTuneJob's base


def test_build_objects_evaljob_base_model_overrides_the_recorded_one(tmp_path: Path) -> None:
    write_result(tmp_path, "team-a", "gsm8k", {"uri": "s3://models/adapter", "digest": DIGEST})
    doc = eval_doc(
        {"fineTuneJobRef": {"name": "gsm8k"}}, baseModel={"uri": "s3://models/other-base"}
    )
    config = run_config_of(build_objects(load(tmp_path, doc), tmp_path, SETTINGS))
    assert config.model.uri == "s3://models/other-base"


def test_build_objects_evaljob_without_an_earlier_run(tmp_path: Path) -> None:
    job = load(tmp_path, eval_doc({"fineTuneJobRef": {"name": "never-ran"}}))
    with pytest.raises(LocalRunError) as raised:
        build_objects(job, tmp_path, SETTINGS)
    message = str(raised.value)
    assert "FineTuneJob team-a/never-ran has no local result" in message
    assert "kubetune run" in message
    assert "uri and digest" in message


def test_build_objects_evaljob_ref_to_a_run_without_artifact(tmp_path: Path) -> None:
    write_result(tmp_path, "team-a", "gsm8k", None)
    job = load(tmp_path, eval_doc({"fineTuneJobRef": {"name": "gsm8k"}}))
    with pytest.raises(LocalRunError, match="did not publish an artifact"):
        build_objects(job, tmp_path, SETTINGS)


def test_build_objects_evaljob_ref_in_another_namespace_is_not_used(tmp_path: Path) -> None:
    write_result(tmp_path, "other", "gsm8k", {"uri": "s3://models/adapter", "digest": DIGEST})
    job = load(tmp_path, eval_doc({"fineTuneJobRef": {"name": "gsm8k"}}))
    with pytest.raises(LocalRunError, match="has no local result"):
        build_objects(job, tmp_path, SETTINGS)


def test_build_objects_refuses_an_adapter_deployment_target(tmp_path: Path) -> None:
    doc = eval_doc(
        {"adapterDeploymentRef": {"name": "llama-support", "adapter": "support-en"}},
        baseModel={"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct@main"},
    )
    job = load(tmp_path, doc)
    with pytest.raises(LocalRunError) as raised:
        build_objects(job, tmp_path, SETTINGS)
    message = str(raised.value)
    assert "adapterDeploymentRef" in message
    assert "AdapterDeployment" in message
    assert "uri and digest" in message
