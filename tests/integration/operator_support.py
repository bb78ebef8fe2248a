"""Running the real operator (kopf) in a thread against the API emulator, and waiting on it.

The operator is exactly what ``kubetune operator`` runs (:func:`runner.run`), configured for
tests: the emulator's URL, short resync and watch timeouts, an ephemeral HTTP port, and a
progress URL pointing at that port.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from kubetune_operator.controller.conditions import find
from kubetune_operator.controller.config import ControllerSettings
from kubetune_operator.controller.handlers import Controller
from kubetune_operator.controller.runner import run
from kubetune_operator.manifests.common import OperatorSettings
from tests.support.kube_api import KubeApi

FTJ = "kubetune.io/v1alpha1/finetunejobs"
EVJ = "kubetune.io/v1alpha1/evaljobs"
JOBS = "batch/v1/jobs"
PODS = "v1/pods"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_for(api: KubeApi, **changes: Any) -> ControllerSettings:
    """Operator settings for tests: fast timers, the emulator, a free local HTTP port."""
    port = free_port()
    children = OperatorSettings(
        runtime_image="ghcr.io/kubetune/runtime:test",
        progress_base_url=f"http://127.0.0.1:{port}/progress",
    )
    values: dict[str, Any] = {
        "children": children,
        "server": api.url,
        "http_host": "127.0.0.1",
        "http_port": port,
        "liveness_port": None,
        "resync_seconds": 1.0,
        "image_pull_grace_seconds": 2.0,
        "progress_min_interval_seconds": 0.5,
        "watch_server_timeout_seconds": 30,
        "watch_client_timeout_seconds": 40,
        "watch_connect_timeout_seconds": 5,
        "watch_inactivity_timeout_seconds": 30.0,
        "workers": 4,
    }
    values.update(changes)
    return ControllerSettings.model_validate(values)


class OperatorThread:
    """The operator running in its own thread and event loop; start/stop like a pod."""

    def __init__(self, settings: ControllerSettings) -> None:
        self.settings = settings
        self.controllers: list[Controller] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def _main(self) -> None:
        try:
            asyncio.run(
                run(
                    self.settings,
                    stop_flag=self._stop,
                    ready_flag=self._ready,
                    controller_out=self.controllers,
                )
            )
        except BaseException as exc:  # noqa: BLE001 - surfaced by stop()
            self.error = exc

    def start(self, timeout: float = 30) -> OperatorThread:
        self._stop.clear()
        self._ready.clear()
        self._thread = threading.Thread(target=self._main, name="kubetune-operator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the operator did not start within {timeout}s ({self.error!r})")
        return self

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError("the operator did not stop")
            self._thread = None
        if self.error is not None:
            raise self.error

    @property
    def controller(self) -> Controller:
        return self.controllers[-1]

    def __enter__(self) -> OperatorThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def operator(api: KubeApi, **changes: Any) -> Iterator[OperatorThread]:
    """``with operator(api) as op:`` runs the operator for the block."""
    thread = OperatorThread(settings_for(api, **changes))
    with thread:
        yield thread


def wait_for(predicate: Callable[[], T | None], timeout: float = 30, what: str = "") -> T:
    """Poll until ``predicate()`` is truthy; returns its value or raises TimeoutError."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}: {last!r}")


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    """A condition of a resource (None when the resource or condition is absent)."""
    if obj is None:
        return None
    return find((obj.get("status") or {}).get("conditions"), kind)


def wait_condition(  # noqa: PLR0917 - reads like the condition it waits for
    api: KubeApi,
    resource: str,
    namespace: str,
    name: str,
    kind: str,
    status: str,
    reason: str | None = None,
    timeout: float = 30,
) -> dict[str, Any]:
    """Wait until the resource's ``kind`` condition has ``status`` (and ``reason``)."""

    def check() -> dict[str, Any] | None:
        obj = api.get(resource, namespace, name)
        cond = condition(obj, kind)
        if cond and cond["status"] == status and (reason is None or cond["reason"] == reason):
            return obj
        return None

    try:
        return wait_for(check, timeout, f"{name} {kind}={status} {reason or ''}")
    except TimeoutError:
        obj = api.get(resource, namespace, name)
        raise TimeoutError(
            f"{name}: {kind} never became {status}/{reason}; status is {(obj or {}).get('status')}"
        ) from None


def jobs_of(api: KubeApi, namespace: str, owner: str) -> list[dict[str, Any]]:
    """Every batch Job of a FineTuneJob, by its owner label."""
    return api.list(JOBS, namespace, label_selector=f"kubetune.io/finetunejob={owner}")
