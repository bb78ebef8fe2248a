"""`kubetune run`: execute a FineTuneJob or EvalJob on this machine exactly as its pod would.

There is one code path. The manifest is validated and rendered by the same builders the
operator uses (``manifests.finetunejob.build`` / ``manifests.evaljob.build``); this module then
executes the resulting Job's container: its command and arguments, its environment, and its
volumes mapped to local folders:

==========================  =================================================================
in the pod                  locally
==========================  =================================================================
``/etc/kubetune`` (ConfigMap)  ``<workdir>/jobs/<ns>/<kind>/<name>/config`` (the same run.json)
``/workspace`` (emptyDir)      ``<workdir>/jobs/<ns>/<kind>/<name>/workspace`` (kept: reruns resume)
``/tmp``                       a fresh temporary folder
Secret-backed env vars         the variable of the same name in your environment
termination message            ``<workdir>/jobs/.../termination-log``
==========================  =================================================================

Storage: with no S3 endpoint configured (manifest, ``--s3-endpoint`` or ``AWS_ENDPOINT_URL``),
``s3://bucket/key`` resolves to ``<workdir>/s3/bucket/key`` ("embedded storage"); with one, the
runtime talks to that S3 server with the credentials in your environment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from kubetune_operator.api.common import BaseModelSpec
from kubetune_operator.api.evaljob import EvalJob
from kubetune_operator.api.finetunejob import FineTuneJob
from kubetune_operator.manifests import evaljob as evaljob_manifests
from kubetune_operator.manifests import finetunejob as finetunejob_manifests
from kubetune_operator.manifests.common import OperatorSettings
from kubetune_operator.manifests.jobs import CONFIG_DIR, WORKDIR
from kubetune_operator.overrides import apply_overrides
from kubetune_operator.validation import ManifestInvalid, load_documents, parse_manifest
from kubetune_runtime.config import AdapterRef

RESULT_PREFIX = "KUBETUNE_RESULT "


class LocalRunError(Exception):
    """The manifest cannot run locally (explains why and what to do)."""


@dataclass(frozen=True)
class LocalRun:
    """Where one resource's local run keeps its files."""

    root: Path

    @property
    def config_dir(self) -> Path:
        """The ConfigMap's files (run.json)."""
        return self.root / "config"

    @property
    def workspace(self) -> Path:
        """The pod's /workspace, kept between runs so a rerun resumes."""
        return self.root / "workspace"

    @property
    def termination_log(self) -> Path:
        """The pod's termination message."""
        return self.root / "termination-log"

    @property
    def log_file(self) -> Path:
        """The runtime's full output."""
        return self.root / "runtime.log"

    @property
    def result_file(self) -> Path:
        """The last result (read by a later EvalJob that references this FineTuneJob)."""
        return self.root / "result.json"


def run_dir(workdir: Path, kind: str, namespace: str, name: str) -> LocalRun:
    """The folder of one resource's local runs."""
    return LocalRun(workdir / "jobs" / namespace / kind.lower() / name)


def load_manifest(path: Path, overrides: Sequence[str], s3_endpoint: str | None) -> Any:
    """Read one FineTuneJob or EvalJob manifest, apply ``--set`` overrides and validate it.

    Raises:
        ManifestInvalid: with every problem (field path and expectation).
        LocalRunError: not exactly one document.
    """
    docs = load_documents(path.read_text(encoding="utf-8"))
    if len(docs) != 1:
        raise LocalRunError(f"{path}: expected one manifest, found {len(docs)} documents")
    doc = apply_overrides(docs[0], list(overrides))
    if s3_endpoint and isinstance(doc.get("spec"), dict):
        storage = doc["spec"].get("storage") or {}
        doc["spec"]["storage"] = storage
        if not storage.get("endpoint"):  # an explicit endpoint (and its addressing) wins
            storage["endpoint"] = s3_endpoint
            storage.setdefault("pathStyle", True)
    model = parse_manifest(doc)
    if not isinstance(model, FineTuneJob | EvalJob):
        kind = type(model).__name__
        raise LocalRunError(f"{path}: kubetune run executes FineTuneJob and EvalJob, not {kind}")
    return model


def _resolve_eval_target(job: EvalJob, workdir: Path) -> tuple[AdapterRef, BaseModelSpec]:
    """What the operator resolves from the cluster, resolved from earlier local runs."""
    namespace = job.metadata.namespace or "default"
    target = job.spec.target
    if target.adapter is not None:
        if job.spec.base_model is None:
            raise LocalRunError("spec.baseModel is required for an adapter URI target")
        return AdapterRef(uri=target.adapter.uri, digest=target.adapter.digest), job.spec.base_model
    if target.fine_tune_job_ref is not None:
        ref = target.fine_tune_job_ref.name
        local = run_dir(workdir, "FineTuneJob", namespace, ref)
        if not local.result_file.is_file():
            raise LocalRunError(
                f"FineTuneJob {namespace}/{ref} has no local result under {local.root}; run it "
                "first with `kubetune run`, or target the artifact by uri and digest"
            )
        record = json.loads(local.result_file.read_text(encoding="utf-8"))
        artifact = (record.get("result") or {}).get("artifact")
        if not artifact:
            raise LocalRunError(f"FineTuneJob {namespace}/{ref} did not publish an artifact")
        base = job.spec.base_model or BaseModelSpec.model_validate(record["baseModel"])
        return AdapterRef(uri=artifact["uri"], digest=artifact["digest"]), base
    raise LocalRunError(
        "an adapterDeploymentRef target needs a running AdapterDeployment (a cluster); "
        "use an adapter uri and digest locally"
    )


