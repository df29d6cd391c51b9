"""The relay in-process (issue 3): Starlette's TestClient against real file exporters.

Every test reads back what the exporters wrote, event by event. The file exporters flush
when the application stops (leaving the ``with TestClient(...)`` block runs the lifespan
shutdown, which closes the pipeline), unless a test sets a small ``maxEventInMemory``.
Nothing sleeps and hopes: waits are on conditions with a deadline.
"""

from __future__ import annotations

import json
import logging
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from prometheus_client.parser import text_string_to_metric_families
from schemathesis.config import PositiveDataAcceptanceConfig
from schemathesis.python import asgi as schemathesis_asgi
from schemathesis.specs.openapi.checks import negative_data_rejection
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

with warnings.catch_warnings():  # starlette prefers httpx2; httpx is what the tests pin
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from flagsink.config import Config, ConfigError, parse_config
from flagsink.event import Event
from flagsink.pipeline import Pipeline
from flagsink.plugins import core_version
from flagsink.relay import create_app
from flagsink.relay.app import ASGIApp
from flagsink.scheduler import DataExporterScheduler
from flagsink.testing import InMemoryExporter, wait_until

COLLECTOR = "/v1/data/collector"
KEY = "evaluation-key-5d1f0c7e9a"
OTHER_KEY = "legacy-key-0b8e44aa21"
LONG_MS = 600_000  # a flush interval no test reaches: files are written on shutdown


# -- helpers ----------------------------------------------------------------------------------


def relay_config(
    tmp_path: Path,
    *,
    feature: dict[str, Any] | None = None,
    tracking: dict[str, Any] | None = None,
    **service: Any,
) -> Config:
    """A feature file exporter under tmp/feature, a tracking one under tmp/tracking."""
    data = {
        "exporters": [
            {
                "kind": "file",
                "name": "features",
                "outputDir": str(tmp_path / "feature"),
                "flushInterval": LONG_MS,
                **(feature or {}),
            },
            {
                "kind": "file",
                "name": "tracking",
                "eventType": "tracking",
                "outputDir": str(tmp_path / "tracking"),
                "flushInterval": LONG_MS,
                **(tracking or {}),
            },
        ],
        **service,
    }
    return parse_config(data, source=str(tmp_path / "relay.yaml"))


@contextmanager
def running(app: ASGIApp) -> Iterator[TestClient]:
    """The app with its lifespan running; leaving the block flushes every exporter."""
    with TestClient(app, raise_server_exceptions=True) as client:
        yield client


def read_records(directory: Path) -> list[dict[str, Any]]:
    """Every JSON line the file exporter wrote, sorted by userKey (files may be split)."""
    records = [
        msgspec.json.decode(line)
        for path in sorted(directory.glob("*.json"))
        for line in path.read_bytes().splitlines()
    ]
    return sorted(records, key=lambda record: str(record["userKey"]))


def feature(index: int, **overrides: Any) -> dict[str, Any]:
    """A feature event as a GO Feature Flag provider sends it."""
    event = {
        "kind": "feature",
        "contextKind": "user",
        "userKey": f"user-{index:07d}",
        "creationDate": 1_700_000_000 + index,
        "key": f"flag-{index % 3}",
        "variation": "on",
        "value": index,
        "default": False,
        "version": "v2",
        "source": "SERVER",
    }
    event.update(overrides)
    return event


def tracking(index: int, **overrides: Any) -> dict[str, Any]:
    event = {
        "kind": "tracking",
        "contextKind": "user",
        "userKey": f"track-{index:07d}",
        "creationDate": 1_700_000_000 + index,
        "key": "checkout",
        "evaluationContext": {"targetingKey": f"track-{index:07d}", "plan": "pro"},
        "trackingEventDetails": {"amount": index},
    }
    event.update(overrides)
    return event


def written_feature(event: dict[str, Any]) -> dict[str, Any]:
    """The record the file exporter writes for an accepted feature event."""
    record = {**event, "kind": "feature"}
    if not record.get("metadata"):
        record.pop("metadata", None)
    return record


