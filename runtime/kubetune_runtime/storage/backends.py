"""Storage backends behind one small protocol: local files and S3.

- :class:`LocalStorage` serves ``file://`` URIs, plain paths, ``pvc://claim/path`` (the claim is
  mounted at ``<pvc_root>/<claim>``) and, as the *embedded storage* of a local ``kubetune run``,
  ``s3://bucket/key`` mapped to ``<s3_root>/bucket/key``.
- :class:`S3Storage` serves ``s3://`` through boto3 (AWS or any S3-compatible endpoint), with
  standard-mode retries and managed (multipart, concurrent) transfers.

``hf://`` is not storage: Hub models and datasets are loaded by transformers / datasets.

Prefix semantics are the same on both backends: a URI names a *prefix* (a directory) whose
files are listed recursively by relative ``/``-separated keys; a directory with no files
does not "exist" (as in S3). Credentials come from the environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``) or the pod's identity; they are never
logged and never appear in exception messages.

Importing this module does no work; boto3 is imported only when an S3 client is built.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, NoReturn, Protocol, runtime_checkable

from kubetune_runtime.config import StorageConfig
from kubetune_runtime.errors import ConfigInvalid, StorageFailure
from kubetune_runtime.storage.uris import ParsedURI, parse_uri

__all__ = [
    "DEFAULT_MAX_CONCURRENCY",
    "DEFAULT_MULTIPART_CHUNKSIZE",
    "DEFAULT_MULTIPART_THRESHOLD",
    "DEFAULT_PVC_ROOT",
    "LocalStorage",
    "NotFound",
    "S3Storage",
    "Storage",
    "fsync_dir",
    "local_files",
    "make_s3_client",
    "open_storage",
    "path_inside",
    "s3_client_config",
    "write_bytes_atomic",
]

log = logging.getLogger(__name__)

DEFAULT_PVC_ROOT: Final = Path("/mnt/pvc")
DEFAULT_MULTIPART_THRESHOLD: Final = 64 * 1024 * 1024  # bytes; S3's minimum part is 5 MiB
DEFAULT_MULTIPART_CHUNKSIZE: Final = 64 * 1024 * 1024  # bytes
DEFAULT_MAX_CONCURRENCY: Final = 8  # threads per managed transfer
MAX_ATTEMPTS: Final = 5  # total attempts per request (botocore "standard" retry mode)
_DELETE_BATCH: Final = 1000  # S3 DeleteObjects limit
_NOT_FOUND_CODES: Final = frozenset({"404", "NoSuchKey", "NotFound"})
_CREDENTIAL_ENV: Final = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_HF_NOT_STORAGE: Final = (
    "hf:// URIs are not storage: models and datasets on the Hugging Face Hub are loaded by"
    " transformers / datasets directly; expected s3://, pvc://, file:// or a local path"
)


class NotFound(StorageFailure):
    """The object, file or prefix does not exist (a :class:`StorageFailure`)."""


@runtime_checkable
class Storage(Protocol):
    """Operations on files and prefixes addressed by URI.

    A URI names an object (a file) or a prefix (a directory). Keys returned by :meth:`list`
    are relative to the prefix, ``/``-separated, sorted. All methods raise
    :class:`~kubetune_runtime.errors.StorageFailure` when storage cannot be read or written
    (:class:`NotFound` when the object or prefix does not exist) and
    :class:`~kubetune_runtime.errors.ConfigInvalid` for a URI this backend does not serve.
    """

    def local_path(self, uri: str) -> Path | None:
        """The local file system path of ``uri``, or ``None`` for remote storage."""
        ...

    def download_file(self, uri: str, dest: Path) -> Path:
        """Copy the object at ``uri`` to the file ``dest`` (parents created); return ``dest``."""
        ...

    def download_dir(self, uri: str, dest: Path) -> Path:
        """Copy every file under the prefix ``uri`` into the directory ``dest``; return it.

        Raises:
            NotFound: no file under ``uri``.
        """
        ...

    def upload_file(self, local: Path, uri: str) -> None:
        """Store the local file ``local`` as the object ``uri`` (replacing it)."""
        ...

    def upload_dir(self, local_dir: Path, uri: str) -> None:
        """Store every file under ``local_dir`` under the prefix ``uri``, keeping relative keys."""
        ...

    def list(self, uri_prefix: str) -> builtins.list[str]:
        """Relative keys of every file under ``uri_prefix`` (recursive, sorted; ``[]`` if none)."""
        ...

    def exists(self, uri: str) -> bool:
        """Whether ``uri`` is a file, or a prefix with at least one file under it."""
        ...

    def delete_prefix(self, uri: str) -> None:
        """Delete the object ``uri`` and everything under the prefix ``uri`` (no-op if absent).

        Refuses (StorageFailure) a bucket, claim or file system root.
        """
        ...

    def copy_prefix(self, src_uri: str, dst_uri: str) -> None:
        """Copy every file under ``src_uri`` to the same relative key under ``dst_uri``.

        Server-side on S3. Raises NotFound when ``src_uri`` holds no file.
        """
        ...

    def read_text(self, uri: str) -> str:
        """The UTF-8 text of a small object (raises NotFound when absent)."""
        ...

    def write_text(self, uri: str, text: str) -> None:
        """Store ``text`` (UTF-8) as the object ``uri``, atomically replacing it."""
        ...


def local_files(root: Path) -> list[tuple[str, Path]]:
    """Every regular file under ``root``, as ``(relative posix key, path)`` sorted by key.

    Symbolic links to files and directories are followed (a directory reached twice is
    visited once, so link loops end). Returns ``[]`` when ``root`` is not a directory.

    Raises:
        StorageFailure: the directory tree cannot be read.
    """
    if not root.is_dir():
        return []
    files: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def _on_error(exc: OSError) -> NoReturn:
        raise StorageFailure(f"cannot list {exc.filename}: {exc.strerror or exc}") from exc

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=_on_error):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        base = Path(dirpath)
        for filename in filenames:
            path = base / filename
            if path.is_file():
                files.append((path.relative_to(root).as_posix(), path))
    files.sort(key=lambda item: item[0])
    return files


class LocalStorage:
    """Files on a local or mounted file system (file://, plain paths, pvc://, embedded s3://).

    Writes go to a temporary file beside the target and are renamed into place, so a reader
    never sees a partly written file; uploads and ``write_text`` are fsynced.

    Args:
        pvc_root: where claims are mounted: ``pvc://claim/p`` is ``<pvc_root>/claim/p``; the
            claim's directory must exist (an unmounted claim is an error, not a new directory).
        s3_root: when set, ``s3://bucket/key`` is ``<s3_root>/bucket/key`` (embedded storage
            for local runs; buckets are created on first write). When ``None``, s3:// URIs are
            refused.
    """

    def __init__(self, *, pvc_root: Path = DEFAULT_PVC_ROOT, s3_root: Path | None = None) -> None:
        self.pvc_root = pvc_root
        self.s3_root = s3_root

    def __repr__(self) -> str:
        return f"LocalStorage(pvc_root={self.pvc_root!r}, s3_root={self.s3_root!r})"

    def local_path(self, uri: str) -> Path:
        """The path ``uri`` maps to (always local for this backend).

        Raises:
            ConfigInvalid: ``uri`` is invalid, hf://, or s3:// without an embedded root.
            StorageFailure: a pvc:// claim is not mounted under ``pvc_root``.
        """
        parsed = _parse(uri)
        if parsed.scheme == "file":
            return Path(parsed.path or ".")
        if parsed.scheme == "pvc":
            mount = self.pvc_root / str(parsed.claim)
            if not mount.is_dir():
                raise StorageFailure(
                    f"{uri}: claim {parsed.claim!r} is not mounted; expected a directory at {mount}"
                )
            return mount / parsed.path if parsed.path else mount
        if parsed.scheme == "s3":
            if self.s3_root is None:
                raise ConfigInvalid(
                    f"{uri}: this local storage has no embedded S3 root; an s3:// URI needs S3"
                    " storage (an endpoint or AWS) or a local run's embedded storage"
                )
            root = self.s3_root / str(parsed.bucket)
            return root / parsed.key if parsed.key else root
        raise ConfigInvalid(f"{uri}: {_HF_NOT_STORAGE}")

    def download_file(self, uri: str, dest: Path) -> Path:
        """Copy the file at ``uri`` to ``dest``; see :meth:`Storage.download_file`."""
        src = self._existing_file(uri)
        with _local_errors("download", uri):
            _copy_file(src, dest, durable=False)
        return dest

    def download_dir(self, uri: str, dest: Path) -> Path:
        """Copy every file under ``uri`` into ``dest``; see :meth:`Storage.download_dir`."""
        files = self._files_or_not_found(uri)
        with _local_errors("download", uri):
            for rel, src in files:
                _copy_file(src, path_inside(dest, rel, uri), durable=False)
        return dest

    def upload_file(self, local: Path, uri: str) -> None:
        """Copy ``local`` to ``uri`` (durably); see :meth:`Storage.upload_file`."""
        dst = self.local_path(uri)
        if not local.is_file():
            raise StorageFailure(f"cannot upload {local} to {uri}: not a file")
        with _local_errors("upload to", uri):
            _copy_file(local, dst, durable=True)

    def upload_dir(self, local_dir: Path, uri: str) -> None:
        """Copy every file under ``local_dir`` under ``uri``; see :meth:`Storage.upload_dir`."""
        dst = self.local_path(uri)
        _require_dir(local_dir, uri)
        with _local_errors("upload to", uri):
            for rel, src in local_files(local_dir):
                _copy_file(src, dst / rel, durable=True)

    def list(self, uri_prefix: str) -> builtins.list[str]:
        """Relative keys under ``uri_prefix``; see :meth:`Storage.list`."""
        return [rel for rel, _ in local_files(self.local_path(uri_prefix))]

    def exists(self, uri: str) -> bool:
        """Whether ``uri`` is a file or a directory holding files."""
        path = self.local_path(uri)
        return path.is_file() or bool(local_files(path))

    def delete_prefix(self, uri: str) -> None:
        """Delete the file or directory tree at ``uri``; see :meth:`Storage.delete_prefix`."""
        path = self.local_path(uri)
        parsed = _parse(uri)
        if (parsed.scheme == "s3" and not parsed.key) or (
            parsed.scheme == "pvc" and not parsed.path
        ):
            raise StorageFailure(f"refusing to delete {uri}: a bucket or claim root")
        if path.resolve() == Path(path.anchor or "/").resolve() or path.resolve() == Path.cwd():
            raise StorageFailure(f"refusing to delete {uri}: a file system root or the cwd")
        with _local_errors("delete", uri):
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)

    def copy_prefix(self, src_uri: str, dst_uri: str) -> None:
        """Copy every file under ``src_uri`` under ``dst_uri``; see :meth:`Storage.copy_prefix`."""
        files = self._files_or_not_found(src_uri)
        dst = self.local_path(dst_uri)
        with _local_errors("copy to", dst_uri):
            for rel, src in files:
                _copy_file(src, dst / rel, durable=True)

    def read_text(self, uri: str) -> str:
        """The UTF-8 text of the file at ``uri``; see :meth:`Storage.read_text`."""
        path = self._existing_file(uri)
        with _local_errors("read", uri):
            return path.read_text(encoding="utf-8")

    def write_text(self, uri: str, text: str) -> None:
        """Atomically (temp file, fsync, rename) write ``text`` to ``uri``."""
        path = self.local_path(uri)
        with _local_errors("write", uri):
            write_bytes_atomic(path, text.encode("utf-8"))

    def _existing_file(self, uri: str) -> Path:
        path = self.local_path(uri)
        if not path.is_file():
            if path.exists():
                raise StorageFailure(f"{uri} is a directory; expected a file")
            raise NotFound(f"{uri} does not exist")
        return path

    def _files_or_not_found(self, uri: str) -> builtins.list[tuple[str, Path]]:
        files = local_files(self.local_path(uri))
        if not files:
            raise NotFound(f"no files under {uri}")
        return files


def s3_client_config(config: StorageConfig) -> Any:
    """The ``botocore.config.Config`` for an S3 client built from ``config``.

    Path-style addressing when ``config.path_style`` (``http://endpoint/bucket/key``), else
    virtual-hosted (``http://bucket.endpoint/key``; on AWS, botocore falls back to path style
    for bucket names that are not DNS-compatible). Retries: botocore's ``standard`` mode, at most
    :data:`MAX_ATTEMPTS` attempts per request. For custom endpoints (S3-compatible stores),
    request checksums are sent only when an operation requires them, since many such stores
    reject the CRC checksums boto3 adds by default.
    """
    from botocore.config import Config  # noqa: PLC0415

    options: dict[str, Any] = {
        "region_name": config.region,
        "s3": {"addressing_style": "path" if config.path_style else "virtual"},
        "retries": {"mode": "standard", "total_max_attempts": MAX_ATTEMPTS},
        "connect_timeout": 10,
        "read_timeout": 120,
        "tcp_keepalive": True,
        "user_agent_extra": "kubetune",
    }
    if config.endpoint_url is not None:
        options["request_checksum_calculation"] = "when_required"
        options["response_checksum_validation"] = "when_required"
    return Config(**options)


def make_s3_client(config: StorageConfig) -> Any:
    """A boto3 S3 client for ``config`` (endpoint, region, addressing, CA bundle, retries).

    Credentials are resolved by boto3's default chain (environment variables, web identity,
    instance or pod identity); none are passed or logged here. ``config.ca_bundle_file``
    becomes ``verify=`` (TLS verification against that bundle); otherwise the default trust
    store (or ``AWS_CA_BUNDLE``) applies.

    Raises:
        StorageFailure: boto3 is not installed or the client cannot be built.
    """
    try:
        import boto3  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - boto3 ships with the runtime extra
        raise StorageFailure("s3:// storage needs boto3 (pip install 'kubetune[runtime]')") from exc
    verify: str | None = config.ca_bundle_file or None
    try:
        return boto3.session.Session().client(
            "s3",
            endpoint_url=config.endpoint_url,
            region_name=config.region,
            config=s3_client_config(config),
            verify=verify,
        )
    except _boto_errors() as exc:
        raise StorageFailure(f"cannot create an S3 client: {_describe(exc)}") from exc


class S3Storage:
    """S3 or an S3-compatible store, through boto3 with managed (multipart) transfers.

    Files at or above ``multipart_threshold`` bytes are uploaded and downloaded in
    ``multipart_chunksize`` parts with up to ``max_concurrency`` threads; copies between
    prefixes are server-side (``CopyObject``, or multipart copy for large objects).

    Args:
        config: endpoint, region, addressing style and CA bundle.
        client: an existing boto3 S3 client (tests); built from ``config`` when ``None``.
        multipart_threshold: bytes at which transfers switch to multipart (min 5 MiB on S3).
        multipart_chunksize: bytes per part (min 5 MiB on S3).
        max_concurrency: threads per managed transfer.
    """

    def __init__(
        self,
        config: StorageConfig | None = None,
        *,
        client: Any = None,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> None:
        from boto3.s3.transfer import TransferConfig  # noqa: PLC0415

        self.config = config or StorageConfig()
        self.client: Any = client if client is not None else make_s3_client(self.config)
        self.transfer_config: Any = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            use_threads=max_concurrency > 1,
        )

    def __repr__(self) -> str:
        return f"S3Storage(endpoint_url={self.config.endpoint_url!r})"

    def local_path(self, uri: str) -> Path | None:
        """Always ``None``: S3 objects have no local path."""
        return None

    def download_file(self, uri: str, dest: Path) -> Path:
        """Download the object ``uri`` to ``dest``; see :meth:`Storage.download_file`."""
        bucket, key = self._object(uri)
        with _s3_errors("download", uri):
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(bucket, key, str(dest), Config=self.transfer_config)
        return dest

    def download_dir(self, uri: str, dest: Path) -> Path:
        """Download every object under ``uri`` into ``dest``; see :meth:`Storage.download_dir`."""
        bucket, key = self._location(uri)
        rels = self.list(uri)
        if not rels:
            raise NotFound(f"no files under {uri}")
        for rel in rels:
            target = path_inside(dest, rel, uri)
            with _s3_errors("download", uri):
                target.parent.mkdir(parents=True, exist_ok=True)
                self.client.download_file(
                    bucket, _concat(key, rel), str(target), Config=self.transfer_config
                )
        return dest

    def upload_file(self, local: Path, uri: str) -> None:
        """Upload ``local`` as the object ``uri``; see :meth:`Storage.upload_file`."""
        bucket, key = self._object(uri)
        if not local.is_file():
            raise StorageFailure(f"cannot upload {local} to {uri}: not a file")
        log.debug("uploading %s to %s", local, uri)
        with _s3_errors("upload to", uri):
            self.client.upload_file(str(local), bucket, key, Config=self.transfer_config)

    def upload_dir(self, local_dir: Path, uri: str) -> None:
        """Upload every file under ``local_dir`` under ``uri``; see :meth:`Storage.upload_dir`."""
        bucket, key = self._location(uri)
        _require_dir(local_dir, uri)
        for rel, path in local_files(local_dir):
            with _s3_errors("upload to", uri):
                self.client.upload_file(
                    str(path), bucket, _concat(key, rel), Config=self.transfer_config
                )

    def list(self, uri_prefix: str) -> builtins.list[str]:
        """Relative keys under ``uri_prefix``; see :meth:`Storage.list`."""
        bucket, key = self._location(uri_prefix)
        prefix = f"{key}/" if key else ""
        keys: builtins.list[str] = []
        with _s3_errors("list", uri_prefix):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    rel = str(item["Key"])[len(prefix) :]
                    if rel and not rel.endswith("/"):  # skip "directory" placeholder objects
                        keys.append(rel)
        return sorted(keys)

    def exists(self, uri: str) -> bool:
        """Whether ``uri`` is an object or a prefix with objects under it."""
        bucket, key = self._location(uri)
        if key:
            try:
                with _s3_errors("check", uri):
                    self.client.head_object(Bucket=bucket, Key=key)
                return True
            except NotFound:
                pass
        with _s3_errors("list", uri):
            page = self.client.list_objects_v2(
                Bucket=bucket, Prefix=f"{key}/" if key else "", MaxKeys=1
            )
        return int(page.get("KeyCount", 0)) > 0

    def delete_prefix(self, uri: str) -> None:
        """Delete the object and every object under ``uri``; see :meth:`Storage.delete_prefix`."""
        bucket, key = self._location(uri)
        if not key:
            raise StorageFailure(f"refusing to delete {uri}: a whole bucket")
        keys = [key, *(_concat(key, rel) for rel in self.list(uri))]
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = [{"Key": k} for k in keys[start : start + _DELETE_BATCH]]
            with _s3_errors("delete", uri):
                response = self.client.delete_objects(
                    Bucket=bucket, Delete={"Objects": batch, "Quiet": True}
                )
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageFailure(
                    f"cannot delete {len(errors)} object(s) under {uri}: first"
                    f" {first.get('Key')!r}: {first.get('Code')}: {first.get('Message')}"
                )

    def copy_prefix(self, src_uri: str, dst_uri: str) -> None:
        """Server-side copy of every object under ``src_uri`` to ``dst_uri``."""
        src_bucket, src_key = self._location(src_uri)
        dst_bucket, dst_key = self._location(dst_uri)
        rels = self.list(src_uri)
        if not rels:
            raise NotFound(f"no files under {src_uri}")
        for rel in rels:
            with _s3_errors("copy to", dst_uri):
                self.client.copy(
                    {"Bucket": src_bucket, "Key": _concat(src_key, rel)},
                    dst_bucket,
                    _concat(dst_key, rel),
                    Config=self.transfer_config,
                )

    def read_text(self, uri: str) -> str:
        """The UTF-8 text of the object ``uri``; see :meth:`Storage.read_text`."""
        bucket, key = self._object(uri)
        with _s3_errors("read", uri):
            body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StorageFailure(f"{uri} is not UTF-8 text") from exc

    def write_text(self, uri: str, text: str) -> None:
        """Store ``text`` as the object ``uri`` (a single PUT: atomic for readers)."""
        bucket, key = self._object(uri)
        with _s3_errors("write", uri):
            self.client.put_object(Bucket=bucket, Key=key, Body=text.encode("utf-8"))

    def _location(self, uri: str) -> tuple[str, str]:
        parsed = _parse(uri)
        if parsed.scheme != "s3":
            if parsed.scheme == "hf":
                raise ConfigInvalid(f"{uri}: {_HF_NOT_STORAGE}")
            raise ConfigInvalid(f"{uri}: S3 storage serves s3://bucket/key URIs only")
        return str(parsed.bucket), parsed.key or ""

    def _object(self, uri: str) -> tuple[str, str]:
        bucket, key = self._location(uri)
        if not key:
            raise ConfigInvalid(f"{uri}: expected s3://bucket/key naming an object, not a bucket")
        return bucket, key


def open_storage(
    uri: str,
    config: StorageConfig,
    *,
    pvc_root: Path = DEFAULT_PVC_ROOT,
    local_s3_root: Path | None = None,
) -> Storage:
    """The storage that serves ``uri``.

    - ``file://`` and plain paths, ``pvc://``: :class:`LocalStorage` (claims under ``pvc_root``).
    - ``s3://`` with ``local_s3_root`` set and no ``config.endpoint_url``: the embedded
      storage, a :class:`LocalStorage` where ``s3://bucket/key`` is ``local_s3_root/bucket/key``
      (so a local quickstart needs no server).
    - other ``s3://``: :class:`S3Storage` built from ``config``.

    The returned storage also serves other URIs of the same kind. No network call is made.

    Raises:
        ConfigInvalid: ``uri`` is invalid, or an ``hf://`` URI (not storage: the Hub is read
            by transformers / datasets).
        StorageFailure: the S3 client cannot be built (e.g. boto3 missing).
    """
    parsed = _parse(uri)
    if parsed.scheme == "hf":
        raise ConfigInvalid(f"{uri}: {_HF_NOT_STORAGE}")
    embedded = local_s3_root if config.endpoint_url is None else None
    if parsed.scheme == "s3" and embedded is None:
        return S3Storage(config)
    return LocalStorage(pvc_root=pvc_root, s3_root=embedded)


# ------------------------------------------------------------------------------ helpers


def _parse(uri: str) -> ParsedURI:
    try:
        return parse_uri(uri)
    except ValueError as exc:
        raise ConfigInvalid(str(exc)) from exc


def _require_dir(local_dir: Path, uri: str) -> None:
    if not local_dir.is_dir():
        raise StorageFailure(f"cannot upload {local_dir} to {uri}: not a directory")


def _concat(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def path_inside(dest: Path, rel: str, uri: str) -> Path:
    """``dest / rel`` for a ``/``-separated relative key from storage or a manifest.

    Raises:
        StorageFailure: ``rel`` is absolute or has an empty, ``.`` or ``..`` segment or a
            backslash (it could land outside ``dest``); the message names ``uri``.
    """
    parts = rel.split("/")
    if rel.startswith("/") or any(part in ("", ".", "..") for part in parts) or "\\" in rel:
        raise StorageFailure(f"refusing to download {rel!r} from {uri}: not a safe relative path")
    return dest.joinpath(*parts)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (renames, new files) to disk; best effort."""
    with contextlib.suppress(OSError):  # not every file system supports it (best effort)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _copy_file(src: Path, dst: Path, *, durable: bool) -> None:
    """Copy ``src`` to ``dst`` through a temporary sibling renamed into place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{secrets.token_hex(6)}")
    try:
        with src.open("rb") as reader, tmp.open("wb") as writer:
            shutil.copyfileobj(reader, writer, length=1024 * 1024)
            if durable:
                writer.flush()
                os.fsync(writer.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(dst.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary sibling renamed into place.

    Readers see the old content or the new, never a partial file. Parents are created.

    Raises:
        OSError: the file cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")
    try:
        with tmp.open("wb") as writer:
            writer.write(data)
            writer.flush()
            os.fsync(writer.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def _local_errors(action: str, uri: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError as exc:
        raise NotFound(f"cannot {action} {uri}: {exc.filename} does not exist") from exc
    except OSError as exc:
        raise StorageFailure(f"cannot {action} {uri}: {exc.strerror or exc}") from exc


@functools.cache
def _boto_errors() -> tuple[type[BaseException], ...]:
    """The exception types boto3 / botocore / s3transfer raise (imported lazily)."""
    from boto3.exceptions import (  # noqa: PLC0415
        Boto3Error,
        S3TransferFailedError,
        S3UploadFailedError,
    )
    from botocore.exceptions import (  # noqa: PLC0415
        BotoCoreError,
        ClientError,
    )

    return (ClientError, BotoCoreError, Boto3Error, S3UploadFailedError, S3TransferFailedError)


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


def _scrub(text: str) -> str:
    """Remove credential values that might appear in a third-party message."""
    for name in _CREDENTIAL_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _describe(exc: BaseException) -> str:
    code = _error_code(exc)
    if code is not None:
        response: dict[str, Any] = getattr(exc, "response", {})
        message = response.get("Error", {}).get("Message") or ""
        return _scrub(f"{code}: {message}".rstrip(": "))
    return _scrub(f"{type(exc).__name__}: {exc}")


@contextlib.contextmanager
def _s3_errors(action: str, uri: str) -> Iterator[None]:
    errors: tuple[type[BaseException], ...] = (*_boto_errors(), OSError)
    try:
        yield
    except errors as exc:
        code = _error_code(exc)
        if code in _NOT_FOUND_CODES:
            raise NotFound(f"{uri} does not exist") from exc
        if isinstance(exc, FileNotFoundError):
            raise StorageFailure(f"cannot {action} {uri}: {exc.filename} does not exist") from exc
        raise StorageFailure(f"cannot {action} {uri}: {_describe(exc)}") from exc
