"""The webhook exporter against a real HTTP server on 127.0.0.1: GO Feature Flag's body and
signature byte for byte, 10,000 events read back event by event, splitting under
maxBodyBytes, retries of exactly what failed, Retry-After, 4xx to the dead-letter file,
outages, and secrets that never reach logs or errors (flagsink's relay as the receiver:
test_relay.py)."""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import json
import logging
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from flagsink_webhook import (
    WebhookExporter,
    WebhookExportError,
    WebhookPartialExportError,
    WebhookRefusedError,
    WebhookSettings,
)
from pydantic import ValidationError

from flagsink import DataExporterScheduler, FeatureEvent, TrackingEvent
from flagsink.cli import main
from flagsink.config import parse_config
from flagsink.event import Event
from flagsink.exporter import PermanentExportError, SettingsError
from flagsink.pipeline import from_config
from flagsink.plugins import default_registry
from flagsink.testing import sample_events, wait_until

from .conftest import Answer, Received, WebhookServer

SECRET = "hmac-secret-5b2d9e"


# -- helpers ------------------------------------------------------------------------------


def record(event: Event) -> dict[str, Any]:
    """GO Feature Flag's JSON of ``event``, built by hand from its attributes."""
    common = {
        "contextKind": event.context_kind,
        "userKey": event.user_key,
        "creationDate": event.creation_date,
        "key": event.key,
    }
    if isinstance(event, TrackingEvent):
        return {
            "kind": "tracking",
            **common,
            "evaluationContext": event.evaluation_context,
            "trackingEventDetails": event.tracking_event_details,
        }
    out = {
        "kind": "feature",
        **common,
        "variation": event.variation,
        "value": event.value,
        "default": event.default,
        "version": event.version,
        "source": event.source,
    }
    if event.metadata:
        out["metadata"] = event.metadata
    return out


def records(events: Sequence[Event]) -> list[dict[str, Any]]:
    return [record(event) for event in events]


