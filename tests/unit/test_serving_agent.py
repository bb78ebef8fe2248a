"""The adapter agent: pure decisions, the engine client, and the loop against a fake vLLM.

The fake engine is a FastAPI app on an ephemeral localhost port implementing vLLM's
runtime-LoRA contract (``GET /v1/models``, ``POST /v1/load_lora_adapter``,
``POST /v1/unload_lora_adapter``); it records calls, can fail N loads with 503, reject an
adapter with 400, hold a load until released, and "restart" (forget every adapter).
Adapters are real artifacts (manifest, digest, a well-formed safetensors file) published to
the embedded S3 storage (``KUBETUNE_LOCAL_S3_ROOT``). Loop intervals are tens of
milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import ValidationError

from kubetune_runtime.config import StorageConfig
from kubetune_runtime.serving import agent_plan
from kubetune_runtime.serving.agent import Agent, load_config, main
from kubetune_runtime.serving.agent_checks import adapter_problems, served_references
from kubetune_runtime.serving.agent_engine import (
    EngineRejected,
    EngineUnavailable,
    LoraxStager,
    OpenAIAdminClient,
)
from kubetune_runtime.serving.agent_plan import (
    Action,
    AdapterState,
    EngineView,
    backoff_delay,
    on_failure,
    plan,
    transition,
)
from kubetune_runtime.serving.config import (
    AdapterEntry,
    BaseModelRef,
    EngineConfig,
    ReconcileConfig,
    ServingConfig,
)
from kubetune_runtime.storage.artifacts import publish_dir, write_manifest
from kubetune_runtime.storage.backends import LocalStorage

BASE = "hf://org/base-model@abc123"
BASE_NAME = "base"
FAST = {
    "config_poll_seconds": 0.03,
    "resync_seconds": 0.1,
    "backoff_initial_seconds": 0.01,
    "backoff_max_seconds": 0.04,
    "max_attempts": 5,
    "request_timeout_seconds": 2.0,
    "load_timeout_seconds": 5.0,
}
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
WALL = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = ReconcileConfig(
    backoff_initial_seconds=1, backoff_max_seconds=30, backoff_jitter=0.2, max_attempts=8
)


# ------------------------------------------------------------------------------ artifacts


def safetensors_bytes(rank: int, width: int = 8) -> bytes:
    """A well-formed safetensors file with one LoRA pair (lora_A r x w, lora_B w x r), F32."""
    size = rank * width * 4
    header = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": {
            "dtype": "F32",
            "shape": [rank, width],
            "data_offsets": [0, size],
        },
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": {
            "dtype": "F32",
            "shape": [width, rank],
            "data_offsets": [size, 2 * size],
        },
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + bytes(2 * size)


def adapter_files(
    rank: int = 8, *, base: str | None = None, use_dora: bool = False, seed: int = 0
) -> dict[str, bytes]:
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj"],
        "bias": "none",
        "use_dora": use_dora,
        "base_model_name_or_path": "/workspace/cache/models/abc",  # a trainer's local path
        "seed": seed,  # varies the bytes (and so the digest) between versions
    }
    return {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": safetensors_bytes(rank),
    }


@dataclass
class Published:
    uri: str
    digest: str
    root: Path  # where the embedded storage keeps it


# ------------------------------------------------------------------------------ fake engine


@dataclass
class FakeEngine:
    """vLLM's runtime-LoRA routes, in memory."""

    loaded: dict[str, str] = field(default_factory=dict)
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    fail_loads: int = 0  # the next N loads answer 503
    reject: dict[str, str] = field(default_factory=dict)  # name -> 400 message
    hold: dict[str, asyncio.Event] = field(default_factory=dict)  # name -> released when set
    down: bool = False  # /v1/models answers 503

    def loads(self, name: str | None = None) -> list[dict[str, Any]]:
        return [b for k, b in self.calls if k == "load" and name in (None, b["lora_name"])]

    def unloads(self) -> list[str]:
        return [b["lora_name"] for k, b in self.calls if k == "unload"]

    def restart(self) -> None:
        self.loaded.clear()

    def app(self) -> FastAPI:
        app = FastAPI()

        def error(status: int, message: str, kind: str) -> JSONResponse:
            body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
            return JSONResponse(body, status_code=status)

        @app.get("/v1/models")
        async def models() -> Response:
            if self.down:
                return error(503, "starting", "ServiceUnavailable")
            cards = [{"id": BASE_NAME, "object": "model", "root": "/models/base", "parent": None}]
            cards += [
                {"id": name, "object": "model", "root": path, "parent": BASE_NAME}
                for name, path in sorted(self.loaded.items())
            ]
            return JSONResponse({"object": "list", "data": cards})

        @app.post("/v1/load_lora_adapter")
        async def load(request: Request) -> Response:
            body = await request.json()
            self.calls.append(("load", body))
            name, path = body["lora_name"], body["lora_path"]
            if name in self.hold:
                await self.hold[name].wait()
            if self.fail_loads > 0:
                self.fail_loads -= 1
                return error(503, "engine busy, try again", "ServiceUnavailable")
            if name in self.reject:
                return error(400, self.reject[name], "BadRequestError")
            if name in self.loaded and not body.get("load_inplace"):
                return error(400, f"The lora adapter '{name}' has already been loaded.", "X")
            if not Path(path, "adapter_config.json").is_file():
                return error(404, f"No adapter found for {path}", "NotFoundError")
            self.loaded[name] = path
            return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload(request: Request) -> Response:
            body = await request.json()
            self.calls.append(("unload", body))
            if self.loaded.pop(body["lora_name"], None) is None:
                return error(404, "cannot be found", "NotFoundError")
            return PlainTextResponse("Success")

        return app


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serve(app: FastAPI, port: int = 0) -> AsyncIterator[int]:
    """Serve ``app`` on 127.0.0.1 in this loop; yields the port."""
    sock = socket.create_server(("127.0.0.1", port))
    config = uvicorn.Config(
        app,
        log_config=None,
        log_level="warning",
        access_log=False,
        lifespan="off",
        http="h11",
        ws="none",
    )
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.005)
        yield int(sock.getsockname()[1])
    finally:
        server.should_exit = True
        await task
        sock.close()


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


