"""``kubetune-runtime fetch-model``: put the served base model in a local folder.

    kubetune-runtime fetch-model [--config /etc/kubetune/serving/config.json] --dest /models/base

The init container of every serving pod: it makes ``--dest`` hold the ServingConfig's
``base_model.uri`` so that the engine can start with ``serve --model <dest>``.

* ``s3://bucket/prefix`` (S3, an S3-compatible endpoint, or a local run's embedded storage
  under ``KUBETUNE_LOCAL_S3_ROOT``): every file under the prefix is downloaded into a sibling
  staging folder ``<dest>.partial-<random>``, the marker file ``.kubetune-fetched`` (holding
  the source URI) is written last, and the folder is renamed to ``<dest>``. ``<dest>`` is
  therefore either absent or complete, never half written.
* ``hf://org/name[@revision]``: ``huggingface_hub.snapshot_download`` into the same kind of
  staging folder, with the revision from the URI, else ``base_model.revision``, and the token
  from ``HF_TOKEN``; the marker records ``hf://org/name@revision`` (``@revision`` only when one
  is set), so a change of revision fetches again.
* ``pvc://claim/path`` and ``file://`` (or a plain path): the model is already local, so
  ``<dest>`` becomes a symbolic link to it (``pvc://`` claims are mounted under
  ``KUBETUNE_PVC_ROOT``, default ``/mnt/pvc``).

Idempotent: when ``<dest>`` already holds a marker with the same source (the init container
runs again after a pod restart while its emptyDir is kept), or already links to the same local
folder, nothing is done. A marker naming another source, or a link elsewhere, is replaced. A
non-empty folder or a file at ``<dest>`` without a marker was not written here and is never
deleted (exit 2). Runs for the same ``<dest>`` are serialised by a lock file
``<parent>/.<name>.lock``; leftovers of interrupted runs (``<dest>.partial-*``,
``<dest>.old-*``) are removed by the next run. ``<dest>`` must be a path inside a volume, not
the volume's mount point (a mount point cannot be replaced by a rename).

Exit status (as ``kubetune-runtime train``): 0 the model is in place; 1 failed and may succeed
on retry (storage or the Hub unreachable, a local disk error; the kubelet restarts the init
container); 2 invalid arguments, an unreadable or invalid ServingConfig, an invalid URI, or a
``--dest`` that cannot be used; 3 failed permanently: the model does not exist, is not a
folder, or the Hub refuses access (gated, private). A failure prints one line on stderr,
``kubetune-runtime fetch-model: <Reason>: <why>``; credentials are never printed.

Importing this module does no work; neither torch nor transformers is ever imported
(``huggingface_hub`` only for ``hf://``, boto3 only for S3).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from kubetune_runtime.errors import ConfigInvalid, RuntimeFailure, StorageFailure
from kubetune_runtime.serving.config import ServingConfig, load_config
from kubetune_runtime.storage.backends import NotFound, fsync_dir, local_files
from kubetune_runtime.storage.fetch import storage_for
from kubetune_runtime.storage.uris import ParsedURI, parse_uri

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "EXIT_FAILED",
    "EXIT_PERMANENT",
    "EXIT_USAGE",
    "MARKER",
    "Fetched",
    "ModelUnavailable",
    "fetch_model",
    "main",
    "model_source",
]

log = logging.getLogger("kubetune.fetch_model")

DEFAULT_CONFIG_PATH: Final = Path("/etc/kubetune/serving/config.json")
MARKER: Final = ".kubetune-fetched"
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_PERMANENT: Final = 3
_SECRET_ENV: Final = ("HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_RETRYABLE_HTTP: Final = frozenset({408, 425, 429})


class ModelUnavailable(RuntimeFailure):
    """The base model cannot be fetched and retrying cannot help.

    It does not exist (no file under the prefix, no such Hub repository or revision), is not a
    folder, or the Hub refuses access (a gated or private repository).
    """

    reason = "ModelUnavailable"


@dataclass(frozen=True)
class Fetched:
    """What :func:`fetch_model` did.

    Attributes:
        action: ``present`` (already there, nothing done), ``downloaded`` (a folder was
            downloaded and renamed into place) or ``linked`` (``path`` is now a symbolic link
            to the local model folder).
        source: the source as recorded in the marker (``hf://`` with the effective revision).
        path: the destination folder (or link), absolute.
    """

    action: Literal["present", "downloaded", "linked"]
    source: str
    path: Path


def model_source(config: ServingConfig) -> tuple[ParsedURI, str]:
    """The parsed base-model URI and its canonical source string (the marker's content).

    For ``hf://`` the revision is the URI's, else ``base_model.revision``; other schemes
    ignore ``base_model.revision``.

    Raises:
        ConfigInvalid: the URI is not one of the accepted forms.
    """
    try:
        parsed = parse_uri(config.base_model.uri)
    except ValueError as exc:
        raise ConfigInvalid(f"base_model.uri: {exc}") from None
    if parsed.scheme == "hf":
        revision = parsed.revision or config.base_model.revision
        parsed = ParsedURI(scheme="hf", repo=parsed.repo, revision=revision)
    return parsed, str(parsed)


def fetch_model(
    config: ServingConfig, dest: Path, *, env: Mapping[str, str] = os.environ
) -> Fetched:
    """Make ``dest`` hold (or link to) the base model ``config.base_model.uri``.

    Args:
        config: the ServingConfig; ``base_model`` and ``storage`` are used.
        dest: the model folder to create; its parent is created when missing.
        env: the environment contract (``KUBETUNE_LOCAL_S3_ROOT``, ``KUBETUNE_PVC_ROOT``,
            ``HF_TOKEN``).

    Returns:
        What was done (see :class:`Fetched`).

    Raises:
        ConfigInvalid: the URI is invalid, or ``dest`` is a mount point, a file system root,
            or an existing non-empty folder (or a file) without a marker.
        ModelUnavailable: the model does not exist, is not a folder, or access is refused.
        StorageFailure: storage or the Hub could not be read (may succeed on retry).
        OSError: the local file system failed (e.g. the disk is full).
    """
    parsed, source = model_source(config)
    dest = Path(os.path.abspath(dest))
    if dest.parent == dest:
        raise ConfigInvalid(f"--dest {dest} is a file system root; pass a folder inside a volume")
    if os.path.ismount(dest):
        raise ConfigInvalid(
            f"--dest {dest} is a mount point and cannot be replaced; pass a folder inside the "
            f"volume (e.g. {dest / 'model'})"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest):
        _sweep(dest)
        if parsed.scheme in ("pvc", "file"):
            return _link(config, dest, source, env)
        if _holds(dest, source):
            return Fetched("present", source, dest)
        _check_replaceable(dest)
        staging = dest.with_name(f"{dest.name}.partial-{secrets.token_hex(6)}")
        try:
            if parsed.scheme == "hf":
                _download_hub(parsed, source, staging, env)
            else:
                _download_storage(config, source, staging, env)
            _write_marker(staging, source)
            _install(staging, dest)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return Fetched("downloaded", source, dest)


# ------------------------------------------------------------------------------ sources


def _download_storage(
    config: ServingConfig, uri: str, staging: Path, env: Mapping[str, str]
) -> None:
    """Download every file under the prefix ``uri`` into ``staging``."""
    storage = storage_for(uri, config.storage, env)
    try:
        storage.download_dir(uri, staging)
    except NotFound as exc:
        raise ModelUnavailable(f"the base model does not exist: {exc}") from None


def _download_hub(parsed: ParsedURI, source: str, staging: Path, env: Mapping[str, str]) -> None:
    """``snapshot_download`` the repository into ``staging`` (the Hub is the real code path)."""
    import huggingface_hub  # noqa: PLC0415 - only hf:// needs it
    from huggingface_hub.errors import (  # noqa: PLC0415
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    staging.mkdir(parents=True)
    try:
        huggingface_hub.snapshot_download(
            repo_id=str(parsed.repo),
            revision=parsed.revision,
            local_dir=staging,
            token=env.get("HF_TOKEN") or None,
        )
    except GatedRepoError:
        raise ModelUnavailable(
            f"{source} is a gated repository this token cannot read (set HF_TOKEN to a token "
            "with access)"
        ) from None
    except RevisionNotFoundError:
        raise ModelUnavailable(f"{source}: revision {parsed.revision!r} does not exist") from None
    except RepositoryNotFoundError:
        raise ModelUnavailable(
            f"{source}: the repository does not exist or is private (a private one needs HF_TOKEN)"
        ) from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        message = f"{source}: the Hub answered {status}: {_first_line(exc)}"
        if isinstance(status, int) and 400 <= status < 500 and status not in _RETRYABLE_HTTP:
            raise ModelUnavailable(message) from None
        raise StorageFailure(message) from None
    except Exception as exc:  # noqa: BLE001 - network errors of every kind: retried
        raise StorageFailure(
            f"cannot download {source} from the Hugging Face Hub: {type(exc).__name__}: "
            f"{_first_line(exc)}"
        ) from None
    if not any(staging.iterdir()):
        raise ModelUnavailable(f"{source}: the repository holds no files")


def _link(config: ServingConfig, dest: Path, source: str, env: Mapping[str, str]) -> Fetched:
    """Point ``dest`` at the local model folder of a ``pvc://`` / ``file://`` URI."""
    storage = storage_for(source, config.storage, env)
    local = storage.local_path(source)
    if local is None:  # pragma: no cover - pvc:// and file:// are always local
        raise ConfigInvalid(f"{source} is not a local path")
    target = Path(os.path.abspath(local))
    if not target.is_dir():
        what = "is not a folder" if target.exists() else "does not exist"
        raise ModelUnavailable(f"the base model {source} ({target}) {what}")
    if not any(target.iterdir()):
        raise ModelUnavailable(f"the base model {source} ({target}) is an empty folder")
    if dest.is_symlink() and Path(os.readlink(dest)) == target:
        return Fetched("present", source, dest)
    if target == dest:
        raise ConfigInvalid(f"--dest {dest} is the model folder itself; pass another path")
    _check_replaceable(dest)
    link = dest.with_name(f"{dest.name}.partial-{secrets.token_hex(6)}")
    link.symlink_to(target, target_is_directory=True)
    try:
        _install(link, dest)
    finally:
        if link.is_symlink():
            link.unlink()
    return Fetched("linked", source, dest)


# ------------------------------------------------------------------------------ the destination


@contextlib.contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<parent>/.<name>.lock`` (one run per ``dest`` at a time)."""
    with (dest.parent / f".{dest.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _sweep(dest: Path) -> None:
    """Remove what interrupted runs left beside ``dest`` (call with the lock held)."""
    for pattern in (f"{dest.name}.partial-*", f"{dest.name}.old-*"):
        for stale in dest.parent.glob(pattern):
            log.info("Removing %s, left by an interrupted run", stale)
            if stale.is_symlink() or not stale.is_dir():
                stale.unlink(missing_ok=True)
            else:
                shutil.rmtree(stale, ignore_errors=True)


def _holds(dest: Path, source: str) -> bool:
    """Whether ``dest`` is a folder fetched from ``source`` (a marker with that source)."""
    if dest.is_symlink() or not dest.is_dir():
        return False
    try:
        return (dest / MARKER).read_text(encoding="utf-8").strip() == source
    except (OSError, UnicodeDecodeError):
        return False


def _check_replaceable(dest: Path) -> None:
    """Refuse to replace what this command did not write (anything but a marker or link).

    Raises:
        ConfigInvalid: ``dest`` is a file, or a non-empty folder without a marker.
    """
    if dest.is_symlink() or not dest.exists():
        return
    if not dest.is_dir():
        raise ConfigInvalid(f"--dest {dest} is a file; refusing to replace it")
    if (dest / MARKER).is_file() or not any(dest.iterdir()):
        return
    raise ConfigInvalid(
        f"--dest {dest} is a non-empty folder not written by fetch-model (no {MARKER}); "
        "refusing to replace it: remove it or pass another path"
    )


def _write_marker(folder: Path, source: str) -> None:
    """Write the completion marker last, durably (its presence means: complete)."""
    marker = folder / MARKER
    with marker.open("w", encoding="utf-8") as writer:
        writer.write(source + "\n")
        writer.flush()
        os.fsync(writer.fileno())


def _install(new: Path, dest: Path) -> None:
    """Rename ``new`` (a complete folder or a link) to ``dest``, replacing what is there.

    A folder at ``dest`` is first renamed aside to ``<dest>.old-<random>`` and deleted after,
    so an interruption leaves ``dest`` absent or complete, never mixed.
    """
    aside = None
    if dest.is_dir() and not dest.is_symlink():
        aside = dest.with_name(f"{dest.name}.old-{secrets.token_hex(6)}")
        dest.rename(aside)
    elif dest.is_symlink() and new.is_dir() and not new.is_symlink():
        dest.unlink()  # a folder cannot be renamed over a link (it was only a link)
    os.replace(new, dest)  # atomic over nothing, a file or a link (for a link)
    fsync_dir(dest.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


# ------------------------------------------------------------------------------ CLI


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _scrub(text: str, env: Mapping[str, str] = os.environ) -> str:
    """Remove secret values that a third-party message might carry."""
    for name in _SECRET_ENV:
        value = env.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune-runtime fetch-model",
        description="Put the ServingConfig's base model in a local folder (an init container).",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG_PATH,
        help=f"ServingConfig JSON file (default: {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument(
        "--dest",
        type=Path,
        required=True,
        help="the model folder to create (inside a volume, e.g. /models/base)",
    )
    return parser


def _summary(dest: Path) -> str:
    files = [(rel, path) for rel, path in local_files(dest) if rel != MARKER]
    size = sum(path.stat().st_size for _, path in files)
    return f"{len(files)} files, {size / 1e6:.1f} MB"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kubetune-runtime fetch-model``; ``argv`` is what follows ``fetch-model``.

    Returns:
        The exit status (see the module docstring); argparse exits 2 on invalid arguments.
    """
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=os.environ.get("KUBETUNE_LOG_LEVEL", "INFO").upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    started = time.monotonic()
    code = 0
    why = ""
    try:
        config = load_config(args.config)
        fetched = fetch_model(config, args.dest)
    except ConfigInvalid as exc:
        code, why = EXIT_USAGE, f"{exc.reason}: {exc}"
    except ModelUnavailable as exc:
        code, why = EXIT_PERMANENT, f"{exc.reason}: {exc}"
    except RuntimeFailure as exc:
        code, why = EXIT_FAILED, f"{exc.reason}: {exc}"
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        code, why = EXIT_FAILED, f"StorageFailed: local file system{where}: {exc.strerror or exc}"
    except Exception as exc:
        log.debug("unexpected failure", exc_info=True)
        code, why = EXIT_FAILED, f"FetchFailed: {type(exc).__name__}: {_first_line(exc)}"
    if code:
        print(f"kubetune-runtime fetch-model: {_scrub(why)}", file=sys.stderr)
        return code
    if fetched.action == "present":
        log.info("%s already holds %s; nothing to do", fetched.path, fetched.source)
    elif fetched.action == "linked":
        log.info("Linked %s to %s", fetched.path, fetched.source)
    else:
        log.info(
            "Fetched %s into %s (%s) in %.1fs",
            fetched.source,
            fetched.path,
            _summary(fetched.path),
            time.monotonic() - started,
        )
    return 0
