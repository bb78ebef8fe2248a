"""Operator at scale: FineTuneJobs created at a steady rate against the API emulator.

Usage: ``python bench/operator_scale.py [--jobs N] [--rate R] [--steady-seconds S]``
(defaults: 1,000 jobs at 20 per second, 60 s of steady state).

What runs: ``tests/support/kube_api.KubeApi`` (the kmock-based API emulator) in this process,
and the operator as its own process, exactly as deployed (``kubetune operator --server URL``,
default settings: resync every 30 s, standalone kopf). FineTuneJobs are created in-process
(not counted as operator requests) at ``--rate`` per second; a watch on batch Jobs records when
each child Job appears.

Measured, for each variant:

* create -> child Job latency (p50, p99, max), seconds, from just before the FineTuneJob is
  stored to the Job's ADDED event on a watch;
* API requests per job made by the operator while the jobs were created and reconciled;
* writes per minute at steady state: after every Job exists and the status has settled, the
  operator's POST/PUT/PATCH/DELETE requests during ``--steady-seconds`` (which spans at least one
  resync of every job), scaled to a minute;
* the operator's peak RSS (``VmHWM`` of its process), MB.

Variants: ``kubetune`` (ours) and the baseline ``kopf_minimal``: a kopf operator whose create
handler POSTs one fixed batch Job per FineTuneJob with the official client and does nothing
else (no validation, no status, no resync), kopf defaults otherwise (standalone). Ratios are
ours / baseline. Targets (issue 5): p99 <= 0.5 s, zero writes at steady state, RSS <= 150 MB.

The last line printed is one JSON object with ``p99_seconds``, ``steady_state_writes_per_minute``
and ``peak_rss_mb`` (ours), the baseline's numbers and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.kube_api import KubeApi  # noqa: E402
from tests.support.manifests import small_finetunejob  # noqa: E402

FTJ = "kubetune.io/v1alpha1/finetunejobs"
JOBS = "batch/v1/jobs"

MINIMAL_OPERATOR = """
import kopf, kubernetes

@kopf.on.startup()
def configure(settings, **_):
    settings.peering.standalone = True

@kopf.on.login()
def login(**_):
    return kopf.ConnectionInfo(server={server!r}, insecure=True)

API = kubernetes.client.BatchV1Api(kubernetes.client.ApiClient(
    kubernetes.client.Configuration(host={server!r})))

@kopf.on.create("kubetune.io", "v1alpha1", "finetunejobs")
def create(name, namespace, uid, **_):
    API.create_namespaced_job(namespace, {{
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {{"name": name + "-train", "labels": {{"kubetune.io/finetunejob": name}},
                     "ownerReferences": [{{"apiVersion": "kubetune.io/v1alpha1",
                                          "kind": "FineTuneJob", "name": name, "uid": uid,
                                          "controller": True}}]}},
        "spec": {{"template": {{"spec": {{"restartPolicy": "Never", "containers": [
            {{"name": "runtime", "image": "ghcr.io/kubetune/runtime:0.1.0"}}]}}}}}},
    }})
