r"""Map dataset rows of every supported format to trl's conversational form.

One internal form, the one trl's trainers accept:

* a **conversation** is a list of messages ``{"role": "system"|"user"|"assistant",
  "content": str}`` with non-empty content, ending with an assistant turn; an SFT example is
  ``{"messages": conversation}``;
* a **preference example** is ``{"prompt": [...], "chosen": [...], "rejected": [...]}`` (trl's
  conversational preference format); chosen and rejected hold the final assistant reply;
* format ``text`` is the exception: plain text has no turns, so an SFT example is
  ``{"text": str}`` (trl's language-modelling format; the loss covers the whole text and
  ``system_prompt`` does not apply).

Formats (canonical column names; ``columns`` maps them to the source's column names, and a
source name may be a dotted path into nested objects, e.g. ``instances.0.output``):

========================  =================================================================
``messages``              ``messages``: OpenAI role/content list (content may be a list of
                          ``{"type": "text", "text": ...}`` parts, joined by newlines)
``sharegpt``              ``conversations``: from/value list (human/gpt, ...)
``alpaca``                ``instruction``, optional ``input`` (appended after a blank
                          line), ``output``
``promptCompletion``      ``prompt``, ``completion`` (strings or message lists)
``preference``            ``chosen``, ``rejected``, optional ``prompt``: strings or message
                          lists; without a prompt they are whole conversations (or
                          HH-RLHF ``"\n\nHuman: ...\n\nAssistant: ..."`` transcripts) whose
                          turns before the final reply must be identical and become the prompt
``oasst``                 ``prompt``: an OpenAssistant message tree (see :func:`oasst_path`
                          and :func:`oasst_pairs`)
``text``                  ``text``
========================  =================================================================

Every format may also carry ``system`` (a system message put first when the conversation has
none; it overrides ``system_prompt``). Roles are normalized: human/user/prompter -> user,
gpt/assistant/bot/model/chatgpt -> assistant, system -> system; other roles are errors.

Error policy (:func:`convert_rows`): a row that does not have the shape its format requires
(missing field, wrong type, unknown role) is an *error*: every row is checked and one
``DataInvalid`` lists the first five with their row numbers and the total, because such errors
mean a wrong ``format``/``columns`` or a broken file. A well-formed row with nothing to train
on (empty content, no assistant turn, a trailing user turn, identical or empty chosen and
rejected, a preference pair without a shared prompt) is *dropped* and counted by reason in
:class:`ConversionSummary`; when more than ``max_dropped_fraction`` (5%) of the rows are dropped
that too is a ``DataInvalid`` listing them. The single-row functions raise ``DataInvalid`` for
both kinds.

Ideas from trl's ``maybe_convert_to_chatml``/``extract_prompt`` (role/content form, shared
prefix as the prompt), FastChat's ShareGPT roles, vLLM's joining of text parts, and the
Open-Assistant ``oasst_data`` tree layout.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NoReturn, TypeAlias, TypedDict, TypeVar

from kubetune_runtime.data.loading import Row
from kubetune_runtime.errors import DataInvalid

Role: TypeAlias = Literal["system", "user", "assistant"]
Objective: TypeAlias = Literal["sft", "dpo", "orpo"]


class Message(TypedDict):
    """One conversation turn (trl / OpenAI chat form)."""

    role: Role
    content: str


class PreferenceExample(TypedDict):
    """trl's conversational preference example: a prompt and two alternative replies."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]


Example: TypeAlias = dict[str, Any]
"""An output row: ``{"messages": [...]}``, ``{"text": str}`` or a :class:`PreferenceExample`."""

