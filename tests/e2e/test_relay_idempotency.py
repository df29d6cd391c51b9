"""``Idempotency-Key`` on the relay's collector (issue 8): a retry is answered, not ingested.

In-process tests drive the Starlette app with its TestClient and read back what real file
exporters wrote (or what an in-memory exporter received); one test runs ``flagsink serve``
as a process. Time is an injected clock, never a sleep; concurrency is made deterministic
with events, and every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from prometheus_client.parser import text_string_to_metric_families

with warnings.catch_warnings():  # starlette prefers httpx2; httpx is what the tests pin
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from flagsink.config import Config, ConfigError, parse_config
from flagsink.event import Event
from flagsink.pipeline import Pipeline
from flagsink.relay import create_app
from flagsink.relay.app import ASGIApp
from flagsink.relay.idempotency import (
    Claim,
    MemoryIdempotencyStore,
    StoredResponse,
    key_problem,
    request_scope,
)
from flagsink.scheduler import DataExporterScheduler
from flagsink.testing import InMemoryExporter, wait_until

COLLECTOR = "/v1/data/collector"
KEY_A = "client-a-key-3b7e19"
KEY_B = "client-b-key-c40d82"
LONG_MS = 600_000  # a flush interval no test reaches: files are written on shutdown
REPLAYED = "idempotent-replayed"


# -- helpers ----------------------------------------------------------------------------------


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def file_config(tmp_path: Path, **service: Any) -> Config:
    data = {
        "exporters": [
            {
                "kind": "file",
                "name": "features",
                "outputDir": str(tmp_path / "feature"),
                "flushInterval": LONG_MS,
            }
        ],
        **service,
    }
    return parse_config(data, source=str(tmp_path / "relay.yaml"))


def memory_pipeline(
    exporter: InMemoryExporter | None = None, **options: Any
) -> tuple[Pipeline, InMemoryExporter]:
    exporter = exporter or InMemoryExporter()
    scheduler = DataExporterScheduler(exporter, flush_interval=600, name="memory", **options)
    return Pipeline([(scheduler, "feature")]), exporter


@contextmanager
def running(app: ASGIApp, *, raise_server_exceptions: bool = True) -> Iterator[TestClient]:
    """The app with its lifespan running; leaving the block flushes every exporter."""
    with TestClient(app, raise_server_exceptions=raise_server_exceptions) as client:
        yield client


def read_user_keys(directory: Path) -> list[str]:
    """The userKey of every record the file exporter wrote, sorted."""
    return sorted(
        msgspec.json.decode(line)["userKey"]
        for path in directory.glob("*.json")
        for line in path.read_bytes().splitlines()
    )


def feature(index: int, **overrides: Any) -> dict[str, Any]:
    event = {
        "kind": "feature",
        "contextKind": "user",
        "userKey": f"user-{index:07d}",
        "creationDate": 1_700_000_000 + index,
        "key": "new-checkout",
        "variation": "on",
        "value": index,
        "default": False,
        "version": "3",
        "source": "SERVER",
    }
    event.update(overrides)
    return event


def body_of(events: Sequence[Any]) -> bytes:
    return msgspec.json.encode({"meta": {"app": "shop"}, "events": list(events)})


def send(client: TestClient, body: bytes, key: str | None = None, **headers: str) -> Any:
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post(COLLECTOR, content=body, headers=headers)


def metric_samples(client: TestClient, **headers: str) -> dict[tuple[str, tuple[Any, ...]], float]:
    text = client.get("/metrics", headers=headers).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def relay_of(app: ASGIApp) -> Any:
    """The request handlers behind the app (for fault injection only)."""
    return cast(Any, app).relay


# -- retries ----------------------------------------------------------------------------------


def test_a_retry_is_answered_byte_for_byte_and_ingested_once(tmp_path: Path) -> None:
    events: list[Any] = [feature(0), feature(1), {"no": "key"}, feature(2)]
    body = body_of(events)
    with running(create_app(file_config(tmp_path))) as client:
        first = send(client, body, "retry-1")
        assert first.status_code == 200
        assert REPLAYED not in first.headers
        assert first.json()["ingestedContentCount"] == 3
        assert first.json()["rejectedContentCount"] == 1
        for _ in range(3):
            again = send(client, body, "retry-1")
            assert again.status_code == 200
            assert again.content == first.content
            assert again.headers["content-type"] == first.headers["content-type"]
            assert again.headers[REPLAYED] == "true"
        # Another key is another request, even with the same body.
        other = send(client, body, "retry-2")
        assert other.status_code == 200
        assert REPLAYED not in other.headers
        m = metric_samples(client)
    assert read_user_keys(tmp_path / "feature") == sorted([f"user-{i:07d}" for i in range(3)] * 2)
    assert m[("flagsink_relay_idempotent_replays_total", ())] == 3
    assert m[("flagsink_relay_events_received_total", ())] == 8  # two requests of 4
    assert m[("flagsink_relay_events_accepted_total", ())] == 6
    assert m[("flagsink_relay_idempotency_keys", ())] == 2
    ok = (("method", "POST"), ("path", COLLECTOR), ("status", "200"))
    assert m[("flagsink_relay_requests_total", ok)] == 5


def test_without_the_header_every_request_is_ingested(tmp_path: Path) -> None:
    body = body_of([feature(0)])
    with running(create_app(file_config(tmp_path))) as client:
        for _ in range(3):
            response = send(client, body)
            assert response.status_code == 200
            assert REPLAYED not in response.headers
        m = metric_samples(client)
    assert read_user_keys(tmp_path / "feature") == ["user-0000000"] * 3
    assert m[("flagsink_relay_idempotency_keys", ())] == 0


def test_the_same_key_with_another_body_is_422_and_ingests_nothing(tmp_path: Path) -> None:
    with running(create_app(file_config(tmp_path))) as client:
        assert send(client, body_of([feature(0)]), "order-17").status_code == 200
        response = send(client, body_of([feature(1)]), "order-17")
        assert response.status_code == 422
        error = response.json()["error"]
        assert "Idempotency-Key" in error
        assert "different body" in error
        assert "new key" in error
        # The first answer is still there for a true retry.
        assert send(client, body_of([feature(0)]), "order-17").headers[REPLAYED] == "true"
        m = metric_samples(client)
    assert read_user_keys(tmp_path / "feature") == ["user-0000000"]
    assert m[("flagsink_relay_idempotency_conflicts_total", (("reason", "mismatch"),))] == 1
    assert m[("flagsink_relay_idempotency_conflicts_total", (("reason", "in_progress"),))] == 0


def test_a_key_still_being_processed_is_409_with_retry_after(tmp_path: Path) -> None:
    pipeline, exporter = memory_pipeline()
    app = create_app(file_config(tmp_path), pipeline=pipeline)
    relay = relay_of(app)
    ingest = relay._ingest
    entered, gate = threading.Event(), threading.Event()

    async def held_ingest(body: bytes) -> Any:
        # Holds the first request between its claim and its answer, as a slow commit would.
        entered.set()
        if not await asyncio.to_thread(gate.wait, 10):
            raise TimeoutError("the test never opened the gate")
        return await ingest(body)

    relay._ingest = held_ingest
    body = body_of([feature(0), feature(1)])
    with running(app) as client, ThreadPoolExecutor(1) as pool:
        first = pool.submit(send, client, body, "slow-1")
        assert entered.wait(10)
        busy = send(client, body, "slow-1")
        assert busy.status_code == 409
        assert busy.headers["retry-after"] == "1"
        assert "still being processed" in busy.json()["error"]
        # Another body under the same key is a mismatch even while the first runs.
        assert send(client, body_of([feature(2)]), "slow-1").status_code == 422
        assert exporter.events == []
        assert pipeline.stats()[0].received == 0
        gate.set()
        answer = first.result(10)
        assert answer.status_code == 200
        retry = send(client, body, "slow-1")
        assert retry.headers[REPLAYED] == "true"
        assert retry.content == answer.content
        m = metric_samples(client)
    assert [event.user_key for event in exporter.events] == ["user-0000000", "user-0000001"]
    assert m[("flagsink_relay_idempotency_conflicts_total", (("reason", "in_progress"),))] == 1
    assert m[("flagsink_relay_idempotency_conflicts_total", (("reason", "mismatch"),))] == 1
    assert m[("flagsink_relay_idempotent_replays_total", ())] == 1


# -- what is not remembered -------------------------------------------------------------------


class GateExporter(InMemoryExporter):
    """An in-memory exporter whose exports wait until the gate opens."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def export(self, events: Sequence[Event]) -> None:
        if not self.gate.wait(10):
            raise TimeoutError("the test never opened the gate")
        super().export(events)


