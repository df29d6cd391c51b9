"""Exact accounting in the library and in ``flagsink status --spool`` (issue 8).

Per exporter ``accepted == delivered + dropped + pending``, in both modes: the library's
counters (``SchedulerStats.accepted``/``delivered``/``pending``), and the durable counters
of a spool directory read by the CLI. Each figure is checked against ground truth (the
events added, the events the sink holds, the dead-letter lines); the CLI's verdict and
exit code are checked on a real spool, on the relay's per-worker slots, and on a spool
whose counters were tampered with (the one fault a real run cannot produce on demand).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flagsink.cli import main as cli_main
from flagsink.deadletter import DeadLetterFile
from flagsink.event import Event
from flagsink.exporter import Exporter, ExportError, ExporterSettings, PartialExportError
from flagsink.pipeline import Pipeline
from flagsink.scheduler import DataExporterScheduler, SchedulerStats
from flagsink.spool import DB_NAME, Spool, SpoolSettings, inspect_spool
from flagsink.spooled import SpoolScheduler
from flagsink.testing import InMemoryExporter, sample_events, wait_until

TIMEOUT = 10.0


class Picky(Exporter[ExporterSettings]):
    """Refuses for good every event whose user key ends in an odd digit; keeps the rest.
    While ``down`` is set every export fails (retryable)."""

    kind = "picky"

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[Event] = []
        self.down = threading.Event()

    def export(self, events: Sequence[Event]) -> None:
        if self.down.is_set():
            raise ExportError("sink down")
        refused = [e for e in events if int(e.user_key[-1]) % 2]
        self.kept.extend(e for e in events if not int(e.user_key[-1]) % 2)
        if refused:
            raise PartialExportError("odd users refused", rejected=refused)


def holds(stats: SchedulerStats) -> bool:
    parts = [stats.delivered, stats.pending, *stats.dropped_by_reason.values()]
    return stats.accepted == sum(parts) and min([stats.accepted, *parts]) >= 0


def table_row(output: str, name: str) -> list[str]:
    """The cells of exporter ``name``'s line in the table."""
    (line,) = [line for line in output.splitlines() if line.split()[:1] == [name]]
    return line.split()


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli_main, ["status", *args], catch_exceptions=False, env=env)


@contextmanager
def spooled_pipeline(
    directory: Path, close_timeout: float = TIMEOUT
) -> Iterator[tuple[Pipeline, Picky, InMemoryExporter]]:
    """A spool with two exporters: ``picky`` (refuses odd users, dead letters under the
    spool) and ``all`` (keeps everything)."""
    spool = Spool(SpoolSettings(dir=str(directory)))
    picky, keeper = Picky(), InMemoryExporter()
    routes: list[tuple[DataExporterScheduler | SpoolScheduler, str]] = [
        (
            SpoolScheduler(
                picky,
                spool.consumer("picky"),
                flush_interval=0.02,
                max_events_in_memory=100,
                retry_initial=0.02,
                retry_max=0.05,
                dead_letters=DeadLetterFile(directory / "deadletter" / "picky.jsonl", "picky"),
            ),
            "feature",
        ),
        (SpoolScheduler(keeper, spool.consumer("all"), flush_interval=0.02), "feature"),
    ]
    spool.start()
    pipeline = Pipeline(routes, spool=spool, exit_timeout=None)
    try:
        yield pipeline, picky, keeper
    finally:
        pipeline.close(close_timeout)


def features(count: int, prefix: str = "u") -> list[Event]:
    return sample_events(count, tracking_every=0, prefix=prefix)


# -- the library's counters -------------------------------------------------------------------


