"""Run evaluation suites on a loaded model: held-out loss, batched generation, judge, lm-eval.

Each function takes a model that is already loaded (a transformers causal LM, or a PEFT model
whose adapter may be disabled with ``model.disable_adapter()`` to evaluate the base) and its
tokenizer after :func:`kubetune_runtime.data.tokenize.prepare_tokenizer`. Nothing here reads
the RunConfig or storage: the evaluate recipe wires suites to these functions.

* :func:`held_out_loss` tokenizes exactly as training does (:func:`tokenize_dataset`: the chat
  template, assistant tokens only, the end-of-turn token included) and returns the
  token-weighted mean negative log-likelihood, the quantity training minimises.
* :func:`generate` renders prompts with the chat template and a generation prompt, left-pads a
  batch and decodes greedily (temperature 0) or by sampling, stopping at EOS or an end-of-turn
  token.
* :func:`call_judge` posts to an OpenAI-compatible ``/chat/completions`` endpoint with bounded
  retries; the API key goes into the Authorization header and nowhere else.
* :func:`run_lm_eval` runs lm-evaluation-harness (``lm_eval.simple_evaluate`` with an ``HFLM``
  wrapping the loaded model) when it is installed; otherwise, or when task data is not in the
  local cache and downloads are not allowed, it reports the suite as skipped with the reason.

Importing this module is cheap: torch and transformers are imported by the functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final

from kubetune_runtime.data.tokenize import (
    END_OF_TURN_TOKENS,
    IGNORE_INDEX,
    PaddedCollator,
    tokenize_dataset,
)
from kubetune_runtime.errors import ConfigInvalid, DataInvalid, RuntimeFailure

log = logging.getLogger(__name__)

JUDGE_MAX_TOKENS: Final = 2048  # MT-Bench's judge budget (FastChat llm_judge)
_RETRY_STATUS: Final = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_MAX_BACKOFF_SECONDS: Final = 30.0


class EvaluationFailed(RuntimeFailure):
    """An evaluation step could not run (e.g. the judge endpoint never answered)."""

    reason = "EvaluationFailed"


# --------------------------------------------------------------------------- held-out loss


def held_out_loss(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[Any],
    *,
    max_seq_length: int,
    batch_size: int,
    completion_only_loss: bool = True,
) -> tuple[float, list[float | None]]:
    """Mean negative log-likelihood per trained token on held-out samples.

    Samples are tokenized by :func:`tokenize_dataset` with the same settings as training
    (overlong samples truncated to ``max_seq_length``), so the loss is comparable to the
    training and eval loss of the run. Puts ``model`` in eval mode (no dropout).

    Args:
        model: a causal LM (or PEFT model) on its device.
        tokenizer: the tokenizer after ``prepare_tokenizer``.
        conversations: each a message list, ``{"messages": [...]}`` or ``{"text": str}``.
        max_seq_length: longest sample, in tokens.
        batch_size: samples per forward pass (sorted by length to limit padding).
        completion_only_loss: count assistant tokens only (chat samples), as in training.

    Returns:
        ``(loss, per_sample)``: ``loss`` is the sum of token NLLs (nats) over all trained
        tokens divided by their number (token-weighted, not a mean of per-sample means);
        ``per_sample[i]`` is sample ``i``'s mean NLL per trained token, or None when it has
        no trained token left (e.g. truncated away).

    Raises:
        DataInvalid: a malformed sample, or no sample with a trained token.
        ConfigInvalid: the chat template cannot produce a loss mask.
    """
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: N812, PLC0415

    examples = _tokenize_aligned(tokenizer, conversations, max_seq_length, completion_only_loss)
    present = [i for i, example in enumerate(examples) if example is not None]
    present.sort(key=lambda i: len(_required(examples[i])["input_ids"]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collator = PaddedCollator(pad_token_id=pad_id)
    device = _device(model)
    per_sample: list[float | None] = [None] * len(conversations)
    total_nll, total_tokens = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(present), batch_size):
            chunk = present[start : start + batch_size]
            batch = collator([_required(examples[i]) for i in chunk])
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                use_cache=False,
            ).logits
            labels = batch["labels"][:, 1:].to(logits.device)
            nll = F.cross_entropy(
                logits[:, :-1, :].float().transpose(1, 2),
                labels,
                ignore_index=IGNORE_INDEX,
                reduction="none",
            )
            mask = labels != IGNORE_INDEX
            sums = (nll * mask).sum(dim=1).tolist()
            counts = mask.sum(dim=1).tolist()
            for i, nll_sum, count in zip(chunk, sums, counts, strict=True):
                per_sample[i] = nll_sum / count
                total_nll += nll_sum
                total_tokens += int(count)
    return total_nll / total_tokens, per_sample


def _required(example: dict[str, list[int]] | None) -> dict[str, list[int]]:
    if example is None:  # pragma: no cover - callers filter these out
        raise ValueError("example was dropped")
    return example


def _tokenize_aligned(
    tokenizer: Any, samples: Sequence[Any], max_seq_length: int, completion_only_loss: bool
) -> list[dict[str, list[int]] | None]:
    """One tokenized example per sample (None where tokenize_dataset dropped it)."""
    examples, summary = tokenize_dataset(
        tokenizer,
        samples,
        max_seq_length=max_seq_length,
        overlength="truncate",
        completion_only_loss=completion_only_loss,
    )
    if summary.examples == len(samples):
        return list(examples)
    # Some samples had no trained token: find which, one at a time (rows are valid by now).
    aligned: list[dict[str, list[int]] | None] = []
    with _quiet("kubetune_runtime.data.tokenize"):
        for sample in samples:
            try:
                one, _ = tokenize_dataset(
                    tokenizer,
                    [sample],
                    max_seq_length=max_seq_length,
                    overlength="truncate",
                    completion_only_loss=completion_only_loss,
                )
            except DataInvalid:
                aligned.append(None)
            else:
                aligned.append(one[0])
    return aligned


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _device(model: Any) -> Any:
    import torch  # noqa: PLC0415

    device = getattr(model, "device", None)
    if device is None:
        device = next(model.parameters()).device
    return torch.device(device)


# --------------------------------------------------------------------------- generation


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Token ids that end an answer: EOS, the template's end-of-turn tokens, the model's EOS.

    Returns:
        Sorted, distinct ids of those of EOS, :data:`END_OF_TURN_TOKENS` and
        ``model.generation_config.eos_token_id`` that exist in the vocabulary.

    Raises:
        ConfigInvalid: none exists, so generation could never stop before the token limit.
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and tokenizer.convert_ids_to_tokens(token_id) == token:
            ids.add(token_id)
    config = getattr(model, "generation_config", None) if model is not None else None
    configured = getattr(config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list | tuple):
        ids.update(int(i) for i in configured)
    if not ids:
        raise ConfigInvalid("the tokenizer has no EOS or end-of-turn token to stop generation")
    return sorted(ids)


def encode_prompt(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Token ids of a prompt: the chat template with the generation prompt, one BOS at most.

    Like training, BOS is prepended only when the tokenizer adds it to plain text and the
    template did not write it.

    Raises:
        ConfigInvalid: the tokenizer has no chat template.
    """
    if not tokenizer.chat_template:
        raise ConfigInvalid(
            "generation needs a chat template: the tokenizer has none and data.chat_template "
            "is not set"
        )
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
    )
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        if probe and probe[0] == bos:
            ids.insert(0, bos)
    return ids


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[Mapping[str, Any]]],
    *,
    max_new_tokens: int,
    batch_size: int,
    temperature: float,
) -> list[str]:
    """Answer every prompt, in batches, with the chat template's generation prompt.

    Prompts are sorted by length and left-padded per batch (position ids follow the attention
    mask, so padding does not shift them); decoding is greedy when ``temperature`` is 0 and
    samples at that temperature otherwise (with the model's other sampling settings). Each
    answer ends at the first EOS or end-of-turn token (:func:`stop_token_ids`) or after
    ``max_new_tokens``. Puts ``model`` in eval mode.

    Args:
        model: a causal LM (or PEFT model) on its device.
        tokenizer: the tokenizer after ``prepare_tokenizer``.
        prompts: each a list of ``{"role", "content"}`` messages ending with a user turn.
        max_new_tokens: the most tokens generated per answer.
        batch_size: prompts generated together.
        temperature: 0 for greedy decoding, else the sampling temperature.

    Returns:
        The answers (special tokens removed, stripped), in the order of ``prompts``.

    Raises:
        ConfigInvalid: no chat template, or no token to stop on.
    """
    import torch  # noqa: PLC0415

    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    stops = stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    device = _device(model)
    answers: list[str] = [""] * len(encoded)
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": temperature > 0,
        "eos_token_id": stops,
        "pad_token_id": pad_id,
        "use_cache": True,
    }
    if temperature > 0:
        options["temperature"] = temperature
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            longest = max(len(encoded[i]) for i in chunk)
            input_ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), longest), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids = encoded[i]
                input_ids[row, longest - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, longest - len(ids) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **options
            )
            for row, i in enumerate(chunk):
                new = output[row, longest:].tolist()
                cut = next((k for k, t in enumerate(new) if t in stops), len(new))
                answers[i] = tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
    return answers


