"""The ``kafka`` exporter: one message per event, produced with confluent-kafka (librdkafka).

Each :meth:`KafkaExporter.export` produces every event of its batch with a per-message
delivery callback, then waits (bounded by ``message.timeout.ms``) until librdkafka has
reported on every message. Only the messages whose delivery failed are handed back to the
scheduler for a retry; messages the brokers can never accept (too large, invalid) are
rejected. librdkafka batches the messages on the wire (``linger.ms``, ``batch.size``) and,
as an idempotent producer, retries them internally without writing any twice.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from operator import attrgetter
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from flagsink.event import Event
from flagsink.exporter import Exporter, ExportError, PartialExportError, SettingsError
from flagsink.exporters.records import encode_records, key_renderer
from flagsink_kafka.settings import KafkaSettings, is_user_key_template

__all__ = ["KafkaExporter"]

logger = logging.getLogger("flagsink.kafka")
librdkafka_logger = logging.getLogger("flagsink.kafka.librdkafka")

#: Delivery errors no retry can fix: the message is rejected (logged, counted, and kept by
#: the scheduler in the exporter's dead-letter file with the error's name and message).
REJECT_CODES = frozenset(
    {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG_SIZE, KafkaError.INVALID_RECORD}
)
#: Failures after which the message was certainly not written: retrying it cannot make a
#: duplicate. Any other failure (a timeout, a lost connection, a purge of an in-flight
#: request, a fatal producer error) may follow a write whose acknowledgement was lost.
NOT_WRITTEN_CODES = frozenset(
    {
        *REJECT_CODES,
        KafkaError._PURGE_QUEUE,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError._QUEUE_FULL,
    }
)
#: Errors after which the producer's idempotence state (producer id, epoch, sequence) no
#: longer matches the broker's, e.g. after a broker lost its state: the exporter starts a
#: new producer rather than failing every later message the same way.
PRODUCER_STATE_CODES = frozenset(
    {
        KafkaError._FATAL,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.INVALID_PRODUCER_ID_MAPPING,
    }
)
_BARREN_EXPORTS = 2
_REPORT_GRACE = 1.0  # seconds past message.timeout.ms before outstanding messages are purged
_POLL_EVERY = 4096  # serve delivery reports every this many produced messages
_ERROR_LOG_INTERVAL = 30.0

Header = tuple[str, str | bytes | None]

# Delivery states, one byte per message of a batch.
_PENDING, _DELIVERED, _FAILED, _SKIPPED = 0, 1, 2, 3


class KafkaExporter(Exporter[KafkaSettings]):
    """Produces each event as one Kafka message: key from ``kafka.keyTemplate`` (the user
    key by default), value the event's GO Feature Flag JSON, header ``kind`` the event kind.

    One idempotent producer per exporter, created here and reused by every export (and
    created again after a fatal producer error or a fork).
    """

    kind = "kafka"
    bulk = False
    settings_model = KafkaSettings

    def __init__(self, settings: KafkaSettings | None = None, /, **options: Any) -> None:
        super().__init__(settings, **options)
        kafka = self.settings.kafka
        self.topic = kafka.topic
        self._config = kafka.producer_config()
        self._secrets = kafka.secret_values()
        self._wait_limit = _message_timeout(self._config) + _REPORT_GRACE
        self._key_of = _key_function(kafka.key_template)
        extra: list[Header] = [(name, value.encode()) for name, value in kafka.headers.items()]
        self._headers: dict[str, list[Header]] = {
            kind: [("kind", kind.encode()), *extra] for kind in ("feature", "tracking")
        }
        self._extra_headers = extra
        #: Counters: ``delivered``, ``failed`` (handed back for a retry), ``rejected``,
        #: ``possibly_written`` (failed messages that may have been written all the same:
        #: the bound on duplicates), ``producer_restarts``.
        self.counters: Counter[str] = Counter()
        self._fatal: KafkaError | None = None
        self._barren = 0  # exports in a row that delivered nothing
        self._error_logged: dict[int, float] = {}
        self._closed = False
        self._producer: Producer | None = None
        self._pid = os.getpid()
        self._producer = self._new_producer()

    # -- producer ------------------------------------------------------------------------

    def _new_producer(self) -> Producer:
        config: dict[str, Any] = dict(self._config)
        config["error_cb"] = self._on_error
        config["logger"] = librdkafka_logger
        try:
            return Producer(config)
        except (KafkaException, ValueError, TypeError) as exc:
            raise SettingsError("kafka.config", self._scrub(_error_text(exc))) from None

    def _producer_for_export(self) -> Producer:
        if self._closed:
            raise ExportError("the kafka exporter is closed")
        producer = self._producer
        if producer is None or os.getpid() != self._pid:
            # librdkafka's threads do not survive a fork: the child needs its own producer.
            self._pid = os.getpid()
            producer = self._producer = self._new_producer()
        self._serve(producer)  # error events (a fatal error, say) since the last export
        if self._fatal is not None:
            self._replace_producer(f"after a fatal error: {self._fatal.str()}")
            if self._producer is None:
                raise ExportError("kafka: no producer (see the error logged above)")
            producer = self._producer
        return producer

    def _replace_producer(self, reason: str) -> None:
        self._fatal = None
        self._barren = 0
        if self._closed:
            return
        old, self._producer = self._producer, None
        self.counters["producer_restarts"] += 1
        logger.warning("kafka: creating a new producer: %s", self._scrub(reason))
        if old is not None:
            _discard(old)
        try:
            self._producer = self._new_producer()
        except SettingsError as exc:  # the next export tries again
            logger.error("kafka: cannot create a new producer: %s", exc)

    def _serve(self, producer: Producer) -> None:
        """Serve pending callbacks (error events, logs) without waiting."""
        try:
            producer.poll(0)
        except Exception as exc:
            self._on_raised(exc)

    def _on_raised(self, exc: Exception) -> None:
        """poll/flush raised: confluent-kafka raises fatal errors there, not to error_cb."""
        error = _kafka_error(exc) if isinstance(exc, KafkaException) else None
        if error is None:
            reason = f"unexpected {type(exc).__name__} from poll/flush, taken as fatal: {exc}"
            error = KafkaError(KafkaError._FATAL, reason, fatal=True)
        if error.fatal() or error.code() == KafkaError._FATAL:
            if self._fatal is None:
                self._fatal = error
                logger.error("kafka: fatal producer error: %s", self._scrub(error.str()))
        else:
            self._on_error(error)

    def _on_error(self, error: KafkaError) -> None:
        """librdkafka's error callback (served by poll/flush, on the exporter's thread)."""
        if error.fatal():
            self._fatal = error
            logger.error("kafka: fatal producer error: %s", self._scrub(error.str()))
            return
        now = time.monotonic()
        code = error.code()
        if now - self._error_logged.get(code, float("-inf")) >= _ERROR_LOG_INTERVAL:
            self._error_logged[code] = now
            logger.warning("kafka: %s", self._scrub(error.str()))

    # -- export --------------------------------------------------------------------------

    def export(self, events: Sequence[Event]) -> None:
        """Produce every event, wait for every delivery report, and raise
        :class:`PartialExportError` listing exactly the events not delivered."""
        producer = self._producer_for_export()
        records, unencodable = encode_records(events)
        batch = _Batch(records, [(event, "not JSON-encodable") for event in unencodable])
        self._produce_all(producer, batch)
        # librdkafka reports on every message within message.timeout.ms of producing it.
        self._await_reports(producer, time.monotonic() + self._wait_limit)
        failed, reasons = self._settle(batch)
        self._serve(producer)
        if self._fatal is not None:
            self._replace_producer(f"after a fatal error: {self._fatal.str()}")
        elif failed and len(failed) == len(batch.records):
            # A producer that delivered nothing twice in a row may be stuck (after a broker
            # lost its state, librdkafka can wait forever for a producer id): replacing it
            # costs nothing, as none of its messages is outstanding any more.
            self._barren += 1
            if self._barren >= _BARREN_EXPORTS:
                self._replace_producer(f"no message delivered in {self._barren} exports")
        else:
            self._barren = 0
        rejected = batch.rejected
        if not failed and not rejected:
            return
        self.counters["failed"] += len(failed)
        self.counters["rejected"] += len(rejected)
        if rejected:
            self._reject(rejected)
        parts = []
        if failed:
            parts.append(f"{len(failed)} of {len(events)} messages not delivered ({reasons})")
        if rejected:
            refused = _summary(Counter(reason for _, reason in rejected))
            parts.append(f"{len(rejected)} rejected for good ({refused})")
        raise PartialExportError(
            self._scrub(f"kafka topic {self.topic}: " + ", ".join(parts)),
            failed=failed,
            rejected=[event for event, _ in rejected],
            reasons=[self._scrub(reason) for _, reason in rejected],
        )

    def _settle(self, batch: _Batch) -> tuple[list[Event], str]:
        """Sort the batch by its delivery reports: count the delivered, move the refused
        to ``batch.rejected``; return the events to retry and a summary of why."""
        failed: list[Event] = []
        reasons: Counter[str] = Counter()
        delivered = 0
        errors = batch.errors
        for index, status in enumerate(batch.state):
            if status == _DELIVERED:
                delivered += 1
                continue
            if status == _SKIPPED:
                continue  # rejected while producing
            event = batch.records[index][0]
            if index >= batch.produced:  # never handed to the producer: not written
                failed.append(event)
                reasons[batch.stopped] += 1
                continue
            error = errors.get(index)
            if error is not None and error.code() in REJECT_CODES:
                batch.rejected.append((event, _reason(error)))
                continue
            failed.append(event)
            reasons[_reason(error)] += 1
            if error is None or error.code() not in NOT_WRITTEN_CODES:
                self.counters["possibly_written"] += 1
            if error is not None and error.code() in PRODUCER_STATE_CODES and not self._fatal:
                self._fatal = error
        self.counters["delivered"] += delivered
        return failed, _summary(reasons)

    def _produce_all(self, producer: Producer, batch: _Batch) -> None:
        """Produce the records in order. Sets ``batch.produced`` to how many were handed
        to the producer (the rest were not: a fatal error, or a local queue still full at
        message.timeout.ms and more)."""
        produce = producer.produce
        poll = producer.poll
        topic = self.topic
        key_of = self._key_of
        headers = self._headers
        report = batch.report
        records = batch.records
        index = 0
        count = len(records)
        stalled_since: float | None = None
        while index < count:
            event, value = records[index]
            try:
                key = key_of(event)
                produce(
                    topic,
                    value,
                    key,
                    on_delivery=partial(report, index),
                    headers=headers.get(event.kind) or self._headers_for(event.kind),
                )
            except BufferError:
                # The local queue is full: serve delivery reports to make room, never drop.
                # Messages leave the queue delivered or failed within message.timeout.ms, so
                # a queue full for longer than that is stuck; and once messages of this
                # batch are failing, the brokers are not keeping up: either way the rest of
                # the batch is handed back, to be retried after the scheduler's backoff.
                now = time.monotonic()
                if stalled_since is None:
                    stalled_since = now
                elif batch.errors or now - stalled_since > self._wait_limit:
                    batch.stopped = "not produced: the local queue is full and messages fail"
                    break
                poll(0.05)
                continue
            except KafkaException as exc:
                if not batch.produce_error(index, exc):
                    if self._fatal is None:
                        self._fatal = _kafka_error(exc)
                    batch.stopped = "not produced after a fatal producer error"
                    break  # nothing more can be produced: the rest is retried
            except (TypeError, ValueError) as exc:  # a key template that cannot render
                batch.skip(index, f"cannot render the message key: {exc}")
            index += 1
            stalled_since = None
            if not index % _POLL_EVERY:
                poll(0)
        batch.produced = index

    def _await_reports(self, producer: Producer, deadline: float) -> None:
        """Serve delivery reports until none is outstanding, a fatal error, or the deadline;
        then purge what is left, so that every message has its report."""
        left = 1
        while True:
            remaining = deadline - time.monotonic()
            try:
                left = producer.flush(min(max(remaining, 0.0), 1.0))
            except KafkaException as exc:  # confluent-kafka raises fatal errors from flush
                self._on_raised(exc)
                left = len(producer)
            except Exception as exc:
                # confluent-kafka 2.16's flush() can lose the fatal error it meant to raise
                # ("SystemError: returned NULL without setting an exception"): take it as
                # fatal, so the producer is replaced rather than used in an unknown state.
                self._on_raised(exc)
                left = len(producer)
            if not left or self._fatal is not None or remaining <= 0:
                break
        if left:
            # Messages still queued or in flight at the deadline: purge them, so each gets a
            # (failed) report now instead of being delivered after we reported it failed.
            _purge(producer)

    def _headers_for(self, kind: str) -> list[Header]:
        return [("kind", kind.encode()), *self._extra_headers]

    def _reject(self, rejected: list[tuple[Event, str]]) -> None:
        """Log the refused messages, per reason (the scheduler dead-letters them)."""
        counts = Counter(reason for _, reason in rejected)
        for reason, count in counts.items():
            logger.error(
                "kafka topic %s: %d events rejected for good: %s",
                self.topic,
                count,
                self._scrub(reason),
            )

    # -- close ---------------------------------------------------------------------------

    def close(self) -> None:
        """Flush the producer within ``kafka.closeTimeout`` seconds; purge and log the
        rest. Idempotent."""
        if self._closed:
            return
        self._closed = True
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            left = producer.flush(self.settings.kafka.close_timeout)
        except Exception:
            left = len(producer)
        if left:
            logger.error(
                "kafka topic %s: %d messages still undelivered after %.1fs at close; purged",
                self.topic,
                left,
                self.settings.kafka.close_timeout,
            )
        _discard(producer)

    # -- helpers -------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """A copy of :attr:`counters`."""
        return dict(self.counters)

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


class _Batch:
    """One export's messages and what librdkafka reported about each."""

    __slots__ = ("errors", "produced", "records", "rejected", "state", "stopped")

    def __init__(self, records: list[tuple[Event, bytes]], rejected: list[tuple[Event, str]]):
        self.records = records
        self.rejected = rejected
        self.state = bytearray(len(records))  # _PENDING until a report arrives
        self.errors: dict[int, KafkaError] = {}
        self.produced = 0
        self.stopped = "not produced"  # why the records from ``produced`` on were not

    def report(self, index: int, error: KafkaError | None, _message: object) -> None:
        """The delivery callback of message ``index`` (bound with ``functools.partial``)."""
        if error is None:
            self.state[index] = _DELIVERED
        else:
            self.state[index] = _FAILED
            self.errors[index] = error

    def skip(self, index: int, reason: str) -> None:
        """Message ``index`` is refused before it is produced."""
        self.state[index] = _SKIPPED
        self.rejected.append((self.records[index][0], reason))

    def produce_error(self, index: int, exc: KafkaException) -> bool:
        """Record what ``produce`` raised for message ``index``; False when fatal."""
        error = _kafka_error(exc)
        if error is None:
            error = KafkaError(KafkaError._FAIL, _error_text(exc))
        elif error.fatal() or error.code() == KafkaError._FATAL:
            return False
        if error.code() in REJECT_CODES:
            self.skip(index, _reason(error))
        else:
            self.state[index] = _FAILED
            self.errors[index] = error
        return True


