"""Training progress: one small interface, several sinks (log line, HTTP POST, JSONL file).

The runtime reports :class:`ProgressUpdate` values to a :class:`ProgressReporter`, which fans
them out. ``tokensPerSecond`` counts non-padding input tokens of every process (prompt and
completion tokens alike; padding is never counted), so packing does not inflate it.

The HTTP sink POSTs to the operator's progress endpoint with a bearer token read from a
file (the operator mounts a per-job Secret), at most once per ``min_interval`` seconds, and
never fails the run: an unreachable endpoint is logged once per outage.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressUpdate:
    """One progress report; units: seconds, tokens per second, epochs (fractional)."""

    step: int
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: int | None = None
    final: bool = False

    @property
    def percent(self) -> int | None:
        """Step / total_steps in percent, rounded down; None when the total is unknown."""
        if not self.total_steps:
            return None
        return min(100, (100 * self.step) // self.total_steps)

    def to_status(self) -> dict[str, object]:
        """The camelCase shape of FineTuneJob ``status.progress`` (None fields omitted)."""
        fields = {
            "step": self.step,
            "totalSteps": self.total_steps,
            "percent": self.percent,
            "epoch": self.epoch,
            "loss": self.loss,
            "evalLoss": self.eval_loss,
            "tokensPerSecond": self.tokens_per_second,
            "etaSeconds": self.eta_seconds,
        }
        # NaN/inf are not JSON and not valid status numbers: leave them out.
        return {
            k: v
            for k, v in fields.items()
            if v is not None and not (isinstance(v, float) and not math.isfinite(v))
        }


class ProgressSink(Protocol):
    """Receives every update; decides itself whether to act on it (throttling)."""

    def emit(self, update: ProgressUpdate) -> None:
        """Handle one update; must not raise."""


class LogSink:
    """One log line per update: ``step 12/40 (30%) loss 1.234 tokens/s 850 eta 1m05s``."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self._logger = logger

    def emit(self, update: ProgressUpdate) -> None:
        """Log the update at INFO."""
        self._logger.info("%s", format_update(update))


class JsonlSink:
    """Appends each update as a JSON line (the local executor's progress bar reads it)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, update: ProgressUpdate) -> None:
        """Append the update (with its percent) to the file."""
        record = {**asdict(update), "percent": update.percent, "time": time.time()}
        with self._path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


class HttpSink:
    """POSTs ``status.progress`` JSON to the operator, authenticated with a bearer token.

    Args:
        url: the endpoint, e.g. ``http://kubetune-operator.kubetune:8080/progress/ns/name``.
        token_file: file holding the per-job token (read on every send, so rotation works).
        min_interval: seconds between sends (>= 5 by default); the final update always goes.
        clock: injectable time source for tests.
        timeout: seconds per request.
    """

    def __init__(
        self,
        url: str,
        token_file: Path,
        *,
        min_interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        timeout: float = 5.0,
    ) -> None:
        self._url = url
        self._token_file = token_file
        self._min_interval = min_interval
        self._clock = clock
        self._timeout = timeout
        self._last_sent: float | None = None
        self._failing = False

    def emit(self, update: ProgressUpdate) -> None:
        """Send the update unless one was sent less than ``min_interval`` seconds ago."""
        now = self._clock()
        if (
            not update.final
            and self._last_sent is not None
            and now - self._last_sent < self._min_interval
        ):
            return
        self._last_sent = now
        try:
            token = self._token_file.read_text(encoding="utf-8").strip()
            request = urllib.request.Request(  # noqa: S310 - URL comes from the RunConfig
                self._url,
                data=json.dumps(update.to_status()).encode(),
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=self._timeout):  # noqa: S310
                pass
        except (OSError, urllib.error.URLError, http.client.HTTPException, ValueError) as exc:
            if not self._failing:
                log.warning("progress endpoint unreachable (%s); training continues", exc)
            self._failing = True
        else:
            self._failing = False


class ProgressReporter:
    """Fans updates out to sinks; the one object the training loop talks to."""

    def __init__(self, sinks: Sequence[ProgressSink]) -> None:
        self._sinks = list(sinks)

    def report(self, update: ProgressUpdate) -> None:
        """Give the update to every sink."""
        for sink in self._sinks:
            sink.emit(update)


def format_update(update: ProgressUpdate) -> str:
    """Human-readable one-liner for logs and the local progress bar."""
    parts = [f"step {update.step}" + (f"/{update.total_steps}" if update.total_steps else "")]
    if update.percent is not None:
        parts[0] += f" ({update.percent}%)"
    if update.loss is not None and math.isfinite(update.loss):
        parts.append(f"loss {update.loss:.4f}")
    if update.eval_loss is not None:
        parts.append(f"eval_loss {update.eval_loss:.4f}")
    if update.tokens_per_second is not None:
        parts.append(f"tokens/s {update.tokens_per_second:.0f}")
    if update.eta_seconds is not None:
        minutes, seconds = divmod(update.eta_seconds, 60)
        parts.append(f"eta {minutes}m{seconds:02d}s")
    return " ".join(parts)
