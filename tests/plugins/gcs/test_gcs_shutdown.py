"""Bounded shutdown of the gcs exporter (issue 8): ``close(1.0)`` returns within 1.1 s
and counts every undelivered event, whether Cloud Storage hangs in the middle of an upload
or refuses connections; a process with an upload hung at close exits in time."""

from __future__ import annotations

from pathlib import Path

import pytest
from flagsink_gcs import GcsExporter
from google.cloud.storage.retry import DEFAULT_RETRY

from flagsink.testing.faults import TcpProxy

from .conftest import object_names

COUNT = 40


def test_close_returns_in_time_while_an_upload_hangs(
    gcs, client, bucket, shutdown, monkeypatch: pytest.MonkeyPatch
) -> None:
    with TcpProxy(gcs.port) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        exporter = GcsExporter(bucket=bucket)
        scheduler = shutdown.scheduler(exporter, COUNT)
        shutdown.deliver(scheduler, COUNT)
        assert len(object_names(client, bucket)) == 1
        proxy.blackhole()  # Cloud Storage hangs: nothing answered, open connections stall

        shutdown.close_stuck(scheduler, COUNT)

    assert len(object_names(client, bucket)) == 1


def test_close_returns_in_time_when_storage_refuses_connections(
    refused_port, shutdown, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{refused_port}")
    # The client retries refused connections for 2 s (default 10 s: the same path,
    # slower), so the final attempt at close is still retrying at the deadline.
    exporter = GcsExporter(bucket="events", retry=DEFAULT_RETRY.with_timeout(2.0))
    scheduler = shutdown.scheduler(exporter, COUNT, retry_initial=5.0)

    shutdown.close_failed(scheduler, COUNT)


def test_process_exits_in_time_while_an_upload_hangs(blackhole, shutdown, tmp_path: Path) -> None:
    shutdown.process_exits(
        "gcs",
        {"bucket": "events"},
        COUNT,
        sink_reached=shutdown.reached(blackhole),
        tmp_path=tmp_path,
        env={"STORAGE_EMULATOR_HOST": blackhole.url},
    )
