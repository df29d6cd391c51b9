"""The gcs exporter against gcp-storage-emulator: formats, names, gzip, outages, errors."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import sys
import threading
import time
import types
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from flagsink_gcs import GcsExporter, GcsSettings
from flagsink_gcs import exporter as gcs_module
from google.api_core import exceptions as api
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY
from google.oauth2 import service_account
from pydantic import ValidationError

from flagsink import naming
from flagsink.config import parse_config
from flagsink.event import Event, FeatureEvent, TrackingEvent
from flagsink.exporter import ExportError, SettingsError
from flagsink.plugins import default_registry
from flagsink.scheduler import DataExporterScheduler
from flagsink.testing import sample_events, wait_until

from .conftest import Emulator, object_names, official_client, read_objects, start_emulator

SHORT_RETRY = DEFAULT_RETRY.with_timeout(0.5)
TIMEOUT = 30.0


# -- independent readers: what each format's bytes say, parsed without flagsink ------------


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


def go_text(value: Any) -> str:
    """How GO Feature Flag's CSV template prints a value (compact JSON for objects)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def expected_csv(event: Event) -> list[str]:
    """The 9 fields of GO Feature Flag's default CSV line for ``event``."""
    head = [event.kind, event.context_kind, event.user_key, str(event.creation_date), event.key]
    if isinstance(event, FeatureEvent):
        return [
            *head,
            event.variation,
            go_text(event.value),
            "true" if event.default else "false",
            event.source,
        ]
    return [*head, "", "", "", ""]


def parse_csv(data: bytes) -> list[list[str]]:
    """Rows of the default template, split on `;` by the csv module. The value field is
    not quoted (GO Feature Flag does not quote), so a value holding `;` spans several
    fields: the 5 leading and 2 trailing fields are fixed, the value is what lies between."""
    rows = []
    reader = csv.reader(io.StringIO(data.decode()), delimiter=";", quoting=csv.QUOTE_NONE)
    for fields in reader:
        assert len(fields) >= 9, fields
        rows.append([*fields[:6], ";".join(fields[6:-2]), *fields[-2:]])
    return rows


def parquet_rows(data: bytes) -> list[dict[str, Any]]:
    return list(pq.read_table(io.BytesIO(data)).to_pylist())


def check_parquet_row(row: dict[str, Any], event: Event) -> None:
    assert (row["kind"], row["contextKind"], row["userKey"]) == (
        event.kind,
        event.context_kind,
        event.user_key,
    )
    assert (row["creationDate"], row["key"]) == (event.creation_date, event.key)
    if isinstance(event, FeatureEvent):
        assert (row["variation"], row["default"], row["version"], row["source"]) == (
            event.variation,
            event.default,
            event.version,
            event.source,
        )
        assert json.loads(row["value"]) == event.value
        metadata = {
            k: v if isinstance(v, str) else json.dumps(v) for k, v in (event.metadata or {}).items()
        }
        assert dict(row["metadata"] or []) == metadata
    else:
        assert isinstance(event, TrackingEvent)
        assert json.loads(row["evaluationContext"]) == event.evaluation_context
        assert json.loads(row["trackingEventDetails"]) == event.tracking_event_details


def records_by_user(client: storage.Client, bucket: str) -> dict[str, dict[str, Any]]:
    """Every JSON-lines record in the bucket by userKey; fails on a duplicate."""
    out: dict[str, dict[str, Any]] = {}
    for data, _ in read_objects(client, bucket).values():
        for line in data.splitlines():
            record = json.loads(line)
            assert record["userKey"] not in out, f"{record['userKey']} delivered twice"
            out[record["userKey"]] = record
    return out


def assert_exactly_once(client: storage.Client, bucket: str, events: list[Event]) -> None:
    got = records_by_user(client, bucket)
    assert sorted(got) == sorted(e.user_key for e in events)
    for event in events:
        assert got[event.user_key] == expected_json(event)


