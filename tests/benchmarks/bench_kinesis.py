"""flagsink-kinesis benchmark: events/s into a local Kinesis server (moto), end-to-end
latency, and what ``add_event`` costs the application with a dead sink.

A standalone script, not part of the pass/fail suite (pytest does not collect ``bench_*``
files)::

    .venv/bin/python tests/benchmarks/bench_kinesis.py            # about a minute
    .venv/bin/python tests/benchmarks/bench_kinesis.py --quick    # fewer events

It starts moto's server (as the plugin's tests do: tests/plugins/moto_support.py)
on a free 127.0.0.1 port, with a 4-shard stream.

1. Sustained throughput: 100,000 events added to a ``DataExporterScheduler`` feeding a
   :class:`flagsink_kinesis.KinesisExporter` (queue mode), timed from the first
   ``add_event`` until the scheduler counts all 100,000 confirmed by the server; the
   stream is then read back and counted. Also one ``export`` of 100,000 events with the
   server's answers short-circuited in the client (botocore ``before-call``): the ceiling
   of flagsink + boto3 alone (encoding, chunking, request serialisation), no network.
2. End-to-end latency: events added at a steady rate, each timed from ``add_event`` to its
   arrival at a consumer process polling every shard with ``GetRecords``.
3. ``add_event`` latency, per call: with a scheduler whose exporter does nothing, and with
   a kinesis exporter whose server is dead (nothing listens on its port). The application
   thread never waits on the exporter: both should be the same. A third row shows the
   dead sink once the buffer is full, where each add also drops the oldest event.

moto is a Python server on the same machine (2 CPUs here, shared with the client): the
figures measure flagsink against it, not the Kinesis service.
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

import boto3
from flagsink_kinesis import KinesisExporter

from flagsink.event import Event
from flagsink.exporter import Exporter, ExporterSettings
from flagsink.scheduler import DataExporterScheduler
from flagsink.testing import sample_events, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
from moto_support import MotoServer  # the plugin tests' moto launcher

EVENTS = 100_000
SHARDS = 4


@contextmanager
def moto() -> Iterator[MotoServer]:
    with tempfile.TemporaryDirectory() as workdir:
        server = MotoServer(Path(workdir) / "moto.log")
        server.start()
        try:
            yield server
        finally:
            server.stop()


class Streams:
    def __init__(self, server: MotoServer) -> None:
        self.server = server
        self.kinesis = server.client("kinesis")
        self.count = 0

    def new(self) -> str:
        self.count += 1
        name = f"bench-{self.count}"
        self.kinesis.create_stream(StreamName=name, ShardCount=SHARDS)
        return name

    def count_records(self, name: str) -> int:
        total = 0
        for shard in self.kinesis.list_shards(StreamName=name)["Shards"]:
            iterator = self.kinesis.get_shard_iterator(
                StreamName=name, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
            )["ShardIterator"]
            while iterator:
                answer = self.kinesis.get_records(ShardIterator=iterator, Limit=10_000)
                if not answer["Records"]:
                    break
                total += len(answer["Records"])
                iterator = answer.get("NextShardIterator")
        return total


def throughput(server: MotoServer, streams: Streams, count: int) -> dict[str, Any]:
    name = streams.new()
    events = sample_events(count, prefix="t")
    exporter = KinesisExporter(streamName=name, endpointUrl=server.endpoint)
    exporter.export(sample_events(10, prefix="warm"))  # client created, connection open
    scheduler = DataExporterScheduler(exporter, max_events_in_memory=count)
    started = time.perf_counter()
    for event in events:
        scheduler.add_event(event)
    assert wait_until(lambda: scheduler.stats().exported == count, 600, interval=0.001)
    elapsed = time.perf_counter() - started
    scheduler.close(10)
    return {
        "events_per_s": count / elapsed,
        "seconds": elapsed,
        "requests": exporter.counters["requests"] - 1,
        "stored": streams.count_records(name) - 10,
    }


def client_ceiling(count: int) -> dict[str, Any]:
    """One export of ``count`` events with every PutRecords answered inside botocore."""
    exporter = KinesisExporter(streamName="ceiling", region="us-east-1")
    events = sample_events(count, prefix="c")
    sizes: list[int] = []

    def remember(params: dict[str, Any], **_: Any) -> None:
        sizes.append(len(params["Records"]))

    def answer(**_: Any) -> tuple[Any, dict[str, Any]]:
        records = [{"SequenceNumber": "1", "ShardId": "shardId-000000000000"}] * sizes[-1]
        return _Http(), {"FailedRecordCount": 0, "Records": records}

    events_hub = exporter.client.meta.events
    events_hub.register("before-parameter-build.kinesis.PutRecords", remember)
    events_hub.register("before-call.kinesis.PutRecords", answer)
    exporter.export(events[:1_000])  # warm up
    times = []
    for _ in range(3):
        started = time.perf_counter()
        exporter.export(events)
        times.append(time.perf_counter() - started)
    exporter.close()
    best = statistics.median(times)
    return {"events_per_s": count / best, "seconds": best}


class _Http:
    status_code = 200
    headers: dict[str, str] = {}  # noqa: RUF012


CONSUMER = r"""
import sys, time, boto3
endpoint, stream, count, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
kinesis = boto3.client("kinesis", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id="bench", aws_secret_access_key="bench")
iterators = [
    kinesis.get_shard_iterator(StreamName=stream, ShardId=s["ShardId"],
                               ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    for s in kinesis.list_shards(StreamName=stream)["Shards"]
]
arrived = {}
print("ready", flush=True)
deadline = time.monotonic() + 120
while len(arrived) < count and time.monotonic() < deadline:
    got = 0
    for index, iterator in enumerate(iterators):
        answer = kinesis.get_records(ShardIterator=iterator, Limit=10000)
        now = time.monotonic()
        iterators[index] = answer["NextShardIterator"]
        for record in answer["Records"]:
            data = record["Data"]
            start = data.index(b'"userKey":"') + 11
            arrived.setdefault(data[start:data.index(b'"', start)].decode(), now)
        got += len(answer["Records"])
    if not got:
        time.sleep(0.002)
with open(out, "w") as handle:
    handle.writelines(f"{key}\t{at}\n" for key, at in arrived.items())
"""


def latency(server: MotoServer, streams: Streams, rate: int, seconds: float) -> dict[str, float]:
    """add_event -> arrival at a consumer polling GetRecords on every shard (in another
    process, so that it does not compete with the exporter for the GIL), for events added
    at ``rate``/s. Both sides read CLOCK_MONOTONIC, which is system-wide."""
    name = streams.new()
    count = int(rate * seconds)
    events = sample_events(count, prefix="lat")
    exporter = KinesisExporter(streamName=name, endpointUrl=server.endpoint)
    scheduler = DataExporterScheduler(exporter)
    added: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as workdir:
        out = Path(workdir) / "arrived.tsv"
        consumer = subprocess.Popen(
            [sys.executable, "-c", CONSUMER, server.endpoint, name, str(count), str(out)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert consumer.stdout is not None
        assert consumer.stdout.readline().strip() == "ready"
        # Bursts every 5 ms (sleeping in between), each event timed as it is added.
        burst = max(1, rate // 200)
        started = time.monotonic()
        for index in range(0, count, burst):
            pause = started + index / rate - time.monotonic()
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
    """``add_event`` per call with no exporter work, and with a kinesis exporter whose
    server is dead: below the buffer cap (the normal case), then with the buffer full,
    where every add also drops the oldest event (the scheduler's overflow path)."""
    events = sample_events(count, prefix="add")
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    logging.getLogger("flagsink").setLevel(logging.CRITICAL)  # the dead sink's warnings

    def dead_kinesis() -> KinesisExporter:
        return KinesisExporter(streamName="dead", endpointUrl=dead)

    results = {}
    room = 2 * count  # the cap is never reached
    for name, make, cap in [
        ("no exporter work (null queue exporter)", NullExporter, room),
        ("kinesis, server dead, buffer below its cap", dead_kinesis, room),
        ("kinesis, server dead, buffer full (oldest dropped)", dead_kinesis, count // 2),
    ]:
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
    for name in list(os.environ):
        if name.startswith("AWS_"):
            del os.environ[name]
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    print(
        f"# flagsink-kinesis benchmark: Python {platform.python_version()}, boto3 "
        f"{boto3.__version__}, {os.cpu_count()} CPUs, moto server on the same machine, "
        f"{SHARDS}-shard stream"
    )
    with moto() as server:
        streams = Streams(server)
        run = throughput(server, streams, count)
        ceiling = client_ceiling(count)
        print(f"\n## Sustained throughput: {count:,} events, add_event -> confirmed\n")
        print("| path | events/s | seconds | PutRecords calls | read back |")
        print("|---|---:|---:|---:|---:|")
        print(
            f"| scheduler -> moto server | {run['events_per_s']:,.0f} | {run['seconds']:.2f} | "
            f"{run['requests']:,} | {run['stored']:,} |"
        )
        print(
            f"| export(), answers short-circuited in botocore (client ceiling) | "
            f"{ceiling['events_per_s']:,.0f} | {ceiling['seconds']:.2f} | "
            f"{count // 500:,} | - |"
        )
        print("\n## End-to-end latency: add_event -> read by a GetRecords consumer process\n")
        print("| rate (events/s) | events | p50 ms | p99 ms | max ms |")
        print("|---:|---:|---:|---:|---:|")
        for rate in (1_000, 5_000):
            row = latency(server, streams, rate, 2.0 if options.quick else 4.0)
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
