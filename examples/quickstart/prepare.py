"""Quickstart preparation: a small base model and GSM8K, staged in kubetune's embedded storage.

On a cluster the base model would come from the Hub (hf://Qwen/Qwen2.5-0.5B-Instruct) and the
data from your bucket. Offline on a laptop, this script plays both parts:

1. builds a small Llama-architecture base model (kubetune_runtime.models.tiny): a byte-level
   BPE tokenizer trained on GSM8K train text and a short causal-LM pre-training pass on the
   same text, so the base writes GSM8K-like text instead of noise (about a minute on 2 cores);
2. copies GSM8K train/test from ../shared/data into the embedded S3 that `kubetune run` uses,
   as `aws s3 cp` would upload them: s3://datasets/gsm8k/{train,test}.jsonl;
3. stores the base model at s3://models/tiny-gsm8k-base.

Run it from the repository root: `.venv/bin/python examples/quickstart/prepare.py`.
It is idempotent: an existing base model is kept (delete .kubetune/s3/models to rebuild).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"


def main() -> int:
    """Stage the data and build the base model; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", type=Path, default=Path(".kubetune"), help="kubetune run's workdir"
    )
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    if not (GSM8K / "train.jsonl").is_file():
        print(
            f"GSM8K not found at {GSM8K} (expected ../shared/data beside the checkout)",
            file=sys.stderr,
        )
        return 1
    s3 = args.workdir / "s3"
    datasets = s3 / "datasets" / "gsm8k"
    datasets.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        shutil.copyfile(GSM8K / f"{split}.jsonl", datasets / f"{split}.jsonl")
    print(f"staged GSM8K at s3://datasets/gsm8k/ ({datasets})")

    base = s3 / "models" / "tiny-gsm8k-base"
    if (base / "model.safetensors").is_file():
        print(f"base model already built at s3://models/tiny-gsm8k-base ({base})")
        return 0
    from kubetune_runtime.models.tiny import build_tiny_model  # noqa: PLC0415 - after the checks

    rows = [json.loads(line) for line in (GSM8K / "train.jsonl").read_text().splitlines()]
    texts = [f"{r['question']}\n{r['answer']}" for r in rows]
    started = time.monotonic()
    build_tiny_model(
        base,
        texts,
        vocab_size=2048,
        hidden_size=args.hidden_size,
        layers=args.layers,
        heads=4,
        kv_heads=2,
        pretrain_steps=args.pretrain_steps,
        seed=0,
    )
    print(
        f"built base model at s3://models/tiny-gsm8k-base ({base}) "
        f"in {time.monotonic() - started:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
