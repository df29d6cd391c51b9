"""Fixtures of the sqs plugin's tests: fake AWS credentials, a moto server in a
subprocess (see moto_server.py), fresh standard and FIFO queues per test, and an
independent consumer (ReceiveMessage, 10 at a time, until the queue is empty, deleting
what it received)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from botocore.config import Config
from moto_support import MotoServer, cannot_run, fake_aws_environment

#: Client settings for tests: one attempt per request, so outages fail fast.
FAST = Config(retries={"mode": "standard", "max_attempts": 1}, connect_timeout=2, read_timeout=20)


@dataclass
class Queue:
    server: MotoServer
    name: str
    attributes: dict[str, str] = field(default_factory=dict)
    url: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def create(self, server: MotoServer) -> None:
        answer = server.client("sqs").create_queue(QueueName=self.name, Attributes=self.attributes)
        self.url = answer["QueueUrl"]

    def _receive_once(self, sqs: Any, wait: int) -> int:
        """One ReceiveMessage (up to 10), then delete what came, as a consumer does."""
        answer = sqs.receive_message(
            QueueUrl=self.url,
            MaxNumberOfMessages=10,
            MessageAttributeNames=["All"],
            MessageSystemAttributeNames=["All"],
            WaitTimeSeconds=wait,
        )
        batch = answer.get("Messages", [])
        if batch:
            entries = [
                {"Id": str(index), "ReceiptHandle": message["ReceiptHandle"]}
                for index, message in enumerate(batch)
            ]
            deleted = sqs.delete_message_batch(QueueUrl=self.url, Entries=entries)
            assert not deleted.get("Failed"), deleted
            with self._lock:
                self.messages += batch
        return len(batch)

    def receive(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Receive until the queue is empty or the deadline; every message received so
        far, in the order received."""
        sqs = self.server.client("sqs")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._receive_once(sqs, 0):
            pass
        with self._lock:
            return list(self.messages)

    @contextmanager
    def draining(self) -> Iterator[None]:
        """A consumer on its own thread inside the block, receiving (long polls of 1 s)
        and deleting as messages come: the queue stays short, as in production."""
        stop = threading.Event()
        sqs = self.server.client("sqs")

        def run() -> None:
            while not stop.is_set():
                self._receive_once(sqs, 1)

        thread = threading.Thread(target=run, name="sqs-consumer", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(10)

    def read(self) -> list[Any]:
        """Every message body received so far (receiving what waits first), as JSON."""
        return [json.loads(message["Body"]) for message in self.receive()]


@pytest.fixture(scope="session", autouse=True)
def aws_environment() -> Iterator[None]:
    with fake_aws_environment():
        yield


@pytest.fixture(scope="session")
def moto(aws_environment: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(Path(tmp_path_factory.mktemp("moto")) / "moto.log")
    try:
        server.start()
    except (RuntimeError, OSError) as exc:
        cannot_run(f"cannot start the moto server (python -m moto.server): {exc}")
    try:
        yield server
    finally:
        server.stop()


def _queue(moto: MotoServer, name: str, **attributes: str) -> Iterator[Queue]:
    made = Queue(moto, name, attributes)
    moto.keep(made.create)
    yield made
    moto.forget(made.create)


@pytest.fixture
def queue(moto: MotoServer) -> Iterator[Queue]:
    """A new standard queue, made again after every server restart."""
    yield from _queue(moto, f"events-{uuid.uuid4().hex[:10]}")


@pytest.fixture
def fifo_queue(moto: MotoServer) -> Iterator[Queue]:
    """A new FIFO queue without content-based deduplication."""
    yield from _queue(moto, f"events-{uuid.uuid4().hex[:10]}.fifo", FifoQueue="true")
