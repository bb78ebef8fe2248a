"""The operator as it is deployed: ``kubetune operator`` and ``kopf run``, as processes.

Each starts against the API emulator, reconciles a FineTuneJob into a Job, answers its
liveness probe and ``/metrics``, and exits cleanly on SIGTERM (what the kubelet sends).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.operator_support import free_port, jobs_of, wait_for
from tests.support.kube_api import KubeApi

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NS = "team-a"


def manifest(name: str) -> dict[str, object]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "baseModel": {"uri": "s3://models/tiny-base"},
            "dataset": {"train": {"uri": "s3://datasets/gsm8k/train.jsonl", "format": "messages"}},
            "method": "lora",
            "output": {"uri": f"s3://models/{name}"},
        },
    }


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - local test URL
            return response.status, response.read().decode()
    except OSError:
        return 0, ""


@pytest.fixture
def api() -> Iterator[KubeApi]:
    with KubeApi() as server:
        for namespace in (NS, "other"):
            server.create("v1/namespaces", {"metadata": {"name": namespace}})
        yield server


@pytest.mark.parametrize("entry", ["kubetune operator", "kopf run"])
def test_operator_process_reconciles_serves_probes_and_stops_on_sigterm(
    api: KubeApi, entry: str, tmp_path: Path
) -> None:
    http_port, liveness_port = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")},
        "KUBETUNE_SERVER": api.url,
        "KUBETUNE_HTTP_PORT": str(http_port),
        "KUBETUNE_LIVENESS_PORT": str(liveness_port),
        "KUBETUNE_NAMESPACES": NS,
        "KUBETUNE_PROGRESS_BASE_URL": f"http://127.0.0.1:{http_port}/progress",
        "KUBETUNE_RUNTIME_IMAGE": "registry.example/kubetune/runtime:1.2.3",
    }
    if entry == "kubetune operator":
        command = [sys.executable, "-m", "kubetune_operator.cli.main", "operator"]
    else:  # kopf's own CLI, our handlers from the entry module, configured by the environment
        command = [
            sys.executable, "-m", "kopf", "run", "--standalone", "-n", NS,
            f"--liveness=http://0.0.0.0:{liveness_port}/healthz",
            "-m", "kubetune_operator.controller.kopf_entry",
        ]  # fmt: skip
    log = (tmp_path / "operator.log").open("w")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        api.create("kubetune.io/v1alpha1/finetunejobs", manifest("cli"))
        elsewhere = {
            **manifest("elsewhere"),
            "metadata": {"name": "elsewhere", "namespace": "other"},
        }
        api.create("kubetune.io/v1alpha1/finetunejobs", elsewhere)
        jobs = wait_for(lambda: jobs_of(api, NS, "cli"), 60, "the Job")
        container = jobs[0]["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == "registry.example/kubetune/runtime:1.2.3"
        probe = f"http://127.0.0.1:{liveness_port}/healthz"
        wait_for(lambda: get(probe)[0] == 200, 30, "the liveness probe")
        # The counter moves when a reconcile ends, just after the Job appears: wait for it.
        metrics = f"http://127.0.0.1:{http_port}/metrics"
        wait_for(
            lambda: 'kubetune_reconcile_total{kind="FineTuneJob"' in get(metrics)[1],
            30,
            "the reconcile counter in /metrics",
        )
        assert jobs_of(api, "other", "elsewhere") == []  # only the watched namespace
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        log.close()
    output = (tmp_path / "operator.log").read_text()
    assert code == 0, output[-3000:]
