"""Lenient decoding of JSON events (GO Feature Flag's collector rules)."""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flagsink.event import FeatureEvent, TrackingEvent
from flagsink.wire import EventDecodeError, decode_event

TS = 1_700_000_000


def _json(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def test_feature_event_decoded() -> None:
    data = _json(
        kind="feature",
        contextKind="anonymousUser",
        userKey="u1",
        creationDate=TS,
        key="flag",
        variation="on",
        value={"a": [1, 2]},
        default=True,
        version="7",
        source="SERVER",
        metadata={"env": "prod"},
    )
    assert decode_event(data) == FeatureEvent(
        "anonymousUser", "u1", TS, "flag", "on", {"a": [1, 2]}, True, "7", "SERVER",
        {"env": "prod"},
    )  # fmt: skip


def test_str_input_accepted() -> None:
    event = decode_event('{"key":"flag","creationDate":1700000000}')
    assert isinstance(event, FeatureEvent)
    assert event.key == "flag"


def test_tracking_event_decoded() -> None:
    data = _json(
        kind="tracking",
        userKey="u1",
        creationDate=TS,
        key="checkout",
        evaluationContext={"plan": "pro"},
        trackingEventDetails={"total": 3},
        value="ignored",
        source="ignored",
    )
    assert decode_event(data, default_source="X", meta={"m": 1}) == TrackingEvent(
        "user", "u1", TS, "checkout", {"plan": "pro"}, {"total": 3}
    )


def test_tracking_event_missing_maps_become_empty() -> None:
    event = decode_event(_json(kind="tracking", key="e", creationDate=TS))
    assert isinstance(event, TrackingEvent)
    assert (event.evaluation_context, event.tracking_event_details) == ({}, {})


@pytest.mark.parametrize("kind", ["feature", "custom", "", "Tracking", "TRACKING"])
def test_any_kind_but_tracking_is_a_feature_event(kind: str) -> None:
    assert type(decode_event(_json(kind=kind, key="k", creationDate=TS))) is FeatureEvent


def test_missing_kind_and_defaults() -> None:
    event = decode_event(_json(key="k", creationDate=TS))
    assert event == FeatureEvent("user", "", TS, "k", "", None, False, "", "", None)


def test_empty_context_kind_becomes_user() -> None:
    assert decode_event(_json(key="k", contextKind="", creationDate=TS)).context_kind == "user"


@pytest.mark.parametrize(
    ("given", "seconds"),
    [(TS, TS), (TS * 1000 + 456, TS), (TS + 0.75, TS), (TS * 1000.0, TS)],
)
def test_creation_date_normalised(given: float, seconds: int) -> None:
    assert decode_event(_json(key="k", creationDate=given)).creation_date == seconds


def test_missing_creation_date_is_now() -> None:
    before = int(time.time())
    event = decode_event(_json(key="k"))
    assert before <= event.creation_date <= int(time.time())


@pytest.mark.parametrize(("version", "text"), [(2, "2"), (2.0, "2"), (2.5, "2.5"), ("v3", "v3")])
def test_version_as_text(version: Any, text: str) -> None:
    event = decode_event(_json(key="k", version=version, creationDate=TS))
    assert isinstance(event, FeatureEvent)
    assert event.version == text


def test_default_source_applied_only_when_source_empty() -> None:
    empty = decode_event(_json(key="k", creationDate=TS), default_source="PROVIDER_CACHE")
    blank = decode_event(_json(key="k", source="", creationDate=TS), default_source="X")
    given_ = decode_event(_json(key="k", source="INPROCESS", creationDate=TS), default_source="X")
    assert isinstance(empty, FeatureEvent)
    assert isinstance(blank, FeatureEvent)
    assert isinstance(given_, FeatureEvent)
    assert (empty.source, blank.source, given_.source) == ("PROVIDER_CACHE", "X", "INPROCESS")


def test_meta_replaces_metadata() -> None:
    data = _json(key="k", metadata={"own": 1}, creationDate=TS)
    replaced = decode_event(data, meta={"provider": "python"})
    kept_none = decode_event(data, meta=None)
    kept_empty = decode_event(data, meta={})
    added = decode_event(_json(key="k", creationDate=TS), meta={"provider": "python"})
    assert isinstance(replaced, FeatureEvent)
    assert isinstance(kept_none, FeatureEvent)
    assert isinstance(kept_empty, FeatureEvent)
    assert isinstance(added, FeatureEvent)
    assert replaced.metadata == {"provider": "python"}
    assert kept_none.metadata == {"own": 1}
    assert kept_empty.metadata == {"own": 1}
    assert added.metadata == {"provider": "python"}


def test_empty_metadata_becomes_none() -> None:
    event = decode_event(_json(key="k", metadata={}, creationDate=TS))
    assert isinstance(event, FeatureEvent)
    assert event.metadata is None


def test_null_fields_read_as_absent() -> None:
    # Go's encoding/json leaves a field at its zero value for null; so does flagsink.
    data = _json(
        kind=None,
        contextKind=None,
        userKey=None,
        creationDate=TS,
        key="k",
        variation=None,
        value=None,
        default=None,
        version=None,
        source=None,
        metadata=None,
    )
    assert decode_event(data, default_source="PROVIDER_CACHE") == FeatureEvent(
        "user", "", TS, "k", "", None, False, "", "PROVIDER_CACHE", None
    )
    tracking = _json(kind="tracking", key="e", creationDate=TS, evaluationContext=None)
    assert decode_event(tracking) == TrackingEvent("user", "", TS, "e", {}, {})


def test_unknown_fields_ignored() -> None:
    data = _json(key="k", creationDate=TS, somethingNew={"x": 1}, another=[1], user_key="snake")
    assert decode_event(data) == decode_event(_json(key="k", creationDate=TS))


@pytest.mark.parametrize("data", [_json(userKey="u"), _json(key=""), _json(kind="tracking")])
def test_missing_key_is_an_error_naming_key(data: bytes) -> None:
    with pytest.raises(EventDecodeError, match="`key`"):
        decode_event(data)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("key", 1),
        ("userKey", 5),
        ("contextKind", ["user"]),
        ("creationDate", "yesterday"),
        ("variation", False),
        ("default", "yes"),
        ("version", [1]),
        ("source", {}),
        ("metadata", [1]),
        ("evaluationContext", "x"),
        ("trackingEventDetails", 3),
        ("kind", 1),
    ],
)
def test_wrong_type_names_the_field(field: str, value: Any) -> None:
    fields: dict[str, Any] = {"key": "k", "creationDate": TS, field: value}
    with pytest.raises(EventDecodeError) as info:
        decode_event(_json(**fields))
    assert f"`{field}`" in str(info.value)
    assert "$." not in str(info.value)


