"""The Argo CD health checks (docs/argocd/*.lua), run in a real Lua 5.1 interpreter.

Argo CD runs health checks in gopher-lua, a Lua 5.1, and gives scripts set in argocd-cm only
the base, table and package libraries plus a reduced `os` (util/lua/lua.go in argo-cd). The
harness below mirrors that: lupa's Lua 5.1 with string, math, io, os, debug and coroutine
removed, and no string methods. `obj` is the resource as Argo CD hands it over: JSON objects
as tables, arrays as 1-based sequences, numbers as floats.

Every sample is a status computed by the operator's own pure reconcile: `plan_run` for
FineTuneJobs and EvalJobs, `serving_status` and `invalid_status` (controller/serving.py) for
AdapterDeployments, fed with pods and agent reports as the caches would hold them. So the
scripts are checked against what the operator writes, not against a reading of the docs.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa.lua51 import LuaError, LuaRuntime

from kubetune_operator.api.adapterdeployment import AdapterDeploymentStatus
from kubetune_operator.controller import desired
from kubetune_operator.controller.observe import JobView, PodView, Terminated
from kubetune_operator.controller.reconcile import Desire, Observed, plan_run
from kubetune_operator.controller.serving import (
    DeploymentView,
    ServingPod,
    invalid_status,
    resolve_adapters,
    serving_status,
)
from kubetune_operator.controller.serving_handlers import parse as parse_adapterdeployment
from kubetune_operator.manifests.common import OperatorSettings
from kubetune_operator.validation import ManifestInvalid

ROOT = Path(__file__).resolve().parents[2]
ARGOCD = ROOT / "docs/argocd"
SCRIPTS = {
    "FineTuneJob": "finetunejob.lua",
    "EvalJob": "evaljob.lua",
    "AdapterDeployment": "adapterdeployment.lua",
}
# gitops-engine's HealthStatusCode values; anything else becomes Unknown in Argo CD.
ARGO_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}

NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
UID = "0f9e8d7c-1111-2222-3333-444455556666"
DIGEST = "sha256:" + "ab" * 32
SETTINGS = OperatorSettings()
GRACE = 300.0

# Argo CD opens no string, math, io, debug or coroutine library for argocd-cm scripts; the
# string metatable goes too, so ("x"):upper() fails here as it does there.
SANDBOX = """
getmetatable("").__index = nil
string, math, io, os, debug, coroutine = nil, nil, nil, nil, nil, nil
"""


# ---------------------------------------------------------------------------- harness


def to_lua(lua: Any, value: Any) -> Any:
    """A JSON value as Argo CD's decodeValue hands it to Lua (null keys are absent)."""
    if isinstance(value, dict):
        return lua.table_from({k: to_lua(lua, v) for k, v in value.items() if v is not None})
    if isinstance(value, list):
        return lua.table_from([to_lua(lua, v) for v in value])
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        return float(value)  # unstructured int64 and float64 both become an LNumber
    raise TypeError(f"not a JSON value: {value!r}")


def health(kind: str, resource: dict[str, Any]) -> tuple[str, str]:
    """Run the kind's health check on ``resource``; returns (status, message)."""
    lua = LuaRuntime(register_eval=False, register_builtins=False, unpack_returned_tuples=False)
    lua.execute(SANDBOX)
    lua.globals()["obj"] = to_lua(lua, json.loads(json.dumps(resource)))
    result = lua.execute((ARGOCD / SCRIPTS[kind]).read_text(encoding="utf-8"))
    assert lua.eval("type")(result) == "table", "a health check returns a table"
    fields = dict(result.items())
    assert set(fields) == {"status", "message"}, fields
    status, message = fields["status"], fields["message"]
    assert status in ARGO_STATUSES
    assert isinstance(message, str)
    assert message
    return status, message


def test_the_harness_has_no_string_library_like_argo_cd() -> None:
    lua = LuaRuntime(register_eval=False, register_builtins=False)
    lua.execute(SANDBOX)
    for snippet in ('return ("x"):upper()', 'return string.format("%d", 1)', "return math.max(1)"):
        with pytest.raises(LuaError, match=r"attempt to (call|index)"):
            lua.execute(snippet)
    assert lua.execute('return table.concat({"a", tostring(2.0)}, "-") .. "!"') == "a-2!"


