"""Exact accounting through the relay (issue 8): ``GET /v1/status``, ``/metrics`` and
``flagsink status`` agree, and per exporter ``accepted == delivered + dropped + pending``.

The relay runs in-process (Starlette's TestClient) with and without a spool, with a real
file exporter (read back event by event) beside an exporter that refuses everything for
good or one whose sink is down; the CLI reads a relay process and its spool directory.
Every figure is checked against ground truth: the events acknowledged, the events the
sink holds, the dead-letter lines. Waits are on conditions with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

with warnings.catch_warnings():  # starlette prefers httpx2; httpx is what the tests pin
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from test_relay_process import Relay, start_relay  # noqa: F401 - the fixture

from flagsink.config import Config, parse_config
from flagsink.event import Event, new_feature_event
from flagsink.exporter import Exporter, ExportError, ExporterSettings, PermanentExportError
from flagsink.pipeline import Pipeline
from flagsink.relay import create_app
from flagsink.spool import inspect_spool
from flagsink.testing import wait_until

COLLECTOR = "/v1/data/collector"
STATUS = "/v1/status"
KEY = "status-key-3f9a1c"
MIB = 1024 * 1024

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- helpers ----------------------------------------------------------------------------------


def batch(start: int, count: int, *, invalid: int = 0) -> bytes:
    """``count`` feature events with unique user keys, then ``invalid`` events without a
    key (rejected by the relay)."""
    events: list[Any] = [
        new_feature_event(f"user-{i:07d}", "flag", i, "on", creation_date=1_700_000_000)
        for i in range(start, start + count)
    ]
    events += [{"kind": "feature", "userKey": f"bad-{i}"} for i in range(invalid)]
    return msgspec.json.encode({"events": events})


def relay_config(
    tmp_path: Path,
    *,
    spool: dict[str, Any] | None = None,
    features: dict[str, Any] | None = None,
    **service: Any,
) -> Config:
    """``features``: a file exporter writing JSON lines; ``refusing``: a second one that
    the tests replace with a sink refusing everything (it flushes every 20 ms)."""
    data: dict[str, Any] = {
        "exporters": [
            {
                "kind": "file",
                "name": "features",
                "outputDir": str(tmp_path / "out"),
                "format": "json",
                "flushInterval": 600_000,
                **(features or {}),
            },
            {
                "kind": "file",
                "name": "refusing",
                "outputDir": str(tmp_path / "unused"),
                "flushInterval": 20,
                "retryInitialInterval": 20,
                "retryMaxInterval": 50,
                "deadLetterFile": str(tmp_path / "letters" / "refusing.jsonl"),
            },
        ],
        **service,
    }
    if spool is not None:
        data["spool"] = spool
    return parse_config(data, source=str(tmp_path / "relay.yaml"))


class Refusing(Exporter[ExporterSettings]):
    """A sink that refuses every event for good (a 4xx that retrying cannot fix)."""

    kind = "refusing"

    def export(self, events: Sequence[Event]) -> None:
        raise PermanentExportError("sink refuses: schema v2 expected")


class Switchable(Exporter[ExporterSettings]):
    """A sink that is down (retryable failures) until ``up`` is set; keeps what it gets."""

    kind = "switchable"

    def __init__(self) -> None:
        super().__init__()
        self.up = threading.Event()
        self.received: list[Event] = []

    def export(self, events: Sequence[Event]) -> None:
        if not self.up.is_set():
            raise ExportError("sink down")
        self.received.extend(events)


@contextmanager
def running(config: Config) -> Iterator[tuple[TestClient, Pipeline]]:
    app = create_app(config)
    with TestClient(app) as client:
        yield client, app.relay.pipeline  # type: ignore[attr-defined]


def scheduler(pipeline: Pipeline, name: str) -> Any:
    (found,) = [s for s in pipeline.schedulers if s.name == name]
    return found


def samples(client: TestClient, **headers: str) -> Samples:
    answer = client.get("/metrics", headers=headers)
    assert answer.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def metric(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def exporters_in_metrics(found: Samples) -> dict[str, dict[str, Any]]:
    """Each exporter's accounting as /metrics shows it, in the shape of /v1/status."""
    names = {
        dict(labels)["exporter"]
        for name, labels in found
        if name.startswith("flagsink_exporter_accepted")
    }
    result = {}
    for name in names:
        dropped = {
            dict(labels)["reason"]: int(value)
            for (metric_name, labels), value in found.items()
            if metric_name == "flagsink_exporter_dropped_total" and dict(labels)["exporter"] == name
        }
        result[name] = {
            "accepted": int(metric(found, "flagsink_exporter_accepted_total", exporter=name)),
            "delivered": int(metric(found, "flagsink_exporter_delivered_total", exporter=name)),
            "dropped": dropped,
            "pending": int(metric(found, "flagsink_exporter_pending", exporter=name)),
        }
    return result


