"""The evaluation recipe (EvalJob, and FineTuneJob after training): suites -> results -> gates.

Read top to bottom: :func:`run` is the EvalJob program (resolve the base, fetch and verify the
adapter, load the tokenizer, then :func:`evaluate_adapter`). :func:`evaluate_adapter` is the
part the training recipe reuses right after it published an adapter:

1. load the base model once and wrap it with the adapter (``peft.PeftModel``);
2. run every suite on the candidate (base + adapter) and, with ``compare_to_base``, on the base
   alone inside ``model.disable_adapter()`` (one copy of the base weights in memory);
3. write ``<suite>.jsonl`` (one line per sample: prompt, reference, candidate and base output
   or score) and ``summary.json``, and publish them with a manifest to
   ``evaluation.output_uri``;
4. decide the gates; the run succeeds whether or not they pass (the verdict is ``passed``).

Suite types and their metrics (the API's names, see ``kubetune_operator.api.evaluation``):

* ``perplexity``: ``loss`` (nats per trained token, tokenized as in training) and
  ``perplexity`` (``exp(loss)``);
* ``taskAccuracy``: ``exactMatch`` (fraction of generated answers equal to the reference after
  answer extraction; the first ``few_shot`` rows are the examples shown, the rest are scored);
* ``judge``: ``score`` (mean MT-Bench rating 1-10 by the judge, answers compared with the
  reference) and, with the base, ``winRate`` (fraction of samples where the candidate's rating
  is above the base's);
* ``lmEval``: ``<task>/<metric>`` from lm-evaluation-harness, or skipped with a reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

from kubetune_runtime.config import RunConfig, SuiteConfig
from kubetune_runtime.data.formats import convert_rows
from kubetune_runtime.data.sources import load_source
from kubetune_runtime.data.tokenize import prepare_tokenizer
from kubetune_runtime.errors import ConfigInvalid, DataInvalid
from kubetune_runtime.eval import metrics
from kubetune_runtime.eval.harness import (
    EvaluationFailed,
    call_judge,
    generate,
    held_out_loss,
    run_lm_eval,
)
from kubetune_runtime.models.loading import (
    ModelSource,
    device_precision,
    load_model,
    load_tokenizer,
    resolve_model_source,
)
from kubetune_runtime.result import RunResult
from kubetune_runtime.storage.artifacts import fetch_verified, publish_dir, write_manifest
from kubetune_runtime.storage.fetch import fetch, storage_for

log = logging.getLogger(__name__)

SUMMARY_SCHEMA: Final = "kubetune.io/evaluation/v1"
RESULT_BUDGET_BYTES: Final = 3072  # of the 4 KiB termination message, for ``evaluation``
DEFAULT_MAX_SEQ_LENGTH: Final = 2048  # perplexity, when the RunConfig has no data section
JUDGE_TIMEOUT_SECONDS: Final = 120.0
JUDGE_CONCURRENCY: Final = 4
_TOKENIZER_FILES: Final = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def run(config: RunConfig, *, workdir: Path) -> RunResult:
    """Evaluate ``config.adapter`` on ``config.model`` as ``config.evaluation`` says.

    Returns:
        Succeeded (reason ``EvaluationSucceeded``) with ``evaluation`` as returned by
        :func:`evaluate_adapter`, also when gates fail: the verdict is ``passed``.

    Raises:
        ArtifactInvalid: the adapter is incomplete or its digest differs from
            ``adapter.digest``.
        ConfigInvalid, DataInvalid, StorageFailure, EvaluationFailed: as the steps raise
            them, with a one-sentence reason (the entry point reports it).
    """
    # RunConfig guarantees these sections for task evaluate.
    assert config.evaluation is not None  # noqa: S101
    assert config.adapter is not None  # noqa: S101
    cache = workdir / "cache"

    # --- the base model's source and the verified adapter ---------------------------------
    source = resolve_model_source(config.model, lambda uri: fetch(uri, config.storage, cache))
    adapter = fetch_verified(
        storage_for(config.adapter.uri, config.storage),
        config.adapter.uri,
        workdir / "adapter",
        expected_digest=config.adapter.digest,
    )
    log.info("Adapter verified uri=%s digest=%s", adapter.uri, adapter.digest)

    # --- tokenizer: the one saved with the adapter (as trained), else the base's -----------
    has_tokenizer = any((adapter.path / name).is_file() for name in _TOKENIZER_FILES)
    tokenizer = prepare_tokenizer(
        load_tokenizer(
            ModelSource(str(adapter.path)) if has_tokenizer else source,
            trust_remote_code=config.model.trust_remote_code,
        ),
        chat_template=config.data.chat_template if config.data else None,
        require_chat_template=False,  # generation and chat suites check for it themselves
    )

    # --- suites, results, gates -----------------------------------------------------------
    evaluation = evaluate_adapter(
        config,
        adapter.path,
        source,
        tokenizer,
        workdir=workdir,
        adapter_uri=config.adapter.uri,
        adapter_digest=adapter.digest,
    )
    gates = evaluation["gates"]
    verdict = (
        "no gates"
        if not gates
        else f"{sum(g['passed'] for g in gates)} of {len(gates)} gates passed"
    )
    return RunResult(
        status="Succeeded",
        reason="EvaluationSucceeded",
        message=f"{verdict}; results at {evaluation['resultsUri']}",
        evaluation=evaluation,
    )


def evaluate_adapter(
    config: RunConfig,
    adapter_dir: Path,
    base_source: ModelSource,
    tokenizer: Any,
    *,
    workdir: Path,
    adapter_uri: str | None = None,
    adapter_digest: str | None = None,
    result_budget_bytes: int = RESULT_BUDGET_BYTES,
) -> dict[str, Any]:
    """Run ``config.evaluation`` on base + the adapter in ``adapter_dir``; publish and decide.

    The training recipe calls this after publishing a LoRA/QLoRA adapter, on rank 0 only,
    after freeing the trainer and its model (``del trainer, model``; ``gc.collect()``;
    ``torch.cuda.empty_cache()``): the base is loaded again here, once, from
    ``base_source``, with the adapter on top. The base loads in ``config.training.precision``
    (``auto``: bf16/fp16 on GPU, fp32 on CPU) and, for QLoRA, 4-bit as in training
    (``config.quantization``).

    Args:
        config: the RunConfig; uses ``evaluation``, ``model``, ``storage``, ``training``,
            ``quantization``, ``run`` and, when present, ``data`` (``max_seq_length`` and
            ``completion_only_loss`` for perplexity suites).
        adapter_dir: a local PEFT adapter directory (``adapter_config.json`` and weights).
        base_source: the base model, as from ``resolve_model_source``.
        tokenizer: the tokenizer after ``prepare_tokenizer`` (the one the adapter was trained
            with).
        workdir: scratch space: data downloads go to ``workdir/cache`` and results are
            written to ``workdir/evaluation`` before they are published.
        adapter_uri: where the adapter was published, recorded in the results (default:
            ``config.adapter.uri``).
        adapter_digest: the adapter's digest, recorded in the results and returned.
        result_budget_bytes: the most bytes the returned dict may take as compact JSON; rows
            not named by a gate are left out first (``truncated``) when it does not fit.
            The termination message holds 4 KiB in all, so a caller that also reports an
            artifact and metrics should pass less (e.g. 2048).

    Returns:
        A small dict for ``RunResult.evaluation`` (at most ``result_budget_bytes`` as
        JSON)::

            {"summary": [{"suite", "metric", "candidate", "base", "delta"}, ...],
             "gates": [{"suite", "metric", "passed", "message"}, ...],
             "passed": bool,             # every gate passed (True without gates)
             "resultsUri": str,          # where <suite>.jsonl and summary.json are
             "adapterDigest": str | None,
             "skipped": [{"suite", "reason"}, ...],   # only when a suite was skipped
             "truncated": True}          # only when rows were left out to fit

    Raises:
        ConfigInvalid: ``adapter_dir`` is not a PEFT adapter, a suite lacks what its type
            needs (dataset, judge URL or model, API key variable).
        DataInvalid: a suite's data cannot be read or a reference has no answer.
        EvaluationFailed: every judge request of a suite failed.
        StorageFailure: the results cannot be published.
    """
    assert config.evaluation is not None  # noqa: S101
    plan = config.evaluation
    results_dir = workdir / "evaluation"
    shutil.rmtree(results_dir, ignore_errors=True)
    results_dir.mkdir(parents=True)
    model = _load_candidate(config, base_source, adapter_dir)
    ctx = _Context(config=config, model=model, tokenizer=tokenizer, cache=workdir / "cache")

    # --- every suite on the candidate and (optionally) the base -----------------------------
    candidate: dict[str, dict[str, float]] = {}
    base: dict[str, dict[str, float]] = {}
    reports: list[dict[str, Any]] = []
    for suite in plan.suites:
        started = time.monotonic()
        outcome = _SUITES[suite.type](suite, ctx)
        _write_jsonl(results_dir / f"{suite.name}.jsonl", outcome.records)
        candidate[suite.name] = outcome.candidate
        if outcome.base is not None:
            base[suite.name] = outcome.base
        seconds = time.monotonic() - started
        reports.append(
            {
                "name": suite.name,
                "type": suite.type,
                "file": f"{suite.name}.jsonl",
                "samples": len(outcome.records),
                "skipped": outcome.skipped,
                "seconds": round(seconds, 3),
                **({"details": outcome.details} if outcome.details else {}),
            }
        )
        log.info(
            "Suite %s (%s) samples=%d seconds=%.1f candidate=%s base=%s%s",
            suite.name,
            suite.type,
            len(outcome.records),
            seconds,
            outcome.candidate,
            outcome.base,
            f" skipped: {outcome.skipped}" if outcome.skipped else "",
        )

    # --- results, published with a manifest; gates -----------------------------------------
    summary = metrics.summarize(candidate, base if plan.compare_to_base else None)
    gates = metrics.evaluate_gates(plan.gates, summary)
    passed = all(gate["passed"] for gate in gates)
    skipped = [{"suite": r["name"], "reason": r["skipped"]} for r in reports if r["skipped"]]
    body = {
        "schema": SUMMARY_SCHEMA,
        "run": config.run.model_dump(exclude_none=True),
        "baseModel": config.model.uri,
        "adapter": {
            "uri": adapter_uri or (config.adapter.uri if config.adapter else None),
            "digest": adapter_digest,
        },
        "settings": plan.model_dump(mode="json", exclude={"suites", "gates", "output_uri"}),
        "summary": summary,
        "gates": gates,
        "passed": passed,
        "suites": reports,
        "libraries": _library_versions(),
    }
    (results_dir / "summary.json").write_text(
        json.dumps(body, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8"
    )
    write_manifest(
        results_dir,
        metadata={
            "kind": "evaluation",
            "baseModel": config.model.uri,
            "adapterDigest": adapter_digest,
            "passed": passed,
            "run": config.run.model_dump(exclude_none=True),
        },
    )
    published = publish_dir(
        storage_for(plan.output_uri, config.storage), results_dir, plan.output_uri
    )
    log.info(
        "Published evaluation uri=%s digest=%s passed=%s", published.uri, published.digest, passed
    )
    return _compact(
        {
            "summary": [_rounded(row) for row in summary],
            "gates": gates,
            "passed": passed,
            "resultsUri": published.uri,
            "adapterDigest": adapter_digest,
            **({"skipped": skipped} if skipped else {}),
        },
        gated={(g.suite, g.metric) for g in plan.gates},
        budget=result_budget_bytes,
    )


# ----------------------------------------------------------------------------- suites


@dataclasses.dataclass
class _Context:
    config: RunConfig
    model: Any
    tokenizer: Any
    cache: Path

    @property
    def compare(self) -> bool:
        assert self.config.evaluation is not None  # noqa: S101
        return self.config.evaluation.compare_to_base

    def generate(self, prompts: Sequence[Sequence[Mapping[str, Any]]]) -> list[str]:
        assert self.config.evaluation is not None  # noqa: S101
        plan = self.config.evaluation
        return generate(
            self.model,
            self.tokenizer,
            prompts,
            max_new_tokens=plan.max_new_tokens,
            batch_size=plan.batch_size,
            temperature=plan.temperature,
        )


@dataclasses.dataclass(frozen=True)
class _Outcome:
    candidate: dict[str, float]
    base: dict[str, float] | None
    records: list[dict[str, Any]]
    skipped: str | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def _base_only(model: Any) -> Iterator[None]:
    """The base model alone: the adapter's layers are bypassed, not unloaded."""
    with model.disable_adapter():
        yield


