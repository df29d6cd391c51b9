"""Bounded shutdown of the pubsub exporter (issue 8): ``close(1.0)`` returns within 1.1 s
and counts every undelivered event, whether Pub/Sub hangs while publishes are in flight
or refuses connections; a process with publishes hung at close exits in time."""

from __future__ import annotations

from pathlib import Path

import pytest
from flagsink_pubsub import PubSubExporter

from flagsink.testing.faults import TcpProxy

from .emulator import PROJECT

COUNT = 40


def test_close_returns_in_time_while_publishes_hang(
    pubsub, topic, shutdown, monkeypatch: pytest.MonkeyPatch
) -> None:
    with TcpProxy(pubsub.emulator.port) as proxy:
        monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{proxy.port}")
        exporter = PubSubExporter(projectID=PROJECT, topic=topic.name)
        scheduler = shutdown.scheduler(exporter, COUNT)
        shutdown.deliver(scheduler, COUNT)
        assert len(topic.drain(COUNT)) == COUNT
        proxy.blackhole()  # Pub/Sub hangs: nothing answered, open connections stall

        shutdown.close_stuck(scheduler, COUNT)


def test_close_returns_in_time_when_pubsub_refuses_connections(
    refused_port, shutdown, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{refused_port}")
    # Publishes fail after 2 s of retries (default 10 s: the same path, slower).
    exporter = PubSubExporter(projectID=PROJECT, topic="events", publishTimeout=2.0)
    scheduler = shutdown.scheduler(exporter, COUNT, retry_initial=5.0)

    shutdown.close_failed(scheduler, COUNT)


def test_process_exits_in_time_while_publishes_hang(blackhole, shutdown, tmp_path: Path) -> None:
    shutdown.process_exits(
        "pubsub",
        {"projectID": PROJECT, "topic": "events"},
        COUNT,
        sink_reached=shutdown.reached(blackhole),
        tmp_path=tmp_path,
        env={"PUBSUB_EMULATOR_HOST": f"127.0.0.1:{blackhole.port}"},
    )
