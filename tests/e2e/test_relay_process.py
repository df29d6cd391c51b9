"""The relay as a real process (issue 3): ``python -m flagsink.cli serve`` on a free port.

Requests go over loopback with httpx, raw sockets (slow and oversized clients) and GO
Feature Flag's own Python provider code; what the file exporters wrote is read back event
by event after the process stops. Every wait has a deadline; nothing sleeps and hopes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from gofeatureflag_python_provider.exceptions import UnauthorizedError
from gofeatureflag_python_provider.hooks.data_collector import DataCollectorHook
from gofeatureflag_python_provider.options import GoFeatureFlagOptions
from gofeatureflag_python_provider.services.api import GoFeatureFlagApi
from gofeatureflag_python_provider.services.event_publisher import EventPublisher
from gofeatureflag_python_provider.services.model.request_data_collector import (
    FeatureEvent as GoffFeatureEvent,
)
from openfeature.evaluation_context import EvaluationContext
from openfeature.flag_evaluation import FlagEvaluationDetails, FlagType
from openfeature.hook import HookContext

from flagsink.testing import wait_until

COLLECTOR = "/v1/data/collector"
KEY = "relay-process-key-7c21d9"
SHUTDOWN_TIMEOUT = 5.0
START_TIMEOUT = 30.0


# -- a relay process --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Relay:
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    stopped_in: float | None = field(default=None)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 2 * SHUTDOWN_TIMEOUT + 5) -> int:
        """Send ``sig`` and wait for the exit status."""
        started = time.monotonic()
        self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"relay did not stop within {timeout}s:\n{self.stderr()}")
        self.stopped_in = time.monotonic() - started
        return code


@pytest.fixture
def start_relay(tmp_path: Path) -> Iterator[Callable[..., Relay]]:
    """Start ``flagsink serve``; waits until /health answers."""
    started: list[Relay] = []

    def start(config: str | None, *, cwd: Path | None = None, workers: int = 1) -> Relay:
        port = free_port()
        command = [sys.executable, "-m", "flagsink.cli", "serve", "--port", str(port)]
        command += ["--workers", str(workers)]
        if config is not None:
            path = tmp_path / f"relay-{len(started)}.yaml"
            path.write_text(config)
            command += ["--config", str(path)]
        log = tmp_path / f"relay-{len(started)}.log"
        with open(log, "wb") as stderr:
            process = subprocess.Popen(
                command,
                cwd=cwd or tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        relay = Relay(process, port, log)
        started.append(relay)

        def healthy() -> bool:
            if process.poll() is not None:
                pytest.fail(f"relay exited with {process.returncode}:\n{relay.stderr()}")
            try:
                return httpx.get(f"{relay.url}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        if not wait_until(healthy, START_TIMEOUT, 0.05):
            pytest.fail(f"relay not healthy within {START_TIMEOUT}s:\n{relay.stderr()}")
        return relay

    yield start
    for relay in started:
        if relay.process.poll() is None:
            relay.process.kill()
            relay.process.wait()


def file_config(tmp_path: Path, extra: str = "") -> str:
    return f"""
retriever: {{kind: file, path: flags.yaml}}
shutdownTimeout: {SHUTDOWN_TIMEOUT}
exporters:
  - kind: file
    name: features
    outputDir: {tmp_path / "feature"}
    flushInterval: 600000
  - kind: file
    name: tracking
    eventType: tracking
    outputDir: {tmp_path / "tracking"}
    flushInterval: 600000
{extra}
"""


def read_records(directory: Path) -> list[dict[str, Any]]:
    records = [
        msgspec.json.decode(line)
        for path in sorted(directory.glob("*.json"))
        for line in path.read_bytes().splitlines()
    ]
    return sorted(records, key=lambda record: str(record["userKey"]))


def feature(user: str, **overrides: Any) -> dict[str, Any]:
    event = {
        "kind": "feature",
        "contextKind": "user",
        "userKey": user,
        "creationDate": 1_700_000_000,
        "key": "checkout-flow",
        "variation": "v2",
        "value": {"layout": "compact"},
        "default": False,
        "version": "12",
        "source": "SERVER",
    }
    event.update(overrides)
    return event


def body(events: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> bytes:
    return msgspec.json.encode({"meta": meta or {}, "events": events})


def raw_exchange(
    port: int, request: bytes, *, timeout: float = 5.0
) -> tuple[socket.socket, Callable[[], bytes]]:
    """Open a socket, send ``request``; returns it and a function reading one response."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(request)

    def read_response() -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return head + b"\r\n\r\n" + rest

    return sock, read_response


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


