"""DataExporterScheduler semantics (issue 2 item 4, ARCHITECTURE.md "Scheduler semantics").

Every timing assertion waits on a condition with a deadline (``wait_until``); nothing sleeps
and hopes. Events carry their sequence number in ``value`` so tests can tell which survived.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flagsink.event import Event, FeatureEvent
from flagsink.exporter import (
    Exporter,
    ExportError,
    ExporterSettings,
    PartialExportError,
    PermanentExportError,
)
from flagsink.scheduler import DataExporterScheduler, SchedulerStats
from flagsink.testing import wait_until as flagsink_wait_until

LONG = 60.0  # a flush interval no test ever reaches


# -- helpers ----------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    return flagsink_wait_until(predicate, timeout, 0.002)


def ev(i: int, key: str = "flag") -> FeatureEvent:
    return FeatureEvent("user", f"u{i}", 1_700_000_000, key, "on", i, False, "1", "SERVER")


def values(events: Sequence[Event]) -> list[int]:
    return [e.value for e in events]  # type: ignore[union-attr]


def check_accounting(stats: SchedulerStats, received: int | None = None) -> None:
    assert stats.received == stats.exported + stats.dropped + stats.buffered + stats.in_flight
    assert stats.dropped == sum(stats.dropped_by_reason.values())
    if received is not None:
        assert stats.received == received


class Recording(Exporter[ExporterSettings]):
    """Records every successful batch, every attempt (time, values, thread) and close calls."""

    kind = "recording"
    bulk = True

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.batches: list[list[Event]] = []
        self.attempts: list[tuple[float, list[int]]] = []
        self.threads: set[str] = set()
        self.close_calls = 0
        self.exported_before_close: int | None = None

    def export(self, events: Sequence[Event]) -> None:
        batch = list(events)
        with self.lock:
            self.attempts.append((time.monotonic(), values(batch)))
            self.threads.add(threading.current_thread().name)
        try:
            self.deliver(batch)
        except PartialExportError as exc:
            # Everything not listed as failed or rejected was delivered.
            kept = {id(e) for e in [*exc.failed, *exc.rejected]}
            with self.lock:
                self.batches.append([e for e in batch if id(e) not in kept])
            raise
        with self.lock:
            self.batches.append(batch)

    def deliver(self, batch: list[Event]) -> None:
        """Hook for subclasses: raise to fail, block to hang."""

    def close(self) -> None:
        with self.lock:
            self.close_calls += 1
            self.exported_before_close = len(self.values)

    @property
    def values(self) -> list[int]:
        return [e.value for b in list(self.batches) for e in b]  # type: ignore[union-attr]

    @property
    def count(self) -> int:
        return sum(len(b) for b in list(self.batches))


class QueueRecording(Recording):
    kind = "queue-recording"
    bulk = False


class Scripted(Recording):
    """Runs one step per export call (then succeeds): a step returns an exception to raise."""

    def __init__(self, *steps: Callable[[list[Event]], BaseException | None]) -> None:
        super().__init__()
        self.steps = list(steps)

    def deliver(self, batch: list[Event]) -> None:
        with self.lock:
            step = self.steps.pop(0) if self.steps else None
        if step is not None and (error := step(batch)) is not None:
            raise error


class Failing(Recording):
    """Fails every call with ``make_error()`` (records attempts, never batches)."""

    def __init__(self, make_error: Callable[[], BaseException] = lambda: ExportError("down")):
        super().__init__()
        self.make_error = make_error

    def deliver(self, batch: list[Event]) -> None:
        raise self.make_error()


class QueueFailing(Failing):
    bulk = False


class Blocking(Recording):
    """Hangs in export until ``release`` is set; ``entered`` tells an export has begun."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def deliver(self, batch: list[Event]) -> None:
        self.entered.set()
        self.release.wait(30)


class QueueBlocking(Blocking):
    bulk = False


def fail(_batch: list[Event]) -> BaseException:
    return ExportError("temporarily down")


class Harness:
    """Creates schedulers and guarantees teardown: hanging exporters released, all closed."""

    def __init__(self) -> None:
        self.schedulers: list[DataExporterScheduler] = []

    def __call__(self, exporter: Exporter[ExporterSettings], **kw: object) -> DataExporterScheduler:
        kw.setdefault("flush_interval", LONG)
        scheduler = DataExporterScheduler(exporter, **kw)  # type: ignore[arg-type]
        self.schedulers.append(scheduler)
        return scheduler

    def teardown(self) -> None:
        for scheduler in self.schedulers:
            if isinstance(scheduler.exporter, Blocking):
                scheduler.exporter.release.set()
        for scheduler in self.schedulers:
            scheduler.close(0.5)


@pytest.fixture
def make() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.teardown()


