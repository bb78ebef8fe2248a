"""Training throughput on CPU: kubetune's SFT path against plain trl ``SFTTrainer``.

Every variant trains the same tiny Llama model (``kubetune_runtime.models.tiny.build_tiny_model``,
random weights) with the same LoRA config (the runtime's defaults: r 16, alpha 32, dropout 0.05,
all-linear) on the same GSM8K conversations (the first ``--rows`` train rows, question -> user,
answer -> assistant) for the same number of optimizer steps with the same per-device batch size,
the same learning rate and seed, in fp32:

``ours``
    The runtime's SFT recipe, built from the runtime's own pieces: ``data.loading.load_rows`` ->
    ``data.formats.convert_rows`` (format promptCompletion); ``prepare_tokenizer``;
    ``models.loading.load_model``; ``training.arguments.training_arguments`` mapped by
    ``recipes.train._trainer_args`` (``SFTConfig(..., skip_prepare_dataset)``); and the trainer
    from ``recipes.train._sft_trainer``, i.e. ``tokenize_dataset`` (assistant-only labels) ->
    ``pack_examples`` -> ``PackedRowsCollator`` (one row per packed sequence) -> trl
    ``SFTTrainer`` with the trained-positions loss on CPU (``training/loss.py``). Packing is on.
``trl_default``
    ``SFTTrainer`` on the same ``{"messages": [...]}`` dataset with a default ``SFTConfig``
    except output_dir, max_steps, per_device_train_batch_size, learning_rate, logging_steps,
    report_to="none", seed, max_length and ``bf16=False`` (trl's default ``bf16=True`` refuses to
    start without a GPU; the runtime trains in fp32 on CPU). Everything else is trl's default,
    notably ``gradient_checkpointing=True`` and padding to the longest row of each batch.
``trl_packed``
    ``trl_default`` plus ``packing=True`` (trl's default ``bfd`` strategy, padding-free batches).
Timed: the training loop only, from the Trainer's ``on_train_begin`` to ``on_train_end`` callback
(data loading, collation, forward, backward, optimizer, logging), in wall-clock seconds and in
CPU seconds of the process. Model loading, tokenization, packing and trainer construction are
outside the timed region for every variant. Each variant runs in its own subprocess, in rotating
order within each repeat; reported numbers are medians over the repeats. The runs use one torch
thread by default (``--threads``): on a 2-core machine shared with other jobs, two OpenMP
threads spin-wait for each other whenever one is descheduled and every small op then costs
milliseconds, which measures the scheduler rather than the code (5-10x slower, erratic).

Counted: the token positions the model processes that are not padding, by wrapping each
trainer's data collator: ``(input_ids != pad_token_id).sum()`` over exactly the batches the
optimizer steps consumed (the pad token ``<|pad|>`` never occurs in the text; padding-free
batches have no padding, so there it is every position). Throughput = non-padding tokens / timed
seconds. Padded positions and trained positions (``labels[:, 1:] != -100``) are recorded too.

Memory: peak RSS of each variant's own process (``getrusage(RUSAGE_SELF).ru_maxrss`` after
training; the whole process, including model load and tokenization) and the peak during the
timed loop alone (``VmHWM`` after resetting it through ``/proc/self/clear_refs``; Linux).

The last line printed is one JSON object: the ratios (ours / baseline), the raw numbers per
variant, steps, tokens, the model, the data and the machine. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parents[1]
GSM8K_TRAIN: Final = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
VARIANTS: Final = ("ours", "trl_default", "trl_packed")
DEFAULT_VARIANTS: Final = ("ours", "trl_default", "trl_packed")
COLUMNS: Final = {"prompt": "question", "completion": "answer"}
IGNORE_INDEX: Final = -100

# name -> build_tiny_model keyword arguments. "test" is the test suite's model (tests/conftest.py).
MODEL_SIZES: Final[dict[str, dict[str, int]]] = {
    "test": {"hidden_size": 128, "layers": 2, "heads": 4, "kv_heads": 2},
    "small": {"hidden_size": 256, "layers": 4, "heads": 4, "kv_heads": 2},
}
TOKENIZER_ROWS: Final = 400  # the tokenizer is trained on the first 400 rows, as in the tests

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ------------------------------------------------------------------------------- measurement


class CountingCollator:
    """Wrap a data collator and record each batch's token counts (in the order collated)."""

    def __init__(self, inner: Callable[[Any], dict[str, Any]], pad_token_id: int) -> None:
        self.inner = inner
        self.pad_token_id = pad_token_id
        # (non-padding, all positions, trained, seconds spent in the wrapped collator)
        self.batches: list[tuple[int, int, int, float]] = []

    def __call__(self, examples: Any) -> dict[str, Any]:
        start = time.perf_counter()
        batch = self.inner(examples)
        seconds = time.perf_counter() - start
        ids = batch["input_ids"]
        labels = batch.get("labels")
        trained = int((labels[..., 1:] != IGNORE_INDEX).sum()) if labels is not None else 0
        non_padding = int((ids != self.pad_token_id).sum())
        self.batches.append((non_padding, ids.numel(), trained, seconds))
        return batch


