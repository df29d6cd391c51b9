"""Parquet through pyarrow (install ``flagsink[parquet]``).

Columns carry GO Feature Flag's names. ``value`` is stored as JSON text and ``metadata`` as
a map of strings (non-string values as JSON), as GO Feature Flag does; tracking events
store ``evaluationContext`` and ``trackingEventDetails`` as JSON text. A batch of one event
type gets that type's columns; a mixed batch gets the union, with nulls where a type has
no such field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

import msgspec

from flagsink.event import Event, FeatureEvent, TrackingEvent
from flagsink.formats.base import Format, FormatOptions
from flagsink.hookspecs import hookimpl

__all__ = ["CODECS", "ParquetFormat"]

# GO Feature Flag's codec names -> pyarrow's. LZO is GO Feature Flag's too, but pyarrow
# cannot write it.
CODECS = {
    "SNAPPY": "snappy",
    "GZIP": "gzip",
    "ZSTD": "zstd",
    "BROTLI": "brotli",
    "LZ4": "lz4",
    "UNCOMPRESSED": "none",
}
# Rows per row group: bounds the encoder's memory (about 11 MB of Python objects) whatever
# the batch size, and is faster than larger groups on this workload.
ROW_GROUP = 16_384
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_UNENCODABLE = (TypeError, ValueError, OverflowError, msgspec.EncodeError)


def _pyarrow() -> Any:
    try:
        import pyarrow  # noqa: PLC0415
        import pyarrow.parquet  # noqa: PLC0415
    except ImportError:
        raise ValueError("format parquet needs pyarrow: pip install 'flagsink[parquet]'") from None
    return pyarrow


class ParquetFormat(Format):
    """Columnar Parquet, compressed with ``parquetCompressionCodec`` (default SNAPPY)."""

    name = "parquet"
    extension = "parquet"
    content_type = "application/vnd.apache.parquet"

    def __init__(self, options: FormatOptions | None = None) -> None:
        super().__init__(options)
        codec = self.options.parquet_compression_codec.upper()
        if codec not in CODECS:
            raise ValueError(
                f"parquetCompressionCodec: {self.options.parquet_compression_codec!r} is not "
                f"supported; choose one of {', '.join(CODECS)}"
            )
        self.compression = CODECS[codec]
        self.pa = _pyarrow()

    def write(self, events: Sequence[Event], out: BinaryIO) -> list[Event]:
        pa = self.pa
        good, rejected = _encodable(events)
        features = [e for e in good if type(e) is FeatureEvent]
        has_tracking = len(features) != len(good)
        schema = _schema(pa, bool(features), has_tracking)
        with pa.parquet.ParquetWriter(out, schema, compression=self.compression) as writer:
            for start in range(0, len(good), ROW_GROUP):
                columns = _columns(good[start : start + ROW_GROUP], schema)
                writer.write_table(pa.Table.from_pydict(columns, schema=schema))
        return rejected


_encoder = msgspec.json.Encoder()
_encode = _encoder.encode
_encode_lines = _encoder.encode_lines


def _json_text(value: Any) -> str:
    return _encode(value).decode()


def _metadata_map(metadata: dict[str, Any] | None) -> list[tuple[str, str]] | None:
    if not metadata:
        return None
    return [(k, v if isinstance(v, str) else _json_text(v)) for k, v in metadata.items()]


def _encodable(events: Sequence[Event]) -> tuple[list[Event], list[Event]]:
    # Fast path: a batch of feature events whose values all encode (the usual case) is
    # checked with one encode call instead of one per event.
    if all(type(e) is FeatureEvent for e in events):
        dates = [e.creation_date for e in events]
        try:
            if dates and (min(dates) < _INT64_MIN or max(dates) > _INT64_MAX):
                raise OverflowError("creationDate does not fit Parquet's int64 column")
            _encode_lines([e.value for e in events])  # type: ignore[union-attr]
            for event in events:
                if event.metadata:  # type: ignore[union-attr]
                    _metadata_map(event.metadata)  # type: ignore[union-attr]
        except _UNENCODABLE:
            pass
        else:
            return list(events), []
    good: list[Event] = []
    rejected: list[Event] = []
    for event in events:
        try:
            if not _INT64_MIN <= event.creation_date <= _INT64_MAX:
                raise OverflowError("creationDate does not fit Parquet's int64 column")
            if type(event) is FeatureEvent:
                _encode(event.value)
                _metadata_map(event.metadata)
            else:
                _encode(event)
        except _UNENCODABLE:
            rejected.append(event)
        else:
            good.append(event)
    return good, rejected


def _value_texts(values: list[Any]) -> list[str]:
    """JSON text of each value (all known to encode), from one encode call: JSON never
    contains a raw newline, so the lines are the values."""
    if not values:
        return []
    return _encode_lines(values).decode().split("\n")[:-1]


def _schema(pa: Any, features: bool, tracking: bool) -> Any:
    fields = [
        pa.field("kind", pa.string(), nullable=False),
        pa.field("contextKind", pa.string()),
        pa.field("userKey", pa.string()),
        pa.field("creationDate", pa.int64()),
        pa.field("key", pa.string()),
    ]
    if features or not tracking:
        fields += [
            pa.field("variation", pa.string()),
            pa.field("value", pa.string()),
            pa.field("default", pa.bool_()),
            pa.field("version", pa.string()),
            pa.field("source", pa.string()),
            pa.field("metadata", pa.map_(pa.string(), pa.string())),
        ]
    if tracking:
        fields += [
            pa.field("evaluationContext", pa.string()),
            pa.field("trackingEventDetails", pa.string()),
        ]
    return pa.schema(fields)


def _columns(events: Sequence[Event], schema: Any) -> dict[str, list[Any]]:
    names = set(schema.names)
    if "evaluationContext" not in names:
        # Only feature events (the schema is built from the batch): plain comprehensions.
        return _feature_columns(events)  # type: ignore[arg-type]

    def feature(get: Callable[[FeatureEvent], Any]) -> list[Any]:
        return [get(e) if type(e) is FeatureEvent else None for e in events]

    def tracking(get: Callable[[TrackingEvent], Any]) -> list[Any]:
        return [get(e) if type(e) is TrackingEvent else None for e in events]

    columns: dict[str, list[Any]] = {
        "kind": [e.kind for e in events],
        "contextKind": [e.context_kind for e in events],
        "userKey": [e.user_key for e in events],
        "creationDate": [e.creation_date for e in events],
        "key": [e.key for e in events],
    }
    if "variation" in names:
        columns["variation"] = feature(lambda e: e.variation)
        columns["value"] = feature(lambda e: _json_text(e.value))
        columns["default"] = feature(lambda e: e.default)
        columns["version"] = feature(lambda e: e.version)
        columns["source"] = feature(lambda e: e.source)
        columns["metadata"] = feature(lambda e: _metadata_map(e.metadata))
    columns["evaluationContext"] = tracking(lambda e: _json_text(e.evaluation_context))
    columns["trackingEventDetails"] = tracking(lambda e: _json_text(e.tracking_event_details))
    return columns


def _feature_columns(events: Sequence[FeatureEvent]) -> dict[str, list[Any]]:
    return {
        "kind": [FeatureEvent.kind] * len(events),
        "contextKind": [e.context_kind for e in events],
        "userKey": [e.user_key for e in events],
        "creationDate": [e.creation_date for e in events],
        "key": [e.key for e in events],
        "variation": [e.variation for e in events],
        "value": _value_texts([e.value for e in events]),
        "default": [e.default for e in events],
        "version": [e.version for e in events],
        "source": [e.source for e in events],
        "metadata": [_metadata_map(e.metadata) if e.metadata else None for e in events],
    }


@hookimpl
def flagsink_register_formats(register: Callable[[type[Format]], None]) -> None:
    register(ParquetFormat)
