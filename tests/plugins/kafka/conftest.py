"""A real Kafka-compatible broker for the kafka plugin's tests: Tansu on 127.0.0.1.

``broker`` is one broker for the whole session (each test makes topics of its own);
``fresh_broker`` is a broker of the test's own, for tests that kill and restart it.
The broker and reader helpers live in ``tansu.py``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest

from .tansu import Tansu, TopicReader


def _started(port: int | None = None) -> Tansu:
    try:
        broker = Tansu(port)
        broker.start()
    except (OSError, RuntimeError) as exc:
        message = f"cannot start the Tansu Kafka broker: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return broker


@pytest.fixture(scope="session")
def broker() -> Iterator[Tansu]:
    """One Tansu broker shared by the session; never killed."""
    server = _started()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_broker() -> Iterator[Tansu]:
    """A Tansu broker of this test's own, which the test may kill and restart."""
    server = _started()
    try:
        yield server
    finally:
        server.stop()


def new_topic_name(prefix: str = "events") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_topic(broker: Tansu) -> Callable[..., str]:
    """Create a topic of this test's own on the session broker."""

    def make(partitions: int = 3, prefix: str = "events") -> str:
        name = new_topic_name(prefix)
        broker.create_topic(name, partitions)
        return name

    return make


@pytest.fixture
def readers() -> Iterator[list[TopicReader]]:
    """Readers closed at teardown: append the ones you open."""
    opened: list[TopicReader] = []
    yield opened
    for reader in opened:
        reader.close()