def _perplexity(suite: SuiteConfig, ctx: _Context) -> _Outcome:
    examples = _examples(suite, ctx)[: suite.max_samples]
    data = ctx.config.data
    options: dict[str, Any] = {
        "max_seq_length": data.max_seq_length if data else DEFAULT_MAX_SEQ_LENGTH,
        "batch_size": _eval_batch_size(ctx),
        "completion_only_loss": data.completion_only_loss if data else True,
    }
    loss, per_sample = held_out_loss(ctx.model, ctx.tokenizer, examples, **options)
    base_loss: float | None = None
    base_per_sample: list[float | None] = [None] * len(examples)
    if ctx.compare:
        with _base_only(ctx.model):
            base_loss, base_per_sample = held_out_loss(
                ctx.model, ctx.tokenizer, examples, **options
            )
    records = []
    for i, example in enumerate(examples):
        prompt, reference = _split_example(example)
        records.append(
            {
                "index": i,
                "prompt": prompt,
                "reference": reference,
                "candidate": {"loss": _finite(per_sample[i])},
                **({"base": {"loss": _finite(base_per_sample[i])}} if ctx.compare else {}),
            }
        )
    return _Outcome(
        candidate=_loss_metrics(loss),
        base=_loss_metrics(base_loss) if base_loss is not None else None,
        records=records,
    )


