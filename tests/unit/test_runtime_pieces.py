"""The runtime's small pieces, without training: process layout, DeepSpeed and Trainer
arguments, the termination-message result, precision and model sources, LoRA target checks,
the entry point's failure reporting, fetching inputs (moto S3) and reading data sources.

Nothing here trains a model (tests/integration/test_train.py does); the recipe is replaced by
a stub wherever the entry point would run it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kubetune_runtime import entrypoint
from kubetune_runtime.config import (
    DeepSpeedConfig,
    DistributedConfig,
    LoraConfig,
    ModelConfig,
    RunConfig,
    SourceConfig,
    StorageConfig,
)
from kubetune_runtime.errors import (
    ArtifactInvalid,
    ConfigInvalid,
    DataInvalid,
    RuntimeFailure,
    StorageFailure,
    TrainingFailed,
)
from kubetune_runtime.models.loading import (
    ModelSource,
    Precision,
    resolve_model_source,
    resolve_precision,
)
from kubetune_runtime.result import (
    RESULT_PREFIX,
    TERMINATION_LIMIT_BYTES,
    RunResult,
    read_result,
    write_result,
)
from kubetune_runtime.training.distributed import (
    DEFAULT_MASTER_PORT,
    deepspeed_config,
    needs_launcher,
    process_info,
    torchrun_command,
)

HF_TOKEN = "hf_FAKEtokenFAKEtokenFAKEtoken0123"  # noqa: S105 - a fake, for leak checks
BUCKET = "kt-data"
ARGV = ["-m", "kubetune_runtime.entrypoint", "train", "--config", "/etc/kubetune/run.json"]
DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "JOB_COMPLETION_INDEX")


def run_config(**overrides: Any) -> RunConfig:
    """A minimal valid training RunConfig with ``overrides`` merged in (top-level keys)."""
    data: dict[str, Any] = {
        "task": "train",
        "run": {"kind": "FineTuneJob", "namespace": "team-a", "name": "sft-1"},
        "model": {"uri": "file:///models/base"},
        "data": {"train": {"uri": "file:///data/train.jsonl"}},
        "output": {"uri": f"s3://{BUCKET}/out"},
        "checkpoint": {"uri": f"s3://{BUCKET}/ckpt", "every_steps": 25, "keep_last": 3},
        **overrides,
    }
    return RunConfig.model_validate(data)


# ============================================================================ distributed


@pytest.mark.parametrize(
    ("env", "expected", "is_main"),
    [
        pytest.param({}, (0, 0, 1), True, id="single-process-defaults"),
        pytest.param(
            {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "8"}, (0, 0, 8), True, id="rank-0"
        ),
        pytest.param(
            {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"},
            (5, 1, 8),
            False,
            id="second-node-local-rank-1",
        ),
    ],
)
def test_process_info(env: dict[str, str], expected: tuple[int, int, int], is_main: bool) -> None:
    info = process_info(env)
    assert (info.rank, info.local_rank, info.world_size) == expected
    assert info.is_main is is_main


@pytest.mark.parametrize(
    ("nodes", "per_node", "env", "expected"),
    [
        pytest.param(1, 1, {}, False, id="one-process"),
        pytest.param(1, 2, {}, True, id="two-processes-unlaunched"),
        pytest.param(1, 2, {"LOCAL_RANK": "0"}, False, id="two-processes-under-torchrun"),
        pytest.param(2, 1, {}, True, id="two-nodes-one-process-each"),
        pytest.param(2, 4, {"LOCAL_RANK": "3"}, False, id="multi-node-worker"),
    ],
)
def test_needs_launcher(nodes: int, per_node: int, env: dict[str, str], expected: bool) -> None:
    config = DistributedConfig(nodes=nodes, processes_per_node=per_node)
    assert needs_launcher(config, env) is expected


def _flags(command: list[str]) -> dict[str, str]:
    return dict(
        a.removeprefix("--").split("=", 1) for a in command if a.startswith("--") and "=" in a
    )


def test_torchrun_command_single_node() -> None:
    command = torchrun_command(DistributedConfig(processes_per_node=4), ARGV, env={})
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[-len(ARGV) :] == ARGV
    assert _flags(command[: -len(ARGV)]) == {
        "nnodes": "1",
        "nproc-per-node": "4",
        "node-rank": "0",
        "master-addr": "127.0.0.1",
        "master-port": str(DEFAULT_MASTER_PORT),
    }


@pytest.mark.parametrize(
    ("env", "node_rank", "port"),
    [
        pytest.param(
            {"MASTER_ADDR": "sft-1-0.sft-1.team-a.svc", "JOB_COMPLETION_INDEX": "2"},
            "2",
            str(DEFAULT_MASTER_PORT),
            id="indexed-job-completion-index",
        ),
        pytest.param(
            {"MASTER_ADDR": "sft-1-0.sft-1.team-a.svc", "JOB_COMPLETION_INDEX": "0"},
            "0",
            str(DEFAULT_MASTER_PORT),
            id="indexed-job-index-0-is-master",
        ),
        pytest.param(
            {
                "MASTER_ADDR": "sft-1-0.sft-1.team-a.svc",
                "MASTER_PORT": "23456",
                "NODE_RANK": "1",
                "JOB_COMPLETION_INDEX": "3",
            },
            "1",
            "23456",
            id="node-rank-wins-and-port-from-env",
        ),
    ],
)
def test_torchrun_command_multi_node(env: dict[str, str], node_rank: str, port: str) -> None:
    command = torchrun_command(DistributedConfig(nodes=4, processes_per_node=2), ARGV, env=env)
    flags = _flags(command[: -len(ARGV)])
    assert flags == {
        "nnodes": "4",
        "nproc-per-node": "2",
        "node-rank": node_rank,
        "master-addr": "sft-1-0.sft-1.team-a.svc",
        "master-port": port,
    }
    assert command[-len(ARGV) :] == ARGV


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({"JOB_COMPLETION_INDEX": "1"}, id="no-master-addr"),
        pytest.param({"MASTER_ADDR": "sft-1-0.sft-1.team-a.svc"}, id="no-node-rank"),
        pytest.param({}, id="neither"),
    ],
)
def test_torchrun_command_multi_node_needs_rendezvous_env(env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        torchrun_command(DistributedConfig(nodes=2), ARGV, env=env)


AUTO_FIELDS = {
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}


def test_deepspeed_config_none_without_deepspeed() -> None:
    assert deepspeed_config(DistributedConfig(processes_per_node=2)) is None


@pytest.mark.parametrize(
    ("settings", "zero"),
    [
        pytest.param(
            DeepSpeedConfig(zero_stage=1),
            {"stage": 1, "overlap_comm": False, "contiguous_gradients": True},
            id="zero-1",
        ),
        pytest.param(
            DeepSpeedConfig(zero_stage=2, offload_optimizer="cpu"),
            {
                "stage": 2,
                "overlap_comm": False,
                "contiguous_gradients": True,
                "offload_optimizer": {"device": "cpu", "pin_memory": False},
            },
            id="zero-2-offload-optimizer",
        ),
        pytest.param(
            DeepSpeedConfig(zero_stage=3),
            {
                "stage": 3,
                "overlap_comm": False,
                "contiguous_gradients": True,
                "stage3_gather_16bit_weights_on_model_save": True,
            },
            id="zero-3-gathers-16bit-weights-on-save",
        ),
        pytest.param(
            DeepSpeedConfig(zero_stage=3, offload_optimizer="cpu", offload_params="cpu"),
            {
                "stage": 3,
                "overlap_comm": False,
                "contiguous_gradients": True,
                "offload_optimizer": {"device": "cpu", "pin_memory": False},
                "offload_param": {"device": "cpu", "pin_memory": False},
                "stage3_gather_16bit_weights_on_model_save": True,
            },
            id="zero-3-offload-both",
        ),
    ],
)
def test_deepspeed_config(settings: DeepSpeedConfig, zero: dict[str, Any]) -> None:
    config = deepspeed_config(DistributedConfig(processes_per_node=2, deepspeed=settings))
    assert config is not None
    json.dumps(config)  # the Trainer receives it as a JSON-able dict
    assert config["zero_optimization"] == zero
    for key, value in AUTO_FIELDS.items():
        assert config[key] == value, key
    assert "optimizer" not in config or config.get("zero_force_ds_cpu_optimizer") is False
    assert "scheduler" not in config  # the Trainer's scheduler (lr_scheduler_type) is used


@pytest.mark.parametrize("stage", [pytest.param(s, id=f"zero-{s}") for s in (1, 2, 3)])
def test_deepspeed_config_offload_accepts_the_trainers_optimizer(stage: int) -> None:
    settings = DeepSpeedConfig(zero_stage=stage, offload_optimizer="cpu")  # type: ignore[arg-type]
    config = deepspeed_config(DistributedConfig(processes_per_node=2, deepspeed=settings))
    assert config is not None
    assert config.get("zero_force_ds_cpu_optimizer") is False or "optimizer" in config


# ============================================================================ arguments


def _args(config: RunConfig, **kwargs: Any) -> dict[str, Any]:
    from kubetune_runtime.training.arguments import training_arguments

    options: dict[str, Any] = {
        "output_dir": Path("/work/trainer"),
        "precision": Precision("float32", bf16=False, fp16=False),
        "deepspeed": None,
        "has_eval": False,
        "cuda": False,
        **kwargs,
    }
    return training_arguments(config, **options)


@pytest.mark.parametrize(
    ("training", "expected"),
    [
        pytest.param({}, 0.0, id="no-warmup"),
        pytest.param({"warmup_ratio": 0.1}, 0.1, id="ratio-as-float-below-one"),
        pytest.param({"warmup_steps": 7}, 7, id="steps"),
        pytest.param({"warmup_steps": 1}, 1, id="one-step-is-a-step-not-a-ratio"),
        pytest.param({"warmup_steps": 0, "warmup_ratio": 0.2}, 0, id="explicit-steps-win"),
    ],
)
def test_training_arguments_warmup(training: dict[str, Any], expected: float) -> None:
    warmup = _args(run_config(training=training))["warmup_steps"]
    assert warmup == expected
    assert type(warmup) is type(expected)  # transformers reads a float < 1 as a ratio


@pytest.mark.parametrize(
    ("eval_steps", "has_eval", "strategy", "steps"),
    [
        pytest.param(50, True, "steps", 50, id="eval-every-50"),
        pytest.param(None, True, "no", None, id="eval-data-without-eval-steps"),
        pytest.param(50, False, "no", None, id="eval-steps-without-eval-data"),
        pytest.param(None, False, "no", None, id="neither"),
    ],
)
def test_training_arguments_eval_strategy(
    eval_steps: int | None, has_eval: bool, strategy: str, steps: int | None
) -> None:
    args = _args(run_config(training={"eval_steps": eval_steps}), has_eval=has_eval)
    assert (args["eval_strategy"], args["eval_steps"]) == (strategy, steps)


def test_training_arguments_mapping() -> None:
    config = run_config(
        training={
            "num_train_epochs": 3,
            "learning_rate": 1e-4,
            "lr_scheduler_type": "linear",
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 8,
            "gradient_checkpointing": True,
            "optim": "adamw_torch_fused",
            "weight_decay": 0.01,
            "max_grad_norm": 0.5,
            "seed": 7,
            "logging_steps": 5,
        }
    )
    args = _args(config, output_dir=Path("/w/trainer"))
    assert args["output_dir"] == "/w/trainer"
    assert args["num_train_epochs"] == 3
    assert args["max_steps"] == -1  # epochs decide
    assert args["learning_rate"] == 1e-4
    assert args["lr_scheduler_type"] == "linear"
    assert args["per_device_train_batch_size"] == args["per_device_eval_batch_size"] == 4
    assert args["gradient_accumulation_steps"] == 8
    assert args["activation_checkpointing"] is True
    assert args["activation_checkpointing_kwargs"] == {"use_reentrant": False}
    assert args["optim"] == "adamw_torch_fused"
    assert (args["weight_decay"], args["max_grad_norm"]) == (0.01, 0.5)
    assert args["seed"] == args["data_seed"] == 7
    assert args["logging_steps"] == 5
    # checkpoint cadence and retention come from the checkpoint section
    assert args["save_strategy"] == "steps"
    assert (args["save_steps"], args["save_total_limit"]) == (25, 3)
    # full checkpoints (optimizer, scheduler, RNG) so a resumed run continues the same curve
    assert args["save_only_model"] is False
    # a NaN loss must reach the NonFiniteLossGuard, not be replaced by the running mean
    assert args["logging_nan_inf_filter"] is False
    # honest tokens/s: padding is never counted
    assert args["include_num_input_tokens_seen"] == "non_padding"
    assert args["report_to"] == []
    assert args["disable_tqdm"] is True
    assert args["remove_unused_columns"] is False
    assert args["deepspeed"] is None
    assert args["accelerator_config"] is None


def test_training_arguments_max_steps_and_no_checkpointing_kwargs() -> None:
    args = _args(run_config(training={"max_steps": 30}))
    assert args["max_steps"] == 30
    assert args["activation_checkpointing"] is False
    assert args["activation_checkpointing_kwargs"] is None


@pytest.mark.parametrize(
    ("precision", "world_size", "cuda", "expected"),
    [
        pytest.param(Precision("float32", False, False), 1, False, (False, False, None), id="cpu"),
        pytest.param(
            Precision("float32", False, False), 2, False, (False, False, "gloo"), id="cpu-ddp-gloo"
        ),
        pytest.param(
            Precision("bfloat16", True, False), 8, True, (True, False, None), id="gpu-bf16-nccl"
        ),
        pytest.param(
            Precision("float32", False, True), 2, True, (False, True, None), id="gpu-fp16"
        ),
    ],
)
def test_training_arguments_precision_and_backend(
    precision: Precision, world_size: int, cuda: bool, expected: tuple[bool, bool, str | None]
) -> None:
    args = _args(run_config(), precision=precision, world_size=world_size, cuda=cuda)
    assert (args["bf16"], args["fp16"], args["ddp_backend"]) == expected


def test_training_arguments_deepspeed_and_configured_state() -> None:
    dist = DistributedConfig(processes_per_node=2, deepspeed=DeepSpeedConfig(zero_stage=2))
    ds = deepspeed_config(dist)
    args = _args(run_config(distributed=dist.model_dump()), deepspeed=ds, use_configured_state=True)
    assert args["deepspeed"] == ds
    assert args["accelerator_config"] == {"use_configured_state": True}


def test_training_arguments_needs_a_checkpoint_section() -> None:
    config = run_config().model_copy(update={"checkpoint": None})
    with pytest.raises(ValueError, match="checkpoint"):
        _args(config)


def test_training_arguments_are_accepted_by_transformers(tmp_path: Path) -> None:
    """Every key is a real TrainingArguments field of the installed transformers."""
    from transformers import TrainingArguments

    config = run_config(
        training={"warmup_ratio": 0.1, "eval_steps": 10, "gradient_checkpointing": True}
    )
    args = TrainingArguments(**_args(config, output_dir=tmp_path, has_eval=True))
    assert args.logging_nan_inf_filter is False
    assert args.save_only_model is False
    assert args.get_warmup_steps(100) == 10  # the float is a ratio
    assert str(args.eval_strategy.value) == "steps"


# ============================================================================ result


def _assert_fits(text: str, limit: int = TERMINATION_LIMIT_BYTES) -> dict[str, Any]:
    assert len(text.encode("utf-8")) <= limit
    parsed: dict[str, Any] = json.loads(text)
    RunResult.model_validate(parsed)
    return parsed


def test_result_small_is_complete_compact_json() -> None:
    result = RunResult(
        status="Succeeded",
        reason="TrainingSucceeded",
        message="published s3://kt-data/out/adapter",
        artifact={"uri": "s3://kt-data/out/adapter", "digest": "sha256:" + "a" * 64},
        metrics={"trainLoss": 1.25},
    )
    text = result.to_json()
    assert " " not in text.replace("published s3", "")  # compact separators
    assert RunResult.model_validate_json(text) == result
    assert "evaluation" not in json.loads(text)  # None fields left out


@pytest.mark.parametrize(
    ("result", "kept", "dropped"),
    [
        pytest.param(
            RunResult(
                status="Succeeded",
                reason="TrainingSucceeded",
                message="ok",
                metrics={"trainLoss": 1.0},
                evaluation={"suites": [{"name": f"s{i}", "x": "y" * 200} for i in range(50)]},
                checkpoint={"step": 10},
            ),
            {"metrics", "checkpoint", "message"},
            {"evaluation"},
            id="huge-evaluation-dropped-first",
        ),
        pytest.param(
            RunResult(
                status="Succeeded",
                reason="TrainingSucceeded",
                metrics={f"metric{i}": float(i) for i in range(400)},
                checkpoint={"step": 10},
            ),
            {"checkpoint"},
            {"metrics"},
            id="huge-metrics-dropped-keeps-checkpoint",
        ),
    ],
)
def test_result_drops_bulky_fields_first(
    result: RunResult, kept: set[str], dropped: set[str]
) -> None:
    parsed = _assert_fits(result.to_json())
    assert kept <= set(parsed)
    assert not dropped & set(parsed)
    assert parsed["status"] == result.status
    assert parsed["reason"] == result.reason


@pytest.mark.parametrize(
    "limit", [pytest.param(TERMINATION_LIMIT_BYTES, id="4KiB"), pytest.param(512, id="512B")]
)
def test_result_huge_message_is_cut_and_stays_valid_json(limit: int) -> None:
    message = "Traceback line that goes on and on; " * 2000
    result = RunResult(
        status="Failed",
        reason="TrainingFailed",
        message=message,
        metrics={"trainLoss": 2.0},
        evaluation={"summary": ["x" * 3000]},
    )
    parsed = _assert_fits(result.to_json(limit), limit)
    assert parsed["status"] == "Failed"
    assert parsed["reason"] == "TrainingFailed"
    assert parsed["message"]
    assert message.startswith(parsed["message"])
    assert "evaluation" not in parsed


@pytest.mark.parametrize(
    "message",
    [
        pytest.param('"' * 3000, id="quotes-escape-to-2-bytes"),
        pytest.param("Prüfung fehlgeschlagen: €€€€€€€€ " * 300, id="non-ascii-escapes-to-6-bytes"),
        pytest.param("日本語のエラー" * 1000, id="cjk"),
        pytest.param("\x00\x01" * 3000, id="control-characters"),
        pytest.param("\U0001f525" * 3000, id="astral-12-bytes"),
    ],
)
def test_result_cut_respects_the_byte_limit_for_any_message(message: str) -> None:
    result = RunResult(status="Failed", reason="DataInvalid", message=message)
    _assert_fits(result.to_json())


def test_write_and_read_result_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = RunResult(
        status="Interrupted",
        reason="SIGTERM",
        message="stopped at step 40 after checkpointing",
        checkpoint={"step": 40, "uri": f"s3://{BUCKET}/ckpt/checkpoint-40", "digest": "sha256:x"},
    )
    path = tmp_path / "termination-log"
    print("some log line")
    write_result(result, str(path))
    print("a later log line that is not a result")
    out = capsys.readouterr().out
    assert path.read_text(encoding="utf-8") == result.to_json()
    assert f"{RESULT_PREFIX}{result.to_json()}\n" in out
    assert read_result(out) == result


def test_read_result_takes_the_last_result_line() -> None:
    first = RunResult(status="Failed", reason="TrainingFailed")
    last = RunResult(status="Succeeded", reason="TrainingSucceeded")
    text = f"{RESULT_PREFIX}{first.to_json()}\nnoise\n{RESULT_PREFIX}{last.to_json()}\ntail\n"
    assert read_result(text) == last
    assert read_result("no result here\n") is None


@pytest.mark.parametrize(
    "where",
    [
        pytest.param(None, id="no-path"),
        pytest.param("missing-dir/termination-log", id="parent-missing"),
        pytest.param("read-only/termination-log", id="not-writable"),
    ],
)
def test_write_result_without_a_writable_path_still_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str | None
) -> None:
    readonly = tmp_path / "read-only"
    readonly.mkdir()
    (readonly / "termination-log").mkdir()  # a directory: writing it fails even as root
    result = RunResult(status="Failed", reason="StorageFailed", message="disk full")
    write_result(result, str(tmp_path / where) if where else None)
    assert read_result(capsys.readouterr().out) == result
    assert not (tmp_path / "missing-dir").exists()


# ============================================================================ precision


@pytest.mark.parametrize(
    ("precision", "cuda", "bf16_supported", "expected"),
    [
        pytest.param("auto", False, False, Precision("float32", False, False), id="auto-cpu"),
        pytest.param(
            "auto", True, False, Precision("float32", False, True), id="auto-old-gpu-fp16"
        ),
        pytest.param("auto", True, True, Precision("bfloat16", True, False), id="auto-ampere-bf16"),
        pytest.param("fp32", False, False, Precision("float32", False, False), id="fp32-cpu"),
        pytest.param("fp32", True, True, Precision("float32", False, False), id="fp32-gpu"),
        pytest.param("bf16", True, True, Precision("bfloat16", True, False), id="bf16-gpu"),
        pytest.param("fp16", True, True, Precision("float32", False, True), id="fp16-gpu"),
        pytest.param("fp16", True, False, Precision("float32", False, True), id="fp16-old-gpu"),
    ],
)
def test_resolve_precision(
    precision: Any, cuda: bool, bf16_supported: bool, expected: Precision
) -> None:
    assert resolve_precision(precision, cuda=cuda, bf16_supported=bf16_supported) == expected


@pytest.mark.parametrize(
    ("precision", "cuda", "bf16_supported", "match"),
    [
        pytest.param("bf16", False, False, "bf16", id="bf16-on-cpu"),
        pytest.param("bf16", True, False, "bf16", id="bf16-on-old-gpu"),
        pytest.param("fp16", False, False, "fp16", id="fp16-on-cpu"),
    ],
)
def test_resolve_precision_refuses_what_the_device_cannot_run(
    precision: Any, cuda: bool, bf16_supported: bool, match: str
) -> None:
    with pytest.raises(ConfigInvalid, match=match):
        resolve_precision(precision, cuda=cuda, bf16_supported=bf16_supported)


def test_device_precision_auto_is_fp16_on_a_pre_ampere_gpu(monkeypatch: pytest.MonkeyPatch):
    import torch

    from kubetune_runtime.models.loading import device_precision

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return including_emulation  # a T4: bf16 tensors work, bf16 compute is emulated

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert device_precision("auto") == Precision("float32", bf16=False, fp16=True)


def test_device_precision_on_this_cpu() -> None:
    import torch

    from kubetune_runtime.models.loading import device_precision

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert device_precision("auto") == Precision("float32", False, False)
    with pytest.raises(ConfigInvalid):
        device_precision("bf16")


# ============================================================================ model source


class FetchSpy:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[str] = []

    def __call__(self, uri: str) -> Path:
        self.calls.append(uri)
        return self.root / "fetched"


@pytest.mark.parametrize(
    ("uri", "name", "revision"),
    [
        pytest.param("hf://meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B", None, id="hub"),
        pytest.param(
            "hf://meta-llama/Llama-3.2-1B@4e20de36",
            "meta-llama/Llama-3.2-1B",
            "4e20de36",
            id="hub-at-commit",
        ),
        pytest.param("hf://org/model@v1.0", "org/model", "v1.0", id="hub-at-tag"),
    ],
)
def test_resolve_model_source_hub(tmp_path: Path, uri: str, name: str, revision: str | None):
    fetch = FetchSpy(tmp_path)
    source = resolve_model_source(ModelConfig(uri=uri), fetch, env={})
    assert source == ModelSource(name, revision, None)
    assert fetch.calls == []  # the Hub is read by from_pretrained, not fetched


def test_resolve_model_source_hub_token_from_env(tmp_path: Path) -> None:
    model = ModelConfig(uri="hf://org/gated@main", token_env="HF_TOKEN")  # noqa: S106
    source = resolve_model_source(model, FetchSpy(tmp_path), env={"HF_TOKEN": HF_TOKEN})
    assert source.token == HF_TOKEN
    assert source.revision == "main"
    for text in (repr(source), str(source), f"{source}", f"{source!r}"):
        assert HF_TOKEN not in text


@pytest.mark.parametrize(
    "env",
    [pytest.param({}, id="unset"), pytest.param({"HF_TOKEN": ""}, id="empty")],
)
def test_resolve_model_source_missing_token_is_config_invalid(
    tmp_path: Path, env: dict[str, str]
) -> None:
    model = ModelConfig(uri="hf://org/gated", token_env="HF_TOKEN")  # noqa: S106
    with pytest.raises(ConfigInvalid, match="HF_TOKEN"):
        resolve_model_source(model, FetchSpy(tmp_path), env=env)


@pytest.mark.parametrize(
    "uri",
    [
        pytest.param(f"s3://{BUCKET}/models/base", id="s3"),
        pytest.param("file:///models/base", id="file"),
        pytest.param("pvc://models/base", id="pvc"),
    ],
)
def test_resolve_model_source_storage_is_fetched(tmp_path: Path, uri: str) -> None:
    fetch = FetchSpy(tmp_path)
    source = resolve_model_source(ModelConfig(uri=uri), fetch, env={})
    assert fetch.calls == [uri]
    assert source == ModelSource(str(tmp_path / "fetched"), None, None)


# ============================================================================ LoRA targets


@pytest.fixture(scope="module")
def small_model() -> Any:
    """A Llama-shaped torch model: embeddings, attention and MLP linears, norms, a head."""
    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(8, 8)
            self.k_proj = nn.Linear(8, 8)
            self.v_proj = nn.Linear(8, 8)
            self.o_proj = nn.Linear(8, 8)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = Attention()
            self.mlp = nn.Sequential()
            self.mlp.add_module("up_proj", nn.Linear(8, 16))
            self.mlp.add_module("down_proj", nn.Linear(16, 8))
            self.input_layernorm = nn.LayerNorm(8)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(32, 8)
            self.layers = nn.ModuleList([Layer(), Layer()])
            self.norm = nn.LayerNorm(8)
            self.lm_head = nn.Linear(8, 32)

    return Model()


@pytest.mark.parametrize(
    "lora",
    [
        pytest.param(LoraConfig(), id="all-linear"),
        pytest.param(LoraConfig(target_modules=["q_proj", "v_proj"]), id="attention"),
        pytest.param(LoraConfig(target_modules=["self_attn.q_proj"]), id="dotted-suffix"),
        pytest.param(LoraConfig(target_modules=["up_proj", "down_proj"]), id="mlp"),
        pytest.param(
            LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head", "embed_tokens"]),
            id="modules-to-save-head-and-embeddings",
        ),
    ],
)
def test_check_target_modules_accepts(small_model: Any, lora: LoraConfig) -> None:
    from kubetune_runtime.models.adapters import check_target_modules

    check_target_modules(lora, small_model.named_modules())


@pytest.mark.parametrize(
    ("lora", "missing"),
    [
        pytest.param(LoraConfig(target_modules=["qkv_proj"]), ["qkv_proj"], id="fused-qkv"),
        pytest.param(
            LoraConfig(target_modules=["q_proj", "gate_proj", "c_attn"]),
            ["gate_proj", "c_attn"],
            id="two-missing",
        ),
        pytest.param(LoraConfig(target_modules=["proj"]), ["proj"], id="partial-name-no-match"),
        pytest.param(
            LoraConfig(target_modules=["q_proj"], modules_to_save=["score"]),
            ["score"],
            id="modules-to-save-missing",
        ),
    ],
)
def test_check_target_modules_refuses_missing_and_lists_available(
    small_model: Any, lora: LoraConfig, missing: list[str]
) -> None:
    from kubetune_runtime.models.adapters import check_target_modules

    with pytest.raises(ConfigInvalid) as info:
        check_target_modules(lora, small_model.named_modules())
    message = str(info.value)
    for name in missing:
        assert name in message
    for available in ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"):
        assert available in message
    assert "all-linear" in message


def test_check_target_modules_modules_to_save_may_be_any_module(small_model: Any) -> None:
    from kubetune_runtime.models.adapters import check_target_modules

    lora = LoraConfig(target_modules=["q_proj"], modules_to_save=["norm"])
    check_target_modules(lora, small_model.named_modules())


def test_check_target_modules_model_without_adaptable_layers() -> None:
    from torch import nn

    from kubetune_runtime.models.adapters import check_target_modules

    model = nn.Sequential(nn.LayerNorm(4), nn.ReLU())
    with pytest.raises(ConfigInvalid, match="no layers LoRA can adapt"):
        check_target_modules(LoraConfig(), model.named_modules())


# ============================================================================ merge


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_merge_keeps_the_base_dtype(tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from safetensors import safe_open
    from transformers import BatchEncoding, LlamaConfig, LlamaForCausalLM

    from kubetune_runtime.models.merge import merge_adapter

    torch.manual_seed(0)
    base_dir, adapter_dir, out_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(base_dir)
    peft_model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        PeftLoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(adapter_dir)

    class Tokenizer:
        def __call__(self, text: str, return_tensors: str) -> BatchEncoding:
            return BatchEncoding({"input_ids": torch.tensor([[1, 2, 3, len(text) % 60]])})

        def save_pretrained(self, path: str) -> None:
            Path(path, "tokenizer_config.json").write_text("{}")

    merge_adapter(
        ModelSource(str(base_dir)),
        adapter_dir,
        out_dir,
        tokenizer=Tokenizer(),
        quantization=None,
        trust_remote_code=False,
    )
    with safe_open(str(out_dir / "model.safetensors"), framework="pt") as weights:
        dtypes = {weights.get_tensor(k).dtype for k in weights.keys()}  # noqa: SIM118
    assert dtypes == {torch.bfloat16}


# ============================================================================ entry point


class Entry:
    """entrypoint.main in a clean single-process environment, results under a temp dir."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, tmp: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        self.monkeypatch = monkeypatch
        self.tmp = tmp
        self.capsys = capsys
        self.result_path = tmp / "termination-log"
        self.workdir = tmp / "work"

    def main(self, config: Path, command: str = "train") -> int:
        argv = [command, "--config", str(config), "--workdir", str(self.workdir)]
        return entrypoint.main(argv)

    def recipe(self, behaviour: Callable[..., RunResult], name: str = "train") -> list[Any]:
        """Replace kubetune_runtime.recipes.<name>.run; returns the list of its calls."""
        import importlib

        module = importlib.import_module(f"kubetune_runtime.recipes.{name}")
        calls: list[Any] = []

        def fake(config: RunConfig, *, workdir: Path) -> RunResult:
            calls.append((config, workdir))
            return behaviour(config, workdir=workdir)

        self.monkeypatch.setattr(module, "run", fake)
        return calls

    def result(self) -> tuple[RunResult, str]:
        """The result line on stdout (which must be there) and stderr."""
        captured = self.capsys.readouterr()
        result = read_result(captured.out)
        assert result is not None, captured.out
        return result, captured.err


