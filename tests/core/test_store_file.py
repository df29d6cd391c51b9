"""The `file` store, the `store:` config section and trackEvents filtering in the pipeline."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from flagsink.config import ConfigError, parse_config
from flagsink.event import FeatureEvent
from flagsink.flags import FlagFileError, next_version, numeric_version, parse_flag_text
from flagsink.pipeline import Pipeline, UntrackedFlags
from flagsink.plugins import Registry
from flagsink.scheduler import DataExporterScheduler
from flagsink.store import FLAGS, StoreError
from flagsink.store_cache import CachedStore
from flagsink.stores.file import FileStore
from flagsink.testing import InMemoryExporter, MemoryStore, wait_until

FLAG_A = {
    "variations": {"on": True, "off": False},
    "defaultRule": {"variation": "on"},
}
FLAG_B = {**FLAG_A, "trackEvents": False, "version": "7"}


@pytest.fixture
def stores() -> Iterator[list[FileStore]]:
    made: list[FileStore] = []
    yield made
    for store in made:
        store.close()


def write(path: Path, flags: dict[str, Any]) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(yaml.safe_dump(flags), encoding="utf-8")
    os.replace(temporary, path)


def open_store(stores: list[FileStore], path: Path, **options: Any) -> FileStore:
    store = FileStore(path=str(path), **options)
    stores.append(store)
    return store


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".toml"])
def test_reads_every_format(tmp_path: Path, suffix: str, stores: list[FileStore]) -> None:
    text = {
        ".yaml": yaml.safe_dump({"a": FLAG_A, "b": FLAG_B}),
        ".json": '{"a": {"variations": {"on": true, "off": false}, "defaultRule": '
        '{"variation": "on"}}, "b": {"variations": {"on": true, "off": false}, '
        '"defaultRule": {"variation": "on"}, "trackEvents": false, "version": "7"}}',
        ".toml": '[a]\ndefaultRule = {variation = "on"}\n[a.variations]\non = true\noff = false\n'
        '[b]\ntrackEvents = false\nversion = "7"\ndefaultRule = {variation = "on"}\n'
        "[b.variations]\non = true\noff = false\n",
    }[suffix]
    path = tmp_path / f"flags{suffix}"
    path.write_text(text, encoding="utf-8")
    store = open_store(stores, path, pollInterval=0)
    assert store.is_initialized()
    assert store.get_item(FLAGS, "a") == {"key": "a", "version": 1, "flag": FLAG_A}
    assert store.get_item(FLAGS, "b") == {"key": "b", "version": 7, "flag": FLAG_B}
    assert set(store.all_items(FLAGS)) == {"a", "b"}


def test_reloads_when_the_file_changes(tmp_path: Path, stores: list[FileStore]) -> None:
    path = tmp_path / "flags.yaml"
    write(path, {"a": FLAG_A})
    store = open_store(stores, path, pollInterval=0.02)
    changed = {**FLAG_A, "defaultRule": {"variation": "off"}}
    write(path, {"a": changed, "c": FLAG_A})
    assert wait_until(lambda: set(store.all_items(FLAGS)) == {"a", "c"}, 10)
    item = store.get_item(FLAGS, "a")
    assert item is not None
    assert item["flag"] == changed
    assert item["version"] == 2, "content changed without a numeric version: version + 1"
    assert store.get_item(FLAGS, "c") == {"key": "c", "version": 1, "flag": FLAG_A}


def test_broken_file_keeps_the_last_good_data(
    tmp_path: Path, stores: list[FileStore], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "flags.yaml"
    write(path, {"a": FLAG_A})
    store = open_store(stores, path, pollInterval=0)
    path.write_text("a:\n  variations: {on: true\n  broken: [\n", encoding="utf-8")
    with caplog.at_level(logging.ERROR, logger="flagsink.stores.file"):
        assert not store.reload_if_changed()
    assert store.get_item(FLAGS, "a") == {"key": "a", "version": 1, "flag": FLAG_A}
    assert store.last_error is not None
    assert f"{path}:" in caplog.text
    assert "invalid YAML" in caplog.text
    assert not store.reload_if_changed(), "the same broken file is not reported again"
    write(path, {"b": FLAG_A})
    assert store.reload_if_changed()
    assert set(store.all_items(FLAGS)) == {"b"}
    assert store.last_error is None


def test_writes_change_memory_only(tmp_path: Path, stores: list[FileStore]) -> None:
    path = tmp_path / "flags.yaml"
    write(path, {"a": FLAG_A})
    store = open_store(stores, path, pollInterval=0)
    cached = CachedStore(store, ttl=0)
    assert cached.upsert(FLAGS, {"key": "a", "version": 5, "flag": FLAG_B})
    assert cached.delete(FLAGS, "a", 6)
    assert cached.get(FLAGS, "a") is None
    assert yaml.safe_load(path.read_text()) == {"a": FLAG_A}, "the file is never written"


def test_bad_settings_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        FileStore()
    with pytest.raises(ValidationError):
        FileStore(path=str(tmp_path / "f.yaml"), pollInterval=-1)
    with pytest.raises(StoreError, match=r"f\.yaml"):
        FileStore(path=str(tmp_path / "f.yaml"))


def test_file_entry_point_registers_exporter_and_store() -> None:
    registry = Registry()
    assert registry.store("file") is FileStore
    assert registry.exporter("file").__name__ == "FileExporter"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "expected a mapping of flag key"),
        ("a: 1\n", "flags.yaml:1: flag 'a': expected a mapping"),
        ("a: [\n", "flags.yaml:2: invalid YAML"),
    ],
)
def test_flag_file_errors_name_file_and_line(text: str, message: str) -> None:
    with pytest.raises(FlagFileError, match=message.replace("[", r"\[")):
        parse_flag_text(text, "flags.yaml")


def test_versions() -> None:
    assert [numeric_version({"version": v}) for v in (3, "4", "5.0", "1.2.3", True, None)] == [
        3,
        4,
        5,
        None,
        None,
        None,
    ]
    assert next_version(FLAG_A, None) == 1
    assert next_version(FLAG_A, {"key": "a", "version": 4, "flag": FLAG_A}) is None
    assert next_version(FLAG_B, {"key": "b", "version": 4, "flag": FLAG_A}) == 7
    assert next_version(FLAG_A, {"key": "a", "version": 4, "deleted": True}) == 5


# -- config ------------------------------------------------------------------------------------

EXPORTER = {"exporter": {"kind": "log"}}


def test_store_section_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "flags.yaml"
    write(path, {"a": FLAG_A})
    config = parse_config({**EXPORTER, "store": {"kind": "file", "path": str(path), "cacheTTL": 2}})
    assert config.store is not None
    assert (config.store.kind, config.store.cache_ttl) == ("file", 2.0)
    cached = config.store.build()
    try:
        assert cached.ttl == 2.0
        assert cached.get(FLAGS, "a") == {"key": "a", "version": 1, "flag": FLAG_A}
    finally:
        cached.close()
    assert parse_config(EXPORTER).store is None


def test_store_section_errors_name_file_line_and_path() -> None:
    text = "exporter:\n  kind: log\nstore:\n  kind: file\n  pathh: x\n  cacheTTL: soon\n"
    from flagsink.config import _parse_text

    data, lines = _parse_text(text, "relay.yaml")
    with pytest.raises(ConfigError) as caught:
        parse_config(data, source="relay.yaml", lines=lines)
    problems = "\n".join(caught.value.problems)
    assert "relay.yaml:6: store.cacheTTL: expected seconds" in problems
    assert "relay.yaml:5: store.pathh: unknown key (did you mean 'path'?)" in problems
    assert "store.path: required" in problems
    with pytest.raises(ConfigError, match=r"store\.kind: unknown store 'nope'"):
        parse_config({**EXPORTER, "store": {"kind": "nope"}})
    with pytest.raises(ConfigError, match=r"store\.kind: required"):
        parse_config({**EXPORTER, "store": {"path": "x"}})
    with pytest.raises(ConfigError, match="evaluationContextEnrichment: expected a mapping"):
        parse_config({**EXPORTER, "evaluationContextEnrichment": [1]})


def test_evaluation_context_enrichment_is_exposed() -> None:
    config = parse_config({**EXPORTER, "evaluationContextEnrichment": {"env": "prod"}})
    assert config.evaluation_context_enrichment == {"env": "prod"}


# -- trackEvents filtering ---------------------------------------------------------------------


def event(key: str) -> FeatureEvent:
    return FeatureEvent("user", "u", 1_700_000_000, key, "on", True, False, "1", "SERVER")


def test_pipeline_filters_untracked_flags() -> None:
    exporter = InMemoryExporter()
    scheduler = DataExporterScheduler(exporter, flush_interval=3600)
    pipeline = Pipeline([(scheduler, "feature")], untracked={"quiet"})
    with pipeline:
        pipeline.add_event(event("loud"))
        pipeline.add_event(event("quiet"))
        pipeline.add_events([event("quiet"), event("loud"), event("quiet")])
        assert pipeline.flush(10)
        assert pipeline.filtered == 3
        assert [e.key for e in exporter.events] == ["loud", "loud"]
        stats = scheduler.stats()
        assert stats.dropped == 0


def test_untracked_flags_follow_the_store() -> None:
    backend = MemoryStore()
    backend.init_items({FLAGS: {"a": {"key": "a", "version": 1, "flag": FLAG_B}}})
    untracked = UntrackedFlags.from_store(CachedStore(backend, ttl=0), interval=0.02)
    try:
        assert untracked.current == {"a"}
        backend.upsert_item(FLAGS, {"key": "a", "version": 2, "flag": FLAG_A})
        backend.upsert_item(FLAGS, {"key": "b", "version": 1, "flag": FLAG_B})
        assert wait_until(lambda: untracked.current == {"b"}, 10)
    finally:
        untracked.close()
