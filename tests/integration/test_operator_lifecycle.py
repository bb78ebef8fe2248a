"""The real operator (kopf) against the API emulator, end to end and across restarts.

* end to end: a FineTuneJob applied to the emulator -> the operator creates the Job -> the
  kubelet harness runs the pod's real command (the runtime training the tiny model on GSM8K
  rows) -> status ``Succeeded=True`` with the artifact digest, progress reported live; then an
  EvalJob referencing it is resolved to that artifact and evaluated for real;
* restarts: stopping and starting the operator at any point of a job's life never creates a
  second Job, and the status carries on;
* a resource deleted while the operator is down, a stalled watch, a new ``runId``.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune_runtime.storage.artifacts import verify_local
from tests.integration.operator_support import (
    EVJ,
    FTJ,
    JOBS,
    OperatorThread,
    condition,
    jobs_of,
    operator,
    settings_for,
    wait_condition,
    wait_for,
)
from tests.integration.runtime_support import GSM8K_TRAIN
from tests.integration.test_local_run import finetune_manifest, stage_inputs
from tests.support.kube_api import KubeApi
from tests.support.kubelet import Fail, Hang, Kubelet, RunCommand, Succeed
from tests.support.manifests import small_evaljob

pytestmark = pytest.mark.integration

NS = "default"
DIGEST = "sha256:" + "e3" * 32


def result(**fields: Any) -> str:
    """A runtime RunResult as the termination message."""
    return json.dumps(
        {
            "status": "Succeeded",
            "reason": "TrainingSucceeded",
            "message": "published",
            "artifact": {"uri": "s3://models/x/adapter", "digest": DIGEST, "sizeBytes": 10},
            **fields,
        }
    )


def small_job(name: str, **spec: Any) -> dict[str, Any]:
    doc = finetune_manifest(name, max_steps=3, **spec)
    doc["metadata"]["namespace"] = NS
    return doc


def job_posts(api: KubeApi) -> int:
    """Jobs created over HTTP (by the operator) since the last reset."""
    return api.request_counts()[("POST", "batch/v1/jobs", None)]


@pytest.fixture
def api() -> Iterator[KubeApi]:
    with KubeApi() as server:
        yield server


# --------------------------------------------------------------------------- end to end


@pytest.mark.skipif(not GSM8K_TRAIN.is_file(), reason="../shared/data is missing")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_end_to_end_real_training_then_evaluation(
    api: KubeApi, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Manifest -> operator -> Job -> the real runtime on a tiny model -> Succeeded + digest."""
    stage_inputs(tmp_path, tiny_model_dir)
    ftj = small_job("e2e-lora", training={"maxSteps": 4, "learningRate": "1e-3",
                                          "perDeviceTrainBatchSize": 2, "loggingSteps": 1,
                                          "seed": 7})  # fmt: skip
    kubelet = Kubelet(api, RunCommand(tmp_path))
    with operator(api, progress_min_interval_seconds=0.0), kubelet:
        api.create(FTJ, ftj)
        done = wait_condition(api, FTJ, NS, "e2e-lora", "Succeeded", "True", timeout=240)
        status = done["status"]
        artifact = status["artifact"]
        assert artifact["uri"] == "s3://models/e2e-lora/adapter"
        local = tmp_path / "s3" / "models" / "e2e-lora" / "adapter"
        assert verify_local(local).digest == artifact["digest"]  # status names the published bytes
        assert status["metrics"]["trainLoss"] > 0
        assert status["progress"]["step"] == 4  # live progress came through the endpoint
        assert status["progress"]["totalSteps"] == 4
        assert condition(done, "Running")["status"] == "False"
        assert status["startTime"] <= status["completionTime"]
        assert len(jobs_of(api, NS, "e2e-lora")) == 1

        evaljob = {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "EvalJob",
            "metadata": {"name": "e2e-eval", "namespace": NS},
            "spec": {
                "target": {"fineTuneJobRef": {"name": "e2e-lora"}},
                "compareToBase": True,
                "suites": [
                    {
                        "name": "gsm8k-ppl",
                        "type": "perplexity",
                        "dataset": {
                            "uri": "s3://datasets/gsm8k/test.jsonl",
                            "format": "promptCompletion",
                            "columns": {"prompt": "question", "completion": "answer"},
                        },
                        "maxSamples": 4,
                    }
                ],
                "output": {"uri": "s3://models/e2e-lora/eval"},
            },
        }
        api.create(EVJ, evaljob)
        evaluated = wait_condition(api, EVJ, NS, "e2e-eval", "Succeeded", "True", timeout=240)
        est = evaluated["status"]
        assert est["adapterDigest"] == artifact["digest"]  # resolved from the FineTuneJob
        assert est["adapterUri"] == artifact["uri"]
        metrics = {(m["suite"], m["metric"]) for m in est["summary"]}
        assert ("gsm8k-ppl", "perplexity") in metrics
        assert condition(evaluated, "Passed")["status"] == "True"  # no gates: passes
        assert kubelet.errors == []


