"""The kafka exporter against a real Kafka-compatible broker (Tansu on 127.0.0.1).

Every check reads the topic back with an independent confluent-kafka consumer and compares
message by message: value (the event's JSON), key and headers.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from confluent_kafka import KafkaError, Message
from flagsink_kafka import KafkaExporter
from flagsink_kafka import exporter as kafka_module
from pydantic import ValidationError

from flagsink import (
    ConfigError,
    DataExporterScheduler,
    ExportError,
    FeatureEvent,
    PartialExportError,
    SettingsError,
    TrackingEvent,
)
from flagsink.config import parse_config
from flagsink.event import Event
from flagsink.pipeline import from_config
from flagsink.testing import sample_events, wait_until

from .tansu import Tansu, TopicReader

FAST_FAILURE = {"message.timeout.ms": 1500, "linger.ms": 1}


def expected(event: Event) -> dict[str, Any]:
    decoded: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(event))
    return decoded


def headers_of(message: Message) -> dict[str, bytes]:
    return {
        name: value if isinstance(value, bytes) else (value or "").encode()
        for name, value in message.headers() or []
    }


def by_user(messages: list[Message]) -> dict[str, list[Message]]:
    found: dict[str, list[Message]] = {}
    for message in messages:
        found.setdefault(json.loads(message.value() or b"")["userKey"], []).append(message)
    return found


def assert_same_events(messages: list[Message], events: list[Event]) -> None:
    """Each event arrived exactly once, with its JSON as value, its user key as key and its
    kind in the ``kind`` header; nothing else arrived."""
    found = by_user(messages)
    duplicated = {user: len(copies) for user, copies in found.items() if len(copies) > 1}
    assert not duplicated, f"{len(duplicated)} events arrived more than once"
    want = {event.user_key: event for event in events}
    assert set(found) == set(want), (
        f"missing {len(set(want) - set(found))}, unexpected {len(set(found) - set(want))}"
    )
    for user, (message,) in found.items():
        event = want[user]
        assert json.loads(message.value() or b"") == expected(event)
        assert message.key() == event.user_key.encode()
        assert headers_of(message)["kind"] == event.kind.encode()


@pytest.fixture
def exporters() -> Any:
    made: list[KafkaExporter] = []
    yield made
    for exporter in made:
        exporter.close()


@pytest.fixture
def schedule(exporters: Any) -> Any:
    """DataExporterScheduler factory; schedulers are closed at teardown (before their
    exporters, so no export is running when an exporter is closed)."""
    made: list[DataExporterScheduler] = []

    def make(exporter: KafkaExporter, **options: Any) -> DataExporterScheduler:
        scheduler = DataExporterScheduler(exporter, **options)
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        scheduler.close(2)


def new_exporter(
    made: list[KafkaExporter], bootstrap: str, topic: str, **kafka: Any
) -> KafkaExporter:
    exporter = KafkaExporter(kafka={"topic": topic, "addresses": bootstrap, **kafka})
    made.append(exporter)
    return exporter


# -- round trip -------------------------------------------------------------------------------


def test_ten_thousand_events_through_a_scheduler_read_back_by_a_consumer_group(
    broker: Tansu, make_topic: Callable[..., str], readers: list[TopicReader], exporters: Any
) -> None:
    topic = make_topic(partitions=3)
    events = sample_events(10_000)
    assert {e.kind for e in events} == {"feature", "tracking"}
    scheduler = DataExporterScheduler(
        new_exporter(exporters, broker.bootstrap, topic),
        max_events_in_memory=2_000,  # several export calls, each up to 2,000 events
        max_buffered_events=10_000,
    )
    for event in events:
        scheduler.add_event(event)
    assert scheduler.close(30), scheduler.stats()
    stats = scheduler.stats()
    assert (stats.exported, stats.dropped, stats.failed_attempts) == (10_000, 0, 0)

    reader = broker.reader(topic, group=True)
    readers.append(reader)
    messages = reader.read()
    assert len(messages) == 10_000
    assert_same_events(messages, events)
    assert {message.partition() for message in messages} == {0, 1, 2}
    assert exporters[0].stats()["delivered"] == 10_000


def test_one_users_events_share_a_partition_in_order(
    broker: Tansu, make_topic: Callable[..., str], readers: list[TopicReader], exporters: Any
) -> None:
    topic = make_topic(partitions=4)
    events: list[Event] = []
    for step in range(50):
        for user in ("alice", "bob", "carol", "dave", "erin"):
            events.append(
                FeatureEvent("user", user, 1_700_000_000 + step, "flag", "v", step, False, "1", "S")
            )
    new_exporter(exporters, broker.bootstrap, topic).export(events)

    reader = broker.reader(topic, group=False)
    readers.append(reader)
    messages = reader.read()
    assert len(messages) == len(events)
    partitions: dict[bytes, set[int]] = {}
    steps: dict[bytes, list[int]] = {}
    for message in sorted(messages, key=lambda m: (m.partition(), m.offset())):
        key = message.key() or b""
        partitions.setdefault(key, set()).add(message.partition())
        steps.setdefault(key, []).append(json.loads(message.value() or b"")["value"])
    assert all(len(found) == 1 for found in partitions.values()), partitions
    assert len({p for (p,) in partitions.values()}) > 1  # the users spread over partitions
    assert all(found == list(range(50)) for found in steps.values())


def test_key_template_extra_headers_and_no_key(
    broker: Tansu, make_topic: Callable[..., str], readers: list[TopicReader], exporters: Any
) -> None:
    events = sample_events(20)
    keyed, unkeyed = make_topic(), make_topic()
    new_exporter(
        exporters,
        broker.bootstrap,
        keyed,
        keyTemplate="{{ .Kind}}/{{ .Key}}/{{ .UserKey}}",
        headers={"source": "flagsink-test"},
    ).export(events)
    new_exporter(exporters, broker.bootstrap, unkeyed, keyTemplate="").export(events)

    keyed_reader = broker.reader(keyed, group=False)
    unkeyed_reader = broker.reader(unkeyed, group=False)
    readers.extend([keyed_reader, unkeyed_reader])
    found = by_user(keyed_reader.read())
    for event in events:
        (message,) = found[event.user_key]
        assert message.key() == f"{event.kind}/{event.key}/{event.user_key}".encode()
        assert message.headers() == [("kind", event.kind.encode()), ("source", b"flagsink-test")]
    unkeyed_messages = unkeyed_reader.read()
    assert len(unkeyed_messages) == 20
    assert all(message.key() is None for message in unkeyed_messages)


# -- records that can never be delivered ------------------------------------------------------


def test_message_too_large_is_rejected_alone_and_dead_lettered(
    broker: Tansu,
    make_topic: Callable[..., str],
    readers: list[TopicReader],
    exporters: Any,
    schedule: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    topic = make_topic()
    exporter = KafkaExporter(
        kafka={
            "topic": topic,
            "addresses": [broker.bootstrap],
            "config": {"message.max.bytes": 20_000},
        },
    )
    exporters.append(exporter)
    good = sample_events(30, prefix="fits")
    huge = FeatureEvent("user", "huge", 1_700_000_000, "f", "v", "x" * 50_000, False, "1", "SERVER")
    bad = FeatureEvent("user", "bad", 1_700_000_000, "f", "v", object(), False, "1", "SERVER")
    with (
        caplog.at_level(logging.ERROR, logger="flagsink.kafka"),
        pytest.raises(PartialExportError) as caught,
    ):
        exporter.export([*good[:10], huge, bad, *good[10:]])
    assert caught.value.failed == []
    reasons = {id(e): r for e, r in zip(caught.value.rejected, caught.value.reasons, strict=True)}
    assert set(reasons) == {id(huge), id(bad)}
    # The error's name and librdkafka's message: what the dead-letter file keeps.
    assert reasons[id(huge)].startswith("MSG_SIZE_TOO_LARGE: ")
    assert reasons[id(bad)] == "not JSON-encodable"
    assert exporter.stats()["rejected"] == 2
    assert exporter.stats()["delivered"] == 30
    assert "MSG_SIZE_TOO_LARGE" in caplog.text
    assert "not JSON-encodable" in caplog.text

    # Through the scheduler, the refused event goes to its dead-letter file with that
    # reason; the rest is delivered.
    letters = tmp_path / "dead" / "kafka.jsonl"
    more = sample_events(5, prefix="more")
    scheduler = schedule(exporter, dead_letters=letters)
    scheduler.add_events([*more[:2], huge, *more[2:]])
    assert scheduler.flush(30)
    stats = scheduler.stats()
    assert (stats.exported, stats.dropped_by_reason) == (5, {"rejected": 1})
    assert stats.extra["dead_lettered"] == 1
    lines = [json.loads(line) for line in letters.read_text().splitlines()]
    assert [line["event"]["userKey"] for line in lines] == ["huge"]
    assert lines[0]["reason"] == reasons[id(huge)]
    assert lines[0]["exporter"] == "kafka"

    reader = broker.reader(topic, group=False)
    readers.append(reader)
    assert_same_events(reader.read(), [*good, *more])


def test_a_full_local_queue_is_waited_out_never_dropped(
    broker: Tansu, make_topic: Callable[..., str], readers: list[TopicReader], exporters: Any
) -> None:
    topic = make_topic()
    events = sample_events(3_000, prefix="queue")
    # Room for 50 messages in librdkafka's queue: produce() raises BufferError again and again.
    exporter = new_exporter(
        exporters,
        broker.bootstrap,
        topic,
        config={"queue.buffering.max.messages": 50, "linger.ms": 1},
    )
    exporter.export(events)
    assert exporter.stats()["delivered"] == 3_000

    reader = broker.reader(topic, group=False)
    readers.append(reader)
    assert_same_events(reader.read(), events)


# -- failures ---------------------------------------------------------------------------------


def test_partial_failure_retries_only_the_undelivered_messages(
    fresh_broker: Tansu,
    readers: list[TopicReader],
    exporters: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real fault in the middle of a batch: the broker freezes (SIGSTOP) once 300
    messages are acknowledged; the rest time out. Only those are handed back, and after
    the broker resumes a retry of exactly them completes the topic."""
    topic = "partial"
    fresh_broker.create_topic(topic)
    events = sample_events(2_000, prefix="partial")
    exporter = new_exporter(
        exporters,
        fresh_broker.bootstrap,
        topic,
        # A small local queue: most messages are produced only after the first are acked.
        config={**FAST_FAILURE, "queue.buffering.max.messages": 100},
    )
    acknowledged = 0
    report = kafka_module._Batch.report

    def freeze_after_300(batch: Any, index: int, error: KafkaError | None, message: Any) -> None:
        nonlocal acknowledged
        report(batch, index, error, message)
        if error is None:
            acknowledged += 1
            if acknowledged == 300:
                fresh_broker.freeze()

    monkeypatch.setattr(kafka_module._Batch, "report", freeze_after_300)
    with pytest.raises(PartialExportError) as caught:
        exporter.export(events)
    monkeypatch.undo()
    failed = caught.value.failed
    assert caught.value.rejected == []
    assert 0 < len(failed) <= len(events) - 300
    delivered = exporter.stats()["delivered"]
    assert delivered + len(failed) == len(events)

    fresh_broker.thaw()
    # Retry as the scheduler would: each attempt gets only what the previous one failed.
    # (After the timeouts, Tansu fences the producer's id: the first retry may fail whole
    # with PRODUCER_FENCED, after which the exporter starts a new producer.)
    for _ in range(5):
        try:
            exporter.export(failed)
            break
        except PartialExportError as again:
            retried = again.failed
        assert {id(e) for e in retried} <= {id(e) for e in failed}
        failed = retried
    else:
        pytest.fail(f"{len(failed)} events still failing after 5 retries")
    assert exporter.stats()["delivered"] == len(events)

    reader = fresh_broker.reader(topic, group=False)
    readers.append(reader)
    messages = reader.read()
    copies = Counter(json.loads(m.value() or b"")["userKey"] for m in messages)
    assert set(copies) == {e.user_key for e in events}  # nothing lost
    # A message in flight when the broker froze may have been written before it timed out:
    # the idempotent producer cannot deduplicate a message sent again after that, so it may
    # be there twice; the exporter counted every such message.
    duplicates = sum(count - 1 for count in copies.values())
    assert duplicates <= exporter.stats().get("possibly_written", 0)
    assert_same_events(
        [m for m in messages if copies[json.loads(m.value() or b"")["userKey"]] == 1],
        [e for e in events if copies[e.user_key] == 1],
    )