@pytest.fixture
def entry(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> Entry:
    for name in DIST_ENV:
        monkeypatch.delenv(name, raising=False)
    state = Entry(monkeypatch, tmp_path, capsys)
    monkeypatch.setenv("KUBETUNE_RESULT_PATH", str(state.result_path))
    # basicConfig(force=True) would replace pytest's capture handlers.
    monkeypatch.setattr(entrypoint, "configure_logging", lambda rank: None)
    return state


def write_config(path: Path, **overrides: Any) -> Path:
    data = json.loads(run_config(**overrides).model_dump_json())
    data["result_path"] = str(path.parent / "config-result-path")
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _never(config: RunConfig, *, workdir: Path) -> RunResult:
    raise AssertionError("the recipe must not run")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(lambda p: p / "absent.json", "cannot read", id="missing-file"),
        pytest.param(lambda p: p, "cannot read", id="a-directory"),
    ],
)
def test_main_unreadable_config_exits_2_with_one_line(
    entry: Entry, make: Callable[[Path], Path], expected: str
) -> None:
    path = make(entry.tmp)
    assert entry.main(path) == entrypoint.EXIT_USAGE == 2
    err = entry.capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert expected in err
    assert str(path) in err


def test_main_non_utf8_config_exits_2(entry: Entry) -> None:
    path = entry.tmp / "run.json"
    path.write_bytes(b"\xff\xfe{\x00")
    assert entry.main(path) == 2


