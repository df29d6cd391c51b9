"""The exporter contract: pytest checks every exporter plugin must pass.

Subclass :class:`ExporterContract` in a test module named ``test_*.py`` and provide four
fixtures, all against the real server::

    class TestS3Contract(ExporterContract):
        @pytest.fixture
        def new_exporter(self, s3_server):          # factory: overrides -> a new exporter
            return lambda **overrides: S3Exporter(bucket="events", **overrides)

        @pytest.fixture
        def read_back(self, s3_server):             # everything the sink holds now
            return lambda: [json.loads(line) for line in ...]

        @pytest.fixture
        def sink_outage(self, s3_server):           # context manager: sink unreachable
            return s3_server.stopped

        @pytest.fixture
        def invalid_settings(self):                 # option sets that must be rejected
            return [{"bucket": ""}, {"unknownKey": 1}]

``read_back`` returns records shaped like :meth:`ExporterContract.expected` (the event's
GO Feature Flag JSON as a dict, unless the subclass overrides it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import msgspec
import pytest
from pydantic import ValidationError

from flagsink.event import Event, FeatureEvent
from flagsink.exporter import Exporter, PartialExportError, SettingsError
from flagsink.scheduler import DataExporterScheduler
from flagsink.testing.memory import sample_events, wait_until

__all__ = ["ExporterContract"]

NewExporter = Callable[..., Exporter[Any]]
ReadBack = Callable[[], list[Any]]


def _canonical(records: Sequence[Any]) -> list[str]:
    return sorted(json.dumps(record, sort_keys=True) for record in records)


class ExporterContract:
    """Checks shared by every exporter: round trip, retry on failure, rejected events,
    flush on close, settings validation. Override the class attributes to tune sizes."""

    event_count = 1_000
    timeout = 30.0

    def expected(self, event: Event) -> Any:
        """The record ``read_back`` returns for ``event`` (its JSON as a dict)."""
        return msgspec.json.decode(msgspec.json.encode(event))

    def assert_delivered(self, read_back: ReadBack, events: Sequence[Event]) -> None:
        """Wait until the sink holds exactly ``events`` (each once), then compare them."""
        want = _canonical([self.expected(event) for event in events])
        wait_until(lambda: len(read_back()) >= len(want), self.timeout)
        got = _canonical(read_back())
        missing = len(set(want) - set(got))
        assert got == want, f"sink holds {len(got)} records, want {len(want)}; missing {missing}"

    @pytest.fixture
    def scheduler_factory(self) -> Iterator[Callable[..., DataExporterScheduler]]:
        """Schedulers closed at teardown."""
        made: list[DataExporterScheduler] = []

        def make(exporter: Exporter[Any], **options: Any) -> DataExporterScheduler:
            scheduler = DataExporterScheduler(exporter, **options)
            made.append(scheduler)
            return scheduler

        yield make
        for scheduler in made:
            scheduler.close(1.0)

    def test_round_trip_of_feature_and_tracking_events(
        self, new_exporter: NewExporter, read_back: ReadBack
    ) -> None:
        events = sample_events(self.event_count)
        exporter = new_exporter()
        try:
            exporter.export(events)
        finally:
            exporter.close()
        self.assert_delivered(read_back, events)

    def test_close_flushes_everything(
        self,
        new_exporter: NewExporter,
        read_back: ReadBack,
        scheduler_factory: Callable[..., DataExporterScheduler],
    ) -> None:
        events = sample_events(self.event_count, prefix="close")
        scheduler = scheduler_factory(
            new_exporter(), flush_interval=3600, max_events_in_memory=len(events) * 2
        )
        for event in events:
            scheduler.add_event(event)
        assert scheduler.close(self.timeout), scheduler.stats()
        stats = scheduler.stats()
        assert (stats.exported, stats.dropped, stats.buffered) == (len(events), 0, 0)
        self.assert_delivered(read_back, events)

    def test_failure_keeps_events_for_retry(
        self,
        new_exporter: NewExporter,
        read_back: ReadBack,
        sink_outage: Callable[[], AbstractContextManager[Any]],
        scheduler_factory: Callable[..., DataExporterScheduler],
    ) -> None:
        events = sample_events(self.event_count // 10 or 1, prefix="retry")
        scheduler = scheduler_factory(
            new_exporter(),
            flush_interval=0.05,
            max_events_in_memory=len(events),
            retry_initial=0.05,
            retry_max=0.2,
        )
        with sink_outage():
            for event in events:
                scheduler.add_event(event)
            assert wait_until(lambda: scheduler.stats().failed_attempts >= 1, self.timeout)
            stats = scheduler.stats()
            assert stats.exported == 0
            assert stats.buffered + stats.in_flight == len(events)
            assert stats.last_error
        assert wait_until(lambda: scheduler.stats().exported == len(events), self.timeout)
        stats = scheduler.stats()
        assert stats.retried >= len(events)
        assert stats.dropped == 0
        self.assert_delivered(read_back, events)

    def test_unencodable_event_is_rejected_alone(
        self, new_exporter: NewExporter, read_back: ReadBack
    ) -> None:
        good = sample_events(20, tracking_every=0, prefix="good")
        bad = FeatureEvent("user", "bad", 1_700_000_000, "f", "v", object(), False, "1", "S")
        exporter = new_exporter()
        try:
            with pytest.raises(PartialExportError) as caught:
                exporter.export([*good[:10], bad, *good[10:]])
        finally:
            exporter.close()
        assert caught.value.rejected == [bad]
        assert caught.value.failed == []
        self.assert_delivered(read_back, good)

    def test_invalid_settings_are_rejected(
        self, new_exporter: NewExporter, invalid_settings: list[dict[str, Any]]
    ) -> None:
        assert invalid_settings, "list at least one invalid option set"
        for options in invalid_settings:
            with pytest.raises((ValidationError, SettingsError, ValueError)):
                new_exporter(**options).close()
