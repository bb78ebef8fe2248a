"""Checkpoints in storage: publish each one as a verified artifact, resume from the latest.

The Trainer writes ``<output_dir>/checkpoint-<step>`` locally (model or adapter, optimizer,
scheduler, RNG states, trainer state). :class:`CheckpointSync` publishes each to
``<checkpoint uri>/checkpoint-<step>`` with the same protocol as final artifacts (staging,
manifest, completion marker last), keeps the newest ``keep_last``, and
:func:`restore_latest` downloads the newest *complete* one before training, so a pod that was
preempted, evicted or retried continues where it stopped, on any node.

Multi-node note: global rank 0 publishes what its node wrote; ZeRO optimizer shards of other
nodes are only included when the output directory is on shared storage.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from kubetune_runtime.errors import ArtifactInvalid
from kubetune_runtime.storage import uris
from kubetune_runtime.storage.artifacts import fetch_verified, publish_dir, write_manifest
from kubetune_runtime.storage.backends import Storage

log = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
MARKER = "_COMPLETE"


def list_complete(storage: Storage, uri: str) -> list[int]:
    """Steps of the complete checkpoints under ``uri``, ascending."""
    steps = set()
    for key in storage.list(uri):
        parts = key.strip("/").split("/")
        if len(parts) == 2 and parts[1] == MARKER and (match := _CHECKPOINT.match(parts[0])):
            steps.add(int(match.group(1)))
    return sorted(steps)


def restore_latest(storage: Storage, uri: str, output_dir: Path) -> Path | None:
    """Download the newest complete checkpoint into ``output_dir``; None when there is none.

    A checkpoint that fails verification (torn upload, tampering) is skipped with a warning
    and the next older complete one is tried.
    """
    for step in reversed(list_complete(storage, uri)):
        dest = output_dir / f"checkpoint-{step}"
        try:
            fetch_verified(
                storage, uris.join(uri, f"checkpoint-{step}"), dest, expected_digest=None
            )
        except ArtifactInvalid as exc:
            log.warning("skipping checkpoint %s: %s", step, exc)
            continue
        log.info("Resuming from checkpoint step=%d uri=%s", step, uri)
        return dest
    return None


class CheckpointSync(TrainerCallback):
    """Publishes every checkpoint the Trainer saves and prunes old ones (rank 0 only)."""

    def __init__(self, storage: Storage, uri: str, *, keep_last: int, enabled: bool) -> None:
        self._storage = storage
        self._uri = uri
        self._keep_last = keep_last
        self._enabled = enabled
        self.last: dict[str, Any] | None = None

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        """Publish ``checkpoint-<global_step>`` and delete older checkpoints beyond keep_last."""
        if not self._enabled:
            return
        local = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
        if not local.is_dir():
            return
        target = uris.join(self._uri, local.name)
        write_manifest(local, metadata={"kind": "checkpoint", "step": state.global_step})
        published = publish_dir(self._storage, local, target)
        self.last = {"step": state.global_step, "uri": target, "digest": published.digest}
        log.info("Published checkpoint step=%d uri=%s", state.global_step, target)
        for step in list_complete(self._storage, self._uri)[: -self._keep_last]:
            self._storage.delete_prefix(uris.join(self._uri, f"checkpoint-{step}"))
