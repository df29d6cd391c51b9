"""Lenient decoding of events arriving as JSON (JSON lines files, collector requests).

Input follows GO Feature Flag's rules: ``kind: tracking`` makes a tracking event, anything
else a feature event; a millisecond ``creationDate`` is normalised to seconds; unknown
fields are ignored. Each malformed event gets an error that names the field.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from flagsink.event import USER, Event, FeatureEvent, TrackingEvent, normalize_creation_date

__all__ = ["EventDecodeError", "decode_event", "event_from_raw"]


class EventDecodeError(ValueError):
    """An input event is not valid JSON or lacks what an event needs."""


class _EventIn(msgspec.Struct, rename="camel"):
    kind: str = "feature"
    context_kind: str = USER
    user_key: str = ""
    creation_date: float | None = None
    key: str = ""
    variation: str = ""
    value: Any = None
    default: bool = False
    version: str | int | float = ""
    source: str = ""
    metadata: dict[str, Any] | None = None
    evaluation_context: dict[str, Any] | None = None
    tracking_event_details: dict[str, Any] | None = None


_decoder = msgspec.json.Decoder(_EventIn)
_convert_error = (msgspec.ValidationError, msgspec.DecodeError)


def _version_text(version: str | float) -> str:
    if isinstance(version, float) and version.is_integer():
        return str(int(version))
    return str(version)


def event_from_raw(
    raw: _EventIn, *, default_source: str = "", meta: dict[str, Any] | None = None
) -> Event:
    """Turn a decoded input record into an immutable event."""
    if not raw.key:
        raise EventDecodeError("field `key` is required: the flag key or tracking event name")
    created = (
        int(time.time())
        if raw.creation_date is None
        else normalize_creation_date(raw.creation_date)
    )
    if raw.kind == "tracking":
        return TrackingEvent(
            raw.context_kind or USER,
            raw.user_key,
            created,
            raw.key,
            raw.evaluation_context or {},
            raw.tracking_event_details or {},
        )
    metadata = meta if meta else raw.metadata
    return FeatureEvent(
        raw.context_kind or USER,
        raw.user_key,
        created,
        raw.key,
        raw.variation,
        raw.value,
        raw.default,
        _version_text(raw.version),
        raw.source or default_source,
        metadata or None,
    )


def decode_event(
    data: bytes | str, *, default_source: str = "", meta: dict[str, Any] | None = None
) -> Event:
    """Decode one JSON event.

    :param default_source: ``source`` for feature events that have none.
    :param meta: when non-empty, replaces each feature event's metadata (GO Feature Flag's
        collector rule).
    :raises EventDecodeError: with a message naming the offending field.
    """
    try:
        raw = _decoder.decode(data)
    except _convert_error as exc:
        raise EventDecodeError(str(exc).replace("$.", "")) from None
    return event_from_raw(raw, default_source=default_source, meta=meta)
