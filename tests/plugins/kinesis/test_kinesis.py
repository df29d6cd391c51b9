"""The kinesis exporter against a real (moto) Kinesis server: 10,000 events read back one
by one, PutRecords chunking, shard spread, per-record retries, size limits, outages."""

from __future__ import annotations

import itertools
import json
import logging
import re
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
from flagsink_kinesis import (
    MAX_RECORD_BYTES,
    MAX_RECORDS_PER_REQUEST,
    MAX_REQUEST_BYTES,
    KinesisExporter,
)
from flagsink_kinesis.exporter import _chunks
from hypothesis import given
from hypothesis import strategies as st
from moto_support import ACCESS_KEY, SECRET_KEY, Gate, MotoServer
from pydantic import ValidationError

import flagsink
from flagsink.config import parse_config
from flagsink.event import Event, FeatureEvent
from flagsink.exporter import ExportError, PartialExportError
from flagsink.scheduler import DataExporterScheduler
from flagsink.testing import sample_events, wait_until

from .conftest import FAST, SHARDS, Stream

TIMEOUT = 30.0


def as_json(event: Event) -> Any:
    return msgspec.json.decode(msgspec.json.encode(event))


def big_event(user: str, size: int) -> FeatureEvent:
    """A feature event whose JSON is about ``size`` bytes."""
    return FeatureEvent("user", user, 1_700_000_000, "big", "on", "x" * size, False, "1", "S")


class PutRecordsLog:
    """Records every PutRecords call the exporter makes (before any fault injection)."""

    def __init__(self) -> None:
        self.calls: list[list[dict[str, Any]]] = []

    def __call__(self, params: dict[str, Any], **_: Any) -> None:
        self.calls.append(list(params["Records"]))

    @property
    def sizes(self) -> list[int]:
        return [len(call) for call in self.calls]

    def users(self, call: int) -> list[str]:
        return [json.loads(record["Data"])["userKey"] for record in self.calls[call]]