def test_broker_appearing_later_gets_everything_exactly_once(
    readers: list[TopicReader], exporters: Any, schedule: Any
) -> None:
    """The exporter starts while nothing listens on the broker's port; exports fail and
    are retried by the scheduler; once the broker is up, everything arrives, once."""
    broker = Tansu()  # not started yet
    try:
        events = sample_events(5_000, prefix="late")
        exporter = new_exporter(exporters, broker.bootstrap, "late", config=FAST_FAILURE)
        scheduler = schedule(
            exporter, max_events_in_memory=1_000, retry_initial=0.05, retry_max=0.3
        )
        scheduler.add_events(events)
        assert wait_until(lambda: scheduler.stats().failed_attempts >= 1, 20)
        assert scheduler.stats().exported == 0

        broker.start()
        broker.create_topic("late")
        assert wait_until(lambda: scheduler.stats().exported == len(events), 30)
        assert scheduler.close(10)
        assert scheduler.stats().dropped == 0

        reader = broker.reader("late", group=True)
        readers.append(reader)
        assert_same_events(reader.read(), events)  # also: no duplicates
    finally:
        broker.stop()


def test_broker_killed_during_export_then_restarted_nothing_lost(
    fresh_broker: Tansu, readers: list[TopicReader], exporters: Any, schedule: Any
) -> None:
    """Kill the broker while an export is in flight, start it again: everything arrives.

    Tansu runs here with its in-memory storage engine, so the restarted broker is empty: the
    topic is created again, and what the first broker held is gone with it. That loss is
    the broker's, not the exporter's, so the events delivered before the kill are read
    back before it. To make sure the kill lands during an export, the broker is frozen
    (SIGSTOP) first: the next batch is then produced and in flight, unanswered, when the
    broker is killed. The restarted broker does not know the producer's id, a fatal error
    for an idempotent producer: the exporter replaces its producer and the scheduler
    retries the failed batch.
    """
    topic = "outage"
    fresh_broker.create_topic(topic)
    events = sample_events(10_000, prefix="outage")
    before, during = events[:4_000], events[4_000:]
    exporter = new_exporter(exporters, fresh_broker.bootstrap, topic, config=FAST_FAILURE)
    scheduler = schedule(exporter, max_events_in_memory=10_000, retry_initial=0.05, retry_max=0.3)

    scheduler.add_events(before)
    assert wait_until(lambda: scheduler.stats().exported == len(before), 20)
    first = fresh_broker.reader(topic, group=True)
    readers.append(first)
    assert_same_events(first.read(), before)

    fresh_broker.freeze()
    scheduler.add_events(during)
    assert wait_until(lambda: scheduler.stats().in_flight == len(during), 10)
    fresh_broker.kill()
    fresh_broker.start()
    fresh_broker.create_topic(topic)

    assert wait_until(lambda: scheduler.stats().exported == len(events), 30), scheduler.stats()
    assert scheduler.close(10)
    stats = scheduler.stats()
    assert stats.dropped == 0
    assert stats.failed_attempts >= 1

    second = fresh_broker.reader(topic, group=True)
    readers.append(second)
    messages = second.read()
    copies = Counter(json.loads(m.value() or b"")["userKey"] for m in messages)
    assert set(copies) == {e.user_key for e in during}  # everything, nothing from before
    duplicates = sum(count - 1 for count in copies.values())
    # The first broker died with whatever it had written: nothing can be duplicated.
    assert duplicates == 0
    assert_same_events(messages, during)
    assert exporter.stats()["producer_restarts"] >= 1


