"""Reading the adapter agents: ``GET http://<podIP>:<agent-status port>/status`` of each pod.

The operator polls (every ``serving_resync_seconds`` and on every pod or resource event)
rather than having agents push: the agent holds no credential to the operator, and its
status endpoint serves nothing secret (no admin action, no keys). The operator therefore
needs network access to the serving pods' ``agent-status`` port; a NetworkPolicy around
serving pods must allow it (see docs/serving.md).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

MAX_BODY: Final = 1 << 20  # a status of 1,024 adapters is well under a megabyte


@dataclass(frozen=True)
class AgentTarget:
    """Where one pod's agent answers."""

    pod: str
    ip: str
    port: int


@dataclass(frozen=True)
class AgentReading:
    """One read of an agent: the /status document, or why there is none."""

    status: Mapping[str, Any] | None
    error: str | None


async def read_agent(
    session: aiohttp.ClientSession, target: AgentTarget, timeout: float
) -> AgentReading:
    """GET one agent's /status; never raises (errors become :attr:`AgentReading.error`)."""
    url = f"http://{target.ip}:{target.port}/status"
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status != 200:
                return AgentReading(None, f"GET /status answered {response.status}")
            body = await response.content.read(MAX_BODY + 1)
    except TimeoutError:
        return AgentReading(None, f"GET /status timed out after {timeout:g}s")
    except aiohttp.ClientError as exc:
        return AgentReading(None, f"GET /status failed: {type(exc).__name__}")
    if len(body) > MAX_BODY:
        return AgentReading(None, "GET /status answered more than 1 MiB")
    try:
        data = json.loads(body)
    except ValueError:
        return AgentReading(None, "GET /status did not answer JSON")
    if not isinstance(data, dict) or not isinstance(data.get("adapters", []), list):
        return AgentReading(None, "GET /status answered an unexpected document")
    return AgentReading(data, None)


async def read_agents(
    session: aiohttp.ClientSession,
    targets: Sequence[AgentTarget],
    *,
    timeout: float,
    parallel: int = 16,
) -> dict[str, AgentReading]:
    """Read several agents concurrently (at most ``parallel`` at once); keyed by pod name."""
    gate = asyncio.Semaphore(parallel)

    async def one(target: AgentTarget) -> tuple[str, AgentReading]:
        async with gate:
            return target.pod, await read_agent(session, target, timeout)

    return dict(await asyncio.gather(*(one(t) for t in targets)))
