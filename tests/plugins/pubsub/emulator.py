"""The official Pub/Sub emulator for the pubsub plugin's tests, behind a TCP relay.

The emulator (Debian package ``google-cloud-cli-pubsub-emulator``, a Java server) keeps
everything in memory: a restart comes back with no topic, no subscription and no message.
Exporters under test therefore never talk to it directly but to :class:`Relay`, a plain
TCP forwarder on its own port (``PUBSUB_EMULATOR_HOST`` points at it). That gives two
kinds of outage:

- :meth:`PubSubServer.restarted`: the emulator process is stopped (the relay then refuses
  every connection), and on leaving the block a new emulator starts on a new port, the
  test's topics and subscriptions are created again on it, and only then is the relay
  pointed at it. Nothing published before the stop survives it: a test must have pulled
  what it needs first. Provisioning before reconnecting the relay means no message can
  reach a re-created topic before its subscription exists (it would be lost silently).
- :meth:`Relay.cut` / :meth:`Relay.restore`: the network between exporter and emulator
  fails (open connections are reset, new ones closed at once) while the emulator keeps
  its state, so a fault in the middle of an export can be checked message by message.

The test's own admin and subscriber clients talk to the emulator directly.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.api_core import exceptions as api
from google.cloud import pubsub_v1
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

PACKAGE = "google-cloud-cli-pubsub-emulator"
PROJECT = "test-project"
READY_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def emulator_command() -> list[str]:
    """The emulator's launcher, as the Debian package installs it; raises if absent."""
    try:
        listing = subprocess.run(
            ["dpkg", "-L", PACKAGE], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"package {PACKAGE} is not installed ({exc})") from None
    found = [line for line in listing.splitlines() if line.endswith("bin/cloud-pubsub-emulator")]
    if not found:
        raise RuntimeError(f"package {PACKAGE} has no bin/cloud-pubsub-emulator")
    if shutil.which("java") is None:
        raise RuntimeError("the Pub/Sub emulator needs Java (no `java` on PATH)")
    return [found[0]]


class Emulator:
    """One emulator process on its own port."""

    def __init__(self, command: list[str], log: Path) -> None:
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.command = [*command, "--host=127.0.0.1", f"--port={self.port}"]
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.process is None, "already running"
        start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + READY_TIMEOUT
        admin = publisher_for(self.host)
        try:
            while not self._ready(admin):
                text = self.log.read_bytes()[start:].decode(errors="replace")
                # A JVM whose main thread failed to bind keeps running: check the log too.
                if self.process.poll() is not None or "BindException" in text:
                    self.stop()
                    raise RuntimeError(f"the emulator did not start: {text[-2000:]}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the emulator was not ready after {READY_TIMEOUT} s")
                time.sleep(0.05)
        finally:
            admin.transport.close()

    @staticmethod
    def _ready(admin: pubsub_v1.PublisherClient) -> bool:
        try:
            list(admin.list_topics(request={"project": f"projects/{PROJECT}"}, timeout=1))
        except (api.GoogleAPICallError, api.RetryError):
            return False
        return True

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(15)
        self.process = None


