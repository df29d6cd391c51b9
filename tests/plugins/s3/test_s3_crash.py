"""Fault suite, case 1 (issue 8) on S3 (moto): ``flagsink serve`` with a spool and the
``s3`` exporter is SIGKILLed at random times and at every named crash point (after an
append before its fsync, during spool compaction, after an upload before its
confirmation, between two parts of a multipart upload), restarted on the same spool, and
the bucket is read back with boto3: no acknowledged event is lost, duplicates stay within
the batches in flight at the kills, no batch is stored as two objects (deterministic names
and create-only writes), and (case 6) the spool's counters balance after every kill.

The long variant (``-m long``) runs 50 trials.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from s3_moto_server import MotoServer

from flagsink.testing.crash import CrashPlan, Delivered, long_plans, run_crash_case, short_plans

POINTS = (
    "spool.after_append_before_fsync",
    "spool.during_compaction",
    "export.after_send_before_confirm",
)
MAX_BATCH = 50
#: A batch of 1,000 events of ~9.3 KB is ~9.3 MB: a multipart upload of two parts (the
#: exporter's parts are 8 MiB), so the process can die between them.
BIG_BATCH = 1_000
PAYLOAD = 9_000


def exporter(server: MotoServer, bucket: str, **options: Any) -> dict[str, Any]:
    return {
        "kind": "s3",
        "bucket": bucket,
        "endpointUrl": server.endpoint,
        "flushInterval": 200,
        "maxEventInMemory": MAX_BATCH,
        "retryInitialInterval": 100,
        "retryMaxInterval": 1_000,
        **options,
    }


def read_bucket(server: MotoServer, bucket: str) -> list[Delivered]:
    """Every object with its ``flagsink-batch`` metadata, read with boto3."""
    s3 = server.client()
    found: list[Delivered] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            answer = s3.get_object(Bucket=bucket, Key=item["Key"])
            lines = answer["Body"].read().decode("utf-8").splitlines()
            batch = answer["Metadata"].get("flagsink-batch")
            found.append(Delivered([json.loads(line) for line in lines], item["Key"], batch))
    return found


def test_no_acknowledged_event_is_lost_and_no_batch_stored_twice(
    s3_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    result = run_crash_case(
        "s3",
        {"exporter": exporter(s3_server, bucket)},
        tmp_path,
        plans=short_plans(POINTS, random_kills=2),
        read_back=lambda: read_bucket(s3_server, bucket),
        objects=True,
        event_options={"tracking_every": 0},
    )
    print(result.summary())
    result.assert_sound(duplicate_objects_allowed=False)
    assert result.trials == 5
    assert len(result.points_reached) == len(POINTS)
    assert result.delivered == result.committed


def test_a_kill_between_two_parts_of_a_multipart_upload(
    s3_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    result = run_crash_case(
        "s3",
        {"exporter": exporter(s3_server, bucket, maxEventInMemory=BIG_BATCH, flushInterval=5_000)},
        tmp_path,
        plans=[CrashPlan("objectstore.during_multipart", 1)],
        read_back=lambda: read_bucket(s3_server, bucket),
        objects=True,
        event_options={"tracking_every": 0, "payload": PAYLOAD},
        batch_size=100,
    )
    # The killed upload stays unfinished in the bucket (not an object: a lifecycle rule
    # `AbortIncompleteMultipartUpload` removes it); the retry after the restart is a new one.
    unfinished = s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    print(result.summary(), f"unfinished_multipart_uploads={len(unfinished)}")
    result.assert_sound(duplicate_objects_allowed=False)
    assert result.points_reached == {"objectstore.during_multipart:1": 1}
    assert result.delivered == result.committed
    assert len(unfinished) <= 1


@pytest.mark.long
def test_fifty_kills(s3_server: MotoServer, bucket: str, tmp_path: Path) -> None:
    result = run_crash_case(
        "s3",
        {"exporter": exporter(s3_server, bucket)},
        tmp_path,
        plans=long_plans(POINTS, 50, random.Random()),
        read_back=lambda: read_bucket(s3_server, bucket),
        objects=True,
        event_options={"tracking_every": 0},
        recover_timeout=120,
    )
    print(result.summary())
    result.assert_sound(duplicate_objects_allowed=False)
    assert result.trials >= 50
