"""flagsink.testing.oracle: ids that survive a JSON round trip, and a report that finds
exactly the missing, duplicated, corrupted and unexpected events of a read-back."""

from __future__ import annotations

import json
import threading
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flagsink.event import FeatureEvent, TrackingEvent
from flagsink.testing import sample_events
from flagsink.testing.oracle import Oracle


def as_json(event: Any) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(event))
    return data


def test_events_carry_unique_ids_of_the_run_in_user_key() -> None:
    oracle = Oracle("r1")
    events = oracle.events(500)
    ids = [event.user_key for event in events]
    assert len(set(ids)) == 500
    assert all(key.startswith("oracle-r1-") for key in ids)
    assert ids[:2] == ["oracle-r1-000000000", "oracle-r1-000000001"]
    assert {type(event) for event in events} == {FeatureEvent, TrackingEvent}
    assert [oracle.id_of(event) for event in events] == ids
    assert all(oracle.id_of(json.dumps(as_json(event))) == event.user_key for event in events)
    assert oracle.id_of(sample_events(1)[0]) is None
    assert Oracle("r2").id_of(events[0]) is None  # another run's id


def test_stamp_replaces_only_the_user_key() -> None:
    oracle = Oracle("s")
    (original,) = sample_events(1)
    stamped = oracle.stamp(original)
    assert stamped.user_key == "oracle-s-000000000"
    assert {**as_json(stamped), "userKey": original.user_key} == as_json(original)


def test_payload_pads_events_to_a_size() -> None:
    feature, _, _, _, tracking = Oracle("b").events(5, payload=5_000)
    assert isinstance(feature, FeatureEvent)
    assert feature.value == "p" * 5_000 + "0"
    assert isinstance(tracking, TrackingEvent)
    assert tracking.tracking_event_details["pad"] == "p" * 5_000
    assert all(5_000 < len(msgspec.json.encode(e)) < 5_400 for e in (feature, tracking))


def test_exact_read_back_in_any_form_is_exact() -> None:
    oracle = Oracle()
    events = oracle.events(20)
    oracle.accepted(events)
    forms = [
        events[0],
        as_json(events[1]),
        json.dumps(as_json(events[2])),
        msgspec.json.encode(events[3]),
        *events[4:],
    ]
    report = oracle.report([*forms, *sample_events(3)])  # other events are ignored
    assert report.exact
    assert (report.accepted, report.read_back, report.delivered, report.foreign) == (
        20,
        20,
        20,
        3,
    )
    report.assert_exact()
    assert "0 missing, 0 duplicated (0 extra copies), 0 corrupted" in report.summary()


def test_missing_duplicated_corrupted_and_unexpected_are_named() -> None:
    oracle = Oracle("x")
    events = oracle.events(10)
    never_accepted = oracle.events(1)[0]
    oracle.accepted(events)
    corrupted = {**as_json(events[3]), "variation": "tampered"}
    read = [events[0], events[1], events[1], events[1], corrupted, *events[5:], never_accepted]
    report = oracle.report(read)
    ids = [event.user_key for event in events]
    assert report.missing == [ids[2], ids[4]]
    assert report.duplicated == {ids[1]: 3}
    assert report.extra_copies == 2
    assert report.corrupted == {ids[3]: {"variation": (events[3].variation, "tampered")}}
    assert report.unexpected == [never_accepted.user_key]
    assert not report.exact
    text = report.summary()
    for expected in (
        "2 missing",
        f"missing: {ids[2]}, {ids[4]}",
        f"{ids[1]} x3",
        f"corrupted {ids[3]}: variation: accepted '{events[3].variation}', read 'tampered'",
        f"unexpected: {never_accepted.user_key}",
    ):
        assert expected in text, text
    with pytest.raises(AssertionError, match="delivery is not exact"):
        report.assert_exact(max_duplicates=10)


