"""``kubetune-runtime``: the program in the pod.

    kubetune-runtime train --config /etc/kubetune/run.json [--workdir /workspace]
    kubetune-runtime evaluate --config /etc/kubetune/run.json [--workdir /workspace]

Serving pods run ``serve`` (the built-in engine), ``agent`` (the adapter agent sidecar) and
``fetch-model`` (the init container that puts the base model in a local folder); each parses
its own arguments and documents its own exit status, with the same meaning of 1, 2 and 3.

Steps: parse arguments, validate the RunConfig, configure logging (INFO on rank 0 only), run
the recipe, write a short JSON result to the termination-message path and stdout. A run that
needs several processes and was not started by a launcher re-executes itself under torchrun.
Nothing happens at import time; the training stack is imported by the recipe.

Exit status: 0 succeeded; 1 failed, may succeed on retry (one line on stderr says why);
2 unreadable or invalid RunConfig (a ConfigInvalid result is still written); 3 failed
permanently (invalid data, config or artifact). The Job's podFailurePolicy retries neither 2
nor 3. 128 + signal when stopped by SIGTERM/SIGINT after checkpointing (the next start
resumes).

Environment: ``KUBETUNE_RESULT_PATH`` overrides where the result JSON is written (local runs).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from kubetune_runtime.config import RunConfig
from kubetune_runtime.errors import ConfigInvalid, RuntimeFailure
from kubetune_runtime.result import RunResult, write_result
from kubetune_runtime.training.distributed import needs_launcher, process_info, torchrun_command

log = logging.getLogger("kubetune")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PERMANENT = 3  # invalid data or config: retrying cannot help (the Job's podFailurePolicy)
PERMANENT_REASONS = frozenset({"DataInvalid", "ConfigInvalid", "ArtifactInvalid"})


def configure_logging(rank: int) -> None:
    """Kubernetes-style log lines; INFO on rank 0, WARNING elsewhere (nanochat's print0)."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # bitsandbytes warns on every CPU import that an optional kernels package is missing.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    for noisy in ("httpx", "urllib3", "botocore", "boto3", "s3transfer", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune-runtime", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("train", "fine-tune, publish a verified artifact, then evaluate when asked"),
        ("evaluate", "evaluate base vs base + adapter and decide the gates"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--config", type=Path, required=True, help="RunConfig JSON file")
        cmd.add_argument(
            "--workdir",
            type=Path,
            default=Path(os.environ.get("KUBETUNE_WORKDIR", "/tmp/kubetune")),  # noqa: S108
            help="scratch space for downloads and checkpoints (default: $KUBETUNE_WORKDIR)",
        )
    sub.add_parser(
        "serve",
        help="the built-in OpenAI-compatible multi-LoRA engine (see `serve --help`)",
        add_help=False,
    )
    sub.add_parser(
        "agent",
        help="the adapter agent sidecar: keeps the engine's adapters equal to the config",
        add_help=False,
    )
    sub.add_parser(
        "fetch-model",
        help="the serving init container: put the base model in a local folder",
        add_help=False,
    )
    return parser


def _load(path: Path) -> RunConfig:
    try:
        return RunConfig.model_validate_json(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SystemExit(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise SystemExit(f"invalid RunConfig {path}: not UTF-8 text") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SystemExit(f"invalid RunConfig {path}: {where}: {first['msg']}") from None


def _relaunch(config: RunConfig, args: argparse.Namespace) -> int:
    """Run the same command under torchrun, forward SIGTERM/SIGINT, and report its outcome.

    torchrun exits 1 whenever a worker fails, so the exit status is derived from the result
    the main worker wrote (a permanent failure stays 3, an interrupted run 128 + signal); a
    failure no worker reported becomes a TrainingFailed result here.
    """
    result_path = Path(config.result_path)
    before = result_path.stat().st_mtime_ns if result_path.exists() else None
    argv = ["-m", "kubetune_runtime.entrypoint", args.command, "--config", str(args.config)]
    argv += ["--workdir", str(args.workdir)]
    command = torchrun_command(config.distributed, argv)
    log.info("Launching %d processes: %s", config.distributed.processes_per_node, " ".join(command))
    # torchrun SIGKILLs workers this long after forwarding SIGTERM: give them the time to save.
    env = {
        **os.environ,
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600"),
    }
    child = subprocess.Popen(command, env=env)  # noqa: S603 - our own interpreter and module

    def forward(signum: int, frame: object) -> None:
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    after = result_path.stat().st_mtime_ns if result_path.exists() else None
    if after is not None and after != before:
        try:
            result = RunResult.model_validate_json(result_path.read_text(encoding="utf-8"))
        except (OSError, ValidationError):
            result = None
        if result is not None:
            return _exit_code(result)
    if code != 0:
        write_result(
            RunResult(
                status="Failed",
                reason="TrainingFailed",
                message=f"a training process exited with status {code} without a result",
            ),
            config.result_path,
        )
    return code


def _exit_code(result: RunResult) -> int:
    if result.status == "Succeeded":
        return 0
    if result.status == "Interrupted":
        signum = signal.SIGINT if result.reason == "SIGINT" else signal.SIGTERM
        return 128 + int(signum)
    return EXIT_PERMANENT if result.reason in PERMANENT_REASONS else EXIT_FAILED


# Serving commands parse their own arguments (imported only when run: no work at import time).
SERVING_COMMANDS = {
    "serve": "kubetune_runtime.serving.engine",
    "agent": "kubetune_runtime.serving.agent",
    "fetch-model": "kubetune_runtime.serving.fetch_model",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kubetune-runtime``; returns the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words and words[0] in SERVING_COMMANDS:
        module = importlib.import_module(SERVING_COMMANDS[words[0]])
        code: int = module.main(words[1:])
        return code
    args = _parser().parse_args(argv)
    proc = process_info()
    configure_logging(proc.rank)
    try:
        config = _load(args.config)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        if proc.is_main:  # the pod still reports why (the config can never work: not retried)
            write_result(
                RunResult(status="Failed", reason="ConfigInvalid", message=str(exc)),
                os.environ.get("KUBETUNE_RESULT_PATH", "/dev/termination-log"),
            )
        return EXIT_USAGE
    if os.environ.get("KUBETUNE_RESULT_PATH"):  # local runs: no /dev/termination-log
        config = config.model_copy(update={"result_path": os.environ["KUBETUNE_RESULT_PATH"]})
    if args.command == "train" and needs_launcher(config.distributed):
        return _relaunch(config, args)

    result = _run(config, args.command, args.workdir)
    if proc.is_main:
        write_result(result, config.result_path)
    if result.status != "Succeeded":
        print(f"kubetune-runtime: {result.reason}: {result.message}", file=sys.stderr)
    return _exit_code(result)


def _run(config: RunConfig, command: str, workdir: Path) -> RunResult:
    """Run the recipe and turn every outcome into a RunResult."""
    try:
        if config.task != command:
            raise ConfigInvalid(f"the RunConfig is for task {config.task}, not {command}")
        if command == "evaluate":
            from kubetune_runtime.recipes import evaluate  # noqa: PLC0415

            return evaluate.run(config, workdir=workdir)
        from kubetune_runtime.recipes import train  # noqa: PLC0415

        return train.run(config, workdir=workdir)
    except RuntimeFailure as exc:
        log.error("%s: %s", exc.reason, exc)
        return RunResult(status="Failed", reason=exc.reason, message=str(exc))
    except KeyboardInterrupt:
        return RunResult(status="Interrupted", reason="SIGINT", message="stopped before training")
    except Exception as exc:
        log.exception("unexpected failure")
        reason = "TrainingFailed" if command == "train" else "EvaluationFailed"
        return RunResult(status="Failed", reason=reason, message=f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
