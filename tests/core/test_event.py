"""Events: GO Feature Flag's exact JSON shape, the constructors, immutability."""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest

from flagsink.event import (
    ANONYMOUS_USER,
    USER,
    FeatureEvent,
    TrackingEvent,
    new_feature_event,
    new_tracking_event,
    normalize_creation_date,
)

TS = 1_700_000_000


def _feature(**overrides: Any) -> FeatureEvent:
    values: dict[str, Any] = {
        "context_kind": "user",
        "user_key": "u1",
        "creation_date": TS,
        "key": "my-flag",
        "variation": "on",
        "value": True,
        "default": False,
        "version": "1",
        "source": "SERVER",
    }
    values.update(overrides)
    return FeatureEvent(**values)


# --- JSON shape -----------------------------------------------------------------------


def test_feature_event_json_is_go_feature_flags_bytes() -> None:
    event = _feature(metadata={"env": "prod"})
    assert msgspec.json.encode(event) == (
        b'{"kind":"feature","contextKind":"user","userKey":"u1","creationDate":1700000000,'
        b'"key":"my-flag","variation":"on","value":true,"default":false,"version":"1",'
        b'"source":"SERVER","metadata":{"env":"prod"}}'
    )


def test_feature_event_field_order_kind_first() -> None:
    keys = list(json.loads(msgspec.json.encode(_feature(metadata={"a": 1}))))
    assert keys == [
        "kind",
        "contextKind",
        "userKey",
        "creationDate",
        "key",
        "variation",
        "value",
        "default",
        "version",
        "source",
        "metadata",
    ]


def test_metadata_omitted_when_absent_but_null_value_kept() -> None:
    encoded = msgspec.json.encode(_feature(value=None))
    assert b"metadata" not in encoded
    assert encoded.endswith(b'"value":null,"default":false,"version":"1","source":"SERVER"}')


def test_new_feature_event_omits_empty_metadata() -> None:
    event = new_feature_event("u", "f", 1, "v", metadata={}, creation_date=TS)
    assert event.metadata is None
    assert b"metadata" not in msgspec.json.encode(event)


def test_tracking_event_json_shape() -> None:
    event = TrackingEvent("user", "u1", TS, "clicked", {"plan": "pro"}, {"amount": 3})
    assert msgspec.json.encode(event) == (
        b'{"kind":"tracking","contextKind":"user","userKey":"u1","creationDate":1700000000,'
        b'"key":"clicked","evaluationContext":{"plan":"pro"},'
        b'"trackingEventDetails":{"amount":3}}'
    )
    assert event.kind == "tracking"
    assert FeatureEvent.kind == "feature"


def test_tracking_event_keeps_empty_maps() -> None:
    event = new_tracking_event("u", "signup", creation_date=TS)
    decoded = json.loads(msgspec.json.encode(event))
    assert decoded["evaluationContext"] == {}
    assert decoded["trackingEventDetails"] == {}


# --- new_feature_event ------------------------------------------------------------------


def test_new_feature_event_from_string_context() -> None:
    event = new_feature_event("alice", "f", "blue", "var-blue", creation_date=TS)
    assert event == FeatureEvent(USER, "alice", TS, "f", "var-blue", "blue", False, "", "SERVER")


@pytest.mark.parametrize(
    ("context", "user_key", "kind"),
    [
        ({"targetingKey": "t1"}, "t1", USER),
        ({"targetingKey": "t1", "anonymous": True}, "t1", ANONYMOUS_USER),
        ({"key": "k1", "anonymous": False}, "k1", USER),
        ({"targetingKey": "t1", "key": "ignored"}, "t1", USER),
        ({"targetingKey": "t1", "anonymous": "true"}, "t1", USER),  # only a real True
        ({"targetingKey": None}, "", USER),
        ({}, "", USER),
    ],
)
def test_new_feature_event_from_mapping(context: dict[str, Any], user_key: str, kind: str) -> None:
    event = new_feature_event(context, "f", 1, "v", creation_date=TS)
    assert event.user_key == user_key
    assert event.context_kind == kind


@dataclass
class _OpenFeatureLike:
    targeting_key: str | None
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class _KeyObject:
    key: str
    anonymous: bool = False


