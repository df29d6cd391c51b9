"""Fault suite, case 5: with the sink down, ``add_event`` stays fast on the application
thread: p99 at most 20 us and p99.9 at most 100 us at 10,000 events/s.

The sink is a real HTTP server behind a :class:`~flagsink.testing.faults.TcpProxy` in
blackhole mode: the exporter's connections are accepted and never answered, so every
export blocks on the socket until its timeout, fails, and is retried with backoff while
events keep coming. The buffer fills past its cap during the run, so both paths of
``add_event`` are measured: the plain append and the append that drops the oldest event.
The garbage collector stays on, as in an application.
"""

from __future__ import annotations

import gc
import http.client
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import msgspec
import pytest
from pydantic import Field

from flagsink.event import Event, new_feature_event
from flagsink.exporter import Exporter, ExportError, ExporterSettings
from flagsink.pipeline import Pipeline
from flagsink.scheduler import DataExporterScheduler
from flagsink.spool import Spool, SpoolSettings, inspect_spool
from flagsink.spooled import SpoolScheduler
from flagsink.testing import wait_until
from flagsink.testing.faults import TcpProxy

RATE = 10_000  # events per second
P99_NS = 20_000
P999_NS = 100_000


class PostSettings(ExporterSettings):
    url: str = Field(description="Where to POST the batches.")
    timeout: float = Field(0.5, description="Socket timeout in seconds.")


class PostExporter(Exporter[PostSettings]):
    """A webhook-like bulk exporter: each batch POSTed as JSON lines over a real socket."""

    kind = "post"
    settings_model = PostSettings

    def __init__(self, settings: PostSettings | None = None, /, **options: object) -> None:
        super().__init__(settings, **options)
        self.attempts = 0
        self.encode = msgspec.json.Encoder().encode_lines

    def export(self, events: Sequence[Event]) -> None:
        self.attempts += 1
        url = urllib.parse.urlsplit(self.settings.url)
        connection = http.client.HTTPConnection(
            url.hostname or "", url.port, timeout=self.settings.timeout
        )
        try:
            connection.request("POST", "/events", body=self.encode(list(events)))
            status = connection.getresponse().status
        except OSError as exc:
            raise ExportError(f"POST {self.settings.url}: {type(exc).__name__}: {exc}") from exc
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


@pytest.fixture(scope="module")
def sink_port() -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Accept)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@dataclass(frozen=True)
class Latencies:
    samples: list[int]  # nanoseconds, sorted
    seconds: float  # wall time of the paced run
    collections: int  # garbage collections during the run

    def quantile(self, q: float) -> int:
        return self.samples[min(len(self.samples) - 1, int(q * len(self.samples)))]

    @property
    def rate(self) -> float:
        return len(self.samples) / self.seconds

    def line(self) -> str:
        us = [self.quantile(q) / 1000 for q in (0.5, 0.99, 0.999)]
        return (
            f"{len(self.samples)} add_event calls at {self.rate:,.0f}/s: p50 {us[0]:.2f} us, "
            f"p99 {us[1]:.2f} us, p99.9 {us[2]:.2f} us, max {self.samples[-1] / 1000:.0f} us "
            f"({self.collections} garbage collections)"
        )


def gc_runs() -> int:
    return sum(generation["collections"] for generation in gc.get_stats())


def paced_adds(pipeline: Pipeline, seconds: float, rate: int = RATE) -> Latencies:
    """Add events at ``rate`` per second for ``seconds``, timing each ``add_event``.

    Each event has a time slot; the thread sleeps (releasing the GIL, as an application
    doing other work would) until its slot, and adds at once when behind.
    """
    count = int(seconds * rate)
    period = 1_000_000_000 // rate
    samples = [0] * count
    clock = time.perf_counter_ns
    add = pipeline.add_event
    retained: list[dict[str, str]] = []
    collections = gc_runs()
    start = clock()
    for index in range(count):
        # A context dict per evaluation, as applications pass, kept a while (a request's
        # lifetime): the garbage collector runs as it would in production.
        context = {"targetingKey": f"user-{index}", "plan": ("free", "pro")[index % 2]}
        retained.append(context)
        if len(retained) == 1_000:
            retained = []
        event = new_feature_event(context, f"flag-{index % 20}", index % 3 == 0, "on")
        ahead = start + index * period - clock()
        if ahead > 0:
            time.sleep(ahead / 1e9)
        before = clock()
        add(event)
        samples[index] = clock() - before
    elapsed = (clock() - start) / 1e9
    samples.sort()
    return Latencies(samples, elapsed, gc_runs() - collections)