# -- construction -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"flush_interval": 0},
        {"flush_interval": -1},
        {"max_events_in_memory": 0},
        {"max_events_in_memory": 10, "max_buffered_events": 9},
        {"retry_initial": 0},
        {"retry_initial": 2, "retry_max": 1},
    ],
)
def test_invalid_settings_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        DataExporterScheduler(Recording(), start=False, **kwargs)  # type: ignore[arg-type]


def test_defaults_and_name() -> None:
    scheduler = DataExporterScheduler(Recording(), max_events_in_memory=7, start=False)
    assert scheduler.max_buffered_events == 35
    assert scheduler.stats().exporter == "recording"
    named = DataExporterScheduler(Recording(), name="s3-main", start=False)
    assert named.stats().exporter == "s3-main"


# -- bulk mode --------------------------------------------------------------------------------


def test_bulk_flushes_when_max_events_in_memory_reached_before_interval(make: Harness) -> None:
    exporter = Recording()
    scheduler = make(exporter, max_events_in_memory=10)
    for i in range(25):
        scheduler.add_event(ev(i))
    # Two full batches go out at once; the interval (60 s) is nowhere near.
    assert wait_until(lambda: exporter.count == 20)
    assert [len(b) for b in exporter.batches] == [10, 10]
    assert exporter.values == list(range(20))
    stats = scheduler.stats()
    assert stats.buffered == 5
    check_accounting(stats, 25)
    assert scheduler.flush(5)
    assert exporter.values == list(range(25))
    assert [len(b) for b in exporter.batches] == [10, 10, 5]


def test_bulk_flushes_on_interval_with_fewer_events(make: Harness) -> None:
    exporter = Recording()
    start = time.monotonic()
    scheduler = make(exporter, flush_interval=0.2, max_events_in_memory=1000)
    for i in range(3):
        scheduler.add_event(ev(i))
    assert wait_until(lambda: exporter.count == 3)
    assert exporter.batches == [[ev(0), ev(1), ev(2)]]
    # Not sent before the interval elapsed (timers never fire early by more than a hair).
    assert exporter.attempts[0][0] - start >= 0.18
    # The interval keeps ticking: later events go out on a later tick.
    scheduler.add_event(ev(3))
    assert wait_until(lambda: exporter.count == 4)
    assert len(exporter.batches) == 2
    check_accounting(scheduler.stats(), 4)


def test_bulk_batches_bounded_and_order_preserved(make: Harness) -> None:
    exporter = Recording()
    scheduler = make(exporter, max_events_in_memory=7, max_buffered_events=1000)
    for i in range(500):
        scheduler.add_event(ev(i))
    assert scheduler.flush(5)
    assert exporter.values == list(range(500))
    assert max(len(b) for b in exporter.batches) <= 7
    assert all(b for b in exporter.batches)
    check_accounting(scheduler.stats(), 500)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    max_mem=st.integers(1, 20),
    extra_cap=st.integers(0, 40),
    n=st.integers(0, 120),
    bulk=st.booleans(),
)
def test_batching_property(max_mem: int, extra_cap: int, n: int, bulk: bool) -> None:
    exporter = Recording() if bulk else QueueRecording()
    scheduler = DataExporterScheduler(
        exporter,
        flush_interval=LONG,
        max_events_in_memory=max_mem,
        max_buffered_events=max_mem + extra_cap,
    )
    try:
        for i in range(n):
            scheduler.add_event(ev(i))
        assert scheduler.flush(5)
        # A fast exporter can still fall behind a tight loop: drops, if any, are the oldest.
        got = exporter.values
        assert got == sorted(got)
        assert all(0 < len(b) <= max_mem for b in exporter.batches)
        stats = scheduler.stats()
        check_accounting(stats, n)
        assert stats.exported == len(got)
        assert stats.dropped == stats.dropped_by_reason.get("overflow", 0)
        assert stats.buffered == stats.in_flight == 0
    finally:
        assert scheduler.close(5)
    assert exporter.close_calls == 1


# -- queue mode -------------------------------------------------------------------------------


def test_queue_mode_delivers_near_real_time(make: Harness) -> None:
    exporter = QueueRecording()
    scheduler = make(exporter, flush_interval=LONG, max_events_in_memory=1000)
    main = threading.current_thread().name
    for i in range(5):
        scheduler.add_event(ev(i))
        # Each event leaves well before any interval; nothing else pushes it.
        assert wait_until(lambda i=i: exporter.count == i + 1, timeout=2)
    assert exporter.values == list(range(5))
    # Sent from the background worker, never on the caller's thread.
    assert main not in exporter.threads
    assert exporter.threads == {"flagsink-queue-recording"}
    check_accounting(scheduler.stats(), 5)


