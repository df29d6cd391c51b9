"""A real AWS endpoint for the plugin's tests: moto in server mode, in a subprocess on
127.0.0.1, that a test can stop (an outage) and start again on the same port.

moto keeps its state in memory, so a restart empties it: the resources made through
:meth:`MotoServer.keep` are made again after every start.

Two of moto's helpers cost time proportional to what the server holds, on every message:
SQS looks at the clock of every queued message through a datetime-based ``unix_time``
(about 5 us a call: 10,000 queued messages take minutes), and a Kinesis shard copies all
its sequence numbers into a list to find the last one. The server runs with the first
swapped for ``time.time()`` (the same value, 40 times faster) and the second for a look
at the dict's last key (the same value, in constant time); nothing else is changed (see
``_LAUNCH``).

:class:`Gate` is a TCP relay in front of the server that a test can cut in the middle of
an export (every open connection reset, new ones refused) while the server keeps what it
stored.

(The same file sits in tests/plugins/kinesis and tests/plugins/sqs: each plugin's tests
run with only core and that plugin installed.)
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

ACCESS_KEY = "AKIAFLAGSINKTESTKEY1"
SECRET_KEY = "flagsink-test-secret-never-logged"
REGION = "us-east-1"
_READY_TIMEOUT = 30.0
_LAUNCH = """
import sys, time
import moto.kinesis.models as kinesis
import moto.sqs.models as sqs
from moto.server import main
slow_time, slow_millis = sqs.unix_time, sqs.unix_time_millis
sqs.unix_time = lambda dt=None: time.time() if dt is None else slow_time(dt)
sqs.unix_time_millis = lambda dt=None: time.time() * 1000.0 if dt is None else slow_millis(dt)
kinesis.Shard.get_min_sequence_number = lambda self: next(iter(self.records), 0)
kinesis.Shard.get_max_sequence_number = lambda self: next(reversed(self.records), 0)
main(sys.argv[1:])
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cannot_run(reason: str) -> None:
    """Fail in CI, skip elsewhere: a missing server must never pass silently in CI."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@contextlib.contextmanager
def fake_aws_environment() -> Iterator[None]:
    """Fake credentials for boto3's default chain; nothing read from ~/.aws and no
    instance-metadata lookups leaving this machine."""
    with pytest.MonkeyPatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                patch.delenv(name)
        patch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        patch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        patch.setenv("AWS_DEFAULT_REGION", REGION)
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        patch.setenv("AWS_CONFIG_FILE", os.devnull)
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        yield


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


class MotoServer:
    """moto's server (``moto.server.main``) on 127.0.0.1, stoppable and restartable."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._keep: list[Callable[[MotoServer], None]] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _LAUNCH, "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + _READY_TIMEOUT
        while not self._ready():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"moto server exited with {self.process.returncode}: {self._log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"moto server not ready in {_READY_TIMEOUT}s: {self._log_tail()}"
                )
            time.sleep(0.02)
        self.starts += 1
        for make in self._keep:
            make(self)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """The server is down inside the block, and up again (same port, resources made
        with :meth:`keep` made again, everything else gone) after it."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def keep(self, make: Callable[[MotoServer], None]) -> None:
        """Run ``make(server)`` now and after every restart (create a stream, a queue)."""
        make(self)
        self._keep.append(make)

    def forget(self, make: Callable[[MotoServer], None]) -> None:
        """Stop re-making a resource after restarts (at the end of its test)."""
        if make in self._keep:
            self._keep.remove(make)

    def client(self, service: str, **options: Any) -> Any:
        """A boto3 client for this server (fake credentials unless given)."""
        options.setdefault("aws_access_key_id", "testing")
        options.setdefault("aws_secret_access_key", "testing")
        options.setdefault("endpoint_url", self.endpoint)
        return boto3.client(service, region_name=REGION, **options)


class Gate:
    """A TCP relay from its own port to ``target_port``. :meth:`cut` resets every open
    connection and refuses new ones (the server itself keeps running and keeps what it
    stored); :meth:`restore` lets connections through again."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.cuts = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.restore()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(128)
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, set()
            self.cuts += 1
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for sock in sockets:
            _reset(sock)

    def close(self) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._listener is not listener:
                    _reset(client)
                    _reset(upstream)
                    continue
                self._sockets.update((client, upstream))
            left = [2]  # pumps still running for this connection
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink, left), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, left: list[int]) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
        with self._lock:
            left[0] -= 1
            last = left[0] == 0
            if last:
                self._sockets.discard(source)
                self._sockets.discard(sink)
        if last:
            source.close()
            sink.close()


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset, as a crashed or unplugged server would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
