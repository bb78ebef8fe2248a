"""Evaluation metrics, pure: answer extraction, exact match, summaries, gates, judge prompts.

Nothing here touches a model, a file or the network, and importing it is cheap (the standard
library and the RunConfig schema only), so every rule is unit-tested on its own.

* Answer extraction (:func:`extract_answer`) follows the GSM8K convention (Cobbe et al., 2021,
  "Training Verifiers to Solve Math Word Problems"): a reference solution ends with
  ``#### <number>``; a model's generation is read the same way, falling back to its last
  number when it wrote no ``####`` (as lm-evaluation-harness's "flexible-extract" filter does).
  Numbers are normalised (``$``, thousands separators and trailing zeros removed), so
  ``$1,000.00`` and ``1000`` are the same answer.
* Judge prompts and score parsing (:func:`judge_prompt`, :func:`parse_judge_score`) follow
  MT-Bench's single-answer grading (Zheng et al., 2023, "Judging LLM-as-a-Judge with MT-Bench
  and Chatbot Arena"; FastChat ``fastchat/llm_judge/data/judge_prompts.jsonl``, prompts
  ``single-v1`` and ``single-math-v1`` for grading with a reference answer): the judge explains,
  then rates 1 to 10 as ``Rating: [[7]]``.
* Summaries and gates (:func:`summarize`, :func:`evaluate_gates`) produce the
  ``MetricSummary`` / ``GateResult`` shapes of the EvalJob / FineTuneJob status.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Final, Literal, TypedDict

from kubetune_runtime.config import GateConfig

ExtractionMethod = Literal["gsm8k", "lastNumber", "exact", "regex"]

# A number as people write it: optional sign and currency, thousands groups or plain digits,
# optional decimals. "1,2,3" is three numbers, not 123: commas only count in groups of three.
# A minus sign counts only where it cannot be a hyphen or a subtraction ("pages 10-12").
_NUMBER: Final = re.compile(r"(?:(?<![\w)])-)?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_GSM8K_MARK: Final = "####"
# FastChat's patterns: "[[7]]", else a single-bracket "[7]" (llm_judge/common.py).
_SCORE: Final = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_SCORE_BACKUP: Final = re.compile(r"\[\s*(\d+(?:\.\d+)?)\s*\]")
SCORE_RANGE: Final = (1.0, 10.0)

# MT-Bench single-answer grading (FastChat judge_prompts.jsonl): system prompt and templates.
JUDGE_SYSTEM_PROMPT: Final = "You are a helpful assistant."
_JUDGE_INSTRUCTION: Final = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an "
    "AI assistant to the user question displayed below. "
)
_JUDGE_GENERAL: Final = (
    "Your evaluation should consider factors such as the helpfulness, relevance, accuracy, "
    "depth, creativity, and level of detail of the response. Begin your evaluation by "
    "providing a short explanation. "
)
_JUDGE_WITH_REFERENCE: Final = (
    "Your evaluation should consider correctness and helpfulness. You will be given a "
    "reference answer and the assistant's answer. Begin your evaluation by comparing the "
    "assistant's answer with the reference answer. Identify and correct any mistakes. "
)
_JUDGE_FORMAT: Final = (
    "Be as objective as possible. After providing your explanation, you must rate the response "
    'on a scale of 1 to 10 by strictly following this format: "[[rating]]", for example: '
    '"Rating: [[5]]".'
)


class SummaryRow(TypedDict):
    """One metric of one suite (the API's ``MetricSummary``).

    ``base`` and ``delta`` (``candidate - base``) are None when the base was not evaluated or
    the metric exists for the candidate only (e.g. ``winRate``).
    """

    suite: str
    metric: str
    candidate: float
    base: float | None
    delta: float | None


class GateVerdict(TypedDict):
    """The verdict of one gate (the API's ``GateResult``)."""

    suite: str
    metric: str
    passed: bool
    message: str


class JudgeMessage(TypedDict):
    """One chat message sent to the judge (OpenAI chat-completions form)."""

    role: Literal["system", "user"]
    content: str


# --------------------------------------------------------------------------- answers


def normalize_number(text: str) -> str | None:
    """A number's canonical text: ``"$1,000.50"`` -> ``"1000.5"``, ``"18.0"`` -> ``"18"``.

    Returns:
        The number without currency sign, thousands separators, trailing zeros or a trailing
        decimal point, or None when ``text`` is not a number.
    """
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _last_number(text: str) -> str | None:
    matches = _NUMBER.findall(text)
    return normalize_number(matches[-1]) if matches else None


def extract_answer(text: str, method: ExtractionMethod, pattern: str | None = None) -> str | None:
    """Read the final answer from a reference or a generation.

    Args:
        text: a reference answer or a model's output.
        method: ``gsm8k``: the number after the last ``####`` (normalised, see
            :func:`normalize_number`), or the last number in the text when it has no
            ``####`` (model generations rarely write it); ``lastNumber``: the last number;
            ``exact``: the stripped text; ``regex``: the first capture group of ``pattern``
            (the whole match when it has no group), stripped.
        pattern: the regular expression for ``regex``.

    Returns:
        The answer, or None when none can be read (no number; no regex match; empty text).

    Raises:
        ValueError: ``regex`` without a pattern, an invalid pattern, or an unknown method.
    """
    if method == "gsm8k":
        if _GSM8K_MARK in text:
            tail = text.rsplit(_GSM8K_MARK, 1)[1]
            match = _NUMBER.search(tail)
            return normalize_number(match.group(0)) if match else None
        return _last_number(text)
    if method == "lastNumber":
        return _last_number(text)
    if method == "exact":
        return text.strip() or None
    if method == "regex":
        if not pattern:
            raise ValueError("answer extraction regex needs answer_pattern")
        try:
            found = re.search(pattern, text, flags=re.DOTALL)
        except re.error as exc:
            raise ValueError(f"answer_pattern {pattern!r} is not a valid regex: {exc}") from exc
        if found is None:
            return None
        value = found.group(1) if found.re.groups else found.group(0)
        return value.strip() if value is not None and value.strip() else None
    raise ValueError(f"unknown answer extraction {method!r}")


def exact_match(prediction: str | None, reference: str | None) -> bool:
    """Whether two extracted answers agree; numbers compare by value (``"18.0"`` == ``"18"``).

    Returns:
        False when either is None; otherwise numeric equality when both are numbers, else
        string equality of the stripped texts.
    """
    if prediction is None or reference is None:
        return False
    pred_number, ref_number = normalize_number(prediction), normalize_number(reference)
    if pred_number is not None and ref_number is not None:
        return Decimal(pred_number) == Decimal(ref_number)
    return prediction.strip() == reference.strip()


# --------------------------------------------------------------------------- summary and gates


def summarize(
    candidate: Mapping[str, Mapping[str, float]],
    base: Mapping[str, Mapping[str, float]] | None = None,
) -> list[SummaryRow]:
    """Rows ``{suite, metric, candidate, base, delta}`` for every finite candidate metric.

    Args:
        candidate: suite name -> metric name -> value, for base + adapter.
        base: the same for the base alone, or None when it was not evaluated.

    Returns:
        One row per candidate metric, in the order given; ``base``/``delta`` are None where
        the base has no finite value. Non-finite candidate values are left out (a gate on
        them then reports the metric as missing).
    """
    rows: list[SummaryRow] = []
    for suite, metrics in candidate.items():
        for metric, value in metrics.items():
            if not math.isfinite(value):
                continue
            base_value = (base or {}).get(suite, {}).get(metric)
            if base_value is not None and not math.isfinite(base_value):
                base_value = None
            rows.append(
                SummaryRow(
                    suite=suite,
                    metric=metric,
                    candidate=float(value),
                    base=None if base_value is None else float(base_value),
                    delta=None if base_value is None else float(value) - float(base_value),
                )
            )
    return rows


_COMPARISONS: Final = {"gte": ">=", "gt": ">", "lte": "<=", "lt": "<"}


def _compare(value: float, comparison: str, threshold: float) -> bool:
    if comparison == "gte":
        return value >= threshold
    if comparison == "gt":
        return value > threshold
    if comparison == "lte":
        return value <= threshold
    if comparison == "lt":
        return value < threshold
    raise ValueError(f"unknown comparison {comparison!r}")


def evaluate_gates(gates: Sequence[GateConfig], summary: Sequence[SummaryRow]) -> list[GateVerdict]:
    """Decide every gate against the summary rows.

    ``baseline: none`` compares the candidate's value; ``baseline: base`` compares
    ``candidate - base``. A gate whose metric is missing (suite skipped, metric misspelt, base
    not evaluated) fails with a message that says so; it never passes by default.

    Returns:
        One verdict per gate, in order; the message states the comparison made, e.g.
        ``"exactMatch 0.31 >= 0.25"`` or ``"exactMatch candidate - base -0.02 >= -0.01"``.
    """
    rows = {(row["suite"], row["metric"]): row for row in summary}
    verdicts: list[GateVerdict] = []
    for gate in gates:
        row = rows.get((gate.suite, gate.metric))
        symbol = _COMPARISONS[gate.comparison]
        if row is None:
            produced = sorted(m for s, m in rows if s == gate.suite)
            detail = (
                f"; suite {gate.suite} produced {', '.join(produced)}"
                if produced
                else f"; suite {gate.suite} produced no metrics (not run, skipped or failed)"
            )
            verdicts.append(
                GateVerdict(
                    suite=gate.suite,
                    metric=gate.metric,
                    passed=False,
                    message=f"metric {gate.metric} of suite {gate.suite} is missing{detail}",
                )
            )
            continue
        if gate.baseline == "base":
            if row["delta"] is None:
                verdicts.append(
                    GateVerdict(
                        suite=gate.suite,
                        metric=gate.metric,
                        passed=False,
                        message=(
                            f"{gate.metric} has no base value to compare with "
                            "(baseline base needs compareToBase: true)"
                        ),
                    )
                )
                continue
            value, what = row["delta"], f"{gate.metric} candidate - base"
        else:
            value, what = row["candidate"], gate.metric
        passed = _compare(value, gate.comparison, gate.threshold)
        message = f"{what} {value:.6g} {symbol} {gate.threshold:g}"
        if not passed:
            message = f"{what} {value:.6g} is not {symbol} {gate.threshold:g}"
        verdicts.append(
            GateVerdict(suite=gate.suite, metric=gate.metric, passed=passed, message=message[:1024])
        )
    return verdicts


# --------------------------------------------------------------------------- judge


def judge_prompt(
    question: str, reference: str | None, answer: str, rubric: str | None = None
) -> list[JudgeMessage]:
    """The MT-Bench single-answer grading prompt for one answer (Zheng et al., 2023).

    With a reference this is FastChat's ``single-math-v1`` (compare with the reference, judge
    correctness and helpfulness); without one, ``single-v1`` (helpfulness, relevance, accuracy,
    depth, creativity, detail). A rubric is added to the instructions, before the question.

    Args:
        question: the user's question (the last user turn of the prompt).
        reference: the golden answer, or None.
        answer: the model's answer to grade.
        rubric: extra grading instructions (``rubric`` in the suite), or None.

    Returns:
        ``[{"role": "system", ...}, {"role": "user", ...}]`` for a chat-completions request.
    """
    instruction = _JUDGE_INSTRUCTION + (
        _JUDGE_WITH_REFERENCE if reference is not None else _JUDGE_GENERAL
    )
    instruction += _JUDGE_FORMAT
    if rubric and rubric.strip():
        instruction += f"\n\n[Grading Rubric]\n{rubric.strip()}"
    parts = [f"[Instruction]\n{instruction}", f"[Question]\n{question}"]
    if reference is not None:
        parts.append(f"[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]")
    parts.append(f"[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]")
    return [
        JudgeMessage(role="system", content=JUDGE_SYSTEM_PROMPT),
        JudgeMessage(role="user", content="\n\n".join(parts)),
    ]


def parse_judge_score(text: str) -> float | None:
    """The rating in a judge's verdict: ``"... Rating: [[7]]"`` -> ``7.0``.

    Like FastChat, ``[[n]]`` is preferred and a single-bracket ``[n]`` is the fallback; unlike
    FastChat (which takes the first), the *last* match is used, because judges sometimes quote
    the format (``"[[rating]]", for example "Rating: [[5]]"``) before giving their own rating.

    Returns:
        The score in [1, 10], or None when there is none or it is out of range (FastChat
        records -1 for these; here they are left out of the mean and counted).
    """
    for pattern in (_SCORE, _SCORE_BACKUP):
        matches = pattern.findall(text)
        if matches:
            value = float(matches[-1])
            low, high = SCORE_RANGE
            return value if low <= value <= high else None
    return None


def win_rate(candidate: Sequence[float | None], base: Sequence[float | None]) -> float | None:
    """The fraction of samples where the candidate's judge score is above the base's.

    Only samples with both scores count; ties are not wins.

    Returns:
        A fraction in [0, 1], or None when no sample has both scores.

    Raises:
        ValueError: the sequences differ in length.
    """
    if len(candidate) != len(base):
        raise ValueError("candidate and base scores must be per sample, of equal length")
    pairs = [
        (c, b) for c, b in zip(candidate, base, strict=True) if c is not None and b is not None
    ]
    if not pairs:
        return None
    return sum(1 for c, b in pairs if c > b) / len(pairs)


def mean(values: Sequence[float | None]) -> float | None:
    """The mean of the values that are not None, or None when there are none."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
