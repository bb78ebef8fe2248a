"""kubetune against a real S3 server: SeaweedFS ``weed mini`` with enforced credentials.

1. The server refuses wrong credentials (so passing tests below prove the keys were used).
2. The runtime's storage layer (``S3Storage`` via ``open_storage``): multipart transfers, and
   ``publish_dir`` / ``fetch_verified`` round trips with ``_COMPLETE`` written last.
3. The product's main job: ``kubetune run`` of a FineTuneJob with an S3 endpoint publishes a
   verified adapter to the server (not to the embedded storage); an EvalJob pinned to that
   artifact by URI and digest evaluates it; the same EvalJob with a wrong digest is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from botocore.exceptions import ClientError

from kubetune_operator.cli.main import main as kubetune_main
from kubetune_runtime.config import StorageConfig
from kubetune_runtime.errors import ArtifactInvalid, StorageFailure
from kubetune_runtime.storage.artifacts import (
    COMPLETE_MARKER,
    MANIFEST_NAME,
    fetch_verified,
    publish_dir,
    write_manifest,
)
from kubetune_runtime.storage.backends import S3Storage, open_storage
from kubetune_runtime.storage.uris import join
from tests.integration.runtime_support import GSM8K_TRAIN, SHARED_DATA
from tests.integration.s3_server import (
    S3Server,
    find_weed,
    group_members,
    listening_ports,
    running_s3_server,
)

GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"
KUBETUNE = Path(sys.executable).parent / "kubetune"
MIB = 1024 * 1024
PART = 5 * MIB  # S3's minimum part size: the smallest multipart threshold that works
SECRET_NAME = "s3-credentials"  # noqa: S105 - the name of a Secret, not a secret
STORAGE = {"credentials": {"secretRef": {"name": SECRET_NAME}}}  # keys come from the env

KINDS = ("master", "volume", "filer", "s3", "admin")  # servers with gRPC unix sockets in /tmp

pytestmark = [pytest.mark.integration]


# ----------------------------------------------------------------------------- helpers


def storage_config(server: S3Server) -> StorageConfig:
    return StorageConfig(endpoint_url=server.endpoint, path_style=True, region="us-east-1")


def clean_aws_env() -> dict[str, str]:
    """This environment without AWS settings, offline, and with no AWS config files."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AWS_") and not k.startswith("KUBETUNE_")
    }
    return {
        **env,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, s3_server: S3Server) -> S3Server:
    """This process's environment holds the server's keys (as a pod's would) and nothing else."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in {**clean_aws_env(), **s3_server.env()}.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def admin(s3_server: S3Server) -> Iterator[Any]:
    """A boto3 client with the server's keys, for setup and for checking what is stored."""
    client = s3_server.client()
    try:
        yield client
    finally:
        client.close()


def ensure_bucket(client: Any, bucket: str) -> None:
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError:
        client.create_bucket(Bucket=bucket)


def keys(client: Any, bucket: str, prefix: str) -> list[str]:
    """Every key under ``prefix`` (relative to it), sorted."""
    found: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found += [item["Key"][len(prefix) :] for item in page.get("Contents", [])]
    return sorted(found)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- the server


def test_server_listens_only_on_its_explicit_ports(s3_server: S3Server) -> None:
    assert group_members(s3_server.pid) == [s3_server.pid]  # weed mini is one process
    expected = set(s3_server.ports.values())
    # S3 answers first; the other servers (admin, last) may still be binding.
    deadline = time.monotonic() + 30
    while (listening := listening_ports(s3_server.pid)) != expected:
        assert listening <= expected, f"unexpected ports {listening - expected}"
        assert time.monotonic() < deadline, f"never listened on {expected - listening}"
        time.sleep(0.2)


