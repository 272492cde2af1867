"""Prometheus metrics for the ranker.

Request-path metrics (counts, latency, batch sizes, errors by kind) are recorded as requests
happen. Everything the components count themselves (per-server bytes, engine queues, credits,
migrations, cache hits and size) is read from `Ranker.stats()` at scrape time by a collector that
turns the nested stats into labelled series, so a component only has to count, never to know
about Prometheus. A number reported as a `flexemr.stats.Count` is a counter, any other a gauge.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from flexemr.stats import Count

_LABEL_KEYS = ("server", "thread", "connection", "table")


class StatsCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        series: dict[str, _Series] = {}
        _flatten(self.stats(), "flexemr", {}, series)
        for name, (counter, labels, samples) in sorted(series.items()):
            family: CounterMetricFamily | GaugeMetricFamily = (
                CounterMetricFamily(name, name, labels=labels)
                if counter
                else GaugeMetricFamily(name, name, labels=labels)
            )
            for values, value in samples:
                family.add_metric(values, value)
            yield family


_Series = tuple[bool, list[str], list[tuple[list[str], float]]]
"""Is it a counter, its label names, its samples (label values, value)."""


def _flatten(node: Any, name: str, labels: dict[str, str], out: dict[str, _Series]) -> None:
    if isinstance(node, bool | int | float):
        keys = sorted(labels)
        out.setdefault(name, (isinstance(node, Count), keys, []))[2].append(
            ([labels[k] for k in keys], float(node))
        )
    elif isinstance(node, dict):
        for key, value in node.items():
            if key not in _LABEL_KEYS:
                _flatten(value, f"{name}_{key}", labels, out)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            keys = [k for k in _LABEL_KEYS if isinstance(item, dict) and k in item]
            # Every identifying key labels the series (a connection and its server), so none repeats.
            item_labels = {k: str(item[k]) for k in keys} if keys else {"index": str(i)}
            _flatten(item, name, {**labels, **item_labels}, out)


class RequestMetrics:
    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        """`stats`: the serving ranker's `stats()` (nested counts), read at every scrape."""
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "flexemr_http_requests", "Inference requests by outcome", ["status"], registry=self.registry
        )
        self.errors = Counter("flexemr_errors", "Failed requests by kind", ["kind"], registry=self.registry)
        self.latency = Histogram(
            "flexemr_request_latency_seconds",
            "Inference latency, from body received to response ready",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "flexemr_request_batch_size",
            "Samples per inference request",
            buckets=(1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
            registry=self.registry,
        )
        self.registry.register(StatsCollector(stats))