def test_argocd_cm_patch_carries_exactly_the_scripts() -> None:
    data = yaml.safe_load((ARGOCD / "argocd-cm-patch.yaml").read_text(encoding="utf-8"))["data"]
    for kind, name in SCRIPTS.items():
        key = f"resource.customizations.health.kubetune.io_{kind}"
        assert data[key] == (ARGOCD / name).read_text(encoding="utf-8"), (
            f"{key} differs from docs/argocd/{name}: copy the script into the patch"
        )
    ignored = yaml.safe_load(
        data["resource.customizations.ignoreResourceUpdates.kubetune.io_FineTuneJob"]
    )
    assert ignored == {"jsonPointers": ["/status/progress"]}


# ---------------------------------------------------------------------------- FineTuneJob


def ftj(generation: int = 1, **spec_changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(
        (ROOT / "examples/finetunejob-lora-gsm8k.yaml").read_text()
    )
    doc["metadata"].update(uid=UID, namespace="team-a", generation=generation)
    doc["spec"].update(spec_changes)
    return doc


def ftj_plan(
    doc: dict[str, Any],
    status: dict[str, Any],
    jobs: tuple[JobView, ...] = (),
    pods: tuple[PodView, ...] = (),
    *,
    now: datetime = NOW,
) -> dict[str, Any]:
    """The status the operator writes after one reconcile (the old one when unchanged)."""
    model = desired.parse(doc)
    desire = desired.finetune_desire(doc, model, SETTINGS)  # type: ignore[arg-type]
    plan = plan_run(
        "FineTuneJob",
        generation=doc["metadata"]["generation"],
        old_status=status,
        desire=desire,
        observed=Observed(jobs=jobs, pods=pods, pods_confirmed=True),  # listed, not cached
        now=now,
        image_pull_grace_seconds=GRACE,
    )
    return plan.status if plan.status is not None else status


def job_of(doc: dict[str, Any], **fields: Any) -> JobView:
    model = desired.parse(doc)
    desire = desired.finetune_desire(doc, model, SETTINGS)  # type: ignore[arg-type]
    return JobView(name=desire.job_name, uid="job-uid", spec_hash=desire.spec_hash, **fields)


def result(reason: str = "TrainingSucceeded", **fields: Any) -> str:
    return json.dumps({"status": "Succeeded", "reason": reason, **fields})


def with_status(doc: dict[str, Any], status: dict[str, Any] | None) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    if status is not None:
        out["status"] = status
    return out


def ftj_running(doc: dict[str, Any]) -> tuple[dict[str, Any], JobView]:
    created = ftj_plan(doc, {})
    job = job_of(doc, active=1, start_time=NOW)
    return ftj_plan(doc, created, (job,), (PodView("p", "Running"),)), job


def ftj_succeeded(doc: dict[str, Any]) -> tuple[dict[str, Any], JobView, PodView]:
    running, job = ftj_running(doc)
    done = replace(job, active=0, complete=True, succeeded=1, completion_time=NOW)
    artifact = {"uri": "s3://models/gsm8k/adapter", "digest": DIGEST}
    pod = PodView(
        "p",
        "Succeeded",
        terminated=Terminated(0, "Completed", result(message="published", artifact=artifact)),
    )
    return ftj_plan(doc, running, (done,), (pod,)), done, pod


def test_finetunejob_without_status_is_progressing() -> None:
    assert health("FineTuneJob", ftj()) == (
        "Progressing",
        "Waiting for the kubetune operator to report a status",
    )
    empty = with_status(ftj(), {"conditions": []})
    assert health("FineTuneJob", empty)[0] == "Progressing"


def test_finetunejob_pending_and_running_are_progressing() -> None:
    doc = ftj()
    pending = ftj_plan(doc, {})
    status, message = health("FineTuneJob", with_status(doc, pending))
    assert (status, message.split(":")[0]) == ("Progressing", "Pending")
    running, _ = ftj_running(doc)
    status, message = health("FineTuneJob", with_status(doc, running))
    assert (status, message.split(":")[0]) == ("Progressing", "Running")


@pytest.mark.parametrize(
    ("pod", "reason"),
    [
        pytest.param(
            PodView("p", "Pending", unschedulable="0/3 nodes are available: 3 Insufficient gpu"),
            "Unschedulable",
            id="unschedulable",
        ),
        pytest.param(
            PodView("p", "Pending", start_time=NOW, waiting_reason="ImagePullBackOff"),
            "ImagePullBackOff",
            id="image-pull-backoff",
        ),
    ],
)
def test_finetunejob_waits_are_not_failures(pod: PodView, reason: str) -> None:
    doc = ftj()
    job = job_of(doc, start_time=NOW)
    status = ftj_plan(doc, ftj_plan(doc, {}), (job,), (pod,))
    summary = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert (summary["status"], summary["reason"]) == ("Unknown", reason)
    assert health("FineTuneJob", with_status(doc, status)) == (
        "Progressing",
        f"{reason}: {summary['message']}",
    )


def test_finetunejob_suspended_by_spec_is_suspended() -> None:
    doc = ftj(suspend=True)
    status = ftj_plan(doc, {})
    assert health("FineTuneJob", with_status(doc, status)) == (
        "Suspended",
        "Suspended: the run is suspended (spec.suspend)",
    )


def test_finetunejob_waiting_for_kueue_is_suspended() -> None:
    doc = ftj()
    doc["spec"].setdefault("scheduling", {})["queueName"] = "team-a-gpus"
    status = ftj_plan(doc, {})
    assert health("FineTuneJob", with_status(doc, status)) == (
        "Suspended",
        "WaitingForAdmission: waiting for Kueue to admit the Job",
    )
    admitted = job_of(doc, active=1, start_time=NOW)
    running = ftj_plan(doc, status, (admitted,), (PodView("p", "Running"),))
    assert health("FineTuneJob", with_status(doc, running))[0] == "Progressing"


def test_finetunejob_succeeded_for_the_current_generation_is_healthy() -> None:
    doc = ftj()
    status, _, _ = ftj_succeeded(doc)
    assert health("FineTuneJob", with_status(doc, status)) == (
        "Healthy",
        "Succeeded: published; artifact s3://models/gsm8k/adapter",
    )


def test_finetunejob_status_of_an_older_generation_is_progressing() -> None:
    doc = ftj()
    status, _, _ = ftj_succeeded(doc)
    edited = ftj(generation=2, runId="second")  # a rerun the operator has not seen yet
    assert health("FineTuneJob", with_status(edited, status)) == (
        "Progressing",
        "Waiting for the kubetune operator to observe generation 2",
    )
    # Once it has: the new run is pending, whatever the previous one did.
    rerun = ftj_plan(edited, status)
    assert rerun["observedGeneration"] == 2
    assert health("FineTuneJob", with_status(edited, rerun))[0] == "Progressing"


def test_finetunejob_condition_generation_wins_over_the_status_one() -> None:
    doc = ftj(generation=3)
    status, _, _ = ftj_succeeded(ftj(generation=3))
    for cond in status["conditions"]:
        if cond["type"] == "Succeeded":
            cond["observedGeneration"] = 2
    assert health("FineTuneJob", with_status(doc, status))[0] == "Progressing"


def test_finetunejob_spec_edit_after_success_stays_healthy_and_says_so() -> None:
    doc = ftj(ttlSecondsAfterFinished=60)
    status, _, _ = ftj_succeeded(doc)
    edited = ftj(generation=2, ttlSecondsAfterFinished=60, backoffLimit=5)
    after = ftj_plan(edited, status, now=NOW + timedelta(hours=1))  # TTL removed the Job
    verdict, message = health("FineTuneJob", with_status(edited, after))
    assert verdict == "Healthy"
    assert "(RunFinished: the spec changed after the run finished" in message


def test_finetunejob_spec_edit_while_running_is_reported() -> None:
    doc = ftj()
    running, job = ftj_running(doc)
    edited = ftj(generation=2, backoffLimit=4)
    status = ftj_plan(edited, running, (job,), (PodView("p", "Running"),))
    verdict, message = health("FineTuneJob", with_status(edited, status))
    assert verdict == "Progressing"
    assert message.startswith("Running")
    assert "(RunInProgress: " in message


@pytest.mark.parametrize(
    ("job_fields", "pods", "reason"),
    [
        pytest.param(
            {"failed_reason": "BackoffLimitExceeded", "failed": 3},
            (PodView("p", "Failed", terminated=Terminated(137, "OOMKilled")),),
            "OOMKilled",
            id="oom-killed",
        ),
        pytest.param({"failed_reason": "DeadlineExceeded"}, (), "DeadlineExceeded", id="deadline"),
        pytest.param(
            {"complete": True, "succeeded": 1},
            (PodView("p", "Succeeded", terminated=Terminated(0, "Completed", "not json")),),
            "ResultMissing",
            id="no-result",
        ),
    ],
)
def test_finetunejob_failed_is_degraded_with_reason_and_message(
    job_fields: dict[str, Any], pods: tuple[PodView, ...], reason: str
) -> None:
    doc = ftj()
    running, job = ftj_running(doc)
    status = ftj_plan(doc, running, (replace(job, active=0, **job_fields),), pods)
    summary = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert (summary["status"], summary["reason"]) == ("False", reason)
    assert health("FineTuneJob", with_status(doc, status)) == (
        "Degraded",
        f"{reason}: {summary['message']}",
    )


def test_finetunejob_failed_after_a_refused_edit_is_degraded_and_says_so() -> None:
    doc = ftj()
    running, job = ftj_running(doc)
    edited = ftj(generation=2, backoffLimit=4)
    refused = ftj_plan(edited, running, (job,), (PodView("p", "Running"),))
    failed = replace(job, active=0, failed_reason="DeadlineExceeded")
    status = ftj_plan(edited, refused, (failed,))
    verdict, message = health("FineTuneJob", with_status(edited, status))
    assert verdict == "Degraded"
    assert message.startswith("DeadlineExceeded: ")
    assert "(RunInProgress: " in message


def test_finetunejob_invalid_spec_is_degraded() -> None:
    doc = ftj()
    doc["spec"]["method"] = "sparse"
    status = ftj_plan(doc, {})
    verdict, message = health("FineTuneJob", with_status(doc, status))
    assert verdict == "Degraded"
    assert message.startswith("InvalidSpec: ")
    assert "spec.method" in message


# ---------------------------------------------------------------------------- EvalJob


def evaljob(generation: int = 1) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "examples/evaljob-gates.yaml").read_text())
    doc["metadata"].update(uid=UID, namespace="team-a", generation=generation)
    return doc


