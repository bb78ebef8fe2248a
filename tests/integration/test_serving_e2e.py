"""AdapterDeployment end to end: the operator, the rendered pods run for real, real adapters.

The API emulator holds the objects; the real operator (kopf) reconciles; the serving kubelet
(``tests.support.serving_kubelet``) runs the pods the operator rendered as local processes:
``kubetune-runtime fetch-model`` (init), ``kubetune-runtime serve`` (the builtin engine on the
tiny model) and ``kubetune-runtime agent`` (downloading, verifying and loading the adapters
named in the mounted ConfigMap, which the kubelet refreshes in place). Each pod has its own
loopback address, so a test talks to the engine exactly as a Service would route.

The adapters are the three the runtime trains once per session (``serving_support``),
published to the embedded S3 storage with their manifests and digests.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from kubetune_operator.manifests import adapterdeployment as m
from kubetune_runtime.storage.artifacts import publish_dir, write_manifest
from kubetune_runtime.storage.backends import LocalStorage
from tests.integration.operator_support import (
    OperatorThread,
    condition,
    operator,
    wait_condition,
    wait_for,
)
from tests.integration.runtime_support import GSM8K_TRAIN
from tests.integration.serving_support import BASE, MAX_TOKENS, PROMPTS
from tests.support.kube_api import KubeApi
from tests.support.serving_kubelet import RunContainers, ServingKubelet

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not GSM8K_TRAIN.is_file(), reason="../shared/data is missing"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

Obj = dict[str, Any]
NS = "team-a"
ADS = "kubetune.io/v1alpha1/adapterdeployments"
TIMEOUT = 180.0  # model loads and adapter downloads on a loaded 2-core CI machine
BASE_URI = "s3://models/tiny-base"
BASE_NAME = "tiny-base"  # the served name of the base model: the URI's last segment


@dataclass
class Cluster:
    api: KubeApi
    op: OperatorThread
    kubelet: ServingKubelet
    digests: dict[str, str]
    reference_text: dict[tuple[str, int], str]

    def get(self, name: str = "chat") -> Obj:
        obj = self.api.get(ADS, NS, name)
        assert obj is not None
        return obj

    def adapters(self, name: str = "chat") -> dict[str, Obj]:
        return {a["name"]: a for a in (self.get(name).get("status") or {}).get("adapters") or []}

    def endpoint(self, name: str = "chat") -> str:
        ips = self.kubelet.endpoints(NS, m.selector(name))
        assert ips, "no ready serving pod"
        return f"http://{ips[0]}:{m.INFERENCE_PORT}"

    def complete(self, model: str, prompt_index: int = 0, name: str = "chat") -> httpx.Response:
        return httpx.post(
            f"{self.endpoint(name)}/v1/completions",
            json={
                "model": model,
                "prompt": PROMPTS[prompt_index],
                "max_tokens": MAX_TOKENS,
                "temperature": 0.0,
            },
            timeout=60,
        )

    def entry(self, adapter: str, *, digest: str | None = None, pinned: bool = True) -> Obj:
        return {
            "name": adapter,
            "pinned": pinned,
            "source": {
                "uri": f"s3://adapters/{adapter}",
                "digest": digest or self.digests[adapter],
            },
        }


def manifest(adapters: list[Obj], **spec: Any) -> Obj:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": "chat", "namespace": NS},
        "spec": {
            "baseModel": {"uri": BASE_URI},
            "engine": {"type": "builtin", "maxBatchDelayMilliseconds": 5},
            "adapters": adapters,
            **spec,
        },
    }


@pytest.fixture
def cluster(
    tmp_path: Path,
    tiny_model_dir: Path,
    adapters: dict[str, Path],
    reference: dict[tuple[str, int], list[int]],
) -> Iterator[Cluster]:
    from transformers import AutoTokenizer

    workdir = tmp_path / "kubelet"
    s3_root = workdir / "s3"
    shutil.copytree(tiny_model_dir, s3_root / "models" / "tiny-base")
    storage = LocalStorage(s3_root=s3_root)
    digests = {}
    for name, path in adapters.items():
        # As a FineTuneJob on s3://models/tiny-base records it (the session's adapters were
        # trained from a local folder): the agent checks the manifest's base model.
        copy = tmp_path / "published" / name
        shutil.copytree(path, copy)
        metadata = json.loads((copy / "manifest.json").read_text())["metadata"]
        write_manifest(copy, metadata={**metadata, "baseModel": BASE_URI})
        digests[name] = publish_dir(storage, copy, f"s3://adapters/{name}").digest
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = {
        key: str(tokenizer.decode(tokens, skip_special_tokens=True))
        for key, tokens in reference.items()
    }
    with (
        KubeApi() as api,
        operator(api, serving_resync_seconds=0.5, agent_timeout_seconds=2.0) as op,
        ServingKubelet(
            api,
            RunContainers(workdir, environ={"KUBETUNE_LOG_LEVEL": "INFO"}, grace=10.0),
            namespace=NS,
        ) as kubelet,
    ):
        yield Cluster(api, op, kubelet, digests, texts)
        assert kubelet.errors == []
        assert api.unexpected_errors == []
    wait_for(
        lambda: not [t for t in threading.enumerate() if t.name.startswith("kubetune-operator")],
        timeout=10,
        what="operator threads to end",
    )


def _logs(cluster: Cluster) -> str:
    out = []
    for pod in cluster.kubelet.pods(NS):
        for container in ("fetch-model", "engine", "agent"):
            path = cluster.kubelet.log_path(NS, pod["metadata"]["name"], container)
            if path is not None and path.is_file():
                out.append(f"--- {pod['metadata']['name']}/{container}\n{path.read_text()[-3000:]}")
    return "\n".join(out)


def test_adapters_serve_hot_swap_and_fail_precisely(cluster: Cluster) -> None:
    """Ready only when pinned adapters answer; add/remove without restarts; a bad adapter
    degrades naming itself while the others keep serving."""
    api = cluster.api
    api.create(
        ADS,
        manifest([cluster.entry("a"), cluster.entry("b"), cluster.entry("c", pinned=False)]),
    )
    try:
        ad = wait_condition(api, ADS, NS, "chat", "Ready", "True", timeout=TIMEOUT)
    except TimeoutError:
        pytest.fail(f"never Ready: {cluster.get().get('status')}\n{_logs(cluster)}")

    # The moment Ready is True, every pinned adapter really answers, with its own weights.
    outputs = {}
    for model in ("a", "b", BASE_NAME):
        response = cluster.complete(model)
        assert response.status_code == 200, response.text
        outputs[model] = response.json()["choices"][0]["text"]
    assert outputs["a"] == cluster.reference_text["a", 0]
    assert outputs["b"] == cluster.reference_text["b", 0]
    assert outputs[BASE_NAME] == cluster.reference_text[BASE, 0]
    assert len(set(outputs.values())) == 3, outputs
    status = ad["status"]
    assert status["readyReplicas"] == 1
    assert condition(ad, "Degraded")["status"] == "False"  # type: ignore[index]
    pinned = {n: a for n, a in cluster.adapters().items() if n in ("a", "b")}
    assert {n: (a["phase"], a["readyReplicas"]) for n, a in pinned.items()} == {
        "a": ("Loaded", 1),
        "b": ("Loaded", 1),
    }
    assert all(a["loadSeconds"] > 0 for a in pinned.values())
    wait_for(lambda: cluster.adapters()["c"]["phase"] == "Loaded", TIMEOUT, "c (unpinned) loaded")
    assert cluster.complete("c").json()["choices"][0]["text"] == cluster.reference_text["c", 0]

    [pod] = cluster.kubelet.pods(NS)
    pod_name, pod_uid = pod["metadata"]["name"], pod["metadata"]["uid"]

    # Hot add: "d" (A's weights under a new name) and "bad", pinned: C's files under A's
    # digest, so verification fails.
    spec_adapters = [
        cluster.entry("a"),
        cluster.entry("b"),
        cluster.entry("c", pinned=False),
        {"name": "d", "source": {"uri": "s3://adapters/a", "digest": cluster.digests["a"]}},
        cluster.entry("bad", digest=cluster.digests["a"]),
    ]
    spec_adapters[-1]["source"]["uri"] = "s3://adapters/c"
    api.patch(ADS, NS, "chat", {"spec": {"adapters": spec_adapters}})
    ad = wait_condition(api, ADS, NS, "chat", "Degraded", "True", "AdaptersFailed", TIMEOUT)
    message = condition(ad, "Degraded")["message"]  # type: ignore[index]
    assert message.startswith(f"bad: {pod_name}: "), message
    assert "ArtifactInvalid" in message, message
    assert cluster.adapters()["bad"]["phase"] == "Failed"
    # A pinned adapter that failed keeps Ready False and names it, but does not take the pod
    # out of the Service: the others keep serving.
    ready = condition(ad, "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("False", "PinnedAdaptersNotLoaded")
    assert "bad (Failed)" in ready["message"]
    assert cluster.kubelet.endpoints(NS, m.selector("chat"))
    wait_for(lambda: cluster.adapters()["d"]["phase"] == "Loaded", TIMEOUT, "d loaded")
    assert cluster.complete("d").json()["choices"][0]["text"] == cluster.reference_text["a", 0]
    for model in ("a", "b", "c"):  # the others keep serving
        assert (
            cluster.complete(model).json()["choices"][0]["text"] == cluster.reference_text[model, 0]
        )
    missing = cluster.complete("bad")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found" or "bad" in missing.text

    # Hot remove: b and bad leave the spec; b stops being served; the pod never restarted.
    api.patch(
        ADS,
        NS,
        "chat",
        {"spec": {"adapters": [cluster.entry("a"), cluster.entry("c", pinned=False)]}},
    )
    wait_for(lambda: cluster.complete("b").status_code == 404, TIMEOUT, "b no longer served")
    wait_condition(api, ADS, NS, "chat", "Degraded", "False", timeout=TIMEOUT)
    ad = wait_condition(api, ADS, NS, "chat", "Ready", "True", timeout=TIMEOUT)
    assert sorted(cluster.adapters()) == ["a", "c"]
    [still] = cluster.kubelet.pods(NS)
    assert (still["metadata"]["name"], still["metadata"]["uid"]) == (pod_name, pod_uid)
    for container in ("engine", "agent"):
        assert cluster.kubelet.restart_count(NS, pod_name, container) == 0
    assert [r.name for r in cluster.kubelet.records] == [pod_name]  # no pod was ever replaced
    assert json.loads(
        api.get("v1/configmaps", NS, m.config_map_name("chat"))["data"]["config.json"]  # type: ignore[index]
    )["adapters"] == [
        {"name": "a", "uri": "s3://adapters/a", "digest": cluster.digests["a"], "pinned": True},
        {"name": "c", "uri": "s3://adapters/c", "digest": cluster.digests["c"], "pinned": False},
    ]


def test_rank_limits_and_an_engine_crash(cluster: Cluster) -> None:
    """An adapter above the engine's rank is refused precisely; the agent reloads the
    ConfigMap's adapters into a restarted engine, and the status follows."""
    api = cluster.api
    # With maxLoraRank 8, C (rank 16) is refused before any load call, naming the limit.
    api.create(
        ADS,
        manifest(
            [
                cluster.entry("a"),
                cluster.entry("b", pinned=False),
                cluster.entry("c", pinned=False),
            ],
            capacity={"maxLoraRank": 8},
        ),
    )
    wait_condition(api, ADS, NS, "chat", "Ready", "True", timeout=TIMEOUT)
    wait_for(lambda: cluster.adapters()["b"]["phase"] == "Loaded", TIMEOUT, "b loaded")
    ad = wait_condition(api, ADS, NS, "chat", "Degraded", "True", "AdaptersFailed", TIMEOUT)
    error = cluster.adapters()["c"]["lastError"]
    assert "rank" in error, error
    assert "16" in error, error
    assert "8" in error, error
    assert condition(ad, "Degraded")["message"].startswith("c: ")  # type: ignore[index]
    [pod] = cluster.kubelet.pods(NS)
    name = pod["metadata"]["name"]

    cluster.kubelet.kill_container(NS, name, "engine")
    wait_condition(api, ADS, NS, "chat", "Ready", "False", timeout=TIMEOUT)
    ad = wait_condition(api, ADS, NS, "chat", "Ready", "True", timeout=TIMEOUT)
    assert cluster.kubelet.restart_count(NS, name, "engine") == 1
    assert condition(ad, "Ready")["reason"] == "AllPinnedAdaptersLoaded"  # type: ignore[index]
    assert cluster.complete("a").json()["choices"][0]["text"] == cluster.reference_text["a", 0]
    wait_for(lambda: cluster.complete("b").status_code == 200, TIMEOUT, "b reloaded")
    assert cluster.complete("b").json()["choices"][0]["text"] == cluster.reference_text["b", 0]

    # The agent itself restarting reloads nothing it does not need and keeps serving.
    cluster.kubelet.kill_container(NS, name, "agent")
    wait_for(
        lambda: cluster.kubelet.restart_count(NS, name, "agent") == 1, TIMEOUT, "agent restart"
    )
    wait_for(
        lambda: cluster.kubelet.endpoints(NS, m.selector("chat")), TIMEOUT, "the pod Ready again"
    )
    wait_condition(api, ADS, NS, "chat", "Ready", "True", timeout=TIMEOUT)
    assert cluster.complete("a").json()["choices"][0]["text"] == cluster.reference_text["a", 0]


