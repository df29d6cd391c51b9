"""The core exporter contract, run by the gcs exporter against the emulator."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest
from flagsink_gcs import GcsExporter
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY

from flagsink.testing.contract import ExporterContract

from .conftest import Emulator, read_objects

# Outages fail an export after half a second of client retries instead of ten.
SHORT_RETRY = DEFAULT_RETRY.with_timeout(0.5)


class TestGcsContract(ExporterContract):
    @pytest.fixture
    def new_exporter(self, bucket: str) -> Callable[..., GcsExporter]:
        def new(**overrides: Any) -> GcsExporter:
            return GcsExporter(retry=SHORT_RETRY, **{"bucket": bucket, **overrides})

        return new

    @pytest.fixture
    def read_back(self, client: storage.Client, bucket: str) -> Callable[[], list[Any]]:
        def read() -> list[Any]:
            return [
                json.loads(line)
                for data, _ in read_objects(client, bucket).values()
                for line in data.splitlines()
            ]

        return read

    @pytest.fixture
    def sink_outage(self, gcs: Emulator) -> Callable[[], AbstractContextManager[None]]:
        return gcs.stopped

    @pytest.fixture
    def invalid_settings(self) -> list[dict[str, Any]]:
        return [
            {"bucket": ""},
            {"bucket": "gs://events"},
            {"bucket": "Events"},
            {"bucket": "events/2026"},
            {"unknownKey": 1},
            {"path": "../outside"},
            {"contentEncoding": "br"},
            {"credentialsFile": "/nonexistent/key.json"},
        ]
