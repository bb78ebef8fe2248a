"""The built-in engine: one base model, many LoRA adapters, batched generation on one thread.

:class:`ServingEngine` holds a transformers causal LM and attaches PEFT LoRA adapters to it by
name. Requests name the base model (its served name) or an adapter; requests that arrive
together are generated **together**, whatever adapters they use: a batch collects requests
for up to ``max_batch_delay_ms`` after the first one, or until ``max_batch_size``, and then
runs one forward pass per token over all of them (left padding, a KV cache, each row with
its own adapter, sampling settings, stop sequences and token limit; rows leave the batch as
they finish).

Threads: all torch work (generation, attaching and removing adapters) happens on a single
worker thread, because a model must not run a forward pass while PEFT changes its layers
(and torch gives no guarantees for concurrent forwards on one module). Callers on any thread
or event loop submit requests through a thread-safe queue; events (text deltas, the finish)
come back through a callback, or an :class:`AsyncRequest` bound to the caller's loop.
Attaching an adapter waits for the running batch to end; reading and checking its files
happens on the caller's side first, so generation is not held up by disk reads or hashing.

Per-row LoRA kernels (``lora_kernel``):

* ``stacked`` (default): :class:`~kubetune_runtime.serving.batching.StackedLoRA`, two batched
  matrix products per adapted layer whatever the mix of adapters; adapters it cannot express
  (LoRA on embeddings, ``lora_bias``, other PEFT variants) make their batch fall back to
  PEFT's forward;
* ``peft``: PEFT's mixed-adapter batch inference (``adapter_names=[...]`` with ``__base__``
  for base rows), which loops over the distinct adapters of the batch in every layer.

Both give the same tokens as ``PeftModel.from_pretrained(base, adapter)`` alone.

Adapters are attached only after :mod:`kubetune_runtime.serving.compat`'s checks pass and,
when the folder has a ``manifest.json``, after every file matched it. DoRA adapters and
adapters with ``modules_to_save`` (or trainable tokens) are refused: PEFT's mixed batches
cannot run them next to other adapters (PEFT 0.21 raises for DoRA, and its
``ModulesToSaveWrapper`` fails on rows of adapters without the module), and a batch is
always mixed here. ``max_loras`` is a hard
cap on attached adapters (every attached adapter can be used by any batch): a load beyond it
is refused (nothing is evicted).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import queue
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import unquote, urlparse

import torch

from kubetune_runtime.errors import ArtifactInvalid, ConfigInvalid, StorageFailure
from kubetune_runtime.models.adapters import adaptable_module_names
from kubetune_runtime.serving.batching import (
    BASE,
    SamplingParams,
    StackedLoRA,
    TextStream,
    left_pad,
    next_tokens,
    stackable_modules,
)
from kubetune_runtime.serving.compat import (
    check_compatibility,
    check_lora_weights,
    highest_rank,
    read_adapter_dir,
)
from kubetune_runtime.storage.artifacts import MANIFEST_NAME, verify_local

__all__ = [
    "BASE",
    "AsyncRequest",
    "Delta",
    "EngineError",
    "EngineSettings",
    "EngineStats",
    "Event",
    "Failed",
    "Finished",
    "LoadedAdapter",
    "SamplingParams",
    "ServingEngine",
    "Ticket",
    "main",
]

log = logging.getLogger(__name__)

_STOP: Final = object()
_MAX_NAME_LENGTH: Final = 256
_RECENT_BATCHES: Final = 1024


# ------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class EngineSettings:
    """How the engine is set up (the ``kubetune-runtime serve`` flags).

    Attributes:
        model_dir: local Hugging Face model folder (config, weights, tokenizer).
        served_model_name: the base model's name in requests and ``/v1/models``; default
            ``str(model_dir)`` (as vLLM names a model after its ``--model`` argument).
        base_model_uris: other references to the same weights that adapters may name as
            their base (the URI the folder was fetched from, aliases); the folder itself
            always counts.
        max_batch_size: most requests in one batch.
        max_batch_delay_ms: how long the first request of a batch waits for others (ms).
        max_loras: most adapters attached at once; loads beyond it are refused.
        max_lora_rank: highest LoRA rank accepted.
        max_model_len: context window in tokens (prompt + completion); default the model
            config's ``max_position_embeddings``.
        max_queued_requests: most requests accepted and not finished (queued or
            generating); more are refused with 429.
        lora_kernel: ``stacked`` or ``peft`` (see the module docstring).
        dtype: weights' dtype; ``auto`` is float32 on CPU, bfloat16 (or float16) on GPUs.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``.
        trust_remote_code: allow the model repository's code.
    """

    model_dir: Path
    served_model_name: str | None = None
    base_model_uris: tuple[str, ...] = ()
    max_batch_size: int = 8
    max_batch_delay_ms: float = 10.0
    max_loras: int = 32
    max_lora_rank: int = 64
    max_model_len: int | None = None
    max_queued_requests: int = 256
    lora_kernel: Literal["stacked", "peft"] = "stacked"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_loras", "max_lora_rank", "max_queued_requests"):
            if getattr(self, name) < 1:
                raise ConfigInvalid(f"{name} must be at least 1")
        if self.max_batch_delay_ms < 0:
            raise ConfigInvalid("max_batch_delay_ms must not be negative")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigInvalid("max_model_len must be at least 2")


# ------------------------------------------------------------------------------ errors


class EngineError(Exception):
    """A request the engine refuses or cannot complete, with its HTTP status and error body.

    Attributes:
        status: HTTP status (400, 404, 429, 500, 503).
        err_type: the error body's ``type`` (OpenAI's ``invalid_request_error``...; vLLM's
            ``BadRequestError`` / ``NotFoundError`` on the adapter-admin routes).
        code: the error body's ``code`` (``model_not_found``...; the status on admin routes).
        param: the request parameter at fault, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        err_type: str = "invalid_request_error",
        code: str | int | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.code = code
        self.param = param


