"""Fault suite, case 1 (issue 8) on Kafka (Tansu): ``flagsink serve`` with a spool and the
``kafka`` exporter (idempotent producer) is SIGKILLed at random times and at the named
crash points (after an append before its fsync, during spool compaction, after a send
before its confirmation), restarted on the same spool, and the topic is read back by an
independent consumer: no acknowledged event is lost, duplicates stay within the batches in
flight at the kills (a batch the producer sent but the spool did not confirm is sent again
by the next process, a new producer), and (case 6) the spool's counters balance after
every kill.

The long variant (``-m long``) runs 50 trials.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flagsink.testing.crash import Delivered, long_plans, run_crash_case, short_plans

from .tansu import Tansu, TopicReader

POINTS = (
    "spool.after_append_before_fsync",
    "spool.during_compaction",
    "export.after_send_before_confirm",
)
MAX_BATCH = 50


def relay_config(broker: Tansu, topic: str) -> dict[str, Any]:
    return {
        "exporter": {
            "kind": "kafka",
            "kafka": {
                "topic": topic,
                "addresses": [broker.bootstrap],
                "config": {"message.timeout.ms": 5_000, "linger.ms": 1},
            },
            "flushInterval": 200,
            "maxEventInMemory": MAX_BATCH,
            "retryInitialInterval": 100,
            "retryMaxInterval": 1_000,
        }
    }


def reader_of(
    broker: Tansu, topic: str, readers: list[TopicReader]
) -> Callable[[], list[Delivered]]:
    def read() -> list[Delivered]:
        reader = broker.reader(topic, group=False)
        readers.append(reader)
        return [
            Delivered([json.loads(message.value() or b"null")], f"{topic}/{message.partition()}")
            for message in reader.read()
        ]

    return read


def test_no_acknowledged_event_is_lost(
    broker: Tansu, make_topic: Callable[..., str], readers: list[TopicReader], tmp_path: Path
) -> None:
    topic = make_topic()
    result = run_crash_case(
        "kafka",
        relay_config(broker, topic),
        tmp_path,
        plans=short_plans(POINTS, random_kills=2),
        read_back=reader_of(broker, topic, readers),
        event_options={"tracking_every": 0},
    )
    print(result.summary())
    result.assert_sound()
    assert result.trials == 5
    assert len(result.points_reached) == len(POINTS)
    assert result.delivered == result.committed


@pytest.mark.long
def test_fifty_kills(
    broker: Tansu, make_topic: Callable[..., str], readers: list[TopicReader], tmp_path: Path
) -> None:
    topic = make_topic()
    result = run_crash_case(
        "kafka",
        relay_config(broker, topic),
        tmp_path,
        plans=long_plans(POINTS, 50, random.Random()),
        read_back=reader_of(broker, topic, readers),
        event_options={"tracking_every": 0},
        recover_timeout=120,
    )
    print(result.summary())
    result.assert_sound()
    assert result.trials >= 50
