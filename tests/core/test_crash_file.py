"""Fault suite, case 1 (issue 8) on the core ``file`` exporter: the relay is SIGKILLed at
random times and at named crash points while clients post, restarted on the same spool,
and the files are read back: no acknowledged event is lost, duplicates stay within the
batches in flight at the kills, and (case 6) every exporter's durable counters balance
after every kill.

Two exporters share the spool (feature events and tracking events, each to its own
directory), so each kill can leave one batch per exporter in flight. The long variant
(``-m long``) runs 50 trials.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from flagsink.testing.crash import (
    CrashHarness,
    CrashPlan,
    Delivered,
    long_plans,
    run_crash_case,
    short_plans,
)
from flagsink.testing.oracle import Oracle

POINTS = (
    "spool.after_append_before_fsync",
    "spool.during_compaction",
    "export.after_send_before_confirm",
)
MAX_BATCH = 50


def relay_config(out: Path) -> dict[str, Any]:
    common = {"kind": "file", "flushInterval": 200, "maxEventInMemory": MAX_BATCH}
    return {
        "exporters": [
            {**common, "name": "features", "outputDir": str(out / "feature")},
            {
                **common,
                "name": "tracking",
                "eventType": "tracking",
                "outputDir": str(out / "tracking"),
            },
        ]
    }


def read_files(out: Path) -> list[Delivered]:
    """Every JSON lines file the exporters published (hidden temporary files excluded)."""
    return [
        Delivered([json.loads(line) for line in path.read_text().splitlines()], str(path))
        for path in sorted(out.rglob("*.json"))
        if not path.name.startswith(".")
    ]


def test_no_acknowledged_event_is_lost_across_kills(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_crash_case(
        "file",
        relay_config(out),
        tmp_path / "relay",
        plans=short_plans(POINTS, random_kills=2),
        read_back=lambda: read_files(out),
        objects=True,
    )
    print(result.summary())
    result.assert_sound()
    assert result.trials == 5
    assert result.points_reached == {
        "spool.after_append_before_fsync:3": 1,
        "spool.during_compaction:5": 1,
        "export.after_send_before_confirm:2": 1,
    }
    assert result.accepted > 0
    # Every committed event reached a file exactly once or as a bounded duplicate.
    assert result.delivered == result.committed
    assert result.dropped == 0
    assert len(result.accounting) == 6  # after each kill, and after the recovery


def test_the_figures_catch_a_lost_file_and_a_copied_one(tmp_path: Path) -> None:
    """The harness itself: a file removed from the sink is reported lost, a file copied
    is reported as duplicates and a duplicate object."""
    out = tmp_path / "out"
    with CrashHarness(
        "file", relay_config(out), tmp_path / "relay", oracle=Oracle(), concurrency=1
    ) as harness:
        harness.run([CrashPlan("export.after_send_before_confirm", 2)])
        harness.recover()
        files = read_files(out)
        assert files
        assert harness.result(files, objects=True).problems() == []
        # A file of acknowledged events that no other file holds (the batch sent twice
        # around the kill is in two files).
        unanswered = {event.user_key for event in harness.unanswered_events}
        copies = Counter(r["userKey"] for f in files for r in f.records)
        gone = next(
            f
            for f in files
            if all(copies[r["userKey"]] == 1 and r["userKey"] not in unanswered for r in f.records)
        )
        broken = harness.result([f for f in files if f is not gone], objects=True)
        assert broken.lost == len(gone.records)
        assert any("acknowledged events lost" in p for p in broken.problems())
        copy = Path(str(gone.container) + ".copy.json")
        shutil.copy(str(gone.container), copy)
        doubled = harness.result(read_files(out), objects=True)
        assert doubled.duplicate_objects >= 1
        assert doubled.duplicates >= len(gone.records)
        assert doubled.lost == 0


@pytest.mark.long
def test_fifty_kills(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rng = random.Random()
    result = run_crash_case(
        "file",
        relay_config(out),
        tmp_path / "relay",
        plans=long_plans(POINTS, 50, rng),
        read_back=lambda: read_files(out),
        objects=True,
        recover_timeout=120,
    )
    print(result.summary())
    result.assert_sound()
    assert result.trials >= 50
    assert result.delivered == result.committed
