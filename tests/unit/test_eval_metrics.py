"""Evaluation metrics: answer extraction on real GSM8K, exact match, gates, judge prompts/scores."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune_runtime.config import GateConfig
from kubetune_runtime.eval.metrics import (
    SummaryRow,
    evaluate_gates,
    exact_match,
    extract_answer,
    judge_prompt,
    mean,
    normalize_number,
    parse_judge_score,
    summarize,
    win_rate,
)

GSM8K_TEST = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k" / "test.jsonl"


# ------------------------------------------------------------------------- GSM8K references


def test_every_gsm8k_test_reference_extracts_to_its_number() -> None:
    if not GSM8K_TEST.is_file():
        pytest.skip(f"GSM8K data not found at {GSM8K_TEST}")
    rows = [json.loads(line) for line in GSM8K_TEST.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 1319
    for number, row in enumerate(rows, start=1):
        literal = row["answer"].rsplit("####", 1)[1].strip()
        answer = extract_answer(row["answer"], "gsm8k")
        assert answer is not None, f"row {number}: {row['answer'][-60:]!r}"
        assert re.fullmatch(r"-?\d+(\.\d+)?", answer), (number, answer)
        assert answer == literal.replace(",", ""), (number, literal, answer)
        # The reference is correct against itself, also when written as a generation would.
        assert exact_match(extract_answer(f"So the answer is ${literal}.", "gsm8k"), answer)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72", "72"),
        ("#### 1,000", "1000"),
        ("#### 1,450,000\n", "1450000"),
        ("#### -10", "-10"),
        ("#### $18.00", "18"),
        ("#### 18.0", "18"),
        ("#### 0.50", "0.5"),
        ("She pays 5 + 3 = 8 dollars. #### 8 dollars", "8"),
        ("first #### 3 then #### 4", "4"),  # the last marker wins
        ("#### no number here", None),
        # Generations: no '####', so the last number counts.
        ("The answer is 18.", "18"),
        ("It costs $1,000.00 in total.", "1000"),
        ("3 + 4 = 7, so she has 7 apples", "7"),
        ("Pages 10-12 are missing, that is 3 pages", "3"),
        ("He read pages 10-12", "12"),  # a hyphen, not a minus sign
        ("The temperature drops to -3 degrees", "-3"),
        ("x = -3", "-3"),
        ("Count 1,2,3", "3"),  # a list, not 123
        ("1,2345", "2345"),
        ("The result is 2.5 times bigger", "2.5"),
        ("", None),
        ("I don't know.", None),
    ],
)
def test_gsm8k_extraction(text: str, expected: str | None) -> None:
    assert extract_answer(text, "gsm8k") == expected


@pytest.mark.parametrize(
    ("text", "method", "pattern", "expected"),
    [
        ("#### 5\nBut then 6", "lastNumber", None, "6"),
        ("#### 5\nBut then 6", "gsm8k", None, "5"),
        ("no digits", "lastNumber", None, None),
        ("  Paris \n", "exact", None, "Paris"),
        ("   ", "exact", None, None),
        ("The answer is (B).", "regex", r"\(([A-D])\)", "B"),
        ("The answer is B.", "regex", r"answer is ([A-D])", "B"),
        ("no choice", "regex", r"\(([A-D])\)", None),
        ("Answer: yes", "regex", r"yes|no", "yes"),  # no group: the whole match
    ],
)
def test_other_extraction_methods(
    text: str, method: str, pattern: str | None, expected: str | None
) -> None:
    assert extract_answer(text, method, pattern) == expected  # type: ignore[arg-type]


def test_regex_extraction_needs_a_valid_pattern() -> None:
    with pytest.raises(ValueError, match="answer_pattern"):
        extract_answer("x", "regex")
    with pytest.raises(ValueError, match="not a valid regex"):
        extract_answer("x", "regex", "(unclosed")
    with pytest.raises(ValueError, match="unknown answer extraction"):
        extract_answer("x", "fuzzy")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("18", "18"),
        ("18.0", "18"),
        ("18.50", "18.5"),
        ("1,000", "1000"),
        ("$1,000.00", "1000"),
        ("-0", "0"),
        ("7.", "7"),
        ("abc", None),
        ("NaN", None),
        ("Infinity", None),
        ("", None),
    ],
)
def test_normalize_number(text: str, expected: str | None) -> None:
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("18", "18", True),
        ("18.0", "18", True),
        ("1000", "1,000", True),
        ("17", "18", False),
        (None, "18", False),
        ("18", None, False),
        ("Paris", "Paris", True),
        ("paris", "Paris", False),
        (" Paris ", "Paris", True),
        ("18", "eighteen", False),
    ],
)
def test_exact_match(prediction: str | None, reference: str | None, expected: bool) -> None:
    assert exact_match(prediction, reference) is expected


# ------------------------------------------------------------------------- summary and gates


def test_summarize_pairs_candidate_and_base() -> None:
    rows = summarize(
        {"gsm8k": {"exactMatch": 0.5}, "judge": {"score": 6.0, "winRate": 0.75}},
        {"gsm8k": {"exactMatch": 0.25}, "judge": {"score": 5.0}},
    )
    assert rows == [
        {"suite": "gsm8k", "metric": "exactMatch", "candidate": 0.5, "base": 0.25, "delta": 0.25},
        {"suite": "judge", "metric": "score", "candidate": 6.0, "base": 5.0, "delta": 1.0},
        {"suite": "judge", "metric": "winRate", "candidate": 0.75, "base": None, "delta": None},
    ]


def test_summarize_without_base_and_drops_non_finite_values() -> None:
    rows = summarize({"ppl": {"loss": 2.0, "perplexity": float("inf")}}, None)
    assert rows == [
        {"suite": "ppl", "metric": "loss", "candidate": 2.0, "base": None, "delta": None}
    ]
    rows = summarize({"ppl": {"loss": 2.0}}, {"ppl": {"loss": float("nan")}})
    assert rows[0]["base"] is None
    assert rows[0]["delta"] is None


SUMMARY: list[SummaryRow] = [
    {"suite": "gsm8k", "metric": "exactMatch", "candidate": 0.31, "base": 0.33, "delta": -0.02},
    {"suite": "heldout", "metric": "loss", "candidate": 1.2, "base": 1.5, "delta": -0.3},
    {"suite": "judge", "metric": "winRate", "candidate": 0.6, "base": None, "delta": None},
]


def _gate(**fields: object) -> GateConfig:
    return GateConfig.model_validate(fields)


@pytest.mark.parametrize(
    ("gate", "passed", "message"),
    [
        (
            {"suite": "gsm8k", "metric": "exactMatch", "comparison": "gte", "threshold": 0.25},
            True,
            "exactMatch 0.31 >= 0.25",
        ),
        (
            {"suite": "gsm8k", "metric": "exactMatch", "comparison": "gt", "threshold": 0.31},
            False,
            "exactMatch 0.31 is not > 0.31",
        ),
        (
            {
                "suite": "gsm8k",
                "metric": "exactMatch",
                "comparison": "gte",
                "threshold": -0.01,
                "baseline": "base",
            },
            False,
            "exactMatch candidate - base -0.02 is not >= -0.01",
        ),
        (
            {
                "suite": "gsm8k",
                "metric": "exactMatch",
                "comparison": "gte",
                "threshold": -0.05,
                "baseline": "base",
            },
            True,
            "exactMatch candidate - base -0.02 >= -0.05",
        ),
        (
            {"suite": "heldout", "metric": "loss", "comparison": "lte", "threshold": 1.2},
            True,
            "loss 1.2 <= 1.2",
        ),
        (
            {
                "suite": "heldout",
                "metric": "loss",
                "comparison": "lt",
                "threshold": 0,
                "baseline": "base",
            },
            True,
            "loss candidate - base -0.3 < 0",
        ),
        (
            {"suite": "judge", "metric": "winRate", "comparison": "gte", "threshold": 0.5},
            True,
            "winRate 0.6 >= 0.5",
        ),
        (
            {
                "suite": "judge",
                "metric": "winRate",
                "comparison": "gte",
                "threshold": 0.5,
                "baseline": "base",
            },
            False,
            "winRate has no base value to compare with (baseline base needs compareToBase: true)",
        ),
        (
            {"suite": "gsm8k", "metric": "accuracy", "comparison": "gte", "threshold": 0.1},
            False,
            "metric accuracy of suite gsm8k is missing; suite gsm8k produced exactMatch",
        ),
        (
            {"suite": "mmlu", "metric": "mmlu/acc", "comparison": "gte", "threshold": 0.1},
            False,
            "metric mmlu/acc of suite mmlu is missing; suite mmlu produced no metrics "
            "(not run, skipped or failed)",
        ),
    ],
)
def test_gates(gate: dict[str, object], passed: bool, message: str) -> None:
    [verdict] = evaluate_gates([_gate(**gate)], SUMMARY)
    assert verdict == {
        "suite": gate["suite"],
        "metric": gate["metric"],
        "passed": passed,
        "message": message,
    }


def test_no_gates_no_verdicts() -> None:
    assert evaluate_gates([], SUMMARY) == []


# ------------------------------------------------------------------------- judge


def test_judge_prompt_with_reference_is_mt_bench_single_math() -> None:
    messages = judge_prompt("What is 2 + 2?", "2 + 2 = 4\n#### 4", "It is 5.", None)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == "You are a helpful assistant."
    user = messages[1]["content"]
    assert user.startswith("[Instruction]\nPlease act as an impartial judge")
    assert "You will be given a reference answer and the assistant's answer." in user
    assert 'strictly following this format: "[[rating]]", for example: "Rating: [[5]]".' in user
    question = user.index("[Question]\nWhat is 2 + 2?")
    reference = user.index(
        "[The Start of Reference Answer]\n2 + 2 = 4\n#### 4\n[The End of Reference Answer]"
    )
    answer = user.index(
        "[The Start of Assistant's Answer]\nIt is 5.\n[The End of Assistant's Answer]"
    )
    assert question < reference < answer
    assert user.endswith("[The End of Assistant's Answer]")


def test_judge_prompt_without_reference_and_with_rubric() -> None:
    messages = judge_prompt("Write a haiku.", None, "Leaves fall.", "Penalise wrong syllables.")
    user = messages[1]["content"]
    assert "helpfulness, relevance, accuracy, depth, creativity, and level of detail" in user
    assert "Reference Answer" not in user
    assert user.index("[Grading Rubric]\nPenalise wrong syllables.") < user.index("[Question]")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is correct. Rating: [[7]]", 7.0),
        ("Rating: [[10]]", 10.0),
        ("Rating: [[1]]", 1.0),
        ("Rating: [[7.5]]", 7.5),
        ("Rating: [[ 6 ]]", 6.0),
        ('Format "[[rating]]", e.g. "Rating: [[5]]". My verdict: Rating: [[3]]', 3.0),
        ("Rating: [8]", 8.0),  # FastChat's single-bracket fallback
        ("[[9]] but see [2]", 9.0),  # double brackets win over the fallback
        ("Rating: 7/10", None),
        ("Rating: [[seven]]", None),
        ("Rating: [[0]]", None),  # out of the 1-10 scale
        ("Rating: [[11]]", None),
        ("Rating: [[-3]]", None),
        ("", None),
        ("I refuse to rate this.", None),
    ],
)
def test_parse_judge_score(text: str, expected: float | None) -> None:
    assert parse_judge_score(text) == expected


def test_win_rate_and_mean() -> None:
    assert win_rate([7, 5, None, 8], [6, 5, 9, None]) == 0.5  # ties and gaps are not wins
    assert win_rate([None], [3]) is None
    with pytest.raises(ValueError, match="equal length"):
        win_rate([1], [1, 2])
    assert mean([1.0, None, 3.0]) == 2.0
    assert mean([None]) is None


def test_importing_metrics_is_cheap() -> None:
    code = (
        "import sys, kubetune_runtime.eval.metrics; "
        "print(','.join(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""
