"""Rendering a resource's spec into the runtime's RunConfig (the operator-to-runtime contract)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubetune_operator.api import EvalJob, FineTuneJob
from kubetune_operator.api.common import BaseModelSpec, SecretKeyRef
from kubetune_operator.render import render_eval, render_finetune, secret_env_name
from kubetune_operator.validation import load_documents, parse_manifest
from kubetune_runtime.config import AdapterRef, RunConfig

ROOT = Path(__file__).resolve().parents[2]


def finetune(**spec: Any) -> FineTuneJob:
    doc = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "gsm8k", "namespace": "team-a", "uid": "u-1"},
        "spec": {
            "baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct@main"},
            "dataset": {"train": {"uri": "s3://data/gsm8k/train.jsonl"}},
            "output": {"uri": "s3://models/team-a/gsm8k/"},
            **spec,
        },
    }
    job = parse_manifest(doc)
    assert isinstance(job, FineTuneJob)
    return job


def test_defaults_resolve_to_runtime_terms() -> None:
    config = render_finetune(finetune())
    assert config.task == "train"
    assert config.run.namespace == "team-a"
    assert config.method == "lora"
    assert config.lora is not None
    assert (config.lora.r, config.lora.lora_alpha, config.lora.target_modules) == (
        16,
        32,
        "all-linear",
    )
    assert config.training.learning_rate == pytest.approx(2e-4)
    assert config.training.warmup_ratio == pytest.approx(0.03)
    assert config.distributed.processes_per_node == 1
    assert config.checkpoint is not None
    assert config.checkpoint.uri == "s3://models/team-a/gsm8k/checkpoints"
    assert config.evaluation is None


def test_every_section_maps() -> None:
    config = render_finetune(
        finetune(
            method="qlora",
            quantization={"quantType": "fp4", "computeDtype": "float32"},
            objective={"type": "dpo", "beta": "0.25", "lossType": "ipo"},
            dataset={
                "train": {
                    "uri": "s3://data/hh/train.jsonl.gz",
                    "format": "preference",
                    "columns": {"chosen": "good", "rejected": "bad"},
                },
                "evalSplitFraction": "0.1",
                "maxSeqLength": 512,
                "packing": True,
                "overlength": "error",
            },
            lora={"r": 8, "alpha": 16, "dropout": "0.1", "targetModules": ["q_proj", "v_proj"]},
            training={"maxSteps": 30, "learningRate": "5e-5", "warmupSteps": 3, "seed": 7},
            resources={"gpu": {"count": 4}},
            distributed={"nodes": 2, "deepspeed": {"zeroStage": 2, "offloadOptimizer": "cpu"}},
            checkpointing={"everySteps": 10, "keepLast": 3},
            evaluation={
                "suites": [
                    {
                        "name": "held-out",
                        "type": "perplexity",
                        "dataset": {"uri": "s3://data/hh/test.jsonl.gz"},
                    },
                    {
                        "name": "judge",
                        "type": "judge",
                        "dataset": {"uri": "s3://data/golden.jsonl"},
                        "judge": {
                            "url": "https://judge.example/v1",
                            "model": "j",
                            "apiKeySecretRef": {"name": "judge", "key": "api-key"},
                        },
                    },
                ],
                "gates": [
                    {
                        "suite": "held-out",
                        "metric": "loss",
                        "comparison": "lte",
                        "threshold": "-0.01",
                        "baseline": "base",
                    }
                ],
            },
        )
    )
    assert config.quantization is not None
    assert config.quantization.bnb_4bit_quant_type == "fp4"
    assert (config.objective.type, config.objective.beta, config.objective.loss_type) == (
        "dpo",
        0.25,
        "ipo",
    )
    assert config.data is not None
    assert config.data.train.columns == {"chosen": "good", "rejected": "bad"}
    assert config.data.eval_split_fraction == pytest.approx(0.1)
    assert (config.data.max_seq_length, config.data.packing, config.data.overlength) == (
        512,
        True,
        "error",
    )
    assert config.lora is not None
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.training.max_steps == 30
    assert config.training.warmup_steps == 3
    assert config.training.warmup_ratio is None
    assert config.distributed.processes_per_node == 4
    assert config.distributed.nodes == 2
    assert config.distributed.deepspeed is not None
    assert config.distributed.deepspeed.offload_optimizer == "cpu"
    assert config.evaluation is not None
    assert config.evaluation.output_uri == "s3://models/team-a/gsm8k/eval"
    assert config.evaluation.gates[0].threshold == pytest.approx(-0.01)
    judge = config.evaluation.suites[1]
    assert judge.judge_api_key_env == secret_env_name(SecretKeyRef(name="judge", key="api-key"))
    assert judge.judge_url == "https://judge.example/v1"


def test_secrets_become_env_names_never_values() -> None:
    job = finetune(
        baseModel={
            "uri": "hf://meta-llama/Llama-3.1-8B",
            "tokenSecretRef": {"name": "hf", "key": "token"},
        },
        storage={
            "endpoint": "https://minio.storage:9000",
            "pathStyle": True,
            "credentials": {"secretRef": {"name": "s3-keys"}},
        },
    )
    config = render_finetune(job)
    assert config.model.token_env is not None
    assert config.model.token_env.startswith("KUBETUNE_SECRET_")
    assert config.storage.endpoint_url == "https://minio.storage:9000"
    assert config.storage.path_style is True
    text = config.model_dump_json()
    assert "s3-keys" not in text  # the Secret is wired by the pod spec, not the RunConfig


def test_runconfig_round_trips_through_json() -> None:
    config = render_finetune(finetune())
    again = RunConfig.model_validate_json(config.model_dump_json())
    assert again == config


def test_runconfig_rejects_incomplete_train_config() -> None:
    config = json.loads(render_finetune(finetune()).model_dump_json())
    del config["data"]
    with pytest.raises(ValueError, match="task train needs data"):
        RunConfig.model_validate(config)


def test_eval_job_renders_with_resolved_adapter() -> None:
    job = parse_manifest(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "EvalJob",
            "metadata": {"name": "ev"},
            "spec": {
                "target": {"fineTuneJobRef": {"name": "gsm8k"}},
                "suites": [
                    {
                        "name": "acc",
                        "type": "taskAccuracy",
                        "answerExtraction": "gsm8k",
                        "dataset": {"uri": "s3://data/gsm8k/test.jsonl"},
                    }
                ],
                "generation": {"maxNewTokens": 64, "batchSize": 4},
                "output": {"uri": "s3://results/ev"},
            },
        }
    )
    assert isinstance(job, EvalJob)
    digest = "sha256:" + "a" * 64
    config = render_eval(
        job,
        adapter=AdapterRef(uri="s3://models/gsm8k/adapter", digest=digest),
        base_model=BaseModelSpec(uri="hf://Qwen/Qwen2.5-0.5B-Instruct"),
    )
    assert config.task == "evaluate"
    assert config.adapter is not None
    assert config.adapter.digest == digest
    assert config.evaluation is not None
    assert config.evaluation.suites[0].answer_extraction == "gsm8k"
    assert config.evaluation.max_new_tokens == 64
    assert config.evaluation.output_uri == "s3://results/ev"


def test_every_finetune_example_renders() -> None:
    rendered = 0
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in load_documents(path.read_text(encoding="utf-8")):
            model = parse_manifest(doc)
            if isinstance(model, FineTuneJob):
                RunConfig.model_validate_json(render_finetune(model).model_dump_json())
                rendered += 1
    assert rendered >= 1