def post(client: TestClient, events: Sequence[Any], meta: Any = None, **kwargs: Any) -> Any:
    body: dict[str, Any] = {"events": list(events)}
    if meta is not None:
        body["meta"] = meta
    return client.post(COLLECTOR, content=msgspec.json.encode(body), **kwargs)


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text as {(sample name, sorted labels): value}."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# -- the collector ----------------------------------------------------------------------------


def test_events_are_routed_to_exporters_by_event_type(tmp_path: Path) -> None:
    features = [feature(i) for i in range(5)]
    unknown_kind = feature(5, kind="custom-kind")  # not `tracking`: a feature event
    trackings = [tracking(i) for i in range(3)]
    batch = [features[0], trackings[0], *features[1:3], trackings[1], unknown_kind]
    batch += [*features[3:], trackings[2]]
    with running(create_app(relay_config(tmp_path))) as client:
        response = post(client, batch)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.json() == {
            "ingestedContentCount": 9,
            "rejectedContentCount": 0,
            "rejected": [],
        }
    assert read_records(tmp_path / "feature") == [
        written_feature(e) for e in [*features, unknown_kind]
    ]
    assert read_records(tmp_path / "tracking") == trackings


def test_empty_source_becomes_provider_cache(tmp_path: Path) -> None:
    events = [
        feature(0, source=""),
        feature(1, source=None),
        {k: v for k, v in feature(2).items() if k != "source"},
        feature(3, source="INPROCESS"),
    ]
    with running(create_app(relay_config(tmp_path))) as client:
        assert post(client, events).json()["ingestedContentCount"] == 4
    sources = [record["source"] for record in read_records(tmp_path / "feature")]
    assert sources == ["PROVIDER_CACHE", "PROVIDER_CACHE", "PROVIDER_CACHE", "INPROCESS"]


def test_non_empty_meta_replaces_each_feature_events_metadata(tmp_path: Path) -> None:
    meta = {"provider": "python", "openfeature": True, "replica": 3}
    events = [
        feature(0, metadata={"own": "kept?"}),
        feature(1),
        feature(2, metadata={}),
        tracking(0),
    ]
    with running(create_app(relay_config(tmp_path))) as client:
        assert post(client, events, meta=meta).json()["ingestedContentCount"] == 4
        # An empty meta leaves each event's own metadata alone.
        assert (
            post(client, [feature(3, metadata={"own": "yes"}), feature(4)], meta={}).json()[
                "ingestedContentCount"
            ]
            == 2
        )
    records = read_records(tmp_path / "feature")
    assert [r.get("metadata") for r in records] == [meta, meta, meta, {"own": "yes"}, None]
    (tracked,) = read_records(tmp_path / "tracking")
    assert "metadata" not in tracked
    assert tracked == tracking(0)


@pytest.mark.parametrize(
    ("given", "written"),
    [
        (1_700_000_000_123, 1_700_000_000),
        (1_700_000_000_999.0, 1_700_000_000),
        (1_700_000_000, 1_700_000_000),
        (1_700_000_000.75, 1_700_000_000),
        (9_999_999_999, 9_999_999_999),
        (10_000_000_000, 10_000_000),
    ],
)
def test_millisecond_creation_date_is_normalised(
    tmp_path: Path, given: float, written: int
) -> None:
    with running(create_app(relay_config(tmp_path))) as client:
        response = post(client, [feature(0, creationDate=given), tracking(0, creationDate=given)])
        assert response.json()["ingestedContentCount"] == 2
    assert [r["creationDate"] for r in read_records(tmp_path / "feature")] == [written]
    assert [r["creationDate"] for r in read_records(tmp_path / "tracking")] == [written]