def test_a_503_is_not_remembered_and_the_retry_is_ingested(tmp_path: Path) -> None:
    exporter = GateExporter()
    pipeline, _ = memory_pipeline(exporter, max_events_in_memory=10, max_buffered_events=20)
    (scheduler,) = pipeline.schedulers
    app = create_app(file_config(tmp_path), pipeline=pipeline)
    batch = body_of([feature(100 + i) for i in range(11)])
    with running(app) as client:
        assert send(client, body_of([feature(i) for i in range(10)])).status_code == 200
        assert wait_until(lambda: scheduler.stats().in_flight == 10, 5)  # stuck in export
        full = send(client, batch, "batch-7")
        assert full.status_code == 503
        exporter.gate.set()
        assert wait_until(lambda: scheduler.stats().in_flight == 0, 5)
        retry = send(client, batch, "batch-7")
        assert retry.status_code == 200
        assert REPLAYED not in retry.headers
        assert retry.json()["ingestedContentCount"] == 11
        assert send(client, batch, "batch-7").headers[REPLAYED] == "true"
    delivered = sorted(event.user_key for event in exporter.events)
    assert delivered == sorted([f"user-{i:07d}" for i in (*range(10), *range(100, 111))])


def test_a_bad_body_or_an_oversized_one_is_not_remembered(tmp_path: Path) -> None:
    config = file_config(tmp_path, maxBodyBytes=4096)
    good = body_of([feature(0)])
    with running(create_app(config)) as client:
        assert send(client, b"not json", "fix-me").status_code == 400
        assert send(client, b" " * 5000, "fix-me").status_code == 413
        # The key is free again: the corrected request is processed, not refused as another body.
        response = send(client, good, "fix-me")
        assert response.status_code == 200
        assert REPLAYED not in response.headers
    assert read_user_keys(tmp_path / "feature") == ["user-0000000"]


