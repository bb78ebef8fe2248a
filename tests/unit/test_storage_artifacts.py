"""Storage backends and verified artifacts: local, pvc, embedded S3 and S3 (moto).

The S3 backend runs against moto's in-process mock (``mock_aws``): no network, no server.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubetune_runtime.config import StorageConfig
from kubetune_runtime.errors import ArtifactInvalid, ConfigInvalid, StorageFailure
from kubetune_runtime.storage import artifacts
from kubetune_runtime.storage.artifacts import (
    COMPLETE_MARKER,
    MANIFEST_NAME,
    fetch_verified,
    publish_dir,
    read_marker,
    verify_local,
    write_manifest,
)
from kubetune_runtime.storage.backends import (
    LocalStorage,
    NotFound,
    S3Storage,
    Storage,
    make_s3_client,
    open_storage,
    s3_client_config,
)
from kubetune_runtime.storage.uris import join, parent

MiB = 1024 * 1024
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"  # noqa: S105 - a fake, for leak checks
BUCKET = "models"
ADAPTER = {
    "adapter_config.json": b'{"r": 16, "lora_alpha": 32}\n',
    "adapter_model.safetensors": bytes(range(256)) * 64,
    "tokenizer/tokenizer.json": b'{"version": "1.0"}\n',
}
METADATA = {"base_model": "hf://org/base@abc123", "metrics": {"eval_loss": 1.25}}


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Hermetic fake credentials; no profile or config file from the host."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEYID0000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.fixture
def s3(aws_env: None) -> Iterator[S3Storage]:
    """S3 storage on moto, with a 5 MiB multipart threshold (S3's minimum part size)."""
    from moto import mock_aws

    with mock_aws():
        config = StorageConfig(region="us-east-1")
        storage = S3Storage(
            config,
            client=make_s3_client(config),
            multipart_threshold=5 * MiB,
            multipart_chunksize=5 * MiB,
            max_concurrency=4,
        )
        storage.client.create_bucket(Bucket=BUCKET)
        yield storage


@dataclass
class Backend:
    name: str
    storage: Storage
    base: str  # a URI prefix under which tests write


@pytest.fixture(params=["file", "pvc", "embedded-s3", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    name: str = request.param
    if name == "file":
        root = tmp_path / "remote"
        root.mkdir()
        return Backend(name, open_storage(root.as_uri(), StorageConfig()), root.as_uri())
    if name == "pvc":
        (tmp_path / "pvc" / "shared").mkdir(parents=True)
        storage = open_storage("pvc://shared/x", StorageConfig(), pvc_root=tmp_path / "pvc")
        return Backend(name, storage, "pvc://shared/team-a")
    if name == "embedded-s3":
        storage = open_storage(
            "s3://models/x", StorageConfig(), local_s3_root=tmp_path / "embedded"
        )
        return Backend(name, storage, f"s3://{BUCKET}/team-a")
    return Backend(name, request.getfixturevalue("s3"), f"s3://{BUCKET}/team-a")


def make_dir(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def make_artifact(
    root: Path, files: dict[str, bytes] | None = None, **metadata: Any
) -> tuple[Path, str]:
    make_dir(root, ADAPTER if files is None else files)
    _, digest = write_manifest(root, metadata={**METADATA, **metadata})
    return root, digest


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------ backends


def test_backend_round_trip(backend: Backend, tmp_path: Path) -> None:
    storage, base = backend.storage, backend.base
    src = make_dir(tmp_path / "src", {"a.txt": b"A", "sub/b.bin": b"B" * 10, "sub/c/d": b""})

    assert storage.list(base) == []
    assert not storage.exists(base)
    storage.upload_dir(src, join(base, "dir"))
    storage.upload_file(src / "a.txt", join(base, "dir-2", "one.txt"))
    assert storage.list(join(base, "dir")) == ["a.txt", "sub/b.bin", "sub/c/d"]
    assert storage.list(base) == [
        "dir-2/one.txt",
        "dir/a.txt",
        "dir/sub/b.bin",
        "dir/sub/c/d",
    ]
    # "dir" is a prefix of "dir-2" as a string, never as a directory
    assert storage.list(join(base, "dir", "sub")) == ["b.bin", "c/d"]
    assert storage.exists(join(base, "dir"))
    assert storage.exists(join(base, "dir", "sub", "b.bin"))
    assert not storage.exists(join(base, "dir", "nope"))

    out = storage.download_file(join(base, "dir", "sub", "b.bin"), tmp_path / "dl" / "b.bin")
    assert out.read_bytes() == b"B" * 10
    got = storage.download_dir(join(base, "dir"), tmp_path / "dl-dir")
    assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file()) == [
        "a.txt",
        "sub/b.bin",
        "sub/c/d",
    ]

    storage.write_text(join(base, "note.json"), '{"ok": true, "é": 1}')
    assert json.loads(storage.read_text(join(base, "note.json"))) == {"ok": True, "é": 1}

    storage.copy_prefix(join(base, "dir"), join(base, "copy"))
    assert storage.list(join(base, "copy")) == ["a.txt", "sub/b.bin", "sub/c/d"]
    assert storage.read_text(join(base, "copy", "a.txt")) == "A"

    storage.delete_prefix(join(base, "dir"))
    assert storage.list(join(base, "dir")) == []
    assert storage.list(join(base, "dir-2")) == ["one.txt"]  # the sibling survives
    storage.delete_prefix(join(base, "dir"))  # deleting what is absent is a no-op

    with pytest.raises(NotFound, match="does not exist"):
        storage.read_text(join(base, "missing.json"))
    with pytest.raises(NotFound, match="does not exist"):
        storage.download_file(join(base, "missing.bin"), tmp_path / "x")
    with pytest.raises(NotFound, match="no files under"):
        storage.download_dir(join(base, "nothing"), tmp_path / "y")
    with pytest.raises(NotFound, match="no files under"):
        storage.copy_prefix(join(base, "nothing"), join(base, "z"))
    with pytest.raises(StorageFailure, match="not a directory"):
        storage.upload_dir(tmp_path / "no-such-dir", join(base, "z"))


def test_delete_prefix_refuses_a_bucket_root(s3: S3Storage, tmp_path: Path) -> None:
    with pytest.raises(StorageFailure, match="refusing to delete"):
        s3.delete_prefix(f"s3://{BUCKET}")
    embedded = LocalStorage(s3_root=tmp_path)
    with pytest.raises(StorageFailure, match="refusing to delete"):
        embedded.delete_prefix(f"s3://{BUCKET}/")


def test_download_refuses_keys_that_escape_the_destination(s3: S3Storage, tmp_path: Path) -> None:
    s3.client.put_object(Bucket=BUCKET, Key="evil/../../escape.txt", Body=b"x")
    with pytest.raises(StorageFailure, match="not a safe relative path"):
        s3.download_dir(f"s3://{BUCKET}/evil", tmp_path / "dest")
    assert not (tmp_path / "escape.txt").exists()


def test_s3_multipart_upload_download_and_copy(s3: S3Storage, tmp_path: Path) -> None:
    big = os.urandom(11 * MiB + 123)  # 3 parts of 5 MiB
    (tmp_path / "big.bin").write_bytes(big)
    uri = f"s3://{BUCKET}/big/model.safetensors"

    s3.upload_file(tmp_path / "big.bin", uri)
    head = s3.client.head_object(Bucket=BUCKET, Key="big/model.safetensors")
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # a multipart upload
    assert head["ContentLength"] == len(big)

    assert s3.download_file(uri, tmp_path / "back.bin").read_bytes() == big
    s3.copy_prefix(f"s3://{BUCKET}/big", f"s3://{BUCKET}/big-copy")
    copied = s3.download_file(f"s3://{BUCKET}/big-copy/model.safetensors", tmp_path / "c.bin")
    assert sha256(copied.read_bytes()) == sha256(big)


@pytest.mark.parametrize(
    ("path_style", "url"),
    [(True, "http://minio.local:9000/models/a/b"), (False, "http://models.minio.local:9000/a/b")],
)
def test_s3_client_addressing_style(aws_env: None, path_style: bool, url: str) -> None:
    config = StorageConfig(
        endpoint_url="http://minio.local:9000", region="eu-west-1", path_style=path_style
    )
    cfg = s3_client_config(config)
    assert cfg.s3 == {"addressing_style": "path" if path_style else "virtual"}
    assert cfg.retries == {"mode": "standard", "total_max_attempts": 5}
    assert cfg.region_name == "eu-west-1"
    assert cfg.request_checksum_calculation == "when_required"  # S3-compatible stores
    client = make_s3_client(config)
    signed = client.generate_presigned_url("get_object", Params={"Bucket": "models", "Key": "a/b"})
    assert signed.split("?")[0] == url


def test_s3_client_on_aws_keeps_default_checksums(aws_env: None) -> None:
    cfg = s3_client_config(StorageConfig(region="us-east-1"))
    assert cfg.request_checksum_calculation != "when_required"


@pytest.mark.parametrize("ca_bundle", ["/etc/kubetune/ca.pem", None])
def test_s3_client_endpoint_and_ca_bundle(
    aws_env: None, monkeypatch: pytest.MonkeyPatch, ca_bundle: str | None
) -> None:
    import boto3

    seen: dict[str, Any] = {}
    original = boto3.session.Session.client

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(boto3.session.Session, "client", spy)
    config = StorageConfig(endpoint_url="https://s3.internal", ca_bundle_file=ca_bundle)
    make_s3_client(config)
    assert seen["endpoint_url"] == "https://s3.internal"
    assert seen["verify"] == ca_bundle
    assert "aws_access_key_id" not in seen  # credentials come from boto3's default chain
    assert "aws_secret_access_key" not in seen


def test_s3_errors_never_carry_credentials(s3: S3Storage, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(StorageFailure) as excinfo:
        s3.upload_file(tmp_path / "f", "s3://no-such-bucket/key")
    assert "s3://no-such-bucket/key" in str(excinfo.value)
    assert "NoSuchBucket" in str(excinfo.value)
    text = str(excinfo.value) + repr(excinfo.value) + str(excinfo.value.__cause__)
    assert SECRET not in text
    with pytest.raises(StorageFailure, match="NoSuchBucket") as excinfo2:
        s3.read_text("s3://no-such-bucket/_COMPLETE")
    assert not isinstance(excinfo2.value, NotFound)  # a missing bucket is not "incomplete"


def test_open_storage_dispatch(aws_env: None, tmp_path: Path) -> None:
    assert isinstance(open_storage("/data/x", StorageConfig()), LocalStorage)
    assert isinstance(open_storage("file:///data/x", StorageConfig()), LocalStorage)
    assert isinstance(open_storage("pvc://claim/x", StorageConfig()), LocalStorage)
    embedded = open_storage("s3://models/x", StorageConfig(), local_s3_root=tmp_path)
    assert isinstance(embedded, LocalStorage)
    assert embedded.local_path("s3://models/a/b") == tmp_path / "models" / "a" / "b"
    # an endpoint means a real server, even in a local run
    remote = open_storage(
        "s3://models/x",
        StorageConfig(endpoint_url="http://minio:9000", path_style=True),
        local_s3_root=tmp_path,
    )
    assert isinstance(remote, S3Storage)
    assert remote.local_path("s3://models/x") is None
    assert isinstance(open_storage("s3://models/x", StorageConfig()), S3Storage)
    # with an endpoint, a local storage never maps s3:// to the embedded root
    with_endpoint = open_storage(
        "file:///x", StorageConfig(endpoint_url="http://minio:9000"), local_s3_root=tmp_path
    )
    with pytest.raises(ConfigInvalid, match="no embedded S3 root"):
        with_endpoint.list("s3://models/x")
    with pytest.raises(ConfigInvalid, match="hf:// URIs are not storage"):
        open_storage("hf://org/name@main", StorageConfig())
    with pytest.raises(ConfigInvalid, match="unsupported URI scheme"):
        open_storage("gs://bucket/x", StorageConfig())


def test_backends_refuse_uris_they_do_not_serve(s3: S3Storage, tmp_path: Path) -> None:
    with pytest.raises(ConfigInvalid, match="s3://bucket/key URIs only"):
        s3.list("file:///tmp")
    with pytest.raises(ConfigInvalid, match="hf:// URIs are not storage"):
        s3.exists("hf://org/name")
    with pytest.raises(ConfigInvalid, match="no embedded S3 root"):
        LocalStorage().list("s3://models/x")


def test_unmounted_claim_is_an_error_not_a_new_directory(tmp_path: Path) -> None:
    storage = LocalStorage(pvc_root=tmp_path)
    with pytest.raises(StorageFailure, match="claim 'data' is not mounted"):
        storage.write_text("pvc://data/x.json", "{}")
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------------------ manifests


def test_write_manifest_is_deterministic_and_complete(tmp_path: Path) -> None:
    root, digest = make_artifact(tmp_path / "a")
    (root / COMPLETE_MARKER).write_text("{}")  # never listed
    path, again = write_manifest(root, metadata=METADATA)
    assert (path, again) == (root / MANIFEST_NAME, digest)
    assert digest == "sha256:" + sha256(path.read_bytes())
    body = json.loads(path.read_text())
    assert body["files"] == [
        {"path": rel, "sha256": sha256(data), "size": len(data)}
        for rel, data in sorted(ADAPTER.items())
    ]
    assert body["metadata"] == METADATA

    other, other_digest = make_artifact(tmp_path / "b")  # same files elsewhere: same digest
    assert other_digest == digest
    _, changed = write_manifest(other, metadata={**METADATA, "metrics": {"eval_loss": 1.5}})
    assert changed != digest


@pytest.mark.parametrize(
    ("metadata", "message"),
    [({"x": float("nan")}, "JSON-serializable"), ({"x": object()}, "JSON-serializable")],
)
def test_write_manifest_refuses_unserializable_metadata(
    tmp_path: Path, metadata: dict[str, Any], message: str
) -> None:
    make_dir(tmp_path, {"f": b"1"})
    with pytest.raises(ValueError, match=message):
        write_manifest(tmp_path, metadata=metadata)


def test_write_manifest_of_an_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(ArtifactInvalid, match="holds no files"):
        write_manifest(tmp_path, metadata={})


def _manifest(files: list[Any]) -> bytes:
    return json.dumps({"schema": "kubetune.io/manifest/v1", "files": files}).encode()


GOOD_ENTRY = {"path": "f", "sha256": "0" * 64, "size": 1}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json", "not UTF-8 JSON"),
        (b'{"files": []}', 'expected an object with "schema"'),
        (_manifest([{**GOOD_ENTRY, "path": "../escape"}]), "not a safe relative path"),
        (_manifest([{**GOOD_ENTRY, "path": "/etc/passwd"}]), "not a safe relative path"),
        (_manifest([{**GOOD_ENTRY, "path": "_COMPLETE"}]), "not a safe relative path"),
        (_manifest([{**GOOD_ENTRY, "sha256": "xyz"}]), "files[0]: expected"),
        (_manifest([{**GOOD_ENTRY, "size": -1}]), "files[0]: expected"),
        (_manifest([GOOD_ENTRY, GOOD_ENTRY]), "listed twice"),
    ],
)
def test_malformed_manifests_are_refused(tmp_path: Path, data: bytes, message: str) -> None:
    (tmp_path / MANIFEST_NAME).write_bytes(data)
    with pytest.raises(ArtifactInvalid, match=f"invalid manifest.json: .*{_re(message)}"):
        verify_local(tmp_path)


def _re(text: str) -> str:
    return re.escape(text)


def test_verify_local(tmp_path: Path) -> None:
    root, digest = make_artifact(tmp_path / "a")
    verified = verify_local(root, digest)
    assert verified.digest == digest
    assert verified.uri == root.resolve().as_uri()
    assert [f.path for f in verified.files] == sorted(ADAPTER)
    assert verified.metadata == METADATA
    manifest_size = (root / MANIFEST_NAME).stat().st_size
    assert verified.size_bytes == sum(map(len, ADAPTER.values())) + manifest_size

    (root / "extra.bin").write_bytes(b"?")
    verify_local(root)  # extras are ignored by default ...
    with pytest.raises(ArtifactInvalid, match=r"extra\.bin: not listed in the manifest"):
        verify_local(root, allow_extra_files=False)  # ... and refused when strict

    with pytest.raises(ArtifactInvalid, match=r"has digest .*, expected sha256:0000"):
        verify_local(root, "sha256:" + "0" * 64)
    with pytest.raises(ConfigInvalid, match="malformed"):
        verify_local(root, "sha256:XYZ")

    # same size, one byte flipped
    weights = root / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[7] ^= 0xFF
    weights.write_bytes(bytes(data))
    (root / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(ArtifactInvalid) as excinfo:
        verify_local(root, digest)
    message = str(excinfo.value)
    assert "adapter_model.safetensors: sha256" in message
    assert "tokenizer/tokenizer.json: missing" in message
    (root / "adapter_config.json").write_bytes(b"{}")
    with pytest.raises(ArtifactInvalid, match=r"adapter_config.json: 2 bytes, expected 28"):
        verify_local(root)
    (root / MANIFEST_NAME).unlink()
    with pytest.raises(ArtifactInvalid, match=r"no manifest\.json"):
        verify_local(root)


# ------------------------------------------------------------------------------ publish / fetch


def test_publish_and_fetch_round_trip(backend: Backend, tmp_path: Path) -> None:
    storage = backend.storage
    local, digest = make_artifact(tmp_path / "local")
    (local / COMPLETE_MARKER).write_text("stale local marker")  # never published
    (local / "scratch.tmp").write_bytes(b"not in the manifest")  # never published
    uri = join(backend.base, "gsm8k", "adapter")

    published = publish_dir(storage, local, uri)
    assert published.uri == uri
    assert published.digest == digest
    assert [f.path for f in published.files] == sorted(ADAPTER)
    assert published.size_bytes == verify_local(local).size_bytes
    assert storage.list(uri) == sorted([*ADAPTER, MANIFEST_NAME, COMPLETE_MARKER])
    marker = json.loads(storage.read_text(join(uri, COMPLETE_MARKER)))
    assert marker["digest"] == digest
    assert read_marker(storage, uri) == digest
    # staging is gone: only the artifact lives under the parent
    assert all(key.startswith("adapter/") for key in storage.list(parent(uri)))

    dest = tmp_path / "cache" / "adapter"
    fetched = fetch_verified(storage, uri, dest, expected_digest=digest)
    assert fetched.downloaded
    assert (fetched.uri, fetched.path, fetched.digest) == (uri, dest, digest)
    assert fetched.metadata == METADATA
    for rel, data in ADAPTER.items():
        assert (dest / rel).read_bytes() == data
    assert sorted(p.name for p in dest.parent.iterdir()) == [".adapter.lock", "adapter"]

    again = fetch_verified(storage, uri, dest, expected_digest=None)
    assert not again.downloaded  # the verified copy is reused
    assert again.digest == digest

    # republishing different content replaces the artifact completely (no stale files)
    local2, digest2 = make_artifact(tmp_path / "local2", {"only.bin": b"v2"})
    publish_dir(storage, local2, uri)
    assert storage.list(uri) == sorted(["only.bin", MANIFEST_NAME, COMPLETE_MARKER])
    refreshed = fetch_verified(storage, uri, dest, expected_digest=digest2)
    assert refreshed.downloaded
    assert sorted(p.name for p in dest.iterdir()) == [MANIFEST_NAME, "only.bin"]


def test_publish_requires_a_matching_manifest(backend: Backend, tmp_path: Path) -> None:
    local = make_dir(tmp_path / "local", ADAPTER)
    with pytest.raises(ArtifactInvalid, match=r"no manifest\.json"):
        publish_dir(backend.storage, local, join(backend.base, "a"))
    write_manifest(local, metadata={})
    (local / "adapter_config.json").write_bytes(b"changed after the manifest")
    with pytest.raises(ArtifactInvalid, match=r"adapter_config\.json"):
        publish_dir(backend.storage, local, join(backend.base, "a"))
    assert not backend.storage.exists(join(backend.base, "a"))


def test_publish_refuses_a_root(s3: S3Storage, tmp_path: Path) -> None:
    local, _ = make_artifact(tmp_path / "local")
    with pytest.raises(ConfigInvalid, match="cannot publish to s3://models"):
        publish_dir(s3, local, f"s3://{BUCKET}")


def _tamper(storage: Storage, uri: str, rel: str, data: bytes, tmp_path: Path) -> None:
    tmp = tmp_path / "tamper.bin"
    tmp.write_bytes(data)
    storage.upload_file(tmp, join(uri, rel))


@pytest.mark.parametrize(
    ("rel", "data", "message"),
    [
        ("adapter_model.safetensors", b"\x00" * 16384, "adapter_model.safetensors: sha256"),
        ("tokenizer/tokenizer.json", b"{}", "tokenizer/tokenizer.json: 2 bytes, expected"),
    ],
)
def test_tampered_file_is_refused(
    backend: Backend, tmp_path: Path, rel: str, data: bytes, message: str
) -> None:
    local, digest = make_artifact(tmp_path / "local")
    uri = join(backend.base, "adapter")
    publish_dir(backend.storage, local, uri)
    _tamper(backend.storage, uri, rel, data, tmp_path)
    dest = tmp_path / "cache" / "adapter"
    with pytest.raises(ArtifactInvalid, match=_re(message)):
        fetch_verified(backend.storage, uri, dest, expected_digest=digest)
    assert not dest.exists()  # nothing unverified is ever left at dest
    assert [p.name for p in dest.parent.iterdir()] == [".adapter.lock"]


def test_missing_file_and_tampered_manifest(backend: Backend, tmp_path: Path) -> None:
    storage = backend.storage
    local, digest = make_artifact(tmp_path / "local")
    uri = join(backend.base, "adapter")
    publish_dir(storage, local, uri)
    storage.delete_prefix(join(uri, "adapter_config.json"))
    with pytest.raises(ArtifactInvalid, match=r"missing: adapter_config\.json"):
        fetch_verified(storage, uri, tmp_path / "d1", expected_digest=None)

    publish_dir(storage, local, uri)
    manifest = json.loads(storage.read_text(join(uri, MANIFEST_NAME)))
    manifest["metadata"]["metrics"]["eval_loss"] = 0.01
    storage.write_text(join(uri, MANIFEST_NAME), json.dumps(manifest))
    with pytest.raises(ArtifactInvalid, match="the _COMPLETE marker records " + digest):
        fetch_verified(storage, uri, tmp_path / "d2", expected_digest=None)


def test_extra_files_in_storage_are_never_downloaded(backend: Backend, tmp_path: Path) -> None:
    local, digest = make_artifact(tmp_path / "local")
    uri = join(backend.base, "adapter")
    publish_dir(backend.storage, local, uri)
    _tamper(backend.storage, uri, "adapter_model.bin", b"unverified weights", tmp_path)
    fetched = fetch_verified(backend.storage, uri, tmp_path / "d", expected_digest=digest)
    assert not (fetched.path / "adapter_model.bin").exists()


def test_unverified_local_copy_is_replaced(backend: Backend, tmp_path: Path) -> None:
    local, digest = make_artifact(tmp_path / "local")
    uri = join(backend.base, "adapter")
    publish_dir(backend.storage, local, uri)
    dest = tmp_path / "cache" / "adapter"
    fetch_verified(backend.storage, uri, dest, expected_digest=digest)
    (dest / "adapter_config.json").write_bytes(b"corrupted on disk!!!!!!!!!!!")
    (dest / "planted.bin").write_bytes(b"x")
    fetched = fetch_verified(backend.storage, uri, dest, expected_digest=digest)
    assert fetched.downloaded
    assert (dest / "adapter_config.json").read_bytes() == ADAPTER["adapter_config.json"]
    assert not (dest / "planted.bin").exists()

    shutil.rmtree(dest)
    dest.write_bytes(b"a file where the directory should be")
    assert fetch_verified(backend.storage, uri, dest, expected_digest=digest).downloaded
    assert dest.is_dir()


def test_missing_marker_is_not_complete(backend: Backend, tmp_path: Path) -> None:
    local, _ = make_artifact(tmp_path / "local")
    uri = join(backend.base, "adapter")
    backend.storage.upload_dir(local, uri)  # everything but the marker
    with pytest.raises(ArtifactInvalid, match="not complete: upload interrupted or still running"):
        fetch_verified(backend.storage, uri, tmp_path / "d", expected_digest=None)
    backend.storage.write_text(join(uri, COMPLETE_MARKER), "garbage")
    with pytest.raises(ArtifactInvalid, match="not a valid completion marker"):
        fetch_verified(backend.storage, uri, tmp_path / "d", expected_digest=None)


def test_wrong_expected_digest_is_refused_before_download(backend: Backend, tmp_path: Path) -> None:
    local, digest = make_artifact(tmp_path / "local")
    uri = join(backend.base, "adapter")
    publish_dir(backend.storage, local, uri)
    wrong = "sha256:" + "ab" * 32
    dest = tmp_path / "d"
    with pytest.raises(ArtifactInvalid, match=f"has digest {digest} .*expected {wrong}"):
        fetch_verified(backend.storage, uri, dest, expected_digest=wrong)
    assert not dest.exists()
    with pytest.raises(ConfigInvalid, match="malformed"):
        fetch_verified(backend.storage, uri, dest, expected_digest="sha256:short")


# ------------------------------------------------------------------------------ interruptions


def _fail_after(calls: int, original: Callable[..., Any]) -> Callable[..., Any]:
    count = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal count
        count += 1
        if count > calls:
            raise StorageFailure("simulated interruption")
        return original(*args, **kwargs)

    return wrapper


def _interrupt_staging(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the second file copied or uploaded during a publish fail."""
    if backend.storage.local_path(backend.base) is None:
        monkeypatch.setattr(
            backend.storage, "upload_file", _fail_after(1, backend.storage.upload_file)
        )
    else:
        monkeypatch.setattr(artifacts, "_copy_durable", _fail_after(1, artifacts._copy_durable))


def test_interrupted_upload_leaves_previous_artifact_complete(
    backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = backend.storage
    uri = join(backend.base, "adapter")
    v1, digest1 = make_artifact(tmp_path / "v1")
    publish_dir(storage, v1, uri)
    v2, digest2 = make_artifact(tmp_path / "v2", {"a.bin": b"2", "b.bin": b"22", "c.bin": b"3"})
    assert digest2 != digest1

    with monkeypatch.context() as patch:
        _interrupt_staging(backend, patch)
        with pytest.raises(StorageFailure, match="simulated interruption"):
            publish_dir(storage, v2, uri)

    # The previous artifact is untouched and still complete; staging was cleaned up.
    assert read_marker(storage, uri) == digest1
    assert storage.list(uri) == sorted([*ADAPTER, MANIFEST_NAME, COMPLETE_MARKER])
    assert all(key.startswith("adapter/") for key in storage.list(parent(uri)))
    fetched = fetch_verified(storage, uri, tmp_path / "d", expected_digest=None)
    assert fetched.digest == digest1


def test_interrupted_first_publish_is_never_complete(
    backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = join(backend.base, "adapter")
    local, _ = make_artifact(tmp_path / "local")
    with monkeypatch.context() as patch:
        _interrupt_staging(backend, patch)
        with pytest.raises(StorageFailure, match="simulated interruption"):
            publish_dir(backend.storage, local, uri)
    assert not backend.storage.exists(uri)
    with pytest.raises(ArtifactInvalid, match="not complete"):
        fetch_verified(backend.storage, uri, tmp_path / "d", expected_digest=None)


def test_interrupted_server_side_copy_is_not_complete(
    s3: S3Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past staging, the old marker is gone first: a half-copied artifact is never complete."""
    uri = f"s3://{BUCKET}/team-a/adapter"
    v1, _ = make_artifact(tmp_path / "v1")
    publish_dir(s3, v1, uri)
    v2, _ = make_artifact(tmp_path / "v2", {"a.bin": b"2", "b.bin": b"22"})
    original_copy = s3.client.copy
    monkeypatch.setattr(s3.client, "copy", _fail_after(1, original_copy))
    with pytest.raises(StorageFailure, match="simulated interruption"):
        publish_dir(s3, v2, uri)
    assert COMPLETE_MARKER not in s3.list(uri)
    with pytest.raises(ArtifactInvalid, match="not complete"):
        fetch_verified(s3, uri, tmp_path / "d", expected_digest=None)
    assert all(key.startswith("adapter/") for key in s3.list(parent(uri)))  # staging removed


def test_local_publish_swaps_whole_directories(tmp_path: Path) -> None:
    storage = LocalStorage()
    target = tmp_path / "remote" / "adapter"
    v1, digest1 = make_artifact(tmp_path / "v1")
    publish_dir(storage, v1, target.as_uri())
    inode = target.stat().st_ino
    v2, digest2 = make_artifact(tmp_path / "v2", {"only.bin": b"v2"})
    publish_dir(storage, v2, str(target))  # a plain path works too
    assert target.stat().st_ino != inode  # a new directory was renamed into place
    assert sorted(p.name for p in target.iterdir()) == [COMPLETE_MARKER, MANIFEST_NAME, "only.bin"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["adapter"]  # nothing left aside
    assert verify_local(target, digest2).digest != digest1


# ------------------------------------------------------------------------------ concurrency


class SlowLocalStorage(LocalStorage):
    """Local storage whose downloads take a while, so concurrent fetches overlap."""

    def download_file(self, uri: str, dest: Path) -> Path:
        time.sleep(0.1)
        return super().download_file(uri, dest)


def _fetch_in_child(
    storage: Storage,
    uri: str,
    dest: str,
    barrier: Any,
    results: Any,
) -> None:
    barrier.wait(timeout=30)
    try:
        fetched = fetch_verified(storage, uri, Path(dest), expected_digest=None)
        results.put((fetched.downloaded, fetched.digest))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        results.put(("error", repr(exc)))


def test_concurrent_fetches_download_once(tmp_path: Path) -> None:
    storage = SlowLocalStorage()
    local, digest = make_artifact(tmp_path / "local")
    uri = (tmp_path / "remote" / "adapter").as_uri()
    publish_dir(storage, local, uri)
    dest = tmp_path / "node-cache" / "adapter"

    ctx = multiprocessing.get_context("spawn")  # no fork: safe with threads
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_fetch_in_child, args=(storage, uri, str(dest), barrier, results))
        for _ in range(2)
    ]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    assert sorted(outcomes) == [(False, digest), (True, digest)]
    verify_local(dest, digest, allow_extra_files=False)
