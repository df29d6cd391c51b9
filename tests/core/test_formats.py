"""Output formats: JSON lines, CSV and Parquet."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest

from flagsink.event import Event, FeatureEvent, TrackingEvent, new_feature_event
from flagsink.formats import FormatOptions
from flagsink.formats.csv import DEFAULT_CSV_TEMPLATE, CsvFormat
from flagsink.formats.fields import formatted_date, go_text
from flagsink.formats.jsonlines import JsonLinesFormat
from flagsink.formats.parquet import CODECS, ParquetFormat
from flagsink.template import TemplateError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TS = 1_700_000_000
TS_RFC3339 = "2023-11-14T22:13:20Z"


def _feature(key: str = "flag", value: Any = True, **overrides: Any) -> FeatureEvent:
    values: dict[str, Any] = {
        "context_kind": "user",
        "user_key": "u1",
        "creation_date": TS,
        "key": key,
        "variation": "on",
        "value": value,
        "default": False,
        "version": "",
        "source": "SERVER",
    }
    values.update(overrides)
    return FeatureEvent(**values)


def _tracking(key: str = "checkout") -> TrackingEvent:
    return TrackingEvent("anonymousUser", "u2", TS + 1, key, {"plan": "pro"}, {"total": 9.5})


EVENTS: list[Event] = [
    _feature(),
    _feature("f2", value={"color": "blue", "n": [1, 2]}, metadata={"env": "prod", "n": 3}),
    _feature("f3", value=None, default=True, variation="SdkDefault", version="4"),
    _feature("f4", value='héllo; "quoted"\nline', context_kind="anonymousUser"),
    _tracking(),
]


def _write(fmt: Any, events: Sequence[Event]) -> tuple[bytes, list[Event]]:
    out = io.BytesIO()
    rejected = fmt.write(events, out)
    return out.getvalue(), rejected


# --- JSON lines -------------------------------------------------------------------------


def test_json_lines_parse_back_with_stdlib() -> None:
    data, rejected = _write(JsonLinesFormat(), EVENTS)
    assert rejected == []
    lines = data.decode().splitlines()
    assert data.endswith(b"\n")
    assert len(lines) == len(EVENTS)
    assert [json.loads(line) for line in lines] == [msgspec.to_builtins(e) for e in EVENTS]
    assert json.loads(lines[0]) == {
        "kind": "feature",
        "contextKind": "user",
        "userKey": "u1",
        "creationDate": TS,
        "key": "flag",
        "variation": "on",
        "value": True,
        "default": False,
        "version": "",
        "source": "SERVER",
    }
    assert json.loads(lines[-1])["kind"] == "tracking"


def test_json_lines_is_go_feature_flags_encoding() -> None:
    data, _ = _write(JsonLinesFormat(), EVENTS)
    assert data.splitlines() == [msgspec.json.encode(e) for e in EVENTS]


def test_json_lines_large_batch_spans_chunks() -> None:
    events = [_feature(f"f{i}", value=i) for i in range(20_000)]
    events[12_345] = _feature("bad", value=object())
    data, rejected = _write(JsonLinesFormat(), events)
    assert [e.key for e in rejected] == ["bad"]
    lines = data.splitlines()
    assert len(lines) == 19_999
    assert [json.loads(line)["key"] for line in lines] == [e.key for e in events if e.key != "bad"]


def test_json_lines_empty_batch_writes_nothing() -> None:
    assert _write(JsonLinesFormat(), []) == (b"", [])


def test_format_metadata() -> None:
    assert (JsonLinesFormat.name, JsonLinesFormat.extension) == ("json", "json")
    assert (CsvFormat.name, CsvFormat.extension) == ("csv", "csv")
    assert (ParquetFormat.name, ParquetFormat.extension) == ("parquet", "parquet")


# --- CSV ----------------------------------------------------------------------------------


def test_csv_default_template_is_go_feature_flags_line() -> None:
    event = new_feature_event("u1", "my-flag", "blue", "var-blue", creation_date=TS)
    data, rejected = _write(CsvFormat(), [event])
    assert rejected == []
    assert data == f"feature;user;u1;{TS};my-flag;var-blue;blue;false;SERVER\n".encode()
    assert DEFAULT_CSV_TEMPLATE == (
        "{{ .Kind}};{{ .ContextKind}};{{ .UserKey}};{{ .CreationDate}};{{ .Key}};"
        "{{ .Variation}};{{ .Value}};{{ .Default}};{{ .Source}}\n"
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (True, "true"),
        (False, "false"),
        (None, ""),
        (42, "42"),
        (-7, "-7"),
        (1.5, "1.5"),
        ("on", "on"),
        ({"a": 1, "b": [True, None]}, '{"a":1,"b":[true,null]}'),
        ([1, "x"], '[1,"x"]'),
    ],
)
def test_csv_value_rendering(value: Any, text: str) -> None:
    assert go_text(value) == text
    data, _ = _write(
        CsvFormat(FormatOptions(csv_template="{{ .Value}}|\n")), [_feature(value=value)]
    )
    assert data.decode() == f"{text}|\n"


def test_csv_all_feature_fields() -> None:
    template = (
        "{{ .Kind}}|{{ .ContextKind}}|{{ .UserKey}}|{{ .CreationDate}}|{{ .FormattedDate}}|"
        "{{ .Key}}|{{ .Variation}}|{{ .Value}}|{{ .Default}}|{{ .Version}}|{{ .Source}}|"
        "{{ .Metadata}}\n"
    )
    event = _feature(default=True, version="3", metadata={"env": "prod"}, source="INPROCESS")
    data, _ = _write(CsvFormat(FormatOptions(csv_template=template)), [event])
    assert data.decode() == (
        f'feature|user|u1|{TS}|{TS_RFC3339}|flag|on|true|true|3|INPROCESS|{{"env":"prod"}}\n'
    )


def test_csv_custom_template_with_formatted_date() -> None:
    fmt = CsvFormat(FormatOptions(csv_template="{{ .FormattedDate}},{{ .Key}},{{ .Value}}\n"))
    events = [_feature(), _feature("f2", value=3, creation_date=0)]
    data, _ = _write(fmt, events)
    assert data.decode() == f"{TS_RFC3339},flag,true\n1970-01-01T00:00:00Z,f2,3\n"
    assert formatted_date(TS) == TS_RFC3339


def test_csv_tracking_event_default_template_missing_fields_empty() -> None:
    data, rejected = _write(CsvFormat(), [_tracking()])
    assert rejected == []
    assert data.decode() == f"tracking;anonymousUser;u2;{TS + 1};checkout;;;;\n"


def test_csv_tracking_fields() -> None:
    template = "{{ .Kind}}|{{ .EvaluationContext}}|{{ .TrackingEventDetails}}|{{ .Value}}\n"
    data, _ = _write(CsvFormat(FormatOptions(csv_template=template)), [_tracking(), _feature()])
    assert data.decode() == 'tracking|{"plan":"pro"}|{"total":9.5}|\nfeature|||true\n'


def test_csv_invalid_template_rejected_at_construction() -> None:
    with pytest.raises(TemplateError, match=r"^csvTemplate: unknown field \.Valu "):
        CsvFormat(FormatOptions(csv_template="{{ .Valu }}\n"))
    with pytest.raises(TemplateError, match=r"^csvTemplate: unsupported"):
        CsvFormat(FormatOptions(csv_template="{{ if .Value }}x{{ end }}\n"))


def test_csv_large_batch_with_a_bad_event() -> None:
    events = [_feature(f"f{i}", value=i) for i in range(10_000)]
    events[9_000] = _feature("bad", value={"x": object()})
    data, rejected = _write(CsvFormat(), events)
    assert [e.key for e in rejected] == ["bad"]
    lines = data.decode().splitlines()
    assert len(lines) == 9_999
    assert lines[0] == f"feature;user;u1;{TS};f0;on;0;false;SERVER"


# --- Parquet --------------------------------------------------------------------------------


def _read(data: bytes) -> Any:
    return pq.read_table(io.BytesIO(data))


@pytest.mark.parametrize("codec", ["SNAPPY", "GZIP", "ZSTD", "BROTLI", "LZ4", "UNCOMPRESSED"])
def test_parquet_round_trip_every_codec(codec: str) -> None:
    fmt = ParquetFormat(FormatOptions(parquet_compression_codec=codec))
    features = [e for e in EVENTS if isinstance(e, FeatureEvent)]
    data, rejected = _write(fmt, features)
    assert rejected == []
    column = pq.ParquetFile(io.BytesIO(data)).metadata.row_group(0).column(0)
    assert column.compression == codec
    table = _read(data)
    assert table.column_names == [
        "kind",
        "contextKind",
        "userKey",
        "creationDate",
        "key",
        "variation",
        "value",
        "default",
        "version",
        "source",
        "metadata",
    ]
    rows = table.to_pylist()
    assert len(rows) == len(features)
    for row, event in zip(rows, features, strict=True):
        assert row["kind"] == "feature"
        assert row["contextKind"] == event.context_kind
        assert row["userKey"] == event.user_key
        assert row["creationDate"] == event.creation_date
        assert row["key"] == event.key
        assert row["variation"] == event.variation
        assert isinstance(row["value"], str)
        assert json.loads(row["value"]) == event.value
        assert row["default"] is event.default
        assert row["version"] == event.version
        assert row["source"] == event.source
    assert rows[1]["metadata"] == [("env", "prod"), ("n", "3")]
    assert rows[0]["metadata"] is None


def test_parquet_codec_lowercase_accepted() -> None:
    fmt = ParquetFormat(FormatOptions(parquet_compression_codec="gzip"))
    data, _ = _write(fmt, [_feature()])
    assert pq.ParquetFile(io.BytesIO(data)).metadata.row_group(0).column(0).compression == "GZIP"


def test_parquet_schema_types() -> None:
    data, _ = _write(ParquetFormat(), [_feature(metadata={"a": "b"})])
    schema = _read(data).schema
    assert schema.field("value").type == pa.string()
    assert schema.field("creationDate").type == pa.int64()
    assert schema.field("default").type == pa.bool_()
    assert schema.field("metadata").type == pa.map_(pa.string(), pa.string())


def test_parquet_tracking_only_batch() -> None:
    data, rejected = _write(ParquetFormat(), [_tracking(), _tracking("signup")])
    assert rejected == []
    table = _read(data)
    assert table.column_names == [
        "kind",
        "contextKind",
        "userKey",
        "creationDate",
        "key",
        "evaluationContext",
        "trackingEventDetails",
    ]
    row = table.to_pylist()[0]
    assert row["kind"] == "tracking"
    assert row["key"] == "checkout"
    assert json.loads(row["evaluationContext"]) == {"plan": "pro"}
    assert json.loads(row["trackingEventDetails"]) == {"total": 9.5}


def test_parquet_mixed_batch_has_union_of_columns() -> None:
    data, rejected = _write(ParquetFormat(), EVENTS)
    assert rejected == []
    table = _read(data)
    assert table.column_names == [
        "kind",
        "contextKind",
        "userKey",
        "creationDate",
        "key",
        "variation",
        "value",
        "default",
        "version",
        "source",
        "metadata",
        "evaluationContext",
        "trackingEventDetails",
    ]
    rows = table.to_pylist()
    assert [r["kind"] for r in rows] == ["feature"] * 4 + ["tracking"]
    assert rows[0]["evaluationContext"] is None
    assert rows[0]["trackingEventDetails"] is None
    assert rows[-1]["variation"] is None
    assert rows[-1]["value"] is None
    assert rows[-1]["metadata"] is None
    assert json.loads(rows[-1]["trackingEventDetails"]) == {"total": 9.5}


@pytest.mark.parametrize("creation_date", [2**63, -(2**63) - 1, 10**27])
def test_parquet_rejects_creation_date_beyond_int64(creation_date: int) -> None:
    # e.g. a collector event with "creationDate": 1e30: only that event is rejected.
    bad = _feature("bad", creation_date=creation_date)
    data, rejected = _write(ParquetFormat(), [_feature("a"), bad, _tracking("t")])
    assert rejected == [bad]
    assert _read(data).column("key").to_pylist() == ["a", "t"]
    edge = _feature("edge", creation_date=2**63 - 1)
    data, rejected = _write(ParquetFormat(), [edge])
    assert rejected == []
    assert _read(data).column("creationDate").to_pylist() == [2**63 - 1]


@pytest.mark.parametrize("codec", ["LZO", "lzo", "DEFLATE", "none", ""])
def test_parquet_unknown_codec_rejected(codec: str) -> None:
    with pytest.raises(ValueError, match=r"^parquetCompressionCodec: .* is not supported") as info:
        ParquetFormat(FormatOptions(parquet_compression_codec=codec))
    assert repr(codec) in str(info.value)
    assert "SNAPPY" in str(info.value)
    assert "LZO" not in CODECS


# --- rejected events (every format) -------------------------------------------------------


@pytest.mark.parametrize(
    "fmt", [JsonLinesFormat(), CsvFormat(), ParquetFormat()], ids=lambda f: f.name
)
@pytest.mark.parametrize("bad_value", [object(), {"nested": object()}, [1, 1j]])
def test_unencodable_value_is_rejected_others_written(fmt: Any, bad_value: Any) -> None:
    good: list[Event] = [_feature("a", value=1), _feature("c", value="x"), _tracking("t")]
    bad = _feature("b", value=bad_value)
    events: list[Event] = [good[0], bad, good[1], good[2]]
    data, rejected = _write(fmt, events)
    assert rejected == [bad]
    if isinstance(fmt, ParquetFormat):
        keys = _read(data).column("key").to_pylist()
    elif isinstance(fmt, JsonLinesFormat):
        keys = [json.loads(line)["key"] for line in data.splitlines()]
    else:
        keys = [line.split(";")[4] for line in data.decode().splitlines()]
    assert keys == ["a", "c", "t"]


@pytest.mark.parametrize(
    "fmt", [JsonLinesFormat(), CsvFormat(), ParquetFormat()], ids=lambda f: f.name
)
def test_all_events_rejected(fmt: Any) -> None:
    events = [_feature("a", value=object()), _feature("b", value=object())]
    _, rejected = _write(fmt, events)
    assert rejected == events
