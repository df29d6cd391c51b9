"""Several exporters fed from one ``add_event``: each has its own buffer and worker."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

from flagsink.config import Config, ConfigError, load_config
from flagsink.deadletter import DeadLetterFile, default_path
from flagsink.event import Event, FeatureEvent, TrackingEvent, new_tracking_event
from flagsink.flags import tracks_events
from flagsink.scheduler import DataExporterScheduler, SchedulerStats
from flagsink.spool import Spool, SpoolError, SpoolStats
from flagsink.spooled import SpoolScheduler
from flagsink.store import FLAGS
from flagsink.store_cache import CachedStore

__all__ = ["Pipeline", "UntrackedFlags", "from_config"]

logger = logging.getLogger("flagsink.pipeline")

#: Seconds a pipeline gets to flush and close at a normal interpreter exit.
DEFAULT_EXIT_TIMEOUT = 5.0

_refreshing: weakref.WeakSet[UntrackedFlags] = weakref.WeakSet()


def _restart_refresh_in_child() -> None:
    # Threads do not survive fork: give the child its own refresh thread.
    for untracked in list(_refreshing):
        untracked._restart_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_restart_refresh_in_child)


def _close_at_exit(ref: weakref.ref[Pipeline], timeout: float) -> None:
    pipeline = ref()
    if pipeline is not None:
        try:
            pipeline.close(timeout)
        except Exception:  # pragma: no cover - defensive: never break interpreter exit
            logger.exception("closing the pipeline at exit failed")


def _tracking_details(details: object) -> Mapping[str, Any] | None:
    """A mapping, or an OpenFeature ``TrackingEventDetails`` (attributes plus ``value``)."""
    if details is None or isinstance(details, Mapping):
        return details
    attributes = getattr(details, "attributes", None)
    result = dict(attributes) if attributes else {}
    value = getattr(details, "value", None)
    if value is not None:
        result["value"] = value
    return result


class UntrackedFlags:
    """The keys of flags with ``trackEvents: false``, whose evaluation events are filtered.

    Either a fixed set (``UntrackedFlags({"a", "b"})``) or refreshed from a flag store
    every ``interval`` seconds on a daemon thread (:meth:`from_store`). ``current`` is
    replaced as a whole, so readers never lock.
    """

    def __init__(self, keys: Collection[str] = ()) -> None:
        self.current: frozenset[str] = frozenset(keys)
        self._store: CachedStore | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._interval = 0.0

    @classmethod
    def from_store(cls, store: CachedStore, interval: float = 1.0) -> UntrackedFlags:
        """Read the untracked keys from ``store`` now, then every ``interval`` seconds."""
        untracked = cls()
        untracked._store = store
        untracked.refresh()
        if interval > 0:
            untracked._interval = interval
            untracked._start_thread()
            _refreshing.add(untracked)
        return untracked

    def _start_thread(self) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(self._interval,), name="flagsink-untracked", daemon=True
        )
        self._thread.start()

    def _restart_after_fork(self) -> None:
        if self._thread is not None and not self._stop.is_set():
            self._start_thread()

    def refresh(self) -> None:
        """Read the store again (a no-op for a fixed set); errors keep the last set."""
        if self._store is None:
            return
        try:
            flags = self._store.all(FLAGS)
        except Exception as exc:
            logger.warning("cannot read flags to find trackEvents: false (%s)", exc)
            return
        self.current = frozenset(key for key, item in flags.items() if not tracks_events(item))

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.refresh()

    def close(self) -> None:
        """Stop refreshing."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


Scheduler = DataExporterScheduler | SpoolScheduler


