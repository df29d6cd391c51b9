"""Bounded shutdown of the azureblob exporter (issue 8): ``close(1.0)`` returns within
1.1 s and counts every undelivered event, whether Blob Storage hangs in the middle of an
upload or refuses connections; a process with an upload hung at close exits in time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from azblob_support import ACCOUNT, KEY
from flagsink_azureblob import AzureBlobExporter

from flagsink.testing.faults import TcpProxy

COUNT = 40


def test_close_returns_in_time_while_an_upload_hangs(
    azurite, container, options: dict[str, Any], shutdown
) -> None:
    with TcpProxy(azurite.port) as proxy:
        settings = {**options, "serviceUrl": f"{proxy.url}/{ACCOUNT}"}
        del settings["timeout"]  # the default (30 s per request)
        exporter = AzureBlobExporter(**settings)
        scheduler = shutdown.scheduler(exporter, COUNT)
        shutdown.deliver(scheduler, COUNT)
        assert len(list(container.list_blobs())) == 1
        proxy.blackhole()  # Blob Storage hangs: nothing answered, open connections stall

        shutdown.close_stuck(scheduler, COUNT)

    assert len(list(container.list_blobs())) == 1


def _settings(url: str) -> dict[str, Any]:
    return {
        "container": "events",
        "accountName": ACCOUNT,
        "accountKey": KEY,
        "serviceUrl": f"{url}/{ACCOUNT}",
    }


def test_close_returns_in_time_when_storage_refuses_connections(refused_port, shutdown) -> None:
    exporter = AzureBlobExporter(**_settings(f"http://127.0.0.1:{refused_port}"))
    scheduler = shutdown.scheduler(exporter, COUNT, retry_initial=5.0)

    shutdown.close_failed(scheduler, COUNT)


def test_process_exits_in_time_while_an_upload_hangs(blackhole, shutdown, tmp_path: Path) -> None:
    shutdown.process_exits(
        "azureblob",
        _settings(blackhole.url),
        COUNT,
        sink_reached=shutdown.reached(blackhole),
        tmp_path=tmp_path,
    )
