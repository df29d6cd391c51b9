"""Prometheus metrics of the relay and of every exporter behind it."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from flagsink.pipeline import Pipeline
from flagsink.relay.idempotency import IdempotencyStore

__all__ = ["CONTENT_TYPE", "RelayMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_EXPORT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _ExporterCollector(Collector):
    """Reads each scheduler's counters at scrape time (no work on the event path)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def collect(self) -> Iterator[Metric]:
        labels = ["exporter"]
        exported = CounterMetricFamily(
            "flagsink_exporter_events_exported", "Events delivered by the exporter.", labels=labels
        )
        retried = CounterMetricFamily(
            "flagsink_exporter_events_retried",
            "Events queued again after a failure.",
            labels=labels,
        )
        failures = CounterMetricFamily(
            "flagsink_exporter_failed_exports", "Export attempts that failed.", labels=labels
        )
        dropped = CounterMetricFamily(
            "flagsink_exporter_events_dropped",
            "Events given up, by reason (overflow, rejected, shutdown).",
            labels=["exporter", "reason"],
        )
        buffered = GaugeMetricFamily(
            "flagsink_exporter_events_buffered", "Events waiting in memory.", labels=labels
        )
        in_flight = GaugeMetricFamily(
            "flagsink_exporter_events_in_flight", "Events in the export running now.", labels=labels
        )
        for stats in self.pipeline.stats():
            name = [stats.exporter]
            exported.add_metric(name, stats.exported)
            retried.add_metric(name, stats.retried)
            failures.add_metric(name, stats.failed_attempts)
            for reason in ("overflow", "rejected", "shutdown"):
                dropped.add_metric([stats.exporter, reason], stats.dropped_by_reason.get(reason, 0))
            buffered.add_metric(name, stats.buffered)
            in_flight.add_metric(name, stats.in_flight)
        yield from (exported, retried, failures, dropped, buffered, in_flight)


class _IdempotencyCollector(Collector):
    """Reads the idempotency store's figures at scrape time."""

    def __init__(self, store: IdempotencyStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        stats = self.store.stats()
        yield CounterMetricFamily(
            "flagsink_relay_idempotency_evictions",
            "Idempotency keys forgotten before their TTL to keep the store within its bounds.",
            value=stats.evicted,
        )
        yield GaugeMetricFamily(
            "flagsink_relay_idempotency_keys",
            "Idempotency keys remembered now (in progress or answered).",
            value=stats.keys,
        )


class RelayMetrics:
    """The relay's registry: request and event counters plus per-exporter figures."""

    def __init__(self, pipeline: Pipeline, idempotency: IdempotencyStore | None = None) -> None:
        self.registry = CollectorRegistry()
        self.events_received = Counter(
            "flagsink_relay_events_received",
            "Events received in collector requests.",
            registry=self.registry,
        )
        self.events_accepted = Counter(
            "flagsink_relay_events_accepted",
            "Events accepted and handed to the exporters.",
            registry=self.registry,
        )
        self.events_filtered = Counter(
            "flagsink_relay_events_filtered",
            "Events accepted but not exported: their flag has trackEvents: false.",
            registry=self.registry,
        )
        self.events_rejected = Counter(
            "flagsink_relay_events_rejected",
            "Events refused, by reason (invalid, overloaded).",
            ["reason"],
            registry=self.registry,
        )
        self.requests = Counter(
            "flagsink_relay_requests",
            "HTTP requests by method, route and status.",
            ["method", "path", "status"],
            registry=self.registry,
        )
        self.export_seconds = Histogram(
            "flagsink_exporter_export_duration_seconds",
            "Duration of export attempts.",
            ["exporter"],
            buckets=_EXPORT_BUCKETS,
            registry=self.registry,
        )
        self.idempotent_replays = Counter(
            "flagsink_relay_idempotent_replays",
            "Collector requests answered with the stored answer of an earlier request with "
            "the same Idempotency-Key (nothing ingested).",
            registry=self.registry,
        )
        self.idempotency_conflicts = Counter(
            "flagsink_relay_idempotency_conflicts",
            "Collector requests refused for their Idempotency-Key, by reason (in_progress: "
            "409, mismatch: 422).",
            ["reason"],
            registry=self.registry,
        )
        for reason in ("in_progress", "mismatch"):
            self.idempotency_conflicts.labels(reason)
        self.registry.register(_ExporterCollector(pipeline))
        if idempotency is not None:
            self.registry.register(_IdempotencyCollector(idempotency))
        for scheduler in pipeline.schedulers:
            histogram = self.export_seconds.labels(scheduler.name)
            scheduler.on_export = lambda seconds, _size, _ok, h=histogram: h.observe(seconds)

    def render(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)