class Pipeline:
    """Routes each event to the schedulers of its type (``feature`` or ``tracking``).

    Events are shared by reference; a slow or failing exporter only ever fills its own
    buffer, so it never delays or grows another's. With a :class:`~flagsink.spool.Spool`,
    events go to the spool once and every exporter reads them from there.
    """

    def __init__(
        self,
        routes: Sequence[tuple[Scheduler, str]],
        untracked: UntrackedFlags | Collection[str] | None = None,
        store: CachedStore | None = None,
        exit_timeout: float | None = DEFAULT_EXIT_TIMEOUT,
        spool: Spool | None = None,
    ) -> None:
        """:param untracked: flag keys whose feature events are filtered (``trackEvents:
            false``): a fixed collection or an :class:`UntrackedFlags`. Filtered events
            are counted in :attr:`filtered`, not as dropped.
        :param store: a flag store the pipeline owns (closed with it).
        :param spool: the spool the routes' :class:`SpoolScheduler` read from (owned:
            closed with the pipeline).
        :param exit_timeout: a normal interpreter exit flushes and closes the pipeline
            within this many seconds (registered with :mod:`atexit` through a weak
            reference; unregistered by :meth:`close`). ``None``: no exit handler.
        """
        if untracked is None or isinstance(untracked, UntrackedFlags):
            self.untracked = untracked or UntrackedFlags()
        else:
            self.untracked = UntrackedFlags(untracked)
        self.store = store
        self.spool = spool
        self._filtered = 0
        self._filtered_lock = threading.Lock()
        self.schedulers = [scheduler for scheduler, _ in routes]
        self._typed = list(routes)
        self._batch_routes: dict[str, list[Scheduler]] = {
            "feature": [s for s, kind in routes if kind == "feature"],
            "tracking": [s for s, kind in routes if kind == "tracking"],
        }
        by_type: dict[str, list[Callable[[Event], None]]] = {"feature": [], "tracking": []}
        for scheduler, event_type in routes:
            if event_type not in by_type:
                raise ValueError(f"event type must be 'feature' or 'tracking', not {event_type!r}")
            by_type[event_type].append(scheduler.add_event)
        if spool is not None:
            # One durable append per event, whatever the number of exporters.
            by_type = {kind: [spool.append] if adds else [] for kind, adds in by_type.items()}
        self._routes: dict[type, tuple[Callable[[Event], None], ...]] = {
            FeatureEvent: tuple(by_type["feature"]),
            TrackingEvent: tuple(by_type["tracking"]),
        }
        self._at_exit: Callable[[], None] | None = None
        if exit_timeout is not None:
            ref = weakref.ref(self)
            timeout = float(exit_timeout)

            def at_exit() -> None:
                _close_at_exit(ref, timeout)

            self._at_exit = at_exit
            atexit.register(at_exit)

    @property
    def filtered(self) -> int:
        """Feature events not exported because their flag has ``trackEvents: false``."""
        return self._filtered

    def count_filtered(self, count: int) -> None:
        """Add ``count`` events filtered by the caller (see :meth:`filter_events`)."""
        with self._filtered_lock:
            self._filtered += count

    def filter_events(self, events: Sequence[Event]) -> tuple[Sequence[Event], int]:
        """``events`` without those of untracked flags, and how many were left out (the
        caller counts them with :meth:`add_events`; this method counts nothing)."""
        untracked = self.untracked.current
        if not untracked:
            return events, 0
        kept = [e for e in events if type(e) is not FeatureEvent or e.key not in untracked]
        return kept, len(events) - len(kept)

    def add_event(self, event: Event) -> None:
        """Hand ``event`` to every exporter of its type (unless its flag is untracked).
        Never raises, never blocks."""
        if type(event) is FeatureEvent and event.key in self.untracked.current:
            self.count_filtered(1)
            return
        for add in self._routes.get(type(event), ()):
            add(event)

    def track(
        self,
        name: str,
        context: object,
        details: Mapping[str, Any] | object | None = None,
    ) -> None:
        """Record the custom event ``name`` (GO Feature Flag's tracking event) for the
        exporters with ``eventType: tracking``. Never blocks.

        :param context: the user: a key string, a mapping with ``targetingKey`` (or
            ``key``) and optional ``anonymous``, or an OpenFeature ``EvaluationContext``;
            its attributes become the event's ``evaluationContext``.
        :param details: a mapping, or an OpenFeature ``TrackingEventDetails`` (its
            attributes, plus ``value`` when set), stored as ``trackingEventDetails``.
        """
        self.add_event(new_tracking_event(context, name, _tracking_details(details)))

    def check_room(
        self, events: Sequence[Event]
    ) -> tuple[Literal["ok", "full", "too_large"], Scheduler | None]:
        """Whether every exporter concerned can take ``events`` now without dropping.

        :returns: ``("ok", None)``; ``("full", scheduler)`` when one lacks room right now;
            ``("too_large", scheduler)`` when the batch exceeds its cap, so it never fits.
        """
        tracking = sum(1 for event in events if type(event) is TrackingEvent)
        counts = {"feature": len(events) - tracking, "tracking": tracking}
        verdict: tuple[Literal["ok", "full", "too_large"], Scheduler | None]
        verdict = ("ok", None)
        if self.spool is not None:
            if not self.spool.has_room and self.schedulers:
                return "full", self.schedulers[0]
            return verdict
        for scheduler, event_type in self._typed:
            wanted = counts[event_type]
            if wanted > scheduler.max_buffered_events:
                return "too_large", scheduler
            if wanted and wanted > scheduler.free_capacity:
                verdict = ("full", scheduler)
        return verdict

    def add_events(self, events: Sequence[Event]) -> None:
        """Hand a batch to every exporter of each event's type, in one buffer operation per
        exporter. Events of untracked flags are left out and counted. Never raises, never
        blocks."""
        events, filtered = self.filter_events(events)
        if filtered:
            self.count_filtered(filtered)
        if self.spool is not None:
            self.spool.append_many(self._routed(events))
            return
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

    def _routed(self, events: Sequence[Event]) -> Sequence[Event]:
        """``events`` without those of a type no exporter takes."""
        routes = self._routes
        if all(routes.get(type(event)) for event in events):
            return events
        return [event for event in events if routes.get(type(event))]

    def submit(self, events: Sequence[Event], callback: Callable[[bool], None]) -> None:
        """Hand in ``events`` already passed through :meth:`filter_events`, then call
        ``callback(True)`` once they are durable in the spool (at once without a spool;
        ``False`` when the spool refused them). The relay acknowledges from it."""
        if self.spool is None:
            self.add_events(events)
            callback(True)
            return
        self.spool.submit(self._routed(events), callback)

    def spool_stats(self) -> SpoolStats | None:
        """The spool's figures, or None without a spool."""
        return self.spool.stats() if self.spool is not None else None

    def flush(self, timeout: float | None = None) -> bool:
        """Flush every exporter at once; True when all delivered everything."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.spool is not None:
            self.spool.sync(timeout)
        tickets = [scheduler.request_flush() for scheduler in self.schedulers]
        ok = True
        for scheduler, ticket in zip(self.schedulers, tickets, strict=True):
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            ok = scheduler.wait_flushed(ticket, left) and ok
        return ok

    def close(self, timeout: float = 10.0) -> bool:
        """Close every exporter in parallel, all within ``timeout`` seconds."""
        if self._at_exit is not None:
            atexit.unregister(self._at_exit)
            self._at_exit = None
        deadline = time.monotonic() + timeout
        spool = self.spool
        if spool is not None:
            # Commit what was added, then let the exporters send until a little before the
            # deadline: their confirmations need the spool's last commit.
            spool.sync(timeout / 2)
            deadline -= min(0.05, timeout / 4)
        for scheduler in self.schedulers:
            scheduler.begin_close(deadline)
        self.untracked.close()
        ok = True
        for scheduler in self.schedulers:
            ok = scheduler.close(max(deadline - time.monotonic(), 0.0)) and ok
        if spool is not None:
            spool.close(max(deadline - time.monotonic(), 0.0) + min(0.05, timeout / 4))
        if self.store is not None:
            self.store.close()
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


def from_config(
    config: Config | str | os.PathLike[str],
    *,
    store: CachedStore | None = None,
    exit_timeout: float | None = DEFAULT_EXIT_TIMEOUT,
    **overrides: Any,
) -> Pipeline:
    """Build and start the exporters a config file names.

    With a ``store:`` section, evaluation events of flags with ``trackEvents: false`` in
    that store are filtered (the set is refreshed every second).

    :param store: the flag store to read ``trackEvents`` from (default: built from the
        config's ``store:`` section and owned by the pipeline).
    :param exit_timeout: see :class:`Pipeline` (a normal interpreter exit flushes).
    :param overrides: keyword arguments passed to every :class:`DataExporterScheduler`.

    Safe under pre-forking servers: a process forked afterwards gets its own, empty
    buffers and worker threads, and exports independently of its parent.
    """
    if not isinstance(config, Config):
        config = load_config(config)
    owned: CachedStore | None = None
    if store is None and config.store is not None:
        store = owned = config.store.build()
    if config.spool is not None:
        return _spooled_pipeline(config, store, owned, exit_timeout, overrides)
    routes: list[tuple[Scheduler, str]] = []
    try:
        for section in config.exporters:
            exporter = section.build()
            timing = section.scheduling
            scheduler: Scheduler = DataExporterScheduler(
                exporter,
                flush_interval=timing.flush_interval / 1000,
                max_events_in_memory=timing.max_event_in_memory,
                max_buffered_events=timing.max_buffered_events,
                retry_initial=timing.retry_initial_interval / 1000,
                retry_max=max(timing.retry_max_interval, timing.retry_initial_interval) / 1000,
                name=section.label,
                dead_letters=timing.dead_letter_file,
                **overrides,
            )
            routes.append((scheduler, timing.event_type))
    except ConfigError:
        for scheduler, _ in routes:
            scheduler.close(0)
        if owned is not None:
            owned.close()
        raise
    untracked = UntrackedFlags.from_store(store) if store is not None else None
    return Pipeline(routes, untracked=untracked, store=owned, exit_timeout=exit_timeout)


def _spooled_pipeline(
    config: Config,
    store: CachedStore | None,
    owned: CachedStore | None,
    exit_timeout: float | None,
    overrides: dict[str, Any],
) -> Pipeline:
    """Exporters fed from the config's ``spool`` (dead letters default into it)."""
    assert config.spool is not None
    overrides.pop("max_buffered_events", None)  # the spool's maxBytes bounds it instead
    try:
        spool = Spool(config.spool)
    except SpoolError as exc:
        if owned is not None:
            owned.close()
        raise ConfigError([f"{config.source}: {exc}"]) from None
    routes: list[tuple[Scheduler, str]] = []
    try:
        for section in config.exporters:
            exporter = section.build()
            timing = section.scheduling
            label = section.label
            dead_letter_path = timing.dead_letter_file or default_path(spool.directory, label)
            scheduler: Scheduler = SpoolScheduler(
                exporter,
                spool.consumer(label, timing.event_type),
                flush_interval=timing.flush_interval / 1000,
                max_events_in_memory=timing.max_event_in_memory,
                retry_initial=timing.retry_initial_interval / 1000,
                retry_max=max(timing.retry_max_interval, timing.retry_initial_interval) / 1000,
                name=label,
                dead_letters=DeadLetterFile(dead_letter_path, label),
                start=False,
                **overrides,
            )
            routes.append((scheduler, timing.event_type))
        spool.start()
        # Workers only once the spool commits: a batch must never be sent before its
        # intent is durable (an interrupted batch is formed again from it after a crash).
        for scheduler, _ in routes:
            scheduler.start()
    except (ConfigError, SpoolError) as exc:
        for scheduler, _ in routes:
            scheduler.close(0)
        spool.close(0)
        if owned is not None:
            owned.close()
        if isinstance(exc, SpoolError):
            raise ConfigError([f"{config.source}: {exc}"]) from None
        raise
    untracked = UntrackedFlags.from_store(store) if store is not None else None
    return Pipeline(
        routes, untracked=untracked, store=owned, exit_timeout=exit_timeout, spool=spool
    )
