"""Record helpers for queue exporters, and the dead-letter file."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import msgspec
import pytest

from flagsink.deadletter import DeadLetterFile
from flagsink.event import FeatureEvent
from flagsink.exporters.records import encode_records, key_renderer
from flagsink.template import TemplateError
from flagsink.testing import sample_events

BAD = FeatureEvent("user", "bad", 1_700_000_000, "f", "v", object(), False, "", "S")


def test_encode_records_keeps_order_and_sets_aside_unencodable_events() -> None:
    events = sample_events(10)
    records, rejected = encode_records([*events[:5], BAD, *events[5:]])
    assert rejected == [BAD]
    assert [event for event, _ in records] == events
    assert [data for _, data in records] == [msgspec.json.encode(e) for e in events]


def test_key_renderer() -> None:
    render = key_renderer("{{ .UserKey}}/{{ .Key}}", setting="partitionKey")
    event = sample_events(1, tracking_every=0)[0]
    assert render(event) == f"{event.user_key}/{event.key}"
    with pytest.raises(TemplateError, match="partitionKey"):
        key_renderer("{{ .Nope}}", setting="partitionKey")


def test_dead_letters_are_appended_with_reason(tmp_path: Path) -> None:
    path = tmp_path / "dlq" / "webhook.jsonl"
    letters = DeadLetterFile(path, "webhook")
    events = sample_events(3)
    assert letters.write(events[:2], "HTTP 400: bad request") == 2
    assert letters.write(events[2:], "HTTP 422") == 1
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["reason"] for line in lines] == ["HTTP 400: bad request"] * 2 + ["HTTP 422"]
    assert {line["exporter"] for line in lines} == {"webhook"}
    assert [line["event"] for line in lines] == [json.loads(msgspec.json.encode(e)) for e in events]


def test_dead_letters_skip_only_what_cannot_be_encoded(tmp_path: Path) -> None:
    letters = DeadLetterFile(tmp_path / "d.jsonl", "x")
    assert letters.write([*sample_events(2), BAD], "refused") == 2


def test_dead_letters_from_many_threads_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    letters = DeadLetterFile(path, "x")
    threads = [
        threading.Thread(target=letters.write, args=(sample_events(200, prefix=f"t{i}"), "r"))
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 800
    assert all(json.loads(line)["reason"] == "r" for line in lines)


def test_keep_groups_by_reason_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    letters = DeadLetterFile(tmp_path / "d.jsonl", "sqs")
    events = sample_events(3)
    pairs = [(events[0], "too large"), (events[1], "sender fault"), (events[2], "too large")]
    assert letters.keep_by_reason(pairs) == 3
    reasons = [json.loads(line)["reason"] for line in letters.path.read_text().splitlines()]
    assert reasons == ["too large", "too large", "sender fault"]
    blocker = tmp_path / "file"
    blocker.write_text("")
    broken = DeadLetterFile(blocker / "d.jsonl", "sqs")
    assert broken.keep(events, "refused") == 0
    assert f"cannot write 3 dead letters to {blocker / 'd.jsonl'}" in caplog.text