class FailOncePipeline(Pipeline):
    """A pipeline whose first ``add_events`` raises, as a bug or a full disk would."""

    failed = False

    def add_events(self, events: Sequence[Event]) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("injected failure while ingesting")
        super().add_events(events)


def test_an_exception_while_processing_releases_the_key(tmp_path: Path) -> None:
    exporter = InMemoryExporter()
    scheduler = DataExporterScheduler(exporter, flush_interval=600, name="memory")
    pipeline = FailOncePipeline([(scheduler, "feature")])
    app = create_app(file_config(tmp_path), pipeline=pipeline)
    body = body_of([feature(0)])
    with running(app, raise_server_exceptions=False) as client:
        assert send(client, body, "boom-1").status_code == 500
        retry = send(client, body, "boom-1")
        assert retry.status_code == 200
        assert REPLAYED not in retry.headers
        assert send(client, body, "boom-1").headers[REPLAYED] == "true"
    assert [event.user_key for event in exporter.events] == ["user-0000000"]


# -- time and bounds --------------------------------------------------------------------------


def test_a_key_is_forgotten_once_its_ttl_has_passed(tmp_path: Path) -> None:
    clock = Clock()
    store = MemoryIdempotencyStore(ttl=600, clock=clock)
    app = create_app(file_config(tmp_path), idempotency=store)
    body = body_of([feature(0)])
    with running(app) as client:
        assert REPLAYED not in send(client, body, "ttl-1").headers
        clock.now += 599.9
        assert send(client, body, "ttl-1").headers[REPLAYED] == "true"
        clock.now += 0.1  # 600 s after the answer
        fresh = send(client, body, "ttl-1")
        assert fresh.status_code == 200
        assert REPLAYED not in fresh.headers
        assert send(client, body, "ttl-1").headers[REPLAYED] == "true"  # remembered anew
    assert read_user_keys(tmp_path / "feature") == ["user-0000000"] * 2


