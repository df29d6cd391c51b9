"""Fault suite, case 3 (Kinesis): 30% per-entry failures on PutRecords.

Every retryable record is delivered, no record that succeeded is sent again, and the
records Kinesis can never take (over 1 MiB, refused before sending) are in the
scheduler's dead-letter file with their reason.

Faults come from botocore event hooks on the exporter's client: before each PutRecords
is built, each record fails with probability 0.3 (decided by a seeded hash of its id and
attempt, so a run is reproducible whatever the timing); the failing records are taken out
of the request, so moto never stores them, and put back into the answer as Kinesis
reports them (``ProvisionedThroughputExceededException``, ``InternalFailure``). The
events come from an :class:`~flagsink.testing.oracle.Oracle`, flow through a real
:class:`~flagsink.scheduler.DataExporterScheduler`, and are read back from every shard
with an independent boto3 consumer.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from botocore.awsrequest import AWSResponse
from flagsink_kinesis import MAX_RECORD_BYTES, KinesisExporter
from moto_support import MotoServer

from flagsink.deadletter import DeadLetterFile
from flagsink.event import Event, FeatureEvent
from flagsink.scheduler import DataExporterScheduler
from flagsink.testing import wait_until
from flagsink.testing.oracle import Oracle

from .conftest import FAST, Stream

FAILURE_RATE = 0.3
#: Per-record error codes of PutRecords; every one is worth retrying.
RETRYABLE = ("ProvisionedThroughputExceededException", "InternalFailure")
SENT = "sent"


@dataclass
class PerRecordFaults:
    """botocore hooks failing each record of each PutRecords with ``rate`` probability,
    and the history of every record: ``history[id]`` lists, per attempt, ``sent`` or the
    error code it was refused with."""

    seed: int
    rate: float = FAILURE_RATE
    history: dict[str, list[str]] = field(default_factory=dict)
    requests: int = 0
    short_circuits: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self, exporter: KinesisExporter) -> None:
        events = exporter.client.meta.events
        events.register("before-parameter-build.kinesis.PutRecords", self.before)
        events.register("before-call.kinesis.PutRecords", self.short_circuit)
        events.register("after-call.kinesis.PutRecords", self.after)

    def fate(self, key: str, attempt: int) -> str:
        draw = random.Random(f"{self.seed}:{key}:{attempt}")
        if draw.random() < self.rate:
            return draw.choice(RETRYABLE)
        return SENT

    def before(self, params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        records = params["Records"]
        refused: dict[int, str] = {}
        with self.lock:
            self.requests += 1
            for index, record in enumerate(records):
                key = json.loads(record["Data"])["userKey"]
                attempts = self.history.setdefault(key, [])
                fate = self.fate(key, len(attempts))
                attempts.append(fate)
                if fate != SENT:
                    refused[index] = fate
        context["refused"] = (len(records), refused)
        params["Records"] = [r for i, r in enumerate(records) if i not in refused]

    def short_circuit(
        self, context: dict[str, Any], **_: Any
    ) -> tuple[AWSResponse, dict[str, Any]] | None:
        """Every record of the request refused: answer without sending (an empty
        PutRecords is not a valid request)."""
        total, refused = context.get("refused", (0, {}))
        if total and len(refused) == total:
            with self.lock:
                self.short_circuits += 1
            answer = AWSResponse("http://fault-injection", 200, {}, None)
            return answer, {"FailedRecordCount": 0, "Records": []}
        return None

    def after(self, parsed: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        if "refused" not in context or "Records" not in parsed:
            return
        total, refused = context["refused"]
        stored = iter(parsed["Records"])
        parsed["Records"] = [
            {"ErrorCode": refused[index], "ErrorMessage": "injected by the fault suite"}
            if index in refused
            else next(stored)
            for index in range(total)
        ]
        parsed["FailedRecordCount"] = len(refused)

    def first_attempt_failure_rate(self) -> float:
        return sum(h[0] != SENT for h in self.history.values()) / len(self.history)


def oversized(oracle: Oracle, count: int) -> list[Event]:
    """Events whose record is just over Kinesis' 1 MiB limit: rejected before sending."""
    made = []
    for _ in range(count):
        key = oracle.next_id()
        probe = FeatureEvent("user", key, 1_700_000_000, "big", "on", "", False, "1", "S")
        overhead = len(msgspec.json.encode(probe)) + len(key)
        made.append(msgspec.structs.replace(probe, value="x" * (MAX_RECORD_BYTES + 1 - overhead)))
    return made


