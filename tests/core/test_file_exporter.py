"""The ``file`` exporter: atomic, never-overwriting files in ``outputDir``."""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from pydantic import ValidationError

from flagsink.event import Event, FeatureEvent, TrackingEvent
from flagsink.exporter import PartialExportError, SettingsError
from flagsink.exporters.file import FileExporter, FileSettings
from flagsink.naming import hostname

TS = 1_700_000_000


def _feature(key: str = "flag", value: Any = True) -> FeatureEvent:
    return FeatureEvent("user", "u1", TS, key, "on", value, False, "", "SERVER")


EVENTS: list[Event] = [
    _feature("a"),
    _feature("b", {"x": 1}),
    TrackingEvent("user", "u2", TS, "t", {"p": 1}, {}),
]


def _files(directory: Path) -> list[str]:
    return sorted(
        str(path.relative_to(directory)) for path in directory.rglob("*") if path.is_file()
    )


def _keys(path: Path) -> list[str]:
    return [json.loads(line)["key"] for line in path.read_text().splitlines()]


def test_exporter_kind_and_mode() -> None:
    assert FileExporter.kind == "file"
    assert FileExporter.bulk is True
    assert FileExporter.settings_model is FileSettings


def test_writes_one_json_lines_file_per_export(tmp_path: Path) -> None:
    exporter = FileExporter(outputDir=str(tmp_path))
    exporter.export(EVENTS)
    exporter.export(EVENTS[:1])
    files = _files(tmp_path)
    assert len(files) == 2
    prefix = f"flag-variation-{hostname()}-"
    assert all(name.startswith(prefix) and name.endswith(".json") for name in files)
    contents = sorted((_keys(tmp_path / name) for name in files), key=len)
    assert contents == [["a"], ["a", "b", "t"]]
    assert exporter.last_path.parent == tmp_path


def test_output_dir_created(tmp_path: Path) -> None:
    directory = tmp_path / "deep" / "er"
    FileExporter(outputDir=str(directory)).export(EVENTS)
    assert len(_files(directory)) == 1


@pytest.mark.parametrize(
    "options",
    [
        {"output_dir": "D", "csv_template": "{{ .Key}}\n", "format": "csv"},
        {"outputDir": "D", "csvTemplate": "{{ .Key}}\n", "format": "csv"},
        {"outputDir": "D", "csv_template": "{{ .Key}}\n", "format": "csv"},
    ],
)
def test_keyword_options_snake_or_camel(tmp_path: Path, options: dict[str, str]) -> None:
    options = {k: (str(tmp_path) if v == "D" else v) for k, v in options.items()}
    exporter = FileExporter(**options)
    assert exporter.settings.output_dir == str(tmp_path)
    assert exporter.settings.csv_template == "{{ .Key}}\n"
    exporter.export(EVENTS)
    (name,) = _files(tmp_path)
    assert name.endswith(".csv")
    assert (tmp_path / name).read_text() == "a\nb\nt\n"


def test_settings_model_accepted(tmp_path: Path) -> None:
    settings = FileSettings.model_validate({"outputDir": str(tmp_path), "format": "parquet"})
    exporter = FileExporter(settings)
    assert exporter.settings is settings
    with pytest.raises(TypeError):
        FileExporter(settings, outputDir=str(tmp_path))


