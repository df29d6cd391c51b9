"""Helpers of the end-to-end plugin tests (a unique module name: several test folders have
a conftest.py, so `from conftest import ...` would be ambiguous): a moto server (S3 and
DynamoDB on one port) in a subprocess, fake AWS credentials for subprocesses, free ports,
and fail-under-CI-else-skip.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, NoReturn

import pytest

ACCESS_KEY = "AKIAFLAGSINKE2E00001"
SECRET_KEY = "flagsink-e2e-secret-never-logged"
REGION = "us-east-1"
PLUGINS = {"flagsink_s3": "s3", "flagsink_dynamodb": "dynamodb"}
_READY_TIMEOUT = 30.0


def under_ci() -> bool:
    return os.environ.get("CI") == "true"


def fail_or_skip(message: str) -> NoReturn:
    """A failure under CI=true, a skip on a developer's machine."""
    if under_ci():
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def aws_env() -> dict[str, str]:
    """The environment for a subprocess talking to moto: fake credentials only, nothing
    read from ~/.aws and no instance-metadata lookups leaving this machine."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_DEFAULT_REGION=REGION,
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        PYTHONUNBUFFERED="1",
    )
    return env


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1: S3 and DynamoDB on one port."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=aws_env(),
            )
        deadline = time.monotonic() + _READY_TIMEOUT
        while not self._ready():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"moto server exited with {self.process.returncode}: {self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto server not ready in {_READY_TIMEOUT}s: {self.log_tail()}")
            time.sleep(0.02)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self) -> str:
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

    def client(self, service: str) -> Any:
        """A boto3 client for ``service`` on this server, with the fake credentials."""
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )
