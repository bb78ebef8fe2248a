"""Verified artifacts: a manifest that pins every byte, publishing that is all-or-nothing.

An artifact is a directory (a prefix in storage) holding its files, ``manifest.json`` and,
once complete, the marker ``_COMPLETE``.

- ``manifest.json`` lists every file (relative path, sha256, size in bytes) sorted by path,
  plus caller metadata; the artifact's **digest** is ``sha256:<hex>`` of manifest.json's
  bytes, so one value pins every byte. The JSON is canonical (sorted keys, fixed layout), so
  the digest is reproducible from the same files and metadata.
- ``_COMPLETE`` is JSON ``{"schema", "digest", "files", "size_bytes"}``, written last.

Publishing (:func:`publish_dir`) and its guarantees:

- Remote storage (S3): every file is uploaded to a sibling staging prefix
  ``<parent>/.staging-<name>-<random>/``; only when all uploads succeeded is the
  destination's ``_COMPLETE`` deleted (first, on its own), the previous contents deleted,
  the staging prefix copied server-side into ``<uri>``, ``_COMPLETE`` written **last**,
  and the staging prefix deleted (also, best effort, after a failure).
  An interruption while uploading leaves the previous complete artifact, if any,
  untouched and complete. An interruption after that leaves ``<uri>`` without
  ``_COMPLETE``: not complete, never half-replaced-and-complete.
- Local file systems (file://, pvc://, embedded s3://): the files and ``_COMPLETE`` are
  copied into ``<parent>/.staging-<name>-<random>/``, fsynced, and the directory is renamed
  onto ``<uri>`` (atomic). An existing artifact is first renamed aside (``.old-<name>-...``)
  and removed afterwards, so readers see the old artifact, briefly nothing, or the new one.

Reading (:func:`fetch_verified`, :func:`verify_local`) refuses (ArtifactInvalid) an artifact
without ``_COMPLETE``, whose manifest digest differs from the marker or the expected digest,
or whose files are missing or differ in size or sha256. **Files not in the manifest are
ignored and never downloaded**, so they can never be loaded from a fetched copy; a local
copy that holds such extras is not reused but downloaded again.

Concurrent publishers to the same URI are not coordinated (last one wins); a reader that
races a publisher gets ArtifactInvalid (digests disagree), never unverified bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from kubetune_runtime.errors import ArtifactInvalid, ConfigInvalid, StorageFailure
from kubetune_runtime.storage.backends import (
    NotFound,
    Storage,
    fsync_dir,
    local_files,
    path_inside,
    write_bytes_atomic,
)
from kubetune_runtime.storage.uris import basename, join, parent, parse_uri

__all__ = [
    "COMPLETE_MARKER",
    "MANIFEST_NAME",
    "MANIFEST_SCHEMA",
    "MARKER_SCHEMA",
    "FileEntry",
    "PublishedArtifact",
    "VerifiedArtifact",
    "fetch_verified",
    "publish_dir",
    "read_marker",
    "verify_local",
    "write_manifest",
]

log = logging.getLogger(__name__)

MANIFEST_NAME: Final = "manifest.json"
COMPLETE_MARKER: Final = "_COMPLETE"
MANIFEST_SCHEMA: Final = "kubetune.io/manifest/v1"
MARKER_SCHEMA: Final = "kubetune.io/complete/v1"
_RESERVED: Final = frozenset({MANIFEST_NAME, COMPLETE_MARKER})
_DIGEST_RE: Final = re.compile(r"^sha256:[a-f0-9]{64}$")
_HEX_RE: Final = re.compile(r"^[a-f0-9]{64}$")
_CHUNK: Final = 1024 * 1024
_MAX_LISTED_PROBLEMS: Final = 5


@dataclass(frozen=True)
class FileEntry:
    """One file of an artifact as listed in its manifest.

    Attributes:
        path: relative, ``/``-separated path inside the artifact.
        sha256: lowercase hex sha256 of the file's bytes.
        size: size in bytes.
    """

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class PublishedArtifact:
    """What :func:`publish_dir` made visible.

    Attributes:
        uri: the artifact's URI (as given).
        digest: ``sha256:<hex>`` of its manifest.json.
        size_bytes: bytes of the listed files plus manifest.json (the marker not counted).
        files: the manifest's entries, sorted by path.
    """

    uri: str
    digest: str
    size_bytes: int
    files: tuple[FileEntry, ...]


@dataclass(frozen=True)
class VerifiedArtifact:
    """A local directory whose files were checked against a manifest and digest.

    Attributes:
        uri: where it came from (for :func:`verify_local`, the directory as a file:// URI).
        path: the local directory holding manifest.json and the listed files.
        digest: ``sha256:<hex>`` of manifest.json.
        size_bytes: bytes of the listed files plus manifest.json.
        files: the manifest's entries, sorted by path.
        metadata: the manifest's ``metadata`` object (base model, versions, metrics, ...).
        downloaded: whether this call downloaded it (``False``: a verified copy was reused).
    """

    uri: str
    path: Path
    digest: str
    size_bytes: int
    files: tuple[FileEntry, ...]
    metadata: Mapping[str, Any] = field(compare=False)
    downloaded: bool = False


def write_manifest(local_dir: Path, *, metadata: Mapping[str, Any]) -> tuple[Path, str]:
    """Write ``local_dir/manifest.json`` listing every file under ``local_dir``.

    Every regular file (symbolic links followed) is listed with its relative path, sha256 and
    size in bytes, sorted by path; ``manifest.json`` and ``_COMPLETE`` at the top level are
    not listed. The output is canonical JSON, so the same files and metadata always give the
    same digest (timestamps, if wanted, belong in ``metadata``).

    Args:
        local_dir: the artifact directory (e.g. a saved adapter).
        metadata: JSON-serializable facts the caller records: base model and revision,
            training config digest, dataset digest, metrics, library versions, ...

    Returns:
        ``(path of manifest.json, "sha256:<hex of its bytes>")``.

    Raises:
        ArtifactInvalid: ``local_dir`` is not a directory or holds no file.
        ValueError: ``metadata`` is not JSON-serializable (or holds NaN / infinity).
        StorageFailure: a file cannot be read or the manifest cannot be written.
    """
    if not local_dir.is_dir():
        raise ArtifactInvalid(f"cannot write a manifest for {local_dir}: not a directory")
    entries = [
        _entry_for(rel, path) for rel, path in local_files(local_dir) if rel not in _RESERVED
    ]
    if not entries:
        raise ArtifactInvalid(f"cannot write a manifest for {local_dir}: it holds no files")
    body = {
        "schema": MANIFEST_SCHEMA,
        "files": [{"path": e.path, "sha256": e.sha256, "size": e.size} for e in entries],
        "metadata": dict(metadata),
    }
    try:
        text = json.dumps(body, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"manifest metadata for {local_dir} must be JSON-serializable (no NaN): {exc}"
        ) from exc
    data = (text + "\n").encode("utf-8")
    path = local_dir / MANIFEST_NAME
    try:
        write_bytes_atomic(path, data)
    except OSError as exc:
        raise StorageFailure(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path, _digest(data)


def verify_local(
    directory: Path,
    expected_digest: str | None = None,
    *,
    allow_extra_files: bool = True,
) -> VerifiedArtifact:
    """Check a local artifact directory against its manifest.json (and an expected digest).

    Args:
        directory: holds manifest.json and the listed files.
        expected_digest: ``sha256:<hex>`` the manifest must have; ``None`` checks only that
            the files match the manifest.
        allow_extra_files: when ``False``, files not listed in the manifest (other than
            manifest.json and ``_COMPLETE``) make the directory invalid. When ``True``
            (default) they are ignored: callers must load only the listed files.

    Returns:
        The verified artifact (``uri`` is the directory as a file:// URI).

    Raises:
        ArtifactInvalid: manifest.json is missing or malformed, its digest differs from
            ``expected_digest``, or a listed file is missing or differs in size or sha256
            (the message names the files), or (strict) extra files are present.
        ConfigInvalid: ``expected_digest`` is not ``sha256:`` + 64 lowercase hex digits.
    """
    _check_digest_format(expected_digest)
    manifest = directory / MANIFEST_NAME
    try:
        data = manifest.read_bytes()
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise ArtifactInvalid(
            f"{directory}: no {MANIFEST_NAME}; expected an artifact directory written by"
            " write_manifest or fetch_verified"
        ) from exc
    except OSError as exc:
        raise StorageFailure(f"cannot read {manifest}: {exc.strerror or exc}") from exc
    digest = _digest(data)
    if expected_digest is not None and digest != expected_digest:
        raise ArtifactInvalid(
            f"{directory}: {MANIFEST_NAME} has digest {digest}, expected {expected_digest}"
        )
    entries, metadata = _parse_manifest(data, str(directory))
    problems = [
        problem
        for entry in entries
        if (problem := _check_file(path_inside(directory, entry.path, str(directory)), entry))
    ]
    if not allow_extra_files:
        listed = {entry.path for entry in entries} | _RESERVED
        problems += [
            f"{rel}: not listed in the manifest"
            for rel, _ in local_files(directory)
            if rel not in listed
        ]
    if problems:
        raise ArtifactInvalid(f"{directory} does not match its manifest: {_summary(problems)}")
    return VerifiedArtifact(
        uri=directory.resolve().as_uri(),
        path=directory,
        digest=digest,
        size_bytes=sum(entry.size for entry in entries) + len(data),
        files=entries,
        metadata=metadata,
    )


def publish_dir(storage: Storage, local_dir: Path, uri: str) -> PublishedArtifact:
    """Publish ``local_dir`` to ``uri`` so that it becomes visible only when complete.

    ``local_dir`` must hold a manifest.json (see :func:`write_manifest`) that matches its
    files; only the listed files and manifest.json are published (a local ``_COMPLETE`` or
    unlisted files are not). The protocol and its guarantees are in the module docstring.

    Args:
        storage: the storage serving ``uri`` (see ``open_storage``).
        local_dir: the artifact directory.
        uri: the artifact's prefix, e.g. ``s3://models/team-a/gsm8k/adapter``; not a bucket
            or claim root.

    Returns:
        The published artifact (URI, digest, size, files).

    Raises:
        ArtifactInvalid: ``local_dir`` has no manifest or does not match it.
        ConfigInvalid: ``uri`` is invalid, hf://, or a bucket / claim / file system root.
        StorageFailure: an upload, copy or delete failed; ``uri`` is then either untouched
            (failure while staging) or not complete (no ``_COMPLETE``).
    """
    local = verify_local(local_dir)
    name = _artifact_name(uri)
    files = [
        *(
            (entry.path, path_inside(local_dir, entry.path, str(local_dir)))
            for entry in local.files
        ),
        (MANIFEST_NAME, local_dir / MANIFEST_NAME),
    ]
    marker = _marker_text(local)
    target = storage.local_path(uri)
    if target is not None:
        _publish_local(files, target, name, marker, uri)
    else:
        _publish_remote(storage, files, uri, name, marker)
    log.info(
        "published %s (%s, %d files, %d bytes)", uri, local.digest, len(files), local.size_bytes
    )
    return PublishedArtifact(
        uri=uri, digest=local.digest, size_bytes=local.size_bytes, files=local.files
    )


def read_marker(storage: Storage, uri: str) -> str:
    """The digest recorded by the artifact's ``_COMPLETE`` marker.

    Returns:
        ``sha256:<hex>`` of the artifact's manifest.json, as published.

    Raises:
        ArtifactInvalid: the marker is missing ("not complete: upload interrupted or still
            running") or malformed.
        StorageFailure: storage cannot be read.
    """
    marker_uri = join(uri, COMPLETE_MARKER)
    try:
        text = storage.read_text(marker_uri)
    except NotFound as exc:
        raise ArtifactInvalid(
            f"{uri} is not complete: upload interrupted or still running"
            f" (no {COMPLETE_MARKER} marker)"
        ) from exc
    try:
        body = json.loads(text)
        digest = body["digest"] if isinstance(body, dict) else None
    except ValueError:
        digest = None
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise ArtifactInvalid(
            f"{marker_uri} is not a valid completion marker; expected JSON with"
            ' "digest": "sha256:<64 hex digits>"'
        )
    return digest


def fetch_verified(
    storage: Storage, uri: str, dest: Path, *, expected_digest: str | None
) -> VerifiedArtifact:
    """Download the complete artifact at ``uri`` into ``dest`` and verify every byte.

    Only one process per node downloads a given ``dest``: an exclusive ``fcntl.flock`` on
    ``dest.parent/.<dest.name>.lock`` is held throughout; processes that waited find the
    verified copy and reuse it (``downloaded=False``). Files are downloaded into a sibling
    temporary directory, checked, and renamed onto ``dest``, so ``dest`` only ever holds a
    verified artifact. Only manifest.json and the listed files are downloaded.

    Args:
        storage: the storage serving ``uri``.
        uri: the artifact's prefix.
        dest: local directory to hold the artifact (replaced if it holds something else).
        expected_digest: ``sha256:<hex>`` the artifact must have (e.g. an EvalJob's pinned
            digest); ``None`` accepts whatever complete artifact is published.

    Returns:
        The verified artifact at ``dest``.

    Raises:
        ArtifactInvalid: no ``_COMPLETE`` marker; the manifest's digest differs from the
            marker or ``expected_digest``; a listed file is missing in storage or differs in
            size or sha256 (the message names it); or the manifest is malformed.
        ConfigInvalid: ``expected_digest`` or ``uri`` is malformed.
        StorageFailure: storage or the local disk cannot be read or written.
    """
    _check_digest_format(expected_digest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageFailure(f"cannot create {dest.parent}: {exc.strerror or exc}") from exc
    with _exclusive_lock(dest.parent / f".{dest.name}.lock"):
        digest = read_marker(storage, uri)
        if expected_digest is not None and digest != expected_digest:
            raise ArtifactInvalid(
                f"{uri} has digest {digest} (from its {COMPLETE_MARKER} marker),"
                f" expected {expected_digest}"
            )
        if dest.exists():
            try:
                local = verify_local(dest, digest, allow_extra_files=False)
            except ArtifactInvalid as exc:
                log.info("local copy of %s is not reusable (%s); downloading again", uri, exc)
            else:
                log.info("reusing verified copy of %s at %s", uri, dest)
                return replace(local, uri=uri, path=dest, downloaded=False)
        _remove_stale(dest)
        staging = dest.parent / f".{dest.name}.partial-{secrets.token_hex(6)}"
        try:
            verified = _download(storage, uri, staging, digest)
            _swap_into_place(staging, dest)
        except OSError as exc:
            raise StorageFailure(f"cannot store {uri} at {dest}: {exc.strerror or exc}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("downloaded and verified %s (%s) to %s", uri, digest, dest)
        return replace(verified, path=dest, downloaded=True)


# ------------------------------------------------------------------------------ publishing


def _publish_remote(
    storage: Storage, files: list[tuple[str, Path]], uri: str, name: str, marker: str
) -> None:
    staging = join(parent(uri), f".staging-{name}-{secrets.token_hex(6)}")
    try:
        for rel, path in files:
            storage.upload_file(path, join(staging, rel))
        staged = set(storage.list(staging))
        missing = sorted({rel for rel, _ in files} - staged)
        if missing:
            raise StorageFailure(f"staging {staging} for {uri} lacks {_summary(missing)}")
        # From here on <uri> is not complete until the marker is written again.
        storage.delete_prefix(join(uri, COMPLETE_MARKER))
        storage.delete_prefix(uri)
        storage.copy_prefix(staging, uri)
        storage.write_text(join(uri, COMPLETE_MARKER), marker)
    finally:
        try:
            storage.delete_prefix(staging)
        except StorageFailure as exc:
            log.warning("could not delete the staging prefix %s: %s", staging, exc)


def _publish_local(
    files: list[tuple[str, Path]], target: Path, name: str, marker: str, uri: str
) -> None:
    if target.exists() and not target.is_dir():
        raise StorageFailure(f"cannot publish to {uri}: {target} exists and is not a directory")
    token = secrets.token_hex(6)
    staging = target.parent / f".staging-{name}-{token}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
        for rel, src in files:
            _copy_durable(src, path_inside(staging, rel, uri))
        write_bytes_atomic(staging / COMPLETE_MARKER, marker.encode("utf-8"))
        for directory in {staging, *(path_inside(staging, rel, uri).parent for rel, _ in files)}:
            fsync_dir(directory)
        _swap_into_place(staging, target, aside=f".old-{name}-{token}")
    except OSError as exc:
        raise StorageFailure(f"cannot publish to {uri}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_into_place(new: Path, target: Path, *, aside: str | None = None) -> None:
    """Rename the directory ``new`` onto ``target``; an existing ``target`` is moved aside."""
    old: Path | None = None
    if target.exists() or target.is_symlink():
        old = target.parent / (aside or f".old-{target.name}-{secrets.token_hex(6)}")
        os.rename(target, old)
    try:
        os.rename(new, target)
    except OSError:
        if old is not None:
            with contextlib.suppress(OSError):
                os.rename(old, target)  # put the previous artifact back
        raise
    fsync_dir(target.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _copy_durable(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as reader, dst.open("wb") as writer:
        shutil.copyfileobj(reader, writer, length=_CHUNK)
        writer.flush()
        os.fsync(writer.fileno())


def _marker_text(artifact: VerifiedArtifact) -> str:
    return (
        json.dumps(
            {
                "schema": MARKER_SCHEMA,
                "digest": artifact.digest,
                "files": len(artifact.files),
                "size_bytes": artifact.size_bytes,
            },
            sort_keys=True,
            indent=2,
        )
        + "\n"
    )


def _artifact_name(uri: str) -> str:
    try:
        parsed = parse_uri(uri)
        if parsed.scheme == "hf":
            raise ValueError(f"{uri}: an artifact is published to s3://, pvc:// or file://")
        name = basename(uri)
        parent(uri)
    except ValueError as exc:
        raise ConfigInvalid(f"cannot publish to {uri}: {exc}") from exc
    if not name or name in (".", "..", "/"):
        raise ConfigInvalid(
            f"cannot publish to {uri}: expected a named prefix such as s3://bucket/models/adapter"
        )
    return name


# ------------------------------------------------------------------------------ fetching


def _download(storage: Storage, uri: str, staging: Path, digest: str) -> VerifiedArtifact:
    manifest_path = staging / MANIFEST_NAME
    try:
        storage.download_file(join(uri, MANIFEST_NAME), manifest_path)
    except NotFound as exc:
        raise ArtifactInvalid(f"{uri}: {MANIFEST_NAME} is missing") from exc
    data = manifest_path.read_bytes()
    actual = _digest(data)
    if actual != digest:
        raise ArtifactInvalid(
            f"{uri}: {MANIFEST_NAME} has digest {actual}, but the {COMPLETE_MARKER} marker"
            f" records {digest} (artifact replaced while reading, or tampered with)"
        )
    entries, metadata = _parse_manifest(data, uri)
    available = set(storage.list(uri))
    missing = [entry.path for entry in entries if entry.path not in available]
    if missing:
        raise ArtifactInvalid(
            f"{uri}: files listed in the manifest are missing: {_summary(missing)}"
        )
    extras = sorted(available - {entry.path for entry in entries} - _RESERVED)
    if extras:
        log.info("%s: ignoring %d file(s) not in the manifest: %s", uri, len(extras), extras[:5])
    problems: list[str] = []
    for entry in entries:
        local = path_inside(staging, entry.path, uri)
        try:
            storage.download_file(join(uri, entry.path), local)
        except NotFound:
            problems.append(f"{entry.path}: missing")
            continue
        if problem := _check_file(local, entry):
            problems.append(problem)
    if problems:
        raise ArtifactInvalid(f"{uri} does not match its manifest: {_summary(problems)}")
    return VerifiedArtifact(
        uri=uri,
        path=staging,
        digest=digest,
        size_bytes=sum(entry.size for entry in entries) + len(data),
        files=entries,
        metadata=metadata,
        downloaded=True,
    )


def _remove_stale(dest: Path) -> None:
    """Remove partial downloads and set-aside copies left next to ``dest`` by crashed runs.

    Called with the lock held, so no live process owns them.
    """
    for pattern in (f".{dest.name}.partial-*", f".old-{dest.name}-*"):
        for stale in dest.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StorageFailure(f"cannot open the lock file {path}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# ------------------------------------------------------------------------------ manifests


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    with path.open("rb") as reader:
        return hashlib.file_digest(reader, "sha256").hexdigest()


def _entry_for(rel: str, path: Path) -> FileEntry:
    try:
        return FileEntry(path=rel, sha256=_sha256_file(path), size=path.stat().st_size)
    except OSError as exc:
        raise StorageFailure(f"cannot read {path}: {exc.strerror or exc}") from exc


def _check_file(path: Path, entry: FileEntry) -> str | None:
    """A problem description, or ``None`` when ``path`` matches ``entry``."""
    try:
        size = path.stat().st_size if path.is_file() else None
        if size is None:
            return f"{entry.path}: missing"
        if size != entry.size:
            return f"{entry.path}: {size} bytes, expected {entry.size}"
        sha = _sha256_file(path)
    except OSError as exc:
        return f"{entry.path}: unreadable ({exc.strerror or exc})"
    if sha != entry.sha256:
        return f"{entry.path}: sha256 {sha} differs from the manifest's {entry.sha256}"
    return None


def _parse_manifest(data: bytes, where: str) -> tuple[tuple[FileEntry, ...], dict[str, Any]]:
    def invalid(detail: str) -> ArtifactInvalid:
        return ArtifactInvalid(f"{where}: invalid {MANIFEST_NAME}: {detail}")

    try:
        body = json.loads(data.decode("utf-8"))
    except ValueError as exc:
        raise invalid(f"not UTF-8 JSON ({exc})") from exc
    if not isinstance(body, dict) or body.get("schema") != MANIFEST_SCHEMA:
        raise invalid(f'expected an object with "schema": "{MANIFEST_SCHEMA}"')
    raw_files = body.get("files")
    metadata = body.get("metadata", {})
    if not isinstance(raw_files, list) or not isinstance(metadata, dict):
        raise invalid('expected "files" to be a list and "metadata" an object')
    entries: list[FileEntry] = []
    seen: set[str] = set()
    for index, item in enumerate(raw_files):
        path = item.get("path") if isinstance(item, dict) else None
        sha = item.get("sha256") if isinstance(item, dict) else None
        size = item.get("size") if isinstance(item, dict) else None
        if (
            not isinstance(path, str)
            or not isinstance(sha, str)
            or not _HEX_RE.match(sha)
            or not isinstance(size, int)
            or isinstance(size, bool)
            or size < 0
        ):
            raise invalid(
                f"files[{index}]: expected {{path, sha256 (64 lowercase hex), size (bytes >= 0)}}"
            )
        parts = path.split("/")
        if (
            path.startswith("/")
            or "\\" in path
            or any(part in ("", ".", "..") for part in parts)
            or path in _RESERVED
        ):
            raise invalid(f"files[{index}]: {path!r} is not a safe relative path")
        if path in seen:
            raise invalid(f"files[{index}]: {path!r} is listed twice")
        seen.add(path)
        entries.append(FileEntry(path=path, sha256=sha, size=size))
    return tuple(sorted(entries, key=lambda entry: entry.path)), metadata


def _check_digest_format(digest: str | None) -> None:
    if digest is not None and not _DIGEST_RE.match(digest):
        raise ConfigInvalid(
            f"expected digest {digest!r} is malformed; expected 'sha256:' followed by 64"
            " lowercase hex digits"
        )


def _summary(items: list[str]) -> str:
    shown = "; ".join(items[:_MAX_LISTED_PROBLEMS])
    more = len(items) - _MAX_LISTED_PROBLEMS
    return shown + (f" (and {more} more)" if more > 0 else "")
