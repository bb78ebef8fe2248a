"""The operator's HTTP server: the progress endpoint pods POST to, and ``/metrics``.

``POST /progress/<namespace>/<name>`` with ``Authorization: Bearer <token>`` and the
``status.progress`` JSON (camelCase, as the runtime's ``HttpSink`` sends it). The token is
the per-job random value in the Secret the job mounts; it is compared in constant time
(``hmac.compare_digest``). Accepted reports are written to ``status.progress`` at most once
per ``progress_min_interval_seconds`` per job; the newest report within the interval is
written when it ends, so the last one is never lost.

Answers: 204 accepted, 400 malformed body, 401 missing or wrong token, 404 unknown job,
409 the run has finished (late reports are dropped).
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
from kubetune_operator.manifests.common import child_name

log = logging.getLogger(__name__)
MAX_BODY = 16 * 1024


@dataclass
class ProgressWriter:
    """Authenticates progress reports and writes them to status, throttled per job."""

    controller: Controller
    tokens: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    last_write: dict[str, float] = field(default_factory=dict)
    pending: dict[str, dict[str, Any]] = field(default_factory=dict)
    flushes: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def forget(self, uid: str) -> None:
        """Drop the state kept for a deleted job (tokens, throttling, a pending write)."""
        self.last_write.pop(uid, None)
        self.pending.pop(uid, None)
        task = self.flushes.pop(uid, None)
        if task is not None:
            task.cancel()
        for key in [k for k, (owner, _) in self.tokens.items() if owner == uid]:
            del self.tokens[key]

    async def _token(self, namespace: str, name: str, uid: str) -> str | None:
        cached = self.tokens.get((namespace, name))
        if cached is not None and cached[0] == uid:
            return cached[1]
        secret = child_name(name, "progress")
        token = await self.controller.call(
            self.controller.api().read_secret_key, namespace, secret, "token"
        )
        if token:
            self.tokens[(namespace, name)] = (uid, token)
        return token

    async def handle(self, request: web.Request) -> web.Response:
        """``POST /progress/{namespace}/{name}``."""
        metrics = self.controller.metrics.progress
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        caches = self.controller.caches
        owner = caches.owner("FineTuneJob", namespace, name) if caches else None
        if owner is None:
            metrics.labels("rejected").inc()
            return web.Response(status=404, text="no such FineTuneJob")
        uid = owner["metadata"]["uid"]
        header = request.headers.get("Authorization", "")
        offered = header[7:].strip() if header.startswith("Bearer ") else ""
        expected = await self._token(namespace, name, uid)
        if (
            not offered
            or expected is None
            or not hmac.compare_digest(offered.encode(), expected.encode())
        ):
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
