"""Fixtures of the pubsub plugin's tests: the official emulator behind a relay (see
``emulator.py``), one topic and subscription per test."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .emulator import PubSubServer, Topic, emulator_command


def cannot_run(reason: str) -> None:
    """Fail in CI, skip elsewhere: a missing server must never pass silently in CI."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pubsub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PubSubServer]:
    """The emulator (started once), PUBSUB_EMULATOR_HOST pointing at its relay."""
    try:
        server = PubSubServer(emulator_command(), tmp_path_factory.mktemp("pubsub"))
    except (OSError, RuntimeError) as exc:
        cannot_run(f"the Pub/Sub emulator cannot start: {exc}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PUBSUB_EMULATOR_HOST", server.host)
        try:
            yield server
        finally:
            server.close()


@pytest.fixture
def pubsub(pubsub_server: PubSubServer) -> PubSubServer:
    """The server, running and reachable (a test that stopped it and failed gets it back)."""
    pubsub_server.ensure_running()
    return pubsub_server


@pytest.fixture
def topic(pubsub: PubSubServer) -> Topic:
    """A new topic with an ordered pull subscription, both empty."""
    return pubsub.new_topic()
