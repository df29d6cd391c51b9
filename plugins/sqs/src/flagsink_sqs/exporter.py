"""The ``sqs`` exporter: events to an Amazon SQS queue with ``SendMessageBatch``.

Each event becomes one message: its GO Feature Flag JSON as the body, with the ``emitter``
message attribute. A batch handed over by the scheduler goes out in ``SendMessageBatch``
requests of at most 10 messages and ``maxMessageSize`` bytes (256 KiB by default), a few
at a time for a standard queue, one after the other for a FIFO queue. SQS answers per
message: the entries it lists as ``Failed`` are retried alone when the fault is its own,
and rejected (counted, logged with the code, and handed back with the code and message
as their reason, which the scheduler writes to the exporter's ``deadLetterFile``) when it
is the sender's (``SenderFault``), since sending them again cannot help.

FIFO queues get a ``MessageGroupId`` (the user key by default) and a
``MessageDeduplicationId`` that is the SHA-256 of the body: a message sent again after
a lost answer, or a retried batch, is stored once within SQS's 5-minute window.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Any

from botocore import exceptions as boto  # type: ignore[import-untyped]

from flagsink.event import Event
from flagsink.exporter import Exporter, ExportError, PartialExportError, SettingsError
from flagsink.exporters.records import encode_records, key_renderer
from flagsink_sqs.settings import (
    DEFAULT_MESSAGE_GROUP_ID,
    SqsSettings,
    queue_endpoint,
    queue_region,
)

__all__ = ["MAX_BATCH_ENTRIES", "SqsExporter"]

logger = logging.getLogger("flagsink.sqs")

#: SQS's limit of entries in one SendMessageBatch request.
MAX_BATCH_ENTRIES = 10
_EMITTER = "emitter"
# MessageGroupId: 1 to 128 ASCII letters, digits and punctuation.
_GROUP_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
# U+FFFE and U+FFFF may be in a JSON string but not in an SQS message: escape them.
_NONCHARACTERS = ((b"\xef\xbf\xbe", b"\\ufffe"), (b"\xef\xbf\xbf", b"\\uffff"))
# Whole-request errors caused by one message's content: its batch is split to find it.
_CONTENT_CODES = frozenset(
    {
        "AWS.SimpleQueueService.BatchRequestTooLong",
        "BatchRequestTooLong",
        "InvalidMessageContents",
        "InvalidParameterValue",
        "MessageTooLong",
    }
)
_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "ExpiredToken",
        "InvalidClientTokenId",
        "InvalidSecurity",
        "MissingAuthenticationToken",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
    }
)
_MISSING_QUEUE_CODES = frozenset(
    {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist", "NonExistentQueue"}
)

# One message on its way: the event, the SendMessageBatch entry, its size in bytes.
_Pending = tuple[Event, dict[str, Any], int]


@dataclass
class _Outcome:
    """What became of one chunk."""

    sent: int = 0
    requests: int = 0
    failed: list[Event] = field(default_factory=list)
    rejected: list[tuple[Event, str, str]] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)
    error: Exception | None = None

    def merge(self, other: _Outcome) -> None:
        """Add ``other`` (a later chunk) to this outcome; the first error is kept."""
        self.sent += other.sent
        self.requests += other.requests
        self.failed += other.failed
        self.rejected += other.rejected
        self.codes.update(other.codes)
        self.error = self.error or other.error


class SqsExporter(Exporter[SqsSettings]):
    """Sends events to an SQS queue, near real time, with ``SendMessageBatch``.

    :param settings: a :class:`~flagsink_sqs.SqsSettings`, or pass its keys as keyword
        options (``queueUrl="https://sqs.eu-west-1.amazonaws.com/111122223333/events"``).
    :param client: a ready boto3 SQS client to use instead of building one (its region,
        endpoint, credentials and retry settings are used: do not set ``region`` or
        ``endpointUrl`` too). The caller keeps ownership: :meth:`close` leaves it open.
    :param session: a boto3 ``Session`` to build the client from (a profile, assumed-role
        credentials); default: a new session on boto3's standard credential chain.
    :param config: a ``botocore.config.Config`` merged over the exporter's defaults
        (5 s connect timeout, 30 s read timeout, standard retry mode with 3 attempts,
        no client-side parameter validation).
    """

    kind = "sqs"
    bulk = False
    settings_model = SqsSettings

    def __init__(
        self,
        settings: SqsSettings | None = None,
        /,
        *,
        client: Any = None,
        session: Any = None,
        config: Any = None,
        **options: Any,
    ) -> None:
        super().__init__(settings, **options)
        settings = self.settings
        if client is not None and (session is not None or config is not None):
            raise TypeError("pass either client= or session=/config=, not both")
        if client is not None and (settings.region or settings.endpoint_url):
            raise TypeError(
                "a ready client= carries its own region and endpoint: do not also set "
                "region or endpointUrl"
            )
        self.fifo = settings.fifo
        group = settings.message_group_id or (DEFAULT_MESSAGE_GROUP_ID if self.fifo else None)
        self._render_group: Callable[[Event], str] | None = None
        if group is not None:
            self._render_group = key_renderer(group, setting="messageGroupId")
        self._attributes: dict[str, Any] = {}
        self._attribute_bytes = 0
        if settings.emitter is not None:
            self._attributes = {_EMITTER: {"DataType": "String", "StringValue": settings.emitter}}
            # SQS counts attribute names, types and values in the message size.
            self._attribute_bytes = len(_EMITTER) + len("String") + len(settings.emitter.encode())
        self._concurrency = 1 if self.fifo else settings.concurrent_requests
        self._pool: _Senders | None = None
        self._pool_lock = threading.Lock()
        #: What this exporter did so far: ``requests`` (SendMessageBatch calls),
        #: ``messages_sent``, ``messages_failed`` (refused by SQS, handed back for retry)
        #: and ``rejected_<reason>`` (``too_large``, ``unencodable``, ``sender_fault``).
        self.counters: Counter[str] = Counter()
        self._owns_client = client is None
        self.client: Any = client if client is not None else self._new_client(session, config)

    def _new_client(self, session: Any, config: Any) -> Any:
        import boto3  # type: ignore[import-untyped]  # noqa: PLC0415 - keep plugin import light
        from botocore.config import Config  # type: ignore[import-untyped]  # noqa: PLC0415

        defaults = Config(
            connect_timeout=5,
            read_timeout=30,
            retries={"mode": "standard", "max_attempts": 3},
            tcp_keepalive=True,
            # The exporter builds every request itself within the service's limits;
            # botocore's own check of each entry would cost 40% of the export's CPU.
            parameter_validation=False,
            max_pool_connections=max(10, self._concurrency),
            user_agent_extra="flagsink-sqs",
        )
        if config is not None:
            defaults = defaults.merge(config)
        url = self.settings.queue_url
        region = self.settings.region or queue_region(url)
        endpoint = self.settings.endpoint_url or queue_endpoint(url)
        if session is None:
            session = boto3.session.Session()
        try:
            return session.client("sqs", region_name=region, endpoint_url=endpoint, config=defaults)
        except boto.InvalidRegionError:
            raise SettingsError("region", f"{region!r} is not a valid region name") from None
        except ValueError as exc:
            raise SettingsError("endpointUrl", str(exc)) from None

    # -- export ---------------------------------------------------------------------------

    def export(self, events: Sequence[Event]) -> None:
        """Send ``events`` to the queue; raise for the ones that did not make it."""
        pending, rejected = self._prepare(events)
        limit = self.settings.max_message_size
        chunks = [pending[start:end] for start, end in _chunks([p[2] for p in pending], limit)]
        total = _Outcome()
        for outcome in self._send_all(chunks):
            total.merge(outcome)
        rejected += total.rejected
        failed, sent, error = total.failed, total.sent, total.error
        self.counters["requests"] += total.requests
        self.counters["messages_sent"] += sent
        self.counters["messages_failed"] += len(failed)
        if rejected:
            self._reject(rejected, len(events))
        if not failed and not rejected:
            return
        parts = []
        if error is not None:
            parts.append(self._explain(error))
        if total.codes:
            refused = ", ".join(f"{code} x{count}" for code, count in total.codes.most_common())
            parts.append(f"SQS refused {total.codes.total()} messages ({refused})")
        if failed:
            parts.append(f"{len(failed)} of {len(events)} events to retry, {sent} delivered")
        if rejected:
            parts.append(f"{len(rejected)} rejected for good ({_summary(rejected)})")
        message = f"queue {self.settings.queue_url}: " + "; ".join(parts)
        if error is not None and sent == 0 and not rejected:
            raise ExportError(message) from error
        raise PartialExportError(
            message,
            failed=failed,
            rejected=[event for event, _, _ in rejected],
            reasons=[reason for _, _, reason in rejected],
        )

    def _prepare(
        self, events: Sequence[Event]
    ) -> tuple[list[_Pending], list[tuple[Event, str, str]]]:
        """The messages to send, and the events rejected before sending, with reasons."""
        records, unencodable = encode_records(events)
        rejected: list[tuple[Event, str, str]] = [
            (event, "unencodable", "a value is not JSON-serialisable") for event in unencodable
        ]
        limit = self.settings.max_message_size
        pending: list[_Pending] = []
        render_group = self._render_group
        attributes = self._attributes
        for event, encoded in records:
            data = encoded
            if b"\xef\xbf" in data:
                for raw, escaped in _NONCHARACTERS:
                    data = data.replace(raw, escaped)
            size = len(data) + self._attribute_bytes
            if size > limit:
                reason = (
                    f"message of {size} bytes (body + attributes) is over maxMessageSize "
                    f"({limit} bytes)"
                )
                rejected.append((event, "too_large", reason))
                continue
            entry: dict[str, Any] = {"Id": "", "MessageBody": data.decode()}
            if attributes:
                entry["MessageAttributes"] = attributes
            if render_group is not None:
                entry["MessageGroupId"] = _group_id(render_group(event))
            if self.fifo:
                entry["MessageDeduplicationId"] = hashlib.sha256(data).hexdigest()
            pending.append((event, entry, size))
        return pending, rejected

    def _send_all(self, chunks: list[list[_Pending]]) -> list[_Outcome]:
        """Send every chunk; after a whole-request failure (server unreachable...), the
        chunks not yet sent are not tried: they come back as failed."""
        if self._concurrency == 1 or len(chunks) <= 1:
            outcomes: list[_Outcome] = []
            for index, chunk in enumerate(chunks):
                outcome = self._send(chunk)
                outcomes.append(outcome)
                if outcome.error is not None:
                    outcomes += [_unsent(rest) for rest in chunks[index + 1 :]]
                    break
            return outcomes
        stop = threading.Event()

        def send(chunk: list[_Pending]) -> _Outcome:
            if stop.is_set():
                return _unsent(chunk)
            outcome = self._send(chunk)
            if outcome.error is not None:
                stop.set()
            return outcome

        return list(self._executor().map(send, chunks))

    def _send(self, chunk: list[_Pending]) -> _Outcome:
        """One SendMessageBatch request; a content error splits the batch to single
        messages, and a single message with a content error is rejected."""
        outcome = _Outcome(requests=1)
        entries = []
        for index, (_, entry, _) in enumerate(chunk):
            entry["Id"] = str(index)
            entries.append(entry)
        try:
            answer = self.client.send_message_batch(
                QueueUrl=self.settings.queue_url, Entries=entries
            )
        except boto.ClientError as exc:
            code = _code(exc)
            if code not in _CONTENT_CODES:
                return _unsent(chunk, exc, requests=1)
            if len(chunk) == 1:
                event = chunk[0][0]
                outcome.rejected.append((event, "sender_fault", _refusal(exc)))
                return outcome
            for single in chunk:  # find the message at fault
                outcome.merge(self._send([single]))
            return outcome
        except Exception as exc:
            # Nothing of this chunk is known to be stored: it is retried. (A response lost
            # after SQS stored the messages makes the retry a duplicate, except in a FIFO
            # queue, where the deduplication id drops it.)
            return _unsent(chunk, exc, requests=1)
        refused = {str(entry.get("Id")): entry for entry in answer.get("Failed") or ()}
        stored = {str(entry.get("Id")) for entry in answer.get("Successful") or ()}
        for index, (event, _, _) in enumerate(chunk):
            key = str(index)
            failure = refused.get(key)
            if failure is not None:
                code = str(failure.get("Code") or "Unknown")
                if failure.get("SenderFault"):
                    message = str(failure.get("Message") or "")[:200]
                    outcome.rejected.append(
                        (event, "sender_fault", f"SQS refused it: {code}: {message}")
                    )
                else:
                    outcome.failed.append(event)
                    outcome.codes[code] += 1
            elif key in stored:
                outcome.sent += 1
            else:  # neither stored nor refused: not known to be stored, send it again
                outcome.failed.append(event)
                outcome.codes["NoResult"] += 1
        return outcome

    def _executor(self) -> _Senders:
        with self._pool_lock:
            if self._pool is None or not self._pool.usable:
                self._pool = _Senders(self._concurrency, "flagsink-sqs")
            return self._pool

    def _reject(self, rejected: list[tuple[Event, str, str]], total: int) -> None:
        for _, counter, _ in rejected:
            self.counters[f"rejected_{counter}"] += 1
        logger.error(
            "sqs: queue %s: %d of %d events rejected for good: %s",
            self.settings.queue_url,
            len(rejected),
            total,
            _summary(rejected),
        )

    # -- errors ---------------------------------------------------------------------------

    def _explain(self, exc: Exception) -> str:
        if isinstance(exc, boto.ClientError):
            code = _code(exc)
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _MISSING_QUEUE_CODES:
                return (
                    f"the queue does not exist at {self._endpoint()} (region "
                    f"{self._region()}): create it or fix `queueUrl`"
                )
            if code in _ACCESS_CODES or status == 403:
                return (
                    f"access denied ({code or status}): check the credentials and that they "
                    "allow sqs:SendMessage on the queue"
                )
            if code.startswith("KMS"):
                return (
                    f"the queue's KMS key refused the messages ({code}): allow "
                    "kms:GenerateDataKey and kms:Decrypt on the key"
                )
            message = str(exc.response.get("Error", {}).get("Message") or "no message")[:300]
            return f"SendMessageBatch failed: {code or status}: {message}"
        if isinstance(exc, (boto.NoCredentialsError, boto.PartialCredentialsError)):
            return (
                f"no usable AWS credentials ({type(exc).__name__}): set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, a profile (AWS_PROFILE), or run with a role"
            )
        if isinstance(exc, boto.ConnectionError):
            return f"cannot reach {self._endpoint()}: {exc}"
        return f"SendMessageBatch failed: {type(exc).__name__}: {exc}"

    def _endpoint(self) -> str:
        url = getattr(getattr(self.client, "meta", None), "endpoint_url", None)
        return str(url or self.settings.endpoint_url or "SQS")

    def _region(self) -> str:
        region = getattr(getattr(self.client, "meta", None), "region_name", None)
        return str(region or self.settings.region or "?")

    def close(self) -> None:
        """Stop the sending threads and close the client's connections (unless the client
        was passed in). Nothing is buffered here: the scheduler holds every event not yet
        delivered, and ``export`` returns only when its requests are done."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()
        if self._owns_client:
            close = getattr(self.client, "close", None)
            if close is not None:
                close()