async def until(
    predicate: Callable[[], Awaitable[bool]] | Callable[[], bool], timeout: float = 8.0
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {getattr(predicate, '__name__', '?')}")
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------------------ harness


class Harness:
    """Storage, a ConfigMap-style mounted config file, and the agent under test."""

    def __init__(self, tmp_path: Path, engine_port: int) -> None:
        self.tmp = tmp_path
        self.s3_root = tmp_path / "s3"
        self.storage = LocalStorage(s3_root=self.s3_root)
        self.cache = tmp_path / "cache"
        self.mount = tmp_path / "etc"
        self.mount.mkdir()
        self.engine_port = engine_port
        self.engine_overrides: dict[str, Any] = {}
        self.reconcile_overrides: dict[str, Any] = {}
        self.agent: Agent | None = None
        self.task: asyncio.Task[None] | None = None
        self.client = httpx.AsyncClient(timeout=5)
        self._generation = 0

    # -- storage

    def publish(self, name: str, files: dict[str, bytes] | None = None, **meta: Any) -> Published:
        src = self.tmp / "src" / f"{name}-{self._bump()}"
        for rel, data in (files or adapter_files()).items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(data)
        write_manifest(src, metadata={"kind": "adapter", "baseModel": BASE, **meta})
        uri = f"s3://models/adapters/{name}"
        published = publish_dir(self.storage, src, uri)
        return Published(uri, published.digest, self.s3_root / "models" / "adapters" / name)

    # -- config (kubelet's ConfigMap volume: ..data symlink swap)

    def _bump(self) -> int:
        self._generation += 1
        return self._generation

    def config(self, adapters: list[dict[str, Any]]) -> ServingConfig:
        return ServingConfig.model_validate(
            {
                "engine": {
                    "type": "vllm",
                    "admin_url": f"http://127.0.0.1:{self.engine_port}",
                    "max_lora_rank": 16,
                    **self.engine_overrides,
                },
                "base_model": {"uri": BASE, "name": BASE_NAME},
                "adapters": adapters,
                "cache_dir": str(self.cache),
                "status_port": 0,
                "status_bind_address": "127.0.0.1",
                "reconcile": {**FAST, **self.reconcile_overrides},
            }
        )

    def write_config(self, adapters: list[dict[str, Any]]) -> ServingConfig:
        config = self.config(adapters)
        version = self.mount / f"..{self._bump()}"
        version.mkdir()
        (version / "config.json").write_text(config.model_dump_json(indent=2))
        link = self.mount / "..data_tmp"
        link.symlink_to(version.name)
        old = (self.mount / "..data").resolve() if (self.mount / "..data").exists() else None
        os.replace(link, self.mount / "..data")
        if not (self.mount / "config.json").is_symlink():
            (self.mount / "config.json").symlink_to("..data/config.json")
        if old is not None:
            for child in old.iterdir():
                child.unlink()
            old.rmdir()
        return config

    @property
    def config_path(self) -> Path:
        return self.mount / "config.json"

    # -- agent

    async def start(self, adapters: list[dict[str, Any]]) -> Agent:
        config = self.write_config(adapters)
        self.agent = Agent(self.config_path, config)
        started = asyncio.Event()
        self.task = asyncio.create_task(self.agent.run(started))
        await asyncio.wait_for(started.wait(), 5)
        return self.agent

    async def stop(self) -> None:
        if self.agent is not None and self.task is not None:
            self.agent.stop()
            await asyncio.wait_for(self.task, 10)
        await self.client.aclose()

    async def get(self, path: str) -> httpx.Response:
        assert self.agent is not None
        return await self.client.get(f"http://127.0.0.1:{self.agent.status_port}{path}")

    async def status(self) -> dict[str, Any]:
        response = await self.get("/status")
        assert response.status_code == 200
        body: dict[str, Any] = response.json()
        return body

    async def phases(self) -> dict[str, str]:
        return {a["name"]: a["phase"] for a in (await self.status())["adapters"]}

    async def adapter(self, name: str) -> dict[str, Any]:
        return next(a for a in (await self.status())["adapters"] if a["name"] == name)

    async def wait_phases(self, expected: dict[str, str], timeout: float = 8.0) -> None:
        async def reached() -> bool:
            return await self.phases() == expected

        try:
            await until(reached, timeout)
        except AssertionError:
            raise AssertionError(f"phases {await self.status()} != {expected}") from None


def entry(published: Published, name: str, *, pinned: bool = True) -> dict[str, Any]:
    return {"name": name, "uri": published.uri, "digest": published.digest, "pinned": pinned}


@pytest.fixture
def embedded_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "s3"
    monkeypatch.setenv("KUBETUNE_LOCAL_S3_ROOT", str(root))
    return root


@pytest_asyncio.fixture
async def engine(embedded_s3: Path) -> AsyncIterator[tuple[FakeEngine, int]]:
    fake = FakeEngine()
    async with serve(fake.app()) as port:
        yield fake, port


@pytest_asyncio.fixture
async def harness(tmp_path: Path, engine: tuple[FakeEngine, int]) -> AsyncIterator[Harness]:
    h = Harness(tmp_path, engine[1])
    try:
        yield h
    finally:
        await h.stop()


# ------------------------------------------------------------------------------ pure: backoff


def test_backoff_doubles_from_initial_and_is_capped() -> None:
    delays = [backoff_delay(n, POLICY, rand=lambda: 0.0) for n in range(1, 9)]
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]


