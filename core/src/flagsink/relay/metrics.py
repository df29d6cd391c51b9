"""Prometheus metrics of the relay and of every exporter behind it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from flagsink.accounting import MEMORY_REASONS, SPOOL_REASONS, balanced
from flagsink.pipeline import Pipeline
from flagsink.relay.idempotency import IdempotencyStore
from flagsink.scheduler import SchedulerStats

__all__ = [
    "CONTENT_TYPE",
    "RelayMetrics",
    "balanced",
    "exporter_figures",
    "spool_figures",
    "status_document",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_REJECTIONS = ("invalid", "overloaded")
_EXPORT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def exporter_figures(stats: SchedulerStats) -> dict[str, Any]:
    """One exporter's accounting, from one snapshot: ``accepted == delivered +
    sum(dropped.values()) + pending`` (and ``pending == buffered + inFlight`` without a
    spool). The ``GET /v1/status`` entry of the exporter."""
    spooled = bool(stats.extra.get("spooled"))
    dropped = dict.fromkeys(SPOOL_REASONS if spooled else MEMORY_REASONS, 0)
    dropped.update(stats.dropped_by_reason)
    figures: dict[str, Any] = {
        "name": stats.exporter,
        "accepted": stats.accepted,
        "delivered": stats.delivered,
        "dropped": dropped,
        "pending": stats.pending,
        "buffered": stats.buffered,
        "inFlight": stats.in_flight,
        "retried": stats.retried,
        "failedAttempts": stats.failed_attempts,
        "deadLettered": int(stats.extra.get("dead_lettered", 0)),
        "lastError": stats.last_error,
        "lastErrorTime": stats.last_error_time,
        "spooled": spooled,
    }
    if spooled:
        figures["redelivered"] = int(stats.extra.get("redelivered", 0))
    figures["balanced"] = balanced(figures)
    return figures


def spool_figures(pipeline: Pipeline) -> dict[str, Any] | None:
    """The spool's figures (the ``spool`` object of ``GET /v1/status``), or None."""
    spool = pipeline.spool
    if spool is None:
        return None
    stats = spool.stats()
    return {
        "directory": stats.directory,
        "bytes": stats.bytes_used,
        "maxBytes": stats.max_bytes,
        "whenFull": spool.settings.when_full,
        "full": not spool.has_room,
        "waiting": stats.waiting,
        "committed": dict(stats.committed),
        "commits": stats.commits,
        "refused": stats.refused,
        "damaged": stats.damaged,
    }


class _ExporterCollector(Collector):
    """Reads each scheduler's counters at scrape time (no work on the event path).

    One snapshot per exporter feeds every family, so the figures of one scrape agree:
    ``accepted_total == delivered_total + sum(dropped_total) + pending``.
    """

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def collect(self) -> Iterator[Metric]:
        labels = ["exporter"]
        by_reason = ["exporter", "reason"]
        accepted = CounterMetricFamily(
            "flagsink_exporter_accepted",
            "Events the exporter took responsibility for: delivered + dropped + pending.",
            labels=labels,
        )
        delivered = CounterMetricFamily(
            "flagsink_exporter_delivered", "Events the sink took.", labels=labels
        )
        dropped_total = CounterMetricFamily(
            "flagsink_exporter_dropped",
            "Events given up, by reason (overflow, rejected, shutdown; with a spool "
            "rejected, spool_full, damaged).",
            labels=by_reason,
        )
        pending = GaugeMetricFamily(
            "flagsink_exporter_pending",
            "Events accepted and neither delivered nor dropped yet (waiting or being sent).",
            labels=labels,
        )
        dead_lettered = CounterMetricFamily(
            "flagsink_exporter_dead_lettered",
            "Events written to the dead-letter file (rejected by the sink for good).",
            labels=labels,
        )
        redelivered = CounterMetricFamily(
            "flagsink_exporter_redelivered",
            "Events sent again after a restart because their batch was in flight at a "
            "crash: possible duplicates, unless the sink is idempotent.",
            labels=labels,
        )
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
            "Events given up, by reason (the same figures as flagsink_exporter_dropped).",
            labels=by_reason,
        )
        buffered = GaugeMetricFamily(
            "flagsink_exporter_events_buffered",
            "Events waiting (in memory; with a spool, on disk).",
            labels=labels,
        )
        in_flight = GaugeMetricFamily(
            "flagsink_exporter_events_in_flight", "Events in the export running now.", labels=labels
        )
        spooled = False
        for stats in self.pipeline.stats():
            figures = exporter_figures(stats)
            name = [stats.exporter]
            accepted.add_metric(name, figures["accepted"])
            delivered.add_metric(name, figures["delivered"])
            for reason, count in figures["dropped"].items():
                dropped_total.add_metric([stats.exporter, reason], count)
                dropped.add_metric([stats.exporter, reason], count)
            pending.add_metric(name, figures["pending"])
            dead_lettered.add_metric(name, figures["deadLettered"])
            if figures["spooled"]:
                spooled = True
                redelivered.add_metric(name, figures["redelivered"])
            exported.add_metric(name, stats.exported)
            retried.add_metric(name, stats.retried)
            failures.add_metric(name, stats.failed_attempts)
            buffered.add_metric(name, stats.buffered)
            in_flight.add_metric(name, stats.in_flight)
        yield from (accepted, delivered, dropped_total, pending, dead_lettered)
        if spooled:
            yield redelivered
        yield from (exported, retried, failures, dropped, buffered, in_flight)