FORMATS: Final = (
    "messages",
    "sharegpt",
    "alpaca",
    "promptCompletion",
    "preference",
    "oasst",
    "text",
)
PREFERENCE_FORMATS: Final = ("preference", "oasst")
COLUMNS: Final = (
    "messages",
    "conversations",
    "system",
    "instruction",
    "input",
    "output",
    "prompt",
    "completion",
    "chosen",
    "rejected",
    "text",
)
# The canonical columns that identify each format (oasst: ``prompt`` holding a message tree).
SIGNATURES: Final[Mapping[str, tuple[str, ...]]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "promptCompletion": ("prompt", "completion"),
    "preference": ("chosen", "rejected"),
    "oasst": ("prompt",),
    "text": ("text",),
}
ROLES: Final[Mapping[str, Role]] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
}
_TURN: Final = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_MISSING: Final = object()
_T = TypeVar("_T")


class _Problem(Exception):
    """A row problem: ``drop`` is a reason token for droppable rows, ``None`` for errors."""

    def __init__(self, message: str, field: str | None, drop: str | None = None) -> None:
        super().__init__(message)
        self.message, self.field, self.drop = message, field, drop


def _fail(message: str, field: str | None) -> NoReturn:
    raise _Problem(message, field)


def _drop(reason: str, message: str, field: str | None) -> NoReturn:
    raise _Problem(message, field, reason)


@dataclass(frozen=True)
class ConversionSummary:
    """What :func:`convert_rows` did, for logs and the run's status.

    Attributes:
        format: the format used (after auto-detection).
        objective: sft, dpo or orpo.
        rows_read: rows given.
        rows_converted: rows that produced at least one example.
        examples: examples produced (an OpenAssistant tree may yield several pairs).
        dropped: rows dropped, by reason token (``empty-content``, ``prefix-mismatch``, ...).
        problems: the first few drop messages, each naming source, row and field.
    """

    format: str
    objective: str
    rows_read: int
    rows_converted: int
    examples: int
    dropped: Mapping[str, int] = field(default_factory=dict)
    problems: tuple[str, ...] = ()

    @property
    def rows_dropped(self) -> int:
        """Rows dropped for any reason."""
        return sum(self.dropped.values())

    def __str__(self) -> str:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.dropped.items()))
        return (
            f"{self.rows_read} rows read as {self.format} for {self.objective}: "
            f"{self.rows_converted} converted into {self.examples} examples, "
            f"{self.rows_dropped} dropped{f' ({reasons})' if reasons else ''}"
        )


class _View:
    """A row seen through ``columns``: canonical name -> value and the source field name."""

    def __init__(self, data: Mapping[str, Any], columns: Mapping[str, str]) -> None:
        self.data, self.columns = data, columns
        # A canonical-named column that is the source of another name is not itself that name.
        self.hidden = set(columns.values()) - set(columns)

    def name(self, canonical: str) -> str:
        return self.columns.get(canonical, canonical)

    def has(self, canonical: str) -> bool:
        """Whether the column is there and not null (nulls fill absent columns in Parquet)."""
        if canonical in self.hidden and canonical not in self.columns:
            return False
        value = _lookup(self.data, self.name(canonical))
        return value is not _MISSING and value is not None

    def present(self) -> list[str]:
        return [c for c in COLUMNS if self.has(c)]

    def get(self, canonical: str) -> Any:
        if not self.has(canonical):
            mapped = f" (mapped to {canonical})" if canonical in self.columns else ""
            _fail(
                f"missing or null{mapped}; row has keys {sorted(self.data)}", self.name(canonical)
            )
        return _lookup(self.data, self.name(canonical))

    def string(self, canonical: str) -> str:
        value = self.get(canonical)
        if not isinstance(value, str):
            _fail(f"expected a string, got {type(value).__name__}", self.name(canonical))
        return value


def _lookup(data: Mapping[str, Any], name: str) -> Any:
    """``data[name]``, else follow a dotted path (``instances.0.input``); ``_MISSING`` if absent."""
    if name in data or "." not in name:
        return data.get(name, _MISSING)
    value: Any = data
    for part in name.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _check_columns(columns: Mapping[str, str]) -> None:
    unknown = sorted(set(columns) - set(COLUMNS))
    if unknown:
        raise DataInvalid(
            f"columns maps unknown names {unknown}; expected canonical names {list(COLUMNS)}",
            field="columns",
        )