# --------------------------------------------------------------------------- judge


def call_judge(
    url: str,
    model: str,
    api_key: str | None,
    messages: Sequence[Mapping[str, Any]],
    timeout: float,
    *,
    retries: int = 4,
    max_tokens: int = JUDGE_MAX_TOKENS,
) -> str:
    """Ask an OpenAI-compatible judge: ``POST {url}/chat/completions``, temperature 0.

    Connection errors, timeouts and HTTP 408/409/425/429/5xx are retried up to ``retries``
    times with exponential backoff (1, 2, 4, ... seconds, at most 30; a ``Retry-After``
    header is honoured within that bound). Other HTTP errors fail at once. The API key is
    sent as ``Authorization: Bearer <key>`` and never logged or put into an error message.

    Args:
        url: the API's base URL, e.g. ``https://api.openai.com/v1`` or a vLLM service.
        model: the judge model's name.
        api_key: the bearer token, or None for an endpoint without authentication.
        messages: the chat (e.g. from :func:`kubetune_runtime.eval.metrics.judge_prompt`).
        timeout: seconds per request.
        retries: retries after the first attempt.
        max_tokens: the judge's answer budget.

    Returns:
        The content of the first choice's message.

    Raises:
        ConfigInvalid: ``url`` is not an http(s) URL.
        EvaluationFailed: the endpoint failed after the retries, answered a non-retryable
            error, or returned a response without ``choices[0].message.content``.
    """
    if not url.startswith(("http://", "https://")):
        raise ConfigInvalid(f"the judge URL {url!r} must start with http:// or https://")
    endpoint = url.rstrip("/") + "/chat/completions"
    body = json.dumps(
        {
            "model": model,
            "messages": [dict(m) for m in messages],
            "temperature": 0,
            "max_tokens": max_tokens,
        }
    ).encode("utf-8")
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    problem = ""
    for attempt in range(retries + 1):
        delay = min(2.0**attempt, _MAX_BACKOFF_SECONDS)
        # http(s) only: checked above, so urllib cannot be made to open file:// URLs.
        request = urllib.request.Request(endpoint, body, headers, method="POST")  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                payload = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            with contextlib.closing(exc):
                detail = exc.read(300).decode("utf-8", "replace").strip()
            problem = f"HTTP {exc.code} from {endpoint}" + (f": {detail}" if detail else "")
            if exc.code not in _RETRY_STATUS:
                raise EvaluationFailed(f"the judge refused the request: {problem}") from None
            delay = _retry_after(exc.headers.get("Retry-After"), delay)
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            problem = f"{endpoint} unreachable: {reason}"
        except ValueError as exc:
            raise EvaluationFailed(
                f"the judge at {endpoint} answered invalid JSON: {exc}"
            ) from None
        else:
            return _choice_content(payload, endpoint)
        if attempt < retries:
            log.warning("Judge request failed (%s); retrying in %.0f s", problem, delay)
            time.sleep(delay)
    raise EvaluationFailed(f"the judge failed after {retries + 1} attempts: {problem}")