"""


def manifest(name: str, namespace: str) -> dict[str, Any]:
    """A small valid LoRA SFT FineTuneJob (the quickstart's shape)."""
    return small_finetunejob(name, namespace)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class JobWatcher(threading.Thread):
    """Streams ``watch`` events of batch Jobs in a namespace; records each ADDED's arrival."""

    def __init__(self, url: str, namespace: str) -> None:
        super().__init__(daemon=True)
        self.url = f"{url}/apis/batch/v1/namespaces/{namespace}/jobs?watch=true&timeoutSeconds=3600"
        self.arrived: dict[str, float] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        with urllib.request.urlopen(self.url, timeout=3600) as stream:  # noqa: S310 - local
            for line in stream:
                if self.stopped.is_set():
                    return
                event = json.loads(line)
                if event.get("type") == "ADDED":
                    name = event["object"]["metadata"]["labels"].get("kubetune.io/finetunejob")
                    if name:
                        self.arrived.setdefault(name, time.monotonic())


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def operator_requests(api: KubeApi) -> int:
    return sum(api.request_counts().values())


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(what)


def run_variant(  # noqa: PLR0915 - one measured run, top to bottom
    variant: str, api: KubeApi, *, jobs: int, rate: float, steady_seconds: float
) -> dict[str, Any]:
    namespace = f"bench-{variant.replace('_', '-')}"
    api.create(
        "v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")}
    port = free_port()
    if variant == "kubetune":
        command = [
            sys.executable,
            "-m",
            "kubetune_operator.cli.main",
            "operator",
            "--server",
            api.url,
            "--http-port",
            str(port),
            "--namespace",
            namespace,
        ]
        env.update(
            KUBETUNE_LIVENESS_PORT="none",
            KUBETUNE_PROGRESS_BASE_URL=f"http://127.0.0.1:{port}/progress",
        )
    else:
        script = Path(os.environ.get("TMPDIR", "/tmp")) / f"kopf_minimal_{os.getpid()}.py"  # noqa: S108
        script.write_text(MINIMAL_OPERATOR.format(server=api.url))
        command = [
            sys.executable,
            "-m",
            "kopf",
            "run",
            "--standalone",
            "-n",
            namespace,
            str(script),
        ]
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"operator_scale_{variant}.log", "w")  # noqa: S108, SIM115
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    watcher = JobWatcher(api.url, namespace)
    watcher.start()
    try:
        # Warm up: one job through the whole path, then start counting.
        api.create(FTJ, manifest("warmup", namespace))
        wait(
            lambda: "warmup" in watcher.arrived, 60, f"{variant}: the operator never created a Job"
        )
        time.sleep(1.0)
        api.reset_counts()
        created: dict[str, float] = {}
        start = time.monotonic()
        print(f"[{variant}] creating {jobs} FineTuneJobs at {rate}/s", file=sys.stderr)
        for i in range(jobs):
            due = start + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            name = f"ftj-{i:05d}"
            created[name] = time.monotonic()
            api.create(FTJ, manifest(name, namespace))
        wait(lambda: all(n in watcher.arrived for n in created), 300, f"{variant}: missing Jobs")
        latencies = sorted(watcher.arrived[n] - t for n, t in created.items())
        time.sleep(5.0)  # let status writes and events of the last jobs land
        requests = operator_requests(api)
        writes_during = api.writes
        api.reset_counts()
        print(f"[{variant}] steady state for {steady_seconds:.0f} s", file=sys.stderr)
        time.sleep(steady_seconds)
        steady_writes = api.writes
        steady_requests = operator_requests(api)
        rss = peak_rss_mb(proc.pid)
        if proc.poll() is not None:
            raise RuntimeError(f"{variant}: the operator exited with {proc.returncode}")
    finally:
        watcher.stopped.set()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return {
        "p50_seconds": round(statistics.median(latencies), 4),
        "p99_seconds": round(pct(0.99), 4),
        "max_seconds": round(latencies[-1], 4),
        "api_requests_per_job": round(requests / jobs, 2),
        "api_writes_per_job": round(writes_during / jobs, 2),
        "steady_state_writes_per_minute": round(steady_writes * 60 / steady_seconds, 2),
        "steady_state_requests_per_minute": round(steady_requests * 60 / steady_seconds, 1),
        "peak_rss_mb": round(rss, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20.0, help="FineTuneJobs created per second")
    parser.add_argument("--steady-seconds", type=float, default=60.0)
    parser.add_argument("--no-baseline", action="store_true", help="skip the kopf_minimal run")
    args = parser.parse_args()
    results: dict[str, dict[str, Any]] = {}
    with KubeApi() as api:
        variants = ["kubetune"] if args.no_baseline else ["kubetune", "kopf_minimal"]
        for variant in variants:
            results[variant] = run_variant(
                variant, api, jobs=args.jobs, rate=args.rate, steady_seconds=args.steady_seconds
            )
            print(f"[{variant}] {json.dumps(results[variant])}", file=sys.stderr)
    ours = results["kubetune"]
    print(
        f"{'variant':<14}{'p50 s':>8}{'p99 s':>8}{'max s':>8}{'req/job':>9}{'writes/job':>11}"
        f"{'steady w/min':>13}{'RSS MB':>8}"
    )
    for variant, r in results.items():
        print(
            f"{variant:<14}{r['p50_seconds']:>8.3f}{r['p99_seconds']:>8.3f}{r['max_seconds']:>8.3f}"
            f"{r['api_requests_per_job']:>9.1f}{r['api_writes_per_job']:>11.1f}"
            f"{r['steady_state_writes_per_minute']:>13.1f}{r['peak_rss_mb']:>8.1f}"
        )
    summary: dict[str, Any] = {
        **ours,
        "jobs": args.jobs,
        "rate_per_second": args.rate,
        "steady_seconds": args.steady_seconds,
        "targets": {"p99_seconds": 0.5, "steady_state_writes_per_minute": 0, "peak_rss_mb": 150},
        "targets_met": ours["p99_seconds"] <= 0.5
        and ours["steady_state_writes_per_minute"] == 0
        and ours["peak_rss_mb"] <= 150,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    if "kopf_minimal" in results:
        base = results["kopf_minimal"]
        summary["baseline"] = {"name": "kopf_minimal", **base}
        summary["ratio_vs_kopf_minimal"] = {
            key: round(ours[key] / base[key], 2) if base[key] else None
            for key in ("p50_seconds", "p99_seconds", "api_requests_per_job", "peak_rss_mb")
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