def detect_format(row: Mapping[str, Any], columns: Mapping[str, str]) -> str:
    """The format of ``row``, from the canonical columns present after applying ``columns``.

    ``oasst`` is recognized by ``prompt`` holding a message tree (an object, not a string or
    list); every other format by the columns in :data:`SIGNATURES`.

    Raises:
        DataInvalid: no format matches, or several do; the message lists the keys seen and
            what each format expects.
    """
    _check_columns(columns)
    view = _View(row, columns)
    present = set(view.present())
    tree = "prompt" in present and isinstance(view.get("prompt"), Mapping)
    matches = [
        fmt
        for fmt, needed in SIGNATURES.items()
        if present.issuperset(needed) and (fmt == "oasst") == tree
    ]
    if len(matches) == 1:
        return matches[0]
    expected = "; ".join(f"{fmt}: {', '.join(cols)}" for fmt, cols in SIGNATURES.items())
    expected = expected.replace("oasst: prompt", "oasst: prompt holding a message tree")
    problem = f"matches several formats {matches}" if matches else "matches no known format"
    raise DataInvalid(
        f"row {problem}: it has keys {sorted(row)} (canonical: {sorted(present)}); expected "
        f"the columns of exactly one format ({expected}); "
        "set format, or map columns"
    )


# ---------------------------------------------------------------------------- messages


def _content(value: Any, field: str) -> str:
    """A message's text: a string, or a list of text parts joined by newlines."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not (isinstance(part, Mapping) and part.get("type") == "text"):
                _fail('expected text parts {"type": "text", "text": ...}', f"{field}[{i}]")
            if not isinstance(part.get("text"), str):
                _fail("expected a string", f"{field}[{i}].text")
            texts.append(part["text"])
        return "\n".join(texts)
    _fail(f"expected a string or a list of text parts, got {type(value).__name__}", field)


def _message(turn: Any, field: str) -> tuple[Message, str]:
    """One role/content (or ShareGPT from/value) turn, role normalized, and its content field."""
    if not isinstance(turn, Mapping):
        _fail(f"expected a message object, got {type(turn).__name__}", field)
    role_key = "role" if "role" in turn else "from"
    content_key = "content" if "content" in turn else "value"
    if role_key not in turn or content_key not in turn:
        _fail(f"expected role and content (or from and value); got keys {sorted(turn)}", field)
    raw = turn[role_key]
    role = ROLES.get(raw.strip().lower()) if isinstance(raw, str) else None
    if role is None:
        _fail(f"unknown role {raw!r}; expected one of {sorted(ROLES)}", f"{field}.{role_key}")
    content_field = f"{field}.{content_key}"
    return {"role": role, "content": _content(turn[content_key], content_field)}, content_field


@dataclass
class _Turns:
    """Messages and, for each, the source field its content came from (for error messages)."""

    messages: list[Message]
    fields: list[str]

    def __add__(self, other: _Turns) -> _Turns:
        return _Turns(self.messages + other.messages, self.fields + other.fields)


def _one(role: Role, text: str, field: str) -> _Turns:
    return _Turns([{"role": role, "content": text}], [field])


def _messages(value: Any, field: str) -> _Turns:
    if not isinstance(value, list):
        _fail(f"expected a list of messages, got {type(value).__name__}", field)
    pairs = [_message(turn, f"{field}[{i}]") for i, turn in enumerate(value)]
    return _Turns([m for m, _ in pairs], [f for _, f in pairs])


def _transcript(text: str, field: str) -> _Turns:
    r"""Parse an HH-RLHF transcript ``"\n\nHuman: ...\n\nAssistant: ..."`` into turns."""
    parts = _TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        _fail(
            'expected a transcript of "\\n\\nHuman: ..." / "\\n\\nAssistant: ..." turns '
            "(or a prompt column)",
            field,
        )
    turns = zip(parts[1::2], parts[2::2], strict=True)
    return _Turns(
        [
            {"role": "user" if who == "Human" else "assistant", "content": said.strip()}
            for who, said in turns
        ],
        [f"{field} (turn {i})" for i in range(1, len(parts) // 2 + 1)],
    )


def _check_content(turns: _Turns) -> None:
    for message, where in zip(turns.messages, turns.fields, strict=True):
        if not message["content"].strip():
            _drop("empty-content", f"{message['role']} message is empty", where)


def _check_conversation(turns: _Turns, field: str) -> list[Message]:
    """The guards every conversation passes: non-empty content, ends with the assistant."""
    messages = turns.messages
    if not messages:
        _drop("empty-content", "conversation has no messages", field)
    _check_content(turns)
    if all(m["role"] != "assistant" for m in messages):
        _drop("no-assistant-turn", "conversation has no assistant turn to train on", field)
    if messages[-1]["role"] != "assistant":
        _drop(
            "ends-with-user-turn",
            f"conversation ends with a {messages[-1]['role']} turn; expected the assistant's reply "
            "last (nothing would be learned from the trailing turn)",
            turns.fields[-1],
        )
    return messages


def _with_system(turns: _Turns, view: _View, system_prompt: str | None) -> _Turns:
    """Put the row's ``system`` column (else ``system_prompt``) first, unless one is there."""
    system = view.string("system") if view.has("system") else system_prompt
    if system and not (turns.messages and turns.messages[0]["role"] == "system"):
        where = view.name("system") if view.has("system") else "system_prompt"
        return _one("system", system, where) + turns
    return turns


