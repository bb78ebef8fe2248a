"""The evaluation recipe end to end: a LoRA adapter trained by the real runtime, then evaluated.

The adapter is trained once per module with ``kubetune-runtime train`` (a subprocess, as a pod
runs it) on the tiny model; ``recipes.evaluate.run`` then evaluates it in-process with every
suite type: held-out perplexity, GSM8K exact match, an LLM judge (a local stub of an
OpenAI-compatible server that records what it is sent) and lm-eval (skipped offline).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from kubetune_runtime.config import RunConfig
from kubetune_runtime.errors import ArtifactInvalid, ConfigInvalid
from kubetune_runtime.eval.harness import EvaluationFailed, call_judge
from kubetune_runtime.storage.artifacts import COMPLETE_MARKER, verify_local
from tests.integration.runtime_support import SHARED_DATA, run_config, run_runtime

GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"
JUDGE_KEY_ENV = "KUBETUNE_TEST_JUDGE_KEY"
JUDGE_KEY = "sk-test-0123456789"  # a dummy bearer token for the local stub

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not GSM8K_TEST.is_file(), reason="../shared/data is missing"),
]


# ----------------------------------------------------------------------------- judge stub


@dataclass
class JudgeStub:
    """A local OpenAI-compatible chat-completions server with scripted answers."""

    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    # (status, body, headers) answered before the default verdict, one per request.
    script: list[tuple[int, str, dict[str, str]]] = field(default_factory=list)
    verdict: str = "The assistant's answer is partly right. Rating: [[6]]"
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def judge_stub() -> Iterator[JudgeStub]:
    stub = JudgeStub(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with stub.lock:
                stub.requests.append({"path": self.path, "headers": dict(self.headers), **body})
                status, text, headers = (
                    stub.script.pop(0)
                    if stub.script
                    else (
                        200,
                        json.dumps({"choices": [{"message": {"content": stub.verdict}}]}),
                        {},
                    )
                )
            data = text.encode()
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    stub.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# ----------------------------------------------------------------------------- adapter


@dataclass(frozen=True)
class Trained:
    adapter_uri: str
    digest: str


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Trained:
    """A LoRA adapter trained for a few steps by the real runtime and published (verified)."""
    tmp = tmp_path_factory.mktemp("train")
    config = run_config(
        tmp,
        tiny_model_dir,
        training={
            "max_steps": 8,
            "learning_rate": 1e-2,
            "per_device_train_batch_size": 4,
            "logging_steps": 4,
        },
    )
    code, result, stderr = run_runtime(tmp, config)
    assert code == 0, stderr[-3000:]
    assert result is not None
    assert result.artifact is not None
    return Trained(adapter_uri=result.artifact["uri"], digest=result.artifact["digest"])


def _source(max_samples: int) -> dict[str, Any]:
    return {
        "uri": GSM8K_TEST.as_uri(),
        "format": "promptCompletion",
        "columns": {"prompt": "question", "completion": "answer"},
        "max_samples": max_samples,
    }


def _eval_config(
    tmp: Path, model_dir: Path, trained: Trained, judge_url: str, **overrides: Any
) -> RunConfig:
    config: dict[str, Any] = {
        "task": "evaluate",
        "run": {"kind": "EvalJob", "namespace": "default", "name": "eval-test"},
        "model": {"uri": model_dir.as_uri()},
        "adapter": {"uri": trained.adapter_uri, "digest": trained.digest},
        "evaluation": {
            "suites": [
                {"name": "heldout", "type": "perplexity", "dataset": _source(8)},
                {
                    "name": "gsm8k",
                    "type": "taskAccuracy",
                    "max_samples": 6,
                    "few_shot": 1,
                    "answer_extraction": "gsm8k",
                    "dataset": _source(7),
                },
                {
                    "name": "judge",
                    "type": "judge",
                    "max_samples": 3,
                    "dataset": _source(3),
                    "judge_url": judge_url,
                    "judge_model": "stub-judge",
                    "judge_api_key_env": JUDGE_KEY_ENV,
                    "rubric": "Check the final number.",
                },
                {"name": "forgetting", "type": "lmEval", "tasks": ["arc_easy"], "max_samples": 4},
            ],
            "gates": [
                {"suite": "gsm8k", "metric": "exactMatch", "comparison": "gte", "threshold": 0},
                {
                    "suite": "heldout",
                    "metric": "loss",
                    "comparison": "lt",
                    "threshold": 0,
                    "baseline": "base",
                },
                {"suite": "judge", "metric": "score", "comparison": "gte", "threshold": 6},
                {"suite": "judge", "metric": "winRate", "comparison": "gt", "threshold": 0.5},
                {
                    "suite": "forgetting",
                    "metric": "arc_easy/acc",
                    "comparison": "gte",
                    "threshold": 0,
                },
            ],
            "max_new_tokens": 16,
            "batch_size": 4,
            "output_uri": (tmp / "eval").as_uri(),
        },
        "result_path": str(tmp / "termination-log"),
    }
    config.update(overrides)
    return RunConfig.model_validate(config)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------- tests


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_evaluate_runs_every_suite_publishes_results_and_decides_gates(
    tmp_path: Path,
    tiny_model_dir: Path,
    trained: Trained,
    judge_stub: JudgeStub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kubetune_runtime.recipes import evaluate

    monkeypatch.setenv(JUDGE_KEY_ENV, JUDGE_KEY)
    config = _eval_config(tmp_path, tiny_model_dir, trained, judge_stub.url)
    result = evaluate.run(config, workdir=tmp_path / "work")

    # The run succeeds although gates fail; the verdict is in evaluation.passed.
    assert result.status == "Succeeded"
    assert result.reason == "EvaluationSucceeded"
    evaluation = result.evaluation
    assert evaluation is not None
    assert len(json.dumps(evaluation)) < 3072
    assert len(result.to_json()) <= 4096
    assert evaluation["adapterDigest"] == trained.digest
    assert evaluation["resultsUri"] == (tmp_path / "eval").as_uri()

    rows = {(r["suite"], r["metric"]): r for r in evaluation["summary"]}
    assert set(rows) == {
        ("heldout", "loss"),
        ("heldout", "perplexity"),
        ("gsm8k", "exactMatch"),
        ("judge", "score"),
        ("judge", "winRate"),
    }
    for key in [("heldout", "loss"), ("heldout", "perplexity"), ("gsm8k", "exactMatch")]:
        row = rows[key]
        assert row["base"] is not None, row
        assert row["delta"] == pytest.approx(row["candidate"] - row["base"], rel=1e-4, abs=1e-5)
    loss = rows[("heldout", "loss")]
    assert 0 < loss["candidate"] < 10
    assert 0 < loss["base"] < 10
    assert rows[("heldout", "perplexity")]["candidate"] == pytest.approx(
        2.718281828 ** loss["candidate"], rel=1e-3
    )
    assert 0 <= rows[("gsm8k", "exactMatch")]["candidate"] <= 1
    # The stub rates every answer 6: equal scores, so the candidate never wins.
    assert rows[("judge", "score")] == {
        "suite": "judge",
        "metric": "score",
        "candidate": 6.0,
        "base": 6.0,
        "delta": 0.0,
    }
    assert rows[("judge", "winRate")]["candidate"] == 0.0
    assert rows[("judge", "winRate")]["base"] is None

    # lm-eval is reported as skipped, with a reason (not installed, or no offline data).
    [skipped] = evaluation["skipped"]
    assert skipped["suite"] == "forgetting"
    assert "not installed" in skipped["reason"] or "not available" in skipped["reason"]

    gates = {g["metric"]: g for g in evaluation["gates"]}
    assert gates["exactMatch"]["passed"] is True
    assert gates["loss"]["passed"] is (loss["delta"] < 0)
    assert gates["loss"]["message"].startswith("loss candidate - base ")
    assert gates["score"] == {
        "suite": "judge",
        "metric": "score",
        "passed": True,
        "message": "score 6 >= 6",
    }
    assert gates["winRate"]["passed"] is False
    assert gates["arc_easy/acc"]["passed"] is False
    assert "missing" in gates["arc_easy/acc"]["message"]
    assert evaluation["passed"] is False

    # Results are published completely, with a manifest that verifies every byte.
    published = tmp_path / "eval"
    assert (published / COMPLETE_MARKER).is_file()
    verified = verify_local(published, allow_extra_files=False)
    assert {f.path for f in verified.files} == {
        "heldout.jsonl",
        "gsm8k.jsonl",
        "judge.jsonl",
        "forgetting.jsonl",
        "summary.json",
    }
    assert verified.metadata["adapterDigest"] == trained.digest

    summary = json.loads((published / "summary.json").read_text(encoding="utf-8"))
    assert summary["passed"] is False
    assert summary["adapter"] == {"uri": trained.adapter_uri, "digest": trained.digest}
    suites = {s["name"]: s for s in summary["suites"]}
    assert suites["forgetting"]["skipped"]
    assert suites["judge"]["details"] == {
        "judgeModel": "stub-judge",
        "requests": 6,
        "failed": 0,
        "unparsed": 0,
    }

    heldout = _lines(published / "heldout.jsonl")
    assert len(heldout) == 8
    assert all(r["candidate"]["loss"] > 0 and r["base"]["loss"] > 0 for r in heldout)
    assert heldout[0]["prompt"][0]["role"] == "user"

    gsm8k = _lines(published / "gsm8k.jsonl")
    test_rows = _lines(GSM8K_TEST)[:7]
    assert len(gsm8k) == 6
    for record, row in zip(gsm8k, test_rows[1:], strict=True):
        # One few-shot example (row 1) precedes each scored question (rows 2-7).
        assert [m["role"] for m in record["prompt"]] == ["user", "assistant", "user"]
        assert record["prompt"][0]["content"] == test_rows[0]["question"]
        assert record["prompt"][-1]["content"] == row["question"]
        assert record["reference"] == row["answer"]
        assert record["referenceAnswer"] == row["answer"].split("####")[-1].strip()
        for side in ("candidate", "base"):
            assert isinstance(record[side]["output"], str)
            assert isinstance(record[side]["correct"], bool)
    # The adapter changes what the model says.
    assert any(r["candidate"]["output"] != r["base"]["output"] for r in gsm8k)

    judge_records = _lines(published / "judge.jsonl")
    assert len(judge_records) == 3
    assert all(r["candidate"]["score"] == 6.0 and r["base"]["score"] == 6.0 for r in judge_records)
    assert _lines(published / "forgetting.jsonl") == []

    # What the judge was sent: the MT-Bench prompt with question, reference and answer, and
    # the key from the environment as a bearer token.
    assert len(judge_stub.requests) == 6
    questions = {row["question"]: row["answer"] for row in test_rows[:3]}
    for request in judge_stub.requests:
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["Authorization"] == f"Bearer {JUDGE_KEY}"
        assert request["model"] == "stub-judge"
        assert request["temperature"] == 0
        system, user = request["messages"]
        assert system == {"role": "system", "content": "You are a helpful assistant."}
        [question] = [q for q in questions if f"[Question]\n{q}\n" in user["content"]]
        assert f"[The Start of Reference Answer]\n{questions[question]}\n" in user["content"]
        assert "[Grading Rubric]\nCheck the final number." in user["content"]
    answers = {r["candidate"]["output"] for r in judge_records} | {
        r["base"]["output"] for r in judge_records
    }
    sent = "\n".join(r["messages"][1]["content"] for r in judge_stub.requests)
    assert all(f"[The Start of Assistant's Answer]\n{a}\n" in sent for a in answers)


def test_a_wrong_adapter_digest_is_refused(
    tmp_path: Path, tiny_model_dir: Path, trained: Trained
) -> None:
    from kubetune_runtime.recipes import evaluate

    wrong = Trained(adapter_uri=trained.adapter_uri, digest="sha256:" + "0" * 64)
    config = _eval_config(tmp_path, tiny_model_dir, wrong, "http://127.0.0.1:9/v1")
    with pytest.raises(ArtifactInvalid, match="expected sha256:0000"):
        evaluate.run(config, workdir=tmp_path / "work")
    assert not (tmp_path / "eval").exists()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_generation_is_the_same_batched_and_alone(tiny_model_dir: Path, trained: Trained) -> None:
    """Left padding does not change greedy answers (position ids follow the attention mask)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune_runtime.eval.harness import generate, held_out_loss

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, Path(trained.adapter_uri.removeprefix("file://")))
    rows = _lines(GSM8K_TEST)[:3]
    # Different lengths, so the shorter prompts are padded in the batch.
    prompts = [
        [{"role": "user", "content": r["question"][: 40 + 80 * i]}] for i, r in enumerate(rows)
    ]
    batched = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3, temperature=0)
    alone = [
        generate(model, tokenizer, [p], max_new_tokens=8, batch_size=1, temperature=0)[0]
        for p in prompts
    ]
    assert batched == alone
    assert all(isinstance(answer, str) for answer in batched)

    # held_out_loss is the model's own token-mean loss for one sample.
    import torch

    from kubetune_runtime.data.tokenize import tokenize_dataset

    sample = {
        "messages": [
            {"role": "user", "content": rows[0]["question"]},
            {"role": "assistant", "content": rows[0]["answer"]},
        ]
    }
    loss, per_sample = held_out_loss(model, tokenizer, [sample], max_seq_length=256, batch_size=2)
    [example], _ = tokenize_dataset(tokenizer, [sample], max_seq_length=256)
    with torch.no_grad():
        expected = model(
            input_ids=torch.tensor([example["input_ids"]]),
            labels=torch.tensor([example["labels"]]),
        ).loss.item()
    assert loss == pytest.approx(expected, rel=1e-4)
    assert per_sample == [pytest.approx(expected, rel=1e-4)]


