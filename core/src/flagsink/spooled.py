"""Feeds one exporter from the disk spool instead of a memory buffer.

Same behaviour as :class:`~flagsink.scheduler.DataExporterScheduler` (flush on size or
interval, queue mode, retries with backoff, bounded close), but the events live in the
spool: the worker reads a batch after its cursor, sends it, and confirms it, so only the
batch being sent is in memory, and whatever is unconfirmed at a crash or a close is sent
after the next start. An exporter that names objects after the batch gets the batch it
was sending at a crash formed again identically.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flagsink import faultpoints
from flagsink.deadletter import DeadLetterFile
from flagsink.event import Event
from flagsink.export_worker import ExportWorker, Outcome
from flagsink.exporter import Batch, Exporter
from flagsink.scheduler import DEFAULT_FLUSH_INTERVAL, SchedulerStats
from flagsink.spool import SpoolConsumer

__all__ = ["SpoolScheduler"]

logger = logging.getLogger("flagsink.scheduler")

# Spooled events do not count against a memory cap; the spool's maxBytes bounds them.
_UNBOUNDED = 2**62
# Seconds before trying again to record a batch whose record could not be committed.
_INTENT_RETRY = 0.1


@dataclass
class _Sending:
    """The batch being sent, until every event in it is delivered or dropped."""

    events: list[Event]
    identity: Batch
    last: int
    delivered: int = 0
    dropped: Counter[str] = field(default_factory=Counter)


def _overrides_export_batch(exporter: Exporter[Any]) -> bool:
    method = getattr(type(exporter), "export_batch", None)
    return method is not None and method is not Exporter.export_batch


class SpoolScheduler(ExportWorker):
    """Feeds ``exporter`` from ``consumer``'s position in the spool.

    :param flush_interval: seconds between bulk flushes.
    :param max_events_in_memory: events per batch at most (and the batch size that
        starts a bulk flush early).
    :param retry_initial: first retry delay, doubled per failure, with jitter.
    :param retry_max: longest retry delay.
    :param dead_letters: keeps events the sink refuses for good, with the reason.
    """

    _retry_note = " (they stay in the spool meanwhile)"

    def __init__(
        self,
        exporter: Exporter[Any],
        consumer: SpoolConsumer,
        *,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        max_events_in_memory: int = 100_000,
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
        name: str | None = None,
        dead_letters: DeadLetterFile | None = None,
        start: bool = True,
    ) -> None:
        if flush_interval <= 0:
            raise ValueError("flush_interval must be > 0 seconds")
        if max_events_in_memory < 1:
            raise ValueError("max_events_in_memory must be >= 1")
        if retry_initial <= 0 or retry_max < retry_initial:
            raise ValueError("need 0 < retry_initial <= retry_max")
        self.exporter = exporter
        self.consumer = consumer
        self.name: str = name or consumer.name
        self.flush_interval = float(flush_interval)
        self.max_events_in_memory = max_events_in_memory
        self.max_buffered_events = _UNBOUNDED
        self.retry_initial = float(retry_initial)
        self.retry_max = float(retry_max)
        self.dead_letters = dead_letters
        #: Called after every export attempt with (seconds, batch size, succeeded).
        self.on_export: Callable[[float, int, bool], None] | None = None
        self._bulk = bool(getattr(exporter, "bulk", True))
        self._idempotent = _overrides_export_batch(exporter)
        consumer.wake_at = max_events_in_memory if self._bulk else 1
        self._wake = consumer.wake
        self._init_worker()
        self._sending: _Sending | None = None
        self._redelivered = 0
        self._intent_pending = False
        self._next_flush = time.monotonic() + self.flush_interval
        self._started = False
        self._closed = False
        self._finished = False
        if start:
            self.start()

    # -- the spool takes the events; these keep the scheduler interface -------------------

    def add_event(self, event: Event) -> None:
        """Queue ``event`` in the spool (for every exporter of its type)."""
        self.consumer.spool.append(event)

    def add_events(self, events: Sequence[Event]) -> None:
        """Queue ``events`` in the spool."""
        self.consumer.spool.append_many(events)

    @property
    def free_capacity(self) -> int:
        """Events that can be added now without risk of being refused: half of what the
        spool lets wait in memory for a commit, less what waits already; 0 while the
        spool is full."""
        spool = self.consumer.spool
        if not spool.has_room:
            return 0
        return max(spool.settings.max_pending_in_memory // 2 - spool.waiting, 0)

    # -- control --------------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> bool:
        """Send what is committed until ``timeout``; the rest stays in the spool for the
        next start (never dropped). True when everything was delivered."""
        deadline = time.monotonic() + max(timeout, 0.0)
        self.begin_close(deadline)
        if self._started:
            self._worker.join(max(deadline - time.monotonic(), 0.0))
            if self._worker.is_alive():
                logger.error(
                    "exporter %s: close timed out after %.1fs with an export still running; "
                    "its %d unconfirmed events stay in the spool for the next start",
                    self.name,
                    timeout,
                    self.consumer.pending,
                )
                return False
        elif not self._finished:
            self._finish()
        return self.consumer.pending == 0

    def stats(self) -> SchedulerStats:
        """Counters: ``received`` is what the spool accepted for this exporter."""
        durable = self.consumer.stats()
        sending = self._sending
        in_flight = len(sending.events) if sending is not None else 0
        dropped = dict(durable.dropped_by_reason)
        total_dropped = sum(dropped.values())
        buffered = max(durable.accepted - durable.delivered - total_dropped - in_flight, 0)
        return SchedulerStats(
            exporter=self.name,
            received=durable.delivered + total_dropped + buffered + in_flight,
            exported=durable.delivered,
            failed_attempts=self._failed_attempts,
            retried=self._retried,
            dropped=total_dropped,
            dropped_by_reason=dropped,
            buffered=buffered,
            in_flight=in_flight,
            last_error=self._last_error,
            last_error_time=self._last_error_time,
            extra={
                "dead_lettered": self._dead_lettered,
                "redelivered": self._redelivered,
                "pending": durable.pending,
                "spooled": True,
            },
        )

    # -- worker ---------------------------------------------------------------------------

    def _settled(self) -> bool:
        return self._sending is None and self.consumer.unread == 0

    def _due(self) -> bool:
        return self._sending is not None or self.consumer.intent is not None

    def _cycle(self) -> None:
        self._wake.clear()
        now = time.monotonic()
        ticket = self._flush_requested
        if ticket > self._flush_done:
            self._drain(stop_at=None)
            self._mark_flushed(ticket)
            return
        if now < self._retry_at:
            self._wake.wait(self._retry_at - now)
            return
        unread = self.consumer.unread
        wake_at = self.consumer.wake_at
        if self._due() or unread >= wake_at or (unread and now >= self._next_flush):
            self._export_batch()
            self._next_flush = time.monotonic() + self.flush_interval
            return
        if not self._bulk:
            self._wake.wait(1.0)
            return
        if now >= self._next_flush:
            self._next_flush = now + self.flush_interval
        self._wake.wait(self._next_flush - now)

    def _drain(self, stop_at: float | None) -> bool:
        """Export batches until nothing committed is left; False on the first failure."""
        while self._due() or self.consumer.unread:
            if not self._export_batch():
                return False
            if stop_at is not None and time.monotonic() >= stop_at:
                return not (self._due() or self.consumer.unread)
        return True

    def _form_batch(self) -> _Sending | None:
        consumer = self.consumer
        spool_id = consumer.spool.id
        intent = consumer.intent
        if intent is not None:
            # The batch being sent when the process stopped: the same events, the same
            # identity, so an idempotent sink recognises an upload that did complete.
            first, last, created = intent
            consumer.intent = None
            consumer.rewind()
            events, _, end, damaged = consumer.read(last - consumer.position, upto=last)
            self._redelivered += len(events)
            identity = Batch(spool_id, self.name, first, created)
            logger.info(
                "exporter %s: sending again the %d events of batch %s (interrupted)",
                self.name,
                len(events),
                identity.id,
            )
        else:
            events, first, end, damaged = consumer.read(self.max_events_in_memory)
            if end < first:
                return None
            identity = Batch(spool_id, self.name, first, time.time())
            if (
                self._idempotent
                and events
                and not consumer.begin_batch(first, end, identity.created, self._wait_budget())
            ):
                # Never send a batch whose record is not on disk: after a crash it could
                # be formed again differently and stored twice. Read it again later.
                consumer.rewind()
                self._retry_at = time.monotonic() + _INTENT_RETRY
                self._intent_pending = True
                return None
        sending = _Sending(events, identity, end)
        if damaged:
            sending.dropped["damaged"] += damaged
        return sending

    def _export_batch(self) -> bool:
        self._intent_pending = False
        sending = self._sending or self._form_batch()
        if sending is None:
            return not self._intent_pending
        self._sending = sending
        batch = sending.events
        outcome = self._attempt_export(batch, sending.identity) if batch else Outcome()
        faultpoints.hit("export.after_send_before_confirm")
        sending.delivered += outcome.delivered(len(batch))
        if outcome.rejected:
            sending.dropped["rejected"] += len(outcome.rejected)
            self._keep_dead_letters(outcome)
        if outcome.retry:
            sending.events = list(outcome.retry)
            self._retried += len(outcome.retry)
        else:
            self._sending = None
            self.consumer.confirm(
                sending.last, sending.delivered, dict(sending.dropped), self._wait_budget()
            )
        return self._settle_attempt(outcome, len(batch))

    def _wait_budget(self) -> float:
        """How long to wait for a group commit: bounded by the close deadline."""
        return max(min(10.0, self._deadline - time.monotonic()), 0.0)

    def _finish(self) -> None:
        """Final flush until the close deadline; what is left stays in the spool."""
        self._finished = True
        try:
            while (self._due() or self.consumer.unread) and time.monotonic() < self._deadline:
                if self._drain(stop_at=self._deadline):
                    break
                if self._retry_at >= self._deadline:
                    break
                pause = min(self._retry_at, self._deadline) - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            left = self.consumer.pending
            if left:
                logger.warning(
                    "exporter %s: closed with %d events undelivered; they stay in the spool "
                    "and are sent after the next start (last error: %s)",
                    self.name,
                    left,
                    self._last_error,
                )
        finally:
            self._mark_flushed(self._flush_requested)
            self._close_exporter()
