"""The ``log`` exporter: one line per event through the ``logging`` module (queue mode)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import Field, field_validator

from flagsink.event import Event
from flagsink.exporter import Exporter, ExporterSettings, PartialExportError
from flagsink.formats.fields import compile_event_template
from flagsink.hookspecs import hookimpl

__all__ = ["DEFAULT_LOG_FORMAT", "LogExporter", "LogSettings"]

# Identical to GO Feature Flag's default.
DEFAULT_LOG_FORMAT = (
    '[{{ .FormattedDate}}] user="{{ .UserKey}}", flag="{{ .Key}}", value="{{ .Value}}"'
)
_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING}


class LogSettings(ExporterSettings):
    """Settings of the ``log`` exporter."""

    log_format: str = Field(
        DEFAULT_LOG_FORMAT,
        description="Go-template line per event, e.g. `{{ .UserKey}} got {{ .Value}}`.",
    )
    logger_name: str = Field(
        "flagsink.events", description="Name of the `logging` logger the lines go to."
    )
    level: str = Field("INFO", description="Level of each line: DEBUG, INFO or WARNING.")

    @field_validator("log_format")
    @classmethod
    def _valid_template(cls, template: str) -> str:
        compile_event_template(template, setting="logFormat")
        return template

    @field_validator("level")
    @classmethod
    def _known_level(cls, level: str) -> str:
        if level.upper() not in _LEVELS:
            raise ValueError(f"this level is not one of {', '.join(_LEVELS)}")
        return level.upper()


class LogExporter(Exporter[LogSettings]):
    """Logs each event as one formatted line, near real time."""

    kind = "log"
    bulk = False
    settings_model = LogSettings

    def __init__(self, settings: LogSettings | None = None, /, **options: Any) -> None:
        super().__init__(settings, **options)
        self.render = compile_event_template(self.settings.log_format, setting="logFormat")
        self.logger = logging.getLogger(self.settings.logger_name)
        self.level = _LEVELS[self.settings.level]
        # The lines are this exporter's output: make sure they are emitted even when the
        # application configured logging for WARNING and up only, or not at all.
        if self.logger.level == logging.NOTSET:
            self.logger.setLevel(self.level)
        if not self.logger.hasHandlers():
            self.logger.addHandler(logging.StreamHandler())

    def export(self, events: Sequence[Event]) -> None:
        """Log every event; events whose values cannot be rendered are rejected."""
        if not self.logger.isEnabledFor(self.level):
            return
        rejected: list[Event] = []
        log = self.logger.log
        for event in events:
            try:
                line = self.render(event)
            except (TypeError, ValueError):
                rejected.append(event)
                continue
            log(self.level, "%s", line)
        if rejected:
            raise PartialExportError(
                f"{len(rejected)} events have values that cannot be rendered",
                rejected=rejected,
            )


@hookimpl
def flagsink_register_exporters(register: Callable[[type[Exporter[Any]]], None]) -> None:
    register(LogExporter)