def test_judge_client_retries_transient_errors_and_never_leaks_the_key(
    judge_stub: JudgeStub,
) -> None:
    messages = [{"role": "user", "content": "Rate this."}]
    judge_stub.script = [
        (503, '{"error": "overloaded"}', {"Retry-After": "0"}),
        (429, '{"error": "slow down"}', {"Retry-After": "0"}),
    ]
    answer = call_judge(judge_stub.url, "stub-judge", JUDGE_KEY, messages, timeout=10)
    assert answer == judge_stub.verdict
    assert len(judge_stub.requests) == 3

    judge_stub.script = [(401, '{"error": "invalid api key"}', {})]
    with pytest.raises(EvaluationFailed, match="HTTP 401") as refused:
        call_judge(judge_stub.url, "stub-judge", JUDGE_KEY, messages, timeout=10)
    assert JUDGE_KEY not in str(refused.value)
    assert len(judge_stub.requests) == 4  # not retried

    judge_stub.script = [(503, "{}", {"Retry-After": "0"})] * 2
    with pytest.raises(EvaluationFailed, match="after 2 attempts"):
        call_judge(judge_stub.url, "stub-judge", None, messages, timeout=10, retries=1)
    assert "Authorization" not in judge_stub.requests[-1]["headers"]

    judge_stub.script = [(200, '{"choices": []}', {})]
    with pytest.raises(EvaluationFailed, match="without choices"):
        call_judge(judge_stub.url, "stub-judge", JUDGE_KEY, messages, timeout=10)

    with pytest.raises(ConfigInvalid, match="http"):
        call_judge("file:///etc", "stub-judge", None, messages, timeout=10)


