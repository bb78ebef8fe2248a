"""The training runtime end to end: `kubetune-runtime train` on the tiny model and real data.

Each test runs the real command as a pod would (a subprocess reading a RunConfig file) and
checks the published artifact, not the internals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubetune_runtime.storage.artifacts import verify_local
from tests.integration.runtime_support import (
    GSM8K_TRAIN,
    HH_RLHF,
    progress_losses,
    run_config,
    run_runtime,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not GSM8K_TRAIN.is_file(), reason="../shared/data is missing"),
]


def _logits(model_dir: Path, adapter_dir: Path | None, prompt: str) -> object:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    with torch.no_grad():
        return model(**tokenizer(prompt, return_tensors="pt")).logits


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_lora_sft_lowers_held_out_loss_and_publishes_a_peft_adapter(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    config = run_config(
        tmp_path,
        tiny_model_dir,
        data={
            "train": {
                "uri": GSM8K_TRAIN.as_uri(),
                "format": "promptCompletion",
                "columns": {"prompt": "question", "completion": "answer"},
                "max_samples": 240,
            },
            "eval_split_fraction": 0.1,
            "max_seq_length": 256,
            "packing": True,
        },
        lora={"r": 16, "lora_alpha": 32},
        training={
            "max_steps": 24,
            "learning_rate": 1e-2,
            "per_device_train_batch_size": 4,
            "logging_steps": 4,
            "warmup_ratio": 0.1,
        },
    )
    code, result, stderr = run_runtime(tmp_path, config)
    assert code == 0, stderr[-3000:]
    assert result is not None
    assert result.status == "Succeeded"
    metrics = result.metrics or {}
    assert metrics["rowsRead"] == 240
    assert metrics["rowsDropped"] == 0
    assert 0 < metrics["trainedTokens"] < metrics["trainTokens"]  # assistant tokens only
    # Held-out GSM8K rows (seeded 10% split): the adapter must clearly beat the base.
    assert metrics["evalLoss"] < metrics["evalLossBefore"] - 0.15, metrics
    artifact = result.artifact or {}
    adapter_dir = tmp_path / "out" / "adapter"
    assert artifact["uri"] == adapter_dir.as_uri()
    verified = verify_local(adapter_dir, artifact["digest"])
    names = {f.path for f in verified.files}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert verified.metadata["baseModel"] == tiny_model_dir.as_uri()
    assert verified.metadata["datasetDigest"].startswith("sha256:")
    assert (adapter_dir / "_COMPLETE").is_file()
    # Plain PEFT loads it into the base, and it changes the model's outputs.
    prompt = "Natalia sold clips to 48 of her friends in April."
    base = _logits(tiny_model_dir, None, prompt)
    tuned = _logits(tiny_model_dir, adapter_dir, prompt)
    assert float((base - tuned).abs().max()) > 1e-3  # type: ignore[operator]
    termination = json.loads((tmp_path / "termination-log").read_text())
    assert termination["artifact"]["digest"] == artifact["digest"]


def test_qlora_trains_on_cpu_and_merges_into_a_dequantized_base(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    config = run_config(
        tmp_path,
        tiny_model_dir,
        method="qlora",
        quantization={"bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"},
        output={"uri": (tmp_path / "out").as_uri(), "merge": True},
    )
    code, result, stderr = run_runtime(tmp_path, config)
    assert code == 0, stderr[-3000:]
    assert result is not None
    artifact = result.artifact or {}
    verify_local(tmp_path / "out" / "adapter", artifact["digest"])
    merged = verify_local(tmp_path / "out" / "merged")
    assert any(f.path.endswith(".safetensors") for f in merged.files)
    assert "Merged adapter max_abs_logit_diff" in stderr
    config_json = json.loads((tmp_path / "out" / "merged" / "config.json").read_text())
    assert "quantization_config" not in config_json  # a dense model, not 4-bit weights


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_preference_objectives_train_on_hh_rlhf_pairs(
    tmp_path: Path, tiny_model_dir: Path, objective: str
) -> None:
    config = run_config(
        tmp_path,
        tiny_model_dir,
        data={
            "train": {"uri": HH_RLHF.as_uri(), "format": "preference", "max_samples": 24},
            "max_seq_length": 256,
        },
        objective={"type": objective, "beta": 0.1},
    )
    code, result, stderr = run_runtime(tmp_path, config)
    assert code == 0, stderr[-3000:]
    assert result is not None
    assert result.metrics is not None
    assert result.metrics["steps"] == 3
    verified = verify_local(tmp_path / "out" / "adapter", (result.artifact or {})["digest"])
    assert verified.metadata["objective"]["type"] == objective


def test_bad_row_fails_before_training_naming_the_row(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "user", "content": "3+3?"}, {"role": "wizard", "content": "6"}]},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = run_config(tmp_path, tiny_model_dir, data={"train": {"uri": data.as_uri()}})
    code, result, _ = run_runtime(tmp_path, config)
    assert code == 3  # permanent: the Job's podFailurePolicy does not retry it
    assert result is not None
    assert result.reason == "DataInvalid"
    assert "row 2" in result.message
    assert "wizard" in result.message
    assert not (tmp_path / "out" / "adapter").exists()  # nothing published
    assert not (tmp_path / "work" / "progress.jsonl").exists()  # no training step ran


def test_unknown_target_module_is_refused_before_training(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    config = run_config(
        tmp_path, tiny_model_dir, lora={"r": 8, "lora_alpha": 16, "target_modules": ["qkv_proj"]}
    )
    code, result, _ = run_runtime(tmp_path, config)
    assert code == 3
    assert result is not None
    assert result.reason == "ConfigInvalid"
    assert "qkv_proj" in result.message
    assert "q_proj" in result.message  # lists what the model does have


def test_sigterm_checkpoints_and_the_rerun_resumes_the_same_loss_curve(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    steps = 10
    training = {
        "max_steps": steps,
        "learning_rate": 5e-3,
        "per_device_train_batch_size": 2,
        "logging_steps": 1,
        "seed": 7,
    }
    # The reference: one uninterrupted run.
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    code, _, stderr = run_runtime(ref_dir, run_config(ref_dir, tiny_model_dir, training=training))
    assert code == 0, stderr[-3000:]
    reference = progress_losses(ref_dir / "work")
    assert sorted(reference) == list(range(1, steps + 1))

    # The same run, terminated as a pod is on preemption, then started again.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = run_config(run_dir, tiny_model_dir, training=training)
    (run_dir / "run.json").write_text(json.dumps(config))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kubetune_runtime.entrypoint",
            "train",
            "--config",
            str(run_dir / "run.json"),
            "--workdir",
            str(run_dir / "work"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    progress = run_dir / "work" / "progress.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if progress.exists() and len(progress_losses(run_dir / "work")) >= 3:
            break
        if proc.poll() is not None:
            pytest.fail(f"run ended before it could be interrupted: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert '"status":"Interrupted"' in out
    first = progress_losses(run_dir / "work")
    stopped_at = max(first)
    assert stopped_at < steps
    (run_folder,) = (run_dir / "out" / "checkpoints").iterdir()  # run-<config digest>
    assert (run_folder / f"checkpoint-{stopped_at}" / "_COMPLETE").is_file()
    assert not (run_dir / "out" / "adapter").exists()

    (run_dir / "work" / "progress.jsonl").unlink()
    code, result, stderr = run_runtime(run_dir, config)
    assert code == 0, stderr[-3000:]
    assert "Resuming from checkpoint step=" in stderr
    resumed = progress_losses(run_dir / "work")
    assert min(resumed) == stopped_at + 1  # continued, did not restart
    for step in range(1, steps + 1):
        loss = first.get(step, resumed.get(step))
        assert loss == pytest.approx(reference[step], rel=1e-3, abs=1e-3), (step, loss)
    assert result is not None
    assert result.status == "Succeeded"


@pytest.mark.parametrize("method", ["full", "lora"])
def test_zero3_on_two_processes_publishes_a_complete_artifact(
    tmp_path: Path, tiny_model_dir: Path, method: str
) -> None:
    """ZeRO-3 shards parameters; the published weights must still be whole and loadable."""
    import torch
    from safetensors.torch import load_file

    overrides: dict[str, object] = {
        "method": method,
        "distributed": {"nodes": 1, "processes_per_node": 2, "deepspeed": {"zero_stage": 3}},
    }
    if method == "full":
        overrides["lora"] = None
        overrides["training"] = {
            "max_steps": 3,
            "learning_rate": 1e-4,
            "per_device_train_batch_size": 2,
            "logging_steps": 1,
        }
    config = {
        k: v
        for k, v in {**run_config(tmp_path, tiny_model_dir), **overrides}.items()
        if v is not None
    }
    code, result, stderr = run_runtime(tmp_path, config, env={"MASTER_PORT": "29611"})
    assert code == 0, stderr[-4000:]
    assert result is not None
    assert "Launching 2 processes" in stderr
    kind = "model" if method == "full" else "adapter"
    verified = verify_local(tmp_path / "out" / kind, (result.artifact or {})["digest"])
    weights_file = next(f.path for f in verified.files if f.path.endswith(".safetensors"))
    weights = load_file(tmp_path / "out" / kind / weights_file)
    assert weights, "no tensors saved"
    assert all(t.numel() > 0 for t in weights.values()), "empty (still sharded) tensors saved"
    if method == "full":
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / kind)
        base_params = dict(base.named_parameters())
        changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, base_params[n])]
        assert changed, "full fine-tune published the base weights unchanged"
    else:
        lora = [t for name, t in weights.items() if "lora_B" in name]
        assert lora
        assert any(float(t.abs().sum()) > 0 for t in lora), "LoRA B matrices never trained"