def eval_plan(
    doc: dict[str, Any],
    status: dict[str, Any],
    source: dict[str, Any] | None,
    jobs: tuple[JobView, ...] = (),
    pods: tuple[PodView, ...] = (),
) -> tuple[dict[str, Any], Desire]:
    """(status after one reconcile, what the spec asks for); ``source`` is the FineTuneJob."""
    model = desired.parse(doc)
    desire = desired.eval_desire(
        doc,
        model,  # type: ignore[arg-type]
        SETTINGS,
        lambda _namespace, _name: source,
    )
    plan = plan_run(
        "EvalJob",
        generation=doc["metadata"]["generation"],
        old_status=status,
        desire=desire,
        observed=Observed(jobs=jobs, pods=pods, pods_confirmed=True),  # listed, not cached
        now=NOW,
        image_pull_grace_seconds=GRACE,
    )
    return (plan.status if plan.status is not None else status), desire


def succeeded_source() -> dict[str, Any]:
    doc = ftj()
    status, _, _ = ftj_succeeded(doc)
    return with_status(doc, status)


def evaluated(gates: list[dict[str, Any]], passed: bool) -> dict[str, Any]:
    """An EvalJob's status after its pod reported these gates."""
    doc, source = evaljob(), succeeded_source()
    pending, desire = eval_plan(doc, {}, source)
    job = JobView(
        name=desire.job_name,
        uid="j",
        spec_hash=desire.spec_hash,
        complete=True,
        succeeded=1,
        start_time=NOW,
    )
    message = result(
        "EvaluationSucceeded",
        evaluation={"gates": gates, "passed": passed, "resultsUri": "s3://eval/r"},
    )
    pod = PodView("p", "Succeeded", terminated=Terminated(0, "Completed", message))
    status, _ = eval_plan(doc, pending, source, (job,), (pod,))
    return status