def test_queue_mode_batches_what_is_waiting_in_order(make: Harness) -> None:
    exporter = QueueRecording()
    scheduler = make(exporter, max_events_in_memory=50, max_buffered_events=5000)
    for i in range(1000):
        scheduler.add_event(ev(i))
    assert wait_until(lambda: exporter.count == 1000)
    assert exporter.values == list(range(1000))
    assert max(len(b) for b in exporter.batches) <= 50


# -- retries ----------------------------------------------------------------------------------


def test_failed_batch_is_kept_and_retried_with_counters(make: Harness) -> None:
    exporter = Scripted(fail, fail)
    scheduler = make(exporter, max_events_in_memory=5, retry_initial=0.01, retry_max=0.05)
    before = time.time()
    for i in range(5):
        scheduler.add_event(ev(i))
    assert wait_until(lambda: exporter.count == 5)
    # The same batch, three times: twice failed, then delivered; never re-ordered or split.
    assert [v for _, v in exporter.attempts] == [list(range(5))] * 3
    stats = scheduler.stats()
    assert stats.failed_attempts == 2
    assert stats.retried == 10
    assert stats.exported == 5
    assert stats.dropped == 0
    assert stats.last_error == "ExportError: temporarily down"
    assert stats.last_error_time is not None
    assert before <= stats.last_error_time <= time.time()
    check_accounting(stats, 5)


def test_interval_batch_is_retried_after_backoff_not_after_next_interval(make: Harness) -> None:
    # A batch sent on the interval that fails is retried when its backoff expires, not
    # one flush_interval later.
    exporter = Scripted(fail)
    scheduler = make(exporter, flush_interval=0.2, retry_initial=0.01, retry_max=0.02)
    scheduler.add_event(ev(0))
    assert wait_until(lambda: exporter.count == 1)
    (t_fail, _), (t_ok, _) = exporter.attempts
    assert t_ok - t_fail < 0.15
    assert scheduler.stats().failed_attempts == 1


def test_backoff_grows_and_is_capped(make: Harness) -> None:
    exporter = Failing()
    initial, cap = 0.01, 0.08
    scheduler = make(exporter, max_events_in_memory=1, retry_initial=initial, retry_max=cap)
    scheduler.add_event(ev(0))
    attempts = 9
    assert wait_until(lambda: len(exporter.attempts) >= attempts)
    times = [t for t, _ in exporter.attempts[:attempts]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for k, gap in enumerate(gaps):
        nominal = min(cap, initial * 2**k)
        # Equal jitter: the delay is in [nominal/2, nominal); waits never end early.
        assert gap >= nominal / 2 - 0.002, (k, gaps)
        # Capped by retry_max; the slack absorbs scheduling delays on a busy machine
        # (without the cap the last gap would be ~1.3 s).
        assert gap < cap + 0.25, (k, gaps)
    # It grows: once the nominal delay exceeds the first delay's upper bound, every gap does.
    assert min(gaps[3:]) >= initial * 2**3 / 2 - 0.002
    assert min(gaps[3:]) > initial
    stats = scheduler.stats()
    assert stats.failed_attempts >= attempts
    assert stats.exported == 0
    assert stats.retried >= attempts
    check_accounting(stats, 1)


def test_add_event_does_not_cut_backoff_short(make: Harness) -> None:
    exporter = Scripted(fail)
    scheduler = make(
        exporter,
        max_events_in_memory=1,
        max_buffered_events=100,
        retry_initial=0.3,
        retry_max=0.3,
    )
    scheduler.add_event(ev(0))
    assert wait_until(lambda: len(exporter.attempts) == 1)
    t_fail = exporter.attempts[0][0]
    for i in range(1, 20):  # each add reaches the batch size
        scheduler.add_event(ev(i))
    assert wait_until(lambda: exporter.count == 20)
    assert exporter.attempts[1][0] - t_fail >= 0.15 - 0.002  # jittered 0.3 s is >= 0.15 s
    assert exporter.values == list(range(20))  # the retried event still goes first


class Throttled(ExportError):
    """A sink's "come back later" with the delay it asked for (e.g. HTTP Retry-After)."""

    def __init__(self, retry_after: object) -> None:
        super().__init__("throttled")
        self.retry_after = retry_after


def test_retry_after_on_the_error_delays_the_retry_up_to_retry_max(make: Harness) -> None:
    exporter = Scripted(
        lambda b: Throttled(0.3), lambda b: Throttled(5.0), lambda b: Throttled("soon")
    )
    scheduler = make(exporter, max_events_in_memory=1, retry_initial=0.01, retry_max=0.5)
    scheduler.add_event(ev(0))
    assert wait_until(lambda: exporter.count == 1)
    times = [t for t, _ in exporter.attempts]
    assert len(times) == 4
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] >= 0.3 - 0.002, gaps  # honoured: the backoff alone is < 0.01 s
    assert 0.5 - 0.002 <= gaps[1] < 0.5 + 0.25, gaps  # 5 s asked, capped by retry_max
    assert gaps[2] < 0.25, gaps  # not a number: ignored, plain backoff (< 0.04 s)
    stats = scheduler.stats()
    assert (stats.exported, stats.failed_attempts, stats.dropped) == (1, 3, 0)
    check_accounting(stats, 1)