def build_objects(job: Any, workdir: Path, settings: OperatorSettings) -> list[dict[str, Any]]:
    """The child objects the operator would create for ``job``."""
    if isinstance(job, FineTuneJob):
        if job.spec.distributed is not None and job.spec.distributed.nodes > 1:
            raise LocalRunError(
                f"spec.distributed.nodes is {job.spec.distributed.nodes}: a multi-node run needs "
                "a cluster (use --set spec.distributed.nodes=1 to try it on this machine)"
            )
        return finetunejob_manifests.build(job, settings)
    adapter, base = _resolve_eval_target(job, workdir)
    return evaljob_manifests.build(job, settings, adapter=adapter, base_model=base)


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    job = next(o for o in objects if o["kind"] == "Job")
    return dict(job["spec"]["template"]["spec"]["containers"][0])


def _local_path(value: str, mounts: dict[str, Path]) -> str:
    for mount, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
        if value == mount or value.startswith(mount + "/"):
            return str(local) + value[len(mount) :]
    return value


def container_environment(
    container: dict[str, Any], mounts: dict[str, Path], environ: dict[str, str]
) -> dict[str, str]:
    """The container's env with mount paths mapped and Secret values taken from ``environ``.

    Raises:
        LocalRunError: a Secret-backed variable is not set locally (names the Secret and key).
    """
    env: dict[str, str] = {}
    missing = []
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = _local_path(var["value"], mounts)
            continue
        ref = var.get("valueFrom", {}).get("secretKeyRef", {})
        if var["name"] in environ:
            env[var["name"]] = environ[var["name"]]
        else:
            missing.append(f"{var['name']} (Secret {ref.get('name')}, key {ref.get('key')})")
    if missing:
        raise LocalRunError("set these environment variables to run locally: " + ", ".join(missing))
    return env


def _bar(record: dict[str, Any], width: int = 24) -> str:
    step, total = record.get("step", 0), record.get("total_steps")
    parts = []
    if total:
        filled = int(width * min(step, total) / total)
        parts.append(f"[{'#' * filled}{'.' * (width - filled)}] {step}/{total}")
    else:
        parts.append(f"step {step}")
    if record.get("loss") is not None:
        parts.append(f"loss {record['loss']:.4f}")
    if record.get("tokens_per_second") is not None:
        parts.append(f"{record['tokens_per_second']:.0f} tok/s")
    if record.get("eta_seconds") is not None:
        minutes, seconds = divmod(int(record["eta_seconds"]), 60)
        parts.append(f"eta {minutes}m{seconds:02d}s")
    return "  ".join(parts)