GATE_OK = {
    "suite": "gsm8k-accuracy",
    "metric": "exactMatch",
    "passed": True,
    "message": "0.41 >= 0.35",
}
GATE_BAD = {
    "suite": "general",
    "metric": "hellaswag/acc_norm",
    "passed": False,
    "message": "-0.03 < -0.01",
}


def test_evaljob_gates_passed_is_healthy() -> None:
    status = evaluated([GATE_OK, {**GATE_OK, "suite": "gsm8k-perplexity"}], passed=True)
    assert health("EvalJob", with_status(evaljob(), status)) == (
        "Healthy",
        "Evaluation succeeded; 2/2 gates passed",
    )


def test_evaljob_without_gates_is_healthy() -> None:
    status = evaluated([], passed=True)
    assert health("EvalJob", with_status(evaljob(), status)) == (
        "Healthy",
        "Evaluation succeeded (no gates)",
    )


def test_evaljob_failed_gate_is_degraded_and_names_the_gate() -> None:
    status = evaluated([GATE_OK, GATE_BAD], passed=False)
    passed = next(c for c in status["conditions"] if c["type"] == "Passed")
    assert (passed["status"], passed["reason"]) == ("False", "GatesFailed")
    assert health("EvalJob", with_status(evaljob(), status)) == (
        "Degraded",
        "Evaluation succeeded but gates failed, so the adapter is not promoted: "
        "general/hellaswag/acc_norm: -0.03 < -0.01",
    )
    # Without the per-gate list, the Passed condition still decides and explains.
    status.pop("gates")
    assert health("EvalJob", with_status(evaljob(), status)) == (
        "Degraded",
        "Evaluation succeeded but gates failed, so the adapter is not promoted: "
        "GatesFailed: at least one gate failed",
    )


