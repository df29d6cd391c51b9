"""Bounded shutdown of the sqs exporter (issue 8): ``close(1.0)`` returns within 1.1 s
and counts every undelivered event, whether SQS hangs in the middle of SendMessageBatch
requests (several at once, from the exporter's sending threads) or refuses connections;
a process with requests hung at close exits in time."""

from __future__ import annotations

from pathlib import Path

from flagsink_sqs import SqsExporter

from flagsink.testing.faults import TcpProxy

COUNT = 40  # four SendMessageBatch requests of 10, sent concurrently


def test_close_returns_in_time_while_requests_hang(moto, queue, shutdown) -> None:
    with TcpProxy(moto.port) as proxy:
        exporter = SqsExporter(queueUrl=queue.url, endpointUrl=proxy.url)
        scheduler = shutdown.scheduler(exporter, COUNT)
        shutdown.deliver(scheduler, COUNT)
        assert len(queue.read()) == COUNT
        proxy.blackhole()  # SQS hangs: nothing answered, open connections stall

        shutdown.close_stuck(scheduler, COUNT)

    assert len(queue.read()) == COUNT


def test_close_returns_in_time_when_sqs_refuses_connections(refused_port, shutdown) -> None:
    url = f"http://127.0.0.1:{refused_port}/000000000000/events"
    exporter = SqsExporter(queueUrl=url)
    scheduler = shutdown.scheduler(exporter, COUNT, retry_initial=5.0)

    shutdown.close_failed(scheduler, COUNT)


def test_process_exits_in_time_while_requests_hang(blackhole, shutdown, tmp_path: Path) -> None:
    settings = {"queueUrl": f"{blackhole.url}/000000000000/events"}

    shutdown.process_exits(
        "sqs", settings, COUNT, sink_reached=shutdown.reached(blackhole), tmp_path=tmp_path
    )