# --------------------------------------------------------------------------- restarts


def test_operator_restarts_at_every_stage_never_create_a_second_job(api: KubeApi) -> None:
    """Stop and start the operator before, during and after the run: one Job, ever."""
    gate = threading.Event()

    def behaviour(job: dict[str, Any], pod: dict[str, Any], attempt: int) -> Any:
        return Succeed(result(), after=0.5) if gate.is_set() else Hang()

    settings = settings_for(api)
    with Kubelet(api, behaviour) as kubelet:
        # 1. created while the operator is down
        api.create(FTJ, small_job("restart"))
        op = OperatorThread(settings).start()
        wait_for(lambda: jobs_of(api, NS, "restart"), 20, "the Job")
        # 2. right after the Job was created, before its pods run
        op.stop()
        op = OperatorThread(settings).start()
        wait_condition(api, FTJ, NS, "restart", "Running", "True", timeout=20)
        # 3. while running, several times in a row
        for _ in range(3):
            op.stop()
            op = OperatorThread(settings).start()
            time.sleep(0.3)
        gate.set()
        # the running pod hangs; delete it so the Job controller retries with a succeeding pod
        for pod in kubelet.pods(NS, jobs_of(api, NS, "restart")[0]["metadata"]["name"]):
            api.delete("v1/pods", NS, pod["metadata"]["name"])
        op.stop()  # 4. down while the run finishes
        wait_for(
            lambda: any(
                c["type"] == "Complete" and c["status"] == "True"
                for c in (jobs_of(api, NS, "restart")[0].get("status") or {}).get("conditions", [])
            ),
            20,
            "the Job to complete",
        )
        op = OperatorThread(settings).start()
        done = wait_condition(api, FTJ, NS, "restart", "Succeeded", "True", timeout=20)
        assert done["status"]["artifact"]["digest"] == DIGEST
        # 5. after the run
        op.stop()
        op = OperatorThread(settings).start()
        time.sleep(2.5)  # two resync periods
        op.stop()
    assert job_posts(api) == 1
    assert len(jobs_of(api, NS, "restart")) == 1


