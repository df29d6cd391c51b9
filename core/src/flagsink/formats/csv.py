"""CSV through a GO Feature Flag-compatible ``csvTemplate``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import BinaryIO

from flagsink.event import Event
from flagsink.formats.base import Format, FormatOptions
from flagsink.formats.fields import compile_event_template
from flagsink.hookspecs import hookimpl

__all__ = ["DEFAULT_CSV_TEMPLATE", "CsvFormat"]

# Identical to GO Feature Flag's default.
DEFAULT_CSV_TEMPLATE = (
    "{{ .Kind}};{{ .ContextKind}};{{ .UserKey}};{{ .CreationDate}};{{ .Key}};"
    "{{ .Variation}};{{ .Value}};{{ .Default}};{{ .Source}}\n"
)
CHUNK = 8192
_UNRENDERABLE = (TypeError, ValueError, OverflowError)


class CsvFormat(Format):
    """One templated line per event. The template is checked when the format is built;
    fields a tracking event lacks (``.Variation``, ``.Value`` ...) render empty."""

    name = "csv"
    extension = "csv"
    content_type = "text/csv"

    def __init__(self, options: FormatOptions | None = None) -> None:
        super().__init__(options)
        template = self.options.csv_template or DEFAULT_CSV_TEMPLATE
        self.render = compile_event_template(template, setting="csvTemplate")

    def write(self, events: Sequence[Event], out: BinaryIO) -> list[Event]:
        render = self.render
        rejected: list[Event] = []
        for start in range(0, len(events), CHUNK):
            chunk = events[start : start + CHUNK]
            try:
                text = "".join([render(event) for event in chunk])
            except _UNRENDERABLE:
                lines = []
                for event in chunk:
                    try:
                        lines.append(render(event))
                    except _UNRENDERABLE:
                        rejected.append(event)
                text = "".join(lines)
            out.write(text.encode("utf-8", "replace"))
        return rejected


@hookimpl
def flagsink_register_formats(register: Callable[[type[Format]], None]) -> None:
    register(CsvFormat)
