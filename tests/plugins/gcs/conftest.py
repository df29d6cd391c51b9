"""A real GCS server for the gcs plugin's tests: gcp-storage-emulator on 127.0.0.1.

The emulator runs in a subprocess with its data on disk, so it can be stopped (an outage)
and started again on the same port with every bucket and object still there. It runs
through ``emulator.py``, which adds the ``ifGenerationMatch`` precondition the emulator
ignores (see that file). Each test gets a bucket of its own.
"""

from __future__ import annotations

import gzip
import itertools
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from google.auth.credentials import AnonymousCredentials, CredentialsWithRegionalAccessBoundary
from google.cloud import storage

HERE = Path(__file__).resolve().parent
READY_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cannot_run(reason: str) -> None:
    """Fail in CI, skip elsewhere: a missing server must never pass silently in CI."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


class Emulator:
    """One gcp-storage-emulator process; ``stop``/``start`` keep the port and the data."""

    def __init__(self, command: list[str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [*command, "start", "--host", "127.0.0.1", "--port", str(self.port)]
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.process is None, "already running"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.ready():
            if self.process.poll() is not None:
                self.process = None
                raise RuntimeError(f"emulator exited at start: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"emulator not ready after {READY_TIMEOUT} s")
            time.sleep(0.02)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/", timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

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

    @property
    def running(self) -> bool:
        return self.process is not None

    @contextmanager
    def stopped(self) -> Iterator[None]:
        """An outage: the server is down inside the block, back (same data) after it."""
        self.stop()
        try:
            yield
        finally:
            self.start()


def start_emulator(command: list[str], log: Path) -> Emulator:
    emulator = Emulator(command, log)
    try:
        emulator.start()
    except (OSError, RuntimeError) as exc:
        cannot_run(f"gcp-storage-emulator cannot start: {exc}")
    return emulator


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """The emulator (with preconditions), data on disk; STORAGE_EMULATOR_HOST points at it."""
    root = tmp_path_factory.mktemp("gcs")
    command = [sys.executable, str(HERE / "emulator.py"), "-d", str(root / "data")]
    emulator = start_emulator(command, root / "emulator.log")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
        try:
            yield emulator
        finally:
            emulator.stop()


@pytest.fixture(autouse=True)
def no_lookups_beyond_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """google-auth looks up a service account's "regional access boundary" at
    iamcredentials.googleapis.com after each token refresh; tests talk to 127.0.0.1 only."""
    monkeypatch.setattr(
        CredentialsWithRegionalAccessBoundary,
        "_is_regional_access_boundary_lookup_required",
        lambda self: False,
    )


@pytest.fixture
def gcs(gcs_server: Emulator) -> Emulator:
    """The emulator, running (a test that stopped it and failed gets it back)."""
    if not gcs_server.running:
        gcs_server.start()
    return gcs_server


def official_client() -> storage.Client:
    """The official client on the emulator, as a test reads the bucket with it."""
    return storage.Client(project="test", credentials=AnonymousCredentials())


_buckets = itertools.count()


@pytest.fixture
def client(gcs: Emulator) -> Iterator[storage.Client]:
    made = official_client()
    yield made
    made.close()


@pytest.fixture
def bucket(client: storage.Client) -> str:
    """A new, empty bucket's name."""
    name = f"events-{os.getpid()}-{next(_buckets)}"
    client.create_bucket(name)
    return name


def read_objects(client: storage.Client, bucket: str) -> dict[str, tuple[bytes, Any]]:
    """Every object in ``bucket``: name -> (stored bytes, blob), gzip undone."""
    out: dict[str, tuple[bytes, Any]] = {}
    for blob in client.list_blobs(bucket):
        encoding = blob.content_encoding  # as listed: a download resets it from its headers
        data = blob.download_as_bytes(raw_download=True)
        if encoding == "gzip":
            data = gzip.decompress(data)
        out[blob.name] = (data, blob)
    return out


def object_names(client: storage.Client, bucket: str) -> list[str]:
    return sorted(blob.name for blob in client.list_blobs(bucket))


NewExporter = Callable[..., Any]
