"""docs/grafana/kubetune-operator.json against the metrics the operator really exports.

The metric names and labels come from a live ``Metrics()`` registry, not from the docs: every
PromQL expression may name only series the operator exposes (with their labels, plus the
``namespace`` and ``pod`` labels Prometheus adds when it scrapes a pod), and every metric the
operator exports must appear on at least one panel.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune_operator.controller.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs/grafana/kubetune-operator.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Labels the scrape adds (kubernetes_sd / a PodMonitor or ServiceMonitor); the dashboard's
# variables select on them.
TARGET_LABELS = {"namespace", "pod"}
# PromQL words that are neither functions (always followed by "(") nor metric names.
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


@pytest.fixture(scope="module")
def exported() -> tuple[dict[str, set[str]], dict[str, str]]:
    """(labels of each exported series name, the metric family of each series name).

    Every metric is touched once the way the operator's handlers touch them, so the registry
    has samples whose names (``_total``, ``_bucket``, ``_sum``, ``_count``, ...) and labels
    are exactly what ``/metrics`` serves.
    """
    metrics = Metrics()
    metrics.reconciles.labels("FineTuneJob", "create", "ok").inc()
    metrics.duration.labels("FineTuneJob").observe(0.02)
    metrics.queue.labels("FineTuneJob").observe(0.001)
    metrics.writes.labels("create").inc()
    metrics.progress.labels("accepted").inc()
    metrics.jobs.states["uid"] = ("FineTuneJob", "Unknown")
    labels: dict[str, set[str]] = {}
    family_of: dict[str, str] = {}
    for family in metrics.registry.collect():
        assert family.samples, f"{family.name} has no samples: touch it in this fixture"
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
            family_of[sample.name] = family.name
    return labels, family_of


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, the ones inside collapsed rows included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", target["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            call = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["query"]["query"])
            assert call is not None, var["query"]
            yield f"variable {var['name']!r}", call.group(1)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (a small PromQL tokenizer, enough for ours)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", text)  # label lists
    text = re.sub(r"\b\d+(?:\.\d+)?\b", " ", text)  # numbers
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end() :].lstrip().startswith("(") or match.group() in KEYWORDS:
            continue  # a function or aggregation, or an operator
        names.add(match.group())
    return names


def test_dashboard_is_a_grafana_dashboard_model(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] == 39
    assert dashboard["uid"] == "kubetune-operator"
    assert dashboard["title"]
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert all(isinstance(i, int) and i > 0 for i in ids)


def test_panels_fit_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] >= 0
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[(x, y)]!r}"
                taken[(x, y)] = panel["title"]


def test_every_query_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == DATASOURCE, var["name"]
    for panel in panels(dashboard):
        if panel["type"] == "row":
            assert not panel.get("targets")
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]


def test_panels_select_the_operator_chosen_in_the_variables(dashboard: dict[str, Any]) -> None:
    for where, expr in expressions(dashboard):
        if where.startswith("variable"):
            continue
        selectors = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*\{([^}]*)\}", expr)
        assert selectors, f"{where}: {expr}"
        for matchers in selectors:
            assert 'namespace=~"$namespace"' in matchers, f"{where}: {expr}"
            assert 'pod=~"$pod"' in matchers, f"{where}: {expr}"
        for window in re.findall(r"\[([^\]]*)\]", expr):
            assert window == "$__rate_interval", f"{where}: {expr}"


def test_expressions_name_only_exported_series_and_their_labels(
    dashboard: dict[str, Any], exported: tuple[dict[str, set[str]], dict[str, str]]
) -> None:
    labels, _ = exported
    for where, expr in expressions(dashboard):
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr}"
        unknown = names - set(labels)
        assert not unknown, f"{where}: {sorted(unknown)} not exported; exported: {sorted(labels)}"
        known = set().union(*(labels[name] for name in names)) | TARGET_LABELS
        for name, matchers in re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}", expr):
            used = set(re.findall(r"(\w+)\s*[=!]~?", matchers))
            assert used <= labels[name] | TARGET_LABELS, f"{where}: {name} has no {used}"
        for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            used = {label.strip() for label in grouping.split(",") if label.strip()}
            assert used <= known, f"{where}: grouping by {sorted(used - known)}"


def test_every_exported_metric_is_on_a_panel(
    dashboard: dict[str, Any], exported: tuple[dict[str, set[str]], dict[str, str]]
) -> None:
    _, family_of = exported
    used = {family_of[name] for _, expr in expressions(dashboard) for name in metric_names(expr)}
    assert used == set(family_of.values())


def test_the_tokenizer_finds_metric_names_and_skips_the_rest() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, kind) (rate(a_bucket{x="y{z}"}[5m]))) '
        "/ ignoring(pod) b_total or vector(0)"
    )
    assert metric_names(expr) == {"a_bucket", "b_total"}