def test_partial_failure_retries_only_failed_and_drops_rejected(make: Harness) -> None:
    def partial(batch: list[Event]) -> BaseException:
        return PartialExportError("2 throttled, 1 invalid", failed=batch[1:3], rejected=batch[3:4])

    exporter = Scripted(partial)
    scheduler = make(exporter, max_events_in_memory=6, retry_initial=0.01, retry_max=0.02)
    for i in range(6):
        scheduler.add_event(ev(i))
    assert wait_until(lambda: len(exporter.attempts) == 2)
    assert [v for _, v in exporter.attempts] == [list(range(6)), [1, 2]]
    assert wait_until(lambda: scheduler.stats().exported == 5)
    stats = scheduler.stats()
    assert stats.exported == 5  # 0, 4, 5 at first; then 1, 2
    assert stats.retried == 2
    assert stats.failed_attempts == 1
    assert stats.dropped_by_reason == {"rejected": 1}
    assert stats.last_error == "PartialExportError: 2 throttled, 1 invalid"
    check_accounting(stats, 6)


def test_partial_failure_with_only_rejected_does_not_retry(make: Harness) -> None:
    exporter = Scripted(lambda b: PartialExportError("bad", rejected=b[:1]))
    scheduler = make(exporter, max_events_in_memory=3, retry_initial=0.01, retry_max=0.02)
    for i in range(3):
        scheduler.add_event(ev(i))
    assert scheduler.flush(5)
    stats = scheduler.stats()
    assert len(exporter.attempts) == 1
    assert stats.exported == 2
    assert stats.retried == 0
    assert stats.dropped_by_reason == {"rejected": 1}
    check_accounting(stats, 3)


def test_permanent_error_drops_batch_as_rejected(make: Harness) -> None:
    exporter = Scripted(lambda b: PermanentExportError("schema mismatch"))
    scheduler = make(exporter, max_events_in_memory=4, retry_initial=0.01, retry_max=0.02)
    for i in range(8):
        scheduler.add_event(ev(i))
    assert wait_until(lambda: scheduler.stats().exported == 4)
    assert scheduler.flush(5)
    stats = scheduler.stats()
    assert [v for _, v in exporter.attempts] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert exporter.values == [4, 5, 6, 7]
    assert stats.dropped_by_reason == {"rejected": 4}
    assert stats.retried == 0
    assert stats.failed_attempts == 1
    assert stats.last_error == "PermanentExportError: schema mismatch"
    check_accounting(stats, 8)


def test_arbitrary_exception_is_retried(make: Harness) -> None:
    exporter = Scripted(lambda b: ZeroDivisionError("oops"), lambda b: KeyError("k"))
    scheduler = make(exporter, max_events_in_memory=2, retry_initial=0.01, retry_max=0.02)
    scheduler.add_event(ev(0))
    scheduler.add_event(ev(1))
    assert wait_until(lambda: exporter.count == 2)
    stats = scheduler.stats()
    assert stats.failed_attempts == 2
    assert stats.last_error == "KeyError: 'k'"
    assert stats.exported == 2
    # The worker survived both and keeps going.
    scheduler.add_event(ev(2))
    scheduler.add_event(ev(3))
    assert wait_until(lambda: exporter.count == 4)


Outcome = tuple[str, float, float]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    outcomes=st.lists(
        st.tuples(
            st.sampled_from(["ok", "fail", "partial", "permanent"]),
            st.floats(0, 1),
            st.floats(0, 1),
        ),
        max_size=8,
    ),
    n=st.integers(1, 40),
    max_mem=st.integers(1, 10),
)
def test_failures_deliver_each_event_at_most_once_property(
    outcomes: list[Outcome], n: int, max_mem: int
) -> None:
    """Any mix of failures: delivered + rejected partition the events, nothing twice."""
    rejected: list[int] = []

    def step(kind: str, a: float, b: float) -> Callable[[list[Event]], BaseException | None]:
        def run(batch: list[Event]) -> BaseException | None:
            if kind == "ok":
                return None
            if kind == "fail":
                return ExportError("x")
            if kind == "permanent":
                rejected.extend(values(batch))
                return PermanentExportError("x")
            cut1 = int(a * len(batch))
            cut2 = cut1 + int(b * (len(batch) - cut1))
            rejected.extend(values(batch[cut1:cut2]))
            return PartialExportError("x", failed=batch[:cut1], rejected=batch[cut1:cut2])

        return run

    exporter = Scripted(*(step(*o) for o in outcomes))
    scheduler = DataExporterScheduler(
        exporter,
        flush_interval=LONG,
        max_events_in_memory=max_mem,
        max_buffered_events=100,
        retry_initial=0.001,
        retry_max=0.002,
    )
    for i in range(n):
        scheduler.add_event(ev(i))
    assert scheduler.close(10)
    delivered = exporter.values
    assert len(delivered) == len(set(delivered))
    assert sorted(delivered + rejected) == list(range(n))
    stats = scheduler.stats()
    check_accounting(stats, n)
    assert stats.exported == len(delivered)
    assert stats.dropped_by_reason.get("rejected", 0) == len(rejected)
    assert stats.dropped == len(rejected)
    assert exporter.close_calls == 1


