"""add_event latency on the application thread, sink up vs sink down (issue 8, case 5).

A standalone script, not part of the pass/fail suite (pytest does not collect ``bench_*``
files)::

    .venv/bin/python tests/benchmarks/bench_faults_latency.py            # 10 s per row
    .venv/bin/python tests/benchmarks/bench_faults_latency.py --quick    # 3 s per row

The application thread adds events paced at ``--rate`` per second (sleeping until each
event's slot, as an application doing other work releases the GIL) and times every
``Pipeline.add_event`` with ``time.perf_counter_ns``. The exporter is a webhook-like bulk
exporter POSTing JSON lines over a real socket to a real HTTP server behind a
:class:`~flagsink.testing.faults.TcpProxy`:

- *sink up*: the proxy passes through, every batch is delivered;
- *sink down*: the proxy is a blackhole (connections accepted, never answered): each
  export blocks until its socket timeout, fails and is retried with backoff; the buffer
  reaches its cap halfway through and the oldest events are dropped from then on.

Both with the memory-only buffer (no spool). Each row runs with the garbage collector on
(as in an application), then once more with it off, to show whether collections matter.
Targets (case 5, sink down): p99 <= 20 us, p99.9 <= 100 us.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import logging
import platform
import sys
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgspec
from pydantic import Field

from flagsink.event import Event, new_feature_event
from flagsink.exporter import Exporter, ExportError, ExporterSettings
from flagsink.pipeline import Pipeline
from flagsink.scheduler import DataExporterScheduler
from flagsink.testing.faults import TcpProxy

TARGET_P99_US = 20.0
TARGET_P999_US = 100.0


class PostSettings(ExporterSettings):
    url: str = Field(description="Where to POST the batches.")
    timeout: float = Field(0.5, description="Socket timeout in seconds.")


class PostExporter(Exporter[PostSettings]):
    """Each batch POSTed as JSON lines on a new connection."""

    kind = "post"
    settings_model = PostSettings

    def __init__(self, settings: PostSettings | None = None, /, **options: object) -> None:
        super().__init__(settings, **options)
        self.encode = msgspec.json.Encoder().encode_lines

    def export(self, events: Sequence[Event]) -> None:
        url = urllib.parse.urlsplit(self.settings.url)
        connection = http.client.HTTPConnection(
            url.hostname or "", url.port, timeout=self.settings.timeout
        )
        try:
            connection.request("POST", "/events", body=self.encode(list(events)))
            status = connection.getresponse().status
        except OSError as exc:
            raise ExportError(f"POST {self.settings.url}: {exc}") from exc
        finally:
            connection.close()
        if status >= 300:
            raise ExportError(f"POST {self.settings.url}: HTTP {status}")


class Accept(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(204)
        self.end_headers()


@dataclass
class Row:
    label: str
    samples: list[int]
    seconds: float
    exported: int
    dropped: int
    collections: int

    def q(self, fraction: float) -> float:
        return self.samples[min(len(self.samples) - 1, int(fraction * len(self.samples)))] / 1e3


def run(label: str, port: int, *, down: bool, use_gc: bool, seconds: float, rate: int) -> Row:
    with TcpProxy(port) as proxy:
        if down:
            proxy.blackhole()
        scheduler = DataExporterScheduler(
            PostExporter(url=proxy.url),
            flush_interval=0.1,
            max_events_in_memory=1_000,
            max_buffered_events=int(rate * seconds / 2),
            retry_initial=0.05,
            retry_max=0.5,
        )
        pipeline = Pipeline([(scheduler, "feature")], exit_timeout=None)
        count = int(seconds * rate)
        period = 1_000_000_000 // rate
        samples = [0] * count
        clock = time.perf_counter_ns
        add = pipeline.add_event
        gc.collect()
        if not use_gc:
            gc.disable()
        collections = sum(stat["collections"] for stat in gc.get_stats())
        retained: list[dict[str, str]] = []
        try:
            start = clock()
            for index in range(count):
                # A context dict per evaluation, as applications pass, kept a while
                # (a request's lifetime): the garbage collector runs as in production.
                context = {"targetingKey": f"user-{index}", "plan": ("free", "pro")[index % 2]}
                retained.append(context)
                if len(retained) == 1_000:
                    retained = []
                event = new_feature_event(context, f"flag-{index % 20}", True, "on")
                ahead = start + index * period - clock()
                if ahead > 0:
                    time.sleep(ahead / 1e9)
                before = clock()
                add(event)
                samples[index] = clock() - before
            elapsed = (clock() - start) / 1e9
        finally:
            gc.enable()
        collections = sum(stat["collections"] for stat in gc.get_stats()) - collections
        pipeline.close(1.0 if down else 10.0)
        stats = scheduler.stats()
    samples.sort()
    overflow = stats.dropped_by_reason.get("overflow", 0)
    return Row(label, samples, elapsed, stats.exported, overflow, collections)


def main(argv: list[str] | None = None) -> int:
    # The sink-down rows fail on purpose: keep the retry warnings out of the table.
    logging.getLogger("flagsink").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="paced run per row")
    parser.add_argument("--rate", type=int, default=10_000, help="events per second")
    parser.add_argument("--quick", action="store_true", help="3 s per row")
    args = parser.parse_args(argv)
    seconds = 3.0 if args.quick else args.seconds

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Accept)
    httpd.daemon_threads = True
    server = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    server.start()
    port = httpd.server_address[1]
    print(
        f"add_event latency, memory-only buffer, {args.rate:,} events/s for {seconds:.0f} s "
        f"per row; Python {platform.python_version()} on {platform.machine()}, "
        f"switch interval {sys.getswitchinterval() * 1e3:.0f} ms"
    )
    rows = []
    try:
        for down in (False, True):
            for use_gc in (True, False):
                label = f"sink {'down' if down else 'up'}, gc {'on' if use_gc else 'off'}"
                rows.append(
                    run(
                        label,
                        port,
                        down=down,
                        use_gc=use_gc,
                        seconds=seconds,
                        rate=args.rate,
                    )
                )
    finally:
        httpd.shutdown()
        httpd.server_close()
    header = (
        f"{'':22} {'events':>8} {'rate/s':>8} {'p50 us':>7} {'p99 us':>7} {'p99.9 us':>9} "
        f"{'max us':>8} {'exported':>9} {'cap drops':>9} {'gc runs':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.label:22} {len(row.samples):>8,} {len(row.samples) / row.seconds:>8,.0f} "
            f"{row.q(0.5):>7.2f} {row.q(0.99):>7.2f} {row.q(0.999):>9.2f} "
            f"{row.samples[-1] / 1e3:>8.0f} {row.exported:>9,} {row.dropped:>9,} "
            f"{row.collections:>7}"
        )
    down = next(row for row in rows if row.label == "sink down, gc on")
    met = down.q(0.99) <= TARGET_P99_US and down.q(0.999) <= TARGET_P999_US
    print(
        f"\ncase 5 target (sink down, gc on): p99 <= {TARGET_P99_US:.0f} us, p99.9 <= "
        f"{TARGET_P999_US:.0f} us: {'met' if met else 'NOT met'} "
        f"(p99 {down.q(0.99):.2f} us, p99.9 {down.q(0.999):.2f} us)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
