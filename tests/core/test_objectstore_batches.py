"""ObjectStoreExporter.export_batch on an in-memory create-only store: the paths a real
server cannot be made to take on demand (an object that vanishes between the refused
write and the metadata read), the fallback of stores that cannot read metadata, the
candidate names and the metadata token. The services themselves are covered in
tests/plugins/{s3,gcs,azureblob}/test_*_idempotent.py."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, BinaryIO

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flagsink.exporter import Batch, ExportError
from flagsink.exporters.objectstore import (
    ObjectExistsError,
    ObjectMissingError,
    ObjectStoreExporter,
    ObjectStoreSettings,
    batch_token,
)
from flagsink.naming import DEFAULT_FILENAME, ObjectNamer, hostname
from flagsink.testing import sample_events

CREATED = 1_800_000_000.75


class Store:
    """Create-only objects with metadata, in memory."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, dict[str, str]]] = {}
        self.lock = threading.Lock()

    def put(self, key: str, data: bytes, metadata: Mapping[str, str] | None) -> None:
        with self.lock:
            if key in self.objects:
                raise ObjectExistsError(key)
            self.objects[key] = (data, dict(metadata or {}))


class PlainExporter(ObjectStoreExporter[ObjectStoreSettings]):
    """A store written before export_batch existed: no metadata, no read_batch_id."""

    kind = "plain-objects"
    settings_model = ObjectStoreSettings

    def __init__(self, store: Store, **options: Any) -> None:
        super().__init__(**options)
        self.store = store

    def put_object(
        self,
        key: str,
        body: BinaryIO,
        size: int,
        *,
        content_type: str,
        content_encoding: str | None,
    ) -> None:
        self.store.put(key, body.read(), None)


class BatchExporter(ObjectStoreExporter[ObjectStoreSettings]):
    kind = "batch-objects"
    settings_model = ObjectStoreSettings

    def __init__(self, store: Store, **options: Any) -> None:
        super().__init__(**options)
        self.store = store
        self.vanish = 0  # how many metadata reads find no object

    def put_object(
        self,
        key: str,
        body: BinaryIO,
        size: int,
        *,
        content_type: str,
        content_encoding: str | None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.store.put(key, body.read(), metadata)

    def read_batch_id(self, key: str) -> str | None:
        if self.vanish:
            self.vanish -= 1
            raise ObjectMissingError(key)
        return self.store.objects[key][1].get(self.batch_metadata_key)


def test_candidates_start_at_the_default_name_and_repeat() -> None:
    namer = ObjectNamer(DEFAULT_FILENAME, "json")
    names = namer.candidates(CREATED)
    first = [next(names) for _ in range(3)]
    base = f"flag-variation-{hostname()}-1800000000"
    assert first == [f"{base}.json", f"{base}-1.json", f"{base}-2.json"]
    again = namer.candidates(CREATED)
    assert [next(again) for _ in range(3)] == first  # nothing remembered between batches


@given(st.text(min_size=1, max_size=400), st.text(min_size=1, max_size=40))
def test_token_is_ascii_short_and_one_to_one(origin: str, label: str) -> None:
    batch = Batch(origin=origin, exporter=label, first=7, created=CREATED)
    token = batch_token(batch)
    assert token.isascii()
    assert token.isprintable()
    assert len(token) <= 256 or token.startswith("sha256:")
    assert len(token) <= 256 + len("sha256:")
    other = Batch(origin=origin, exporter=label, first=8, created=CREATED)
    assert batch_token(other) != token


def test_store_without_read_batch_id_keeps_export() -> None:
    store = Store()
    exporter = PlainExporter(store)
    assert exporter.idempotent is False
    batch = Batch("o", "plain", 1, CREATED)
    exporter.export_batch(sample_events(3), batch)
    exporter.export_batch(sample_events(3), batch)
    assert len(store.objects) == 2  # as before: no metadata, no way to recognise a batch


def test_object_vanished_after_the_refusal_is_written_again() -> None:
    store = Store()
    exporter = BatchExporter(store, filename="b.{{ .Format}}")
    store.objects["b.json"] = (b"", {})
    exporter.vanish = 1  # deleted between the refused write and the metadata read

    original = exporter.read_batch_id

    def read_then_delete(key: str) -> str | None:
        try:
            return original(key)
        finally:
            store.objects.pop("b.json", None)

    exporter.read_batch_id = read_then_delete  # type: ignore[method-assign]
    batch = Batch("o", "batch", 1, CREATED)
    exporter.export_batch(sample_events(3), batch)
    assert exporter.last_key == "b.json"  # the same name again, now free
    assert store.objects["b.json"][1] == {"flagsink-batch": "o/batch/1"}


def test_object_that_keeps_vanishing_retries_the_batch() -> None:
    store = Store()
    exporter = BatchExporter(store, filename="b.{{ .Format}}")
    store.objects["b.json"] = (b"", {})
    exporter.vanish = 100  # e.g. another writer's upload to the name never completes
    with pytest.raises(ExportError, match=r"'b\.json' is reported taken but has no object"):
        exporter.export_batch(sample_events(3), Batch("o", "batch", 1, CREATED))
    assert list(store.objects) == ["b.json"]


def test_no_free_name_is_an_export_error_naming_the_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flagsink.exporters import objectstore

    monkeypatch.setattr(objectstore, "_MAX_NAME_ATTEMPTS", 5)
    store = Store()
    exporter = BatchExporter(store, filename="b.{{ .Format}}")
    for n in range(5):
        exporter.export_batch(sample_events(1), Batch("o", "batch", n, CREATED))
    with pytest.raises(ExportError, match="`filename` or `path`"):
        exporter.export_batch(sample_events(1), Batch("o", "batch", 99, CREATED))
    assert len(store.objects) == 5
