"""Multi-LoRA serving on CPU: throughput of mixed-adapter streams, memory, hot-load latency.

The built-in engine (``kubetune_runtime.serving``) serves a tiny Llama model
(``kubetune_runtime.models.tiny.build_tiny_model``, random weights; ``--size small`` by
default: hidden 256, 4 layers) with ``--adapters`` (32) LoRA adapters made by PEFT's
``get_peft_model(..., LoraConfig(r=8, all-linear, init_lora_weights=False))`` with
different seeds (random, non-zero weights: every adapter changes the output).

Measured in one run:

``hot-load``
    Each adapter is published (``write_manifest`` + ``publish_dir``) to embedded local
    storage (``LocalStorage(s3_root=...)``, ``s3://bench/adapters/<name>``) before the
    engine starts. With both listeners up (real uvicorn servers on loopback), each load is
    timed from the start of ``fetch_verified`` (download into a local cache, every byte
    checked against the manifest) through ``POST /v1/load_lora_adapter`` on the admin
    listener to the first successful ``POST /v1/completions`` for that adapter (1 token):
    storage -> servable. Loads run one after another; p50/p99 over all of them.
``memory``
    RSS (``/proc/self/status`` VmRSS, after ``gc.collect()`` and ``malloc_trim(0)``) of the
    whole process after the base model served a few
    requests, and again after all adapters are attached and served; also the parameter bytes
    of the adapters against the base model's.
``throughput``
    Generated tokens per second of a closed-loop request stream through the engine's API
    (``--requests`` requests, ``--concurrency`` in flight, the same GSM8K prompts in the same
    order, ``--max-tokens`` greedy tokens each with ``ignore_eos`` so every request generates
    exactly that many): all requests on one adapter (``single``), round-robin over 8 adapters
    (``mixed8``) and over all 32 (``mixed32``), and the base model alone (``base``); for the
    ``stacked`` kernel (the default) and PEFT's own mixed-batch forward (``peft``). Scenarios
    are interleaved in every repeat and the median over ``--repeats`` is reported (the
    machine is shared; medians of interleaved runs cancel most of the drift).

Torch runs with one thread by default (``--threads``): see ``train_throughput.py`` on why.
The last line printed is one JSON object; see ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

# Before anything imports huggingface_hub, which reads these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from kubetune_runtime.models.tiny import build_tiny_model
from kubetune_runtime.serving.engine import (
    EngineSettings,
    SamplingParams,
    ServingEngine,
)
from kubetune_runtime.serving.server import Listeners
from kubetune_runtime.storage.artifacts import (
    fetch_verified,
    publish_dir,
    write_manifest,
)
from kubetune_runtime.storage.backends import LocalStorage

ROOT: Final = Path(__file__).resolve().parents[1]
GSM8K_TRAIN: Final = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
MODEL_SIZES: Final[dict[str, dict[str, int]]] = {
    "test": {"hidden_size": 128, "layers": 2, "heads": 4, "kv_heads": 2},
    "small": {"hidden_size": 256, "layers": 4, "heads": 4, "kv_heads": 2},
}
TOKENIZER_ROWS: Final = 400
SCENARIOS: Final = ("single", "mixed8", "mixed32", "base")
KERNELS: Final = ("stacked", "peft")


def _rows(count: int) -> list[dict[str, str]]:
    if not GSM8K_TRAIN.is_file():
        sys.exit(f"GSM8K data not found at {GSM8K_TRAIN}")
    with GSM8K_TRAIN.open(encoding="utf-8") as lines:
        return [json.loads(line) for line, _ in zip(lines, range(count), strict=False)]


def _rss_mb() -> float:
    """VmRSS in MB after a garbage collection and glibc's ``malloc_trim(0)``.

    Both readings get the same treatment: heap pages freed but not yet returned to the OS
    (which differ by tens of MB from run to run) do not count for either.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def make_adapters(model_dir: Path, out: Path, count: int, rank: int) -> list[Path]:
    """``count`` random-weight LoRA adapters (all-linear) in PEFT layout, with manifests."""

    paths = []
    for index in range(count):
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1000 + index)
            model = get_peft_model(
                base,
                LoraConfig(
                    r=rank,
                    lora_alpha=2 * rank,
                    target_modules="all-linear",
                    init_lora_weights=False,
                    task_type="CAUSAL_LM",
                ),
            )
        path = out / f"adapter-{index:02d}"
        model.save_pretrained(str(path))
        write_manifest(path, metadata={"kind": "adapter", "baseModel": model_dir.as_uri()})
        paths.append(path)
    return paths


