"""The core contract kit against a real HTTP server."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest
from flagsink_webhook import WebhookExporter

from flagsink.testing.contract import ExporterContract

from .conftest import WebhookServer

SECRET = "contract-secret-7f3a"


class TestWebhookContract(ExporterContract):
    @pytest.fixture
    def new_exporter(self, webhook_server: WebhookServer) -> Callable[..., WebhookExporter]:
        def make(**overrides: Any) -> WebhookExporter:
            options: dict[str, Any] = {
                "endpointUrl": webhook_server.url,
                "secret": SECRET,
                "timeout": 5,
                **overrides,
            }
            return WebhookExporter(**options)

        return make

    @pytest.fixture
    def read_back(self, webhook_server: WebhookServer) -> Callable[[], list[Any]]:
        def events() -> list[Any]:
            for request in webhook_server.accepted():  # every body signed, independently checked
                digest = hmac.new(SECRET.encode(), request.body, hashlib.sha256).hexdigest()
                assert request.headers["x-hub-signature-256"] == f"sha256={digest}"
            return webhook_server.events()

        return events

    @pytest.fixture
    def sink_outage(
        self, webhook_server: WebhookServer
    ) -> Callable[[], AbstractContextManager[None]]:
        return webhook_server.stopped

    @pytest.fixture
    def invalid_settings(self) -> list[dict[str, Any]]:
        return [
            {"endpointUrl": ""},
            {"endpointUrl": "ftp://example.com/hook"},
            {"endpointUrl": "http://"},
            {"endpointUrl": "example.com/hook"},
            {"timeout": 0},
            {"maxBodyBytes": 100},
            {"headers": {"Bad Name": "x"}},
            {"headers": {"X-Token": "a\r\nInjected: yes"}},
            {"headers": {"Content-Length": "10"}},
            {"meta": {"env": ["not", "text"]}},
            {"endpointURL": "http://typo.example"},
        ]