def signed(request: Received, secret: str = SECRET) -> bool:
    """The request's X-Hub-Signature-256, checked with an independent HMAC."""
    digest = hmac.new(secret.encode(), request.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(request.headers.get("x-hub-signature-256", ""), f"sha256={digest}")


def user_keys(request: Received) -> list[str]:
    return [event["userKey"] for event in request.json()["events"]]


@pytest.fixture
def schedulers() -> Iterator[Callable[..., DataExporterScheduler]]:
    made: list[DataExporterScheduler] = []

    def make(exporter: WebhookExporter, **options: Any) -> DataExporterScheduler:
        scheduler = DataExporterScheduler(exporter, **options)
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        scheduler.close(1.0)


@pytest.fixture
def exporters() -> Iterator[Callable[..., WebhookExporter]]:
    made: list[WebhookExporter] = []

    def make(**options: Any) -> WebhookExporter:
        exporter = WebhookExporter(**options)
        made.append(exporter)
        return exporter

    yield make
    for exporter in made:
        exporter.close()


# -- GO Feature Flag's body and signature ------------------------------------------------

# exporter/webhookexporter/exporter_test.go ("valid with signature") in
# thomaspoignant/go-feature-flag: these two events, meta {"hostname": "hostname"} and the
# secret "secret" give this header there.
GOFF_EVENTS = [
    FeatureEvent(
        "anonymousUser", "ABCD", 1617970547, "random-key", "Default", "YO", False, "", "SERVER"
    ),
    FeatureEvent(
        "anonymousUser", "EFGH", 1617970701, "random-key", "Default", "YO2", False, "127", "SERVER"
    ),
]
GOFF_SIGNATURE = "sha256=f1f9766836d4e513035986c035ee9f091b895709be47a802b5840467007e1ec0"
# What Go's json.Marshal writes for that payload (struct fields in order, no spaces).
GOFF_BODY = (
    b'{"meta":{"hostname":"hostname"},"events":['
    b'{"kind":"feature","contextKind":"anonymousUser","userKey":"ABCD","creationDate":1617970547,'
    b'"key":"random-key","variation":"Default","value":"YO","default":false,"version":"",'
    b'"source":"SERVER"},'
    b'{"kind":"feature","contextKind":"anonymousUser","userKey":"EFGH","creationDate":1617970701,'
    b'"key":"random-key","variation":"Default","value":"YO2","default":false,"version":"127",'
    b'"source":"SERVER"}]}'
)


def test_body_and_signature_are_go_feature_flags_byte_for_byte(
    webhook_server: WebhookServer, exporters: Callable[..., WebhookExporter]
) -> None:
    exporter = exporters(
        endpointUrl=webhook_server.url, secret="secret", meta={"hostname": "hostname"}
    )
    exporter.export(GOFF_EVENTS)
    (request,) = webhook_server.requests()
    assert request.body == GOFF_BODY
    assert request.headers["x-hub-signature-256"] == GOFF_SIGNATURE
    assert signed(request, "secret")
    assert request.headers["content-type"] == "application/json"
    assert request.path == "/hook"


def test_maps_sorted_and_html_characters_escaped_as_go_does(
    webhook_server: WebhookServer, exporters: Callable[..., WebhookExporter]
) -> None:
    value = {"zeta": "<b>&</b>", "alpha": "line\u2028sep"}
    event = FeatureEvent("user", "u<1>", 1, "f&g", "on", value, False, "1", "SERVER")
    exporter = exporters(endpointUrl=webhook_server.url, meta={"hostname": "h", "env": "a&b"})
    exporter.export([event])
    (request,) = webhook_server.requests()
    assert request.body == (
        b'{"meta":{"env":"a\\u0026b","hostname":"h"},"events":[{"kind":"feature",'
        b'"contextKind":"user","userKey":"u\\u003c1\\u003e","creationDate":1,"key":"f\\u0026g",'
        b'"variation":"on","value":{"alpha":"line\\u2028sep","zeta":"\\u003cb\\u003e\\u0026'
        b'\\u003c/b\\u003e"},"default":false,"version":"1","source":"SERVER"}]}'
    )
    assert request.json()["events"] == records([event])


def test_meta_gets_this_hosts_name_and_headers_are_sent(
    webhook_server: WebhookServer, exporters: Callable[..., WebhookExporter]
) -> None:
    exporter = exporters(
        endpointUrl=webhook_server.url,
        meta={"env": "prod", "replica": 3, "canary": True},
        headers={"Authorization": "Bearer t0k3n", "X-Tags": ["a", "b"], "User-Agent": "mine/1"},
    )
    exporter.export(sample_events(3))
    (request,) = webhook_server.requests()
    body = request.json()
    assert body["meta"] == {
        "env": "prod",
        "replica": "3",
        "canary": "true",
        "hostname": socket.gethostname(),
    }
    assert list(body) == ["meta", "events"]
    assert request.headers["authorization"] == "Bearer t0k3n"
    assert request.header_lists["x-tags"] == ["a", "b"]
    assert request.headers["user-agent"] == "mine/1"
    assert request.headers["content-type"] == "application/json"
    assert "x-hub-signature-256" not in request.headers  # no secret, no signature


def test_a_configured_content_type_is_replaced_and_the_default_user_agent_names_flagsink(
    webhook_server: WebhookServer, exporters: Callable[..., WebhookExporter]
) -> None:
    exporter = exporters(endpointUrl=webhook_server.url, headers={"content-type": "text/plain"})
    exporter.export(sample_events(1))
    (request,) = webhook_server.requests()
    assert request.header_lists["content-type"] == ["application/json"]
    assert request.headers["user-agent"].startswith("flagsink-webhook/")


def test_credentials_in_the_url_become_basic_auth_unless_authorization_is_set(
    webhook_server: WebhookServer, exporters: Callable[..., WebhookExporter]
) -> None:
    url = webhook_server.url.replace("http://", "http://us%40er:p%3Ass@")
    exporters(endpointUrl=url).export(sample_events(1))
    exporters(endpointUrl=url, headers={"authorization": "Bearer x"}).export(sample_events(1))
    first, second = webhook_server.requests()
    assert first.headers["authorization"] == "Basic " + base64.b64encode(b"us@er:p:ss").decode()
    assert second.header_lists["authorization"] == ["Bearer x"]


# -- 10,000 events, event by event ---------------------------------------------------------


def test_ten_thousand_mixed_events_round_trip_event_by_event(
    webhook_server: WebhookServer,
    exporters: Callable[..., WebhookExporter],
    schedulers: Callable[..., DataExporterScheduler],
) -> None:
    events = sample_events(10_000)
    assert {type(event) for event in events} == {FeatureEvent, TrackingEvent}
    limit = 100_000
    exporter = exporters(endpointUrl=webhook_server.url, secret=SECRET, maxBodyBytes=limit)
    scheduler = schedulers(
        exporter, flush_interval=0.05, max_events_in_memory=1_000, max_buffered_events=10_000
    )
    for event in events:
        scheduler.add_event(event)
    assert scheduler.close(30), scheduler.stats()
    stats = scheduler.stats()
    assert (stats.exported, stats.dropped, stats.failed_attempts) == (10_000, 0, 0)
    requests = webhook_server.requests()
    assert all(request.status == 200 for request in requests)
    assert all(signed(request) for request in requests)
    assert all(len(request.body) <= limit for request in requests)
    assert len(requests) > 10_000 * 200 // limit  # batches were split to fit
    got = webhook_server.events()
    want = records(events)
    assert len(got) == len(want)
    for index, (received, expected) in enumerate(zip(got, want, strict=True)):
        assert received == expected, index


# -- splitting and partial failures --------------------------------------------------------


def split_setup(
    server: WebhookServer, make: Callable[..., WebhookExporter], **options: Any
) -> tuple[WebhookExporter, list[Event]]:
    exporter = make(endpointUrl=server.url, secret=SECRET, maxBodyBytes=20_000, **options)
    return exporter, sample_events(600, prefix="split")


def test_a_failed_part_of_a_split_batch_is_retried_alone(
    webhook_server: WebhookServer, exporters: Callable[..., WebhookExporter]
) -> None:
    exporter, events = split_setup(webhook_server, exporters)
    webhook_server.answer(200, 200, Answer(503, b"overloaded"))
    with pytest.raises(WebhookPartialExportError) as caught:
        exporter.export(events)
    first, second, third = webhook_server.requests()
    delivered = user_keys(first) + user_keys(second)
    # Everything from the failed request on is reported failed; nothing else.
    assert [e.user_key for e in caught.value.failed] == [
        e.user_key for e in events[len(delivered) :]
    ]
    assert caught.value.rejected == []
    assert user_keys(third) == [e.user_key for e in caught.value.failed][: len(user_keys(third))]
    assert "HTTP 503: overloaded" in str(caught.value)
    assert f"{len(delivered)} of 600 events delivered" in str(caught.value)

    exporter.export(caught.value.failed)  # the retry sends exactly those
    assert webhook_server.events() == records(events)  # each event once, in order
    assert all(signed(request) for request in webhook_server.requests())


def test_scheduler_retries_only_the_failed_part_and_counts_it(
    webhook_server: WebhookServer,
    exporters: Callable[..., WebhookExporter],
    schedulers: Callable[..., DataExporterScheduler],
) -> None:
    exporter, events = split_setup(webhook_server, exporters)
    webhook_server.answer(200, 500)
    scheduler = schedulers(
        exporter,
        flush_interval=3600,
        max_events_in_memory=len(events),
        retry_initial=0.02,
        retry_max=0.05,
    )
    scheduler.add_events(events)
    assert wait_until(lambda: scheduler.stats().exported == len(events), 20)
    first = webhook_server.requests()[0]
    stats = scheduler.stats()
    assert stats.failed_attempts == 1
    assert stats.retried == len(events) - len(user_keys(first))
    assert stats.dropped == 0
    assert Counter(e["userKey"] for e in webhook_server.events()) == Counter(
        e.user_key for e in events
    )


def test_a_part_refused_for_good_goes_to_the_dead_letter_file_and_the_rest_arrives(
    webhook_server: WebhookServer,
    exporters: Callable[..., WebhookExporter],
    schedulers: Callable[..., DataExporterScheduler],
    tmp_path: Path,
) -> None:
    dead = tmp_path / "letters" / "webhook.jsonl"
    exporter, events = split_setup(webhook_server, exporters)
    webhook_server.answer(200, Answer(422, b'{"error": "schema v2 expected"}'))
    with pytest.raises(WebhookPartialExportError) as caught:
        exporter.export(events)
    refused = webhook_server.requests()[1]
    assert refused.status == 422
    refused_keys = user_keys(refused)
    assert [e.user_key for e in caught.value.rejected] == refused_keys
    assert caught.value.failed == []
    reason = f'webhook {webhook_server.url} answered HTTP 422: {{"error": "schema v2 expected"}}'
    assert caught.value.reasons == [reason] * len(refused_keys)
    received = [e["userKey"] for e in webhook_server.events()]
    assert received == [e.user_key for e in events if e.user_key not in set(refused_keys)]
    assert exporter.rejected_by_status == {"422": len(refused_keys)}

    # Through the scheduler, the refused part goes to the dead-letter file, each event with
    # the webhook's answer as its reason.
    webhook_server.reset()
    webhook_server.answer(200, Answer(422, b'{"error": "schema v2 expected"}'))
    scheduler = schedulers(
        exporter, flush_interval=3600, max_events_in_memory=len(events), dead_letters=dead
    )
    scheduler.add_events(events)
    assert scheduler.flush(20)
    refused = webhook_server.requests()[1]
    letters = [json.loads(line) for line in dead.read_text().splitlines()]
    assert [letter["event"] for letter in letters] == refused.json()["events"]
    assert {letter["reason"] for letter in letters} == {reason}
    assert {letter["exporter"] for letter in letters} == {"webhook"}
    stats = scheduler.stats()
    assert stats.dropped_by_reason == {"rejected": len(letters)}
    assert stats.extra["dead_lettered"] == len(letters)
    assert stats.exported == len(events) - len(letters)


def test_a_413_lowers_the_body_limit_and_splits_until_the_server_takes_it(
    webhook_server: WebhookServer, exporters: Callable[..., WebhookExporter]
) -> None:
    webhook_server.max_body = 30_000
    exporter = exporters(endpointUrl=webhook_server.url, secret=SECRET)  # 5 MiB by default
    events = sample_events(2_000, prefix="big")
    exporter.export(events)
    assert webhook_server.events() == records(events)
    assert exporter.max_body_bytes <= 30_000
    assert {r.status for r in webhook_server.requests()} == {200, 413}
    before = len(webhook_server.requests())
    exporter.export(sample_events(2_000, prefix="next"))  # the lowered limit is kept
    assert {r.status for r in webhook_server.requests()[before:]} == {200}


def test_events_too_large_to_send_are_rejected_alone(
    webhook_server: WebhookServer, exporters: Callable[..., WebhookExporter], tmp_path: Path
) -> None:
    exporter = exporters(endpointUrl=webhook_server.url, maxBodyBytes=4_096)
    small = sample_events(20, tracking_every=0)
    huge = FeatureEvent("user", "huge", 1, "f", "v", "x" * 5_000, False, "1", "SERVER")
    with pytest.raises(WebhookPartialExportError) as caught:
        exporter.export([*small[:10], huge, *small[10:]])
    assert caught.value.rejected == [huge]
    assert caught.value.failed == []
    assert "larger than maxBodyBytes (4096 bytes)" in str(caught.value)
    size = len(json.dumps(record(huge), separators=(",", ":")))
    assert caught.value.reasons == [
        f"event of {size} bytes does not fit in a body of maxBodyBytes (4096 bytes) even alone"
    ]
    assert webhook_server.events() == records(small)

    # Alone, it is refused for good; an event the server alone finds too large too.
    with pytest.raises(PermanentExportError):
        exporter.export([huge])
    webhook_server.max_body = 1_024
    medium = FeatureEvent("user", "medium", 1, "f", "v", "y" * 2_000, False, "1", "SERVER")
    with pytest.raises(PermanentExportError, match="HTTP 413"):
        exporter.export([medium])


# -- answers: retried, refused, Retry-After ------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 408, 429])
def test_server_errors_timeouts_and_throttling_are_retryable(
    webhook_server: WebhookServer, exporters: Callable[..., WebhookExporter], status: int
) -> None:
    exporter = exporters(endpointUrl=webhook_server.url)
    webhook_server.answer(Answer(status, b"try later"))
    with pytest.raises(WebhookExportError) as caught:
        exporter.export(sample_events(5))
    assert caught.value.status == status
    assert str(caught.value) == f"webhook {webhook_server.url} answered HTTP {status}: try later"
    exporter.export(sample_events(5))
    assert len(webhook_server.events()) == 5


def test_retryable_answers_are_retried_by_the_scheduler_until_delivered(
    webhook_server: WebhookServer,
    exporters: Callable[..., WebhookExporter],
    schedulers: Callable[..., DataExporterScheduler],
) -> None:
    events = sample_events(50)
    webhook_server.answer(500, 408, 429, 502)
    scheduler = schedulers(
        exporters(endpointUrl=webhook_server.url),
        flush_interval=0.05,
        max_events_in_memory=100,
        retry_initial=0.01,
        retry_max=0.05,
    )
    scheduler.add_events(events)
    assert wait_until(lambda: scheduler.stats().exported == 50, 10)
    assert [r.status for r in webhook_server.requests()] == [500, 408, 429, 502, 200]
    stats = scheduler.stats()
    assert (stats.failed_attempts, stats.dropped, stats.retried) == (4, 0, 200)
    assert webhook_server.events() == records(events)


def test_retry_after_seconds_is_honoured(
    webhook_server: WebhookServer,
    exporters: Callable[..., WebhookExporter],
    schedulers: Callable[..., DataExporterScheduler],
) -> None:
    exporter = exporters(endpointUrl=webhook_server.url)
    webhook_server.answer(Answer(429, b"slow down", {"Retry-After": "1"}))
    with pytest.raises(WebhookExportError) as caught:
        exporter.export(sample_events(1))
    assert (caught.value.status, caught.value.retry_after) == (429, 1.0)

    webhook_server.reset()
    webhook_server.answer(Answer(503, b"", {"Retry-After": "1"}))
    scheduler = schedulers(
        exporter, flush_interval=0.05, max_events_in_memory=10, retry_initial=0.01, retry_max=5
    )
    scheduler.add_events(sample_events(10))
    assert wait_until(lambda: scheduler.stats().exported == 10, 10)
    refused, accepted = webhook_server.requests()
    # Without Retry-After the retry would come after 5-10 ms.
    assert accepted.time - refused.time >= 1.0 - 0.05


def test_retry_after_as_an_http_date(
    webhook_server: WebhookServer, exporters: Callable[..., WebhookExporter]
) -> None:
    exporter = exporters(endpointUrl=webhook_server.url)
    when = email.utils.formatdate(time.time() + 3, usegmt=True)
    webhook_server.answer(
        Answer(503, b"", {"Retry-After": when}), Answer(503, b"", {"Retry-After": "soon"})
    )
    with pytest.raises(WebhookExportError) as caught:
        exporter.export(sample_events(1))
    assert caught.value.retry_after is not None
    assert 1.5 <= caught.value.retry_after <= 3.0
    with pytest.raises(WebhookExportError) as caught:
        exporter.export(sample_events(1))
    assert caught.value.retry_after is None


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 422])
def test_other_4xx_are_refused_for_good_with_an_excerpt_of_the_answer(
    webhook_server: WebhookServer,
    exporters: Callable[..., WebhookExporter],
    schedulers: Callable[..., DataExporterScheduler],
    tmp_path: Path,
    status: int,
) -> None:
    exporter = exporters(endpointUrl=webhook_server.url)
    answer = Answer(status, b"invalid payload:\n  " + b"x" * 1_000)
    webhook_server.answer(answer, answer)
    events = sample_events(7)
    with pytest.raises(PermanentExportError) as caught:
        exporter.export(events)
    message = str(caught.value)
    prefix = f"webhook {webhook_server.url} answered HTTP {status}: "
    assert message.startswith(prefix + "invalid payload: xxx")
    excerpt = message[len(prefix) :]
    assert len(excerpt) <= 200
    assert excerpt.endswith("…")
    assert isinstance(caught.value, WebhookRefusedError)
    assert caught.value.rejected == events
    assert caught.value.reasons == [message] * len(events)

    # The scheduler keeps them in the dead-letter file with exactly that reason.
    dead = tmp_path / "dead.jsonl"
    scheduler = schedulers(exporter, max_events_in_memory=len(events), dead_letters=dead)
    scheduler.add_events(events)
    assert scheduler.flush(10)
    letters = [json.loads(line) for line in dead.read_text().splitlines()]
    assert [letter["event"] for letter in letters] == records(events)
    assert {letter["reason"] for letter in letters} == {message}