def test_memory_mode_accounts_for_deliveries_refusals_and_overflow() -> None:
    picky = Picky()
    picky.down.set()
    scheduler = DataExporterScheduler(
        picky,
        flush_interval=0.02,
        max_events_in_memory=100,
        max_buffered_events=300,
        retry_initial=0.02,
        retry_max=0.05,
        name="picky",
    )
    pipeline = Pipeline([(scheduler, "feature")], exit_timeout=None)
    try:
        events = features(1_000)
        for event in events:
            pipeline.add_event(event)
        (stats,) = pipeline.stats()
        assert stats.accepted == stats.received == 1_000
        assert stats.dropped_by_reason["overflow"] >= 700 - 100  # a batch may be in flight
        assert holds(stats)
        picky.down.clear()
        assert pipeline.flush(TIMEOUT)
        (stats,) = pipeline.stats()
        assert stats.accepted == 1_000
        assert stats.pending == 0
        assert stats.delivered == len(picky.kept)
        assert (
            stats.dropped_by_reason["rejected"]
            + len(picky.kept)
            + stats.dropped_by_reason["overflow"]
            == 1_000
        )
        assert holds(stats)
    finally:
        pipeline.close(TIMEOUT)


def test_spool_mode_exposes_the_same_identity(tmp_path: Path) -> None:
    with spooled_pipeline(tmp_path / "spool") as (pipeline, picky, keeper):
        pipeline.add_events(features(500))
        assert pipeline.flush(TIMEOUT)
        stats = {s.exporter: s for s in pipeline.stats()}
        assert (stats["all"].accepted, stats["all"].delivered) == (500, 500)
        assert len(keeper.events) == 500
        assert stats["picky"].accepted == 500
        assert stats["picky"].delivered == len(picky.kept) == 250
        assert stats["picky"].dropped_by_reason == {"rejected": 250}
        assert stats["picky"].extra["dead_lettered"] == 250
        assert all(holds(s) and s.pending == 0 for s in stats.values())


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(1, 400)),
            st.tuples(st.just("down"), st.booleans()),
            st.tuples(st.just("flush"), st.just(0)),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_memory_mode_balances_after_any_sequence(steps: list[tuple[str, Any]]) -> None:
    # Whatever happens (adds past the cap, the sink down or up, flushes), every snapshot
    # balances, nothing is negative, and accepted is exactly what was added.
    picky = Picky()
    scheduler = DataExporterScheduler(
        picky,
        flush_interval=0.01,
        max_events_in_memory=50,
        max_buffered_events=200,
        retry_initial=0.01,
        retry_max=0.02,
    )
    added = 0
    try:
        for action, value in steps:
            if action == "add":
                scheduler.add_events(features(value, prefix=f"s{added}"))
                added += value
            elif action == "down":
                (picky.down.set if value else picky.down.clear)()
            else:
                scheduler.flush(0.5)
            stats = scheduler.stats()
            assert holds(stats), stats
            assert stats.accepted == added
        picky.down.clear()
        assert scheduler.flush(TIMEOUT)
        stats = scheduler.stats()
        assert (stats.accepted, stats.pending) == (added, 0)
        assert stats.delivered == len(picky.kept)
        assert holds(stats)
    finally:
        scheduler.close(TIMEOUT)


# -- flagsink status --spool ----------------------------------------------------------------