def test_malformed_events_are_rejected_without_failing_the_good_ones(tmp_path: Path) -> None:
    good = [feature(i) for i in range(4)]
    batch: list[Any] = [
        good[0],
        {k: v for k, v in feature(100).items() if k != "key"},  # 1: no key
        good[1],
        feature(101, key=""),  # 3: empty key
        42,  # 4: not an object
        feature(102, creationDate="yesterday"),  # 5: wrong type
        good[2],
        feature(103, kind=["feature"]),  # 7: wrong type
        tracking(104, evaluationContext="not-an-object"),  # 8: wrong type
        good[3],
        None,  # 10
    ]
    with running(create_app(relay_config(tmp_path))) as client:
        response = post(client, batch)
        assert response.status_code == 200
        body = response.json()
    assert body["ingestedContentCount"] == 4
    assert body["rejectedContentCount"] == 7
    reasons = {item["index"]: item["reason"] for item in body["rejected"]}
    assert sorted(reasons) == [1, 3, 4, 5, 7, 8, 10]
    assert "key" in reasons[1]
    assert "key" in reasons[3]
    assert "object" in reasons[4]
    assert "creationDate" in reasons[5]
    assert "kind" in reasons[7]
    assert "evaluationContext" in reasons[8]
    assert read_records(tmp_path / "feature") == [written_feature(e) for e in good]
    assert read_records(tmp_path / "tracking") == []


def test_rejected_list_is_capped_but_the_count_is_not(tmp_path: Path) -> None:
    batch = [feature(i, key="") if i % 2 else feature(i) for i in range(300)]
    with running(create_app(relay_config(tmp_path))) as client:
        body = post(client, batch).json()
    assert body["ingestedContentCount"] == 150
    assert body["rejectedContentCount"] == 150
    assert [item["index"] for item in body["rejected"]] == list(range(1, 200, 2))
    assert len(read_records(tmp_path / "feature")) == 150


@pytest.mark.parametrize(
    ("body", "named"),
    [
        (b"", "JSON"),
        (b"not json at all", "JSON"),
        (b'{"events": [', "JSON"),
        (b"[]", "object"),
        (b"null", "object"),
        (b'"events"', "object"),
        (b"{}", "events"),
        (b'{"meta": {"provider": "python"}}', "events"),
        (b'{"events": null}', "events"),
        (b'{"events": 3}', "events"),
        (b'{"events": {"key": "flag"}}', "events"),
        (b'{"meta": 3, "events": []}', "meta"),
    ],
)
def test_a_body_that_is_not_a_collector_request_is_400_naming_the_problem(
    tmp_path: Path, body: bytes, named: str
) -> None:
    with running(create_app(relay_config(tmp_path))) as client:
        response = client.post(COLLECTOR, content=body)
        assert response.status_code == 400
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert named in error
        # The relay keeps serving.
        assert post(client, [feature(0)]).json()["ingestedContentCount"] == 1
    assert len(read_records(tmp_path / "feature")) == 1


def test_an_empty_batch_is_accepted_with_zero(tmp_path: Path) -> None:
    with running(create_app(relay_config(tmp_path))) as client:
        for meta in (None, {}, {"provider": "js"}):
            response = post(client, [], meta=meta)
            assert response.status_code == 200
            assert response.json() == {
                "ingestedContentCount": 0,
                "rejectedContentCount": 0,
                "rejected": [],
            }
    assert read_records(tmp_path / "feature") == []


def test_a_100000_event_batch_is_accepted_and_every_event_written(tmp_path: Path) -> None:
    count = 100_000
    config = relay_config(
        tmp_path, feature={"maxEventInMemory": 25_000}, maxBodyBytes=64 * 1024 * 1024
    )
    events = [feature(i, value={"n": i}) for i in range(count)]
    with running(create_app(config)) as client:
        response = post(client, events, meta={"load": "test"})
        assert response.status_code == 200
        assert response.json()["ingestedContentCount"] == count
    records = read_records(tmp_path / "feature")
    assert len(records) == count
    assert [r["userKey"] for r in records] == [e["userKey"] for e in events]
    assert all(r["value"] == {"n": i} for i, r in enumerate(records))
    assert all(r["metadata"] == {"load": "test"} for r in records)


# -- authentication ---------------------------------------------------------------------------