@pytest.mark.parametrize("attempt", [1, 2, 5, 6, 60, 10_000])
@pytest.mark.parametrize("rand", [0.0, 0.5, 0.999999])
def test_backoff_jitter_stays_within_bounds(attempt: int, rand: float) -> None:
    delay = backoff_delay(attempt, POLICY, rand=lambda: rand)
    assert (1 - POLICY.backoff_jitter) * 1.0 <= delay <= POLICY.backoff_max_seconds
    assert delay >= (1 - POLICY.backoff_jitter) * min(30.0, 2.0 ** (min(attempt, 60) - 1))


def test_retries_are_bounded_then_failed() -> None:
    state = state_of("a", phase="Loading", prepared_path="/c/x")
    seen = []
    for _ in range(POLICY.max_attempts):
        state = on_failure(
            state,
            "engine answered 503: busy",
            permanent=False,
            now=100.0,
            wall=WALL,
            rules="r",
            policy=POLICY,
            rand=lambda: 0.0,
        )
        seen.append((state.phase, state.attempts, state.next_attempt_at - 100.0))
    assert seen[:3] == [("Loading", 1, 1.0), ("Loading", 2, 2.0), ("Loading", 3, 4.0)]
    assert seen[-1][:2] == ("Failed", 8)
    assert state.last_error == "engine answered 503: busy (gave up after 8 attempts)"
    assert sum(delay for _, _, delay in seen[:-1]) == 1 + 2 + 4 + 8 + 16 + 30 + 30


def test_permanent_failure_fails_at_once() -> None:
    state = on_failure(
        state_of("a", phase="Downloading"),
        "ArtifactInvalid: mismatch",
        permanent=True,
        now=5.0,
        wall=WALL,
        rules="r",
        policy=POLICY,
    )
    assert (state.phase, state.attempts, state.last_error) == (
        "Failed",
        1,
        "ArtifactInvalid: mismatch",
    )
    assert state.last_transition_time == WALL
    assert state.failed_at == 5.0


# ------------------------------------------------------------------------------ pure: plan

EARLIER = WALL - timedelta(minutes=5)


def spec(name: str, digest: str = "1", *, pinned: bool = True) -> AdapterEntry:
    return AdapterEntry(
        name=name, uri=f"s3://m/{name}", digest="sha256:" + digest * 64, pinned=pinned
    )


def state_of(name: str, digest: str = "1", **changes: Any) -> AdapterState:
    base = AdapterState(
        name=name,
        uri=f"s3://m/{name}",
        digest="sha256:" + digest * 64,
        pinned=True,
        phase="Pending",
        last_transition_time=EARLIER,
        token=1,
    )
    return AdapterState(**{**base.__dict__, **changes})


def decide(
    adapters: list[AdapterEntry],
    states: list[AdapterState],
    engine: dict[str, str | None] | None,
    *,
    now: float = 100.0,
    observed_at: float = 99.0,
    rules: str = "r",
    max_loras: int | None = None,
) -> agent_plan.Plan:
    tokens = iter(range(100, 200))
    return plan(
        adapters,
        {s.name: s for s in states},
        None if engine is None else EngineView(engine, observed_at),
        now=now,
        wall=WALL,
        rules=rules,
        policy=POLICY,
        max_loras=max_loras,
        next_token=lambda: next(tokens),
    )


@pytest.mark.parametrize(
    ("states", "engine", "phase", "actions"),
    [
        pytest.param([], None, "Downloading", [Action("prepare", "a")], id="new-adapter-prepares"),
        pytest.param(
            [state_of("a", phase="Loading", prepared_path="/c/1")],
            None,
            "Loading",
            [],
            id="engine-down-waits",
        ),
        pytest.param(
            [state_of("a", phase="Loading", prepared_path="/c/1")],
            {},
            "Loading",
            [Action("load", "a")],
            id="prepared-loads",
        ),
        pytest.param(
            [state_of("a", phase="Loading", prepared_path="/c/1")],
            {"a": "/c/1"},
            "Loaded",
            [],
            id="already-served-is-adopted",
        ),
        pytest.param(
            [state_of("a", phase="Loaded", prepared_path="/c/1", loaded_at=50.0)],
            {},
            "Loading",
            [Action("load", "a")],
            id="engine-restart-reloads",
        ),
        pytest.param(
            [state_of("a", phase="Loaded", prepared_path="/c/1", loaded_at=99.5)],
            {},
            "Loaded",
            [],
            id="loaded-after-observation-is-not-lost",
        ),
        pytest.param(
            [state_of("a", phase="Loaded", prepared_path="/c/1", loaded_at=50.0)],
            {"a": "/c/0"},
            "Loading",
            [Action("load", "a")],
            id="other-copy-is-replaced",
        ),
        pytest.param(
            [state_of("a", phase="Downloading", busy=True)],
            {},
            "Downloading",
            [],
            id="busy-is-left-alone",
        ),
        pytest.param(
            [
                state_of(
                    "a", phase="Loading", prepared_path="/c/1", attempts=2, next_attempt_at=101.0
                )
            ],
            {},
            "Loading",
            [],
            id="backoff-not-elapsed",
        ),
        pytest.param(
            [state_of("a", phase="Failed", failed_at=90.0, failed_rules="r", attempts=1)],
            {},
            "Failed",
            [],
            id="failed-stays-failed",
        ),
        pytest.param(
            [state_of("a", phase="Failed", failed_at=90.0, failed_rules="old", attempts=1)],
            {},
            "Downloading",
            [Action("prepare", "a")],
            id="failed-retried-when-rules-change",
        ),
        pytest.param(
            [state_of("a", phase="Failed", failed_at=90.0 - 1800, failed_rules="r")],
            {},
            "Downloading",
            [Action("prepare", "a")],
            id="failed-retried-after-cooldown",
        ),
    ],
)
def test_plan_one_adapter(
    states: list[AdapterState],
    engine: dict[str, str | None] | None,
    phase: str,
    actions: list[Action],
) -> None:
    decision = decide([spec("a")], states, engine)
    assert decision.states["a"].phase == phase
    assert decision.actions == actions


