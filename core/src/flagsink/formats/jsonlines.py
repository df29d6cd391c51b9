"""JSON lines: one event per line, exactly as GO Feature Flag writes it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

import msgspec

from flagsink.event import Event
from flagsink.formats.base import Format
from flagsink.hookspecs import hookimpl

__all__ = ["JsonLinesFormat", "encode_lines_safely"]

CHUNK = 8192
_UNENCODABLE = (TypeError, ValueError, OverflowError, msgspec.EncodeError)


def encode_lines_safely(
    events: Sequence[Event], encode: Callable[[Sequence[Any]], bytes]
) -> tuple[bytes, list[Event]]:
    """Encode ``events`` with ``encode``; on failure, encode one by one and return the
    events that cannot be encoded instead of failing the whole batch."""
    try:
        return encode(events), []
    except _UNENCODABLE:
        pass
    parts: list[bytes] = []
    rejected: list[Event] = []
    for event in events:
        try:
            parts.append(encode((event,)))
        except _UNENCODABLE:
            rejected.append(event)
    return b"".join(parts), rejected


class JsonLinesFormat(Format):
    """One JSON object per line (``.json``, as GO Feature Flag names it)."""

    name = "json"
    extension = "json"
    content_type = "application/x-ndjson"

    def write(self, events: Sequence[Event], out: BinaryIO) -> list[Event]:
        encode = msgspec.json.Encoder().encode_lines
        rejected: list[Event] = []
        for start in range(0, len(events), CHUNK):
            data, bad = encode_lines_safely(events[start : start + CHUNK], encode)
            out.write(data)
            rejected.extend(bad)
        return rejected


@hookimpl
def flagsink_register_formats(register: Callable[[type[Format]], None]) -> None:
    register(JsonLinesFormat)