class RefuseRecords:
    """Fault injection: in the first ``calls`` PutRecords requests, the records whose
    position satisfies ``refuse`` are taken out of the request before it is sent (so the
    server never stores them) and put back in the response as failed entries, as Kinesis
    answers when a shard is over its throughput."""

    def __init__(self, refuse: Callable[[int], bool], calls: int = 1) -> None:
        self.refuse = refuse
        self.calls = calls
        self.refused_users: list[str] = []

    def before(self, params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        if self.calls <= 0:
            return
        self.calls -= 1
        records = params["Records"]
        refused = [index for index in range(len(records)) if self.refuse(index)]
        assert 0 < len(refused) < len(records)
        context["refused"] = (len(records), refused)
        self.refused_users += [json.loads(records[i]["Data"])["userKey"] for i in refused]
        params["Records"] = [r for i, r in enumerate(records) if i not in set(refused)]

    def after(self, parsed: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        if "refused" not in context:
            return
        total, refused = context["refused"]
        stored = iter(parsed["Records"])
        parsed["Records"] = [
            {
                "ErrorCode": "ProvisionedThroughputExceededException",
                "ErrorMessage": "Rate exceeded for shard shardId-000000000001",
            }
            if index in refused
            else next(stored)
            for index in range(total)
        ]
        parsed["FailedRecordCount"] = len(refused)


def hook(exporter: KinesisExporter, when: str, handler: Callable[..., Any]) -> None:
    exporter.client.meta.events.register(f"{when}.kinesis.PutRecords", handler)


@pytest.fixture
def new_exporter(moto: MotoServer, stream: Stream) -> Iterator[Callable[..., KinesisExporter]]:
    made: list[KinesisExporter] = []

    def new(**options: Any) -> KinesisExporter:
        options = {"streamName": stream.name, "endpointUrl": moto.endpoint, **options}
        options.setdefault("config", FAST)
        exporter = KinesisExporter(**options)
        made.append(exporter)
        return exporter

    yield new
    for exporter in made:
        exporter.close()


@pytest.fixture
def schedulers() -> Iterator[Callable[..., DataExporterScheduler]]:
    made: list[DataExporterScheduler] = []

    def new(exporter: KinesisExporter, **options: Any) -> DataExporterScheduler:
        scheduler = DataExporterScheduler(exporter, **options)
        made.append(scheduler)
        return scheduler

    yield new
    for scheduler in made:
        scheduler.close(2.0)


@contextmanager
def authenticating(server: MotoServer) -> Iterator[None]:
    """Inside the block moto checks every request's signature against its IAM users."""

    def set_auth(value: bytes) -> None:
        url = f"{server.endpoint}/moto-api/reset-auth"
        with urllib.request.urlopen(
            urllib.request.Request(url, value, {"Content-Type": "text/plain"}, method="POST")
        ) as r:
            assert r.status == 200

    set_auth(b"0")
    try:
        yield
    finally:
        set_auth(b"inf")


# -- round trip -----------------------------------------------------------------------------


def test_ten_thousand_mixed_events_arrive_one_by_one(
    stream: Stream,
    new_exporter: Callable[..., KinesisExporter],
    schedulers: Callable[..., DataExporterScheduler],
) -> None:
    events = sample_events(10_000)
    exporter = new_exporter()
    log = PutRecordsLog()
    hook(exporter, "before-parameter-build", log)
    scheduler = schedulers(exporter, max_events_in_memory=2_000)
    for event in events:
        scheduler.add_event(event)
    assert scheduler.close(TIMEOUT), scheduler.stats()
    stats = scheduler.stats()
    assert (stats.exported, stats.dropped, stats.failed_attempts) == (10_000, 0, 0)

    records = stream.records()
    assert len(records) == 10_000
    position = {event.user_key: index for index, event in enumerate(events)}
    seen: dict[str, Any] = {}
    for record in records:
        body = record.json
        user = body["userKey"]
        assert user not in seen, f"{user} stored twice"
        seen[user] = body
        assert record.partition_key == user  # default partitionKey: {{ .UserKey}}
    for event in events:
        assert seen[event.user_key] == as_json(event), event.user_key
    # Each shard holds its records in the order they were added.
    by_shard: dict[str, list[int]] = {}
    for record in records:
        by_shard.setdefault(record.shard, []).append(position[record.json["userKey"]])
    for shard, order in by_shard.items():
        assert order == sorted(order), f"{shard} out of order"
    assert len(by_shard) == SHARDS
    assert max(log.sizes) <= MAX_RECORDS_PER_REQUEST
    assert sum(log.sizes) == 10_000


def test_a_batch_of_1200_goes_out_in_chunks_of_500_and_arrives_whole(
    stream: Stream,
    new_exporter: Callable[..., KinesisExporter],
    schedulers: Callable[..., DataExporterScheduler],
) -> None:
    events = sample_events(1_200, prefix="chunk")
    exporter = new_exporter()
    log = PutRecordsLog()
    hook(exporter, "before-parameter-build", log)
    scheduler = schedulers(exporter, max_events_in_memory=5_000, start=False)
    scheduler.add_events(events)
    scheduler.start()  # the worker takes the 1,200 events as one batch
    assert scheduler.flush(TIMEOUT)
    assert log.sizes == [500, 500, 200]
    assert [user for call in range(3) for user in log.users(call)] == [
        event.user_key for event in events
    ]
    assert exporter.counters["requests"] == 3
    assert sorted(map(json.dumps, stream.read())) == sorted(
        json.dumps(as_json(event)) for event in events
    )


def test_requests_stay_under_5_mib(
    stream: Stream, new_exporter: Callable[..., KinesisExporter]
) -> None:
    # 15 records of ~700 KB: 7 fit in 5 MiB, so three requests (moto refuses > 5 MiB).
    events = [big_event(f"large-{index:02d}", 700_000) for index in range(15)]
    exporter = new_exporter()
    log = PutRecordsLog()
    hook(exporter, "before-parameter-build", log)
    exporter.export(events)
    assert len(log.calls) == 3
    for call in log.calls:
        assert sum(len(r["Data"]) + len(r["PartitionKey"]) for r in call) <= MAX_REQUEST_BYTES
    assert sorted(record["userKey"] for record in stream.read()) == [e.user_key for e in events]


@given(st.lists(st.integers(1, MAX_RECORD_BYTES), max_size=1_200))
def test_chunks_respect_both_limits_and_keep_order(sizes: list[int]) -> None:
    chunks = list(_chunks(sizes))
    assert [i for start, end in chunks for i in range(start, end)] == list(range(len(sizes)))
    for start, end in chunks:
        assert 0 < end - start <= MAX_RECORDS_PER_REQUEST
        assert sum(sizes[start:end]) <= MAX_REQUEST_BYTES
    for (start, end), (_, following) in itertools.pairwise(chunks):
        # A chunk is only cut when the next record would not fit.
        assert end - start == MAX_RECORDS_PER_REQUEST or sum(sizes[start : end + 1]) > (
            MAX_REQUEST_BYTES
        )
        assert following > end


# -- shards -----------------------------------------------------------------------------------


def shard_counts(stream: Stream) -> Counter[str]:
    return Counter(record.shard for record in stream.records())


def test_events_spread_over_every_shard_by_default(
    stream: Stream, new_exporter: Callable[..., KinesisExporter]
) -> None:
    new_exporter().export(sample_events(2_000, prefix="spread"))
    counts = shard_counts(stream)
    assert len(counts) == SHARDS
    for shard, count in counts.items():  # 500 each on average
        assert 350 <= count <= 650, (shard, counts)


def test_partition_key_default_sends_everything_to_one_shard(
    stream: Stream, new_exporter: Callable[..., KinesisExporter]
) -> None:
    new_exporter(partitionKey="default").export(sample_events(300, prefix="one"))
    records = stream.records()
    assert len(records) == 300
    assert {record.partition_key for record in records} == {"default"}
    assert len({record.shard for record in records}) == 1


def test_partition_key_template_and_explicit_hash_key(
    stream: Stream, new_exporter: Callable[..., KinesisExporter]
) -> None:
    events = sample_events(100, prefix="hash")
    # 2^127 is where the third of four equal shards starts.
    new_exporter(partitionKey="{{ .Kind}}-{{ .Key}}", explicitHashKey=str(2**127 + 5)).export(
        events
    )
    records = stream.records()
    assert {record.shard for record in records} == {"shardId-000000000002"}
    assert Counter(record.partition_key for record in records) == Counter(
        f"{event.kind}-{event.key}" for event in events
    )


def test_empty_and_overlong_partition_keys_are_replaced(
    stream: Stream, new_exporter: Callable[..., KinesisExporter]
) -> None:
    events = [
        FeatureEvent("user", "", 1_700_000_000, "flag", "on", True, False, "1", "S"),
        FeatureEvent("user", "u" * 300, 1_700_000_000, "flag", "on", True, False, "1", "S"),
    ]
    new_exporter().export(events)
    keys = {record.json["userKey"]: record.partition_key for record in stream.records()}
    assert keys[""] == "default"
    assert len(keys["u" * 300]) == 64  # its SHA-256 in hex: still the same shard per user


# -- partial failures ---------------------------------------------------------------------------


def test_partial_failure_retries_only_the_failed_records(
    stream: Stream,
    new_exporter: Callable[..., KinesisExporter],
    schedulers: Callable[..., DataExporterScheduler],
) -> None:
    events = sample_events(1_200, prefix="partial")
    exporter = new_exporter()
    log = PutRecordsLog()
    faults = RefuseRecords(lambda index: index % 7 == 3, calls=2)
    hook(exporter, "before-parameter-build", log)
    hook(exporter, "before-parameter-build", faults.before)
    hook(exporter, "after-call", faults.after)
    scheduler = schedulers(
        exporter, max_events_in_memory=5_000, retry_initial=0.05, retry_max=0.1, start=False
    )
    scheduler.add_events(events)
    scheduler.start()
    assert wait_until(lambda: scheduler.stats().exported == 1_200, TIMEOUT), scheduler.stats()

    refused = faults.refused_users
    assert len(refused) == 2 * 71  # every 7th record of the first two requests (500 each)
    # First attempt: 500, 500, 200 records; then exactly the refused ones, in order.
    assert log.sizes[:3] == [500, 500, 200]
    retried = [user for call in range(3, len(log.calls)) for user in log.users(call)]
    assert retried == refused
    sent = Counter(user for call in range(len(log.calls)) for user in log.users(call))
    assert all(count == (2 if user in set(refused) else 1) for user, count in sent.items())
    stats = scheduler.stats()
    assert (stats.retried, stats.dropped, stats.failed_attempts) == (len(refused), 0, 1)
    assert "ProvisionedThroughputExceededException x142" in str(stats.last_error)
    assert exporter.counters["records_failed"] == 142
    # The stream holds every event exactly once.
    assert sorted(map(json.dumps, stream.read())) == sorted(
        json.dumps(as_json(event)) for event in events
    )


def test_partial_failure_is_reported_with_exactly_the_failed_events(
    stream: Stream, new_exporter: Callable[..., KinesisExporter]
) -> None:
    events = sample_events(40, prefix="report")
    exporter = new_exporter()
    faults = RefuseRecords(lambda index: index in (0, 17, 39))
    hook(exporter, "before-parameter-build", faults.before)
    hook(exporter, "after-call", faults.after)
    with pytest.raises(PartialExportError) as caught:
        exporter.export(events)
    assert caught.value.failed == [events[0], events[17], events[39]]
    assert caught.value.rejected == []
    assert "37 delivered" in str(caught.value)
    assert len(stream.read()) == 37


# -- size limit -----------------------------------------------------------------------------------


def sized_event(user: str, size: int) -> FeatureEvent:
    """A feature event whose record (JSON + partition key ``user``) is exactly ``size``."""
    probe = big_event(user, 0)
    overhead = len(msgspec.json.encode(probe)) + len(user)
    return big_event(user, size - overhead)


def test_record_over_1_mib_is_rejected_counted_logged_and_dead_lettered(
    stream: Stream,
    new_exporter: Callable[..., KinesisExporter],
    schedulers: Callable[..., DataExporterScheduler],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    exporter = new_exporter()
    fits = sized_event("fits", MAX_RECORD_BYTES)
    too_big = sized_event("too-big", MAX_RECORD_BYTES + 1)
    small = sample_events(10, prefix="small")
    with (
        caplog.at_level(logging.ERROR, logger="flagsink.kinesis"),
        pytest.raises(PartialExportError) as caught,
    ):
        exporter.export([*small[:5], too_big, fits, *small[5:]])
    assert caught.value.rejected == [too_big]
    assert caught.value.failed == []
    reason = (
        "record of 1048577 bytes (data + partition key) is over the 1048576-byte (1 MiB) "
        "limit of a Kinesis record"
    )
    assert caught.value.reasons == [reason]
    assert "1048577 bytes" in str(caught.value)
    assert exporter.counters["rejected_too_large"] == 1
    assert any("rejected for good" in r.getMessage() for r in caplog.records)
    stored = sorted(record["userKey"] for record in stream.read())
    assert stored == sorted(["fits", *(event.user_key for event in small)])

    # Through the scheduler, the record goes to the dead-letter file with its reason.
    dead = tmp_path / "dead" / "kinesis.jsonl"
    scheduler = schedulers(exporter, dead_letters=dead)
    scheduler.add_events([too_big, *small[:2]])
    assert scheduler.flush(10)
    stats = scheduler.stats()
    assert (stats.exported, stats.dropped_by_reason) == (2, {"rejected": 1})
    (letter,) = [json.loads(line) for line in dead.read_text().splitlines()]
    assert (letter["exporter"], letter["reason"]) == ("kinesis", reason)
    assert letter["event"] == as_json(too_big)


def test_invalid_explicit_hash_key_rejects_the_event_only(
    stream: Stream, new_exporter: Callable[..., KinesisExporter]
) -> None:
    events = [
        FeatureEvent("user", "a", 1_700_000_000, "flag", "on", True, False, "12", "S"),
        FeatureEvent("user", "b", 1_700_000_000, "flag", "on", True, False, "x1", "S"),
        FeatureEvent("user", "c", 1_700_000_000, "flag", "on", True, False, "", "S"),
    ]
    exporter = new_exporter(explicitHashKey="{{ .Version}}")
    with pytest.raises(PartialExportError) as caught:
        exporter.export(events)
    assert caught.value.rejected == [events[1]]
    assert caught.value.reasons == ["explicitHashKey 'x1' is not an integer 0..2^128-1"]
    assert exporter.counters["rejected_hash_key"] == 1
    by_user = {record.json["userKey"]: record.shard for record in stream.records()}
    assert by_user["a"] == "shardId-000000000000"  # hash key 12
    assert set(by_user) == {"a", "c"}  # c: empty hash key, routed by its partition key


# -- outages --------------------------------------------------------------------------------


def test_server_down_during_export_then_back(
    moto: MotoServer,
    stream: Stream,
    new_exporter: Callable[..., KinesisExporter],
    schedulers: Callable[..., DataExporterScheduler],
) -> None:
    before = sample_events(500, prefix="before")
    during = sample_events(2_000, prefix="during")
    scheduler = schedulers(new_exporter(), retry_initial=0.05, retry_max=0.2)
    scheduler.add_events(before)
    assert wait_until(lambda: scheduler.stats().exported == 500, TIMEOUT)
    assert len(stream.read()) == 500
    with moto.stopped():  # the server's memory goes with it: the stream comes back empty
        for event in during:
            scheduler.add_event(event)
        assert wait_until(lambda: scheduler.stats().failed_attempts >= 2, TIMEOUT)
        stats = scheduler.stats()
        assert stats.exported == 500
        assert stats.buffered + stats.in_flight == 2_000
        assert "cannot reach" in str(stats.last_error)
    assert wait_until(lambda: scheduler.stats().exported == 2_500, TIMEOUT), scheduler.stats()
    assert scheduler.stats().dropped == 0
    assert sorted(map(json.dumps, stream.read())) == sorted(
        json.dumps(as_json(event)) for event in during
    )


def test_connections_cut_in_the_middle_of_an_export_lose_nothing(
    moto: MotoServer,
    stream: Stream,
    new_exporter: Callable[..., KinesisExporter],
    schedulers: Callable[..., DataExporterScheduler],
) -> None:
    gate = Gate(moto.port)
    try:
        events = sample_events(5_000, prefix="cut")
        exporter = new_exporter(endpointUrl=gate.endpoint)
        log = PutRecordsLog()
        hook(exporter, "before-parameter-build", log)
        scheduler = schedulers(
            exporter, max_events_in_memory=5_000, retry_initial=0.05, retry_max=0.2
        )
        scheduler.add_events(events)
        assert wait_until(lambda: len(log.calls) >= 3, TIMEOUT)
        gate.cut()  # a request is probably on the wire: its answer is lost
        assert wait_until(lambda: scheduler.stats().failed_attempts >= 1, TIMEOUT)
        gate.restore()
        assert wait_until(lambda: scheduler.stats().exported == 5_000, TIMEOUT)
        assert scheduler.stats().dropped == 0
    finally:
        gate.close()
    stored = Counter(record["userKey"] for record in stream.read())
    assert set(stored) == {event.user_key for event in events}  # nothing lost
    # Kinesis has no idempotent put: a request whose answer was lost is sent again, so its
    # records (at most one request's worth per cut) may be stored twice.
    duplicates = sum(count - 1 for count in stored.values())
    assert duplicates <= MAX_RECORDS_PER_REQUEST * gate.cuts


class LoseAnswer:
    """Fault injection: the ``call``-th request reaches the server and is stored, but its
    answer is lost on the way back (the client sees the connection closed)."""

    def __init__(self, call: int) -> None:
        self.call = call
        self.seen = 0

    def __call__(self, **_: Any) -> None:
        self.seen += 1
        if self.seen == self.call:
            raise ConnectionClosedError(endpoint_url="http://127.0.0.1/lost-answer")


def test_a_request_whose_answer_is_lost_is_sent_again_and_counted(
    stream: Stream,
    new_exporter: Callable[..., KinesisExporter],
    schedulers: Callable[..., DataExporterScheduler],
) -> None:
    events = sample_events(1_200, prefix="lost")
    exporter = new_exporter()
    log = PutRecordsLog()
    hook(exporter, "before-parameter-build", log)
    hook(exporter, "after-call", LoseAnswer(call=2))
    scheduler = schedulers(
        exporter, max_events_in_memory=5_000, retry_initial=0.05, retry_max=0.1, start=False
    )
    scheduler.add_events(events)
    scheduler.start()
    assert wait_until(lambda: scheduler.stats().exported == 1_200, TIMEOUT)
    # The second request (stored, answer lost) and the third (never tried) go again.
    assert log.sizes == [500, 500, 500, 200]
    assert scheduler.stats().retried == 700
    assert "ConnectionClosedError" in str(scheduler.stats().last_error)
    stored = Counter(record["userKey"] for record in stream.read())
    assert set(stored) == {event.user_key for event in events}
    # Kinesis cannot tell a resent record from a new one: exactly that request repeats.
    duplicated = sorted(user for user, count in stored.items() if count > 1)
    assert duplicated == [event.user_key for event in events[500:1_000]]


def test_close_returns_in_time_when_the_stream_is_unreachable(
    moto: MotoServer,
    new_exporter: Callable[..., KinesisExporter],
) -> None:
    gate = Gate(moto.port)
    gate.cut()
    scheduler = DataExporterScheduler(
        new_exporter(endpointUrl=gate.endpoint), retry_initial=0.05, retry_max=0.1
    )
    scheduler.add_events(sample_events(100, prefix="dead"))
    started = time.monotonic()
    assert scheduler.close(1.0) is False
    assert time.monotonic() - started < 3.0
    # The worker accounts for what is left as soon as its last attempt returns.
    assert wait_until(lambda: scheduler.stats().dropped_by_reason == {"shutdown": 100}, 2.0)


# -- settings and client --------------------------------------------------------------------


def test_stream_arn_wins_over_stream_name_and_says_so(
    moto: MotoServer,
    stream: Stream,
    new_exporter: Callable[..., KinesisExporter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    other = Stream(moto, f"{stream.name}-other")
    moto.keep(other.create)
    try:
        with caplog.at_level(logging.WARNING, logger="flagsink.kinesis"):
            exporter = new_exporter(streamArn=stream.arn, streamName=other.name)
        assert any(
            "writing to streamArn" in r.getMessage() and other.name in r.getMessage()
            for r in caplog.records
        )
        exporter.export(sample_events(10, prefix="arn"))
        assert len(stream.read()) == 10
        assert other.read() == []
    finally:
        moto.forget(other.create)


def test_neither_stream_arn_nor_stream_name_is_a_clear_error(moto: MotoServer) -> None:
    with pytest.raises(ValidationError, match=r"set `streamArn`.*or `streamName`"):
        KinesisExporter(endpointUrl=moto.endpoint)


def test_region_comes_from_the_stream_arn() -> None:
    arn = "arn:aws:kinesis:eu-west-3:111122223333:stream/flag-events"
    exporter = KinesisExporter(streamArn=arn)
    try:
        assert exporter.client.meta.region_name == "eu-west-3"
    finally:
        exporter.close()


def test_a_ready_client_is_used_and_left_open(moto: MotoServer, stream: Stream) -> None:
    client = moto.client("kinesis")
    exporter = KinesisExporter(streamName=stream.name, client=client)
    exporter.export(sample_events(5, prefix="client"))
    exporter.close()
    assert len(stream.read()) == 5
    assert client.describe_stream_summary(StreamName=stream.name)  # still usable
    with pytest.raises(TypeError, match="region or endpointUrl"):
        KinesisExporter(streamName=stream.name, client=client, region="eu-west-1")


def test_config_file_builds_the_exporter_through_the_plugin_entry_point(
    moto: MotoServer, stream: Stream, tmp_path: Path
) -> None:
    config = tmp_path / "flagsink.yaml"
    config.write_text(
        "exporters:\n"
        "  - kind: kinesis\n"
        f"    streamName: {stream.name}\n"
        f"    endpointUrl: {moto.endpoint}\n"
        '    partitionKey: "{{ .Key}}"\n'
    )
    events = sample_events(50, tracking_every=0, prefix="yaml")
    with flagsink.from_config(config) as pipeline:
        for event in events:
            pipeline.add_event(event)
        assert pipeline.flush(TIMEOUT)
    records = stream.records()
    assert len(records) == 50
    assert {record.partition_key for record in records} == {f"flag-{i}" for i in range(4)}


def test_credentials_never_appear_in_errors_or_logs(
    moto: MotoServer, stream: Stream, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = KinesisExporter(
        streamName=stream.name, endpointUrl=moto.endpoint, config=FAST
    )  # credentials from the environment: ACCESS_KEY / SECRET_KEY, unknown to the server
    scheduler = DataExporterScheduler(exporter, retry_initial=10, retry_max=10)
    with authenticating(moto), caplog.at_level(logging.DEBUG, logger="flagsink"):
        scheduler.add_events(sample_events(3, prefix="auth"))
        assert wait_until(lambda: scheduler.stats().failed_attempts >= 1, TIMEOUT)
    scheduler.close(0.1)
    error = str(scheduler.stats().last_error)
    # AWS answers UnrecognizedClientException; moto an XML body botocore reads as "403".
    assert "access denied (" in error
    assert "kinesis:PutRecords" in error
    text = error + "\n".join(record.getMessage() for record in caplog.records)
    assert SECRET_KEY not in text
    assert ACCESS_KEY not in text


def test_export_error_when_nothing_was_delivered(moto: MotoServer) -> None:
    exporter = KinesisExporter(streamName="no-such-stream", endpointUrl=moto.endpoint, config=FAST)
    with pytest.raises(ExportError, match="does not exist") as caught:
        exporter.export(sample_events(3))
    assert not isinstance(caught.value, PartialExportError)
    exporter.close()


ROOT = Path(__file__).resolve().parents[3]
PAGES = [
    ROOT / "docs" / "pages" / "exporters" / "kinesis.md",
    ROOT / "plugins" / "kinesis" / "README.md",
]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_documented_examples_are_valid(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    yamls = re.findall(r"^```yaml\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
    assert yamls
    for block in yamls:
        for section in parse_config(yaml.safe_load(block)).exporters:
            assert section.exporter_class is KinesisExporter
            section.build().close()  # no request is sent before the first event
    pythons = re.findall(r"^```python\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
    assert pythons
    for block in pythons:
        compile(block, str(page), "exec")