def test_the_ttl_comes_from_the_config_and_must_be_positive(tmp_path: Path) -> None:
    app = create_app(file_config(tmp_path, idempotencyTtl=42.5))
    assert relay_of(app).idempotency.ttl == 42.5
    assert relay_of(create_app(file_config(tmp_path))).idempotency.ttl == 600
    for bad in (0, -1, "soon"):
        with pytest.raises(ConfigError) as caught:
            file_config(tmp_path, idempotencyTtl=bad)
        assert "idempotencyTtl" in str(caught.value)


def test_past_max_entries_the_oldest_keys_are_evicted_and_counted(tmp_path: Path) -> None:
    store = MemoryIdempotencyStore(max_entries=3)
    app = create_app(file_config(tmp_path), idempotency=store)
    bodies = [body_of([feature(i)]) for i in range(4)]
    with running(app) as client:
        for index, body in enumerate(bodies):
            assert send(client, body, f"k{index}").status_code == 200
        assert store.stats().keys == 3
        # k1..k3 are remembered (a replay does not make a key younger) ...
        assert send(client, bodies[3], "k3").headers[REPLAYED] == "true"
        assert send(client, bodies[1], "k1").headers[REPLAYED] == "true"
        # ... k0 was the oldest: processed again, it evicts k1, the oldest now.
        assert REPLAYED not in send(client, bodies[0], "k0").headers
        assert send(client, bodies[2], "k2").headers[REPLAYED] == "true"
        m = metric_samples(client)
    assert m[("flagsink_relay_idempotency_evictions_total", ())] == 2
    assert m[("flagsink_relay_idempotency_keys", ())] == 3
    assert read_user_keys(tmp_path / "feature") == sorted(
        [f"user-{i:07d}" for i in range(4)] + ["user-0000000"]
    )


# -- scope: one key space per API key --------------------------------------------------------


def test_each_api_key_has_its_own_idempotency_keys(tmp_path: Path) -> None:
    config = file_config(tmp_path, authorizedKeys={"evaluation": [KEY_A]}, apiKeys=[KEY_B])
    body = body_of([feature(0)])
    with running(create_app(config)) as client:
        a = send(client, body, "shared", **{"X-API-Key": KEY_A})
        b = send(client, body, "shared", **{"X-API-Key": KEY_B})
        assert REPLAYED not in a.headers
        assert REPLAYED not in b.headers
        # Another body under B's "shared" is its own business, not a mismatch for A.
        assert send(client, body_of([feature(1)]), "mine", **{"X-API-Key": KEY_B}).is_success
        assert send(client, body_of([feature(2)]), "mine", **{"X-API-Key": KEY_A}).is_success
        # The key is the client's, however it is sent; X-API-Key wins as in authentication.
        bearer = send(client, body, "shared", Authorization=f"Bearer {KEY_A}")
        assert bearer.headers[REPLAYED] == "true"
        both = send(
            client, body, "shared", **{"X-API-Key": KEY_B, "Authorization": f"Bearer {KEY_A}"}
        )
        assert both.headers[REPLAYED] == "true"
        assert both.content == b.content
        assert send(client, body, "shared").status_code == 401
        m = metric_samples(client, **{"X-API-Key": KEY_A})
    assert read_user_keys(tmp_path / "feature") == [
        "user-0000000",
        "user-0000000",
        "user-0000001",
        "user-0000002",
    ]
    assert m[("flagsink_relay_idempotent_replays_total", ())] == 2


