"""`flagsink replay`: dead letters sent again after a fix, exactly once, nothing lost.

The sink is a `picky` exporter registered for these tests: the `file` exporter that refuses
(for good) the events of some users, can be down (every export fails and is retried), or
kills its process in the middle of an export. Dead letters are written by the scheduler,
as in production; the replay's result is read back from the files the sink wrote.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import msgspec
import pytest
import yaml
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import Field

from flagsink.cli import main
from flagsink.deadletter import DeadLetterFile
from flagsink.event import Event
from flagsink.exporter import ExportError, PartialExportError
from flagsink.exporters.file import FileExporter, FileSettings
from flagsink.hookspecs import hookimpl
from flagsink.pipeline import from_config
from flagsink.plugins import Registry
from flagsink.testing import sample_events

HERE = Path(__file__).resolve().parent


class PickySettings(FileSettings):
    """The `file` exporter's settings, and how the sink misbehaves."""

    refuse: list[str] = Field(
        default_factory=list, description="Users whose key starts with one of these are refused."
    )
    down: bool = Field(False, description="Every export fails (a retryable error).")
    crash_on_export: int = Field(
        0, description="Kill the process in this export call (1 = the first); 0: never."
    )
    late_letter: str | None = Field(
        None,
        description="In the first export, append a letter to the files matching this glob "
        "(a writer that opened a dead-letter file just before a replay took it aside).",
    )


class PickyExporter(FileExporter):
    """Writes JSON lines files as `file` does, but refuses some users for good."""

    kind = "picky"
    settings_model = PickySettings

    def __init__(self, settings: Any = None, /, **options: Any) -> None:
        super().__init__(settings, **options)
        self.calls = 0

    def export(self, events: Sequence[Event]) -> None:
        picky = cast(PickySettings, self.settings)
        self.calls += 1
        if picky.crash_on_export and self.calls >= picky.crash_on_export:
            os._exit(137)  # as SIGKILL would: nothing is flushed or cleaned up
        if picky.down:
            raise ExportError("picky: HTTP 503: the sink is down")
        if picky.late_letter and self.calls == 1:
            pattern = Path(picky.late_letter)
            for path in pattern.parent.glob(pattern.name):
                if not path.name.endswith(".progress"):
                    DeadLetterFile(path, "sink").write(sample_events(1, prefix="late"), "late")
        refused = [e for e in events if any(e.user_key.startswith(p) for p in picky.refuse)]
        accepted = [e for e in events if not any(e is r for r in refused)]
        if accepted:
            super().export(accepted)
        if refused:
            prefixes = [next(p for p in picky.refuse if e.user_key.startswith(p)) for e in refused]
            raise PartialExportError(
                f"{len(refused)} events refused",
                rejected=refused,
                reasons=[f"HTTP 422: {prefix} users are refused" for prefix in prefixes],
            )


def picky_registry() -> Registry:
    registry = Registry()

    def register_exporters(register: Callable[[type[Any]], None]) -> None:
        register(PickyExporter)

    registry.register_plugin(
        SimpleNamespace(flagsink_register_exporters=hookimpl(register_exporters))
    )
    return registry


@pytest.fixture(autouse=True)
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("flagsink.plugins._default", picky_registry())


# -- helpers ------------------------------------------------------------------------------


def picky(name: str, out: Path, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "picky",
        "name": name,
        "outputDir": str(out),
        "flushInterval": 3_600_000,
        "maxEventInMemory": 20,
        "retryInitialInterval": 10,
        "retryMaxInterval": 50,
        **extra,
    }


def write_config(path: Path, *sections: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"exporters": list(sections)}))
    return path


def replay(*args: str | Path) -> Result:
    return CliRunner().invoke(main, ["replay", *map(str, args)])


def received(out: Path) -> Counter[str]:
    """How many times each user key arrived in the sink's files."""
    return Counter(
        json.loads(line)["userKey"]
        for path in out.glob("*.json")
        for line in path.read_text().splitlines()
    )


