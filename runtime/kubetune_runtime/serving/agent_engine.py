"""How the adapter agent talks to the engine beside it (on localhost).

**vLLM** (and kubetune's builtin engine, which implements the same contract on its admin
port). vLLM exposes the routes only when started with ``--enable-lora`` and the environment
variable ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``; with ``--api-key`` they need
``Authorization: Bearer <key>``.

- ``GET /v1/models`` -> ``{"data": [{"id", "root", "parent", ...}]}``: the base model(s)
  (``parent: null``) and every loaded adapter (``id`` = its name, ``root`` = the path it was
  loaded from, ``parent`` = the base model's name). Answering at all means the engine is up.
- ``POST /v1/load_lora_adapter {"lora_name", "lora_path", "load_inplace"?}`` -> 200 and a
  plain-text "Success: ..." line. Errors are JSON, ``{"error": {"message", "type", "code"}}``
  (older vLLM: ``{"object": "error", "message", ...}``): 400 for a bad request or a name that
  is already loaded (without ``load_inplace``), 404 when nothing is found at ``lora_path``,
  and, in current vLLM, 500 when the engine fails to load it (e.g. a target module the model
  does not have; older versions answered 400).
- ``POST /v1/unload_lora_adapter {"lora_name"}`` -> 200; 404 when it is not loaded.

Classification: connection errors, timeouts, 429 and 5xx are :class:`EngineUnavailable`
(transient, retried with backoff); other 4xx are :class:`EngineRejected` (permanent). Since
current vLLM reports a genuinely incompatible adapter as 500, such an adapter is Failed only
after the retry budget (about two minutes with the defaults), with vLLM's message.

Replacing an adapter (new digest) sends ``load_inplace: true`` (vLLM >= 0.11 swaps the
weights under the same name, no gap); an engine that does not know the flag answers "already
been loaded", and the agent then unloads and loads (a short gap for that adapter).

**LoRAX** has no load API: it loads an adapter on the first request that names it
(``adapter_source: "local"``, ``adapter_id``: a directory). :class:`LoraxStager` therefore
"loads" by pointing the symlink ``<cache_dir>/served/<name>`` at the verified copy (atomic
rename), "unloads" by removing it, and is up when LoRAX's ``GET /health`` answers 200.
Loaded thus means *staged*; LoRAX itself checks the adapter at the first request, and a
LoRAX restart loses nothing (the links are on disk). Requests name the adapter by that path,
so something in front of LoRAX (or the client) must map names to paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Protocol

import httpx

__all__ = [
    "EngineClient",
    "EngineError",
    "EngineRejected",
    "EngineUnavailable",
    "LoraxStager",
    "OpenAIAdminClient",
]

_MAX_MESSAGE: Final = 800


class EngineError(Exception):
    """The engine did not do what was asked; ``str(exc)`` is one sentence for status."""


class EngineUnavailable(EngineError):
    """Not reachable, timed out, or answered 429/5xx: may succeed later."""


class EngineRejected(EngineError):
    """The engine refused (4xx other than 429): retrying the same request cannot help.

    Attributes:
        status_code: the HTTP status.
    """

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class EngineClient(Protocol):
    """What the agent needs from an engine."""

    async def list_adapters(self) -> dict[str, str | None]:
        """Adapter name -> the path it was loaded from (``None`` when not reported).

        Raises:
            EngineUnavailable: the engine is not up (or answers errors).
        """
        ...

    async def load(self, name: str, path: str, *, replace: bool) -> None:
        """Load the adapter at ``path`` as ``name`` (``replace``: it is loaded already).

        Raises:
            EngineUnavailable: transient failure.
            EngineRejected: the engine refused the adapter.
        """
        ...

    async def unload(self, name: str) -> None:
        """Stop serving ``name``; succeeds when it is not loaded.

        Raises:
            EngineUnavailable: transient failure.
            EngineRejected: the engine refused.
        """
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


def _error_message(response: httpx.Response) -> str:
    """The engine's own error message from a JSON error body (vLLM, FastAPI) or the text."""
    text = response.text
    try:
        body: Any = json.loads(text)
    except ValueError:
        body = None
    message: Any = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = error.get("message")
        elif isinstance(error, str):
            message = error
        message = message or body.get("message") or body.get("detail")
    if not isinstance(message, str):
        message = text.strip() or response.reason_phrase
    flat = " ".join(str(message).split())
    return flat[:_MAX_MESSAGE] + ("..." if len(flat) > _MAX_MESSAGE else "")


def _already_loaded(response: httpx.Response) -> bool:
    return response.status_code == 400 and "already" in _error_message(response)


