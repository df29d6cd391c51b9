"""The sqs exporter passes the core contract kit against a real (moto) SQS server, with a
standard and with a FIFO queue."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest
from flagsink_sqs import SqsExporter
from moto_support import MotoServer

from flagsink.testing.contract import ExporterContract

from .conftest import FAST, Queue


class TestSqsContract(ExporterContract):
    @pytest.fixture
    def target(self, queue: Queue) -> Queue:
        return queue

    @pytest.fixture
    def new_exporter(self, moto: MotoServer, target: Queue) -> Callable[..., SqsExporter]:
        def new(**overrides: Any) -> SqsExporter:
            return SqsExporter(config=FAST, **{"queueUrl": target.url, **overrides})

        return new

    @pytest.fixture
    def read_back(self, target: Queue) -> Callable[[], list[Any]]:
        return target.read

    @pytest.fixture
    def sink_outage(self, moto: MotoServer) -> Callable[[], AbstractContextManager[None]]:
        return moto.stopped

    @pytest.fixture
    def invalid_settings(self) -> list[dict[str, Any]]:
        return [
            {"queueUrl": None},
            {"queueUrl": ""},
            {"queueUrl": "sqs://events"},
            {"queueUrl": "https://sqs.eu-west-1.amazonaws.com/111122223333/"},
            {"queueUrl": "https://sqs.eu-west-1.amazonaws.com/111122223333/a b"},
            {"region": "eu west 1"},
            {"endpointUrl": "ftp://127.0.0.1:21"},
            {"emitter": ""},
            {"messageGroupId": "{{ .Nope }}"},
            {"messageGroupId": ""},
            {"maxMessageSize": 100},
            {"maxMessageSize": 2 * 1024 * 1024},
            {"concurrentRequests": 0},
            {"unknownKey": 1},
        ]


class TestSqsFifoContract(TestSqsContract):
    event_count = 500  # moto checks deduplication ids against every stored message

    @pytest.fixture
    def target(self, fifo_queue: Queue) -> Queue:
        return fifo_queue
