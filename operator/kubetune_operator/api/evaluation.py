"""Evaluation suites, gates and results: what EvalJob runs, and FineTuneJob after training.

Schema module: pydantic and the standard library only.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, StringConstraints

from kubetune_operator.api.common import (
    ApiModel,
    ArtifactURI,
    Decimal,
    DNSLabel,
    EndpointURL,
    SecretKeyRef,
    SignedDecimal,
    cel,
    rules,
)
from kubetune_operator.api.data import DataSource

MetricName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.,/-]+$", max_length=128)]


class _SuiteBase(ApiModel):
    name: DNSLabel = Field(description="Name of the suite, unique in the list; gates refer to it.")
    max_samples: int | None = Field(
        default=None, ge=1, le=100_000, description="Evaluate at most this many samples."
    )


class PerplexitySuite(_SuiteBase):
    """Held-out loss and perplexity (mean token negative log-likelihood) on a dataset.

    Metrics: ``loss`` (nats per trained token) and ``perplexity`` (exp(loss)); lower is better.
    Tokens are weighted as in training: assistant tokens only for chat data.
    """

    type: Literal["perplexity"] = Field(description="Suite type.")
    dataset: DataSource = Field(description="Held-out data, in any training format.")


class TaskAccuracySuite(_SuiteBase):
    """Generate an answer per prompt and score it by exact match after answer extraction.

    Metric: ``exactMatch`` (fraction in [0, 1]); higher is better.
    """

    model_config = ConfigDict(
        json_schema_extra=rules(
            cel(
                "(has(self.answerExtraction) && self.answerExtraction == 'regex') == "
                "has(self.answerPattern)",
                "answerPattern is required by, and only used with, answerExtraction regex",
                field_path=".answerPattern",
            )
        )
    )

    type: Literal["taskAccuracy"] = Field(description="Suite type.")
    dataset: DataSource = Field(
        description="Prompts with reference answers (promptCompletion or alpaca format)."
    )
    answer_extraction: Literal["gsm8k", "lastNumber", "exact", "regex"] = Field(
        default="lastNumber",
        description=(
            "How the answer is read from a reference and from a generation: gsm8k (the number "
            "after '####', commas removed), lastNumber (the last number in the text), exact "
            "(the stripped text), regex (the first capture group of answerPattern). "
            "Default: lastNumber."
        ),
    )
    answer_pattern: Annotated[str, StringConstraints(min_length=1, max_length=512)] | None = Field(
        default=None, description="Regular expression with one group, for answerExtraction regex."
    )
    few_shot: int = Field(
        default=0, ge=0, le=16, description="Examples from the dataset prepended to each prompt."
    )


class LmEvalSuite(_SuiteBase):
    """Standard benchmarks through lm-evaluation-harness, to catch catastrophic forgetting.

    Metrics: ``<task>/<metric>`` as lm-eval reports them, e.g. ``hellaswag/acc_norm``.
    """

    type: Literal["lmEval"] = Field(description="Suite type.")
    tasks: list[Annotated[str, StringConstraints(pattern=r"^[\w.-]+$", max_length=128)]] = Field(
        min_length=1, max_length=32, description="lm-eval task names, e.g. [hellaswag, arc_easy]."
    )
    num_fewshot: int | None = Field(
        default=None, ge=0, le=32, description="Few-shot examples. Default: the task's own."
    )
    allow_online: bool = Field(
        default=False,
        description=(
            "Allow lm-eval to download task data from the Hub. Off by default: without it the "
            "suite uses only cached data and is skipped with a clear message otherwise."
        ),
    )
    allow_code_execution: bool = Field(
        default=False,
        description="Allow tasks that execute generated code (e.g. humaneval). Off by default.",
    )


class JudgeEndpoint(ApiModel):
    """An OpenAI-compatible chat completions endpoint used as the judge."""

    url: EndpointURL = Field(
        description="Base URL of the API, e.g. https://api.openai.com/v1 or a vLLM service."
    )
    model: Annotated[str, StringConstraints(min_length=1, max_length=256)] = Field(
        description="Model name sent in requests."
    )
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="A Secret key holding the API key (sent as a bearer token)."
    )


class JudgeSuite(_SuiteBase):
    """LLM-as-a-judge: a judge model scores each answer against a golden reference (1 to 10).

    Metrics: ``score`` (mean judge score) and ``winRate`` (fraction where the candidate scored
    above the base); higher is better. Prompt and scoring follow MT-Bench's single-answer
    grading (Zheng et al., 2023, "Judging LLM-as-a-Judge").
    """

    type: Literal["judge"] = Field(description="Suite type.")
    dataset: DataSource = Field(
        description="Golden set: prompts with reference answers (promptCompletion or alpaca)."
    )
    judge: JudgeEndpoint = Field(description="The judge model.")
    rubric: Annotated[str, StringConstraints(max_length=4096)] | None = Field(
        default=None, description="Extra grading instructions appended to the judge prompt."
    )


Suite = Annotated[
    PerplexitySuite | TaskAccuracySuite | LmEvalSuite | JudgeSuite, Field(discriminator="type")
]


class Gate(ApiModel):
    """A pass/fail rule on one metric; all gates must pass for the evaluation to pass."""

    suite: DNSLabel = Field(description="Name of the suite that produces the metric.")
    metric: MetricName = Field(description="Metric name, e.g. loss, exactMatch, score.")
    comparison: Literal["gte", "gt", "lte", "lt"] = Field(
        description="How the value compares to the threshold: gte, gt, lte or lt."
    )
    threshold: SignedDecimal = Field(description="Threshold, as a decimal string.")
    baseline: Literal["none", "base"] = Field(
        default="none",
        description=(
            "none: compare the candidate's value; base: compare candidate minus base (so "
            "'gte -0.01' on accuracy allows at most one point of forgetting). Default: none."
        ),
    )


class GenerationSpec(ApiModel):
    """Decoding settings for generative suites."""

    max_new_tokens: int = Field(
        default=256, ge=1, le=8192, description="Tokens generated per answer. Default: 256."
    )
    batch_size: int = Field(
        default=8, ge=1, le=512, description="Prompts generated together. Default: 8."
    )
    temperature: Decimal = Field(
        default="0",
        description="Sampling temperature; 0 is greedy decoding (the default).",
        json_schema_extra=rules(cel("double(self) <= 2.0", "temperature must be at most 2")),
    )


EVALUATION_RULES = (
    cel(
        "!has(self.gates) || self.gates.all(g, self.suites.exists(s, s.name == g.suite))",
        "every gate must name a suite in suites",
        field_path=".gates",
    ),
    cel(
        "!has(self.gates) || self.compareToBase || self.gates.all(g, g.baseline != 'base')",
        "gates with baseline base need compareToBase: true",
        field_path=".gates",
    ),
)


class EvaluationPlan(ApiModel):
    """What to evaluate and how to decide: suites, gates and decoding settings."""

    model_config = ConfigDict(json_schema_extra=rules(*EVALUATION_RULES))

    suites: list[Suite] = Field(
        min_length=1,
        max_length=16,
        description="Evaluation suites to run.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
    )
    gates: list[Gate] | None = Field(
        default=None, max_length=32, description="Rules that decide pass or fail."
    )
    compare_to_base: bool = Field(
        default=True,
        description="Also evaluate the base model alone and report deltas. Default: true.",
    )
    generation: GenerationSpec | None = Field(
        default=None, description="Decoding settings for taskAccuracy and judge suites."
    )


# ---------------------------------------------------------------------------------- status


class MetricSummary(ApiModel):
    """One metric of one suite: base, candidate and their difference."""

    suite: DNSLabel = Field(description="Suite name.")
    metric: MetricName = Field(description="Metric name.")
    candidate: float = Field(description="Value for base + adapter.")
    base: float | None = Field(default=None, description="Value for the base model alone.")
    delta: float | None = Field(default=None, description="candidate - base.")


class GateResult(ApiModel):
    """The verdict of one gate."""

    suite: DNSLabel = Field(description="Suite name.")
    metric: MetricName = Field(description="Metric name.")
    passed: bool = Field(description="Whether the gate passed.")
    message: Annotated[str, StringConstraints(max_length=1024)] = Field(
        description="The comparison made, e.g. 'exactMatch 0.31 >= 0.25'."
    )


class EvaluationResult(ApiModel):
    """Small summary of an evaluation; per-sample results live in storage (resultsUri)."""

    summary: list[MetricSummary] | None = Field(
        default=None, max_length=64, description="Per-suite metrics, base vs candidate."
    )
    gates: list[GateResult] | None = Field(
        default=None, max_length=32, description="Verdict of each gate."
    )
    passed: bool | None = Field(
        default=None, description="True when every gate passed (or there are no gates)."
    )
    results_uri: ArtifactURI | None = Field(
        default=None, description="Where the full per-sample results (JSONL) were written."
    )
