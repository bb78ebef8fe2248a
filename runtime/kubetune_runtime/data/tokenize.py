"""Conversations and texts to training examples: chat templates, loss masks, packing, collators.

Input samples are trl's formats: a conversation (a list of ``{"role", "content"}`` messages, or
``{"messages": [...]}``) or plain text (``{"text": ...}``). Output examples are
``{"input_ids": [...], "labels": [...]}`` with ``-100`` on every token that is not trained.

What is trained (the loss mask):

* conversations: the assistant turns only (``completion_only_loss=True``), *including* the
  end-of-turn / EOS token that closes every assistant turn, so the model learns to stop; or every
  token (``completion_only_loss=False``);
* plain text: every token, with EOS appended;
* never the first token of a sample: it has no preceding token to be predicted from (the model
  shifts labels left by one), so its label is always ``-100``. ``trained_tokens`` therefore
  counts exactly the tokens that enter the loss.

Assistant spans come from one of two strategies, chosen per template:

a. the template marks assistant output with ``{% generation %}...{% endgeneration %}``: use
   ``apply_chat_template(..., return_assistant_tokens_mask=True)``;
b. otherwise (most released templates, e.g. Qwen's and Llama's) render incrementally: the text
   that ``messages[:i+1]`` adds to ``messages[:i]`` + generation prompt is assistant turn ``i``;
   character spans are mapped to tokens with the tokenizer's offset mapping.

Packing follows trl's padding-free collation and the Hugging Face blog "Improving Hugging Face
Training Efficiency Through Packing with Flash Attention 2": samples are concatenated into one
row with ``position_ids`` restarting at 0 per sample and *no* attention mask, from which
transformers derives a block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``
for sdpa/eager/flex; cu_seqlens for flash-attention).

Importing this module is cheap: torch and transformers are imported only by the functions that
use them.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Final, Literal

from kubetune_runtime.errors import ConfigInvalid, DataInvalid

logger = logging.getLogger(__name__)

IGNORE_INDEX: Final = -100
"""Label value ignored by the loss (``torch.nn.CrossEntropyLoss`` default ``ignore_index``)."""

Overlength = Literal["truncate", "drop", "error"]
Example = dict[str, list[int]]

ROLES: Final = frozenset({"system", "user", "assistant", "tool"})

# Unused special tokens that make a good pad token, most specific first. A pad token only needs to
# be a valid id that is never trained (labels are -100 and the attention mask is 0 on padding);
# it must not be EOS, or code that masks by token id (e.g. `labels[ids == pad] = -100`) would also
# stop training the stop token.
PAD_CANDIDATES: Final = (
    "<|finetune_right_pad_id|>",  # Llama 3.1+
    "<|endoftext|>",  # Qwen (when EOS is <|im_end|>)
    "<pad>",  # Mistral, Gemma, T5-style vocabularies
    "<|pad|>",
    "[PAD]",
    "<|padding|>",
    "<|reserved_special_token_0|>",  # Llama 3.0
)

# Tokens that end a turn in common templates. Strategy (a) extends a {% generation %} span by one
# token when the template leaves the turn's closing token just outside it.
END_OF_TURN_TOKENS: Final = (
    "<|eot_id|>",
    "<|im_end|>",
    "<end_of_turn>",
    "<|end|>",
    "<|eom_id|>",
    "<|END_OF_TURN_TOKEN|>",
    "<|endoftext|>",
    "</s>",
)

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_PROBE_CONVERSATION: Final = (
    {"role": "user", "content": "1 + 1?"},
    {"role": "assistant", "content": "2"},
)


# ------------------------------------------------------------------------------ tokenizer set-up


def prepare_tokenizer(
    tokenizer: Any, *, chat_template: str | None, require_chat_template: bool = True
) -> Any:
    """Install the chat template override and a pad token distinct from EOS (in place).

    Pad token policy: keep an existing pad token unless it is missing or equal to EOS; otherwise
    use the first of :data:`PAD_CANDIDATES` (then ``unk``) that is already in the vocabulary, is
    neither EOS nor BOS, and is not written by the chat template. Nothing is ever added to the
    vocabulary, so the model's embeddings are never resized. If no such token exists, pad falls
    back to EOS; that is still correct here because every collator masks padding by position
    (attention mask and ``-100`` labels by length), never by token id, and
    :func:`tokenize_dataset` records the fallback in ``TokenizationSummary.notes``.

    Args:
        tokenizer: a transformers tokenizer (modified in place and returned).
        chat_template: a Jinja chat template that replaces the tokenizer's own
            (``data.chat_template`` in the RunConfig), or None to keep it.
        require_chat_template: raise if no template results (False for plain-text datasets).

    Returns:
        The same tokenizer.

    Raises:
        ConfigInvalid: no chat template is available although one is required, the template
            does not render a simple conversation, or the tokenizer has neither pad nor EOS.
    """
    if chat_template is not None:
        if not chat_template.strip():
            raise ConfigInvalid("data.chat_template is empty")
        tokenizer.chat_template = chat_template
    if tokenizer.chat_template:
        _check_template_renders(tokenizer)
    elif require_chat_template:
        raise ConfigInvalid(
            "the tokenizer has no chat template and data.chat_template is not set: base models "
            "usually ship none; set data.chat_template to a Jinja template (ideally one that "
            "marks assistant turns with {% generation %}) or use an instruct model"
        )
    _ensure_pad_token(tokenizer)
    return tokenizer


def _check_template_renders(tokenizer: Any) -> None:
    from jinja2 import TemplateError  # noqa: PLC0415 - keep this module's import cheap

    try:
        tokenizer.apply_chat_template(list(_PROBE_CONVERSATION), tokenize=False)
    except (TemplateError, ValueError, TypeError, KeyError) as exc:
        raise ConfigInvalid(
            f"the chat template does not render a user/assistant conversation: {exc}"
        ) from exc


def _ensure_pad_token(tokenizer: Any) -> None:
    eos_id = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos_id:
        return
    vocab: dict[str, int] = tokenizer.get_vocab()
    template = _template_text(tokenizer)
    excluded = {eos_id, tokenizer.bos_token_id}
    for candidate in (*PAD_CANDIDATES, tokenizer.unk_token):
        if candidate is None or candidate not in vocab or vocab[candidate] in excluded:
            continue
        if candidate in template:
            continue
        tokenizer.pad_token = candidate
        logger.info("Set pad token token=%s id=%d", candidate, vocab[candidate])
        return
    if eos_id is None:
        raise ConfigInvalid("the tokenizer has neither a pad token nor an EOS token")
    tokenizer.pad_token = tokenizer.eos_token
    logger.warning(
        "Pad token falls back to EOS token=%s: no unused special token exists; padding is "
        "masked by position, so EOS is still trained",
        tokenizer.eos_token,
    )


def _template_text(tokenizer: Any) -> str:
    template = tokenizer.chat_template
    if isinstance(template, Mapping):  # named templates ({"default": ..., "tool_use": ...})
        return "\n".join(str(v) for v in template.values())
    return str(template or "")


# ------------------------------------------------------------------------------ conversations


class _RowProblem(Exception):
    """A sample that cannot be used; ``drop_reason`` set means drop-and-count, else DataInvalid."""

    def __init__(self, message: str, *, field: str | None = None, drop_reason: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.drop_reason = drop_reason


@dataclasses.dataclass(frozen=True)
class _ChatPlan:
    """What we know about a tokenizer + template, computed once per dataset."""

    template: str
    generation_tags: bool
    bos_id: int | None
    prepend_bos: bool  # the tokenizer's own convention adds BOS to plain text
    eos_id: int | None
    end_of_turn_ids: frozenset[int]
    control_tokens: tuple[str, ...]  # special tokens that must not appear in message text
    control_ids: frozenset[int]


def _plan(tokenizer: Any, *, need_template: bool) -> _ChatPlan:
    template = ""
    if need_template:
        template = tokenizer.get_chat_template() if tokenizer.chat_template else ""
        if not template:
            raise ConfigInvalid(
                "conversations need a chat template: call prepare_tokenizer (data.chat_template)"
            )
    bos_id = tokenizer.bos_token_id
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    special = {c.content for c in tokenizer.added_tokens_decoder.values() if c.special}
    special |= set(tokenizer.all_special_tokens)
    # Longest first, so the content check reports "<|im_end|>" rather than a shorter overlap.
    control = tuple(sorted((t for t in special if t and not t.isspace()), key=len, reverse=True))
    eos_id = tokenizer.eos_token_id
    end_of_turn = {
        i for i in map(partial(_token_id, tokenizer), END_OF_TURN_TOKENS) if i is not None
    }
    if eos_id is not None:
        end_of_turn.add(eos_id)
    return _ChatPlan(
        template=template,
        generation_tags=bool(_GENERATION_TAG.search(template)),
        bos_id=bos_id,
        prepend_bos=bos_id is not None and bool(probe) and probe[0] == bos_id,
        eos_id=eos_id,
        end_of_turn_ids=frozenset(end_of_turn),
        control_tokens=control,
        control_ids=frozenset(
            i for i in map(partial(_token_id, tokenizer), control) if i is not None
        ),
    )


def _token_id(tokenizer: Any, token: str) -> int | None:
    """The id of ``token`` if it is one vocabulary entry (without building the whole vocab)."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if isinstance(token_id, int) and tokenizer.convert_ids_to_tokens(token_id) == token:
        return token_id
    return None


