"""Fault suite, case 1 (issue 8) on the webhook (a real HTTP server that records every
request): ``flagsink serve`` with a spool and the ``webhook`` exporter is SIGKILLed at
random times and at the named crash points (after an append before its fsync, during spool
compaction, after a request before its confirmation), restarted on the same spool, and the
requests the server answered 2xx are read back: no acknowledged event is lost, duplicates
stay within the batches in flight at the kills, and (case 6) the spool's counters balance
after every kill.

The long variant (``-m long``) runs 50 trials.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from flagsink.testing.crash import Delivered, long_plans, run_crash_case, short_plans

from .conftest import WebhookServer

POINTS = (
    "spool.after_append_before_fsync",
    "spool.during_compaction",
    "export.after_send_before_confirm",
)
MAX_BATCH = 50


def relay_config(server: WebhookServer) -> dict[str, Any]:
    return {
        "exporter": {
            "kind": "webhook",
            "endpointUrl": server.url,
            "flushInterval": 200,
            "maxEventInMemory": MAX_BATCH,
            "retryInitialInterval": 100,
            "retryMaxInterval": 1_000,
        }
    }


def read_requests(server: WebhookServer) -> list[Delivered]:
    """The events of every complete request the server answered 2xx, one item per request.

    A request cut off by a kill (its body shorter than its ``Content-Length``) is recorded
    by the test server but is not a delivery: a real receiver cannot parse it either.
    """
    return [
        Delivered(request.json()["events"], f"request {index}")
        for index, request in enumerate(server.accepted())
        if len(request.body) == int(request.headers.get("content-length", -1))
    ]


def test_no_acknowledged_event_is_lost(webhook_server: WebhookServer, tmp_path: Path) -> None:
    result = run_crash_case(
        "webhook",
        relay_config(webhook_server),
        tmp_path,
        plans=short_plans(POINTS, random_kills=2),
        read_back=lambda: read_requests(webhook_server),
        event_options={"tracking_every": 0},
    )
    print(result.summary())
    result.assert_sound()
    assert result.trials == 5
    assert len(result.points_reached) == len(POINTS)
    assert result.delivered == result.committed


@pytest.mark.long
def test_fifty_kills(webhook_server: WebhookServer, tmp_path: Path) -> None:
    result = run_crash_case(
        "webhook",
        relay_config(webhook_server),
        tmp_path,
        plans=long_plans(POINTS, 50, random.Random()),
        read_back=lambda: read_requests(webhook_server),
        event_options={"tracking_every": 0},
        recover_timeout=120,
    )
    print(result.summary())
    result.assert_sound()
    assert result.trials >= 50
