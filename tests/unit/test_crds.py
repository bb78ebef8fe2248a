"""The CRDs in crds/ are generated from the API models, structural, and accepted by Kubernetes."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubetune_operator import crdgen
from kubetune_operator.api import KINDS
from kubetune_operator.cli.main import main
from kubetune_operator.crdcheck import structural_violations

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "crds"
KIND_IDS = list(KINDS)


def _load(kind: str) -> dict[str, Any]:
    info = KINDS[kind]
    return yaml.safe_load((CRD_DIR / crdgen.crd_filename(info)).read_text(encoding="utf-8"))


def _walk(node: dict[str, Any], path: str = ""):
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[*]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{*}}")


def test_crds_folder_matches_the_models() -> None:
    generated = crdgen.build_all()
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in CRD_DIR.glob("*.yaml")}
    assert set(on_disk) == set(generated)
    for name, text in generated.items():
        assert on_disk[name] == text, f"crds/{name} drifted: run `kubetune crds`"


def test_crds_check_reports_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crds", "--output", str(tmp_path)]) == 0
    assert main(["crds", "--output", str(tmp_path), "--check"]) == 0
    target = tmp_path / "kubetune.io_evaljobs.yaml"
    target.write_text(target.read_text(encoding="utf-8").replace("maxLength: 63", "maxLength: 64"))
    (tmp_path / "stray.yaml").write_text("{}")
    assert main(["crds", "--output", str(tmp_path), "--check"]) == 1
    err = capsys.readouterr().err
    assert "kubetune.io_evaljobs.yaml: differs from the API models" in err
    assert "stray.yaml: not generated" in err


@pytest.mark.parametrize("kind", KIND_IDS)
def test_schema_is_structural(kind: str) -> None:
    schema = _load(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert structural_violations(schema) == []


@pytest.mark.parametrize("kind", KIND_IDS)
def test_crd_is_a_valid_kubernetes_object(kind: str) -> None:
    # Strict: an unknown key anywhere in the JSONSchemaProps tree is an error.
    kubernetes_validate.validate(_load(kind), "1.30", strict=True)


@pytest.mark.parametrize("kind", KIND_IDS)
def test_every_field_is_documented_for_kubectl_explain(kind: str) -> None:
    schema = _load(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    undocumented = [
        path
        for path, node in _walk(schema)
        if path.startswith((".spec", ".status"))
        and not node.get("description")
        and not path.endswith(("[*]", "{*}"))
    ]
    assert undocumented == []


@pytest.mark.parametrize(
    ("kind", "short", "summary"),
    [
        ("FineTuneJob", "ftj", "Succeeded"),
        ("EvalJob", "evj", "Succeeded"),
        ("AdapterDeployment", "adep", "Ready"),
    ],
)
def test_names_subresources_and_columns(kind: str, short: str, summary: str) -> None:
    crd = _load(kind)
    spec = crd["spec"]
    assert spec["group"] == "kubetune.io"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == [short]
    assert spec["names"]["categories"] == ["kubetune"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1"
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert columns[summary]["jsonPath"] == f'.status.conditions[?(@.type=="{summary}")].status'
    assert "Age" in columns
    if kind == "AdapterDeployment":
        assert "Adapters" in columns
    else:
        assert {"Reason"} <= set(columns)
    if kind == "FineTuneJob":
        assert columns["Progress"]["jsonPath"] == ".status.progress.percent"
    conditions = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"][
        "conditions"
    ]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert sorted(conditions["items"]["required"]) == [
        "lastTransitionTime",
        "message",
        "reason",
        "status",
        "type",
    ]


def test_discriminated_union_is_merged_with_rules() -> None:
    schema = _load("FineTuneJob")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    objective = schema["properties"]["spec"]["properties"]["objective"]
    assert "oneOf" not in objective
    assert objective["properties"]["type"]["enum"] == ["sft", "dpo", "orpo"]
    rules = {r["rule"] for r in objective["x-kubernetes-validations"]}
    assert "!has(self.lossType) || self.type in ['dpo']" in rules
    assert "!has(self.beta) || self.type in ['dpo', 'orpo']" in rules
    # A member's default must not be applied to other members by the API server.
    assert "default" not in objective["properties"]["beta"]


def test_training_spec_is_immutable_once_started_rule_present() -> None:
    schema = _load("FineTuneJob")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    (rule,) = schema["x-kubernetes-validations"]
    assert "oldSelf.status.startTime" in rule["rule"]
    assert "self.spec.training == oldSelf.spec.training" in rule["rule"]


# ------------------------------------------------------------ the checker catches bad schemas

GOOD: dict[str, Any] = {
    "type": "object",
    "properties": {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 10},
                "items": {
                    "type": "array",
                    "maxItems": 3,
                    "x-kubernetes-list-type": "map",
                    "x-kubernetes-list-map-keys": ["name"],
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {"name": {"type": "string", "maxLength": 5}},
                    },
                },
            },
            "x-kubernetes-validations": [{"rule": "has(self.name)", "message": "name"}],
        },
    },
}


def _mutate(path: list[str], key: str, value: Any) -> dict[str, Any]:
    schema = copy.deepcopy(GOOD)
    node = schema
    for step in path:
        node = node[step]
    if value is None:
        del node[key]
    else:
        node[key] = value
    return schema


SPEC = ["properties", "spec"]
NAME = [*SPEC, "properties", "name"]
ITEMS = [*SPEC, "properties", "items"]


@pytest.mark.parametrize(
    ("schema", "fragment"),
    [
        pytest.param(_mutate(NAME, "$ref", "#/x"), "'$ref' is not allowed", id="ref"),
        pytest.param(_mutate(NAME, "type", None), "every node needs a type", id="untyped"),
        pytest.param(_mutate(NAME, "oneOf", [{}]), "'oneOf' is not allowed", id="oneof"),
        pytest.param(
            _mutate(SPEC, "additionalProperties", False),
            "mutually exclusive",
            id="props-and-additional",
        ),
        pytest.param(_mutate(NAME, "maxLength", None), "needs maxLength", id="unbounded-string"),
        pytest.param(_mutate(ITEMS, "maxItems", None), "needs maxItems", id="unbounded-array"),
        pytest.param(_mutate(NAME, "exclusiveMinimum", 3), "must be a boolean", id="exclusive-num"),
        pytest.param(
            _mutate(NAME, "default", 3), "default 3 is not of type string", id="bad-default"
        ),
        pytest.param(
            _mutate([*ITEMS, "items"], "required", []),
            "must be required",
            id="list-map-key-optional",
        ),
        pytest.param(
            _mutate(SPEC, "x-kubernetes-validations", [{"rule": "self.(", "message": "m"}]),
            "does not parse",
            id="bad-cel",
        ),
        pytest.param(
            _mutate(["properties", "metadata"], "properties", {"labels": {"type": "object"}}),
            "only name and generateName",
            id="metadata-restricted",
        ),
    ],
)
def test_structural_checker_catches(schema: dict[str, Any], fragment: str) -> None:
    assert structural_violations(GOOD) == []
    problems = structural_violations(schema)
    assert any(fragment in p for p in problems), problems