# -- round trip -------------------------------------------------------------------------------


def test_batches_sent_over_http_are_written_event_by_event(
    start_relay: Callable[..., Relay], tmp_path: Path
) -> None:
    config = file_config(
        tmp_path, f"authorizedKeys: {{evaluation: [{KEY}]}}\nlogFormat: json\nlogLevel: debug"
    )
    relay = start_relay(config)
    sent: list[dict[str, Any]] = []
    tracked: list[dict[str, Any]] = []
    with httpx.Client(base_url=relay.url, timeout=10) as client:
        for batch in range(5):
            events = [
                feature(f"u-{batch}-{i:03d}", creationDate=1_700_000_000_000) for i in range(200)
            ]
            track = {
                "kind": "tracking",
                "contextKind": "anonymousUser",
                "userKey": f"t-{batch}",
                "creationDate": 1_700_000_000,
                "key": "purchase",
                "evaluationContext": {"targetingKey": f"t-{batch}"},
                "trackingEventDetails": {"total": batch},
            }
            response = client.post(
                COLLECTOR,
                content=body([*events, track], meta={"batch": batch}),
                headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
            )
            assert response.status_code == 200
            assert response.json()["ingestedContentCount"] == 201
            sent += [
                {**e, "creationDate": 1_700_000_000, "metadata": {"batch": batch}} for e in events
            ]
            tracked.append(track)
        denied = client.post(COLLECTOR, content=body([feature("intruder")]))
        assert denied.status_code == 401
        info = client.get("/info").json()
        assert info["exporters"] == ["features", "tracking"]
    assert relay.stop(signal.SIGTERM) == 0
    assert read_records(tmp_path / "feature") == sorted(sent, key=lambda e: e["userKey"])
    assert read_records(tmp_path / "tracking") == tracked
    log = relay.stderr()
    assert KEY not in log
    # logFormat json: every log line (after the two start-up notices) is a JSON object.
    lines = [line for line in log.splitlines() if line and not line.startswith("flagsink:")]
    assert lines
    entries = [json.loads(line) for line in lines]
    assert any("every accepted event was delivered" in entry["message"] for entry in entries)


# -- GO Feature Flag's Python provider ------------------------------------------------------


class TrackEverything:
    """The one evaluator method DataCollectorHook calls."""

    def is_flag_trackable(self, flag_key: str) -> bool:
        return True


def test_the_gofeatureflag_python_provider_sends_events_to_the_relay(
    start_relay: Callable[..., Relay], tmp_path: Path
) -> None:
    relay = start_relay(file_config(tmp_path, f"apiKeys: [{KEY}]"))
    options = GoFeatureFlagOptions(
        endpoint=relay.url,
        api_key=KEY,
        exporter_metadata={"app": "shop", "replica": 2},
        data_flush_interval=600_000,
        max_pending_events=10_000,
    )
    api = GoFeatureFlagApi(options)
    # 1. The provider's API client, directly (millisecond dates, as its model documents).
    direct = [
        GoffFeatureEvent(
            contextKind="user",
            userKey=f"direct-{i}",
            creationDate=1_700_000_000_000 + i,
            key="new-checkout",
            variation="enabled",
            value=True,
            default=False,
            version="3",
            source="INPROCESS",
        )
        for i in range(3)
    ]
    api.send_event_to_data_collector(direct, options.get_exporter_metadata())
    # 2. Its EventPublisher fed by its DataCollectorHook, as in an application.
    publisher = EventPublisher(api, options)
    publisher.start()
    hook = DataCollectorHook(options, publisher, TrackEverything())
    for i in range(4):
        context = EvaluationContext(f"hooked-{i}", {"anonymous": i % 2 == 0})
        hook_context = HookContext("banner-color", FlagType.STRING, "grey", context)
        hook.after(
            hook_context,
            FlagEvaluationDetails("banner-color", "blue", "blue-variant", {"version": 7}),
            {},
        )
    hook.error(
        HookContext("broken-flag", FlagType.INTEGER, 5, EvaluationContext("hooked-error")),
        RuntimeError("evaluation failed"),
        {},
    )
    publisher.stop()
    # 3. A wrong key is refused the way the provider understands.
    wrong = GoFeatureFlagApi(GoFeatureFlagOptions(endpoint=relay.url, api_key="not-the-key"))
    with pytest.raises(UnauthorizedError):
        wrong.send_event_to_data_collector(direct[:1], {})
    assert relay.stop() == 0

    records = read_records(tmp_path / "feature")
    metadata = {"app": "shop", "replica": 2, "provider": "python", "openfeature": True}
    assert [r["userKey"] for r in records] == [
        "direct-0",
        "direct-1",
        "direct-2",
        "hooked-0",
        "hooked-1",
        "hooked-2",
        "hooked-3",
        "hooked-error",
    ]
    for i, record in enumerate(records[:3]):
        assert record == {
            "kind": "feature",
            "contextKind": "user",
            "userKey": f"direct-{i}",
            "creationDate": 1_700_000_000,
            "key": "new-checkout",
            "variation": "enabled",
            "value": True,
            "default": False,
            "version": "3",
            "source": "INPROCESS",
            "metadata": metadata,
        }
    now = time.time()
    for i, record in enumerate(records[3:7]):
        assert abs(record.pop("creationDate") - now) < 300
        assert record == {
            "kind": "feature",
            "contextKind": "anonymousUser" if i % 2 == 0 else "user",
            "userKey": f"hooked-{i}",
            "key": "banner-color",
            "variation": "blue-variant",
            "value": "blue",
            "default": False,
            "version": "7",
            "source": "INPROCESS",
            "metadata": metadata,
        }
    error = records[7]
    assert (error["key"], error["value"], error["variation"], error["default"]) == (
        "broken-flag",
        5,
        "SdkDefault",
        True,
    )
    assert error["version"] == ""  # the provider sends "version": null
    assert KEY not in relay.stderr()


