"""Buffers events for one exporter and exports them from a background worker.

The application thread only ever appends to a deque and compares its length (no lock, no
I/O, no waiting). One daemon worker per scheduler does everything else: size and interval
flushes, retries with exponential backoff and jitter, the memory cap, logging, and the
final flush on :meth:`DataExporterScheduler.close`.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flagsink.deadletter import DeadLetterFile
from flagsink.event import Event
from flagsink.export_worker import ExportWorker, retry_delay
from flagsink.exporter import Batch, Exporter

__all__ = ["DataExporterScheduler", "SchedulerStats", "retry_delay"]

logger = logging.getLogger("flagsink.scheduler")

DEFAULT_FLUSH_INTERVAL = 60.0
DEFAULT_MAX_EVENTS_IN_MEMORY = 100_000
_DROP_WARNING_INTERVAL = 10.0


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot of one scheduler's counters.

    ``received == exported + dropped + buffered + in_flight`` holds in every snapshot.
    """

    exporter: str
    received: int
    exported: int
    failed_attempts: int
    retried: int
    dropped: int
    dropped_by_reason: dict[str, int]
    buffered: int
    in_flight: int
    last_error: str | None
    last_error_time: float | None
    extra: dict[str, Any] = field(default_factory=dict)

    # The accounting view, the same in both modes (memory and spool):
    # ``accepted == delivered + dropped + pending``.

    @property
    def pending(self) -> int:
        """Events accepted and neither delivered nor dropped yet: waiting or being sent.

        With a spool, the spool's own figure for this exporter (``extra["pending"]``: the
        committed events it has not confirmed, a batch sent and not yet confirmed
        included); without one, ``buffered + in_flight``."""
        spooled = self.extra.get("pending")
        return int(spooled) if spooled is not None else self.buffered + self.in_flight

    @property
    def delivered(self) -> int:
        """Events the sink took (the same figure as ``exported``)."""
        return self.exported

    @property
    def accepted(self) -> int:
        """Events this exporter took responsibility for: ``delivered + dropped + pending``.

        Without a spool the same as ``received``; with one, what the spool committed for
        this exporter (events waiting for the spool's next group commit are not yet
        accepted)."""
        return self.exported + self.dropped + self.pending