# -- bounded buffer ---------------------------------------------------------------------------


def test_buffer_cap_drops_oldest_with_blocked_exporter(
    make: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="flagsink.scheduler")
    exporter = Blocking()
    scheduler = make(exporter, max_events_in_memory=10, max_buffered_events=50)
    for i in range(10):
        scheduler.add_event(ev(i))
    assert exporter.entered.wait(5)  # events 0..9 are in flight, the export hangs
    for i in range(10, 1010):
        scheduler.add_event(ev(i))
        assert scheduler.stats().buffered <= 50
    stats = scheduler.stats()
    assert stats.buffered == 50
    assert stats.in_flight == 10
    assert stats.dropped_by_reason == {"overflow": 950}
    check_accounting(stats, 1010)
    exporter.release.set()
    assert scheduler.flush(5)
    # The in-flight batch, then the 50 newest: the oldest waiting events went first.
    assert exporter.values == list(range(10)) + list(range(960, 1010))
    assert scheduler.close(5)
    warned = [r.getMessage() for r in caplog.records if "dropped the" in r.getMessage()]
    assert warned
    counts = [int(re.search(r"dropped the (\d+) oldest", m).group(1)) for m in warned]  # type: ignore[union-attr]
    assert sum(counts) == 950
    assert "950 in total" in warned[-1]
    assert all(r.levelno == logging.WARNING for r in caplog.records if "dropped the" in r.message)


def test_buffer_cap_with_failing_exporter_under_concurrent_adds(
    make: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="flagsink.scheduler")
    exporter = Failing()
    cap = 200
    scheduler = make(
        exporter,
        max_events_in_memory=50,
        max_buffered_events=cap,
        retry_initial=0.001,
        retry_max=0.002,
    )
    threads_n, per_thread = 3, 5000
    seen: list[int] = []
    stop = threading.Event()

    def monitor() -> None:
        while not stop.is_set():
            stats = scheduler.stats()
            check_accounting(stats)
            seen.append(stats.buffered)

    def produce(t: int) -> None:
        for i in range(per_thread):
            scheduler.add_event(ev(t * per_thread + i))

    watcher = threading.Thread(target=monitor)
    watcher.start()
    producers = [threading.Thread(target=produce, args=(t,)) for t in range(threads_n)]
    for p in producers:
        p.start()
    for p in producers:
        p.join()
    stop.set()
    watcher.join()
    # Slack: add_event appends first and trims after (no lock on the fast path), so a
    # snapshot can catch each producer thread between the two: at most one extra per thread.
    assert max(seen) <= cap + threads_n
    assert scheduler.stats().buffered <= cap
    stats = scheduler.stats()
    check_accounting(stats, threads_n * per_thread)
    assert stats.exported == 0
    assert stats.dropped_by_reason["overflow"] >= threads_n * per_thread - cap - 50
    assert stats.failed_attempts >= 1
    assert scheduler.close(0.2) is False
    assert any(
        "dropped the" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records
    )


def test_retried_batch_does_not_push_buffer_over_cap(make: Harness) -> None:
    # The buffer is full while a batch is in flight; when that batch fails and goes back
    # to the front, the cap must hold at once (the retried events are the oldest), not only
    # from the worker's next cycle on.
    class HangThenFail(Blocking):
        failing = True

        def deliver(self, batch: list[Event]) -> None:
            super().deliver(batch)
            if self.failing:
                raise ExportError("down")

    exporter = HangThenFail()
    scheduler = make(exporter, max_events_in_memory=10, max_buffered_events=20, retry_initial=5)
    seen: list[SchedulerStats] = []

    class Probe(logging.Handler):
        # Runs on the worker thread while it logs the failure: after the failed batch went
        # back to the buffer, before the worker does anything else.
        def emit(self, record: logging.LogRecord) -> None:
            if "failed (attempt" in record.getMessage():
                seen.append(scheduler.stats())

    probe = Probe(logging.WARNING)
    log = logging.getLogger("flagsink.scheduler")
    log.addHandler(probe)
    try:
        for i in range(10):
            scheduler.add_event(ev(i))
        assert exporter.entered.wait(5)
        for i in range(10, 30):
            scheduler.add_event(ev(i))
        assert scheduler.stats().buffered == 20
        exporter.release.set()
        assert wait_until(lambda: len(seen) == 1)
    finally:
        log.removeHandler(probe)
    assert seen[0].buffered == 20
    assert seen[0].in_flight == 0
    assert seen[0].dropped_by_reason == {"overflow": 10}
    check_accounting(seen[0], 30)
    # The survivors are the 20 newest; they go out in order.
    exporter.failing = False
    assert scheduler.flush(5)
    assert exporter.values == list(range(10, 30))


