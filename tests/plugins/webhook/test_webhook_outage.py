"""Fault suite, case 4 (issue 8): a sink outage under load, with a spool and a memory budget.

``flagsink serve`` runs with a spool and the ``webhook`` exporter in front of a real HTTP
server. Clients post 2,000 events/s throughout. The server goes down for 60 s (the long
variant, ``-m long``: 10 minutes): every event keeps being acknowledged (it waits in the
spool, not in memory); then the server comes back and the backlog drains.

Asserted: 0 acknowledged events lost (the oracle reads every request the server answered
2xx), duplicates at most the one batch in flight when the server went down, no request
refused, the relay's resident memory within the 64 MiB budget plus 10%, the drain after
recovery at least 3x the ingest rate, and (case 6) the spool's counters exact.

Memory: the relay's resident size is sampled from ``/proc/<pid>/status`` every 100 ms and
its ``VmHWM`` (the kernel's own peak) read before it stops. The interpreter with uvicorn,
pydantic, httpx and SQLite already takes ~50 MiB before the first event, so the budget
(64 MiB + 10% = 70.4 MiB) is asserted on the absolute peak, and the growth over the
baseline measured before the outage is reported too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from flagsink.testing import wait_until
from flagsink.testing.crash import CrashHarness, RssSampler, read_memory, record_figures
from flagsink.testing.oracle import Oracle

from .conftest import Received, WebhookServer

MIB = 1024 * 1024
BUDGET = 64 * MIB
ALLOWED = int(BUDGET * 1.10)
RATE = 2_000.0  # events per second, posted throughout
POST_BATCH = 100
MAX_BATCH = 2_000  # events per webhook request at most


def relay_config(server: WebhookServer, spool: Path) -> dict[str, Any]:
    return {
        "shutdownTimeout": 10,
        "spool": {
            "dir": str(spool),
            "maxBytes": 2 * 1024 * MIB,  # room for a 10-minute backlog on disk
            "commitInterval": 10,
            "maxPendingInMemory": 20_000,
        },
        "exporter": {
            "kind": "webhook",
            "endpointUrl": server.url,
            "timeout": 5,
            "flushInterval": 200,
            "maxEventInMemory": MAX_BATCH,
            "retryInitialInterval": 200,
            "retryMaxInterval": 1_000,
        },
    }


def complete(request: Received) -> bool:
    """2xx with the whole body: a request cut off when the server went down is not a
    delivery (the test server records it; a real receiver could not parse it)."""
    return request.ok and len(request.body) == int(request.headers.get("content-length", -1))


class Arrivals:
    """What the webhook server received, parsed once per request: event ids and when."""

    def __init__(self, server: WebhookServer, oracle: Oracle) -> None:
        self.server = server
        self.oracle = oracle
        self.seen = 0
        self.ids: set[str] = set()
        self.times: list[tuple[float, int]] = []  # (arrival, events) per 2xx request

    def update(self) -> set[str]:
        requests = self.server.requests()
        for request in requests[self.seen :]:
            if complete(request):
                events = request.json()["events"]
                self.times.append((request.time, len(events)))
                self.ids.update(filter(None, map(self.oracle.id_of, events)))
        self.seen = len(requests)
        return self.ids


def outage_case(server: WebhookServer, tmp_path: Path, outage: float) -> dict[str, Any]:
    oracle = Oracle()
    config = relay_config(server, tmp_path / "spool")
    with CrashHarness(
        "webhook",
        config,
        tmp_path / "relay",
        oracle=oracle,
        batch_size=POST_BATCH,
        event_options={"tracking_every": 0},
    ) as harness:
        relay = harness.relay
        relay.start()
        started = read_memory(relay.pid)
        assert started is not None
        sampler = RssSampler(relay.pid, 0.1)
        arrivals = Arrivals(server, oracle)
        poster = harness.poster(rate=RATE, concurrency=2, stop_on_error=False).start()

        # Warm up with the sink up (connection pools, lazy imports), then the baseline.
        assert wait_until(lambda: len(poster.outcomes) >= 2 * RATE / POST_BATCH, 30, 0.05)
        warm = {e.user_key for e in poster.acked_events()}
        assert wait_until(lambda: warm <= arrivals.update(), 30, 0.05), "warm-up not delivered"
        baseline = read_memory(relay.pid)
        assert baseline is not None

        # The outage: every event keeps being acknowledged, into the spool.
        server.stop()
        down_at = time.monotonic()
        posted_before = len(poster.outcomes)
        time.sleep(outage)  # the outage itself (not a wait for a condition): load goes on
        server.start()
        recovered_at = time.monotonic()
        during = (len(poster.outcomes) - posted_before) * POST_BATCH
        backlog = {e.user_key for e in poster.acked_events()}
        waiting = len(backlog - arrivals.update())  # acknowledged, in the spool

        # The drain: everything acknowledged before the recovery arrives, the load goes on.
        limit = max(120.0, outage / 2)
        drained = wait_until(lambda: backlog <= arrivals.update(), limit, 0.05)
        cleared_at = time.monotonic()
        assert drained, f"backlog not delivered {limit} s after recovery: {harness.check('drain')}"
        poster.stop()
        harness.record_posts(poster)
        sampler.stop()
        hwm = read_memory(relay.pid)  # VmHWM: the kernel's peak over the whole run
        assert hwm is not None
        peak = max(hwm.hwm, sampler.peak)

        # Everything delivered, then a clean stop and the exact accounting.
        harness.recover(60)
        arrivals.update()
        report = oracle.report(
            event
            for request in server.requests()
            if complete(request)
            for event in request.json()["events"]
        )

    window = [n for t, n in arrivals.times if recovered_at <= t <= cleared_at]
    first = min((t for t, _ in arrivals.times if t >= recovered_at), default=cleared_at)
    drain_seconds = cleared_at - recovered_at
    figures: dict[str, Any] = {
        "outage_s": round(recovered_at - down_at, 1),
        "ingest_rate": round(during / (recovered_at - down_at)),
        "acked": harness.acked_events,
        "refused_requests": len(poster.refused()),
        "backlog_at_recovery": waiting,
        "delivered_while_draining": sum(window),
        "drain_s": round(drain_seconds, 2),
        "drain_rate": round(sum(window) / drain_seconds),
        "drain_rate_from_first_request": round(sum(window) / max(cleared_at - first, 1e-3)),
        "lost": len(report.missing),
        "duplicates": report.extra_copies,
        "corrupted": len(report.corrupted),
        "rss_start_mib": round(started.rss / MIB, 1),
        "rss_baseline_mib": round(baseline.rss / MIB, 1),
        "rss_peak_outage_mib": round(
            max(rss for t, rss in sampler.samples if down_at <= t <= recovered_at) / MIB, 1
        ),
        "rss_peak_sampled_mib": round(sampler.peak / MIB, 1),
        "vmhwm_mib": round(hwm.hwm / MIB, 1),
        "growth_over_baseline_mib": round((peak - baseline.rss) / MIB, 1),
        "accounting": [c.problems for c in harness.accounting],
        "pending_after": harness.accounting[-1].pending,
    }
    record_figures("outage", figures)
    print(figures)
    assert waiting >= 0.95 * RATE * outage, f"no backlog built up: {figures}"
    assert report.missing == [], report.summary()
    assert report.corrupted == {}, report.summary()
    assert report.unexpected == [], report.summary()
    assert report.extra_copies <= MAX_BATCH, report.summary()
    assert figures["refused_requests"] == 0
    assert during >= 0.95 * RATE * outage, f"the clients fell behind: {figures}"
    assert peak <= ALLOWED, f"peak RSS over the 64 MiB budget + 10%: {figures}"
    assert peak - baseline.rss <= BUDGET, figures
    assert figures["drain_rate"] >= 3 * RATE, figures
    assert all(c.ok for c in harness.accounting), [c.problems for c in harness.accounting]
    assert harness.accounting[-1].pending == 0
    final = harness.accounting[-1].consumers
    assert [c.accepted for c in final] == [c.delivered for c in final], final
    return figures


def test_a_one_minute_outage_at_2000_events_per_second(
    webhook_server: WebhookServer, tmp_path: Path
) -> None:
    outage_case(webhook_server, tmp_path, 60.0)


@pytest.mark.long
def test_a_ten_minute_outage_at_2000_events_per_second(
    webhook_server: WebhookServer, tmp_path: Path
) -> None:
    outage_case(webhook_server, tmp_path, 600.0)
