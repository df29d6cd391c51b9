"""Fault suite, case 1 (issue 8) on Azure Blob (Azurite): ``flagsink serve`` with a spool
and the ``azureblob`` exporter is SIGKILLed at random times and at the named crash points
(after an append before its fsync, during spool compaction, after an upload before its
confirmation), restarted on the same spool, and the container is read back with the
Azure SDK: no acknowledged event is lost, duplicates stay within the batches in flight at
the kills, no batch is stored as two blobs, and (case 6) the spool's counters balance
after every kill.

The long variant (``-m long``) runs 50 trials.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import ContainerClient

from flagsink.testing.crash import Delivered, long_plans, run_crash_case, short_plans

POINTS = (
    "spool.after_append_before_fsync",
    "spool.during_compaction",
    "export.after_send_before_confirm",
)
MAX_BATCH = 50


def relay_config(options: dict[str, Any]) -> dict[str, Any]:
    return {
        "exporter": {
            "kind": "azureblob",
            **options,
            "flushInterval": 200,
            "maxEventInMemory": MAX_BATCH,
            "retryInitialInterval": 100,
            "retryMaxInterval": 1_000,
        }
    }


def read_container(container: ContainerClient) -> list[Delivered]:
    """Every blob with its ``flagsinkbatch`` metadata, read with the Azure SDK."""
    found: list[Delivered] = []
    for item in container.list_blobs(include=["metadata"]):
        lines = container.download_blob(item.name).readall().decode("utf-8").splitlines()
        batch = (item.metadata or {}).get("flagsinkbatch")
        found.append(Delivered([json.loads(line) for line in lines], item.name, batch))
    return found


def test_no_acknowledged_event_is_lost_and_no_batch_stored_twice(
    options: dict[str, Any], container: ContainerClient, tmp_path: Path
) -> None:
    result = run_crash_case(
        "azureblob",
        relay_config(options),
        tmp_path,
        plans=short_plans(POINTS, random_kills=2),
        read_back=lambda: read_container(container),
        objects=True,
        event_options={"tracking_every": 0},
    )
    print(result.summary())
    result.assert_sound(duplicate_objects_allowed=False)
    assert result.trials == 5
    assert len(result.points_reached) == len(POINTS)
    assert result.delivered == result.committed


@pytest.mark.long
def test_fifty_kills(options: dict[str, Any], container: ContainerClient, tmp_path: Path) -> None:
    result = run_crash_case(
        "azureblob",
        relay_config(options),
        tmp_path,
        plans=long_plans(POINTS, 50, random.Random()),
        read_back=lambda: read_container(container),
        objects=True,
        event_options={"tracking_every": 0},
        recover_timeout=120,
    )
    print(result.summary())
    result.assert_sound(duplicate_objects_allowed=False)
    assert result.trials >= 50