# -- accounting -------------------------------------------------------------------------------


def test_accounting_under_concurrent_adds_and_flaky_exporter(make: Harness) -> None:
    calls = {"n": 0}
    rejected: list[int] = []
    lock = threading.Lock()

    def flaky(batch: list[Event]) -> BaseException | None:
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if n % 7 == 0:
            return ExportError("flaky")
        if n % 11 == 0:
            rejected.extend(values(batch[:1]))
            return PartialExportError("partial", failed=batch[1:3], rejected=batch[:1])
        return None

    class Flaky(Recording):
        def deliver(self, batch: list[Event]) -> None:
            if (error := flaky(batch)) is not None:
                raise error

    exporter = Flaky()
    scheduler = make(
        exporter,
        max_events_in_memory=500,
        max_buffered_events=5000,
        retry_initial=0.001,
        retry_max=0.005,
    )
    threads_n, per_thread = 4, 20_000
    progress = [0] * threads_n
    stop = threading.Event()
    violations: list[str] = []
    snapshots = [0]

    def produce(t: int) -> None:
        for i in range(per_thread):
            scheduler.add_event(ev(t * per_thread + i))
            progress[t] = i + 1

    def monitor() -> None:
        last = 0
        while not stop.is_set():
            before = sum(progress)
            stats = scheduler.stats()
            after = sum(progress)
            snapshots[0] += 1
            if stats.received != (
                stats.exported + stats.dropped + stats.buffered + stats.in_flight
            ):
                violations.append(f"identity {stats}")
            # Received counts every event handed over: at least what was counted before the
            # snapshot, at most what was counted after plus one appended-not-yet-counted per
            # producer; and it never goes backwards.
            if not before <= stats.received <= after + threads_n:
                violations.append(f"received {stats.received} not in [{before}, {after}]")
            if stats.received < last:
                violations.append(f"received went back {last} -> {stats.received}")
            last = stats.received

    watcher = threading.Thread(target=monitor)
    watcher.start()
    producers = [threading.Thread(target=produce, args=(t,)) for t in range(threads_n)]
    for p in producers:
        p.start()
    for p in producers:
        p.join()
    assert scheduler.close(10)
    stop.set()
    watcher.join()
    assert not violations, violations[:5]
    assert snapshots[0] > 10
    total = threads_n * per_thread
    stats = scheduler.stats()
    check_accounting(stats, total)
    delivered = exporter.values
    assert len(delivered) == len(set(delivered))  # nothing delivered twice
    assert stats.exported == len(delivered)
    assert stats.dropped_by_reason.get("rejected", 0) == len(rejected)
    overflow = stats.dropped_by_reason.get("overflow", 0)
    assert len(delivered) + len(rejected) + overflow == total
    assert stats.dropped_by_reason.keys() <= {"rejected", "overflow"}


# -- add_event never blocks, never raises -----------------------------------------------------


@pytest.mark.parametrize("exporter_cls", [Blocking, QueueBlocking])
def test_add_event_never_blocks_while_exporter_hangs(
    make: Harness, exporter_cls: type[Blocking]
) -> None:
    exporter = exporter_cls()
    scheduler = make(exporter, max_events_in_memory=100, max_buffered_events=1000)
    scheduler.add_event(ev(-1))
    scheduler.flush(0)  # makes a bulk exporter start at once too
    assert exporter.entered.wait(5)
    start = time.perf_counter()
    for i in range(10_000):
        scheduler.add_event(ev(i))
    elapsed = time.perf_counter() - start
    # ~1-20 ms in practice; a blocked call would take the whole 30 s hang.
    assert elapsed < 1.0
    stats = scheduler.stats()
    assert stats.buffered == 1000
    assert stats.in_flight == 1
    assert stats.dropped_by_reason == {"overflow": 9000}
    check_accounting(stats, 10_001)


def test_add_event_never_raises(make: Harness) -> None:
    scheduler = make(
        Failing(lambda: RuntimeError("boom")),
        max_events_in_memory=1,
        max_buffered_events=3,
        retry_initial=0.001,
        retry_max=0.001,
    )
    for i in range(100):
        scheduler.add_event(ev(i))
    scheduler.close(0.1)
    # Adding after close still never raises (the event just is not exported).
    scheduler.add_event(ev(100))
    check_accounting(scheduler.stats())


