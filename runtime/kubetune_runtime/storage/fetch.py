"""Open storage the way the RunConfig and the process environment say, and fetch inputs.

Environment contract (set by the pod spec or by the local ``kubetune run``):

* ``KUBETUNE_LOCAL_S3_ROOT``: embedded storage for local runs; with no S3 endpoint
  configured, ``s3://bucket/key`` is ``$KUBETUNE_LOCAL_S3_ROOT/bucket/key``.
* ``KUBETUNE_PVC_ROOT``: where ``pvc://claim/...`` volumes are mounted (default ``/mnt/pvc``).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

from kubetune_runtime.config import StorageConfig
from kubetune_runtime.storage.backends import DEFAULT_PVC_ROOT, Storage, open_storage


def storage_for(uri: str, config: StorageConfig, env: Mapping[str, str] = os.environ) -> Storage:
    """The storage serving ``uri`` under this process's environment contract."""
    local_root = env.get("KUBETUNE_LOCAL_S3_ROOT")
    return open_storage(
        uri,
        config,
        pvc_root=Path(env.get("KUBETUNE_PVC_ROOT", str(DEFAULT_PVC_ROOT))),
        local_s3_root=Path(local_root) if local_root else None,
    )


def fetch(uri: str, config: StorageConfig, cache_dir: Path) -> Path:
    """A local path holding ``uri`` (a file or a folder): itself when local, else a download.

    Remote objects are downloaded once per node into ``cache_dir/<sha256(uri)[:16]>/`` under
    a file lock, so several processes of one pod share one copy.

    Raises:
        StorageFailure / ConfigInvalid: as the storage backends raise them.
    """
    storage = storage_for(uri, config)
    local = storage.local_path(uri)
    if local is not None:
        return local
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    dest = cache_dir / key
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / f".{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = dest / ".kubetune-fetched"
        if not done.exists():
            name = uri.rstrip("/").rsplit("/", 1)[-1]
            if storage.list(uri):  # a prefix with objects under it
                storage.download_dir(uri, dest)
            else:  # a single object (NotFound when it does not exist either)
                storage.download_file(uri, dest / name)
            done.write_text(uri, encoding="utf-8")
    entries = [p for p in dest.iterdir() if p.name != ".kubetune-fetched"]
    return entries[0] if len(entries) == 1 and entries[0].is_file() else dest
