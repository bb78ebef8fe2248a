"""`kubetune run` end to end with the embedded storage (no S3 server, no cluster).

Every run is the real command line (the ``kubetune`` console script in a subprocess) on the
tiny model and GSM8K rows staged into ``<workdir>/s3`` as ``aws s3 cp`` would upload them. The
tests check what a user sees (exit status, printed artifact and digest, the run's files) and
that the local run executes exactly what the operator renders: the ConfigMap's run.json, the
Job container's command, arguments and environment.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_operator.api.finetunejob import FineTuneJob
from kubetune_operator.cli.main import main as kubetune_main
from kubetune_operator.manifests import finetunejob as finetunejob_manifests
from kubetune_operator.manifests.common import OperatorSettings
from kubetune_operator.overrides import apply_overrides
from kubetune_operator.validation import parse_manifest
from kubetune_runtime.storage.artifacts import COMPLETE_MARKER, verify_local
from tests.integration.runtime_support import GSM8K_TRAIN, SHARED_DATA, process_table

GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"
KUBETUNE = Path(sys.executable).parent / "kubetune"  # the console script of this environment
BASE_URI = "s3://models/tiny-base"
TRAIN_URI = "s3://datasets/gsm8k/train.jsonl"
TEST_URI = "s3://datasets/gsm8k/test.jsonl"
TRAINED = "local-ft"  # the module's FineTuneJob
MANIFEST_STEPS = 6  # spec.training.maxSteps in the manifest; the run overrides it
OVERRIDE_STEPS = 3

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not GSM8K_TRAIN.is_file(), reason="../shared/data is missing"),
    pytest.mark.skipif(not KUBETUNE.is_file(), reason=f"no kubetune console script at {KUBETUNE}"),
]


# ----------------------------------------------------------------------------- helpers


def cli_env() -> dict[str, str]:
    """This environment without S3 settings (so storage is embedded), offline."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AWS_") and not k.startswith("KUBETUNE_")
    }
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def kubetune(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``kubetune ARGS`` as a user types it; output captured."""
    return subprocess.run(
        [str(KUBETUNE), *map(str, args)],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=timeout,
        check=False,
    )


def stage_inputs(workdir: Path, model_dir: Path) -> None:
    """The base model and GSM8K rows in the embedded storage (s3://models, s3://datasets)."""
    s3 = workdir / "s3"
    shutil.copytree(model_dir, s3 / "models" / "tiny-base")
    datasets = s3 / "datasets" / "gsm8k"
    datasets.mkdir(parents=True)
    for source, rows in ((GSM8K_TRAIN, 48), (GSM8K_TEST, 8)):
        with source.open(encoding="utf-8") as lines:
            head = [line for line, _ in zip(lines, range(rows), strict=False)]
        (datasets / source.name).write_text("".join(head), encoding="utf-8")


def finetune_manifest(name: str, *, max_steps: int, **spec: Any) -> dict[str, Any]:
    """A small LoRA SFT FineTuneJob on GSM8K in the embedded storage; ``spec`` replaces keys."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": BASE_URI},
            "dataset": {
                "train": {
                    "uri": TRAIN_URI,
                    "format": "promptCompletion",
                    "columns": {"prompt": "question", "completion": "answer"},
                },
                "maxSeqLength": 256,
            },
            "method": "lora",
            "lora": {"r": 8, "alpha": 16},
            "training": {
                "maxSteps": max_steps,
                "learningRate": "1e-3",
                "perDeviceTrainBatchSize": 2,
                "loggingSteps": 1,
                "seed": 7,
            },
            "checkpointing": {"everySteps": 100, "keepLast": 2},
            "output": {"uri": f"s3://models/{name}"},
            **spec,
        },
    }


def write_manifest(path: Path, doc: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(doc), sort_keys=False), encoding="utf-8")
    return path


def job_dir(workdir: Path, kind: str, name: str) -> Path:
    """<workdir>/jobs/<namespace>/<kind>/<name>: the run's config, workspace and logs."""
    return workdir.resolve() / "jobs" / "default" / kind.lower() / name


def last_result(workdir: Path, kind: str, name: str) -> dict[str, Any]:
    """The last run's record (exit code, runtime result, base model)."""
    record: dict[str, Any] = json.loads(
        (job_dir(workdir, kind, name) / "result.json").read_text(encoding="utf-8")
    )
    return record


def progress(workspace: Path) -> list[dict[str, Any]]:
    """The training-step records of the progress stream (no end-of-run summaries)."""
    path = workspace / "progress.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # a line being written
        if record.get("loss") is not None and not record.get("final"):
            records.append(record)
    return records


def rendered_job(doc: Mapping[str, Any], overrides: list[str]) -> list[dict[str, Any]]:
    """What the operator creates for this manifest: [ConfigMap, Job]."""
    job = parse_manifest(apply_overrides(dict(doc), overrides))
    assert isinstance(job, FineTuneJob)
    return finetunejob_manifests.build(job, OperatorSettings())


def local_value(value: str, workdir: Path, name: str) -> str:
    """A pod path mapped to the local run's folders, as `kubetune run` documents it."""
    root = job_dir(workdir, "FineTuneJob", name)
    for mount, local in (("/etc/kubetune", root / "config"), ("/workspace", root / "workspace")):
        if value == mount or value.startswith(mount + "/"):
            return str(local) + value[len(mount) :]
    return value


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    return [child for child, ppid, _, _ in process_table() if ppid == pid]


def proc_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def proc_cmdline(pid: int) -> list[str]:
    return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]


# ----------------------------------------------------------------------------- the main run


@dataclass(frozen=True)
class Trained:
    workdir: Path
    manifest: dict[str, Any]
    overrides: list[str]
    proc: subprocess.CompletedProcess[str]
    seconds: float


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Trained:
    """`kubetune run` of a FineTuneJob (maxSteps overridden with --set) in a fresh workdir."""
    workdir = tmp_path_factory.mktemp("kubetune")
    stage_inputs(workdir, tiny_model_dir)
    doc = finetune_manifest(TRAINED, max_steps=MANIFEST_STEPS)
    manifest = write_manifest(workdir / "finetunejob.yaml", doc)
    overrides = [f"spec.training.maxSteps={OVERRIDE_STEPS}"]
    started = time.monotonic()
    proc = kubetune("run", manifest, "--workdir", workdir, "--set", overrides[0])
    return Trained(workdir, doc, overrides, proc, time.monotonic() - started)


def test_finetunejob_runs_locally_and_publishes_a_verified_adapter(trained: Trained) -> None:
    assert trained.proc.returncode == 0, trained.proc.stdout[-3000:] + trained.proc.stderr
    result = last_result(trained.workdir, "FineTuneJob", TRAINED)["result"]
    assert result["status"] == "Succeeded"
    artifact = result["artifact"]
    assert artifact["uri"] == f"s3://models/{TRAINED}/adapter"
    # The summary names the artifact and its digest.
    lines = trained.proc.stdout.splitlines()
    assert f"artifact  {artifact['uri']}" in lines
    assert f"digest    {artifact['digest']}" in lines
    # It is in the embedded storage and every byte verifies against the printed digest.
    adapter = trained.workdir / "s3" / "models" / TRAINED / "adapter"
    verified = verify_local(adapter, artifact["digest"])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {f.path for f in verified.files}
    assert (adapter / COMPLETE_MARKER).is_file()
    assert verified.metadata["baseModel"] == BASE_URI


def test_set_override_is_applied_to_the_run(trained: Trained) -> None:
    assert trained.proc.returncode == 0, trained.proc.stderr
    result = last_result(trained.workdir, "FineTuneJob", TRAINED)["result"]
    assert result["metrics"]["steps"] == OVERRIDE_STEPS  # not the manifest's MANIFEST_STEPS
    root = job_dir(trained.workdir, "FineTuneJob", TRAINED)
    run = json.loads((root / "config" / "run.json").read_text(encoding="utf-8"))
    assert run["training"]["max_steps"] == OVERRIDE_STEPS
    assert [r["step"] for r in progress(root / "workspace")] == [1, 2, 3]


def test_local_run_executes_the_configmap_and_job_the_operator_renders(trained: Trained) -> None:
    assert trained.proc.returncode == 0, trained.proc.stderr
    objects = rendered_job(trained.manifest, trained.overrides)
    config_map = next(o for o in objects if o["kind"] == "ConfigMap")
    container = next(o for o in objects if o["kind"] == "Job")["spec"]["template"]["spec"][
        "containers"
    ][0]
    root = job_dir(trained.workdir, "FineTuneJob", TRAINED)
    # One code path: the run.json the runtime read is the ConfigMap's, byte for byte.
    assert set(config_map["data"]) == {"run.json"}
    run_json = (root / "config" / "run.json").read_text(encoding="utf-8")
    assert run_json == config_map["data"]["run.json"]
    # The printed command is the container's, with its mounts mapped to local folders.
    (line,) = [ln for ln in trained.proc.stdout.splitlines() if ln.startswith("FineTuneJob ")]
    printed = line.split(": ", 1)[1].split()
    expected_args = [local_value(a, trained.workdir, TRAINED) for a in container["args"]]
    assert printed[-len(expected_args) :] == expected_args
    assert container["command"] == ["kubetune-runtime"]
    program = printed[: -len(expected_args)]
    if len(program) == 1:  # kubetune-runtime found on PATH
        assert Path(program[0]).name == "kubetune-runtime", program
    else:  # or the same entry point through this environment's interpreter
        assert program[1:] == ["-m", "kubetune_runtime.entrypoint"], program
        assert Path(program[0]).resolve() == Path(sys.executable).resolve()
    assert (root / "runtime.log").is_file()
    assert f"logs: {root / 'runtime.log'}" in trained.proc.stdout


def test_bad_data_row_fails_naming_the_row_and_publishes_nothing(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    stage_inputs(tmp_path, tiny_model_dir)
    rows = [
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "user", "content": "3+3?"}, {"role": "wizard", "content": "6"}]},
    ]
    chat = tmp_path / "s3" / "datasets" / "chat" / "train.jsonl"
    chat.parent.mkdir(parents=True)
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    doc = finetune_manifest("bad-rows", max_steps=2)
    train = {"uri": "s3://datasets/chat/train.jsonl", "format": "messages"}
    doc["spec"]["dataset"]["train"] = train
    proc = kubetune("run", write_manifest(tmp_path / "bad.yaml", doc), "--workdir", tmp_path)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr  # permanent: not retried
    result = last_result(tmp_path, "FineTuneJob", "bad-rows")["result"]
    assert result["status"] == "Failed"
    assert result["reason"] == "DataInvalid"
    assert "row 2" in result["message"]
    assert "wizard" in result["message"]
    assert "row 2" in proc.stdout  # the summary shows the reason too
    assert not (tmp_path / "s3" / "models" / "bad-rows").exists()  # nothing published
    assert progress(job_dir(tmp_path, "FineTuneJob", "bad-rows") / "workspace") == []