def test_a_refused_batch_is_dropped_and_counted_not_retried(
    webhook_server: WebhookServer,
    exporters: Callable[..., WebhookExporter],
    schedulers: Callable[..., DataExporterScheduler],
    caplog: pytest.LogCaptureFixture,
) -> None:
    webhook_server.answer(Answer(400, b'{"error":"bad"}'))
    scheduler = schedulers(
        exporters(endpointUrl=webhook_server.url),
        flush_interval=0.05,
        max_events_in_memory=100,
        retry_initial=0.01,
        retry_max=0.02,
    )
    with caplog.at_level(logging.ERROR):
        scheduler.add_events(sample_events(30, prefix="a"))
        assert wait_until(lambda: scheduler.stats().dropped == 30, 10)
        scheduler.add_events(sample_events(30, prefix="b"))
        assert scheduler.flush(10)
    stats = scheduler.stats()
    assert stats.dropped_by_reason == {"rejected": 30}
    assert (stats.exported, stats.retried) == (30, 0)
    assert [r.status for r in webhook_server.requests()] == [400, 200]
    assert 'answered HTTP 400: {"error":"bad"}' in caplog.text


def test_refused_events_are_replayed_from_the_dead_letter_file_once_the_webhook_takes_them(
    webhook_server: WebhookServer, tmp_path: Path
) -> None:
    # The relay's path: refused for good -> dead-letter file -> fix -> `flagsink replay`.
    dead = tmp_path / "webhook.jsonl"
    config = tmp_path / "relay.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "exporter": {
                    "kind": "webhook",
                    "endpointUrl": webhook_server.url,
                    "secret": SECRET,
                    "maxEventInMemory": 50,
                    "deadLetterFile": str(dead),
                }
            }
        )
    )
    events = sample_events(120, prefix="replayed", tracking_every=0)
    webhook_server.answer(200, Answer(422, b'{"error": "schema v2 expected"}'), 200)
    pipeline = from_config(config, exit_timeout=None)
    pipeline.add_events(events)
    assert pipeline.close(10)
    refused = webhook_server.requests()[1].json()["events"]
    assert len(refused) == 50
    assert [json.loads(line)["event"] for line in dead.read_text().splitlines()] == refused

    result = CliRunner().invoke(main, ["replay", "--config", str(config), str(dead)])
    assert result.exit_code == 0, result.output
    assert "replayed to exporter webhook: 50 delivered" in result.output
    arrived = Counter(event["userKey"] for event in webhook_server.events())
    assert arrived == Counter(event.user_key for event in events)  # each exactly once
    assert all(signed(request) for request in webhook_server.requests())
    assert not dead.exists()
    assert list(tmp_path.glob("webhook.jsonl.*")) == []


