"""What both schedulers share: the worker thread, flush tickets, the close deadline,
sending one batch and sorting out its outcome, dead letters, and failure bookkeeping with
backoff. :class:`~flagsink.scheduler.DataExporterScheduler` feeds it from memory,
:class:`~flagsink.spooled.SpoolScheduler` from the disk spool."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from flagsink.deadletter import DeadLetterFile
from flagsink.event import Event
from flagsink.exporter import Batch, Exporter, PartialExportError, PermanentExportError

__all__ = ["ExportWorker", "Outcome", "retry_delay"]

logger = logging.getLogger("flagsink.scheduler")


def _retry_after(error: BaseException) -> float | None:
    """The optional ``retry_after`` (seconds) an exporter's error carries, if usable."""
    value = getattr(error, "retry_after", None)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0 <= value < float("inf") else None


def retry_delay(attempt: int, initial: float, longest: float, error: BaseException) -> float:
    """Seconds before retry number ``attempt + 1``: exponential with equal jitter, at
    least the error's ``retry_after`` (when it has one), never more than ``longest``."""
    delay = min(longest, initial * 2.0**attempt)
    delay *= 0.5 + random.random() / 2  # equal jitter: [delay/2, delay)
    retry_after = _retry_after(error)
    if retry_after is not None:
        # The sink said when to come back (e.g. HTTP Retry-After): not sooner, but never
        # later than the longest delay.
        delay = min(longest, max(delay, retry_after))
    return delay


@dataclass(frozen=True)
class Outcome:
    """What became of one export attempt: events to retry, events refused for good (with
    one reason each), and the error, if any."""

    retry: Sequence[Event] = ()
    rejected: Sequence[Event] = ()
    reasons: Sequence[str] = ()
    error: BaseException | None = None

    def delivered(self, size: int) -> int:
        """Events of a batch of ``size`` that reached the sink."""
        return size - len(self.retry) - len(self.rejected)


class ExportWorker:
    """The worker-thread half of a scheduler. Subclasses implement :meth:`_cycle` (one
    turn of the loop), :meth:`_finish` (the final flush) and :meth:`_settled` (nothing
    left to send), and set ``_wake`` (the event the worker waits on)."""

    exporter: Exporter[Any]
    name: str
    retry_initial: float
    retry_max: float
    dead_letters: DeadLetterFile | None
    on_export: Callable[[float, int, bool], None] | None
    _wake: threading.Event
    _started: bool
    _closed: bool
    _finished: bool
    #: Appended to the log line of a failed export that will be retried.
    _retry_note = ""

    def _init_worker(self) -> None:
        """(Re)set the worker's state: at construction and in a forked child."""
        self._cond = threading.Condition(threading.Lock())
        self._flush_requested = 0
        self._flush_done = 0
        self._failed_attempts = 0
        self._retried = 0
        self._dead_lettered = 0
        self._last_error: str | None = None
        self._last_error_time: float | None = None
        self._attempt = 0
        self._retry_at = 0.0
        self._deadline = float("inf")

    # -- control --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (done by the constructor unless ``start=False``)."""
        if self._started or self._closed:
            return
        self._started = True
        self._worker = threading.Thread(target=self._run, name=f"flagsink-{self.name}", daemon=True)
        self._worker.start()

    def flush(self, timeout: float | None = None) -> bool:
        """Export everything waiting now, ignoring backoff, and wait for it.

        :returns: True when nothing is left to send afterwards.
        """
        return self.wait_flushed(self.request_flush(), timeout)

    def request_flush(self) -> int:
        """Ask the worker to export everything waiting now; return a ticket to wait on."""
        with self._cond:
            self._flush_requested += 1
            self._wake.set()
            return self._flush_requested

    def wait_flushed(self, ticket: int, timeout: float | None = None) -> bool:
        """Wait for the flush of ``ticket``; True when nothing is left to send."""
        if self._started and not self._closed:
            with self._cond:
                self._cond.wait_for(lambda: self._flush_done >= ticket, timeout)
        return self._settled()

    def begin_close(self, deadline: float) -> bool:
        """Tell the worker to make its final flush by ``deadline`` (``time.monotonic()``
        clock) without waiting; lets several schedulers close in parallel.

        :returns: False if closing had already begun.
        """
        if self._closed:
            return False
        self._deadline = deadline
        self._closed = True
        self._wake.set()
        return True

    # -- worker ---------------------------------------------------------------------------

    def _settled(self) -> bool:
        raise NotImplementedError

    def _cycle(self) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        try:
            while not self._closed:
                self._cycle()
        except Exception:  # pragma: no cover - defensive: the worker must not die silently
            logger.exception("exporter %s: worker crashed", self.name)
        self._finish()

    def _mark_flushed(self, ticket: int) -> None:
        with self._cond:
            self._flush_done = max(self._flush_done, ticket)
            self._cond.notify_all()

    def _attempt_export(self, batch: list[Event], identity: Batch) -> Outcome:
        """Send ``batch`` once and sort out what happened (the exporter's errors decide
        which events are retried and which are refused for good)."""
        started = time.perf_counter()
        export_batch = getattr(self.exporter, "export_batch", None)
        try:
            if export_batch is None:  # duck-typed exporters without the Exporter base
                self.exporter.export(batch)
            else:
                export_batch(batch, identity)
            outcome = Outcome()
        except PartialExportError as exc:
            outcome = Outcome(exc.failed, exc.rejected, exc.reasons, exc)
        except PermanentExportError as exc:
            outcome = Outcome((), batch, [str(exc)] * len(batch), exc)
        except Exception as exc:
            outcome = Outcome(batch, (), (), exc)
        observer = self.on_export
        if observer is not None:
            try:
                observer(time.perf_counter() - started, len(batch), outcome.error is None)
            except Exception:
                logger.exception("exporter %s: on_export observer failed", self.name)
        return outcome

    def _keep_dead_letters(self, outcome: Outcome) -> None:
        if self.dead_letters is not None and outcome.rejected:
            self._dead_lettered += self.dead_letters.keep_by_reason(
                zip(outcome.rejected, outcome.reasons, strict=True)
            )

    def _settle_attempt(self, outcome: Outcome, size: int) -> bool:
        """Backoff and logs after an attempt; True unless events are left to retry."""
        if not outcome.retry:
            self._attempt = 0
            self._retry_at = 0.0
        if outcome.error is None:
            return True
        self._record_failure(outcome.error, size, len(outcome.retry), len(outcome.rejected))
        return not outcome.retry

    def _record_failure(self, error: BaseException, size: int, retry: int, rejected: int) -> None:
        self._failed_attempts += 1
        self._last_error = f"{type(error).__name__}: {error}"
        self._last_error_time = time.time()
        if rejected:
            logger.error(
                "exporter %s: %d of %d events rejected for good and dropped: %s",
                self.name,
                rejected,
                size,
                self._last_error,
            )
        if retry:
            delay = retry_delay(self._attempt, self.retry_initial, self.retry_max, error)
            self._attempt += 1
            self._retry_at = time.monotonic() + delay
            logger.warning(
                "exporter %s: export of %d events failed (attempt %d), retrying %d in %.1fs%s: %s",
                self.name,
                size,
                self._attempt,
                retry,
                delay,
                self._retry_note,
                self._last_error,
            )

    def _close_exporter(self) -> None:
        try:
            self.exporter.close()
        except Exception:
            logger.exception("exporter %s: close() failed", self.name)
