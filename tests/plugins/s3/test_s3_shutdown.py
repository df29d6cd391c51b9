"""Bounded shutdown of the s3 exporter (issue 8): ``close(1.0)`` returns within 1.1 s and
counts every undelivered event, whether S3 hangs in the middle of an upload or refuses
connections; a process with an upload hung at close exits in time."""

from __future__ import annotations

from pathlib import Path

from flagsink_s3 import S3Exporter
from s3_moto_server import MotoServer

from flagsink.testing.faults import TcpProxy

COUNT = 40


def object_count(server: MotoServer, bucket: str) -> int:
    return int(server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0))


def test_close_returns_in_time_while_an_upload_hangs(s3_server, bucket, shutdown) -> None:
    with TcpProxy(s3_server.port) as proxy:
        exporter = S3Exporter(bucket=bucket, endpointUrl=proxy.url, forcePathStyle=True)
        scheduler = shutdown.scheduler(exporter, COUNT)
        shutdown.deliver(scheduler, COUNT)
        assert object_count(s3_server, bucket) == 1
        proxy.blackhole()  # S3 hangs: nothing answered, open connections stall

        shutdown.close_stuck(scheduler, COUNT)

    assert object_count(s3_server, bucket) == 1


def test_close_returns_in_time_when_s3_refuses_connections(refused_port, shutdown) -> None:
    exporter = S3Exporter(bucket="events", endpointUrl=f"http://127.0.0.1:{refused_port}")
    scheduler = shutdown.scheduler(exporter, COUNT, retry_initial=5.0)

    shutdown.close_failed(scheduler, COUNT)


def test_process_exits_in_time_while_an_upload_hangs(blackhole, shutdown, tmp_path: Path) -> None:
    settings = {"bucket": "events", "endpointUrl": blackhole.url, "forcePathStyle": True}

    shutdown.process_exits(
        "s3", settings, COUNT, sink_reached=shutdown.reached(blackhole), tmp_path=tmp_path
    )
