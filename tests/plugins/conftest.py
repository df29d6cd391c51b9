"""Fixtures shared by every plugin's shutdown tests (issue 8, bounded shutdown).

- ``blackhole``: a sink dead from the start: a :class:`~flagsink.testing.faults.TcpProxy`
  in blackhole mode, which accepts connections and reads what clients send but never
  answers, so a client library blocks in I/O until its own timeout.
- ``refused_port``: a port with nothing listening (connections are refused at once).
- ``shutdown``: a :class:`ShutdownProbe` that waits (with deadlines) until an export is
  stuck or has failed, times ``DataExporterScheduler.close(1.0)``, checks the exact count
  of undelivered events in the stats and in the log, checks that no thread is left that
  would keep the interpreter from exiting, and runs a child interpreter that must exit in
  time with its export stuck.

Fixtures, not a module: the plugin test folders are imported in different ways (some are
packages, some are not), and every one of them sees the fixtures of this conftest.
"""

from __future__ import annotations

import concurrent.futures.thread
import itertools
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from flagsink import DataExporterScheduler
from flagsink.event import Event
from flagsink.testing import sample_events, wait_until
from flagsink.testing.faults import TcpProxy

#: The close budget of every shutdown test, and what the issue allows on top of it.
CLOSE_TIMEOUT = 1.0
ALLOWANCE = 0.1
#: Longest wait for an export to get stuck or to fail (client libraries, imports...).
SETTLE_TIMEOUT = 30.0
#: Most seconds a child interpreter may take to exit once close returned: the teardown of
#: the modules (tens of milliseconds, more on a loaded machine), never a wait for a thread.
EXIT_ALLOWANCE = 0.5
_UNDELIVERED = re.compile(r"(\d+) events undelivered")
_names = itertools.count()


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port bound (so nobody else takes it) but not listening: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.fixture
def blackhole(refused_port: int) -> Iterator[TcpProxy]:
    """A sink dead from the start (see the module docstring). Closing it at the end
    resets its connections, which unblocks the clients still waiting."""
    with TcpProxy(refused_port) as proxy:
        proxy.blackhole()
        yield proxy


def _threads_joined_at_exit() -> set[threading.Thread]:
    """Threads the interpreter waits for at exit: non-daemon threads, and the workers of
    every ``concurrent.futures.ThreadPoolExecutor`` (joined by an exit hook even when
    they are daemon threads, as they are when a daemon thread started the pool)."""
    threads = {t for t in threading.enumerate() if not t.daemon}
    threads.update(getattr(concurrent.futures.thread, "_threads_queues", {}))
    return {t for t in threads if t.is_alive()}


