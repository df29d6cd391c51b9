"""The pubsub exporter against the official Pub/Sub emulator: every event read back with a
pull subscription and compared, attributes and ordering keys, batching, limits, outages."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flagsink_pubsub import PubSubExporter, PubSubSettings
from flagsink_pubsub import exporter as pubsub_module
from google.cloud import pubsub_v1
from pydantic import ValidationError

from flagsink import docgen
from flagsink.config import ConfigError, parse_config
from flagsink.event import Event, FeatureEvent, TrackingEvent
from flagsink.exporter import ExportError, PartialExportError, SettingsError
from flagsink.plugins import default_registry
from flagsink.scheduler import DataExporterScheduler
from flagsink.testing import sample_events, wait_until

from .emulator import PROJECT, PubSubServer, Received, Topic

TIMEOUT = 30.0


def expected_json(event: Event) -> dict[str, Any]:
    """GO Feature Flag's JSON of ``event``, written out by hand."""
    record: dict[str, Any] = {
        "kind": event.kind,
        "contextKind": event.context_kind,
        "userKey": event.user_key,
        "creationDate": event.creation_date,
        "key": event.key,
    }
    if isinstance(event, FeatureEvent):
        record |= {
            "variation": event.variation,
            "value": event.value,
            "default": event.default,
            "version": event.version,
            "source": event.source,
        }
        if event.metadata:
            record["metadata"] = event.metadata
    else:
        assert isinstance(event, TrackingEvent)
        record["evaluationContext"] = event.evaluation_context
        record["trackingEventDetails"] = event.tracking_event_details
    return record


def feature(user: str, *, key: str = "flag", value: Any = 1) -> FeatureEvent:
    return FeatureEvent("user", user, 1_700_000_000, key, "v", value, False, "1", "SERVER")


def user_keys(received: list[Received]) -> list[str]:
    return [message.record["userKey"] for message in received]


@pytest.fixture
def new_exporter(topic: Topic) -> Iterator[Callable[..., PubSubExporter]]:
    """Exporters on the test's topic (a 1 s publish timeout), closed at teardown."""
    made: list[PubSubExporter] = []

    def new(**options: Any) -> PubSubExporter:
        base = {"projectID": PROJECT, "topic": topic.name, "publishTimeout": 1.0}
        exporter = PubSubExporter(**{**base, **options})
        made.append(exporter)
        return exporter

    yield new
    for exporter in made:
        exporter.close()


@pytest.fixture
def schedulers() -> Iterator[Callable[..., DataExporterScheduler]]:
    made: list[DataExporterScheduler] = []

    def new(exporter: PubSubExporter, **options: Any) -> DataExporterScheduler:
        scheduler = DataExporterScheduler(exporter, **options)
        made.append(scheduler)
        return scheduler

    yield new
    for scheduler in made:
        scheduler.close(2.0)


def export_until_done(exporter: PubSubExporter, events: list[Event]) -> int:
    """Retry ``events`` as the scheduler would (only what failed) until all are published;
    return how many attempts it took."""
    deadline = time.monotonic() + TIMEOUT
    attempts = 0
    rejected: list[Event] = []
    while events:
        attempts += 1
        try:
            exporter.export(events)
        except PartialExportError as exc:
            rejected.extend(exc.rejected)
            events = exc.failed
        except ExportError:
            pass
        else:
            break
        assert time.monotonic() < deadline, f"{len(events)} events still failing"
        time.sleep(0.1)
    assert rejected == []
    return attempts


# -- round trip --------------------------------------------------------------------------


def test_10k_events_through_the_scheduler_arrive_once_each_as_sent(
    topic: Topic,
    new_exporter: Callable[..., PubSubExporter],
    schedulers: Callable[..., DataExporterScheduler],
) -> None:
    events = sample_events(10_000)
    exporter = new_exporter(publishTimeout=10.0)
    # Queue mode: no flush interval to wait for; the worker hands over what is buffered.
    scheduler = schedulers(exporter, flush_interval=3600, max_events_in_memory=2_000)
    for event in events:
        scheduler.add_event(event)
    assert wait_until(lambda: scheduler.stats().exported == len(events), TIMEOUT)

    received = topic.drain(len(events))
    assert len(received) == len(events)  # nothing lost, nothing twice
    by_user = {message.record["userKey"]: message for message in received}
    assert len(by_user) == len(events)
    for event in events:
        message = by_user[event.user_key]
        assert message.record == expected_json(event)
        assert message.attributes == {"emitter": "flagsink"}
        assert message.ordering_key == ""
    stats = scheduler.stats()
    assert (stats.exported, stats.dropped, stats.failed_attempts) == (len(events), 0, 0)
    assert exporter.counters() == {
        "published": len(events),
        "failed": 0,
        "unresolved": 0,
        "resumed_keys": 0,
        "isolated": 0,
        "rejected": {},
    }