def test_evaljob_waiting_for_its_finetunejob_is_progressing() -> None:
    doc = evaljob()
    missing, _ = eval_plan(doc, {}, None)
    verdict, message = health("EvalJob", with_status(doc, missing))
    assert (verdict, message.split(":")[0]) == ("Progressing", "FineTuneJobNotFound")
    running_doc = ftj()
    training, _ = ftj_running(running_doc)
    waiting, _ = eval_plan(doc, {}, with_status(running_doc, training))
    verdict, message = health("EvalJob", with_status(doc, waiting))
    assert (verdict, message.split(":")[0]) == ("Progressing", "WaitingForFineTuneJob")


def test_evaljob_of_a_failed_finetunejob_is_degraded() -> None:
    doc, source_doc = evaljob(), ftj()
    running, job = ftj_running(source_doc)
    failed = ftj_plan(source_doc, running, (replace(job, failed_reason="DeadlineExceeded"),))
    status, _ = eval_plan(doc, {}, with_status(source_doc, failed))
    verdict, message = health("EvalJob", with_status(doc, status))
    assert verdict == "Degraded"
    assert message.startswith("FineTuneJobFailed: ")


def test_evaljob_pending_then_suspended() -> None:
    doc, source = evaljob(), succeeded_source()
    pending, _ = eval_plan(doc, {}, source)
    assert health("EvalJob", with_status(doc, pending))[0] == "Progressing"
    doc["spec"]["suspend"] = True
    suspended, _ = eval_plan(doc, {}, source)
    assert health("EvalJob", with_status(doc, suspended))[0] == "Suspended"


def test_evaljob_status_of_an_older_generation_is_progressing() -> None:
    status = evaluated([GATE_BAD], passed=False)
    assert health("EvalJob", with_status(evaljob(generation=2), status)) == (
        "Progressing",
        "Waiting for the kubetune operator to observe generation 2",
    )


# ---------------------------------------------------------------------------- AdapterDeployment

CONFIG = "sha256:" + "c" * 64  # the rendered config.json's digest, as the agents report it
ROLLED = DeploymentView(
    generation=1, observed_generation=1, replicas=2, updated_replicas=2, ready_replicas=2
)
# Every reason the operator writes (controller/serving.py); the samples below cover them all.
AD_REASONS = {
    "Ready": {
        "AllPinnedAdaptersLoaded",
        "ScaledToZero",
        "NoReadyReplicas",
        "PinnedAdaptersBlocked",
        "PinnedAdaptersNotLoaded",
        "InvalidSpec",
    },
    "Progressing": {"RollingOut", "WaitingForPods", "LoadingAdapters", "Complete", "InvalidSpec"},
    "Degraded": {
        "AdaptersFailed",
        "RolloutStuck",
        "PodsFailing",
        "AgentUnreachable",
        "AsExpected",
        "InvalidSpec",
    },
}