def test_an_engine_change_rolls_out_without_a_moment_unserved(cluster: Cluster) -> None:
    """An engine setting changes the pod template: a new pod comes up beside the old one,
    takes traffic only once its pinned adapter is loaded, and the old one goes after."""
    api = cluster.api
    api.create(ADS, manifest([cluster.entry("a")]))
    wait_condition(api, ADS, NS, "chat", "Ready", "True", timeout=TIMEOUT)
    [old] = cluster.kubelet.pods(NS)

    stop = threading.Event()
    served: list[str] = []
    failures: list[str] = []

    def client() -> None:
        while not stop.is_set():
            ips = cluster.kubelet.endpoints(NS, m.selector("chat"))
            if not ips:
                failures.append("no ready endpoint")
            for ip in ips[:1]:
                try:
                    response = httpx.post(
                        f"http://{ip}:{m.INFERENCE_PORT}/v1/completions",
                        json={
                            "model": "a",
                            "prompt": PROMPTS[0],
                            "max_tokens": MAX_TOKENS,
                            "temperature": 0.0,
                        },
                        timeout=30,
                    )
                except httpx.ConnectError:
                    continue  # an endpoint list read just before the old pod went away
                if response.status_code == 200:
                    served.append(response.json()["choices"][0]["text"])
                else:
                    failures.append(f"{ip}: {response.status_code} {response.text[:200]}")
            stop.wait(0.2)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        engine = {"type": "builtin", "maxBatchDelayMilliseconds": 5, "maxBatchSize": 4}
        api.patch(ADS, NS, "chat", {"spec": {"engine": engine}})
        wait_for(
            lambda: (
                len(cluster.kubelet.records) == 2
                and [p["metadata"]["name"] for p in cluster.kubelet.pods(NS)]
                == [cluster.kubelet.records[1].name]
            ),
            TIMEOUT,
            "the new pod serving alone",
        )
        ad = wait_condition(api, ADS, NS, "chat", "Progressing", "False", "Complete", TIMEOUT)
    finally:
        stop.set()
        thread.join(60)
    assert condition(ad, "Ready")["status"] == "True"  # type: ignore[index]
    assert failures == []
    assert len(served) >= 5, served  # requests kept flowing through the whole rollout
    assert set(served) == {cluster.reference_text["a", 0]}
    new = cluster.kubelet.records[1]
    assert new.name != old["metadata"]["name"]
    args = cluster.kubelet.pods(NS)[0]["spec"]["containers"][0]["args"]
    assert args[args.index("--max-batch-size") + 1] == "4"