_Chunk = list[_Pending]
_Task = tuple[Callable[[_Chunk], _Outcome], _Chunk, Future[_Outcome]]


class _Senders:
    """The threads that send a batch's requests concurrently: daemon threads, fed from a
    queue. Not a ``ThreadPoolExecutor``: the interpreter joins those workers at exit, so
    a request hung on an unresponsive endpoint would hold the process (a SIGTERM'd relay)
    for the client's full timeouts and retries, long past any close deadline. A daemon
    thread stuck in such a request lets the process exit; the scheduler accounts for the
    events it was sending."""

    def __init__(self, size: int, name: str) -> None:
        self._tasks: SimpleQueue[_Task | None] = SimpleQueue()
        self._pid = os.getpid()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{index}", daemon=True)
            for index in range(size)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def usable(self) -> bool:
        """False in a forked child: the threads stayed in the parent."""
        return os.getpid() == self._pid

    def map(
        self, function: Callable[[_Chunk], _Outcome], items: Iterable[_Chunk]
    ) -> list[_Outcome]:
        """``function`` applied to every item on the threads; results in order."""
        futures: list[Future[_Outcome]] = []
        for item in items:
            future: Future[_Outcome] = Future()
            self._tasks.put((function, item, future))
            futures.append(future)
        return [future.result() for future in futures]

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            function, item, future = task
            try:
                future.set_result(function(item))
            except BaseException as exc:
                future.set_exception(exc)
            del task, function, item, future

    def shutdown(self) -> None:
        """Let every thread end once idle (none is waited for)."""
        for _ in self._threads:
            self._tasks.put(None)


