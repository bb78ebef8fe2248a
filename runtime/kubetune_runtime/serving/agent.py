"""The adapter agent: a sidecar that keeps the engine's loaded adapters equal to the config's.

    kubetune-runtime agent --config /etc/kubetune/serving/config.json

It runs beside the engine in every serving pod (AdapterDeployment) and reconciles, level-based:

1. **Config.** The ServingConfig file is re-read every ``reconcile.config_poll_seconds`` and
   compared by content hash. A ConfigMap volume is updated by the kubelet swapping a
   ``..data`` symlink, so the file is read through its path each time (never kept open, no
   inotify on a replaced inode). An invalid new file is reported (``configError`` in
   /status) and the previous config stays in force.
2. **Observe.** The engine's loaded adapters (``GET /v1/models``) on every change, on every
   finished step, and every ``reconcile.resync_seconds``. An engine that does not answer is
   not ready; nothing is loaded or unloaded until it answers again. An adapter that was
   Loaded and is no longer listed (the engine restarted) is loaded again.
3. **Decide** with the pure :func:`kubetune_runtime.serving.agent_plan.plan`, and run each
   step as its own task, so one slow or failing adapter never holds up another:

   - *prepare* (Downloading): ``fetch_verified`` into ``<cache_dir>/adapters/<digest hex>``
     (every file checked against manifest.json and the pinned digest), then the
     compatibility checks of :mod:`kubetune_runtime.serving.agent_checks`;
   - *load* (Loading): the engine's runtime API (:mod:`kubetune_runtime.serving.agent_engine`);
     Loaded with ``loadSeconds`` from the start of the download;
   - *unload*: adapters the engine serves that are no longer wanted.

Failures (the retry policy): a corrupt artifact or digest mismatch (``ArtifactInvalid``), a
bad URI (``ConfigInvalid``), an incompatible adapter (``Incompatible``) and an engine 4xx
(``EngineRejected``) fail at once; storage errors and an engine that is unreachable, times
out or answers 429/5xx are retried after ``backoff_delay`` (1, 2, 4, ... s, capped at
``backoff_max_seconds``, with jitter) up to ``max_attempts`` times, then fail with the last
error. While the engine has not come up at all, nothing is spent. A Failed adapter is tried
again when its uri or digest (or the engine / base-model settings) change, or after
``failed_retry_seconds``.

Verified copies no longer wanted nor served are deleted from the cache.

Exit status: 0 stopped by SIGTERM/SIGINT; 1 could not serve (e.g. the status port is
taken); 2 the config file is unreadable or invalid at start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from kubetune_runtime.errors import ArtifactInvalid, ConfigInvalid, StorageFailure
from kubetune_runtime.serving import agent_plan
from kubetune_runtime.serving.agent_checks import adapter_problems
from kubetune_runtime.serving.agent_engine import (
    EngineClient,
    EngineRejected,
    EngineUnavailable,
    LoraxStager,
    OpenAIAdminClient,
)
from kubetune_runtime.serving.agent_plan import Action, AdapterState, EngineView
from kubetune_runtime.serving.agent_server import StatusServer
from kubetune_runtime.serving.config import ServingConfig, load_config, read_config
from kubetune_runtime.storage.artifacts import fetch_verified
from kubetune_runtime.storage.fetch import storage_for

__all__ = ["DEFAULT_CONFIG_PATH", "Agent", "Incompatible", "load_config", "main"]

log = logging.getLogger("kubetune.agent")

DEFAULT_CONFIG_PATH: Final = Path("/etc/kubetune/serving/config.json")
EXIT_FAILED: Final = 1
REFRESH_MAX_AGE: Final = 1.0  # seconds: /status and /readyz observe the engine at most this stale
REFRESH_MAX_WAIT: Final = 1.0  # seconds a /status or /readyz request waits for that observation
EXIT_USAGE: Final = 2
_HEX_DIGITS: Final = 64


class Incompatible(Exception):
    """The engine cannot serve the adapter; ``str(exc)`` lists every reason."""


def _rfc3339(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rules_key(config: ServingConfig) -> str:
    """What the compatibility checks depend on (a change retries Failed adapters)."""
    body = config.model_dump(mode="json", include={"engine", "base_model"})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def adapter_dir(cache_dir: Path, digest: str) -> Path:
    """Where the verified copy of the artifact with ``digest`` lives (content-addressed)."""
    return cache_dir / "adapters" / digest.removeprefix("sha256:")


def prepare_adapter(config: ServingConfig, uri: str, digest: str) -> Path:
    """Download and verify the artifact, then check the engine can serve it (blocking).

    Returns:
        The verified directory to hand to the engine.

    Raises:
        ArtifactInvalid: incomplete, digest mismatch, or a file differs from the manifest.
        ConfigInvalid: a malformed URI or digest.
        StorageFailure: storage or the local disk failed (transient).
        Incompatible: the adapter does not fit this engine or base model, or its
            adapter_config.json / adapter_model.safetensors are malformed.
    """
    dest = adapter_dir(Path(config.cache_dir), digest)
    verified = fetch_verified(storage_for(uri, config.storage), uri, dest, expected_digest=digest)
    problems = adapter_problems(
        verified.path, metadata=verified.metadata, engine=config.engine, base=config.base_model
    )
    if problems:
        raise Incompatible("; ".join(problems))
    return dest


def make_engine_client(config: ServingConfig) -> EngineClient:
    """The client for ``config.engine`` (reads ``api_key_file`` now).

    An unreadable key file is logged and no key is sent; the engine's 401 then shows as
    ``engineError`` in /status.
    """
    engine = config.engine
    if engine.type == "lorax":
        return LoraxStager(
            engine.admin_url,
            served_dir=Path(config.cache_dir) / "served",
            timeout_seconds=config.reconcile.request_timeout_seconds,
        )
    api_key = None
    if engine.api_key_file:
        try:
            api_key = Path(engine.api_key_file).read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            log.error("Cannot read the engine API key file=%s: %s", engine.api_key_file, exc)
    return OpenAIAdminClient(
        engine.admin_url,
        base_model_name=config.base_model.name,
        api_key=api_key,
        timeout_seconds=config.reconcile.request_timeout_seconds,
        load_timeout_seconds=config.reconcile.load_timeout_seconds,
    )


class Agent:
    """The reconcile loop and its status (see the module docstring).

    Args:
        config_path: the ServingConfig file (re-read while running).
        config: its content at start (validated).
        engine_factory: builds the engine client for a config (tests inject transports).
        clock: monotonic seconds.
        rand: uniform [0, 1) for backoff jitter.
    """

    def __init__(
        self,
        config_path: Path,
        config: ServingConfig,
        *,
        engine_factory: Callable[[ServingConfig], EngineClient] = make_engine_client,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._path = config_path
        self._config = config
        reading = read_config(config_path)
        self._config_digest = reading.digest if reading.config == config else ""
        self._config_error: str | None = None
        self._engine_factory = engine_factory
        self._engine = engine_factory(config)
        self._retired: list[EngineClient] = []
        self._clock = clock
        self._rand = rand
        self._rules = _rules_key(config)
        self._states: dict[str, AdapterState] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._unloads: dict[str, asyncio.Task[None]] = {}
        self._view: EngineView | None = None
        # Pinned adapters this pod has been Ready with since the engine came up (None: not
        # Ready yet). See ready().
        self._serving: set[str] | None = None
        self._engine_error: str | None = "not observed yet"
        self._observed_time: datetime | None = None
        # Monotonic start of the last completed engine observation, and a signal per
        # completion (refresh() waits on it).
        self._observed_at: float | None = None
        self._observed = asyncio.Event()
        self._wake = asyncio.Event()
        self._stopping = False
        self._downloads = asyncio.Semaphore(config.reconcile.max_parallel_downloads)
        self._tokens = 0
        self._heartbeat: float | None = None
        self._loop_done = False
        self._server = StatusServer(self, config.status_bind_address, config.status_port)

    # ------------------------------------------------------------------------ lifecycle

    @property
    def status_port(self) -> int:
        """The status server's port (the bound one, once :meth:`run` started it)."""
        return self._server.port

    def stop(self) -> None:
        """Ask :meth:`run` to return (safe from a signal handler in the loop)."""
        self._stopping = True
        self._wake.set()

    async def run(self, started: asyncio.Event | None = None) -> None:
        """Serve status and reconcile until :meth:`stop`; then clean up.

        Args:
            started: set once the status server listens (tests read :attr:`status_port`).

        Raises:
            OSError: the status address cannot be bound.
        """
        try:
            await self._server.start()
            if started is not None:
                started.set()
            log.info(
                "Agent started engine=%s adapters=%d config=%s",
                self._config.engine.type,
                len(self._config.adapters),
                self._path,
            )
            await self._loop()
        finally:
            self._loop_done = True
            tasks = [*self._tasks.values(), *self._unloads.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._server.stop()
            for client in (*self._retired, self._engine):
                await client.aclose()
            log.info("Agent stopped")

    async def _loop(self) -> None:
        next_resync = 0.0
        while not self._stopping:
            self._heartbeat = self._clock()
            changed = self._poll_config()
            now = self._clock()
            if changed or self._wake.is_set() or now >= next_resync:
                self._wake.clear()
                try:
                    await self._reconcile()
                except Exception:  # a bug must not stop the agent: log it, try at the resync
                    log.exception("Reconcile failed")
                now = self._clock()
                next_resync = now + self._config.reconcile.resync_seconds
            timeout = min(self._config.reconcile.config_poll_seconds, next_resync - now)
            retries = [
                s.next_attempt_at
                for s in self._states.values()
                if not s.busy and s.next_attempt_at > now
            ]
            if retries:
                timeout = min(timeout, min(retries) - now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(timeout, 0.0))

    # ------------------------------------------------------------------------ config

    def _poll_config(self) -> bool:
        """Apply the config file if its content changed; True when a new config took effect."""
        reading = read_config(self._path)
        if reading.digest == self._config_digest and reading.config is not None:
            self._config_error = None  # e.g. a broken update was reverted
            return False
        if reading.config is None:
            if reading.error != self._config_error:
                log.error("Config not applied; keeping the previous one: %s", reading.error)
            self._config_error = reading.error
            return False
        self._config_error = None
        self._config_digest = reading.digest
        if reading.config == self._config:
            return False
        self._apply(reading.config)
        return True

    def _apply(self, new: ServingConfig) -> None:
        old = self._config
        fixed = {"cache_dir", "status_port", "status_bind_address"}
        ignored = sorted(f for f in fixed if getattr(new, f) != getattr(old, f))
        if ignored:
            log.warning("Config fields take effect at restart only fields=%s", ",".join(ignored))
            new = new.model_copy(update={f: getattr(old, f) for f in fixed})
        if (new.engine, new.base_model.name, new.reconcile.request_timeout_seconds) != (
            old.engine,
            old.base_model.name,
            old.reconcile.request_timeout_seconds,
        ) or new.reconcile.load_timeout_seconds != old.reconcile.load_timeout_seconds:
            # Steps in flight may still use the previous client: it is closed at shutdown.
            self._retired.append(self._engine)
            self._engine = self._engine_factory(new)
        if new.reconcile.max_parallel_downloads != old.reconcile.max_parallel_downloads:
            self._downloads = asyncio.Semaphore(new.reconcile.max_parallel_downloads)
        self._config = new
        self._rules = _rules_key(new)
        log.info(
            "Config applied digest=%s adapters=%s",
            self._config_digest,
            ",".join(a.name for a in new.adapters) or "-",
        )

    # ------------------------------------------------------------------------ reconcile

    async def _reconcile(self) -> None:
        observed_at = self._clock()
        try:
            adapters = await self._engine.list_adapters()
        except EngineUnavailable as exc:
            if self._engine_error != str(exc):
                log.info("Engine not ready: %s", exc)
            self._engine_error = str(exc)
            self._view = None
            self._serving = None  # an engine that comes back has lost its adapters
        else:
            if self._engine_error is not None:
                log.info("Engine ready adapters=%d", len(adapters))
            self._engine_error = None
            self._view = EngineView(adapters=adapters, observed_at=observed_at)
        self._observed_time = datetime.now(UTC)
        self._observed_at = observed_at
        self._observed.set()
        self._observed = asyncio.Event()
        decision = agent_plan.plan(
            self._config.adapters,
            self._states,
            self._view,
            now=self._clock(),
            wall=datetime.now(UTC),
            rules=self._rules,
            policy=self._config.reconcile,
            max_loras=self._config.engine.max_loras,
            unloading=frozenset(self._unloads),
            next_token=self._next_token,
        )
        self._states = decision.states
        self._track_readiness()
        for action in decision.actions:
            self._start(action)
        if self._view is not None:
            await self._collect_garbage(self._view)

    def _next_token(self) -> int:
        self._tokens += 1
        return self._tokens

    def _start(self, action: Action) -> None:
        name = action.name
        if action.kind == "cancel":
            task = self._tasks.pop(name, None)
            if task is not None:
                task.cancel()
            return
        if action.kind == "unload":
            self._unloads[name] = asyncio.create_task(self._unload(name), name=f"unload-{name}")
            return
        state = self._states[name]
        step = self._prepare(state) if action.kind == "prepare" else self._load(state)
        self._tasks[name] = asyncio.create_task(step, name=f"{action.kind}-{name}")

    def _settle(self, state: AdapterState, new: AdapterState) -> None:
        """Record a step's outcome unless the spec changed meanwhile; wake the loop."""
        current = self._states.get(state.name)
        if current is not None and current.token == state.token:
            if new.phase != current.phase:
                log.info(
                    "Adapter %s name=%s digest=%s%s",
                    new.phase,
                    new.name,
                    new.digest[:19],
                    f" error={new.last_error}" if new.last_error else "",
                )
            elif new.last_error and new.last_error != current.last_error:
                log.warning("Adapter step failed name=%s error=%s", new.name, new.last_error)
            self._states[state.name] = new
            self._track_readiness()
        task = self._tasks.get(state.name)
        if task is asyncio.current_task():
            del self._tasks[state.name]
        self._wake.set()

    def _failed(self, state: AdapterState, error: str, *, permanent: bool) -> AdapterState:
        return agent_plan.on_failure(
            state,
            error,
            permanent=permanent,
            now=self._clock(),
            wall=datetime.now(UTC),
            rules=self._rules,
            policy=self._config.reconcile,
            rand=self._rand,
        )

    async def _prepare(self, state: AdapterState) -> None:
        config = self._config
        try:
            async with self._downloads:
                path = await asyncio.to_thread(prepare_adapter, config, state.uri, state.digest)
        except (ArtifactInvalid, ConfigInvalid) as exc:
            new = self._failed(state, f"{exc.reason}: {exc}", permanent=True)
        except Incompatible as exc:
            new = self._failed(state, f"Incompatible: {exc}", permanent=True)
        except (StorageFailure, OSError) as exc:
            new = self._failed(state, f"StorageFailed: {exc}", permanent=False)
        except Exception as exc:  # one adapter's bug must not stop the others
            log.exception("Unexpected error preparing name=%s", state.name)
            new = self._failed(state, f"{type(exc).__name__}: {exc}", permanent=False)
        else:
            new = agent_plan.on_prepared(state, str(path), wall=datetime.now(UTC))
        self._settle(state, new)

    async def _load(self, state: AdapterState) -> None:
        path = state.prepared_path
        if path is None:  # cannot happen: plan loads only prepared adapters
            return
        replace = self._view is not None and state.name in self._view.adapters
        try:
            await self._engine.load(state.name, path, replace=replace)
        except EngineRejected as exc:
            new = self._failed(state, f"EngineRejected: {exc}", permanent=True)
        except EngineUnavailable as exc:
            new = self._failed(state, f"EngineUnavailable: {exc}", permanent=False)
        except Exception as exc:  # one adapter's bug must not stop the others
            log.exception("Unexpected error loading name=%s", state.name)
            new = self._failed(state, f"{type(exc).__name__}: {exc}", permanent=False)
        else:
            new = agent_plan.on_loaded(state, now=self._clock(), wall=datetime.now(UTC))
        self._settle(state, new)

    async def _unload(self, name: str) -> None:
        try:
            await self._engine.unload(name)
        except (EngineUnavailable, EngineRejected) as exc:
            log.warning("Unload failed (retried at the next resync) name=%s error=%s", name, exc)
        except Exception:  # retried at the next resync like any failure
            log.exception("Unexpected error unloading name=%s", name)
        else:
            log.info("Adapter unloaded name=%s", name)
            self._wake.set()
        finally:
            self._unloads.pop(name, None)

    async def _collect_garbage(self, view: EngineView) -> None:
        """Delete verified copies that no wanted adapter and no served adapter uses."""
        keep = {s.digest.removeprefix("sha256:") for s in self._states.values()}
        keep |= {Path(p).name for p in view.adapters.values() if p}
        root = Path(self._config.cache_dir) / "adapters"

        def sweep() -> list[str]:
            removed: list[str] = []
            if not root.is_dir():
                return removed
            for entry in root.iterdir():
                name = entry.name
                if len(name) == _HEX_DIGITS and name not in keep and entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                    (root / f".{name}.lock").unlink(missing_ok=True)
                    removed.append(name)
            return removed

        for name in await asyncio.to_thread(sweep):
            log.info("Removed unused adapter copy digest=sha256:%s", name[:12])

    # ------------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """The /status document (camelCase, as AdapterDeployment's status spells it).

        Shape::

            {"engine": "vllm", "engineReady": bool, "engineError": str | null,
             "ready": bool, "reason": str | null,
             "configDigest": "sha256:<hex of the config file applied>",
             "configError": str | null, "observedTime": RFC3339 | null,
             "adapters": [{"name", "phase", "uri", "digest", "pinned", "lastError",
                           "loadSeconds", "lastTransitionTime", "attempts"}]}   # by name
        """
        ready, reason = self.ready()
        return {
            "engine": self._config.engine.type,
            "engineReady": self._view is not None,
            "engineError": self._engine_error,
            "ready": ready,
            "reason": None if ready else reason,
            "configDigest": self._config_digest or None,
            "configError": self._config_error,
            "observedTime": _rfc3339(self._observed_time),
            "adapters": [
                {
                    "name": s.name,
                    "phase": s.phase,
                    "uri": s.uri,
                    "digest": s.digest,
                    "pinned": s.pinned,
                    "lastError": s.last_error,
                    "loadSeconds": s.load_seconds,
                    "lastTransitionTime": _rfc3339(s.last_transition_time),
                    "attempts": s.attempts,
                }
                for s in sorted(self._states.values(), key=lambda s: s.name)
            ],
        }

    async def refresh(self, max_age: float = REFRESH_MAX_AGE) -> None:
        """Make the next status or readiness answer rest on a fresh engine observation.

        When the last observation started more than ``max_age`` seconds ago, wake the loop
        and wait (at most :data:`REFRESH_MAX_WAIT` seconds, so the operator's and the
        kubelet's requests are answered in time even when the engine hangs) for an
        observation that started after this call. An engine restart between two resyncs
        loses every adapter: without this, the pod would be Ready again as soon as the
        engine answers ``/health`` and the operator would report adapters that are gone.
        """
        if self._loop_done or self._stopping:
            return
        requested = self._clock()
        if self._observed_at is not None and requested - self._observed_at <= max_age:
            return
        deadline = requested + min(REFRESH_MAX_WAIT, self._config.reconcile.request_timeout_seconds)
        self._wake.set()
        while self._observed_at is None or self._observed_at < requested:
            remaining = deadline - self._clock()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._observed.wait(), timeout=remaining)

    def _pinned_loaded(self) -> tuple[set[str], set[str]]:
        """(pinned adapter names that can gate readiness, those Loaded).

        A pinned adapter that failed *permanently* (digest mismatch, incompatible, refused by
        the engine) does not gate: it will not load by waiting, and holding every new or
        restarted pod back for it would stop the other adapters being served (a node drain
        would lose the replica for good). It is reported in /status, and the
        AdapterDeployment is Degraded naming it. One that ran out of attempts on transient
        errors (storage unreachable) still gates: serving without it would answer 404 for it.
        """
        pinned = {
            a.name
            for a in self._config.adapters
            if a.pinned
            and not (
                a.name in self._states
                and self._states[a.name].phase == "Failed"
                and self._states[a.name].permanent
            )
        }
        loaded = {n for n in pinned if n in self._states and self._states[n].phase == "Loaded"}
        return pinned, loaded

    def _track_readiness(self) -> None:
        """Update the set of pinned adapters the pod is Ready with (see :meth:`ready`)."""
        if self._view is None:
            self._serving = None
            return
        pinned, loaded = self._pinned_loaded()
        if self._serving is None:
            if loaded == pinned:
                self._serving = set(pinned)
        else:
            self._serving = (self._serving & pinned) | loaded

    def ready(self) -> tuple[bool, str]:
        """Whether the pod should receive requests (``GET /readyz``).

        Until the pod has first been Ready (since the engine came up): when the engine
        answers and every pinned adapter is Loaded (or failed permanently, see
        :meth:`_pinned_loaded`), so a new or restarted pod never gets a request for an
        adapter it does not have yet.

        After that, a pinned adapter *added* to the config does not take the pod out of
        the Service while it loads (every replica loads it at the same time: gating on it
        would stop all traffic to the adapters already served); the AdapterDeployment's
        ``Ready`` condition says when it serves everywhere. The pod stays Ready while the
        engine still has each pinned adapter it was Ready with (a digest being replaced in
        place keeps serving the old weights), and is not Ready when the engine is down or
        has lost one of them (an engine restart), until they are loaded again.
        """
        if self._view is None:
            return False, f"engine not ready: {self._engine_error}"
        pinned, loaded = self._pinned_loaded()
        if self._serving is None:
            waiting = sorted(pinned - loaded)
        else:
            lost = self._serving & pinned
            waiting = sorted(n for n in lost if n not in loaded and n not in self._view.adapters)
        if waiting:
            return False, f"pinned adapters not loaded: {', '.join(waiting)}"
        return True, ""

    def healthy(self) -> tuple[bool, str]:
        """Healthy while the loop runs and has turned within ``max(60, 6 * resync)`` s."""
        if self._loop_done:
            return False, "the reconcile loop has stopped"
        limit = max(60.0, 6 * self._config.reconcile.resync_seconds)
        if self._heartbeat is not None and self._clock() - self._heartbeat > limit:
            return False, f"the reconcile loop has not turned for more than {limit:g}s"
        return True, ""


# ---------------------------------------------------------------------------- entry point


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubetune-runtime agent",
        description="Keep the engine's loaded LoRA adapters equal to the ServingConfig's.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG_PATH,
        help=f"ServingConfig JSON file, re-read while running (default: {DEFAULT_CONFIG_PATH})",
    )
    return parser


async def _serve(path: Path, config: ServingConfig) -> None:
    agent = Agent(path, config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop)
    try:
        await agent.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT.

    Args:
        argv: arguments after ``agent`` (default: ``sys.argv[1:]``).

    Returns:
        0 after a clean stop; 1 when it could not serve (the status port is taken);
        2 when the config file is unreadable or invalid.
    """
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=os.environ.get("KUBETUNE_LOG_LEVEL", "INFO").upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    try:
        config = load_config(args.config)
    except ConfigInvalid as exc:
        print(f"kubetune-runtime agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        asyncio.run(_serve(args.config, config))
    except OSError as exc:
        log.error("Agent could not serve: %s", exc)
        return EXIT_FAILED
    return 0