def test_max_duplicates_bounds_the_extra_copies() -> None:
    oracle = Oracle()
    events = oracle.events(5)
    oracle.accepted(events)
    report = oracle.report([*events, events[0], events[0], events[4]])
    assert report.extra_copies == 3
    report.assert_exact(max_duplicates=3)
    with pytest.raises(AssertionError, match="at most 2 extra copies"):
        report.assert_exact(max_duplicates=2)


def test_dead_letters_account_for_rejected_events() -> None:
    oracle = Oracle()
    events = oracle.events(6)
    oracle.accepted(events)
    letters = [{"reason": "too big", "event": as_json(event)} for event in events[4:]]
    report = oracle.report(events[:4], dead_letters=[letter["event"] for letter in letters])
    assert report.exact
    assert report.dead_lettered == [events[4].user_key, events[5].user_key]
    assert report.delivered == 4
    # Delivered and dead-lettered: one event twice.
    both = oracle.report(events, dead_letters=[as_json(events[5])])
    assert both.duplicated == {events[5].user_key: 2}


def test_a_field_lost_or_added_is_corruption() -> None:
    oracle = Oracle()
    (event,) = oracle.events(1)
    oracle.accepted([event])
    lost = {k: v for k, v in as_json(event).items() if k != "source"}
    report = oracle.report([lost])
    assert report.corrupted == {event.user_key: {"source": (event.source, None)}}
    added = {**as_json(event), "extra": 1}
    assert oracle.report([added]).corrupted == {event.user_key: {"extra": (None, 1)}}


def test_accepting_an_event_without_an_id_or_twice_differently_is_an_error() -> None:
    oracle = Oracle("r")
    with pytest.raises(ValueError, match=r"Oracle\.events\(\) or Oracle\.stamp\(\)"):
        oracle.accepted(sample_events(1))
    (event,) = oracle.events(1)
    oracle.accepted([event])
    oracle.accepted([event])  # the same again: fine
    assert oracle.accepted_count == 1
    other = msgspec.structs.replace(event, key="another-flag")
    with pytest.raises(ValueError, match="accepted twice with other content"):
        oracle.accepted([other])
    with pytest.raises(ValueError, match="cannot contain"):
        Oracle("a-b")


def test_accepted_from_many_threads_at_once() -> None:
    oracle = Oracle()
    batches = [oracle.events(1_000) for _ in range(8)]
    threads = [threading.Thread(target=oracle.accepted, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert oracle.accepted_count == 8_000
    oracle.report([event for batch in batches for event in batch]).assert_exact()


@given(
    fates=st.lists(
        st.sampled_from(["once", "lost", "twice", "thrice", "corrupt", "dead"]),
        min_size=1,
        max_size=60,
    ),
    shuffle=st.randoms(use_true_random=False),
)
def test_report_matches_a_plain_model_of_what_happened(fates: list[str], shuffle: Any) -> None:
    oracle = Oracle("h")
    events = oracle.events(len(fates))
    oracle.accepted(events)
    read: list[Any] = []
    dead: list[Any] = []
    for event, fate in zip(events, fates, strict=True):
        copies = {"once": 1, "lost": 0, "twice": 2, "thrice": 3, "corrupt": 1, "dead": 0}[fate]
        read += [event] * copies
        if fate == "corrupt":
            read[-1] = {**as_json(event), "creationDate": event.creation_date + 1}
        if fate == "dead":
            dead.append(as_json(event))
    shuffle.shuffle(read)
    report = oracle.report(read, dead_letters=dead)

    def ids(*wanted: str) -> list[str]:
        return sorted(e.user_key for e, f in zip(events, fates, strict=True) if f in wanted)

    assert report.missing == ids("lost")
    assert report.duplicated == {
        e.user_key: {"twice": 2, "thrice": 3}[f]
        for e, f in zip(events, fates, strict=True)
        if f in ("twice", "thrice")
    }
    assert sorted(report.corrupted) == ids("corrupt")
    assert report.dead_lettered == ids("dead")
    assert report.unexpected == []
    assert report.delivered == len(ids("once", "twice", "thrice", "corrupt"))
    assert report.read_back == len(read) + len(dead)
    assert report.exact == (set(fates) <= {"once", "dead"})
