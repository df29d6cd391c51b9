"""Disk spool benchmark (issue 8): why SQLite, and what the spool costs.

A standalone script (pytest does not collect ``bench_*`` files)::

    .venv/bin/python tests/benchmarks/bench_spool.py [--quick]

1. The storage choice, on one core: appending events durably with one row per event in
   SQLite (WAL, synchronous=FULL, one commit per 2,000 events = 10 ms at 200,000/s),
   one blob per commit in SQLite, and a hand-written append-only log (length + CRC
   framing, one fdatasync per group), all including the msgpack encoding and CRC32.
2. The spool end to end: events committed per second through ``Spool.append_many``
   (writer thread, group commit), and the time from ``submit`` to its durable callback
   (what a relay request waits) at a steady 50,000 events/s.
3. The application thread: ``Pipeline.add_event`` with a spool and without (memory
   buffer), same process, same events.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import struct
import tempfile
import threading
import time
import zlib
from pathlib import Path

import msgspec

from flagsink.config import parse_config
from flagsink.event import Event
from flagsink.pipeline import from_config
from flagsink.spool import Spool, SpoolSettings
from flagsink.testing import sample_events

GROUP = 2_000


def storage_choice(events: list[Event], total: int) -> dict[str, float]:
    encode = msgspec.msgpack.Encoder().encode
    results: dict[str, float] = {}
    for mode in ("sqlite row per event", "sqlite blob per commit", "append-only log"):
        folder = Path(tempfile.mkdtemp(prefix="bench-spool-"))
        try:
            started = time.perf_counter()
            if mode.startswith("sqlite"):
                db = sqlite3.connect(folder / "s.db", isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.execute("CREATE TABLE r (seq INTEGER PRIMARY KEY, crc INTEGER, data BLOB)")
                seq = 0
                while seq < total:
                    group = [events[(seq + i) % len(events)] for i in range(GROUP)]
                    db.execute("BEGIN")
                    if mode == "sqlite row per event":
                        rows = []
                        for i, event in enumerate(group):
                            data = encode(event)
                            rows.append((seq + i + 1, zlib.crc32(data), data))
                        db.executemany("INSERT INTO r VALUES (?, ?, ?)", rows)
                    else:
                        data = encode(group)
                        db.execute("INSERT INTO r VALUES (?, ?, ?)", (seq, zlib.crc32(data), data))
                    db.execute("COMMIT")
                    seq += GROUP
                db.close()
            else:
                fd = os.open(folder / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                seq = 0
                while seq < total:
                    chunks = []
                    for i in range(GROUP):
                        data = encode(events[(seq + i) % len(events)])
                        chunks.append(struct.pack(">II", len(data), zlib.crc32(data)) + data)
                    os.write(fd, b"".join(chunks))
                    os.fdatasync(fd)
                    seq += GROUP
                os.close(fd)
            results[mode] = total / (time.perf_counter() - started)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return results


def spool_throughput(events: list[Event], total: int) -> float:
    folder = tempfile.mkdtemp(prefix="bench-spool-")
    spool = Spool(SpoolSettings(dir=folder))
    spool.consumer("bench")
    spool.start()
    try:
        started = time.perf_counter()
        for i in range(0, total, 1_000):
            start = i % len(events)
            spool.append_many(events[start : start + 1_000])
        spool.sync(120)
        return total / (time.perf_counter() - started)
    finally:
        spool.close()
        shutil.rmtree(folder, ignore_errors=True)


def submit_latency(events: list[Event], seconds: float, rate: int = 50_000) -> list[float]:
    folder = tempfile.mkdtemp(prefix="bench-spool-")
    spool = Spool(SpoolSettings(dir=folder))
    spool.consumer("bench")
    spool.start()
    latencies: list[float] = []
    lock = threading.Lock()
    batch = 500
    try:
        interval = batch / rate
        started = time.perf_counter()
        sent = 0
        while time.perf_counter() - started < seconds:
            due = started + sent * interval
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            submitted = time.perf_counter()

            def committed(ok: bool, submitted: float = submitted) -> None:
                with lock:
                    latencies.append((time.perf_counter() - submitted) * 1000)

            spool.submit(events[:batch], committed)
            sent += 1
        spool.sync(30)
    finally:
        spool.close()
        shutil.rmtree(folder, ignore_errors=True)
    return latencies


def add_event_cost(events: list[Event], count: int) -> dict[str, float]:
    costs: dict[str, float] = {}
    for label in ("memory buffer", "disk spool"):
        folder = Path(tempfile.mkdtemp(prefix="bench-spool-"))
        data: dict[str, object] = {
            "exporter": {
                "kind": "file",
                "outputDir": str(folder / "out"),
                "flushInterval": 600_000,
                "maxEventInMemory": 10**6,
            },
        }
        if label == "disk spool":
            data["spool"] = {"dir": str(folder / "spool")}
        pipeline = from_config(parse_config(data), exit_timeout=None)
        try:
            add = pipeline.add_event
            runs = []
            for _ in range(5):
                started = time.perf_counter_ns()
                for event in events[:count]:
                    add(event)
                runs.append((time.perf_counter_ns() - started) / count)
                if pipeline.spool is not None:
                    pipeline.spool.sync(60)
            costs[label] = statistics.median(runs)
        finally:
            pipeline.close(0.5)
            shutil.rmtree(folder, ignore_errors=True)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs")
    args = parser.parse_args()
    total = 200_000 if args.quick else 1_000_000
    events = list(sample_events(20_000))
    print(f"flagsink spool benchmark: SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs")
    print(f"\n1. durable appends on one core ({total:,} events, {GROUP:,} per commit):")
    for mode, rate in storage_choice(events, total).items():
        print(f"   {mode:<24} {rate:>12,.0f} events/s")
    print("\n2. the spool end to end:")
    print(f"   committed through Spool.append_many: {spool_throughput(events, total):,.0f} ev/s")
    latencies = sorted(submit_latency(events, 3 if args.quick else 10))
    p = [latencies[int(q * (len(latencies) - 1))] for q in (0.5, 0.9, 0.99)]
    print(
        f"   submit -> durable callback at 50,000 ev/s (500-event requests): "
        f"p50 {p[0]:.1f} ms, p90 {p[1]:.1f} ms, p99 {p[2]:.1f} ms, max {latencies[-1]:.1f} ms"
    )
    print("\n3. Pipeline.add_event on the application thread (median of 5 runs):")
    costs = add_event_cost(events, 20_000)
    for label, cost in costs.items():
        print(f"   {label:<14} {cost:>6.0f} ns")
    ratio = costs["disk spool"] / costs["memory buffer"]
    print(f"   spool / memory: {ratio:.2f}x")


if __name__ == "__main__":
    main()
