"""Idempotent batches on gcp-storage-emulator (with its ``ifGenerationMatch`` wrapper): a
batch retried after a lost answer or a crash is stored once. Deterministic names from the
batch's creation time, create-only uploads (``ifGenerationMatch=0``) and the batch id in
the custom metadata ``flagsink-batch``, read back with the official client.

Lost answers are injected with a ``requests`` response hook: the server stored the object,
then the client sees a dropped connection instead of its answer."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from flagsink_gcs import GcsExporter
from flagsink_gcs import exporter as gcs_module
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flagsink.event import Event, FeatureEvent
from flagsink.exporter import Batch, ExportError
from flagsink.naming import hostname
from flagsink.testing import sample_events

from .conftest import Emulator, official_client

SHORT_RETRY = DEFAULT_RETRY.with_timeout(0.5)
QUICK_RETRY = DEFAULT_RETRY.with_delay(initial=0.05, maximum=0.1).with_timeout(2.0)
CREATED = 1_800_000_000.25
BIG = 1_500  # ~330 KB: a resumable upload in 256 KiB chunks (see small_resumable)


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


def stored(client: storage.Client, bucket: str) -> dict[str, tuple[str | None, list[Any]]]:
    """Every object: name -> (its flagsink-batch metadata, its JSON-lines records)."""
    out: dict[str, tuple[str | None, list[Any]]] = {}
    for blob in client.list_blobs(bucket):
        lines = blob.download_as_bytes().decode("utf-8").splitlines()
        owner = (blob.metadata or {}).get("flagsink-batch")
        out[blob.name] = (owner, [json.loads(line) for line in lines])
    return out


def assert_each_batch_once(
    client: storage.Client, bucket: str, batches: dict[str, list[Event]]
) -> dict[str, str]:
    """One object per batch id, holding exactly its events in order; name by batch id."""
    objects = stored(client, bucket)
    assert sorted(owner or "" for owner, _ in objects.values()) == sorted(batches)
    for owner, records in objects.values():
        assert owner is not None
        assert records == [expected_json(event) for event in batches[owner]]
    return {str(owner): name for name, (owner, _) in objects.items()}


def batch(first: int, created: float = CREATED, origin: str = "spool-7f3a") -> Batch:
    return Batch(origin=origin, exporter="gcs", first=first, created=created)


class LoseAnswers:
    """Drops the connection after the next ``count`` successful (200) upload answers: the
    object is stored, the client sees a ``ConnectionError``."""

    def __init__(self, exporter: GcsExporter) -> None:
        self.pending = 0
        self.lost = 0
        exporter.client._http.hooks["response"].append(self._lose)

    def arm(self, count: int = 1) -> LoseAnswers:
        self.pending = count
        return self

    def _lose(self, response: Any, **_: Any) -> None:
        request = response.request
        # The answer that says "stored": a multipart upload's, or a resumable upload's last
        # chunk (a PUT); not the answer that starts a resumable session.
        stored = "uploadType=multipart" in request.url or request.method == "PUT"
        if self.pending and response.status_code == 200 and stored:
            self.pending -= 1
            self.lost += 1
            raise requests.ConnectionError("injected: answer lost after the write")


@pytest.fixture
def small_resumable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bodies over 64 KiB go up as resumable uploads in 256 KiB chunks."""
    monkeypatch.setattr(gcs_module, "SINGLE_REQUEST_MAX", 64 * 1024)
    monkeypatch.setattr(gcs_module, "CHUNK_SIZE", 256 * 1024)


@pytest.fixture
def exporters(gcs: Emulator) -> Iterator[list[GcsExporter]]:
    made: list[GcsExporter] = []
    yield made
    for exporter in made:
        exporter.close()


def new(made: list[GcsExporter], bucket: str, **options: Any) -> GcsExporter:
    options.setdefault("retry", SHORT_RETRY)
    exporter = GcsExporter(bucket=bucket, **options)
    made.append(exporter)
    return exporter


# -- (a) the same batch twice: one object ----------------------------------------------------