# ------------------------------------------------------------------------------- memory


def _rss_kib(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process in KiB, or None where /proc is unavailable."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` 5); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
    except OSError:
        return False
    return True


def _meter_callback() -> Any:
    from transformers import TrainerCallback  # noqa: PLC0415

    class Meter(TrainerCallback):
        """Wall-clock time of the training loop and the RSS around it."""

        def __init__(self) -> None:
            self.begin = self.end = 0.0
            self.cpu_begin = self.cpu_end = 0.0
            self.step_ends: list[float] = []
            self.rss_at_begin_kib: int | None = None
            self.hwm_reset = False

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            self.rss_at_begin_kib = _rss_kib("VmRSS")
            self.hwm_reset = _reset_peak_rss()
            self.cpu_begin = time.process_time()
            self.begin = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            self.step_ends.append(time.perf_counter())

        def on_train_end(self, *_: Any, **__: Any) -> None:
            self.end = time.perf_counter()
            self.cpu_end = time.process_time()

    return Meter()


# ------------------------------------------------------------------------------- variants


def _build_ours(
    options: argparse.Namespace, model_dir: Path, work: Path, examples: list[Any], callback: Any
) -> Any:
    """The runtime's SFT trainer, assembled exactly as ``recipes.train.run`` does."""
    from kubetune_runtime.config import RunConfig  # noqa: PLC0415
    from kubetune_runtime.data.tokenize import prepare_tokenizer  # noqa: PLC0415
    from kubetune_runtime.models.adapters import build_lora_config  # noqa: PLC0415
    from kubetune_runtime.models.loading import (  # noqa: PLC0415
        ModelSource,
        device_precision,
        load_model,
        load_tokenizer,
    )
    from kubetune_runtime.recipes.train import _sft_trainer, _trainer_args  # noqa: PLC0415
    from kubetune_runtime.training.arguments import training_arguments  # noqa: PLC0415

    config = RunConfig.model_validate(
        {
            "task": "train",
            "run": {"kind": "FineTuneJob", "namespace": "bench", "name": "throughput"},
            "model": {"uri": model_dir.as_uri()},
            "data": {
                "train": {
                    "uri": GSM8K_TRAIN.as_uri(),
                    "format": "promptCompletion",
                    "columns": COLUMNS,
                    "max_samples": options.rows,
                },
                "max_seq_length": options.max_length,
                "packing": not options.no_packing,
            },
            "lora": _lora_settings(options),
            "training": {
                "max_steps": options.steps,
                "learning_rate": options.learning_rate,
                "per_device_train_batch_size": options.batch_size,
                "logging_steps": options.logging_steps,
                "seed": options.seed,
                "gradient_checkpointing": options.ours_checkpointing,
            },
            # No checkpoint inside the measured steps (the runtime saves every N steps).
            "checkpoint": {"every_steps": options.steps + 1, "uri": (work / "ckpt").as_uri()},
            "output": {"uri": (work / "out").as_uri()},
        }
    )
    assert config.data is not None  # noqa: S101
    assert config.lora is not None  # noqa: S101
    precision = device_precision(config.training.precision)
    source = ModelSource(str(model_dir))
    tokenizer = prepare_tokenizer(
        load_tokenizer(source, trust_remote_code=False), chat_template=config.data.chat_template
    )
    args = _trainer_args(
        config,
        training_arguments(
            config,
            output_dir=work / "trainer",
            precision=precision,
            deepspeed=None,
            has_eval=False,
            cuda=False,
        ),
    )
    model = load_model(
        source,
        precision=precision,
        quantization=None,
        trust_remote_code=False,
        gradient_checkpointing=config.training.gradient_checkpointing,
    )
    trainer, _ = _sft_trainer(
        config,
        model=model,
        tokenizer=tokenizer,
        train_examples=examples,
        eval_examples=[],
        trainer_args=args,
        peft_config=build_lora_config(config.lora),
        callbacks=[callback],
    )
    return trainer


def _build_trl(
    options: argparse.Namespace,
    model_dir: Path,
    work: Path,
    examples: list[Any],
    callback: Any,
    *,
    packing: bool,
) -> Any:
    """Plain trl: a default SFTConfig (but for the shared settings) on ``{"messages": ...}``."""
    from datasets import Dataset  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415
    from trl import SFTConfig, SFTTrainer  # noqa: PLC0415

    from kubetune_runtime.config import LoraConfig as LoraSettings  # noqa: PLC0415
    from kubetune_runtime.models.adapters import build_lora_config  # noqa: PLC0415

    extra: dict[str, Any] = {}
    if options.trl_no_checkpointing:
        extra["gradient_checkpointing"] = False
    args = SFTConfig(
        output_dir=str(work / "trainer"),
        max_steps=options.steps,
        per_device_train_batch_size=options.batch_size,
        learning_rate=options.learning_rate,
        logging_steps=options.logging_steps,
        report_to="none",
        seed=options.seed,
        max_length=options.max_length,
        bf16=False,  # trl's default (True) refuses to start without a GPU; the runtime uses fp32
        packing=packing,
        **extra,
    )
    return SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(str(model_dir)),
        args=args,
        train_dataset=Dataset.from_list(examples),
        processing_class=AutoTokenizer.from_pretrained(str(model_dir)),
        peft_config=build_lora_config(LoraSettings.model_validate(_lora_settings(options))),
        callbacks=[callback],
    )


