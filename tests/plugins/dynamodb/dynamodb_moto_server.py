"""A real DynamoDB server for the dynamodb plugin's tests (started by conftest.py): moto in
server mode, in a subprocess on 127.0.0.1.

moto keeps its state in memory; each test makes its own table (:meth:`MotoServer.new_table`),
so tests never see each other's items. :func:`race_worker` runs in child processes
(multiprocessing, spawn) racing upserts against the same table.
"""

from __future__ import annotations

import contextlib
import os
import random
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

ACCESS_KEY = "AKIAFLAGSINKDYNAMO01"
SECRET_KEY = "flagsink-dynamo-secret-never-logged"
_READY_TIMEOUT = 20.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1, stoppable."""

    def __init__(self, log: Path) -> None:
        self.port = _free_port()
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
                env=dict(os.environ),
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

    def client(self, service: str = "dynamodb", **options: Any) -> Any:
        """A boto3 client for this server (fake credentials unless given)."""
        options.setdefault("aws_access_key_id", "testing")
        options.setdefault("aws_secret_access_key", "testing")
        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1", **options)

    def new_table(
        self,
        key_schema: list[tuple[str, str, str]] | None = None,
    ) -> str:
        """A new empty table; default: LaunchDarkly's layout (namespace S HASH, key S RANGE).

        ``key_schema`` lists (attribute, type S/N/B, HASH/RANGE) for other layouts.
        """
        name = f"flags-{uuid.uuid4().hex[:12]}"
        schema = key_schema or [("namespace", "S", "HASH"), ("key", "S", "RANGE")]
        self.client().create_table(
            TableName=name,
            KeySchema=[{"AttributeName": a, "KeyType": kind} for a, _, kind in schema],
            AttributeDefinitions=[{"AttributeName": a, "AttributeType": t} for a, t, _ in schema],
            BillingMode="PAY_PER_REQUEST",
        )
        return name

    def raw_items(self, table: str) -> list[dict[str, Any]]:
        """Every item of ``table`` as DynamoDB returns it (attribute-value maps)."""
        items: list[dict[str, Any]] = []
        for page in self.client().get_paginator("scan").paginate(TableName=table):
            items.extend(page["Items"])
        return items

    def _post(self, path: str, data: bytes) -> None:
        request = urllib.request.Request(
            f"{self.endpoint}{path}",
            data=data,
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=5) as answer:
            assert answer.status == 200

    def user_key(self, actions: list[str]) -> tuple[str, str]:
        """An IAM access key allowed only ``actions`` on every resource (for auth tests)."""
        iam = self.client("iam")
        user = f"reader-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=user)
        quoted = ",".join(f'"{action}"' for action in actions)
        policy = (
            '{"Version":"2012-10-17","Statement":[{"Effect":"Allow",'
            f'"Action":[{quoted}],"Resource":"*"}}]}}'
        )
        iam.put_user_policy(UserName=user, PolicyName="store", PolicyDocument=policy)
        key = iam.create_access_key(UserName=user)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    @contextlib.contextmanager
    def authenticating(self) -> Iterator[None]:
        """Inside the block every request must be signed by a known, allowed IAM key."""
        self._post("/moto-api/reset-auth", b"0")
        try:
            yield
        finally:
            self._post("/moto-api/reset-auth", b"inf")


def race_worker(
    endpoint: str,
    table: str,
    keys: list[str],
    upserts: int,
    seed: int,
    start: Any,
    results: Any,
) -> None:
    """Child process: upsert ``upserts`` random versions of ``keys`` (after every process
    reached ``start``), then put ``(highest version written per key, violations)`` on
    ``results``; a violation is an upsert that returned an older version than it wrote."""
    from flagsink_dynamodb import DynamoDBStore

    rng = random.Random(seed)
    store = DynamoDBStore(
        table=table,
        endpointUrl=endpoint,
        region="us-east-1",
    )
    highest: dict[str, int] = {}
    violations: list[str] = []
    try:
        start.wait(30)
        for _ in range(upserts):
            key = rng.choice(keys)
            version = rng.randint(1, 1_000_000)
            item = {"key": key, "version": version, "writer": seed}
            stored = store.upsert_item("flags", item)
            if int(stored["version"]) < version:
                violations.append(f"{key}: wrote {version}, got back {stored['version']}")
            highest[key] = max(highest.get(key, 0), version)
    finally:
        store.close()
    results.put((highest, violations))
