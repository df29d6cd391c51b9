"""Event fields as Go templates see them (``{{ .UserKey}}``), rendered as text."""

from __future__ import annotations

import operator
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec

from flagsink.event import Event, FeatureEvent, TrackingEvent
from flagsink.template import Template

__all__ = [
    "EVENT_FIELDS",
    "FEATURE_FIELDS",
    "TRACKING_FIELDS",
    "compile_event_template",
    "formatted_date",
    "go_text",
]

_json = msgspec.json.Encoder()
Getter = Callable[[Any], str]


def go_text(value: Any) -> str:
    """Render a value as GO Feature Flag's templates do for scalars (``true``, ``42``,
    ``on``); ``None`` is empty, and maps and lists are JSON."""
    if isinstance(value, str):
        return value
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        return repr(value)
    return _json.encode(value).decode()


_dates: dict[int, str] = {}


def formatted_date(seconds: int) -> str:
    """RFC 3339 in UTC, e.g. ``2026-11-22T10:04:05Z`` (cached: events share seconds)."""
    text = _dates.get(seconds)
    if text is None:
        if len(_dates) > 4096:
            _dates.clear()
        text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        _dates[seconds] = text
    return text


def _text_of(attribute: str) -> Getter:
    get = operator.attrgetter(attribute)
    return lambda event: go_text(get(event))


_COMMON: dict[str, Getter] = {
    "ContextKind": operator.attrgetter("context_kind"),
    "UserKey": operator.attrgetter("user_key"),
    "CreationDate": lambda event: str(event.creation_date),
    "Key": operator.attrgetter("key"),
    "FormattedDate": lambda event: formatted_date(event.creation_date),
}
FEATURE_GETTERS: dict[str, Getter] = {
    "Kind": lambda _: "feature",
    **_COMMON,
    "Variation": operator.attrgetter("variation"),
    "Value": _text_of("value"),
    "Default": lambda event: "true" if event.default else "false",
    "Version": operator.attrgetter("version"),
    "Source": operator.attrgetter("source"),
    "Metadata": _text_of("metadata"),
}
TRACKING_GETTERS: dict[str, Getter] = {
    "Kind": lambda _: "tracking",
    **_COMMON,
    "EvaluationContext": _text_of("evaluation_context"),
    "TrackingEventDetails": _text_of("tracking_event_details"),
}
FEATURE_FIELDS = frozenset(FEATURE_GETTERS)
TRACKING_FIELDS = frozenset(TRACKING_GETTERS)
EVENT_FIELDS = FEATURE_FIELDS | TRACKING_FIELDS


def compile_event_template(source: str, *, setting: str) -> Callable[[Event], str]:
    """Parse and compile a per-event template; fields a type lacks render empty."""
    template = Template.parse(source, EVENT_FIELDS, setting=setting)
    renderers: dict[type, Callable[[object], str]] = {
        FeatureEvent: template.compile(FEATURE_GETTERS),
        TrackingEvent: template.compile(TRACKING_GETTERS),
    }

    def render(event: Event) -> str:
        return renderers[type(event)](event)

    return render
