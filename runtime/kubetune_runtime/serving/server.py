"""``kubetune-runtime serve``: the built-in engine behind two HTTP listeners.

    kubetune-runtime serve --model DIR [--served-model-name NAME] [--base-model-uri URI ...]
        [--host 0.0.0.0] [--port 8000] [--admin-host 127.0.0.1] [--admin-port 8001]
        [--admin-key-file FILE]
        [--max-batch-size 8] [--max-batch-delay-ms 10] [--max-loras 32] [--max-lora-rank 64]
        [--max-model-len N] [--max-queued-requests 256] [--max-request-bytes 4194304]
        [--lora-kernel stacked|peft] [--dtype auto|float32|bfloat16|float16]
        [--device auto|cpu|cuda[:N]] [--lora NAME=DIR ...]

**Inference listener** (``--host``:``--port``), OpenAI-compatible:

* ``GET /v1/models``: the base model (``id`` = served name, ``root`` = its folder) and every
  attached adapter (``root`` = its folder, ``parent`` = the served name), as vLLM lists them;
* ``POST /v1/completions`` and ``POST /v1/chat/completions``: ``model`` selects the base model
  or an adapter; ``max_tokens``, ``temperature`` (0 is greedy), ``top_p``, ``stop``, ``seed``,
  ``stream`` (server-sent events ``data: {chunk}`` ending with ``data: [DONE]``) and
  ``stream_options.include_usage``, and vLLM's ``ignore_eos``; ``n`` must be 1; other OpenAI
  features (``logprobs``, ``echo``, penalties, ``logit_bias``, tools) are refused with 400;
  chat prompts go through the tokenizer's chat template;
* ``GET /health``: 200 while the engine runs, else 503.

**Admin listener** (``--admin-host``:``--admin-port``, default ``127.0.0.1:8001``), vLLM's
runtime-LoRA contract. ``--admin-host`` accepts loopback addresses only (``127.0.0.0/8`` or
``::1``; anything else, a host name included, is an invalid argument, and :class:`Listeners`
refuses it too), so the admin API is never reachable from outside the pod: no Service, other
pod or node can connect to a loopback address. Another loopback address than the default
lets several emulated pods share one machine (a test harness gives each its own
``127.0.0.N``).

* ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path", "load_inplace"?}``: 200 with the
  text ``Success: LoRA adapter '<name>' added successfully.``; 400 (``InvalidUserInput``) for a
  taken name or a full engine (``max_loras``), 404 (``NotFoundError``) when the folder does not
  exist, 400 (``BadRequestError``) with every reason when the adapter is corrupt (its files do
  not match its manifest) or incompatible (see :mod:`kubetune_runtime.serving.compat`);
* ``POST /v1/unload_lora_adapter`` ``{"lora_name"}``: 200 ``Success: LoRA adapter '<name>'
  removed successfully.``, 404 when unknown;
* ``GET /v1/models`` and ``GET /health`` as above.

With ``--admin-key-file``, every admin route but ``/health`` requires ``Authorization: Bearer
<key>`` (401 otherwise); the file is read once at start.

Errors are ``{"error": {"message", "type", "param", "code"}}``: unknown model 404
``model_not_found``; invalid parameters 400 ``invalid_request_error`` naming the parameter;
prompt plus ``max_tokens`` beyond the context 400 ``context_length_exceeded``; a body over
``--max-request-bytes`` 413; more than ``--max-queued-requests`` requests in flight 429.

Exit status: 0 after SIGTERM/SIGINT (requests in flight are finished first, up to 10 s);
2 for invalid arguments; 3 when the model or a ``--lora`` adapter cannot be loaded; 1 when a
listener cannot start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kubetune_runtime.errors import ConfigInvalid
from kubetune_runtime.serving.engine import (
    AsyncRequest,
    Delta,
    EngineError,
    EngineSettings,
    Failed,
    Finished,
    SamplingParams,
    ServingEngine,
)
from kubetune_runtime.serving.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    error_body,
    model_card,
    new_id,
)

__all__ = [
    "ADMIN_HOST",
    "DEFAULT_MAX_REQUEST_BYTES",
    "Listeners",
    "build_parser",
    "check_loopback",
    "create_admin_app",
    "create_app",
    "main",
]

log = logging.getLogger(__name__)

ADMIN_HOST: Final = "127.0.0.1"  # the default; the admin API is only ever bound to loopback
DEFAULT_MAX_REQUEST_BYTES: Final = 4 * 1024 * 1024
GRACEFUL_SHUTDOWN_SECONDS: Final = 10
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_PERMANENT: Final = 3
_SSE_HEADERS: Final = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ------------------------------------------------------------------------------ apps


def create_app(
    engine: ServingEngine, *, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
) -> FastAPI:
    """The inference API (OpenAI-compatible): models, completions, chat completions, health.

    The adapter-admin routes are not part of it (see :func:`create_admin_app`).
    """
    app = _base_app(engine, max_request_bytes, admin=False)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> Response:
        return await _completions(engine, body)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        return await _chat_completions(engine, body)

    return app


def create_admin_app(
    engine: ServingEngine,
    *,
    admin_key: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> FastAPI:
    """The adapter-admin API (vLLM's runtime-LoRA routes), plus models and health.

    Serve it on a loopback address only (:class:`Listeners` does). With ``admin_key``, every
    route but ``/health`` requires ``Authorization: Bearer <admin_key>``.
    """
    app = _base_app(engine, max_request_bytes, admin=True, admin_key=admin_key)
    authorized = [Depends(_bearer_check(admin_key))] if admin_key else []

    @app.post("/v1/load_lora_adapter", dependencies=authorized)
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        if not body.lora_name or not body.lora_path:
            raise EngineError(
                "Both 'lora_name' and 'lora_path' must be provided.",
                err_type="InvalidUserInput",
                code=400,
            )
        await engine.load_adapter(body.lora_name, body.lora_path, load_inplace=body.load_inplace)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=authorized)
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        if not body.lora_name:
            raise EngineError(
                "'lora_name' needs to be provided to unload a LoRA adapter.",
                err_type="InvalidUserInput",
                code=400,
            )
        await engine.unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return app


def _base_app(
    engine: ServingEngine, max_request_bytes: int, *, admin: bool, admin_key: str | None = None
) -> FastAPI:
    app = FastAPI(
        title="kubetune builtin engine" + (" (admin)" if admin else ""),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_middleware(_BodyLimit, max_bytes=max_request_bytes)

    @app.exception_handler(EngineError)
    async def engine_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, EngineError)  # noqa: S101 - registered for this type only
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(
            error_body(str(exc), exc.err_type, param=exc.param, code=exc.code),
            status_code=exc.status,
            headers=headers,
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)  # noqa: S101
        message, param = _validation_message(exc)
        if admin:  # vLLM's shape on its admin routes
            return JSONResponse(error_body(message, "BadRequestError", param=param, code=400), 400)
        return JSONResponse(error_body(message, "invalid_request_error", param=param), 400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)  # noqa: S101
        err_type = {401: "authentication_error", 404: "not_found_error"}.get(
            exc.status_code, "invalid_request_error"
        )
        return JSONResponse(
            error_body(str(exc.detail), err_type, code=exc.status_code),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.alive():
            return JSONResponse({"status": "ok"})
        return JSONResponse(error_body("the engine is not running", "server_error"), 503)

    authorized = [Depends(_bearer_check(admin_key))] if admin_key else []

    @app.get("/v1/models", dependencies=authorized)
    async def models() -> dict[str, Any]:
        cards = [
            model_card(
                engine.served_model_name,
                root=str(engine.settings.model_dir),
                parent=None,
                created=engine.created,
                max_model_len=engine.max_model_len,
            )
        ]
        cards += [
            model_card(
                adapter.name,
                root=str(adapter.path),
                parent=engine.served_model_name,
                created=adapter.created,
                max_model_len=engine.max_model_len,
            )
            for adapter in engine.adapters.values()
        ]
        return {"object": "list", "data": cards}

    return app


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {message}", None
    param = ".".join(location) or None
    return (f"{param}: {message}" if param else message), param


def _bearer_check(key: str | None) -> Callable[[Request], Awaitable[None]]:
    async def check(request: Request) -> None:
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), key.encode()
        ):
            raise HTTPException(
                401,
                "a valid admin key is required (Authorization: Bearer <key>)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


class _BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413 (declared length or bytes read)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse(self._body(), status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises HTTPException from body reading; the app's handler
                    # turns it into the error body.
                    raise HTTPException(413, self._body()["error"]["message"])
            return message

        await self.app(scope, limited, send)

    def _body(self) -> dict[str, Any]:
        return error_body(
            f"the request body exceeds {self.max_bytes} bytes", "invalid_request_error", code=413
        )


# ------------------------------------------------------------------------------ handlers


def _sampling(body: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=body.stop_sequences(),
        seed=body.seed,
        ignore_eos=body.ignore_eos,
    )


async def _completions(engine: ServingEngine, body: CompletionRequest) -> Response:
    params = _sampling(body, body.max_tokens or 16)
    prompts = [
        engine.encode_text(prompt) if isinstance(prompt, str) else prompt
        for prompt in body.prompts()
    ]
    requests: list[AsyncRequest] = []
    try:
        for prompt_ids in prompts:
            requests.append(engine.stream(body.model, prompt_ids, params))
    except EngineError:
        for request in requests:
            request.cancel()
        raise
    response_id = new_id("cmpl")
    if not body.stream:
        try:
            results = await asyncio.gather(*(request.result() for request in requests))
        finally:
            for request in requests:
                request.cancel()
        return JSONResponse(
            completion_response(
                response_id,
                body.model,
                choices=[(r.text, r.finish_reason) for r in results],
                prompt_tokens=sum(r.prompt_tokens for r in results),
                completion_tokens=sum(r.completion_tokens for r in results),
            )
        )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        created = int(time.time())
        counts = [0, 0]
        async for index, event in _merged(requests):
            if isinstance(event, Delta):
                yield completion_chunk(
                    response_id, body.model, created, index=index, text=event.text
                )
            elif isinstance(event, Finished):
                counts[0] += event.prompt_tokens
                counts[1] += event.completion_tokens
                yield completion_chunk(
                    response_id, body.model, created, index=index, finish_reason=event.finish_reason
                )
            else:
                yield _stream_error(event)
                return
        if include_usage:
            yield completion_chunk(
                response_id, body.model, created, usage_counts=(counts[0], counts[1])
            )

    return StreamingResponse(_sse(chunks()), media_type="text/event-stream", headers=_SSE_HEADERS)


async def _chat_completions(engine: ServingEngine, body: ChatCompletionRequest) -> Response:
    engine.require_model(body.model)  # before the template: a 404 whatever the messages
    prompt_ids = engine.encode_chat([{"role": m.role, "content": m.text()} for m in body.messages])
    limit = body.token_limit()
    params = _sampling(body, limit or 0)
    request = engine.stream(body.model, prompt_ids, params, max_tokens=limit or 0)
    response_id = new_id("chatcmpl")
    if not body.stream:
        try:
            result = await request.result()
        finally:
            request.cancel()
        return JSONResponse(
            chat_response(
                response_id,
                body.model,
                text=result.text,
                finish_reason=result.finish_reason,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
            )
        )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        created = int(time.time())
        yield chat_chunk(
            response_id, body.model, created, delta={"role": "assistant", "content": ""}
        )
        async for event in request:
            if isinstance(event, Delta):
                yield chat_chunk(response_id, body.model, created, delta={"content": event.text})
            elif isinstance(event, Finished):
                yield chat_chunk(
                    response_id, body.model, created, finish_reason=event.finish_reason
                )
                if include_usage:
                    yield chat_chunk(
                        response_id,
                        body.model,
                        created,
                        usage_counts=(event.prompt_tokens, event.completion_tokens),
                    )
            else:
                yield _stream_error(event)

    return StreamingResponse(_sse(chunks()), media_type="text/event-stream", headers=_SSE_HEADERS)


def _stream_error(event: Failed) -> dict[str, Any]:
    error = event.error
    return error_body(str(error), error.err_type, param=error.param, code=error.code)


async def _sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Server-sent events: ``data: <json>`` per chunk, then ``data: [DONE]``."""
    async for chunk in chunks:
        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


async def _merged(requests: Sequence[AsyncRequest]) -> AsyncIterator[tuple[int, Any]]:
    """Events of several requests as they come, tagged with the request's index."""
    if len(requests) == 1:
        async for event in requests[0]:
            yield 0, event
        return
    events: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, request: AsyncRequest) -> None:
        async for event in request:
            await events.put((index, event))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    remaining = len(requests)
    try:
        while remaining:
            index, event = await events.get()
            yield index, event
            if not isinstance(event, Delta):
                remaining -= 1
    finally:
        for task in tasks:
            task.cancel()
        for request in requests:
            request.cancel()


