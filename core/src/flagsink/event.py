"""Evaluation and tracking events, with GO Feature Flag's JSON field names.

Events are immutable ``msgspec`` structs that the garbage collector does not track, so
millions can wait in buffers without slowing collections. They are shared by reference
between exporters: never mutate an event's ``metadata`` after handing it over.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, ClassVar

import msgspec

__all__ = [
    "ANONYMOUS_USER",
    "USER",
    "Event",
    "FeatureEvent",
    "TrackingEvent",
    "new_feature_event",
    "new_tracking_event",
    "normalize_creation_date",
]

USER = "user"
ANONYMOUS_USER = "anonymousUser"
SDK_DEFAULT = "SdkDefault"

# A creationDate above this is in milliseconds (as GO Feature Flag's relay decides).
_MAX_SECONDS = 9_999_999_999


class FeatureEvent(
    msgspec.Struct,
    frozen=True,
    gc=False,
    tag_field="kind",
    tag="feature",
    rename="camel",
    omit_defaults=True,
):
    """One flag evaluation: which flag gave which value to whom.

    Encodes to exactly the JSON GO Feature Flag writes (``kind`` first, ``metadata``
    omitted when empty); ``creation_date`` is in Unix seconds.
    """

    kind: ClassVar[str] = "feature"

    context_kind: str
    user_key: str
    creation_date: int
    key: str
    variation: str
    value: Any
    default: bool
    version: str
    source: str
    metadata: dict[str, Any] | None = None


class TrackingEvent(
    msgspec.Struct,
    frozen=True,
    gc=False,
    tag_field="kind",
    tag="tracking",
    rename="camel",
    omit_defaults=True,
):
    """One custom tracked event (``client.track(...)``), as GO Feature Flag writes it."""

    kind: ClassVar[str] = "tracking"

    context_kind: str
    user_key: str
    creation_date: int
    key: str
    evaluation_context: dict[str, Any]
    tracking_event_details: dict[str, Any]


Event = FeatureEvent | TrackingEvent


def normalize_creation_date(value: float) -> int:
    """Return ``value`` as Unix seconds, converting a millisecond timestamp."""
    seconds = int(value)
    if seconds > _MAX_SECONDS:
        seconds //= 1000
    return seconds


_MISSING: Any = object()
_is_mapping: dict[type, bool] = {dict: True}


def _user_of(context: Any) -> tuple[str, str]:
    """Return ``(user_key, context_kind)`` from a key, a mapping or an OpenFeature context."""
    cls = type(context)
    if cls is str:
        return context, USER
    mapping = _is_mapping.get(cls)
    if mapping is None:  # first context of this type: remember what it is
        mapping = _is_mapping[cls] = isinstance(context, Mapping)
    if mapping:
        key = context.get("targetingKey", _MISSING)
        if key is _MISSING:
            key = context.get("key", "")
        anonymous = context.get("anonymous", False)
    elif isinstance(context, str):
        return str(context), USER
    else:
        key = getattr(context, "targeting_key", None)
        if key is None:
            key = getattr(context, "key", "")
        attributes = getattr(context, "attributes", None)
        anonymous = attributes.get("anonymous", _MISSING) if attributes else _MISSING
        if anonymous is _MISSING:
            anonymous = getattr(context, "anonymous", False)
    if type(key) is not str:
        key = "" if key is None else str(key)
    return key, (ANONYMOUS_USER if anonymous is True else USER)


_second = 0


def _now() -> int:
    """Unix seconds now, sharing one int object per second between events (saves 32 bytes
    per buffered event)."""
    global _second
    now = int(time.time())
    if now == _second:
        return _second
    _second = now
    return now


def new_feature_event(
    context: object,
    flag_key: str,
    value: Any,
    variation: str | None,
    *,
    failed: bool = False,
    version: str | int | None = None,
    source: str = "SERVER",
    metadata: dict[str, Any] | None = None,
    creation_date: float | None = None,
) -> FeatureEvent:
    """Build the event for one evaluation, as GO Feature Flag's ``NewFeatureEvent`` does.

    :param context: the user: a key string, a mapping with ``targetingKey`` (or ``key``)
        and optional ``anonymous``, or an OpenFeature ``EvaluationContext``.
    :param failed: the evaluation fell back to the default value (``default: true``);
        a missing ``variation`` then becomes ``SdkDefault``.
    :param creation_date: Unix seconds or milliseconds; now when omitted.
    """
    user_key, context_kind = _user_of(context)
    if variation is None:
        variation = SDK_DEFAULT if failed else ""
    return FeatureEvent(
        context_kind,
        user_key,
        _now() if creation_date is None else normalize_creation_date(creation_date),
        flag_key,
        variation,
        value,
        failed,
        "" if version is None else str(version),
        source,
        metadata or None,
    )


def new_tracking_event(
    context: object,
    name: str,
    details: Mapping[str, Any] | None = None,
    *,
    evaluation_context: Mapping[str, Any] | None = None,
    creation_date: float | None = None,
) -> TrackingEvent:
    """Build a tracking event for the custom event ``name`` from ``context``.

    ``evaluation_context`` defaults to the context's attributes (for a mapping, the mapping).
    """
    user_key, context_kind = _user_of(context)
    if evaluation_context is None:
        if isinstance(context, Mapping):
            evaluation_context = context
        else:
            evaluation_context = getattr(context, "attributes", None) or {}
    return TrackingEvent(
        context_kind,
        user_key,
        _now() if creation_date is None else normalize_creation_date(creation_date),
        name,
        dict(evaluation_context),
        dict(details or {}),
    )