def _retry_after(value: str | None, default: float) -> float:
    try:
        seconds = float(value) if value else default
    except ValueError:
        return default
    return min(max(seconds, 0.0), _MAX_BACKOFF_SECONDS)


def _choice_content(payload: Any, endpoint: str) -> str:
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        content = None
    if not isinstance(content, str):
        raise EvaluationFailed(
            f"the judge at {endpoint} answered without choices[0].message.content"
        )
    return content


# --------------------------------------------------------------------------- lm-eval


@dataclasses.dataclass(frozen=True)
class LmEvalOutcome:
    """What an lm-eval run produced.

    Attributes:
        metrics: ``"<task>/<metric>"`` -> value (``"<task>/<metric>,<filter>"`` for filters
            other than ``none``); standard errors are left out.
        skipped: why nothing ran (lm-eval missing, task data not available offline), or None.
    """

    metrics: dict[str, float]
    skipped: str | None = None


_OFFLINE_ENV: Final = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    *,
    tasks: Sequence[str],
    num_fewshot: int | None,
    batch_size: int,
    limit: int | None,
    allow_online: bool,
    allow_code_execution: bool,
) -> LmEvalOutcome:
    """Run lm-evaluation-harness tasks on the loaded model (``lm_eval.simple_evaluate``).

    The model is wrapped in ``lm_eval.models.huggingface.HFLM`` as it is (with the adapter
    active or disabled by the caller). Without ``allow_online`` the Hub is switched to offline
    mode for the run, so tasks whose data is not in the local Hugging Face cache fail to load
    and the suite is reported as skipped with that reason.

    Args:
        model: a causal LM (or PEFT model) on its device.
        tokenizer: its tokenizer.
        tasks: lm-eval task names, e.g. ``["hellaswag", "arc_easy"]``.
        num_fewshot: few-shot examples, or None for each task's default.
        batch_size: lm-eval's batch size.
        limit: evaluate at most this many documents per task, or None for all.
        allow_online: allow downloading task data from the Hub.
        allow_code_execution: allow tasks that execute generated code (``HF_ALLOW_CODE_EVAL``
            and lm-eval's ``confirm_run_unsafe_code``).

    Returns:
        The metrics, or an outcome with ``skipped`` set and no metrics.
    """
    try:
        import lm_eval  # type: ignore[import-not-found, unused-ignore]  # noqa: PLC0415
        from lm_eval.models.huggingface import (  # type: ignore[import-not-found, unused-ignore]  # noqa: PLC0415
            HFLM,
        )
    except ImportError as exc:
        return LmEvalOutcome(
            {},
            skipped=f"lm-evaluation-harness is not installed in the runtime image ({exc.name}); "
            "install the lm-eval package to run lmEval suites",
        )
    import inspect  # noqa: PLC0415

    options: dict[str, Any] = {
        "tasks": list(tasks),
        "num_fewshot": num_fewshot,
        "limit": limit,
        "log_samples": False,
    }
    if "confirm_run_unsafe_code" in inspect.signature(lm_eval.simple_evaluate).parameters:
        options["confirm_run_unsafe_code"] = allow_code_execution
    model.eval()
    with _hub_mode(offline=not allow_online, code_eval=allow_code_execution):
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            results = lm_eval.simple_evaluate(model=lm, **options)
        except OSError as exc:  # ConnectionError, OfflineModeIsEnabled, DatasetNotFoundError
            where = "in the local cache (allowOnline is false)" if not allow_online else "online"
            reason = f"task data for {', '.join(tasks)} is not available {where}"
            return LmEvalOutcome({}, skipped=f"{reason}: {type(exc).__name__}: {exc}"[:500])
    return LmEvalOutcome(_lm_eval_metrics(results or {}))


