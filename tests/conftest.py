"""Shared fixtures: real GSM8K rows and a tiny Llama model built from them.

The data is read from ``../shared/data`` beside the checkout (never copied into the repo); tests
that use these fixtures are skipped when it is missing. Nothing may reach the Hugging Face Hub.

* ``gsm8k_rows``: the first 400 GSM8K train rows, ``[{"question": str, "answer": str}, ...]``.
* ``tiny_model_dir``: a Hugging Face model directory, built once per session (about a second):
  ``kubetune_runtime.models.tiny.build_tiny_model`` with a 2048-token byte-level BPE tokenizer
  trained on those rows (question and answer joined by a newline), 2 layers, hidden size 128,
  seed 0, no pre-training (random weights). Load it with ``AutoModelForCausalLM.from_pretrained`` /
  ``AutoTokenizer.from_pretrained``; treat it as read-only (copy it to modify it). Its chat
  template is Llama-3-like with ``{% generation %}`` markers; BOS ``<|begin_of_text|>``, EOS and
  end of turn ``<|eot_id|>``, pad ``<|pad|>``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Before anything imports huggingface_hub, which reads these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from subprocesses

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GSM8K_TRAIN = SHARED_DATA / "gsm8k" / "train.jsonl"
TINY_MODEL_ROWS = 400


@pytest.fixture(scope="session")
def gsm8k_rows() -> list[dict[str, str]]:
    """The first 400 GSM8K train rows (question/answer); skips when ../shared/data is missing."""
    if not GSM8K_TRAIN.is_file():
        pytest.skip(f"GSM8K data not found at {GSM8K_TRAIN}")
    with GSM8K_TRAIN.open(encoding="utf-8") as lines:
        return [json.loads(line) for line, _ in zip(lines, range(TINY_MODEL_ROWS), strict=False)]


@pytest.fixture(scope="session")
def tiny_model_dir(
    tmp_path_factory: pytest.TempPathFactory, gsm8k_rows: list[dict[str, str]]
) -> Path:
    """A tiny random-weight Llama + GSM8K BPE tokenizer in HF format (read-only, per session)."""
    from kubetune_runtime.models.tiny import build_tiny_model

    texts = [row["question"] + "\n" + row["answer"] for row in gsm8k_rows]
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), texts)
