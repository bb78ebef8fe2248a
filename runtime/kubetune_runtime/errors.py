"""Failures the runtime reports, each with a stable reason token.

The reason goes into the termination message (``/dev/termination-log``) and from there into the
resource's ``Succeeded=False`` condition, so it is part of the API: ``DataInvalid`` is never
retried by the operator, ``TrainingFailed`` may be.
"""

from __future__ import annotations


class RuntimeFailure(Exception):
    """Base of expected failures: ``reason`` is a CamelCase token, ``str(exc)`` one sentence."""

    reason = "RuntimeFailed"


class ConfigInvalid(RuntimeFailure):
    """The RunConfig (or something it points at, such as target modules) is not usable."""

    reason = "ConfigInvalid"


class DataInvalid(RuntimeFailure):
    """A dataset row (or the whole dataset) cannot be used; names the source, row and field.

    Args:
        message: what is wrong and what was expected.
        source: the file or URI the row came from.
        row: 1-based row number within ``source`` (line number for JSONL).
        field: the field within the row, e.g. ``messages[2].role``.
    """

    reason = "DataInvalid"

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        row: int | None = None,
        field: str | None = None,
    ) -> None:
        self.source = source
        self.row = row
        self.field = field
        where = ", ".join(
            part
            for part in (
                source,
                f"row {row}" if row is not None else None,
                f"field {field}" if field else None,
            )
            if part
        )
        super().__init__(f"{where}: {message}" if where else message)


class StorageFailure(RuntimeFailure):
    """Object storage or a file system could not be read or written."""

    reason = "StorageFailed"


class ArtifactInvalid(RuntimeFailure):
    """An artifact is incomplete or does not match its manifest or expected digest."""

    reason = "ArtifactInvalid"


class TrainingFailed(RuntimeFailure):
    """Training could not continue (e.g. the loss became NaN or infinite)."""

    reason = "TrainingFailed"
