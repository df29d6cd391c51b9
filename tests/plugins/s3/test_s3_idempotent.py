"""Idempotent batches on a real S3 server (moto): a batch retried after a lost answer or a
crash is stored once. Deterministic names from the batch's creation time, create-only
writes (``If-None-Match: *``) and the batch id in ``x-amz-meta-flagsink-batch``.

Lost answers are injected with botocore ``after-call`` hooks: the request reached the
server and was stored, the exporter sees a read timeout."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError, ReadTimeoutError
from flagsink_s3 import S3Exporter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from s3_moto_server import MIN_PART_SIZE, MotoServer

from flagsink.event import Event, FeatureEvent
from flagsink.exporter import Batch, ExportError
from flagsink.naming import hostname
from flagsink.testing import sample_events

CREATED = 1_800_000_000.25
PART_SIZE = MIN_PART_SIZE  # 64 KiB on the test server: 600 events make a multipart upload
BIG = 600


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
        record["evaluationContext"] = event.evaluation_context
        record["trackingEventDetails"] = event.tracking_event_details
    return record


def stored(server: MotoServer, bucket: str) -> dict[str, tuple[str | None, list[Any]]]:
    """Every object, read with boto3: key -> (its flagsink-batch metadata, its records)."""
    s3 = server.client()
    out: dict[str, tuple[str | None, list[Any]]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            answer = s3.get_object(Bucket=bucket, Key=item["Key"])
            lines = answer["Body"].read().decode("utf-8").splitlines()
            records = [json.loads(line) for line in lines]
            out[item["Key"]] = (answer["Metadata"].get("flagsink-batch"), records)
    return out


def assert_each_batch_once(
    server: MotoServer, bucket: str, batches: dict[str, list[Event]]
) -> dict[str, str]:
    """One object per batch id, holding exactly its events in order; key by batch id."""
    objects = stored(server, bucket)
    owners = [owner for owner, _ in objects.values()]
    assert sorted(o or "" for o in owners) == sorted(batches), objects.keys()
    for owner, records in objects.values():
        assert owner is not None
        assert records == [expected_json(event) for event in batches[owner]]
    assert server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    return {str(owner): key for key, (owner, _) in objects.items()}


def batch(first: int, created: float = CREATED, origin: str = "spool-7f3a") -> Batch:
    return Batch(origin=origin, exporter="s3", first=first, created=created)


class LoseAnswers:
    """Makes the next ``count`` PutObject / CompleteMultipartUpload answers "lost": the
    server stored the object, the exporter sees a read timeout."""

    def __init__(self, exporter: S3Exporter) -> None:
        self.pending = 0
        self.lost: list[str] = []
        for operation in ("PutObject", "CompleteMultipartUpload"):
            exporter.client.meta.events.register(f"after-call.s3.{operation}", self._lose)

    def arm(self, count: int = 1) -> LoseAnswers:
        self.pending = count
        return self

    def _lose(self, http_response: Any, model: Any, **_: Any) -> None:
        if self.pending and http_response.status_code == 200:
            self.pending -= 1
            self.lost.append(model.name)
            raise ReadTimeoutError(endpoint_url="injected: answer lost after the write")


@pytest.fixture
def new_exporter(s3_server: MotoServer) -> Iterator[Callable[..., S3Exporter]]:
    made: list[S3Exporter] = []

    def new(bucket: str, **options: Any) -> S3Exporter:
        options = {"bucket": bucket, "endpointUrl": s3_server.endpoint, **options}
        exporter = S3Exporter(part_size=PART_SIZE, **options)
        made.append(exporter)
        return exporter

    yield new
    for exporter in made:
        exporter.close()


# -- (a) the same batch twice: one object ----------------------------------------------------


@pytest.mark.parametrize("count", [20, BIG], ids=["put", "multipart"])
def test_same_batch_twice_is_stored_once(
    s3_server: MotoServer,
    bucket: str,
    new_exporter: Callable[..., S3Exporter],
    caplog: pytest.LogCaptureFixture,
    count: int,
) -> None:
    events = sample_events(count)
    first = new_exporter(bucket)
    first.export_batch(events, batch(1))
    name = f"flag-variation-{hostname()}-1800000000.json"  # GO Feature Flag's default
    assert first.last_key == name
    assert first.already_delivered == 0
    with caplog.at_level(logging.INFO, logger="flagsink.s3"):
        first.export_batch(events, batch(1))  # a retry: the answer was lost
        restarted = new_exporter(bucket)  # a crash after the upload, before the confirmation
        restarted.export_batch(events, batch(1))
    assert (first.already_delivered, restarted.already_delivered) == (1, 1)
    assert restarted.last_key == name
    assert f"batch {batch(1).id} was already stored as {name!r}" in caplog.text
    assert assert_each_batch_once(s3_server, bucket, {batch(1).id: events}) == {batch(1).id: name}
    head = s3_server.client().head_object(Bucket=bucket, Key=name)
    assert head["Metadata"] == {"flagsink-batch": "spool-7f3a/s3/1"}


def test_export_without_a_batch_keeps_todays_names(
    s3_server: MotoServer, bucket: str, new_exporter: Callable[..., S3Exporter]
) -> None:
    exporter = new_exporter(bucket)
    events = sample_events(10)
    exporter.export(events)
    exporter.export(events)  # no batch: two flushes, two objects, as before
    objects = stored(s3_server, bucket)
    assert len(objects) == 2
    assert all(owner is None for owner, _ in objects.values())


# -- (b) two batches in one second: two objects ----------------------------------------------


def test_two_batches_in_the_same_second_get_two_objects(
    s3_server: MotoServer, bucket: str, new_exporter: Callable[..., S3Exporter]
) -> None:
    one, two = sample_events(10, prefix="one"), sample_events(10, prefix="two")
    host_a = new_exporter(bucket)
    host_b = new_exporter(bucket)  # another process, same host name and template
    host_a.export_batch(one, batch(1, origin="a"))
    host_b.export_batch(two, batch(1, origin="b"))
    # Both retried from fresh instances: each walks the same names and finds its own.
    for origin, events in (("b", two), ("a", one)):
        retry = new_exporter(bucket)
        retry.export_batch(events, batch(1, origin=origin))
        assert retry.already_delivered == 1
    base = f"flag-variation-{hostname()}-1800000000"
    assert assert_each_batch_once(
        s3_server, bucket, {batch(1, origin="a").id: one, batch(1, origin="b").id: two}
    ) == {batch(1, origin="a").id: f"{base}.json", batch(1, origin="b").id: f"{base}-1.json"}


def test_many_batches_in_one_second_ask_once_per_taken_name(
    s3_server: MotoServer, bucket: str, new_exporter: Callable[..., S3Exporter]
) -> None:
    exporter = new_exporter(bucket, path="events", filename="fixed.{{ .Format}}")
    heads: list[str] = []
    exporter.client.meta.events.register(
        "before-call.s3.HeadObject", lambda params, **_: heads.append(params["Key"])
    )
    batches = {batch(n).id: sample_events(3, prefix=f"b{n}") for n in range(12)}
    for n, events in enumerate(batches.values()):
        exporter.export_batch(events, batch(n))
    assert heads == []  # this exporter's own names are skipped without a request
    keys = assert_each_batch_once(s3_server, bucket, batches)
    assert sorted(keys.values()) == sorted(
        ["events/fixed.json"] + [f"events/fixed-{n}.json" for n in range(1, 12)]
    )


# -- (c) a name taken by a foreign object ----------------------------------------------------


@pytest.mark.parametrize("count", [20, BIG], ids=["put", "multipart"])
def test_names_taken_by_foreign_objects_are_skipped(
    s3_server: MotoServer, bucket: str, new_exporter: Callable[..., S3Exporter], count: int
) -> None:
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="e/b.json", Body=b'{"foreign": "no metadata"}\n')
    s3.put_object(
        Bucket=bucket,
        Key="e/b-1.json",
        Body=b'{"foreign": "another batch"}\n',
        Metadata={"flagsink-batch": "elsewhere/s3/1"},
    )
    events = sample_events(count)
    exporter = new_exporter(bucket, path="e", filename="b.{{ .Format}}")
    exporter.export_batch(events, batch(1))
    assert exporter.last_key == "e/b-2.json"
    again = new_exporter(bucket, path="e", filename="b.{{ .Format}}")
    again.export_batch(events, batch(1))
    assert (again.last_key, again.already_delivered) == ("e/b-2.json", 1)
    assert (
        s3.get_object(Bucket=bucket, Key="e/b.json")["Body"].read()
        == b'{"foreign": "no metadata"}\n'
    )
    assert (
        s3.get_object(Bucket=bucket, Key="e/b-1.json")["Body"].read()
        == b'{"foreign": "another batch"}\n'
    )
    objects = stored(s3_server, bucket)
    assert len(objects) == 3
    assert objects["e/b-2.json"] == (batch(1).id, [expected_json(e) for e in events])
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


# -- (d) a lost answer after PutObject / CompleteMultipartUpload ------------------------------


@pytest.mark.parametrize(
    ("count", "operation"),
    [(20, "PutObject"), (BIG, "CompleteMultipartUpload")],
    ids=["put", "multipart"],
)
@pytest.mark.parametrize("retry_from", ["same exporter", "restarted"])
def test_lost_answer_then_retry_stores_the_batch_once(
    s3_server: MotoServer,
    bucket: str,
    new_exporter: Callable[..., S3Exporter],
    count: int,
    operation: str,
    retry_from: str,
) -> None:
    events = sample_events(count)
    exporter = new_exporter(bucket)
    faults = LoseAnswers(exporter).arm()
    with pytest.raises(ExportError, match="ReadTimeoutError"):
        exporter.export_batch(events, batch(5))
    assert faults.lost == [operation]
    assert len(stored(s3_server, bucket)) == 1  # the write happened
    retry = exporter if retry_from == "same exporter" else new_exporter(bucket)
    retry.export_batch(events, batch(5))
    assert retry.already_delivered == 1
    assert_each_batch_once(s3_server, bucket, {batch(5).id: events})


def test_conflict_check_that_cannot_reach_the_server_retries_the_batch(
    s3_server: MotoServer, bucket: str, new_exporter: Callable[..., S3Exporter]
) -> None:
    events = sample_events(20)
    new_exporter(bucket).export_batch(events, batch(1))
    exporter = new_exporter(bucket)
    heads: list[int] = []

    def unreachable(**_: Any) -> None:
        heads.append(1)
        raise EndpointConnectionError(endpoint_url="injected fault")

    exporter.client.meta.events.register("before-call.s3.HeadObject", unreachable)
    with pytest.raises(ExportError, match=r"cannot check whether .* holds this batch"):
        exporter.export_batch(events, batch(1))
    assert heads  # botocore's own retries included
    assert len(stored(s3_server, bucket)) == 1  # never guessed: no second object
    exporter.client.meta.events.unregister("before-call.s3.HeadObject", unreachable)
    exporter.export_batch(events, batch(1))
    assert exporter.already_delivered == 1
    assert_each_batch_once(s3_server, bucket, {batch(1).id: events})


def test_credentials_that_cannot_read_metadata_fall_back_to_the_next_name(
    s3_server: MotoServer,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    key_id, secret = s3_server.writer_key("s3:PutObject")  # no s3:GetObject: no HeadObject
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    events = sample_events(10)
    with s3_server.authenticating():
        exporter = S3Exporter(bucket=bucket, endpointUrl=s3_server.endpoint)
        exporter.export_batch(events, batch(1))
        with caplog.at_level(logging.WARNING, logger="flagsink.s3"):
            exporter.export_batch(events, batch(1))
        exporter.close()
    assert exporter.unverified == 1
    assert exporter.already_delivered == 0
    assert "allow s3:GetObject" in caplog.text
    assert "can be stored twice" in caplog.text
    assert secret not in caplog.text
    assert len(stored(s3_server, bucket)) == 2  # the documented cost of write-only keys


# -- (e) any sequence of batches, lost answers and restarts, against a model ------------------

SIZES = (5, 5, BIG, 5)  # batch 2 goes up as a multipart upload
CREATED_AT = (CREATED, CREATED, CREATED, CREATED + 1)  # three batches share a second
steps = st.lists(
    st.tuples(st.integers(0, len(SIZES) - 1), st.sampled_from(["ok", "lost", "restart"])),
    min_size=1,
    max_size=8,
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=steps)
def test_any_sequence_of_retries_and_restarts_stores_each_batch_once(
    s3_server: MotoServer, plan: list[tuple[int, str]]
) -> None:
    bucket = s3_server.new_bucket()
    batches = [batch(n, created=CREATED_AT[n]) for n in range(len(SIZES))]
    events = [sample_events(size, prefix=f"b{n}") for n, size in enumerate(SIZES)]
    delivered: set[int] = set()  # the model: batches whose object exists
    made: list[S3Exporter] = []

    def new() -> tuple[S3Exporter, LoseAnswers]:
        exporter = S3Exporter(bucket=bucket, endpointUrl=s3_server.endpoint, part_size=PART_SIZE)
        made.append(exporter)
        return exporter, LoseAnswers(exporter)

    exporter, faults = new()
    reported = 0
    try:
        for index, mode in plan:
            if mode == "restart":  # a crash: the next attempt comes from a new process
                exporter, faults = new()
            if mode == "lost" and index not in delivered:
                faults.arm()
                with pytest.raises(ExportError):
                    exporter.export_batch(events[index], batches[index])
            else:
                reported += index in delivered
                exporter.export_batch(events[index], batches[index])
            delivered.add(index)
    finally:
        for each in made:
            each.close()
    assert sum(each.already_delivered for each in made) == reported
    assert_each_batch_once(s3_server, bucket, {batches[n].id: events[n] for n in sorted(delivered)})
