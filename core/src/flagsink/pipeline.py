"""Several exporters fed from one ``add_event``: each has its own buffer and worker."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Literal

from flagsink.config import Config, ConfigError, load_config
from flagsink.event import Event, FeatureEvent, TrackingEvent
from flagsink.scheduler import DataExporterScheduler, SchedulerStats

__all__ = ["Pipeline", "from_config"]


class Pipeline:
    """Routes each event to the schedulers of its type (``feature`` or ``tracking``).

    Events are shared by reference; a slow or failing exporter only ever fills its own
    buffer, so it never delays or grows another's.
    """

    def __init__(self, routes: Sequence[tuple[DataExporterScheduler, str]]) -> None:
        self.schedulers = [scheduler for scheduler, _ in routes]
        self._typed = list(routes)
        self._batch_routes: dict[str, list[DataExporterScheduler]] = {
            "feature": [s for s, kind in routes if kind == "feature"],
            "tracking": [s for s, kind in routes if kind == "tracking"],
        }
        by_type: dict[str, list[Callable[[Event], None]]] = {"feature": [], "tracking": []}
        for scheduler, event_type in routes:
            if event_type not in by_type:
                raise ValueError(f"event type must be 'feature' or 'tracking', not {event_type!r}")
            by_type[event_type].append(scheduler.add_event)
        self._routes: dict[type, tuple[Callable[[Event], None], ...]] = {
            FeatureEvent: tuple(by_type["feature"]),
            TrackingEvent: tuple(by_type["tracking"]),
        }

    def add_event(self, event: Event) -> None:
        """Hand ``event`` to every exporter of its type. Never raises, never blocks."""
        for add in self._routes.get(type(event), ()):
            add(event)

    def check_room(
        self, events: Sequence[Event]
    ) -> tuple[Literal["ok", "full", "too_large"], DataExporterScheduler | None]:
        """Whether every exporter concerned can take ``events`` now without dropping.

        :returns: ``("ok", None)``; ``("full", scheduler)`` when one lacks room right now;
            ``("too_large", scheduler)`` when the batch exceeds its cap, so it never fits.
        """
        tracking = sum(1 for event in events if type(event) is TrackingEvent)
        counts = {"feature": len(events) - tracking, "tracking": tracking}
        verdict: tuple[Literal["ok", "full", "too_large"], DataExporterScheduler | None]
        verdict = ("ok", None)
        for scheduler, event_type in self._typed:
            wanted = counts[event_type]
            if wanted > scheduler.max_buffered_events:
                return "too_large", scheduler
            if wanted and wanted > scheduler.free_capacity:
                verdict = ("full", scheduler)
        return verdict

    def add_events(self, events: Sequence[Event]) -> None:
        """Hand a batch to every exporter of each event's type, in one buffer operation per
        exporter. Never raises, never blocks."""
        by_type = self._batch_routes
        if not by_type["tracking"]:
            batch: Sequence[Event] = [e for e in events if type(e) is FeatureEvent]
            for scheduler in by_type["feature"]:
                scheduler.add_events(batch)
            return
        features: list[Event] = []
        tracking: list[Event] = []
        for event in events:
            if type(event) is FeatureEvent:
                features.append(event)
            elif type(event) is TrackingEvent:
                tracking.append(event)
        for scheduler in by_type["feature"]:
            scheduler.add_events(features)
        for scheduler in by_type["tracking"]:
            scheduler.add_events(tracking)

    def flush(self, timeout: float | None = None) -> bool:
        """Flush every exporter at once; True when all delivered everything."""
        deadline = None if timeout is None else time.monotonic() + timeout
        tickets = [scheduler.request_flush() for scheduler in self.schedulers]
        ok = True
        for scheduler, ticket in zip(self.schedulers, tickets, strict=True):
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            ok = scheduler.wait_flushed(ticket, left) and ok
        return ok

    def close(self, timeout: float = 10.0) -> bool:
        """Close every exporter in parallel, all within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        for scheduler in self.schedulers:
            scheduler.begin_close(deadline)
        ok = True
        for scheduler in self.schedulers:
            ok = scheduler.close(max(deadline - time.monotonic(), 0.0)) and ok
        return ok

    def stats(self) -> list[SchedulerStats]:
        """A counters snapshot per exporter."""
        return [scheduler.stats() for scheduler in self.schedulers]

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def from_config(config: Config | str | os.PathLike[str], **overrides: Any) -> Pipeline:
    """Build and start the exporters a config file names.

    :param overrides: keyword arguments passed to every :class:`DataExporterScheduler`.
    """
    if not isinstance(config, Config):
        config = load_config(config)
    routes: list[tuple[DataExporterScheduler, str]] = []
    try:
        for section in config.exporters:
            exporter = section.build()
            timing = section.scheduling
            scheduler = DataExporterScheduler(
                exporter,
                flush_interval=timing.flush_interval / 1000,
                max_events_in_memory=timing.max_event_in_memory,
                max_buffered_events=timing.max_buffered_events,
                retry_initial=timing.retry_initial_interval / 1000,
                retry_max=max(timing.retry_max_interval, timing.retry_initial_interval) / 1000,
                name=section.label,
                **overrides,
            )
            routes.append((scheduler, timing.event_type))
    except ConfigError:
        for scheduler, _ in routes:
            scheduler.close(0)
        raise
    return Pipeline(routes)