def test_lm_eval_path_with_a_stand_in_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_lm_eval's real code path against a stand-in ``lm_eval`` (the package is optional)."""
    import os
    import sys
    import types

    from kubetune_runtime.eval.harness import run_lm_eval

    calls: list[dict[str, Any]] = []
    offline_seen: list[str | None] = []

    class HFLM:
        def __init__(self, pretrained: Any, tokenizer: Any, batch_size: int) -> None:
            self.model, self.tokenizer, self.batch_size = pretrained, tokenizer, batch_size

    def simple_evaluate(
        *,
        model: HFLM,
        tasks: list[str],
        num_fewshot: int | None,
        limit: int | None,
        log_samples: bool,
        confirm_run_unsafe_code: bool = False,
    ) -> dict[str, Any]:
        calls.append(
            {
                "tasks": tasks,
                "num_fewshot": num_fewshot,
                "limit": limit,
                "unsafe": confirm_run_unsafe_code,
                "batch_size": model.batch_size,
            }
        )
        offline_seen.append(os.environ.get("HF_DATASETS_OFFLINE"))
        if tasks == ["missing_task"]:
            raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (offline mode)")
        return {
            "results": {
                "arc_easy": {
                    "alias": "arc_easy",
                    "acc,none": 0.25,
                    "acc_stderr,none": 0.1,
                    "acc_norm,none": 0.5,
                    "acc_norm_stderr,none": 0.1,
                },
                "gsm8k": {"exact_match,strict-match": 0.125, "exact_match,flexible-extract": 0.5},
            }
        }

    package = types.ModuleType("lm_eval")
    package.simple_evaluate = simple_evaluate  # type: ignore[attr-defined]
    models = types.ModuleType("lm_eval.models")
    huggingface = types.ModuleType("lm_eval.models.huggingface")
    huggingface.HFLM = HFLM  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lm_eval", package)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", huggingface)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)

    class Model:
        def eval(self) -> None:
            pass

    options: dict[str, Any] = {
        "num_fewshot": 0,
        "batch_size": 4,
        "limit": 8,
        "allow_online": False,
        "allow_code_execution": False,
    }
    outcome = run_lm_eval(Model(), object(), tasks=["arc_easy", "gsm8k"], **options)
    assert outcome.skipped is None
    assert outcome.metrics == {
        "arc_easy/acc": 0.25,
        "arc_easy/acc_norm": 0.5,
        "gsm8k/exact_match,strict-match": 0.125,
        "gsm8k/exact_match,flexible-extract": 0.5,
    }
    assert calls[0] == {
        "tasks": ["arc_easy", "gsm8k"],
        "num_fewshot": 0,
        "limit": 8,
        "unsafe": False,
        "batch_size": 4,
    }

    skipped = run_lm_eval(Model(), object(), tasks=["missing_task"], **options)
    assert skipped.metrics == {}
    assert skipped.skipped is not None
    assert skipped.skipped.startswith(
        "task data for missing_task is not available in the local cache (allowOnline is false): "
        "ConnectionError: Couldn't reach"
    )
    # Offline during the runs, restored afterwards.
    assert offline_seen == ["1", "1"]
    assert "HF_DATASETS_OFFLINE" not in os.environ


def test_the_evaluation_result_fits_the_termination_message() -> None:
    from kubetune_runtime.recipes.evaluate import _compact

    summary = [
        {
            "suite": f"suite-{i}",
            "metric": "exactMatch",
            "candidate": 0.5,
            "base": 0.25,
            "delta": 0.25,
        }
        for i in range(60)
    ]
    gates = [
        {"suite": "suite-7", "metric": "exactMatch", "passed": True, "message": "x" * 1000},
    ]
    evaluation = _compact(
        {
            "summary": summary,
            "gates": gates,
            "passed": True,
            "resultsUri": "s3://b/eval",
            "adapterDigest": "sha256:" + "a" * 64,
        },
        gated={("suite-7", "exactMatch")},
        budget=1024,
    )
    assert len(json.dumps(evaluation, separators=(",", ":"))) <= 1024
    assert evaluation["truncated"] is True
    assert [row["suite"] for row in evaluation["summary"]] == ["suite-7"]
    assert evaluation["gates"][0]["message"] == "x" * 120