KEY_STYLES: dict[str, dict[str, Any]] = {
    "authorizedKeys": {"authorizedKeys": {"evaluation": [KEY, "second-evaluation-key"]}},
    "apiKeys": {"apiKeys": ["first-legacy-key", KEY]},
}


@pytest.fixture(params=sorted(KEY_STYLES))
def secured_config(request: pytest.FixtureRequest, tmp_path: Path) -> Config:
    return relay_config(tmp_path, **KEY_STYLES[request.param])


@pytest.mark.parametrize(
    "headers",
    [
        {"X-API-Key": KEY},
        {"x-api-key": KEY},
        {"Authorization": f"Bearer {KEY}"},
        {"Authorization": f"bearer {KEY}"},
    ],
)
def test_a_configured_key_is_accepted_in_either_header(
    secured_config: Config, tmp_path: Path, headers: dict[str, str]
) -> None:
    with running(create_app(secured_config)) as client:
        response = post(client, [feature(0)], headers=headers)
        assert response.status_code == 200
        assert response.json()["ingestedContentCount"] == 1
        assert client.get("/metrics", headers=headers).status_code == 200
        assert client.get("/openapi.json", headers=headers).status_code == 200
    assert [r["userKey"] for r in read_records(tmp_path / "feature")] == ["user-0000000"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": ""},
        {"X-API-Key": "wrong"},
        {"X-API-Key": KEY[:-1]},
        {"X-API-Key": KEY + "x"},
        {"X-API-Key": f"Bearer {KEY}"},
        {"Authorization": KEY},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer wrong"},
        {"X-API-Key": KEY.upper()},
    ],
)
def test_a_wrong_or_missing_key_is_401_and_nothing_is_ingested(
    secured_config: Config, tmp_path: Path, headers: dict[str, str]
) -> None:
    with running(create_app(secured_config)) as client:
        response = post(client, [feature(0)], headers=headers)
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/json"
        assert "API key" in response.json()["error"]
        assert client.get("/metrics", headers=headers).status_code == 401
        assert client.get("/openapi.json", headers=headers).status_code == 401
        # Bad requests fail auth before their body is even looked at.
        assert client.post(COLLECTOR, content=b"junk", headers=headers).status_code == 401
    assert read_records(tmp_path / "feature") == []


def test_health_and_info_are_open_and_the_rest_protected(secured_config: Config) -> None:
    with running(create_app(secured_config)) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/info").status_code == 200
        for path in ("/metrics", "/openapi.json", "/unknown"):
            assert client.get(path).status_code == 401, path
        assert post(client, [feature(0)]).status_code == 401
        # With a key, an unknown path is a plain 404.
        assert client.get("/unknown", headers={"X-API-Key": KEY}).status_code == 404
        document = client.get("/openapi.json", headers={"X-API-Key": KEY}).json()
    collector = document["paths"][COLLECTOR]["post"]
    assert collector["security"] == [{"ApiKey": []}, {"Bearer": []}]
    assert "401" in collector["responses"]
    assert "security" not in document["paths"]["/health"]["get"]


def test_every_key_style_and_admin_keys_are_accepted(tmp_path: Path) -> None:
    config = relay_config(
        tmp_path,
        authorizedKeys={"evaluation": ["eval-key-1"], "admin": ["admin-key-1"]},
        apiKeys=["legacy-key-1"],
    )
    with running(create_app(config)) as client:
        for index, key in enumerate(("eval-key-1", "admin-key-1", "legacy-key-1")):
            response = post(client, [feature(index)], headers={"X-API-Key": key})
            assert response.status_code == 200, key
    assert len(read_records(tmp_path / "feature")) == 3


def test_without_keys_everything_is_open(tmp_path: Path) -> None:
    with running(create_app(relay_config(tmp_path))) as client:
        for path in ("/metrics", "/openapi.json", "/health", "/info"):
            assert client.get(path).status_code == 200, path
        assert post(client, [feature(0)], headers={"X-API-Key": "anything"}).status_code == 200
        document = client.get("/openapi.json").json()
    assert document["paths"][COLLECTOR]["post"]["security"] == []
    assert "401" not in document["paths"][COLLECTOR]["post"]["responses"]