@pytest.mark.parametrize(
    ("mutate", "names"),
    [
        pytest.param(
            lambda d: d["training"].update(learning_rate=-1),
            ["training.learning_rate"],
            id="bad-value",
        ),
        pytest.param(
            lambda d: d["training"].update(lerning_rate=0.1),
            ["training.lerning_rate"],
            id="typo-extra-field",
        ),
        pytest.param(lambda d: d.pop("model"), ["model"], id="missing-section"),
        pytest.param(lambda d: d.update(method="qlora"), ["quantization"], id="cross-field-rule"),
        pytest.param(
            lambda d: d["distributed"].update(deepspeed={"zero_stage": 4}),
            ["distributed.deepspeed.zero_stage"],
            id="nested-literal",
        ),
    ],
)
def test_main_invalid_config_exits_2_naming_the_field(
    entry: Entry, mutate: Callable[[dict[str, Any]], Any], names: list[str]
) -> None:
    calls = entry.recipe(_never)
    data = json.loads(run_config().model_dump_json())
    mutate(data)
    path = entry.tmp / "run.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    assert entry.main(path) == 2
    err = entry.capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "invalid RunConfig" in err
    for name in names:
        assert name in err
    assert calls == []


def test_main_malformed_json_exits_2(entry: Entry) -> None:
    path = entry.tmp / "run.json"
    path.write_text('{"task": "train",', encoding="utf-8")
    assert entry.main(path) == 2
    err = entry.capsys.readouterr().err
    assert "invalid RunConfig" in err
    assert len(err.strip().splitlines()) == 1


