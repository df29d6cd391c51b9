"""Fixtures of the end-to-end tests that need plugins: one moto server (S3 and DynamoDB)
in a subprocess, and a check that the plugins are installed.

The plugins are installed by the nox session ``e2e`` (and ``all``). Run locally without
them, these tests skip; under ``CI=true`` a missing plugin or a server that cannot start
is a failure, never a skip.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
from goff_e2e_support import PLUGINS, MotoServer, fail_or_skip


@pytest.fixture(scope="session")
def plugins_installed() -> None:
    """flagsink-s3 and flagsink-dynamodb must be importable (the relay subprocess finds
    them through the same environment's entry points)."""
    missing = [
        f"flagsink-{kind}"
        for module, kind in PLUGINS.items()
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        fail_or_skip(
            f"plugins not installed: {', '.join(missing)} (run `nox -s e2e`, or "
            "`uv sync --all-packages --all-extras --group test`)"
        )


@pytest.fixture(scope="session")
def moto_server(
    plugins_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MotoServer]:
    if importlib.util.find_spec("moto") is None:
        fail_or_skip("moto[server] is not installed (it is in the `test` dependency group)")
    server = MotoServer(tmp_path_factory.mktemp("moto-e2e") / "moto.log")
    try:
        server.start()
    except (RuntimeError, OSError) as exc:
        fail_or_skip(f"cannot start the moto server: {exc}")
    try:
        yield server
    finally:
        server.stop()
