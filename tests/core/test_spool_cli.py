"""`flagsink export` into a spool: back-pressure on the commits, nothing refused."""

from __future__ import annotations

from pathlib import Path

import msgspec
from click.testing import CliRunner

from flagsink.cli import main
from flagsink.event import new_feature_event
from flagsink.spool import inspect_spool


def test_export_into_a_spool_waits_for_commits_and_refuses_nothing(tmp_path: Path) -> None:
    config = tmp_path / "flagsink.yaml"
    config.write_text(
        f"""
spool: {{dir: {tmp_path / "spool"}, maxPendingInMemory: 1000, commitInterval: 20}}
exporter: {{kind: file, outputDir: {tmp_path / "out"}, format: json, flushInterval: 600000}}
"""
    )
    events = tmp_path / "events.jsonl"
    count = 30_000
    events.write_bytes(
        msgspec.json.Encoder().encode_lines(
            [new_feature_event(f"u{i}", "flag", i, "v") for i in range(count)]
        )
    )
    result = CliRunner().invoke(main, ["export", "--config", str(config), str(events)])
    assert result.exit_code == 0, result.output
    (stats,) = inspect_spool(tmp_path / "spool")
    assert stats.dropped == 0
    assert stats.accepted == stats.delivered == count
    written = [
        msgspec.json.decode(line)["userKey"]
        for path in (tmp_path / "out").iterdir()
        for line in path.read_bytes().splitlines()
    ]
    assert sorted(written) == sorted(f"u{i}" for i in range(count))