def test_main_invalid_config_still_reports_a_result(entry: Entry) -> None:
    path = entry.tmp / "run.json"
    path.write_text('{"task": "train"}', encoding="utf-8")
    entry.main(path)
    result = read_result(entry.capsys.readouterr().out)
    assert result is not None
    assert (result.status, result.reason) == ("Failed", "ConfigInvalid")


def _evaluate_config(path: Path) -> Path:
    data = {
        "task": "evaluate",
        "run": {"kind": "EvalJob", "namespace": "team-a", "name": "eval-1"},
        "model": {"uri": "file:///models/base"},
        "evaluation": {
            "suites": [{"name": "ppl", "type": "perplexity"}],
            "output_uri": f"s3://{BUCKET}/eval",
        },
        "adapter": {"uri": f"s3://{BUCKET}/out/adapter"},
    }
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("command", "make_config", "task"),
    [
        pytest.param("train", _evaluate_config, "evaluate", id="train-command-eval-config"),
        pytest.param("evaluate", write_config, "train", id="evaluate-command-train-config"),
    ],
)
def test_main_task_mismatch_is_config_invalid(
    entry: Entry, command: str, make_config: Callable[[Path], Path], task: str
) -> None:
    calls = entry.recipe(_never, "train") + entry.recipe(_never, "evaluate")
    code = entry.main(make_config(entry.tmp / "run.json"), command)
    result, err = entry.result()
    assert (result.status, result.reason) == ("Failed", "ConfigInvalid")
    assert f"for task {task}, not {command}" in result.message
    assert code == entrypoint.EXIT_PERMANENT  # ConfigInvalid: retrying cannot help
    assert entry.result_path.read_text(encoding="utf-8") == result.to_json()
    assert err.strip() == f"kubetune-runtime: ConfigInvalid: {result.message}"
    assert calls == []