def _chunks(sizes: Sequence[int], limit: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` slices of at most 10 messages and ``limit`` bytes (each <= limit)."""
    start = 0
    total = 0
    for index, size in enumerate(sizes):
        if index - start == MAX_BATCH_ENTRIES or total + size > limit:
            yield start, index
            start, total = index, 0
        total += size
    if start < len(sizes):
        yield start, len(sizes)


def _group_id(key: str) -> str:
    if _GROUP_ID.match(key):
        return key
    return hashlib.sha256(key.encode()).hexdigest()


def _unsent(chunk: list[_Pending], error: Exception | None = None, requests: int = 0) -> _Outcome:
    return _Outcome(requests=requests, failed=[event for event, _, _ in chunk], error=error)


def _code(exc: boto.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code") or "")


def _refusal(exc: boto.ClientError) -> str:
    message = str(exc.response.get("Error", {}).get("Message") or "")[:200]
    return f"SQS refused it: {_code(exc)}: {message}"


def _summary(rejected: list[tuple[Event, str, str]]) -> str:
    reasons = Counter(reason for _, _, reason in rejected)
    shown = [f"{count} x {reason}" for reason, count in reasons.most_common(3)]
    if len(reasons) > 3:
        shown.append(f"{len(reasons) - 3} more reasons")
    return "; ".join(shown)