@pytest.mark.parametrize("count", [20, BIG], ids=["multipart", "resumable"])
def test_same_batch_twice_is_stored_once(
    bucket: str,
    client: storage.Client,
    exporters: list[GcsExporter],
    small_resumable: None,
    caplog: pytest.LogCaptureFixture,
    count: int,
) -> None:
    events = sample_events(count)
    first = new(exporters, bucket)
    first.export_batch(events, batch(1))
    name = f"flag-variation-{hostname()}-1800000000.json"  # GO Feature Flag's default
    assert (first.last_key, first.already_delivered) == (name, 0)
    with caplog.at_level(logging.INFO, logger="flagsink.gcs"):
        first.export_batch(events, batch(1))  # a retry: the answer was lost
        restarted = new(exporters, bucket)  # a crash after the upload, before confirming
        restarted.export_batch(events, batch(1))
    assert (first.already_delivered, restarted.already_delivered) == (1, 1)
    assert f"batch {batch(1).id} was already stored as {name!r}" in caplog.text
    assert assert_each_batch_once(client, bucket, {batch(1).id: events}) == {batch(1).id: name}
    blob = client.bucket(bucket).get_blob(name)
    assert blob.metadata == {"flagsink-batch": "spool-7f3a/gcs/1"}


# -- (b) two batches in one second: two objects ----------------------------------------------


def test_two_batches_in_the_same_second_get_two_objects(
    bucket: str, client: storage.Client, exporters: list[GcsExporter]
) -> None:
    one, two = sample_events(10, prefix="one"), sample_events(10, prefix="two")
    new(exporters, bucket).export_batch(one, batch(1, origin="a"))
    new(exporters, bucket).export_batch(two, batch(1, origin="b"))  # another process
    for origin, events in (("b", two), ("a", one)):
        retry = new(exporters, bucket)
        retry.export_batch(events, batch(1, origin=origin))
        assert retry.already_delivered == 1
    base = f"flag-variation-{hostname()}-1800000000"
    assert assert_each_batch_once(
        client, bucket, {batch(1, origin="a").id: one, batch(1, origin="b").id: two}
    ) == {batch(1, origin="a").id: f"{base}.json", batch(1, origin="b").id: f"{base}-1.json"}


# -- (c) names taken by foreign objects ------------------------------------------------------


@pytest.mark.parametrize("count", [20, BIG], ids=["multipart", "resumable"])
def test_names_taken_by_foreign_objects_are_skipped(
    bucket: str,
    client: storage.Client,
    exporters: list[GcsExporter],
    small_resumable: None,
    count: int,
) -> None:
    client.bucket(bucket).blob("e/b.json").upload_from_string(b'{"foreign": "no metadata"}\n')
    other = client.bucket(bucket).blob("e/b-1.json")
    other.metadata = {"flagsink-batch": "elsewhere/gcs/1"}
    other.upload_from_string(b'{"foreign": "another batch"}\n')
    events = sample_events(count)
    exporter = new(exporters, bucket, path="e", filename="b.{{ .Format}}")
    exporter.export_batch(events, batch(1))
    assert exporter.last_key == "e/b-2.json"
    again = new(exporters, bucket, path="e", filename="b.{{ .Format}}")
    again.export_batch(events, batch(1))
    assert (again.last_key, again.already_delivered) == ("e/b-2.json", 1)
    objects = stored(client, bucket)
    assert objects == {
        "e/b.json": (None, [{"foreign": "no metadata"}]),
        "e/b-1.json": ("elsewhere/gcs/1", [{"foreign": "another batch"}]),
        "e/b-2.json": (batch(1).id, [expected_json(e) for e in events]),
    }


# -- (d) a lost answer: retried by the client, or by the scheduler ---------------------------


