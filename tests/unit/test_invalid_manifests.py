"""A corpus of invalid manifests: each must be rejected at the right field, saying what it expected.

Every case is one small valid manifest (one per kind, below) plus a few mutations, so a case
fails for the reason it names and nothing else. Paths in mutations use the same notation as
`Problem.path`: ``spec.suites[0].name``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

import pytest

from kubetune_operator.validation import ManifestInvalid, Problem, parse_manifest

DIGEST = "sha256:" + "0123456789abcdef" * 4
AWS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"  # AWS's documented example key id
HF_TOKEN = "hf_" + "aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789"
OPENAI_KEY = "sk-" + "proj" + "A1b2C3d4E5f6G7h8I9j0K1l2"
DATA = "s3://datasets/gsm8k/test.jsonl"

BASES: dict[str, dict[str, Any]] = {
    "ftj": {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "tiny-sft"},
        "spec": {
            "baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
            "dataset": {
                "train": {"uri": "s3://datasets/gsm8k/train.jsonl", "format": "promptCompletion"}
            },
            "lora": {"r": 8},
            "training": {"learningRate": "2e-4"},
            "output": {"uri": "s3://models/tiny-sft"},
        },
    },
    "evj": {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "EvalJob",
        "metadata": {"name": "tiny-eval"},
        "spec": {
            "target": {"fineTuneJobRef": {"name": "tiny-sft"}},
            "suites": [{"name": "ppl", "type": "perplexity", "dataset": {"uri": DATA}}],
            "gates": [
                {
                    "suite": "ppl",
                    "metric": "perplexity",
                    "comparison": "lte",
                    "threshold": "0",
                    "baseline": "base",
                }
            ],
            "output": {"uri": "s3://eval-results/tiny-eval"},
        },
    },
    "adep": {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": "tiny-serve"},
        "spec": {
            "baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
            "engine": {"type": "vllm"},
            "adapters": [{"name": "gsm8k", "source": {"fineTuneJobRef": {"name": "tiny-sft"}}}],
        },
    },
}


class _Delete:
    def __repr__(self) -> str:
        return "DELETE"


DELETE = _Delete()


@dataclass(frozen=True)
class Rename:
    """Move the value at the mutation's path to a sibling key (a typo that keeps the content)."""

    new_key: str


def _keys(path: str) -> list[str | int]:
    return [
        int(p[1:-1]) if p.startswith("[") else p for p in re.findall(r"\[\d+\]|[^.\[\]]+", path)
    ]