def letters(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def keys(events: Sequence[Event]) -> Counter[str]:
    return Counter(event.user_key for event in events)


def leftovers(path: Path) -> list[Path]:
    """Files a replay of ``path`` took aside and has not finished (journals apart)."""
    taken = path.parent.glob(path.name + ".replaying-*")
    return sorted(p for p in taken if not p.name.endswith(".progress"))


# -- the round trip -------------------------------------------------------------------------


def test_rejected_then_fixed_then_replayed_delivers_each_letter_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    dead = tmp_path / "dead" / "picky.jsonl"
    events = [
        *sample_events(60, prefix="ok", tracking_every=0),
        *sample_events(25, prefix="bad", tracking_every=0),
    ]
    broken = write_config(
        tmp_path / "broken.yaml", picky("sink", out, refuse=["bad"], deadLetterFile=str(dead))
    )
    pipeline = from_config(broken, exit_timeout=None)
    for event in events:
        pipeline.add_event(event)
    assert pipeline.close(10)
    assert received(out) == keys(events[:60])
    refused = letters(dead)
    assert Counter(letter["event"]["userKey"] for letter in refused) == keys(events[60:])
    assert {(letter["exporter"], letter["reason"]) for letter in refused} == {
        ("sink", "HTTP 422: bad users are refused")
    }

    fixed = write_config(tmp_path / "fixed.yaml", picky("sink", out, deadLetterFile=str(dead)))
    result = replay("--config", fixed, dead)
    assert result.exit_code == 0, result.output
    assert "replayed to exporter sink: 25 delivered" in result.output
    assert received(out) == keys(events)  # every event exactly once
    assert not dead.exists()  # nothing was refused again: no new dead letters
    assert leftovers(dead) == []
    assert list(dead.parent.glob("*.progress")) == []

    again = replay("--config", fixed, dead)
    assert again.exit_code == 0, again.output
    assert "nothing to replay" in again.output
    assert received(out) == keys(events)


def test_letters_refused_again_go_to_a_fresh_dead_letter_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    dead = tmp_path / "dead.jsonl"
    events = sample_events(30, prefix="bad")
    DeadLetterFile(dead, "sink").write(events, "HTTP 422: bad users are refused")
    still_broken = write_config(
        tmp_path / "c.yaml", picky("sink", out, refuse=["bad-000000"], deadLetterFile=str(dead))
    )
    result = replay("--config", still_broken, dead)
    assert result.exit_code == 1, result.output
    # bad-0000000 .. bad-0000009 are still refused; the other 20 are delivered.
    assert "20 delivered" in result.output
    assert f"10 rejected again (written to {dead})" in result.output
    assert received(out) == keys(events[10:])
    again = letters(dead)  # only the letters refused again, once each, no old line
    assert Counter(letter["event"]["userKey"] for letter in again) == keys(events[:10])
    assert {letter["reason"] for letter in again} == {"HTTP 422: bad-000000 users are refused"}
    assert leftovers(dead) == []


def test_without_a_dead_letter_file_in_the_config_refusals_go_back_to_file(
    tmp_path: Path,
) -> None:
    dead = tmp_path / "letters.jsonl"
    events = sample_events(5, prefix="bad")
    DeadLetterFile(dead, "sink").write(events, "HTTP 422: first refusal")
    config = write_config(tmp_path / "c.yaml", picky("sink", tmp_path / "out", refuse=["bad"]))
    result = replay("--config", config, dead)
    assert result.exit_code == 1
    assert f"5 rejected again (written to {dead})" in result.output
    assert {letter["reason"] for letter in letters(dead)} == {"HTTP 422: bad users are refused"}


# -- filters --------------------------------------------------------------------------------


@pytest.fixture
def two_sinks(tmp_path: Path) -> tuple[Path, Path, dict[str, list[Event]]]:
    dead = tmp_path / "dead.jsonl"
    groups = {
        "a-422": sample_events(7, prefix="a422"),
        "a-413": sample_events(4, prefix="a413"),
        "b-422": sample_events(5, prefix="b422"),
    }
    DeadLetterFile(dead, "a").write(groups["a-422"][:4], "HTTP 422: schema v2 expected")
    DeadLetterFile(dead, "b").write(groups["b-422"], "HTTP 422: schema v2 expected")
    DeadLetterFile(dead, "a").write(groups["a-413"], "HTTP 413: body too large")
    DeadLetterFile(dead, "a").write(groups["a-422"][4:], "HTTP 422: schema v2 expected")
    config = write_config(
        tmp_path / "c.yaml", picky("a", tmp_path / "out-a"), picky("b", tmp_path / "out-b")
    )
    return config, dead, groups


def test_letters_of_several_exporters_need_exporter_and_nothing_is_touched(
    two_sinks: tuple[Path, Path, dict[str, list[Event]]],
) -> None:
    config, dead, _ = two_sinks
    before = dead.read_bytes()
    result = replay("--config", config, dead)
    assert result.exit_code == 2
    assert "several exporters (a: 11, b: 5): pass --exporter NAME" in result.output
    assert dead.read_bytes() == before
    assert leftovers(dead) == []
    unknown = replay("--config", config, "--exporter", "c", dead)
    assert unknown.exit_code == 2
    assert "--exporter c: " in unknown.output
    assert "it has: a (picky), b (picky)" in unknown.output
    assert dead.read_bytes() == before


def test_exporter_and_reason_select_letters_and_the_others_stay(
    tmp_path: Path, two_sinks: tuple[Path, Path, dict[str, list[Event]]]
) -> None:
    config, dead, groups = two_sinks
    lines = dead.read_bytes().splitlines(keepends=True)
    result = replay("--config", config, "--exporter", "a", "--reason", "HTTP 422", dead)
    assert result.exit_code == 0, result.output
    assert "replayed to exporter a: 7 delivered" in result.output
    assert "9 not selected (written back to" in result.output
    assert received(tmp_path / "out-a") == keys(groups["a-422"])
    assert received(tmp_path / "out-b") == Counter()
    # Exactly the other letters stay, byte for byte (time, reason and all).
    kept = [line for line in lines if b"a422" not in line]
    assert sorted(dead.read_bytes().splitlines(keepends=True)) == sorted(kept)

    result = replay("--config", config, "--exporter", "b", dead)
    assert result.exit_code == 0, result.output
    assert received(tmp_path / "out-b") == keys(groups["b-422"])
    assert Counter(letter["event"]["userKey"] for letter in letters(dead)) == keys(groups["a-413"])
    # The letters now name one exporter: no --exporter needed.
    result = replay("--config", config, dead)
    assert result.exit_code == 0, result.output
    assert received(tmp_path / "out-a") == keys(groups["a-422"] + groups["a-413"])
    assert not dead.exists()
    assert leftovers(dead) == []


def test_letters_written_before_the_exporter_got_a_name_are_found_by_its_kind(
    tmp_path: Path,
) -> None:
    dead = tmp_path / "dead.jsonl"
    events = sample_events(4, prefix="unnamed")
    DeadLetterFile(dead, "picky").write(events, "HTTP 400")  # label = kind, no `name` yet
    config = write_config(tmp_path / "c.yaml", picky("sink", tmp_path / "out"))
    result = replay("--config", config, dead)
    assert result.exit_code == 0, result.output
    assert "replayed to exporter sink: 4 delivered" in result.output
    # With two exporters of that kind, the kind alone says nothing: --exporter is needed.
    DeadLetterFile(dead, "picky").write(events, "HTTP 400")
    two = write_config(
        tmp_path / "two.yaml", picky("a", tmp_path / "out-a"), picky("b", tmp_path / "out-b")
    )
    result = replay("--config", two, dead)
    assert result.exit_code == 2
    assert "has several exporters by that name" in result.output


def test_dry_run_counts_by_exporter_and_reason_and_sends_nothing(
    tmp_path: Path, two_sinks: tuple[Path, Path, dict[str, list[Event]]]
) -> None:
    config, dead, _ = two_sinks
    before = dead.read_bytes()
    result = replay("--config", config, "--dry-run", dead)
    assert result.exit_code == 0, result.output
    rows = [line.split(None, 2) for line in result.stdout.splitlines() if line[:2] in ("a ", "b ")]
    assert rows == [
        ["a", "7", "HTTP 422: schema v2 expected"],
        ["b", "5", "HTTP 422: schema v2 expected"],
        ["a", "4", "HTTP 413: body too large"],
    ]
    assert f"{dead}: 16 letter(s)" in result.output
    assert "several exporters (a: 11, b: 5): pass --exporter NAME" in result.output
    chosen = replay("--config", config, "--dry-run", "--exporter", "a", "--reason", "413", dead)
    assert chosen.exit_code == 0, chosen.output
    assert "would send 4 letter(s) to exporter a (picky); 12 would stay" in chosen.output
    assert dead.read_bytes() == before
    assert leftovers(dead) == []
    assert not (tmp_path / "out-a").exists() or received(tmp_path / "out-a") == Counter()


# -- what cannot be sent ----------------------------------------------------------------------


def test_unreadable_lines_are_reported_with_their_numbers_and_kept(tmp_path: Path) -> None:
    dead = tmp_path / "dead.jsonl"
    good = sample_events(3, prefix="good")
    DeadLetterFile(dead, "sink").write(good[:1], "HTTP 400")
    with open(dead, "ab") as handle:
        handle.write(b"this is not JSON\n")  # line 2
        handle.write(b'{"time": 1, "exporter": "sink", "reason": "r"}\n')  # 3: no event
        handle.write(b"\n")  # 4: blank, skipped
        handle.write(b'{"time": 1, "exporter": "sink", "reason": "r", "event": [1]}\n')  # 5
    DeadLetterFile(dead, "sink").write(good[1:], "HTTP 400")  # lines 6, 7
    with open(dead, "ab") as handle:
        handle.write(b'{"time": 1, "exporter": "sink", "rea')  # 8: torn by a crash
    config = write_config(tmp_path / "c.yaml", picky("sink", tmp_path / "out"))

    dry = replay("--config", config, "--dry-run", dead)
    assert dry.exit_code == 0
    assert [
        int(n) for n in re.findall(rf"{re.escape(str(dead))}:(\d+): unreadable", dry.stderr)
    ] == [
        2,
        3,
        5,
        8,
    ]
    result = replay("--config", config, dead)
    assert result.exit_code == 1, result.output
    assert [
        int(n) for n in re.findall(rf"{re.escape(str(dead))}:(\d+): unreadable", result.stderr)
    ] == [2, 3, 5, 8]
    assert "not a dead letter" in result.stderr
    assert "its event is not valid" in result.stderr
    assert "3 delivered" in result.output
    assert "4 unreadable line(s) (written back to" in result.output
    assert received(tmp_path / "out") == keys(good)
    # The unreadable lines are back in the file, untouched (the torn one now ends a line).
    assert dead.read_bytes().splitlines() == [
        b"this is not JSON",
        b'{"time": 1, "exporter": "sink", "reason": "r"}',
        b'{"time": 1, "exporter": "sink", "reason": "r", "event": [1]}',
        b'{"time": 1, "exporter": "sink", "rea',
    ]
    assert leftovers(dead) == []


def test_a_sink_still_down_gets_every_letter_back_in_file(tmp_path: Path) -> None:
    dead = tmp_path / "dead.jsonl"
    events = sample_events(50, prefix="down")
    DeadLetterFile(dead, "sink").write(events, "HTTP 400: bad")
    lines = sorted(dead.read_bytes().splitlines())
    config = write_config(tmp_path / "c.yaml", picky("sink", tmp_path / "out", down=True))
    result = replay("--config", config, "--timeout", "0.3", dead)
    assert result.exit_code == 1
    assert "0 delivered" in result.output
    assert "50 not delivered (written back to" in result.output
    assert "last error: ExportError: picky: HTTP 503: the sink is down" in result.output
    assert sorted(dead.read_bytes().splitlines()) == lines  # every letter, once, unchanged
    assert leftovers(dead) == []


def test_a_missing_file_is_nothing_to_replay_and_a_bad_config_is_a_usage_error(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "c.yaml", picky("sink", tmp_path / "out"))
    result = replay("--config", config, tmp_path / "none.jsonl")
    assert result.exit_code == 0
    assert "nothing to replay: no dead-letter file at" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("exporters:\n  - kind: picky\n    outputDir: x\n    bogus: 1\n")
    result = replay("--config", bad, tmp_path / "none.jsonl")
    assert result.exit_code == 2
    assert "bogus: unknown key" in result.output


def test_letters_written_to_the_file_taken_aside_during_the_replay_are_kept(
    tmp_path: Path,
) -> None:
    dead = tmp_path / "dead.jsonl"
    # Fewer than maxEventInMemory (20): the first export comes at the final flush, after
    # the file was read to its end; the letter it appends is new to the replay.
    events = sample_events(15, prefix="early")
    DeadLetterFile(dead, "sink").write(events, "HTTP 400")
    late = str(dead) + ".replaying-*"
    config = write_config(tmp_path / "c.yaml", picky("sink", tmp_path / "out", late_letter=late))
    result = replay("--config", config, dead)
    assert result.exit_code == 0, result.output
    assert "15 delivered" in result.output
    assert "1 letter(s) added during the replay (written back to" in result.output
    assert received(tmp_path / "out") == keys(events)
    assert [letter["event"]["userKey"] for letter in letters(dead)] == ["late-0000000"]
    assert leftovers(dead) == []


def test_with_a_spool_letters_refused_again_go_to_the_spool_dead_letter_file(
    tmp_path: Path,
) -> None:
    dead = tmp_path / "old.jsonl"
    DeadLetterFile(dead, "my sink").write(sample_events(3, prefix="bad"), "HTTP 422")
    spool = tmp_path / "spool"
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "spool": {"dir": str(spool)},
                "exporters": [picky("my sink", tmp_path / "out", refuse=["bad"])],
            }
        )
    )
    result = replay("--config", config, dead)
    assert result.exit_code == 1
    target = spool / "deadletter" / "my_sink.jsonl"
    assert f"3 rejected again (written to {target})" in result.output
    assert len(letters(target)) == 3
    assert not dead.exists()


