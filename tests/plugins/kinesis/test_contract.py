"""The kinesis exporter passes the core contract kit against a real (moto) Kinesis server."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest
from flagsink_kinesis import KinesisExporter
from moto_support import MotoServer

from flagsink.testing.contract import ExporterContract

from .conftest import FAST, Stream


class TestKinesisContract(ExporterContract):
    @pytest.fixture
    def new_exporter(self, moto: MotoServer, stream: Stream) -> Callable[..., KinesisExporter]:
        def new(**overrides: Any) -> KinesisExporter:
            options = {"streamName": stream.name, "endpointUrl": moto.endpoint, **overrides}
            return KinesisExporter(config=FAST, **options)

        return new

    @pytest.fixture
    def read_back(self, stream: Stream) -> Callable[[], list[Any]]:
        return stream.read

    @pytest.fixture
    def sink_outage(self, moto: MotoServer) -> Callable[[], AbstractContextManager[None]]:
        return moto.stopped

    @pytest.fixture
    def invalid_settings(self) -> list[dict[str, Any]]:
        arn = "arn:aws:kinesis:eu-west-1:111122223333:stream/events"
        return [
            {"streamName": None},
            {"streamName": ""},
            {"streamName": "a/b"},
            {"streamArn": "arn:aws:s3:::events"},
            {"streamArn": arn, "region": "us-east-1"},
            {"partitionKey": ""},
            {"partitionKey": "{{ .Nope }}"},
            {"explicitHashKey": "abc"},
            {"explicitHashKey": str(2**128)},
            {"explicitHashKey": "{{ if .Key }}1{{ end }}"},
            {"region": "eu west 1"},
            {"endpointUrl": "ftp://127.0.0.1:21"},
            {"unknownKey": 1},
        ]