def _start_listeners(engine: Any) -> tuple[Any, threading.Thread]:

    listeners = Listeners(engine, host="127.0.0.1", port=0, admin_port=0)
    thread = threading.Thread(target=asyncio.run, args=(listeners.run(),), daemon=True)
    thread.start()
    while not listeners.started:
        time.sleep(0.02)
    return listeners, thread


def hot_load(
    engine: Any, storage: Any, uris: list[str], cache: Path, prompt: str
) -> tuple[list[float], list[Path]]:
    """Time storage -> servable for each adapter, one after another (seconds)."""

    listeners, thread = _start_listeners(engine)
    ports = listeners.addresses()
    admin = f"http://127.0.0.1:{ports['admin'][1]}"
    api = f"http://127.0.0.1:{ports['inference'][1]}"
    seconds, local = [], []
    try:
        with httpx.Client(timeout=60) as client:
            for uri in uris:
                name = uri.rsplit("/", 1)[-1]
                started = time.perf_counter()
                artifact = fetch_verified(storage, uri, cache / name, expected_digest=None)
                loaded = client.post(
                    admin + "/v1/load_lora_adapter",
                    json={"lora_name": name, "lora_path": str(artifact.path)},
                )
                loaded.raise_for_status()
                served = client.post(
                    api + "/v1/completions",
                    json={"model": name, "prompt": prompt, "max_tokens": 1, "temperature": 0},
                )
                served.raise_for_status()
                seconds.append(time.perf_counter() - started)
                local.append(artifact.path)
    finally:
        listeners.stop()
        thread.join(15)
    return seconds, local


def stream_throughput(
    engine: Any, models: list[str], prompts: list[list[int]], concurrency: int, max_tokens: int
) -> tuple[float, int, float]:
    """Closed loop: ``concurrency`` requests in flight; returns (tokens/s, tokens, seconds)."""

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def run() -> tuple[int, float]:
        gate = asyncio.Semaphore(concurrency)
        tokens = 0

        async def one(index: int) -> None:
            nonlocal tokens
            async with gate:
                request = engine.stream(models[index], prompts[index % len(prompts)], params)
                result = await request.result()
                tokens += result.completion_tokens

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(models))))
        return tokens, time.perf_counter() - started

    tokens, seconds = asyncio.run(run())
    return tokens / seconds, tokens, seconds


def _scenario_models(scenario: str, names: list[str], base: str, requests: int) -> list[str]:
    if scenario == "base":
        return [base] * requests
    width = {"single": 1, "mixed8": 8, "mixed32": 32}[scenario]
    return [names[i % min(width, len(names))] for i in range(requests)]


