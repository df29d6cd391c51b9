"""Bounded shutdown of the webhook exporter (issue 8): ``close(1.0)`` returns within
1.1 s and counts every undelivered event, whether the webhook hangs in the middle of a
request or refuses connections; a process with a request hung at close exits in time."""

from __future__ import annotations

from pathlib import Path

from flagsink_webhook import WebhookExporter

from flagsink.testing.faults import TcpProxy

COUNT = 40


def test_close_returns_in_time_while_a_request_hangs(webhook_server, shutdown) -> None:
    with TcpProxy(webhook_server.port) as proxy:
        exporter = WebhookExporter(endpointUrl=f"{proxy.url}/hook", timeout=30)
        scheduler = shutdown.scheduler(exporter, COUNT)
        shutdown.deliver(scheduler, COUNT)  # through the proxy, on a kept-alive connection
        assert len(webhook_server.events()) == COUNT
        proxy.blackhole()  # the webhook hangs: nothing answered, open connections stall

        shutdown.close_stuck(scheduler, COUNT)

    assert len(webhook_server.events()) == COUNT  # nothing more arrived


def test_close_returns_in_time_when_the_webhook_refuses_connections(refused_port, shutdown) -> None:
    exporter = WebhookExporter(endpointUrl=f"http://127.0.0.1:{refused_port}/hook")
    scheduler = shutdown.scheduler(exporter, COUNT, retry_initial=5.0)

    shutdown.close_failed(scheduler, COUNT)


def test_process_exits_in_time_while_a_request_hangs(blackhole, shutdown, tmp_path: Path) -> None:
    settings = {"endpointUrl": f"{blackhole.url}/hook", "timeout": 30}

    shutdown.process_exits(
        "webhook", settings, COUNT, sink_reached=shutdown.reached(blackhole), tmp_path=tmp_path
    )