def test_plan_reload_message_names_the_restart() -> None:
    loaded = state_of("a", phase="Loaded", prepared_path="/c/1", loaded_at=50.0)
    state = decide([spec("a")], [loaded], {}).states["a"]
    assert state.last_error == "the engine no longer serves it (restarted?); reloading"
    assert state.last_transition_time == WALL


def test_plan_unloads_what_is_not_wanted_and_cancels_removed_work() -> None:
    states = [
        state_of("a", phase="Loaded", prepared_path="/c/1", loaded_at=1.0),
        state_of("gone", phase="Downloading", busy=True),
    ]
    decision = decide([spec("a")], states, {"a": "/c/1", "old": "/c/2"})
    assert decision.actions == [Action("cancel", "gone"), Action("unload", "old")]
    assert set(decision.states) == {"a"}


def test_plan_changed_digest_starts_over_and_cancels_the_running_step() -> None:
    busy = state_of("a", phase="Downloading", busy=True)
    decision = decide([spec("a", "2")], [busy], {"a": "/c/1"})
    assert decision.actions == [Action("cancel", "a"), Action("prepare", "a")]
    new = decision.states["a"]
    assert (new.digest, new.phase, new.token, new.attempts) == (
        "sha256:" + "2" * 64,
        "Downloading",
        100,
        0,
    )


def test_plan_capacity_admits_pinned_first() -> None:
    adapters = [spec("x", pinned=False), spec("p"), spec("q")]
    states = [state_of("x", phase="Loaded", prepared_path="/c/x", loaded_at=1.0)]
    decision = decide(adapters, states, {"x": "/c/x"}, max_loras=2)
    assert decision.states["x"].phase == "Pending"
    assert "max_loras" in (decision.states["x"].last_error or "")
    assert decision.actions == [
        Action("unload", "x"),
        Action("prepare", "p"),
        Action("prepare", "q"),
    ]


def test_transition_time_moves_only_when_the_phase_changes() -> None:
    state = state_of("a", phase="Loading")
    assert transition(state, "Loading", WALL, attempts=3).last_transition_time == EARLIER
    assert transition(state, "Loaded", WALL).last_transition_time == WALL


# ------------------------------------------------------------------------------ config, checks


def test_serving_config_validates() -> None:
    good: dict[str, Any] = {
        "engine": {"type": "vllm", "admin_url": "http://127.0.0.1:8000"},
        "base_model": {"uri": BASE, "name": BASE_NAME},
        "cache_dir": "/cache",
        "adapters": [{"name": "a", "uri": "s3://m/a", "digest": "sha256:" + "0" * 64}],
    }
    config = ServingConfig.model_validate(good)
    assert config.adapters[0].pinned is True
    assert config.status_bind_address == "0.0.0.0"  # noqa: S104 - the default under test
    for broken, message in [
        ({"adapters": good["adapters"] * 2}, "listed twice"),
        ({"adapters": [{**good["adapters"][0], "name": BASE_NAME}]}, "base model name"),
        ({"adapters": [{**good["adapters"][0], "digest": "sha256:xyz"}]}, "pattern"),
        ({"adapters": [{**good["adapters"][0], "name": "Not_DNS"}]}, "pattern"),
        ({"engine": {"type": "tgi", "admin_url": "http://x"}}, "type"),
        ({"unknown": 1}, "Extra inputs"),
    ]:
        with pytest.raises(ValidationError, match=message):
            ServingConfig.model_validate({**good, **broken})


def test_served_references_pin_the_revision() -> None:
    base = BaseModelRef(uri="hf://org/m", revision="abc", name="m", aliases=["s3://mirror/m"])
    assert served_references(base) == ["hf://org/m@abc", "s3://mirror/m"]
    assert served_references(BaseModelRef(uri="hf://org/m@def", revision="abc", name="m"))[0] == (
        "hf://org/m@def"
    )


def test_adapter_problems_are_checked_without_the_model(tmp_path: Path) -> None:
    engine = EngineConfig(type="vllm", admin_url="http://127.0.0.1:8000", max_lora_rank=16)
    base = BaseModelRef(uri=BASE, name=BASE_NAME, aliases=["s3://mirror/base"])

    def problems(files: dict[str, bytes], **meta: Any) -> list[str]:
        directory = tmp_path / hashlib.sha256(repr((files, meta)).encode()).hexdigest()[:8]
        directory.mkdir()
        for rel, data in files.items():
            (directory / rel).write_bytes(data)
        return adapter_problems(directory, metadata=meta, engine=engine, base=base)

    assert problems(adapter_files(), baseModel=BASE) == []
    assert problems(adapter_files(), baseModel="hf://ORG/Base-Model@abc") == []
    assert problems(adapter_files(), baseModel="s3://mirror/base/") == []
    assert problems(adapter_files()) == []  # no claim (a local path): not checked
    [wrong] = problems(adapter_files(), baseModel="hf://org/other")
    assert "hf://org/other" in wrong
    assert "alias" in wrong
    [rank] = problems(adapter_files(rank=64), baseModel=BASE)
    assert "rank 64 exceeds max_lora_rank 16" in rank
    assert any("DoRA" in p for p in problems(adapter_files(use_dora=True)))
    truncated = {**adapter_files(), "adapter_model.safetensors": safetensors_bytes(8)[:-4]}
    assert any("safetensors" in p for p in problems(truncated))