def _task_accuracy(suite: SuiteConfig, ctx: _Context) -> _Outcome:
    examples = _conversations(suite, ctx)
    shots = examples[: suite.few_shot]
    scored = examples[suite.few_shot :][: suite.max_samples]
    if not scored:
        raise DataInvalid(
            f"suite {suite.name}: no rows left to score after {suite.few_shot} few-shot examples"
        )
    shot_turns = [m for shot in shots for m in shot if m["role"] != "system"]
    prompts, references, answers = [], [], []
    for i, messages in enumerate(scored):
        system = [m for m in messages[:-1] if m["role"] == "system"]
        turns = [m for m in messages[:-1] if m["role"] != "system"]
        prompts.append([*system, *shot_turns, *turns])
        references.append(messages[-1]["content"])
        answer = metrics.extract_answer(
            references[-1], suite.answer_extraction, suite.answer_pattern
        )
        if answer is None:
            raise DataInvalid(
                f"suite {suite.name}: the reference of row {suite.few_shot + i + 1} has no "
                f"answer by answerExtraction {suite.answer_extraction}"
            )
        answers.append(answer)

    def score(outputs: list[str]) -> tuple[list[dict[str, Any]], dict[str, float]]:
        rows: list[dict[str, Any]] = []
        correct_count = 0
        for output, reference in zip(outputs, answers, strict=True):
            extracted = metrics.extract_answer(
                output, suite.answer_extraction, suite.answer_pattern
            )
            correct = metrics.exact_match(extracted, reference)
            correct_count += correct
            rows.append({"output": output, "answer": extracted, "correct": correct})
        return rows, {"exactMatch": correct_count / len(rows)}

    candidate_rows, candidate_metrics = score(ctx.generate(prompts))
    base_rows: list[dict[str, Any]] | None = None
    base_metrics = None
    if ctx.compare:
        with _base_only(ctx.model):
            base_rows, base_metrics = score(ctx.generate(prompts))
    records = [
        {
            "index": i,
            "prompt": prompts[i],
            "reference": references[i],
            "referenceAnswer": answers[i],
            "candidate": candidate_rows[i],
            **({"base": base_rows[i]} if base_rows is not None else {}),
        }
        for i in range(len(prompts))
    ]
    return _Outcome(candidate=candidate_metrics, base=base_metrics, records=records)


