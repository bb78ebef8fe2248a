"""Helpers for runtime integration tests: write a RunConfig, run `kubetune-runtime` for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from kubetune_runtime.result import RunResult, read_result

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
GSM8K_TRAIN = SHARED_DATA / "gsm8k" / "train.jsonl"
HH_RLHF = SHARED_DATA / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


def run_config(tmp: Path, model_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A small SFT LoRA RunConfig on GSM8K rows; ``overrides`` replace top-level sections."""
    config: dict[str, Any] = {
        "task": "train",
        "run": {"kind": "FineTuneJob", "namespace": "default", "name": "test"},
        "model": {"uri": model_dir.as_uri()},
        "data": {
            "train": {
                "uri": GSM8K_TRAIN.as_uri(),
                "format": "promptCompletion",
                "columns": {"prompt": "question", "completion": "answer"},
                "max_samples": 64,
            },
            "max_seq_length": 128,
        },
        "lora": {"r": 8, "lora_alpha": 16},
        "training": {
            "max_steps": 3,
            "learning_rate": 1e-3,
            "per_device_train_batch_size": 2,
            "logging_steps": 1,
        },
        "checkpoint": {
            "every_steps": 100,
            "keep_last": 2,
            "uri": (tmp / "out/checkpoints").as_uri(),
        },
        "output": {"uri": (tmp / "out").as_uri()},
        "result_path": str(tmp / "termination-log"),
    }
    config.update(overrides)
    return config


def run_runtime(
    tmp: Path, config: dict[str, Any], *, env: dict[str, str] | None = None, timeout: float = 600
) -> tuple[int, RunResult | None, str]:
    """Run ``kubetune-runtime train`` as a pod would; returns (exit code, result, stderr)."""
    path = tmp / "run.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubetune_runtime.entrypoint",
            "train",
            "--config",
            str(path),
            "--workdir",
            str(tmp / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})},
        check=False,
    )
    return proc.returncode, read_result(proc.stdout), proc.stderr


def progress_losses(workdir: Path) -> dict[int, float]:
    """Step -> training loss from the progress stream the runtime writes."""
    losses = {}
    for line in (workdir / "progress.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("loss") is not None and not record.get("final"):
            losses[record["step"]] = record["loss"]
    return losses


def process_table() -> list[tuple[int, int, int, str]]:
    """(pid, ppid, pgrp, state) of every live process, read from /proc."""
    table = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text(encoding="ascii", errors="replace")
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses.
        fields = text[text.rfind(")") + 2 :].split()
        if len(fields) > 2:
            table.append((int(stat.parent.name), int(fields[1]), int(fields[2]), fields[0]))
    return table