# ------------------------------------------------------------------------------ engine client


def mock_client(
    handler: Callable[[httpx.Request], httpx.Response], **kwargs: Any
) -> OpenAIAdminClient:
    return OpenAIAdminClient(
        "http://engine",
        base_model_name=BASE_NAME,
        transport=httpx.MockTransport(handler),
        **kwargs,
    )


@pytest.mark.asyncio
async def test_engine_client_speaks_vllm() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v1/models":
            return httpx.Response(
                200,
                json={
                    "data": [
                        {"id": BASE_NAME, "root": "/m", "parent": None},
                        {"id": "other-base", "root": "/m2", "parent": None},
                        {"id": "a", "root": "/c/1", "parent": BASE_NAME},
                        {"id": "b"},
                    ]
                },
            )
        body = json.loads(request.content)
        if body["lora_name"] == "old-style":
            return httpx.Response(
                400,
                json={
                    "object": "error",
                    "message": "bad rank",
                    "type": "BadRequestError",
                    "code": 400,
                },
            )
        if body["lora_name"] == "missing":
            return httpx.Response(404, json={"error": {"message": "No adapter found"}})
        if body["lora_name"] == "loaded-before" and not body.get("load_inplace"):
            return httpx.Response(400, json={"error": {"message": "has already been loaded"}})
        if body["lora_name"] == "broken":
            return httpx.Response(500, json={"error": {"message": "CUDA out of memory"}})
        return httpx.Response(200, text="Success")

    client = mock_client(handler, api_key="s3cret")
    try:
        assert await client.list_adapters() == {"a": "/c/1", "b": None}
        assert seen[0].headers["authorization"] == "Bearer s3cret"
        await client.load("a", "/c/1", replace=True)
        assert json.loads(seen[-1].content) == {
            "lora_name": "a",
            "lora_path": "/c/1",
            "load_inplace": True,
        }
        await client.load("loaded-before", "/c/1", replace=False)
        assert [json.loads(r.content).get("load_inplace") for r in seen[-2:]] == [None, True]
        with pytest.raises(EngineRejected, match="engine answered 400: bad rank"):
            await client.load("old-style", "/c/1", replace=False)
        with pytest.raises(EngineRejected, match="cache_dir must be mounted"):
            await client.load("missing", "/c/1", replace=False)
        with pytest.raises(EngineUnavailable, match="500: CUDA out of memory"):
            await client.load("broken", "/c/1", replace=False)
        await client.unload("missing")  # 404: nothing to unload is success
        assert "s3cret" not in repr(client)
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_engine_client_replaces_by_unload_and_load_without_load_inplace() -> None:
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        paths.append(request.url.path + (" inplace" if body.get("load_inplace") else ""))
        if body.get("load_inplace"):
            return httpx.Response(400, json={"message": "'a' has already been loaded."})
        return httpx.Response(200, text="Success")

    client = mock_client(handler)
    try:
        await client.load("a", "/c/2", replace=True)
    finally:
        await client.aclose()
    assert paths == [
        "/v1/load_lora_adapter inplace",
        "/v1/unload_lora_adapter",
        "/v1/load_lora_adapter",
    ]


@pytest.mark.asyncio
async def test_engine_client_unreachable_is_transient() -> None:
    client = OpenAIAdminClient(f"http://127.0.0.1:{free_port()}", base_model_name=BASE_NAME)
    try:
        with pytest.raises(EngineUnavailable, match="not reachable"):
            await client.list_adapters()
        with pytest.raises(EngineUnavailable, match="not reachable"):
            await client.load("a", "/c", replace=False)
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_lorax_stager_links_adapters(tmp_path: Path) -> None:
    healthy = True

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200 if healthy else 503)

    stager = LoraxStager(
        "http://lorax", served_dir=tmp_path / "served", transport=httpx.MockTransport(handler)
    )
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    try:
        assert await stager.list_adapters() == {}
        await stager.load("a", str(tmp_path / "v1"), replace=False)
        await stager.load("a", str(tmp_path / "v2"), replace=True)
        assert await stager.list_adapters() == {"a": str(tmp_path / "v2")}
        assert (tmp_path / "served" / "a").resolve() == tmp_path / "v2"
        await stager.unload("a")
        await stager.unload("a")
        assert await stager.list_adapters() == {}
        healthy = False
        with pytest.raises(EngineUnavailable, match="503"):
            await stager.list_adapters()
    finally:
        await stager.aclose()


# ------------------------------------------------------------------------------ the loop


@pytest.mark.asyncio
async def test_initial_load_and_readiness_follow_the_pinned_adapters(
    tmp_path: Path, embedded_s3: Path
) -> None:
    """The engine starts after the agent (connection refused), then serves all three."""
    fake = FakeEngine(hold={"b": asyncio.Event()})
    h = Harness(tmp_path, free_port())
    try:
        a, b, c = (h.publish(n, adapter_files(seed=i)) for i, n in enumerate("abc"))
        await h.start([entry(a, "a"), entry(b, "b"), entry(c, "c", pinned=False)])
        health = await h.get("/healthz")
        assert (health.status_code, health.json()) == (200, {"healthy": True})
        await until((h.cache / "adapters" / c.digest[7:]).is_dir)
        ready = await h.get("/readyz")
        assert ready.status_code == 503
        assert "engine not ready" in ready.json()["reason"]
        status = await h.status()
        assert status["engineReady"] is False
        assert "not reachable" in status["engineError"]
        assert set((await h.phases()).values()) == {"Loading"}  # verified, waiting for the engine
        assert fake.calls == []

        async with serve(fake.app(), port=h.engine_port):
            await h.wait_phases({"a": "Loaded", "b": "Loading", "c": "Loaded"})
            ready = await h.get("/readyz")
            assert ready.status_code == 503
            assert ready.json() == {"ready": False, "reason": "pinned adapters not loaded: b"}
            fake.hold["b"].set()
            await h.wait_phases({"a": "Loaded", "b": "Loaded", "c": "Loaded"})
            assert (await h.get("/readyz")).json() == {"ready": True}
            assert fake.loaded == {
                n: str(h.cache / "adapters" / p.digest.removeprefix("sha256:"))
                for n, p in zip("abc", (a, b, c), strict=True)
            }
            assert len(fake.loads()) == 3
            status = await h.status()
            assert status["ready"] is True
            assert status["engineReady"] is True
            for adapter in status["adapters"]:
                assert adapter["loadSeconds"] is not None
                assert adapter["loadSeconds"] >= 0
                assert adapter["lastError"] is None
                assert adapter["attempts"] == 0
            await h.stop()
    finally:
        await h.stop()


