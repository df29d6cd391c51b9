"""A real HTTP server on 127.0.0.1 that receives the webhook's requests.

It records every request (body, headers, status answered), answers 200 unless told
otherwise (a scripted list of answers, a body limit answered with 413, a delay), and can
go down and come back on the same port: going down closes the listening socket and every
open connection, as a crashed process would.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


@dataclass(frozen=True)
class Answer:
    """What the server answers to one request."""

    status: int = 200
    body: bytes = b'{"ok":true}'
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass(frozen=True)
class Received:
    """One request as the server saw it."""

    path: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    header_lists: dict[str, list[str]]
    body: bytes
    status: int
    time: float

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookServer:
    """The recording server; see the module docstring."""

    def __init__(self) -> None:
        self.port = 0
        self.lock = threading.Lock()
        self.received: list[Received] = []
        self.script: deque[Answer] = deque()
        self.max_body: int | None = None
        self.default = Answer()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # -- control ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        owner = self

        class Handler(_Handler):
            server_owner = owner

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while True:  # ready when it accepts a connection
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def stop(self) -> None:
        """Go down: stop accepting, close the listening socket and every connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self.lock:
            connections = list(self._connections)
        for connection in connections:
            with suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()
        if self._thread is not None:
            self._thread.join(5)

    @contextmanager
    def stopped(self) -> Iterator[None]:
        """Down inside the block, back up (same port) after it."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def answer(self, *answers: Answer | int) -> None:
        """Answer the next requests with these (a status alone: that status, empty JSON)."""
        with self.lock:
            for item in answers:
                self.script.append(Answer(item, b"{}") if isinstance(item, int) else item)

    def reset(self) -> None:
        with self.lock:
            self.received.clear()
            self.script.clear()
            self.max_body = None

    # -- what arrived -----------------------------------------------------------------------

    def requests(self) -> list[Received]:
        with self.lock:
            return list(self.received)

    def accepted(self) -> list[Received]:
        return [request for request in self.requests() if request.ok]

    def events(self) -> list[dict[str, Any]]:
        """Every event of every request answered 2xx, in arrival order."""
        return [event for request in self.accepted() for event in request.json()["events"]]

    # -- called by the handler --------------------------------------------------------------

    def _next_answer(self, size: int) -> Answer:
        with self.lock:
            if self.max_body is not None and size > self.max_body:
                return Answer(413, b'{"error":"request body too large"}')
            return self.script.popleft() if self.script else self.default


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real webhook receivers do
    server_owner: WebhookServer

    def setup(self) -> None:
        super().setup()
        with self.server_owner.lock:
            self.server_owner._connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server_owner.lock:
                self.server_owner._connections.discard(self.connection)

    def do_POST(self) -> None:
        owner = self.server_owner
        size = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(size)
        answer = owner._next_answer(size)
        if answer.delay:
            time.sleep(answer.delay)
        lists: dict[str, list[str]] = {}
        for name, value in self.headers.items():
            lists.setdefault(name.lower(), []).append(value)
        record = Received(
            self.path,
            {name: ", ".join(values) for name, values in lists.items()},
            lists,
            body,
            answer.status,
            time.monotonic(),
        )
        with owner.lock:
            owner.received.append(record)
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet


def _start_or_give_up(start: Callable[[], None]) -> None:
    try:
        start()
    except OSError as exc:  # pragma: no cover - only on a machine without loopback
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot start the webhook test server on 127.0.0.1: {exc}")
        pytest.skip(f"cannot start the webhook test server on 127.0.0.1: {exc}")


@pytest.fixture
def webhook_server() -> Iterator[WebhookServer]:
    """A fresh recording server for one test; stopped at teardown."""
    server = WebhookServer()
    _start_or_give_up(server.start)
    try:
        yield server
    finally:
        server.stop()
