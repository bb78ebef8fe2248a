"""Every row format maps to trl's conversational form; every guard names source, row and field."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from kubetune_runtime.data.formats import (
    convert_rows,
    detect_format,
    oasst_pairs,
    oasst_path,
    to_conversation,
    to_preference,
)
from kubetune_runtime.data.loading import Row, load_rows
from kubetune_runtime.errors import DataInvalid

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
GSM8K = {"prompt": "question", "completion": "answer"}
SELF_INSTRUCT = {"input": "instances.0.input", "output": "instances.0.output"}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def bot(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def node(role: str, text: str, *replies: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """An OpenAssistant tree message."""
    return {"role": role, "text": text, "deleted": False, "replies": list(replies), **extra}


def rows(*datas: dict[str, Any]) -> list[Row]:
    return [Row("mem.jsonl", i, data) for i, data in enumerate(datas, start=1)]


def need(relative: str) -> Path:
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"shared data not present: {path}")
    return path


TREE = node(
    "prompter",
    "Q1",
    node("assistant", "worst", rank=2),
    node(
        "assistant",
        "best",
        node("prompter", "deleted follow-up", node("assistant", "hidden", rank=0), deleted=True),
        node("prompter", "Q2", node("assistant", "A2 first"), node("assistant", "A2 second")),
        rank=0,
    ),
    node("assistant", "middle", node("prompter", "dangling"), rank=1),
)

# ---------------------------------------------------------------------------- conversations

CONVERSATIONS = [
    pytest.param(
        "messages",
        {},
        {"messages": [user("hi"), bot("hello")]},
        [user("hi"), bot("hello")],
        id="messages",
    ),
    pytest.param(
        "messages",
        {},
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": "c", "name": "ignored"},
            ]
        },
        [user("a\nb"), bot("c")],
        id="messages-text-parts",
    ),
    pytest.param(
        "messages",
        {"messages": "dialog"},
        {"dialog": [system("sys"), user("hi"), bot("yo"), user("more"), bot("sure")]},
        [system("sys"), user("hi"), bot("yo"), user("more"), bot("sure")],
        id="messages-renamed-multi-turn",
    ),
    pytest.param(
        "sharegpt",
        {},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        [user("hi"), bot("yo")],
        id="sharegpt-human-gpt",
    ),
    pytest.param(
        "sharegpt",
        {},
        {
            "conversations": [
                {"from": "System", "value": "s"},
                {"from": "prompter", "value": "p"},
                {"from": "bot", "value": "b"},
                {"from": "USER", "value": "u"},
                {"from": "model", "value": "m"},
                {"from": "human", "value": "h"},
                {"from": "chatgpt", "value": "c"},
            ]
        },
        [system("s"), user("p"), bot("b"), user("u"), bot("m"), user("h"), bot("c")],
        id="sharegpt-role-aliases",
    ),
    pytest.param(
        "alpaca",
        {},
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
        [user("Translate.\n\nBonjour"), bot("Hello")],
        id="alpaca-with-input",
    ),
    pytest.param(
        "alpaca",
        {},
        {"instruction": "Say hi.", "input": "  ", "output": "Hi"},
        [user("Say hi."), bot("Hi")],
        id="alpaca-blank-input",
    ),
    pytest.param(
        "alpaca",
        {},
        {"instruction": "Say hi.", "input": None, "output": "Hi", "system": "Be kind."},
        [system("Be kind."), user("Say hi."), bot("Hi")],
        id="alpaca-null-input-system-column",
    ),
    pytest.param(
        "alpaca",
        SELF_INSTRUCT,
        {"instruction": "Add.", "instances": [{"input": "1+1", "output": "2"}]},
        [user("Add.\n\n1+1"), bot("2")],
        id="alpaca-self-instruct-dotted-columns",
    ),
    pytest.param(
        "promptCompletion",
        GSM8K,
        {"question": "2+2?", "answer": "4\n#### 4"},
        [user("2+2?"), bot("4\n#### 4")],
        id="prompt-completion-gsm8k-columns",
    ),
    pytest.param(
        "promptCompletion",
        {},
        {"prompt": [system("s"), user("q")], "completion": [bot("a")]},
        [system("s"), user("q"), bot("a")],
        id="prompt-completion-conversational",
    ),
    pytest.param(
        "preference",
        {},
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        [user("q"), bot("good")],
        id="preference-sft-trains-on-chosen",
    ),
    pytest.param(
        "preference",
        {},
        {"chosen": "\n\nHuman: q\n\nAssistant: good", "rejected": "\n\nHuman: q\n\nAssistant: no"},
        [user("q"), bot("good")],
        id="preference-sft-hh-transcript",
    ),
    pytest.param(
        "oasst",
        {},
        {"message_tree_id": "t", "prompt": TREE},
        [user("Q1"), bot("best"), user("Q2"), bot("A2 first")],
        id="oasst",
    ),
    pytest.param(
        "auto",
        {},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        [user("hi"), bot("yo")],
        id="auto",
    ),
]


@pytest.mark.parametrize(("fmt", "columns", "row", "expected"), CONVERSATIONS)
def test_to_conversation(
    fmt: str, columns: dict[str, str], row: dict[str, Any], expected: list[dict[str, str]]
) -> None:
    assert to_conversation(row, fmt, columns) == expected


def test_system_prompt_applies_only_without_a_system_message() -> None:
    plain = {"messages": [user("hi"), bot("yo")]}
    assert to_conversation(plain, "messages", {}, system_prompt="S")[0] == system("S")
    own = {"messages": [system("mine"), user("hi"), bot("yo")]}
    assert to_conversation(own, "messages", {}, system_prompt="S")[0] == system("mine")
    column = {**plain, "system": "col"}
    assert to_conversation(column, "messages", {}, system_prompt="S")[0] == system("col")


def test_text_format_gives_text_examples() -> None:
    examples, summary = convert_rows(
        rows({"text": "Once upon a time."}), "auto", {}, objective="sft"
    )
    assert examples == [{"text": "Once upon a time."}]
    assert (summary.format, summary.examples) == ("text", 1)
    with pytest.raises(ValueError, match="has no conversations"):
        to_conversation({"text": "x"}, "text", {})


# ---------------------------------------------------------------------------- detection

DETECTIONS = [
    pytest.param({"messages": []}, {}, "messages", id="messages"),
    pytest.param({"conversations": [], "id": "x"}, {}, "sharegpt", id="sharegpt"),
    pytest.param({"instruction": "", "input": "", "output": ""}, {}, "alpaca", id="alpaca"),
    pytest.param({"prompt": "", "completion": ""}, {}, "promptCompletion", id="prompt-completion"),
    pytest.param({"question": "", "answer": ""}, GSM8K, "promptCompletion", id="gsm8k-renamed"),
    pytest.param({"chosen": "", "rejected": ""}, {}, "preference", id="preference-implicit"),
    pytest.param({"prompt": "", "chosen": "", "rejected": ""}, {}, "preference", id="preference"),
    pytest.param({"prompt": {"role": "prompter"}}, {}, "oasst", id="oasst"),
    pytest.param({"text": ""}, {}, "text", id="text"),
    pytest.param(
        {"text": "", "answer": ""},
        {"prompt": "text", "completion": "answer"},
        "promptCompletion",
        id="source-column-hidden",
    ),
    pytest.param(
        {"instruction": "", "instances": [{"output": ""}]},
        {"output": "instances.0.output"},
        "alpaca",
        id="dotted",
    ),
]


@pytest.mark.parametrize(("row", "columns", "expected"), DETECTIONS)
def test_detect_format(row: dict[str, Any], columns: dict[str, str], expected: str) -> None:
    assert detect_format(row, columns) == expected


@pytest.mark.parametrize(
    ("row", "columns", "expected"),
    [
        pytest.param({"question": "", "answer": ""}, {}, "matches no known format", id="unknown"),
        pytest.param({"messages": [], "text": ""}, {}, "matches several formats", id="ambiguous"),
        pytest.param({"prompt": ""}, {}, "matches no known format", id="prompt-alone"),
    ],
)
def test_detect_format_errors_list_keys_and_formats(
    row: dict[str, Any], columns: dict[str, str], expected: str
) -> None:
    with pytest.raises(DataInvalid, match=expected) as caught:
        detect_format(row, columns)
    message = str(caught.value)
    assert all(key in message for key in row)
    assert "promptCompletion: prompt, completion" in message


def test_unknown_canonical_column_is_rejected() -> None:
    with pytest.raises(DataInvalid, match="unknown names \\['question'\\]"):
        detect_format({"q": 1}, {"question": "q"})


# ---------------------------------------------------------------------------- preference

PREFERENCES = [
    pytest.param(
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"prompt": [user("q")], "chosen": [bot("good")], "rejected": [bot("bad")]},
        id="strings",
    ),
    pytest.param(
        {"prompt": [user("q")], "chosen": [bot("good")], "rejected": [bot("bad")], "system": "S"},
        {"prompt": [system("S"), user("q")], "chosen": [bot("good")], "rejected": [bot("bad")]},
        id="trl-conversational-with-system",
    ),
    pytest.param(
        {
            "chosen": "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant: good",
            "rejected": "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant: bad",
        },
        {
            "prompt": [user("q1"), bot("a1"), user("q2")],
            "chosen": [bot("good")],
            "rejected": [bot("bad")],
        },
        id="hh-rlhf-transcripts",
    ),
    pytest.param(
        {
            "prompt": "q",  # ignored: chosen and rejected already hold it (UltraFeedback layout)
            "chosen": [user("q"), bot("good")],
            "rejected": [user("q"), bot("bad")],
        },
        {"prompt": [user("q")], "chosen": [bot("good")], "rejected": [bot("bad")]},
        id="whole-conversations",
    ),
    pytest.param(
        {"prompt": "\n\nHuman: q\n\nAssistant:", "chosen": " good", "rejected": " bad"},
        {"prompt": [user("q")], "chosen": [bot(" good")], "rejected": [bot(" bad")]},
        id="transcript-prompt",
    ),
]


@pytest.mark.parametrize(("row", "expected"), PREFERENCES)
def test_to_preference(row: dict[str, Any], expected: dict[str, Any]) -> None:
    assert to_preference(row, "auto", {}) == expected


def test_to_preference_rejects_other_formats() -> None:
    with pytest.raises(ValueError, match="oasst"):
        to_preference({"prompt": TREE}, "oasst", {})


# ---------------------------------------------------------------------------- OpenAssistant


def test_oasst_path_follows_best_rank_skips_deleted_and_cuts_trailing_prompter() -> None:
    assert oasst_path(TREE) == [user("Q1"), bot("best"), user("Q2"), bot("A2 first")]
    dangling = node("prompter", "Q", node("assistant", "A", node("prompter", "unanswered")))
    assert oasst_path(dangling) == [user("Q"), bot("A")]
    unranked = node("prompter", "Q", node("assistant", "first"), node("assistant", "second"))
    assert oasst_path(unranked) == [user("Q"), bot("first")]


def test_oasst_pairs_best_against_worst_rank_at_each_ranked_node() -> None:
    nested = node("prompter", "Q", node("assistant", "x", rank=0), node("assistant", "y", rank=1))
    tree = node(
        "prompter",
        "Q0",
        node("assistant", "good", nested, rank=0),
        node("assistant", "bad", rank=3),
    )
    assert oasst_pairs(tree) == [
        {"prompt": [user("Q0")], "chosen": [bot("good")], "rejected": [bot("bad")]},
        {
            "prompt": [user("Q0"), bot("good"), user("Q")],
            "chosen": [bot("x")],
            "rejected": [bot("y")],
        },
    ]
    assert oasst_pairs(TREE) == [
        {"prompt": [user("Q1")], "chosen": [bot("best")], "rejected": [bot("worst")]}
    ]
    tied = node("prompter", "Q", node("assistant", "a", rank=0), node("assistant", "b", rank=0))
    assert oasst_pairs(tied) == []


# ---------------------------------------------------------------------------- guards

GOOD = {
    "messages": {"messages": [user("q"), bot("a")]},
    "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    "alpaca": {"instruction": "i", "output": "o"},
    "promptCompletion": {"prompt": "p", "completion": "c"},
    "preference": {"prompt": "p", "chosen": "c", "rejected": "r"},
    "oasst": {"prompt": TREE},
    "text": {"text": "t"},
}

ERRORS = [  # malformed rows: fatal, whatever the drop allowance
    pytest.param(
        "messages",
        "sft",
        {"messages": "hi"},
        "messages",
        "expected a list of messages",
        id="messages-not-list",
    ),
    pytest.param(
        "messages", "sft", {"chat": []}, "messages", "missing or null", id="missing-field"
    ),
    pytest.param(
        "messages",
        "sft",
        {"messages": [user("q"), {"role": "tool", "content": "x"}]},
        "messages[1].role",
        "unknown role 'tool'",
        id="unknown-role",
    ),
    pytest.param(
        "messages",
        "sft",
        {"messages": [user("q"), {"role": "assistant"}]},
        "messages[1]",
        "expected role and content",
        id="message-without-content",
    ),
    pytest.param(
        "messages",
        "sft",
        {"messages": [user("q"), {"role": "assistant", "content": 7}]},
        "messages[1].content",
        "expected a string or a list of text parts",
        id="content-wrong-type",
    ),
    pytest.param(
        "messages",
        "sft",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}, bot("a")]},
        "messages[0].content[0]",
        "expected text parts",
        id="non-text-part",
    ),
    pytest.param(
        "sharegpt",
        "sft",
        {"conversations": [{"from": "human", "value": "q"}, "gpt: a"]},
        "conversations[1]",
        "expected a message object",
        id="turn-not-object",
    ),
    pytest.param(
        "alpaca",
        "sft",
        {"instruction": ["i"], "output": "o"},
        "instruction",
        "expected a string",
        id="alpaca-wrong-type",
    ),
    pytest.param(
        "promptCompletion",
        "sft",
        {"question": "q"},
        "answer",
        "missing or null (mapped to completion)",
        id="renamed-column-missing",
    ),
    pytest.param(
        "preference",
        "dpo",
        {"chosen": "good", "rejected": "bad"},
        "chosen",
        "expected a transcript",
        id="reply-without-prompt",
    ),
    pytest.param(
        "preference",
        "dpo",
        {"chosen": [user("q"), bot("a")], "rejected": [bot("b")]},
        "rejected",
        "both as whole conversations or both as replies",
        id="mixed-pair",
    ),
    pytest.param(
        "oasst",
        "sft",
        {"prompt": node("prompter", "q", node("moderator", "x"))},
        "prompt.replies[0].role",
        "unknown role 'moderator'",
        id="oasst-role",
    ),
    pytest.param(
        "oasst",
        "dpo",
        {"prompt": node("prompter", "q", node("assistant", "x", rank="1"))},
        "prompt.replies[0].rank",
        "expected an integer rank",
        id="oasst-rank",
    ),
    pytest.param("text", "sft", {"text": 3}, "text", "expected a string", id="text-wrong-type"),
]

DROPS = [  # well-formed rows with nothing to train on: dropped, fatal beyond the allowance
    pytest.param(
        "messages",
        "sft",
        {"messages": [user("q"), bot(" ")]},
        "messages[1].content",
        "empty-content",
        id="empty-content",
    ),
    pytest.param(
        "messages", "sft", {"messages": []}, "messages", "empty-content", id="empty-conversation"
    ),
    pytest.param(
        "messages",
        "sft",
        {"messages": [system("s"), user("q")]},
        "messages",
        "no-assistant-turn",
        id="no-assistant-turn",
    ),
    pytest.param(
        "sharegpt",
        "sft",
        {
            "conversations": [
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
                {"from": "human", "value": "more?"},
            ]
        },
        "conversations[2].value",
        "ends-with-user-turn",
        id="trailing-user-turn",
    ),
    pytest.param(
        "alpaca",
        "sft",
        {"instruction": "", "output": "o"},
        "instruction",
        "empty-content",
        id="alpaca-empty-instruction",
    ),
    pytest.param(
        "promptCompletion",
        "sft",
        {"question": "q", "answer": ""},
        "answer",
        "empty-content",
        id="empty-completion",
    ),
    pytest.param(
        "preference",
        "dpo",
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        "chosen/rejected",
        "identical-pair",
        id="identical-pair",
    ),
    pytest.param(
        "preference",
        "orpo",
        {"prompt": "p", "chosen": "", "rejected": "r"},
        "chosen",
        "empty-reply",
        id="empty-chosen",
    ),
    pytest.param(
        "preference",
        "dpo",
        {"prompt": "p", "chosen": "c", "rejected": []},
        "rejected",
        "empty-reply",
        id="empty-rejected",
    ),
    pytest.param(
        "preference",
        "dpo",
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
        "chosen/rejected",
        "prefix-mismatch",
        id="hh-prefix-mismatch",
    ),
    pytest.param(
        "preference",
        "dpo",
        {"prompt": [], "chosen": "c", "rejected": "r"},
        "prompt",
        "empty-content",
        id="empty-prompt",
    ),
    pytest.param(
        "oasst",
        "sft",
        {"prompt": node("prompter", "q", deleted=True)},
        "prompt",
        "deleted-root",
        id="oasst-deleted-root",
    ),
    pytest.param(
        "oasst",
        "sft",
        {"prompt": node("prompter", "q")},
        "prompt",
        "no-assistant-turn",
        id="oasst-unanswered",
    ),
    pytest.param(
        "oasst",
        "dpo",
        {"prompt": node("prompter", "q", node("assistant", "a", rank=0))},
        "prompt",
        "no-ranked-pair",
        id="oasst-no-pair",
    ),
    pytest.param("text", "sft", {"text": "\n"}, "text", "empty-content", id="empty-text"),
]


def _columns(fmt: str) -> dict[str, str]:
    return GSM8K if fmt == "promptCompletion" else {}


def _good(fmt: str) -> dict[str, Any]:
    row = GOOD[fmt]
    return (
        {"question": row["prompt"], "answer": row["completion"]}
        if fmt == "promptCompletion"
        else row
    )


@pytest.mark.parametrize(("fmt", "objective", "bad", "field", "expected"), ERRORS)
def test_malformed_rows_are_fatal(
    fmt: str, objective: Any, bad: dict[str, Any], field: str, expected: str
) -> None:
    data = [_good(fmt), _good(fmt), bad]
    with pytest.raises(DataInvalid, match="1 of 3 rows do not fit") as caught:
        convert_rows(rows(*data), fmt, _columns(fmt), objective=objective, max_dropped_fraction=1.0)
    assert (caught.value.source, caught.value.row, caught.value.field) == ("mem.jsonl", 3, field)
    assert f"mem.jsonl, row 3, field {field}: " in str(caught.value)
    assert expected in str(caught.value)


@pytest.mark.parametrize(("fmt", "objective", "bad", "field", "reason"), DROPS)
def test_rows_without_training_signal_are_dropped_and_counted(
    fmt: str, objective: Any, bad: dict[str, Any], field: str, reason: str
) -> None:
    data = [_good(fmt), _good(fmt), bad]
    examples, summary = convert_rows(
        rows(*data), fmt, _columns(fmt), objective=objective, max_dropped_fraction=0.5
    )
    assert (summary.rows_read, summary.rows_converted, dict(summary.dropped)) == (3, 2, {reason: 1})
    assert summary.problems[0].startswith(f"mem.jsonl, row 3, field {field}: ")
    assert len(examples) == summary.examples
    with pytest.raises(DataInvalid, match="more than the 5% allowed") as caught:
        convert_rows(rows(*data), fmt, _columns(fmt), objective=objective)
    assert (caught.value.row, caught.value.field) == (3, field)


# Text rows and OASST pairs have no single-row function: they go through convert_rows only.
SINGLE_ROW_DROPS = [p for p in DROPS if p.values[0] != "text" and p.values[:2] != ("oasst", "dpo")]


@pytest.mark.parametrize(("fmt", "objective", "bad", "field", "reason"), SINGLE_ROW_DROPS)
def test_single_row_functions_raise_for_drops(
    fmt: str, objective: str, bad: dict[str, Any], field: str, reason: str
) -> None:
    single = to_conversation if objective == "sft" else to_preference
    with pytest.raises(DataInvalid) as caught:
        single(bad, fmt, _columns(fmt))
    assert caught.value.field == field
    assert caught.value.row is None  # a single row: convert_rows adds source and row


def test_problems_are_listed_up_to_five_with_the_total() -> None:
    data = [GOOD["messages"]] * 3 + [
        {"messages": [user("q"), {"role": "robot", "content": "x"}]}
    ] * 7
    with pytest.raises(DataInvalid) as caught:
        convert_rows(rows(*data), "messages", {}, objective="sft")
    message = str(caught.value)
    assert message.startswith("mem.jsonl, row 4, field messages[1].role: unknown role 'robot'")
    assert "7 of 10 rows do not fit format messages" in message
    assert all(f"row {n}, field messages[1].role" in message for n in (5, 6, 7, 8))
    assert "row 9," not in message
    assert message.endswith("and 2 more)")


def test_drop_allowance() -> None:
    data = [GOOD["messages"]] * 39 + [{"messages": [user("q"), bot("")]}]
    examples, summary = convert_rows(rows(*data), "messages", {}, objective="sft")
    assert (len(examples), summary.rows_dropped) == (39, 1)
    assert str(summary) == (
        "40 rows read as messages for sft: 39 converted into 39 examples, "
        "1 dropped (1 empty-content)"
    )
    with pytest.raises(DataInvalid, match="1 of 40 rows have nothing to train on"):
        convert_rows(rows(*data), "messages", {}, objective="sft", max_dropped_fraction=0)


def test_all_rows_dropped_is_an_error_whatever_the_allowance() -> None:
    data = [{"messages": [user("q")]}] * 2
    with pytest.raises(DataInvalid, match="2 of 2 rows have nothing to train on, none is left"):
        convert_rows(rows(*data), "messages", {}, objective="sft", max_dropped_fraction=1.0)
    with pytest.raises(ValueError, match="max_dropped_fraction"):
        convert_rows(rows(*data), "messages", {}, objective="sft", max_dropped_fraction=2)


def test_listing_names_other_files() -> None:
    bad = {"messages": "x"}
    data = [Row("a.jsonl", 1, bad), Row("b.jsonl", 7, bad)]
    with pytest.raises(DataInvalid) as caught:
        convert_rows(data, "messages", {}, objective="sft")
    assert str(caught.value).startswith("a.jsonl, row 1, field messages: expected a list")
    assert "next: b.jsonl, row 7, field messages: expected a list" in str(caught.value)


def test_transcript_turns_are_named_in_errors() -> None:
    row = {"chosen": "\n\nHuman: \n\nAssistant: a", "rejected": "\n\nHuman: \n\nAssistant: b"}
    with pytest.raises(DataInvalid) as caught:
        to_preference(row, "preference", {})
    assert caught.value.field == "chosen (turn 1)"


@pytest.mark.parametrize(
    ("data", "fmt", "objective", "expected"),
    [
        pytest.param([], "auto", "sft", "no rows", id="no-rows"),
        pytest.param(
            [GOOD["alpaca"]],
            "auto",
            "dpo",
            "objective dpo trains on preference pairs",
            id="dpo-on-alpaca",
        ),
        pytest.param([GOOD["text"]], "text", "orpo", "format text has none", id="orpo-on-text"),
        pytest.param(
            [{"foo": 1}],
            "auto",
            "sft",
            "mem.jsonl, row 1: row matches no known format",
            id="undetectable",
        ),
        pytest.param([GOOD["text"]], "csv", "sft", "unknown format 'csv'", id="unknown-format"),
    ],
)
def test_dataset_level_errors(
    data: list[dict[str, Any]], fmt: str, objective: Any, expected: str
) -> None:
    with pytest.raises(DataInvalid, match=expected):
        convert_rows(rows(*data), fmt, {}, objective=objective)


# ---------------------------------------------------------------------------- the shared data


def _roles(messages: list[Mapping[str, str]]) -> list[str]:
    return [m["role"] for m in messages]


def test_gsm8k_train_converts_with_columns() -> None:
    loaded = load_rows(need("gsm8k/train.jsonl"))
    assert detect_format(loaded[0].data, GSM8K) == "promptCompletion"
    examples, summary = convert_rows(loaded, "auto", GSM8K, objective="sft")
    assert (summary.format, summary.rows_converted, summary.examples) == (
        "promptCompletion",
        7473,
        7473,
    )
    assert summary.rows_dropped == 0
    assert all(_roles(e["messages"]) == ["user", "assistant"] for e in examples)
    assert all("\n#### " in e["messages"][1]["content"] for e in examples)


def test_hh_rlhf_pairs_convert_except_unpairable_ones() -> None:
    loaded = load_rows(need("hh-rlhf/harmless-base/test.jsonl.gz"))
    examples, summary = convert_rows(loaded, "auto", {}, objective="dpo")
    assert (summary.format, summary.rows_read, summary.rows_converted) == ("preference", 2312, 2303)
    # README: 5 pairs differ before the last turn; 4 more have an empty final chosen reply.
    assert dict(summary.dropped) == {"prefix-mismatch": 5, "empty-reply": 4}
    reasons: dict[int, str] = {}
    for row in loaded:
        try:
            to_preference(row.data, "preference", {})
        except DataInvalid as exc:
            reasons[row.row] = str(exc)
    assert sorted(n for n, m in reasons.items() if "share no prompt" in m) == [
        1255,
        1689,
        1951,
        1953,
        2037,
    ]
    assert sorted(n for n, m in reasons.items() if "chosen reply is empty" in m) == [
        87,
        517,
        926,
        1104,
    ]
    assert all(e["prompt"][-1]["role"] == "user" for e in examples)
    assert all(_roles(e["chosen"]) == _roles(e["rejected"]) == ["assistant"] for e in examples)
    assert all(e["chosen"] != e["rejected"] for e in examples)
    # SFT on the same file trains on the chosen transcripts: only the empty replies are dropped.
    _, sft = convert_rows(loaded, "auto", {}, objective="sft")
    assert (sft.rows_converted, dict(sft.dropped)) == (2308, {"empty-content": 4})


def test_oasst_trees_convert_for_sft_and_preference() -> None:
    loaded = load_rows(need("oasst-en100/en_100_tree.jsonl"))
    examples, summary = convert_rows(loaded, "auto", {}, objective="sft")
    assert (summary.format, summary.rows_converted) == ("oasst", 100)
    assert all(e["messages"][-1]["role"] == "assistant" for e in examples)
    assert Counter(len(e["messages"]) for e in examples) == {2: 58, 4: 42}
    pairs, dpo = convert_rows(loaded, "oasst", {}, objective="dpo")
    assert (dpo.rows_converted, dpo.examples) == (100, 212)
    human = [r for r in loaded if not r.data["prompt"]["synthetic"]]
    human_pairs, _ = convert_rows(human, "oasst", {}, objective="orpo")
    assert (len(human), len(human_pairs)) == (95, 207)
    assert all(p["prompt"][-1]["role"] == "user" and p["chosen"] != p["rejected"] for p in pairs)


def test_fastchat_sharegpt_array_converts() -> None:
    loaded = load_rows(need("fastchat-dummy-conversation/dummy_conversation.json"))
    examples, summary = convert_rows(loaded, "auto", {}, objective="sft")
    assert (summary.format, summary.examples) == ("sharegpt", 500)
    roles = Counter(role for e in examples for role in _roles(e["messages"]))
    assert roles == {"user": 1000, "assistant": 1000}


def test_self_instruct_seed_tasks_convert_via_dotted_columns() -> None:
    loaded = load_rows(need("self-instruct/seed_tasks.jsonl"))
    examples, summary = convert_rows(loaded, "auto", SELF_INSTRUCT, objective="sft")
    assert (summary.format, summary.examples) == ("alpaca", 175)
    without_input = [
        e for e, r in zip(examples, loaded, strict=True) if not r.data["instances"][0]["input"]
    ]
    assert len(without_input) == 50
    assert all(
        e["messages"][0]["content"] == r.data["instruction"]
        for e, r in zip(examples, loaded, strict=True)
        if not r.data["instances"][0]["input"]
    )


def test_mt_bench_has_no_assistant_turns_to_train_on() -> None:
    loaded = load_rows(need("mt-bench/question.jsonl"))
    with pytest.raises(DataInvalid, match="matches no known format"):
        convert_rows(loaded, "auto", {}, objective="sft")
    turns = [Row(r.source, r.row, {"messages": [user(t) for t in r.data["turns"]]}) for r in loaded]
    with pytest.raises(DataInvalid, match="80 of 80 rows have nothing to train on"):
        convert_rows(turns, "messages", {}, objective="sft")
    assert json.dumps(loaded[0].data)  # rows stay plain JSON