@pytest.fixture
def schedulers() -> Iterator[list[DataExporterScheduler]]:
    made: list[DataExporterScheduler] = []
    yield made
    for scheduler in made:
        scheduler.close(1.0)


# -- every format, 10,000 events, read back with the official client -----------------------


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
def test_10000_events_round_trip_in_each_format(
    fmt: str, bucket: str, client: storage.Client, schedulers: list[DataExporterScheduler]
) -> None:
    events = sample_events(10_000)
    exporter = GcsExporter(bucket=bucket, format=fmt, retry=SHORT_RETRY)
    scheduler = DataExporterScheduler(exporter, flush_interval=3600, max_events_in_memory=4_000)
    schedulers.append(scheduler)
    for event in events:
        scheduler.add_event(event)
    assert scheduler.close(TIMEOUT)
    stats = scheduler.stats()
    assert (stats.exported, stats.failed_attempts, stats.dropped) == (10_000, 0, 0)

    objects = read_objects(client, bucket)
    assert len(objects) == 3  # 4,000 + 4,000 flushed on size, 2,000 at close
    content_types = {blob.content_type for _, blob in objects.values()}
    assert content_types == {exporter.format.content_type}
    assert all(name.endswith(f".{exporter.extension}") for name in objects)
    by_user = {event.user_key: event for event in events}
    seen: set[str] = set()
    for data, _ in objects.values():
        if fmt == "json":
            for line in data.decode().splitlines():
                record = json.loads(line)
                assert record == expected_json(by_user[record["userKey"]])
                seen.add(record["userKey"])
        elif fmt == "csv":
            for row in parse_csv(data):
                assert row == expected_csv(by_user[row[2]])
                seen.add(row[2])
        else:
            for row in parquet_rows(data):
                check_parquet_row(row, by_user[row["userKey"]])
                seen.add(row["userKey"])
    assert seen == set(by_user)


# -- names: partitions, gzip, create-only --------------------------------------------------


def test_partitioned_path_from_the_flush_time_in_utc(bucket: str, client: storage.Client) -> None:
    exporter = GcsExporter(
        bucket=bucket,
        path="/flags/dt={{ .Year}}-{{ .Month}}-{{ .Day}}/hour={{ .Hour}}/",
        retry=SHORT_RETRY,
    )
    before = datetime.now(UTC)
    exporter.export(sample_events(50))
    after = datetime.now(UTC)
    (name,) = object_names(client, bucket)
    allowed = {f"flags/dt={t:%Y-%m-%d}/hour={t:%H}/" for t in (before, after)}
    assert any(name.startswith(prefix) for prefix in allowed), name
    assert re.fullmatch(r"flags/dt=\d{4}-\d\d-\d\d/hour=\d\d/flag-variation-.+\.json", name)
    assert exporter.last_key == name


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_gzip_objects_carry_content_encoding(fmt: str, bucket: str, client: storage.Client) -> None:
    events = sample_events(2_000)
    exporter = GcsExporter(bucket=bucket, format=fmt, content_encoding="gzip", retry=SHORT_RETRY)
    exporter.export(events)
    (blob,) = client.list_blobs(bucket)
    assert blob.name.endswith(f".{fmt}.gz")
    assert blob.content_encoding == "gzip"
    assert blob.content_type == exporter.format.content_type
    stored = client.bucket(bucket).blob(blob.name).download_as_bytes(raw_download=True)
    assert stored[:2] == b"\x1f\x8b"  # stored compressed
    ((data, _),) = read_objects(client, bucket).values()
    assert len(data) > 3 * len(stored)
    if fmt == "json":
        assert_exactly_once(client, bucket, events)
    else:
        rows = parse_csv(data)
        assert rows == [expected_csv(event) for event in events]


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> float:
    """Every object name rendered for the same second (only naming's clock is frozen)."""
    now = time.time()
    monkeypatch.setattr(naming, "time", types.SimpleNamespace(time=lambda: now))
    return now