def test_a_redirect_is_not_followed_and_its_target_is_not_echoed_with_secrets(
    webhook_server: WebhookServer, exporters: Callable[..., WebhookExporter]
) -> None:
    target = "http://user:pa55@elsewhere.invalid/x?token=t0p"
    webhook_server.answer(Answer(307, b"", {"Location": target}))
    exporter = exporters(endpointUrl=webhook_server.url, headers={"Authorization": "Bearer b"})
    with pytest.raises(PermanentExportError) as caught:
        exporter.export(sample_events(2))
    message = str(caught.value)
    assert "HTTP 307 (redirect to http://elsewhere.invalid/x?…" in message
    assert "pa55" not in message
    assert "t0p" not in message
    assert len(webhook_server.requests()) == 1


def test_a_server_that_does_not_answer_in_time_is_retryable(
    webhook_server: WebhookServer, exporters: Callable[..., WebhookExporter]
) -> None:
    webhook_server.answer(Answer(200, b"{}", delay=1.0))
    exporter = exporters(endpointUrl=webhook_server.url, timeout=0.2)
    started = time.monotonic()
    with pytest.raises(WebhookExportError) as caught:
        exporter.export(sample_events(1))
    assert time.monotonic() - started < 0.9
    assert caught.value.status is None
    assert "unreachable: timed out" in str(caught.value)