class ShutdownProbe:
    """Times ``close`` of a scheduler whose sink is dead; see the module docstring."""

    def __init__(self, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest) -> None:
        self.caplog = caplog
        self.request = request
        caplog.set_level(logging.INFO, logger="flagsink")
        self._threads_before = _threads_joined_at_exit()
        self._schedulers: list[DataExporterScheduler] = []

    @staticmethod
    def reached(proxy: TcpProxy) -> Callable[[], bool]:
        """True once the blackholed ``proxy`` has read bytes of a request."""
        return lambda: proxy.stats().bytes_discarded > 0

    def scheduler(self, exporter: Any, count: int, **options: Any) -> DataExporterScheduler:
        """A scheduler whose batches hold ``count`` events (a bulk exporter flushes as soon
        as they are added); no retry before the close deadline unless ``retry_initial``
        says otherwise."""
        options.setdefault("flush_interval", 600.0)
        options.setdefault("retry_initial", 30.0)
        options.setdefault("retry_max", max(30.0, options["retry_initial"]))
        # A name of its own: a scheduler of an earlier test, whose stuck export ends
        # later, logs its own count under its own name.
        options.setdefault("name", f"{exporter.kind}-{next(_names)}")
        scheduler = DataExporterScheduler(exporter, max_events_in_memory=count, **options)
        self._schedulers.append(scheduler)
        return scheduler

    def deliver(self, scheduler: DataExporterScheduler, count: int) -> None:
        """Export ``count`` events through a working sink (the setup is right)."""
        scheduler.add_events(sample_events(count, prefix="before"))
        if not wait_until(lambda: scheduler.stats().exported == count, SETTLE_TIMEOUT):
            pytest.fail(f"the live sink did not take {count} events: {scheduler.stats()}")

    # -- the two cases ----------------------------------------------------------------------

    def close_stuck(
        self,
        scheduler: DataExporterScheduler,
        count: int,
        *,
        sink_reached: Callable[[], bool] | None = None,
        events: list[Event] | None = None,
    ) -> float:
        """Add ``count`` events, wait until their export is in flight (and, with
        ``sink_reached``, until the dead sink holds the request), then time ``close``:
        it must return in time, report failure and account for every event."""
        before = scheduler.stats().exported
        scheduler.add_events(events if events is not None else sample_events(count))

        def stuck() -> bool:
            return scheduler.stats().in_flight > 0 and (sink_reached is None or sink_reached())

        if not wait_until(stuck, SETTLE_TIMEOUT):
            pytest.fail(f"no export in flight at the dead sink: {scheduler.stats()}")
        return self._close(scheduler, count, before, "stuck")

    def close_failed(self, scheduler: DataExporterScheduler, count: int) -> float:
        """Add ``count`` events, wait until their first export has failed (the scheduler
        then backs off for longer than the close budget), then time ``close``."""
        assert scheduler.retry_initial / 2 > CLOSE_TIMEOUT, "the backoff must outlast close"
        before = scheduler.stats().exported
        scheduler.add_events(sample_events(count))
        if not wait_until(lambda: scheduler.stats().failed_attempts > 0, SETTLE_TIMEOUT):
            pytest.fail(f"the export to the dead sink did not fail: {scheduler.stats()}")
        stats = scheduler.stats()
        assert stats.exported == before
        assert stats.buffered + stats.in_flight == count
        return self._close(scheduler, count, before, "refused")

    def _close(
        self, scheduler: DataExporterScheduler, count: int, exported: int, case: str
    ) -> float:
        self.caplog.clear()
        started = time.monotonic()
        delivered = scheduler.close(CLOSE_TIMEOUT)
        elapsed = time.monotonic() - started
        self._record(case, elapsed)
        stats = scheduler.stats()
        undelivered = stats.dropped_by_reason.get("shutdown", 0) + stats.buffered + stats.in_flight
        prefix = f"exporter {scheduler.name}:"
        logged = [
            int(match.group(1))
            for record in self.caplog.records
            if record.name == "flagsink.scheduler" and record.getMessage().startswith(prefix)
            for match in [_UNDELIVERED.search(record.getMessage())]
            if match
        ]
        assert elapsed <= CLOSE_TIMEOUT + ALLOWANCE, (
            f"close({CLOSE_TIMEOUT}) took {elapsed:.3f}s with a dead sink"
        )
        assert not delivered, "close reported success with events undelivered"
        assert stats.exported == exported, stats
        assert undelivered == count, stats
        assert logged == [count], f"expected one log line with {count} undelivered: {logged}"
        self.assert_no_thread_holds_the_interpreter()
        return elapsed

    def assert_no_thread_holds_the_interpreter(self) -> None:
        """No thread started since the test began would keep the interpreter from
        exiting (see :func:`_threads_joined_at_exit`)."""
        left = _threads_joined_at_exit() - self._threads_before
        assert not left, f"threads the exit waits for, after close: {sorted(map(str, left))}"

    # -- a child process ------------------------------------------------------------------

    def process_exits(
        self,
        kind: str,
        settings: Mapping[str, Any],
        count: int,
        *,
        sink_reached: Callable[[], bool],
        tmp_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> float:
        """In a child interpreter: build ``kind`` from ``settings``, get an export stuck
        at the dead sink, ``close(1.0)`` and return from the script. close must return in
        time there too, and the interpreter then exit within :data:`EXIT_ALLOWANCE` (no
        thread or exit handler waiting for the stuck export); a child still alive 5 s
        later dumps its threads' stacks into the failure message. Returns the seconds
        from the start of close to the exit."""
        log = tmp_path / f"{kind}-child.log"
        with open(log, "wb") as stderr:
            child = subprocess.Popen(
                [sys.executable, "-c", _CHILD, kind, json.dumps(dict(settings)), str(count)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
            )
        assert child.stdin is not None
        assert child.stdout is not None
        try:
            line = child.stdout.readline().decode()
            if line.strip() != "in-flight":
                child.wait(10)
                pytest.fail(f"child: {line!r}\n{log.read_text(errors='replace')[-3000:]}")
            if not wait_until(sink_reached, SETTLE_TIMEOUT):
                pytest.fail("the child's export never reached the dead sink")
            started = time.monotonic()
            child.stdin.write(b"close\n")
            child.stdin.flush()
            try:
                code = child.wait(10.0)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the child never exited:\n{log.read_text(errors='replace')[-6000:]}")
            exited = time.monotonic()
            elapsed = exited - started
            report = child.stdout.read().decode()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        text = log.read_text(errors="replace")
        assert code == 0, f"child exited with {code}: {report}\n{text[-6000:]}"
        result = json.loads(report)
        teardown = exited - result["returned_at"]
        self._record("close in child", result["elapsed"])
        self._record("interpreter exit after close", teardown)
        assert not result["delivered"]
        assert result["undelivered"] == count, result
        assert result["logged"] == [count], result
        assert result["elapsed"] <= CLOSE_TIMEOUT + ALLOWANCE, (
            f"close({CLOSE_TIMEOUT}) took {result['elapsed']:.3f}s in the child\n{text[-3000:]}"
        )
        assert teardown <= EXIT_ALLOWANCE, (
            f"the interpreter took {teardown:.3f}s to exit after close returned\n{text[-3000:]}"
        )
        return elapsed

    def _record(self, case: str, elapsed: float) -> None:
        """Append the figure to $FLAGSINK_SHUTDOWN_TIMINGS (JSON lines), when set."""
        path = os.environ.get("FLAGSINK_SHUTDOWN_TIMINGS")
        if path:
            entry = {"test": self.request.node.nodeid, "case": case, "seconds": elapsed}
            with open(path, "a", encoding="utf-8") as out:
                out.write(json.dumps(entry) + "\n")

    def release(self) -> None:
        for scheduler in self._schedulers:
            scheduler.close(0)


# The child of ShutdownProbe.process_exits. It prints "in-flight" once an export is under
# way, waits for the parent's go (the dead sink holds the request), closes, prints what
# close found, and returns: the interpreter must then exit with nothing left to wait for.
_CHILD = """
import faulthandler, json, logging, re, sys, time
from flagsink import DataExporterScheduler
from flagsink.plugins import default_registry
from flagsink.testing import sample_events, wait_until

class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []
    def emit(self, record):
        self.lines.append(record.getMessage())

kind, settings, count = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
lines = Lines()
logging.getLogger("flagsink.scheduler").addHandler(lines)
exporter = default_registry().exporter(kind)(**settings)
scheduler = DataExporterScheduler(
    exporter, max_events_in_memory=count, flush_interval=600, retry_initial=30, retry_max=30
)
scheduler.add_events(sample_events(count))
if not wait_until(lambda: scheduler.stats().in_flight > 0, 30):
    sys.exit(f"no export in flight: {scheduler.stats()}")
print("in-flight", flush=True)
sys.stdin.readline()
lines.lines.clear()
started = time.monotonic()
delivered = scheduler.close(1.0)
elapsed = time.monotonic() - started
stats = scheduler.stats()
left = stats.dropped_by_reason.get("shutdown", 0) + stats.buffered + stats.in_flight
found = map(re.compile(r"(\\d+) events undelivered").search, lines.lines)
logged = [int(match.group(1)) for match in found if match]
report = {"elapsed": elapsed, "delivered": delivered, "undelivered": left, "logged": logged}
report["returned_at"] = time.monotonic()  # one clock for both processes (CLOCK_MONOTONIC)
print(json.dumps(report), flush=True)
faulthandler.dump_traceback_later(5, exit=True)
"""


@pytest.fixture
def shutdown(
    caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> Iterator[ShutdownProbe]:
    probe = ShutdownProbe(caplog, request)
    try:
        yield probe
    finally:
        probe.release()