# -- flush ------------------------------------------------------------------------------------


def test_flush_exports_everything_and_returns_true(make: Harness) -> None:
    exporter = Recording()
    scheduler = make(exporter, max_events_in_memory=1000)
    assert scheduler.flush(5)  # nothing to do
    for i in range(123):
        scheduler.add_event(ev(i))
    assert exporter.count == 0
    assert scheduler.flush(5)
    assert exporter.values == list(range(123))
    stats = scheduler.stats()
    assert stats.buffered == stats.in_flight == 0
    check_accounting(stats, 123)


def test_flush_ignores_backoff(make: Harness) -> None:
    exporter = Scripted(fail)
    scheduler = make(exporter, max_events_in_memory=1, retry_initial=30, retry_max=30)
    scheduler.add_event(ev(0))
    assert wait_until(lambda: scheduler.stats().failed_attempts == 1)
    start = time.monotonic()
    assert scheduler.flush(5)
    assert time.monotonic() - start < 2
    assert exporter.values == [0]


def test_flush_returns_false_when_exporter_fails(make: Harness) -> None:
    exporter = Failing()
    scheduler = make(exporter, max_events_in_memory=1000, retry_initial=0.01, retry_max=0.02)
    for i in range(5):
        scheduler.add_event(ev(i))
    start = time.monotonic()
    assert scheduler.flush(5) is False
    assert time.monotonic() - start < 2  # it reports the failure, it does not wait it out
    stats = scheduler.stats()
    assert stats.buffered == 5  # kept for retry
    check_accounting(stats, 5)


def test_flush_with_hanging_exporter_times_out(make: Harness) -> None:
    exporter = Blocking()
    scheduler = make(exporter)
    scheduler.add_event(ev(0))
    start = time.monotonic()
    assert scheduler.flush(0.2) is False
    assert 0.15 <= time.monotonic() - start < 1.5


# -- close ------------------------------------------------------------------------------------


def test_close_final_flush_delivers_everything(make: Harness) -> None:
    exporter = Recording()
    scheduler = make(exporter, max_events_in_memory=40)
    for i in range(100):
        scheduler.add_event(ev(i))
    assert scheduler.close(5) is True
    assert exporter.values == list(range(100))
    assert exporter.close_calls == 1
    assert exporter.exported_before_close == 100  # close() after the last export
    stats = scheduler.stats()
    assert stats.dropped == 0
    check_accounting(stats, 100)


def test_close_is_idempotent(make: Harness) -> None:
    exporter = QueueRecording()
    scheduler = make(exporter)
    scheduler.add_event(ev(0))
    assert scheduler.close(5)
    assert scheduler.close(5)
    assert scheduler.close(0)
    assert exporter.close_calls == 1
    assert exporter.values == [0]


def test_close_without_start_runs_final_flush_inline() -> None:
    exporter = Recording()
    scheduler = DataExporterScheduler(exporter, start=False)
    scheduler.add_event(ev(0))
    scheduler.add_event(ev(1))
    assert scheduler.close(5)
    assert scheduler.close(5)
    assert exporter.values == [0, 1]
    assert exporter.close_calls == 1


def test_close_with_hanging_exporter_returns_within_timeout(
    make: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="flagsink.scheduler")
    exporter = Blocking()
    scheduler = make(exporter, max_events_in_memory=5)
    for i in range(8):
        scheduler.add_event(ev(i))
    assert exporter.entered.wait(5)
    start = time.monotonic()
    assert scheduler.close(0.3) is False
    elapsed = time.monotonic() - start
    assert 0.25 <= elapsed < 0.3 + 0.2
    assert any("close timed out" in r.getMessage() for r in caplog.records)
    check_accounting(scheduler.stats(), 8)
    # When the hung export finally returns, the worker finishes: exporter.close() runs once,
    # and what the deadline left behind is counted as dropped at shutdown.
    exporter.release.set()
    assert wait_until(lambda: exporter.close_calls == 1)
    assert exporter.values == [0, 1, 2, 3, 4]
    stats = scheduler.stats()
    assert stats.dropped_by_reason == {"shutdown": 3}
    check_accounting(stats, 8)
    assert scheduler.close(1) is False
    assert exporter.close_calls == 1


