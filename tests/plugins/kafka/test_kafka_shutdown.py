"""Bounded shutdown of the kafka exporter (issue 8): ``close(1.0)`` returns within 1.1 s
and counts every undelivered event, whether the broker hangs (frozen with open
connections) while messages wait for their delivery reports, or refuses connections; a
process with an export hung at close exits in time."""

from __future__ import annotations

from pathlib import Path

from flagsink_kafka import KafkaExporter

from .conftest import new_topic_name

COUNT = 40


def test_close_returns_in_time_while_the_broker_hangs(fresh_broker, shutdown) -> None:
    topic = new_topic_name()
    fresh_broker.create_topic(topic)
    exporter = KafkaExporter(kafka={"topic": topic, "addresses": [fresh_broker.bootstrap]})
    scheduler = shutdown.scheduler(exporter, COUNT)
    shutdown.deliver(scheduler, COUNT)
    fresh_broker.freeze()  # SIGSTOP: connections stay open, nothing is answered

    shutdown.close_stuck(scheduler, COUNT)


def test_close_returns_in_time_when_the_broker_refuses_connections(refused_port, shutdown) -> None:
    kafka = {
        "topic": "events",
        "addresses": [f"127.0.0.1:{refused_port}"],
        # Messages fail after 2 s (default 10 s: the same path, slower).
        "config": {"message.timeout.ms": 2000},
    }
    scheduler = shutdown.scheduler(KafkaExporter(kafka=kafka), COUNT, retry_initial=5.0)

    shutdown.close_failed(scheduler, COUNT)


def test_process_exits_in_time_while_the_broker_hangs(blackhole, shutdown, tmp_path: Path) -> None:
    kafka = {"topic": "events", "addresses": [f"127.0.0.1:{blackhole.port}"]}

    shutdown.process_exits(
        "kafka",
        {"kafka": kafka},
        COUNT,
        sink_reached=shutdown.reached(blackhole),
        tmp_path=tmp_path,
    )
