"""Fault suite, case 1 (issue 8) on Kinesis Data Streams (moto): ``flagsink serve`` with a
spool and the ``kinesis`` exporter is SIGKILLed at random times and at the named crash
points (after an append before its fsync, during spool compaction, after a PutRecords
before its confirmation), restarted on the same spool, and every shard is read back from
TRIM_HORIZON: no acknowledged event is lost, duplicates stay within the batches in flight
at the kills, and (case 6) the spool's counters balance after every kill.

The long variant (``-m long``) runs 50 trials.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from moto_support import MotoServer

from flagsink.testing.crash import Delivered, long_plans, run_crash_case, short_plans

from .conftest import Stream

POINTS = (
    "spool.after_append_before_fsync",
    "spool.during_compaction",
    "export.after_send_before_confirm",
)
MAX_BATCH = 50


def relay_config(moto: MotoServer, stream: Stream) -> dict[str, Any]:
    return {
        "exporter": {
            "kind": "kinesis",
            "streamName": stream.name,
            "endpointUrl": moto.endpoint,
            "flushInterval": 200,
            "maxEventInMemory": MAX_BATCH,
            "retryInitialInterval": 100,
            "retryMaxInterval": 1_000,
        }
    }


def read_stream(stream: Stream) -> list[Delivered]:
    """Every record of every shard, one item each."""
    return [Delivered([record.json], record.shard) for record in stream.records()]


def test_no_acknowledged_event_is_lost(moto: MotoServer, stream: Stream, tmp_path: Path) -> None:
    result = run_crash_case(
        "kinesis",
        relay_config(moto, stream),
        tmp_path,
        plans=short_plans(POINTS, random_kills=2),
        read_back=lambda: read_stream(stream),
        event_options={"tracking_every": 0},
    )
    print(result.summary())
    result.assert_sound()
    assert result.trials == 5
    assert len(result.points_reached) == len(POINTS)
    assert result.delivered == result.committed


@pytest.mark.long
def test_fifty_kills(moto: MotoServer, stream: Stream, tmp_path: Path) -> None:
    result = run_crash_case(
        "kinesis",
        relay_config(moto, stream),
        tmp_path,
        plans=long_plans(POINTS, 50, random.Random()),
        read_back=lambda: read_stream(stream),
        event_options={"tracking_every": 0},
        recover_timeout=120,
    )
    print(result.summary())
    result.assert_sound()
    assert result.trials >= 50