@pytest.mark.parametrize("data", [b"", b"not json", b"{", b"[]", b"42", b'"event"'])
def test_malformed_input_is_an_event_decode_error(data: bytes) -> None:
    with pytest.raises(EventDecodeError):
        decode_event(data)


def test_event_decode_error_is_a_value_error() -> None:
    assert issubclass(EventDecodeError, ValueError)


# --- round trip ---------------------------------------------------------------------------

_text = st.text(max_size=20)
_nonempty = st.text(min_size=1, max_size=20)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)
_json_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=12,
)
_maps = st.dictionaries(_text, _json_values, max_size=4)
_dates = st.integers(min_value=0, max_value=9_999_999_999)

_features = st.builds(
    FeatureEvent,
    context_kind=_nonempty,
    user_key=_text,
    creation_date=_dates,
    key=_nonempty,
    variation=_text,
    value=_json_values,
    default=st.booleans(),
    version=_text,
    source=_text,
    metadata=st.none() | st.dictionaries(_text, _json_values, min_size=1, max_size=4),
)
_trackings = st.builds(
    TrackingEvent,
    context_kind=_nonempty,
    user_key=_text,
    creation_date=_dates,
    key=_nonempty,
    evaluation_context=_maps,
    tracking_event_details=_maps,
)


@settings(max_examples=300, deadline=None)
@given(_features | _trackings)
def test_encode_then_decode_round_trips(event: FeatureEvent | TrackingEvent) -> None:
    assert decode_event(msgspec.json.encode(event)) == event
