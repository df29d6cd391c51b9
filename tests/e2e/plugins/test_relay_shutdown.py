"""Bounded shutdown of the relay process (issue 8): ``flagsink serve`` whose webhook
exporter points at a dead endpoint exits within ``shutdownTimeout`` + 100 ms of SIGTERM,
with status 0, and its log states exactly how many accepted events were not delivered.

Two dead endpoints: one that accepts connections and never answers (the export hangs in
the middle of a request when the signal comes), and one that refuses connections (the
exporter is backing off, for longer than the shutdown timeout). The time is measured
from the signal; the process start is not counted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from flagsink.testing import wait_until
from flagsink.testing.faults import TcpProxy

COLLECTOR = "/v1/data/collector"
SHUTDOWN_TIMEOUT = 1.0
ALLOWANCE = 0.1
START_TIMEOUT = 30.0
BATCHES = (120, 80, 50)  # events per request: 250 in all


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def feature(user: str) -> dict[str, Any]:
    return {
        "kind": "feature",
        "contextKind": "user",
        "userKey": user,
        "creationDate": 1_700_000_000,
        "key": "checkout-flow",
        "variation": "v2",
        "value": True,
        "default": False,
        "version": "1",
        "source": "SERVER",
    }


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port bound but not listening: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.fixture
def relay_process(tmp_path: Path) -> Iterator[Callable[[str], tuple[subprocess.Popen[bytes], str]]]:
    """Start ``flagsink serve`` with a config; returns the process and its base URL once
    /health answers. Killed at teardown if still running."""
    started: list[subprocess.Popen[bytes]] = []

    def start(config: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        path = tmp_path / "relay.yaml"
        path.write_text(config)
        log = tmp_path / "relay.log"
        command = [sys.executable, "-m", "flagsink.cli", "serve", "--config", str(path)]
        with open(log, "wb") as stderr:
            process = subprocess.Popen(
                [*command, "--port", str(port)],
                cwd=tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        started.append(process)
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            if process.poll() is not None:
                pytest.fail(f"relay exited with {process.returncode}:\n{log.read_text()}")
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        if not wait_until(healthy, START_TIMEOUT, 0.05):
            pytest.fail(f"relay not healthy within {START_TIMEOUT}s:\n{log.read_text()}")
        return process, url

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def webhook_config(endpoint: str) -> str:
    return f"""
shutdownTimeout: {SHUTDOWN_TIMEOUT}
exporter:
  kind: webhook
  endpointUrl: {endpoint}/hook
  flushInterval: 50
  maxEventInMemory: 100000
  retryInitialInterval: 30000
  retryMaxInterval: 30000
"""


def post_events(url: str) -> int:
    """POST every batch; the number of events the relay accepted."""
    accepted = 0
    with httpx.Client(base_url=url, timeout=10) as client:
        for number, size in enumerate(BATCHES):
            events = [feature(f"u-{number}-{index:04d}") for index in range(size)]
            answer = client.post(
                COLLECTOR,
                content=msgspec.json.encode({"meta": {}, "events": events}),
                headers={"Content-Type": "application/json"},
            )
            assert answer.status_code == 200, answer.text
            accepted += int(answer.json()["ingestedContentCount"])
    return accepted


def stop(process: subprocess.Popen[bytes], case: str) -> tuple[int, float]:
    """SIGTERM; the exit status and the seconds from the signal to the exit (appended to
    $FLAGSINK_SHUTDOWN_TIMINGS, JSON lines, when set)."""
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(SHUTDOWN_TIMEOUT + 10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail("the relay did not exit within 10 s of the shutdown timeout")
    seconds = time.monotonic() - started
    record = os.environ.get("FLAGSINK_SHUTDOWN_TIMINGS")
    if record:
        with open(record, "a", encoding="utf-8") as out:
            out.write(json.dumps({"test": "relay", "case": case, "seconds": seconds}) + "\n")
    return code, seconds


def undelivered_in_log(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"relay stopped with (\d+) events undelivered", log)]


def test_sigterm_with_a_hung_webhook_exits_in_time_and_counts_the_undelivered(
    relay_process: Callable[[str], tuple[subprocess.Popen[bytes], str]],
    refused_port: int,
    tmp_path: Path,
) -> None:
    with TcpProxy(refused_port) as dead:
        dead.blackhole()  # connections accepted, requests read, nothing ever answered
        process, url = relay_process(webhook_config(dead.url))
        accepted = post_events(url)
        assert accepted == sum(BATCHES)
        # The first flush is under way: its request sits in the dead endpoint.
        assert wait_until(lambda: dead.stats().bytes_discarded > 0, 10)

        code, seconds = stop(process, "SIGTERM, hung webhook")

    log = (tmp_path / "relay.log").read_text()
    assert code == 0, log
    assert seconds <= SHUTDOWN_TIMEOUT + ALLOWANCE, f"exited {seconds:.3f}s after SIGTERM\n{log}"
    assert undelivered_in_log(log) == [accepted], log


def test_sigterm_with_a_refusing_webhook_exits_in_time_and_counts_the_undelivered(
    relay_process: Callable[[str], tuple[subprocess.Popen[bytes], str]],
    refused_port: int,
    tmp_path: Path,
) -> None:
    process, url = relay_process(webhook_config(f"http://127.0.0.1:{refused_port}"))
    accepted = post_events(url)
    log_path = tmp_path / "relay.log"
    # An export failed: the exporter now waits 15-30 s before the next try.
    assert wait_until(lambda: "retrying" in log_path.read_text(), 10)

    code, seconds = stop(process, "SIGTERM, refusing webhook")

    log = log_path.read_text()
    assert code == 0, log
    assert seconds <= SHUTDOWN_TIMEOUT + ALLOWANCE, f"exited {seconds:.3f}s after SIGTERM\n{log}"
    assert undelivered_in_log(log) == [accepted], log