# -- outages -------------------------------------------------------------------------------


def test_server_down_during_export_then_back_loses_nothing(
    webhook_server: WebhookServer,
    exporters: Callable[..., WebhookExporter],
    schedulers: Callable[..., DataExporterScheduler],
) -> None:
    events = sample_events(6_000, prefix="outage")
    batch = 300
    exporter = exporters(endpointUrl=webhook_server.url, secret=SECRET, timeout=2)
    scheduler = schedulers(
        exporter,
        flush_interval=0.02,
        max_events_in_memory=batch,
        max_buffered_events=len(events),
        retry_initial=0.02,
        retry_max=0.1,
    )
    added = threading.Event()

    def feed() -> None:  # the application keeps evaluating flags through the outage
        for start in range(0, len(events), 100):
            scheduler.add_events(events[start : start + 100])
            time.sleep(0.002)
        added.set()

    feeder = threading.Thread(target=feed)
    feeder.start()
    assert wait_until(lambda: len(webhook_server.accepted()) >= 3, 10)
    with webhook_server.stopped():
        assert wait_until(lambda: scheduler.stats().failed_attempts >= 2, 10)
        assert scheduler.stats().last_error.startswith("WebhookExportError: webhook ")  # type: ignore[union-attr]
    feeder.join(10)
    assert added.is_set()
    assert scheduler.close(30), scheduler.stats()
    stats = scheduler.stats()
    assert (stats.exported, stats.dropped) == (len(events), 0)
    counts = Counter(e["userKey"] for e in webhook_server.events())
    assert set(counts) == {e.user_key for e in events}  # nothing lost
    # A request the server took as it went down, whose answer was lost, is sent again:
    # HTTP cannot tell. At most the batch in flight when it went down.
    duplicates = sum(count - 1 for count in counts.values())
    assert duplicates <= batch, duplicates
    assert all(signed(request) for request in webhook_server.requests())


