"""Bounded shutdown of the built-in exporters (issue 8): ``close(1.0)`` returns within
1.1 s with a dead sink, and the exact number of undelivered events is in the stats and
in the log.

Dead sinks: the ``log`` exporter writes to a pipe nobody reads (a stalled log collector),
so its export blocks in ``write``; the ``file`` exporter's ``fsync`` hangs (a hung network
file system: injected, since no local file system can be made to hang on demand) or its
directory is gone (exports fail at once; the retry backoff outlasts the close budget).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flagsink import DataExporterScheduler
from flagsink.exporters import file as file_module
from flagsink.exporters.file import FileExporter
from flagsink.exporters.log import LogExporter
from flagsink.pipeline import Pipeline
from flagsink.scheduler import SchedulerStats
from flagsink.testing import sample_events, wait_until

TIMEOUT = 1.0
ALLOWANCE = 0.1
COUNT = 200
_UNDELIVERED = re.compile(r"exporter (\S+): .*?(\d+) events undelivered")


def undelivered(stats: SchedulerStats) -> int:
    return stats.dropped_by_reason.get("shutdown", 0) + stats.buffered + stats.in_flight


def logged_undelivered(caplog: pytest.LogCaptureFixture) -> dict[str, list[int]]:
    """Per scheduler name, the undelivered counts the scheduler logged."""
    found: dict[str, list[int]] = {}
    for record in caplog.records:
        match = _UNDELIVERED.match(record.getMessage())
        if record.name == "flagsink.scheduler" and match:
            found.setdefault(match.group(1), []).append(int(match.group(2)))
    return found


def new_scheduler(exporter: Any, name: str, **options: Any) -> DataExporterScheduler:
    options.setdefault("retry_initial", 30.0)
    options.setdefault("retry_max", max(30.0, options["retry_initial"]))
    return DataExporterScheduler(
        exporter, max_events_in_memory=COUNT, flush_interval=600.0, name=name, **options
    )


def timed_close(closable: Any) -> tuple[float, bool]:
    """``close(TIMEOUT)``: seconds taken (appended to $FLAGSINK_SHUTDOWN_TIMINGS, JSON
    lines, when set) and the result."""
    started = time.monotonic()
    delivered = closable.close(TIMEOUT)
    elapsed = time.monotonic() - started
    record = os.environ.get("FLAGSINK_SHUTDOWN_TIMINGS")
    if record:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(record, "a", encoding="utf-8") as out:
            out.write(json.dumps({"test": test, "case": "close", "seconds": elapsed}) + "\n")
    return elapsed, delivered


# -- dead sinks -----------------------------------------------------------------------------


class DeadLog:
    """A logger of its own (not propagating) whose only handler writes to a pipe of one
    page that nobody reads: once the pipe is full, writes block."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe()
        self.capacity = fcntl.fcntl(self.write_end, fcntl.F_SETPIPE_SZ, 4096)
        self.stream = os.fdopen(self.write_end, "w", buffering=1, encoding="utf-8")
        self.name = f"flagsink-test.dead-log.{id(self)}"
        self.handler = logging.StreamHandler(self.stream)
        self.logger = logging.getLogger(self.name)
        self.logger.addHandler(self.handler)
        self.logger.propagate = False
        #: Schedulers feeding this log: teardown waits until they stopped writing.
        self.schedulers: list[DataExporterScheduler] = []

    def stalled(self) -> bool:
        """The pipe is full: the next line (each is shorter than 1 KiB) blocks."""
        waiting = bytearray(4)
        fcntl.ioctl(self.read_end, termios.FIONREAD, waiting)
        return int.from_bytes(waiting, "little") > self.capacity - 1024

    def exporter(self) -> LogExporter:
        return LogExporter(loggerName=self.name)

    def release(self) -> None:
        """Read the pipe until every scheduler's export is over, then close it all, so no
        thread is left blocked holding the handler's lock (``logging.shutdown`` takes it
        at exit)."""
        stop = threading.Event()

        def drain() -> None:
            os.set_blocking(self.read_end, False)
            while not stop.is_set():
                try:
                    os.read(self.read_end, 65536)
                except BlockingIOError:
                    stop.wait(0.005)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        for scheduler in self.schedulers:
            scheduler.close(0)
            wait_until(lambda s=scheduler: not s.stats().in_flight and not s.stats().buffered)
        stop.set()
        reader.join(5)
        self.logger.removeHandler(self.handler)
        self.handler.close()
        self.stream.close()
        os.close(self.read_end)