def test_without_authentication_clients_share_one_key_space(tmp_path: Path) -> None:
    body = body_of([feature(0)])
    with running(create_app(file_config(tmp_path))) as client:
        assert send(client, body, "k", **{"X-API-Key": "one"}).status_code == 200
        assert send(client, body, "k", **{"X-API-Key": "two"}).headers[REPLAYED] == "true"
    assert read_user_keys(tmp_path / "feature") == ["user-0000000"]


def test_scopes_hide_the_api_key_and_never_collide() -> None:
    assert request_scope(KEY_A, "k") != request_scope(KEY_B, "k")
    assert request_scope("", "k") != request_scope(KEY_A, "k")
    assert request_scope("ab", "c") != request_scope("a", "bc")
    assert KEY_A not in request_scope(KEY_A, "k")
    assert request_scope(KEY_A, "k") == request_scope(KEY_A, "k")


# -- the header -------------------------------------------------------------------------------

PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))


def valid_by_the_rule(value: str) -> bool:
    return (
        1 <= len(value) <= 255
        and all(char in PRINTABLE for char in value)
        and value[0] != " "
        and value[-1] != " "
    )


@given(st.text(alphabet=st.characters(max_codepoint=0x2FF), max_size=300))
@settings(max_examples=500)
def test_the_header_rule_accepts_exactly_printable_ascii_of_1_to_255(value: str) -> None:
    problem = key_problem([value])
    assert (problem is None) == valid_by_the_rule(value)
    if problem is not None:
        assert "Idempotency-Key" in problem
        assert "1-255 printable ASCII" in problem


@given(st.text(alphabet=PRINTABLE, min_size=1, max_size=255))
def test_printable_keys_up_to_255_are_accepted(value: str) -> None:
    assert (key_problem([value]) is None) == (value[0] != " " and value[-1] != " ")


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ([b""], "1-255 printable ASCII"),
        ([b"x" * 256], "got 256 characters"),
        ([b"caf\xe9"], "printable ASCII"),
        ([b"tab\there"], "printable ASCII"),
        ([b"one", b"two"], "send one Idempotency-Key header, not 2"),
    ],
    ids=["empty", "too-long", "latin-1", "control", "twice"],
)
def test_an_unusable_header_is_400_naming_the_header_and_the_rule(
    tmp_path: Path, raw: list[bytes], named: str
) -> None:
    app = create_app(file_config(tmp_path))
    headers = [(b"idempotency-key", value) for value in raw]
    with running(app) as client:
        status, answer = asgi_post(client, app, headers, body_of([feature(0)]))
        assert status == 400
        error = msgspec.json.decode(answer)["error"]
        assert "Idempotency-Key" in error
        assert named in error
        # The longest valid key and one with inner spaces work.
        assert send(client, body_of([feature(1)]), "x" * 255).status_code == 200
        assert send(client, body_of([feature(2)]), "order 17 / try").status_code == 200
    assert read_user_keys(tmp_path / "feature") == ["user-0000001", "user-0000002"]


def asgi_post(
    client: TestClient, app: ASGIApp, headers: list[tuple[bytes, bytes]], body: bytes
) -> tuple[int, bytes]:
    """POST to the collector through the ASGI interface, headers as given (no client rules)."""
    messages: list[dict[str, Any]] = []
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def record(message: dict[str, Any]) -> None:
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
    client.portal.call(app, scope, receive, record)
    start = next(m for m in messages if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in messages[1:])


