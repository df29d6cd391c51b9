"""A real S3 server for the s3 plugin's tests (started by conftest.py): moto in server
mode, in a subprocess on 127.0.0.1, so a test can stop it (an outage) and start it again
on the same port.

moto keeps its state in memory, so a restart empties it: the buckets made through
:meth:`MotoServer.new_bucket` are made again after every start. The server accepts parts as
small as 64 KiB (``S3_UPLOAD_PART_MIN_SIZE``) so multipart uploads can be tested with a few
MiB; real S3 wants 5 MiB.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3

MIN_PART_SIZE = 64 * 1024
ACCESS_KEY = "AKIAFLAGSINKTESTKEY1"
SECRET_KEY = "flagsink-test-secret-never-logged"
_READY_TIMEOUT = 20.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1, stoppable and restartable."""

    def __init__(self, log: Path) -> None:
        self.port = _free_port()
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.buckets: list[str] = []
        self.starts = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "S3_UPLOAD_PART_MIN_SIZE": str(MIN_PART_SIZE)}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
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
        s3 = self.client()
        for bucket in self.buckets:
            s3.create_bucket(Bucket=bucket)

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
        """The server is down inside the block and up again (same port) after it."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def client(self, **options: Any) -> Any:
        """A boto3 S3 client for this server (fake credentials unless given)."""
        options.setdefault("aws_access_key_id", "testing")
        options.setdefault("aws_secret_access_key", "testing")
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", **options)

    def new_bucket(self) -> str:
        """A new empty bucket, made again after every restart."""
        name = f"events-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        self.buckets.append(name)
        return name

    def _post(self, path: str, data: bytes) -> None:
        request = urllib.request.Request(
            f"{self.endpoint}{path}",
            data=data,
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=5) as answer:
            assert answer.status == 200

    def writer_key(self, actions: str = "s3:*") -> tuple[str, str]:
        """An IAM access key allowed ``actions`` on every resource (for auth tests)."""
        kw = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1", **kw)
        user = f"writer-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=user)
        policy = (
            '{"Version":"2012-10-17","Statement":[{"Effect":"Allow",'
            f'"Action":"{actions}","Resource":"*"}}]}}'
        )
        iam.put_user_policy(UserName=user, PolicyName="writer", PolicyDocument=policy)
        key = iam.create_access_key(UserName=user)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    @contextlib.contextmanager
    def authenticating(self) -> Iterator[None]:
        """Inside the block every request must be signed by a known IAM key."""
        self._post("/moto-api/reset-auth", b"0")
        try:
            yield
        finally:
            self._post("/moto-api/reset-auth", b"inf")
