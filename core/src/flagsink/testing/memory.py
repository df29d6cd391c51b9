"""An exporter that keeps events in memory, and small helpers for tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import Field

from flagsink.event import Event, FeatureEvent, TrackingEvent
from flagsink.exporter import Exporter, ExportError, ExporterSettings

__all__ = ["InMemoryExporter", "MemorySettings", "sample_events", "wait_until"]


class MemorySettings(ExporterSettings):
    """Settings of :class:`InMemoryExporter`."""

    bulk: bool = Field(True, description="Batch (true) or queue (false) mode.")


class InMemoryExporter(Exporter[MemorySettings]):
    """Stores every exported batch; :meth:`fail_next` makes the next exports raise."""

    kind = "memory"
    settings_model = MemorySettings

    def __init__(self, settings: MemorySettings | None = None, /, **options: Any) -> None:
        super().__init__(settings, **options)
        self.bulk = self.settings.bulk  # type: ignore[misc]
        self.batches: list[list[Event]] = []
        self.closed = False
        self._failures = 0
        self._lock = threading.Lock()

    @property
    def events(self) -> list[Event]:
        """Every event exported so far, in order."""
        with self._lock:
            return [event for batch in self.batches for event in batch]

    def fail_next(self, count: int = 1) -> None:
        """Make the next ``count`` exports raise :class:`ExportError`."""
        with self._lock:
            self._failures = count

    def export(self, events: Sequence[Event]) -> None:
        """Record ``events`` (or fail, if told to)."""
        with self._lock:
            if self._failures:
                self._failures -= 1
                raise ExportError("InMemoryExporter told to fail")
            self.batches.append(list(events))

    def close(self) -> None:
        """Mark the exporter closed."""
        self.closed = True


def sample_events(count: int, *, tracking_every: int = 5, prefix: str = "u") -> list[Event]:
    """``count`` distinct events: feature events of a few flags, every ``tracking_every``-th
    a tracking event (0: none). User keys are unique, so events are told apart."""
    events: list[Event] = []
    for index in range(count):
        user = f"{prefix}-{index:07d}"
        if tracking_every and index % tracking_every == tracking_every - 1:
            events.append(
                TrackingEvent(
                    "user",
                    user,
                    1_700_000_000 + index,
                    "checkout",
                    {"targetingKey": user, "plan": "pro"},
                    {"amount": index, "currency": "EUR"},
                )
            )
        else:
            events.append(
                FeatureEvent(
                    "anonymousUser" if index % 7 == 0 else "user",
                    user,
                    1_700_000_000 + index,
                    f"flag-{index % 4}",
                    ("on", "off", "SdkDefault")[index % 3],
                    ({"nested": [1, 2.5, None]}, True, "text;with,separators", 42)[index % 4],
                    index % 3 == 2,
                    str(index % 5),
                    ("SERVER", "PROVIDER_CACHE", "INPROCESS")[index % 3],
                    {"env": "test", "replica": index % 2} if index % 2 else None,
                )
            )
    return events


def wait_until(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.005
) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)