def test_close_is_bounded_with_messages_stuck_in_the_producer(
    exporters: Any, caplog: pytest.LogCaptureFixture
) -> None:
    broker = Tansu()  # never started: nothing listens
    exporter = KafkaExporter(
        kafka={"topic": "stuck", "addresses": [broker.bootstrap], "closeTimeout": 0.3}
    )
    producer = exporter._producer
    assert producer is not None
    for index in range(10):  # as if an export had been abandoned half-way
        producer.produce("stuck", b"x", str(index))
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="flagsink.kafka"):
        exporter.close()
    assert time.monotonic() - started < 3.0
    assert "10 messages still undelivered" in caplog.text
    exporter.close()  # idempotent
    with pytest.raises(ExportError):
        exporter.export(sample_events(1))
    broker.stop()


# -- settings and secrets ---------------------------------------------------------------------


def test_goff_proxy_yaml_section_loads(broker: Tansu, make_topic: Callable[..., str]) -> None:
    topic = make_topic()
    config = parse_config(
        {
            "exporter": {
                "kind": "kafka",
                "format": "json",
                "flushInterval": 1000,
                "kafka": {
                    "topic": topic,
                    "addresses": f"{broker.bootstrap}, {broker.bootstrap}",
                    "config": {
                        "compression.type": "lz4",
                        "linger.ms": 2,
                        "socket.nagle.disable": True,
                    },
                },
            }
        }
    )
    (section,) = config.exporters
    assert section.settings.kafka.addresses == [broker.bootstrap, broker.bootstrap]  # type: ignore[attr-defined]
    producer_config = section.settings.kafka.producer_config()  # type: ignore[attr-defined]
    assert producer_config["enable.idempotence"] == "true"
    assert producer_config["acks"] == "all"
    assert producer_config["socket.nagle.disable"] == "true"
    assert producer_config["linger.ms"] == "2"
    pipeline = from_config(config)
    try:
        pipeline.add_event(sample_events(1)[0])
        assert pipeline.flush(10)
    finally:
        assert pipeline.close(10)