def test_keys_never_appear_in_logs_or_responses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wrong-key-that-a-client-sent-3f9a"
    caplog.set_level(logging.DEBUG)
    config = relay_config(
        tmp_path,
        authorizedKeys={"evaluation": [KEY]},
        apiKeys=[OTHER_KEY],
        retriever={"kind": "file", "path": "flags.yaml"},  # logged as ignored
    )
    seen: list[str] = [repr(config), str(config.service), repr(config.service)]
    with running(create_app(config)) as client:
        for headers in (
            {"X-API-Key": KEY},
            {"Authorization": f"Bearer {OTHER_KEY}"},
            {"X-API-Key": wrong},
            {},
        ):
            for response in (
                post(client, [feature(0), {"bad": 1}], headers=headers),
                client.post(COLLECTOR, content=b"{", headers=headers),
                client.get("/metrics", headers=headers),
                client.get("/openapi.json", headers=headers),
                client.get("/info", headers=headers),
                client.get("/nowhere", headers=headers),
            ):
                seen.append(response.text)
                seen.extend(f"{k}: {v}" for k, v in response.headers.items())
    assert "relay started" in caplog.text  # the logs were captured
    assert "retriever" in caplog.text
    everything = "\n".join([caplog.text, *seen])
    for secret in (KEY, OTHER_KEY, wrong):
        assert secret not in everything


# -- limits -----------------------------------------------------------------------------------


def raw_request(
    client: TestClient,
    app: ASGIApp,
    headers: list[tuple[bytes, bytes]],
    chunks: Sequence[bytes],
) -> tuple[int, bytes, int]:
    """Call the ASGI app directly; returns (status, body, body chunks it pulled)."""
    pulled = 0
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if pulled < len(chunks):
            pulled += 1
            return {
                "type": "http.request",
                "body": chunks[pulled - 1],
                "more_body": pulled < len(chunks),
            }
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": COLLECTOR,
        "raw_path": COLLECTOR.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    assert client.portal is not None
    client.portal.call(app, scope, receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], body, pulled


def test_a_declared_length_over_the_limit_is_413_without_reading_the_body(
    tmp_path: Path,
) -> None:
    config = relay_config(tmp_path, maxBodyBytes=4096)
    app = create_app(config)
    chunks = [b" " * 1024] * 10
    with running(app) as client:
        status, body, pulled = raw_request(client, app, [(b"content-length", b"10240")], chunks)
        assert status == 413
        assert pulled == 0
        assert "maxBodyBytes" in json.loads(body)["error"]
        assert "4096" in json.loads(body)["error"]
        # The relay keeps serving.
        assert post(client, [feature(0)]).json()["ingestedContentCount"] == 1
    assert len(read_records(tmp_path / "feature")) == 1


def test_a_chunked_body_over_the_limit_is_413_and_reading_stops(tmp_path: Path) -> None:
    config = relay_config(tmp_path, maxBodyBytes=4096)
    app = create_app(config)
    chunks = [b" " * 1024] * 100
    with running(app) as client:
        status, body, pulled = raw_request(client, app, [], chunks)
        assert status == 413
        assert "maxBodyBytes" in json.loads(body)["error"]
        assert pulled == 5  # stopped right after the limit was passed
        # Through an HTTP client too: a generator body is sent without Content-Length.
        sent = 0

        def generate() -> Iterator[bytes]:
            nonlocal sent
            for chunk in chunks:
                sent += 1
                yield chunk

        # (the test client reads a generator whole; test_relay_process checks a real socket)
        assert client.post(COLLECTOR, content=generate()).status_code == 413
        assert sent == len(chunks)
        assert post(client, [feature(0)]).json()["ingestedContentCount"] == 1


