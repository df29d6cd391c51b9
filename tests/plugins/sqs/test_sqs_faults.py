"""Fault suite, case 3 (SQS): 30% per-entry failures on SendMessageBatch.

Every retryable entry is delivered, no entry that succeeded is sent again, and the
permanent failures (entries SQS refuses as the sender's fault, messages over
``maxMessageSize``) are in the scheduler's dead-letter file with their reason.

Faults come from botocore event hooks on the exporter's client: before each
SendMessageBatch is built, each entry fails with probability 0.3 (decided by a seeded
hash of its id and attempt, so a run is reproducible whatever the timing and however the
exporter's concurrent requests interleave) with a server-side code (``InternalError``,
``ServiceUnavailable``: retryable), and a few chosen entries always fail with
``SenderFault`` (permanent). The failing entries are taken out of the request, so moto
never stores them, and put back into the answer's ``Failed`` list as SQS reports them.
The events come from an :class:`~flagsink.testing.oracle.Oracle`, flow through a real
:class:`~flagsink.scheduler.DataExporterScheduler`, and are read back by an independent
boto3 consumer (ReceiveMessage + DeleteMessageBatch).
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
from flagsink_sqs import SqsExporter

from flagsink.deadletter import DeadLetterFile
from flagsink.event import Event, FeatureEvent
from flagsink.scheduler import DataExporterScheduler
from flagsink.testing import wait_until
from flagsink.testing.oracle import Oracle

from .conftest import FAST, Queue

FAILURE_RATE = 0.3
#: Per-entry failures that are SQS's own fault (``SenderFault: false``): retried.
RETRYABLE = ("InternalError", "ServiceUnavailable")
SENDER_FAULT = "InvalidParameterValue"
SENDER_MESSAGE = "Message contains characters outside the allowed set (fault suite)"
SENT = "sent"
KIB = 1024


@dataclass
class PerEntryFaults:
    """botocore hooks failing entries of each SendMessageBatch, and the history of every
    entry: ``history[id]`` lists, per attempt, ``sent`` or the code it was refused with.

    :param refuse: ids always refused as the sender's fault.
    """

    seed: int
    refuse: frozenset[str]
    rate: float = FAILURE_RATE
    history: dict[str, list[str]] = field(default_factory=dict)
    requests: int = 0
    short_circuits: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self, exporter: SqsExporter) -> None:
        events = exporter.client.meta.events
        events.register("before-parameter-build.sqs.SendMessageBatch", self.before)
        events.register("before-call.sqs.SendMessageBatch", self.short_circuit)
        events.register("after-call.sqs.SendMessageBatch", self.after)

    def fate(self, key: str, attempt: int) -> str:
        if key in self.refuse:
            return SENDER_FAULT
        draw = random.Random(f"{self.seed}:{key}:{attempt}")
        if draw.random() < self.rate:
            return draw.choice(RETRYABLE)
        return SENT

    def before(self, params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        entries = params["Entries"]
        failures: list[dict[str, Any]] = []
        kept: list[dict[str, Any]] = []
        with self.lock:  # the exporter sends several requests at once
            self.requests += 1
            for entry in entries:
                key = json.loads(entry["MessageBody"])["userKey"]
                attempts = self.history.setdefault(key, [])
                fate = self.fate(key, len(attempts))
                attempts.append(fate)
                if fate == SENT:
                    kept.append(entry)
                elif fate == SENDER_FAULT:
                    failures.append(
                        {
                            "Id": entry["Id"],
                            "SenderFault": True,
                            "Code": SENDER_FAULT,
                            "Message": SENDER_MESSAGE,
                        }
                    )
                else:
                    failures.append(
                        {
                            "Id": entry["Id"],
                            "SenderFault": False,
                            "Code": fate,
                            "Message": "injected by the fault suite",
                        }
                    )
        context["failures"] = failures
        context["nothing_left"] = not kept
        params["Entries"] = kept

    def short_circuit(
        self, context: dict[str, Any], **_: Any
    ) -> tuple[AWSResponse, dict[str, Any]] | None:
        """Every entry of the request refused: answer without sending (an empty
        SendMessageBatch is not a valid request)."""
        if context.get("nothing_left"):
            with self.lock:
                self.short_circuits += 1
            return AWSResponse("http://fault-injection", 200, {}, None), {
                "Successful": [],
                "Failed": [],
            }
        return None

    def after(self, parsed: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        if context.get("failures"):
            parsed["Failed"] = list(parsed.get("Failed") or []) + context["failures"]

    def first_attempt_failure_rate(self) -> float:
        retryable = [h for key, h in self.history.items() if key not in self.refuse]
        return sum(h[0] != SENT for h in retryable) / len(retryable)


def oversized(oracle: Oracle, count: int) -> list[Event]:
    """Events whose message is just over 256 KiB: rejected before sending."""
    made = []
    for _ in range(count):
        key = oracle.next_id()
        probe = FeatureEvent("user", key, 1_700_000_000, "big", "on", "", False, "1", "S")
        emitter = len("emitter") + len("String") + len("flagsink")
        overhead = len(msgspec.json.encode(probe)) + emitter
        made.append(msgspec.structs.replace(probe, value="x" * (256 * KIB + 1 - overhead)))
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
    queue: Queue,
    tmp_path: Path,
    made: list[Any],
    *,
    seed: int,
    count: int,
    sender_faults: int,
    too_big: int,
    timeout: float,
) -> None:
    oracle = Oracle(f"s{seed}")
    events = oracle.events(count)
    draw = random.Random(seed)
    refused = frozenset(event.user_key for event in draw.sample(events, sender_faults))
    large = oversized(oracle, too_big)
    for event in large:
        events.insert(draw.randrange(len(events) + 1), event)
    permanent = sorted([*refused, *(event.user_key for event in large)])
    exporter = SqsExporter(queueUrl=queue.url, config=FAST)
    made.append(exporter)
    faults = PerEntryFaults(seed, refused)
    faults.install(exporter)
    dead = tmp_path / "dead-letters" / "sqs.jsonl"
    scheduler = DataExporterScheduler(
        exporter,
        max_events_in_memory=500,
        max_buffered_events=len(events),  # room for all: no loss by overflow here
        retry_initial=0.01,
        retry_max=0.05,
        dead_letters=DeadLetterFile(dead, "sqs"),
    )
    made.append(scheduler)
    total = len(events)

    def settled() -> bool:
        stats = scheduler.stats()
        return stats.exported + stats.dropped == total

    def consumed() -> bool:
        # The consumer is at most one slice behind what was delivered.
        return len(queue.messages) + 250 >= scheduler.stats().exported

    with queue.draining():  # a consumer keeps the queue short, as in production
        for start in range(0, total, 250):
            scheduler.add_events(events[start : start + 250])
            oracle.accepted(events[start : start + 250])
            # moto's SQS slows down with the queue's length: let the consumer keep up.
            assert wait_until(consumed, timeout), (len(queue.messages), scheduler.stats())
        assert wait_until(settled, timeout), scheduler.stats()
        assert scheduler.close(timeout)
        delivered = scheduler.stats().exported
        assert wait_until(lambda: len(queue.messages) >= delivered, timeout)
    stats = scheduler.stats()

    # Accounting: accepted = delivered + rejected (dead-lettered), nothing else.
    assert stats.received == total
    assert stats.exported == total - len(permanent)
    assert stats.dropped_by_reason == {"rejected": len(permanent)}
    assert stats.extra["dead_lettered"] == len(permanent)
    assert stats.retried > 0

    # Read everything back with an independent consumer: each event once, intact; the
    # permanent failures in the dead-letter file only, with their reasons.
    letters = [json.loads(line) for line in dead.read_text().splitlines()]
    report = oracle.report(queue.read(), dead_letters=[letter["event"] for letter in letters])
    report.assert_exact(max_duplicates=0)
    assert report.delivered == total - len(permanent)
    assert report.dead_lettered == permanent
    reasons = {letter["event"]["userKey"]: letter["reason"] for letter in letters}
    for key in refused:
        assert reasons[key] == f"SQS refused it: {SENDER_FAULT}: {SENDER_MESSAGE}"
    for event in large:
        assert "is over maxMessageSize (262144 bytes)" in reasons[event.user_key]
    assert {letter["exporter"] for letter in letters} == {"sqs"}

    # The faults were what was asked for: about 30% of entries refused at first.
    history = faults.history
    assert 0.25 <= faults.first_attempt_failure_rate() <= 0.35
    # Each retryable entry was sent until it succeeded, and never after; a sender fault
    # is never retried; the oversized messages never left.
    for key, attempts in history.items():
        if key in refused:
            assert attempts == [SENDER_FAULT], (key, attempts)
            continue
        assert attempts[-1] == SENT, (key, attempts)
        assert SENT not in attempts[:-1], f"{key} sent again after it succeeded: {attempts}"
    assert set(history) == {e.user_key for e in events} - {e.user_key for e in large}
    retried = [a for key, a in history.items() if len(a) > 1]
    assert len(retried) > 0.25 * count
    assert exporter.counters["messages_sent"] == total - len(permanent)
    print(
        f"\n[case 3, sqs, seed {seed}] {total} events: {len(retried)} entries refused at "
        f"least once ({sum(len(a) - 1 for a in history.values())} refusals, longest run "
        f"{max(len(a) for a in history.values()) - 1}), {faults.requests} SendMessageBatch "
        f"({faults.short_circuits} wholly refused), {len(permanent)} dead-lettered; "
        f"{report.summary()}"
    )


def test_thirty_percent_entry_failures_lose_and_repeat_nothing(
    queue: Queue, tmp_path: Path, made: list[Any]
) -> None:
    run_case(queue, tmp_path, made, seed=8, count=2_000, sender_faults=12, too_big=2, timeout=60.0)


@pytest.mark.long
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_thirty_percent_entry_failures_long(
    queue: Queue, tmp_path: Path, made: list[Any], seed: int
) -> None:
    run_case(
        queue, tmp_path, made, seed=seed, count=10_000, sender_faults=50, too_big=3, timeout=300.0
    )
