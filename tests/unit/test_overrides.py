"""``--set FIELD.PATH=VALUE`` overrides (``kubetune run --set``), applied to a plain manifest."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubetune_operator.overrides import OverrideError, apply_overrides

DOC: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "gsm8k"},
    "spec": {
        "training": {"maxSteps": 10, "learningRate": "2e-4"},
        "output": {"uri": "s3://models/gsm8k", "merge": False},
        "lora": {"targetModules": ["all-linear"]},
        "evaluation": {
            "suites": [
                {"name": "heldout", "type": "perplexity", "maxSamples": 100},
                {"name": "accuracy", "type": "taskAccuracy"},
            ]
        },
        "grid": [[1, 2], [3, 4]],
    },
}


def with_spec(**changes: Any) -> dict[str, Any]:
    """DOC with top-level spec fields replaced (a value of ... deletes the field)."""
    doc = copy.deepcopy(DOC)
    for key, value in changes.items():
        if value is ...:
            del doc["spec"][key]
        else:
            doc["spec"][key] = value
    return doc


def training(**fields: Any) -> dict[str, Any]:
    return with_spec(training={**DOC["spec"]["training"], **fields})


def suites(*entries: dict[str, Any]) -> dict[str, Any]:
    return with_spec(evaluation={"suites": list(entries)})


HELDOUT = DOC["spec"]["evaluation"]["suites"][0]
ACCURACY = DOC["spec"]["evaluation"]["suites"][1]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param([], DOC, id="nothing"),
        pytest.param(["spec.training.maxSteps=20"], training(maxSteps=20), id="int"),
        pytest.param(["spec.training.maxSteps=-1"], training(maxSteps=-1), id="negative-int"),
        pytest.param(
            ["spec.output.merge=true"],
            with_spec(output={"uri": "s3://models/gsm8k", "merge": True}),
            id="bool-true",
        ),
        pytest.param(["spec.output.merge=false"], DOC, id="bool-false"),
        pytest.param(
            ["spec.training.lrScheduler=linear"], training(lrScheduler="linear"), id="string"
        ),
        pytest.param(
            ["spec.training.learningRate=1e-4"],
            training(learningRate="1e-4"),
            id="yaml-1.1-exponent-is-a-string",
        ),
        pytest.param(
            ["spec.training.learningRate='1e-4'"], training(learningRate="1e-4"), id="single-quoted"
        ),
        pytest.param(['spec.training.seed="42"'], training(seed="42"), id="double-quoted-number"),
        pytest.param(["spec.training.seed='true'"], training(seed="true"), id="quoted-bool"),
        pytest.param(["spec.training.x=0.5"], training(x=0.5), id="float"),
        pytest.param(["spec.training.x="], training(x=""), id="empty-string"),
        pytest.param(["spec.training.x=a=b"], training(x="a=b"), id="value-with-equals"),
        pytest.param(
            ["spec.training.x=hf://org/model@main"],
            training(x="hf://org/model@main"),
            id="uri-value",
        ),
        pytest.param(
            ["spec.distributed.nodes=1"], with_spec(distributed={"nodes": 1}), id="creates-map"
        ),
        pytest.param(["spec.a.b.c=x"], with_spec(a={"b": {"c": "x"}}), id="creates-nested-maps"),
        pytest.param(
            ["metadata.labels.team=a"],
            {**DOC, "metadata": {"name": "gsm8k", "labels": {"team": "a"}}},
            id="outside-spec",
        ),
        pytest.param(
            ["spec.evaluation.suites[0].maxSamples=5"],
            suites({**HELDOUT, "maxSamples": 5}, ACCURACY),
            id="list-index",
        ),
        pytest.param(
            ["spec.evaluation.suites[1].maxSamples=5"],
            suites(HELDOUT, {**ACCURACY, "maxSamples": 5}),
            id="list-index-new-key",
        ),
        pytest.param(
            ["spec.evaluation.suites[1]={name: judge, type: judge}"],
            suites(HELDOUT, {"name": "judge", "type": "judge"}),
            id="replace-list-item-with-flow-map",
        ),
        pytest.param(
            ["spec.lora.targetModules[0]=q_proj"],
            with_spec(lora={"targetModules": ["q_proj"]}),
            id="scalar-list-item",
        ),
        pytest.param(
            ["spec.lora.targetModules=[q_proj, v_proj]"],
            with_spec(lora={"targetModules": ["q_proj", "v_proj"]}),
            id="flow-list",
        ),
        pytest.param(["spec.grid[1][0]=9"], with_spec(grid=[[1, 2], [9, 4]]), id="double-index"),
        pytest.param(
            ["spec.training.maxSteps=null"],
            with_spec(training={"learningRate": "2e-4"}),
            id="null-removes",
        ),
        pytest.param(
            ["spec.training.maxSteps=~"],
            with_spec(training={"learningRate": "2e-4"}),
            id="tilde-removes",
        ),
        pytest.param(["spec.evaluation=null"], with_spec(evaluation=...), id="null-removes-map"),
        pytest.param(
            ["spec.evaluation.suites[0].maxSamples=null"],
            suites({"name": "heldout", "type": "perplexity"}, ACCURACY),
            id="null-removes-in-list-item",
        ),
        pytest.param(["spec.training.missing=null"], DOC, id="null-on-missing-key-is-a-no-op"),
        pytest.param(
            ["spec.distributed.nodes=null"],
            DOC,
            id="null-under-missing-map-is-a-no-op",
        ),
        pytest.param(
            ["spec.training.maxSteps=1", "spec.training.maxSteps=2"],
            training(maxSteps=2),
            id="later-wins",
        ),
        pytest.param(
            ["spec.training=null", "spec.training.maxSteps=3"],
            with_spec(training={"maxSteps": 3}),
            id="remove-then-recreate",
        ),
    ],
)
def test_apply_overrides(overrides: list[str], expected: dict[str, Any]) -> None:
    doc = copy.deepcopy(DOC)
    result = apply_overrides(doc, overrides)
    assert result == expected
    assert doc == DOC  # the input is never mutated


def test_types_are_yaml_types() -> None:
    result = apply_overrides(
        DOC,
        [
            "spec.training.maxSteps=20",
            "spec.output.merge=true",
            "spec.training.learningRate='1e-4'",
            "spec.training.seed='42'",
        ],
    )
    assert type(result["spec"]["training"]["maxSteps"]) is int
    assert result["spec"]["output"]["merge"] is True
    assert type(result["spec"]["training"]["learningRate"]) is str
    assert result["spec"]["training"]["seed"] == "42"


def test_result_shares_nothing_with_the_input() -> None:
    doc = copy.deepcopy(DOC)
    result = apply_overrides(doc, ["spec.training.maxSteps=20"])
    result["spec"]["evaluation"]["suites"][0]["name"] = "changed"
    result["spec"]["lora"]["targetModules"].append("v_proj")
    assert doc == DOC


@pytest.mark.parametrize(
    ("override", "message"),
    [
        pytest.param("spec.training.maxSteps", "expected FIELD.PATH=VALUE", id="no-equals"),
        pytest.param("=5", "expected FIELD.PATH=VALUE", id="empty-path"),
        pytest.param("", "expected FIELD.PATH=VALUE", id="empty"),
        pytest.param("spec..maxSteps=1", "invalid path segment ''", id="empty-segment"),
        pytest.param(".spec=1", "invalid path segment ''", id="leading-dot"),
        pytest.param("spec.training.=1", "invalid path segment ''", id="trailing-dot"),
        pytest.param("spec.suites[x]=1", "invalid path segment", id="non-numeric-index"),
        pytest.param("spec.suites[-1]=1", "invalid path segment", id="negative-index"),
        pytest.param("spec.suites[0=1", "invalid path segment", id="unclosed-bracket"),
        pytest.param("[0]=1", "invalid path segment", id="index-without-key"),
        pytest.param(
            "spec.evaluation.suites[5].maxSamples=1", "index 5 does not exist", id="index-oob"
        ),
        pytest.param("spec.evaluation.suites[2]=x", "index 2 does not exist", id="last-index-oob"),
        pytest.param("spec.grid[0][2]=1", "index 2 does not exist", id="inner-index-oob"),
        pytest.param("spec.newList[0].x=1", "index 0 does not exist", id="index-into-created-list"),
        pytest.param(
            "spec.training.maxSteps.x=1", "'x' is inside a non-mapping value", id="through-int"
        ),
        pytest.param(
            "spec.training.maxSteps.x.y=1",
            "'x' is inside a non-mapping value",
            id="deep-through-int",
        ),
        pytest.param(
            "spec.output.uri.scheme=s3", "'scheme' is inside a non-mapping value", id="through-str"
        ),
        pytest.param(
            "spec.evaluation.suites.name=x",
            "'name' is inside a non-mapping value",
            id="key-on-a-list",
        ),
        pytest.param("spec.output.uri[0]=x", "index 0 does not exist", id="index-on-a-string"),
        pytest.param("spec.training[0]=1", "index 0 does not exist", id="index-on-a-map"),
        pytest.param(
            "spec.lora.targetModules[0].name=x",
            "'name' is inside a non-mapping value",
            id="key-on-a-list-item-scalar",
        ),
        pytest.param(
            "spec.training.x=[1,",
            "spec.training.x",
            id="invalid-yaml-value",
        ),
        pytest.param(
            "spec.training.x=*anchor",
            "spec.training.x",
            id="undefined-yaml-alias",
        ),
    ],
)
def test_apply_overrides_errors(override: str, message: str) -> None:
    doc = copy.deepcopy(DOC)
    with pytest.raises(OverrideError) as raised:
        apply_overrides(doc, ["spec.training.maxSteps=99", override])
    assert message in str(raised.value)
    assert doc == DOC  # a failed override leaves the input untouched too


def test_override_error_is_a_value_error() -> None:
    assert issubclass(OverrideError, ValueError)