def holds(row: dict[str, Any]) -> bool:
    parts = [row["delivered"], row["pending"], *row["dropped"].values()]
    return row["accepted"] == sum(parts) and min([row["accepted"], *parts]) >= 0


def status(client: TestClient, **headers: str) -> dict[str, Any]:
    answer = client.get(STATUS, headers=headers)
    assert answer.status_code == 200, answer.text
    document: dict[str, Any] = answer.json()
    return document


def by_name(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in document["exporters"]}


def accounting(row: dict[str, Any]) -> dict[str, Any]:
    return {key: row[key] for key in ("accepted", "delivered", "dropped", "pending")}


def written(tmp_path: Path) -> list[str]:
    return [
        msgspec.json.decode(line)["userKey"]
        for path in sorted((tmp_path / "out").glob("*.json"))
        for line in path.read_bytes().splitlines()
    ]


def letters(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "letters" / "refusing.jsonl"
    if not path.exists():
        return []
    return [msgspec.json.decode(line) for line in path.read_bytes().splitlines() if line]


# -- the relay in-process ---------------------------------------------------------------------


@pytest.mark.parametrize("spooled", [False, True], ids=["memory", "spool"])
def test_status_and_metrics_agree_with_ground_truth(tmp_path: Path, spooled: bool) -> None:
    spool = {"dir": str(tmp_path / "spool")} if spooled else None
    with running(relay_config(tmp_path, spool=spool)) as (client, pipeline):
        scheduler(pipeline, "refusing").exporter = Refusing()
        for round_ in range(6):
            answer = client.post(COLLECTOR, content=batch(round_ * 100, 100, invalid=2))
            assert answer.status_code == 200
            assert answer.json()["ingestedContentCount"] == 100
        # Settled once the refusing sink's letters are all written (after the drops).
        assert wait_until(lambda: by_name(status(client))["refusing"]["deadLettered"] == 600, 10)

        document = status(client)
        found = samples(client)
        rows = by_name(document)
        # The relay's own counters: every event received is accounted for.
        assert document["relay"] == {
            "received": 612,
            "accepted": 600,
            "filtered": 0,
            "rejected": {"invalid": 12, "overloaded": 0},
            "inProgress": 0,
        }
        assert metric(found, "flagsink_relay_events_accepted_total") == 600
        # The exporter that refuses everything: all 600 dropped as rejected, each one
        # in the dead-letter file with the sink's reason.
        refusing = rows["refusing"]
        assert refusing["accepted"] == 600
        assert refusing["delivered"] == 0
        assert refusing["dropped"]["rejected"] == 600
        assert refusing["deadLettered"] == 600
        assert refusing["lastError"] == "PermanentExportError: sink refuses: schema v2 expected"
        kept = letters(tmp_path)
        assert len(kept) == 600
        assert {letter["reason"] for letter in kept} == {"sink refuses: schema v2 expected"}
        # The file exporter flushes only when the relay stops: all 600 pending.
        features = rows["features"]
        assert (features["accepted"], features["delivered"], features["pending"]) == (600, 0, 600)
        assert sum(features["dropped"].values()) == 0
        assert features["spooled"] is spooled
        # /metrics and /v1/status show the same figures, and the identity holds.
        assert exporters_in_metrics(found) == {name: accounting(row) for name, row in rows.items()}
        assert document["balanced"] is True
        assert all(row["balanced"] and holds(row) for row in rows.values())
        assert metric(found, "flagsink_exporter_dead_lettered_total", exporter="refusing") == 600
        # The existing names carry the same figures.
        assert (
            metric(
                found,
                "flagsink_exporter_events_dropped_total",
                exporter="refusing",
                reason="rejected",
            )
            == 600
        )
        assert metric(found, "flagsink_exporter_events_exported_total", exporter="features") == 0
        if spooled:
            assert document["spool"]["committed"] == {"feature": 600, "tracking": 0}
            assert document["spool"]["waiting"] == 0
            # Read a moment apart: the size may change, and commits only grow.
            assert 0 < metric(found, "flagsink_spool_bytes") <= document["spool"]["maxBytes"]
            assert metric(found, "flagsink_spool_commits_total") >= document["spool"]["commits"]
            assert document["spool"]["commits"] >= 6  # at least one per request
            assert metric(found, "flagsink_exporter_redelivered_total", exporter="features") == 0
        else:
            assert document["spool"] is None
            assert not [name for name, _ in found if name.startswith("flagsink_spool_")]
    # Stopped: the file exporter delivered every accepted event, the refusing one none.
    assert sorted(written(tmp_path)) == [f"user-{i:07d}" for i in range(600)]
    final = {s.exporter: s for s in pipeline.stats()}
    assert (final["features"].accepted, final["features"].delivered) == (600, 600)
    assert final["features"].pending == 0
    if spooled:
        durable = {c.exporter: c for c in inspect_spool(tmp_path / "spool")}
        assert (durable["features"].accepted, durable["features"].delivered) == (600, 600)
        assert durable["refusing"].dropped_by_reason == {"rejected": 600}
        assert durable["refusing"].pending == durable["features"].pending == 0


@pytest.mark.parametrize("spooled", [False, True], ids=["memory", "spool"])
def test_every_scrape_balances_while_events_flow(tmp_path: Path, spooled: bool) -> None:
    # Events keep arriving and being exported (every 100 events) while /metrics and
    # /v1/status are read: each read is one snapshot per exporter, so it balances.
    config = relay_config(
        tmp_path,
        spool={"dir": str(tmp_path / "spool")} if spooled else None,
        features={"maxEventInMemory": 100, "maxBufferedEvents": 1_000_000},
    )
    with running(config) as (client, pipeline):
        scheduler(pipeline, "refusing").exporter = Refusing()
        stop = threading.Event()
        added = 0

        def feed() -> None:
            # 50 events every 2 ms (about 25,000/s), at most 20,000: a steady flow.
            nonlocal added
            while added < 20_000 and not stop.wait(0.002):
                events = [
                    new_feature_event(f"flow-{added + i}", "flag", i, "on") for i in range(50)
                ]
                pipeline.add_events(events)
                added += len(events)

        feeder = threading.Thread(target=feed)
        feeder.start()
        try:
            for _ in range(40):
                scraped = exporters_in_metrics(samples(client))
                assert all(holds(row) for row in scraped.values()), scraped
                rows = by_name(status(client))
                assert all(row["balanced"] and holds(row) for row in rows.values()), rows
                moving = rows["features"]
                assert moving["pending"] == moving["buffered"] + moving["inFlight"] or spooled
        finally:
            stop.set()
            feeder.join()
        assert wait_until(lambda: by_name(status(client))["features"]["accepted"] == added, 10)
        rows = by_name(status(client))
        assert rows["features"]["delivered"] > 0  # exports did run meanwhile
        assert all(holds(row) for row in rows.values())


def test_status_is_protected_like_metrics(tmp_path: Path) -> None:
    config = relay_config(tmp_path, authorizedKeys={"evaluation": [KEY]})
    with running(config) as (client, _):
        for path in (STATUS, "/metrics"):
            assert client.get(path).status_code == 401
            assert client.get(path, headers={"X-API-Key": "wrong"}).status_code == 401
        assert status(client, **{"X-API-Key": KEY})["balanced"] is True
        assert status(client, Authorization=f"Bearer {KEY}")["exporters"]
        document = client.get("/openapi.json", headers={"X-API-Key": KEY}).json()
        operation = document["paths"][STATUS]["get"]
        assert operation["security"]
        assert "401" in operation["responses"]
        found = samples(client, **{"X-API-Key": KEY})
        assert (
            metric(found, "flagsink_relay_requests_total", method="GET", path=STATUS, status="401")
            == 2
        )


def full_spool_relay(tmp_path: Path) -> Config:
    return parse_config(
        {
            "spool": {"dir": str(tmp_path / "spool"), "maxBytes": MIB, "whenFull": "dropOldest"},
            "shutdownTimeout": 0.5,  # the sink is down: do not wait for it at the end
            "exporter": {
                "kind": "file",
                "name": "down",
                "outputDir": str(tmp_path / "unused"),
                "flushInterval": 20,
                "maxEventInMemory": 200,
                "retryInitialInterval": 20,
                "retryMaxInterval": 50,
            },
        },
        source=str(tmp_path / "relay.yaml"),
    )


def fill(client: TestClient, rounds: int) -> int:
    acknowledged = 0
    for round_ in range(rounds):
        answer = client.post(COLLECTOR, content=batch(round_ * 500, 500))
        assert answer.status_code == 200  # dropOldest never refuses
        acknowledged += 500
    return acknowledged


def test_a_full_spool_drops_the_oldest_and_every_event_is_counted(tmp_path: Path) -> None:
    with running(full_spool_relay(tmp_path)) as (client, pipeline):
        sink = Switchable()
        scheduler(pipeline, "down").exporter = sink
        acknowledged = fill(client, 40)  # 20,000 events, about 3 MiB
        document = status(client)
        (row,) = document["exporters"]
        spool = document["spool"]
        assert row["accepted"] == acknowledged == document["relay"]["accepted"]
        assert row["delivered"] == 0
        assert row["dropped"]["spool_full"] > 0
        assert row["pending"] > 0
        assert row["balanced"]
        assert holds(row)
        assert row["failedAttempts"] > 0
        assert row["lastError"] == "ExportError: sink down"
        assert (spool["whenFull"], spool["maxBytes"]) == ("dropOldest", MIB)
        assert spool["bytes"] <= MIB
        assert spool["refused"] == 0
        found = samples(client)
        assert exporters_in_metrics(found) == {"down": accounting(row)}
        assert metric(found, "flagsink_spool_max_bytes") == MIB
        assert (
            metric(found, "flagsink_exporter_dropped_total", exporter="down", reason="spool_full")
            == row["dropped"]["spool_full"]
        )
        # What is pending is still on disk, and the durable counters say the same.
        (durable,) = inspect_spool(tmp_path / "spool")
        assert durable.accepted == acknowledged
        assert durable.accepted == durable.delivered + durable.dropped + durable.pending


def test_after_drops_the_sink_recovers_and_the_identity_still_holds(tmp_path: Path) -> None:
    with running(full_spool_relay(tmp_path)) as (client, pipeline):
        sink = Switchable()
        scheduler(pipeline, "down").exporter = sink
        acknowledged = fill(client, 40)
        sink.up.set()
        assert wait_until(lambda: status(client)["exporters"][0]["pending"] <= 0, 20)
        (row,) = status(client)["exporters"]
        assert row["accepted"] == acknowledged
        assert row["pending"] == 0
        assert row["balanced"]
        assert holds(row)
        # A batch being sent when dropOldest deleted it may reach the sink after all: it
        # stays counted as dropped (on disk at once, so a crash cannot lose the count),
        # never as delivered too.
        users = [event.user_key for event in sink.received]
        assert len(users) == len(set(users))
        assert row["delivered"] <= len(users) <= row["delivered"] + 200


# -- the CLI against a relay process and its spool --------------------------------------------


def cli(*args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "FLAGSINK_API_KEY"}
    if key is not None:
        env["FLAGSINK_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "flagsink.cli", "status", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def process_config(tmp_path: Path, *, spool: bool) -> str:
    spool_line = f"spool: {{dir: {tmp_path / 'spool'}}}\n" if spool else ""
    return f"""
shutdownTimeout: 5
authorizedKeys: {{evaluation: [{KEY}]}}
{spool_line}exporter:
  kind: file
  name: features
  outputDir: {tmp_path / "out"}
  format: json
  flushInterval: 600000
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_cli_reads_a_running_relay(
    tmp_path: Path,
    start_relay: Callable[..., Relay],  # noqa: F811 - the fixture imported above
) -> None:
    relay = start_relay(process_config(tmp_path, spool=False))
    with httpx.Client(base_url=relay.url, headers={"X-API-Key": KEY}, timeout=10) as client:
        for round_ in range(3):
            assert (
                client.post(COLLECTOR, content=batch(round_ * 10, 10, invalid=1)).status_code == 200
            )
        served = client.get(STATUS).json()

    shown = cli("--url", relay.url, key=KEY)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == f"relay {relay.url} (flagsink {served['version']})"
    assert lines[1].split() == [
        "EXPORTER",
        "ACCEPTED",
        "DELIVERED",
        "DROPPED",
        "PENDING",
        "BALANCED",
    ]
    assert lines[2].split() == ["features", "30", "0", "0", "30", "yes"]
    assert (
        "relay: 33 received, 30 accepted, 0 filtered, 3 (invalid 3) rejected, 0 in progress"
        in lines
    )
    assert (
        lines[-1]
        == "accepted = delivered + dropped + pending holds for every exporter (30 events pending)"
    )
    assert KEY not in shown.stdout + shown.stderr

    as_json = cli("--url", f"{relay.url}/v1/status", "--api-key", KEY, "--json")
    assert as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)
    assert document["source"] == {"url": relay.url}
    assert [accounting(row) for row in document["exporters"]] == [
        accounting(row) for row in served["exporters"]
    ]
    assert document["relay"] == served["relay"]
    assert KEY not in as_json.stdout + as_json.stderr

    # Pending events with --drained: exit 1, saying how many.
    drained = cli("--url", relay.url, "--drained", key=KEY)
    assert drained.returncode == 1
    assert "--drained: 30 events are not delivered yet" in drained.stderr

    # No key, a wrong key, nothing listening: exit 3, naming the URL and what to do.
    missing = cli("--url", relay.url)
    assert missing.returncode == 3
    assert f"{relay.url}/v1/status: 401" in missing.stderr
    assert "--api-key KEY or set FLAGSINK_API_KEY" in missing.stderr
    wrong = cli("--url", relay.url, key="not-the-key")
    assert wrong.returncode == 3
    assert "the key given was refused" in wrong.stderr
    assert "not-the-key" not in wrong.stdout + wrong.stderr
    nobody = f"http://127.0.0.1:{free_port()}"
    unreachable = cli("--url", nobody, key=KEY)
    assert unreachable.returncode == 3
    assert f"cannot reach the relay at {nobody}/v1/status" in unreachable.stderr
    assert relay.stop() == 0


def test_cli_reads_the_spool_of_a_relay_killed_with_events_pending(
    tmp_path: Path,
    start_relay: Callable[..., Relay],  # noqa: F811 - the fixture imported above
) -> None:
    relay = start_relay(process_config(tmp_path, spool=True))
    with httpx.Client(base_url=relay.url, headers={"X-API-Key": KEY}, timeout=10) as client:
        for round_ in range(4):
            assert client.post(COLLECTOR, content=batch(round_ * 250, 250)).status_code == 200
        served = by_name(client.get(STATUS).json())["features"]
    assert (served["accepted"], served["pending"]) == (1000, 1000)

    # While the relay runs: read-only, and the durable figures are the relay's.
    live = cli("--spool", str(tmp_path / "spool"), "--json")
    assert live.returncode == 0, live.stderr
    (row,) = json.loads(live.stdout)["exporters"]
    assert row["name"] == "features"
    assert accounting(row) == accounting(served)

    # Killed: nothing was delivered (the file exporter flushes every 10 minutes), and
    # every acknowledged event is accounted for as pending, on disk.
    relay.process.send_signal(signal.SIGKILL)
    relay.process.wait(10)
    after = cli("--spool", str(tmp_path / "spool"))
    assert after.returncode == 0, after.stderr
    assert after.stdout.splitlines()[2].split() == [
        "features",
        "1000",
        "0",
        "0",
        "1000",
        "yes",
    ]
    drained = cli("--spool", str(tmp_path / "spool"), "--drained")
    assert drained.returncode == 1
    assert "--drained: 1000 events are not delivered yet" in drained.stderr

    # The next start delivers them; its graceful stop leaves the spool drained.
    restarted = start_relay(process_config(tmp_path, spool=True))
    assert restarted.stop() == 0
    assert sorted(written(tmp_path)) == [f"user-{i:07d}" for i in range(1000)]
    final = cli("--spool", str(tmp_path / "spool"), "--drained")
    assert final.returncode == 0, final.stdout + final.stderr
    assert final.stdout.splitlines()[2].split() == [
        "features",
        "1000",
        "1000",
        "0",
        "0",
        "yes",
    ]
