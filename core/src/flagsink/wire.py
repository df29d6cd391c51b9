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

__all__ = [
    "CollectorBodyError",
    "EventDecodeError",
    "decode_collector_body",
    "decode_event",
    "event_from_raw",
]


class EventDecodeError(ValueError):
    """An input event is not valid JSON or lacks what an event needs."""


class _EventIn(msgspec.Struct, rename="camel"):
    kind: str | None = "feature"
    context_kind: str | None = USER
    user_key: str | None = ""
    creation_date: float | None = None
    key: str | None = ""
    variation: str | None = ""
    value: Any = None
    default: bool | None = False
    version: str | int | float | None = ""
    source: str | None = ""
    metadata: dict[str, Any] | None = None
    evaluation_context: dict[str, Any] | None = None
    tracking_event_details: dict[str, Any] | None = None


_decoder = msgspec.json.Decoder(_EventIn)
_MAX_DATE = 253_402_300_799  # 9999-12-31T23:59:59Z
_convert_error = (msgspec.ValidationError, msgspec.DecodeError)


def _version_text(version: str | float | None) -> str:
    if version is None:
        return ""
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
    if not 0 <= created <= _MAX_DATE:
        raise EventDecodeError(
            "field `creationDate` is out of range: expected Unix seconds or milliseconds"
        )
    if raw.kind == "tracking":
        return TrackingEvent(
            raw.context_kind or USER,
            raw.user_key or "",
            created,
            raw.key,
            raw.evaluation_context or {},
            raw.tracking_event_details or {},
        )
    metadata = meta if meta else raw.metadata
    return FeatureEvent(
        raw.context_kind or USER,
        raw.user_key or "",
        created,
        raw.key,
        raw.variation or "",
        raw.value,
        bool(raw.default),
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


class CollectorBodyError(ValueError):
    """A collector request body that is not JSON or has no ``events`` list."""


class _Body(msgspec.Struct):
    meta: dict[str, Any] | None = None
    events: list[_EventIn] | None = None


class _RawBody(msgspec.Struct):
    meta: dict[str, Any] | None = None
    events: list[msgspec.Raw] | None = None


_body_decoder = msgspec.json.Decoder(_Body)
_raw_body_decoder = msgspec.json.Decoder(_RawBody)


def decode_collector_body(
    body: bytes, *, default_source: str = "PROVIDER_CACHE"
) -> tuple[list[Event], list[tuple[int, str]]]:
    """Decode GO Feature Flag's ``{"meta": {...}, "events": [...]}`` collector body.

    :returns: the accepted events and ``(index, reason)`` for each rejected one; one bad
        event never fails the good ones.
    :raises CollectorBodyError: the body is not JSON, not an object, or lacks ``events``.
    """
    try:
        parsed = _body_decoder.decode(body)
    except msgspec.ValidationError:
        return _decode_one_by_one(body, default_source)
    except msgspec.DecodeError as exc:
        raise CollectorBodyError(f"body is not valid JSON: {exc}") from None
    if parsed.events is None:
        raise CollectorBodyError("body has no `events` list")
    meta = parsed.meta
    events: list[Event] = []
    rejected: list[tuple[int, str]] = []
    for index, raw in enumerate(parsed.events):
        try:
            events.append(event_from_raw(raw, default_source=default_source, meta=meta))
        except EventDecodeError as exc:
            rejected.append((index, str(exc)))
    return events, rejected


def _decode_one_by_one(
    body: bytes, default_source: str
) -> tuple[list[Event], list[tuple[int, str]]]:
    try:
        parsed = _raw_body_decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        message = str(exc).replace("$.", "")
        raise CollectorBodyError(
            f"body must be an object with an `events` list and an optional `meta` object: {message}"
        ) from None
    if parsed.events is None:
        raise CollectorBodyError("body has no `events` list")
    events: list[Event] = []
    rejected: list[tuple[int, str]] = []
    for index, raw in enumerate(parsed.events):
        try:
            events.append(decode_event(raw, default_source=default_source, meta=parsed.meta))
        except EventDecodeError as exc:
            rejected.append((index, str(exc)))
    return events, rejected