@pytest.mark.skipif(find_weed() is None, reason="SeaweedFS `weed` binary not found")
def test_a_stopped_server_leaves_no_process_socket_or_folder() -> None:
    with running_s3_server() as server:
        pgid, root, ports = server.pid, server.root, set(server.ports.values())
        assert pgid in ps_groups()
    assert pgid not in ps_groups()  # the whole process group is gone
    assert group_members(pgid) == []
    assert not root.exists()
    sockets = [Path(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock") for kind in KINDS for port in ports]
    assert [path for path in sockets if path.exists()] == []


def ps_groups() -> set[int]:
    """Process group ids of every live (non-zombie) process, as ``ps`` lists them."""
    out = subprocess.run(
        ["ps", "-eo", "pgid=,stat="], capture_output=True, text=True, check=True
    ).stdout
    return {
        int(pgid) for pgid, stat in (line.split() for line in out.splitlines()) if stat[0] != "Z"
    }


@pytest.mark.parametrize(
    ("credentials", "code"),
    [
        ("wrong-secret", "SignatureDoesNotMatch"),
        ("unknown-key", "InvalidAccessKeyId"),
        ("anonymous", "AccessDenied"),
    ],
)
def test_wrong_credentials_are_refused(
    s3_server: S3Server, admin: Any, credentials: str, code: str
) -> None:
    ensure_bucket(admin, "auth-check")
    admin.put_object(Bucket="auth-check", Key="object", Body=b"original")
    client = {
        "wrong-secret": lambda: s3_server.client(s3_server.access_key, "not-the-secret"),
        "unknown-key": lambda: s3_server.client("AKNOBODY0000", s3_server.secret_key),
        "anonymous": lambda: s3_server.client(unsigned=True),
    }[credentials]()
    try:
        calls = {
            "ListBuckets": client.list_buckets,
            "GetObject": lambda: client.get_object(Bucket="auth-check", Key="object"),
            "PutObject": lambda: client.put_object(Bucket="auth-check", Key="object", Body=b"x"),
            "DeleteObject": lambda: client.delete_object(Bucket="auth-check", Key="object"),
        }
        for operation, call in calls.items():
            with pytest.raises(ClientError) as refused:
                call()
            assert refused.value.response["Error"]["Code"] == code, operation
    finally:
        client.close()
    assert admin.get_object(Bucket="auth-check", Key="object")["Body"].read() == b"original"


def test_storage_layer_reports_refused_credentials_without_leaking_them(
    s3_env: S3Server, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ensure_bucket(admin, "auth-check")
    wrong_secret = "wrong-secret-value-0123456789"  # noqa: S105 - deliberately wrong
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    storage = open_storage("s3://auth-check/x", storage_config(s3_env))
    assert isinstance(storage, S3Storage)
    try:
        with pytest.raises(StorageFailure, match="SignatureDoesNotMatch") as refused:
            storage.write_text("s3://auth-check/x", "data")
        assert wrong_secret not in str(refused.value)
        assert s3_env.secret_key not in str(refused.value)
    finally:
        storage.client.close()
    assert keys(admin, "auth-check", "x") == []


# ----------------------------------------------------------------------------- storage layer


def test_multipart_upload_and_download_round_trip(s3_env: S3Server, tmp_path: Path) -> None:
    bucket = "storage-multipart"
    storage = S3Storage(storage_config(s3_env), multipart_threshold=PART, multipart_chunksize=PART)
    try:
        storage.client.create_bucket(Bucket=bucket)
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(2 * PART + MIB))  # 11 MiB: three parts
        uri = f"s3://{bucket}/blobs/big.bin"
        storage.upload_file(big, uri)
        head = storage.client.head_object(Bucket=bucket, Key="blobs/big.bin")
        assert head["ContentLength"] == big.stat().st_size
        assert head["ETag"].strip('"').endswith("-3")  # a multipart upload of three parts
        back = storage.download_file(uri, tmp_path / "back" / "big.bin")
        assert sha256(back) == sha256(big)
        assert storage.exists(uri)
        assert storage.list(f"s3://{bucket}/blobs") == ["big.bin"]
        storage.delete_prefix(f"s3://{bucket}/blobs")
        assert not storage.exists(uri)
    finally:
        storage.client.close()


class RecordingS3Storage(S3Storage):
    """S3Storage that records, after every write, whether ``watched``'s marker exists."""

    watched = ""
    events: list[tuple[str, str, bool]]

    def _record(self, operation: str, uri: str) -> None:
        present = self.exists(join(self.watched, COMPLETE_MARKER))
        self.events.append((operation, uri, present))

    def upload_file(self, local: Path, uri: str) -> None:
        super().upload_file(local, uri)
        self._record("upload_file", uri)

    def delete_prefix(self, uri: str) -> None:
        super().delete_prefix(uri)
        self._record("delete_prefix", uri)

    def copy_prefix(self, src_uri: str, dst_uri: str) -> None:
        super().copy_prefix(src_uri, dst_uri)
        self._record("copy_prefix", dst_uri)

    def write_text(self, uri: str, text: str) -> None:
        super().write_text(uri, text)
        self._record("write_text", uri)


def last_write_into(events: list[tuple[str, str, bool]], uri: str) -> int:
    """Index of the last recorded write to ``uri`` or below it (staging is a sibling)."""
    return max(i for i, (_, target, _) in enumerate(events) if target.startswith(uri + "/"))


def parent_of(uri: str) -> str:
    return uri.rsplit("/", 1)[0]


def make_artifact(directory: Path, weights: bytes, version: str) -> str:
    directory.mkdir(parents=True)
    (directory / "adapter_model.safetensors").write_bytes(weights)
    (directory / "adapter_config.json").write_text(json.dumps({"r": 8, "v": version}))
    (directory / "nested").mkdir()
    (directory / "nested" / "notes.txt").write_text(f"version {version}\n")
    _, digest = write_manifest(directory, metadata={"version": version})
    return digest


def test_publish_and_fetch_verified_round_trip_with_complete_written_last(
    s3_env: S3Server, admin: Any, tmp_path: Path
) -> None:
    bucket = "storage-artifacts"
    ensure_bucket(admin, bucket)
    uri = f"s3://{bucket}/team/adapter"
    storage = RecordingS3Storage(
        storage_config(s3_env), multipart_threshold=PART, multipart_chunksize=PART
    )
    storage.watched = uri
    reader = open_storage(uri, storage_config(s3_env), local_s3_root=tmp_path / "embedded")
    assert isinstance(reader, S3Storage)  # an endpoint wins over the embedded storage
    try:
        # First publish: nothing under <uri> is complete until the marker, written last.
        v1 = make_artifact(tmp_path / "v1", os.urandom(PART + MIB), "1")  # multipart up/copy
        storage.events = []
        published = publish_dir(storage, tmp_path / "v1", uri)
        assert published.digest == v1
        marker_write = last_write_into(storage.events, uri)
        assert storage.events[marker_write] == ("write_text", join(uri, COMPLETE_MARKER), True)
        assert not any(present for _, _, present in storage.events[:marker_write])
        stored = keys(admin, bucket, "team/")
        assert stored == [
            f"adapter/{name}"
            for name in (
                COMPLETE_MARKER,
                "adapter_config.json",
                "adapter_model.safetensors",
                MANIFEST_NAME,
                "nested/notes.txt",
            )
        ]  # and no staging prefix left behind
        marker = json.loads(
            admin.get_object(Bucket=bucket, Key="team/adapter/_COMPLETE")["Body"].read()
        )
        assert marker["digest"] == v1

        fetched = fetch_verified(reader, uri, tmp_path / "fetched", expected_digest=v1)
        assert fetched.downloaded
        for name in ("adapter_model.safetensors", "nested/notes.txt"):
            assert sha256(tmp_path / "fetched" / name) == sha256(tmp_path / "v1" / name)
        again = fetch_verified(reader, uri, tmp_path / "fetched", expected_digest=v1)
        assert not again.downloaded  # the verified local copy is reused

        # Republish: the old artifact stays complete while the new one is staged; its marker
        # goes first, and the new marker is the last write.
        v2 = make_artifact(tmp_path / "v2", os.urandom(MIB), "2")
        storage.events = []
        publish_dir(storage, tmp_path / "v2", uri)
        events = storage.events
        first_delete = events.index(("delete_prefix", join(uri, COMPLETE_MARKER), False))
        assert all(present for _, _, present in events[:first_delete])  # v1 complete throughout
        assert all(
            target.startswith(parent_of(uri) + "/.staging-")
            for _, target, _ in events[:first_delete]
        )
        marker_write = last_write_into(events, uri)
        assert events[marker_write] == ("write_text", join(uri, COMPLETE_MARKER), True)
        assert not any(present for _, _, present in events[first_delete:marker_write])
        assert fetch_verified(reader, uri, tmp_path / "fetched", expected_digest=v2).downloaded

        # A digest that differs, or a byte changed in storage, is refused.
        with pytest.raises(ArtifactInvalid, match="expected"):
            fetch_verified(reader, uri, tmp_path / "other", expected_digest=v1)
        admin.put_object(Bucket=bucket, Key="team/adapter/nested/notes.txt", Body=b"tampered\n")
        with pytest.raises(ArtifactInvalid, match=r"notes\.txt"):
            fetch_verified(reader, uri, tmp_path / "tampered", expected_digest=v2)
        assert not (tmp_path / "tampered").exists()
    finally:
        storage.client.close()
        reader.client.close()


# ----------------------------------------------------------------------------- kubetune run


def upload_inputs(admin: Any, model_dir: Path) -> None:
    """The tiny base model and GSM8K rows on the server, as a user would upload them."""
    for bucket in ("models", "datasets", "results"):
        ensure_bucket(admin, bucket)
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        admin.upload_file(str(path), "models", f"tiny-base/{path.relative_to(model_dir)}")
    for source, rows in ((GSM8K_TRAIN, 48), (GSM8K_TEST, 8)):
        with source.open(encoding="utf-8") as lines:
            head = "".join(line for line, _ in zip(lines, range(rows), strict=False))
        admin.put_object(Bucket="datasets", Key=f"gsm8k/{source.name}", Body=head.encode())


def write_yaml(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def finetune_doc(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "s3://models/tiny-base"},
            "dataset": {
                "train": {
                    "uri": "s3://datasets/gsm8k/train.jsonl",
                    "format": "promptCompletion",
                    "columns": {"prompt": "question", "completion": "answer"},
                },
                "maxSeqLength": 256,
            },
            "lora": {"r": 8, "alpha": 16},
            "training": {
                "maxSteps": 4,
                "learningRate": "1e-3",
                "perDeviceTrainBatchSize": 2,
                "loggingSteps": 1,
            },
            "output": {"uri": f"s3://models/{name}"},
            "storage": STORAGE,
        },
    }


def eval_doc(name: str, adapter_uri: str, digest: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "EvalJob",
        "metadata": {"name": name},
        "spec": {
            "target": {"adapter": {"uri": adapter_uri, "digest": digest}},
            "baseModel": {"uri": "s3://models/tiny-base"},
            "suites": [
                {
                    "name": "heldout",
                    "type": "perplexity",
                    "maxSamples": 4,
                    "dataset": {
                        "uri": "s3://datasets/gsm8k/test.jsonl",
                        "format": "promptCompletion",
                        "columns": {"prompt": "question", "completion": "answer"},
                    },
                }
            ],
            "output": {"uri": f"s3://results/{name}"},
            "storage": STORAGE,
        },
    }


def run_kubetune(
    manifest: Path, workdir: Path, server: S3Server
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``kubetune run MANIFEST --s3-endpoint URL`` with the keys in the environment."""
    command = [str(KUBETUNE), "run", str(manifest), "--workdir", str(workdir)]
    proc = subprocess.run(
        [*command, "--s3-endpoint", server.endpoint],
        capture_output=True,
        text=True,
        env={**clean_aws_env(), **server.env()},
        timeout=300,
        check=False,
    )
    doc = yaml.safe_load(manifest.read_text(encoding="utf-8"))
    kind, name = doc["kind"].lower(), doc["metadata"]["name"]
    record_file = workdir.resolve() / "jobs" / "default" / kind / name / "result.json"
    record = json.loads(record_file.read_text(encoding="utf-8")) if record_file.is_file() else {}
    return proc, record


@pytest.mark.skipif(not GSM8K_TRAIN.is_file(), reason="../shared/data is missing")
@pytest.mark.skipif(not KUBETUNE.is_file(), reason=f"no kubetune console script at {KUBETUNE}")
def test_kubetune_run_trains_to_s3_and_an_evaljob_pinned_by_digest_evaluates_it(
    s3_env: S3Server, admin: Any, tmp_path: Path, tiny_model_dir: Path
) -> None:
    server = s3_env
    upload_inputs(admin, tiny_model_dir)
    workdir = tmp_path / "kubetune"

    # Train: the adapter is published to the S3 server, complete and verifiable.
    manifest = write_yaml(tmp_path / "finetunejob.yaml", finetune_doc("s3-ft"))
    proc, record = run_kubetune(manifest, workdir, server)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    artifact = record["result"]["artifact"]
    assert artifact["uri"] == "s3://models/s3-ft/adapter"
    assert f"digest    {artifact['digest']}" in proc.stdout
    stored = keys(admin, "models", "s3-ft/adapter/")
    assert {MANIFEST_NAME, COMPLETE_MARKER, "adapter_model.safetensors"} <= set(stored)
    reader = open_storage(artifact["uri"], storage_config(server))
    assert isinstance(reader, S3Storage)
    try:
        verified = fetch_verified(
            reader, artifact["uri"], tmp_path / "fetched", expected_digest=artifact["digest"]
        )
    finally:
        reader.client.close()
    assert verified.metadata["baseModel"] == "s3://models/tiny-base"
    assert not (workdir / "s3").exists()  # nothing went to the embedded storage
    job = workdir / "jobs" / "default" / "finetunejob" / "s3-ft"
    run = json.loads((job / "config" / "run.json").read_text(encoding="utf-8"))
    assert run["storage"]["endpoint_url"] == server.endpoint
    assert run["storage"]["path_style"] is True
    log = (job / "runtime.log").read_text(encoding="utf-8")
    for text in (proc.stdout, proc.stderr, log, json.dumps(run)):
        assert server.secret_key not in text  # credentials never reach config or logs

    # Evaluate that artifact, pinned by URI and digest: base and candidate side by side.
    evaluation_manifest = write_yaml(
        tmp_path / "evaljob.yaml", eval_doc("s3-eval", artifact["uri"], artifact["digest"])
    )
    proc, record = run_kubetune(evaluation_manifest, workdir, server)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    evaluation = record["result"]["evaluation"]
    assert evaluation["adapterDigest"] == artifact["digest"]
    rows = {(row["suite"], row["metric"]): row for row in evaluation["summary"]}
    assert set(rows) == {("heldout", "loss"), ("heldout", "perplexity")}
    for row in rows.values():
        assert isinstance(row["base"], float | int), row
        assert isinstance(row["candidate"], float | int), row
    assert evaluation["resultsUri"] == "s3://results/s3-eval"
    assert {"summary.json", "heldout.jsonl", COMPLETE_MARKER} <= set(
        keys(admin, "results", "s3-eval/")
    )
    assert not (workdir / "s3").exists()

    # The same EvalJob with a digest the artifact does not have is refused, permanently.
    wrong = "sha256:" + hashlib.sha256(b"not this adapter").hexdigest()
    bad_manifest = write_yaml(
        tmp_path / "evaljob-bad.yaml", eval_doc("s3-eval-bad", artifact["uri"], wrong)
    )
    proc, record = run_kubetune(bad_manifest, workdir, server)
    assert proc.returncode != 0
    assert proc.returncode == 3, proc.stdout[-3000:]  # permanent: the Job does not retry it
    assert record["result"]["status"] == "Failed"
    assert record["result"]["reason"] == "ArtifactInvalid"
    assert wrong in record["result"]["message"]
    assert keys(admin, "results", "s3-eval-bad/") == []  # nothing published


@pytest.mark.parametrize("missing", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
def test_secret_backed_credentials_must_be_set_locally(
    s3_env: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    missing: str,
) -> None:
    monkeypatch.delenv(missing)
    manifest = write_yaml(tmp_path / "finetunejob.yaml", finetune_doc("no-keys"))
    argv = ["run", str(manifest), "--workdir", str(tmp_path), "--s3-endpoint", s3_env.endpoint]
    assert kubetune_main(argv) == 1
    err = capsys.readouterr().err
    assert f"{missing} (Secret {SECRET_NAME}, key {missing})" in err, err
    assert not (tmp_path / "jobs" / "default" / "finetunejob" / "no-keys" / "runtime.log").exists()
