"""The run's result: a short JSON written to the termination-message path and to stdout.

Kubernetes copies ``/dev/termination-log`` (at most 4 KiB) into the Pod's status, where the
operator reads it: no log scraping, no side channel. The same JSON is the last line of
stdout, which the local executor reads.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

TERMINATION_LIMIT_BYTES = 4096
RESULT_PREFIX = "KUBETUNE_RESULT "


class RunResult(BaseModel):
    """Outcome of one runtime process.

    ``status`` is Succeeded, Failed or Interrupted (stopped by SIGTERM/SIGINT after saving a
    checkpoint; the run resumes when started again). ``reason`` is a CamelCase token.
    """

    model_config = ConfigDict(extra="forbid")

    status: Literal["Succeeded", "Failed", "Interrupted"]
    reason: str
    message: str = ""
    artifact: dict[str, Any] | None = None
    metrics: dict[str, float] | None = None
    evaluation: dict[str, Any] | None = None
    checkpoint: dict[str, Any] | None = None

    def to_json(self, limit: int = TERMINATION_LIMIT_BYTES) -> str:
        """Compact JSON of at most ``limit`` bytes (UTF-8).

        Bulky parts go first, then the message is shortened, measured in encoded bytes so
        JSON escaping and non-ASCII text cannot overflow the limit.
        """
        data = self.model_dump(exclude_none=True)

        def dump(d: dict[str, Any]) -> str:
            return json.dumps(d, separators=(",", ":"), sort_keys=True, allow_nan=False)

        text = dump(data)
        for bulky in ("evaluation", "metrics", "checkpoint", "artifact"):
            if len(text.encode()) <= limit:
                return text
            data.pop(bulky, None)
            text = dump(data)
        message = data.get("message", "")
        low, high = 0, len(message)
        while low < high:  # the longest prefix of the message that fits
            mid = (low + high + 1) // 2
            if len(dump({**data, "message": message[:mid]}).encode()) <= limit:
                low = mid
            else:
                high = mid - 1
        return dump({**data, "message": message[:low]})


def write_result(result: RunResult, termination_path: str | None) -> None:
    """Write the result to the termination-message file (when it can be written) and stdout."""
    text = result.to_json()
    if termination_path:
        path = Path(termination_path)
        if path.parent.is_dir():
            # Outside a pod /dev/termination-log may not be writable: stdout still carries it.
            with contextlib.suppress(OSError):
                path.write_text(text, encoding="utf-8")
    sys.stdout.write(RESULT_PREFIX + text + "\n")
    sys.stdout.flush()


def read_result(stdout_text: str) -> RunResult | None:
    """The last result line in a process's stdout, if any."""
    for line in reversed(stdout_text.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return RunResult.model_validate_json(line[len(RESULT_PREFIX) :])
    return None
