"""The sqs exporter against a real (moto) SQS server: 10,000 events read back one by one,
the emitter attribute, batching limits, FIFO deduplication, per-entry retries, outages."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from botocore.exceptions import ConnectionClosedError
from flagsink_sqs import MAX_BATCH_ENTRIES, SqsExporter
from moto_support import ACCESS_KEY, SECRET_KEY, Gate, MotoServer

import flagsink
from flagsink.config import parse_config
from flagsink.event import Event, FeatureEvent
from flagsink.exporter import ExportError, PartialExportError
from flagsink.scheduler import DataExporterScheduler
from flagsink.testing import sample_events, wait_until

from .conftest import FAST, Queue

TIMEOUT = 60.0
KIB = 1024
PACE = 50  # events added at a time while a consumer drains the queue


def as_json(event: Event) -> Any:
    return msgspec.json.decode(msgspec.json.encode(event))


def big_event(user: str, size: int) -> FeatureEvent:
    return FeatureEvent("user", user, 1_700_000_000, "big", "on", "x" * size, False, "1", "S")


def sized_event(user: str, size: int, attribute_bytes: int) -> FeatureEvent:
    """A feature event whose message (JSON body + attributes) is exactly ``size`` bytes."""
    overhead = len(msgspec.json.encode(big_event(user, 0))) + attribute_bytes
    return big_event(user, size - overhead)


EMITTER_BYTES = len("emitter") + len("String") + len("flagsink")


class BatchLog:
    """Records the entries of every SendMessageBatch call (before any fault injection)."""

    def __init__(self) -> None:
        self.calls: list[list[dict[str, Any]]] = []
        self.lock = threading.Lock()

    def __call__(self, params: dict[str, Any], **_: Any) -> None:
        with self.lock:
            self.calls.append([dict(entry) for entry in params["Entries"]])

    @property
    def sizes(self) -> list[int]:
        return [len(call) for call in self.calls]

    def bytes(self, call: int) -> int:
        return sum(len(e["MessageBody"].encode()) + EMITTER_BYTES for e in self.calls[call])

    def users(self, call: int) -> list[str]:
        return [json.loads(entry["MessageBody"])["userKey"] for entry in self.calls[call]]


class RefuseEntries:
    """Fault injection: in the first ``calls`` SendMessageBatch requests, the entries at
    ``server_fault`` and ``sender_fault`` positions are taken out of the request before it
    is sent (the server never stores them) and put back in the answer's ``Failed`` list,
    as SQS reports them."""

    def __init__(
        self, server_fault: set[int], sender_fault: set[int] = frozenset(), calls: int = 1
    ) -> None:
        self.server_fault = server_fault
        self.sender_fault = sender_fault
        self.calls = calls
        self.refused: list[str] = []
        self.lock = threading.Lock()

    def before(self, params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        with self.lock:
            if self.calls <= 0:
                return
            self.calls -= 1
        entries = params["Entries"]
        failing = [e for i, e in enumerate(entries) if i in self.server_fault | self.sender_fault]
        failures = []
        for index, entry in enumerate(entries):
            if index in self.server_fault:
                failures.append({"Id": entry["Id"], "SenderFault": False, "Code": "InternalError"})
                self.refused.append(json.loads(entry["MessageBody"])["userKey"])
            elif index in self.sender_fault:
                failures.append(
                    {
                        "Id": entry["Id"],
                        "SenderFault": True,
                        "Code": "InvalidParameterValue",
                        "Message": "Message contains invalid characters",
                    }
                )
        context["failures"] = failures
        params["Entries"] = [e for e in entries if all(e is not f for f in failing)]

    def after(self, parsed: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        if "failures" in context:
            parsed["Failed"] = list(parsed.get("Failed") or []) + context["failures"]


def hook(exporter: SqsExporter, when: str, handler: Callable[..., Any]) -> None:
    exporter.client.meta.events.register(f"{when}.sqs.SendMessageBatch", handler)


@contextmanager
def authenticating(server: MotoServer) -> Iterator[None]:
    """Inside the block moto checks every request's signature against its IAM users."""

    def set_auth(value: bytes) -> None:
        request = urllib.request.Request(
            f"{server.endpoint}/moto-api/reset-auth",
            value,
            {"Content-Type": "text/plain"},
            method="POST",
        )
        with urllib.request.urlopen(request) as answer:
            assert answer.status == 200

    set_auth(b"0")
    try:
        yield
    finally:
        set_auth(b"inf")