def test_the_openapi_document_describes_the_header_and_its_answers(tmp_path: Path) -> None:
    with running(create_app(file_config(tmp_path))) as client:
        document = client.get("/openapi.json").json()
    collector = document["paths"][COLLECTOR]["post"]
    (parameter,) = collector["parameters"]
    assert parameter["name"] == "Idempotency-Key"
    assert parameter["in"] == "header"
    assert parameter["required"] is False
    assert parameter["schema"]["maxLength"] == 255
    responses = collector["responses"]
    assert "Idempotent-Replayed" in responses["200"]["headers"]
    assert {"400", "409", "422"} <= set(responses)
    assert "Retry-After" in responses["409"]["headers"]


# -- the store on its own ---------------------------------------------------------------------


def test_only_one_of_many_concurrent_requests_gets_the_claim() -> None:
    store = MemoryIdempotencyStore()
    barrier = threading.Barrier(16)

    def attempt(_: int) -> object:
        barrier.wait(5)
        return store.begin("scope", b"fp")

    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(attempt, range(16)))
    assert sum(isinstance(o, Claim) for o in outcomes) == 1
    assert outcomes.count("in_progress") == 15


def test_answers_are_bounded_in_bytes_and_an_answer_too_large_is_not_kept() -> None:
    store = MemoryIdempotencyStore(max_bytes=250)
    for index in range(4):
        claim = store.begin(f"s{index}", b"fp")
        assert isinstance(claim, Claim)
        store.complete(claim, StoredResponse(200, b"x" * 100))
    assert store.stats().keys == 2  # 200 bytes kept, the two oldest evicted
    assert store.stats().evicted == 2
    assert isinstance(store.begin("s0", b"fp"), Claim)
    claim = store.begin("big", b"fp")
    assert isinstance(claim, Claim)
    store.complete(claim, StoredResponse(200, b"x" * 251))
    assert isinstance(store.begin("big", b"fp"), Claim)  # forgotten, processed again


def test_a_late_answer_for_an_evicted_claim_is_dropped() -> None:
    store = MemoryIdempotencyStore(max_entries=1)
    first = store.begin("a", b"1")
    assert isinstance(first, Claim)
    second = store.begin("b", b"2")  # evicts "a" while it is in progress
    assert isinstance(second, Claim)
    again = store.begin("a", b"1")  # claimed anew (evicting "b")
    assert isinstance(again, Claim)
    store.complete(first, StoredResponse(200, b"stale"))
    store.release(second)
    assert store.begin("a", b"1") == "in_progress"
    store.complete(again, StoredResponse(200, b"fresh"))
    assert store.begin("a", b"1") == StoredResponse(200, b"fresh")


@pytest.mark.parametrize(
    "options",
    [{"ttl": 0}, {"ttl": -1}, {"max_entries": 0}, {"max_bytes": -1}],
)
def test_the_store_refuses_unusable_bounds(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(options))):
        MemoryIdempotencyStore(**options)


