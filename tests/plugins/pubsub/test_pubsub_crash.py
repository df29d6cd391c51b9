"""Fault suite, case 1 (issue 8) on Google Cloud Pub/Sub (the emulator): ``flagsink serve``
with a spool and the ``pubsub`` exporter is SIGKILLed at random times and at the named
crash points (after an append before its fsync, during spool compaction, after a publish
before its confirmation), restarted on the same spool, and the subscription is pulled by
an independent subscriber: no acknowledged event is lost, duplicates stay within the
batches in flight at the kills, and (case 6) the spool's counters balance after every kill.

The long variant (``-m long``) runs 50 trials.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from flagsink.testing.crash import Delivered, long_plans, run_crash_case, short_plans

from .emulator import PROJECT, Topic

POINTS = (
    "spool.after_append_before_fsync",
    "spool.during_compaction",
    "export.after_send_before_confirm",
)
MAX_BATCH = 50


def relay_config(topic: Topic) -> dict[str, Any]:
    return {
        "exporter": {
            "kind": "pubsub",
            "projectID": PROJECT,
            "topic": topic.name,
            "publishTimeout": 5.0,
            "flushInterval": 200,
            "maxEventInMemory": MAX_BATCH,
            "retryInitialInterval": 100,
            "retryMaxInterval": 1_000,
        }
    }


def read_subscription(topic: Topic) -> list[Delivered]:
    """Every message pulled (and acknowledged), one item each."""
    topic.pull()
    return [Delivered([message.record], message.message_id) for message in topic.received]


def test_no_acknowledged_event_is_lost(topic: Topic, tmp_path: Path) -> None:
    result = run_crash_case(
        "pubsub",
        relay_config(topic),
        tmp_path,
        plans=short_plans(POINTS, random_kills=2),
        read_back=lambda: read_subscription(topic),
        event_options={"tracking_every": 0},
    )
    print(result.summary())
    result.assert_sound()
    assert result.trials == 5
    assert len(result.points_reached) == len(POINTS)
    assert result.delivered == result.committed


@pytest.mark.long
def test_fifty_kills(topic: Topic, tmp_path: Path) -> None:
    result = run_crash_case(
        "pubsub",
        relay_config(topic),
        tmp_path,
        plans=long_plans(POINTS, 50, random.Random()),
        read_back=lambda: read_subscription(topic),
        event_options={"tracking_every": 0},
        recover_timeout=120,
    )
    print(result.summary())
    result.assert_sound()
    assert result.trials >= 50