def test_ordering_keys_and_attribute_templates(
    topic: Topic,
    new_exporter: Callable[..., PubSubExporter],
    schedulers: Callable[..., DataExporterScheduler],
) -> None:
    events = sample_events(3_000, prefix="ordered")
    exporter = new_exporter(
        orderingKey="{{ .Key}}",
        emitter="GO Feature Flag",
        attributes={"kind": "{{ .Kind}}", "flag": "{{ .Key}}", "team": "growth"},
        batchMaxMessages=50,
    )
    scheduler = schedulers(exporter, max_events_in_memory=500, max_buffered_events=len(events))
    for event in events:
        scheduler.add_event(event)
    assert wait_until(lambda: scheduler.stats().exported == len(events), TIMEOUT)

    received = topic.drain(len(events))
    assert len(received) == len(events)
    sent = {event.user_key: event for event in events}
    for message in received:
        event = sent[message.record["userKey"]]
        assert message.record == expected_json(event)
        assert message.ordering_key == event.key
        assert message.attributes == {
            "emitter": "GO Feature Flag",
            "kind": event.kind,
            "flag": event.key,
            "team": "growth",
        }
    # Per ordering key, the subscription delivers in the order the events were added.
    want: dict[str, list[str]] = defaultdict(list)
    for event in events:
        want[event.key].append(event.user_key)
    got: dict[str, list[str]] = defaultdict(list)
    for message in received:
        got[message.ordering_key].append(message.record["userKey"])
    assert got == want
    assert len(want) == 5  # four flags and the tracking event's name


def test_emitter_null_leaves_the_attribute_out(
    topic: Topic, new_exporter: Callable[..., PubSubExporter]
) -> None:
    events = sample_events(3)
    new_exporter(emitter=None, attributes={"source": "{{ .Source}}"}).export(events)
    received = topic.drain(3)
    assert sorted(message.attributes.get("source", "") for message in received) == sorted(
        getattr(event, "source", "") for event in events
    )
    assert all("emitter" not in message.attributes for message in received)