# ---------------------------------------------------------------------------- conversations


def _turns(view: _View, canonical: str, *, role: Role) -> _Turns:
    """A column holding either one string (a ``role`` message) or a list of messages."""
    value = view.get(canonical)
    if isinstance(value, str):
        return _one(role, value, view.name(canonical))
    return _messages(value, view.name(canonical))


def _alpaca(view: _View) -> _Turns:
    instruction = view.string("instruction")
    extra = view.string("input") if view.has("input") else ""
    prompt = f"{instruction}\n\n{extra}" if instruction.strip() and extra.strip() else instruction
    return _one("user", prompt, view.name("instruction")) + _turns(view, "output", role="assistant")


def _preference_sft(view: _View) -> _Turns:
    """SFT on preference data trains on the chosen side: the prompt plus the chosen reply."""
    chosen = _side(view, "chosen", whole=not view.has("prompt"))
    if chosen.messages and chosen.messages[0]["role"] != "assistant":
        return chosen
    return _prompt(view) + chosen


def _conversation(view: _View, fmt: str, system_prompt: str | None) -> list[Message]:
    if fmt in {"messages", "sharegpt"}:
        column = "messages" if fmt == "messages" else "conversations"
        turns, where = _messages(view.get(column), view.name(column)), view.name(column)
    elif fmt == "alpaca":
        turns, where = _alpaca(view), view.name("output")
    elif fmt == "promptCompletion":
        turns = _turns(view, "prompt", role="user") + _turns(view, "completion", role="assistant")
        where = view.name("completion")
    elif fmt == "preference":
        turns, where = _preference_sft(view), view.name("chosen")
    elif fmt == "oasst":
        turns, where = _oasst_path(view.get("prompt"), view.name("prompt")), view.name("prompt")
    else:
        raise ValueError(f"format {fmt!r} has no conversations; expected one of {FORMATS[:-1]}")
    return _check_conversation(_with_system(turns, view, system_prompt), where)


