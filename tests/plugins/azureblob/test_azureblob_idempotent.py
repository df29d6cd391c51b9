"""Idempotent batches on Azurite: a batch retried after a lost answer or a crash is stored
once. Deterministic names from the batch's creation time, create-only uploads
(``If-None-Match: *``) and the batch id in the blob metadata ``flagsinkbatch``, read back
with the official client.

Lost answers are injected with a ``raw_response_hook`` on the client: the service stored
the blob, then the SDK sees a ``ServiceResponseError`` instead of the answer."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from azblob_support import ACCOUNT, KEY, Azurite
from azure.core.exceptions import ServiceRequestError, ServiceResponseError
from azure.storage.blob import (
    ContainerClient,
    ContainerSasPermissions,
    LinearRetry,
    generate_container_sas,
)
from flagsink_azureblob import AzureBlobExporter
from flagsink_azureblob.exporter import client_options
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flagsink.event import Event, FeatureEvent
from flagsink.exporter import Batch, ExportError
from flagsink.naming import hostname
from flagsink.testing import sample_events

CREATED = 1_800_000_000.25
SMALL_PUT = 64 * 1024  # the test clients stage blocks past 64 KiB (default: 2 MiB)
BIG = 1_500  # ~330 KB: five staged blocks and a Put Block List


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


def stored(container: ContainerClient) -> dict[str, tuple[str | None, list[Any]]]:
    """Every blob: name -> (its flagsinkbatch metadata, its JSON-lines records)."""
    out: dict[str, tuple[str | None, list[Any]]] = {}
    for item in container.list_blobs(include=["metadata"]):
        lines = container.download_blob(item.name).readall().decode("utf-8").splitlines()
        owner = (item.metadata or {}).get("flagsinkbatch")
        out[item.name] = (owner, [json.loads(line) for line in lines])
    return out


def assert_each_batch_once(
    container: ContainerClient, batches: dict[str, list[Event]]
) -> dict[str, str]:
    """One blob per batch id, holding exactly its events in order; name by batch id."""
    objects = stored(container)
    assert sorted(owner or "" for owner, _ in objects.values()) == sorted(batches)
    for owner, records in objects.values():
        assert owner is not None
        assert records == [expected_json(event) for event in batches[owner]]
    return {str(owner): name for name, (owner, _) in objects.items()}


def batch(first: int, created: float = CREATED, origin: str = "spool-7f3a") -> Batch:
    return Batch(origin=origin, exporter="azureblob", first=first, created=created)


class LoseAnswers:
    """Turns the next ``count`` "blob stored" answers (Put Blob, Put Block List: 201) into
    a ``ServiceResponseError``, as a connection dropped before the answer arrived."""

    def __init__(self) -> None:
        self.pending = 0
        self.lost: list[str] = []

    def arm(self, count: int = 1) -> LoseAnswers:
        self.pending = count
        return self

    def __call__(self, response: Any) -> None:
        request = response.http_request
        if self.pending and request.method == "PUT" and response.http_response.status_code == 201:
            if "comp=block&" in request.url:  # a staged block: the blob does not exist yet
                return
            self.pending -= 1
            self.lost.append("PutBlockList" if "comp=blocklist" in request.url else "PutBlob")
            raise ServiceResponseError("injected: answer lost after the write")


@pytest.fixture
def exporters() -> Iterator[list[AzureBlobExporter]]:
    made: list[AzureBlobExporter] = []
    yield made
    for exporter in made:
        exporter.close()


def new(
    made: list[AzureBlobExporter],
    azurite: Azurite,
    container: ContainerClient,
    *,
    faults: LoseAnswers | None = None,
    before_request: Any = None,
    sdk_retries: bool = True,
    **settings: Any,
) -> AzureBlobExporter:
    """An exporter on its own client (``client_options``, 64 KiB blocks), with the fault
    hooks, and without the SDK's retries when ``sdk_retries`` is False (the scheduler
    retries)."""
    options = client_options(5) | {"max_single_put_size": SMALL_PUT, "max_block_size": SMALL_PUT}
    if not sdk_retries:
        options["retry_policy"] = LinearRetry(retry_total=0)
    client = ContainerClient(
        azurite.url,
        container.container_name,
        credential={"account_name": ACCOUNT, "account_key": KEY},
        raw_request_hook=before_request,
        raw_response_hook=faults,
        **options,
    )
    exporter = AzureBlobExporter(
        client=client, container=container.container_name, accountName=ACCOUNT, **settings
    )
    made.append(exporter)
    return exporter


# -- (a) the same batch twice: one blob ------------------------------------------------------


@pytest.mark.parametrize("count", [20, BIG], ids=["put-blob", "block-list"])
def test_same_batch_twice_is_stored_once(
    azurite: Azurite,
    container: ContainerClient,
    exporters: list[AzureBlobExporter],
    caplog: pytest.LogCaptureFixture,
    count: int,
) -> None:
    events = sample_events(count)
    first = new(exporters, azurite, container)
    first.export_batch(events, batch(1))
    name = f"flag-variation-{hostname()}-1800000000.json"  # GO Feature Flag's default
    assert (first.last_key, first.already_delivered) == (name, 0)
    with caplog.at_level(logging.INFO, logger="flagsink.azureblob"):
        first.export_batch(events, batch(1))  # a retry: the answer was lost
        restarted = new(exporters, azurite, container)  # a crash before the confirmation
        restarted.export_batch(events, batch(1))
    assert (first.already_delivered, restarted.already_delivered) == (1, 1)
    assert f"batch {batch(1).id} was already stored as {name!r}" in caplog.text
    assert assert_each_batch_once(container, {batch(1).id: events}) == {batch(1).id: name}
    metadata = container.get_blob_client(name).get_blob_properties().metadata
    assert metadata["flagsinkbatch"] == "spool-7f3a/azureblob/1"
    if count == BIG:
        blocks = container.get_blob_client(name).get_block_list()[0]
        assert len(blocks) > 1


# -- (b) two batches in one second: two blobs ------------------------------------------------


def test_two_batches_in_the_same_second_get_two_blobs(
    azurite: Azurite, container: ContainerClient, exporters: list[AzureBlobExporter]
) -> None:
    one, two = sample_events(10, prefix="one"), sample_events(10, prefix="two")
    new(exporters, azurite, container).export_batch(one, batch(1, origin="a"))
    new(exporters, azurite, container).export_batch(two, batch(1, origin="b"))
    for origin, events in (("b", two), ("a", one)):
        retry = new(exporters, azurite, container)
        retry.export_batch(events, batch(1, origin=origin))
        assert retry.already_delivered == 1
    base = f"flag-variation-{hostname()}-1800000000"
    assert assert_each_batch_once(
        container, {batch(1, origin="a").id: one, batch(1, origin="b").id: two}
    ) == {batch(1, origin="a").id: f"{base}.json", batch(1, origin="b").id: f"{base}-1.json"}


# -- (c) names taken by foreign blobs --------------------------------------------------------


@pytest.mark.parametrize("count", [20, BIG], ids=["put-blob", "block-list"])
def test_names_taken_by_foreign_blobs_are_skipped(
    azurite: Azurite, container: ContainerClient, exporters: list[AzureBlobExporter], count: int
) -> None:
    container.upload_blob("e/b.json", b'{"foreign": "no metadata"}\n')
    container.upload_blob(
        "e/b-1.json",
        b'{"foreign": "another batch"}\n',
        metadata={"flagsinkbatch": "elsewhere/azureblob/1"},
    )
    events = sample_events(count)
    exporter = new(exporters, azurite, container, path="e", filename="b.{{ .Format}}")
    exporter.export_batch(events, batch(1))
    assert exporter.last_key == "e/b-2.json"
    again = new(exporters, azurite, container, path="e", filename="b.{{ .Format}}")
    again.export_batch(events, batch(1))
    assert (again.last_key, again.already_delivered) == ("e/b-2.json", 1)
    assert stored(container) == {
        "e/b.json": (None, [{"foreign": "no metadata"}]),
        "e/b-1.json": ("elsewhere/azureblob/1", [{"foreign": "another batch"}]),
        "e/b-2.json": (batch(1).id, [expected_json(e) for e in events]),
    }


# -- (d) a lost answer: retried by the SDK, or by the scheduler ------------------------------


@pytest.mark.parametrize(
    ("count", "operation"), [(20, "PutBlob"), (BIG, "PutBlockList")], ids=["put", "block-list"]
)
@pytest.mark.parametrize("retried_by", ["sdk", "scheduler", "restart"])
def test_lost_answer_then_retry_stores_the_batch_once(
    azurite: Azurite,
    container: ContainerClient,
    exporters: list[AzureBlobExporter],
    count: int,
    operation: str,
    retried_by: str,
) -> None:
    events = sample_events(count)
    faults = LoseAnswers().arm()
    exporter = new(exporters, azurite, container, faults=faults, sdk_retries=retried_by == "sdk")
    if retried_by == "sdk":  # the SDK sends it again: 409, recognised by its upload id
        exporter.export_batch(events, batch(5))
        retry, reported = exporter, 0
    else:
        with pytest.raises(ExportError, match="injected: answer lost"):
            exporter.export_batch(events, batch(5))
        assert len(stored(container)) == 1  # the write happened
        retry = exporter if retried_by == "scheduler" else new(exporters, azurite, container)
        retry.export_batch(events, batch(5))
        reported = 1
    assert faults.lost == [operation]
    assert retry.already_delivered == reported
    assert_each_batch_once(container, {batch(5).id: events})


def test_conflict_check_that_cannot_reach_the_service_retries_the_batch(
    azurite: Azurite, container: ContainerClient, exporters: list[AzureBlobExporter]
) -> None:
    events = sample_events(20)
    new(exporters, azurite, container).export_batch(events, batch(1))
    checks: list[str] = []
    down = [True]

    def unreachable(request: Any) -> None:
        if down[0] and request.http_request.method == "HEAD":  # Get Blob Properties
            checks.append(request.http_request.url)
            raise ServiceRequestError("injected: connection refused")

    exporter = new(exporters, azurite, container, before_request=unreachable, sdk_retries=False)
    with pytest.raises(ExportError, match=r"cannot check whether .* holds this batch"):
        exporter.export_batch(events, batch(1))
    assert checks
    assert len(stored(container)) == 1  # never guessed: no second blob
    down[0] = False
    exporter.export_batch(events, batch(1))
    assert exporter.already_delivered == 1
    assert_each_batch_once(container, {batch(1).id: events})


def test_sas_without_read_falls_back_to_the_next_name(
    azurite: Azurite,
    container: ContainerClient,
    exporters: list[AzureBlobExporter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    sas = generate_container_sas(
        ACCOUNT,
        container.container_name,
        account_key=KEY,
        permission=ContainerSasPermissions(create=True, write=True),
        expiry=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
    )
    exporter = AzureBlobExporter(
        container=container.container_name,
        connectionString=f"BlobEndpoint={azurite.url};SharedAccessSignature={sas}",
    )
    exporters.append(exporter)
    events = sample_events(10)
    exporter.export_batch(events, batch(1))
    with caplog.at_level(logging.WARNING, logger="flagsink.azureblob"):
        exporter.export_batch(events, batch(1))
    assert (exporter.unverified, exporter.already_delivered) == (1, 0)
    assert "read, create and write" in caplog.text
    assert "can be stored twice" in caplog.text
    assert "sig=" not in caplog.text
    assert len(stored(container)) == 2  # the documented cost of a write-only SAS


# -- (e) any sequence of batches, lost answers and restarts, against a model ------------------

SIZES = (5, 5, BIG, 5)  # batch 2 goes up as staged blocks
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
    azurite: Azurite, plan: list[tuple[int, str]]
) -> None:
    container = azurite.new_container()
    batches = [batch(n, created=CREATED_AT[n]) for n in range(len(SIZES))]
    events = [sample_events(size, prefix=f"b{n}") for n, size in enumerate(SIZES)]
    delivered: set[int] = set()  # the model: batches whose blob exists
    made: list[AzureBlobExporter] = []

    def fresh() -> tuple[AzureBlobExporter, LoseAnswers]:
        faults = LoseAnswers()
        return new(made, azurite, container, faults=faults, sdk_retries=False), faults

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
        assert_each_batch_once(container, {batches[n].id: events[n] for n in sorted(delivered)})
    finally:
        for each in made:
            each.close()