class Relay:
    """A TCP forwarder 127.0.0.1:port -> 127.0.0.1:upstream that a test can cut."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self.host = f"127.0.0.1:{self.port}"
        self._up = True
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._stopping = False
        #: Connections accepted, and refused while cut.
        self.accepted = 0
        self.refused = 0
        #: Bytes forwarded from clients to the emulator.
        self.forwarded = 0
        self._cut_at: int | None = None
        self._thread = threading.Thread(target=self._serve, name="pubsub-relay", daemon=True)
        self._thread.start()

    def cut(self) -> None:
        """Reset every open connection and refuse new ones until :meth:`restore`."""
        with self._lock:
            self._up = False
            connections = list(self._connections)
        for sock in connections:
            _reset(sock)

    def cut_after(self, count: int) -> None:
        """Cut (as :meth:`cut`) once ``count`` more bytes went from clients to the
        emulator: a failure in the middle of an export, wherever it is."""
        with self._lock:
            self._cut_at = self.forwarded + count

    def restore(self, upstream: int | None = None) -> None:
        """Forward again (to ``upstream`` if given)."""
        with self._lock:
            self._cut_at = None
            if upstream is not None:
                self.upstream = upstream
            self._up = True

    def close(self) -> None:
        self.cut()
        self._stopping = True
        self._thread.join(5)
        self._listener.close()

    def _serve(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                up, upstream = self._up, self.upstream
            if not up:
                self.refused += 1
                _reset(client)
                continue
            try:
                server = socket.create_connection(("127.0.0.1", upstream), timeout=2)
            except OSError:
                self.refused += 1
                _reset(client)
                continue
            self.accepted += 1
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(None)
            with self._lock:
                self._connections |= {client, server}
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _count(self, size: int) -> None:
        with self._lock:
            self.forwarded += size
            trip = self._cut_at is not None and self.forwarded >= self._cut_at
            if trip:
                self._cut_at = None
        if trip:
            self.cut()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        peers = {client: server, server: client}
        try:
            while True:
                readable, _, _ = select.select(list(peers), [], [], 0.5)
                with self._lock:
                    if not self._up or self._stopping:
                        return
                for sock in readable:
                    data = sock.recv(1 << 16)
                    if not data:
                        return
                    peers[sock].sendall(data)
                    if sock is client:
                        self._count(len(data))
        except (OSError, ValueError):  # ValueError: select on a socket cut meanwhile
            return
        finally:
            with self._lock:
                self._connections -= {client, server}
            _reset(client)
            _reset(server)


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a dead peer or a firewall would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


# As the client library sets for the real service: messages up to Pub/Sub's 10 MB.
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def publisher_for(host: str) -> pubsub_v1.PublisherClient:
    """An admin/publisher client bound to ``host`` whatever PUBSUB_EMULATOR_HOST says."""
    channel = grpc.insecure_channel(host, options=_CHANNEL_OPTIONS)
    return pubsub_v1.PublisherClient(transport=PublisherGrpcTransport(channel=channel))


def subscriber_for(host: str) -> pubsub_v1.SubscriberClient:
    channel = grpc.insecure_channel(host, options=_CHANNEL_OPTIONS)
    return pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))


@dataclass
class Received:
    """One pulled message, as a consumer sees it."""

    data: bytes
    attributes: dict[str, str]
    ordering_key: str
    message_id: str

    @property
    def record(self) -> Any:
        return json.loads(self.data)


@dataclass
class Topic:
    """A topic with one pull subscription (ordering enabled), and what was pulled."""

    server: PubSubServer
    name: str
    received: list[Received] = field(default_factory=list)

    @property
    def path(self) -> str:
        return f"projects/{PROJECT}/topics/{self.name}"

    @property
    def subscription(self) -> str:
        return f"projects/{PROJECT}/subscriptions/{self.name}-sub"

    def create(self) -> None:
        self.server.admin.create_topic(request={"name": self.path})
        self.server.subscriber.create_subscription(
            request={
                "name": self.subscription,
                "topic": self.path,
                "enable_message_ordering": True,
                "ack_deadline_seconds": 60,
            }
        )

    def pull(self, max_messages: int = 1000) -> int:
        """Pull (synchronously) what is available now, acknowledge it; how many came."""
        total = 0
        while True:
            try:
                with warnings.catch_warnings():
                    # Deprecated for the real service; the emulator honours it, and it
                    # makes a pull of an empty subscription return at once.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    answer = self.server.subscriber.pull(
                        request={
                            "subscription": self.subscription,
                            "max_messages": max_messages,
                            "return_immediately": True,
                        },
                        timeout=10,
                    )
            except api.DeadlineExceeded:
                return total
            messages = answer.received_messages
            if not messages:
                return total
            self.server.subscriber.acknowledge(
                request={
                    "subscription": self.subscription,
                    "ack_ids": [m.ack_id for m in messages],
                }
            )
            self.received.extend(
                Received(
                    bytes(m.message.data),
                    dict(m.message.attributes),
                    m.message.ordering_key,
                    m.message.message_id,
                )
                for m in messages
            )
            total += len(messages)

    def drain(self, count: int, timeout: float = 30.0) -> list[Received]:
        """Pull until ``count`` messages were received in all (or ``timeout``); then one
        more pull shows whether anything beyond ``count`` (a duplicate) is there."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            if not self.pull():
                time.sleep(0.02)
        self.pull()
        return self.received


class PubSubServer:
    """The emulator, the relay in front of it, and admin clients on the emulator."""

    def __init__(self, command: list[str], workdir: Path) -> None:
        self.command = command
        self.workdir = workdir
        self.generation = 0
        self.emulator = self._new_emulator()
        self.relay = Relay(self.emulator.port)
        self.admin = publisher_for(self.emulator.host)
        self.subscriber = subscriber_for(self.emulator.host)
        self.topics: list[Topic] = []
        self._names = itertools.count()

    def _new_emulator(self) -> Emulator:
        self.generation += 1
        emulator = Emulator(self.command, self.workdir / f"emulator-{self.generation}.log")
        emulator.start()
        return emulator

    @property
    def host(self) -> str:
        """What PUBSUB_EMULATOR_HOST names: the relay."""
        return self.relay.host

    def new_topic(self) -> Topic:
        topic = Topic(self, f"events-{os.getpid()}-{next(self._names)}")
        topic.create()
        self.topics.append(topic)
        return topic

    def stop(self, before_kill: Callable[[], object] | None = None) -> None:
        """Stop the emulator (everything in it is lost); the relay then refuses.

        The relay is cut first, so for the exporter the server is gone at that instant.
        ``before_kill`` then runs while the emulator still holds its messages: a test
        pulls there what the emulator accepted, which the real (durable) Pub/Sub would
        have kept across an outage and the emulator's restart would lose.
        """
        self.relay.cut()
        if before_kill is not None:
            before_kill()
        self.emulator.stop()
        self.relay.restore()  # forwards to a dead port: every connection is refused

    def start(self) -> None:
        """A new, empty emulator; the topics re-created; the relay pointed at it."""
        self.emulator = self._new_emulator()
        for client in (self.admin, self.subscriber):
            client.transport.close()
        self.admin = publisher_for(self.emulator.host)
        self.subscriber = subscriber_for(self.emulator.host)
        for topic in self.topics:
            topic.create()
        self.relay.restore(self.emulator.port)

    @contextlib.contextmanager
    def restarted(self, before_kill: Callable[[], object] | None = None) -> Iterator[None]:
        """Emulator down inside the block; a fresh one (topics re-created) after it."""
        self.stop(before_kill)
        try:
            yield
        finally:
            self.start()

    def ensure_running(self) -> None:
        if self.emulator.process is None:
            self.start()
        self.relay.restore()

    def close(self) -> None:
        self.relay.close()
        for client in (self.admin, self.subscriber):
            with contextlib.suppress(Exception):
                client.transport.close()
        self.emulator.stop()
