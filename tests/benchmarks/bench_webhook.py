"""flagsink-webhook benchmark: events/s POSTed to a local receiver, end-to-end latency, and
add_event latency with a dead or hanging webhook against one that does no work.

A standalone script, not part of the pass/fail suite (pytest does not collect ``bench_*``
files)::

    .venv/bin/python tests/benchmarks/bench_webhook.py            # full run (~30 s)
    .venv/bin/python tests/benchmarks/bench_webhook.py --quick    # 1 trial, shorter runs

The receiver is a raw ASGI app under uvicorn in a subprocess on 127.0.0.1 (as a real
webhook is another process). For each request it records the arrival time
(``time.monotonic()``, one clock for every process on Linux) and the events' user keys,
decoded with msgspec; ``GET /stats`` returns them. Throughput is 100,000 events added to a
:class:`DataExporterScheduler` feeding a signed :class:`WebhookExporter`, until the
receiver holds them all (bodies split at the default 5 MiB). Latency is from ``add_event``
to the receiver's arrival time, at a steady rate.
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
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import msgspec

from flagsink.event import Event
from flagsink.exporter import Exporter, ExporterSettings
from flagsink.scheduler import DataExporterScheduler
from flagsink.testing import sample_events

try:
    import httpx
    import uvicorn
    from flagsink_webhook import WebhookExporter
except ImportError as missing:  # e.g. `nox -s bench`, which installs core only
    print(f"# flagsink-webhook benchmark skipped: {missing} (install plugins/webhook, uvicorn)")
    sys.exit(0)

THROUGHPUT_EVENTS = 100_000
SECRET = "bench-secret"


# -- the receiver (runs in its own process: `bench_webhook.py --receiver PORT`) -------------


class _Key(msgspec.Struct):
    userKey: str


class _Body(msgspec.Struct):
    events: list[_Key]


def receiver_app() -> Any:
    decode = msgspec.json.Decoder(_Body).decode
    arrivals: list[tuple[float, list[str]]] = []
    encode = msgspec.json.encode

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        arrived = time.monotonic()
        if scope["method"] == "POST" and scope["path"] == "/hook":
            keys = [event.userKey for event in decode(body).events]
            arrivals.append((arrived, keys))
            answer = b"{}"
        elif scope["path"] == "/stats":
            answer = encode(arrivals)
        elif scope["path"] == "/reset":
            arrivals.clear()
            answer = b"{}"
        else:
            answer = b"{}"
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    return app


def run_receiver(port: int) -> None:
    uvicorn.run(receiver_app(), host="127.0.0.1", port=port, log_level="warning", access_log=False)


@contextmanager
def receiver() -> Iterator[str]:
    """The receiver on a free port; yields its base URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, __file__, "--receiver", str(port)],
        stdin=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/reset", timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the receiver did not start") from None
                time.sleep(0.02)
        yield base
    finally:
        process.terminate()
        process.wait(10)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def stats(base: str) -> list[tuple[float, list[str]]]:
    data = httpx.get(f"{base}/stats", timeout=30).content
    return [(float(t), list(keys)) for t, keys in msgspec.json.decode(data)]


def reset(base: str) -> None:
    httpx.get(f"{base}/reset", timeout=30)


def received(base: str) -> int:
    return sum(len(keys) for _, keys in stats(base))


# -- 1. throughput --------------------------------------------------------------------------


def throughput(base: str, batch: int, trials: int) -> dict[str, Any]:
    rates = []
    requests = 0
    for trial in range(trials):
        reset(base)
        events = sample_events(THROUGHPUT_EVENTS, prefix=f"t{batch}-{trial}")
        exporter = WebhookExporter(endpointUrl=f"{base}/hook", secret=SECRET)
        scheduler = DataExporterScheduler(
            exporter,
            flush_interval=3600,
            max_events_in_memory=batch,
            max_buffered_events=THROUGHPUT_EVENTS,  # the whole burst waits, none dropped
        )
        started = time.perf_counter()
        for event in events:
            scheduler.add_event(event)
        assert scheduler.flush(120), scheduler.stats()
        elapsed = time.perf_counter() - started
        scheduler.close(10)
        got = received(base)
        assert got == len(events), (got, len(events))
        rates.append(len(events) / elapsed)
        requests = exporter.requests
    return {"batch": batch, "rate": statistics.median(rates), "requests": requests}


# -- 2. end-to-end latency ------------------------------------------------------------------


