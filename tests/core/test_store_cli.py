"""`flagsink flags push/list`, `flagsink store init` and `validate` with a store."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from flagsink.cli import main
from flagsink.hookspecs import hookimpl
from flagsink.plugins import Registry
from flagsink.store import FLAGS
from flagsink.testing import MemoryData, MemoryStore

FLAG = {"variations": {"on": True, "off": False}, "defaultRule": {"variation": "on"}}
SHARED = MemoryData()


class SharedMemoryStore(MemoryStore):
    """A `memory` store whose data outlives one CLI call (as a table would)."""

    kind = "memory"

    def __init__(self, settings: object = None, /, **options: object) -> None:
        super().__init__(settings, data=SHARED, **options)  # type: ignore[arg-type]

    def create(self) -> str:
        return "in memory"


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    SHARED.namespaces.clear()
    SHARED.initialized = False
    registry = Registry()

    def register_stores(register: Callable[[type[Any]], None]) -> None:
        register(SharedMemoryStore)

    plugin = SimpleNamespace(flagsink_register_stores=hookimpl(register_stores))
    registry.register_plugin(plugin)
    monkeypatch.setattr("flagsink.plugins._default", registry)
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump({"exporter": {"kind": "log"}, "store": {"kind": "memory"}}))
    return path


def flag_file(tmp_path: Path, flags: dict[str, object]) -> Path:
    path = tmp_path / "flags.yaml"
    path.write_text(yaml.safe_dump(flags))
    return path


def test_push_upserts_and_list_shows(tmp_path: Path, config: Path) -> None:
    runner = CliRunner()
    flags = flag_file(tmp_path, {"a": FLAG, "b": {**FLAG, "trackEvents": False}})
    result = runner.invoke(main, ["flags", "push", str(flags), "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "2 flag(s) written, 0 unchanged" in result.output
    again = runner.invoke(main, ["flags", "push", str(flags), "--config", str(config)])
    assert "0 flag(s) written, 2 unchanged" in again.output
    flags = flag_file(tmp_path, {"a": {**FLAG, "disable": True}})
    result = runner.invoke(main, ["flags", "push", str(flags), "--config", str(config)])
    assert "1 flag(s) written, 0 unchanged" in result.output
    stored = MemoryStore(data=SHARED)
    assert stored.get_item(FLAGS, "a") == {
        "key": "a",
        "version": 2,
        "flag": {**FLAG, "disable": True},
    }
    assert stored.get_item(FLAGS, "b") is not None, "upserts leave other flags alone"

    listed = runner.invoke(main, ["flags", "list", "--config", str(config)])
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[0].split() == ["KEY", "VERSION", "TRACKEVENTS"]
    assert [line.split() for line in lines[1:]] == [["a", "2", "true"], ["b", "1", "false"]]
    as_json = runner.invoke(main, ["flags", "list", "--config", str(config), "--json"])
    assert json.loads(as_json.output)[1] == {"key": "b", "version": 1, "trackEvents": False}


def test_push_replace_removes_absent_flags(tmp_path: Path, config: Path) -> None:
    runner = CliRunner()
    runner.invoke(
        main,
        [
            "flags",
            "push",
            str(flag_file(tmp_path, {"a": FLAG, "b": FLAG})),
            "--config",
            str(config),
        ],
    )
    result = runner.invoke(
        main,
        [
            "flags",
            "push",
            str(flag_file(tmp_path, {"b": FLAG})),
            "--config",
            str(config),
            "--replace",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "1 removed" in result.output
    assert set(MemoryStore(data=SHARED).all_items(FLAGS)) == {"b"}


def test_push_reports_older_versions(tmp_path: Path, config: Path) -> None:
    MemoryStore(data=SHARED).upsert_item(FLAGS, {"key": "a", "version": 9, "flag": FLAG})
    flags = flag_file(tmp_path, {"a": {**FLAG, "version": "3", "disable": True}})
    result = CliRunner().invoke(main, ["flags", "push", str(flags), "--config", str(config)])
    assert result.exit_code == 1
    assert "1 not written (older version)" in result.output
    assert "holds version 9 >= 3" in result.output


def test_store_init_calls_create_or_says_nothing_to_do(tmp_path: Path, config: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["store", "init", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "store memory: created: in memory" in result.output
    flags = flag_file(tmp_path, {"a": FLAG})
    file_config = tmp_path / "file.yaml"
    file_config.write_text(
        yaml.safe_dump({"exporter": {"kind": "log"}, "store": {"kind": "file", "path": str(flags)}})
    )
    result = runner.invoke(main, ["store", "init", "--config", str(file_config)])
    assert result.exit_code == 0, result.output
    assert "store file: nothing to create" in result.output
    validated = runner.invoke(main, ["validate", str(file_config)])
    assert validated.exit_code == 0, validated.output
    assert "store: file (cacheTTL 15s)" in validated.output


def test_commands_need_a_store_section(tmp_path: Path) -> None:
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"exporter": {"kind": "log"}}))
    result = CliRunner().invoke(main, ["flags", "list", "--config", str(plain)])
    assert result.exit_code == 2
    assert "no `store:` section" in result.output


def test_validate_reports_a_broken_store(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        yaml.safe_dump(
            {"exporter": {"kind": "log"}, "store": {"kind": "file", "path": str(tmp_path / "x")}}
        )
    )
    result = CliRunner().invoke(main, ["validate", str(broken)])
    assert result.exit_code == 2
    assert "store:" in result.output