def test_status_reads_a_spool_directory(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with spooled_pipeline(directory) as (pipeline, _, _):
        pipeline.add_events(features(400))
        assert pipeline.flush(TIMEOUT)
    result = run("--spool", str(directory))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"spool {directory}"
    assert lines[1].split() == [
        "EXPORTER",
        "ACCEPTED",
        "DELIVERED",
        "DROPPED",
        "PENDING",
        "BALANCED",
    ]
    assert lines[2].split() == ["all", "400", "400", "0", "0", "yes"]
    assert lines[3].split() == ["picky", "400", "200", "200", "(rejected", "200)", "0", "yes"]
    letters = directory / "deadletter" / "picky.jsonl"
    assert (
        f"dead letters: 200 in {letters} (flagsink replay sends them again once the cause is fixed)"
        in lines
    )
    assert len(letters.read_bytes().splitlines()) == 200
    assert (
        lines[-1]
        == "accepted = delivered + dropped + pending holds for every exporter (0 events pending)"
    )

    document = json.loads(run("--spool", str(directory), "--json").stdout)
    durable = {c.exporter: c for c in inspect_spool(directory)}
    assert document["balanced"] is True
    assert document["source"] == {"spool": str(directory)}
    assert document["deadLetters"] == [{"path": str(letters), "letters": 200}]
    for row in document["exporters"]:
        stats = durable[row["name"]]
        assert row["accepted"] == stats.accepted
        assert row["delivered"] == stats.delivered
        assert {k: v for k, v in row["dropped"].items() if v} == stats.dropped_by_reason
        assert (row["pending"], row["cursor"], row["eventType"]) == (stats.pending, 400, "feature")


def test_pending_events_fail_only_with_drained(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with spooled_pipeline(directory, close_timeout=0.5) as (pipeline, picky, keeper):
        picky.down.set()
        pipeline.add_events(features(300))
        assert pipeline.spool is not None
        assert pipeline.spool.sync(TIMEOUT)
        assert wait_until(lambda: len(keeper.events) == 300, TIMEOUT)
        # Closing with the sink down keeps picky's 300 events in the spool.
    plain = run("--spool", str(directory))
    assert plain.exit_code == 0
    assert table_row(plain.stdout, "picky") == ["picky", "300", "0", "0", "300", "yes"]
    assert "(300 events pending)" in plain.stdout
    drained = run("--spool", str(directory), "--drained")
    assert drained.exit_code == 1
    assert "--drained: 300 events are not delivered yet" in drained.stderr
    as_json = run("--spool", str(directory), "--drained", "--json")
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout)["balanced"] is True


def test_status_reads_every_worker_slot_of_a_relay_spool(tmp_path: Path) -> None:
    base = tmp_path / "spool"
    for index, count in enumerate([120, 80]):
        with spooled_pipeline(base / f"worker-{index}") as (pipeline, _, _):
            pipeline.add_events(features(count))
            assert pipeline.flush(TIMEOUT)
    result = run("--spool", str(base), "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)["exporters"]}
    assert sorted(rows) == ["worker-0/all", "worker-0/picky", "worker-1/all", "worker-1/picky"]
    assert (rows["worker-0/all"]["accepted"], rows["worker-1/all"]["accepted"]) == (120, 80)
    assert rows["worker-1/picky"]["dropped"]["rejected"] == 40


def test_a_spool_whose_counters_disagree_with_its_rows_fails(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    with spooled_pipeline(directory) as (pipeline, _, _):
        pipeline.add_events(features(100))
        assert pipeline.flush(TIMEOUT)
    with sqlite3.connect(directory / DB_NAME) as db:  # a counter off by 7
        db.execute(
            "UPDATE counters SET value = value + 7 WHERE exporter = 'all' AND name = 'accepted'"
        )
    result = run("--spool", str(directory))
    assert result.exit_code == 1
    assert table_row(result.stdout, "all") == ["all", "107", "100", "0", "0", "NO"]
    assert (
        "accepted = delivered + dropped + pending does NOT hold for all: accepted 107, "
        "delivered 100, dropped 0, pending 0; please report it with this output"
    ) in result.stderr
    document = json.loads(run("--spool", str(directory), "--json").stdout)
    assert document["balanced"] is False


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ([], 2, "give either --url URL (a running relay) or --spool DIR (a spool directory)"),
        (["--url", "http://127.0.0.1:1", "--spool", "."], 2, "give either --url URL"),
        (
            ["--url", "ftp://relay.example"],
            2,
            "--url ftp://relay.example: use an http:// or https:// URL",
        ),
        (
            ["--spool", "{tmp}/missing"],
            3,
            "--spool {tmp}/missing: no such directory; give the `spool.dir` of the config",
        ),
        (
            ["--spool", "{tmp}"],
            3,
            "--spool {tmp}: no spool here (no spool.db, no worker-*/spool.db)",
        ),
    ],
)
def test_usage_and_unreadable_sources_say_what_to_do(
    tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    result = run(*[arg.format(tmp=tmp_path) for arg in args])
    assert result.exit_code == code
    assert message.format(tmp=tmp_path) in result.stderr
    assert result.stdout == ""


def test_a_url_with_credentials_is_never_echoed(tmp_path: Path) -> None:
    # Nothing listens on port 1: the error names the URL, without its user:password.
    result = run(
        "--url", "http://scott:tiger-secret@127.0.0.1:1", env={"FLAGSINK_API_KEY": "k-secret"}
    )
    assert result.exit_code == 3
    assert "cannot reach the relay at http://127.0.0.1:1/v1/status" in result.stderr
    assert "tiger-secret" not in result.output
    assert "k-secret" not in result.output