def test_config_errors_point_at_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"exporter": {"kind": "kafka", "kafka": {"topic": "t", "adresses": "x:1"}}})
    text = str(caught.value)
    assert "exporter.kafka.adresses" in text
    assert "exporter.kafka.addresses: required" in text
    config = parse_config(
        {
            "exporter": {
                "kind": "kafka",
                "kafka": {"topic": "t", "addresses": "x:1", "config": {"linger.ms": "soon"}},
            }
        }
    )
    with pytest.raises(ConfigError, match=r"exporter\.kafka\.config: Invalid value"):
        config.exporters[0].build()


def test_secrets_are_never_logged_or_echoed(
    broker: Tansu, make_topic: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    secret = "s3cr3t-Pa55word-do-not-log"
    topic = make_topic()
    kafka = {
        "topic": topic,
        "addresses": [broker.bootstrap],
        "config": {
            **FAST_FAILURE,
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": "PLAIN",
            "sasl.username": "flags",
            "sasl.password": secret,
            "debug": "security,broker,conf",
        },
    }
    texts: list[str] = []
    with caplog.at_level(logging.DEBUG):
        exporter = KafkaExporter(kafka=kafka)
        texts += [repr(exporter.settings), str(exporter.settings.model_dump())]
        texts.append(exporter.settings.model_dump_json())
        try:
            exporter.export(sample_events(5))
        except ExportError as exc:
            texts.append(str(exc))
        finally:
            exporter.close()
        for broken in ({**kafka, "topic": "bad topic"}, {**kafka, "nope": 1}):
            with pytest.raises(ValidationError) as caught:
                KafkaExporter(kafka=broken)
            texts.append(str(caught.value))
        with pytest.raises(SettingsError) as refused:
            KafkaExporter(kafka={**kafka, "config": {**kafka["config"], "sasl.mechanism": secret}})
        texts.append(str(refused.value))
    texts.append(caplog.text)
    assert all(secret not in text for text in texts)
    assert exporter.settings.kafka.producer_config()["sasl.password"] == secret


def test_settings_validation_messages() -> None:
    with pytest.raises(ValidationError, match="at least one broker"):
        KafkaExporter(kafka={"topic": "t", "addresses": ","})
    with pytest.raises(ValidationError, match="cannot be set here"):
        KafkaExporter(kafka={"topic": "t", "addresses": "x:1", "config": {"transactional.id": "a"}})
    with pytest.raises(ValidationError, match="kind"):
        KafkaExporter(kafka={"topic": "t", "addresses": "x:1", "headers": {"kind": "x"}})
    with pytest.raises(ValidationError, match="unknown field"):
        KafkaExporter(kafka={"topic": "t", "addresses": "x:1", "keyTemplate": "{{ .User }}"})


def test_tracking_event_key_and_header(
    broker: Tansu, make_topic: Callable[..., str], readers: list[TopicReader], exporters: Any
) -> None:
    topic = make_topic(partitions=1)
    event = TrackingEvent("user", "buyer", 1_700_000_000, "checkout", {"plan": "pro"}, {"n": 1})
    new_exporter(exporters, broker.bootstrap, topic).export([event])
    reader = broker.reader(topic, group=False)
    readers.append(reader)
    (message,) = reader.read()
    assert message.key() == b"buyer"
    assert headers_of(message) == {"kind": b"tracking"}
    assert json.loads(message.value() or b"") == expected(event)


def test_export_runs_on_the_worker_never_the_caller(
    broker: Tansu, make_topic: Callable[..., str], exporters: Any
) -> None:
    topic = make_topic()
    seen: set[int] = set()
    exporter = new_exporter(exporters, broker.bootstrap, topic)
    original = exporter.export

    def export(events: Any) -> None:
        seen.add(threading.get_ident())
        original(events)

    exporter.export = export  # type: ignore[method-assign]
    scheduler = DataExporterScheduler(exporter)
    scheduler.add_events(sample_events(100))
    assert scheduler.flush(10)
    scheduler.close(5)
    assert seen
    assert threading.get_ident() not in seen


def test_settings_table_lists_the_keys_of_the_kafka_mapping() -> None:
    from flagsink.docgen import exporter_table

    table = exporter_table("kafka")
    keys = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert keys[:9] == [
        "`kind`",
        "`kafka`",
        "`kafka.topic`",
        "`kafka.addresses`",
        "`kafka.config`",
        "`kafka.keyTemplate`",
        "`kafka.headers`",
        "`kafka.closeTimeout`",
        "`format`",
    ]
    assert "| `kafka.keyTemplate` | string | `{{ .UserKey}}` |" in table