def post_progress(op: OperatorThread, name: str, token: str) -> int:
    """POST one progress report for ``NS/name``; the HTTP status."""
    base = op.settings.children.progress_base_url
    request = urllib.request.Request(  # noqa: S310 - the local operator
        f"{base}/{NS}/{name}",
        data=json.dumps({"step": 1, "totalSteps": 3, "percent": 33}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


def job_token(api: KubeApi, name: str) -> str:
    """The token the job's pod mounts (its ``<name>-progress`` Secret)."""
    secret = api.get("v1/secrets", NS, f"{name}-progress")
    assert secret is not None
    if "token" in (secret.get("data") or {}):
        return base64.b64decode(secret["data"]["token"]).decode()
    return str(secret["stringData"]["token"])


def wait_cached(op: OperatorThread, name: str) -> None:
    """Until the restarted operator's cache holds the FineTuneJob (the endpoint reads it)."""
    wait_for(
        lambda: (caches := op.controller.caches) and caches.owner("FineTuneJob", NS, name),
        20,
        f"{name} in the operator's cache",
    )


def test_progress_tokens_survive_a_restart_with_the_key_secret(api: KubeApi) -> None:
    """With its namespace set, the operator keeps its key in a Secret: old tokens still work."""
    settings = settings_for(api, operator_namespace="kubetune-system")
    with Kubelet(api, Hang()):
        with OperatorThread(settings) as op:
            api.create(FTJ, small_job("steady"))
            wait_condition(api, FTJ, NS, "steady", "Running", "True", timeout=20)
            token = job_token(api, "steady")
            assert post_progress(op, "steady", token) == 204
            key = api.get("v1/secrets", "kubetune-system", "kubetune-progress-key")
            assert key is not None
        with OperatorThread(settings) as op:
            wait_cached(op, "steady")
            assert post_progress(op, "steady", token) == 204  # the same key, read back
            assert post_progress(op, "steady", token[::-1]) == 401
        assert api.get("v1/secrets", "kubetune-system", "kubetune-progress-key") == key
        assert job_token(api, "steady") == token


def test_without_the_key_secret_a_restart_invalidates_progress_tokens(api: KubeApi) -> None:
    """The development mode (no operator namespace): an in-memory key, lost on restart."""
    with Kubelet(api, Hang()):
        with operator(api) as op:
            api.create(FTJ, small_job("forgetful"))
            wait_condition(api, FTJ, NS, "forgetful", "Running", "True", timeout=20)
            token = job_token(api, "forgetful")
            assert post_progress(op, "forgetful", token) == 204
        with operator(api) as op:
            wait_cached(op, "forgetful")
            assert post_progress(op, "forgetful", token) == 401
            # The run itself carries on.
            wait_condition(api, FTJ, NS, "forgetful", "Running", "True", timeout=20)


def test_restart_between_job_creation_and_status_write_adopts_the_job(api: KubeApi) -> None:
    """The Job exists but status does not record it (crash in between): adopted, not doubled."""
    with operator(api), Kubelet(api, Hang()):
        api.create(FTJ, small_job("adopt"))
        wait_condition(api, FTJ, NS, "adopt", "Running", "True", timeout=20)
    # Simulate the crash window: the status never recorded the Job.
    api.patch(FTJ, NS, "adopt", {"status": None}, subresource="status")
    api.reset_counts()
    with operator(api), Kubelet(api, Hang()):
        obj = wait_condition(api, FTJ, NS, "adopt", "Running", "True", timeout=20)
        assert obj["status"]["jobName"] == jobs_of(api, NS, "adopt")[0]["metadata"]["name"]
    assert job_posts(api) == 0
    assert len(jobs_of(api, NS, "adopt")) == 1


def test_a_job_deleted_behind_the_operators_back_is_not_silently_rerun(api: KubeApi) -> None:
    with operator(api), Kubelet(api, Hang()):
        api.create(FTJ, small_job("vanish"))
        wait_condition(api, FTJ, NS, "vanish", "Running", "True", timeout=20)
        api.delete(JOBS, NS, jobs_of(api, NS, "vanish")[0]["metadata"]["name"])
        failed = wait_condition(api, FTJ, NS, "vanish", "Succeeded", "False", "JobMissing")
        assert "spec.runId" in condition(failed, "Succeeded")["message"]
        time.sleep(2.5)
        assert jobs_of(api, NS, "vanish") == []


def test_resource_deleted_while_the_operator_is_down(api: KubeApi) -> None:
    """No finalizer blocks the deletion; children go by owner references; nothing returns."""
    with operator(api), Kubelet(api, Hang()):
        api.create(FTJ, small_job("gone"))
        running = wait_condition(api, FTJ, NS, "gone", "Running", "True", timeout=20)
        assert not running["metadata"].get("finalizers")
    api.delete(FTJ, NS, "gone")  # operator down: the API server deletes it at once
    assert api.get(FTJ, NS, "gone") is None
    assert jobs_of(api, NS, "gone") == []
    assert api.list("v1/configmaps", NS, "kubetune.io/finetunejob=gone") == []
    assert api.list("v1/secrets", NS, "kubetune.io/finetunejob=gone") == []
    api.reset_counts()
    with operator(api) as op:
        time.sleep(2.5)
        assert op.controller.statuses == {}
    assert api.writes == 0


def test_a_stalled_watch_is_renewed(api: KubeApi) -> None:
    """Watches that stop delivering without closing are abandoned and restarted."""
    with operator(api, watch_inactivity_timeout_seconds=1.5), Kubelet(api, Succeed(result())):
        api.create(FTJ, small_job("before"))
        wait_condition(api, FTJ, NS, "before", "Succeeded", "True", timeout=20)
        api.stall_watches()
        api.create(FTJ, small_job("after-stall"))
        done = wait_condition(api, FTJ, NS, "after-stall", "Succeeded", "True", timeout=20)
        assert done["status"]["artifact"]["digest"] == DIGEST


def test_new_run_id_starts_a_new_run_and_nothing_else_does(api: KubeApi) -> None:
    data_invalid = json.dumps(
        {"status": "Failed", "reason": "DataInvalid", "message": "train.jsonl row 3: no answer"}
    )

    def behaviour(job: dict[str, Any], pod: dict[str, Any], attempt: int) -> Any:
        first_run = job["metadata"]["name"] == "rerun-train"
        return Fail(3, data_invalid) if first_run else Succeed(result())

    with operator(api), Kubelet(api, behaviour):
        api.create(FTJ, small_job("rerun"))
        failed = wait_condition(api, FTJ, NS, "rerun", "Succeeded", "False", "DataInvalid")
        assert "row 3" in condition(failed, "Succeeded")["message"]
        # An edit without a new runId never re-runs a finished job.
        api.patch(FTJ, NS, "rerun", {"spec": {"backoffLimit": 5}})
        edited = wait_for(
            lambda: (
                (o := api.get(FTJ, NS, "rerun"))
                and (c := condition(o, "SpecApplied"))
                and c["status"] == "False"
                and o
            ),
            20,
            "SpecApplied=False",
        )
        assert condition(edited, "Succeeded")["reason"] == "DataInvalid"
        assert [j["metadata"]["name"] for j in jobs_of(api, NS, "rerun")] == ["rerun-train"]
        # A new runId does.
        api.patch(FTJ, NS, "rerun", {"spec": {"runId": "fixed-data"}})
        done = wait_condition(api, FTJ, NS, "rerun", "Succeeded", "True", timeout=20)
        assert done["status"]["runId"] == "fixed-data"
        assert done["status"]["jobName"] == "rerun-train-fixed-data"
        wait_for(
            lambda: (
                [j["metadata"]["name"] for j in jobs_of(api, NS, "rerun")]
                == ["rerun-train-fixed-data"]
            ),
            20,
            "the old run's Job to be deleted",
        )


def test_multi_node_run_gets_an_indexed_job_and_a_headless_service(api: KubeApi) -> None:
    doc = small_job("two-nodes", distributed={"nodes": 2, "processesPerNode": 1})
    with operator(api), Kubelet(api, Succeed(result())) as kubelet:
        api.create(FTJ, doc)
        done = wait_condition(api, FTJ, NS, "two-nodes", "Succeeded", "True", timeout=20)
        job = jobs_of(api, NS, "two-nodes")[0]
        assert job["spec"]["completionMode"] == "Indexed"
        assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
        services = api.list("v1/services", NS, "kubetune.io/finetunejob=two-nodes")
        assert [s["spec"]["clusterIP"] for s in services] == ["None"]
        env = {
            e["name"]: e.get("value")
            for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        service = services[0]["metadata"]["name"]
        assert env["MASTER_ADDR"] == f"{job['metadata']['name']}-0.{service}.{NS}.svc"
        assert {r.index for r in kubelet.pods_created(job["metadata"]["name"], NS)} == {0, 1}
        assert done["status"]["artifact"]["digest"] == DIGEST


def test_evaljob_waits_for_its_finetunejob_and_starts_when_it_succeeds(api: KubeApi) -> None:
    """Not at the next resync: the FineTuneJob finishing wakes the EvalJobs that wait on it."""
    gate = threading.Event()
    evaluation = json.dumps(
        {
            "status": "Succeeded",
            "reason": "EvaluationSucceeded",
            "message": "1 of 1 gates passed",
            "evaluation": {
                "summary": [
                    {"suite": "ppl", "metric": "perplexity", "candidate": 9.5, "base": 11.0}
                ],
                "gates": [
                    {"suite": "ppl", "metric": "perplexity", "passed": False, "message": "9.5 > 9"}
                ],
                "passed": False,
                "resultsUri": "s3://models/x/eval/results.jsonl",
            },
        }
    )

    def behaviour(job: dict[str, Any], pod: dict[str, Any], attempt: int) -> Any:
        if "-evaluate" in job["metadata"]["name"]:
            return Succeed(evaluation)
        return Succeed(result(), after=0.2) if gate.is_set() else Hang()

    evaljob = small_evaljob("waits", NS, "trains", output={"uri": "s3://models/x/eval"})
    with operator(api, resync_seconds=600.0), Kubelet(api, behaviour) as kubelet:
        api.create(EVJ, evaljob)
        api.create(FTJ, small_job("trains"))
        waiting = wait_condition(
            api, EVJ, NS, "waits", "Succeeded", "Unknown", "WaitingForFineTuneJob", timeout=20
        )
        assert "trains" in condition(waiting, "Succeeded")["message"]
        wait_condition(api, FTJ, NS, "trains", "Running", "True", timeout=20)
        gate.set()
        for pod in kubelet.pods(NS, "trains-train"):
            api.delete("v1/pods", NS, pod["metadata"]["name"])
        done = wait_condition(api, EVJ, NS, "waits", "Succeeded", "True", timeout=20)
        assert done["status"]["adapterDigest"] == DIGEST
        assert done["status"]["passed"] is False
        assert condition(done, "Passed")["reason"] == "GatesFailed"
