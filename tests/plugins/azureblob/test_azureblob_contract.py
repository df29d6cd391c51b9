"""flagsink-azureblob passes the exporter contract against Azurite."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest
from azblob_support import ACCOUNT, Azurite
from flagsink_azureblob import AzureBlobExporter

from flagsink.testing.contract import ExporterContract


class TestAzureBlobContract(ExporterContract):
    @pytest.fixture
    def new_exporter(self, options: dict[str, Any]) -> Callable[..., AzureBlobExporter]:
        return lambda **overrides: AzureBlobExporter(**{**options, **overrides})

    @pytest.fixture
    def read_back(self, blobs: Callable[[], dict[str, bytes]]) -> Callable[[], list[Any]]:
        def read() -> list[Any]:
            return [json.loads(line) for data in blobs().values() for line in data.splitlines()]

        return read

    @pytest.fixture
    def sink_outage(self, azurite: Azurite) -> Callable[[], AbstractContextManager[None]]:
        return azurite.stopped

    @pytest.fixture
    def invalid_settings(self, azurite: Azurite) -> list[dict[str, Any]]:
        return [
            {"container": "Events"},  # upper case
            {"container": "ab"},  # too short
            {"container": "a--b"},  # double hyphen
            {"accountName": "Dev-Account"},
            {"accountName": None},  # and no connectionString
            {"accountKey": ""},
            {"serviceUrl": "ftp://127.0.0.1/devstoreaccount1"},
            {"serviceUrl": f"{azurite.url}?sv=2024&sig=abc"},  # SAS belongs in connectionString
            {"connectionString": azurite.connection_string},  # and accountKey: ambiguous
            {"timeout": 0},
            {"path": "a/../b"},
            {"contentEncoding": "br"},
            {"format": "xml"},
            {"bucket": "events"},  # unknown key
            # an identity credential cannot go over plain http:
            {"accountKey": None, "accountName": ACCOUNT, "serviceUrl": azurite.url},
        ]
