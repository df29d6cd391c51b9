"""The webhook exporter pointed at flagsink's own relay (``flagsink.relay.create_app``
served by uvicorn on 127.0.0.1): GO Feature Flag's webhook body is its collector body, so
events arrive there event by event; the relay's API key goes in a configured header and
its 413 makes the webhook send smaller bodies.

Needs the relay extra (``flagsink[relay]``: starlette, uvicorn); without it these tests
are skipped, or fail under ``CI=true``.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import msgspec
import pytest
from flagsink_webhook import WebhookExporter

from flagsink import DataExporterScheduler, FeatureEvent, TrackingEvent
from flagsink.config import parse_config
from flagsink.exporter import PermanentExportError
from flagsink.pipeline import Pipeline
from flagsink.testing import InMemoryExporter, sample_events, wait_until

_MISSING = [name for name in ("starlette", "uvicorn") if importlib.util.find_spec(name) is None]
if _MISSING:
    _REASON = (
        f"the relay extra is not installed ({', '.join(_MISSING)}): pip install 'flagsink[relay]'"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(_REASON, pytrace=False)
    pytest.skip(_REASON, allow_module_level=True)

import uvicorn  # noqa: E402

from flagsink.relay import create_app  # noqa: E402


@pytest.fixture
def exporters() -> Iterator[Callable[..., WebhookExporter]]:
    made: list[WebhookExporter] = []

    def make(**options: object) -> WebhookExporter:
        exporter = WebhookExporter(**options)
        made.append(exporter)
        return exporter

    yield make
    for exporter in made:
        exporter.close()


@pytest.fixture
def schedulers() -> Iterator[Callable[..., DataExporterScheduler]]:
    made: list[DataExporterScheduler] = []

    def make(exporter: WebhookExporter, **options: object) -> DataExporterScheduler:
        scheduler = DataExporterScheduler(exporter, **options)  # type: ignore[arg-type]
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        scheduler.close(1.0)


RELAY_KEY = "relay-key-0d4c7a"


@contextmanager
def relay(max_body_bytes: int) -> Iterator[tuple[str, InMemoryExporter, InMemoryExporter]]:
    """flagsink's relay served by uvicorn on 127.0.0.1, its exporters in memory."""
    config = parse_config(
        {"exporter": {"kind": "log"}, "apiKeys": [RELAY_KEY], "maxBodyBytes": max_body_bytes}
    )
    features = InMemoryExporter(bulk=False)
    tracking = InMemoryExporter(bulk=False)
    pipeline = Pipeline(
        [
            (DataExporterScheduler(features, max_events_in_memory=20_000), "feature"),
            (DataExporterScheduler(tracking, max_events_in_memory=20_000), "tracking"),
        ]
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(config, pipeline=pipeline), log_level="warning")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        if not wait_until(lambda: server.started, 10):
            pytest.fail("the relay did not start within 10 s")
        yield f"http://127.0.0.1:{port}/v1/data/collector", features, tracking
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def test_events_sent_to_flagsinks_relay_arrive_there_event_by_event(
    exporters: Callable[..., WebhookExporter], schedulers: Callable[..., DataExporterScheduler]
) -> None:
    # GO Feature Flag's webhook body is its collector body: the relay takes it as is, with
    # the key in a configured header, and its 413 makes the webhook send smaller bodies.
    events = sample_events(10_000, prefix="relay")
    with relay(max_body_bytes=200_000) as (url, features, tracking):
        exporter = exporters(
            endpointUrl=url, headers={"Authorization": f"Bearer {RELAY_KEY}"}, meta={"app": "a"}
        )
        scheduler = schedulers(exporter, flush_interval=0.05, max_events_in_memory=5_000)
        scheduler.add_events(events)
        assert scheduler.flush(30), scheduler.stats()
        want_tracking = [e for e in events if isinstance(e, TrackingEvent)]
        want_features = [e for e in events if isinstance(e, FeatureEvent)]
        assert wait_until(lambda: len(features.events) == len(want_features), 10)
        assert wait_until(lambda: len(tracking.events) == len(want_tracking), 10)
        assert scheduler.stats().dropped == 0
        assert exporter.max_body_bytes <= 200_000
    # As GO Feature Flag's collector does, the relay puts the body's meta in each feature
    # event's metadata.
    meta = {"app": "a", "hostname": socket.gethostname()}
    assert features.events == [msgspec.structs.replace(e, metadata=meta) for e in want_features]
    assert tracking.events == want_tracking


def test_a_wrong_relay_key_is_refused_for_good(
    exporters: Callable[..., WebhookExporter],
) -> None:
    with relay(max_body_bytes=1_000_000) as (url, features, _):
        exporter = exporters(endpointUrl=url, headers={"X-API-Key": "wrong-key"})
        with pytest.raises(PermanentExportError, match=r"HTTP 401: .*missing or wrong API key"):
            exporter.export(sample_events(3, tracking_every=0))
        assert features.events == []