def test_ctrl_c_checkpoints_and_the_same_command_resumes(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    steps = 6
    name = "interrupted"
    stage_inputs(tmp_path, tiny_model_dir)
    doc = finetune_manifest(name, max_steps=steps)
    manifest = write_manifest(tmp_path / "finetunejob.yaml", doc)
    root = job_dir(tmp_path, "FineTuneJob", name)
    command = [str(KUBETUNE), "run", str(manifest), "--workdir", str(tmp_path)]
    with (tmp_path / "first.out").open("w+", encoding="utf-8") as out:
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=cli_env(),
            start_new_session=True,  # its own process group, as a terminal's foreground job
        )
        try:
            runtime_pid = None
            deadline = time.monotonic() + 240
            while len(progress(root / "workspace")) < 2:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out.seek(0)
                    pytest.fail(f"the run ended or stalled before step 2:\n{out.read()[-3000:]}")
                if runtime_pid is None:
                    runtime_pid = next(iter(child_pids(proc.pid)), None)
                time.sleep(0.1)
            assert runtime_pid is not None
            runtime_env = proc_environ(runtime_pid)
            runtime_argv = proc_cmdline(runtime_pid)
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
            code = proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.seek(0)
        first_out = out.read()

    # The runtime process ran the rendered Job's container: arguments and environment.
    container = rendered_job(doc, [])[1]["spec"]["template"]["spec"]["containers"][0]
    expected_args = [local_value(a, tmp_path, name) for a in container["args"]]
    assert runtime_argv[-len(expected_args) :] == expected_args
    for var in container["env"]:
        assert runtime_env[var["name"]] == local_value(var["value"], tmp_path, name), var
    assert runtime_env["KUBETUNE_LOCAL_S3_ROOT"] == str(tmp_path.resolve() / "s3")
    assert runtime_env["KUBETUNE_RESULT_PATH"] == str(root / "termination-log")

    # Interrupted: non-zero, an Interrupted result, a complete checkpoint, no adapter.
    assert code == 128 + signal.SIGINT, first_out[-3000:]
    record = last_result(tmp_path, "FineTuneJob", name)
    assert record["exitCode"] == code
    assert record["result"]["status"] == "Interrupted", record
    assert "run the same command again" in first_out
    stopped_at = max(r["step"] for r in progress(root / "workspace"))
    assert 2 <= stopped_at < steps
    (run_folder,) = (tmp_path / "s3" / "models" / name / "checkpoints").iterdir()
    assert (run_folder / f"checkpoint-{stopped_at}" / COMPLETE_MARKER).is_file()
    assert not (tmp_path / "s3" / "models" / name / "adapter").exists()

    # The same command again resumes from that checkpoint and finishes.
    rerun = subprocess.run(
        command, capture_output=True, text=True, env=cli_env(), timeout=300, check=False
    )
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr
    log = (root / "runtime.log").read_text(encoding="utf-8")
    assert f"Resuming from checkpoint step={stopped_at}" in log
    resumed = [r["step"] for r in progress(root / "workspace")]
    assert resumed == list(range(stopped_at + 1, steps + 1))  # continued, did not restart
    result = last_result(tmp_path, "FineTuneJob", name)["result"]
    assert result["status"] == "Succeeded"
    assert result["metrics"]["steps"] == steps
    verify_local(tmp_path / "s3" / "models" / name / "adapter", result["artifact"]["digest"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("spec.training.maxSteps=abc", "spec.training.maxSteps: Input should be a valid integer"),
        ("spec.training.maxSteps", "'spec.training.maxSteps': expected FIELD.PATH=VALUE"),
        ("spec.dataset.train.uri=ftp://host/x", "spec.dataset.train.uri: expected a URI"),
        ("spec.lora.r=0", "spec.lora.r:"),
        ("spec.lora.targetModules[5]=q_proj", "spec.lora.targetModules[5]: index 5 does not"),
    ],
)
def test_invalid_override_is_refused_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, message: str
) -> None:
    manifest = write_manifest(tmp_path / "ft.yaml", finetune_manifest("ft", max_steps=2))
    code = kubetune_main(["run", str(manifest), "--workdir", str(tmp_path), "--set", override])
    assert code == 1
    err = capsys.readouterr().err
    assert f"{manifest}: {message}" in err, err
    assert not (tmp_path / "jobs").exists()  # nothing was rendered or run