def _watch(proc: subprocess.Popen[str], progress: Path, out: TextIO, interactive: bool) -> None:
    """Draw the progress bar from the runtime's progress stream until the process exits."""
    seen = 0
    last = ""
    while proc.poll() is None:
        time.sleep(0.5)
        if not progress.is_file():
            continue
        lines = progress.read_text(encoding="utf-8").splitlines()
        for line in lines[seen:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # a line being written; read it next time
            seen += 1
            last = _bar(record)
            if not interactive:
                print(last, file=out, flush=True)
        if interactive and last:
            print("\r" + last.ljust(100), end="", file=out, flush=True)
    if interactive and last:
        print(file=out)


def _summary(result: dict[str, Any] | None, seconds: float, out: TextIO) -> None:
    minutes, secs = divmod(int(seconds), 60)
    if result is None:
        print(f"no result was reported ({minutes}m{secs:02d}s)", file=out)
        return
    print(f"{result['status']}: {result.get('reason')} in {minutes}m{secs:02d}s", file=out)
    artifact = result.get("artifact")
    if artifact:
        print(f"artifact  {artifact['uri']}", file=out)
        print(f"digest    {artifact['digest']}", file=out)
        if artifact.get("mergedUri"):
            print(f"merged    {artifact['mergedUri']}", file=out)
    metrics = result.get("metrics") or {}
    if metrics:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
        print(f"metrics   {shown}", file=out)
    evaluation = result.get("evaluation") or {}
    rows = evaluation.get("summary") or []
    if rows:
        print(f"\n{'suite':<16}{'metric':<14}{'base':>10}{'candidate':>12}{'delta':>10}", file=out)
        for row in rows:
            base = "" if row.get("base") is None else f"{row['base']:.4f}"
            delta = "" if row.get("delta") is None else f"{row['delta']:+.4f}"
            print(
                f"{row['suite']:<16}{row['metric']:<14}{base:>10}{row['candidate']:>12.4f}"
                f"{delta:>10}",
                file=out,
            )
    for gate in evaluation.get("gates") or []:
        verdict = "PASS" if gate.get("passed") else "FAIL"
        print(f"gate {verdict}: {gate.get('message', '')}", file=out)
    if evaluation.get("resultsUri"):
        print(f"results   {evaluation['resultsUri']}", file=out)
    if result["status"] != "Succeeded" and result.get("message"):
        print(f"reason    {result['message']}", file=out)


def execute(
    manifest: Path,
    *,
    workdir: Path,
    overrides: Sequence[str] = (),
    s3_endpoint: str | None = None,
    settings: OperatorSettings | None = None,
    out: TextIO | None = None,
    environ: dict[str, str] | None = None,
    on_start: Callable[[subprocess.Popen[str]], None] | None = None,
) -> int:
    """Validate, render and run one manifest locally; returns the runtime's exit status.

    Ctrl-C reaches the runtime too (same terminal process group): it saves a checkpoint and
    stops; running the same command again resumes from it.
    """
    out = out or sys.stdout
    environ = dict(os.environ if environ is None else environ)
    s3_endpoint = s3_endpoint or environ.get("AWS_ENDPOINT_URL")
    job = load_manifest(manifest, overrides, s3_endpoint)
    namespace = job.metadata.namespace or "default"
    local = run_dir(workdir.resolve(), job.kind, namespace, job.metadata.name)
    objects = build_objects(job, workdir.resolve(), settings or OperatorSettings())
    container = _container(objects)
    config_map = next(o for o in objects if o["kind"] == "ConfigMap")

    local.config_dir.mkdir(parents=True, exist_ok=True)
    local.workspace.mkdir(parents=True, exist_ok=True)
    for name, text in config_map["data"].items():
        (local.config_dir / name).write_text(text, encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="kubetune-tmp-") as tmp:
        mounts = {CONFIG_DIR: local.config_dir, WORKDIR: local.workspace, "/tmp": Path(tmp)}  # noqa: S108
        env = {**environ, **container_environment(container, mounts, environ)}
        if not (job.spec.storage and job.spec.storage.endpoint):
            env["KUBETUNE_LOCAL_S3_ROOT"] = str(workdir.resolve() / "s3")
        env["KUBETUNE_RESULT_PATH"] = str(local.termination_log)
        env.setdefault("HF_HUB_OFFLINE", environ.get("HF_HUB_OFFLINE", "0"))
        command = [_local_path(a, mounts) for a in [*container["command"], *container["args"]]]
        if command[0] == "kubetune-runtime":  # this installation's runtime, not one on PATH
            command = [sys.executable, "-m", "kubetune_runtime.entrypoint", *command[1:]]
        print(f"{job.kind} {namespace}/{job.metadata.name}: {' '.join(command)}", file=out)
        print(f"logs: {local.log_file}", file=out)
        progress = local.workspace / "progress.jsonl"
        progress.unlink(missing_ok=True)
        started = time.monotonic()
        with local.log_file.open("w", encoding="utf-8") as log:
            proc = subprocess.Popen(  # noqa: S603 - the pod's own command
                command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
            )
            if on_start is not None:
                on_start(proc)
            try:
                _watch(proc, progress, out, interactive=out.isatty())
            except KeyboardInterrupt:
                # The runtime got SIGINT too (same process group); let it checkpoint and exit.
                print("\ninterrupted: waiting for the checkpoint...", file=out, flush=True)
                proc.send_signal(signal.SIGINT)
            code = _wait_through_interrupts(proc)
    elapsed = time.monotonic() - started
    result = _read_result(local.log_file)
    local.result_file.write_text(
        json.dumps(
            {
                "exitCode": code,
                "result": result,
                "baseModel": _base_model(job),
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    _summary(result, elapsed, out)
    if code != 0:
        if result is None or result.get("status") == "Failed":
            tail = local.log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-20:]
            print("\nlast log lines:\n" + "\n".join(tail), file=out)
        if result is not None and result.get("status") == "Interrupted":
            print("run the same command again to resume from the checkpoint", file=out)
    return code


def _wait_through_interrupts(proc: subprocess.Popen[str]) -> int:
    """Wait for the runtime; further Ctrl-Cs must not abandon it while it checkpoints."""
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue


def _base_model(job: Any) -> dict[str, Any] | None:
    base = job.spec.base_model
    return base.model_dump(by_alias=True, exclude_none=True) if base is not None else None


def _read_result(log_file: Path) -> dict[str, Any] | None:
    for line in reversed(log_file.read_text(encoding="utf-8", errors="replace").splitlines()):
        if line.startswith(RESULT_PREFIX):
            parsed: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            return parsed
    return None


__all__ = ["LocalRunError", "ManifestInvalid", "execute"]
