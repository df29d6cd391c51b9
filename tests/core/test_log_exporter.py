"""The ``log`` exporter: one GO Feature Flag-style line per event through ``logging``."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from pydantic import ValidationError

from flagsink.event import Event, FeatureEvent, TrackingEvent, new_feature_event
from flagsink.exporter import PartialExportError
from flagsink.exporters.log import DEFAULT_LOG_FORMAT, LogExporter, LogSettings

TS = 1_700_000_000
TS_RFC3339 = "2023-11-14T22:13:20Z"
LOGGER = "flagsink.events"


def _feature(key: str = "f", value: Any = True, user: str = "u") -> FeatureEvent:
    return new_feature_event(user, key, value, "on", creation_date=TS)


def _lines(caplog: pytest.LogCaptureFixture, logger: str = LOGGER) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


def test_kind_and_queue_mode() -> None:
    assert LogExporter.kind == "log"
    assert LogExporter.bulk is False
    assert LogExporter.settings_model is LogSettings


def test_default_line_is_go_feature_flags(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    LogExporter().export([_feature()])
    assert _lines(caplog) == [f'[{TS_RFC3339}] user="u", flag="f", value="true"']
    assert DEFAULT_LOG_FORMAT == (
        '[{{ .FormattedDate}}] user="{{ .UserKey}}", flag="{{ .Key}}", value="{{ .Value}}"'
    )
    (record,) = caplog.records
    assert record.levelno == logging.INFO


def test_one_line_per_event_in_order(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    events: list[Event] = [
        _feature("a", {"x": 1}, "u1"),
        _feature("b", None, "u2"),
        _feature("c", 4.5, "u3"),
        TrackingEvent("user", "u4", TS, "clicked", {}, {"n": 1}),
    ]
    LogExporter().export(events)
    assert _lines(caplog) == [
        f'[{TS_RFC3339}] user="u1", flag="a", value="{{"x":1}}"',
        f'[{TS_RFC3339}] user="u2", flag="b", value=""',
        f'[{TS_RFC3339}] user="u3", flag="c", value="4.5"',
        f'[{TS_RFC3339}] user="u4", flag="clicked", value=""',
    ]


@pytest.mark.parametrize("key", ["logFormat", "log_format"])
def test_custom_log_format(caplog: pytest.LogCaptureFixture, key: str) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    exporter = LogExporter(**{key: "{{ .UserKey}} got {{ .Value}} from {{ .Key}} ({{ .Kind}})"})
    exporter.export([_feature(value="blue")])
    assert _lines(caplog) == ["u got blue from f (feature)"]


def test_percent_signs_logged_verbatim(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    LogExporter(logFormat="100% {{ .Value}} %s").export([_feature(value="%d")])
    assert _lines(caplog) == ["100% %d %s"]


@pytest.mark.parametrize(
    ("level", "levelno"),
    [("DEBUG", logging.DEBUG), ("info", logging.INFO), ("warning", logging.WARNING)],
)
def test_level_setting(caplog: pytest.LogCaptureFixture, level: str, levelno: int) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    exporter = LogExporter(level=level)
    assert exporter.settings.level == level.upper()
    exporter.export([_feature()])
    assert [r.levelno for r in caplog.records if r.name == LOGGER] == [levelno]


def test_disabled_level_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    LogExporter(level="INFO").export([_feature(), _feature(value=object())])
    assert _lines(caplog) == []


def test_logger_name_setting(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="my.app.flags")
    LogExporter(loggerName="my.app.flags").export([_feature()])
    assert _lines(caplog, "my.app.flags") == [f'[{TS_RFC3339}] user="u", flag="f", value="true"']
    assert _lines(caplog) == []


def test_unrenderable_value_rejected_others_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    bad = _feature("bad", object())
    with pytest.raises(PartialExportError) as info:
        LogExporter().export([_feature("a"), bad, _feature("c")])
    assert info.value.rejected == [bad]
    assert info.value.failed == []
    assert [line.split('flag="')[1].split('"')[0] for line in _lines(caplog)] == ["a", "c"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"level": "TRACE"}, "TRACE"),
        ({"level": "ERROR"}, "ERROR"),
        ({"logFormat": "{{ .Usr }}"}, r"logFormat: unknown field \.Usr"),
        ({"logFormat": "{{ .Value | printf }}"}, "logFormat: unsupported template action"),
        ({"logFormat": "{{ .Value"}, "logFormat: unclosed"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_invalid_settings_rejected(options: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        LogExporter(**options)


def test_settings_defaults() -> None:
    settings = LogSettings.model_validate({})
    assert settings.log_format == DEFAULT_LOG_FORMAT
    assert settings.logger_name == LOGGER
    assert settings.level == "INFO"