@pytest.mark.asyncio
async def test_status_document_shape(harness: Harness, engine: tuple[FakeEngine, int]) -> None:
    a = harness.publish("a")
    config = harness.config([entry(a, "a")])
    await harness.start([entry(a, "a")])
    await harness.wait_phases({"a": "Loaded"})
    status = await harness.status()
    assert set(status) == {
        "engine",
        "engineReady",
        "engineError",
        "ready",
        "reason",
        "configDigest",
        "configError",
        "observedTime",
        "adapters",
    }
    expected_digest = "sha256:" + hashlib.sha256(harness.config_path.read_bytes()).hexdigest()
    assert status["configDigest"] == expected_digest
    assert (status["engine"], status["engineReady"], status["engineError"]) == ("vllm", True, None)
    assert (status["ready"], status["reason"], status["configError"]) == (True, None, None)
    assert RFC3339.match(status["observedTime"])
    [adapter] = status["adapters"]
    assert set(adapter) == {
        "name",
        "phase",
        "uri",
        "digest",
        "pinned",
        "lastError",
        "loadSeconds",
        "lastTransitionTime",
        "attempts",
    }
    assert (adapter["name"], adapter["uri"], adapter["digest"], adapter["pinned"]) == (
        "a",
        a.uri,
        a.digest,
        True,
    )
    assert isinstance(adapter["loadSeconds"], float)
    assert RFC3339.match(adapter["lastTransitionTime"])
    assert config.adapters[0].digest == adapter["digest"]


@pytest.mark.asyncio
async def test_config_updated_in_place_is_followed_without_restart(
    harness: Harness, engine: tuple[FakeEngine, int]
) -> None:
    fake, _ = engine
    a, b, c = (harness.publish(n, adapter_files(seed=i)) for i, n in enumerate("abc"))
    agent = await harness.start([entry(a, "a"), entry(b, "b"), entry(c, "c")])
    await harness.wait_phases({"a": "Loaded", "b": "Loaded", "c": "Loaded"})
    task = harness.task

    # Add d, remove a, and publish a new version of c (new digest): one ConfigMap update.
    d = harness.publish("d", adapter_files(seed=3))
    c2 = harness.publish("c", adapter_files(seed=4))
    assert c2.digest != c.digest
    current = [entry(b, "b"), entry(c2, "c"), entry(d, "d")]
    harness.write_config(current)
    await harness.wait_phases({"b": "Loaded", "c": "Loaded", "d": "Loaded"})
    await until(lambda: "a" not in fake.loaded)
    assert fake.unloads() == ["a"]
    assert fake.loaded["c"].endswith(c2.digest.removeprefix("sha256:"))
    assert fake.loads("c")[-1]["load_inplace"] is True  # replaced under the same name
    assert (await harness.adapter("c"))["digest"] == c2.digest
    assert task is not None
    assert harness.task is task
    assert not task.done()
    assert harness.agent is agent

    # Copies nobody uses any more are removed from the cache.
    def cached() -> set[str]:
        return {p.name for p in (harness.cache / "adapters").iterdir() if p.is_dir()}

    await until(lambda: cached() == {x.digest.removeprefix("sha256:") for x in (b, c2, d)})

    # A broken update is reported and the previous config stays in force.
    (harness.mount / "..data" / "config.json").unlink()
    (harness.mount / "..data" / "config.json").write_text('{"engine": 1}')

    async def reported() -> bool:
        return (await harness.status())["configError"] is not None

    await until(reported)
    status = await harness.status()
    assert "not a valid ServingConfig" in status["configError"]
    assert {x["name"]: x["phase"] for x in status["adapters"]} == {
        "b": "Loaded",
        "c": "Loaded",
        "d": "Loaded",
    }
    (harness.mount / "..data" / "config.json").write_text(
        harness.config(current).model_dump_json(indent=2)
    )

    async def cleared() -> bool:
        return (await harness.status())["configError"] is None

    await until(cleared)


@pytest.mark.asyncio
async def test_corrupt_or_mismatched_artifacts_fail_and_others_load(
    harness: Harness, engine: tuple[FakeEngine, int]
) -> None:
    fake, _ = engine
    good = harness.publish("good", adapter_files(seed=1))
    other = harness.publish("other", adapter_files(seed=2))
    corrupt = harness.publish("corrupt", adapter_files(seed=3))
    weights = corrupt.root / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed
    weights.write_bytes(bytes(data))
    await harness.start(
        [
            entry(good, "good"),
            {**entry(other, "mismatch"), "digest": good.digest},  # pinned to another digest
            entry(corrupt, "corrupt"),
        ]
    )
    await harness.wait_phases({"good": "Loaded", "mismatch": "Failed", "corrupt": "Failed"})
    mismatch = await harness.adapter("mismatch")
    assert mismatch["lastError"] == (
        f"ArtifactInvalid: {other.uri} has digest {other.digest} (from its _COMPLETE marker),"
        f" expected {good.digest}"
    )
    broken = await harness.adapter("corrupt")
    assert broken["lastError"].startswith(f"ArtifactInvalid: {corrupt.uri} does not match its")
    assert "adapter_model.safetensors: sha256" in broken["lastError"]
    assert "differs from the manifest's" in broken["lastError"]
    await asyncio.sleep(0.4)  # several resyncs: a permanent failure is not retried
    assert (await harness.adapter("corrupt"))["attempts"] == 1
    assert (await harness.adapter("mismatch"))["attempts"] == 1
    assert [b["lora_name"] for b in fake.loads()] == ["good"]
    assert not (harness.cache / "adapters" / corrupt.digest[7:]).exists()
    # Failed adapters do not hold the pod back: "good" serves (the status names the others).
    assert (await harness.get("/readyz")).json() == {"ready": True}