def test_parquet_files(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    exporter = FileExporter(
        outputDir=str(tmp_path), format="parquet", parquetCompressionCodec="zstd"
    )
    assert exporter.settings.parquet_compression_codec == "ZSTD"
    exporter.export(EVENTS)
    (name,) = _files(tmp_path)
    assert name.endswith(".parquet")
    assert pq.read_table(tmp_path / name).column("key").to_pylist() == ["a", "b", "t"]


def test_partitioned_filename(tmp_path: Path) -> None:
    exporter = FileExporter(
        outputDir=str(tmp_path), filename="{{ .Year}}/{{ .Month}}/events.{{ .Format}}"
    )
    exporter.export(EVENTS)
    (name,) = _files(tmp_path)
    year, month, base = name.split("/")
    assert (len(year), len(month), base) == (4, 2, "events.json")


# --- atomicity ----------------------------------------------------------------------------


def test_file_appears_only_when_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exporter = FileExporter(outputDir=str(tmp_path), filename="out.{{ .Format}}")
    original = exporter.format.write
    seen: list[str] = []

    def write(events: Sequence[Event], out: BinaryIO) -> list[Event]:
        # While content is being written, only a hidden temporary file exists, in the
        # same directory (so the final link is atomic).
        temporary = Path(out.name)
        assert temporary.parent == tmp_path
        assert temporary.name.startswith(".")
        assert temporary.name.endswith(".tmp")
        rejected = original(events[:1], out)
        out.flush()
        seen.extend(os.listdir(tmp_path))
        assert not (tmp_path / "out.json").exists()
        return rejected + original(events[1:], out)

    monkeypatch.setattr(exporter.format, "write", write)
    exporter.export(EVENTS)
    assert len(seen) == 1
    assert seen[0].startswith(".out.json.")
    assert os.listdir(tmp_path) == ["out.json"]
    assert _keys(tmp_path / "out.json") == ["a", "b", "t"]


def test_no_temporary_file_left_when_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = FileExporter(outputDir=str(tmp_path))

    def write(events: Sequence[Event], out: BinaryIO) -> list[Event]:
        out.write(b"partial")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(exporter.format, "write", write)
    with pytest.raises(RuntimeError, match="disk on fire"):
        exporter.export(EVENTS)
    assert os.listdir(tmp_path) == []


def test_no_temporary_files_remain_after_many_exports(tmp_path: Path) -> None:
    exporter = FileExporter(outputDir=str(tmp_path), format="csv")
    for _ in range(20):
        exporter.export(EVENTS)
    names = os.listdir(tmp_path)
    assert len(names) == 20
    assert not [name for name in names if name.startswith(".") or name.endswith(".tmp")]
    assert all((tmp_path / n).read_text().count("\n") == 3 for n in names)


def test_concurrent_exporters_never_clobber(tmp_path: Path) -> None:
    exporters = [
        FileExporter(outputDir=str(tmp_path), filename="same.{{ .Format}}") for _ in range(4)
    ]
    errors: list[BaseException] = []

    def run(exporter: FileExporter, index: int) -> None:
        try:
            for n in range(10):
                exporter.export([_feature(f"{index}-{n}")])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e, i)) for i, e in enumerate(exporters)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    names = os.listdir(tmp_path)
    assert len(names) == 40
    keys = sorted(key for name in names for key in _keys(tmp_path / name))
    assert keys == sorted(f"{i}-{n}" for i in range(4) for n in range(10))


# --- never overwrite ----------------------------------------------------------------------


def test_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "events.json").write_text("keep me\n")
    exporter = FileExporter(outputDir=str(tmp_path), filename="events.{{ .Format}}")
    exporter.export(EVENTS)
    assert (tmp_path / "events.json").read_text() == "keep me\n"
    assert exporter.last_path == tmp_path / "events-1.json"
    assert _keys(tmp_path / "events-1.json") == ["a", "b", "t"]


def test_existing_default_name_is_never_overwritten(tmp_path: Path) -> None:
    exporter = FileExporter(outputDir=str(tmp_path))
    exporter.export(EVENTS[:1])
    first = exporter.last_path
    first_bytes = first.read_bytes()
    # A fresh exporter (e.g. after a restart) in the same second gets the same base name.
    other = FileExporter(outputDir=str(tmp_path))
    other.namer.next_name = lambda now=None: first.name  # type: ignore[method-assign]
    other.export(EVENTS)
    assert first.read_bytes() == first_bytes
    assert other.last_path != first
    assert other.last_path.name == first.name.replace(".json", "-1.json")
    assert _keys(other.last_path) == ["a", "b", "t"]


def test_several_taken_names_skipped(tmp_path: Path) -> None:
    for name in ("e.json", "e-1.json", "e-2.json"):
        (tmp_path / name).write_text(name)
    exporter = FileExporter(outputDir=str(tmp_path), filename="e.{{ .Format}}")
    exporter.export(EVENTS)
    assert exporter.last_path == tmp_path / "e-3.json"
    for name in ("e.json", "e-1.json", "e-2.json"):
        assert (tmp_path / name).read_text() == name


# --- settings errors ----------------------------------------------------------------------