class StoreAgainstAModel(RuleBasedStateMachine):
    """The store behaves like a plain list of entries, oldest first, with the same bounds."""

    TTL = 10.0
    MAX_ENTRIES = 4
    MAX_BYTES = 40

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.store = MemoryIdempotencyStore(
            self.TTL, self.MAX_ENTRIES, max_bytes=self.MAX_BYTES, clock=self.clock
        )
        # model: scope -> [fingerprint, answer or None, stamp, size], in touch order
        self.model: dict[str, list[Any]] = {}
        self.claims: dict[str, Claim] = {}
        self.evicted = 0

    def _bound(self) -> None:
        while (
            len(self.model) > self.MAX_ENTRIES
            or sum(entry[3] for entry in self.model.values()) > self.MAX_BYTES
        ):
            oldest = next(iter(self.model))
            del self.model[oldest]
            self.evicted += 1

    @rule(seconds=st.sampled_from([0.0, 0.5, 3.0, 9.99, 10.0, 25.0]))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule(scope=st.sampled_from("abcdef"), body=st.sampled_from([b"1", b"2"]))
    def begin(self, scope: str, body: bytes) -> None:
        now = self.clock.now
        self.model = {s: e for s, e in self.model.items() if now - e[2] < self.TTL}
        expected: object
        entry = self.model.get(scope)
        if entry is None:
            expected = Claim
            self.model[scope] = [body, None, now, 0]
            self._bound()
        elif entry[0] != body:
            expected = "mismatch"
        else:
            expected = "in_progress" if entry[1] is None else entry[1]
        outcome = self.store.begin(scope, body)
        if expected is Claim:
            assert isinstance(outcome, Claim)
            self.claims[scope] = outcome
        else:
            assert outcome == expected

    @precondition(lambda self: bool(self.claims))
    @rule(data=st.data(), size=st.sampled_from([0, 7, 20, 41]))
    def complete(self, data: st.DataObject, size: int) -> None:
        scope = data.draw(st.sampled_from(sorted(self.claims)))
        claim = self.claims.pop(scope)
        answer = StoredResponse(200, scope.encode() * size)
        self.store.complete(claim, answer)
        entry = self.model.get(scope)
        if entry is None or entry[1] is not None or entry[0] != claim.fingerprint:
            return
        del self.model[scope]
        if size > self.MAX_BYTES:
            self.evicted += 1
            return
        self.model[scope] = [entry[0], answer, self.clock.now, size]
        self._bound()

    @precondition(lambda self: bool(self.claims))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        scope = data.draw(st.sampled_from(sorted(self.claims)))
        claim = self.claims.pop(scope)
        self.store.release(claim)
        entry = self.model.get(scope)
        if entry is not None and entry[1] is None and entry[0] == claim.fingerprint:
            del self.model[scope]

    @invariant()
    def same_figures(self) -> None:
        stats = self.store.stats()
        assert stats.evicted == self.evicted
        assert stats.keys == len(self.model)


StoreAgainstAModel.TestCase.settings = settings(max_examples=200, stateful_step_count=40)
test_the_store_behaves_like_its_model = StoreAgainstAModel.TestCase


# -- a real process ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[str], tuple[subprocess.Popen[bytes], str]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(config: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        path = tmp_path / "relay.yaml"
        path.write_text(config)
        command = [sys.executable, "-m", "flagsink.cli", "serve", "--port", str(port)]
        with open(tmp_path / "relay.log", "wb") as log:
            process = subprocess.Popen(
                [*command, "--config", str(path)],
                cwd=tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        started.append(process)
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            if process.poll() is not None:
                pytest.fail((tmp_path / "relay.log").read_text(errors="replace"))
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        assert wait_until(healthy, 30, 0.05), (tmp_path / "relay.log").read_text()
        return process, url

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_relay_process_answers_a_retry_without_ingesting_it_twice(
    tmp_path: Path, serve: Callable[[str], tuple[subprocess.Popen[bytes], str]]
) -> None:
    process, url = serve(
        f"""
apiKeys: [{KEY_A}]
idempotencyTtl: 120
shutdownTimeout: 5
exporter:
  kind: file
  outputDir: {tmp_path / "feature"}
  flushInterval: 600000
"""
    )
    body = body_of([feature(i) for i in range(5)])
    headers = {"X-API-Key": KEY_A, "Idempotency-Key": "6f1c1a0e-5d1b-4c0e-9a52-4f3f0b8d2e11"}
    with httpx.Client(base_url=url, timeout=10) as http:
        first = http.post(COLLECTOR, content=body, headers=headers)
        assert first.status_code == 200
        assert first.json()["ingestedContentCount"] == 5
        retry = http.post(COLLECTOR, content=body, headers=headers)
        assert retry.status_code == 200
        assert retry.content == first.content
        assert retry.headers[REPLAYED] == "true"
        other = http.post(COLLECTOR, content=body_of([feature(9)]), headers=headers)
        assert other.status_code == 422
        metrics = http.get("/metrics", headers={"X-API-Key": KEY_A}).text
    assert "flagsink_relay_idempotent_replays_total 1.0" in metrics
    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0
    assert read_user_keys(tmp_path / "feature") == [f"user-{i:07d}" for i in range(5)]