# -- interrupted replays ------------------------------------------------------------------


def test_a_replay_killed_mid_way_is_resumed_without_sending_anything_twice(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    dead = tmp_path / "dead.jsonl"
    events = sample_events(100, prefix="crash")
    DeadLetterFile(dead, "sink").write(events, "HTTP 503 for too long")
    # maxEventInMemory 20: batches of 20; the process dies in the third export.
    crashing = write_config(tmp_path / "crash.yaml", picky("sink", out, crash_on_export=3))
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        import flagsink.plugins
        import test_replay_cli
        flagsink.plugins._default = test_replay_cli.picky_registry()
        from flagsink.cli import main
        main(["replay", "--config", {str(crashing)!r}, {str(dead)!r}])
        """
    )
    killed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=60, check=False
    )
    assert killed.returncode == 137, killed.stderr.decode()
    assert received(out) == keys(events[:40])  # two batches made it
    (taken,) = leftovers(dead)
    assert not dead.exists()

    fine = write_config(tmp_path / "fine.yaml", picky("sink", out))
    dry = replay("--config", fine, "--dry-run", dead)
    assert f"{taken}: an unfinished replay: 60 letter(s) left, 40 finished" in dry.output
    result = replay("--config", fine, dead)
    assert result.exit_code == 0, result.output
    assert f"resuming the unfinished replay of {taken}" in result.output
    assert "60 delivered" in result.output
    assert "40 line(s) finished by an earlier, interrupted replay" in result.output
    assert received(out) == keys(events)  # each exactly once
    assert leftovers(dead) == []
    assert list(tmp_path.glob("*.progress")) == []


def test_a_leftover_without_journal_is_sent_in_full_with_the_new_letters(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    dead = tmp_path / "dead.jsonl"
    old, new = sample_events(10, prefix="old"), sample_events(5, prefix="new")
    taken = tmp_path / "dead.jsonl.replaying-1700000000"
    DeadLetterFile(taken, "sink").write(old, "HTTP 400")
    DeadLetterFile(dead, "sink").write(new, "HTTP 400")
    config = write_config(tmp_path / "c.yaml", picky("sink", out))
    result = replay("--config", config, dead)
    assert result.exit_code == 0, result.output
    assert "15 delivered" in result.output
    assert received(out) == keys(old + new)
    assert leftovers(dead) == []
    assert not dead.exists()


def test_a_second_replay_in_the_same_directory_waits_its_turn(tmp_path: Path) -> None:
    fcntl = pytest.importorskip("fcntl")
    dead = tmp_path / "dead.jsonl"
    DeadLetterFile(dead, "sink").write(sample_events(3), "HTTP 400")
    config = write_config(tmp_path / "c.yaml", picky("sink", tmp_path / "out"))
    running = os.open(tmp_path, os.O_RDONLY)  # as a replay running in this directory
    try:
        fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = replay("--config", config, dead)
        assert result.exit_code == 2
        assert f"another `flagsink replay` is working in {tmp_path}" in result.output
        assert dead.exists()
        assert leftovers(dead) == []
        assert replay("--config", config, "--dry-run", dead).exit_code == 0  # reads only
    finally:
        os.close(running)
    result = replay("--config", config, dead)
    assert result.exit_code == 0, result.output
    assert "3 delivered" in result.output


# -- nothing lost, nothing twice -----------------------------------------------------------

LINE = st.one_of(
    st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["HTTP 400", "HTTP 422", "too big"])),
    st.just("garbage"),
    st.just("blank"),
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lines=st.lists(LINE, max_size=40),
    exporter=st.sampled_from(["a", "b"]),
    reason=st.sampled_from([None, "HTTP", "422", "big"]),
)
def test_every_line_is_delivered_or_back_in_file_exactly_once(
    tmp_path_factory: pytest.TempPathFactory,
    lines: list[tuple[str, str] | str],
    exporter: str,
    reason: str | None,
) -> None:
    tmp_path = tmp_path_factory.mktemp("prop")
    dead = tmp_path / "dead.jsonl"
    sent: Counter[str] = Counter()
    kept: list[bytes] = []
    with open(dead, "wb") as handle:
        for line, event in zip(lines, sample_events(len(lines), prefix="p"), strict=True):
            if line == "garbage":
                data = b"{not json\n"
                kept.append(data)
            elif line == "blank":
                data = b"\n"
            else:
                name, why = line
                letter = {"time": 1.5, "exporter": name, "reason": why, "event": event}
                data = msgspec.json.encode(letter) + b"\n"
                if name == exporter and (reason is None or reason in why):
                    sent[event.user_key] += 1
                else:
                    kept.append(data)
            handle.write(data)
    config = write_config(
        tmp_path / "c.yaml", picky("a", tmp_path / "out-a"), picky("b", tmp_path / "out-b")
    )
    options = ["--exporter", exporter] + (["--reason", reason] if reason is not None else [])
    result = replay("--config", config, *options, dead)
    assert result.exit_code == (1 if "garbage" in lines else 0), result.output
    assert received(tmp_path / f"out-{exporter}") == sent
    back = dead.read_bytes().splitlines(keepends=True) if dead.exists() else []
    assert Counter(back) == Counter(kept)
    assert leftovers(dead) == []