def _param_bytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0915 - one readable script
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=tuple(MODEL_SIZES), default="small")
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    args = parser.parse_args(argv)
    if args.adapters < 32:
        parser.error("--adapters must be at least 32 (the mixed32 scenario)")

    torch.set_num_threads(args.threads)

    rows = _rows(TOKENIZER_ROWS)
    texts = [row["question"] + "\n" + row["answer"] for row in rows]
    started_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-serving-") as tmp_name:
        tmp = Path(tmp_name)
        size = MODEL_SIZES[args.size]
        model_dir = build_tiny_model(
            tmp / "model",
            texts,
            hidden_size=size["hidden_size"],
            layers=size["layers"],
            heads=size["heads"],
            kv_heads=size["kv_heads"],
        )
        adapter_dirs = make_adapters(model_dir, tmp / "adapters", args.adapters, args.rank)
        storage = LocalStorage(s3_root=tmp / "s3")
        uris = []
        for path in adapter_dirs:
            uri = f"s3://bench/adapters/{path.name}"
            publish_dir(storage, path, uri)
            uris.append(uri)

        settings = EngineSettings(
            model_dir=model_dir,
            served_model_name="base",
            max_batch_size=args.max_batch_size,
            max_loras=args.adapters,
            max_lora_rank=max(64, args.rank),
            max_queued_requests=max(256, args.requests),
        )
        engine = ServingEngine.load(settings)
        prompts = [engine.encode_text(row["question"]) for row in rows[: args.concurrency]]
        base_bytes = _param_bytes(engine._base)  # a benchmark may look inside
        # Memory, base only: after serving a few requests (allocator and caches warmed up).
        stream_throughput(engine, ["base"] * args.concurrency, prompts, args.concurrency, 8)
        rss_base = _rss_mb()

        load_seconds, fetched = hot_load(engine, storage, uris, tmp / "cache", rows[0]["question"])
        names = [path.name for path in fetched]
        stream_throughput(engine, names[: args.concurrency], prompts, args.concurrency, 8)
        stream_throughput(engine, names, prompts, args.concurrency, 8)
        rss_adapters = _rss_mb()
        adapter_bytes = _param_bytes(engine._peft) - base_bytes

        engines = {"stacked": engine}
        if "peft" in args.kernels:
            other = ServingEngine.load(dataclasses.replace(settings, lora_kernel="peft"))
            for name, path in zip(names, fetched, strict=True):
                other.load_adapter_blocking(name, str(path))
            engines["peft"] = other
        samples: dict[tuple[str, str], list[float]] = {}
        for kernel in args.kernels:  # warm-up: first batches allocate
            for scenario in SCENARIOS:
                models = _scenario_models(scenario, names, "base", args.concurrency)
                stream_throughput(engines[kernel], models, prompts, args.concurrency, 4)
        for _ in range(args.repeats):
            for kernel in args.kernels:
                for scenario in SCENARIOS:
                    models = _scenario_models(scenario, names, "base", args.requests)
                    rate, _, _ = stream_throughput(
                        engines[kernel], models, prompts, args.concurrency, args.max_tokens
                    )
                    samples[kernel, scenario] = [*samples.get((kernel, scenario), []), rate]
        for served in engines.values():
            served.close()

    rates = {key: statistics.median(values) for key, values in samples.items()}
    print(f"{'kernel':<8} {'scenario':<8} {'tokens/s (median)':>18} {'min':>8} {'max':>8}")
    for (kernel, scenario), values in samples.items():
        print(
            f"{kernel:<8} {scenario:<8} {rates[kernel, scenario]:>18.1f} "
            f"{min(values):>8.1f} {max(values):>8.1f}"
        )
    print(
        f"hot-load storage->servable over {len(load_seconds)} loads: p50 "
        f"{_percentile(load_seconds, 50):.3f} s, p99 {_percentile(load_seconds, 99):.3f} s, "
        f"max {max(load_seconds):.3f} s"
    )
    print(
        f"RSS: base {rss_base:.1f} MB, base + {args.adapters} adapters {rss_adapters:.1f} MB "
        f"({rss_adapters / rss_base:.3f}x); parameters: base {base_bytes / 2**20:.2f} MiB, "
        f"adapters {adapter_bytes / 2**20:.2f} MiB"
    )
    stacked = "stacked" if "stacked" in args.kernels else args.kernels[0]
    result = {
        "mixed32_vs_single_throughput": round(
            rates[stacked, "mixed32"] / rates[stacked, "single"], 3
        ),
        "mixed8_vs_single_throughput": round(
            rates[stacked, "mixed8"] / rates[stacked, "single"], 3
        ),
        "memory_ratio_32_adapters": round(rss_adapters / rss_base, 3),
        "hot_load_p50_s": round(_percentile(load_seconds, 50), 3),
        "hot_load_p99_s": round(_percentile(load_seconds, 99), 3),
        "kernel": stacked,
        "tokens_per_second": {f"{k}/{s}": round(v, 1) for (k, s), v in rates.items()},
        "peft_mixed32_vs_single_throughput": (
            round(rates["peft", "mixed32"] / rates["peft", "single"], 3)
            if "peft" in args.kernels
            else None
        ),
        "single_vs_base_throughput": round(rates[stacked, "single"] / rates[stacked, "base"], 3),
        "rss_mb": {"base": round(rss_base, 1), "with_adapters": round(rss_adapters, 1)},
        "parameter_bytes": {"base": base_bytes, "adapters": adapter_bytes},
        "adapter_parameter_ratio": round(adapter_bytes / base_bytes, 3),
        "hot_load_seconds": [round(s, 4) for s in load_seconds],
        "settings": {
            "size": args.size,
            **MODEL_SIZES[args.size],
            "adapters": args.adapters,
            "rank": args.rank,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_batch_size": args.max_batch_size,
            "max_tokens": args.max_tokens,
            "repeats": args.repeats,
            "threads": args.threads,
        },
        "seconds": round(time.perf_counter() - started_all, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
