"""Pipeline: routing by event type, isolation between exporters, parallel close, stats."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

from flagsink.event import Event, FeatureEvent, TrackingEvent, new_tracking_event
from flagsink.exporter import Exporter, ExportError, ExporterSettings
from flagsink.pipeline import Pipeline
from flagsink.scheduler import DataExporterScheduler
from flagsink.testing import wait_until as flagsink_wait_until

LONG = 60.0


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    return flagsink_wait_until(predicate, timeout, 0.002)


def fev(i: int) -> FeatureEvent:
    return FeatureEvent("user", f"u{i}", 1_700_000_000, "flag", "on", i, False, "1", "SERVER")


def tev(i: int) -> TrackingEvent:
    return new_tracking_event(f"u{i}", "checkout", {"n": i}, creation_date=1_700_000_000)


class Recording(Exporter[ExporterSettings]):
    kind = "recording"

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.events: list[Event] = []
        self.export_times: list[float] = []
        self.close_calls = 0

    def export(self, events: Sequence[Event]) -> None:
        self.deliver(events)
        with self.lock:
            self.events.extend(events)
            self.export_times.append(time.monotonic())

    def deliver(self, events: Sequence[Event]) -> None:
        """Hook: raise to fail, block to hang."""

    def close(self) -> None:
        self.close_calls += 1


class QueueRecording(Recording):
    kind = "queue-recording"
    bulk = False


class Blocking(Recording):
    kind = "blocking"

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def deliver(self, events: Sequence[Event]) -> None:
        self.entered.set()
        self.release.wait(30)


class Failing(Recording):
    kind = "failing"

    def deliver(self, events: Sequence[Event]) -> None:
        raise ExportError("sink down")


class Harness:
    def __init__(self) -> None:
        self.schedulers: list[DataExporterScheduler] = []

    def __call__(self, exporter: Recording, **kw: object) -> DataExporterScheduler:
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


def test_routes_feature_and_tracking_events_by_type(make: Harness) -> None:
    f1, f2, t1 = Recording(), QueueRecording(), Recording()
    pipeline = Pipeline(
        [
            (make(f1, name="f1"), "feature"),
            (make(f2, name="f2"), "feature"),
            (make(t1, name="t1"), "tracking"),
        ]
    )
    features = [fev(i) for i in range(5)]
    trackings = [tev(i) for i in range(3)]
    for i in range(5):
        pipeline.add_event(features[i])
        if i < 3:
            pipeline.add_event(trackings[i])
    pipeline.add_event({"kind": "feature"})  # type: ignore[arg-type]  # not an event: ignored
    assert pipeline.flush(5)
    assert f1.events == features
    assert f2.events == features
    assert t1.events == trackings
    # Shared by reference, not copied per exporter.
    assert all(a is b for a, b in zip(f1.events, f2.events, strict=True))
    assert all(a is b for a, b in zip(t1.events, trackings, strict=True))
    assert pipeline.close(5)


def test_rejects_unknown_event_type(make: Harness) -> None:
    with pytest.raises(ValueError, match="feature' or 'tracking"):
        Pipeline([(make(Recording()), "metrics")])


def test_hanging_exporter_does_not_delay_another(make: Harness) -> None:
    stuck, healthy = Blocking(), Recording()
    stuck_s = make(stuck, name="stuck", max_events_in_memory=10, max_buffered_events=100)
    healthy_s = make(healthy, name="healthy", max_events_in_memory=10, max_buffered_events=50)
    pipeline = Pipeline([(stuck_s, "feature"), (healthy_s, "feature")])
    for i in range(10):
        pipeline.add_event(fev(i))
    assert stuck.entered.wait(5)  # the first exporter is now hung for good
    total = 10
    start = time.perf_counter()
    add_time = 0.0
    for _chunk in range(100):
        t0 = time.perf_counter()
        for _ in range(40):  # under the healthy cap, so it can only drop if it stalls
            pipeline.add_event(fev(total))
            total += 1
        add_time += time.perf_counter() - t0
        # The healthy exporter keeps draining: its backlog returns below one batch.
        assert wait_until(lambda: healthy_s.stats().buffered < 10, timeout=5)
        stuck_stats = stuck_s.stats()
        assert stuck_stats.buffered <= 100  # the hung one's buffer stays capped
    assert time.perf_counter() - start < 20
    assert add_time < 1.0  # 4000 adds never waited on the hung exporter
    assert healthy_s.flush(5)
    healthy_stats, stuck_stats = healthy_s.stats(), stuck_s.stats()
    assert [e.value for e in healthy.events] == list(range(total))
    assert healthy_stats.exported == total
    assert healthy_stats.dropped == 0
    assert stuck_stats.in_flight == 10
    assert stuck_stats.buffered == 100
    assert stuck_stats.dropped_by_reason == {"overflow": total - 110}
    assert stuck_stats.received == total
    assert stuck.events == []


def test_flush_is_not_held_up_by_a_hanging_exporter(make: Harness) -> None:
    stuck, healthy = Blocking(), Recording()
    stuck_s = make(stuck, name="stuck")
    healthy_s = make(healthy, name="healthy")
    pipeline = Pipeline([(stuck_s, "feature"), (healthy_s, "feature")])
    for i in range(5):
        pipeline.add_event(fev(i))
    start = time.monotonic()
    assert pipeline.flush(0.5) is False  # the hung exporter cannot deliver
    elapsed = time.monotonic() - start
    assert 0.4 <= elapsed < 1.0
    # The healthy exporter was flushed right away, not after the hung one's share of time.
    assert [e.value for e in healthy.events] == list(range(5))
    assert healthy.export_times[0] - start < 0.3
    assert healthy_s.stats().buffered == 0


def test_flush_true_when_all_delivered_false_when_one_fails(make: Harness) -> None:
    ok, bad = Recording(), Failing()
    good = Pipeline([(make(ok), "feature"), (make(Recording()), "tracking")])
    for i in range(3):
        good.add_event(fev(i))
        good.add_event(tev(i))
    assert good.flush(5) is True
    assert len(ok.events) == 3
    mixed = Pipeline([(make(Recording()), "feature"), (make(bad, retry_initial=0.01), "feature")])
    mixed.add_event(fev(0))
    assert mixed.flush(5) is False


def test_close_closes_all_in_parallel_within_timeout(make: Harness) -> None:
    a, b, ok = Blocking(), Blocking(), Recording()
    sa, sb = make(a, name="a"), make(b, name="b")
    s_ok = make(ok, name="ok")
    pipeline = Pipeline([(sa, "feature"), (sb, "feature"), (s_ok, "feature")])
    pipeline.add_event(fev(0))
    sa.flush(0)
    sb.flush(0)
    assert a.entered.wait(5)
    assert b.entered.wait(5)
    pipeline.add_event(fev(1))
    start = time.monotonic()
    assert pipeline.close(0.5) is False
    elapsed = time.monotonic() - start
    # One shared deadline: ~0.5 s in total, not 0.5 s per hung exporter.
    assert 0.45 <= elapsed < 0.95
    # The healthy exporter made its final flush and was closed, despite the other two.
    assert [e.value for e in ok.events] == [0, 1]
    assert ok.close_calls == 1
    assert (a.close_calls, b.close_calls) == (0, 0)  # still inside export
    a.release.set()
    b.release.set()
    assert wait_until(lambda: a.close_calls == 1 and b.close_calls == 1)
    for stats in pipeline.stats():
        assert stats.received == 2
        assert stats.buffered == stats.in_flight == 0
        assert stats.exported + stats.dropped == 2
    # Idempotent; True now only if the released exporters still delivered event 1.
    assert pipeline.close(1) is all(s.dropped == 0 for s in pipeline.stats())
    assert (a.close_calls, b.close_calls, ok.close_calls) == (1, 1, 1)


def test_close_with_failing_exporters_in_parallel(make: Harness) -> None:
    x, y = Failing(), Failing()
    sx = make(x, name="x", retry_initial=0.02, retry_max=0.05)
    sy = make(y, name="y", retry_initial=0.02, retry_max=0.05)
    pipeline = Pipeline([(sx, "feature"), (sy, "tracking")])
    pipeline.add_event(fev(0))
    pipeline.add_event(tev(0))
    start = time.monotonic()
    assert pipeline.close(0.4) is False
    assert time.monotonic() - start < 0.4 + 0.15
    # Both kept retrying until the shared deadline (they ran side by side).
    assert len(x.export_times) == 0
    assert wait_until(lambda: x.close_calls == 1 and y.close_calls == 1, timeout=1)
    assert [s.dropped_by_reason for s in pipeline.stats()] == [{"shutdown": 1}] * 2
    assert sx.stats().failed_attempts >= 3
    assert sy.stats().failed_attempts >= 3


def test_stats_per_exporter(make: Harness) -> None:
    pipeline = Pipeline(
        [
            (make(Recording(), name="files"), "feature"),
            (make(QueueRecording(), name="logs"), "feature"),
            (make(Recording(), name="tracking-files"), "tracking"),
        ]
    )
    for i in range(4):
        pipeline.add_event(fev(i))
    pipeline.add_event(tev(0))
    assert pipeline.flush(5)
    stats = pipeline.stats()
    assert [s.exporter for s in stats] == ["files", "logs", "tracking-files"]
    assert [s.received for s in stats] == [4, 4, 1]
    assert [s.exported for s in stats] == [4, 4, 1]
    assert all(s.dropped == s.buffered == s.in_flight == 0 for s in stats)
    assert pipeline.close(5)


def test_context_manager_closes_and_delivers(make: Harness) -> None:
    f, t = Recording(), Recording()
    with Pipeline([(make(f), "feature"), (make(t), "tracking")]) as pipeline:
        for i in range(7):
            pipeline.add_event(fev(i))
        pipeline.add_event(tev(0))
        assert f.events == []  # bulk, long interval: nothing sent yet
    assert [e.value for e in f.events] == list(range(7))
    assert len(t.events) == 1
    assert (f.close_calls, t.close_calls) == (1, 1)
    assert [s.buffered for s in pipeline.stats()] == [0, 0]


def test_context_manager_closes_on_error(make: Harness) -> None:
    f = Recording()
    pipeline = Pipeline([(make(f), "feature")])

    def crash() -> None:
        with pipeline:
            pipeline.add_event(fev(0))
            raise RuntimeError("app crashed")

    with pytest.raises(RuntimeError, match="app crashed"):
        crash()
    assert [e.value for e in f.events] == [0]
    assert f.close_calls == 1


def test_add_events_routes_a_batch_like_add_event(make: Harness) -> None:
    f1, t1 = QueueRecording(), QueueRecording()
    pipeline = Pipeline([(make(f1, name="f1"), "feature"), (make(t1, name="t1"), "tracking")])
    batch: list[Event] = [fev(0), tev(0), fev(1), fev(2), tev(1)]
    pipeline.add_events(batch)
    assert wait_until(lambda: len(f1.events) == 3 and len(t1.events) == 2)
    assert f1.events == [batch[0], batch[2], batch[3]]
    assert t1.events == [batch[1], batch[4]]


def test_add_events_without_tracking_exporters_keeps_features_only(make: Harness) -> None:
    f1 = Recording()
    scheduler = make(f1, max_events_in_memory=3)
    pipeline = Pipeline([(scheduler, "feature")])
    pipeline.add_events([fev(0), tev(0), fev(1), fev(2)])
    # Three features reach the batch size: the worker flushes without waiting an interval.
    assert wait_until(lambda: len(f1.events) == 3)
    assert all(type(e) is FeatureEvent for e in f1.events)


def test_scheduler_add_events_respects_the_cap(make: Harness) -> None:
    blocked = Blocking()
    scheduler = make(blocked, max_events_in_memory=5, max_buffered_events=10)
    scheduler.add_events([fev(i) for i in range(5)])
    assert blocked.entered.wait(5)
    scheduler.add_events([fev(i) for i in range(100, 125)])
    stats = scheduler.stats()
    assert stats.buffered == 10
    assert stats.dropped_by_reason["overflow"] == 15
    assert stats.received == 30
