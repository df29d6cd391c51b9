"""Fault suite, case 1 (issue 8) on SQS (moto): ``flagsink serve`` with a spool and the
``sqs`` exporter is SIGKILLed at random times and at the named crash points (after an
append before its fsync, during spool compaction, after a SendMessageBatch before its
confirmation), restarted on the same spool, and the queue is drained by an independent
consumer (on a thread during the run, as in production: moto slows down with a long
queue): no acknowledged event is lost, duplicates stay within the batches in flight at
the kills (a standard queue has no deduplication), and (case 6) the spool's counters
balance after every kill.

The long variant (``-m long``) runs 50 trials.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flagsink.testing.crash import Delivered, long_plans, run_crash_case, short_plans

from .conftest import Queue

POINTS = (
    "spool.after_append_before_fsync",
    "spool.during_compaction",
    "export.after_send_before_confirm",
)
MAX_BATCH = 50
#: Events per second the clients post: what moto's SQS takes in without falling behind.
RATE = 1_000


def relay_config(queue: Queue) -> dict[str, Any]:
    return {
        "exporter": {
            "kind": "sqs",
            "queueUrl": queue.url,
            "flushInterval": 200,
            "maxEventInMemory": MAX_BATCH,
            "retryInitialInterval": 100,
            "retryMaxInterval": 1_000,
        }
    }


@contextlib.contextmanager
def consumed(queue: Queue) -> Iterator[Callable[[], list[Delivered]]]:
    """A consumer drains ``queue`` during the block; the read-back it yields stops that
    consumer first, then receives what is left: every message once, one item each."""
    with contextlib.ExitStack() as draining:
        draining.enter_context(queue.draining())

        def read() -> list[Delivered]:
            draining.close()
            return [Delivered([json.loads(m["Body"])]) for m in queue.receive(timeout=120)]

        yield read


def test_no_acknowledged_event_is_lost(queue: Queue, tmp_path: Path) -> None:
    with consumed(queue) as read_back:
        result = run_crash_case(
            "sqs",
            relay_config(queue),
            tmp_path,
            plans=short_plans(POINTS, random_kills=2),
            read_back=read_back,
            event_options={"tracking_every": 0},
            rate=RATE,
        )
    print(result.summary())
    result.assert_sound()
    assert result.trials == 5
    assert len(result.points_reached) == len(POINTS)
    assert result.delivered == result.committed


@pytest.mark.long
def test_fifty_kills(queue: Queue, tmp_path: Path) -> None:
    with consumed(queue) as read_back:
        result = run_crash_case(
            "sqs",
            relay_config(queue),
            tmp_path,
            plans=long_plans(POINTS, 50, random.Random()),
            read_back=read_back,
            event_options={"tracking_every": 0},
            rate=RATE,
            recover_timeout=120,
        )
    print(result.summary())
    result.assert_sound()
    assert result.trials >= 50
