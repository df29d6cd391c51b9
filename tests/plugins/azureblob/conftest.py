"""Fixtures: one Azurite for the session, a fresh container per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from azblob_support import ACCOUNT, KEY, Azurite, start_azurite
from azure.storage.blob import ContainerClient


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """A running Azurite blob service for the whole session (stopped at teardown)."""
    server = start_azurite(tmp_path_factory.mktemp("azurite"))
    try:
        yield server
    finally:
        server.stop()
        server.service.close()


@pytest.fixture
def container(azurite: Azurite) -> ContainerClient:
    """A new, empty container for one test."""
    return azurite.new_container()


@pytest.fixture
def options(azurite: Azurite, container: ContainerClient) -> dict[str, Any]:
    """Exporter options for ``container`` with the development account's key."""
    return {
        "container": container.container_name,
        "accountName": ACCOUNT,
        "accountKey": KEY,
        "serviceUrl": azurite.url,
        "timeout": 5,
    }


@pytest.fixture
def blobs(container: ContainerClient) -> Callable[[], dict[str, bytes]]:
    """Every blob in ``container``, name -> content as stored (not decompressed)."""

    def read() -> dict[str, bytes]:
        return {
            blob.name: container.download_blob(blob.name, decompress=False).readall()
            for blob in container.list_blobs()
        }

    return read