def test_main_train_with_evaluation_section_runs_the_train_recipe(entry: Entry) -> None:
    done = RunResult(status="Succeeded", reason="TrainingSucceeded")
    calls = entry.recipe(lambda config, *, workdir: done)
    config = write_config(
        entry.tmp / "run.json",
        lora={"r": 8},
        evaluation={
            "suites": [{"name": "ppl", "type": "perplexity"}],
            "output_uri": f"s3://{BUCKET}/eval",
        },
    )
    assert entry.main(config) == 0
    assert len(calls) == 1
    assert calls[0][0].evaluation is not None


@pytest.mark.parametrize(
    ("error", "code"),
    [
        pytest.param(TrainingFailed("loss became nan at step 3"), 1, id="training-failed"),
        pytest.param(StorageFailure("s3://kt-data/out: AccessDenied"), 1, id="storage-failed"),
        pytest.param(RuntimeFailure("something expected"), 1, id="base-runtime-failure"),
        pytest.param(DataInvalid("bad role", source="t.jsonl", row=2), 3, id="data-invalid"),
        pytest.param(ConfigInvalid("no such module qkv_proj"), 3, id="config-invalid"),
        pytest.param(ArtifactInvalid("digest mismatch"), 3, id="artifact-invalid"),
    ],
)
def test_main_runtime_failure_becomes_a_failed_result(
    entry: Entry, error: RuntimeFailure, code: int
) -> None:
    def fail(config: RunConfig, *, workdir: Path) -> RunResult:
        raise error

    calls = entry.recipe(fail)
    assert entry.main(write_config(entry.tmp / "run.json")) == code
    result, err = entry.result()
    assert result == RunResult(status="Failed", reason=error.reason, message=str(error))
    assert entry.result_path.read_text(encoding="utf-8") == result.to_json()
    assert f"{error.reason}: {error}" in err
    assert len(calls) == 1
    assert calls[0][1] == entry.workdir


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        pytest.param("train", "TrainingFailed", id="train"),
        pytest.param("evaluate", "EvaluationFailed", id="evaluate"),
    ],
)
def test_main_unexpected_exception_is_a_failed_result(
    entry: Entry, command: str, reason: str
) -> None:
    def crash(config: RunConfig, *, workdir: Path) -> RunResult:
        raise ZeroDivisionError("division by zero")

    entry.recipe(crash, command)
    config = (
        write_config(entry.tmp / "run.json")
        if command == "train"
        else _evaluate_config(entry.tmp / "run.json")
    )
    assert entry.main(config, command) == 1
    result, _ = entry.result()
    assert (result.status, result.reason) == ("Failed", reason)
    assert result.message == "ZeroDivisionError: division by zero"