@pytest.mark.parametrize(
    ("context", "user_key", "kind"),
    [
        (_OpenFeatureLike("u1"), "u1", USER),
        (_OpenFeatureLike("u1", {"anonymous": True}), "u1", ANONYMOUS_USER),
        (_OpenFeatureLike(None), "", USER),
        (_KeyObject("k1"), "k1", USER),
        (_KeyObject("k1", anonymous=True), "k1", ANONYMOUS_USER),
    ],
)
def test_new_feature_event_from_object(context: object, user_key: str, kind: str) -> None:
    event = new_feature_event(context, "f", 1, "v", creation_date=TS)
    assert (event.user_key, event.context_kind) == (user_key, kind)


def test_new_feature_event_from_openfeature_context() -> None:
    ec = pytest.importorskip("openfeature.evaluation_context")
    event = new_feature_event(
        ec.EvaluationContext("u9", {"anonymous": True}), "f", 1, "v", creation_date=TS
    )
    assert (event.user_key, event.context_kind) == ("u9", ANONYMOUS_USER)


def test_failed_evaluation_is_default_with_sdk_default_variation() -> None:
    event = new_feature_event("u", "f", False, None, failed=True, creation_date=TS)
    assert event.default is True
    assert event.variation == "SdkDefault"
    kept = new_feature_event("u", "f", False, "fallback", failed=True, creation_date=TS)
    assert (kept.default, kept.variation) == (True, "fallback")
    ok = new_feature_event("u", "f", False, None, creation_date=TS)
    assert (ok.default, ok.variation) == (False, "")


@pytest.mark.parametrize(("version", "text"), [(3, "3"), ("v1.2", "v1.2"), (None, "")])
def test_version_becomes_text(version: int | str | None, text: str) -> None:
    event = new_feature_event("u", "f", 1, "v", version=version, creation_date=TS)
    assert event.version == text
    assert json.loads(msgspec.json.encode(event))["version"] == text


@pytest.mark.parametrize(
    ("given", "seconds"),
    [
        (TS, TS),
        (TS * 1000 + 999, TS),
        (TS + 0.9, TS),
        (9_999_999_999, 9_999_999_999),
        (10_000_000_000, 10_000_000),
    ],
)
def test_creation_date_normalised_to_seconds(given: float, seconds: int) -> None:
    assert normalize_creation_date(given) == seconds
    assert new_feature_event("u", "f", 1, "v", creation_date=given).creation_date == seconds


def test_creation_date_defaults_to_now() -> None:
    before = int(time.time())
    event = new_feature_event("u", "f", 1, "v")
    assert before <= event.creation_date <= int(time.time())
    tracking = new_tracking_event("u", "e")
    assert before <= tracking.creation_date <= int(time.time())


def test_source_and_metadata_passed_through() -> None:
    event = new_feature_event(
        "u", "f", 1, "v", source="PROVIDER_CACHE", metadata={"a": 1}, creation_date=TS
    )
    assert event.source == "PROVIDER_CACHE"
    assert event.metadata == {"a": 1}


# --- new_tracking_event -----------------------------------------------------------------


def test_new_tracking_event_from_mapping_uses_mapping_as_context() -> None:
    context = {"targetingKey": "u1", "anonymous": True, "plan": "pro"}
    event = new_tracking_event(context, "checkout", {"total": 9.5}, creation_date=TS * 1000)
    assert event == TrackingEvent(ANONYMOUS_USER, "u1", TS, "checkout", context, {"total": 9.5})


def test_new_tracking_event_from_object_uses_attributes() -> None:
    event = new_tracking_event(_OpenFeatureLike("u1", {"plan": "pro"}), "e", creation_date=TS)
    assert event.evaluation_context == {"plan": "pro"}
    explicit = new_tracking_event("u1", "e", evaluation_context={"x": 1}, creation_date=TS)
    assert explicit.evaluation_context == {"x": 1}
    assert new_tracking_event("u1", "e", creation_date=TS).evaluation_context == {}


# --- immutability and GC ----------------------------------------------------------------


def test_events_are_frozen() -> None:
    event = _feature()
    with pytest.raises(AttributeError):
        event.value = False  # type: ignore[misc]
    tracking = new_tracking_event("u", "e", creation_date=TS)
    with pytest.raises(AttributeError):
        tracking.key = "other"  # type: ignore[misc]
    assert hash(_feature()) == hash(_feature())


def test_events_are_not_gc_tracked() -> None:
    events = [
        _feature(),
        _feature(value={"nested": [1, 2]}, metadata={"a": {"b": 1}}),
        new_feature_event({"targetingKey": "u"}, "f", [1], "v", metadata={"m": 1}),
        new_tracking_event({"targetingKey": "u"}, "e", {"d": {"x": 1}}),
    ]
    for event in events:
        assert gc.is_tracked(event) is False
