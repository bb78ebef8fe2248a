"""Prometheus metrics of the operator (a private registry per operator instance).

=========================================  =========  ==========================================
metric                                     type       labels
=========================================  =========  ==========================================
kubetune_reconcile_total                   counter    kind, trigger, result (ok / error)
kubetune_reconcile_duration_seconds        histogram  kind
kubetune_reconcile_queue_seconds           histogram  kind: trigger to start (waits on the
                                                      resource's lock and a worker thread)
kubetune_api_writes_total                  counter    verb (create, patch, delete, event)
kubetune_progress_reports_total            counter    result (accepted, throttled, rejected)
kubetune_jobs                              gauge      kind, condition (Succeeded), status
=========================================  =========  ==========================================
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _JobsCollector(Collector):
    """``kubetune_jobs``: resources by their Succeeded condition, computed at scrape time."""

    def __init__(self) -> None:
        self.states: dict[str, tuple[str, str]] = {}  # uid -> (kind, Succeeded status)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "kubetune_jobs",
            "Runs by their Succeeded condition.",
            labels=["kind", "condition", "status"],
        )
        for (kind, status), count in sorted(Tally(self.states.values()).items()):
            family.add_metric([kind, "Succeeded", status], count)
        yield family


class Metrics:
    """The operator's metrics; :meth:`exposition` renders the Prometheus text format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "kubetune_reconcile_total",
            "Reconciles by kind, trigger and result.",
            ["kind", "trigger", "result"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "kubetune_reconcile_duration_seconds",
            "Time spent in one reconcile.",
            ["kind"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.queue = Histogram(
            "kubetune_reconcile_queue_seconds",
            "Time from a trigger to its reconcile starting.",
            ["kind"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.writes = Counter(
            "kubetune_api_writes_total", "API writes by verb.", ["verb"], registry=self.registry
        )
        self.progress = Counter(
            "kubetune_progress_reports_total",
            "Progress reports received, by result.",
            ["result"],
            registry=self.registry,
        )
        self.jobs = _JobsCollector()
        self.registry.register(self.jobs)

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry)
