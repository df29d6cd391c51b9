"""flagsink-pubsub benchmark: events/s into the Pub/Sub emulator, end-to-end latency, and
what ``add_event`` costs the application with a dead sink.

A standalone script, not part of the pass/fail suite (pytest does not collect ``bench_*``
files)::

    .venv/bin/python tests/benchmarks/bench_pubsub.py            # about a minute
    .venv/bin/python tests/benchmarks/bench_pubsub.py --quick    # fewer events

It starts the official emulator (Debian package ``google-cloud-cli-pubsub-emulator``, as
the plugin's tests do) on a free 127.0.0.1 port and talks to it directly.

1. Sustained throughput: 100,000 events added to a ``DataExporterScheduler`` feeding a
   :class:`flagsink_pubsub.PubSubExporter` (queue mode), timed from the first
   ``add_event`` until the scheduler counts all 100,000 confirmed by the emulator; every
   message is then pulled back and counted.
2. End-to-end latency: events added at a steady rate, each timed from ``add_event`` to
   its arrival at a consumer process pulling in a loop (synchronous pull).
3. ``add_event`` latency, per call: with a scheduler whose exporter does nothing, and with
   a pubsub exporter whose server is dead (nothing listens on its port). The application
   thread never waits on the exporter: both should be the same. A third row shows the
   dead sink once the buffer is full, where each add also drops the oldest event.

The emulator is a Java process on the same machine (2 CPUs here, shared with the
client): the figures measure flagsink against it on this machine, not Google's service.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flagsink_pubsub import PubSubExporter

from flagsink.event import Event
from flagsink.exporter import Exporter, ExporterSettings
from flagsink.scheduler import DataExporterScheduler
from flagsink.testing import sample_events, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
from pubsub.emulator import (  # the plugin tests' emulator launcher
    PROJECT,
    Emulator,
    emulator_command,
    publisher_for,
    subscriber_for,
)

EVENTS = 100_000


@contextmanager
def emulator() -> Iterator[Emulator]:
    with tempfile.TemporaryDirectory() as workdir:
        server = Emulator(emulator_command(), Path(workdir) / "emulator.log")
        server.start()
        try:
            yield server
        finally:
            server.stop()


class Topics:
    """Topics and subscriptions on the emulator, made by admin clients."""

    def __init__(self, host: str) -> None:
        self.admin = publisher_for(host)
        self.subscriber = subscriber_for(host)
        self.count = 0

    def new(self) -> tuple[str, str]:
        self.count += 1
        topic = f"projects/{PROJECT}/topics/bench-{self.count}"
        subscription = f"projects/{PROJECT}/subscriptions/bench-{self.count}"
        self.admin.create_topic(request={"name": topic})
        self.subscriber.create_subscription(
            request={"name": subscription, "topic": topic, "ack_deadline_seconds": 60}
        )
        return topic, subscription

    def drain(self, subscription: str, count: int, timeout: float = 120.0) -> int:
        """Pull (and ack) until ``count`` messages came; how many did."""
        got = 0
        deadline = time.monotonic() + timeout
        while got < count and time.monotonic() < deadline:
            answer = self.subscriber.pull(
                request={"subscription": subscription, "max_messages": 1000}, timeout=10
            )
            ids = [m.ack_id for m in answer.received_messages]
            if ids:
                self.subscriber.acknowledge(request={"subscription": subscription, "ack_ids": ids})
            got += len(ids)
        return got


def throughput(topics: Topics, count: int, options: dict[str, Any]) -> dict[str, Any]:
    topic, subscription = topics.new()
    events = sample_events(count, prefix=f"t{topics.count}")
    exporter = PubSubExporter(projectID=PROJECT, topic=topic.rsplit("/", 1)[1], **options)
    exporter.export(sample_events(10, prefix="warm"))  # client created, channel connected
    scheduler = DataExporterScheduler(exporter, max_events_in_memory=count)
    started = time.perf_counter()
    for event in events:
        scheduler.add_event(event)
    assert wait_until(lambda: scheduler.stats().exported == count, 300, interval=0.001)
    elapsed = time.perf_counter() - started
    scheduler.close(10)
    received = topics.drain(subscription, count + 10)
    return {
        "options": options,
        "events_per_s": count / elapsed,
        "seconds": elapsed,
        "received": received - 10,
    }


CONSUMER = r"""
import sys, time
from google.cloud import pubsub_v1
subscription, count, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
arrived = {}
subscriber = pubsub_v1.SubscriberClient()
request = {"subscription": subscription, "max_messages": 1000}
print("ready", flush=True)
deadline = time.monotonic() + 120
while len(arrived) < count and time.monotonic() < deadline:
    try:
        answer = subscriber.pull(request=request, timeout=5, retry=None)
    except Exception:
        continue
    now = time.monotonic()
    for received in answer.received_messages:
        data = received.message.data
        start = data.index(b'"userKey":"') + 11
        arrived.setdefault(data[start:data.index(b'"', start)].decode(), now)
    if answer.received_messages:
        subscriber.acknowledge(
            request={"subscription": subscription,
                     "ack_ids": [m.ack_id for m in answer.received_messages]}
        )