@pytest.mark.asyncio
async def test_incompatible_adapters_fail_before_any_load_call(
    harness: Harness, engine: tuple[FakeEngine, int]
) -> None:
    fake, _ = engine
    good = harness.publish("good")
    big = harness.publish("big", adapter_files(rank=64))
    wrong = harness.publish("wrong", adapter_files(seed=1), baseModel="hf://org/other-model")
    dora = harness.publish("dora", adapter_files(use_dora=True))
    await harness.start(
        [
            entry(good, "good"),
            entry(big, "big"),
            entry(wrong, "wrong"),
            entry(dora, "dora", pinned=False),
        ]
    )
    await harness.wait_phases(
        {"good": "Loaded", "big": "Failed", "wrong": "Failed", "dora": "Failed"}
    )
    assert "rank 64 exceeds max_lora_rank 16" in (await harness.adapter("big"))["lastError"]
    wrong_error = (await harness.adapter("wrong"))["lastError"]
    assert wrong_error.startswith("Incompatible: it was trained on hf://org/other-model")
    assert "serves hf://org/base-model@abc123" in wrong_error
    assert "DoRA" in (await harness.adapter("dora"))["lastError"]
    assert [b["lora_name"] for b in fake.loads()] == ["good"]


@pytest.mark.asyncio
async def test_transient_engine_errors_are_retried_then_loaded(
    harness: Harness, engine: tuple[FakeEngine, int]
) -> None:
    fake, _ = engine
    fake.fail_loads = 3
    a = harness.publish("a")
    await harness.start([entry(a, "a")])
    await harness.wait_phases({"a": "Loaded"})
    assert len(fake.loads("a")) == 4
    adapter = await harness.adapter("a")
    assert (adapter["attempts"], adapter["lastError"]) == (0, None)


@pytest.mark.asyncio
async def test_transient_engine_errors_give_up_after_max_attempts(
    harness: Harness, engine: tuple[FakeEngine, int]
) -> None:
    fake, _ = engine
    fake.fail_loads = 1000
    harness.reconcile_overrides = {"max_attempts": 3}
    a = harness.publish("a")
    await harness.start([entry(a, "a")])
    await harness.wait_phases({"a": "Failed"})
    adapter = await harness.adapter("a")
    assert adapter["lastError"] == (
        "EngineUnavailable: engine answered 503: engine busy, try again (gave up after 3 attempts)"
    )
    await asyncio.sleep(0.3)
    assert len(fake.loads("a")) == 3


@pytest.mark.asyncio
async def test_engine_rejection_fails_at_once_with_its_message(
    harness: Harness, engine: tuple[FakeEngine, int]
) -> None:
    fake, _ = engine
    fake.reject["x"] = "While loading x: target modules {'q_proj'} not found in the base model"
    x, y = harness.publish("x"), harness.publish("y", adapter_files(seed=1))
    await harness.start([entry(x, "x"), entry(y, "y")])
    await harness.wait_phases({"x": "Failed", "y": "Loaded"})
    assert (await harness.adapter("x"))["lastError"] == (
        "EngineRejected: engine answered 400: While loading x: target modules {'q_proj'} not "
        "found in the base model"
    )
    await asyncio.sleep(0.4)
    assert len(fake.loads("x")) == 1


@pytest.mark.asyncio
async def test_engine_restart_reloads_everything(
    harness: Harness, engine: tuple[FakeEngine, int]
) -> None:
    fake, _ = engine
    a, b = harness.publish("a"), harness.publish("b", adapter_files(seed=1))
    await harness.start([entry(a, "a"), entry(b, "b", pinned=False)])
    await harness.wait_phases({"a": "Loaded", "b": "Loaded"})
    assert len(fake.loads()) == 2

    fake.restart()  # a quick restart: the model list simply lacks the adapters
    await until(lambda: len(fake.loads()) == 4)
    await harness.wait_phases({"a": "Loaded", "b": "Loaded"})
    assert set(fake.loaded) == {"a", "b"}

    fake.down = True  # a slow restart: the engine is not up for a while
    fake.restart()
    await until(lambda: _status_is(harness, engineReady=False))
    assert (await harness.get("/readyz")).status_code == 503
    await asyncio.sleep(0.3)
    assert len(fake.loads()) == 4  # nothing is tried while the engine is down
    fake.down = False
    await until(lambda: len(fake.loads()) == 6)
    await harness.wait_phases({"a": "Loaded", "b": "Loaded"})
    assert set(fake.loaded) == {"a", "b"}
    assert (await harness.get("/readyz")).status_code == 200


async def _status_is(harness: Harness, **expected: Any) -> bool:
    status = await harness.status()
    return all(status[k] == v for k, v in expected.items())