def latency(base: str, rate: int, seconds: float, flush_interval: float) -> dict[str, Any]:
    reset(base)
    count = int(rate * seconds)
    events = sample_events(count, prefix=f"lat{flush_interval}")
    exporter = WebhookExporter(endpointUrl=f"{base}/hook", secret=SECRET)
    scheduler = DataExporterScheduler(
        exporter, flush_interval=flush_interval, max_events_in_memory=100_000
    )
    added: dict[str, float] = {}
    burst = max(rate // 1000, 1)  # one burst per millisecond
    start = time.monotonic()
    for index in range(0, count, burst):
        due = start + index / rate
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        now = time.monotonic()
        for event in events[index : index + burst]:
            added[event.user_key] = now
            scheduler.add_event(event)
    assert scheduler.flush(60)
    scheduler.close(10)
    delays = sorted((arrived - added[key]) * 1000 for arrived, keys in stats(base) for key in keys)
    assert len(delays) == count, (len(delays), count)
    return {
        "flush_interval": flush_interval,
        "rate": rate,
        "p50": delays[len(delays) // 2],
        "p99": delays[int(len(delays) * 0.99)],
        "max": delays[-1],
    }


# -- 3. add_event latency: dead or hanging sink vs. no exporter work ------------------------


class NullExporter(Exporter[ExporterSettings]):
    kind = "null"

    def export(self, events: Sequence[Event]) -> None:
        return None


@contextmanager
def blackhole() -> Iterator[int]:
    """A TCP server that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(2)
        for connection in held:
            connection.close()
        server.close()


def add_latency(
    make: Callable[[], Exporter[Any]], calls: int, cap: int | None = None
) -> dict[str, float]:
    events = sample_events(calls, prefix="add")
    scheduler = DataExporterScheduler(
        make(),
        flush_interval=0.05,
        max_events_in_memory=10_000,
        max_buffered_events=cap or 2 * calls,
        retry_initial=0.05,
    )
    add = scheduler.add_event
    clock = time.perf_counter_ns
    timings = [0] * calls
    burst = 1_000
    time.sleep(0.05)
    for start in range(0, calls, burst):
        for index in range(start, min(start + burst, calls)):
            event = events[index]
            before = clock()
            add(event)
            timings[index] = clock() - before
        time.sleep(0.001)  # let the worker run between bursts, as in an application
    stats_ = scheduler.stats()
    scheduler.close(0.5)
    timings.sort()
    return {
        "p50": timings[calls // 2],
        "p99": timings[int(calls * 0.99)],
        "p999": timings[int(calls * 0.999)],
        "mean": sum(timings) / calls,
        "failed_attempts": stats_.failed_attempts,
        "dropped": stats_.dropped,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--receiver", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--trials", type=int, default=3, help="runs per throughput figure")
    parser.add_argument("--quick", action="store_true", help="1 trial, shorter runs")
    options = parser.parse_args(argv)
    if options.receiver:
        run_receiver(options.receiver)
        return 0
    trials = 1 if options.quick else options.trials
    # The dead and hanging sinks make the scheduler log each failure: not part of the figures.
    logging.getLogger("flagsink").setLevel(logging.CRITICAL)
    seconds = 1.5 if options.quick else 3.0
    calls = 100_000 if options.quick else 200_000
    print(
        f"# flagsink-webhook benchmark: Python {platform.python_version()}, httpx "
        f"{httpx.__version__}, {os.cpu_count()} CPUs, receiver: uvicorn {uvicorn.__version__}"
        " (subprocess)"
    )
    with receiver() as base:
        print(f"\n## Throughput: {THROUGHPUT_EVENTS:,} events, signed, median of {trials}\n")
        print("| maxEventInMemory | events/s | requests |")
        print("|---|---|---|")
        for batch in (100_000, 10_000):
            row = throughput(base, batch, trials)
            print(f"| {batch:,} | {row['rate']:,.0f} | {row['requests']} |")

        print("\n## End-to-end latency, add_event to the receiver (ms)\n")
        print("| flushInterval | rate (events/s) | p50 | p99 | max |")
        print("|---|---|---|---|---|")
        for interval in (0.1, 1.0):
            row = latency(base, 20_000, seconds, interval)
            print(
                f"| {interval * 1000:.0f} ms | {row['rate']:,} | {row['p50']:.1f} | "
                f"{row['p99']:.1f} | {row['max']:.1f} |"
            )

        dead_port = free_port()  # nothing listens there: connection refused
        with blackhole() as hanging_port:

            def dead() -> Exporter[Any]:
                return WebhookExporter(endpointUrl=f"http://127.0.0.1:{dead_port}/hook")

            subjects: dict[str, tuple[Callable[[], Exporter[Any]], int | None]] = {
                "no exporter work (null exporter)": (NullExporter, None),
                "live webhook": (lambda: WebhookExporter(endpointUrl=f"{base}/hook"), None),
                "dead webhook (connection refused)": (dead, None),
                "hanging webhook (never answers, 10 s timeout)": (
                    lambda: WebhookExporter(endpointUrl=f"http://127.0.0.1:{hanging_port}/hook"),
                    None,
                ),
                "dead webhook, buffer over its cap (each add drops the oldest)": (
                    dead,
                    calls // 4,
                ),
            }
            print(f"\n## add_event latency on the application thread ({calls:,} calls, ns)\n")
            print("| exporter | p50 | p99 | p99.9 | mean | failed exports | dropped |")
            print("|---|---|---|---|---|---|---|")
            for name, (make, cap) in subjects.items():
                row = add_latency(make, calls, cap)
                print(
                    f"| {name} | {row['p50']:.0f} | {row['p99']:.0f} | {row['p999']:.0f} | "
                    f"{row['mean']:.0f} | {row['failed_attempts']:.0f} | {row['dropped']:.0f} |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
