"""flagsink-azureblob against a real Azure Blob service (Azurite): formats read back with
the official client and parsed independently, names, create-only uploads, outages,
credentials and errors."""

from __future__ import annotations

import csv
import datetime as dt
import functools
import gzip
import io
import json
import logging
import re
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow.parquet as pq
import pytest
import yaml
from azblob_support import ACCOUNT, KEY, Azurite
from azure.core.exceptions import (
    ClientAuthenticationError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import (
    BlobServiceClient,
    ContainerClient,
    ContainerSasPermissions,
    generate_container_sas,
)
from flagsink_azureblob import AzureBlobExporter, AzureBlobSettings
from flagsink_azureblob.exporter import BLOCK_BYTES, client_options

from flagsink import FeatureEvent, SettingsError, TrackingEvent
from flagsink.config import parse_config
from flagsink.event import Event
from flagsink.exporter import ExportError
from flagsink.exporters.objectstore import ObjectExistsError
from flagsink.naming import ObjectNamer
from flagsink.plugins import default_registry
from flagsink.scheduler import DataExporterScheduler
from flagsink.testing import sample_events, wait_until

TIMEOUT = 30.0
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def schedulers() -> Iterator[Callable[..., DataExporterScheduler]]:
    made: list[DataExporterScheduler] = []

    def make(exporter: AzureBlobExporter, **options: Any) -> DataExporterScheduler:
        options = {"flush_interval": 3600, "retry_initial": 0.05, "retry_max": 0.2, **options}
        scheduler = DataExporterScheduler(exporter, **options)
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        scheduler.close(1.0)
        scheduler.exporter.close()


# -- independent readers and the records expected from each event -------------------------


def expected_json(event: Event) -> dict[str, Any]:
    """GO Feature Flag's JSON for ``event``, written out by hand."""
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
        if event.metadata is not None:
            record["metadata"] = event.metadata
    else:
        record |= {
            "evaluationContext": event.evaluation_context,
            "trackingEventDetails": event.tracking_event_details,
        }
    return record


def _go_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def expected_csv(event: Event) -> list[str]:
    """The fields of GO Feature Flag's default CSV template for ``event``: Kind;ContextKind;
    UserKey;CreationDate;Key;Variation;Value;Default;Source (tracking events leave the last
    four empty)."""
    head = [event.kind, event.context_kind, event.user_key, str(event.creation_date), event.key]
    if isinstance(event, TrackingEvent):
        return [*head, "", "", "", ""]
    return [*head, event.variation, _go_text(event.value), _go_text(event.default), event.source]


def parse_csv(data: bytes) -> list[list[str]]:
    """Rows split on ';' by the csv module; a Value holding ';' is joined back (the default
    template writes values unquoted, as GO Feature Flag does)."""
    rows = []
    reader = csv.reader(io.StringIO(data.decode()), delimiter=";", quoting=csv.QUOTE_NONE)
    for fields in reader:
        assert len(fields) >= 9, fields
        rows.append([*fields[:6], ";".join(fields[6:-2]), *fields[-2:]])
    return rows


def expected_parquet(event: Event) -> dict[str, Any]:
    """A row as pyarrow reads it: JSON columns as text, metadata as (key, text) pairs."""
    row = {k: v for k, v in expected_json(event).items() if k != "metadata"}
    if isinstance(event, FeatureEvent):
        row["value"] = json.dumps(event.value, separators=(",", ":"))
        row["metadata"] = (
            [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in event.metadata.items()]
            if event.metadata
            else None
        )
    else:
        row["evaluationContext"] = json.dumps(event.evaluation_context, separators=(",", ":"))
        row["trackingEventDetails"] = json.dumps(
            event.tracking_event_details, separators=(",", ":")
        )
    return row


def parse_parquet(data: bytes) -> list[dict[str, Any]]:
    rows = pq.read_table(io.BytesIO(data)).to_pylist()
    out = []
    for row in rows:
        kind = row["kind"]
        if kind == "feature":
            keep = {
                k: v
                for k, v in row.items()
                if k not in ("evaluationContext", "trackingEventDetails")
            }
            keep["value"] = json.dumps(json.loads(keep["value"]), separators=(",", ":"))
        else:
            keep = {
                k: v
                for k, v in row.items()
                if k not in ("variation", "value", "default", "version", "source", "metadata")
            }
            for column in ("evaluationContext", "trackingEventDetails"):
                keep[column] = json.dumps(json.loads(keep[column]), separators=(",", ":"))
        out.append(keep)
    return out


def user_keys(blobs: dict[str, bytes]) -> Counter[str]:
    """How often each userKey occurs across JSON-lines blobs."""
    return Counter(
        json.loads(line)["userKey"] for data in blobs.values() for line in data.splitlines()
    )


# -- formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
def test_10k_mixed_events_round_trip_in_each_format(
    fmt: str,
    options: dict[str, Any],
    container: ContainerClient,
    schedulers: Callable[..., DataExporterScheduler],
) -> None:
    events = sample_events(10_000)
    scheduler = schedulers(AzureBlobExporter(**options, format=fmt), max_events_in_memory=4_000)
    for event in events:
        scheduler.add_event(event)
    assert scheduler.close(TIMEOUT)
    stats = scheduler.stats()
    assert (stats.exported, stats.dropped, stats.failed_attempts) == (10_000, 0, 0)

    by_user = {event.user_key: event for event in events}
    content_type = {"json": "application/x-ndjson", "csv": "text/csv"}.get(
        fmt, "application/vnd.apache.parquet"
    )
    seen: list[str] = []
    listed = list(container.list_blobs())
    assert len(listed) == 3  # 4,000 + 4,000 + 2,000
    for blob in listed:
        assert blob.name.endswith(f".{fmt}")
        assert blob.content_settings.content_type == content_type
        assert blob.content_settings.content_encoding is None
        data = container.download_blob(blob.name).readall()
        assert len(data) == blob.size
        if fmt == "json":
            for line in data.decode().splitlines():
                record = json.loads(line)
                assert record == expected_json(by_user[record["userKey"]])
                seen.append(record["userKey"])
        elif fmt == "csv":
            for fields in parse_csv(data):
                assert fields == expected_csv(by_user[fields[2]])
                seen.append(fields[2])
        else:
            for row in parse_parquet(data):
                assert row == expected_parquet(by_user[row["userKey"]])
                seen.append(row["userKey"])
    assert sorted(seen) == sorted(by_user)


def test_partitioned_path_from_flush_time(
    options: dict[str, Any], container: ContainerClient
) -> None:
    template = "events/dt={{ .Year}}-{{ .Month}}-{{ .Day}}/hour={{ .Hour}}"
    exporter = AzureBlobExporter(**options, path=f"/{template}/")
    before = dt.datetime.now(dt.UTC)
    exporter.export(sample_events(50))
    after = dt.datetime.now(dt.UTC)
    exporter.close()
    (blob,) = container.list_blobs()
    assert blob.name == exporter.last_key
    allowed = {f"events/dt={t:%Y-%m-%d}/hour={t:%H}/" for t in (before, after)}
    assert blob.name[: blob.name.rindex("/") + 1] in allowed
    assert re.fullmatch(r"flag-variation-.+-\d{10}\.json", blob.name.rsplit("/", 1)[1])
    # data-lake tools list by prefix: the folder is a real prefix
    assert [b.name for b in container.list_blobs(name_starts_with="events/dt=")] == [blob.name]


def test_gzip_content_encoding(options: dict[str, Any], container: ContainerClient) -> None:
    events = sample_events(1_000, tracking_every=0)
    exporter = AzureBlobExporter(**options, format="csv", contentEncoding="gzip")
    exporter.export(events)
    exporter.close()
    (blob,) = container.list_blobs()
    assert blob.name.endswith(".csv.gz")
    assert blob.content_settings.content_type == "text/csv"
    assert blob.content_settings.content_encoding == "gzip"
    stored = container.download_blob(blob.name, decompress=False).readall()
    assert stored[:2] == b"\x1f\x8b"
    rows = parse_csv(gzip.decompress(stored))
    assert rows == [expected_csv(event) for event in events]


# -- names -----------------------------------------------------------------------------------


def test_two_exporters_same_second_same_template_never_collide(
    options: dict[str, Any], container: ContainerClient
) -> None:
    # No timestamp in the template: both exporters render the same name every time, so
    # only the create-only upload keeps them apart.
    exporters = [AzureBlobExporter(**options, filename="batch.{{ .Format}}") for _ in range(2)]
    batches = {
        (index, round_): sample_events(100, prefix=f"e{index}r{round_}")
        for index in range(2)
        for round_ in range(3)
    }
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            for round_ in range(3):
                barrier.wait(TIMEOUT)
                exporters[index].export(batches[index, round_])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    for exporter in exporters:
        exporter.close()
    assert not errors
    names = sorted(blob.name for blob in container.list_blobs())
    assert names == [
        "batch-1.json",
        "batch-2.json",
        "batch-3.json",
        "batch-4.json",
        "batch-5.json",
        "batch.json",
    ]
    # each object holds exactly one whole batch: nothing overwritten or interleaved
    contents = {
        tuple(
            json.loads(line)["userKey"]
            for line in container.download_blob(name).readall().splitlines()
        )
        for name in names
    }
    assert contents == {tuple(e.user_key for e in batch) for batch in batches.values()}


def test_default_template_two_exporters_in_one_second_write_distinct_objects(
    options: dict[str, Any], container: ContainerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporters = [AzureBlobExporter(**options) for _ in range(2)]
    for exporter in exporters:  # both flush in the same second, on the same host
        frozen = functools.partial(ObjectNamer.next_name, exporter.namer, 1_800_000_000.5)
        monkeypatch.setattr(exporter.namer, "next_name", frozen)
    batches = [sample_events(5, prefix=f"host{index}") for index in range(2)]
    for exporter, batch in zip(exporters, batches, strict=True):
        exporter.export(batch)
        exporter.close()
    host = exporters[0].namer.host
    first, second = (exporter.last_key for exporter in exporters)
    assert first == f"flag-variation-{host}-1800000000.json"
    assert second == f"flag-variation-{host}-1800000000-1.json"
    for key, batch in ((first, batches[0]), (second, batches[1])):
        lines = container.download_blob(key).readall().splitlines()
        assert [json.loads(line)["userKey"] for line in lines] == [e.user_key for e in batch]


def test_create_only_upload_skips_a_name_taken_by_another_writer(
    options: dict[str, Any], container: ContainerClient
) -> None:
    container.upload_blob("events/batch.json", b"written by someone else\n")
    exporter = AzureBlobExporter(**options, path="events", filename="batch.{{ .Format}}")
    exporter.export(sample_events(10))
    exporter.close()
    assert exporter.last_key == "events/batch-1.json"
    assert container.download_blob("events/batch.json").readall() == b"written by someone else\n"
    assert len(container.download_blob("events/batch-1.json").readall().splitlines()) == 10


def test_put_object_is_create_only(options: dict[str, Any], container: ContainerClient) -> None:
    exporter = AzureBlobExporter(**options)
    exporter.put_object(
        "x.json",
        io.BytesIO(b"first\n"),
        6,
        content_type="application/x-ndjson",
        content_encoding=None,
    )
    with pytest.raises(ObjectExistsError):
        exporter.put_object(
            "x.json", io.BytesIO(b"second\n"), 7, content_type="text/plain", content_encoding=None
        )
    exporter.close()
    assert container.download_blob("x.json").readall() == b"first\n"


# -- failures --------------------------------------------------------------------------------


class StopsServerOnFirstUpload(AzureBlobExporter):
    """Stops Azurite when the next upload starts (its batch is encoded): mid-flush."""

    def __init__(self, azurite: Azurite, **options: Any) -> None:
        super().__init__(**options)
        self.azurite = azurite
        self.armed = False

    def put_object(self, key: str, body: BinaryIO, size: int, **kwargs: Any) -> None:
        if self.armed:
            self.armed = False
            self.azurite.stop()
        super().put_object(key, body, size, **kwargs)


def test_server_stopped_during_a_flush_every_event_arrives_once(
    azurite: Azurite,
    options: dict[str, Any],
    blobs: Callable[[], dict[str, bytes]],
    schedulers: Callable[..., DataExporterScheduler],
) -> None:
    before = sample_events(10, prefix="before")
    events = sample_events(3_000, prefix="outage")
    exporter = StopsServerOnFirstUpload(azurite, **options)
    exporter.export(before)  # leaves an open connection for the next upload to reuse
    exporter.armed = True
    scheduler = schedulers(exporter, max_events_in_memory=1_000, max_buffered_events=3_000)
    for event in events:
        scheduler.add_event(event)
    try:
        assert wait_until(lambda: scheduler.stats().failed_attempts >= 1, TIMEOUT)
        stats = scheduler.stats()
        assert stats.exported == 0
        assert stats.buffered + stats.in_flight == 3_000
        assert stats.last_error is not None
        assert "cannot reach container" in stats.last_error
    finally:
        azurite.start()
    assert wait_until(lambda: scheduler.stats().exported == 3_000, TIMEOUT)
    stats = scheduler.stats()
    assert stats.retried >= 1_000
    assert stats.dropped == 0
    counts = user_keys(blobs())
    assert set(counts) == {event.user_key for event in [*before, *events]}
    assert set(counts.values()) == {1}


def test_failed_block_upload_leaves_no_blob_and_the_retry_writes_it_once(
    azurite: Azurite,
    options: dict[str, Any],
    container: ContainerClient,
    blobs: Callable[[], dict[str, bytes]],
    schedulers: Callable[..., DataExporterScheduler],
) -> None:
    """Both blocks are staged on the real service, then the commit is lost on the way:
    the one fault Azurite cannot be made to produce at that moment."""
    lost: list[str] = []

    def lose_first_commit(request: Any) -> None:
        url = request.http_request.url
        if "comp=blocklist" in url and not lost:
            lost.append(url.split("?")[0].rsplit("/", 1)[1])
            raise ServiceRequestError("network unreachable (injected)")

    service = BlobServiceClient(
        azurite.url,
        credential={"account_name": ACCOUNT, "account_key": KEY},
        raw_request_hook=lose_first_commit,
        **client_options(5),
    )
    events = sample_events(20_000, prefix="blocks")  # ~4.4 MB of JSON: 3 staged blocks
    exporter = AzureBlobExporter(client=service, **without_endpoint(options))
    scheduler = schedulers(exporter, max_events_in_memory=20_000, retry_initial=0.2)
    for event in events:
        scheduler.add_event(event)
    assert wait_until(lambda: scheduler.stats().exported == 20_000, TIMEOUT)
    stats = scheduler.stats()
    assert stats.failed_attempts == 1
    assert stats.retried == 20_000
    assert "network unreachable" in str(stats.last_error)
    (failed_name,) = lost
    # The retry renders the batch's name again (from its creation time) and finds it free:
    # the failed attempt's staged blocks stayed uncommitted, invisible, and no blob was
    # made (a blob there would have been recognised as this batch's, not written again).
    assert exporter.already_delivered == 0
    stored = blobs()
    assert len(stored) == 1
    (name,) = stored
    assert name == failed_name
    blocks = -(-len(stored[name]) // BLOCK_BYTES)
    assert blocks >= 2
    # The commit discarded the failed attempt's uncommitted blocks.
    committed, uncommitted = container.get_blob_client(name).get_block_list("all")
    assert (len(committed), len(uncommitted)) == (blocks, 0)  # read from the spool in blocks
    counts = user_keys(stored)
    assert len(counts) == 20_000
    assert set(counts.values()) == {1}
    service.close()


def test_sdk_retry_of_a_stored_upload_is_not_a_duplicate(
    azurite: Azurite, options: dict[str, Any], container: ContainerClient
) -> None:
    """The upload is stored but its response is lost: the SDK retries it, the retry finds
    the name taken by this very upload, and that counts as success (no second object)."""
    dropped: list[str] = []

    def drop_first_upload_response(response: Any) -> None:
        if response.http_request.method == "PUT" and not dropped:
            dropped.append(response.http_request.url)
            raise ServiceResponseError("connection reset before the response (injected)")

    service = BlobServiceClient(
        azurite.url,
        credential={"account_name": ACCOUNT, "account_key": KEY},
        raw_response_hook=drop_first_upload_response,
        **client_options(5),
    )
    exporter = AzureBlobExporter(
        client=service, **without_endpoint(options), filename="once.{{ .Format}}"
    )
    exporter.export(sample_events(10))
    assert len(dropped) == 1
    assert exporter.last_key == "once.json"
    assert [b.name for b in container.list_blobs()] == ["once.json"]
    service.close()


def _assert_secret_free(secret: str, *texts: str | None) -> None:
    for text in texts:
        assert text is not None
        assert secret not in text


def test_wrong_credentials_clear_error_data_kept_key_never_shown(
    options: dict[str, Any],
    schedulers: Callable[..., DataExporterScheduler],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong_key = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXk="
    exporter = AzureBlobExporter(**{**options, "accountKey": wrong_key})
    with pytest.raises(ExportError) as caught:
        exporter.export(sample_events(3))
    message = str(caught.value)
    assert f"container {options['container']!r}" in message
    assert "access denied" in message
    assert "check the credentials" in message
    scheduler = schedulers(exporter, max_events_in_memory=100)
    events = sample_events(100, prefix="wrongkey")
    for event in events:
        scheduler.add_event(event)
    assert wait_until(lambda: scheduler.stats().failed_attempts >= 2, TIMEOUT)
    stats = scheduler.stats()
    assert stats.exported == 0
    assert stats.dropped == 0
    assert stats.buffered + stats.in_flight == 100
    assert stats.last_error is not None
    assert "access denied" in stats.last_error
    _assert_secret_free(wrong_key, message, stats.last_error, caplog.text, repr(exporter.settings))
    _assert_secret_free(KEY, caplog.text)


def test_missing_container_clear_error_then_delivered_once_created(
    azurite: Azurite,
    options: dict[str, Any],
    schedulers: Callable[..., DataExporterScheduler],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    name = f"missing-{uuid.uuid4().hex[:12]}"
    exporter = AzureBlobExporter(**{**options, "container": name})
    with pytest.raises(ExportError, match=rf"container '{name}' does not exist"):
        exporter.export(sample_events(3))
    events = sample_events(200, prefix="missing")
    scheduler = schedulers(exporter, max_events_in_memory=200)
    for event in events:
        scheduler.add_event(event)
    assert wait_until(lambda: scheduler.stats().failed_attempts >= 1, TIMEOUT)
    stats = scheduler.stats()
    assert stats.exported == 0
    assert stats.buffered + stats.in_flight == 200
    assert stats.last_error is not None
    assert "does not exist" in stats.last_error
    created = azurite.service.create_container(name)
    assert wait_until(lambda: scheduler.stats().exported == 200, TIMEOUT)
    (blob,) = created.list_blobs()
    assert len(created.download_blob(blob.name).readall().splitlines()) == 200
    _assert_secret_free(KEY, caplog.text)


def test_unknown_account_names_the_account(azurite: Azurite, options: dict[str, Any]) -> None:
    exporter = AzureBlobExporter(
        **{
            **options,
            "accountName": "nosuchaccount",
            "serviceUrl": f"http://127.0.0.1:{azurite.port}/nosuchaccount",
        }
    )
    with pytest.raises(ExportError, match="storage account 'nosuchaccount' not found"):
        exporter.export(sample_events(1))
    exporter.close()


def test_sas_connection_string_with_create_and_write(
    azurite: Azurite, container: ContainerClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sas = generate_container_sas(
        ACCOUNT,
        container.container_name,
        account_key=KEY,
        permission=ContainerSasPermissions(create=True, write=True),
        expiry=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1),
    )
    signature = re.search(r"sig=([^&]+)", sas)
    assert signature is not None
    container.upload_blob("taken.json", b"other\n")
    exporter = AzureBlobExporter(
        container=container.container_name,
        connectionString=f"BlobEndpoint={azurite.url};SharedAccessSignature={sas}",
        filename="taken.{{ .Format}}",
    )
    exporter.export(sample_events(10))  # the taken name is skipped with write-only rights
    assert exporter.last_key == "taken-1.json"
    assert exporter.account == ACCOUNT
    exporter.close()
    assert container.download_blob("taken.json").readall() == b"other\n"
    # with a SAS that has expired: access denied, signature never shown
    expired = generate_container_sas(
        ACCOUNT,
        container.container_name,
        account_key=KEY,
        permission=ContainerSasPermissions(create=True, write=True),
        expiry=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1),
    )
    old = AzureBlobExporter(
        container=container.container_name,
        connectionString=f"BlobEndpoint={azurite.url};SharedAccessSignature={expired}",
    )
    with pytest.raises(ExportError, match="access denied") as caught:
        old.export(sample_events(1))
    old.close()
    old_signature = re.search(r"sig=([^&]+)", expired)
    assert old_signature is not None
    for secret in (signature.group(1), old_signature.group(1)):
        _assert_secret_free(secret, str(caught.value), caplog.text, old.endpoint)


def test_key_connection_string(azurite: Azurite, container: ContainerClient) -> None:
    exporter = AzureBlobExporter(
        container=container.container_name,
        accountName=ACCOUNT,
        connectionString=azurite.connection_string,
    )
    exporter.export(sample_events(10))
    exporter.close()
    assert [b.name for b in container.list_blobs()] == [exporter.last_key]
    assert KEY not in repr(exporter.settings)
    with pytest.raises(SettingsError, match="connectionString"):
        AzureBlobExporter(container="events", connectionString="not a connection string")


def test_without_key_and_without_azure_identity_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "azure.identity", None)  # import fails
    with pytest.raises(SettingsError) as caught:
        AzureBlobExporter(container="events", accountName=ACCOUNT)
    assert caught.value.field == "accountKey"
    assert "flagsink-azureblob[identity]" in caught.value.message
    assert "accountKey or connectionString" in caught.value.message


def test_without_key_default_azure_credential_is_used() -> None:
    pytest.importorskip("azure.identity", reason="the identity extra is not installed")
    exporter = AzureBlobExporter(container="events", accountName="someaccount")
    credential = exporter.container_client.credential
    assert type(credential).__name__ == "DefaultAzureCredential"
    assert exporter.endpoint == "https://someaccount.blob.core.windows.net/events"
    exporter.close()


class _NoCredential:
    """Fails as azure-identity's credentials do when no identity is configured."""

    calls = 0

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        self.calls += 1
        raise ClientAuthenticationError("no identity found in this environment")


def test_identity_credential_unavailable_is_a_clear_error_not_retried_by_the_sdk() -> None:
    credential = _NoCredential()
    exporter = AzureBlobExporter(
        container="events",
        accountName=ACCOUNT,
        serviceUrl=f"https://127.0.0.1:1/{ACCOUNT}",  # never reached: no token
        credential=credential,
    )
    with pytest.raises(ExportError) as caught:
        exporter.export(sample_events(1))
    exporter.close()
    assert isinstance(caught.value.__cause__, ClientAuthenticationError)
    assert "no Azure credential to write to container 'events'" in str(caught.value)
    assert "no identity found" in str(caught.value)
    assert credential.calls == 1  # the scheduler retries with backoff, not the SDK


# -- clients, aliases, config ----------------------------------------------------------------


def test_one_client_per_exporter_reused_across_exports(
    options: dict[str, Any], container: ContainerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[BlobServiceClient] = []
    original = BlobServiceClient.__init__

    def counting(self: BlobServiceClient, *args: Any, **kwargs: Any) -> None:
        made.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(BlobServiceClient, "__init__", counting)
    exporter = AzureBlobExporter(**options)
    client = exporter.container_client
    for _ in range(3):
        exporter.export(sample_events(5))
    assert exporter.container_client is client
    assert len(made) == 1
    assert len(list(container.list_blobs())) == 3
    exporter.close()


def without_endpoint(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for an exporter given ``client=`` (which brings endpoint and key)."""
    return {k: v for k, v in options.items() if k not in ("accountKey", "serviceUrl")}


def test_ready_container_client_is_used_and_not_closed(
    azurite: Azurite, container: ContainerClient
) -> None:
    exporter = AzureBlobExporter(
        client=container, container=container.container_name, accountName=ACCOUNT
    )
    exporter.export(sample_events(5))
    exporter.close()
    assert [b.name for b in container.list_blobs()] == [exporter.last_key]  # still usable
    with pytest.raises(SettingsError, match="container"):
        AzureBlobExporter(client=container, container="other-name", accountName=ACCOUNT)
    with pytest.raises(TypeError, match="accountKey"):
        AzureBlobExporter(
            client=container,
            container=container.container_name,
            accountName=ACCOUNT,
            accountKey=KEY,
        )


def test_go_feature_flag_kind_and_keys(azurite: Azurite, container: ContainerClient) -> None:
    assert default_registry().exporter("azureBlobStorage") is AzureBlobExporter
    config = parse_config(
        {
            "exporter": {
                "kind": "azureBlobStorage",
                "container": container.container_name,
                "accountName": ACCOUNT,
                "accountKey": KEY,
                "serviceUrl": azurite.url,
                "path": "goff",
                "format": "parquet",
                "flushInterval": 1000,
            }
        }
    )
    (section,) = config.exporters
    assert isinstance(section.settings, AzureBlobSettings)
    exporter = section.build()
    assert isinstance(exporter, AzureBlobExporter)
    exporter.export(sample_events(20))
    exporter.close()
    (blob,) = container.list_blobs()
    assert blob.name.startswith("goff/")
    assert blob.name.endswith(".parquet")


def test_config_errors_never_echo_secrets() -> None:
    with pytest.raises(Exception) as caught:
        AzureBlobSettings.model_validate(
            {"container": "events", "connectionString": f"AccountKey={KEY}", "accountKey": KEY}
        )
    assert KEY not in str(caught.value)
    settings = AzureBlobSettings.model_validate(
        {"container": "events", "accountName": ACCOUNT, "accountKey": KEY}
    )
    assert KEY not in repr(settings)
    assert KEY not in str(settings.model_dump())


def test_timeout_bounds_an_export_to_a_service_that_never_answers() -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never responds
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        exporter = AzureBlobExporter(
            container="events",
            accountName=ACCOUNT,
            accountKey=KEY,
            serviceUrl=f"http://127.0.0.1:{port}/{ACCOUNT}",
            timeout=0.2,
        )
        started = time.monotonic()
        with pytest.raises(ExportError, match="cannot reach container 'events'"):
            exporter.export(sample_events(1))
        elapsed = time.monotonic() - started
        exporter.close()
    # three attempts of 0.2 s and two SDK backoffs of 0.5-1.5 s each
    assert elapsed < 5.0


@pytest.mark.parametrize(
    "page", ["docs/pages/exporters/azureblob.md", "plugins/azureblob/README.md"]
)
def test_documented_examples_are_valid(page: str, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / page).read_text(encoding="utf-8")
    configs = re.findall(r"^```yaml\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
    snippets = re.findall(r"^```python\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
    assert configs
    assert snippets
    for name in ("AZURE_STORAGE_KEY", "AZURE_STORAGE_CONNECTION_STRING"):
        monkeypatch.setenv(name, "placeholder")
    for config in configs:
        for section in parse_config(yaml.safe_load(config)).exporters:
            assert section.exporter_class is AzureBlobExporter
    for snippet in snippets:
        compile(snippet, page, "exec")