def to_conversation(
    row: Mapping[str, Any],
    fmt: str,
    columns: Mapping[str, str],
    *,
    system_prompt: str | None = None,
) -> list[Message]:
    """Map one row to a conversation (a list of role/content messages ending with assistant).

    Args:
        row: the row as read from the source.
        fmt: one of :data:`FORMATS` except ``text``, or ``auto`` (see :func:`detect_format`).
            ``preference`` yields the prompt plus the chosen reply; ``oasst`` one path of the
            tree (:func:`oasst_path`).
        columns: canonical name -> source column name (or dotted path).
        system_prompt: a system message for conversations that have none and no ``system``
            column.

    Raises:
        DataInvalid: the row is malformed, or has nothing to train on; names the field.
        ValueError: ``fmt`` is ``text`` or unknown.
    """
    resolved = detect_format(row, columns) if fmt == "auto" else fmt
    return _single(lambda: _conversation(_View(row, columns), resolved, system_prompt))


# ---------------------------------------------------------------------------- preference


def _side(view: _View, canonical: str, *, whole: bool) -> _Turns:
    """Chosen or rejected: a message list, a reply string, or (``whole``) a transcript."""
    value = view.get(canonical)
    if isinstance(value, str):
        field = view.name(canonical)
        return _transcript(value, field) if whole else _one("assistant", value, field)
    return _messages(value, view.name(canonical))


def _prompt(view: _View) -> _Turns:
    """The prompt column: messages, a transcript ending ``Assistant:``, or one user string."""
    value, field = view.get("prompt"), view.name("prompt")
    if not isinstance(value, str):
        return _messages(value, field)
    if not _TURN.match(value):
        return _one("user", value, field)
    turns = _transcript(value, field)
    last = turns.messages[-1]
    if last["role"] == "assistant" and not last["content"]:  # "...\n\nAssistant:" awaits a reply
        return _Turns(turns.messages[:-1], turns.fields[:-1])
    return turns


def _pair_parts(view: _View) -> tuple[_Turns, _Turns, _Turns]:
    """Prompt, chosen and rejected of a preference row, before the pair guards."""
    has_prompt = view.has("prompt")
    chosen = _side(view, "chosen", whole=not has_prompt)
    rejected = _side(view, "rejected", whole=not has_prompt)
    for side, canonical in ((chosen, "chosen"), (rejected, "rejected")):
        if not side.messages:
            _drop("empty-reply", f"{canonical} holds no messages", view.name(canonical))
    whole = [side.messages[0]["role"] != "assistant" for side in (chosen, rejected)]
    if whole[0] != whole[1]:
        _fail(
            "expected chosen and rejected both as whole conversations or both as replies",
            view.name("rejected"),
        )
    if whole[0]:  # whole conversations: the shared turns before the final reply are the prompt
        if chosen.messages[:-1] != rejected.messages[:-1]:
            _drop(
                "prefix-mismatch",
                "chosen and rejected differ before their final reply, so they share no prompt; "
                "expected identical turns except the last",
                f"{view.name('chosen')}/{view.name('rejected')}",
            )
        last = len(chosen.messages) - 1
        prompt = _Turns(chosen.messages[:last], chosen.fields[:last])
        return (
            prompt,
            _Turns(chosen.messages[last:], chosen.fields[last:]),
            _Turns(rejected.messages[last:], rejected.fields[last:]),
        )
    if not has_prompt:
        _fail("missing field: chosen and rejected are replies, so a prompt is needed", "prompt")
    for side, canonical in ((chosen, "chosen"), (rejected, "rejected")):
        if any(message["role"] != "assistant" for message in side.messages):
            _fail("expected only assistant replies after the prompt", view.name(canonical))
    return _prompt(view), chosen, rejected


def _preference(view: _View) -> PreferenceExample:
    prompt, chosen, rejected = _pair_parts(view)
    prompt = _with_system(prompt, view, None)
    for side, canonical in ((chosen, "chosen"), (rejected, "rejected")):
        if not all(m["content"].strip() for m in side.messages):
            _drop("empty-reply", f"{canonical} reply is empty", view.name(canonical))
        if side.messages[-1]["role"] != "assistant":
            _drop("ends-with-user-turn", f"{canonical} is not an assistant reply", side.fields[-1])
    _check_content(prompt)
    if not any(m["role"] == "user" for m in prompt.messages):
        _drop("empty-content", "prompt has no user turn", view.name("prompt"))
    if chosen.messages == rejected.messages:
        _drop(
            "identical-pair",
            "chosen and rejected are identical; expected two different replies",
            f"{view.name('chosen')}/{view.name('rejected')}",
        )
    return {"prompt": prompt.messages, "chosen": chosen.messages, "rejected": rejected.messages}