# -- graceful shutdown ------------------------------------------------------------------------


@dataclass
class Load:
    """Threads posting uniquely keyed batches until told to stop or the relay goes away."""

    url: str
    batch: int = 250
    threads: int = 3
    sent: set[str] = field(default_factory=set)
    acked: set[str] = field(default_factory=set)
    acked_batches: int = 0
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for number in range(self.threads):
            worker = threading.Thread(target=self._run, args=(number,), daemon=True)
            worker.start()
            self.workers.append(worker)

    def join(self, timeout: float) -> None:
        self.stop.set()
        for worker in self.workers:
            worker.join(timeout)
            assert not worker.is_alive()

    def _run(self, number: int) -> None:
        failures = 0
        with httpx.Client(base_url=self.url, timeout=10) as client:
            for sequence in range(1_000_000):
                if self.stop.is_set() or failures >= 20:
                    return
                users = [f"w{number}-{sequence:06d}-{i:04d}" for i in range(self.batch)]
                with self.lock:
                    self.sent.update(users)
                try:
                    response = client.post(
                        COLLECTOR,
                        content=body([feature(user) for user in users]),
                        headers={"X-API-Key": KEY},
                    )
                except httpx.TransportError as exc:  # the relay is going away
                    failures += 1
                    with self.lock:
                        self.errors.append(type(exc).__name__)
                    self.stop.wait(0.01)
                    continue
                with self.lock:
                    if response.status_code != 200:
                        self.errors.append(f"HTTP {response.status_code}")
                    elif response.json()["ingestedContentCount"] != self.batch:
                        self.errors.append(f"HTTP 200 but {response.text}")
                    else:
                        self.acked.update(users)
                        self.acked_batches += 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_under_load_loses_no_acknowledged_event(
    start_relay: Callable[..., Relay], tmp_path: Path, sig: int
) -> None:
    relay = start_relay(file_config(tmp_path, f"apiKeys: [{KEY}]"))
    load = Load(relay.url)
    load.start()
    try:
        assert wait_until(lambda: load.acked_batches >= 30, 20), load.errors
        code = relay.stop(sig)
        # The load keeps going through the shutdown until the relay refuses connections.
        assert wait_until(lambda: len(load.errors) > 0 or load.stop.is_set(), 10)
    finally:
        load.join(15)
    assert code == 0, relay.stderr()
    # Requests cut by the shutdown fail at the transport level; none got an error answer.
    assert not [error for error in load.errors if error.startswith("HTTP")], load.errors
    assert relay.stopped_in is not None
    assert relay.stopped_in < SHUTDOWN_TIMEOUT + 1, relay.stderr()
    written = [record["userKey"] for record in read_records(tmp_path / "feature")]
    assert len(written) == len(set(written)), "an event was written twice"
    missing = load.acked - set(written)
    assert not missing, f"{len(missing)} acknowledged events lost"
    assert set(written) <= load.sent
    assert "every accepted event was delivered" in relay.stderr()