# ----------------------------------------------------------------------------- EvalJob


def eval_manifest(name: str, target: dict[str, Any], **spec: Any) -> dict[str, Any]:
    """An EvalJob with a held-out perplexity suite and a short GSM8K accuracy suite."""
    dataset = {
        "uri": TEST_URI,
        "format": "promptCompletion",
        "columns": {"prompt": "question", "completion": "answer"},
    }
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "EvalJob",
        "metadata": {"name": name},
        "spec": {
            "target": target,
            "suites": [
                {"name": "heldout", "type": "perplexity", "dataset": dataset, "maxSamples": 4},
                {
                    "name": "gsm8k",
                    "type": "taskAccuracy",
                    "dataset": dataset,
                    "answerExtraction": "gsm8k",
                    "maxSamples": 2,
                },
            ],
            "gates": [
                {"suite": "heldout", "metric": "loss", "comparison": "lt", "threshold": "50"}
            ],
            "generation": {"maxNewTokens": 8, "batchSize": 2},
            "output": {"uri": f"s3://results/{name}"},
            **spec,
        },
    }


def test_evaljob_resolves_the_finetunejob_ref_from_the_local_run(trained: Trained) -> None:
    assert trained.proc.returncode == 0, trained.proc.stderr
    artifact = last_result(trained.workdir, "FineTuneJob", TRAINED)["result"]["artifact"]
    doc = eval_manifest("local-eval", {"fineTuneJobRef": {"name": TRAINED}})
    manifest = write_manifest(trained.workdir / "evaljob.yaml", doc)
    proc = kubetune("run", manifest, "--workdir", trained.workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr

    root = job_dir(trained.workdir, "EvalJob", "local-eval")
    run = json.loads((root / "config" / "run.json").read_text(encoding="utf-8"))
    assert run["adapter"] == {"uri": artifact["uri"], "digest": artifact["digest"]}
    assert run["model"]["uri"] == BASE_URI  # the FineTuneJob's base (no spec.baseModel)

    evaluation = last_result(trained.workdir, "EvalJob", "local-eval")["result"]["evaluation"]
    assert evaluation["adapterDigest"] == artifact["digest"]
    rows = {(r["suite"], r["metric"]): r for r in evaluation["summary"]}
    assert set(rows) == {("heldout", "loss"), ("heldout", "perplexity"), ("gsm8k", "exactMatch")}
    for row in rows.values():
        assert isinstance(row["base"], float | int), row
        assert isinstance(row["candidate"], float | int), row
        # The summary rounds base and candidate, so allow for that in the difference.
        assert row["delta"] == pytest.approx(row["candidate"] - row["base"], rel=1e-3, abs=1e-2)
    assert evaluation["passed"] is True
    assert "gate PASS" in proc.stdout
    assert "heldout         loss" in proc.stdout  # the printed table
    results = trained.workdir / "s3" / "results" / "local-eval"
    assert evaluation["resultsUri"] == "s3://results/local-eval"
    assert {"summary.json", "heldout.jsonl", "gsm8k.jsonl"} <= {
        f.path for f in verify_local(results).files
    }


def test_evaljob_ref_to_a_finetunejob_never_run_here_is_explained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = eval_manifest("orphan-eval", {"fineTuneJobRef": {"name": "never-ran"}})
    manifest = write_manifest(tmp_path / "ev.yaml", doc)
    assert kubetune_main(["run", str(manifest), "--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "FineTuneJob default/never-ran has no local result" in err
    assert "kubetune run" in err
