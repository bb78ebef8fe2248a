"""OpenAI-compatible request models, response bodies and error bodies of the built-in engine.

Requests are validated by pydantic (FastAPI answers a violation with 400
``invalid_request_error``, naming the parameter). Fields the engine does not implement are
declared and refused when set to anything but their neutral value (``n`` other than 1,
``logprobs``, ``echo``, penalties, ``logit_bias``, ``tools``...), so a client never gets a
silently different behaviour; fields OpenAI has that are not declared here are ignored, as
vLLM ignores them.

Error bodies have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``; the
adapter-admin routes use vLLM's variant (``type`` such as ``NotFoundError`` and the HTTP
status as ``code``), because they implement vLLM's runtime-LoRA contract.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "LoadLoRAAdapterRequest",
    "StreamOptions",
    "UnloadLoRAAdapterRequest",
    "chat_chunk",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "error_body",
    "model_card",
    "new_id",
    "usage",
]

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
_INT64_MAX = 2**63 - 1


class _Request(BaseModel):
    # Unknown fields are ignored (as vLLM does); known-but-unsupported ones are refused below.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    """``stream_options``: ``include_usage`` adds a last chunk with ``usage`` and no choices."""

    include_usage: bool = False


def _reject_unless(value: object, neutral: Sequence[object], message: str) -> None:
    if value is not None and value not in neutral:
        raise ValueError(message)


class _SamplingRequest(_Request):
    model: str = Field(min_length=1, description="The base model's served name or an adapter.")
    max_tokens: int | None = Field(
        default=None, ge=1, description="Most tokens to generate (prompt not counted)."
    )
    temperature: float | None = Field(
        default=None, ge=0, le=2, description="Sampling temperature; 0 is greedy. Default 1."
    )
    top_p: float | None = Field(default=None, gt=0, le=1, description="Nucleus mass. Default 1.")
    n: int | None = Field(default=None, description="Choices per prompt; only 1 is supported.")
    stream: bool | None = Field(default=False, description="Server-sent events, token by token.")
    stream_options: StreamOptions | None = None
    stop: str | list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, description="Up to 4 sequences that end the text (not included in it)."
    )
    seed: int | None = Field(
        default=None, ge=-_INT64_MAX - 1, le=_INT64_MAX, description="Sampling seed."
    )
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = Field(
        default=False, description="Keep generating after EOS (vLLM's extension; benchmarks)."
    )

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        _reject_unless(value, (1,), "only n=1 is supported")
        return value

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if value == "":
            raise ValueError("a stop sequence must not be empty")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        _reject_unless(value, (0, 0.0), "penalties are not supported (use 0)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    def stop_sequences(self) -> tuple[str, ...]:
        """``stop`` as a tuple (empty when unset)."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, token ids, or a list of either (one choice per prompt)."
    )
    max_tokens: int | None = Field(
        default=16, ge=1, description="Most tokens to generate per prompt. Default 16."
    )
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(
        cls, value: str | list[str] | list[int] | list[list[int]]
    ) -> str | list[str] | list[int] | list[list[int]]:
        if isinstance(value, list) and (not value or any(v in ("", []) for v in value)):
            raise ValueError("prompt must not be empty")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        _reject_unless(value, (), "logprobs are not supported")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool | None) -> bool | None:
        _reject_unless(value, (False,), "echo is not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        _reject_unless(value, (1,), "only best_of=1 is supported")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        _reject_unless(value, (), "suffix is not supported")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each text or token ids."""
        value = self.prompt
        if isinstance(value, str):
            return [value]
        if all(isinstance(v, int) for v in value):
            return [[int(v) for v in value if isinstance(v, int)]]
        return [v for v in value if isinstance(v, str | list)]


class TextPart(_Request):
    """A text part of a message's content."""

    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    """One message; content is text or a list of text parts."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as one string (parts joined without separator)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``; the prompt is the tokenizer's chat template applied."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Most tokens to generate. Default: what the context window leaves.",
    )
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description="OpenAI's newer name of max_tokens (wins over it)."
    )
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        _reject_unless(value, (False,), "logprobs are not supported")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, value: int | None) -> int | None:
        _reject_unless(value, (0,), "top_logprobs is not supported")
        return value

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value:
            raise ValueError("tools are not supported")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        _reject_unless(value, ("none",), "tool_choice is not supported")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type") != "text":
            raise ValueError("only response_format type 'text' is supported")
        return value

    def token_limit(self) -> int | None:
        """``max_completion_tokens`` or ``max_tokens`` (``None``: the context decides)."""
        return self.max_completion_tokens or self.max_tokens


class LoadLoRAAdapterRequest(_Request):
    """``POST /v1/load_lora_adapter`` (vLLM's runtime-LoRA contract)."""

    lora_name: str = Field(description="The model name requests will use.")
    lora_path: str = Field(description="Local folder with the PEFT adapter (or file:// URI).")
    load_inplace: bool = Field(
        default=False, description="Replace an adapter already loaded under this name."
    )


class UnloadLoRAAdapterRequest(_Request):
    """``POST /v1/unload_lora_adapter`` (vLLM's runtime-LoRA contract)."""

    lora_name: str = Field(description="The adapter to remove.")
    lora_int_id: int | None = Field(default=None, description="Accepted for vLLM compatibility.")


# ----------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    """A response id such as ``cmpl-<24 hex>``."""
    return f"{prefix}-{secrets.token_hex(12)}"


def error_body(
    message: str, err_type: str, *, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The ``usage`` object (token counts; the EOS token counts as generated)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def model_card(
    name: str, *, root: str, parent: str | None, created: int, max_model_len: int | None
) -> dict[str, Any]:
    """One entry of ``GET /v1/models``, in vLLM's shape.

    ``root`` is where the model was loaded from; ``parent`` is the base model an adapter is
    attached to, ``None`` for the base model itself.
    """
    card: dict[str, Any] = {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "kubetune",
        "root": root,
        "parent": parent,
    }
    if max_model_len is not None:
        card["max_model_len"] = max_model_len
    return card


def completion_response(
    response_id: str,
    model: str,
    *,
    choices: Sequence[tuple[str, str]],
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """A ``text_completion`` body; ``choices`` are ``(text, finish_reason)`` per prompt."""
    return {
        "id": response_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
            for i, (text, reason) in enumerate(choices)
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(
    response_id: str,
    model: str,
    created: int,
    *,
    index: int = 0,
    text: str = "",
    finish_reason: str | None = None,
    usage_counts: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """One streamed ``text_completion`` chunk; with ``usage_counts`` the usage-only chunk."""
    chunk: dict[str, Any] = {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [],
    }
    if usage_counts is not None:
        chunk["usage"] = usage(*usage_counts)
    else:
        chunk["choices"] = [
            {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        ]
    return chunk


def chat_response(
    response_id: str,
    model: str,
    *,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """A ``chat.completion`` body with one assistant message."""
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(
    response_id: str,
    model: str,
    created: int,
    *,
    delta: dict[str, str] | None = None,
    finish_reason: str | None = None,
    usage_counts: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """One streamed ``chat.completion.chunk``; with ``usage_counts`` the usage-only chunk."""
    chunk: dict[str, Any] = {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
    }
    if usage_counts is not None:
        chunk["usage"] = usage(*usage_counts)
    else:
        chunk["choices"] = [
            {
                "index": 0,
                "delta": delta if delta is not None else {},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ]
    return chunk
