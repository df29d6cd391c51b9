"""Azurite 3.35.0 (from npm) as a real Azure Blob service on 127.0.0.1, for the tests.

Azurite is pinned in package.json / package-lock.json next to this file and installed with
``npm ci`` on first use. It keeps its data in a temporary folder (not in memory) so that a
restart, as in the outage tests, finds the blobs and containers written before it.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient, ContainerClient

__all__ = ["ACCOUNT", "KEY", "Azurite", "AzuriteUnavailable", "install_azurite", "start_azurite"]

HERE = Path(__file__).resolve().parent
AZURITE = HERE / "node_modules" / ".bin" / "azurite-blob"
NPM_TIMEOUT = 300.0
START_TIMEOUT = 30.0

# The well-known Azurite development account (public, documented by Microsoft).
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class AzuriteUnavailable(RuntimeError):
    """Azurite cannot be installed or started here; the message says why."""


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"Azurite is required in CI: {reason}")
    pytest.skip(f"Azurite unavailable: {reason}")


def install_azurite() -> Path:
    """``npm ci`` the pinned Azurite into this folder unless it is there; its binary."""
    if AZURITE.exists():
        return AZURITE
    npm = shutil.which("npm")
    if npm is None:
        raise AzuriteUnavailable(
            "npm is not installed (Azurite 3.35.0 needs Node.js >= 20 and npm)"
        )
    try:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise AzuriteUnavailable(
            f"`npm ci` in {HERE} took longer than {NPM_TIMEOUT:.0f}s"
        ) from None
    if done.returncode != 0 or not AZURITE.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise AzuriteUnavailable(
            f"`npm ci` in {HERE} failed ({done.returncode}): {' | '.join(tail)}"
        )
    return AZURITE


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Azurite:
    """One azurite-blob process; :meth:`stop` and :meth:`start` keep port and data."""

    def __init__(self, workspace: Path) -> None:
        self.workspace = workspace
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/{ACCOUNT}"
        self.connection_string = (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
            f"BlobEndpoint={self.url};"
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workspace / "azurite.log"
        self.service = BlobServiceClient(
            self.url, credential={"account_name": ACCOUNT, "account_key": KEY}
        )

    def start(self) -> None:
        if self.process is not None:
            return
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    str(AZURITE),
                    "--blobHost",
                    "127.0.0.1",
                    "--blobPort",
                    str(self.port),
                    "--location",
                    str(self.workspace),
                    "--skipApiVersionCheck",
                    "--disableTelemetry",
                    "--silent",
                ],
                cwd=self.workspace,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            if self.process.poll() is not None:
                self.process = None
                raise AzuriteUnavailable(f"azurite-blob exited: {self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise AzuriteUnavailable(
                    f"azurite-blob not ready after {START_TIMEOUT:.0f}s: {self._log_tail()}"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)

    @contextmanager
    def stopped(self) -> Iterator[None]:
        """The service is down inside the block (connections refused), back after it."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def _answers(self) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            connection.request("GET", f"/{ACCOUNT}?comp=list")
            return connection.getresponse().status > 0
        except OSError:
            return False
        finally:
            connection.close()

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-5:])
        except OSError:
            return "(no log)"

    def new_container(self) -> ContainerClient:
        container = self.service.get_container_client(f"t-{uuid.uuid4().hex[:20]}")
        container.create_container()
        return container


def start_azurite(workspace: Path) -> Azurite:
    """Install (if needed) and start Azurite keeping its data in ``workspace``; skip the
    test (fail it in CI) when that is impossible."""
    server = Azurite(workspace)
    try:
        install_azurite()
        server.start()
    except (OSError, AzuriteUnavailable) as exc:
        _unavailable(str(exc))
    return server