@pytest.mark.parametrize(("retry_initial", "timeout"), [(0.05, 0.4), (0.01, 0.3)])
def test_close_with_failing_exporter_drops_leftovers_as_shutdown(
    make: Harness, caplog: pytest.LogCaptureFixture, retry_initial: float, timeout: float
) -> None:
    caplog.set_level(logging.ERROR, logger="flagsink.scheduler")
    exporter = Failing()
    scheduler = make(exporter, max_events_in_memory=100, retry_initial=retry_initial, retry_max=0.1)
    for i in range(10):
        scheduler.add_event(ev(i))
    start = time.monotonic()
    assert scheduler.close(timeout) is False
    elapsed = time.monotonic() - start
    assert elapsed < timeout + 0.1
    assert len(exporter.attempts) >= 3  # the final flush kept retrying with backoff
    # Normally accounted before close returns. A retry that fails a hair before the deadline
    # can leave the worker's last bookkeeping a moment after it, hence the short wait.
    assert wait_until(lambda: exporter.close_calls == 1, timeout=1)
    stats = scheduler.stats()
    assert stats.dropped_by_reason == {"shutdown": 10}
    assert stats.buffered == stats.in_flight == 0
    check_accounting(stats, 10)
    assert any("closed with 10 events undelivered" in r.getMessage() for r in caplog.records)
    assert scheduler.close(1) is False
    assert exporter.close_calls == 1


def test_close_gives_up_when_no_retry_fits_before_deadline(
    make: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="flagsink.scheduler")
    exporter = Failing()
    scheduler = make(exporter, retry_initial=2.0, retry_max=2.0)
    for i in range(10):
        scheduler.add_event(ev(i))
    start = time.monotonic()
    assert scheduler.close(0.5) is False
    # The first retry would come >= 1 s later: past the deadline, so close accounts for the
    # leftovers right after the failed attempt instead of idling until the deadline.
    assert time.monotonic() - start < 0.4
    assert len(exporter.attempts) == 1
    stats = scheduler.stats()
    assert stats.dropped_by_reason == {"shutdown": 10}
    assert stats.buffered == stats.in_flight == 0
    check_accounting(stats, 10)
    assert exporter.close_calls == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("closed with 10 events undelivered" in m for m in messages)
    assert not any("close timed out" in m for m in messages)


def test_close_retries_until_delivered_within_timeout(make: Harness) -> None:
    exporter = Scripted(fail, fail, fail)
    scheduler = make(exporter, retry_initial=0.01, retry_max=0.05)
    for i in range(10):
        scheduler.add_event(ev(i))
    assert scheduler.close(5) is True
    assert exporter.values == list(range(10))
    assert scheduler.stats().failed_attempts == 3


def test_exporter_close_error_is_logged_not_raised(
    make: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    class BadClose(Recording):
        def close(self) -> None:
            super().close()
            raise OSError("connection reset")

    exporter = BadClose()
    scheduler = make(exporter)
    scheduler.add_event(ev(0))
    assert scheduler.close(5)
    assert exporter.close_calls == 1
    assert any("close() failed" in r.getMessage() for r in caplog.records)


# -- fork safety ------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only")
def test_fork_child_starts_fresh_and_exports_only_its_own_events() -> None:
    exporter = Recording()
    scheduler = DataExporterScheduler(exporter, max_events_in_memory=10)
    try:
        for i in range(5):  # below the batch size: buffered in the parent at fork time
            scheduler.add_event(ev(i))
        assert exporter.count == 0
        read_fd, write_fd = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # multi-threaded fork, 3.12+
            pid = os.fork()
        if pid == 0:  # child: report and leave without running any pytest machinery
            code = 1
            try:
                os.close(read_fd)
                report: dict[str, object] = {"buffered_at_start": scheduler.stats().buffered}
                for i in range(100, 110):  # a full batch: the worker must send it alone
                    scheduler.add_event(ev(i))
                report["worker_ran"] = wait_until(lambda: exporter.count == 10, timeout=5)
                for i in range(110, 113):
                    scheduler.add_event(ev(i))
                report["closed"] = scheduler.close(5)
                report["values"] = exporter.values
                report["threads"] = sorted(exporter.threads)
                report["stats"] = scheduler.stats().__dict__
                with os.fdopen(write_fd, "w") as out:
                    json.dump(report, out)
                code = 0
            finally:
                os._exit(code)
        os.close(write_fd)
        with os.fdopen(read_fd) as inp:
            raw = inp.read()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, raw
        child = json.loads(raw)
        assert child["buffered_at_start"] == 0
        assert child["worker_ran"] is True
        assert child["closed"] is True
        assert child["values"] == list(range(100, 113))
        assert child["threads"] == ["flagsink-recording"]
        assert child["stats"]["received"] == 13
        assert child["stats"]["exported"] == 13
        # The parent still holds, and exports, exactly its own events.
        assert scheduler.stats().buffered == 5
        for i in range(5, 10):
            scheduler.add_event(ev(i))
        assert wait_until(lambda: exporter.count == 10)
    finally:
        assert scheduler.close(5)
    assert exporter.values == list(range(10))
    check_accounting(scheduler.stats(), 10)