# The client's own retry of a resumable upload's last chunk is left out: the emulator
# forgets a finished session (404), where GCS answers with the stored object.
@pytest.mark.parametrize(
    ("count", "retried_by"),
    [
        (20, "client"),
        (20, "scheduler"),
        (20, "restart"),
        (BIG, "scheduler"),
        (BIG, "restart"),
    ],
    ids=[
        "multipart-client",
        "multipart-scheduler",
        "multipart-restart",
        "resumable-scheduler",
        "resumable-restart",
    ],
)
def test_lost_answer_then_retry_stores_the_batch_once(
    bucket: str,
    client: storage.Client,
    exporters: list[GcsExporter],
    small_resumable: None,
    count: int,
    retried_by: str,
) -> None:
    events = sample_events(count)
    exporter = new(exporters, bucket, retry=QUICK_RETRY if retried_by == "client" else None)
    faults = LoseAnswers(exporter).arm()
    if retried_by == "client":  # the storage client sends it again: 412, then recognised
        exporter.export_batch(events, batch(5))
        retry = exporter
    else:
        with pytest.raises(ExportError, match="injected: answer lost"):
            exporter.export_batch(events, batch(5))
        assert len(stored(client, bucket)) == 1  # the write happened
        retry = exporter if retried_by == "scheduler" else new(exporters, bucket)
        retry.export_batch(events, batch(5))
    assert faults.lost == 1
    assert retry.already_delivered == 1
    assert_each_batch_once(client, bucket, {batch(5).id: events})


def test_conflict_check_that_cannot_reach_the_server_retries_the_batch(
    bucket: str, client: storage.Client, exporters: list[GcsExporter]
) -> None:
    events = sample_events(20)
    new(exporters, bucket).export_batch(events, batch(1))
    exporter = new(exporters, bucket, retry=QUICK_RETRY.with_timeout(0.3))
    checks: list[str] = []

    def unreachable(response: Any, **_: Any) -> None:
        if response.request.method == "GET":  # the metadata read after the 412
            checks.append(response.request.url)
            raise requests.ConnectionError("injected: connection reset")

    exporter.client._http.hooks["response"].append(unreachable)
    with pytest.raises(ExportError, match=r"cannot check whether .* holds this batch"):
        exporter.export_batch(events, batch(1))
    assert checks
    assert len(stored(client, bucket)) == 1  # never guessed: no second object
    exporter.client._http.hooks["response"].remove(unreachable)
    exporter.export_batch(events, batch(1))
    assert exporter.already_delivered == 1
    assert_each_batch_once(client, bucket, {batch(1).id: events})


# -- (e) any sequence of batches, lost answers and restarts, against a model ------------------

SIZES = (5, 5, BIG, 5)  # batch 2 goes up as a resumable upload
CREATED_AT = (CREATED, CREATED, CREATED, CREATED + 1)  # three batches share a second
steps = st.lists(
    st.tuples(st.integers(0, len(SIZES) - 1), st.sampled_from(["ok", "lost", "restart"])),
    min_size=1,
    max_size=8,
)
_buckets = iter(range(1_000_000))


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=steps)
def test_any_sequence_of_retries_and_restarts_stores_each_batch_once(
    gcs: Emulator, small_resumable: None, plan: list[tuple[int, str]]
) -> None:
    reader = official_client()
    bucket = f"idem-{next(_buckets)}-{id(plan)}"
    reader.create_bucket(bucket)
    batches = [batch(n, created=CREATED_AT[n]) for n in range(len(SIZES))]
    events = [sample_events(size, prefix=f"b{n}") for n, size in enumerate(SIZES)]
    delivered: set[int] = set()  # the model: batches whose object exists
    made: list[GcsExporter] = []

    def fresh() -> tuple[GcsExporter, LoseAnswers]:
        exporter = new(made, bucket, retry=None)
        return exporter, LoseAnswers(exporter)

    exporter, faults = fresh()
    reported = 0
    try:
        for index, mode in plan:
            if mode == "restart":  # a crash: the next attempt comes from a new process
                exporter, faults = fresh()
            if mode == "lost" and index not in delivered:
                faults.arm()
                with pytest.raises(ExportError):
                    exporter.export_batch(events[index], batches[index])
            else:
                reported += index in delivered
                exporter.export_batch(events[index], batches[index])
            delivered.add(index)
        assert sum(each.already_delivered for each in made) == reported
        assert_each_batch_once(
            reader, bucket, {batches[n].id: events[n] for n in sorted(delivered)}
        )
    finally:
        for each in made:
            each.close()
        reader.close()
