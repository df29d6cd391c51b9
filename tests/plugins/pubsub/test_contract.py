"""The core exporter contract, run by the pubsub exporter against the Pub/Sub emulator."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest
from flagsink_pubsub import PubSubExporter

from flagsink.testing.contract import ExporterContract

from .emulator import PROJECT, PubSubServer, Topic


class TestPubSubContract(ExporterContract):
    @pytest.fixture
    def new_exporter(self, topic: Topic) -> Callable[..., PubSubExporter]:
        def new(**overrides: Any) -> PubSubExporter:
            # A short publish timeout: an export during the outage fails within a second.
            options = {"projectID": PROJECT, "topic": topic.name, "publishTimeout": 1.0}
            return PubSubExporter(**{**options, **overrides})

        return new

    @pytest.fixture
    def read_back(self, topic: Topic) -> Callable[[], list[Any]]:
        def read() -> list[Any]:
            topic.pull()
            return [message.record for message in topic.received]

        return read

    @pytest.fixture
    def sink_outage(self, pubsub: PubSubServer) -> Callable[[], AbstractContextManager[None]]:
        # The emulator process is stopped, then a new one starts with the topic and its
        # subscription created again (see emulator.py): nothing is published before the
        # outage in these tests, so the restart's loss of state hides nothing.
        return pubsub.restarted

    @pytest.fixture
    def invalid_settings(self) -> list[dict[str, Any]]:
        return [
            {"topic": ""},
            {"topic": "ab"},
            {"topic": "goog-events"},
            {"topic": "projects/test-project/subscriptions/events"},
            {"projectID": None},
            {"projectID": "Not_A_Project"},
            {"projectID": "other-project", "topic": "projects/test-project/topics/events"},
            {"unknownKey": 1},
            {"orderingKey": "{{ .NoSuchField}}"},
            {"orderingKey": ""},
            {"attributes": {"googSource": "x"}},
            {"attributes": {"timeout": "x"}},
            {"attributes": {"emitter": "x"}},
            {"attributes": {"flag": "{{ .Key"}},
            {"emitter": "x" * 1025},
            {"batchMaxMessages": 0},
            {"batchMaxMessages": 1001},
            {"batchMaxBytes": 10_000_001},
            {"batchMaxLatency": -1},
            {"publishTimeout": 0},
            {"credentialsFile": "/nonexistent/key.json"},
        ]