def test_main_keyboard_interrupt_is_interrupted_130(entry: Entry) -> None:
    def interrupted(config: RunConfig, *, workdir: Path) -> RunResult:
        raise KeyboardInterrupt

    entry.recipe(interrupted)
    assert entry.main(write_config(entry.tmp / "run.json")) == 130
    result, _ = entry.result()
    assert (result.status, result.reason) == ("Interrupted", "SIGINT")


@pytest.mark.parametrize(
    ("returned", "code"),
    [
        pytest.param(
            RunResult(status="Succeeded", reason="TrainingSucceeded", metrics={"trainLoss": 1.0}),
            0,
            id="succeeded",
        ),
        pytest.param(
            RunResult(status="Interrupted", reason="SIGTERM", checkpoint={"step": 5}),
            128 + signal.SIGTERM,
            id="sigterm-143",
        ),
        pytest.param(RunResult(status="Interrupted", reason="SIGINT"), 130, id="sigint-130"),
    ],
)
def test_main_returned_result_sets_the_exit_status(
    entry: Entry, returned: RunResult, code: int
) -> None:
    entry.recipe(lambda config, *, workdir: returned)
    assert entry.main(write_config(entry.tmp / "run.json")) == code
    result, _ = entry.result()
    assert result == returned
    assert entry.result_path.read_text(encoding="utf-8") == returned.to_json()


def test_main_result_path_from_env_overrides_the_config(entry: Entry) -> None:
    seen: list[str] = []

    def succeed(config: RunConfig, *, workdir: Path) -> RunResult:
        seen.append(config.result_path)
        return RunResult(status="Succeeded", reason="TrainingSucceeded")

    entry.recipe(succeed)
    assert entry.main(write_config(entry.tmp / "run.json")) == 0
    assert seen == [str(entry.result_path)]
    assert entry.result_path.is_file()
    assert not (entry.tmp / "config-result-path").exists()


def test_main_non_zero_rank_writes_no_result(entry: Entry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")

    def fail(config: RunConfig, *, workdir: Path) -> RunResult:
        raise TrainingFailed("rank 1 saw it too")

    entry.recipe(fail)
    config = write_config(entry.tmp / "run.json", distributed={"processes_per_node": 2})
    assert entry.main(config) == 1
    assert read_result(entry.capsys.readouterr().out) is None
    assert not entry.result_path.exists()


# --------------------------------------------------------------------- relaunch under torchrun


def _multi_process_config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "run.json", distributed={"processes_per_node": 2})


def _fake_torchrun(
    monkeypatch: pytest.MonkeyPatch, code: int, worker_result: RunResult | None, path: Path
) -> list[list[str]]:
    commands: list[list[str]] = []

    class FakeTorchrun:
        def __init__(self, command: list[str], **_: Any) -> None:
            commands.append(command)
            if worker_result is not None:  # what global rank 0 writes before torchrun exits
                write_result(worker_result, str(path))

        def wait(self) -> int:
            return code

        def send_signal(self, signum: int) -> None:
            raise AssertionError("no signal expected")

    monkeypatch.setattr(entrypoint, "subprocess", SimpleNamespace(Popen=FakeTorchrun))
    return commands