def _model_not_found(name: str) -> EngineError:
    return EngineError(
        f"The model `{name}` does not exist.",
        status=404,
        code="model_not_found",
        param="model",
    )


def _admin_error(message: str, status: int = 400, err_type: str = "BadRequestError") -> EngineError:
    return EngineError(message, status=status, err_type=err_type, code=status)


# ------------------------------------------------------------------------------ events


@dataclass(frozen=True)
class Delta:
    """New text of one request (``token_ids``: the tokens generated since the last event)."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Finished:
    """A request's end.

    Attributes:
        text: the whole generated text (cut before a stop sequence; special tokens skipped).
        token_ids: every generated token, including a final EOS token.
        finish_reason: ``stop`` (EOS token or stop sequence) or ``length`` (max_tokens).
        prompt_tokens: tokens in the prompt.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        """Generated tokens (the EOS token counts)."""
        return len(self.token_ids)


@dataclass(frozen=True)
class Failed:
    """A request that could not be completed (e.g. its adapter was removed while queued)."""

    error: EngineError


Event = Delta | Finished | Failed


@dataclass(eq=False)
class Ticket:
    """A submitted request; :meth:`cancel` drops it (e.g. the client went away)."""

    model: str
    adapter: str
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None] = field(repr=False)
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop generating for this request; no further events are sent."""
        self.cancelled = True


class AsyncRequest:
    """A request's events on the caller's event loop.

    Iterate it for :class:`Delta` events up to and including one :class:`Finished` or
    :class:`Failed`, or await :meth:`result`. Leaving the iteration early cancels the request.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self.ticket: Ticket | None = None

    def push(self, event: Event) -> None:
        """Deliver ``event`` (called on the engine's thread)."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel()

    def cancel(self) -> None:
        """Cancel the request."""
        if self.ticket is not None:
            self.ticket.cancel()

    async def __aiter__(self) -> AsyncIterator[Event]:
        done = False
        try:
            while True:
                event = await self._events.get()
                done = not isinstance(event, Delta)
                yield event
                if done:
                    return
        finally:
            if not done:
                self.cancel()

    async def result(self) -> Finished:
        """Wait for the end.

        Raises:
            EngineError: the request failed.
        """
        async for event in self:
            if isinstance(event, Finished):
                return event
            if isinstance(event, Failed):
                raise event.error
        raise EngineError("the request ended without a result", status=500, err_type="server_error")


@dataclass(frozen=True)
class LoadedAdapter:
    """An attached adapter.

    Attributes:
        name: the model name requests use.
        path: the folder it was loaded from.
        rank: its highest LoRA rank.
        stackable: whether the ``stacked`` kernel can run it.
        created: when it was attached (Unix seconds).
        digest: its manifest's ``sha256:`` digest, when it had a manifest.
        size_bytes: size of its weights file.
        load_seconds: time from the load request to servable (checks + attach).
    """

    name: str
    path: Path
    rank: int
    stackable: bool
    created: int
    digest: str | None
    size_bytes: int
    load_seconds: float


@dataclass
class EngineStats:
    """Counters since start (read them from any thread; they are updated by the worker).

    Attributes:
        batches: batches run.
        requests: requests generated (cancelled ones not counted).
        generated_tokens: tokens generated.
        recent_batches: the adapters of each of the last 1024 batches, one name per row
            (:data:`BASE` for the base model), in batch order.
    """

    batches: int = 0
    requests: int = 0
    generated_tokens: int = 0
    recent_batches: collections.deque[tuple[str, ...]] = field(
        default_factory=lambda: collections.deque(maxlen=_RECENT_BATCHES)
    )


@dataclass(frozen=True)
class _Prepared:
    name: str
    path: Path
    rank: int
    digest: str | None
    size_bytes: int
    started: float


@dataclass(eq=False)
class _Call:
    fn: Callable[[], Any]
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)


@dataclass(eq=False)
class _Row:
    ticket: Ticket
    stream: TextStream
    generator: torch.Generator | None
    done: bool = False


# ------------------------------------------------------------------------------ engine


class ServingEngine:
    """One base model with LoRA adapters attached by name; see the module docstring.

    Build it with :meth:`load`; it starts its worker thread. Thread-safe: every public
    method may be called from any thread; the ``async`` ones need a running event loop.
    """

    def __init__(self, settings: EngineSettings, model: Any, tokenizer: Any) -> None:
        self.settings = settings
        self.served_model_name = settings.served_model_name or str(settings.model_dir)
        self.tokenizer = tokenizer
        # Hugging Face fast tokenizers may change their Rust state while encoding; requests
        # are encoded on the event loop and decoded on the worker, so calls are serialised.
        self._tokenizer_lock = threading.Lock()
        self._base = model
        self._peft: Any = None  # the PeftModel, from the first attached adapter on
        self.device = next(model.parameters()).device
        config = model.config
        self.max_model_len = settings.max_model_len or int(
            getattr(config, "max_position_embeddings", 0) or tokenizer.model_max_length
        )
        self.vocab_size = int(config.vocab_size)
        self._pad_id = next(
            token
            for token in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0)
            if token is not None
        )
        self._eos_ids = _eos_ids(model, tokenizer)
        named = list(model.named_modules())
        self.module_names = frozenset(adaptable_module_names(named))
        self.module_shapes: Mapping[str, tuple[int, int]] = {
            name: shape
            for name, module in named
            if name in self.module_names and (shape := _linear_shape(module)) is not None
        }
        directory = settings.model_dir
        self.base_references = (
            *settings.base_model_uris,
            str(directory.resolve()),
            str(directory),
        )
        self.created = int(time.time())
        self.stats = EngineStats()
        self._adapters: dict[str, LoadedAdapter] = {}  # replaced, never mutated (readers)
        self._loading: set[str] = set()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="kubetune-engine", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, settings: EngineSettings) -> ServingEngine:
        """Load the base model and tokenizer from ``settings.model_dir`` and start.

        Raises:
            ConfigInvalid: the folder is not a model folder (no config.json) or the model
                does not load.
        """
        import peft  # noqa: F401, PLC0415 - imported now, not by the first adapter load
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

        directory = settings.model_dir
        if not (directory / "config.json").is_file():
            raise ConfigInvalid(f"{directory} is not a model folder (no config.json)")
        device = _device(settings.device)
        dtype = _dtype(settings.dtype, device)
        started = time.monotonic()
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                directory, trust_remote_code=settings.trust_remote_code
            )
            model: Any = AutoModelForCausalLM.from_pretrained(
                directory,
                dtype=dtype,
                attn_implementation="sdpa",
                trust_remote_code=settings.trust_remote_code,
            )
        except (OSError, ValueError) as exc:
            raise ConfigInvalid(f"cannot load the model in {directory}: {exc}") from exc
        model.to(device)
        model.eval()
        model.requires_grad_(False)
        engine = cls(settings, model, tokenizer)
        log.info(
            "Loaded base model name=%s dir=%s dtype=%s device=%s seconds=%.2f",
            engine.served_model_name,
            directory,
            dtype,
            device,
            time.monotonic() - started,
        )
        return engine

    # -------------------------------------------------------------------------- models

    @property
    def adapters(self) -> Mapping[str, LoadedAdapter]:
        """The attached adapters by name (a snapshot)."""
        return self._adapters

    @property
    def in_flight(self) -> int:
        """Requests accepted and not finished (queued or generating)."""
        return self._in_flight

    def has_model(self, name: str) -> bool:
        """Whether requests may name ``name`` (the base model or an attached adapter)."""
        return name == self.served_model_name or name in self._adapters

    def require_model(self, name: str) -> None:
        """Raise 404 ``model_not_found`` unless requests may name ``name``."""
        if not self.has_model(name):
            raise _model_not_found(name)

    def alive(self) -> bool:
        """Whether the worker thread runs."""
        return self._thread.is_alive() and not self._closed

    # -------------------------------------------------------------------------- prompts

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a completion prompt (with the tokenizer's special tokens, e.g. BOS)."""
        with self._tokenizer_lock:
            return [int(t) for t in self.tokenizer(text)["input_ids"]]

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of a conversation through the tokenizer's chat template.

        The template is rendered with the generation prompt (the assistant's header) and
        tokenized without adding special tokens (the template writes BOS itself).

        Raises:
            EngineError: 400 when the model has no chat template or rendering fails.
        """
        if not getattr(self.tokenizer, "chat_template", None):
            raise EngineError(
                "this model has no chat template; use /v1/completions", param="messages"
            )
        with self._tokenizer_lock:
            try:
                text = self.tokenizer.apply_chat_template(
                    [dict(m) for m in messages], add_generation_prompt=True, tokenize=False
                )
            except Exception as exc:  # jinja raises many kinds; the message says why
                raise EngineError(f"the chat template failed: {exc}", param="messages") from exc
            return [int(t) for t in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def decode(self, token_ids: list[int]) -> str:
        """Text of ``token_ids`` with special tokens skipped."""
        with self._tokenizer_lock:
            return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    # -------------------------------------------------------------------------- requests

    def submit(
        self,
        model: str,
        prompt_ids: Sequence[int],
        params: SamplingParams | None,
        on_event: Callable[[Event], None],
        *,
        max_tokens: int | None = None,
    ) -> Ticket:
        """Queue a generation request.

        Args:
            model: the served model name or an attached adapter's name.
            prompt_ids: the prompt's token ids.
            params: sampling settings; ``params.max_tokens`` is replaced by ``max_tokens``
                when that is given, and ``None`` params mean greedy.
            on_event: called on the engine's thread with each :data:`Event`; it must not
                block (hand the event to a queue).
            max_tokens: token limit; ``None`` keeps ``params.max_tokens``, and ``0`` means
                "what the context window leaves".

        Returns:
            The ticket (to cancel it).

        Raises:
            EngineError: 404 ``model_not_found``; 400 for an empty prompt, unknown token ids or
                a prompt plus limit beyond ``max_model_len`` (``context_length_exceeded``);
                429 when ``max_queued_requests`` are in flight; 503 when closed.
        """
        self.require_model(model)
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise EngineError("the prompt is empty", param="prompt")
        if any(t < 0 or t >= self.vocab_size for t in ids):
            raise EngineError(
                f"the prompt has token ids outside the vocabulary (0..{self.vocab_size - 1})",
                param="prompt",
            )
        params = params or SamplingParams(max_tokens=0, temperature=0.0)
        limit = params.max_tokens if max_tokens is None else max_tokens
        if limit <= 0:
            limit = self.max_model_len - len(ids)
            if limit <= 0:
                raise self._too_long(len(ids), 1)
        if len(ids) + limit > self.max_model_len:
            raise self._too_long(len(ids), limit)
        params = replace(params, max_tokens=limit)
        with self._lock:
            if self._closed:
                raise EngineError(
                    "the engine is shutting down", status=503, err_type="server_error"
                )
            if self._in_flight >= self.settings.max_queued_requests:
                raise EngineError(
                    f"the server has {self._in_flight} requests in flight (its limit); retry later",
                    status=429,
                    err_type="rate_limit_error",
                    code="rate_limit_exceeded",
                )
            self._in_flight += 1
        adapter = BASE if model == self.served_model_name else model
        ticket = Ticket(
            model=model, adapter=adapter, prompt_ids=ids, params=params, on_event=on_event
        )
        self._inbox.put(ticket)
        return ticket

    def stream(
        self,
        model: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        max_tokens: int | None = None,
    ) -> AsyncRequest:
        """:meth:`submit` with the events on the running event loop.

        Raises:
            EngineError: as :meth:`submit` (synchronously, before any event).
        """
        request = AsyncRequest(asyncio.get_running_loop())
        request.ticket = self.submit(model, prompt_ids, params, request.push, max_tokens=max_tokens)
        return request

    def generate(
        self,
        model: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        timeout: float | None = None,
    ) -> Finished:
        """Generate and wait (blocking; for scripts and tests).

        Raises:
            EngineError: as :meth:`submit`, or the request failed.
            TimeoutError: nothing finished within ``timeout`` seconds.
        """
        events: queue.Queue[Event] = queue.Queue()
        ticket = self.submit(model, prompt_ids, params, events.put)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                event = events.get(timeout=remaining)
            except queue.Empty:
                ticket.cancel()
                raise TimeoutError(f"no result within {timeout} s") from None
            if isinstance(event, Finished):
                return event
            if isinstance(event, Failed):
                raise event.error

    def _too_long(self, prompt: int, completion: int) -> EngineError:
        return EngineError(
            f"This model's maximum context length is {self.max_model_len} tokens. However, you "
            f"requested {prompt + completion} tokens ({prompt} in the prompt, {completion} for "
            "the completion). Please reduce the length of the prompt or max_tokens.",
            code="context_length_exceeded",
            param="max_tokens",
        )

    # -------------------------------------------------------------------------- adapters

    async def load_adapter(
        self, name: str, path: str, *, load_inplace: bool = False
    ) -> LoadedAdapter:
        """Check and attach the adapter in ``path`` under ``name`` (vLLM's load semantics).

        Args:
            name: the model name requests will use.
            path: local folder (or ``file://`` URI) holding a PEFT LoRA adapter.
            load_inplace: replace an adapter already attached under ``name``.

        Returns:
            The attached adapter.

        Raises:
            EngineError: 400 (``InvalidUserInput``) for a bad or taken name or a full engine
                (``max_loras``); 404 (``NotFoundError``) when ``path`` is not a folder; 400
                (``BadRequestError``) when a file does not match the manifest or the adapter
                is incompatible (every reason listed) or PEFT cannot load it.
        """
        started = time.monotonic()
        self._reserve(name, load_inplace=load_inplace)
        try:
            prepared = await asyncio.to_thread(self._prepare, name, path, started)
            call = self._call(lambda: self._attach(prepared, replace=load_inplace))
            adapter: LoadedAdapter = await asyncio.wrap_future(call)
            return adapter
        finally:
            self._unreserve(name)

    def load_adapter_blocking(
        self, name: str, path: str, *, load_inplace: bool = False
    ) -> LoadedAdapter:
        """:meth:`load_adapter` for callers without an event loop (e.g. preloading)."""
        started = time.monotonic()
        self._reserve(name, load_inplace=load_inplace)
        try:
            prepared = self._prepare(name, path, started)
            adapter: LoadedAdapter = self._call(
                lambda: self._attach(prepared, replace=load_inplace)
            ).result()
            return adapter
        finally:
            self._unreserve(name)

    async def unload_adapter(self, name: str) -> None:
        """Detach an adapter; queued requests for it fail with 404.

        Raises:
            EngineError: 404 (``NotFoundError``) when no adapter has that name.
        """
        if name not in self._adapters:
            raise _admin_error(
                f"The lora adapter '{name}' cannot be found.", 404, err_type="NotFoundError"
            )
        await asyncio.wrap_future(self._call(lambda: self._detach(name)))

    def unload_adapter_blocking(self, name: str) -> None:
        """:meth:`unload_adapter` for callers without an event loop."""
        if name not in self._adapters:
            raise _admin_error(
                f"The lora adapter '{name}' cannot be found.", 404, err_type="NotFoundError"
            )
        self._call(lambda: self._detach(name)).result()

    def _reserve(self, name: str, *, load_inplace: bool) -> None:
        if (
            not name
            or len(name) > _MAX_NAME_LENGTH
            or not name.isprintable()
            or name != name.strip()
        ):
            raise _admin_error(
                f"lora_name must be 1 to {_MAX_NAME_LENGTH} printable characters without "
                "surrounding spaces",
                err_type="InvalidUserInput",
            )
        if name in (self.served_model_name, BASE):
            raise _admin_error(
                f"'{name}' is the base model's name; choose another lora_name",
                err_type="InvalidUserInput",
            )
        with self._lock:
            if name in self._loading:
                raise _admin_error(
                    f"The lora adapter '{name}' is being loaded.", err_type="InvalidUserInput"
                )
            exists = name in self._adapters
            if exists and not load_inplace:
                raise _admin_error(
                    f"The lora adapter '{name}' has already been loaded. If you want to load "
                    "the adapter in place, set 'load_inplace' to True.",
                    err_type="InvalidUserInput",
                )
            used = len(self._adapters) + len(self._loading)
            if not exists and used >= self.settings.max_loras:
                raise _admin_error(
                    f"capacity: {used} adapters are loaded or loading and max_loras is "
                    f"{self.settings.max_loras}; unload one first",
                    err_type="InvalidUserInput",
                )
            self._loading.add(name)

    def _unreserve(self, name: str) -> None:
        with self._lock:
            self._loading.discard(name)

    def _prepare(self, name: str, location: str, started: float) -> _Prepared:
        """Everything but attaching: find the folder, verify it, check compatibility."""
        path = _local_path(location)
        if path is None:
            raise _admin_error(
                f"Loading lora {name} failed: lora_path {location!r} is not a local folder "
                "(the adapter agent downloads adapters before loading them)"
            )
        if not path.is_dir():
            raise _admin_error(
                f"Loading lora {name} failed: No adapter found for {path}",
                404,
                err_type="NotFoundError",
            )
        metadata: Mapping[str, Any] = {}
        digest = None
        if (path / MANIFEST_NAME).is_file():
            try:
                verified = verify_local(path)
            except (ArtifactInvalid, StorageFailure) as exc:
                raise _admin_error(f"Loading lora {name} failed: {exc}") from exc
            metadata, digest = verified.metadata, verified.digest
        files = read_adapter_dir(path)
        problems = list(files.problems)
        if not problems:
            problems += check_compatibility(
                files.config,
                base_model=self.base_references,
                max_rank=self.settings.max_lora_rank,
                module_names=self.module_names,
                # PEFT's mixed batches refuse DoRA adapters ("Cannot pass `adapter_names` when
                # DoRA is enabled") and fail on a batch that mixes an adapter with
                # modules_to_save and one without (ModulesToSaveWrapper looks up every row's
                # adapter): neither can share a batch, so neither is served.
                allow_dora=False,
                allow_modules_to_save=False,
                metadata=metadata,
            )
            problems += check_lora_weights(files.shapes, module_shapes=self.module_shapes)
        if problems:
            raise _admin_error(
                f"Loading lora {name} failed: the adapter in {path} cannot be served: "
                + "; ".join(problems)
            )
        return _Prepared(
            name=name,
            path=path,
            rank=highest_rank(files.config) or 0,
            digest=digest,
            size_bytes=files.size_bytes,
            started=started,
        )

    def _call(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        call = _Call(fn)
        if self._closed:
            call.future.set_exception(
                EngineError("the engine is shutting down", status=503, err_type="server_error")
            )
        else:
            self._inbox.put(call)
        return call.future

    def _attach(self, prepared: _Prepared, *, replace: bool) -> LoadedAdapter:
        """Attach (worker thread only)."""
        name = prepared.name
        previous = self._adapters.get(name) if replace else None
        if previous is not None:
            self._detach(name)
        try:
            self._peft_load(name, prepared.path)
        except Exception as exc:  # PEFT/torch raise many kinds: report and restore
            if previous is not None:
                with contextlib.suppress(Exception):
                    self._peft_load(name, previous.path)
                    self._publish(previous)
            raise _admin_error(
                f"Loading lora {name} failed: PEFT could not load {prepared.path}: {exc}"
            ) from exc
        stackable = stackable_modules(self._peft, name)
        adapter = LoadedAdapter(
            name=name,
            path=prepared.path,
            rank=prepared.rank,
            stackable=stackable,
            created=int(time.time()),
            digest=prepared.digest,
            size_bytes=prepared.size_bytes,
            load_seconds=time.monotonic() - prepared.started,
        )
        self._publish(adapter)
        log.info(
            "Loaded LoRA adapter name=%s path=%s rank=%d digest=%s stackable=%s seconds=%.3f",
            name,
            prepared.path,
            prepared.rank,
            prepared.digest,
            stackable,
            adapter.load_seconds,
        )
        return adapter

    def _peft_load(self, name: str, path: Path) -> None:
        from peft import LoraConfig, PeftModel  # noqa: PLC0415

        if self._peft is None:
            # The first adapter turns the model into a PeftModel; it is built from the config
            # alone and the weights are loaded after, as for every later adapter, so a failed
            # load leaves a PeftModel without that adapter rather than a half-wrapped base.
            config = LoraConfig.from_pretrained(str(path))
            config.inference_mode = True
            self._peft = PeftModel(self._base, config, adapter_name=name)
            self._peft.eval()
        try:
            result = self._peft.load_adapter(str(path), adapter_name=name, is_trainable=False)
            # PEFT filters missing keys by substring, which a short name (say "d") matches in
            # every key: keep only this adapter's own keys.
            missing = [
                key
                for key in getattr(result, "missing_keys", None) or []
                if f".{name}." in key or key.endswith(f".{name}")
            ]
            if missing:
                raise ValueError(
                    f"{len(missing)} LoRA weights are missing from the file, e.g. {missing[0]}"
                )
        except BaseException:
            if name in self._peft.peft_config:
                self._peft.delete_adapter(name)
            raise
        # load_adapter(is_trainable=False) leaves the model in eval mode (no dropout).

    def _detach(self, name: str) -> None:
        """Detach (worker thread only)."""
        if name not in self._adapters:
            raise _admin_error(
                f"The lora adapter '{name}' cannot be found.", 404, err_type="NotFoundError"
            )
        if self._peft is not None and name in self._peft.peft_config:
            self._peft.delete_adapter(name)
        with self._lock:
            self._adapters = {k: v for k, v in self._adapters.items() if k != name}
        log.info("Removed LoRA adapter name=%s", name)

    def _publish(self, adapter: LoadedAdapter) -> None:
        with self._lock:
            self._adapters = {**self._adapters, adapter.name: adapter}

    # -------------------------------------------------------------------------- worker

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker after the running batch; queued requests fail with 503."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._inbox.put(_STOP)
        self._thread.join(timeout)

    def _work(self) -> None:
        delay = self.settings.max_batch_delay_ms / 1000
        while True:
            item = self._inbox.get()
            if item is _STOP:
                break
            if isinstance(item, _Call):
                self._run_call(item)
                continue
            batch: list[Ticket] = [item]
            deferred: list[Any] = []
            deadline = time.monotonic() + delay
            while len(batch) < self.settings.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    nxt = (
                        self._inbox.get(timeout=remaining)
                        if remaining > 0
                        else self._inbox.get_nowait()
                    )
                except queue.Empty:
                    break
                if isinstance(nxt, Ticket):
                    batch.append(nxt)
                else:
                    deferred.append(nxt)  # admin calls and _STOP run after this batch
                    if nxt is _STOP:
                        break
            self._run_batch(batch)
            for call in deferred:
                if call is _STOP:
                    self._drain()
                    return
                self._run_call(call)
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            error = EngineError("the engine is shutting down", status=503, err_type="server_error")
            if isinstance(item, Ticket):
                self._finish(item, Failed(error))
            elif isinstance(item, _Call):
                item.future.set_exception(error)

    def _run_call(self, call: _Call) -> None:
        if not call.future.set_running_or_notify_cancel():
            return
        try:
            call.future.set_result(call.fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            call.future.set_exception(exc)

    def _finish(self, ticket: Ticket, event: Event | None) -> None:
        with self._lock:
            self._in_flight -= 1
        if event is not None:
            self._emit(ticket, event)

    @staticmethod
    def _emit(ticket: Ticket, event: Event) -> None:
        """Hand ``event`` to the caller; a callback that fails cancels its request only."""
        if ticket.cancelled:
            return
        try:
            ticket.on_event(event)
        except Exception:
            log.exception("An event callback failed; cancelling its request")
            ticket.cancel()

    def _run_batch(self, batch: list[Ticket]) -> None:
        adapters = self._adapters
        rows: list[_Row] = []
        for ticket in batch:
            if ticket.cancelled:
                self._finish(ticket, None)
            elif ticket.adapter != BASE and ticket.adapter not in adapters:
                self._finish(ticket, Failed(_model_not_found(ticket.model)))
            else:
                rows.append(self._row(ticket))
        if not rows:
            return
        self.stats.batches += 1
        self.stats.requests += len(rows)
        self.stats.recent_batches.append(tuple(row.ticket.adapter for row in rows))
        try:
            self._generate(rows, adapters)
        except Exception as exc:  # one failed batch must not stop the engine
            log.exception("Generation failed for a batch of %d requests", len(rows))
            error = EngineError(f"generation failed: {exc}", status=500, err_type="server_error")
            for row in rows:
                if not row.done:
                    row.done = True
                    self._finish(row.ticket, Failed(error))

    def _row(self, ticket: Ticket) -> _Row:
        generator = None
        if ticket.params.temperature > 0:
            seed = ticket.params.seed if ticket.params.seed is not None else secrets.randbits(63)
            generator = torch.Generator(device=self.device).manual_seed(seed)
        return _Row(ticket, TextStream(self.decode, ticket.params.stop), generator)

    @contextlib.contextmanager
    def _lora_for(
        self, names: list[str], adapters: Mapping[str, LoadedAdapter]
    ) -> Iterator[tuple[Any, StackedLoRA | None, bool]]:
        """How to run a batch whose rows use ``names``.

        Yields:
            The module to call, the stacked-LoRA hooks (or ``None``), and whether PEFT's
            ``adapter_names`` must be passed.
        """
        if self._peft is None or not adapters:
            yield (self._base if self._peft is None else self._peft.get_base_model()), None, False
            return
        used = {name for name in names if name != BASE}
        tuner = self._peft.base_model
        if not used or (
            self.settings.lora_kernel == "stacked" and all(adapters[n].stackable for n in used)
        ):
            tuner.disable_adapter_layers()
            stacked = StackedLoRA(self._peft, names) if used else None
            try:
                yield self._peft.get_base_model(), stacked, False
            finally:
                if stacked is not None:
                    stacked.remove()
                tuner.enable_adapter_layers()
            return
        yield self._peft, None, True

    def _generate(self, rows: list[_Row], adapters: Mapping[str, LoadedAdapter]) -> None:
        """Generate for every row until each finished (worker thread only)."""
        from transformers import DynamicCache  # noqa: PLC0415

        names = [row.ticket.adapter for row in rows]
        ids, mask, positions = left_pad(
            [row.ticket.prompt_ids for row in rows], self._pad_id, self.device
        )
        cache = DynamicCache(config=self._base.config)
        live = list(range(len(rows)))
        with (
            torch.inference_mode(),
            self._lora_for(names, adapters) as (model, stacked, peft_names),
        ):
            extra: dict[str, Any] = {"adapter_names": list(names)} if peft_names else {}
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
                **extra,
            ).logits[:, -1, :]
            while True:
                batch_rows = [rows[i] for i in live]
                tokens = next_tokens(
                    logits,
                    [row.ticket.params for row in batch_rows],
                    [row.generator for row in batch_rows],
                )
                keep = [
                    j
                    for j, (row, token) in enumerate(zip(batch_rows, tokens, strict=True))
                    if self._advance(row, token)
                ]
                if not keep:
                    return
                if len(keep) < len(live):
                    index = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(index)
                    mask, positions = mask[index], positions[index]
                    if stacked is not None:
                        stacked.select(index)
                    if peft_names:
                        extra["adapter_names"] = [extra["adapter_names"][j] for j in keep]
                    live = [live[j] for j in keep]
                next_ids = torch.tensor([[tokens[j]] for j in keep], device=self.device)
                mask = torch.cat([mask, mask.new_ones((len(keep), 1))], dim=1)
                positions = positions[:, -1:] + 1
                logits = model(
                    input_ids=next_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                    **extra,
                ).logits[:, -1, :]

    def _advance(self, row: _Row, token: int) -> bool:
        """Add ``token`` to the row, send its events; ``True`` while the row goes on."""
        ticket = row.ticket
        if ticket.cancelled:
            row.done = True
            self._finish(ticket, None)
            return False
        self.stats.generated_tokens += 1
        text = row.stream.push(token)
        reason: Literal["stop", "length"] | None = None
        if row.stream.stopped or (token in self._eos_ids and not ticket.params.ignore_eos):
            reason = "stop"
        elif len(row.stream.token_ids) >= ticket.params.max_tokens:
            reason = "length"
        if reason is not None:
            text += row.stream.finish()
        if text:
            self._emit(ticket, Delta(text, (token,)))
        if reason is None:
            return True
        row.done = True
        self._finish(
            ticket,
            Finished(
                text=row.stream.text,
                token_ids=tuple(row.stream.token_ids),
                finish_reason=reason,
                prompt_tokens=len(ticket.prompt_ids),
            ),
        )
        return False


# ------------------------------------------------------------------------------ helpers


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Tokens that end generation: the generation config's EOS ids and the tokenizer's."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list | tuple):
        ids.update(int(t) for t in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def _linear_shape(module: Any) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a linear layer, else ``None``.

    Linear layers: ``nn.Linear``, quantized linears and GPT-2's ``Conv1D`` (``nx`` -> ``nf``);
    embeddings and convolutions give ``None``.
    """
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nx"):
        return int(module.nx), int(module.nf)
    return None


def _device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def _dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return getattr(torch, setting)  # type: ignore[no-any-return]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _local_path(location: str) -> Path | None:
    """``location`` as a local path (plain or ``file://``), ``None`` for other schemes."""
    if "://" not in location:
        return Path(location)
    parsed = urlparse(location)
    if parsed.scheme != "file":
        return None
    return Path(unquote(parsed.path))


def main(argv: Sequence[str] | None = None) -> int:
    """``kubetune-runtime serve`` (see :func:`kubetune_runtime.serving.server.main`)."""
    from kubetune_runtime.serving.server import main as serve_main  # noqa: PLC0415

    return serve_main(argv)
