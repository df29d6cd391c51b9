"""Core's own exporters pass the contract kit that every plugin runs."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from flagsink.event import Event
from flagsink.exporters.file import FileExporter
from flagsink.exporters.log import LogExporter
from flagsink.formats.fields import compile_event_template
from flagsink.testing.contract import ExporterContract


class TestFileContract(ExporterContract):
    @pytest.fixture
    def directory(self, tmp_path: Path) -> Path:
        return tmp_path / "out"

    @pytest.fixture
    def new_exporter(self, directory: Path) -> Callable[..., FileExporter]:
        def make(**options: Any) -> FileExporter:
            options.setdefault("output_dir", str(directory))
            return FileExporter(**options)

        return make

    @pytest.fixture
    def read_back(self, directory: Path) -> Callable[[], list[Any]]:
        def read() -> list[Any]:
            if not directory.is_dir():
                return []
            return [
                json.loads(line)
                for path in sorted(directory.glob("*.json"))
                for line in path.read_text().splitlines()
            ]

        return read

    @pytest.fixture
    def sink_outage(
        self, directory: Path, tmp_path: Path
    ) -> Callable[[], AbstractContextManager[None]]:
        @contextmanager
        def outage() -> Iterator[None]:
            # A regular file where the directory was: every write fails, even as root.
            aside = tmp_path / "aside"
            os.rename(directory, aside)
            directory.write_text("not a directory")
            try:
                yield
            finally:
                directory.unlink()
                os.rename(aside, directory)

        return outage

    @pytest.fixture
    def invalid_settings(self, tmp_path: Path) -> list[dict[str, Any]]:
        blocker = tmp_path / "blocker"
        blocker.write_text("")
        return [
            {"format": "xml"},
            {"csvTemplate": "{{ .Nope }}", "format": "csv"},
            {"filename": "../escape-{{ .Timestamp}}.json"},
            {"parquetCompressionCodec": "LZO"},
            {"unknownKey": 1},
            {"output_dir": str(blocker / "sub")},
        ]


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class TestLogContract(ExporterContract):
    log_format = "{{ .Kind}}|{{ .UserKey}}|{{ .Key}}|{{ .Value}}|{{ .TrackingEventDetails}}"

    def expected(self, event: Event) -> Any:
        return compile_event_template(self.log_format, setting="logFormat")(event)

    @pytest.fixture
    def handler(self) -> Iterator[_Lines]:
        handler = _Lines()
        logger = logging.getLogger("flagsink.contract")
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        yield handler
        logger.removeHandler(handler)

    @pytest.fixture
    def broken(self) -> dict[str, bool]:
        return {"on": False}

    @pytest.fixture
    def new_exporter(self, handler: _Lines, broken: dict[str, bool]) -> Callable[..., LogExporter]:
        class Flaky(LogExporter):
            def export(self, events: Any) -> None:
                if broken["on"]:
                    raise OSError("log sink unavailable")
                super().export(events)

        def make(**options: Any) -> LogExporter:
            options.setdefault("logFormat", self.log_format)
            return Flaky(loggerName="flagsink.contract", **options)

        return make

    @pytest.fixture
    def read_back(self, handler: _Lines) -> Callable[[], list[Any]]:
        return lambda: list(handler.lines)

    @pytest.fixture
    def sink_outage(self, broken: dict[str, bool]) -> Callable[[], AbstractContextManager[None]]:
        @contextmanager
        def outage() -> Iterator[None]:
            broken["on"] = True
            try:
                yield
            finally:
                broken["on"] = False

        return outage

    @pytest.fixture
    def invalid_settings(self) -> list[dict[str, Any]]:
        return [{"logFormat": "{{ if .Value }}x{{ end }}"}, {"level": "LOUD"}, {"extra": True}]