def test_relaunch_runs_torchrun_with_the_same_command(
    entry: Entry, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = RunResult(status="Succeeded", reason="TrainingSucceeded")
    commands = _fake_torchrun(monkeypatch, 0, done, entry.result_path)
    config = _multi_process_config(entry.tmp)
    assert entry.main(config) == 0
    (command,) = commands
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in command
    assert command[-7:] == [
        "-m",
        "kubetune_runtime.entrypoint",
        "train",
        "--config",
        str(config),
        "--workdir",
        str(entry.workdir),
    ]
    assert read_result(entry.capsys.readouterr().out) == done  # the worker's, not a second one


@pytest.mark.parametrize(
    "pre_existing",
    [pytest.param(False, id="no-file"), pytest.param(True, id="empty-termination-log")],
)
def test_relaunch_reports_a_failure_no_worker_reported(
    entry: Entry, monkeypatch: pytest.MonkeyPatch, pre_existing: bool
) -> None:
    if pre_existing:  # Kubernetes creates /dev/termination-log before the container starts
        entry.result_path.write_text("")
    _fake_torchrun(monkeypatch, -9, None, entry.result_path)
    code = entry.main(_multi_process_config(entry.tmp))
    assert code != 0
    result = read_result(entry.capsys.readouterr().out)
    assert result is not None
    assert (result.status, result.reason) == ("Failed", "TrainingFailed")
    assert "-9" in result.message
    assert RunResult.model_validate_json(entry.result_path.read_text()) == result


@pytest.mark.parametrize(
    ("worker_result", "expected"),
    [
        pytest.param(RunResult(status="Failed", reason="DataInvalid"), 3, id="permanent"),
        pytest.param(RunResult(status="Interrupted", reason="SIGTERM"), 143, id="interrupted"),
    ],
)
def test_relaunch_exit_status_follows_the_workers_result(
    entry: Entry, monkeypatch: pytest.MonkeyPatch, worker_result: RunResult, expected: int
) -> None:
    _fake_torchrun(monkeypatch, 1, worker_result, entry.result_path)  # torchrun exits 1
    assert entry.main(_multi_process_config(entry.tmp)) == expected


_CHILD = textwrap.dedent(
    """
    import os, pathlib, signal, sys, time
    markers = pathlib.Path(os.environ["KT_TEST_MARKERS"])
    def on_term(signum, frame):
        (markers / "sigterm").write_text("1")
        sys.exit(143)
    signal.signal(signal.SIGTERM, on_term)
    (markers / "ready").write_text(str(os.getpid()))
    time.sleep(15)
    """
)

_DRIVER = textwrap.dedent(
    """
    import sys
    from kubetune_runtime import entrypoint
    child = sys.argv[1]
    entrypoint.torchrun_command = lambda config, argv, env=None: [sys.executable, child]
    sys.exit(entrypoint.main(["train", "--config", sys.argv[2], "--workdir", sys.argv[3]]))
    """
)


@pytest.fixture
def relaunch_processes(tmp_path: Path) -> Iterator[SimpleNamespace]:
    """Paths for a driver (the pod's main process) and its stand-in torchrun child."""
    markers = tmp_path / "markers"
    markers.mkdir()
    (tmp_path / "child.py").write_text(_CHILD)
    (tmp_path / "driver.py").write_text(_DRIVER)
    state = SimpleNamespace(markers=markers, driver=None)
    try:
        yield state
    finally:
        if state.driver is not None and state.driver.poll() is None:
            state.driver.kill()
            state.driver.wait(timeout=10)
        ready = markers / "ready"
        if ready.is_file():  # the child we started, by its own pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(ready.read_text()), signal.SIGKILL)


def test_relaunch_forwards_sigterm_to_torchrun(
    tmp_path: Path, relaunch_processes: SimpleNamespace
) -> None:
    config = _multi_process_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env["KT_TEST_MARKERS"] = str(relaunch_processes.markers)
    env["KUBETUNE_RESULT_PATH"] = str(tmp_path / "termination-log")
    driver = subprocess.Popen(
        [
            sys.executable,
            str(tmp_path / "driver.py"),
            str(tmp_path / "child.py"),
            str(config),
            str(tmp_path / "work"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    relaunch_processes.driver = driver
    deadline = time.monotonic() + 30
    while not (relaunch_processes.markers / "ready").is_file():
        assert driver.poll() is None, "the driver exited before starting its child"
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)
    driver.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline and not (relaunch_processes.markers / "sigterm").exists():
        time.sleep(0.05)
    assert (relaunch_processes.markers / "sigterm").exists()


# ============================================================================ fetch (moto S3)


@pytest.fixture(scope="module")
def _moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One moto S3 (and one bucket) for the module: starting moto costs about a second."""
    home = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEYID0000")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret-for-moto")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", str(home / "no-aws-config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "no-aws-credentials"))
        import boto3
        from moto import mock_aws

        with mock_aws():
            client = boto3.client("s3", region_name="us-east-1")
            client.create_bucket(Bucket=BUCKET)
            yield client


@pytest.fixture
def s3(_moto: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The module's moto S3 client, emptied after each test; real S3 only (no embedded root).

    The runtime's S3 clients are built once (a boto3 client costs about a second to create).
    """
    from kubetune_runtime.storage import backends

    monkeypatch.delenv("KUBETUNE_LOCAL_S3_ROOT", raising=False)
    clients: dict[StorageConfig, Any] = {}
    real = backends.make_s3_client

    def make_s3_client(config: StorageConfig) -> Any:
        if config not in clients:
            clients[config] = real(config)
        return clients[config]

    monkeypatch.setattr(backends, "make_s3_client", make_s3_client)
    yield _moto
    for page in _moto.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            _moto.delete_object(Bucket=BUCKET, Key=item["Key"])


STORAGE = StorageConfig(region="us-east-1")
JSONL = b'{"messages": [{"role": "user", "content": "hi"}]}\n{"text": "second"}\n'


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Count S3 downloads (file and prefix) made through the storage backend."""
    from kubetune_runtime.storage.backends import S3Storage

    calls: list[tuple[str, str]] = []
    real_file, real_dir = S3Storage.download_file, S3Storage.download_dir

    def download_file(self: S3Storage, uri: str, dest: Path) -> Path:
        calls.append(("file", uri))
        return real_file(self, uri, dest)

    def download_dir(self: S3Storage, uri: str, dest: Path) -> Path:
        calls.append(("dir", uri))
        return real_dir(self, uri, dest)

    monkeypatch.setattr(S3Storage, "download_file", download_file)
    monkeypatch.setattr(S3Storage, "download_dir", download_dir)
    return calls


def test_fetch_single_object_once(
    s3: Any, tmp_path: Path, downloads: list[tuple[str, str]]
) -> None:
    from kubetune_runtime.storage.fetch import fetch

    s3.put_object(Bucket=BUCKET, Key="data/train.jsonl", Body=JSONL)
    # a sibling sharing the name as a prefix must not turn the object into a "directory"
    s3.put_object(Bucket=BUCKET, Key="data/train.jsonl.bak", Body=b"old")
    uri = f"s3://{BUCKET}/data/train.jsonl"
    cache = tmp_path / "cache"
    first = fetch(uri, STORAGE, cache)
    assert first.is_file()
    assert first.name == "train.jsonl"
    assert first.read_bytes() == JSONL
    assert cache in first.parents
    s3.delete_object(Bucket=BUCKET, Key="data/train.jsonl")  # the cache must not need it again
    second = fetch(uri, STORAGE, cache)
    assert second == first
    assert downloads == [("file", uri)]


@pytest.mark.parametrize(
    "suffix", [pytest.param("", id="prefix"), pytest.param("/", id="prefix-trailing-slash")]
)
def test_fetch_prefix_once(
    s3: Any, tmp_path: Path, downloads: list[tuple[str, str]], suffix: str
) -> None:
    from kubetune_runtime.storage.fetch import fetch

    files = {
        "config.json": b'{"model_type": "llama"}',
        "model.safetensors": b"\x00" * 1024,
        "tokenizer/tokenizer.json": b"{}",
    }
    for rel, body in files.items():
        s3.put_object(Bucket=BUCKET, Key=f"models/base/{rel}", Body=body)
    s3.put_object(Bucket=BUCKET, Key="models/base-old/config.json", Body=b"{}")  # not under it
    uri = f"s3://{BUCKET}/models/base{suffix}"
    cache = tmp_path / "cache"
    first = fetch(uri, STORAGE, cache)
    assert first.is_dir()
    got = {
        p.relative_to(first).as_posix(): p.read_bytes()
        for p in first.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }
    assert got == files
    second = fetch(uri, STORAGE, cache)
    assert second == first
    assert downloads == [("dir", uri)]


def test_fetch_missing_object_fails_and_a_retry_succeeds(
    s3: Any, tmp_path: Path, downloads: list[tuple[str, str]]
) -> None:
    from kubetune_runtime.storage.fetch import fetch

    uri = f"s3://{BUCKET}/data/late.jsonl"
    with pytest.raises(StorageFailure):
        fetch(uri, STORAGE, tmp_path / "cache")
    s3.put_object(Bucket=BUCKET, Key="data/late.jsonl", Body=JSONL)
    assert fetch(uri, STORAGE, tmp_path / "cache").read_bytes() == JSONL  # no stale marker


@pytest.mark.parametrize("kind", [pytest.param("file", id="file"), pytest.param("dir", id="dir")])
def test_fetch_local_uri_returns_the_path_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    from kubetune_runtime.storage.fetch import fetch

    monkeypatch.delenv("KUBETUNE_LOCAL_S3_ROOT", raising=False)
    local = tmp_path / "data" / ("train.jsonl" if kind == "file" else "folder")
    local.parent.mkdir(parents=True)
    if kind == "file":
        local.write_bytes(JSONL)
    else:
        local.mkdir()
        (local / "a.jsonl").write_bytes(JSONL)
    cache = tmp_path / "cache"
    assert fetch(local.as_uri(), STORAGE, cache) == local
    assert not cache.exists()  # nothing copied


def test_fetch_embedded_s3_is_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune_runtime.storage.fetch import fetch

    root = tmp_path / "s3"
    (root / BUCKET / "data").mkdir(parents=True)
    (root / BUCKET / "data" / "train.jsonl").write_bytes(JSONL)
    monkeypatch.setenv("KUBETUNE_LOCAL_S3_ROOT", str(root))
    got = fetch(f"s3://{BUCKET}/data/train.jsonl", StorageConfig(), tmp_path / "cache")
    assert got == root / BUCKET / "data" / "train.jsonl"
    assert not (tmp_path / "cache").exists()


# ============================================================================ data sources


def test_load_source_file_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune_runtime.data.sources import load_source

    monkeypatch.delenv("KUBETUNE_LOCAL_S3_ROOT", raising=False)
    path = tmp_path / "train.jsonl"
    path.write_bytes(JSONL + b'{"text": "third"}\n')
    uri = path.as_uri()
    rows = load_source(SourceConfig(uri=uri), STORAGE, tmp_path / "cache")
    assert [(r.source, r.row) for r in rows] == [(uri, 1), (uri, 2), (uri, 3)]
    assert rows[1].data == {"text": "second"}
    limited = load_source(SourceConfig(uri=uri, max_samples=2), STORAGE, tmp_path / "cache")
    assert len(limited) == 2
    assert not (tmp_path / "cache").exists()


def test_load_source_s3_jsonl(s3: Any, tmp_path: Path) -> None:
    from kubetune_runtime.data.sources import load_source

    s3.put_object(Bucket=BUCKET, Key="datasets/sft/train.jsonl", Body=JSONL)
    uri = f"s3://{BUCKET}/datasets/sft/train.jsonl"
    rows = load_source(SourceConfig(uri=uri), STORAGE, tmp_path / "cache")
    assert [(r.source, r.row) for r in rows] == [(uri, 1), (uri, 2)]
    assert rows[0].data == {"messages": [{"role": "user", "content": "hi"}]}


def test_load_source_s3_prefix_of_files(s3: Any, tmp_path: Path) -> None:
    from kubetune_runtime.data.sources import load_source

    s3.put_object(Bucket=BUCKET, Key="datasets/multi/part-0.jsonl", Body=JSONL)
    s3.put_object(Bucket=BUCKET, Key="datasets/multi/part-1.jsonl", Body=b'{"text": "x"}\n')
    s3.put_object(Bucket=BUCKET, Key="datasets/multi/_SUCCESS", Body=b"")
    uri = f"s3://{BUCKET}/datasets/multi"
    rows = load_source(SourceConfig(uri=uri), STORAGE, tmp_path / "cache")
    assert [(r.source, r.row) for r in rows] == [
        (f"{uri}/part-0.jsonl", 1),
        (f"{uri}/part-0.jsonl", 2),
        (f"{uri}/part-1.jsonl", 1),
    ]


def test_load_source_missing_s3_object_is_storage_failure(s3: Any, tmp_path: Path) -> None:
    from kubetune_runtime.data.sources import load_source

    with pytest.raises(StorageFailure):
        load_source(SourceConfig(uri=f"s3://{BUCKET}/nope.jsonl"), STORAGE, tmp_path / "c")


@pytest.mark.parametrize("env", [pytest.param(None, id="unset"), pytest.param("", id="empty")])
def test_load_source_hub_token_missing_is_config_invalid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: str | None
) -> None:
    from kubetune_runtime.data.sources import load_source

    if env is None:
        monkeypatch.delenv("KT_TEST_HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("KT_TEST_HF_TOKEN", env)
    source = SourceConfig(uri="hf://org/private-data", token_env="KT_TEST_HF_TOKEN")  # noqa: S106
    with pytest.raises(ConfigInvalid, match="KT_TEST_HF_TOKEN"):
        load_source(source, STORAGE, tmp_path / "cache")
