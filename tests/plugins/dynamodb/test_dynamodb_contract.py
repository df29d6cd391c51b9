"""The dynamodb store passes the core store contract kit against a real (moto) server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from dynamodb_moto_server import MotoServer
from flagsink_dynamodb import DynamoDBStore

from flagsink.testing.store_contract import StoreContract


class TestDynamoDBContract(StoreContract):
    @pytest.fixture
    def new_backend(self, dynamodb_server: MotoServer, table: str) -> Callable[..., DynamoDBStore]:
        def new(**overrides: Any) -> DynamoDBStore:
            options = {"table": table, "endpointUrl": dynamodb_server.endpoint, **overrides}
            return DynamoDBStore(**options)

        return new

    @pytest.fixture
    def invalid_settings(self) -> list[dict[str, Any]]:
        return [
            {"table": ""},
            {"table": "ab"},
            {"table": "has space"},
            {"table": "x" * 256},
            {"unknownKey": 1},
            {"prefix": " prod"},
            {"prefix": "p" * 1025},
            {"region": "eu west 1"},
            {"endpointUrl": "ftp://127.0.0.1:21"},
            {"cacheTtl": "soon"},
        ]
