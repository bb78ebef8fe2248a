"""The operator's HTTP server: the progress endpoint pods POST to, and ``/metrics``.

``POST /progress/<namespace>/<name>`` with ``Authorization: Bearer <token>`` and the
``status.progress`` JSON (camelCase, as the runtime's ``HttpSink`` sends it). The token is
the one in the Secret the job mounts: HMAC-SHA256 of ``<namespace>/<name>/<uid>`` under the
operator's key (:mod:`tokens`). The endpoint recomputes it from the cached resource's uid and
compares in constant time (``hmac.compare_digest``); it reads no Secret. Accepted reports are
written to ``status.progress`` at most once per ``progress_min_interval_seconds`` per job;
the newest report within the interval is written when it ends, so the last one is never lost.

The token is checked before anything else, so an unauthenticated caller learns nothing, not
even whether a FineTuneJob exists: an unknown job is checked against a placeholder uid (the
same work) and can never match.

Answers: 204 accepted, 400 malformed body, 401 missing or wrong token (also for an unknown
job, which has no valid token), 409 the run has finished (late reports are dropped), 413 a
body over 16 KiB, 503 the operator is still starting.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from kubetune_operator.api.finetunejob import Progress
from kubetune_operator.controller.handlers import Controller
from kubetune_operator.controller.observe import format_time
from kubetune_operator.controller.reconcile import is_finished

log = logging.getLogger(__name__)
MAX_BODY = 16 * 1024
UNKNOWN_UID = "00000000-0000-0000-0000-000000000000"  # no resource has it


@dataclass
class ProgressWriter:
    """Authenticates progress reports and writes them to status, throttled per job."""

    controller: Controller
    last_write: dict[str, float] = field(default_factory=dict)
    pending: dict[str, dict[str, Any]] = field(default_factory=dict)
    flushes: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def forget(self, uid: str) -> None:
        """Drop the state kept for a deleted job (throttling, a pending write)."""
        self.last_write.pop(uid, None)
        self.pending.pop(uid, None)
        task = self.flushes.pop(uid, None)
        if task is not None:
            task.cancel()

    def _authenticated(self, request: web.Request, namespace: str, name: str, uid: str) -> bool:
        """Whether the bearer token is the job's (the same work for an unknown job)."""
        header = request.headers.get("Authorization", "")
        offered = header[7:].strip() if header.startswith("Bearer ") else ""
        expected = self.controller.progress_token(namespace, name, uid)
        return hmac.compare_digest(offered.encode(), expected.encode()) and bool(offered)

    async def handle(self, request: web.Request) -> web.Response:
        """``POST /progress/{namespace}/{name}``."""
        metrics = self.controller.metrics.progress
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        if self.controller.progress_key is None:
            return web.Response(status=503, text="the operator is starting")
        caches = self.controller.caches
        owner = caches.owner("FineTuneJob", namespace, name) if caches else None
        uid = str(owner["metadata"]["uid"]) if owner is not None else UNKNOWN_UID
        if not self._authenticated(request, namespace, name, uid) or owner is None:
            metrics.labels("rejected").inc()
            return web.Response(status=401, text="missing or wrong bearer token")
        if request.content_length is not None and request.content_length > MAX_BODY:
            return web.Response(status=413, text="progress report too large")
        try:
            report = Progress.model_validate_json(await request.read())
        except ValidationError as exc:
            metrics.labels("rejected").inc()
            return web.Response(
                status=400, text=f"invalid progress report: {exc.error_count()} errors"
            )
        status = self.controller.statuses.get(uid) or owner.get("status") or {}
        if is_finished(status):
            metrics.labels("rejected").inc()
            return web.Response(status=409, text="the run has finished")
        progress = report.model_dump(by_alias=True, exclude_none=True, mode="json")
        progress["updateTime"] = format_time(datetime.now(UTC))
        self.pending[uid] = progress
        wait = self.controller.settings.progress_min_interval_seconds - (
            time.monotonic() - self.last_write.get(uid, float("-inf"))
        )
        if wait <= 0:
            await self._flush(owner)
            metrics.labels("accepted").inc()
        else:
            if uid not in self.flushes or self.flushes[uid].done():
                self.flushes[uid] = asyncio.create_task(self._flush_later(owner, wait))
            metrics.labels("throttled").inc()
        return web.Response(status=204)

    async def _flush_later(self, owner: dict[str, Any], wait: float) -> None:
        await asyncio.sleep(wait)
        await self._flush(owner)

    async def _flush(self, owner: dict[str, Any]) -> None:
        uid = owner["metadata"]["uid"]
        async with self.controller.lock(uid):
            progress = self.pending.pop(uid, None)
            status = self.controller.statuses.get(uid) or owner.get("status") or {}
            if progress is None or is_finished(status):
                return
            self.last_write[uid] = time.monotonic()
            await self.controller.write_status(owner, {**status, "progress": progress})


def application(controller: Controller) -> web.Application:
    """The aiohttp application: progress endpoint, metrics and a plain health check."""
    writer = ProgressWriter(controller)
    controller.forget_hooks.append(writer.forget)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=controller.metrics.exposition(), content_type="text/plain")

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/progress/{namespace}/{name}", writer.handle)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(controller: Controller, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start the server; returns its runner (to stop it) and the bound port."""
    runner = web.AppRunner(application(controller), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    log.info("HTTP server on %s:%d (progress, metrics)", host, bound)
    return runner, int(bound)