def test_serve_without_a_config_uses_the_embedded_default_in_the_working_directory(
    start_relay: Callable[..., Relay], tmp_path: Path
) -> None:
    cwd = tmp_path / "workdir"
    cwd.mkdir()
    relay = start_relay(None, cwd=cwd)
    response = httpx.post(relay.url + COLLECTOR, content=body([feature("default-user")]))
    assert response.status_code == 200
    assert response.json()["ingestedContentCount"] == 1
    assert relay.stop() == 0
    log = relay.stderr()
    assert "embedded default" in log
    assert "flagsink-data" in log
    files = list((cwd / "flagsink-data").glob("*.json"))
    assert len(files) == 1
    (record,) = [msgspec.json.decode(line) for line in files[0].read_bytes().splitlines()]
    assert record["userKey"] == "default-user"
    assert record["source"] == "SERVER"


# -- limits and misbehaving clients -----------------------------------------------------------


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(
    start_relay: Callable[..., Relay], tmp_path: Path
) -> None:
    relay = start_relay(file_config(tmp_path, "maxBodyBytes: 65536"))
    request = (
        f"POST {COLLECTOR} HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000000000\r\n\r\n"
    ).encode()
    sock, read_response = raw_exchange(relay.port, request)
    with sock:
        # Not one byte of the gigabyte was sent, yet the answer comes.
        response = read_response()
    assert status_of(response) == 413
    assert b"maxBodyBytes" in response
    after = httpx.post(relay.url + COLLECTOR, content=body([feature("after-413")]))
    assert after.json()["ingestedContentCount"] == 1
    assert relay.stop() == 0
    assert [r["userKey"] for r in read_records(tmp_path / "feature")] == ["after-413"]


def test_a_chunked_body_over_the_limit_is_refused_while_it_is_still_being_sent(
    start_relay: Callable[..., Relay], tmp_path: Path
) -> None:
    limit = 65536
    relay = start_relay(file_config(tmp_path, f"maxBodyBytes: {limit}"))
    head = (
        f"POST {COLLECTOR} HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    sock, read_response = raw_exchange(relay.port, head)
    with sock:
        chunk = b" " * 8192
        for _ in range(limit // len(chunk) + 1):  # just past the limit, and no final chunk
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        response = read_response()
    assert status_of(response) == 413
    # An HTTP client streaming a generator body gets the same answer.
    with httpx.Client(base_url=relay.url, timeout=10) as client:
        stream = (b" " * 8192 for _ in range(256))  # 2 MiB
        assert client.post(COLLECTOR, content=stream).status_code == 413
        assert client.post(COLLECTOR, content=body([feature("after")])).status_code == 200
    assert relay.stop() == 0
    assert [r["userKey"] for r in read_records(tmp_path / "feature")] == ["after"]


def test_slow_clients_do_not_block_other_requests(
    start_relay: Callable[..., Relay], tmp_path: Path
) -> None:
    relay = start_relay(file_config(tmp_path))
    payload = body([feature("slow-user")])
    half = len(payload) // 2
    request = (
        f"POST {COLLECTOR} HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    stalled = [raw_exchange(relay.port, request + payload[:half]) for _ in range(20)]
    try:
        with httpx.Client(base_url=relay.url, timeout=3) as client:
            started = time.monotonic()
            for i in range(20):
                assert client.get("/health").status_code == 200
                response = client.post(COLLECTOR, content=body([feature(f"fast-{i:02d}")]))
                assert response.json()["ingestedContentCount"] == 1
            assert time.monotonic() - started < 5
        # The stalled clients finish their bodies and are served too.
        for sock, read_response in stalled:
            sock.sendall(payload[half:])
            answer = read_response()
            assert status_of(answer) == 200
            assert b'"ingestedContentCount":1' in answer
    finally:
        for sock, _ in stalled:
            sock.close()
    assert relay.stop() == 0
    users = [r["userKey"] for r in read_records(tmp_path / "feature")]
    assert users == [f"fast-{i:02d}" for i in range(20)] + ["slow-user"] * 20


def test_two_workers_answer_keep_alive_requests_without_delayed_ack_stalls(
    start_relay: Callable[..., Relay], tmp_path: Path
) -> None:
    # uvicorn's shared socket once left TCP_NODELAY off: each keep-alive request then
    # waited ~40 ms for a delayed ACK. The relay binds it itself, so requests stay fast.
    relay = start_relay(file_config(tmp_path), workers=2)
    timings: list[float] = []
    with httpx.Client(base_url=relay.url, timeout=10) as client:
        for batch in range(40):
            events = [feature(f"w-{batch}-{i}") for i in range(10)]
            started = time.perf_counter()
            response = client.post(COLLECTOR, content=body(events))
            timings.append(time.perf_counter() - started)
            assert response.status_code == 200
    assert relay.stop() == 0
    assert sorted(timings)[len(timings) // 2] < 0.030, timings
    assert len(read_records(tmp_path / "feature")) == 400
