"""The s3 exporter against a real S3 server (moto in a subprocess): every format read back
with boto3 and parsed independently, naming, create-only uploads, multipart uploads and
their abort, outages, and clear errors that keep the data and never show credentials."""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import EndpointConnectionError
from flagsink_s3 import DEFAULT_PART_SIZE, S3Exporter, S3Settings
from s3_moto_server import ACCESS_KEY, MIN_PART_SIZE, SECRET_KEY, MotoServer

from flagsink import DataExporterScheduler, ExportError, FeatureEvent, from_config
from flagsink.config import parse_config
from flagsink.event import Event
from flagsink.plugins import default_registry
from flagsink.testing import sample_events, wait_until

DOCS_PAGE = Path(__file__).resolve().parents[3] / "docs" / "pages" / "exporters" / "s3.md"
CSV_FIELDS = 9  # GO Feature Flag's default csvTemplate: Kind;ContextKind;...;Source


# -- reading back, independently of flagsink's encoders -----------------------------------


def objects(server: MotoServer, bucket: str) -> dict[str, dict[str, Any]]:
    """Every object in ``bucket``: key -> {"data": bytes (gunzipped), "head": headers}."""
    s3 = server.client()
    found: dict[str, dict[str, Any]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            answer = s3.get_object(Bucket=bucket, Key=item["Key"])
            data = answer["Body"].read()
            if answer.get("ContentEncoding") == "gzip":
                data = gzip.decompress(data)
            found[item["Key"]] = {"data": data, "head": answer}
    return found


def unfinished_uploads(server: MotoServer, bucket: str) -> list[Any]:
    return list(server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def go_text(value: Any) -> str:
    """How GO Feature Flag's templates print a value (maps as compact JSON)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def json_record(event: Event) -> dict[str, Any]:
    """The GO Feature Flag JSON of ``event``, built by hand from its attributes."""
    common = {
        "contextKind": event.context_kind,
        "userKey": event.user_key,
        "creationDate": event.creation_date,
        "key": event.key,
    }
    if isinstance(event, FeatureEvent):
        record = {
            "kind": "feature",
            **common,
            "variation": event.variation,
            "value": event.value,
            "default": event.default,
            "version": event.version,
            "source": event.source,
        }
        if event.metadata:
            record["metadata"] = event.metadata
        return record
    return {
        "kind": "tracking",
        **common,
        "evaluationContext": event.evaluation_context,
        "trackingEventDetails": event.tracking_event_details,
    }


def csv_record(event: Event) -> list[str]:
    row = [event.kind, event.context_kind, event.user_key, str(event.creation_date), event.key]
    if isinstance(event, FeatureEvent):
        return [
            *row,
            event.variation,
            go_text(event.value),
            go_text(event.default),
            event.source,
        ]
    return [*row, "", "", "", ""]


def parquet_record(event: Event) -> dict[str, Any]:
    record: dict[str, Any] = {
        "kind": event.kind,
        "contextKind": event.context_kind,
        "userKey": event.user_key,
        "creationDate": event.creation_date,
        "key": event.key,
    }
    if isinstance(event, FeatureEvent):
        metadata = event.metadata or {}
        record.update(
            variation=event.variation,
            value=event.value,
            default=event.default,
            version=event.version,
            source=event.source,
            metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
            or None,
        )
    else:
        record.update(
            evaluationContext=event.evaluation_context,
            trackingEventDetails=event.tracking_event_details,
        )
    return record


def parse_json_lines(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def parse_csv(data: bytes) -> list[list[str]]:
    rows = []
    for fields in csv.reader(io.StringIO(data.decode("utf-8")), delimiter=";", quotechar="\0"):
        # The default template does not quote: a value holding ';' spans several fields.
        value = ";".join(fields[6 : len(fields) - 2])
        rows.append([*fields[:6], value, *fields[-2:]])
        assert len(fields) >= CSV_FIELDS
    return rows


def parse_parquet(data: bytes) -> list[dict[str, Any]]:
    rows = []
    for row in pq.read_table(io.BytesIO(data)).to_pylist():
        record = {name: value for name, value in row.items() if value is not None}
        if record["kind"] == "feature":
            record["value"] = json.loads(record["value"])
            record["metadata"] = dict(record["metadata"]) if record.get("metadata") else None
        else:
            for name in ("evaluationContext", "trackingEventDetails"):
                record[name] = json.loads(record[name])
        rows.append(record)
    return rows


READERS: dict[str, tuple[Callable[[bytes], list[Any]], Callable[[Event], Any], Any]] = {
    "json": (parse_json_lines, json_record, lambda r: r["userKey"]),
    "csv": (parse_csv, csv_record, lambda r: r[2]),
    "parquet": (parse_parquet, parquet_record, lambda r: r["userKey"]),
}


def assert_each_event_once(
    server: MotoServer, bucket: str, events: list[Event], fmt: str = "json"
) -> dict[str, dict[str, Any]]:
    """Read every object back, parse it as ``fmt`` and compare event by event."""
    parse, expected, user_key = READERS[fmt]
    stored = objects(server, bucket)
    records = [record for item in stored.values() for record in parse(item["data"])]
    by_user = {user_key(record): record for record in records}
    assert len(by_user) == len(records), "an event was stored twice"
    want = {event.user_key: expected(event) for event in events}
    assert sorted(by_user) == sorted(want), f"{len(records)} records stored, {len(want)} sent"
    for user, record in want.items():
        assert by_user[user] == record, user
    return stored


def exported_through_scheduler(exporter: S3Exporter, events: list[Event], batch: int) -> None:
    scheduler = DataExporterScheduler(exporter, flush_interval=3600, max_events_in_memory=batch)
    for event in events:
        scheduler.add_event(event)
    assert scheduler.close(60), scheduler.stats()
    stats = scheduler.stats()
    assert (stats.exported, stats.dropped, stats.failed_attempts) == (len(events), 0, 0)


@pytest.fixture
def new_exporter(s3_server: MotoServer, bucket: str) -> Iterator[Callable[..., S3Exporter]]:
    made: list[S3Exporter] = []

    def new(**options: Any) -> S3Exporter:
        options = {"bucket": bucket, "endpointUrl": s3_server.endpoint, **options}
        exporter = S3Exporter(**options)
        made.append(exporter)
        return exporter

    yield new
    for exporter in made:
        exporter.close()


# -- every format, read back and compared event by event ----------------------------------


@pytest.mark.parametrize(
    ("fmt", "part_size"),
    [
        ("json", DEFAULT_PART_SIZE),
        ("csv", DEFAULT_PART_SIZE),
        ("parquet", DEFAULT_PART_SIZE),
        ("json", 256 * 1024),  # 4,000 events: ~870 KB in 4 parts
        ("csv", 128 * 1024),
    ],
    ids=["json", "csv", "parquet", "json-multipart", "csv-multipart"],
)
def test_10000_events_round_trip_in_each_format(
    s3_server: MotoServer,
    bucket: str,
    new_exporter: Callable[..., S3Exporter],
    fmt: str,
    part_size: int,
) -> None:
    events = sample_events(10_000, prefix=fmt)
    exporter = new_exporter(format=fmt, part_size=part_size)
    exported_through_scheduler(exporter, events, batch=4_000)
    stored = assert_each_event_once(s3_server, bucket, events, fmt)
    assert len(stored) == 3  # 4,000 + 4,000 + 2,000
    extension = {"json": ".json", "csv": ".csv", "parquet": ".parquet"}[fmt]
    content_type = exporter.format.content_type
    for key, item in stored.items():
        assert key.endswith(extension)
        assert not key.startswith("/")
        assert item["head"]["ContentType"] == content_type
        assert "ContentEncoding" not in item["head"]
    assert unfinished_uploads(s3_server, bucket) == []


def test_partitioned_path_from_flush_time(
    s3_server: MotoServer, bucket: str, new_exporter: Callable[..., S3Exporter]
) -> None:
    exporter = new_exporter(
        path="/flags/dt={{ .Year}}-{{ .Month}}-{{ .Day}}/hour={{ .Hour}}/", format="parquet"
    )
    before = datetime.now(UTC)
    exporter.export(sample_events(50))
    after = datetime.now(UTC)
    (key,) = objects(s3_server, bucket)
    match = re.fullmatch(
        r"flags/dt=(\d{4})-(\d\d)-(\d\d)/hour=(\d\d)/flag-variation-[^/]+-(\d+)\.parquet", key
    )
    assert match, key
    stamp = datetime(*(int(part) for part in match.groups()[:4]), tzinfo=UTC)
    assert before.replace(minute=0, second=0, microsecond=0) <= stamp <= after
    assert exporter.last_key == key


@pytest.mark.parametrize("part_size", [DEFAULT_PART_SIZE, MIN_PART_SIZE])
def test_gzip_content_encoding(
    s3_server: MotoServer,
    bucket: str,
    new_exporter: Callable[..., S3Exporter],
    part_size: int,
) -> None:
    events = sample_events(3_000)
    exporter = new_exporter(contentEncoding="gzip", part_size=part_size)
    exporter.export(events)
    raw = s3_server.client().get_object(Bucket=bucket, Key=exporter.last_key)
    assert raw["ContentEncoding"] == "gzip"
    assert raw["ContentType"] == exporter.format.content_type
    body = raw["Body"].read()
    assert body[:2] == b"\x1f\x8b"
    assert exporter.last_key is not None
    assert exporter.last_key.endswith(".json.gz")
    assert_each_event_once(s3_server, bucket, events)


def test_storage_class_and_server_side_encryption(
    s3_server: MotoServer, bucket: str, new_exporter: Callable[..., S3Exporter]
) -> None:
    s3 = s3_server.client()
    for part_size in (DEFAULT_PART_SIZE, MIN_PART_SIZE):
        exporter = new_exporter(
            storageClass="STANDARD_IA",
            serverSideEncryption="aws:kms",
            sseKmsKeyId="alias/flag-events",
            part_size=part_size,
        )
        exporter.export(sample_events(2_000))
        head = s3.head_object(Bucket=bucket, Key=exporter.last_key)
        assert head["StorageClass"] == "STANDARD_IA"
        assert head["ServerSideEncryption"] == "aws:kms"
        assert head["SSEKMSKeyId"] == "alias/flag-events"
    exporter = new_exporter(serverSideEncryption="AES256")
    exporter.export(sample_events(5))
    assert s3.head_object(Bucket=bucket, Key=exporter.last_key)["ServerSideEncryption"] == "AES256"


# -- names never collide; uploads are create-only -----------------------------------------


def test_two_exporters_with_one_template_never_overwrite(
    s3_server: MotoServer, bucket: str, new_exporter: Callable[..., S3Exporter]
) -> None:
    # A template without a timestamp: every export of both exporters renders the same
    # name, as two hosts (same hostname, e.g. containers) flushing in the same second do.
    first = new_exporter(path="events", filename="flags-{{ .Hostname}}.{{ .Format}}")
    second = new_exporter(path="events", filename="flags-{{ .Hostname}}.{{ .Format}}")
    batches = [sample_events(10, prefix=f"b{n}") for n in range(4)]
    keys = []
    for exporter, events in zip([first, second, second, first], batches, strict=True):
        exporter.export(events)
        keys.append(exporter.last_key)
    host = first.namer.host
    assert keys == [
        f"events/flags-{host}.json",
        f"events/flags-{host}-1.json",
        f"events/flags-{host}-2.json",
        f"events/flags-{host}-3.json",
    ]
    assert sorted(objects(s3_server, bucket)) == sorted(keys)
    assert_each_event_once(s3_server, bucket, [e for batch in batches for e in batch])


@pytest.mark.parametrize("part_size", [DEFAULT_PART_SIZE, MIN_PART_SIZE], ids=["put", "multipart"])
def test_a_taken_name_is_never_overwritten(
    s3_server: MotoServer,
    bucket: str,
    new_exporter: Callable[..., S3Exporter],
    part_size: int,
) -> None:
    s3 = s3_server.client()
    s3.put_object(Bucket=bucket, Key="events/batch.json", Body=b"written by someone else\n")
    exporter = new_exporter(path="events", filename="batch.{{ .Format}}", part_size=part_size)
    events = sample_events(2_000)
    exporter.export(events)
    assert exporter.last_key == "events/batch-1.json"
    body = s3.get_object(Bucket=bucket, Key="events/batch.json")["Body"].read()
    assert body == b"written by someone else\n"
    stored = s3.get_object(Bucket=bucket, Key="events/batch-1.json")["Body"].read()
    assert parse_json_lines(stored) == [json_record(event) for event in events]
    # The multipart upload refused with 412 at CompleteMultipartUpload was aborted.
    assert unfinished_uploads(s3_server, bucket) == []


# -- failures -----------------------------------------------------------------------------


def test_failed_multipart_upload_is_aborted_and_retried_whole(
    s3_server: MotoServer, bucket: str, new_exporter: Callable[..., S3Exporter]
) -> None:
    exporter = new_exporter(part_size=MIN_PART_SIZE)
    calls: list[int] = []

    def fail_third_part(params: dict[str, Any], **_: Any) -> None:
        calls.append(params["PartNumber"])
        if params["PartNumber"] == 3:
            raise EndpointConnectionError(endpoint_url="injected fault")

    exporter.client.meta.events.register("before-parameter-build.s3.UploadPart", fail_third_part)
    events = sample_events(2_000)
    with pytest.raises(ExportError, match=f"bucket {bucket!r}"):
        exporter.export(events)
    assert calls == [1, 2, 3]
    assert unfinished_uploads(s3_server, bucket) == []
    assert objects(s3_server, bucket) == {}

    exporter.client.meta.events.unregister("before-parameter-build.s3.UploadPart", fail_third_part)
    exporter.export(events)
    assert_each_event_once(s3_server, bucket, events)
    assert unfinished_uploads(s3_server, bucket) == []


def test_abort_failure_is_logged_and_the_upload_error_raised(
    s3_server: MotoServer,
    bucket: str,
    new_exporter: Callable[..., S3Exporter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    exporter = new_exporter(part_size=MIN_PART_SIZE)

    def fail(**_: Any) -> None:
        raise EndpointConnectionError(endpoint_url="injected fault")

    exporter.client.meta.events.register("before-call.s3.UploadPart", fail)
    exporter.client.meta.events.register("before-call.s3.AbortMultipartUpload", fail)
    with caplog.at_level(logging.WARNING, logger="flagsink.s3"), pytest.raises(ExportError):
        exporter.export(sample_events(1_000))
    assert "could not abort" in caplog.text
    assert "AbortIncompleteMultipartUpload" in caplog.text
    assert len(unfinished_uploads(s3_server, bucket)) == 1  # the fault left it; a rule cleans up


def test_server_stopped_during_a_flush_then_restarted(
    s3_server: MotoServer, bucket: str, new_exporter: Callable[..., S3Exporter]
) -> None:
    exporter = new_exporter(part_size=256 * 1024)
    events = sample_events(10_000, prefix="outage")
    stops: list[float] = []

    def stop_after_first_part(**_: Any) -> None:
        if not stops:  # mid-flush: one part is up, the rest are not
            stops.append(time.monotonic())
            s3_server.stop()

    exporter.client.meta.events.register("after-call.s3.UploadPart", stop_after_first_part)
    scheduler = DataExporterScheduler(
        exporter,
        flush_interval=3600,
        max_events_in_memory=len(events),
        retry_initial=0.05,
        retry_max=0.5,
    )
    try:
        for event in events:
            scheduler.add_event(event)
        assert wait_until(lambda: scheduler.stats().failed_attempts >= 1, 60)
        stats = scheduler.stats()
        assert stats.exported == 0
        assert stats.buffered + stats.in_flight == len(events)
        assert stats.last_error is not None
        assert "cannot reach" in stats.last_error
        assert bucket in stats.last_error
        s3_server.start()
        assert wait_until(lambda: scheduler.stats().exported == len(events), 60)
    finally:
        if s3_server.process is None:
            s3_server.start()
        assert scheduler.close(30)
    stats = scheduler.stats()
    assert stats.retried >= len(events)
    assert stats.failed_attempts >= 1
    assert (stats.dropped, stats.buffered, stats.in_flight) == (0, 0, 0)
    assert len(stops) == 1
    assert len(assert_each_event_once(s3_server, bucket, events)) == 1
    assert unfinished_uploads(s3_server, bucket) == []


def _assert_kept_for_retry(
    exporter: S3Exporter, events: list[Event], *expected: str
) -> DataExporterScheduler:
    scheduler = DataExporterScheduler(
        exporter, flush_interval=0.05, max_events_in_memory=len(events), retry_initial=0.05
    )
    for event in events:
        scheduler.add_event(event)
    assert wait_until(lambda: scheduler.stats().failed_attempts >= 2, 30)
    stats = scheduler.stats()
    assert stats.exported == 0
    assert stats.dropped == 0
    assert stats.buffered + stats.in_flight == len(events)
    assert stats.last_error is not None
    for text in expected:
        assert text in stats.last_error
    return scheduler


def test_missing_bucket_is_named_and_the_events_wait_for_it(
    s3_server: MotoServer, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"missing-{time.time_ns()}"
    exporter = S3Exporter(bucket=name, endpointUrl=s3_server.endpoint)
    events = sample_events(100)
    with pytest.raises(ExportError) as caught:
        exporter.export(events)
    assert str(caught.value).startswith(f"bucket {name!r} does not exist at {s3_server.endpoint}")

    with caplog.at_level(logging.INFO):
        scheduler = _assert_kept_for_retry(exporter, events, f"bucket {name!r} does not exist")
        s3_server.client().create_bucket(Bucket=name)
        s3_server.buckets.append(name)
        assert wait_until(lambda: scheduler.stats().exported == len(events), 30)
        assert scheduler.close(10)
    assert f"bucket {name!r} does not exist" in caplog.text
    assert_each_event_once(s3_server, name, events)


@pytest.mark.parametrize("fault", ["unknown key", "wrong secret", "not allowed"])
def test_wrong_credentials_are_reported_without_the_credentials(
    s3_server: MotoServer,
    bucket: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
) -> None:
    key_id, secret = s3_server.writer_key("s3:GetObject" if fault == "not allowed" else "s3:*")
    if fault == "unknown key":  # from the default chain (environment variables)
        key_id = ACCESS_KEY
        secret = SECRET_KEY
    elif fault == "wrong secret":
        secret = "a-wrong-secret-that-must-never-be-logged"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    good_key, good_secret = s3_server.writer_key()
    events = sample_events(100)
    with s3_server.authenticating():
        exporter = S3Exporter(bucket=bucket, endpointUrl=s3_server.endpoint)
        with pytest.raises(ExportError) as caught:
            exporter.export(events)
        message = str(caught.value)
        assert message.startswith(f"cannot write to bucket {bucket!r}: access denied (")
        assert "check the credentials" in message
        with caplog.at_level(logging.INFO):
            scheduler = _assert_kept_for_retry(exporter, events, bucket, "access denied")
            assert scheduler.close(2) is False  # undelivered at close: counted, not hidden
            assert wait_until(lambda: scheduler.stats().dropped == len(events), 10)
        # The right credentials work while authentication is on.
        session = boto3.Session(aws_access_key_id=good_key, aws_secret_access_key=good_secret)
        S3Exporter(bucket=bucket, endpointUrl=s3_server.endpoint, session=session).export(events)
    assert_each_event_once(s3_server, bucket, events)
    for text in (caplog.text, message, scheduler.stats().last_error or ""):
        assert secret not in text
        assert good_secret not in text
        assert key_id not in text


def test_no_credentials_at_all(
    s3_server: MotoServer, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    exporter = S3Exporter(bucket=bucket, endpointUrl=s3_server.endpoint)
    with pytest.raises(ExportError, match=f"bucket {bucket!r}: no usable AWS credentials"):
        exporter.export(sample_events(3))


# -- the Python API and config -------------------------------------------------------------


def test_ready_client_is_used_and_left_open(s3_server: MotoServer, bucket: str) -> None:
    client = s3_server.client()
    exporter = S3Exporter(bucket=bucket, client=client, format="csv")
    assert exporter.client is client
    events = sample_events(20)
    exporter.export(events)
    exporter.close()
    client.head_bucket(Bucket=bucket)  # still usable: the caller owns it
    assert_each_event_once(s3_server, bucket, events, "csv")


def test_session_builds_the_client(s3_server: MotoServer, bucket: str) -> None:
    session = boto3.Session(region_name="eu-west-3")
    settings = S3Settings(bucket=bucket, endpoint_url=s3_server.endpoint)
    exporter = S3Exporter(settings, session=session)
    assert exporter.client.meta.region_name == "eu-west-3"  # from the session
    elsewhere = S3Exporter(bucket=bucket, region="ap-south-1", session=session)
    assert elsewhere.client.meta.region_name == "ap-south-1"
    elsewhere.close()
    exporter.export(sample_events(5))
    exporter.close()
    assert len(objects(s3_server, bucket)) == 1


def test_force_path_style_for_self_hosted_stores(s3_server: MotoServer, bucket: str) -> None:
    endpoint = f"http://localhost:{s3_server.port}"  # a host name, as MinIO behind DNS
    urls: list[str] = []

    def record(request: Any, **_: Any) -> None:
        urls.append(request.url)

    exporter = S3Exporter(bucket=bucket, endpointUrl=endpoint, forcePathStyle=True)
    exporter.client.meta.events.register("before-send.s3.PutObject", record)
    exporter.export(sample_events(5))
    assert urls[0].startswith(f"{endpoint}/{bucket}/")
    assert len(objects(s3_server, bucket)) == 1
    exporter.close()
    # Without it boto3 addresses the bucket as a host name (virtual-hosted style).
    virtual = S3Exporter(bucket=bucket, endpointUrl=endpoint)
    assert virtual.client.meta.config.s3 is None
    assert exporter.client.meta.config.s3 == {"addressing_style": "path"}
    virtual.close()


def test_api_misuse_is_refused(s3_server: MotoServer) -> None:
    client = s3_server.client()
    with pytest.raises(TypeError, match="either client= or session="):
        S3Exporter(bucket="events", client=client, session=boto3.Session())
    with pytest.raises(TypeError, match="do not also set region, endpointUrl or forcePathStyle"):
        S3Exporter(bucket="events", client=client, endpointUrl=s3_server.endpoint)
    with pytest.raises(ValueError, match="part_size must be at least"):
        S3Exporter(bucket="events", part_size=MIN_PART_SIZE - 1)


def test_settings_are_camel_case_and_checked() -> None:
    settings = S3Settings.model_validate(
        {
            "bucket": "events",
            "path": "/flags/",
            "region": "eu-west-1",
            "endpointUrl": "https://minio.example:9000",
            "storageClass": "GLACIER_IR",
            "serverSideEncryption": "aws:kms",
            "sseKmsKeyId": "arn:aws:kms:eu-west-1:111122223333:key/abc",
            "contentEncoding": "gzip",
            "format": "parquet",
        }
    )
    assert settings.path == "flags"
    assert settings.endpoint_url == "https://minio.example:9000"
    assert default_registry().exporter("s3") is S3Exporter
    with pytest.raises(ValueError, match="without `s3://`"):
        S3Settings(bucket="s3://events")


def test_config_errors_point_at_the_key() -> None:
    from flagsink.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse_config(
            {"exporter": {"kind": "s3", "bucket": "events", "sseKmsKeyId": "alias/x"}},
            source="relay.yaml",
        )
    assert "exporter.sseKmsKeyId" in str(caught.value)
    assert "serverSideEncryption: aws:kms" in str(caught.value)


def _docs_yaml() -> str:
    text = DOCS_PAGE.read_text(encoding="utf-8")
    blocks = re.findall(r"^```yaml\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
    return str(blocks[0])


def test_relay_config_from_the_docs_page_works(
    s3_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    import yaml

    data = yaml.safe_load(_docs_yaml())
    section = data["exporter"]
    assert section["kind"] == "s3"
    section.update(bucket=bucket, endpointUrl=s3_server.endpoint)
    section.pop("sseKmsKeyId", None)
    section.pop("serverSideEncryption", None)
    config = tmp_path / "relay.yaml"
    config.write_text(yaml.safe_dump(data))
    events = sample_events(500, tracking_every=0)  # eventType: feature (the default)
    with from_config(config) as pipeline:
        for event in events:
            pipeline.add_event(event)
    stored = objects(s3_server, bucket)
    assert len(stored) == 1
    (key,) = stored
    assert key.startswith(section["path"].split("{{")[0].strip("/"))
    assert key.endswith(".parquet")
    assert_each_event_once(s3_server, bucket, events, "parquet")