@pytest.fixture
def new_exporter(queue: Queue) -> Iterator[Callable[..., SqsExporter]]:
    made: list[SqsExporter] = []

    def new(**options: Any) -> SqsExporter:
        options = {"queueUrl": queue.url, **options}
        options.setdefault("config", FAST)
        exporter = SqsExporter(**options)
        made.append(exporter)
        return exporter

    yield new
    for exporter in made:
        exporter.close()


@pytest.fixture
def schedulers() -> Iterator[Callable[..., DataExporterScheduler]]:
    made: list[DataExporterScheduler] = []

    def new(exporter: SqsExporter, **options: Any) -> DataExporterScheduler:
        scheduler = DataExporterScheduler(exporter, **options)
        made.append(scheduler)
        return scheduler

    yield new
    for scheduler in made:
        scheduler.close(2.0)


def bodies(messages: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(json.loads(m["Body"]), sort_keys=True) for m in messages)


def expected(events: list[Event]) -> list[str]:
    return sorted(json.dumps(as_json(event), sort_keys=True) for event in events)


# -- round trip -----------------------------------------------------------------------------


def test_ten_thousand_mixed_events_arrive_one_by_one(
    queue: Queue,
    new_exporter: Callable[..., SqsExporter],
    schedulers: Callable[..., DataExporterScheduler],
) -> None:
    events = sample_events(10_000)
    exporter = new_exporter()
    log = BatchLog()
    hook(exporter, "before-parameter-build", log)
    with queue.draining():
        scheduler = schedulers(exporter, max_events_in_memory=2_000)
        for start in range(0, 10_000, PACE):
            for event in events[start : start + PACE]:
                scheduler.add_event(event)
            # moto's SQS spends O(queue length) per message: keep the queue short.
            assert wait_until(lambda: len(queue.messages) >= start - PACE, TIMEOUT)  # noqa: B023
        assert scheduler.close(TIMEOUT), scheduler.stats()
        assert wait_until(lambda: len(queue.messages) >= 10_000, TIMEOUT)
    messages = queue.receive()
    stats = scheduler.stats()
    assert (stats.exported, stats.dropped, stats.failed_attempts) == (10_000, 0, 0)

    assert len(messages) == 10_000
    seen: dict[str, Any] = {}
    for message in messages:
        body = json.loads(message["Body"])
        assert body["userKey"] not in seen, f"{body['userKey']} received twice"
        seen[body["userKey"]] = body
        assert message["MessageAttributes"] == {
            "emitter": {"StringValue": "flagsink", "DataType": "String"}
        }
        assert "MessageGroupId" not in message.get("Attributes", {})  # a standard queue
    for event in events:
        assert seen[event.user_key] == as_json(event), event.user_key
    assert max(log.sizes) == MAX_BATCH_ENTRIES
    assert sum(log.sizes) == 10_000
    assert max(log.bytes(call) for call in range(len(log.calls))) <= 256 * KIB
    assert exporter.counters["messages_sent"] == 10_000


def test_emitter_value_is_configurable_or_off(
    queue: Queue, new_exporter: Callable[..., SqsExporter]
) -> None:
    new_exporter(emitter="GO Feature Flag").export(sample_events(3, prefix="goff"))
    new_exporter(emitter=None).export(sample_events(2, prefix="none"))
    attributes = {
        json.loads(m["Body"])["userKey"]: m.get("MessageAttributes") for m in queue.receive()
    }
    assert attributes["goff-0000000"] == {
        "emitter": {"StringValue": "GO Feature Flag", "DataType": "String"}
    }
    assert attributes["none-0000000"] is None
    assert len(attributes) == 5


