"""The relay with a spool: acknowledged only once durable, idempotency kept across a
restart, 503 while the spool is full, one spool slot per worker process."""

from __future__ import annotations

import sqlite3
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec

with warnings.catch_warnings():  # starlette prefers httpx2; httpx is what the tests pin
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from test_relay_process import Relay, start_relay  # noqa: F401 - the fixture

from flagsink.config import Config, parse_config
from flagsink.event import FeatureEvent, new_feature_event
from flagsink.exporter import Exporter, ExportError, ExporterSettings
from flagsink.relay import create_app
from flagsink.spool import DB_NAME, inspect_spool
from flagsink.testing import wait_until

COLLECTOR = "/v1/data/collector"


def events(start: int, count: int) -> list[FeatureEvent]:
    return [
        new_feature_event(f"user-{i}", "flag", i, "v", creation_date=1_700_000_000)
        for i in range(start, start + count)
    ]


def body(batch: list[FeatureEvent]) -> bytes:
    return msgspec.json.encode({"events": batch, "meta": {}})


def spool_config(tmp_path: Path, **spool: Any) -> Config:
    return parse_config(
        {
            "spool": {"dir": str(tmp_path / "spool"), **spool},
            "exporter": {
                "kind": "file",
                "outputDir": str(tmp_path / "out"),
                "format": "json",
                "flushInterval": 600_000,
            },
        },
        source=str(tmp_path / "relay.yaml"),
    )


def written(tmp_path: Path) -> list[str]:
    lines = []
    for path in sorted((tmp_path / "out").glob("*.json")):
        lines += [msgspec.json.decode(line)["userKey"] for line in path.read_bytes().splitlines()]
    return lines


def test_a_2xx_means_the_events_are_already_durable(tmp_path: Path) -> None:
    with TestClient(create_app(spool_config(tmp_path))) as client:
        for round_ in range(5):
            answer = client.post(COLLECTOR, content=body(events(round_ * 100, 100)))
            assert answer.status_code == 200
            # Another connection sees them at once: committed before the answer.
            with sqlite3.connect(tmp_path / "spool" / DB_NAME) as db:
                (count,) = db.execute("SELECT count(*) FROM feature").fetchone()
            assert count == (round_ + 1) * 100
    assert sorted(written(tmp_path)) == sorted(f"user-{i}" for i in range(500))
    (stats,) = inspect_spool(tmp_path / "spool")
    assert (stats.accepted, stats.delivered, stats.pending) == (500, 500, 0)


def test_idempotency_key_answers_survive_a_restart(tmp_path: Path) -> None:
    config = spool_config(tmp_path)
    batch = body(events(0, 10))
    headers = {"Idempotency-Key": "retry-me-1"}
    with TestClient(create_app(config)) as client:
        first = client.post(COLLECTOR, content=batch, headers=headers)
        assert first.status_code == 200
    with TestClient(create_app(config)) as client:  # a new process on the same spool
        again = client.post(COLLECTOR, content=batch, headers=headers)
        assert again.status_code == 200
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.content == first.content
    assert sorted(written(tmp_path)) == sorted(f"user-{i}" for i in range(10))


class Down(Exporter[ExporterSettings]):
    kind = "down"

    def export(self, events: object) -> None:
        raise ExportError("sink down")


def test_a_full_spool_answers_503_and_acknowledged_events_stay(tmp_path: Path) -> None:
    config = spool_config(tmp_path, maxBytes=1024 * 1024, blockTimeout=500)
    app = create_app(config)
    with TestClient(app) as client:
        pipeline = app.relay.pipeline  # type: ignore[attr-defined]
        scheduler = pipeline.schedulers[0]
        scheduler.exporter = Down()
        acknowledged = 0
        status = 200
        for round_ in range(100):
            answer = client.post(COLLECTOR, content=body(events(round_ * 500, 500)))
            status = answer.status_code
            if status != 200:
                break
            acknowledged += 500
        assert status == 503
        assert answer.headers["Retry-After"]
        assert "spool is full" in answer.json()["error"]
        (stats,) = inspect_spool(tmp_path / "spool")
        # What was refused was never acknowledged, and is not counted as accepted.
        assert stats.accepted == acknowledged
        assert stats.pending == acknowledged
        assert stats.dropped == 0
        assert stats.accepted == stats.delivered + stats.dropped + stats.pending


def test_workers_each_claim_their_own_spool_slot(
    tmp_path: Path,
    start_relay: Callable[..., Relay],  # noqa: F811 - the fixture imported above
) -> None:
    config = f"""
shutdownTimeout: 5
spool: {{dir: {tmp_path / "spool"}}}
exporter: {{kind: file, outputDir: {tmp_path / "out"}, format: json, flushInterval: 600000}}
"""
    relay = start_relay(config, workers=2)
    sent = 0
    with httpx.Client(base_url=relay.url, timeout=10) as client:
        for round_ in range(40):
            answer = client.post(COLLECTOR, content=body(events(round_ * 50, 50)))
            assert answer.status_code == 200
            sent += 50
    assert wait_until(lambda: len(list((tmp_path / "spool").glob("worker-*/spool.db"))) >= 1, 10)
    assert relay.stop() == 0
    slots = sorted((tmp_path / "spool").glob("worker-*"))
    assert {s.name for s in slots} <= {"worker-0", "worker-1"}
    assert sorted(written(tmp_path)) == sorted(f"user-{i}" for i in range(sent))
    for slot in slots:
        for stats in inspect_spool(slot):
            assert stats.pending == 0
            assert stats.accepted == stats.delivered