class _SpoolCollector(Collector):
    """The spool's figures at scrape time (one snapshot)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def collect(self) -> Iterator[Metric]:
        figures = spool_figures(self.pipeline)
        if figures is None:
            return
        yield GaugeMetricFamily(
            "flagsink_spool_bytes",
            "Size of the spooled events on disk, in bytes.",
            value=figures["bytes"],
        )
        yield GaugeMetricFamily(
            "flagsink_spool_max_bytes",
            "The spool's cap (spool.maxBytes), in bytes.",
            value=figures["maxBytes"],
        )
        yield GaugeMetricFamily(
            "flagsink_spool_waiting_events",
            "Events handed to the spool and waiting for its next group commit (not yet "
            "accepted by any exporter).",
            value=figures["waiting"],
        )
        yield CounterMetricFamily(
            "flagsink_spool_commits", "Group commits (one fsync each).", value=figures["commits"]
        )
        yield CounterMetricFamily(
            "flagsink_spool_refused",
            "Events added by the application and refused before they were committed (spool "
            "full past blockTimeout, too many waiting in memory, or closing); counted as "
            "dropped, reason spool_full. A relay request refused so is answered 503 instead.",
            value=figures["refused"],
        )
        yield CounterMetricFamily(
            "flagsink_spool_damaged",
            "Spooled events found damaged (unreadable or missing) and moved aside; counted "
            "as dropped, reason damaged, for each exporter that had not handled them.",
            value=figures["damaged"],
        )


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
        for reason in _REJECTIONS:
            self.events_rejected.labels(reason)
        self.registry.register(_ExporterCollector(pipeline))
        self.registry.register(_SpoolCollector(pipeline))
        if idempotency is not None:
            self.registry.register(_IdempotencyCollector(idempotency))
        for scheduler in pipeline.schedulers:
            histogram = self.export_seconds.labels(scheduler.name)
            scheduler.on_export = lambda seconds, _size, _ok, h=histogram: h.observe(seconds)

    def render(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)

    def relay_figures(self) -> dict[str, Any]:
        """The relay's event counters (the ``relay`` object of ``GET /v1/status``):
        ``received == accepted + filtered + sum(rejected.values()) + inProgress``, where
        ``inProgress`` counts events of requests still waiting for the spool's commit.

        Read on the event loop, which is also where every one of them is counted, so the
        figures are from one moment."""
        received = _count(self.events_received)
        accepted = _count(self.events_accepted)
        filtered = _count(self.events_filtered)
        rejected = {reason: _count(self.events_rejected, reason=reason) for reason in _REJECTIONS}
        return {
            "received": received,
            "accepted": accepted,
            "filtered": filtered,
            "rejected": rejected,
            "inProgress": received - accepted - filtered - sum(rejected.values()),
        }


def _count(counter: Counter, **labels: str) -> int:
    """The value of ``counter`` (the sample with ``labels``; 0 before any)."""
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels == labels:
                return int(sample.value)
    return 0


def status_document(
    pipeline: Pipeline, metrics: RelayMetrics | None, version: str
) -> dict[str, Any]:
    """The body of ``GET /v1/status``: every exporter's accounting (one snapshot each),
    the spool's figures (or null) and the relay's event counters."""
    exporters = [exporter_figures(stats) for stats in pipeline.stats()]
    return {
        "version": version,
        "balanced": all(figures["balanced"] for figures in exporters),
        "exporters": exporters,
        "spool": spool_figures(pipeline),
        "relay": metrics.relay_figures() if metrics is not None else None,
    }