def test_batches_stay_under_10_entries_and_the_byte_limit(
    queue: Queue, new_exporter: Callable[..., SqsExporter]
) -> None:
    # Five messages of ~100 KiB: two fit in 256 KiB, so three requests.
    events = [big_event(f"large-{index}", 100 * KIB) for index in range(5)]
    exporter = new_exporter()
    log = BatchLog()
    hook(exporter, "before-parameter-build", log)
    exporter.export(events)
    assert log.sizes == [2, 2, 1]
    assert all(log.bytes(call) <= 256 * KIB for call in range(3))
    assert bodies(queue.receive()) == expected(events)


# -- size limits --------------------------------------------------------------------------------


def test_message_over_256_kib_is_rejected_counted_logged_and_dead_lettered(
    queue: Queue,
    new_exporter: Callable[..., SqsExporter],
    schedulers: Callable[..., DataExporterScheduler],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    exporter = new_exporter()
    fits = sized_event("fits", 256 * KIB, EMITTER_BYTES)
    too_big = sized_event("too-big", 256 * KIB + 1, EMITTER_BYTES)
    small = sample_events(6, prefix="small")
    with (
        caplog.at_level(logging.ERROR, logger="flagsink.sqs"),
        pytest.raises(PartialExportError) as caught,
    ):
        exporter.export([*small[:3], too_big, fits, *small[3:]])
    assert caught.value.rejected == [too_big]
    assert caught.value.failed == []
    reason = (
        f"message of {256 * KIB + 1} bytes (body + attributes) is over maxMessageSize "
        f"({256 * KIB} bytes)"
    )
    assert caught.value.reasons == [reason]
    assert f"{256 * KIB + 1} bytes" in str(caught.value)
    assert exporter.counters["rejected_too_large"] == 1
    assert any("rejected for good" in r.getMessage() for r in caplog.records)
    assert bodies(queue.receive()) == expected([*small, fits])

    # Through the scheduler, the message goes to the dead-letter file with its reason.
    dead = tmp_path / "dead.jsonl"
    scheduler = schedulers(exporter, dead_letters=dead)
    scheduler.add_events([too_big, *small[:2]])
    assert scheduler.flush(TIMEOUT)
    assert scheduler.stats().dropped_by_reason == {"rejected": 1}
    (letter,) = [json.loads(line) for line in dead.read_text().splitlines()]
    assert (letter["exporter"], letter["reason"]) == ("sqs", reason)
    assert letter["event"]["userKey"] == "too-big"
    assert bodies(queue.receive()) == expected([*small, fits, *small[:2]])  # all received


def test_max_message_size_up_to_1_mib(
    queue: Queue, new_exporter: Callable[..., SqsExporter]
) -> None:
    events = [big_event("half-mib", 512 * KIB), *sample_events(3, prefix="with")]
    new_exporter(maxMessageSize=1024 * KIB).export(events)
    assert bodies(queue.receive()) == expected(events)


def test_a_message_the_queue_refuses_is_found_and_rejected_alone(
    moto: MotoServer, new_exporter: Callable[..., SqsExporter]
) -> None:
    # The queue takes at most 1 KiB: the 2 KiB message makes moto refuse the whole batch
    # (InvalidParameterValue); the exporter splits the batch and rejects that one only.
    small = Queue(moto, f"small-{time.monotonic_ns()}", {"MaximumMessageSize": "1024"})
    moto.keep(small.create)
    try:
        events = sample_events(9, tracking_every=0, prefix="ok")
        large = big_event("too-large-for-queue", 2 * KIB)
        exporter = new_exporter(queueUrl=small.url)
        log = BatchLog()
        hook(exporter, "before-parameter-build", log)
        with pytest.raises(PartialExportError) as caught:
            exporter.export([*events[:4], large, *events[4:]])
        assert caught.value.rejected == [large]
        assert caught.value.failed == []
        assert "InvalidParameterValue" in str(caught.value)
        assert log.sizes == [10] + [1] * 10
        assert exporter.counters["rejected_sender_fault"] == 1
        assert bodies(small.receive()) == expected(events)
    finally:
        moto.forget(small.create)


def test_characters_sqs_refuses_are_escaped(
    queue: Queue, new_exporter: Callable[..., SqsExporter]
) -> None:
    event = FeatureEvent("user", "odd", 1_700_000_000, "f", "on", "a\ufffeb\uffff", False, "1", "S")
    new_exporter().export([event])
    (message,) = queue.receive()
    assert "\\ufffe" in message["Body"]
    assert "\ufffe" not in message["Body"]
    assert json.loads(message["Body"]) == as_json(event)


# -- FIFO -----------------------------------------------------------------------------------------


@pytest.fixture
def fifo_exporter(fifo_queue: Queue) -> Iterator[SqsExporter]:
    exporter = SqsExporter(queueUrl=fifo_queue.url, config=FAST)
    yield exporter
    exporter.close()


def test_fifo_same_batch_sent_twice_is_stored_once(
    fifo_queue: Queue, fifo_exporter: SqsExporter
) -> None:
    events = sample_events(200, prefix="fifo")
    fifo_exporter.export(events)
    fifo_exporter.export(events)  # e.g. a retry after a lost answer
    messages = fifo_queue.receive()
    assert bodies(messages) == expected(events)
    for message in messages:
        system = message["Attributes"]
        user = json.loads(message["Body"])["userKey"]
        assert system["MessageGroupId"] == user
        digest = hashlib.sha256(message["Body"].encode()).hexdigest()
        assert system["MessageDeduplicationId"] == digest


def test_fifo_group_ids_from_template_and_made_valid(
    fifo_queue: Queue, new_exporter: Callable[..., SqsExporter]
) -> None:
    events = [
        FeatureEvent("user", "plain-user", 1_700_000_000, "f", "on", 1, False, "1", "S"),
        FeatureEvent("user", "user with spaces é", 1_700_000_000, "f", "on", 1, False, "1", "S"),
        FeatureEvent("user", "", 1_700_000_000, "f", "on", 1, False, "1", "S"),
    ]
    new_exporter(queueUrl=fifo_queue.url).export(events)
    new_exporter(queueUrl=fifo_queue.url, messageGroupId="{{ .Key}}").export(
        [FeatureEvent("user", "by-flag", 1_700_000_000, "flag-x", "on", 1, False, "1", "S")]
    )
    groups = {
        json.loads(m["Body"])["userKey"]: m["Attributes"]["MessageGroupId"]
        for m in fifo_queue.receive()
    }
    assert groups["plain-user"] == "plain-user"
    assert groups["user with spaces é"] == hashlib.sha256("user with spaces é".encode()).hexdigest()
    assert groups[""] == hashlib.sha256(b"").hexdigest()
    assert groups["by-flag"] == "flag-x"


class LoseAnswer:
    """Fault injection: the ``call``-th request reaches the server and is stored, but its
    answer is lost on the way back (the client sees the connection closed)."""

    def __init__(self, call: int) -> None:
        self.call = call
        self.seen = 0
        self.lock = threading.Lock()

    def __call__(self, **_: Any) -> None:
        with self.lock:
            self.seen += 1
            if self.seen != self.call:
                return
        raise ConnectionClosedError(endpoint_url="http://127.0.0.1/lost-answer")


@pytest.mark.parametrize("fifo", [True, False], ids=["fifo", "standard"])
def test_a_batch_whose_answer_is_lost_is_sent_again(
    fifo: bool,
    queue: Queue,
    fifo_queue: Queue,
    schedulers: Callable[..., DataExporterScheduler],
) -> None:
    target = fifo_queue if fifo else queue
    events = sample_events(100, prefix="lost")
    exporter = SqsExporter(queueUrl=target.url, concurrentRequests=1, config=FAST)
    log = BatchLog()
    hook(exporter, "before-parameter-build", log)
    hook(exporter, "after-call", LoseAnswer(call=3))
    scheduler = schedulers(exporter, retry_initial=0.05, retry_max=0.1, start=False)
    scheduler.add_events(events)
    scheduler.start()
    assert wait_until(lambda: scheduler.stats().exported == 100, TIMEOUT)
    # The third batch and the seven never tried after it are sent again.
    assert log.sizes == [10] * 3 + [10] * 8
    assert scheduler.stats().retried == 80
    stored = Counter(json.loads(m["Body"])["userKey"] for m in target.receive())
    assert set(stored) == {event.user_key for event in events}
    duplicated = sorted(user for user, count in stored.items() if count > 1)
    if fifo:
        # Same deduplication ids within SQS's 5-minute window: the copies are dropped.
        assert duplicated == []
    else:
        # A standard queue cannot tell: exactly the batch whose answer was lost repeats.
        assert duplicated == [event.user_key for event in events[20:30]]
        assert all(stored[user] == 2 for user in duplicated)


# -- partial failures ---------------------------------------------------------------------------


def test_partial_failure_resends_only_the_failed_entries(
    queue: Queue,
    new_exporter: Callable[..., SqsExporter],
    schedulers: Callable[..., DataExporterScheduler],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = sample_events(100, prefix="partial")
    dead = tmp_path / "dead.jsonl"
    exporter = new_exporter(concurrentRequests=1)
    log = BatchLog()
    faults = RefuseEntries(server_fault={1, 5, 9}, sender_fault={7}, calls=3)
    hook(exporter, "before-parameter-build", log)
    hook(exporter, "before-parameter-build", faults.before)
    hook(exporter, "after-call", faults.after)
    scheduler = schedulers(
        exporter,
        max_events_in_memory=1_000,
        retry_initial=0.05,
        retry_max=0.1,
        dead_letters=dead,
        start=False,
    )
    scheduler.add_events(events)
    with caplog.at_level(logging.ERROR, logger="flagsink.sqs"):
        scheduler.start()
        assert wait_until(lambda: scheduler.stats().exported == 97, TIMEOUT), scheduler.stats()

    # First attempt: ten batches of ten; then only the 9 entries SQS failed on its side.
    assert log.sizes[:10] == [10] * 10
    retried = [user for call in range(10, len(log.calls)) for user in log.users(call)]
    assert retried == faults.refused
    assert len(retried) == 9
    sent = Counter(user for call in range(len(log.calls)) for user in log.users(call))
    assert all(count == (2 if user in faults.refused else 1) for user, count in sent.items())
    # The sender-fault entries (position 7 of the first three batches) are rejected.
    stats = scheduler.stats()
    assert stats.dropped_by_reason == {"rejected": 3}
    assert stats.retried == 9
    assert exporter.counters["rejected_sender_fault"] == 3
    assert any("InvalidParameterValue" in r.getMessage() for r in caplog.records)
    letters = [json.loads(line) for line in dead.read_text().splitlines()]
    rejected_users = {letter["event"]["userKey"] for letter in letters}
    assert rejected_users == {"partial-0000007", "partial-0000017", "partial-0000027"}
    # Each with SQS's code and message.
    assert {letter["reason"] for letter in letters} == {
        "SQS refused it: InvalidParameterValue: Message contains invalid characters"
    }
    # The queue holds everything else exactly once.
    delivered = [event for event in events if event.user_key not in rejected_users]
    assert bodies(queue.receive()) == expected(delivered)


def test_partial_failure_is_reported_with_exactly_the_failed_events(
    queue: Queue, new_exporter: Callable[..., SqsExporter]
) -> None:
    events = sample_events(10, prefix="report")
    exporter = new_exporter()
    faults = RefuseEntries(server_fault={0, 9}, sender_fault={4})
    hook(exporter, "before-parameter-build", faults.before)
    hook(exporter, "after-call", faults.after)
    with pytest.raises(PartialExportError) as caught:
        exporter.export(events)
    assert caught.value.failed == [events[0], events[9]]
    assert caught.value.rejected == [events[4]]
    assert "InternalError x2" in str(caught.value)
    assert len(queue.receive()) == 7


# -- outages --------------------------------------------------------------------------------------


def test_server_down_during_export_then_back(
    moto: MotoServer,
    queue: Queue,
    new_exporter: Callable[..., SqsExporter],
    schedulers: Callable[..., DataExporterScheduler],
) -> None:
    before = sample_events(300, prefix="before")
    during = sample_events(1_000, prefix="during")
    scheduler = schedulers(new_exporter(), retry_initial=0.05, retry_max=0.2)
    scheduler.add_events(before)
    assert wait_until(lambda: scheduler.stats().exported == 300, TIMEOUT)
    assert bodies(queue.receive()) == expected(before)
    with moto.stopped():  # the server's memory goes with it: the queue comes back empty
        for event in during:
            scheduler.add_event(event)
        assert wait_until(lambda: scheduler.stats().failed_attempts >= 2, TIMEOUT)
        stats = scheduler.stats()
        assert stats.exported == 300
        assert stats.buffered + stats.in_flight == 1_000
        assert "cannot reach" in str(stats.last_error)
    assert wait_until(lambda: scheduler.stats().exported == 1_300, TIMEOUT), scheduler.stats()
    assert scheduler.stats().dropped == 0
    queue.messages.clear()
    assert bodies(queue.receive()) == expected(during)


def test_connections_cut_in_the_middle_of_an_export_lose_nothing(
    moto: MotoServer,
    queue: Queue,
    new_exporter: Callable[..., SqsExporter],
    schedulers: Callable[..., DataExporterScheduler],
) -> None:
    gate = Gate(moto.port)
    try:
        events = sample_events(1_000, prefix="cut")
        exporter = new_exporter(endpointUrl=gate.endpoint)
        log = BatchLog()
        hook(exporter, "before-parameter-build", log)
        scheduler = schedulers(
            exporter, max_events_in_memory=1_000, retry_initial=0.05, retry_max=0.2
        )
        with queue.draining():
            scheduler.add_events(events)
            assert wait_until(lambda: len(log.calls) >= 20, TIMEOUT)
            gate.cut()  # requests are probably on the wire: their answers are lost
            assert wait_until(lambda: scheduler.stats().failed_attempts >= 1, TIMEOUT)
            gate.restore()
            assert wait_until(lambda: scheduler.stats().exported == 1_000, TIMEOUT)
            assert scheduler.stats().dropped == 0
            users = {event.user_key for event in events}
            assert wait_until(
                lambda: users <= {json.loads(m["Body"])["userKey"] for m in queue.messages},
                TIMEOUT,
            )
    finally:
        gate.close()
    stored = Counter(json.loads(m["Body"])["userKey"] for m in queue.receive())
    assert set(stored) == {event.user_key for event in events}  # nothing lost
    # A standard queue has no idempotent send: a batch whose answer was lost is sent
    # again, so its messages (at most 10 per request in flight, 4 in flight) may repeat.
    duplicates = sum(count - 1 for count in stored.values())
    assert duplicates <= MAX_BATCH_ENTRIES * 4 * gate.cuts


def test_close_returns_in_time_when_the_queue_is_unreachable(
    moto: MotoServer, queue: Queue
) -> None:
    gate = Gate(moto.port)
    gate.cut()
    exporter = SqsExporter(queueUrl=queue.url, endpointUrl=gate.endpoint, config=FAST)
    scheduler = DataExporterScheduler(exporter, retry_initial=0.05, retry_max=0.1)
    scheduler.add_events(sample_events(100, prefix="dead"))
    started = time.monotonic()
    assert scheduler.close(1.0) is False
    assert time.monotonic() - started < 3.0
    assert wait_until(lambda: scheduler.stats().dropped_by_reason == {"shutdown": 100}, 2.0)
    assert exporter._pool is None  # the sending threads are gone


# -- settings and client ---------------------------------------------------------------------------


def test_region_and_endpoint_come_from_the_queue_url() -> None:
    aws = SqsExporter(queueUrl="https://sqs.eu-west-3.amazonaws.com/111122223333/events")
    local = SqsExporter(queueUrl="http://localhost:9324/000000000000/events.fifo")
    try:
        assert aws.client.meta.region_name == "eu-west-3"
        assert aws.client.meta.endpoint_url == "https://sqs.eu-west-3.amazonaws.com"
        assert local.client.meta.endpoint_url == "http://localhost:9324"
        assert local.fifo
        assert not aws.fifo
    finally:
        aws.close()
        local.close()


def test_a_ready_client_is_used_and_left_open(moto: MotoServer, queue: Queue) -> None:
    client = moto.client("sqs")
    exporter = SqsExporter(queueUrl=queue.url, client=client)
    exporter.export(sample_events(5, prefix="client"))
    exporter.close()
    assert len(queue.receive()) == 5
    assert client.get_queue_attributes(QueueUrl=queue.url)  # still usable
    with pytest.raises(TypeError, match="region or endpointUrl"):
        SqsExporter(queueUrl=queue.url, client=client, region="eu-west-1")


def test_config_file_builds_the_exporter_through_the_plugin_entry_point(
    queue: Queue, tmp_path: Path
) -> None:
    config = tmp_path / "flagsink.yaml"
    config.write_text(
        f"exporters:\n  - kind: sqs\n    queueUrl: {queue.url}\n    emitter: GO Feature Flag\n"
    )
    events = sample_events(30, tracking_every=0, prefix="yaml")
    with flagsink.from_config(config) as pipeline:
        for event in events:
            pipeline.add_event(event)
        assert pipeline.flush(TIMEOUT)
    messages = queue.receive()
    assert len(messages) == 30
    assert {m["MessageAttributes"]["emitter"]["StringValue"] for m in messages} == {
        "GO Feature Flag"
    }


def test_credentials_never_appear_in_errors_or_logs(
    moto: MotoServer, queue: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    # Credentials from the environment: ACCESS_KEY / SECRET_KEY, unknown to the server.
    scheduler = DataExporterScheduler(
        SqsExporter(queueUrl=queue.url, config=FAST), retry_initial=10, retry_max=10
    )
    with authenticating(moto), caplog.at_level(logging.DEBUG, logger="flagsink"):
        scheduler.add_events(sample_events(3, prefix="auth"))
        assert wait_until(lambda: scheduler.stats().failed_attempts >= 1, TIMEOUT)
    scheduler.close(0.1)
    error = str(scheduler.stats().last_error)
    assert "access denied (" in error
    assert "sqs:SendMessage" in error
    text = error + "\n".join(record.getMessage() for record in caplog.records)
    assert SECRET_KEY not in text
    assert ACCESS_KEY not in text


def test_export_error_when_the_queue_does_not_exist(moto: MotoServer) -> None:
    exporter = SqsExporter(queueUrl=f"{moto.endpoint}/123456789012/no-such-queue", config=FAST)
    with pytest.raises(ExportError, match="does not exist") as caught:
        exporter.export(sample_events(3))
    assert not isinstance(caught.value, PartialExportError)
    exporter.close()


ROOT = Path(__file__).resolve().parents[3]
PAGES = [ROOT / "docs" / "pages" / "exporters" / "sqs.md", ROOT / "plugins" / "sqs" / "README.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_documented_examples_are_valid(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    yamls = re.findall(r"^```yaml\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
    assert yamls
    for block in yamls:
        for section in parse_config(yaml.safe_load(block)).exporters:
            assert section.exporter_class is SqsExporter
            section.build().close()  # no request is sent before the first event
    pythons = re.findall(r"^```python\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
    assert pythons
    for block in pythons:
        compile(block, str(page), "exec")