# ------------------------------------------------------------------------------ listeners


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to :class:`Listeners` (two servers, one loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def check_loopback(address: str) -> str:
    """``address`` itself when it is a loopback IP address: ``127.0.0.0/8`` or ``::1``.

    Raises:
        ValueError: anything else (``0.0.0.0``, ``::``, a routable address, a host name such
            as ``localhost``, an IPv4-mapped or scoped IPv6 address); the message says why.
    """
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(
            f"{address!r} is not an IP address; the admin API binds to a loopback address "
            "only (127.0.0.0/8 or ::1) so that it is never reachable from outside the pod"
        ) from None
    loopback = (
        parsed.is_loopback
        if isinstance(parsed, ipaddress.IPv4Address)
        else parsed == ipaddress.IPv6Address("::1")
    )
    if not loopback:
        raise ValueError(
            f"{address} is not a loopback address; the admin API binds to 127.0.0.0/8 or ::1 "
            "only so that it is never reachable from outside the pod"
        )
    return address


class Listeners:
    """The inference listener and the admin listener (on loopback) in one event loop.

    Args:
        engine: the engine both serve.
        host: the inference listener's address (``0.0.0.0`` in a pod).
        port: the inference port (0 picks a free one).
        admin_host: the admin listener's address, loopback only (see :func:`check_loopback`).
        admin_port: the admin port (0 picks a free one).
        admin_key: bearer key for the admin routes, or ``None``.
        max_request_bytes: request body limit of both listeners.

    Raises:
        ValueError: ``admin_host`` is not a loopback address.
    """

    def __init__(
        self,
        engine: ServingEngine,
        *,
        host: str = "0.0.0.0",  # noqa: S104 - a pod's server listens on all interfaces
        port: int = 8000,
        admin_host: str = ADMIN_HOST,
        admin_port: int = 8001,
        admin_key: str | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        check_loopback(admin_host)
        common: dict[str, Any] = {
            "log_config": None,
            "lifespan": "off",
            "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_SECONDS,
        }
        self.inference = _Server(
            uvicorn.Config(
                create_app(engine, max_request_bytes=max_request_bytes),
                host=host,
                port=port,
                **common,
            )
        )
        self.admin = _Server(
            uvicorn.Config(
                create_admin_app(engine, admin_key=admin_key, max_request_bytes=max_request_bytes),
                host=admin_host,
                port=admin_port,
                **common,
            )
        )

    @property
    def started(self) -> bool:
        """Whether both listeners accept connections."""
        return self.inference.started and self.admin.started

    def addresses(self) -> dict[str, tuple[str, int]]:
        """``{"inference": (host, port), "admin": (host, port)}`` as bound (once started)."""
        bound = {}
        for name, server in (("inference", self.inference), ("admin", self.admin)):
            sockname = server.servers[0].sockets[0].getsockname()
            bound[name] = (str(sockname[0]), int(sockname[1]))
        return bound

    def stop(self) -> None:
        """Ask both listeners to finish their requests and stop (any thread)."""
        self.inference.should_exit = True
        self.admin.should_exit = True

    async def run(self) -> None:
        """Serve until :meth:`stop` (or SIGTERM/SIGINT, when run on the main thread)."""
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        tasks = [
            asyncio.create_task(self.inference.serve()),
            asyncio.create_task(self.admin.serve()),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            self.stop()  # one listener ended (stopped or failed): end the other
            await asyncio.gather(*tasks)
        finally:
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)


# ------------------------------------------------------------------------------ CLI


def _loopback_argument(text: str) -> str:
    try:
        return check_loopback(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The ``serve`` options (``argv`` of :func:`main` is what follows ``serve``)."""
    parser = argparse.ArgumentParser(
        prog="kubetune-runtime serve",
        description="Serve a base model and LoRA adapters (OpenAI-compatible, CPU or GPU).",
    )
    parser.add_argument("--model", type=Path, required=True, help="local model folder")
    parser.add_argument(
        "--served-model-name", help="the base model's name in requests (default: --model)"
    )
    parser.add_argument(
        "--base-model-uri",
        action="append",
        default=[],
        metavar="URI",
        help="another reference to the base model's weights that adapters may name "
        "(e.g. the s3:// or hf:// URI it was fetched from); repeatable",
    )
    parser.add_argument("--host", default="0.0.0.0", help="inference address (default 0.0.0.0)")  # noqa: S104
    parser.add_argument("--port", type=int, default=8000, help="inference port (default 8000)")
    parser.add_argument(
        "--admin-host",
        type=_loopback_argument,
        default=ADMIN_HOST,
        help=f"admin address, loopback only: 127.0.0.0/8 or ::1 (default {ADMIN_HOST})",
    )
    parser.add_argument("--admin-port", type=int, default=8001, help="admin port (default 8001)")
    parser.add_argument(
        "--admin-key-file", type=Path, help="file holding the admin API's bearer key"
    )
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests per batch")
    parser.add_argument(
        "--max-batch-delay-ms",
        type=float,
        default=10.0,
        help="how long a batch waits for more requests (ms, default 10)",
    )
    parser.add_argument("--max-loras", type=int, default=32, help="most attached adapters")
    parser.add_argument("--max-lora-rank", type=int, default=64, help="highest LoRA rank")
    parser.add_argument("--max-model-len", type=int, help="context window in tokens")
    parser.add_argument(
        "--max-queued-requests",
        type=int,
        default=256,
        help="requests in flight before 429 (default 256)",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help=f"request body limit (default {DEFAULT_MAX_REQUEST_BYTES})",
    )
    parser.add_argument(
        "--lora-kernel",
        choices=("stacked", "peft"),
        default="stacked",
        help="per-row LoRA computation (default stacked; peft: PEFT's mixed batches)",
    )
    parser.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="an adapter to attach at start; repeatable",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kubetune-runtime serve``; ``argv`` is what follows ``serve``.

    Returns:
        The exit status (see the module docstring).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    if args.admin_port == args.port and args.port != 0:
        parser.error("--admin-port must differ from --port")
    loras = []
    for spec in args.lora:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"--lora {spec!r}: expected NAME=DIR")
        loras.append((name, path))
    admin_key = None
    if args.admin_key_file is not None:
        try:
            admin_key = args.admin_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            parser.error(f"--admin-key-file: {exc.strerror or exc}")
        if not admin_key:
            parser.error(f"--admin-key-file {args.admin_key_file} is empty")
    try:
        settings = EngineSettings(
            model_dir=args.model,
            served_model_name=args.served_model_name,
            base_model_uris=tuple(args.base_model_uri),
            max_batch_size=args.max_batch_size,
            max_batch_delay_ms=args.max_batch_delay_ms,
            max_loras=args.max_loras,
            max_lora_rank=args.max_lora_rank,
            max_model_len=args.max_model_len,
            max_queued_requests=args.max_queued_requests,
            lora_kernel=args.lora_kernel,
            dtype=args.dtype,
            device=args.device,
        )
    except ConfigInvalid as exc:
        parser.error(str(exc))
    try:
        engine = ServingEngine.load(settings)
    except ConfigInvalid as exc:
        log.error("Cannot serve: %s", exc)
        return EXIT_PERMANENT
    try:
        for name, path in loras:
            try:
                engine.load_adapter_blocking(name, path)
            except EngineError as exc:
                log.error("Cannot attach --lora %s: %s", name, exc)
                return EXIT_PERMANENT
        listeners = Listeners(
            engine,
            host=args.host,
            port=args.port,
            admin_host=args.admin_host,
            admin_port=args.admin_port,
            admin_key=admin_key,
            max_request_bytes=args.max_request_bytes,
        )
        try:
            asyncio.run(listeners.run())
        except SystemExit:  # uvicorn exits when it cannot bind
            log.error("A listener could not start (see above)")
            return EXIT_FAILED
    finally:
        engine.close()
    return 0