def _lora_settings(options: argparse.Namespace) -> dict[str, Any]:
    """The runtime's LoRA defaults (r 16, alpha 32, dropout 0.05, all-linear) unless overridden."""
    return {"r": options.lora_r, "lora_alpha": 2 * options.lora_r}


def run_child(options: argparse.Namespace) -> dict[str, Any]:
    """Train one variant in this process and return its measurements."""
    import torch  # noqa: PLC0415
    from transformers import PrinterCallback  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    from kubetune_runtime.data.formats import convert_rows  # noqa: PLC0415
    from kubetune_runtime.data.loading import load_rows  # noqa: PLC0415

    hf_logging.set_verbosity_error()
    if options.threads:
        torch.set_num_threads(options.threads)
    variant: str = options.child
    model_dir = Path(options.model_dir)
    rows = load_rows(GSM8K_TRAIN, max_samples=options.rows, source=GSM8K_TRAIN.as_uri())
    examples, _ = convert_rows(rows, "promptCompletion", COLUMNS, objective="sft")
    callback = _meter_callback()
    with tempfile.TemporaryDirectory(prefix=f"bench-{variant}-") as tmp:
        work = Path(tmp)
        if variant.startswith("ours"):
            trainer = _build_ours(options, model_dir, work, examples, callback)
        else:
            trainer = _build_trl(
                options, model_dir, work, examples, callback, packing=variant == "trl_packed"
            )
        trainer.remove_callback(PrinterCallback)  # as the runtime does; no raw dict prints
        pad_id = trainer.processing_class.pad_token_id
        counter = CountingCollator(trainer.data_collator, pad_id)
        trainer.data_collator = counter
        profile_path = options.profile and Path(options.profile)
        if profile_path:
            from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                output = trainer.train()
            tables = [
                prof.key_averages(group_by_input_shape=by_shape).table(
                    sort_by=sort, row_limit=40, max_name_column_width=70
                )
                for by_shape, sort in ((False, "cpu_time_total"), (True, "self_cpu_time_total"))
            ]
            profile_path.write_text("\n\n".join(tables), encoding="utf-8")
        else:
            output = trainer.train()
        steps = trainer.state.global_step
        consumed = counter.batches[: steps * trainer.args.gradient_accumulation_steps]
    seconds = callback.end - callback.begin
    cpu_seconds = callback.cpu_end - callback.cpu_begin
    non_padding = sum(b[0] for b in consumed)
    first_step = callback.step_ends[0] - callback.begin if callback.step_ends else 0.0
    after_first = sum(b[0] for b in consumed[trainer.args.gradient_accumulation_steps :])
    hwm = _rss_kib("VmHWM") if callback.hwm_reset else None
    return {
        "variant": variant,
        "steps": steps,
        "batches": len(consumed),
        "seconds": seconds,
        "first_step_seconds": first_step,
        "non_padding_tokens": non_padding,
        "positions": sum(b[1] for b in consumed),
        "trained_tokens": sum(b[2] for b in consumed),
        "collate_seconds": sum(b[3] for b in consumed),
        "tokens_per_second": non_padding / seconds,
        "cpu_seconds": cpu_seconds,
        "tokens_per_cpu_second": non_padding / cpu_seconds,
        "tokens_per_second_after_first_step": after_first / (seconds - first_step)
        if seconds > first_step
        else None,
        "train_loss": float(output.training_loss),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train_peak_rss_mib": hwm / 1024 if hwm is not None else None,
        "rss_at_train_begin_mib": callback.rss_at_begin_kib / 1024
        if callback.rss_at_begin_kib is not None
        else None,
        "examples": len(examples),
        "activation_checkpointing": bool(trainer.args.activation_checkpointing),
        "torch_threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------- parent


def _build_model(options: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    from kubetune_runtime.data.loading import load_rows  # noqa: PLC0415
    from kubetune_runtime.models.tiny import build_tiny_model  # noqa: PLC0415

    rows = load_rows(GSM8K_TRAIN, max_samples=TOKENIZER_ROWS)
    texts = [row.data["question"] + "\n" + row.data["answer"] for row in rows]
    size = MODEL_SIZES[options.model_size]
    build_tiny_model(
        out_dir,
        texts,
        hidden_size=size["hidden_size"],
        layers=size["layers"],
        heads=size["heads"],
        kv_heads=size["kv_heads"],
    )
    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(str(out_dir / "model.safetensors"), framework="pt") as weights:
        params = sum(math.prod(weights.get_slice(k).get_shape()) for k in weights.keys())  # noqa: SIM118
    return {
        "name": f"tiny-llama-{options.model_size}",
        "parameters": params,
        "vocab_size": config["vocab_size"],
        **size,
        "intermediate_size": config["intermediate_size"],
        "weights": "random init (seed 0), tokenizer: 2048-token BPE on 400 GSM8K train rows",
    }


def _run_variant(
    options: argparse.Namespace, variant: str, model_dir: Path, tmp: Path, index: int
) -> dict[str, Any]:
    out = tmp / f"{variant}-{index}.json"
    profile: list[str] = []
    if options.profile:
        Path(options.profile).mkdir(parents=True, exist_ok=True)
        profile = [f"--profile={Path(options.profile).resolve() / f'{variant}-{index}.txt'}"]
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        *_forwarded(options),
        *profile,
        "--child",
        variant,
        "--model-dir",
        str(model_dir),
        "--child-out",
        str(out),
    ]
    log = tmp / f"{variant}-{index}.log"
    with log.open("w", encoding="utf-8") as sink:
        proc = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, check=False, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(log.read_text(encoding="utf-8")[-4000:])
        raise SystemExit(f"variant {variant} failed with exit code {proc.returncode}")
    result: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return result


def _forwarded(options: argparse.Namespace) -> list[str]:
    flags = [
        f"--steps={options.steps}",
        f"--batch-size={options.batch_size}",
        f"--rows={options.rows}",
        f"--max-length={options.max_length}",
        f"--learning-rate={options.learning_rate}",
        f"--logging-steps={options.logging_steps}",
        f"--seed={options.seed}",
        f"--lora-r={options.lora_r}",
        f"--threads={options.threads}",
    ]
    if options.no_packing:
        flags.append("--no-packing")
    if options.trl_no_checkpointing:
        flags.append("--trl-no-checkpointing")
    if options.ours_checkpointing:
        flags.append("--ours-checkpointing")
    return flags


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _summarize(runs: Mapping[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for variant, results in runs.items():
        first = results[0]
        summary[variant] = {
            "tokens_per_second": _median([r["tokens_per_second"] for r in results]),
            "tokens_per_second_runs": [round(r["tokens_per_second"], 1) for r in results],
            "tokens_per_cpu_second": _median([r["tokens_per_cpu_second"] for r in results]),
            "tokens_per_cpu_second_runs": [round(r["tokens_per_cpu_second"], 1) for r in results],
            "tokens_per_second_after_first_step": _median(
                [r["tokens_per_second_after_first_step"] for r in results]
            ),
            "seconds": _median([r["seconds"] for r in results]),
            "cpu_seconds": _median([r["cpu_seconds"] for r in results]),
            "seconds_per_step": _median([r["seconds"] / r["steps"] for r in results]),
            "collate_seconds": _median([r["collate_seconds"] for r in results]),
            "peak_rss_mib": _median([r["peak_rss_mib"] for r in results]),
            "peak_rss_mib_runs": [round(r["peak_rss_mib"]) for r in results],
            "train_peak_rss_mib": _median([r["train_peak_rss_mib"] for r in results]),
            "rss_at_train_begin_mib": _median([r["rss_at_train_begin_mib"] for r in results]),
            "steps": first["steps"],
            "non_padding_tokens": first["non_padding_tokens"],
            "positions": first["positions"],
            "padding_fraction": 1 - first["non_padding_tokens"] / first["positions"],
            "trained_tokens": first["trained_tokens"],
            "tokens_per_step": first["non_padding_tokens"] / first["steps"],
            "train_loss": first["train_loss"],
            "activation_checkpointing": first["activation_checkpointing"],
            "torch_threads": first["torch_threads"],
        }
    return summary


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _ratios(
    summary: Mapping[str, Mapping[str, Any]], variant: str, baseline: str, key: str
) -> float | None:
    return _ratio(summary.get(variant, {}).get(key), summary.get(baseline, {}).get(key))


def _paired(
    runs: Mapping[str, list[dict[str, Any]]], variant: str, baseline: str
) -> list[float] | None:
    """Per-repeat wall-clock ratios variant / baseline (runs of one repeat are close in time)."""
    if variant not in runs or baseline not in runs:
        return None
    return [
        round(o["tokens_per_second"] / b["tokens_per_second"], 3)
        for o, b in zip(runs[variant], runs[baseline], strict=True)
    ]


def _table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    header = (
        f"{'variant':<18} {'tok/s':>7} {'xdef':>5} {'xpack':>5} {'tok/cpu-s':>9} {'xdef':>5} "
        f"{'xpack':>5} {'s/step':>6} {'tok/step':>8} {'pad%':>5} {'trained':>7} {'loss':>6} "
        f"{'peakRSS':>8} {'xdef':>5} {'ckpt':>4}"
    )
    lines = [header, "-" * len(header)]

    def fmt(value: float | None, spec: str) -> str:
        return (
            format(value, spec)
            if value is not None
            else format("-", spec.split(".", maxsplit=1)[0])
        )

    for variant, s in summary.items():
        lines.append(
            f"{variant:<18} {s['tokens_per_second']:>7.0f} "
            f"{fmt(_ratios(summary, variant, 'trl_default', 'tokens_per_second'), '>5.2f')} "
            f"{fmt(_ratios(summary, variant, 'trl_packed', 'tokens_per_second'), '>5.2f')} "
            f"{s['tokens_per_cpu_second']:>9.0f} "
            f"{fmt(_ratios(summary, variant, 'trl_default', 'tokens_per_cpu_second'), '>5.2f')} "
            f"{fmt(_ratios(summary, variant, 'trl_packed', 'tokens_per_cpu_second'), '>5.2f')} "
            f"{s['seconds_per_step']:>6.2f} {s['tokens_per_step']:>8.0f} "
            f"{100 * s['padding_fraction']:>5.1f} {s['trained_tokens']:>7d} "
            f"{s['train_loss']:>6.3f} {s['peak_rss_mib']:>7.0f}M "
            f"{fmt(_ratios(summary, variant, 'trl_default', 'peak_rss_mib'), '>5.2f')} "
            f"{'on' if s['activation_checkpointing'] else 'off':>4}"
        )
    lines.append(
        "tok/s: non-padding tokens per wall-clock second of the training loop (median of "
        "repeats); tok/cpu-s: per CPU second of this process (robust to other jobs on the "
        "machine); xdef/xpack: ratio to trl_default/trl_packed; peakRSS: ru_maxrss of the "
        "variant's own process; ckpt: gradient checkpointing"
    )
    return "\n".join(lines)


def run_parent(options: argparse.Namespace) -> dict[str, Any]:
    """Build the model once, run every variant ``repeats`` times, print the table; the report."""
    if not GSM8K_TRAIN.is_file():
        raise SystemExit(f"GSM8K data not found at {GSM8K_TRAIN}")
    started = time.perf_counter()
    variants: list[str] = list(dict.fromkeys(options.variants))
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp_name:
        tmp = Path(tmp_name)
        model = _build_model(options, tmp / "model")
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for repeat in range(options.repeats):
            # Rotate the order so no variant always runs first (or last) on a shared machine.
            shift = repeat % len(variants)
            for variant in [*variants[shift:], *variants[:shift]]:
                result = _run_variant(options, variant, tmp / "model", tmp, repeat)
                runs[variant].append(result)
                print(
                    f"[repeat {repeat + 1}/{options.repeats}] {variant:<18} "
                    f"{result['tokens_per_second']:7.0f} tok/s "
                    f"{result['tokens_per_cpu_second']:7.0f} tok/cpu-s "
                    f"{result['seconds']:6.1f} s  peak RSS {result['peak_rss_mib']:5.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
    summary = _summarize(runs)
    print(_table(summary))
    return {
        "ratio_vs_trl_default": _ratios(summary, "ours", "trl_default", "tokens_per_second"),
        "ratio_vs_trl_packed": _ratios(summary, "ours", "trl_packed", "tokens_per_second"),
        "peak_rss_ratio_vs_trl_default": _ratios(summary, "ours", "trl_default", "peak_rss_mib"),
        "peak_rss_ratio_vs_trl_packed": _ratios(summary, "ours", "trl_packed", "peak_rss_mib"),
        "cpu_ratio_vs_trl_default": _ratios(
            summary, "ours", "trl_default", "tokens_per_cpu_second"
        ),
        "cpu_ratio_vs_trl_packed": _ratios(summary, "ours", "trl_packed", "tokens_per_cpu_second"),
        "paired_ratios_vs_trl_default": _paired(runs, "ours", "trl_default"),
        "paired_ratios_vs_trl_packed": _paired(runs, "ours", "trl_packed"),
        "variants": summary,
        "steps": options.steps,
        "per_device_batch_size": options.batch_size,
        "max_length": options.max_length,
        "repeats": options.repeats,
        "torch_threads": options.threads or "torch default",
        "packing_ours": not options.no_packing,
        "ours_activation_checkpointing": options.ours_checkpointing,
        "trl_activation_checkpointing": not options.trl_no_checkpointing,
        "model": model,
        "lora": {
            "r": options.lora_r,
            "alpha": 2 * options.lora_r,
            "dropout": 0.05,
            "targets": "all-linear",
        },
        "data": {
            "source": "GSM8K train.jsonl, the first rows",
            "rows": options.rows,
            "format": "promptCompletion: question -> user, answer -> assistant",
        },
        "timed": "the Trainer loop, on_train_begin..on_train_end (wall and process CPU time); "
        "model load, tokenization, packing and trainer construction excluded",
        "counted": "non-padding tokens: (input_ids != pad_token_id).sum() over the batches the "
        "optimizer steps consumed",
        "machine": {
            "cpus": os.cpu_count(),
            "processor": _cpu_name(),
            "python": platform.python_version(),
            "libraries": _versions(),
        },
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "bench_wall_seconds": round(time.perf_counter() - started, 1),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str]:
    from importlib.metadata import version  # noqa: PLC0415

    return {name: version(name) for name in ("torch", "transformers", "trl", "peft", "datasets")}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (the ``--child*`` ones are internal)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=8, help="per-device batch size")
    parser.add_argument("--rows", type=int, default=400, help="GSM8K train rows (the first N)")
    parser.add_argument("--max-length", type=int, default=512, help="max sequence length")
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant (median)")
    parser.add_argument(
        "--model-size",
        choices=sorted(MODEL_SIZES),
        default="test",
        help="test: the test suite's model (0.9 M parameters); small: 4 M, about 3x slower",
    )
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads per run (0: torch's default, one per core); 1 by default "
        "because on a shared machine idle-waiting OpenMP threads measure the scheduler",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(DEFAULT_VARIANTS),
        help="what to run (default: all three)",
    )
    parser.add_argument("--no-packing", action="store_true", help="ours without packing")
    parser.add_argument(
        "--trl-no-checkpointing",
        action="store_true",
        help="turn off trl's default gradient checkpointing in the trl baselines",
    )
    parser.add_argument(
        "--ours-checkpointing",
        action="store_true",
        help="turn on gradient checkpointing in our runtime (training.gradient_checkpointing)",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="also write a torch.profiler table of each run's loop to DIR/VARIANT-REPEAT.txt "
        "(the profiler slows some variants more than others: use it to see where time goes, "
        "not for the throughput numbers)",
    )
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: the parent orchestrates; ``--child VARIANT`` trains one variant."""
    options = parse_args(argv)
    if options.child:
        result = run_child(options)
        Path(options.child_out).write_text(json.dumps(result), encoding="utf-8")
        return
    report = run_parent(options)
    print(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
    main()