def _judge(suite: SuiteConfig, ctx: _Context) -> _Outcome:
    if not suite.judge_url or not suite.judge_model:
        raise ConfigInvalid(f"suite {suite.name}: a judge suite needs judge_url and judge_model")
    api_key = None
    if suite.judge_api_key_env:
        api_key = os.environ.get(suite.judge_api_key_env)
        if not api_key:
            raise ConfigInvalid(
                f"suite {suite.name}: environment variable {suite.judge_api_key_env} "
                "(the judge's API key) is empty"
            )
    conversations = _conversations(suite, ctx)[: suite.max_samples]
    prompts = [messages[:-1] for messages in conversations]
    references = [messages[-1]["content"] for messages in conversations]
    questions = [
        next((m["content"] for m in reversed(p) if m["role"] == "user"), "") for p in prompts
    ]
    outputs = {"candidate": ctx.generate(prompts)}
    if ctx.compare:
        with _base_only(ctx.model):
            outputs["base"] = ctx.generate(prompts)

    url, model_name = suite.judge_url, suite.judge_model

    def judge(job: tuple[str, int]) -> tuple[str | None, str | None]:
        side, i = job
        messages = metrics.judge_prompt(questions[i], references[i], outputs[side][i], suite.rubric)
        try:
            return call_judge(url, model_name, api_key, messages, JUDGE_TIMEOUT_SECONDS), None
        except EvaluationFailed as exc:
            return None, str(exc)

    jobs = [(side, i) for side in outputs for i in range(len(prompts))]
    with ThreadPoolExecutor(max_workers=JUDGE_CONCURRENCY) as pool:
        verdicts = dict(zip(jobs, pool.map(judge, jobs), strict=True))
    errors = [error for _, error in verdicts.values() if error]
    if errors and len(errors) == len(jobs):
        raise EvaluationFailed(f"suite {suite.name}: every judge request failed: {errors[0]}")
    scores = {
        side: [metrics.parse_judge_score(verdicts[(side, i)][0] or "") for i in range(len(prompts))]
        for side in outputs
    }
    candidate_metrics = _judge_metrics(scores["candidate"])
    base_metrics = _judge_metrics(scores["base"]) if "base" in scores else None
    if "base" in scores:
        rate = metrics.win_rate(scores["candidate"], scores["base"])
        if rate is not None:
            candidate_metrics["winRate"] = rate
    records = []
    for i in range(len(prompts)):
        record: dict[str, Any] = {"index": i, "prompt": prompts[i], "reference": references[i]}
        for side in outputs:
            verdict, error = verdicts[(side, i)]
            record[side] = {
                "output": outputs[side][i],
                "score": scores[side][i],
                "judgement": verdict,
                **({"error": error} if error else {}),
            }
        records.append(record)
    unparsed = sum(
        1
        for side in outputs
        for i in range(len(prompts))
        if scores[side][i] is None and verdicts[(side, i)][1] is None
    )
    details = {"judgeModel": model_name, "requests": len(jobs), "failed": len(errors)}
    details["unparsed"] = unparsed
    return _Outcome(candidate_metrics, base_metrics, records, details=details)


