"""The disk spool: durability, independent cursors, accounting, caps and recovery."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from flagsink.event import Event, FeatureEvent, new_feature_event, new_tracking_event
from flagsink.spool import (
    DB_NAME,
    MARKS_NAME,
    Spool,
    SpoolConsumer,
    SpoolError,
    SpoolSettings,
    inspect_spool,
)
from flagsink.testing import wait_until


def ev(i: int) -> FeatureEvent:
    return new_feature_event(
        f"user-{i:07d}", "flag", f"value-{i:07d}", "on", creation_date=1_700_000_000 + i
    )


def open_spool(
    directory: Path, *names: str, **settings: object
) -> tuple[Spool, list[SpoolConsumer]]:
    spool = Spool(SpoolSettings.model_validate({"dir": str(directory), **settings}))
    consumers = [spool.consumer(name) for name in names]
    spool.start()
    return spool, consumers


def drain(consumer: SpoolConsumer, limit: int = 1_000_000) -> tuple[list[Event], int]:
    events, _, _, damaged = consumer.read(limit)
    return events, damaged


def check_accounting(directory: Path) -> None:
    for stats in inspect_spool(directory):
        assert stats.accepted == stats.delivered + stats.dropped + stats.pending, stats


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


# -- basics -----------------------------------------------------------------------------


def test_round_trip_in_order_with_durable_counters(spool_dir: Path) -> None:
    spool, (consumer,) = open_spool(spool_dir, "a")
    sent = [ev(i) for i in range(1_000)]
    spool.append_many(sent[:500])
    for event in sent[500:]:
        spool.append(event)
    assert spool.sync(5)
    events, first, last, damaged = consumer.read(10_000)
    assert events == sent
    assert (first, last, damaged) == (1, 1_000, 0)
    assert consumer.confirm(last, delivered=len(events))
    spool.close()
    (stats,) = inspect_spool(spool_dir)
    assert (stats.accepted, stats.delivered, stats.pending, stats.dropped) == (1_000, 1_000, 0, 0)


def test_submit_calls_back_only_once_durable(spool_dir: Path) -> None:
    spool, _ = open_spool(spool_dir, "a")
    seen: list[int] = []
    done = threading.Event()

    def committed(ok: bool) -> None:
        # Another connection sees the rows when the callback runs: they are committed.
        with sqlite3.connect(spool_dir / DB_NAME) as db:
            seen.append(db.execute("SELECT count(*) FROM feature").fetchone()[0])
        assert ok
        done.set()

    spool.submit([ev(i) for i in range(10)], committed)
    assert done.wait(5)
    assert seen == [10]
    spool.close()


def test_tracking_and_feature_events_go_to_their_exporters(spool_dir: Path) -> None:
    spool = Spool(SpoolSettings(dir=str(spool_dir)))
    features = spool.consumer("f", "feature")
    tracking = spool.consumer("t", "tracking")
    spool.start()
    tracked = new_tracking_event("u1", "checkout", {"value": 3})
    spool.append_many([ev(1), tracked, ev(2)])
    assert spool.sync(5)
    assert drain(features)[0] == [ev(1), ev(2)]
    assert drain(tracking)[0] == [tracked]
    spool.close()


def test_exporters_advance_independently_and_rows_go_once_all_handled(spool_dir: Path) -> None:
    spool, (fast, slow) = open_spool(spool_dir, "fast", "slow")
    spool.append_many([ev(i) for i in range(100)])
    assert spool.sync(5)
    events, _, last, _ = fast.read(100)
    assert fast.confirm(last, len(events))
    # The slow exporter still needs every row.
    with sqlite3.connect(spool_dir / DB_NAME) as db:
        assert db.execute("SELECT count(*) FROM feature").fetchone()[0] == 100
    events, _, last, _ = slow.read(40)
    assert events == [ev(i) for i in range(40)]
    assert slow.confirm(last, len(events))

    def remaining() -> int:
        with sqlite3.connect(spool_dir / DB_NAME) as db:
            return int(db.execute("SELECT count(*) FROM feature").fetchone()[0])

    assert wait_until(lambda: remaining() == 60, 5)
    spool.close()
    stats = {s.exporter: s for s in inspect_spool(spool_dir)}
    assert stats["fast"].pending == 0
    assert stats["slow"].pending == 60


def test_restart_resumes_each_exporter_where_it_stopped(spool_dir: Path) -> None:
    spool, (a, b) = open_spool(spool_dir, "a", "b")
    spool.append_many([ev(i) for i in range(50)])
    assert spool.sync(5)
    events, _, last, _ = a.read(30)
    assert a.confirm(last, len(events))
    b.read(50)  # read but never confirmed: must come again
    spool.close()
    spool, (a, b) = open_spool(spool_dir, "a", "b")
    assert drain(a)[0] == [ev(i) for i in range(30, 50)]
    assert drain(b)[0] == [ev(i) for i in range(50)]
    spool.close()
    check_accounting(spool_dir)


def test_new_exporter_starts_at_the_end_and_removed_one_is_forgotten(
    spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool, _ = open_spool(spool_dir, "old")
    spool.append_many([ev(i) for i in range(5)])
    assert spool.sync(5)
    spool.close()
    spool, (new,) = open_spool(spool_dir, "new")
    assert "'old' is no longer configured" in caplog.text
    assert drain(new)[0] == []
    spool.append(ev(99))
    assert spool.sync(5)
    assert drain(new)[0] == [ev(99)]
    spool.close()
    assert [s.exporter for s in inspect_spool(spool_dir)] == ["new"]


def test_a_second_process_cannot_open_the_same_spool(spool_dir: Path) -> None:
    spool, _ = open_spool(spool_dir, "a")
    with pytest.raises(SpoolError, match="in use by another process"):
        Spool(SpoolSettings(dir=str(spool_dir)))
    spool.close()
    Spool(SpoolSettings(dir=str(spool_dir))).close()  # free again


def test_unusable_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SpoolError, match=r"spool.dir .*file/spool: cannot create"):
        Spool(SpoolSettings(dir=str(blocker / "spool")))


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="dir"):
        SpoolSettings.model_validate({})
    with pytest.raises(ValueError, match="whenFull"):
        SpoolSettings.model_validate({"dir": "/x", "whenFull": "explode"})
    with pytest.raises(ValueError, match="must name a directory"):
        SpoolSettings.model_validate({"dir": " "})


# -- caps -------------------------------------------------------------------------------

MIB = 1024 * 1024


def fill(spool: Spool, count: int, start: int = 0) -> None:
    for i in range(start, start + count, 1_000):
        spool.append_many([ev(j) for j in range(i, min(i + 1_000, start + count))])
        spool.sync(5)


def test_drop_oldest_keeps_the_newest_and_counts_per_exporter(spool_dir: Path) -> None:
    spool, (a,) = open_spool(spool_dir, "a", maxBytes=MIB, whenFull="dropOldest")
    fill(spool, 20_000)  # ~2.5 MiB of events
    assert spool.stats().bytes_used <= 1.1 * MIB
    events, damaged = drain(a)
    stats = a.stats()
    assert stats.dropped_by_reason["spool_full"] > 0
    assert stats.dropped_by_reason["spool_full"] + len(events) == 20_000
    assert damaged == 0
    # The survivors are the newest, in order.
    assert events == [ev(i) for i in range(20_000 - len(events), 20_000)]
    a.confirm(20_000, len(events))
    spool.close()
    check_accounting(spool_dir)


def test_block_refuses_after_the_timeout_and_counts(spool_dir: Path) -> None:
    spool, (a,) = open_spool(spool_dir, "a", maxBytes=MIB, blockTimeout=200)
    fill(spool, 20_000)
    assert wait_until(lambda: not spool.has_room, 5)
    refused: list[bool] = []
    spool.submit([ev(10**6)], refused.append)
    assert wait_until(lambda: refused == [False], 5)
    stats = a.stats()
    assert stats.dropped_by_reason["spool_full"] >= 1
    # Delivering frees room again: new events are taken.
    events, _, last, _ = a.read(1_000_000)
    assert a.confirm(last, len(events))
    assert wait_until(lambda: spool.has_room, 5)
    ok: list[bool] = []
    spool.submit([ev(2 * 10**6)], ok.append)
    assert wait_until(lambda: ok == [True], 5)
    spool.close()
    check_accounting(spool_dir)


# -- damage -----------------------------------------------------------------------------


def encoded(event: Event) -> bytes:
    return msgspec.msgpack.encode(event)


def corrupt_event(spool_dir: Path, event: Event) -> None:
    """Flip one byte inside ``event``'s stored bytes (the database closed, checkpointed)."""
    path = spool_dir / DB_NAME
    data = bytearray(path.read_bytes())
    at = data.find(encoded(event))
    assert at >= 0
    data[at + len(encoded(event)) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_event_is_counted_once_moved_aside_and_the_rest_recovered(
    spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool, _ = open_spool(spool_dir, "a", "b")
    spool.append_many([ev(i) for i in range(100)])
    assert spool.sync(5)
    spool.close()
    corrupt_event(spool_dir, ev(42))
    spool, (a, b) = open_spool(spool_dir, "a", "b")
    assert "1 undelivered feature events were damaged" in caplog.text
    for consumer in (a, b):
        events, damaged = drain(consumer)
        assert events == [ev(i) for i in range(100) if i != 42]
        assert damaged == 0  # counted on open, not again
        assert consumer.stats().dropped_by_reason == {"damaged": 1}
    assert spool.stats().damaged == 1
    assert list((spool_dir / "damaged").iterdir())
    spool.close()
    check_accounting(spool_dir)


def test_a_truncated_database_starts_and_counts_what_is_lost(spool_dir: Path) -> None:
    spool, _ = open_spool(spool_dir, "a")
    spool.append_many([ev(i) for i in range(3_000)])
    assert spool.sync(5)
    spool.close()
    path = spool_dir / DB_NAME
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    survivors = path.read_bytes()
    spool, (a,) = open_spool(spool_dir, "a")
    events, damaged = drain(a)
    spool.close()
    lost = a.stats().dropped_by_reason.get("damaged", 0) + damaged
    assert 0 < lost < 3_000
    assert len(events) + lost == 3_000
    # Every event whose bytes survived is recovered, intact and in order.
    intact = [ev(i) for i in range(3_000) if encoded(ev(i)) in survivors]
    assert events == intact
    check_accounting(spool_dir)


def test_an_unreadable_database_is_moved_aside_and_counted_from_the_marks(
    spool_dir: Path,
) -> None:
    spool, _ = open_spool(spool_dir, "a")
    spool.append_many([ev(i) for i in range(500)])
    assert spool.sync(5)
    spool.close()
    (spool_dir / DB_NAME).write_bytes(b"this is not a database" * 100)
    assert (spool_dir / MARKS_NAME).exists()
    spool, (a,) = open_spool(spool_dir, "a")
    events, _ = drain(a)
    assert events == []
    assert a.stats().dropped_by_reason == {"damaged": 500}
    assert any(p.name.startswith("spool-") for p in (spool_dir / "damaged").iterdir())
    spool.append(ev(1))
    assert spool.sync(5)
    assert drain(a)[0] == [ev(1)]
    spool.close()


# -- crashes ----------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, json
    from collections.abc import Sequence
    from flagsink.exporter import Batch, Exporter, ExporterSettings
    from flagsink.event import new_feature_event
    from flagsink.spool import Spool, SpoolSettings
    from flagsink.spooled import SpoolScheduler

    class Recorder(Exporter[ExporterSettings]):
        kind = "recorder"

        def export(self, events: Sequence[object]) -> None:
            raise AssertionError("export_batch is used")

        def export_batch(self, events, batch: Batch) -> None:
            with open(sys.argv[2], "a") as out:
                keys = [e.user_key for e in events]
                out.write(json.dumps([batch.id, batch.created, keys]) + "\\n")

    spool = Spool(SpoolSettings(dir=sys.argv[1]))
    scheduler = SpoolScheduler(
        Recorder(), spool.consumer("rec"), max_events_in_memory=10, flush_interval=0.05
    )
    spool.start()
    count = int(sys.argv[3])
    spool.append_many(
        [new_feature_event(f"u{i}", "flag", i, "v") for i in range(count)]
    )
    spool.sync(5)
    scheduler.flush(10)
    scheduler.close(5)
    spool.close()
    """
)


def run_child(spool_dir: Path, log: Path, count: int, crash_at: str | None) -> int:
    env = {**os.environ}
    env.pop("FLAGSINK_CRASH_AT", None)
    if crash_at:
        env["FLAGSINK_CRASH_AT"] = crash_at
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(spool_dir), str(log), str(count)],
        env=env,
        timeout=60,
        check=False,
    )
    return done.returncode


def batches(log: Path) -> list[tuple[str, float, list[str]]]:
    return [tuple(msgspec.json.decode(line)) for line in log.read_text().splitlines()]  # type: ignore[misc]


def test_batch_interrupted_by_a_crash_is_sent_again_with_the_same_identity(
    spool_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "sent.jsonl"
    assert run_child(spool_dir, log, 50, "export.after_send_before_confirm:3") == -9
    before = batches(log)
    assert len(before) == 3
    assert run_child(spool_dir, log, 0, None) == 0
    after = batches(log)[3:]
    # The interrupted batch comes first, identical: same id, same time, same events.
    assert after[0] == before[2]
    sent = [key for _, _, keys in batches(log) for key in keys]
    assert sorted(set(sent)) == sorted(f"u{i}" for i in range(50))
    assert len(sent) - 50 == len(before[2][2])  # duplicates: the one batch in flight
    check_accounting(spool_dir)


def test_kill_before_the_commit_loses_only_unacknowledged_events(
    spool_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "sent.jsonl"
    assert run_child(spool_dir, log, 50, "spool.after_append_before_fsync") == -9
    assert not log.exists() or not log.read_text()
    assert inspect_spool(spool_dir)[0].accepted == 0  # never committed, never acknowledged
    assert run_child(spool_dir, log, 20, None) == 0
    assert sorted(k for _, _, keys in batches(log) for k in keys) == sorted(
        f"u{i}" for i in range(20)
    )


def test_kill_during_compaction_loses_nothing(spool_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "sent.jsonl"
    assert run_child(spool_dir, log, 50, "spool.during_compaction:3") == -9
    assert run_child(spool_dir, log, 0, None) == 0
    sent = [key for _, _, keys in batches(log) for key in keys]
    assert sorted(set(sent)) == sorted(f"u{i}" for i in range(50))
    check_accounting(spool_dir)


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    before = {t.ident for t in threading.enumerate()}
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        extra = [
            t
            for t in threading.enumerate()
            if t.ident not in before and t.name.startswith("flagsink-spool")
        ]
        if not extra:
            return
        time.sleep(0.01)
    raise AssertionError(f"spool threads left running: {extra}")


def test_an_idempotent_batch_is_sent_only_once_its_record_is_on_disk(spool_dir: Path) -> None:
    from collections.abc import Sequence

    from flagsink.exporter import Batch, Exporter, ExporterSettings
    from flagsink.spooled import SpoolScheduler

    seen: list[tuple[int, object]] = []

    class Careful(Exporter[ExporterSettings]):
        kind = "careful"

        def export(self, events: Sequence[Event]) -> None:
            raise AssertionError("export_batch is used")

        def export_batch(self, events: Sequence[Event], batch: Batch) -> None:
            with sqlite3.connect(spool_dir / DB_NAME) as db:
                recorded = db.execute("SELECT batch_first FROM cursors").fetchone()[0]
            seen.append((batch.first, recorded))

    spool, _ = open_spool(spool_dir, "careful")  # a backlog from an earlier run
    spool.append_many([ev(i) for i in range(25)])
    assert spool.sync(5)
    spool.close()
    spool = Spool(SpoolSettings(dir=str(spool_dir)))
    consumer = spool.consumer("careful")
    # Started before the spool's writer: nothing may be sent until a record can be made.
    scheduler = SpoolScheduler(Careful(), consumer, max_events_in_memory=10, flush_interval=0.05)
    # The worker formed a batch, could not record it, and put it back unsent.
    assert wait_until(lambda: scheduler._retry_at > 0, 5)
    assert seen == []
    spool.start()
    assert scheduler.flush(10)
    assert [first for first, _ in seen] == [1, 11, 21]
    assert all(recorded == first for first, recorded in seen)
    scheduler.close(5)
    spool.close()