@pytest.fixture
def made() -> Iterator[list[Any]]:
    """Schedulers and exporters to close at the end, whatever happens."""
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        if isinstance(thing, DataExporterScheduler):
            thing.close(2.0)
        else:
            thing.close()


def run_case(
    moto: MotoServer,
    stream: Stream,
    tmp_path: Path,
    made: list[Any],
    *,
    seed: int,
    count: int,
    too_big: int,
    timeout: float,
) -> None:
    oracle = Oracle(f"k{seed}")
    permanent = oversized(oracle, too_big)
    events = oracle.events(count)
    # The oversized records among the others, at seeded places.
    shuffled = random.Random(seed)
    for event in permanent:
        events.insert(shuffled.randrange(len(events) + 1), event)
    exporter = KinesisExporter(streamName=stream.name, endpointUrl=moto.endpoint, config=FAST)
    made.append(exporter)
    faults = PerRecordFaults(seed)
    faults.install(exporter)
    dead = tmp_path / "dead-letters" / "kinesis.jsonl"
    scheduler = DataExporterScheduler(
        exporter,
        max_events_in_memory=500,
        max_buffered_events=len(events),  # room for all: no loss by overflow here
        retry_initial=0.01,
        retry_max=0.05,
        dead_letters=DeadLetterFile(dead, "kinesis"),
    )
    made.append(scheduler)
    for start in range(0, len(events), 250):  # handed over in slices, as traffic comes
        scheduler.add_events(events[start : start + 250])
    oracle.accepted(events)
    total = len(events)

    def settled() -> bool:
        stats = scheduler.stats()
        return stats.exported + stats.dropped == total

    assert wait_until(settled, timeout), scheduler.stats()
    assert scheduler.close(timeout)
    stats = scheduler.stats()

    # Accounting: accepted = delivered + rejected (dead-lettered), nothing else.
    assert stats.received == total
    assert stats.exported == count
    assert stats.dropped_by_reason == {"rejected": too_big}
    assert stats.extra["dead_lettered"] == too_big
    assert stats.retried > 0

    # Read everything back with an independent consumer: each event once, intact, and
    # the oversized ones in the dead-letter file only.
    letters = [json.loads(line) for line in dead.read_text().splitlines()]
    report = oracle.report(stream.read(), dead_letters=[letter["event"] for letter in letters])
    report.assert_exact(max_duplicates=0)
    assert report.delivered == count
    assert report.dead_lettered == sorted(event.user_key for event in permanent)
    for letter in letters:
        assert letter["exporter"] == "kinesis"
        assert "over the 1048576-byte (1 MiB) limit of a Kinesis record" in letter["reason"]

    # The faults were what was asked for: about 30% of records refused at first.
    history = faults.history
    assert 0.25 <= faults.first_attempt_failure_rate() <= 0.35
    # Each retryable record was sent until it succeeded, and never after; the
    # oversized ones were never sent at all.
    for key, attempts in history.items():
        assert attempts[-1] == SENT, (key, attempts)
        assert SENT not in attempts[:-1], f"{key} sent again after it succeeded: {attempts}"
    assert set(history) == {e.user_key for e in events} - set(report.dead_lettered)
    retried = [attempts for attempts in history.values() if len(attempts) > 1]
    assert len(retried) > 0.25 * count
    assert exporter.counters["records_sent"] == count
    assert exporter.counters["records_failed"] == sum(len(a) - 1 for a in history.values())
    print(
        f"\n[case 3, kinesis, seed {seed}] {total} events: {len(retried)} records refused at "
        f"least once ({sum(len(a) - 1 for a in history.values())} refusals, longest run "
        f"{max(len(a) for a in history.values()) - 1}), {faults.requests} PutRecords "
        f"({faults.short_circuits} wholly refused), "
        f"{too_big} dead-lettered; {report.summary()}"
    )


def test_thirty_percent_record_failures_lose_and_repeat_nothing(
    moto: MotoServer, stream: Stream, tmp_path: Path, made: list[Any]
) -> None:
    run_case(moto, stream, tmp_path, made, seed=8, count=2_000, too_big=3, timeout=60.0)


@pytest.mark.long
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_thirty_percent_record_failures_long(
    moto: MotoServer, stream: Stream, tmp_path: Path, made: list[Any], seed: int
) -> None:
    run_case(moto, stream, tmp_path, made, seed=seed, count=20_000, too_big=5, timeout=300.0)