def test_two_exporters_same_second_same_template_never_collide(
    bucket: str, client: storage.Client, frozen_clock: float
) -> None:
    first = GcsExporter(bucket=bucket, retry=SHORT_RETRY)
    second = GcsExporter(bucket=bucket, retry=SHORT_RETRY)
    batches = [sample_events(10, prefix=f"b{i}") for i in range(4)]
    for exporter, events in zip([first, second, first, second], batches, strict=True):
        exporter.export(events)
    base = GcsExporter(bucket=bucket).namer.next_name().removesuffix(".json")
    assert object_names(client, bucket) == sorted(
        [f"{base}.json", f"{base}-1.json", f"{base}-2.json", f"{base}-3.json"]
    )
    assert_exactly_once(client, bucket, [e for batch in batches for e in batch])


def test_a_name_taken_by_another_writer_is_never_overwritten(
    bucket: str, client: storage.Client, frozen_clock: float
) -> None:
    exporter = GcsExporter(bucket=bucket, retry=SHORT_RETRY)
    taken = GcsExporter(bucket=bucket).namer.next_name()
    client.bucket(bucket).blob(taken).upload_from_string(b"someone else's data\n")
    events = sample_events(10)
    exporter.export(events)
    assert exporter.last_key == taken.replace(".json", "-1.json")
    assert client.bucket(bucket).blob(taken).download_as_bytes() == b"someone else's data\n"
    data, _ = read_objects(client, bucket)[exporter.last_key]
    assert [json.loads(line) for line in data.splitlines()] == [expected_json(e) for e in events]


@pytest.fixture
def small_resumable(monkeypatch: pytest.MonkeyPatch) -> int:
    """Bodies over 64 KiB (instead of 1 MiB) go up as resumable uploads in 256 KiB chunks
    (instead of 8 MiB), so several chunks go up with small batches."""
    monkeypatch.setattr(gcs_module, "SINGLE_REQUEST_MAX", 64 * 1024)
    monkeypatch.setattr(gcs_module, "CHUNK_SIZE", 256 * 1024)
    return 256 * 1024


def test_resumable_upload_is_create_only_too(
    bucket: str, client: storage.Client, frozen_clock: float, small_resumable: int
) -> None:
    exporter = GcsExporter(bucket=bucket, retry=SHORT_RETRY)
    taken = GcsExporter(bucket=bucket).namer.next_name()
    client.bucket(bucket).blob(taken).upload_from_string(b"taken\n")
    events = sample_events(3_000)  # ~650 KB: three chunks
    exporter.export(events)
    assert exporter.last_key == taken.replace(".json", "-1.json")
    assert client.bucket(bucket).blob(taken).download_as_bytes() == b"taken\n"
    data, blob = read_objects(client, bucket)[exporter.last_key]
    assert blob.size > 2 * small_resumable
    assert [json.loads(line) for line in data.splitlines()] == [expected_json(e) for e in events]


def test_resumable_upload_overtaken_midway_moves_to_the_next_name(
    bucket: str, client: storage.Client, frozen_clock: float, small_resumable: int
) -> None:
    exporter = GcsExporter(bucket=bucket, retry=SHORT_RETRY)
    name = GcsExporter(bucket=bucket).namer.next_name()
    overtaken: list[str] = []

    def another_writer_takes_the_name(response: Any, **_: Any) -> None:
        if response.status_code == 308 and not overtaken:  # our session is under way
            overtaken.append(name)
            client.bucket(bucket).blob(name).upload_from_string(b"the other writer\n")

    exporter.client._http.hooks["response"].append(another_writer_takes_the_name)
    events = sample_events(3_000)
    exporter.export(events)
    assert overtaken == [name]
    assert client.bucket(bucket).blob(name).download_as_bytes() == b"the other writer\n"
    assert exporter.last_key == name.replace(".json", "-1.json")
    data, _ = read_objects(client, bucket)[exporter.last_key]
    assert [json.loads(line) for line in data.splitlines()] == [expected_json(e) for e in events]