def to_preference(
    row: Mapping[str, Any], fmt: str, columns: Mapping[str, str]
) -> PreferenceExample:
    """Map one ``preference`` row to ``{"prompt", "chosen", "rejected"}`` message lists.

    Accepted shapes (see the module docstring): prompt + chosen + rejected as strings or
    message lists; or chosen + rejected as whole conversations or HH-RLHF transcripts, whose
    shared turns before the final reply become the prompt (as trl's ``extract_prompt``, but
    only the final turn may differ).

    Args:
        row: the row as read from the source.
        fmt: ``preference`` or ``auto``. OpenAssistant trees yield several pairs: use
            :func:`oasst_pairs`.
        columns: canonical name -> source column name (or dotted path).

    Raises:
        DataInvalid: malformed row, empty or identical replies, or transcripts that differ
            before their final reply; names the field.
        ValueError: ``fmt`` is not a single-pair preference format.
    """
    if fmt == "auto":
        fmt = detect_format(row, columns)
    if fmt != "preference":
        raise ValueError(f"format {fmt!r} holds no single preference pair; expected preference")
    return _single(lambda: _preference(_View(row, columns)))


# ---------------------------------------------------------------------------- OpenAssistant


def _node_ok(node: Any, field: str) -> bool:
    """Check a tree message's shape; True if it is usable (not deleted, has text)."""
    if not isinstance(node, Mapping):
        _fail(f"expected a message object, got {type(node).__name__}", field)
    if node.get("role") not in {"prompter", "assistant"}:
        _fail(f"unknown role {node.get('role')!r}; expected prompter or assistant", f"{field}.role")
    if not isinstance(node.get("text"), str):
        _fail("expected a string", f"{field}.text")
    if not isinstance(node.get("replies", []), list):
        _fail("expected a list of messages", f"{field}.replies")
    rank = node.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        _fail(f"expected an integer rank or null, got {rank!r}", f"{field}.rank")
    return not node.get("deleted", False) and bool(node["text"].strip())


def _replies(node: Mapping[str, Any], field: str) -> list[tuple[Mapping[str, Any], str]]:
    """The usable replies of a tree message, with their field paths."""
    found = [(reply, f"{field}.replies[{i}]") for i, reply in enumerate(node.get("replies") or [])]
    return [(reply, where) for reply, where in found if _node_ok(reply, where)]


def _tree_message(node: Mapping[str, Any]) -> Message:
    return {"role": "user" if node["role"] == "prompter" else "assistant", "content": node["text"]}


def _rank_key(item: tuple[int, tuple[Mapping[str, Any], str]]) -> tuple[bool, int, int]:
    index, (node, _) = item
    rank = node.get("rank")
    return (rank is None, rank or 0, index)