def test_close_closes_the_http_client(
    webhook_server: WebhookServer, exporters: Callable[..., WebhookExporter]
) -> None:
    exporter = exporters(endpointUrl=webhook_server.url)
    exporter.export(sample_events(1))
    exporter.close()
    assert exporter._client.is_closed


# -- secrets -------------------------------------------------------------------------------


def test_secrets_never_reach_logs_errors_or_reprs(
    webhook_server: WebhookServer,
    exporters: Callable[..., WebhookExporter],
    schedulers: Callable[..., DataExporterScheduler],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    secrets = ["Bearer hdr-s3cret-1", "multi-s3cret-2", "multi-s3cret-3", "hmac-s3cret-4"]
    url = webhook_server.url.replace("http://", "http://usr:pw-s3cret-5@") + "?k=qs-s3cret-6"
    secrets += ["pw-s3cret-5", "qs-s3cret-6"]
    webhook_server.answer(500, Answer(400, b"nope"))
    with caplog.at_level(logging.DEBUG):
        exporter = exporters(
            endpointUrl=url,
            secret="hmac-s3cret-4",
            headers={"Authorization": secrets[0], "X-Multi": secrets[1:3]},
        )
        scheduler = schedulers(
            exporter,
            flush_interval=0.02,
            max_events_in_memory=10,
            retry_initial=0.01,
            dead_letters=tmp_path / "dead.jsonl",
        )
        scheduler.add_events(sample_events(10))
        assert wait_until(lambda: scheduler.stats().dropped == 10, 10)
        errors = [scheduler.stats().last_error or ""]
        with webhook_server.stopped():
            scheduler.add_events(sample_events(10))
            assert wait_until(lambda: scheduler.stats().failed_attempts >= 3, 10)
            errors.append(scheduler.stats().last_error or "")
    assert webhook_server.requests()[0].headers["authorization"] == secrets[0]  # it was sent
    letters = (tmp_path / "dead.jsonl").read_text()
    assert "answered HTTP 400: nope" in letters
    seen = "\n".join(
        [
            caplog.text,
            *errors,
            letters,
            repr(exporter.settings),
            repr(exporter),
            str(exporter.settings),
        ]
    )
    assert "answered HTTP 400: nope" in seen
    assert "unreachable" in seen
    leaked = [secret for secret in secrets if secret in seen]
    assert not leaked
    for bad in ({"headers": {"X-Token": "top-s3cret\n"}}, {"secret": ["top-s3cret"]}):
        with pytest.raises(ValidationError) as caught:
            WebhookSettings.model_validate({"endpointUrl": webhook_server.url, **bad})
        assert "top-s3cret" not in str(caught.value)


# -- settings ------------------------------------------------------------------------------


def test_settings_from_a_relay_config_as_go_feature_flag_writes_it() -> None:
    config = parse_config(
        {
            "exporter": {
                "kind": "webhook",
                "endpointUrl": "https://example.com/webhook",
                "secret": "s",
                "meta": {"extraInfo": "info"},
                "headers": {"Authorization": ["Bearer auth_token"]},
                "flushInterval": 10000,
                "maxEventInMemory": 5000,
            }
        }
    )
    (exporter_config,) = config.exporters
    assert exporter_config.settings.model_dump(by_alias=True, exclude_defaults=True).keys() == {
        "endpointUrl",
        "secret",
        "meta",
        "headers",
    }
    assert default_registry().exporter("webhook") is WebhookExporter
    assert WebhookExporter.bulk is True


def test_endpoint_url_is_required_and_checked() -> None:
    with pytest.raises(ValidationError, match="endpointUrl"):
        WebhookExporter()
    with pytest.raises(ValidationError, match="http:// or https://"):
        WebhookExporter(endpointUrl="ws://example.com")


def test_meta_must_leave_room_for_events() -> None:
    with pytest.raises(SettingsError, match="no room for events next to meta"):
        WebhookExporter(endpointUrl="http://x.invalid", maxBodyBytes=1024, meta={"m": "x" * 900})


def test_dead_letter_file_is_a_common_key_not_a_webhook_setting() -> None:
    # The scheduler writes dead letters for every exporter: the key is read with the
    # other common keys (flushInterval, name, ...), not by the webhook's settings.
    config = parse_config(
        {
            "exporter": {
                "kind": "webhook",
                "endpointUrl": "https://example.com/hook",
                "deadLetterFile": "/var/lib/flagsink/webhook.jsonl",
            }
        }
    )
    (section,) = config.exporters
    assert section.scheduling.dead_letter_file == "/var/lib/flagsink/webhook.jsonl"
    assert "dead_letter_file" not in type(section.settings).model_fields
    with pytest.raises(ValidationError, match="deadLetterFile"):
        WebhookExporter(endpointUrl="https://example.com/hook", deadLetterFile="/x.jsonl")


# -- the docs say what the code does -------------------------------------------------------

ROOT = Path(__file__).resolve().parents[3]
PAGES = [ROOT / "docs" / "pages" / "exporters" / "webhook.md", ROOT / "plugins/webhook/README.md"]


def code_blocks(page: Path, language: str) -> list[str]:
    text = page.read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_documented_examples_are_valid(page: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WEBHOOK_SECRET", "WEBHOOK_TOKEN", "CENTRAL_RELAY_KEY"):
        monkeypatch.setenv(name, "from-env")
    yamls = code_blocks(page, "yaml")
    assert yamls
    for block in yamls:
        for section in parse_config(yaml.safe_load(block)).exporters:
            assert section.exporter_class is WebhookExporter
    for block in code_blocks(page, "python"):
        namespace: dict[str, Any] = {}
        exec(compile(block, str(page), "exec"), namespace)
        if "scheduler" in namespace:
            assert namespace["scheduler"].close(1)
        if "is_signed" in namespace:
            check = namespace["is_signed"]
            assert check(GOFF_BODY, GOFF_SIGNATURE, b"secret")
            assert not check(GOFF_BODY + b" ", GOFF_SIGNATURE, b"secret")