@pytest.mark.parametrize(
    ("count", "kind", "requests"),
    [
        (100, "multipart", 1),  # ~22 KB: one request
        (10_000, "resumable", 2),  # ~2.2 MB: start the session, one chunk
        (40_000, "resumable", 3),  # ~8.7 MB: start, a full 8 MiB chunk, the rest
    ],
)
def test_upload_kind_by_size_always_create_only(
    count: int, kind: str, requests: int, bucket: str, client: storage.Client
) -> None:
    events = sample_events(count)
    exporter = GcsExporter(bucket=bucket, retry=SHORT_RETRY)
    seen: list[str] = []
    exporter.client._http.hooks["response"].append(
        lambda response, **_: seen.append(response.request.url)
    )
    exporter.export(events)
    uploads = [url for url in seen if "/upload/" in url]
    assert len(uploads) == requests
    assert all(f"uploadType={kind}&ifGenerationMatch=0" in url for url in uploads)
    assert_exactly_once(client, bucket, events)


# -- outages --------------------------------------------------------------------------------


def test_server_stopped_during_a_flush_every_event_arrives_once(
    gcs: Emulator, bucket: str, client: storage.Client, schedulers: list[DataExporterScheduler]
) -> None:
    events = sample_events(2_000, prefix="outage")
    exporter = GcsExporter(bucket=bucket, retry=SHORT_RETRY)
    upload = exporter.put_object

    def stop_then_upload(*args: Any, **kwargs: Any) -> None:
        gcs.stop()  # the server goes down mid-flush: encoded, not yet uploaded
        exporter.put_object = upload  # type: ignore[method-assign]
        upload(*args, **kwargs)

    exporter.put_object = stop_then_upload  # type: ignore[method-assign]
    scheduler = DataExporterScheduler(
        exporter, flush_interval=3600, max_events_in_memory=len(events), retry_initial=0.05
    )
    schedulers.append(scheduler)
    for event in events:
        scheduler.add_event(event)
    assert wait_until(lambda: scheduler.stats().failed_attempts >= 1, TIMEOUT)
    stats = scheduler.stats()
    assert stats.exported == 0
    assert stats.buffered + stats.in_flight == len(events)
    assert f"bucket {bucket!r}" in (stats.last_error or "")
    gcs.start()
    assert wait_until(lambda: scheduler.stats().exported == len(events), TIMEOUT)
    stats = scheduler.stats()
    assert stats.retried >= len(events)
    assert stats.dropped == 0
    assert len(object_names(client, bucket)) == 1
    assert_exactly_once(client, bucket, events)


def test_interrupted_resumable_upload_leaves_no_object(
    gcs: Emulator, bucket: str, client: storage.Client, small_resumable: int
) -> None:
    events = sample_events(3_000)
    exporter = GcsExporter(bucket=bucket, retry=SHORT_RETRY)
    chunks: list[int] = []

    def stop_after_first_chunk(response: Any, **_: Any) -> None:
        if response.status_code == 308:  # a chunk was stored, the upload is unfinished
            chunks.append(1)
            gcs.stop()

    exporter.client._http.hooks["response"].append(stop_after_first_chunk)
    with pytest.raises(ExportError, match=f"bucket {bucket!r}"):
        exporter.export(events)
    assert chunks == [1]
    gcs.start()
    assert object_names(client, bucket) == []  # no partial object, under any name
    exporter.client._http.hooks["response"].clear()
    exporter.export(events)  # the scheduler's retry: the whole batch, a new session
    assert_exactly_once(client, bucket, events)


# -- errors: missing bucket, credentials ----------------------------------------------------