@pytest.mark.asyncio
async def test_agent_adopts_what_the_engine_already_serves(
    harness: Harness, engine: tuple[FakeEngine, int]
) -> None:
    """An agent restarted beside a running engine verifies its copies but loads nothing."""
    fake, _ = engine
    a = harness.publish("a")
    fake.loaded["a"] = str(harness.cache / "adapters" / a.digest.removeprefix("sha256:"))
    fake.loaded["stale"] = "/somewhere/else"
    await harness.start([entry(a, "a")])
    await harness.wait_phases({"a": "Loaded"})
    await until(lambda: "stale" not in fake.loaded)
    assert fake.loads() == []
    assert fake.unloads() == ["stale"]


# ------------------------------------------------------------------------------ main


def test_main_refuses_an_invalid_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"engine": {"type": "vllm"}}')
    assert main(["--config", str(path)]) == 2
    assert "not a valid ServingConfig" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.json")]) == 2
    with pytest.raises(Exception, match="cannot read"):
        load_config(tmp_path / "missing.json")


def test_main_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    config = ServingConfig(
        engine=EngineConfig(type="vllm", admin_url=f"http://127.0.0.1:{free_port()}"),
        base_model=BaseModelRef(uri=BASE, name=BASE_NAME),
        cache_dir=str(tmp_path / "cache"),
        status_port=free_port(),
        status_bind_address="127.0.0.1",
        storage=StorageConfig(),
    )
    path = tmp_path / "config.json"
    path.write_text(config.model_dump_json())
    code = "import sys; from kubetune_runtime.serving.agent import main; sys.exit(main())"
    process = subprocess.Popen(
        [sys.executable, "-c", code, "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{config.status_port}/healthz", timeout=1)
                if response.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, "agent exited"
            assert time.monotonic() < deadline, "agent did not start"
            time.sleep(0.05)
        assert httpx.get(f"http://127.0.0.1:{config.status_port}/readyz").status_code == 503
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert "Agent stopped" in output


@pytest.mark.asyncio
async def test_adding_a_pinned_adapter_does_not_take_a_ready_pod_out_of_service(
    harness: Harness, engine: tuple[FakeEngine, int]
) -> None:
    """Every replica loads a new adapter at once: gating on it would stop all traffic."""
    fake, _ = engine
    a, b = harness.publish("a"), harness.publish("b", adapter_files(seed=1))
    await harness.start([entry(a, "a")])
    await harness.wait_phases({"a": "Loaded"})
    assert (await harness.get("/readyz")).status_code == 200

    fake.hold["b"] = asyncio.Event()
    harness.write_config([entry(a, "a"), entry(b, "b")])
    await harness.wait_phases({"a": "Loaded", "b": "Loading"})
    assert (await harness.get("/readyz")).json() == {"ready": True}  # a still serves
    fake.hold["b"].set()
    await harness.wait_phases({"a": "Loaded", "b": "Loaded"})

    # An engine that restarted lost both: the pod leaves the Service until both are back.
    fake.hold["a"] = asyncio.Event()
    fake.restart()
    await until(lambda: _status_is(harness, ready=False))
    ready = await harness.get("/readyz")
    assert ready.status_code == 503
    assert "a" in ready.json()["reason"]
    fake.hold["a"].set()
    await harness.wait_phases({"a": "Loaded", "b": "Loaded"})
    assert (await harness.get("/readyz")).status_code == 200


@pytest.mark.asyncio
async def test_readiness_and_status_never_vouch_for_adapters_a_restarted_engine_lost(
    harness: Harness, engine: tuple[FakeEngine, int]
) -> None:
    """Between two resyncs an engine restart is invisible to the loop; /readyz and /status
    observe the engine afresh, so neither says Loaded for what the engine no longer has."""
    fake, _ = engine
    harness.reconcile_overrides = {"resync_seconds": 120.0}
    a = harness.publish("a")
    await harness.start([entry(a, "a")])
    await harness.wait_phases({"a": "Loaded"})
    assert (await harness.get("/readyz")).status_code == 200
    await asyncio.sleep(1.1)  # older than REFRESH_MAX_AGE

    fake.hold["a"] = asyncio.Event()
    fake.restart()  # far from the next resync
    ready = await harness.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["reason"] == "pinned adapters not loaded: a"
    assert (await harness.adapter("a"))["phase"] != "Loaded"
    fake.hold["a"].set()
    await harness.wait_phases({"a": "Loaded"})
    assert (await harness.get("/readyz")).status_code == 200


@pytest.mark.asyncio
async def test_a_failed_pinned_adapter_does_not_keep_a_new_pod_out_of_service(
    harness: Harness, engine: tuple[FakeEngine, int]
) -> None:
    """It will not load by waiting: the others must serve (the status names it)."""
    fake, _ = engine
    fake.reject["bad"] = "target module q_proj not found in the base model"
    a, bad = harness.publish("a"), harness.publish("bad", adapter_files(seed=2))
    await harness.start([entry(a, "a"), entry(bad, "bad")])
    await harness.wait_phases({"a": "Loaded", "bad": "Failed"})
    assert (await harness.get("/readyz")).json() == {"ready": True}
    assert "q_proj" in (await harness.adapter("bad"))["lastError"]


@pytest.mark.asyncio
async def test_a_pinned_adapter_out_of_attempts_on_transient_errors_still_gates(
    harness: Harness, engine: tuple[FakeEngine, int]
) -> None:
    """Storage or the engine was briefly unavailable: serving without it would answer 404."""
    fake, _ = engine
    harness.reconcile_overrides = {"max_attempts": 2}
    fake.fail_loads = 100  # 503 "engine busy" on every load
    a = harness.publish("a")
    await harness.start([entry(a, "a")])
    await harness.wait_phases({"a": "Failed"})
    assert "gave up after 2 attempts" in (await harness.adapter("a"))["lastError"]
    ready = await harness.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["reason"] == "pinned adapters not loaded: a"
