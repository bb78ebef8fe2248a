"""The adapter agent's HTTP face: ``GET /status``, ``/readyz`` and ``/healthz``.

FastAPI on uvicorn, the same stack as the builtin engine (one image, one set of
dependencies). The server runs inside the agent's event loop on a socket the agent binds
(so tests can use port 0), and leaves SIGTERM/SIGINT to the agent: it stops when told.

It serves no secret and no action; reading it is how the kubelet probes the pod and how the
operator collects per-adapter state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any, Protocol

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

__all__ = ["StatusServer", "StatusSource", "build_status_app"]

log = logging.getLogger(__name__)


class StatusSource(Protocol):
    """What the endpoints read (the agent)."""

    def status(self) -> dict[str, Any]:
        """The /status document."""
        ...

    async def refresh(self) -> None:
        """Observe the engine again unless the last observation is very recent."""
        ...

    def ready(self) -> tuple[bool, str]:
        """Whether the pod should get traffic, and why not."""
        ...

    def healthy(self) -> tuple[bool, str]:
        """Whether the reconcile loop is running, and why not."""
        ...


def build_status_app(source: StatusSource) -> FastAPI:
    """The status application.

    Routes:
        ``GET /status``: 200 and the agent's status document (see ``Agent.status``).
        ``GET /readyz``: 200 ``{"ready": true}`` when the engine is up and every pinned
        adapter is Loaded, else 503 ``{"ready": false, "reason": "..."}``.

    ``/status`` and ``/readyz`` first observe the engine afresh (at most about once a
    second): an engine that restarted between two resyncs has lost its adapters, and neither
    the pod's readiness nor the operator's status may vouch for them meanwhile.
        ``GET /healthz``: 200 ``{"healthy": true}`` while the reconcile loop runs, else 503.
    """
    app = FastAPI(title="kubetune adapter agent", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/status")
    async def status() -> JSONResponse:
        await source.refresh()
        return JSONResponse(source.status())

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        await source.refresh()
        ok, reason = source.ready()
        body: dict[str, Any] = {"ready": ok} if ok else {"ready": False, "reason": reason}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        ok, reason = source.healthy()
        body: dict[str, Any] = {"healthy": ok} if ok else {"healthy": False, "reason": reason}
        return JSONResponse(body, status_code=200 if ok else 503)

    return app


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The agent owns SIGTERM/SIGINT: it stops its loop first, then this server. uvicorn's
        # own handlers would swallow the signal and re-raise it after serving.
        yield


class StatusServer:
    """uvicorn serving :func:`build_status_app` in the running event loop.

    Args:
        source: what the endpoints read.
        host: bind address (``0.0.0.0``, ``::``, ``127.0.0.1``, ...).
        port: TCP port; 0 picks a free one (see :attr:`port` after :meth:`start`).
    """

    def __init__(self, source: StatusSource, host: str, port: int) -> None:
        self._app = build_status_app(source)
        self._host = host
        self._requested_port = port
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None
        self.port = port

    async def start(self) -> None:
        """Bind and serve; returns once the server accepts connections.

        Raises:
            OSError: the address cannot be bound (e.g. the port is taken).
        """
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        self._socket = socket.create_server((self._host, self._requested_port), family=family)
        self.port = int(self._socket.getsockname()[1])
        config = uvicorn.Config(
            self._app,
            log_config=None,  # leave the process's logging alone
            log_level="warning",
            access_log=False,  # probes every few seconds would drown the agent's own lines
            lifespan="off",
            http="h11",
            ws="none",
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError(f"status server on {self._host}:{self.port} stopped at start")
            await asyncio.sleep(0.01)
        log.info("Serving status address=%s port=%d", self._host, self.port)

    async def stop(self) -> None:
        """Stop accepting, finish open requests, and close the socket."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._socket is not None:
            self._socket.close()
        self._server = self._task = self._socket = None
