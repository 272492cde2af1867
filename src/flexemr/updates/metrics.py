"""Prometheus metrics of the process that applies row updates (the ranker's HTTP push, or the
`flexemr update --redis` consumer): how many, how fast (`rate()` of the counters) and how late."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class UpdateMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.versions = Counter(
            "flexemr_updates_committed",
            "Update batches committed, each as one row version",
            registry=registry,
        )
        self.rows = Counter("flexemr_updates_rows", "Rows written by committed updates", registry=registry)
        self.refused = Counter(
            "flexemr_updates_refused", "Update batches refused (bad rows, or not applied)", ["reason"],
            registry=registry,
        )  # fmt: skip
        self.lag = Histogram(
            "flexemr_update_lag_seconds",
            "From an update's creation (stream entry time, or HTTP arrival) to its commit",
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 300),
            registry=registry,
        )
        self.version = Gauge("flexemr_updates_version", "The latest row version committed", registry=registry)

    def committed(self, version: int, rows: int, lags_s: list[float]) -> None:
        """One commit of `rows` rows; `lags_s`: for each update it carried, creation to commit."""
        self.versions.inc()
        self.rows.inc(rows)
        for lag in lags_s:
            self.lag.observe(max(lag, 0.0))
        self.version.set(version)