def _summary(reasons: Counter[str]) -> str:
    return "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common(3))


def _key_function(template: str) -> Callable[[Event], str | None]:
    if not template:
        return lambda _event: None
    if is_user_key_template(template):
        return attrgetter("user_key")  # the default: no template machinery per event
    render = key_renderer(template, setting="kafka.keyTemplate")
    return lambda event: render(event) or None


def _message_timeout(config: dict[str, str]) -> float:
    """Seconds librdkafka may take to report on a message (``message.timeout.ms``, alias
    ``delivery.timeout.ms``; 0 means no limit: the exporter then waits 5 minutes)."""
    value = "300000"
    for name, setting in config.items():
        if name in ("message.timeout.ms", "delivery.timeout.ms"):
            value = setting
    try:
        milliseconds = float(value)
    except ValueError:
        milliseconds = 300000.0  # librdkafka rejects it when the producer is created
    return (milliseconds or 300000.0) / 1000.0


def _kafka_error(exc: KafkaException) -> KafkaError | None:
    error = exc.args[0] if exc.args else None
    return error if isinstance(error, KafkaError) else None


def _error_text(exc: BaseException) -> str:
    error = exc.args[0] if exc.args else None
    if isinstance(error, KafkaError):
        return str(error.str())
    return str(exc)


def _reason(error: KafkaError | None) -> str:
    if error is None:
        return "no delivery report before the deadline"
    return f"{error.name()}: {error.str()}"


def _purge(producer: Producer) -> None:
    try:
        producer.purge(in_queue=True, in_flight=True, blocking=True)
    except Exception as exc:
        logger.debug("kafka: purge failed: %s", exc)
    deadline = time.monotonic() + 1.0
    while len(producer) and time.monotonic() < deadline:
        try:
            producer.poll(0.05)
        except Exception:
            break


def _discard(producer: Producer) -> None:
    """Release a producer without waiting for anything it still holds."""
    _purge(producer)
    try:
        producer.close()
    except Exception as exc:
        logger.debug("kafka: producer close failed: %s", exc)