with open(out, "w") as handle:
    handle.writelines(f"{key}\t{at}\n" for key, at in arrived.items())
"""


def latency(host: str, topics: Topics, rate: int, seconds: float) -> dict[str, float]:
    """add_event -> arrival at a consumer pulling in a loop (synchronous pull, in another
    process so that it does not compete with the exporter for the GIL), for events added
    at ``rate``/s. Both sides read CLOCK_MONOTONIC, which is system-wide."""
    topic, subscription = topics.new()
    count = int(rate * seconds)
    events = sample_events(count, prefix="lat")
    exporter = PubSubExporter(projectID=PROJECT, topic=topic.rsplit("/", 1)[1])
    exporter.export(sample_events(5, prefix="warm"))
    topics.drain(subscription, 5)
    scheduler = DataExporterScheduler(exporter)
    added: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as workdir:
        out = Path(workdir) / "arrived.tsv"
        consumer = subprocess.Popen(
            [sys.executable, "-c", CONSUMER, subscription, str(count), str(out)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PUBSUB_EMULATOR_HOST": host},
        )
        assert consumer.stdout is not None
        assert consumer.stdout.readline().strip() == "ready"
        # Bursts every 5 ms (sleeping in between), each event timed as it is added.
        burst = max(1, rate // 200)
        started = time.monotonic()
        for index in range(0, count, burst):
            target = started + index / rate
            pause = target - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            for event in events[index : index + burst]:
                added[event.user_key] = time.monotonic()
                scheduler.add_event(event)
        consumer.wait(150)
        arrived = {
            key: float(at)
            for key, at in (line.split("\t") for line in out.read_text().splitlines())
        }
    scheduler.close(10)
    assert len(arrived) == count, f"{len(arrived)} of {count} arrived"
    delays = sorted((arrived[key] - added[key]) * 1000 for key in added)
    return {
        "rate": rate,
        "events": count,
        "p50": _percentile(delays, 50),
        "p99": _percentile(delays, 99),
        "max": delays[-1],
    }


class _NullSettings(ExporterSettings):
    pass


class NullExporter(Exporter[_NullSettings]):
    """A queue exporter that does nothing: the cost of the scheduler alone."""

    kind = "null"
    bulk = False
    settings_model = _NullSettings

    def export(self, events: Sequence[Event]) -> None:
        return


def add_event_cost(scheduler: DataExporterScheduler, events: list[Event]) -> list[float]:
    """Nanoseconds of each ``add_event`` call."""
    timer = time.perf_counter_ns
    costs = []
    add = scheduler.add_event
    for event in events:
        start = timer()
        add(event)
        costs.append(timer() - start)
    return costs


def add_event_latency(count: int) -> dict[str, dict[str, float]]:
    """``add_event`` per call with no exporter work, and with a pubsub exporter whose
    server is dead: below the buffer cap (the normal case), then with the buffer full,
    where every add also drops the oldest event (the scheduler's overflow path)."""
    events = sample_events(count, prefix="add")
    results = {}
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    logging.getLogger("flagsink").setLevel(logging.CRITICAL)  # the dead sink's warnings

    def dead_pubsub() -> PubSubExporter:
        return PubSubExporter(projectID=PROJECT, topic="dead", publishTimeout=1.0)

    room = 2 * count  # the cap is never reached
    for name, make, cap in [
        ("no exporter work (null queue exporter)", NullExporter, room),
        ("pubsub, server dead, buffer below its cap", dead_pubsub, room),
        ("pubsub, server dead, buffer full (oldest dropped)", dead_pubsub, count // 2),
    ]:
        os.environ["PUBSUB_EMULATOR_HOST"] = dead
        scheduler = DataExporterScheduler(
            make(), max_events_in_memory=min(10_000, cap), max_buffered_events=cap
        )
        add_event_cost(scheduler, events[:10_000])  # warm up (and, dead: failing already)
        wait_until(lambda s=scheduler: s.stats().failed_attempts > 0, 3)
        costs = sorted(float(cost) for cost in add_event_cost(scheduler, events))
        stats = scheduler.stats()
        scheduler.close(0.5)
        results[name] = {
            "p50": _percentile(costs, 50),
            "p99": _percentile(costs, 99),
            "p99.9": _percentile(costs, 99.9),
            "max": costs[-1],
            "mean": statistics.fmean(costs),
            "dropped": stats.dropped,
            "failed_attempts": stats.failed_attempts,
        }
    return results


def _percentile(ordered: list[float], pct: float) -> float:
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return ordered[index]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 events per figure")
    options = parser.parse_args(argv)
    count = 20_000 if options.quick else EVENTS
    print(
        f"# flagsink-pubsub benchmark: Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, Pub/Sub emulator (Java) on the same machine"
    )
    with emulator() as server:
        topics = Topics(server.host)
        os.environ["PUBSUB_EMULATOR_HOST"] = server.host
        runs = [
            throughput(topics, count, {}),
            throughput(topics, count, {"batchMaxMessages": 1000, "batchMaxBytes": 5_000_000}),
            throughput(topics, count, {"orderingKey": "{{ .Key}}", "batchMaxMessages": 1000}),
        ]
        print(f"\n## Sustained throughput: {count:,} events, add_event -> confirmed\n")
        print("| settings | events/s | seconds | pulled back |")
        print("|---|---:|---:|---:|")
        for run in runs:
            label = ", ".join(f"{k}={v}" for k, v in run["options"].items()) or "defaults"
            print(
                f"| {label} | {run['events_per_s']:,.0f} | {run['seconds']:.2f} | "
                f"{run['received']:,} |"
            )
        print("\n## End-to-end latency: add_event -> pulled by a consumer process\n")
        print("| rate (events/s) | events | p50 ms | p99 ms | max ms |")
        print("|---:|---:|---:|---:|---:|")
        for rate in (1_000, 5_000):
            row = latency(server.host, topics, rate, 2.0 if options.quick else 4.0)
            print(
                f"| {row['rate']:,} | {row['events']:,} | {row['p50']:.1f} | "
                f"{row['p99']:.1f} | {row['max']:.1f} |"
            )
    print(f"\n## add_event cost on the application thread ({count:,} calls)\n")
    print("| exporter | p50 ns | p99 ns | p99.9 ns | max us | mean ns | dropped | failures |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in add_event_latency(count).items():
        print(
            f"| {name} | {row['p50']:.0f} | {row['p99']:.0f} | {row['p99.9']:.0f} | "
            f"{row['max'] / 1000:.0f} | {row['mean']:.0f} | {row['dropped']:,.0f} | "
            f"{row['failed_attempts']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