def test_unwritable_output_dir_rejected(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root passes permission checks: use a path that cannot be a directory instead.
        blocker = tmp_path / "a-file"
        blocker.write_text("")
        directory = blocker / "sub"
    else:
        directory = tmp_path / "read-only"
        directory.mkdir()
        directory.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(SettingsError) as info:
            FileExporter(outputDir=str(directory))
    finally:
        if directory.is_dir():
            directory.chmod(0o700)
    assert info.value.field == "outputDir"
    assert str(info.value).startswith("outputDir: ")
    assert str(directory) in str(info.value)


def test_directory_failing_access_check_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The permission branch, whoever runs the tests (root passes real access checks).
    checked: list[tuple[str, int]] = []

    def access(path: Any, mode: int) -> bool:
        checked.append((str(path), mode))
        return False

    monkeypatch.setattr(os, "access", access)
    with pytest.raises(SettingsError, match=r"^outputDir: .* is not writable") as info:
        FileExporter(outputDir=str(tmp_path))
    assert info.value.field == "outputDir"
    assert checked == [(str(tmp_path), os.W_OK | os.X_OK)]


def test_output_dir_under_a_file_rejected(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SettingsError) as info:
        FileExporter(outputDir=str(blocker / "sub"))
    assert info.value.field == "outputDir"
    assert "cannot create directory" in str(info.value)


def test_output_dir_required() -> None:
    with pytest.raises(ValidationError, match="outputDir"):
        FileExporter()


@pytest.mark.parametrize("key", ["bogus", "output_directory", "flushInterval2"])
def test_unknown_keys_rejected(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValidationError) as info:
        FileExporter(outputDir=str(tmp_path), **{key: 1})
    assert key in str(info.value)
    assert "extra" in str(info.value).lower()


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ .Valu }}\n", r"unknown field \.Valu .*did you mean \.Value"),
        ("{{ if .Value }}x{{ end }}\n", "unsupported template action"),
        ("{{ .Value\n", "unclosed"),
    ],
)
def test_invalid_csv_template_rejected_at_construction(
    tmp_path: Path, template: str, message: str
) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        FileExporter(outputDir=str(tmp_path), format="csv", csvTemplate=template)
    assert "csvTemplate" in str(info.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"format": "xml"}, "xml"),
        ({"parquetCompressionCodec": "LZO"}, "LZO"),
        ({"filename": "/abs/{{ .Timestamp}}.json"}, "relative"),
        ({"filename": "../x.json"}, r"'\.\.'"),
        ({"filename": "{{ .Hostnme}}.json"}, r"did you mean \.Hostname"),
    ],
)
def test_invalid_settings_rejected(tmp_path: Path, options: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        FileExporter(outputDir=str(tmp_path), **options)


# --- partial failures ---------------------------------------------------------------------


def test_unencodable_values_reported_as_rejected(tmp_path: Path) -> None:
    exporter = FileExporter(outputDir=str(tmp_path))
    bad = _feature("bad", object())
    with pytest.raises(PartialExportError) as info:
        exporter.export([EVENTS[0], bad, EVENTS[1]])
    assert info.value.rejected == [bad]
    assert info.value.failed == []
    assert "'bad'" in str(info.value)
    (name,) = _files(tmp_path)
    assert _keys(tmp_path / name) == ["a", "b"]


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
def test_all_rejected_writes_no_file(tmp_path: Path, fmt: str) -> None:
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    exporter = FileExporter(outputDir=str(tmp_path), format=fmt)
    bad = [_feature("x", object()), _feature("y", {"z": object()})]
    with pytest.raises(PartialExportError) as info:
        exporter.export(bad)
    assert info.value.rejected == bad
    assert os.listdir(tmp_path) == []


def test_csv_partial_export(tmp_path: Path) -> None:
    exporter = FileExporter(
        outputDir=str(tmp_path), format="csv", csvTemplate="{{ .Key}};{{ .Value}}\n"
    )
    with pytest.raises(PartialExportError) as info:
        exporter.export([EVENTS[0], _feature("bad", object())])
    assert [e.key for e in info.value.rejected] == ["bad"]
    (name,) = _files(tmp_path)
    assert (tmp_path / name).read_text() == "a;true\n"
