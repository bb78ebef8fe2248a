"""Small valid manifests shared by the operator tests and the operator benchmark."""

from __future__ import annotations

from typing import Any


def small_finetunejob(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    """A small valid LoRA SFT FineTuneJob (the quickstart's shape); ``spec`` replaces keys."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "baseModel": {"uri": "s3://models/tiny-base"},
            "dataset": {
                "train": {
                    "uri": "s3://datasets/gsm8k/train.jsonl",
                    "format": "promptCompletion",
                    "columns": {"prompt": "question", "completion": "answer"},
                },
                "maxSeqLength": 256,
            },
            "method": "lora",
            "lora": {"r": 8, "alpha": 16},
            "training": {"maxSteps": 20, "learningRate": "1e-3"},
            "output": {"uri": f"s3://models/{namespace}/{name}"},
            **spec,
        },
    }


def small_evaljob(name: str, namespace: str, finetunejob: str, **spec: Any) -> dict[str, Any]:
    """A small valid EvalJob: held-out perplexity of ``finetunejob``'s adapter on GSM8K."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "EvalJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "target": {"fineTuneJobRef": {"name": finetunejob}},
            "suites": [
                {
                    "name": "ppl",
                    "type": "perplexity",
                    "dataset": {
                        "uri": "s3://datasets/gsm8k/test.jsonl",
                        "format": "promptCompletion",
                        "columns": {"prompt": "question", "completion": "answer"},
                    },
                }
            ],
            "output": {"uri": f"s3://models/{namespace}/{name}"},
            **spec,
        },
    }
