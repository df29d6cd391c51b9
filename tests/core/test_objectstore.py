"""The object-store exporter base: naming, create-only uploads, gzip, spooling."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, BinaryIO

import pytest
from pydantic import ValidationError

from flagsink.exporter import PartialExportError
from flagsink.exporters import objectstore
from flagsink.exporters.objectstore import (
    ObjectExistsError,
    ObjectStoreExporter,
    ObjectStoreSettings,
)
from flagsink.testing import sample_events
from flagsink.testing.contract import ExporterContract


class Bucket:
    """A create-only store in memory, with an on/off switch for outages."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, str, str | None]] = {}
        self.down = False
        self.lock = threading.Lock()

    def put(self, key: str, data: bytes, content_type: str, encoding: str | None) -> None:
        with self.lock:
            if self.down:
                raise ConnectionError("bucket unreachable")
            if key in self.objects:
                raise ObjectExistsError(key)
            self.objects[key] = (data, content_type, encoding)


class MemoryObjectExporter(ObjectStoreExporter[ObjectStoreSettings]):
    kind = "memory-objects"
    settings_model = ObjectStoreSettings

    def __init__(self, bucket: Bucket, **options: Any) -> None:
        super().__init__(**options)
        self.bucket = bucket
        self.sizes: list[int] = []

    def put_object(
        self,
        key: str,
        body: BinaryIO,
        size: int,
        *,
        content_type: str,
        content_encoding: str | None,
    ) -> None:
        data = body.read()
        assert len(data) == size
        self.sizes.append(size)
        self.bucket.put(key, data, content_type, content_encoding)


def records(bucket: Bucket) -> list[Any]:
    out = []
    for data, _, encoding in bucket.objects.values():
        text = gzip.decompress(data) if encoding == "gzip" else data
        out.extend(json.loads(line) for line in text.splitlines())
    return out


class TestObjectStoreContract(ExporterContract):
    @pytest.fixture
    def bucket(self) -> Bucket:
        return Bucket()

    @pytest.fixture
    def new_exporter(self, bucket: Bucket) -> Callable[..., MemoryObjectExporter]:
        return lambda **options: MemoryObjectExporter(bucket, **options)

    @pytest.fixture
    def read_back(self, bucket: Bucket) -> Callable[[], list[Any]]:
        return lambda: records(bucket)

    @pytest.fixture
    def sink_outage(self, bucket: Bucket) -> Callable[[], AbstractContextManager[None]]:
        @contextmanager
        def outage() -> Iterator[None]:
            bucket.down = True
            try:
                yield
            finally:
                bucket.down = False

        return outage

    @pytest.fixture
    def invalid_settings(self) -> list[dict[str, Any]]:
        return [
            {"path": "a/../b"},
            {"path": "{{ .Nope }}"},
            {"contentEncoding": "br"},
            {"format": "xml"},
        ]


def test_names_taken_by_another_writer_are_skipped() -> None:
    bucket = Bucket()
    first = MemoryObjectExporter(bucket, path="/events/", filename="batch.{{ .Format}}")
    second = MemoryObjectExporter(bucket, path="events", filename="batch.{{ .Format}}")
    for exporter in (first, second, first, second):
        exporter.export(sample_events(3))
    assert sorted(bucket.objects) == [
        "events/batch-1.json",
        "events/batch-2.json",
        "events/batch-3.json",
        "events/batch.json",
    ]
    assert len(records(bucket)) == 12


def test_partitioned_path_from_flush_time() -> None:
    bucket = Bucket()
    exporter = MemoryObjectExporter(
        bucket, path="dt={{ .Year}}-{{ .Month}}-{{ .Day}}/hour={{ .Hour}}"
    )
    exporter.export(sample_events(2))
    (key,) = bucket.objects
    assert key.startswith("dt=20")
    assert "/hour=" in key
    assert key.endswith(".json")
    assert not key.startswith("/")


def test_gzip_content_encoding_and_suffix() -> None:
    bucket = Bucket()
    exporter = MemoryObjectExporter(bucket, content_encoding="gzip", format="csv")
    exporter.export(sample_events(100, tracking_every=0))
    ((key, (data, content_type, encoding)),) = bucket.objects.items()
    assert key.endswith(".csv.gz")
    assert (content_type, encoding) == ("text/csv", "gzip")
    assert gzip.decompress(data).count(b"\n") == 100


def test_unencodable_events_rejected_rest_uploaded() -> None:
    bucket = Bucket()
    exporter = MemoryObjectExporter(bucket)
    good = sample_events(5, tracking_every=0)
    bad = good[0].__class__("user", "x", 1, "f", "v", object(), False, "", "S")
    with pytest.raises(PartialExportError) as caught:
        exporter.export([*good, bad])
    assert caught.value.rejected == [bad]
    assert len(records(bucket)) == 5


def test_only_unencodable_events_upload_nothing() -> None:
    bucket = Bucket()
    exporter = MemoryObjectExporter(bucket)
    bad = sample_events(1, tracking_every=0)[0].__class__(
        "user", "x", 1, "f", "v", object(), False, "", "S"
    )
    with pytest.raises(PartialExportError):
        exporter.export([bad])
    assert bucket.objects == {}


def test_large_batches_spill_to_disk_not_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objectstore, "SPOOL_BYTES", 1024)
    bucket = Bucket()
    exporter = MemoryObjectExporter(bucket)
    exporter.export(sample_events(500))
    assert exporter.sizes[0] > 1024
    assert len(records(bucket)) == 500


def test_settings_reject_bad_path() -> None:
    with pytest.raises(ValidationError):
        ObjectStoreSettings.model_validate({"path": "/../x"})