def test_a_body_exactly_at_the_limit_is_accepted_and_one_byte_more_is_413(
    tmp_path: Path,
) -> None:
    limit = 4096
    config = relay_config(tmp_path, maxBodyBytes=limit)
    with running(create_app(config)) as client:
        body = msgspec.json.encode({"events": [feature(0)]})
        padded = body + b" " * (limit - len(body))
        assert len(padded) == limit
        assert client.post(COLLECTOR, content=padded).status_code == 200
        assert client.post(COLLECTOR, content=padded + b" ").status_code == 413
        # The same without Content-Length (chunked).
        assert client.post(COLLECTOR, content=iter([padded])).status_code == 200
        assert client.post(COLLECTOR, content=iter([padded, b" "])).status_code == 413
    assert len(read_records(tmp_path / "feature")) == 2


class GateExporter(InMemoryExporter):
    """An in-memory exporter whose exports wait until the gate opens."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def export(self, events: Sequence[Event]) -> None:
        if not self.gate.wait(10):
            raise TimeoutError("the test never opened the gate")
        super().export(events)


def test_full_buffers_give_503_with_retry_after_and_accepted_events_are_never_dropped(
    tmp_path: Path,
) -> None:
    exporter = GateExporter()
    scheduler = DataExporterScheduler(
        exporter,
        flush_interval=600,
        max_events_in_memory=10,
        max_buffered_events=20,
        retry_initial=0.01,
        retry_max=0.02,
        name="gate",
    )
    app = create_app(relay_config(tmp_path), pipeline=Pipeline([(scheduler, "feature")]))
    accepted: list[str] = []
    refused: list[str] = []
    sent = 0

    def send_batch(size: int) -> int:
        nonlocal sent
        batch = [feature(sent + i) for i in range(size)]
        sent += size
        response = post(client, batch)
        keys = [e["userKey"] for e in batch]
        if response.status_code == 200:
            assert response.json()["ingestedContentCount"] == size
            accepted.extend(keys)
        else:
            refused.extend(keys)
        return int(response.status_code)

    with running(app) as client:
        assert send_batch(10) == 200
        # The worker takes that batch and is now stuck exporting it.
        assert wait_until(lambda: scheduler.stats().in_flight == 10, 5)
        exporter.fail_next(1)  # ... and that export will fail: its 10 events come back
        statuses = [send_batch(5) for _ in range(6)]
        assert statuses.count(200) >= 1
        assert statuses[-1] == 503
        response = post(client, [feature(999)])
        assert response.status_code == 503
        assert int(response.headers["retry-after"]) > 0
        assert "has no room" in response.json()["error"]
        metrics = metric_samples(client.get("/metrics").text)
        assert metrics[("flagsink_relay_events_rejected_total", (("reason", "overloaded"),))] > 0
        exporter.gate.set()
        # Once the exporter recovers, the relay accepts again.
        assert wait_until(lambda: scheduler.stats().buffered + scheduler.stats().in_flight == 0)
        assert send_batch(5) == 200
    stats = scheduler.stats()
    assert stats.dropped == 0, stats
    assert stats.retried == 10
    delivered = [event.user_key for event in exporter.events]
    assert sorted(delivered) == sorted(accepted)
    assert not set(delivered) & set(refused)


def test_a_failing_file_exporter_fills_its_buffer_then_503_until_it_recovers(
    tmp_path: Path,
) -> None:
    config = relay_config(
        tmp_path,
        feature={
            "maxEventInMemory": 10,
            "maxBufferedEvents": 20,
            "retryInitialInterval": 20,
            "retryMaxInterval": 40,
        },
    )
    out = tmp_path / "feature"
    with running(create_app(config)) as client:
        out.rmdir()
        out.write_text("a regular file where the output directory was")
        assert post(client, [feature(i) for i in range(10)]).status_code == 200
        assert post(client, [feature(i) for i in range(10, 20)]).status_code == 200
        response = post(client, [feature(20)])
        assert response.status_code == 503
        assert response.headers["retry-after"].isdigit()

        def failures() -> float:
            text = client.get("/metrics").text
            return metric_samples(text)[
                ("flagsink_exporter_failed_exports_total", (("exporter", "features"),))
            ]

        assert wait_until(lambda: failures() >= 2, 5)
        out.unlink()
        out.mkdir()
        assert wait_until(lambda: post(client, [feature(21)]).status_code == 200, 5)
        metrics = metric_samples(client.get("/metrics").text)
        assert metrics[("flagsink_exporter_events_retried_total", (("exporter", "features"),))] > 0
    keys = [r["userKey"] for r in read_records(out)]
    assert keys == [f"user-{i:07d}" for i in (*range(20), 21)]


# -- metrics, info, OpenAPI -------------------------------------------------------------------


def test_metrics_count_events_exports_and_requests(tmp_path: Path) -> None:
    config = relay_config(tmp_path, feature={"maxEventInMemory": 4}, maxBodyBytes=2048)
    with running(create_app(config)) as client:
        assert (
            post(client, [feature(i) for i in range(8)] + [tracking(0), {"no": "key"}]).json()[
                "ingestedContentCount"
            ]
            == 9
        )
        assert client.post(COLLECTOR, content=b"nope").status_code == 400
        assert client.post(COLLECTOR, content=b" " * 4096).status_code == 413
        assert client.get("/nowhere").status_code == 404

        def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            response = client.get("/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            return metric_samples(response.text)

        features = (("exporter", "features"),)
        # Two batches of 4 reach maxEventInMemory and are exported now.
        assert wait_until(
            lambda: samples()[("flagsink_exporter_events_exported_total", features)] == 8, 5
        )
        m = samples()
    assert m[("flagsink_relay_events_received_total", ())] == 10
    assert m[("flagsink_relay_events_accepted_total", ())] == 9
    assert m[("flagsink_relay_events_rejected_total", (("reason", "invalid"),))] == 1
    assert m[("flagsink_exporter_events_buffered", features)] == 0
    assert m[("flagsink_exporter_events_buffered", (("exporter", "tracking"),))] == 1
    assert m[("flagsink_exporter_events_retried_total", features)] == 0
    for reason in ("overflow", "rejected", "shutdown"):
        assert m[("flagsink_exporter_events_dropped_total", (*features, ("reason", reason)))] == 0
    assert m[("flagsink_exporter_export_duration_seconds_count", features)] == 2
    assert m[("flagsink_exporter_export_duration_seconds_sum", features)] > 0
    assert m[("flagsink_exporter_export_duration_seconds_bucket", (*features, ("le", "+Inf")))] == 2

    def requests(path: str, status: str, method: str = "POST") -> float:
        labels = (("method", method), ("path", path), ("status", status))
        return m.get(("flagsink_relay_requests_total", labels), 0)

    assert requests(COLLECTOR, "200") == 1
    assert requests(COLLECTOR, "400") == 1
    assert requests(COLLECTOR, "413") == 1
    assert requests("other", "404", "GET") == 1
    assert requests("/metrics", "200", "GET") >= 1
    assert len(read_records(tmp_path / "feature")) == 8


def test_info_shows_the_version_kinds_and_exporters(tmp_path: Path) -> None:
    with running(create_app(relay_config(tmp_path))) as client:
        info = client.get("/info").json()
    assert info["version"] == core_version()
    assert {"file", "log"} <= set(info["kinds"])
    assert info["exporters"] == ["features", "tracking"]


@pytest.mark.parametrize("secured", [False, True], ids=["open", "secured"])
def test_the_openapi_document_is_valid(tmp_path: Path, secured: bool) -> None:
    service: dict[str, Any] = {"apiKeys": [KEY]} if secured else {}
    app = create_app(relay_config(tmp_path, **service))
    with running(app) as client:
        document = client.get("/openapi.json", headers={"X-API-Key": KEY}).json()
    assert document["openapi"].startswith("3.1")
    errors = [error.message for error in OPENAPI_31_VALIDATOR.iter_errors(document)]
    assert errors == []
    assert not OPENAPI_31_VALIDATOR.is_valid({**document, "info": {}})  # the check bites
    assert document["info"]["version"] == core_version()
    assert set(document["paths"]) == {
        COLLECTOR,
        "/v1/flag/configuration",
        "/health",
        "/info",
        "/metrics",
        "/v1/status",
    }
    schema = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} == {
        f"POST {COLLECTOR}",
        "POST /v1/flag/configuration",
        "GET /health",
        "GET /info",
        "GET /metrics",
        "GET /v1/status",
    }


@pytest.fixture(params=["open", "secured"])
def api_schema(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    service: dict[str, Any] = {"apiKeys": [KEY]} if request.param == "secured" else {}
    app = create_app(relay_config(tmp_path, **service))
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", app, headers={"X-API-Key": KEY} if service else {}
    )
    # A schema-valid request may reuse an Idempotency-Key that an earlier generated request
    # sent with another body: 422 is then the documented answer, not a wrongly refused input.
    schema.config.checks.positive_data_acceptance = PositiveDataAcceptanceConfig(
        expected_statuses=["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]
    )
    yield schema.include(method=["GET", "POST"])
    # schemathesis keeps an app's lifespan running until exit: stop it (flushing the files).
    schemathesis_asgi.shutdown_lifespans()


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_every_operation_conforms_to_the_openapi_document(case: Any) -> None:
    # Positive and negative cases, every default check (no 5xx, documented status codes,
    # content types, headers and response schemas, auth enforced) but one: by design a
    # malformed *event* is rejected individually inside a 200 response (listed in
    # `rejected`) rather than failing its whole batch, so schema-violating events in an
    # otherwise valid body are accepted on purpose.
    response = case.call_and_validate(
        headers={"X-API-Key": KEY}, excluded_checks=[negative_data_rejection]
    )
    assert response.status_code < 500 or response.status_code == 503


def test_request_metrics_stay_bounded_whatever_methods_and_paths_clients_send(
    tmp_path: Path,
) -> None:
    with running(create_app(relay_config(tmp_path))) as client:
        for i in range(50):
            assert client.request(f"X-METHOD-{i}", f"/random/{i}").status_code == 404
            assert client.request(f"X-METHOD-{i}", COLLECTOR).status_code == 405
        m = metric_samples(client.get("/metrics").text)
    series = {labels for name, labels in m if name == "flagsink_relay_requests_total"}
    methods = {dict(labels)["method"] for labels in series}
    paths = {dict(labels)["path"] for labels in series}
    assert methods == {"other"}
    assert paths == {"other", COLLECTOR}
    other = (("method", "other"), ("path", "other"), ("status", "404"))
    assert m[("flagsink_relay_requests_total", other)] == 50


def test_batch_larger_than_an_exporter_can_ever_buffer_gets_413(tmp_path: Path) -> None:
    scheduler = DataExporterScheduler(
        GateExporter(), flush_interval=600, max_events_in_memory=10, max_buffered_events=20
    )
    app = create_app(relay_config(tmp_path), pipeline=Pipeline([(scheduler, "feature")]))
    with running(app) as client:
        response = post(client, [feature(i) for i in range(21)])
        assert response.status_code == 413
        assert "maxBufferedEvents 20" in response.json()["error"]
        # Tracking events do not count against a feature-only exporter.
        tracking = [{"kind": "tracking", "key": "t", "userKey": f"u{i}"} for i in range(50)]
        assert post(client, tracking).status_code == 200
    assert scheduler.stats().received == 0


@pytest.mark.parametrize(
    "service",
    [{"apiKeys": [""]}, {"authorizedKeys": {"evaluation": ["good", "  "]}}],
)
def test_an_empty_key_is_a_config_error_not_auth_switched_off(
    tmp_path: Path, service: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError) as caught:
        relay_config(tmp_path, **service)
    assert "is empty" in str(caught.value)
    assert "good" not in str(caught.value)


def test_unknown_routes_and_methods_answer_json(tmp_path: Path) -> None:
    with running(create_app(relay_config(tmp_path))) as client:
        missing = client.get("/nope")
        assert missing.status_code == 404
        assert missing.json() == {"error": "Not Found"}
        wrong = client.get(COLLECTOR)
        assert wrong.status_code == 405
        assert "error" in wrong.json()
        assert "POST" in wrong.headers["allow"]
