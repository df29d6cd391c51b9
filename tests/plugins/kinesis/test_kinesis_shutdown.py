"""Bounded shutdown of the kinesis exporter (issue 8): ``close(1.0)`` returns within
1.1 s and counts every undelivered event, whether Kinesis hangs in the middle of a
PutRecords or refuses connections; a process with a request hung at close exits in time."""

from __future__ import annotations

from pathlib import Path

from flagsink_kinesis import KinesisExporter

from flagsink.testing.faults import TcpProxy

COUNT = 40


def test_close_returns_in_time_while_a_request_hangs(moto, stream, shutdown) -> None:
    with TcpProxy(moto.port) as proxy:
        exporter = KinesisExporter(streamName=stream.name, endpointUrl=proxy.url)
        scheduler = shutdown.scheduler(exporter, COUNT)
        shutdown.deliver(scheduler, COUNT)
        assert len(stream.records()) == COUNT
        proxy.blackhole()  # Kinesis hangs: nothing answered, open connections stall

        shutdown.close_stuck(scheduler, COUNT)

    assert len(stream.records()) == COUNT


def test_close_returns_in_time_when_kinesis_refuses_connections(refused_port, shutdown) -> None:
    exporter = KinesisExporter(streamName="events", endpointUrl=f"http://127.0.0.1:{refused_port}")
    scheduler = shutdown.scheduler(exporter, COUNT, retry_initial=5.0)

    shutdown.close_failed(scheduler, COUNT)


def test_process_exits_in_time_while_a_request_hangs(blackhole, shutdown, tmp_path: Path) -> None:
    settings = {"streamName": "events", "endpointUrl": blackhole.url}

    shutdown.process_exits(
        "kinesis", settings, COUNT, sink_reached=shutdown.reached(blackhole), tmp_path=tmp_path
    )