@pytest.fixture
def dead_log(caplog: pytest.LogCaptureFixture) -> Iterator[DeadLog]:
    caplog.set_level(logging.INFO, logger="flagsink")
    log = DeadLog()
    try:
        yield log
    finally:
        log.release()


@pytest.fixture
def hung_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory whose files' ``fsync`` hangs until the test ends (a hung NFS mount);
    fsync of any other file works as usual."""
    directory = tmp_path / "hung"
    directory.mkdir()
    release = threading.Event()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(directory)):
            release.wait(60)
        real_fsync(fd)

    monkeypatch.setattr(file_module.os, "fsync", fsync)
    try:
        yield directory
    finally:
        release.set()


def in_flight(scheduler: DataExporterScheduler) -> bool:
    return scheduler.stats().in_flight > 0


# -- the tests ------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
def test_file_close_returns_in_time_while_fsync_hangs(
    hung_fsync: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flagsink")
    scheduler = new_scheduler(FileExporter(outputDir=str(hung_fsync)), "file-hung")
    scheduler.add_events(sample_events(COUNT))
    assert wait_until(lambda: in_flight(scheduler))

    elapsed, delivered = timed_close(scheduler)

    assert elapsed <= TIMEOUT + ALLOWANCE
    assert not delivered
    assert undelivered(scheduler.stats()) == COUNT
    assert logged_undelivered(caplog) == {"file-hung": [COUNT]}
    assert not [p for p in hung_fsync.iterdir() if not p.name.startswith(".")]


def test_file_close_returns_in_time_when_the_directory_is_gone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flagsink")
    directory = tmp_path / "gone"
    scheduler = new_scheduler(FileExporter(outputDir=str(directory)), "file-gone", retry_initial=5)
    directory.rmdir()
    directory.write_text("a file where the directory was\n")  # every export fails at once
    scheduler.add_events(sample_events(COUNT))
    assert wait_until(lambda: scheduler.stats().failed_attempts > 0)

    elapsed, delivered = timed_close(scheduler)

    assert elapsed <= TIMEOUT + ALLOWANCE
    assert not delivered
    stats = scheduler.stats()
    assert stats.dropped_by_reason == {"shutdown": COUNT}
    assert stats.exported == 0
    assert logged_undelivered(caplog) == {"file-gone": [COUNT]}


def test_log_close_returns_in_time_while_the_log_stream_is_stalled(
    dead_log: DeadLog, caplog: pytest.LogCaptureFixture
) -> None:
    scheduler = new_scheduler(dead_log.exporter(), "log-stalled")
    dead_log.schedulers.append(scheduler)
    scheduler.add_events(sample_events(COUNT))
    assert wait_until(lambda: in_flight(scheduler) and dead_log.stalled())

    elapsed, delivered = timed_close(scheduler)

    assert elapsed <= TIMEOUT + ALLOWANCE
    assert not delivered
    # The batch was being written when the stream stalled: every event of it counts as
    # undelivered (some of its lines may have reached the pipe: at least once, not lost).
    assert undelivered(scheduler.stats()) == COUNT
    assert logged_undelivered(caplog) == {"log-stalled": [COUNT]}


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc (Linux)")
def test_a_pipeline_closes_every_dead_exporter_within_one_budget(
    hung_fsync: Path, dead_log: DeadLog, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Three exporters, each dead its own way: closed in parallel, within one timeout."""
    gone = tmp_path / "gone"
    schedulers = [
        new_scheduler(FileExporter(outputDir=str(hung_fsync)), "file-hung"),
        new_scheduler(dead_log.exporter(), "log-stalled"),
        new_scheduler(FileExporter(outputDir=str(gone)), "file-gone", retry_initial=5),
    ]
    dead_log.schedulers.append(schedulers[1])
    gone.rmdir()
    gone.write_text("a file where the directory was\n")
    pipeline = Pipeline([(scheduler, "feature") for scheduler in schedulers], exit_timeout=None)
    for event in sample_events(COUNT, tracking_every=0):
        pipeline.add_event(event)
    assert wait_until(
        lambda: (
            in_flight(schedulers[0])
            and in_flight(schedulers[1])
            and dead_log.stalled()
            and schedulers[2].stats().failed_attempts > 0
        )
    )

    elapsed, delivered = timed_close(pipeline)

    assert elapsed <= TIMEOUT + ALLOWANCE
    assert not delivered
    assert [undelivered(s.stats()) for s in schedulers] == [COUNT] * 3
    assert logged_undelivered(caplog) == {
        "file-hung": [COUNT],
        "log-stalled": [COUNT],
        "file-gone": [COUNT],
    }