_live: weakref.WeakSet[DataExporterScheduler] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for scheduler in list(_live):
        scheduler._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class DataExporterScheduler(ExportWorker):
    """Feeds one exporter from a bounded in-memory buffer.

    :param exporter: the exporter to feed; ``exporter.bulk`` selects batch or queue mode.
    :param flush_interval: seconds between bulk flushes (GO Feature Flag's ``flushInterval``).
    :param max_events_in_memory: a bulk flush starts when this many events wait; also the
        largest batch handed to ``export`` (GO Feature Flag's ``maxEventInMemory``).
    :param max_buffered_events: hard cap on waiting events (default 5x
        ``max_events_in_memory``). Past it the oldest events are dropped and counted.
    :param retry_initial: first retry delay in seconds; doubles per failure, with jitter.
        An error with a ``retry_after`` attribute (seconds) delays the retry at least that
        long, up to ``retry_max``.
    :param retry_max: longest retry delay in seconds.
    :param name: label for logs and stats (default: the exporter's kind).
    :param dead_letters: where events the sink refuses for good are kept with the reason
        (a :class:`~flagsink.deadletter.DeadLetterFile` or a path); without it they are
        only counted (``rejected``) and logged.
    """

    def __init__(
        self,
        exporter: Exporter[Any],
        *,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_events_in_memory: int = DEFAULT_MAX_EVENTS_IN_MEMORY,
        max_buffered_events: int | None = None,
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
        name: str | None = None,
        dead_letters: DeadLetterFile | str | os.PathLike[str] | None = None,
        start: bool = True,
    ) -> None:
        if flush_interval <= 0:
            raise ValueError("flush_interval must be > 0 seconds")
        if max_events_in_memory < 1:
            raise ValueError("max_events_in_memory must be >= 1")
        cap = max_buffered_events if max_buffered_events is not None else 5 * max_events_in_memory
        if cap < max_events_in_memory:
            raise ValueError(
                f"max_buffered_events ({cap}) must be >= max_events_in_memory "
                f"({max_events_in_memory})"
            )
        if retry_initial <= 0 or retry_max < retry_initial:
            raise ValueError("need 0 < retry_initial <= retry_max")
        self.exporter = exporter
        self.name: str = name or str(getattr(exporter, "kind", type(exporter).__name__))
        self.flush_interval = float(flush_interval)
        self.max_events_in_memory = max_events_in_memory
        self.max_buffered_events = cap
        self.retry_initial = float(retry_initial)
        self.retry_max = float(retry_max)
        if dead_letters is not None and not isinstance(dead_letters, DeadLetterFile):
            dead_letters = DeadLetterFile(Path(dead_letters), self.name)
        self.dead_letters: DeadLetterFile | None = dead_letters
        #: Called after every export attempt with (seconds, batch size, succeeded).
        self.on_export: Callable[[float, int, bool], None] | None = None
        self._bulk = bool(getattr(exporter, "bulk", True))
        # A queue exporter's worker wakes for the first waiting event; a bulk one for a batch.
        self._wake_at = max_events_in_memory if self._bulk else 1
        self._buffer: deque[Event] = deque()
        self._init_sync()
        self._started = False
        self._closed = False
        self._finished = False
        self._close_reported = False
        _live.add(self)
        if start:
            self.start()

    # -- application thread ---------------------------------------------------------------

    def add_event(self, event: Event) -> None:
        """Queue ``event`` for export. O(1), thread-safe, never raises, never blocks."""
        buffer = self._buffer
        buffer.append(event)
        if len(buffer) >= self._check_at:
            self._on_threshold()

    def add_events(self, events: Sequence[Event]) -> None:
        """Queue a batch of events: one buffer operation for all. Never raises or blocks."""
        buffer = self._buffer
        buffer.extend(events)
        if len(buffer) >= self._check_at:
            self._on_threshold()

    def _on_threshold(self) -> None:
        # Slow path, taken once per worker cycle (or per event while over the cap).
        if len(self._buffer) > self.max_buffered_events:
            self._enforce_cap()
        self._check_at = self.max_buffered_events + 1
        if not self._wake.is_set():
            self._wake.set()

    # -- control --------------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> bool:
        """Stop the worker after a final flush; return within ``timeout`` seconds.

        Events still undelivered at the deadline are counted as dropped (reason
        ``shutdown``) and logged. Idempotent.

        :returns: True when every event was delivered.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        self.begin_close(deadline)
        if self._started:
            self._worker.join(max(deadline - time.monotonic(), 0.0))
            if self._worker.is_alive():
                left = self._undelivered()
                self._close_reported = True
                if not left:  # only the exporter's own close() is still running
                    logger.warning(
                        "exporter %s: every event delivered; its close() is still running "
                        "after %.1fs",
                        self.name,
                        timeout,
                    )
                    return True
                logger.error(
                    "exporter %s: close timed out after %.1fs with an export still running; "
                    "%d events undelivered",
                    self.name,
                    timeout,
                    left,
                )
                return False
        elif not self._finished:
            self._finish()
        return self._undelivered() == 0 and not self._dropped["shutdown"]

    @property
    def free_capacity(self) -> int:
        """How many more events fit before the cap makes the oldest drop.

        Events in the export running now count: if it fails they come back to the buffer.
        """
        return self.max_buffered_events - len(self._buffer) - self._in_flight

    def stats(self) -> SchedulerStats:
        """Return a consistent snapshot of the counters."""
        with self._lock:
            buffered = len(self._buffer)
            in_flight = self._in_flight
            dropped = dict(self._dropped)
            if self._overflow:
                dropped["overflow"] = self._overflow
            exported = self._exported
        total_dropped = sum(dropped.values())
        return SchedulerStats(
            exporter=self.name,
            received=exported + total_dropped + buffered + in_flight,
            exported=exported,
            failed_attempts=self._failed_attempts,
            retried=self._retried,
            dropped=total_dropped,
            dropped_by_reason=dropped,
            buffered=buffered,
            in_flight=in_flight,
            last_error=self._last_error,
            last_error_time=self._last_error_time,
            extra={"dead_lettered": self._dead_lettered},
        )

    # -- worker ---------------------------------------------------------------------------

    def _init_sync(self) -> None:
        self._init_worker()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._check_at = self._wake_at
        self._in_flight = 0
        self._exported = 0
        self._dropped: Counter[str] = Counter()
        self._overflow = 0  # dropped past the cap; apart from the Counter for a fast path
        self._dropped_logged = 0
        self._last_drop_warning = 0.0
        # Batch identities: a random origin per scheduler (new in a forked child) and the
        # sequence number of the next event formed into a batch.
        self._origin = secrets.token_hex(8)
        self._next_seq = 0
        # (identity, size) of a failed batch waiting at the front of the buffer: its retry
        # is formed from exactly those events, under the same identity.
        self._retry_of: tuple[Batch, int] | None = None
        self._next_flush = time.monotonic() + self.flush_interval

    def _reset_after_fork(self) -> None:
        # The parent keeps exporting what it buffered; the child starts empty and fresh.
        self._buffer.clear()
        self._init_sync()
        was_running = self._started and not self._closed
        self._started = False
        if was_running:
            self.start()

    def _settled(self) -> bool:
        return not self._buffer and self._in_flight == 0

    def _undelivered(self) -> int:
        return len(self._buffer) + self._in_flight

    def _cycle(self) -> None:
        self._wake.clear()
        now = time.monotonic()
        ticket = self._flush_requested
        backing_off = now < self._retry_at
        # While backing off, adds only check the cap; otherwise they wake us at a batch.
        self._check_at = self.max_buffered_events + 1 if backing_off else self._wake_at
        self._enforce_cap()
        self._warn_drops(now)
        if ticket > self._flush_done:
            self._drain(stop_at=None)
            self._mark_flushed(ticket)
            return
        if backing_off:
            self._wake.wait(self._retry_at - now)
            return
        size = len(self._buffer)
        # A failed batch (_attempt > 0) is due again as soon as its backoff ends.
        if size >= self._wake_at or (size and (now >= self._next_flush or self._attempt)):
            self._export_batch()
            self._next_flush = time.monotonic() + self.flush_interval
            return
        if not self._bulk:
            self._wake.wait()
            return
        if now >= self._next_flush:
            self._next_flush = now + self.flush_interval
        self._wake.wait(self._next_flush - now)

    def _drain(self, stop_at: float | None) -> bool:
        """Export batches until the buffer is empty; False on the first failure."""
        while self._buffer:
            if not self._export_batch():
                return False
            if stop_at is not None and time.monotonic() >= stop_at:
                return not self._buffer
        return True

    def _new_identity(self, size: int) -> Batch:
        identity = Batch(self._origin, self.name, self._next_seq, time.time())
        self._next_seq += size
        return identity

    def _take_batch(self) -> tuple[list[Event], Batch | None]:
        buffer = self._buffer
        with self._lock:
            retry_of = self._retry_of
            self._retry_of = None
            if retry_of is not None:
                identity, count = retry_of
                count = min(count, len(buffer))
            else:
                identity, count = None, min(len(buffer), self.max_events_in_memory)
            # Counted in flight before leaving the buffer: free_capacity, read without the
            # lock, may then underestimate the room for a moment, but never overestimate it.
            self._in_flight = count
            events = [buffer.popleft() for _ in range(count)]
        if identity is None and events:
            identity = self._new_identity(len(events))
        return events, identity

    def _export_batch(self) -> bool:
        batch, identity = self._take_batch()
        if not batch or identity is None:
            return True
        outcome = self._attempt_export(batch, identity)
        retry, rejected = outcome.retry, outcome.rejected
        with self._lock:
            self._exported += outcome.delivered(len(batch))
            if rejected:
                self._dropped["rejected"] += len(rejected)
            if retry:
                self._buffer.extendleft(reversed(retry))
                self._retried += len(retry)
                # The whole batch again: the same identity, so an idempotent sink can tell
                # an earlier attempt that did succeed. Part of it: a new batch.
                if len(retry) == len(batch):
                    self._retry_of = (identity, len(retry))
                else:
                    self._retry_of = (self._new_identity(len(retry)), len(retry))
                # The cap holds at once: past it, the retried (oldest) events go first.
                for _ in range(len(self._buffer) - self.max_buffered_events):
                    self._buffer.popleft()
                    self._overflow += 1
                    self._retry_of = None
            self._in_flight = 0
        self._keep_dead_letters(outcome)
        return self._settle_attempt(outcome, len(batch))

    def _enforce_cap(self) -> None:
        """Drop the oldest events past the cap (counted as ``overflow``)."""
        buffer = self._buffer
        cap = self.max_buffered_events
        if len(buffer) <= cap:
            return
        with self._lock:
            while len(buffer) > cap:
                try:
                    buffer.popleft()
                except IndexError:  # pragma: no cover - the worker emptied it meanwhile
                    break
                self._overflow += 1
                self._retry_of = None

    def _drop_oldest(self, count: int, reason: str) -> None:
        buffer = self._buffer
        dropped = 0
        with self._lock:
            try:
                for _ in range(count):
                    buffer.popleft()
                    dropped += 1
            except IndexError:
                pass
            self._dropped[reason] += dropped
            self._retry_of = None

    def _warn_drops(self, now: float) -> None:
        total = self._overflow
        new = total - self._dropped_logged
        if new and now - self._last_drop_warning >= _DROP_WARNING_INTERVAL:
            self._dropped_logged = total
            self._last_drop_warning = now
            logger.warning(
                "exporter %s: buffer full (%d events): dropped the %d oldest events "
                "(%d in total); the exporter is failing or slower than the event rate",
                self.name,
                self.max_buffered_events,
                new,
                total,
            )

    def _finish(self) -> None:
        """Final flush until the close deadline, then account for what is left."""
        self._finished = True
        try:
            while self._buffer and time.monotonic() < self._deadline:
                if self._drain(stop_at=self._deadline):
                    break
                if self._retry_at >= self._deadline:
                    break  # no retry can start in time: account for the rest now
                pause = min(self._retry_at, self._deadline) - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            self._warn_drops(float("inf"))
            left = len(self._buffer)
            if left:
                self._drop_oldest(left, "shutdown")
                logger.error(
                    "exporter %s: closed with %d events undelivered (last error: %s)%s",
                    self.name,
                    left,
                    self._last_error,
                    " (already reported when close timed out)" if self._close_reported else "",
                )
        finally:
            self._mark_flushed(self._flush_requested)
            self._close_exporter()