def test_missing_bucket_is_named_and_events_are_kept(
    gcs: Emulator,
    client: storage.Client,
    schedulers: list[DataExporterScheduler],
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = f"missing-{time.monotonic_ns()}"
    exporter = GcsExporter(bucket=name, retry=SHORT_RETRY)
    with pytest.raises(ExportError) as caught:
        exporter.export(sample_events(3))
    assert str(caught.value).startswith(f"bucket {name!r} does not exist")

    events = sample_events(100, prefix="kept")
    scheduler = DataExporterScheduler(
        exporter, flush_interval=0.05, max_events_in_memory=1_000, retry_initial=0.05
    )
    schedulers.append(scheduler)
    with caplog.at_level(logging.WARNING, logger="flagsink"):
        for event in events:
            scheduler.add_event(event)
        assert wait_until(lambda: scheduler.stats().failed_attempts >= 2, TIMEOUT)
    stats = scheduler.stats()
    assert stats.exported == 0
    assert stats.buffered + stats.in_flight == len(events)
    assert f"bucket {name!r} does not exist" in (stats.last_error or "")
    assert f"bucket {name!r} does not exist" in caplog.text
    client.create_bucket(name)  # fixed: the kept events go out
    assert wait_until(lambda: scheduler.stats().exported == len(events), TIMEOUT)
    assert_exactly_once(client, name, events)


class TokenServer:
    """A local OAuth token endpoint, as a service-account key's ``token_uri`` names it:
    grants a token, or refuses the key as Google's endpoint does for a revoked one."""

    def __init__(self, grant: bool) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                server.requests.append(self.rfile.read(length))
                if grant:
                    status, body = 200, {"access_token": server.token, "expires_in": 3600}
                else:
                    status, body = (
                        400,
                        {
                            "error": "invalid_grant",
                            "error_description": "Invalid JWT Signature.",
                        },
                    )
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.token = "ya29.local-test-access-token"
        self.requests: list[bytes] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def write_key(path: Path, token_uri: str) -> dict[str, str]:
    """A service-account key file with a fresh RSA key; returns its content."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "flagsink-test",
        "private_key_id": "0f1e2d3c4b5a69788796a5b4c3d2e1f0deadbeef",
        "private_key": pem,
        "client_email": "exporter@flagsink-test.iam.gserviceaccount.com",
        "client_id": "123456789012345678901",
        "token_uri": token_uri,
    }
    path.write_text(json.dumps(info))
    return info


def secrets_of(info: dict[str, str]) -> list[str]:
    body = info["private_key"].splitlines()[1:-1]
    return [info["private_key_id"], *body]


@pytest.fixture
def refusing_token_server() -> Iterator[TokenServer]:
    server = TokenServer(grant=False)
    yield server
    server.close()


@pytest.fixture
def granting_token_server() -> Iterator[TokenServer]:
    server = TokenServer(grant=True)
    yield server
    server.close()


def test_refused_credentials_clear_error_events_kept_key_never_shown(
    bucket: str,
    client: storage.Client,
    tmp_path: Path,
    refusing_token_server: TokenServer,
    schedulers: list[DataExporterScheduler],
    caplog: pytest.LogCaptureFixture,
) -> None:
    info = write_key(tmp_path / "key.json", refusing_token_server.url)
    exporter = GcsExporter(bucket=bucket, credentials_file=str(tmp_path / "key.json"))
    events = sample_events(100, prefix="denied")
    scheduler = DataExporterScheduler(
        exporter, flush_interval=0.05, max_events_in_memory=1_000, retry_initial=0.05
    )
    schedulers.append(scheduler)
    with caplog.at_level(logging.DEBUG):
        for event in events:
            scheduler.add_event(event)
        assert wait_until(lambda: scheduler.stats().failed_attempts >= 2, TIMEOUT)
        with pytest.raises(ExportError) as caught:
            exporter.export(sample_events(1))
    stats = scheduler.stats()
    assert stats.exported == 0
    assert stats.buffered + stats.in_flight == len(events)
    message = str(caught.value)
    assert message.startswith(f"access denied to bucket {bucket!r}")
    assert "credentials were refused" in message
    assert message in (stats.last_error or "")
    assert refusing_token_server.requests  # the key really was tried
    shown = "\n".join([caplog.text, message, stats.last_error or "", repr(caught.value)])
    for secret in secrets_of(info):
        assert secret not in shown
    assert object_names(client, bucket) == []


def test_credentials_file_is_used_and_one_client_serves_every_export(
    bucket: str,
    client: storage.Client,
    tmp_path: Path,
    granting_token_server: TokenServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    info = write_key(tmp_path / "key.json", granting_token_server.url)
    exporter = GcsExporter(
        bucket=bucket, credentialsFile=str(tmp_path / "key.json"), retry=SHORT_RETRY
    )
    made = exporter.client
    assert isinstance(made._credentials, service_account.Credentials)
    assert made.project == "flagsink-test"
    authorizations: list[tuple[str, str | None]] = []
    made._http.hooks["response"].append(
        lambda response, **_: authorizations.append(
            (response.request.url, response.request.headers.get("Authorization"))
        )
    )
    batches = [sample_events(20, prefix=f"cred{i}") for i in range(3)]
    with caplog.at_level(logging.DEBUG):
        exporter.export(batches[0])
        tokens = len(granting_token_server.requests)
        assert tokens >= 1
        for events in batches[1:]:
            exporter.export(events)
    assert exporter.client is made
    assert len(granting_token_server.requests) == tokens  # same client, same token
    uploads = [auth for url, auth in authorizations if "/upload/" in url]
    assert uploads == [f"Bearer {granting_token_server.token}"] * 3
    assert_exactly_once(client, bucket, [e for batch in batches for e in batch])
    for secret in [*secrets_of(info), granting_token_server.token]:
        assert secret not in caplog.text
    exporter.close()


def test_emulator_without_credentials_file_is_anonymous(bucket: str) -> None:
    exporter = GcsExporter(bucket=bucket, project="p-1")
    assert isinstance(exporter.client._credentials, AnonymousCredentials)
    assert exporter.client.project == "p-1"
    exporter.close()


def test_without_emulator_or_file_application_default_credentials_are_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    found = AnonymousCredentials()

    def default() -> tuple[Any, str]:
        return found, "adc-project"

    monkeypatch.setattr(gcs_module.google.auth, "default", default)
    exporter = GcsExporter(bucket="events")
    assert exporter.client._credentials is found
    assert exporter.client.project == "adc-project"
    exporter.close()


def test_no_credentials_anywhere_is_a_clear_export_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)

    def default() -> Any:
        raise gcs_module.auth.DefaultCredentialsError("none")

    monkeypatch.setattr(gcs_module.google.auth, "default", default)
    exporter = GcsExporter(bucket="events")
    with pytest.raises(ExportError, match="no Google credentials found for bucket 'events'"):
        exporter.export(sample_events(1))


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "does not exist"),
        ("{not json", "is not a JSON credentials file"),
        ('{"type": "external_account"}', "type 'external_account'"),
        ('{"type": "service_account", "client_email": "x"}', "is not a usable service_account"),
        (
            '{"type": "service_account", "client_email": "a@b", "token_uri": "http://x",'
            ' "private_key": "-----BEGIN PRIVATE KEY-----\\nc2VjcmV0\\n-----END PRIVATE KEY-----"}',
            "is not a usable service_account",
        ),
    ],
)
def test_unusable_credentials_file_is_a_settings_error(
    tmp_path: Path, content: str | None, problem: str
) -> None:
    path = tmp_path / "key.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SettingsError) as caught:
        GcsExporter(bucket="events", credentialsFile=str(path))
    assert caught.value.field == "credentialsFile"
    assert problem in caught.value.message
    assert "c2VjcmV0" not in str(caught.value)


# -- the client's errors, as messages (the emulator never answers 401/403/5xx) --------------


class FailingBlob:
    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.content_encoding: str | None = None

    def upload_from_file(self, *args: Any, **kwargs: Any) -> None:
        raise self.error


class FailingClient:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def bucket(self, name: str) -> Any:
        return types.SimpleNamespace(blob=lambda key, chunk_size: FailingBlob(self.error))


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (api.Forbidden("no"), "access denied to bucket 'events': check the credentials"),
        (api.Unauthorized("no"), "access denied to bucket 'events': the credentials were refused"),
        (api.NotFound("no"), "bucket 'events' does not exist"),
        (api.ServiceUnavailable("busy"), "failed: ServiceUnavailable: HTTP 503 busy"),
        (
            api.RetryError("Timeout of 0.5s exceeded", ConnectionError("refused")),
            "retries included",
        ),
        (ConnectionError("refused"), "cannot reach Google Cloud Storage"),
    ],
)
def test_client_errors_become_clear_export_errors(error: BaseException, message: str) -> None:
    exporter = GcsExporter(bucket="events", client=FailingClient(error), retry=SHORT_RETRY)
    with pytest.raises(ExportError) as caught:
        exporter.export(sample_events(2))
    assert message in str(caught.value)


def test_ready_client_is_used_and_left_open(bucket: str, client: storage.Client) -> None:
    mine = official_client()
    exporter = GcsExporter(bucket=bucket, client=mine, retry=SHORT_RETRY)
    exporter.export(sample_events(5))
    exporter.close()
    assert exporter.client is mine
    mine.bucket(bucket).blob("still-open.txt").upload_from_string(b"ok")  # not closed
    assert len(object_names(client, bucket)) == 2
    mine.close()


# -- settings and registration --------------------------------------------------------------


def test_googlestorage_alias_and_camelcase_config(bucket: str) -> None:
    assert default_registry().exporter("googleStorage") is GcsExporter
    assert default_registry().exporter("gcs") is GcsExporter
    config = parse_config(
        {
            "exporter": {
                "kind": "googleStorage",
                "bucket": bucket,
                "path": "flags",
                "format": "parquet",
                "parquetCompressionCodec": "ZSTD",
                "contentEncoding": "gzip",
                "flushInterval": 1000,
            }
        }
    )
    (section,) = config.exporters
    exporter = section.build()
    assert isinstance(exporter, GcsExporter)
    assert exporter.settings.bucket == bucket
    assert exporter.settings.parquet_compression_codec == "ZSTD"
    assert exporter.extension == "parquet.gz"


@pytest.mark.parametrize(
    ("bucket", "problem"),
    [
        ("gs://events", "without gs://"),
        ("events/2026", "put folders in `path`"),
        ("Events", "not a valid bucket name"),
        ("ev", "not a valid bucket name"),
        ("-events", "not a valid bucket name"),
        ("a" * 64, "not a valid bucket name"),
        (".".join(["a" * 64, "b"]), "over 63"),
    ],
)
def test_bucket_names_are_checked(bucket: str, problem: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(problem)):
        GcsSettings.model_validate({"bucket": bucket})


def test_valid_settings_and_defaults() -> None:
    settings = GcsSettings.model_validate({"bucket": "my_bucket.example-1"})
    assert settings.path == ""
    assert settings.project is None
    assert settings.credentials_file is None
    with pytest.raises(ValidationError):
        GcsSettings.model_validate({"bucket": "b-1", "credentialsFile": " "})
    with pytest.raises(ValidationError):
        GcsSettings.model_validate({"path": "x"})  # bucket is required


def test_plain_emulator_ignores_the_create_only_precondition(tmp_path: Path) -> None:
    """Why the fixture wraps the emulator (emulator.py): the unwrapped one overwrites an
    object on a create-only upload. If this starts failing, the emulator honours
    ``ifGenerationMatch`` itself and the wrapper can go."""
    command = [sys.executable, "-m", "gcp_storage_emulator", "-d", str(tmp_path / "data")]
    plain = start_emulator(command, tmp_path / "plain.log")
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("STORAGE_EMULATOR_HOST", plain.url)
            direct = official_client()
            direct.create_bucket("plain")
            blob = direct.bucket("plain").blob("a.json")
            blob.upload_from_string(b"first", if_generation_match=0)
            blob.upload_from_string(b"second", if_generation_match=0)  # GCS: 412
            assert blob.download_as_bytes() == b"second"
            direct.close()
    finally:
        plain.stop()