def _root(tree: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(tree, Mapping):
        _fail(f"expected an OpenAssistant message tree, got {type(tree).__name__}", field)
    if not _node_ok(tree, field):
        _drop("deleted-root", "the tree's root message is deleted or empty", field)
    if tree["role"] != "prompter":
        _fail("expected the tree's root message to be a prompter message", f"{field}.role")
    return tree


def oasst_path(tree: Any, *, field: str = "prompt") -> list[Message]:
    """The conversation along one root-to-leaf path of an OpenAssistant message tree.

    From the root prompter message, each step takes the best-ranked reply (lowest ``rank``;
    0 is best), else the first; prompter replies carry no rank, so the first is taken. Deleted
    messages (and messages with blank text) are skipped with their replies. The path is cut
    after its last assistant message, since a trailing prompter message has no reply to learn.
    Synthetic (model-written) messages are kept; filter on ``synthetic`` beforehand if needed.

    Args:
        tree: the ``prompt`` object of an OASST export row (``message_tree_id``, ``prompt``).
        field: the field name used in errors.

    Raises:
        DataInvalid: a malformed message (role, text, replies, rank), or no usable path.
    """
    return _single(lambda: _check_conversation(_oasst_path(tree, field), field))


def _oasst_path(tree: Any, field: str) -> _Turns:
    node, where = _root(tree, field), field
    path = [(_tree_message(node), f"{where}.text")]
    while replies := _replies(node, where):
        node, where = min(enumerate(replies), key=_rank_key)[1]
        path.append((_tree_message(node), f"{where}.text"))
    last = max((i for i, (m, _) in enumerate(path) if m["role"] == "assistant"), default=0)
    return _Turns([m for m, _ in path[: last + 1]], [f for _, f in path[: last + 1]])


def oasst_pairs(tree: Any, *, field: str = "prompt") -> list[PreferenceExample]:
    """Preference pairs from the ranked sibling replies of an OpenAssistant message tree.

    At every prompter message with at least two usable ranked assistant replies, the best
    (lowest rank) is chosen and the worst rejected; the prompt is the path from the root to
    that message. Deleted or blank messages are skipped with their replies; equal ranks or
    texts give no pair.

    Args:
        tree: the ``prompt`` object of an OASST export row.
        field: the field name used in errors.

    Returns:
        The pairs, shallowest first (depth-first order); empty if no node is ranked.

    Raises:
        DataInvalid: a malformed message (role, text, replies, rank).
    """
    return _single(lambda: list(_walk_pairs(_root(tree, field), field, [])))


def _walk_pairs(
    node: Mapping[str, Any], field: str, before: list[Message]
) -> Iterator[PreferenceExample]:
    path = [*before, _tree_message(node)]
    replies = _replies(node, field)
    if node["role"] == "prompter":
        ranked = [
            (reply["rank"], i, reply)
            for i, (reply, _) in enumerate(replies)
            if reply["role"] == "assistant" and reply.get("rank") is not None
        ]
        if len(ranked) >= 2:
            best, worst = min(ranked, key=lambda r: r[:2])[2], max(ranked, key=lambda r: r[:2])[2]
            if best["rank"] != worst["rank"] and best["text"] != worst["text"]:
                yield {
                    "prompt": path,
                    "chosen": [_tree_message(best)],
                    "rejected": [_tree_message(worst)],
                }
    for reply, where in replies:
        yield from _walk_pairs(reply, where, path)


# ---------------------------------------------------------------------------- whole datasets


def _single(convert: Callable[[], _T]) -> _T:
    """Run a one-row conversion, turning its problem into DataInvalid."""
    try:
        return convert()
    except _Problem as problem:
        raise DataInvalid(problem.message, field=problem.field) from None


def _examples(
    view: _View, fmt: str, objective: Objective, system_prompt: str | None
) -> list[Example]:
    if objective != "sft":
        if fmt == "oasst":
            where = view.name("prompt")
            pairs = list(_walk_pairs(_root(view.get("prompt"), where), where, []))
            if not pairs:
                _drop(
                    "no-ranked-pair",
                    "tree has no message with two differently ranked replies",
                    view.name("prompt"),
                )
            return [dict(pair) for pair in pairs]
        return [dict(_preference(view))]
    if fmt == "text":
        text = view.string("text")
        if not text.strip():
            _drop("empty-content", "text is empty", view.name("text"))
        return [{"text": text}]
    return [{"messages": _conversation(view, fmt, system_prompt)}]


def _describe(row: Row, problem: _Problem, *, source: bool = True) -> str:
    field = f", field {problem.field}" if problem.field else ""
    return f"{row.source + ', ' if source else ''}row {row.row}{field}: {problem.message}"


def _listing(problems: list[tuple[Row, _Problem]], total: int, what: str) -> DataInvalid:
    """One DataInvalid naming the first problem, listing up to five and counting them all."""
    first_row, first = problems[0]
    shown = [_describe(r, p, source=r.source != first_row.source) for r, p in problems[1:5]]
    more = len(problems) - 1 - len(shown)
    return DataInvalid(
        f"{first.message} ({len(problems)} of {total} rows {what}"
        f"{'; next: ' + '; '.join(shown) if shown else ''}"
        f"{f'; and {more} more' if more else ''})",
        source=first_row.source,
        row=first_row.row,
        field=first.field,
    )


def convert_rows(
    rows: Sequence[Row],
    fmt: str,
    columns: Mapping[str, str],
    *,
    objective: Objective,
    system_prompt: str | None = None,
    max_dropped_fraction: float = 0.05,
) -> tuple[list[Example], ConversionSummary]:
    """Convert every row into trl-ready examples, or fail before training with all problems.

    Args:
        rows: the rows, as loaded by :mod:`kubetune_runtime.data.loading`.
        fmt: one of :data:`FORMATS`, or ``auto`` to detect it from the first row (all rows
            are then read in that format).
        columns: canonical name -> source column name (or dotted path).
        objective: ``sft`` gives ``{"messages": [...]}`` (``{"text": ...}`` for format text;
            preference rows give their prompt plus the chosen reply); ``dpo``/``orpo`` give
            :class:`PreferenceExample` dicts and need format preference or oasst.
        system_prompt: system message for conversations without one (SFT only).
        max_dropped_fraction: the share of rows that may be dropped for having nothing to
            train on before the whole dataset is rejected (0 drops nothing silently).

    Returns:
        The examples, and a :class:`ConversionSummary` (rows read, converted, dropped by reason).

    Raises:
        DataInvalid: no rows; an unknown format or column name; a format that does not fit
            the objective; any malformed row (listing up to five with row numbers, and the
            total); more dropped rows than allowed; or no example at all.
        ValueError: ``max_dropped_fraction`` is outside [0, 1].
    """
    if not 0 <= max_dropped_fraction <= 1:
        raise ValueError(f"max_dropped_fraction must be within [0, 1], got {max_dropped_fraction}")
    if not rows:
        raise DataInvalid("no rows to convert; expected at least one")
    _check_columns(columns)
    if fmt == "auto":
        try:
            fmt = detect_format(rows[0].data, columns)
        except DataInvalid as exc:
            raise DataInvalid(str(exc), source=rows[0].source, row=rows[0].row) from None
    if fmt not in FORMATS:
        raise DataInvalid(f"unknown format {fmt!r}; expected auto or one of {list(FORMATS)}")
    if objective != "sft" and fmt not in PREFERENCE_FORMATS:
        raise DataInvalid(
            f"objective {objective} trains on preference pairs, but format {fmt} has none; "
            f"expected a format among {list(PREFERENCE_FORMATS)}",
            source=rows[0].source,
        )
    examples: list[Example] = []
    errors: list[tuple[Row, _Problem]] = []
    drops: list[tuple[Row, _Problem]] = []
    for row in rows:
        try:
            examples.extend(_examples(_View(row.data, columns), fmt, objective, system_prompt))
        except _Problem as problem:
            (errors if problem.drop is None else drops).append((row, problem))
    if errors:
        raise _listing(errors, len(rows), f"do not fit format {fmt} (check format and columns)")
    if drops and (len(drops) > max_dropped_fraction * len(rows) or not examples):
        limit = f"more than the {max_dropped_fraction:.0%} allowed" if examples else "none is left"
        raise _listing(drops, len(rows), f"have nothing to train on, {limit}")
    summary = ConversionSummary(
        format=fmt,
        objective=objective,
        rows_read=len(rows),
        rows_converted=len(rows) - len(drops),
        examples=len(examples),
        dropped=dict(Counter(p.drop for _, p in drops if p.drop)),
        problems=tuple(_describe(row, problem) for row, problem in drops[:5]),
    )
    return examples, summary