class OpenAIAdminClient:
    """vLLM's runtime-LoRA routes (also served by the builtin engine), over httpx.

    Args:
        admin_url: e.g. ``http://127.0.0.1:8000``.
        base_model_name: the served base model name (never taken for an adapter).
        api_key: sent as ``Authorization: Bearer``; ``None`` for none.
        timeout_seconds: timeout of list and unload calls.
        load_timeout_seconds: timeout of a load call.
        transport: an httpx transport (tests); the default opens real connections.
    """

    def __init__(
        self,
        admin_url: str,
        *,
        base_model_name: str,
        api_key: str | None = None,
        timeout_seconds: float = 10.0,
        load_timeout_seconds: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=admin_url.rstrip("/"),
            headers=headers,
            timeout=timeout_seconds,
            transport=transport,
            trust_env=False,  # localhost: never through a proxy from the environment
        )
        self._base = base_model_name
        self._load_timeout = load_timeout_seconds

    def __repr__(self) -> str:  # never print the key
        return f"OpenAIAdminClient({str(self._client.base_url)!r})"

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def _post(self, path: str, body: Mapping[str, Any], timeout: float) -> httpx.Response:
        try:
            return await self._client.post(path, json=dict(body), timeout=timeout)
        except httpx.TimeoutException as exc:
            raise EngineUnavailable(f"POST {path} timed out after {timeout:g}s") from exc
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"POST {path}: engine not reachable ({exc})") from exc

    async def list_adapters(self) -> dict[str, str | None]:
        """Adapters in ``GET /v1/models``: entries with a ``parent``, or not the base model."""
        try:
            response = await self._client.get("/v1/models")
        except httpx.TransportError as exc:  # includes timeouts
            raise EngineUnavailable(f"GET /v1/models: engine not reachable ({exc})") from exc
        if response.status_code != 200:
            raise EngineUnavailable(
                f"GET /v1/models answered {response.status_code}: {_error_message(response)}"
            )
        try:
            data = response.json()["data"]
            entries = [entry for entry in data if isinstance(entry, dict)]
        except (ValueError, KeyError, TypeError) as exc:
            raise EngineUnavailable(
                "GET /v1/models did not answer {'data': [...]} (is admin_url the engine?)"
            ) from exc
        adapters: dict[str, str | None] = {}
        for entry in entries:
            name = entry.get("id")
            if not isinstance(name, str) or name == self._base:
                continue
            if "parent" in entry and not entry["parent"]:
                continue  # another base model name
            root = entry.get("root")
            adapters[name] = root if isinstance(root, str) and root else None
        return adapters

    async def load(self, name: str, path: str, *, replace: bool) -> None:
        """``POST /v1/load_lora_adapter``; a name already loaded is replaced in place.

        ``replace`` sends ``load_inplace`` at once. A plain load answered "already been
        loaded" (an earlier request that timed out here but finished in the engine) is sent
        again with ``load_inplace``; an engine that does not know the flag answers "already"
        once more, and the adapter is then unloaded and loaded.
        """
        response = await self._load(name, path, inplace=replace)
        if not replace and _already_loaded(response):
            response = await self._load(name, path, inplace=True)
        if _already_loaded(response):
            await self.unload(name)
            response = await self._load(name, path, inplace=False)
        if response.status_code == 200:
            return
        message = f"engine answered {response.status_code}: {_error_message(response)}"
        if response.status_code == 404:
            message += f" (can the engine read {path}? cache_dir must be mounted there too)"
        self._raise(response.status_code, message)

    async def _load(self, name: str, path: str, *, inplace: bool) -> httpx.Response:
        body: dict[str, Any] = {"lora_name": name, "lora_path": path}
        if inplace:
            body["load_inplace"] = True
        return await self._post("/v1/load_lora_adapter", body, self._load_timeout)

    async def unload(self, name: str) -> None:
        """``POST /v1/unload_lora_adapter``; 404 (not loaded) is success."""
        timeout = self._client.timeout.read or 10.0
        response = await self._post("/v1/unload_lora_adapter", {"lora_name": name}, timeout)
        if response.status_code in (200, 404):
            return
        self._raise(
            response.status_code,
            f"engine answered {response.status_code} to unloading: {_error_message(response)}",
        )

    @staticmethod
    def _raise(status: int, message: str) -> None:
        if status == 429 or status >= 500:
            raise EngineUnavailable(message)
        raise EngineRejected(message, status)


class LoraxStager:
    """LoRAX: adapters are staged as links ``<served_dir>/<name>`` (see the module docstring).

    Args:
        admin_url: the LoRAX launcher's URL; ``GET /health`` tells whether it is up.
        served_dir: where the links live (``<cache_dir>/served``), visible to LoRAX.
        timeout_seconds: timeout of the health call.
        transport: an httpx transport (tests).
    """

    def __init__(
        self,
        admin_url: str,
        *,
        served_dir: Path,
        timeout_seconds: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._client = httpx.AsyncClient(
            base_url=admin_url.rstrip("/"),
            timeout=timeout_seconds,
            transport=transport,
            trust_env=False,
        )
        self._dir = served_dir

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def list_adapters(self) -> dict[str, str | None]:
        """The staged links, when LoRAX answers ``GET /health`` with 200."""
        try:
            response = await self._client.get("/health")
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"GET /health: LoRAX not reachable ({exc})") from exc
        if response.status_code != 200:
            raise EngineUnavailable(f"GET /health answered {response.status_code}")
        return await asyncio.to_thread(self._links)

    def _links(self) -> dict[str, str | None]:
        if not self._dir.is_dir():
            return {}
        return {
            link.name: os.readlink(link)
            for link in self._dir.iterdir()
            if link.is_symlink() and not link.name.startswith(".")
        }

    async def load(self, name: str, path: str, *, replace: bool) -> None:
        """Point ``<served_dir>/<name>`` at ``path`` (atomic rename over any previous link)."""
        try:
            await asyncio.to_thread(self._link, name, path)
        except OSError as exc:
            raise EngineUnavailable(f"cannot stage {name} for LoRAX: {exc}") from exc

    def _link(self, name: str, path: str) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        temporary = self._dir / f".{name}.new"
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        temporary.symlink_to(path, target_is_directory=True)
        temporary.replace(self._dir / name)

    async def unload(self, name: str) -> None:
        """Remove the link (LoRAX may keep serving its cached copy until evicted)."""
        try:
            await asyncio.to_thread((self._dir / name).unlink, missing_ok=True)
        except OSError as exc:
            raise EngineUnavailable(f"cannot unstage {name}: {exc}") from exc