def run_case(sink_port: int, seconds: float, capsys: pytest.CaptureFixture[str]) -> None:
    assert gc.isenabled()
    with TcpProxy(sink_port) as proxy:
        proxy.blackhole()  # the sink is down: connections accepted, never answered
        exporter = PostExporter(url=proxy.url, timeout=0.5)
        cap = int(RATE * seconds / 2)  # reached halfway: the second half drops the oldest
        scheduler = DataExporterScheduler(
            exporter,
            flush_interval=0.1,
            max_events_in_memory=1_000,
            max_buffered_events=cap,
            retry_initial=0.05,
            retry_max=0.5,
        )
        pipeline = Pipeline([(scheduler, "feature")], exit_timeout=None)
        try:
            latencies = paced_adds(pipeline, seconds)
            stats = scheduler.stats()
        finally:
            started = time.monotonic()
            pipeline.close(0.5)
            closed_in = time.monotonic() - started
        proxy_stats = proxy.stats()
    with capsys.disabled():
        print(f"\n[case 5, sink down, {seconds:.0f} s] {latencies.line()}")
        print(
            f"  exports tried {exporter.attempts}, failed {stats.failed_attempts}, "
            f"dropped past the cap {stats.dropped_by_reason.get('overflow', 0)}, "
            f"connections blackholed {proxy_stats.connections}, close() took {closed_in:.2f} s"
        )
    # The sink really was down the whole time, and the cap was reached.
    assert stats.exported == 0
    assert exporter.attempts >= 2
    assert stats.failed_attempts >= 2
    assert proxy_stats.connections >= 2
    assert proxy_stats.bytes_discarded > 0
    assert stats.dropped_by_reason.get("overflow", 0) > 0
    assert closed_in < 0.5 + 0.6  # the close deadline, plus one blocked POST at most
    # Paced as asked: 10,000 events/s (within 10%).
    assert latencies.rate >= 0.9 * RATE, latencies.line()
    assert latencies.quantile(0.99) <= P99_NS, latencies.line()
    assert latencies.quantile(0.999) <= P999_NS, latencies.line()


def test_add_event_stays_fast_while_the_sink_is_down(
    sink_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    run_case(sink_port, 3.0, capsys)


@pytest.mark.long
def test_add_event_stays_fast_while_the_sink_is_down_for_30_seconds(
    sink_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    run_case(sink_port, 30.0, capsys)


def run_spool_case(
    sink_port: int, seconds: float, directory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same, with a disk spool: the events go to the spool's writer thread."""
    with TcpProxy(sink_port) as proxy:
        proxy.blackhole()
        exporter = PostExporter(url=proxy.url, timeout=0.5)
        spool = Spool(SpoolSettings(dir=str(directory)))
        scheduler = SpoolScheduler(
            exporter,
            spool.consumer("post"),
            flush_interval=0.1,
            max_events_in_memory=1_000,
            retry_initial=0.05,
            retry_max=0.5,
        )
        spool.start()
        pipeline = Pipeline([(scheduler, "feature")], exit_timeout=None, spool=spool)
        try:
            latencies = paced_adds(pipeline, seconds)
            assert spool.sync(10)
            stats = scheduler.stats()
        finally:
            pipeline.close(0.5)
    with capsys.disabled():
        print(f"\n[case 5, sink down, spool, {seconds:.0f} s] {latencies.line()}")
    assert stats.exported == 0
    assert exporter.attempts >= 2
    # Nothing dropped: every event is in the spool, waiting for the sink.
    assert stats.received == len(latencies.samples)
    assert stats.dropped == 0
    (durable,) = inspect_spool(directory)
    assert durable.pending == len(latencies.samples)
    assert latencies.rate >= 0.9 * RATE, latencies.line()
    assert latencies.quantile(0.99) <= P99_NS, latencies.line()
    assert latencies.quantile(0.999) <= P999_NS, latencies.line()


def test_add_event_stays_fast_with_a_spool_while_the_sink_is_down(
    sink_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_spool_case(sink_port, 3.0, tmp_path / "spool", capsys)


@pytest.mark.long
def test_add_event_stays_fast_with_a_spool_while_the_sink_is_down_for_30_seconds(
    sink_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_spool_case(sink_port, 30.0, tmp_path / "spool", capsys)


def test_the_same_exporter_delivers_when_the_sink_is_up(sink_port: int) -> None:
    """The control: the sink up, the same setup delivers everything (so 'down' above is
    the blackhole, not a broken exporter)."""
    with TcpProxy(sink_port) as proxy:
        exporter = PostExporter(url=proxy.url)
        scheduler = DataExporterScheduler(exporter, flush_interval=0.1, max_events_in_memory=500)
        scheduler.add_events([new_feature_event(f"u{i}", "flag", True, "on") for i in range(2_000)])
        assert wait_until(lambda: scheduler.stats().exported == 2_000, 10.0), scheduler.stats()
        assert scheduler.close(5.0)
        assert proxy.stats().bytes_up > 2_000 * 50
