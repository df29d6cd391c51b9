"""Helpers for exporters that send events one record at a time (queues, streams, HTTP)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from flagsink.event import Event
from flagsink.formats.fields import compile_event_template

__all__ = ["encode_records", "key_renderer"]

_UNENCODABLE = (TypeError, ValueError, OverflowError, msgspec.EncodeError)
_encode = msgspec.json.Encoder().encode


def encode_records(events: Sequence[Event]) -> tuple[list[tuple[Event, bytes]], list[Event]]:
    """Each event with its GO Feature Flag JSON, and apart the events that cannot be
    encoded (a value that is not JSON-serialisable): report those as rejected."""
    records: list[tuple[Event, bytes]] = []
    rejected: list[Event] = []
    for event in events:
        try:
            records.append((event, _encode(event)))
        except _UNENCODABLE:
            rejected.append(event)
    return records, rejected


def key_renderer(template: str, *, setting: str) -> Callable[[Event], str]:
    """A per-event key (partition key, message key, ordering key) from a ``{{ .Field }}``
    template such as ``{{ .UserKey}}``; raises ``TemplateError`` naming ``setting``."""
    render: Callable[[Any], str] = compile_event_template(template, setting=setting)
    return render