def tokenize_conversation(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]]
) -> tuple[list[int], list[int]]:
    """Tokenize one conversation with the tokenizer's chat template and mark assistant tokens.

    The result has exactly one BOS when the tokenizer uses one (the template's, or prepended when
    the template writes none but the tokenizer adds BOS to plain text). The mask is 1 on every
    assistant token *including* the end-of-turn token that closes each assistant turn. This
    inspects the tokenizer on every call; :func:`tokenize_dataset` does that once per dataset.

    Args:
        tokenizer: a transformers tokenizer with a chat template (see :func:`prepare_tokenizer`).
        messages: ``[{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]``.

    Returns:
        ``(input_ids, assistant_mask)``, two lists of the same length ``[seq]``.

    Raises:
        DataInvalid: the conversation is malformed (empty, unknown role, non-string content) or
            contains a special token's text (e.g. ``<|eot_id|>``) inside a message.
        ConfigInvalid: the template is not prefix-stable (strategy b) or does not close
            assistant turns with an end-of-turn token, so the model could not learn to stop.
    """
    plan = _plan(tokenizer, need_template=True)
    try:
        return _tokenize_chat(tokenizer, plan, messages)
    except _RowProblem as problem:
        raise DataInvalid(problem.message, field=problem.field) from None


def _tokenize_chat(tokenizer: Any, plan: _ChatPlan, messages: Any) -> tuple[list[int], list[int]]:
    conversation = _check_messages(messages, plan)
    if plan.generation_tags:
        encoded = tokenizer.apply_chat_template(
            conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(encoded["input_ids"])
        mask = [int(bool(m)) for m in encoded["assistant_masks"]]
        _close_generation_spans(tokenizer, plan, ids, mask)
    else:
        ids, mask = _incremental_spans(tokenizer, plan, conversation)
    return _one_bos(plan, ids, mask)


def _check_messages(messages: Any, plan: _ChatPlan) -> list[dict[str, Any]]:
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise _RowProblem("a conversation must be a non-empty list of messages", field="messages")
    conversation: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise _RowProblem("a message must be an object with role and content", field=where)
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise _RowProblem(
                f"role {role!r} is not one of {', '.join(sorted(ROLES))}", field=f"{where}.role"
            )
        if not isinstance(content, str):
            raise _RowProblem("content must be a string", field=f"{where}.content")
        for token in plan.control_tokens:
            if token in content:
                raise _RowProblem(
                    f"content contains the special token {token!r}, which would be encoded as a "
                    "control token and corrupt the turn structure",
                    field=f"{where}.content",
                    drop_reason="special_token_in_content",
                )
        conversation.append(dict(message))
    return conversation


def _close_generation_spans(
    tokenizer: Any, plan: _ChatPlan, ids: list[int], mask: list[int]
) -> None:
    """Strategy (a): make sure every masked assistant run ends with its end-of-turn token."""
    for start, end in _runs(mask):
        last = _last_content_token(tokenizer, ids, start, end)
        if last is not None and ids[last] in plan.control_ids | plan.end_of_turn_ids:
            continue
        if end < len(ids) and ids[end] in plan.end_of_turn_ids:
            # The template put the turn's closing token just outside {% generation %}.
            mask[end] = 1
            continue
        raise ConfigInvalid(
            "the chat template's {% generation %} block does not end assistant turns with an "
            "end-of-turn/EOS token, so the model would never learn to stop; include the "
            "closing token inside {% generation %}"
        )


def _runs(mask: Sequence[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    start: int | None = None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _last_content_token(tokenizer: Any, ids: Sequence[int], start: int, end: int) -> int | None:
    """Index of the last token in ``ids[start:end]`` that is not pure whitespace."""
    for i in range(end - 1, start - 1, -1):
        if tokenizer.decode([ids[i]]).strip():
            return i
    return None


def _render(tokenizer: Any, messages: list[dict[str, Any]], *, generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    return str(text)


def _incremental_spans(
    tokenizer: Any, plan: _ChatPlan, conversation: list[dict[str, Any]]
) -> tuple[list[int], list[int]]:
    """Strategy (b): assistant character spans by incremental rendering, mapped to tokens."""
    full = _render(tokenizer, conversation, generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise _RowProblem(
                "a conversation must not start with an assistant message", field="messages[0].role"
            )
        before = _render(tokenizer, conversation[:i], generation_prompt=True)
        upto = _render(tokenizer, conversation[: i + 1], generation_prompt=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ConfigInvalid(
                "the chat template is not prefix-stable (rendering more messages changes the "
                "text of earlier ones, or the generation prompt differs from the rendered "
                "assistant header), so assistant tokens cannot be located; set "
                "data.chat_template to a template with {% generation %} markers"
            )
        start, end = len(before), _trim_after_end_of_turn(upto, len(before), plan)
        spans.append((start, end))

    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    mask = [0] * len(ids)
    span = 0
    # Same overlap rule as transformers' assistant mask: a token is assistant if it overlaps
    # a span (spans and offsets are both in order, so one pass suffices).
    for index, (token_start, token_end) in enumerate(encoded["offset_mapping"]):
        while span < len(spans) and token_start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        if token_end > spans[span][0] and token_end > token_start:
            mask[index] = 1
    return ids, mask


def _trim_after_end_of_turn(text: str, start: int, plan: _ChatPlan) -> int:
    """End of an assistant span: drop whitespace after its closing special token, or fail.

    ChatML writes ``<|im_end|>`` and a newline; the newline is never generated (decoding stops at
    ``<|im_end|>``), so it is not trained.
    """
    stripped = text.rstrip()
    if len(stripped) > start and any(stripped.endswith(t) for t in plan.control_tokens):
        return len(stripped)
    raise ConfigInvalid(
        "the chat template does not end assistant turns with a special end-of-turn/EOS token, "
        "so the model would never learn to stop; use a template that closes each assistant "
        "turn with one (e.g. <|im_end|> or <|eot_id|>)"
    )


def _one_bos(plan: _ChatPlan, ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
    if plan.bos_id is None:
        return ids, mask
    if len(ids) >= 2 and ids[0] == ids[1] == plan.bos_id:
        return ids[1:], mask[1:]
    if plan.prepend_bos and (not ids or ids[0] != plan.bos_id):
        return [plan.bos_id, *ids], [0, *mask]
    return ids, mask


# ------------------------------------------------------------------------------ datasets


@dataclasses.dataclass
class TokenizationSummary:
    """What tokenization produced; logged and reported with the run's metrics.

    Attributes:
        samples: input samples.
        examples: examples kept (``samples`` minus the dropped ones).
        tokens: tokens in the kept examples (after truncation).
        trained_tokens: tokens whose label is not ``-100`` (the tokens that enter the loss).
        truncated: kept examples that were cut to ``max_seq_length``.
        dropped: reason -> count: ``overlength`` (``overlength="drop"``), ``truncated_away``
            (truncation removed every trained token), ``no_trained_tokens`` (e.g. no assistant
            turn), ``special_token_in_content`` (a message contains a control token's text).
        max_length: longest kept example, in tokens.
        mean_length: mean kept example length, in tokens.
        notes: things a person should know, e.g. that the pad token fell back to EOS.
    """

    samples: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    max_length: int = 0
    mean_length: float = 0.0
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return dataclasses.asdict(self)


def tokenize_dataset(
    tokenizer: Any,
    samples: Sequence[Any],
    *,
    max_seq_length: int,
    overlength: Overlength = "truncate",
    completion_only_loss: bool = True,
    sources: Sequence[tuple[str, int]] | None = None,
) -> tuple[list[Example], TokenizationSummary]:
    """Tokenize conversations and texts into ``{"input_ids", "labels"}`` training examples.

    Args:
        tokenizer: a transformers tokenizer after :func:`prepare_tokenizer`.
        samples: each a conversation (list of messages, or ``{"messages": [...]}``) or
            ``{"text": str}``.
        max_seq_length: longest example, in tokens.
        overlength: what to do with a longer sample: ``truncate`` (keep the first
            ``max_seq_length`` tokens), ``drop`` (skip and count it) or ``error``.
        completion_only_loss: train conversations on assistant tokens only (True) or on every
            token (False). Plain text is always trained on every token.
        sources: per sample ``(source, row)`` for error messages (default: row = index + 1).

    Returns:
        ``(examples, summary)``; example lists are ``[seq]`` with ``seq <= max_seq_length``.

    Raises:
        DataInvalid: a malformed sample, an overlength sample with ``overlength="error"``
            (naming its row and length), or no sample left to train on.
        ConfigInvalid: bad arguments, or a chat template that cannot produce a loss mask.
    """
    if max_seq_length < 2:
        raise ConfigInvalid(f"max_seq_length must be at least 2, got {max_seq_length}")
    if overlength not in ("truncate", "drop", "error"):
        raise ConfigInvalid(f"overlength must be truncate, drop or error, got {overlength!r}")
    if sources is not None and len(sources) != len(samples):
        raise ValueError("sources must have one (source, row) per sample")
    has_chat = any(not (isinstance(s, Mapping) and "text" in s) for s in samples)
    plan = _plan(tokenizer, need_template=has_chat)

    examples: list[Example] = []
    dropped: Counter[str] = Counter()
    truncated = 0
    for index, sample in enumerate(samples):
        source, row = sources[index] if sources is not None else (None, index + 1)
        try:
            ids, labels = _tokenize_sample(tokenizer, plan, sample, completion_only_loss)
        except _RowProblem as problem:
            if problem.drop_reason is None:
                raise DataInvalid(
                    problem.message, source=source, row=row, field=problem.field
                ) from None
            dropped[problem.drop_reason] += 1
            continue
        except ConfigInvalid as exc:
            raise ConfigInvalid(f"{exc} (first seen at {source or 'sample'} row {row})") from exc
        if len(ids) > max_seq_length:
            if overlength == "error":
                raise DataInvalid(
                    f"sample is {len(ids)} tokens, longer than max_seq_length {max_seq_length} "
                    "(data.overlength is error; use truncate or drop, or raise max_seq_length)",
                    source=source,
                    row=row,
                )
            if overlength == "drop":
                dropped["overlength"] += 1
                continue
        cut = len(ids) > max_seq_length
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        labels[0] = IGNORE_INDEX  # never a target: nothing precedes it
        if all(label == IGNORE_INDEX for label in labels):
            dropped["truncated_away" if cut else "no_trained_tokens"] += 1
            continue
        truncated += cut
        examples.append({"input_ids": ids, "labels": labels})

    summary = _summarize(tokenizer, len(samples), examples, truncated, dropped)
    if not examples:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(dropped.items()))
        raise DataInvalid(
            f"all {len(samples)} samples were dropped, nothing to train on ({reasons or 'empty'})"
        )
    logger.info(
        "Tokenized dataset samples=%d examples=%d tokens=%d trained_tokens=%d truncated=%d "
        "dropped=%s max_length=%d",
        summary.samples,
        summary.examples,
        summary.tokens,
        summary.trained_tokens,
        summary.truncated,
        summary.dropped,
        summary.max_length,
    )
    return examples, summary


def _tokenize_sample(
    tokenizer: Any, plan: _ChatPlan, sample: Any, completion_only_loss: bool
) -> tuple[list[int], list[int]]:
    if isinstance(sample, Mapping) and "text" in sample:
        text = sample["text"]
        if not isinstance(text, str) or not text:
            raise _RowProblem("text must be a non-empty string", field="text")
        # split_special_tokens: a literal "<|eot_id|>" in the text is text, not a control token.
        ids = list(tokenizer(text, add_special_tokens=True, split_special_tokens=True)["input_ids"])
        if plan.eos_id is not None and (not ids or ids[-1] != plan.eos_id):
            ids.append(plan.eos_id)
        return ids, list(ids)
    messages = sample.get("messages") if isinstance(sample, Mapping) else sample
    ids, mask = _tokenize_chat(tokenizer, plan, messages)
    if completion_only_loss:
        labels = [token if bit else IGNORE_INDEX for token, bit in zip(ids, mask, strict=True)]
    else:
        labels = list(ids)
    return ids, labels


def _summarize(
    tokenizer: Any,
    samples: int,
    examples: list[Example],
    truncated: int,
    dropped: Counter[str],
) -> TokenizationSummary:
    lengths = [len(e["input_ids"]) for e in examples]
    notes: list[str] = []
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        notes.append(
            "the pad token is the EOS token (the vocabulary has no unused special token); "
            "padding is masked by position, so EOS is still trained"
        )
    return TokenizationSummary(
        samples=samples,
        examples=len(examples),
        tokens=sum(lengths),
        trained_tokens=sum(
            sum(1 for label in e["labels"] if label != IGNORE_INDEX) for e in examples
        ),
        truncated=truncated,
        dropped=dict(sorted(dropped.items())),
        max_length=max(lengths, default=0),
        mean_length=sum(lengths) / len(lengths) if lengths else 0.0,
        notes=notes,
    )


# ------------------------------------------------------------------------------ packing


def pack_examples(
    examples: Sequence[Mapping[str, Sequence[int]]], max_seq_length: int
) -> list[Example]:
    """Pack examples into sequences of at most ``max_seq_length`` tokens (best-fit decreasing).

    Examples are taken longest first and each goes into the open sequence with the least room
    that still fits it (a new one if none does), as trl's ``bfd`` packing strategy does. Samples
    are never split. Each packed example carries ``position_ids`` that restart at 0 for every
    sample, which is how the padding-free path keeps samples from attending to each other, and
    the label of each sample's first token is ``-100`` so no sample is trained to predict the
    next sample's first token. The result is deterministic.

    Args:
        examples: ``{"input_ids": [...], "labels": [...]}`` as from :func:`tokenize_dataset`.
        max_seq_length: capacity of a packed sequence, in tokens.

    Returns:
        Packed examples ``{"input_ids", "labels", "position_ids"}``, each ``[seq]``.

    Raises:
        ValueError: an example is empty or longer than ``max_seq_length``.
    """
    lengths = [len(e["input_ids"]) for e in examples]
    for index, length in enumerate(lengths):
        if not 0 < length <= max_seq_length:
            raise ValueError(
                f"example {index} has {length} tokens; packing needs 1..{max_seq_length}"
            )
    order = sorted(range(len(examples)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for index in order:
        slot = bisect.bisect_left(free, (lengths[index], -1))
        if slot == len(free):
            bins.append([index])
            bisect.insort(free, (max_seq_length - lengths[index], len(bins) - 1))
        else:
            room, b = free.pop(slot)
            bins[b].append(index)
            bisect.insort(free, (room - lengths[index], b))

    packed: list[Example] = []
    for members in bins:
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        for index in members:
            example = examples[index]
            sample_labels = list(example.get("labels", example["input_ids"]))
            sample_labels[0] = IGNORE_INDEX
            input_ids.extend(example["input_ids"])
            labels.extend(sample_labels)
            position_ids.extend(range(lengths[index]))
        packed.append({"input_ids": input_ids, "labels": labels, "position_ids": position_ids})
    return packed


# ------------------------------------------------------------------------------ collators


@dataclasses.dataclass(frozen=True)
class PaddingFreeCollator:
    """Concatenate a batch into one row without padding or attention mask (padding-free).

    Follows trl's ``DataCollatorForLanguageModeling(padding_free=True)``. Returns
    ``input_ids``, ``labels`` and ``position_ids``, each ``[1, total_tokens]`` (``torch.long``),
    and no ``attention_mask``: transformers then builds a block-diagonal causal mask from the
    ``position_ids`` restarts (``masking_utils.find_packed_sequence_indices``; flash-attention
    derives cu_seqlens from them), so no token attends across samples.

    Labels are shifted inside the model (``ForCausalLMLoss``: logits at ``t`` predict
    ``labels[t + 1]``), so the label at every position where ``position_ids == 0`` is set to
    ``-100``: the last token of one sample is never trained to predict the first token of the
    next. Examples may be plain (``input_ids``/``labels``) or packed (with ``position_ids``).

    ``use_cache=False`` is added to the batch (``disable_cache``): with a cache, transformers
    5 skips packed-sequence detection and the samples *would* attend to each other; trl's
    ``SFTTrainer.compute_loss`` sets the same flag for the same reason.
    """

    disable_cache: bool = True

    def __call__(self, examples: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, Any]:
        """Collate ``examples`` into a ``[1, total_tokens]`` batch (see the class docstring)."""
        import torch  # noqa: PLC0415 - keep this module's import cheap

        if not examples:
            raise ValueError("cannot collate an empty batch")
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        for example in examples:
            ids, positions, sample_labels = _packed_fields(example)
            input_ids.extend(ids)
            labels.extend(sample_labels)
            position_ids.extend(positions)
        return _packed_batch(
            torch.tensor([input_ids], dtype=torch.long),
            torch.tensor([labels], dtype=torch.long),
            torch.tensor([position_ids], dtype=torch.long),
            disable_cache=self.disable_cache,
        )


@dataclasses.dataclass(frozen=True)
class PackedRowsCollator:
    """Packed examples as ``[batch, longest]`` rows: each row keeps its own samples.

    The training path for packed data with sdpa/eager attention. Returns ``input_ids``,
    ``labels`` and ``position_ids`` (``[batch, seq]``, ``torch.long``) and no attention mask:
    transformers derives a block-diagonal causal mask from the ``position_ids`` restarts *per
    row*, so attention costs ``batch x seq^2`` instead of the ``(batch x seq)^2`` of one long
    concatenated row (:class:`PaddingFreeCollator`, which suits flash-attention's
    variable-length kernels). Measured in ``bench/train_throughput.py``: about 1.8x faster on
    CPU than the single row, for the same loss.

    Shorter rows are right-padded with ``pad_token_id``; padding continues the row's last
    positions (so it is causally after every real token and never attended to by them) and
    has label ``-100``. As in :class:`PaddingFreeCollator`, labels where ``position_ids == 0``
    are ``-100`` (no sample learns to predict the next sample's first token), and
    ``use_cache=False`` is added (with a cache transformers skips packed-sequence detection).
    """

    pad_token_id: int
    disable_cache: bool = True

    def __call__(self, examples: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, Any]:
        """Collate ``examples`` into a ``[batch, seq]`` batch (see the class docstring)."""
        import torch  # noqa: PLC0415 - keep this module's import cheap

        if not examples:
            raise ValueError("cannot collate an empty batch")
        longest = max(len(e["input_ids"]) for e in examples)
        shape = (len(examples), longest)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        for row, example in enumerate(examples):
            ids, positions, sample_labels = _packed_fields(example)
            n = len(ids)
            input_ids[row, :n] = torch.tensor(ids, dtype=torch.long)
            labels[row, :n] = torch.tensor(sample_labels, dtype=torch.long)
            position_ids[row, :n] = torch.tensor(positions, dtype=torch.long)
            position_ids[row, n:] = torch.arange(positions[-1] + 1, positions[-1] + 1 + longest - n)
        return _packed_batch(input_ids, labels, position_ids, disable_cache=self.disable_cache)


def _packed_fields(
    example: Mapping[str, Sequence[int]],
) -> tuple[Sequence[int], list[int], Sequence[int]]:
    """``(input_ids, position_ids, labels)`` of one plain or packed example, checked.

    Raises:
        ValueError: empty or unequal token lists, or positions not starting at 0.
    """
    ids = example["input_ids"]
    positions = list(example.get("position_ids", range(len(ids))))
    labels = example.get("labels", ids)
    if not ids or len(positions) != len(ids) or len(labels) != len(ids):
        raise ValueError("each example needs equally long, non-empty token lists")
    if positions[0] != 0:
        raise ValueError("position_ids must start at 0")
    return ids, positions, labels


def _packed_batch(
    input_ids: Any, labels: Any, position_ids: Any, *, disable_cache: bool
) -> dict[str, Any]:
    """The batch dict of a packed collator: sample starts never trained, cache off if asked."""
    labels[position_ids == 0] = IGNORE_INDEX
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
    }
    if disable_cache:
        batch["use_cache"] = False
    return batch


@dataclasses.dataclass(frozen=True)
class PaddedCollator:
    """Right-pad a batch to its longest example (the non-packed path).

    Returns ``input_ids`` (padded with ``pad_token_id``), ``attention_mask`` (1 on tokens, 0 on
    padding) and ``labels`` (``-100`` on padding), each ``[batch, seq]`` ``torch.long``, ``seq``
    rounded up to ``pad_to_multiple_of`` when set. Padding is masked by position, never by token
    id, so a pad token equal to EOS is harmless.

    Attributes:
        pad_token_id: id written into padding positions.
        pad_to_multiple_of: round the padded length up to a multiple of this (e.g. 8 for
            tensor cores), or None.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, Any]:
        """Collate ``examples`` into a ``[batch, seq]`` batch (see the class docstring).

        Raises:
            ValueError: an empty batch, or packed examples (they need
                :class:`PaddingFreeCollator`: an attention mask disables packed-sequence
                detection, so packed samples would attend to each other).
        """
        import torch  # noqa: PLC0415 - keep this module's import cheap

        if not examples:
            raise ValueError("cannot collate an empty batch")
        if any("position_ids" in e for e in examples):
            raise ValueError("packed examples need PaddingFreeCollator, not PaddedCollator")
        longest = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.tensor(list(example["input_ids"]), dtype=torch.long)
            labels[row, :n] = torch.tensor(
                list(example.get("labels", example["input_ids"])), dtype=torch.long
            )
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