def _lm_eval(suite: SuiteConfig, ctx: _Context) -> _Outcome:
    if not suite.tasks:
        raise ConfigInvalid(f"suite {suite.name}: an lmEval suite needs tasks")
    options: dict[str, Any] = {
        "tasks": suite.tasks,
        "num_fewshot": suite.num_fewshot,
        "batch_size": _eval_batch_size(ctx),
        "limit": suite.max_samples,
        "allow_online": suite.allow_online,
        "allow_code_execution": suite.allow_code_execution,
    }
    outcome = run_lm_eval(ctx.model, ctx.tokenizer, **options)
    if outcome.skipped:
        return _Outcome({}, None, [], skipped=outcome.skipped)
    base_metrics = None
    if ctx.compare:
        with _base_only(ctx.model):
            base_outcome = run_lm_eval(ctx.model, ctx.tokenizer, **options)
        base_metrics = base_outcome.metrics
    records = [
        {
            "metric": name,
            "candidate": value,
            **({"base": base_metrics.get(name)} if base_metrics is not None else {}),
        }
        for name, value in outcome.metrics.items()
    ]
    return _Outcome(outcome.metrics, base_metrics, records)


_SUITES: Final[Mapping[str, Callable[[SuiteConfig, _Context], _Outcome]]] = {
    "perplexity": _perplexity,
    "taskAccuracy": _task_accuracy,
    "judge": _judge,
    "lmEval": _lm_eval,
}