def _lm_eval_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for task, values in (results.get("results") or {}).items():
        if not isinstance(values, Mapping):
            continue
        for key, value in values.items():
            name, _, filter_name = str(key).partition(",")
            if name == "alias" or name.endswith("_stderr") or isinstance(value, bool):
                continue
            if not isinstance(value, int | float) or not math.isfinite(value):
                continue
            suffix = "" if filter_name in ("", "none") else f",{filter_name}"
            metrics[f"{task}/{name}{suffix}"] = float(value)
    return metrics


@contextlib.contextmanager
def _hub_mode(*, offline: bool, code_eval: bool) -> Iterator[None]:
    """Offline Hub/datasets (environment and the libraries' cached flags), code eval opt-in."""
    saved = {name: os.environ.get(name) for name in (*_OFFLINE_ENV, "HF_ALLOW_CODE_EVAL")}
    patched: list[tuple[Any, str, Any]] = []
    if offline:
        for name in _OFFLINE_ENV:
            os.environ[name] = "1"
        for module_name, attributes in (
            ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
            ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
        ):
            with contextlib.suppress(ImportError):
                module = __import__(module_name, fromlist=["_"])
                for attribute in attributes:
                    if hasattr(module, attribute):
                        patched.append((module, attribute, getattr(module, attribute)))
                        setattr(module, attribute, True)
    if code_eval:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    try:
        yield
    finally:
        for module, attribute, value in reversed(patched):
            setattr(module, attribute, value)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
