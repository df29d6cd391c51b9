"""S3 behind a TCP proxy that cuts, resets and slows the connections to a real server
(moto): every event ends up stored exactly once, in one object per batch."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from flagsink_s3 import S3Exporter
from s3_moto_server import MIN_PART_SIZE, MotoServer

from flagsink.event import new_feature_event
from flagsink.scheduler import DataExporterScheduler
from flagsink.testing import wait_until
from flagsink.testing.faults import TcpProxy


def stored_users(server: MotoServer, bucket: str) -> tuple[Counter[str], int]:
    """How often each userKey was stored, and how many objects hold them."""
    s3 = server.client()
    users: Counter[str] = Counter()
    objects = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            users.update(json.loads(line)["userKey"] for line in body.splitlines())
            objects += 1
    return users, objects


def scheduler_through(proxy: TcpProxy, bucket: str, batch: int) -> DataExporterScheduler:
    exporter = S3Exporter(
        bucket=bucket, endpointUrl=proxy.url, format="json", part_size=MIN_PART_SIZE
    )
    return DataExporterScheduler(
        exporter,
        flush_interval=600,
        max_events_in_memory=batch,
        retry_initial=0.05,
        retry_max=0.2,
    )


@pytest.mark.parametrize("count", [300, 1_500], ids=["put", "multipart"])
def test_connections_reset_mid_request_store_every_event_once(
    s3_server: MotoServer, bucket: str, count: int
) -> None:
    with TcpProxy(s3_server.port) as proxy:
        # The first requests that carry a body are cut after 4 KiB went upstream.
        proxy.reset_after(4_096, times=3)
        scheduler = scheduler_through(proxy, bucket, count)
        scheduler.add_events([new_feature_event(f"u{i}", "flag", i, "v") for i in range(count)])
        assert scheduler.flush(60), scheduler.stats()
        scheduler.close(5)
        assert proxy.stats().resets >= 1
    users, objects = stored_users(s3_server, bucket)
    assert users == Counter(f"u{i}" for i in range(count))
    assert objects == 1
    assert s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_a_cut_network_is_retried_until_it_comes_back(s3_server: MotoServer, bucket: str) -> None:
    with TcpProxy(s3_server.port) as proxy:
        scheduler = scheduler_through(proxy, bucket, 200)
        proxy.cut()
        scheduler.add_events([new_feature_event(f"u{i}", "flag", i, "v") for i in range(400)])
        scheduler.request_flush()
        assert wait_until(lambda: scheduler.stats().failed_attempts >= 2, 30)
        assert scheduler.stats().exported == 0
        proxy.restore()
        proxy.delay(0.01)  # and a slow network on the way back
        assert scheduler.flush(60), scheduler.stats()
        stats = scheduler.stats()
        scheduler.close(5)
    assert stats.exported == 400
    assert stats.received == stats.exported + stats.dropped + stats.buffered + stats.in_flight
    users, objects = stored_users(s3_server, bucket)
    assert users == Counter(f"u{i}" for i in range(400))
    assert objects == 2