# ----------------------------------------------------------------------------- helpers


def _load_candidate(config: RunConfig, source: ModelSource, adapter_dir: Path) -> Any:
    """The base model with the adapter on top, in eval mode, on this process's device."""
    import torch  # noqa: PLC0415
    from peft import PeftModel  # noqa: PLC0415

    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigInvalid(
            f"{adapter_dir} holds no adapter_config.json: only PEFT adapters can be evaluated "
            "against their base (a fully fine-tuned model is not supported yet)"
        )
    device_map = None
    if torch.cuda.is_available():
        device_map = {"": f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"}
    base = load_model(
        source,
        precision=device_precision(config.training.precision),
        quantization=config.quantization,
        trust_remote_code=config.model.trust_remote_code,
        gradient_checkpointing=False,
        device_map=device_map,
    )
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    model.eval()
    return model


def _examples(suite: SuiteConfig, ctx: _Context) -> list[dict[str, Any]]:
    """The suite's rows as training examples (``{"messages": [...]}`` or ``{"text": ...}``)."""
    if suite.dataset is None:
        raise ConfigInvalid(f"suite {suite.name}: a {suite.type} suite needs a dataset")
    rows = load_source(suite.dataset, ctx.config.storage, ctx.cache)
    examples, _ = convert_rows(rows, suite.dataset.format, suite.dataset.columns, objective="sft")
    return examples


def _conversations(suite: SuiteConfig, ctx: _Context) -> list[list[dict[str, Any]]]:
    """Conversations ending with the reference answer (an assistant turn)."""
    conversations = []
    for example in _examples(suite, ctx):
        if "messages" not in example:
            raise DataInvalid(
                f"suite {suite.name}: a {suite.type} suite needs prompts with reference answers "
                "(promptCompletion, alpaca or messages format), not plain text"
            )
        conversations.append(example["messages"])
    return conversations


def _split_example(example: Mapping[str, Any]) -> tuple[list[Any] | None, str]:
    if "messages" in example:
        messages = example["messages"]
        return list(messages[:-1]), str(messages[-1]["content"])
    return None, str(example.get("text", ""))


def _eval_batch_size(ctx: _Context) -> int:
    assert ctx.config.evaluation is not None  # noqa: S101
    return ctx.config.evaluation.batch_size


def _loss_metrics(loss: float) -> dict[str, float]:
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}


def _judge_metrics(scores: Sequence[float | None]) -> dict[str, float]:
    score = metrics.mean(scores)
    return {} if score is None else {"score": score}


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")


def _rounded(row: metrics.SummaryRow) -> dict[str, Any]:
    def r(value: float | None) -> float | None:
        return None if value is None else float(f"{value:.6g}")

    return {
        "suite": row["suite"],
        "metric": row["metric"],
        "candidate": r(row["candidate"]),
        "base": r(row["base"]),
        "delta": r(row["delta"]),
    }


def _compact(
    evaluation: dict[str, Any], *, gated: set[tuple[str, str]], budget: int
) -> dict[str, Any]:
    """Fit ``evaluation`` into ``budget`` bytes of JSON; summary.json has everything."""

    def size() -> int:
        return len(json.dumps(evaluation, separators=(",", ":")).encode())

    if size() <= budget:
        return evaluation
    evaluation["truncated"] = True
    evaluation["summary"] = [
        row for row in evaluation["summary"] if (row["suite"], row["metric"]) in gated
    ]
    for row in evaluation["summary"]:  # base and delta are implied by the gates' messages
        if size() <= budget:
            break
        row.pop("base", None)
    for key, field in (("skipped", "reason"), ("gates", "message")):
        for item in evaluation.get(key, []):
            if size() > budget:
                item[field] = item[field][:120]
    while size() > budget and evaluation["summary"]:
        evaluation["summary"].pop()
    return evaluation


def _library_versions() -> dict[str, str]:
    import peft  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