def test_batch_settings_reach_the_publisher_and_the_wire(
    topic: Topic, new_exporter: Callable[..., PubSubExporter], monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = new_exporter(batchMaxMessages=300, batchMaxBytes=2_000_000, batchMaxLatency=0.05)
    publisher = exporter.publisher
    assert publisher.batch_settings == pubsub_v1.types.BatchSettings(
        max_bytes=2_000_000, max_latency=0.05, max_messages=300
    )
    assert publisher.publisher_options.enable_message_ordering is False
    assert publisher.publisher_options.timeout == 1.0
    # Count the publish requests (a spy on the client's one call to the API).
    requests: list[int] = []
    real = publisher._gapic_publish

    def spy(*args: Any, **kwargs: Any) -> Any:
        requests.append(len(kwargs["messages"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(publisher, "_gapic_publish", spy)
    events = sample_events(1_500, prefix="batched")
    exporter.export(events)
    assert sum(requests) == len(events)
    assert max(requests) <= 300
    assert len(requests) <= 10  # batched: not one request per message
    assert len(topic.drain(len(events))) == len(events)


# -- limits: rejected alone, counted, logged, dead-lettered ------------------------------


def test_message_over_10_mb_is_rejected_alone_and_dead_lettered(
    topic: Topic,
    new_exporter: Callable[..., PubSubExporter],
    schedulers: Callable[..., DataExporterScheduler],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = sample_events(20, prefix="small")
    big = FeatureEvent(
        "user", "too-big", 1_700_000_000, "f", "v", "x" * 10_000_001, False, "1", "S"
    )
    near = FeatureEvent("user", "large", 1_700_000_000, "f", "v", "y" * 9_000_000, False, "1", "S")
    exporter = new_exporter(publishTimeout=20.0)
    with (
        caplog.at_level(logging.ERROR, logger="flagsink.pubsub"),
        pytest.raises(PartialExportError) as caught,
    ):
        exporter.export([*good[:10], big, near, *good[10:]])
    assert caught.value.rejected == [big]
    assert caught.value.failed == []
    size = len(msgspec.json.encode(big))
    reason = f"message of {size} bytes over Pub/Sub's 10000000 byte limit"
    assert caught.value.reasons == [reason]
    assert exporter.rejected == Counter({"too_large": 1})
    assert "1 of 22 events rejected for good (message over Pub/Sub's 10000000 byte limit)" in (
        caplog.text
    )
    received = topic.drain(21)
    assert sorted(user_keys(received)) == sorted([e.user_key for e in good] + ["large"])
    assert max(len(message.data) for message in received) > 9_000_000

    # Through the scheduler, the message goes to the dead-letter file with its reason.
    dead = tmp_path / "dead" / "pubsub.jsonl"
    scheduler = schedulers(exporter, dead_letters=dead)
    scheduler.add_events([big, *good[:2]])
    assert scheduler.flush(TIMEOUT)
    assert scheduler.stats().dropped_by_reason == {"rejected": 1}
    (letter,) = [json.loads(line) for line in dead.read_text().splitlines()]
    assert (letter["exporter"], letter["reason"]) == ("pubsub", reason)
    assert letter["event"]["userKey"] == "too-big"
    received = topic.drain(23)  # every message received so far
    assert sorted(user_keys(received)) == sorted(
        [e.user_key for e in good] + ["large"] + [e.user_key for e in good[:2]]
    )


def test_attribute_or_ordering_key_over_its_limit_is_rejected_alone(
    topic: Topic, new_exporter: Callable[..., PubSubExporter]
) -> None:
    good = sample_events(10, tracking_every=0, prefix="fine")
    long_user = FeatureEvent("user", "u" * 1_025, 1_700_000_000, "f", "v", 1, False, "1", "S")
    long_flag = FeatureEvent(
        "user", "long-flag", 1_700_000_000, "f" * 1_025, "v", 1, False, "1", "S"
    )
    exporter = new_exporter(orderingKey="{{ .UserKey}}", attributes={"flag": "{{ .Key}}"})
    with pytest.raises(PartialExportError) as caught:
        exporter.export([long_user, *good, long_flag])
    assert caught.value.rejected == [long_user, long_flag]
    assert caught.value.reasons == [
        "ordering key of 1025 bytes over 1024 bytes",
        "attribute 'flag': value of 1025 bytes over 1024 bytes",
    ]
    assert caught.value.failed == []
    assert exporter.rejected == Counter({"ordering_key_too_long": 1, "attribute_too_long": 1})
    assert sorted(user_keys(topic.drain(10))) == sorted(e.user_key for e in good)


@pytest.mark.parametrize("ordering_key", [None, "{{ .Key}}"], ids=["unordered", "ordered"])
def test_request_refused_as_invalid_rejects_only_the_message_at_fault(
    topic: Topic,
    new_exporter: Callable[..., PubSubExporter],
    monkeypatch: pytest.MonkeyPatch,
    ordering_key: str | None,
) -> None:
    # The emulator refuses a publish request holding an empty message (INVALID_ARGUMENT,
    # "Some messages are empty"), for every message of the request. The exporter never
    # sends an empty message; this test makes its encoder produce one for one event (no
    # data, and no attribute with emitter: null).
    events = sample_events(300, prefix="request")
    bad = events[150]
    real = pubsub_module.encode_records

    def encode(batch: Any) -> Any:
        records, rejected = real(batch)
        return [(e, b"" if e is bad else data) for e, data in records], rejected

    monkeypatch.setattr(pubsub_module, "encode_records", encode)
    exporter = new_exporter(emitter=None, orderingKey=ordering_key)
    with pytest.raises(PartialExportError) as caught:
        exporter.export(events)
    assert caught.value.rejected == [bad]
    # The service's status code and message, as it refused the message sent alone.
    (reason,) = caught.value.reasons
    assert reason.startswith("Pub/Sub refused the message: InvalidArgument: 400 "), reason
    assert "empty" in reason, reason
    assert exporter.rejected == Counter({"invalid_argument": 1})
    assert exporter.isolated > 1  # the whole request was refused, then sent one by one
    if ordering_key is None:
        assert caught.value.failed == []
    else:
        # The refusal paused the key: its later messages failed unsent, and go again.
        assert {e.key for e in caught.value.failed} <= {bad.key}
        assert exporter.resumed_keys == 1
        export_until_done(exporter, caught.value.failed)
    received = topic.drain(len(events) - 1)
    assert sorted(user_keys(received)) == sorted(e.user_key for e in events if e is not bad)
    if ordering_key is not None:
        order = [m.record["userKey"] for m in received if m.ordering_key == bad.key]
        assert order == [e.user_key for e in events if e.key == bad.key and e is not bad]


def test_missing_topic_is_retried_not_rejected(
    pubsub: PubSubServer, new_exporter: Callable[..., PubSubExporter]
) -> None:
    topic = Topic(pubsub, f"late-{time.monotonic_ns()}")
    exporter = new_exporter(topic=topic.name)
    events = sample_events(50, prefix="late")
    with pytest.raises(ExportError, match=r"NotFound: .* does not exist") as caught:
        exporter.export(events)
    assert not isinstance(caught.value, PartialExportError)
    assert exporter.rejected == Counter()
    topic.create()
    pubsub.topics.append(topic)
    export_until_done(exporter, events)
    assert sorted(user_keys(topic.drain(len(events)))) == sorted(e.user_key for e in events)


# -- failures in the middle of an export -------------------------------------------------


@pytest.mark.parametrize("ordering_key", [None, "{{ .Key}}"], ids=["unordered", "ordered"])
def test_network_cut_mid_export_retries_only_the_failed_messages(
    pubsub: PubSubServer,
    topic: Topic,
    new_exporter: Callable[..., PubSubExporter],
    ordering_key: str | None,
) -> None:
    events = sample_events(10_000, prefix="cut")
    exporter = new_exporter(orderingKey=ordering_key)
    exporter.export(events[:10])  # connected
    # The connection breaks after about a fifth of the export's bytes reached the
    # emulator, which keeps running: what it took stays readable.
    pubsub.relay.cut_after(500_000)
    with pytest.raises(PartialExportError) as caught:
        exporter.export(events[10:])
    first_failed = caught.value.failed
    assert caught.value.rejected == []
    assert 0 < len(first_failed) < len(events) - 10
    failed_keys = {event.user_key for event in first_failed}
    confirmed = [e.user_key for e in events[10:] if e.user_key not in failed_keys]

    pubsub.relay.restore()
    export_until_done(exporter, first_failed)

    received = topic.drain(len(events))
    keys = user_keys(received)
    assert set(keys) == {event.user_key for event in events}  # none lost
    assert set(confirmed) <= set(keys)
    # Each event was confirmed once: what was confirmed was never sent again.
    assert exporter.published == len(events)
    assert exporter.failed >= len(first_failed)
    # Duplicates only where the protocol is ambiguous: requests the emulator had taken
    # when the connection broke, before their answer came back. Only failed messages
    # were sent again, so duplicates are among them.
    duplicates = Counter(keys) - Counter(set(keys))
    print(
        f"cut: {len(first_failed)} of {len(events) - 10} failed; "
        f"{sum(duplicates.values())} duplicates; {exporter.counters()}"
    )
    assert set(duplicates) <= failed_keys
    assert sum(duplicates.values()) <= len(first_failed)
    if ordering_key is not None:
        assert exporter.resumed_keys >= 1
        # Per key, the first copy of each message comes in publish order (a duplicate
        # repeats a stretch already delivered).
        want: dict[str, list[str]] = defaultdict(list)
        for event in events:
            want[event.key].append(event.user_key)
        got: dict[str, list[str]] = defaultdict(list)
        seen: set[str] = set()
        for message in received:
            key = message.record["userKey"]
            if key not in seen:
                seen.add(key)
                got[message.ordering_key].append(key)
        assert got == want


def test_emulator_stopped_during_export_then_restarted(
    pubsub: PubSubServer,
    topic: Topic,
    new_exporter: Callable[..., PubSubExporter],
    schedulers: Callable[..., DataExporterScheduler],
) -> None:
    events = sample_events(6_000, prefix="restart")
    exporter = new_exporter()
    scheduler = schedulers(
        exporter,
        max_events_in_memory=200,
        max_buffered_events=len(events),
        retry_initial=0.05,
        retry_max=0.5,
    )
    added = 0

    def feed() -> None:
        nonlocal added
        for start in range(0, len(events), 100):
            scheduler.add_events(events[start : start + 100])
            added = start + 100
            time.sleep(0.02)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        # Stop the emulator while exports are flowing.
        assert wait_until(lambda: bool(topic.pull()) and len(topic.received) >= 1_000, TIMEOUT)

        def pull_what_the_emulator_took() -> None:
            # The emulator forgets everything on restart; the real Pub/Sub keeps what it
            # acknowledged. Pull it now, so the test can account for every event.
            empty = 0
            while empty < 3:
                empty = 0 if topic.pull() else empty + 1
                time.sleep(0.05)

        with pubsub.restarted(before_kill=pull_what_the_emulator_took):
            # The export running at the stop ends first (its confirmed part exported).
            assert wait_until(lambda: scheduler.stats().failed_attempts >= 1, TIMEOUT)
            at_stop = scheduler.stats()
            assert 0 < at_stop.exported < len(events)
            assert wait_until(
                lambda: scheduler.stats().failed_attempts >= at_stop.failed_attempts + 2, TIMEOUT
            )
            assert scheduler.stats().exported == at_stop.exported  # nothing gets through
        # A new, empty emulator with the topic and its subscription created again.
    finally:
        feeder.join()
    assert added == len(events)
    assert wait_until(lambda: scheduler.stats().exported == len(events), TIMEOUT)

    received = topic.drain(len(events))
    keys = user_keys(received)
    assert set(keys) == {event.user_key for event in events}  # everything arrived
    stats = scheduler.stats()
    assert stats.dropped == 0
    assert stats.failed_attempts >= 2
    assert stats.retried >= 1
    assert exporter.failed == stats.retried  # the exporter handed back exactly these
    assert pubsub.relay.refused >= 1  # the exporter kept trying while the server was down
    # Duplicates: only messages the emulator took as the connection broke, whose answer
    # never came back; bounded by what was retried.
    duplicates = len(keys) - len(set(keys))
    print(f"restart: {stats}; {duplicates} duplicates; exported at stop {at_stop.exported}")
    assert duplicates <= stats.retried


def test_close_stops_the_publisher_in_bounded_time(
    topic: Topic, new_exporter: Callable[..., PubSubExporter]
) -> None:
    exporter = new_exporter()
    events = sample_events(100, prefix="closing")
    exporter.export(events)
    publisher = exporter.publisher
    started = time.monotonic()
    exporter.close()
    assert time.monotonic() - started < pubsub_module.CLOSE_TIMEOUT + 1
    with pytest.raises(RuntimeError, match="stopped"):
        publisher.publish(topic.path, b"late")
    with pytest.raises(ExportError, match="closed"):
        exporter.export(events)
    exporter.close()  # idempotent
    assert len(topic.drain(len(events))) == len(events)


def test_scheduler_close_with_the_sink_down_returns_in_time(
    pubsub: PubSubServer,
    new_exporter: Callable[..., PubSubExporter],
    schedulers: Callable[..., DataExporterScheduler],
) -> None:
    exporter = new_exporter()
    exporter.export(sample_events(5, prefix="before"))
    scheduler = schedulers(exporter, retry_initial=0.05, retry_max=0.2)
    pubsub.relay.cut()
    events = sample_events(500, prefix="down")
    scheduler.add_events(events)
    assert wait_until(lambda: scheduler.stats().failed_attempts >= 1, TIMEOUT)
    started = time.monotonic()
    assert scheduler.close(2.0) is False
    assert time.monotonic() - started < 2.5
    stats = scheduler.stats()
    assert stats.dropped_by_reason.get("shutdown", 0) + stats.buffered + stats.in_flight == 500


# -- settings, config, credentials ------------------------------------------------------


def test_goff_config_keys_and_aliases() -> None:
    assert default_registry().exporter("pubsub") is PubSubExporter
    config = parse_config({"exporter": {"kind": "pubsub", "projectID": PROJECT, "topic": "t-1"}})
    (section,) = config.exporters
    exporter = section.build()
    assert isinstance(exporter, PubSubExporter)
    assert exporter.topic_path == f"projects/{PROJECT}/topics/t-1"
    assert exporter.bulk is False
    for key in ("projectID", "projectId", "project_id"):
        settings = PubSubSettings.model_validate({key: "my-project", "topic": "events"})
        assert settings.topic_path == "projects/my-project/topics/events"
    full = PubSubSettings.model_validate({"topic": "projects/my-project/topics/events"})
    assert full.topic_path == "projects/my-project/topics/events"
    assert full.model_dump(by_alias=True)["projectID"] is None
    with pytest.raises(ConfigError, match=r"exporter\.projectID: required"):
        parse_config({"exporter": {"kind": "pubsub", "topic": "events"}})
    with pytest.raises(ConfigError, match=r"did you mean 'topic'"):
        parse_config({"exporter": {"kind": "pubsub", "projectID": PROJECT, "topik": "x"}})
    table = docgen.exporter_table("pubsub")
    assert "| `projectID` |" in table
    assert "| `orderingKey` |" in table


def test_defaults() -> None:
    settings = PubSubSettings.model_validate({"projectID": PROJECT, "topic": "events"})
    assert settings.emitter == "flagsink"
    assert settings.attributes == {}
    assert settings.ordering_key is None
    batch = pubsub_v1.types.BatchSettings()
    assert (settings.batch_max_messages, settings.batch_max_bytes) == (
        batch.max_messages,
        batch.max_bytes,
    )
    assert settings.batch_max_latency == batch.max_latency
    with pytest.raises(ValidationError, match="topic"):
        PubSubSettings.model_validate({"projectID": PROJECT})


def _service_account_key(tmp_path: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    path = tmp_path / "key.json"
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": PROJECT,
                "private_key_id": "abc",
                "private_key": pem,
                "client_email": "flagsink@test-project.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": "https://oauth2.googleapis.com/token",
            }
        )
    )
    return path


def test_credentials_file_is_loaded_and_errors_never_show_its_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    good = _service_account_key(tmp_path)
    exporter = PubSubExporter(projectID=PROJECT, topic="events", credentialsFile=str(good))
    regional = PubSubExporter(
        projectID=PROJECT,
        topic="events",
        credentialsFile=str(good),
        endpoint="europe-west1-pubsub.googleapis.com:443",
    )
    try:
        # The clients for the real service build (gRPC connects lazily: no network here).
        assert exporter.publisher.target == "pubsub.googleapis.com:443"
        assert regional.publisher.target == "europe-west1-pubsub.googleapis.com:443"
        assert exporter.publisher.transport._credentials.service_account_email == (
            "flagsink@test-project.iam.gserviceaccount.com"
        )
    finally:
        exporter.close()
        regional.close()

    secret = "-----BEGIN PRIVATE KEY-----SECRET-MATERIAL"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"type": "service_account", "private_key": secret}))
    garbage = tmp_path / "garbage.json"
    garbage.write_text(f"not json {secret}")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"type": "external_account", "secret": secret}))
    for path, problem in [
        (broken, "not a usable service_account key"),
        (garbage, "not a JSON credentials file"),
        (other, "type 'external_account'"),
        (tmp_path / "missing.json", "does not exist"),
    ]:
        with pytest.raises(SettingsError, match=problem) as caught:
            PubSubExporter(projectID=PROJECT, topic="events", credentialsFile=str(path))
        assert caught.value.field == "credentialsFile"
        assert "SECRET" not in str(caught.value)


def test_no_credentials_and_no_emulator_is_a_clear_export_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("PUBSUB_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # no gcloud ADC file
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # no metadata server lookup
    exporter = PubSubExporter(projectID=PROJECT, topic="events")
    with pytest.raises(ExportError, match="no Google credentials found"):
        exporter.export(sample_events(1))
    exporter.close()