def adapterdeployment(generation: int = 1, **spec_changes: Any) -> dict[str, Any]:
    """The three-adapter example: support-en (its FineTuneJob's artifact), support-de (by
    digest) and sql-experimental (by digest, unpinned); promotion.requirePassedEval."""
    path = ROOT / "examples/adapterdeployment-three-adapters.yaml"
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    doc["metadata"].update(uid=UID, generation=generation)
    doc["spec"].update(spec_changes)
    return doc


def digests(doc: dict[str, Any]) -> dict[str, str]:
    """Adapter name -> the digest served: support-en's is its FineTuneJob's (``DIGEST``)."""
    return {a["name"]: a["source"].get("digest", DIGEST) for a in doc["spec"]["adapters"]}


def evaljob_for(digest: str, passed: bool, name: str = "eval") -> dict[str, Any]:
    """An EvalJob as the operator left it (``evaluated``), re-targeted at ``digest``."""
    doc = evaljob()
    doc["metadata"]["name"] = f"{name}-{digest[7:11]}"
    status = evaluated([GATE_OK] if passed else [GATE_BAD], passed=passed)
    return with_status(doc, {**status, "adapterDigest": digest})


def all_passed(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [evaljob_for(d, passed=True) for d in digests(doc).values()]


def agent(doc: dict[str, Any], phases: dict[str, str], errors: dict[str, str]) -> dict[str, Any]:
    """An agent's ``/status``: every adapter Loaded unless ``phases`` says otherwise."""
    return {
        "engineReady": True,
        "configDigest": CONFIG,
        "adapters": [
            {
                "name": name,
                "digest": digest,
                "phase": phases.get(name, "Loaded"),
                **({"lastError": errors[name]} if name in errors else {}),
            }
            for name, digest in digests(doc).items()
        ],
    }


def serving_pods(
    doc: dict[str, Any],
    count: int = 2,
    *,
    phases: dict[str, str] | None = None,
    errors: dict[str, str] | None = None,
    **pod: Any,
) -> list[ServingPod]:
    """``count`` ready pods of the current template whose agents report ``phases``."""
    fields: dict[str, Any] = {
        "ready": True,
        "current": True,
        "agent": agent(doc, phases or {}, errors or {}),
        **pod,
    }
    return [ServingPod(name=f"{doc['metadata']['name']}-{i}", **fields) for i in range(count)]


def ad_reconcile(
    doc: dict[str, Any],
    pods: list[ServingPod],
    deployment: DeploymentView | None = ROLLED,
    *,
    evaljobs: list[dict[str, Any]] | None = None,
    old: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The status the operator writes after one reconcile (``serving_status``)."""
    model = parse_adapterdeployment(doc)
    assert not isinstance(model, ManifestInvalid), model
    resolved = resolve_adapters(
        model,
        lambda _namespace, _name: succeeded_source(),  # support-en's FineTuneJob: DIGEST
        all_passed(doc) if evaljobs is None else evaljobs,
        old,
    )
    result = serving_status(
        model,
        resolved,
        pods,
        deployment,
        config_digest=CONFIG,
        old_status=old,
        generation=doc["metadata"]["generation"],
        now=NOW,
    )
    AdapterDeploymentStatus.model_validate(result.status)
    return result.status


def ad_invalid(doc: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
    """The status the operator writes for a spec its models reject (``invalid_status``)."""
    error = parse_adapterdeployment(doc)
    assert isinstance(error, ManifestInvalid)
    status = invalid_status(str(error), old, doc["metadata"]["generation"], NOW)
    AdapterDeploymentStatus.model_validate(status)
    return status


def reasons(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def ad_healthy() -> dict[str, Any]:
    doc = adapterdeployment()
    return ad_reconcile(doc, serving_pods(doc))


def ad_samples() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Named (resource, operator-written status) pairs; ``test_adapterdeployment`` judges them."""
    doc = adapterdeployment()
    name = doc["metadata"]["name"]
    rolling_out = DeploymentView(
        generation=2, observed_generation=2, replicas=3, updated_replicas=1, ready_replicas=2
    )
    stuck = DeploymentView(
        generation=1, observed_generation=1, replicas=2, updated_replicas=2, deadline_exceeded=True
    )
    invalid = adapterdeployment(generation=2)
    invalid["spec"]["engine"]["type"] = "tgi"
    scaled = adapterdeployment(replicas=0)
    return {
        "ready": (doc, ad_healthy()),
        "pinned-failed": (
            doc,
            ad_reconcile(
                doc,
                serving_pods(
                    doc,
                    phases={"support-de": "Failed"},
                    errors={"support-de": "manifest digest mismatch"},
                ),
            ),
        ),
        "unpinned-failed-while-ready": (
            doc,
            ad_reconcile(
                doc,
                serving_pods(
                    doc,
                    phases={"sql-experimental": "Failed"},
                    errors={"sql-experimental": "rank 128 exceeds --max-lora-rank 64"},
                ),
            ),
        ),
        "pinned-blocked": (
            doc,
            ad_reconcile(
                doc,
                serving_pods(doc),
                evaljobs=[
                    evaljob_for(DIGEST, passed=False),
                    *[evaljob_for(d, passed=True) for d in digests(doc).values() if d != DIGEST],
                ],
            ),
        ),
        "pinned-loading": (
            doc,
            ad_reconcile(doc, serving_pods(doc, phases={"support-de": "Downloading"})),
        ),
        "crash-loop": (
            doc,
            ad_reconcile(
                doc,
                serving_pods(doc, ready=False, agent=None, waiting=("CrashLoopBackOff",)),
                DeploymentView(generation=1, observed_generation=1, replicas=2, updated_replicas=2),
            ),
        ),
        "created": (doc, ad_reconcile(doc, [], None)),
        "starting": (
            doc,
            ad_reconcile(
                doc,
                serving_pods(doc, ready=False),
                DeploymentView(generation=1, observed_generation=1, replicas=2, updated_replicas=2),
            ),
        ),
        "rolling-out": (
            doc,
            ad_reconcile(
                doc,
                [
                    *serving_pods(doc, current=False),
                    ServingPod(f"{name}-new", ready=False, current=True),
                ],
                rolling_out,
            ),
        ),
        "rollout-stuck": (doc, ad_reconcile(doc, [], stuck)),
        "agent-unreachable": (
            doc,
            ad_reconcile(doc, serving_pods(doc, agent=None, agent_error="timed out")),
        ),
        "scaled-to-zero": (
            scaled,
            ad_reconcile(
                scaled, [], DeploymentView(generation=2, observed_generation=2, replicas=0)
            ),
        ),
        "invalid-spec": (invalid, ad_invalid(invalid, ad_healthy())),
        "lagging-generation": (adapterdeployment(generation=2), ad_healthy()),
    }


AD_EXPECTED: dict[str, tuple[str, str]] = {
    "ready": ("Healthy", "AllPinnedAdaptersLoaded: 2 pinned adapter(s) loaded on 2/2 ready pod(s)"),
    "pinned-failed": (
        "Degraded",
        "AdaptersFailed: support-de: llama31-8b-support-0: manifest digest mismatch",
    ),
    # Degraded=True although Ready=True: an unpinned adapter is not served, and only a human
    # can fix that (its digest, the capacity). Argo CD shows it; the message says the pinned
    # adapters still serve.
    "unpinned-failed-while-ready": (
        "Degraded",
        "AdaptersFailed: sql-experimental: llama31-8b-support-0: rank 128 exceeds "
        "--max-lora-rank 64 (still Ready: AllPinnedAdaptersLoaded: 2 pinned adapter(s) loaded "
        "on 2/2 ready pod(s))",
    ),
    "pinned-blocked": (
        "Progressing",
        "PinnedAdaptersBlocked: support-en: sha256:abababababab awaits a passed EvalJob "
        "(spec.promotion.requirePassedEval): EvalJob eval-abab did not pass (GatesFailed)",
    ),
    "pinned-loading": (
        "Progressing",
        "PinnedAdaptersNotLoaded: pinned adapters not loaded on every ready pod: support-de "
        "(Downloading); LoadingAdapters: loading support-de",
    ),
    "crash-loop": (
        "Degraded",
        "PodsFailing: llama31-8b-support-0 (CrashLoopBackOff), "
        "llama31-8b-support-1 (CrashLoopBackOff)",
    ),
    "created": (
        "Progressing",
        "NoReadyReplicas: 0/2 serving pods are ready; "
        "RollingOut: 0/2 pods run the current engine settings",
    ),
    "starting": (
        "Progressing",
        "NoReadyReplicas: 0/2 serving pods are ready; WaitingForPods: 0/2 serving pods are ready",
    ),
    "rolling-out": (
        "Progressing",
        "RollingOut: 1/2 pods run the current engine settings (still Ready: "
        "AllPinnedAdaptersLoaded: 2 pinned adapter(s) loaded on 2/2 ready pod(s))",
    ),
    "rollout-stuck": (
        "Degraded",
        "RolloutStuck: the serving Deployment exceeded its progress deadline",
    ),
    "agent-unreachable": (
        "Degraded",
        "AgentUnreachable: agent status: llama31-8b-support-0 (timed out), "
        "llama31-8b-support-1 (timed out)",
    ),
    "scaled-to-zero": ("Suspended", "ScaledToZero: spec.replicas is 0: nothing serves"),
    "invalid-spec": (
        "Degraded",
        "InvalidSpec: spec.engine: Input tag 'tgi' found using 'type' does not match any of "
        "the expected tags: 'vllm', 'lorax', 'builtin'",
    ),
    "lagging-generation": (
        "Progressing",
        "Waiting for the kubetune operator to observe generation 2",
    ),
}


def test_adapterdeployment_without_status_is_progressing() -> None:
    assert health("AdapterDeployment", adapterdeployment()) == (
        "Progressing",
        "Waiting for the kubetune operator to report a status",
    )
    empty = with_status(adapterdeployment(), {"conditions": []})
    assert health("AdapterDeployment", empty)[0] == "Progressing"


@pytest.mark.parametrize("sample", list(AD_EXPECTED))
def test_adapterdeployment(sample: str) -> None:
    doc, status = ad_samples()[sample]
    assert health("AdapterDeployment", with_status(doc, status)) == AD_EXPECTED[sample]


def test_adapterdeployment_samples_are_the_operators_and_cover_every_reason() -> None:
    samples = ad_samples()
    assert set(samples) == set(AD_EXPECTED)
    seen: dict[str, set[str]] = {kind: set() for kind in AD_REASONS}
    for doc, status in samples.values():
        for kind, (_, reason) in reasons(status).items():
            seen[kind].add(reason)
        if status["observedGeneration"] == doc["metadata"]["generation"]:
            assert all(
                c["observedGeneration"] == doc["metadata"]["generation"]
                for c in status["conditions"]
            )
    assert seen == AD_REASONS
    # The cases the health check tells apart, as the operator states them.
    assert reasons(samples["unpinned-failed-while-ready"][1]) == {
        "Ready": ("True", "AllPinnedAdaptersLoaded"),
        "Progressing": ("False", "Complete"),
        "Degraded": ("True", "AdaptersFailed"),
    }
    assert reasons(samples["crash-loop"][1])["Ready"] == ("False", "NoReadyReplicas")
    assert reasons(samples["pinned-blocked"][1])["Degraded"] == ("False", "AsExpected")
    assert reasons(samples["rolling-out"][1])["Ready"] == ("True", "AllPinnedAdaptersLoaded")


def test_adapterdeployment_degraded_status_of_an_older_generation_is_progressing() -> None:
    doc, status = ad_samples()["pinned-failed"]
    edited = adapterdeployment(generation=2)
    assert health("AdapterDeployment", with_status(edited, status)) == (
        "Progressing",
        "Waiting for the kubetune operator to observe generation 2",
    )
    # The condition's observedGeneration wins over the status one.
    lagging = copy.deepcopy(status)
    lagging["observedGeneration"] = 2
    assert health("AdapterDeployment", with_status(edited, lagging))[0] == "Progressing"
    assert health("AdapterDeployment", with_status(doc, status))[0] == "Degraded"
