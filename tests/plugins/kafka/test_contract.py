"""The core exporter contract, run by the kafka exporter against a real Tansu broker."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest
from flagsink_kafka import KafkaExporter

from flagsink.testing.contract import ExporterContract

from .conftest import new_topic_name
from .tansu import Tansu, TopicReader

# A short delivery timeout: an export during an outage fails after 2 s instead of 10.
FAST_FAILURE = {"message.timeout.ms": 2000, "linger.ms": 1}


class TestKafkaContract(ExporterContract):
    @pytest.fixture
    def topic(self, fresh_broker: Tansu) -> str:
        name = new_topic_name("contract")
        fresh_broker.create_topic(name)
        return name

    @pytest.fixture
    def new_exporter(self, fresh_broker: Tansu, topic: str) -> Callable[..., KafkaExporter]:
        def new(**overrides: Any) -> KafkaExporter:
            kafka = {"topic": topic, "addresses": [fresh_broker.bootstrap], "config": FAST_FAILURE}
            return KafkaExporter(**{"kafka": kafka, **overrides})

        return new

    @pytest.fixture
    def read_back(self, fresh_broker: Tansu, topic: str) -> Iterator[Callable[[], list[Any]]]:
        # Created at the first read, after any outage (a restart empties the broker).
        reader: list[TopicReader] = []

        def read() -> list[Any]:
            if not reader:
                reader.append(fresh_broker.reader(topic, group=False))
            return reader[0].values(json.loads)

        yield read
        for opened in reader:
            opened.close()

    @pytest.fixture
    def sink_outage(
        self, fresh_broker: Tansu, topic: str
    ) -> Callable[[], AbstractContextManager[None]]:
        # The broker is killed; afterwards a fresh one (empty: memory storage) runs on the
        # same port with the topic created again.
        return lambda: fresh_broker.outage(topic)

    @pytest.fixture
    def invalid_settings(self, fresh_broker: Tansu) -> list[dict[str, Any]]:
        good = {"topic": "events", "addresses": [fresh_broker.bootstrap]}
        return [
            {"unknownKey": 1},
            {"kafka": {"addresses": [fresh_broker.bootstrap]}},
            {"kafka": {"topic": "events"}},
            {"kafka": {**good, "addresses": []}},
            {"kafka": {**good, "addresses": " , "}},
            {"kafka": {**good, "topic": "bad topic"}},
            {"kafka": {**good, "keyTemplate": "{{ .Nope }}"}},
            {"kafka": {**good, "config": {"no.such.property": 1}}},
            {"kafka": {**good, "config": {"acks": 1}}},  # idempotence needs acks=all
            {"kafka": {**good, "config": {"delivery.report.only.error": True}}},
            {"kafka": {**good, "config": {"bootstrap.servers": "elsewhere:9092"}}},
            {"kafka": {**good, "headers": {"kind": "x"}}},
            {"kafka": {**good, "closeTimeout": -1}},
            {"kafka": {**good, "unknown": 1}},
        ]