def _mutate(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = _keys(path)
    node: Any = doc
    for key in parents:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    if isinstance(node, list) and last == len(node):
        node.append(copy.deepcopy(value))  # an index one past the end appends
    elif value is DELETE:
        del node[last]
    elif isinstance(value, Rename):
        node[value.new_key] = node.pop(last)
    else:
        node[last] = copy.deepcopy(value)


def manifest(base: str, mutations: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(BASES[base])
    for path, value in mutations.items():
        _mutate(doc, path, value)
    return doc


def case(
    case_id: str,
    base: str,
    mutations: dict[str, Any],
    path: str,
    fragment: str,
    *,
    bug: str | None = None,
) -> Any:
    """One corpus entry; ``bug`` marks a case that is wrongly accepted or reported today."""
    marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
    return pytest.param(base, mutations, path, fragment, id=case_id, marks=marks)


PIN_DIGEST = {"uri": "s3://models/team-a/adapter", "digest": DIGEST}
DPO = {"spec.objective": {"type": "dpo"}, "spec.dataset.train.format": "preference"}
FULL = {"spec.method": "full", "spec.lora": DELETE}
PPL_SUITE = {"name": "ppl", "type": "perplexity", "dataset": {"uri": DATA}}

# fmt: off
CORPUS = [
    # ------------------------------------------------------- unknown fields (typos), any depth
    case("typo-spec-trainng", "ftj", {"spec.training": Rename("trainng")},
         "spec.trainng", "unknown field (check the spelling"),
    case("typo-spec-lora-rank", "ftj", {"spec.lora.r": Rename("rank")},
         "spec.lora.rank", "unknown field (check the spelling"),
    case("typo-top-level-specs", "ftj", {"spec": Rename("specs")},
         "specs", "unknown field"),
    case("typo-dataset-columns-promt", "ftj", {"spec.dataset.train.columns": {"promt": "question"}},
         "spec.dataset.train.columns.promt", "unknown field"),
    case("typo-suite-datset", "evj", {"spec.suites[0].dataset": Rename("datset")},
         "spec.suites[0].datset", "unknown field"),
    case("typo-engine-gpu-memory-utilisation", "adep",
         {"spec.engine.gpuMemoryUtilisation": "0.9"},
         "spec.engine.gpuMemoryUtilisation", "unknown field"),
    # ---------------------------------------------------------------------------- wrong types
    case("type-epochs-word", "ftj", {"spec.training.epochs": "three"},
         "spec.training.epochs", "valid integer"),
    case("type-lora-list-for-object", "ftj", {"spec.lora": [{"r": 8}]},
         "spec.lora", "Input should be an object"),
    case("type-learning-rate-yaml-float", "ftj", {"spec.training.learningRate": 0.0002},
         "spec.training.learningRate", "valid string, got 0.0002"),
    case("type-target-modules-scalar", "ftj", {"spec.lora.targetModules": "q_proj"},
         "spec.lora.targetModules", "valid array"),
    case("type-gate-threshold-float", "evj", {"spec.gates[0].threshold": 0.5},
         "spec.gates[0].threshold", "valid string, got 0.5"),
    case("type-learning-rate-word", "ftj", {"spec.training.learningRate": "fast"},
         "spec.training.learningRate", "non-negative decimal number written as a string"),
    case("type-epochs-numeric-string", "ftj", {"spec.training.epochs": "3"},
         "spec.training.epochs", "valid integer"),
    case("type-lora-r-bool", "ftj", {"spec.lora.r": True},
         "spec.lora.r", "valid integer"),
    case("type-packing-yes", "ftj", {"spec.dataset.packing": "yes"},
         "spec.dataset.packing", "valid boolean"),
    # ------------------------------------------------------------------------ out of range
    case("range-lora-r-0", "ftj", {"spec.lora.r": 0},
         "spec.lora.r", "greater than or equal to 1"),
    case("range-learning-rate-2", "ftj", {"spec.training.learningRate": "2"},
         "spec.training.learningRate", "learningRate must be > 0.0 and <= 1.0"),
    case("range-learning-rate-0", "ftj", {"spec.training.learningRate": "0"},
         "spec.training.learningRate", "learningRate must be > 0.0 and <= 1.0"),
    case("range-learning-rate-negative", "ftj", {"spec.training.learningRate": "-1e-4"},
         "spec.training.learningRate", "non-negative decimal"),
    case("range-eval-split-fraction-0.9", "ftj", {"spec.dataset.evalSplitFraction": "0.9"},
         "spec.dataset.evalSplitFraction", "evalSplitFraction must be > 0.0 and <= 0.5"),
    case("range-backoff-limit-negative", "ftj", {"spec.backoffLimit": -1},
         "spec.backoffLimit", "greater than or equal to 0"),
    case("range-gpu-count-17", "ftj", {"spec.resources": {"gpu": {"count": 17}}},
         "spec.resources.gpu.count", "less than or equal to 16"),
    case("range-lora-dropout-1", "ftj", {"spec.lora.dropout": "1"},
         "spec.lora.dropout", "dropout must be below 1"),
    case("range-dpo-beta-0", "ftj", {**DPO, "spec.objective.beta": "0"},
         "spec.objective.beta", "beta must be > 0.0 and <= 10.0"),
    case("range-zero-stage-4", "ftj", {**FULL, "spec.distributed": {"deepspeed": {"zeroStage": 4}}},
         "spec.distributed.deepspeed.zeroStage", "Input should be 0, 1, 2 or 3"),
    case("range-max-seq-length-8", "ftj", {"spec.dataset.maxSeqLength": 8},
         "spec.dataset.maxSeqLength", "greater than or equal to 16"),
    case("range-nodes-0", "ftj", {"spec.distributed": {"nodes": 0}},
         "spec.distributed.nodes", "greater than or equal to 1"),
    case("range-active-deadline-0", "ftj", {"spec.activeDeadlineSeconds": 0},
         "spec.activeDeadlineSeconds", "greater than or equal to 1"),
    case("range-temperature-3", "evj", {"spec.generation": {"temperature": "3"}},
         "spec.generation.temperature", "temperature must be at most 2"),
    case("range-few-shot-17", "evj",
         {"spec.suites[0].type": "taskAccuracy", "spec.suites[0].fewShot": 17},
         "spec.suites[0].fewShot", "less than or equal to 16"),
    case("range-gpu-memory-utilization-1.5", "adep", {"spec.engine.gpuMemoryUtilization": "1.5"},
         "spec.engine.gpuMemoryUtilization", "must be in (0, 1]"),
    # ------------------------------------------------------------------- missing, required
    case("missing-spec-output", "ftj", {"spec.output": DELETE},
         "spec.output", "required field is missing"),
    case("missing-spec-output-null", "ftj", {"spec.output": None},
         "spec.output", "required field is missing"),
    case("missing-train-uri", "ftj", {"spec.dataset.train.uri": DELETE},
         "spec.dataset.train.uri", "required field is missing"),
    case("missing-base-model", "ftj", {"spec.baseModel": DELETE},
         "spec.baseModel", "required field is missing"),
    case("missing-metadata-name", "ftj", {"metadata": {}},
         "metadata.name", "required field is missing"),
    case("missing-lm-eval-tasks", "evj", {"spec.suites[0]": {"name": "ppl", "type": "lmEval"}},
         "spec.suites[0].tasks", "required field is missing"),
    case("missing-evaljob-suites", "evj", {"spec.suites": [], "spec.gates": DELETE},
         "spec.suites", "at least 1 item"),
    case("missing-judge-endpoint", "evj",
         {"spec.suites[0]": {"name": "ppl", "type": "judge", "dataset": {"uri": DATA}}},
         "spec.suites[0].judge", "required field is missing"),
    # ------------------------------------------------------------------------------- URIs
    case("uri-model-http", "ftj", {"spec.baseModel.uri": "http://example.com/qwen"},
         "spec.baseModel.uri", "expected a URI hf://org/name[@revision]"),
    case("uri-hf-without-org", "ftj", {"spec.baseModel.uri": "hf://gpt2"},
         "spec.baseModel.uri", "expected a URI hf://org/name[@revision]"),
    case("uri-s3-bucket-uppercase", "ftj", {"spec.output.uri": "s3://Models/tiny-sft"},
         "spec.output.uri", "expected a URI s3://bucket/prefix"),
    case("uri-pvc-bad-claim-name", "ftj", {"spec.output.uri": "pvc://My_Claim/out"},
         "spec.output.uri", "expected a URI s3://bucket/prefix, pvc://claim/path"),
    case("uri-s3-with-userinfo", "ftj", {"spec.output.uri": "s3://user:pass@models/tiny"},
         "spec.output.uri", "expected a URI s3://bucket/prefix"),
    case("uri-output-on-hub", "ftj", {"spec.output.uri": "hf://acme/tiny-sft"},
         "spec.output.uri", "expected a URI s3://bucket/prefix"),
    case("uri-file-not-absolute", "ftj", {"spec.output.uri": "file://relative/out"},
         "spec.output.uri", "file:///path"),
    case("uri-endpoint-with-credentials", "ftj",
         {"spec.storage": {"endpoint": "https://user:pass@minio.local:9000"}},
         "spec.storage.endpoint", "without user:password@"),
    case("uri-endpoint-with-query", "ftj",
         {"spec.storage": {"endpoint": "https://minio.local:9000/?X-Amz-Credential=x"}},
         "spec.storage.endpoint", "an http(s)://host[:port][/path] URL"),
    case("uri-judge-with-credentials", "evj",
         {"spec.suites[0]": {"name": "ppl", "type": "judge", "dataset": {"uri": DATA},
                             "judge": {"url": "https://user:pass@judge.local/v1", "model": "m"}}},
         "spec.suites[0].judge.url", "without user:password@"),
    # ------------------------------------------------------------------ inline credentials
    case("cred-storage-access-key-id", "ftj", {"spec.storage": {"accessKeyId": "minioadmin"}},
         "spec.storage.accessKeyId", "inline credentials are not accepted"),
    case("cred-storage-secret-access-key", "ftj",
         {"spec.storage": {"secretAccessKey": "minioadmin"}},
         "spec.storage.secretAccessKey", "inline credentials are not accepted"),
    case("cred-base-model-token-field", "ftj", {"spec.baseModel.token": "see-vault"},
         "spec.baseModel.token", "inline credentials are not accepted"),
    case("cred-aws-key-in-system-prompt", "ftj", {"spec.dataset.systemPrompt": AWS_KEY_ID},
         "spec.dataset.systemPrompt", "value looks like a secret key or token"),
    case("cred-aws-key-in-node-selector", "ftj",
         {"spec.scheduling": {"nodeSelector": {"aws-key": AWS_KEY_ID}}},
         "spec.scheduling.nodeSelector.aws-key", "value looks like a secret key or token"),
    case("cred-aws-key-in-engine-args", "adep",
         {"spec.engine.extraArgs": ["--aws-access-key-id", AWS_KEY_ID]},
         "spec.engine.extraArgs[1]", "value looks like a secret key or token"),
    case("cred-hf-token-value", "ftj", {"spec.baseModel.token": HF_TOKEN},
         "spec.baseModel.token", "value looks like a secret key or token"),
    case("cred-hf-token-as-revision", "ftj",
         {"spec.baseModel.uri": f"hf://Qwen/Qwen2.5-0.5B-Instruct@{HF_TOKEN}"},
         "spec.baseModel.uri", "value looks like a secret key or token"),
    case("cred-judge-api-key-value", "evj",
         {"spec.suites[0]": {"name": "ppl", "type": "judge", "dataset": {"uri": DATA},
                             "judge": {"url": "https://judge.local/v1", "model": "m",
                                       "apiKey": OPENAI_KEY}}},
         "spec.suites[0].judge.apiKey", "value looks like a secret key or token"),
    case("cred-private-key", "ftj",
         {"spec.storage": {"clientKey": "-----BEGIN PRIVATE KEY-----\nMIIE..."}},
         "spec.storage.clientKey", "value looks like a secret key or token"),
    case("cred-aws-key-in-annotation", "ftj",
         {"metadata.annotations": {"aws-key": AWS_KEY_ID}},
         "metadata.annotations.aws-key", "value looks like a secret key or token"),
    # ------------------------------------------------------- method, objective, cross-field
    case("qlora-without-quantization", "ftj", {"spec.method": "qlora"},
         "spec.quantization", "method qlora requires spec.quantization"),
    case("quantization-with-lora", "ftj", {"spec.quantization": {"quantType": "nf4"}},
         "spec.quantization", "only qlora accepts it"),
    case("lora-block-with-method-full", "ftj", {"spec.method": "full"},
         "spec.lora", "method full trains all weights; remove spec.lora"),
    case("dpo-with-prompt-completion-data", "ftj", {"spec.objective": {"type": "dpo"}},
         "spec.dataset.train.format", "dpo and orpo need preference data"),
    case("orpo-with-messages-data", "ftj",
         {"spec.objective": {"type": "orpo"}, "spec.dataset.train.format": "messages"},
         "spec.dataset.train.format", "dpo and orpo need preference data"),
    case("sft-with-preference-data", "ftj", {"spec.dataset.train.format": "preference"},
         "spec.dataset.train.format", "sft needs non-preference data"),
    case("sft-with-dpo-beta", "ftj", {"spec.objective": {"type": "sft", "beta": "0.1"}},
         "spec.objective.beta", "unknown field"),
    case("objective-type-unknown", "ftj", {"spec.objective": {"type": "ppo"}},
         "spec.objective", "does not match any of the expected tags: 'sft', 'dpo', 'orpo'"),
    case("epochs-and-max-steps", "ftj",
         {"spec.training.epochs": 1, "spec.training.maxSteps": 100},
         "spec.training.maxSteps", "set at most one of epochs and maxSteps"),
    case("warmup-ratio-and-steps", "ftj",
         {"spec.training.warmupRatio": "0.1", "spec.training.warmupSteps": 10},
         "spec.training.warmupSteps", "set at most one of warmupRatio and warmupSteps"),
    case("eval-and-eval-split-fraction", "ftj",
         {"spec.dataset.eval": {"uri": DATA}, "spec.dataset.evalSplitFraction": "0.1"},
         "spec.dataset.evalSplitFraction", "set at most one of eval and evalSplitFraction"),
    case("eval-steps-without-eval-data", "ftj", {"spec.training.evalSteps": 50},
         "spec.training.evalSteps", "needs dataset.eval or dataset.evalSplitFraction"),
    case("offload-params-with-zero-2", "ftj",
         {**FULL, "spec.distributed": {"deepspeed": {"zeroStage": 2, "offloadParams": "cpu"}}},
         "spec.distributed.deepspeed.offloadParams", "offloadParams needs zeroStage 3"),
    case("offload-optimizer-with-zero-0", "ftj",
         {**FULL, "spec.distributed": {"deepspeed": {"zeroStage": 0, "offloadOptimizer": "cpu"}}},
         "spec.distributed.deepspeed.offloadOptimizer", "offloadOptimizer needs zeroStage 1, 2"),
    case("processes-per-node-not-gpu-count", "ftj",
         {"spec.resources": {"gpu": {"count": 8}}, "spec.distributed": {"processesPerNode": 4}},
         "spec.distributed.processesPerNode", "must equal resources.gpu.count"),
    case("all-linear-with-other-modules", "ftj",
         {"spec.lora.targetModules": ["all-linear", "q_proj"]},
         "spec.lora.targetModules", "all-linear cannot be combined with other target modules"),
    case("storage-both-credentials", "ftj",
         {"spec.storage": {"credentials": {"secretRef": {"name": "s3"},
                                           "serviceAccountName": "trainer"}}},
         "spec.storage.credentials", "set exactly one of secretRef or serviceAccountName"),
    case("storage-no-credentials", "ftj", {"spec.storage": {"credentials": {}}},
         "spec.storage.credentials", "set exactly one of secretRef or serviceAccountName"),
    case("evaluation-gate-unknown-suite", "ftj",
         {"spec.evaluation": {"suites": [PPL_SUITE],
                              "gates": [{"suite": "accuracy", "metric": "exactMatch",
                                         "comparison": "gte", "threshold": "0.5"}]}},
         "spec.evaluation.gates", "every gate must name a suite in suites"),
    # ------------------------------------------------------------ metadata, apiVersion, kind
    case("metadata-name-uppercase", "ftj", {"metadata.name": "Tiny-SFT"},
         "metadata.name", "a DNS label: lowercase letters, digits and '-'"),
    case("metadata-name-64-characters", "ftj", {"metadata.name": "a" * 64},
         "metadata.name", "at most 63 characters"),
    case("metadata-namespace-uppercase", "ftj", {"metadata.namespace": "Team-A"},
         "metadata.namespace", "a DNS label"),
    case("run-id-not-dns-label", "ftj", {"spec.runId": "Run_1"},
         "spec.runId", "a DNS label"),
    case("api-version-wrong", "ftj", {"apiVersion": "kubetune.io/v1"},
         "apiVersion", "expected kubetune.io/v1alpha1, got 'kubetune.io/v1'"),
    case("kind-unknown", "ftj", {"kind": "FineTuneJobs"},
         "kind", "expected one of FineTuneJob, EvalJob, AdapterDeployment"),
    # ------------------------------------------------------------------------------ EvalJob
    case("evaljob-two-targets", "evj",
         {"spec.target.adapterDeploymentRef": {"name": "tiny-serve", "adapter": "gsm8k"}},
         "spec.target", "set exactly one of fineTuneJobRef, adapter or adapterDeploymentRef"),
    case("evaljob-zero-targets", "evj", {"spec.target": {}},
         "spec.target", "set exactly one of fineTuneJobRef, adapter or adapterDeploymentRef"),
    case("evaljob-gate-unknown-suite", "evj", {"spec.gates[0].suite": "accuracy"},
         "spec.gates", "every gate must name a suite in suites"),
    case("evaljob-base-gate-without-compare", "evj", {"spec.compareToBase": False},
         "spec.gates", "gates with baseline base need compareToBase: true"),
    case("evaljob-adapter-target-without-base-model", "evj",
         {"spec.target": {"adapter": PIN_DIGEST}},
         "spec.baseModel", "baseModel is required when the target is an adapter URI"),
    case("evaljob-adapter-target-bad-digest", "evj",
         {"spec.target": {"adapter": {**PIN_DIGEST, "digest": "sha256:" + "g" * 64}},
          "spec.baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"}},
         "spec.target.adapter.digest", "'sha256:' followed by 64 lowercase hex digits"),
    case("evaljob-tasks-on-perplexity-suite", "evj", {"spec.suites[0].tasks": ["hellaswag"]},
         "spec.suites[0].tasks", "unknown field"),
    case("evaljob-answer-pattern-on-perplexity-suite", "evj",
         {"spec.suites[0].answerPattern": r"#### (\d+)"},
         "spec.suites[0].answerPattern", "unknown field"),
    case("evaljob-dataset-on-lm-eval-suite", "evj",
         {"spec.suites[0].type": "lmEval", "spec.suites[0].tasks": ["hellaswag"]},
         "spec.suites[0].dataset", "unknown field"),
    case("evaljob-suite-type-unknown", "evj", {"spec.suites[0].type": "bleu"},
         "spec.suites[0]", "does not match any of the expected tags"),
    case("evaljob-gate-comparison-symbol", "evj", {"spec.gates[0].comparison": ">="},
         "spec.gates[0].comparison", "Input should be 'gte', 'gt', 'lte' or 'lt'"),
    case("evaljob-gate-baseline-unknown", "evj", {"spec.gates[0].baseline": "previous"},
         "spec.gates[0].baseline", "Input should be 'none' or 'base'"),
    case("evaljob-regex-extraction-without-pattern", "evj",
         {"spec.suites[0].type": "taskAccuracy", "spec.suites[0].answerExtraction": "regex"},
         "spec.suites[0].answerPattern", "answerPattern"),
    case("evaljob-duplicate-suite-names", "evj", {"spec.suites[1]": PPL_SUITE},
         "spec.suites[1]", "duplicate entry with name"),
    # ------------------------------------------------------------------- AdapterDeployment
    case("adapter-two-sources", "adep",
         {"spec.adapters[0].source.uri": PIN_DIGEST["uri"],
          "spec.adapters[0].source.digest": DIGEST},
         "spec.adapters[0].source", "set exactly one of fineTuneJobRef or uri"),
    case("adapter-no-source", "adep", {"spec.adapters[0].source": {}},
         "spec.adapters[0].source", "set exactly one of fineTuneJobRef or uri"),
    case("adapter-uri-without-digest", "adep",
         {"spec.adapters[0].source": {"uri": PIN_DIGEST["uri"]}},
         "spec.adapters[0].source.digest", "uri must be pinned by digest"),
    case("adapter-digest-without-uri", "adep", {"spec.adapters[0].source.digest": DIGEST},
         "spec.adapters[0].source.digest", "digest needs uri"),
    case("adapter-digest-short-uppercase", "adep",
         {"spec.adapters[0].source": {**PIN_DIGEST, "digest": "sha256:ABC123"}},
         "spec.adapters[0].source.digest", "'sha256:' followed by 64 lowercase hex digits"),
    case("adapter-digest-md5", "adep",
         {"spec.adapters[0].source": {**PIN_DIGEST, "digest": "md5:" + "0" * 32}},
         "spec.adapters[0].source.digest", "'sha256:' followed by 64 lowercase hex digits"),
    case("adapter-uri-on-hub", "adep",
         {"spec.adapters[0].source": {**PIN_DIGEST, "uri": "hf://acme/adapter"}},
         "spec.adapters[0].source.uri", "expected a URI s3://bucket/prefix"),
    case("adapter-name-not-dns-label", "adep", {"spec.adapters[0].name": "GSM8K_adapter"},
         "spec.adapters[0].name", "a DNS label"),
    case("adapter-vllm-max-lora-rank-48", "adep", {"spec.capacity": {"maxLoraRank": 48}},
         "spec.capacity.maxLoraRank", "vLLM accepts maxLoraRank 1, 8, 16, 32, 64"),
    case("adapter-max-cpu-loras-below-max-loras", "adep",
         {"spec.capacity": {"maxLoras": 8, "maxCpuLoras": 4}},
         "spec.capacity.maxCpuLoras", "maxCpuLoras must be at least maxLoras"),
    case("adapter-engine-unknown", "adep", {"spec.engine": {"type": "tgi"}},
         "spec.engine", "expected tags: 'vllm', 'lorax', 'builtin'"),
    case("adapter-builtin-engine-with-vllm-field", "adep",
         {"spec.engine": {"type": "builtin", "gpuMemoryUtilization": "0.9"}},
         "spec.engine.gpuMemoryUtilization", "unknown field"),
    case("adapter-replicas-negative", "adep", {"spec.replicas": -1},
         "spec.replicas", "greater than or equal to 0"),
    case("adapter-service-port-0", "adep", {"spec.service": {"port": 0}},
         "spec.service.port", "greater than or equal to 1"),
    case("adapter-duplicate-names", "adep",
         {"spec.adapters[1]": {"name": "gsm8k", "source": {"fineTuneJobRef": {"name": "other"}}}},
         "spec.adapters[1]", "duplicate entry with name"),
]
# fmt: on


@pytest.mark.parametrize("base", sorted(BASES))
def test_base_manifests_are_valid(base: str) -> None:
    parse_manifest(manifest(base, {}))


def test_corpus_is_large_and_ids_are_unique() -> None:
    ids = [param.id for param in CORPUS]
    assert len(ids) == len(set(ids))
    expected_to_pass = [param for param in CORPUS if not param.marks]
    assert len(expected_to_pass) >= 35


@pytest.mark.parametrize(("base", "mutations", "path", "fragment"), CORPUS)
def test_invalid_manifest_is_rejected_at_its_field(
    base: str, mutations: dict[str, Any], path: str, fragment: str
) -> None:
    doc = manifest(base, mutations)

    with pytest.raises(ManifestInvalid) as excinfo:
        parse_manifest(doc)

    problems: list[Problem] = excinfo.value.problems
    at_path = [problem for problem in problems if problem.path == path]
    assert at_path, f"no problem at {path!r}; got {problems}"
    assert any(fragment in problem.message for problem in at_path), (
        f"no message at {path!r} contains {fragment!r}; got {at_path}"
    )


# ------------------------------------------------------------------------ transition rules


def _stored_started(doc: dict[str, Any]) -> dict[str, Any]:
    """The object as the API server stores it (defaults applied), after training started."""
    stored = parse_manifest(copy.deepcopy(doc)).model_dump(
        by_alias=True, exclude_none=True, mode="json"
    )
    stored["status"] = {"startTime": "2025-06-01T12:00:00Z", "jobName": "tiny-sft-train"}
    return stored


def test_training_spec_of_a_started_job_is_immutable() -> None:
    old = _stored_started(BASES["ftj"])
    new = manifest("ftj", {"spec.training.learningRate": "1e-4"})

    with pytest.raises(ManifestInvalid) as excinfo:
        parse_manifest(new, old=old)

    assert [p.path for p in excinfo.value.problems] == ["spec"]
    assert "change spec.runId" in excinfo.value.problems[0].message


def test_training_spec_may_change_with_a_new_run_id() -> None:
    old = _stored_started(BASES["ftj"])
    new = manifest("ftj", {"spec.training.learningRate": "1e-4", "spec.runId": "retry-1"})

    parse_manifest(new, old=old)


def test_suspend_may_change_on_a_started_job() -> None:
    old = _stored_started(BASES["ftj"])
    new = manifest("ftj", {"spec.suspend": True})

    assert parse_manifest(new, old=old).spec.suspend is True


def test_training_spec_may_change_before_the_job_started() -> None:
    old = _stored_started(BASES["ftj"])
    del old["status"]
    new = manifest("ftj", {"spec.training.learningRate": "1e-4"})

    parse_manifest(new, old=old)
