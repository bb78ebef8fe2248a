"""What the scripted cluster components of the tests share: stepping, a pausable clock, records.

:class:`tests.support.kubelet.Kubelet` (Jobs) and
:class:`tests.support.serving_kubelet.ServingKubelet` (Deployments) each implement ``tick()``,
one synchronous step over the emulator's objects. This base drives it: a background thread
calls ``tick()`` every ``interval`` seconds between ``start()`` and ``stop()`` (or in a
``with`` block), ``pause()``/``resume()`` freeze the harness and its clock, ``wait_for`` ticks
by itself when no thread runs, and ``history``/``errors`` record what happened. A step that
raises is logged and kept in ``errors`` (tests assert it is empty); API "not found" and
"conflict" answers inside ``_guard`` are races the next step resolves, not errors.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar

import kmock

T = TypeVar("T")
log = logging.getLogger(__name__)

HISTORY = 2000  # lines of history kept
MAX_ERRORS = 100  # errors kept (a stopped API would otherwise add one every step)


class SteppingHarness:
    """Background stepping, a pausable clock and records; subclasses implement :meth:`tick`."""

    thread_name: ClassVar[str] = "harness"
    wait_history: ClassVar[int] = 15  # history lines a wait_for timeout shows

    def _init_stepping(self, interval: float, clock: Callable[[], float] | None) -> None:
        self.interval = interval
        self._clock = clock or time.monotonic
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._paused_at: float | None = None
        self._paused_total = 0.0
        self._history: deque[str] = deque(maxlen=HISTORY)
        self._errors: list[str] = []
        self.ticks = 0

    def tick(self) -> None:
        """One synchronous step (the subclass's component logic)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------ driving
    def start(self) -> Self:
        """Tick in a background thread every ``interval`` seconds until :meth:`stop`."""
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__} is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop ticking (subclasses also stop what they started)."""
        self._stop_thread()

    def _stop_thread(self) -> None:
        thread, self._thread = self._thread, None
        self._stop.set()
        if thread is not None:
            thread.join(timeout=30)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the background thread is ticking."""
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            if self.paused:
                continue
            try:
                self.tick()
            except Exception as exc:  # the thread must survive anything
                log.exception("%s step failed", self.thread_name)
                self._error(f"step failed: {exc!r}")

    def pause(self) -> None:
        """Freeze: the background thread stops stepping and the harness clock stands still.

        ``tick()`` still steps when called explicitly (with the clock frozen). A process a
        pod runs keeps running, but its end is only reported after :meth:`resume`.
        """
        with self._lock:
            if self._paused_at is None:
                self._paused_at = self._clock()
                self._note("paused")

    def resume(self) -> None:
        """Undo :meth:`pause`; time spent paused does not count towards any delay or deadline."""
        with self._lock:
            if self._paused_at is not None:
                self._paused_total += self._clock() - self._paused_at
                self._paused_at = None
                self._note("resumed")

    @property
    def paused(self) -> bool:
        """Whether the harness is paused."""
        return self._paused_at is not None

    def now(self) -> float:
        """The harness clock: ``clock()`` minus the time spent paused."""
        base = self._paused_at if self._paused_at is not None else self._clock()
        return base - self._paused_total

    def wait_for(
        self,
        predicate: Callable[[], T | None],
        timeout: float = 10.0,
        *,
        interval: float = 0.02,
        message: str = "",
    ) -> T:
        """Poll ``predicate`` until it returns something truthy, and return that.

        Without the background thread, each poll first runs one :meth:`tick`.

        Raises:
            TimeoutError: after ``timeout`` seconds, with the harness's latest actions.
        """
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                self.tick()
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                recent = "\n  ".join(self.history[-self.wait_history :])
                raise TimeoutError(
                    f"{message or 'condition'} not reached within {timeout} s; errors: "
                    f"{self.errors or 'none'}; latest harness actions:\n  {recent}"
                )
            time.sleep(interval)

    @staticmethod
    def _id(obj: Any) -> str:
        """``namespace/name`` of an object, for history lines."""
        meta = obj.get("metadata") or {}
        return f"{meta.get('namespace')}/{meta.get('name')}"

    # ------------------------------------------------------------------------ records
    @property
    def history(self) -> list[str]:
        """What the harness did, one line per action (the latest ones)."""
        with self._lock:
            return list(self._history)

    @property
    def errors(self) -> list[str]:
        """Unexpected failures inside steps (API "not found"/"conflict" races are not errors)."""
        with self._lock:
            return list(self._errors)

    def _note(self, line: str) -> None:
        self._history.append(f"{self.now():.2f} {line}")
        log.debug("%s", line)

    def _error(self, line: str) -> None:
        with self._lock:
            if len(self._errors) < MAX_ERRORS:
                self._errors.append(line)
            self._note(f"ERROR {line}")

    def _guard(self, what: str, fn: Callable[..., T], *args: Any) -> T | None:
        """Run one part of a step; API races are noted, anything else kept in ``errors``."""
        try:
            return fn(*args)
        except kmock.KubernetesError as exc:
            if exc.status in (404, 409):  # deleted or changed under us: next step sees it
                self._note(f"{what}: {exc.status} {exc.reason} (retrying next step)")
            else:
                self._error(f"{what}: {exc!r}")
        except Exception as exc:  # keep stepping; see errors
            log.exception("%s: %s failed", self.thread_name, what)
            self._error(f"{what}: {exc!r}")
        return None
