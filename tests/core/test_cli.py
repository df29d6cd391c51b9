"""The `flagsink` command, in-process with click's runner and as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner

from flagsink import core_version
from flagsink.cli import main
from flagsink.exporters.file import FileExporter
from flagsink.testing import sample_events


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "flagsink.yaml"
    path.write_text(
        f"""
retriever: {{kind: file, path: flags.yaml}}
exporters:
  - kind: file
    outputDir: {tmp_path / "out"}
    maxEventInMemory: 500
  - kind: file
    eventType: tracking
    outputDir: {tmp_path / "tracking"}
"""
    )
    return path


def read_dir(directory: Path) -> list[dict[str, object]]:
    """Every record in the directory's files, in user-key order (files may be split)."""
    records = [
        json.loads(line)
        for path in directory.glob("*.json")
        for line in path.read_text().splitlines()
    ]
    return sorted(records, key=lambda record: str(record["userKey"]))


def as_json(events: list[object]) -> list[object]:
    records = [msgspec.json.decode(msgspec.json.encode(e)) for e in events]
    return sorted(records, key=lambda record: str(record["userKey"]))


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0
    assert core_version() in result.output


def test_plugins_table_and_json(runner: CliRunner) -> None:
    table = runner.invoke(main, ["plugins"])
    assert table.exit_code == 0
    rows = {line.split()[0]: line.split() for line in table.output.splitlines()[1:]}
    assert rows["file"][1:4] == ["flagsink", core_version(), "bulk"]
    assert rows["log"][3] == "queue"
    listed = json.loads(runner.invoke(main, ["plugins", "--json"]).output)
    by_kind = {row["kind"]: row for row in listed}
    assert by_kind["file"]["mode"] == "bulk"
    assert by_kind["parquet"]["module"] == "flagsink.formats.parquet"


def test_plugins_marks_disabled(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLAGSINK_DISABLE_PLUGINS", "log")
    listed = json.loads(runner.invoke(main, ["plugins", "--json"]).output)
    assert {row["kind"]: row["disabled"] for row in listed}["log"] is True


def test_validate_ok(runner: CliRunner, config: Path) -> None:
    result = runner.invoke(main, ["validate", str(config)])
    assert result.exit_code == 0, result.output
    assert "OK, 2 exporter(s)" in result.output
    assert "exporters[1]: file (bulk, tracking)" in result.output


def test_validate_reports_every_problem_without_traceback(
    runner: CliRunner, tmp_path: Path
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "exporters:\n"
        "  - kind: file\n"
        "    outputDir: /tmp\n"
        "    flushIntervall: 10\n"
        "  - kind: nosuchsink\n"
        "    bucket: b\n"
    )
    result = runner.invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert (
        f"{path}:4: exporters[0].flushIntervall: unknown key (did you mean 'flushInterval'?)"
        in (result.output)
    )
    assert "exporters[1].kind: unknown exporter 'nosuchsink'" in result.output
    assert "pip install flagsink-nosuchsink" in result.output
    assert "Traceback" not in result.output


def test_validate_unusable_directory(runner: CliRunner, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = tmp_path / "c.yaml"
    path.write_text(f"exporter:\n  kind: file\n  outputDir: {blocker / 'sub'}\n")
    result = runner.invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert "exporter.outputDir: cannot create directory" in result.output


def test_validate_missing_file(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "file not found" in result.output


def test_export_routes_events_and_reports_bad_lines(
    runner: CliRunner, config: Path, tmp_path: Path
) -> None:
    events = sample_events(1_200)
    lines = msgspec.json.Encoder().encode_lines(events).splitlines()
    lines.insert(10, b"{not json")
    lines.insert(500, b'{"userKey": "no-flag-key"}')
    lines.insert(700, b"")
    source = tmp_path / "events.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    result = runner.invoke(main, ["export", "--config", str(config), str(source)])
    assert result.exit_code == 1, result.output
    assert f"{source}:11: rejected: JSON is malformed" in result.output
    assert f"{source}:501: rejected: field `key` is required" in result.output
    assert "1200 accepted, 2 rejected" in result.output
    assert "0 lost" in result.output
    features = [e for e in events if e.kind == "feature"]
    tracking = [e for e in events if e.kind == "tracking"]
    assert read_dir(tmp_path / "out") == as_json(features)
    assert read_dir(tmp_path / "tracking") == as_json(tracking)


def test_export_from_stdin_succeeds(runner: CliRunner, config: Path, tmp_path: Path) -> None:
    events = sample_events(50, tracking_every=0)
    data = msgspec.json.Encoder().encode_lines(events)
    result = runner.invoke(main, ["export", "--config", str(config), "-"], input=data)
    assert result.exit_code == 0, result.output
    assert "50 accepted, 0 rejected" in result.output
    assert read_dir(tmp_path / "out") == as_json(events)


def test_export_millisecond_dates_are_normalised(
    runner: CliRunner, config: Path, tmp_path: Path
) -> None:
    line = b'{"kind":"feature","userKey":"u","creationDate":1700000000123,"key":"f"}\n'
    result = runner.invoke(main, ["export", "--config", str(config), "-"], input=line)
    assert result.exit_code == 0, result.output
    assert read_dir(tmp_path / "out")[0]["creationDate"] == 1_700_000_000


def test_export_gives_up_on_a_dead_exporter(
    runner: CliRunner, config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: FileExporter, events: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(FileExporter, "export", broken)
    data = msgspec.json.Encoder().encode_lines(sample_events(3_000, tracking_every=0))
    result = runner.invoke(
        main, ["export", "--config", str(config), "--timeout", "0.5", "-"], input=data
    )
    assert result.exit_code == 1
    assert "kept failing" in result.output
    assert "disk on fire" in result.output
    assert "Traceback" not in result.output


def test_export_progress_bar(runner: CliRunner, config: Path, tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    source.write_bytes(msgspec.json.Encoder().encode_lines(sample_events(10)))
    result = runner.invoke(main, ["export", "--config", str(config), "--progress", str(source)])
    assert result.exit_code == 0, result.output
    assert "exporting" in result.output


def test_real_subprocess_entry_point(config: Path, tmp_path: Path) -> None:
    source = tmp_path / "events.jsonl"
    source.write_bytes(msgspec.json.Encoder().encode_lines(sample_events(100, tracking_every=0)))
    command = [sys.executable, "-m", "flagsink.cli", "export", "--config", str(config), str(source)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "100 accepted" in done.stderr
    assert len(read_dir(tmp_path / "out")) == 100
