"""``flagsink replay``: send the events of dead-letter files again, once the cause is fixed.

A replay takes each dead-letter file aside (renamed to ``FILE.replaying-<unix time>``), so
that letters written meanwhile go to a new FILE; sends the selected letters through one
exporter, with back-pressure; writes every other line back to FILE; and journals which
lines are finished (``FILE.replaying-*.progress``), so that a replay interrupted by a crash
is resumed by the next one without sending anything twice. The public surface:
:func:`replay_letters` (the whole command) and :func:`scan_letters` (what files hold).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import click
import msgspec

from flagsink.cli_support import (
    EXIT_LOST,
    SHOWN_ERRORS,
    fail,
    fail_config,
    wait_for_room,
)
from flagsink.config import Config, ConfigError, ExporterConfig
from flagsink.deadletter import DeadLetterFile, default_path
from flagsink.event import Event
from flagsink.exporter import Batch, Exporter, PartialExportError
from flagsink.pipeline import Pipeline
from flagsink.scheduler import DataExporterScheduler
from flagsink.wire import EventDecodeError, decode_event

__all__ = ["LetterScan", "replay_letters", "scan_letters"]

# FILE.replaying-<unix seconds>[.<n>]: a dead-letter file taken aside by a replay.
_REPLAYING = re.compile(r"(?P<base>.+)\.replaying-\d+(?:\.\d+)?")
_KEEP_EVERY = 1024  # letters written back per append (each append is synced)
_SHOWN_REASONS = 20


class _LetterIn(msgspec.Struct):
    """One line of a dead-letter file (see :mod:`flagsink.deadletter`)."""

    exporter: str
    reason: str
    event: msgspec.Raw
    time: float = 0.0


class _BadLetter(ValueError):
    """A line that is not a dead letter."""


def _parse_letter(line: bytes) -> tuple[_LetterIn, Event]:
    try:
        letter = msgspec.json.decode(line, type=_LetterIn)
    except msgspec.DecodeError as exc:
        raise _BadLetter(f"not a dead letter: {exc}") from None
    try:
        event: Event = msgspec.json.decode(letter.event, type=Event)
    except msgspec.DecodeError:
        try:  # edited by hand, say: read it as `flagsink export` reads events
            event = decode_event(bytes(letter.event))
        except EventDecodeError as exc:
            raise _BadLetter(f"its event is not valid: {exc}") from None
    return letter, event


def _given_path(name: str) -> Path:
    """The dead-letter file a FILE argument names (a `.replaying-*` file: its original)."""
    path = Path(name).expanduser()
    taken = _REPLAYING.fullmatch(path.name)
    return path.with_name(taken.group("base")) if taken else path


def _unfinished(given: Path) -> list[Path]:
    """Files an earlier replay of ``given`` took aside and did not finish, oldest first."""
    try:
        entries = list(given.parent.iterdir())
    except OSError:
        return []
    return sorted(
        entry
        for entry in entries
        if (taken := _REPLAYING.fullmatch(entry.name)) and taken.group("base") == given.name
    )


def _journal_path(path: Path) -> Path:
    return path.with_name(path.name + ".progress")


def _finished_lines(path: Path) -> set[int]:
    """Line numbers of ``path`` an earlier replay finished (from its journal)."""
    done: set[int] = set()
    journal = _journal_path(path)
    try:
        text = journal.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return done
    except OSError as exc:  # resuming without it would send everything again
        fail(f"{journal}: cannot read this replay journal: {exc.strerror or exc}")
    for entry in text.splitlines():
        state, _, number = entry.partition(" ")
        if state in ("d", "r", "k") and number.isdigit():  # a torn last entry is skipped
            done.add(int(number))
    return done


class _Source:
    """One file a replay reads: a dead-letter file taken aside, and its journal."""

    def __init__(self, given: Path, path: Path, *, resumed: bool) -> None:
        self.given = given
        self.path = path
        self.resumed = resumed
        self.done = _finished_lines(path) if resumed else set()
        self.failed = False  # something of it could not be written anywhere: keep it
        self.earlier = len(self.done)
        self.read_to: int | None = None  # bytes read, once read to the end
        self.lines_read = 0
        self._journal: IO[bytes] | None = None
        self._journal_broken = False

    @property
    def shown(self) -> Path:
        """The file named in messages: FILE for a file taken aside now (its lines are
        numbered as in FILE before the replay), the file itself when resumed."""
        return self.path if self.resumed else self.given

    def note(self, state: str, numbers: Sequence[int]) -> None:
        """Journal that lines ``numbers`` are finished (d: delivered, r: dead-lettered
        again, k: written back), so that a replay resumed after a crash skips them."""
        if not numbers or self._journal_broken:
            return
        try:
            if self._journal is None:
                self._journal = open(_journal_path(self.path), "ab")  # noqa: SIM115 - kept open
            self._journal.write(b"".join(b"%s %d\n" % (state.encode(), n) for n in numbers))
            self._journal.flush()  # survives the process; a lost entry only means a resend
        except OSError as exc:
            # The replay goes on; only a resume after a crash would send lines again.
            self._journal_broken = True
            click.echo(
                f"warning: {_journal_path(self.path)}: cannot write the replay journal "
                f"({exc.strerror or exc}); if this replay is interrupted, the next one "
                "sends its letters again",
                err=True,
            )

    def finish(self) -> bool:
        """Delete the file and its journal when everything in it is accounted for."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self.failed:
            return False
        self.path.unlink(missing_ok=True)
        _journal_path(self.path).unlink(missing_ok=True)
        return True


@dataclass
class LetterScan:
    """What the dead-letter files hold, before anything is sent."""

    by_exporter_reason: Counter[tuple[str, str]] = field(default_factory=Counter)
    unreadable: list[tuple[Path, int, str]] = field(default_factory=list)
    unfinished: list[tuple[Path, int, int]] = field(default_factory=list)  # path, left, done
    files: list[tuple[Path, int]] = field(default_factory=list)  # path, letters

    @property
    def exporters(self) -> Counter[str]:
        """Letters by the exporter that wrote them, whatever the reason."""
        counts: Counter[str] = Counter()
        for (exporter, _), count in self.by_exporter_reason.items():
            counts[exporter] += count
        return counts


def scan_letters(paths: Sequence[tuple[Path, bool]]) -> LetterScan:
    """Count the letters of ``paths`` (``(path, resumed)``: a resumed file is one an
    earlier replay took aside; the lines its journal says are finished are skipped) by
    exporter and reason, and list the unreadable lines. Reads only; a file that cannot be
    read is a usage error (exits)."""
    scan = LetterScan()
    for path, resumed in paths:
        done = _finished_lines(path) if resumed else set()
        letters = 0
        try:
            with open(path, "rb") as handle:
                for number, line in enumerate(handle, start=1):
                    if number in done or not line.strip():
                        continue
                    try:
                        letter, _ = _parse_letter(line)
                    except _BadLetter as exc:
                        scan.unreadable.append((path, number, str(exc)))
                        continue
                    letters += 1
                    scan.by_exporter_reason[letter.exporter, letter.reason] += 1
        except OSError as exc:
            fail(f"{path}: cannot read: {exc.strerror or exc}")
        if resumed:
            scan.unfinished.append((path, letters, len(done)))
        else:
            scan.files.append((path, letters))
    return scan


def _exporter_names(config: Config, section: ExporterConfig) -> frozenset[str]:
    """The ``exporter`` values of letters meant for ``section``: its label, and its kind
    when no other section has that kind (letters written before it got a ``name``)."""
    kind = section.scheduling.kind
    if sum(1 for other in config.exporters if other.scheduling.kind == kind) == 1:
        return frozenset({section.label, kind})
    return frozenset({section.label})


def _pick_exporter(
    config: Config, wanted: str | None, scan: LetterScan
) -> tuple[ExporterConfig | None, str | None]:
    """The section to send to, or ``(None, why)`` when it cannot be decided."""
    sections = config.exporters
    listed = ", ".join(f"{s.label} ({s.scheduling.kind})" for s in sections)
    if wanted is not None:
        found = [s for s in sections if s.label == wanted] or [
            s for s in sections if s.scheduling.kind == wanted
        ]
        if not found:
            fail(f"--exporter {wanted}: {config.source} has no such exporter (it has: {listed})")
        if len(found) > 1:
            names = ", ".join(s.label for s in found)
            fail(
                f"--exporter {wanted}: {config.source} has several exporters of kind "
                f"{wanted} ({names}): give each a `name` and pass that"
            )
        return found[0], None
    exporters = scan.exporters
    if not exporters:
        return None, None
    if len(exporters) > 1:
        counts = ", ".join(f"{name}: {count}" for name, count in exporters.most_common())
        return None, f"the letters are for several exporters ({counts}): pass --exporter NAME"
    (name,) = exporters
    found = [s for s in sections if s.label == name] or [
        s for s in sections if s.scheduling.kind == name
    ]
    if len(found) != 1:
        problem = "has no exporter" if not found else "has several exporters"
        return None, (
            f"the letters are for exporter {name!r}, and {config.source} {problem} by that "
            f"name (it has: {listed}): pass --exporter NAME"
        )
    return found[0], None


class _TrackedExporter(Exporter[Any]):
    """Passes batches to the real exporter and reports which events it delivered."""

    kind = "replay"

    def __init__(self, inner: Exporter[Any], delivered: Callable[[Sequence[Event]], None]) -> None:
        self.inner = inner
        self.settings = inner.settings
        self.bulk = bool(getattr(inner, "bulk", True))  # type: ignore[misc]
        self._delivered = delivered

    def export(self, events: Sequence[Event]) -> None:
        self._track(events, lambda: self.inner.export(events))

    def export_batch(self, events: Sequence[Event], batch: Batch) -> None:
        self._track(events, lambda: self.inner.export_batch(events, batch))

    def _track(self, events: Sequence[Event], send: Callable[[], None]) -> None:
        try:
            send()
        except PartialExportError as exc:
            undone = {id(event) for event in (*exc.failed, *exc.rejected)}
            _report_safely(self._delivered, [e for e in events if id(e) not in undone])
            raise
        _report_safely(self._delivered, events)

    def close(self) -> None:
        self.inner.close()


class _RecordingDeadLetters(DeadLetterFile):
    """A dead-letter file that reports which events it wrote."""

    def __init__(
        self, path: Path, exporter: str, written: Callable[[Sequence[Event]], None]
    ) -> None:
        super().__init__(path, exporter)
        self._written = written

    def write(self, events: Sequence[Event], reason: str) -> int:
        count = super().write(events, reason)
        _report_safely(self._written, events)
        return count


def _report_safely(report: Callable[[Sequence[Event]], None], events: Sequence[Event]) -> None:
    """Bookkeeping never fails an export: that would send delivered events again."""
    try:
        report(events)
    except Exception:  # pragma: no cover - defensive
        logging.getLogger("flagsink.cli").exception("replay: bookkeeping failed")


class _LetterReplay:
    """Sends the selected letters of some sources through one scheduler; writes every
    other line back to its dead-letter file; accounts for every line."""

    def __init__(
        self,
        section: ExporterConfig | None,
        names: frozenset[str],
        reason: str | None,
        target: Path,
        timeout: float,
    ) -> None:
        self.section = section
        self.names = names
        self.reason = reason
        self.target = target
        self.timeout = timeout
        self.delivered = 0
        self.rejected = 0
        self.not_delivered = 0
        self.kept = 0
        self.unreadable: list[tuple[Path, int, str]] = []
        self.late = 0  # letters appended to a file after it was taken aside
        self.problems: list[str] = []
        self._lock = threading.Lock()
        self._in_flight: dict[int, tuple[Event, _Source, int, bytes]] = {}
        self._keep: dict[Path, list[tuple[_Source, int, bytes]]] = {}
        self.scheduler: DataExporterScheduler | None = None

    # -- the scheduler's callbacks (its worker thread) ---------------------------------

    def _settle(self, events: Sequence[Event], state: str) -> None:
        by_source: dict[_Source, list[int]] = {}
        with self._lock:
            for event in events:
                entry = self._in_flight.pop(id(event), None)
                if entry is not None:
                    by_source.setdefault(entry[1], []).append(entry[2])
            settled = sum(len(numbers) for numbers in by_source.values())
            if state == "d":
                self.delivered += settled
            else:
                self.rejected += settled
            for source, numbers in by_source.items():
                source.note(state, numbers)

    def _on_delivered(self, events: Sequence[Event]) -> None:
        self._settle(events, "d")

    def _on_dead_lettered(self, events: Sequence[Event]) -> None:
        self._settle(events, "r")

    # -- sending ---------------------------------------------------------------------------

    def start(self, exporter: Exporter[Any]) -> None:
        assert self.section is not None
        timing = self.section.scheduling
        label = self.section.label
        self.scheduler = DataExporterScheduler(
            _TrackedExporter(exporter, self._on_delivered),
            flush_interval=timing.flush_interval / 1000,
            max_events_in_memory=timing.max_event_in_memory,
            max_buffered_events=timing.max_buffered_events,
            retry_initial=timing.retry_initial_interval / 1000,
            retry_max=max(timing.retry_max_interval, timing.retry_initial_interval) / 1000,
            name=label,
            dead_letters=_RecordingDeadLetters(self.target, label, self._on_dead_lettered),
        )

    def run(self, sources: Sequence[_Source]) -> click.ClickException | None:
        """Read every source to its end; None, or why sending stopped early."""
        scheduler = self.scheduler
        pipeline = Pipeline([(scheduler, "feature")], exit_timeout=None) if scheduler else None
        room = wait_for_room(pipeline, self.timeout) if pipeline is not None else 0
        stopped: click.ClickException | None = None
        for source in sources:
            try:
                handle = open(source.path, "rb")  # noqa: SIM115 - read again at the end
            except OSError as exc:
                self.problems.append(f"{source.path}: cannot read: {exc.strerror or exc}")
                source.failed = True
                continue
            with handle:
                for number, line in enumerate(handle, start=1):
                    source.lines_read = number
                    if number in source.done or not line.strip():
                        continue
                    event = self._sort(source, number, line, sending=stopped is None)
                    if event is None or scheduler is None or pipeline is None:
                        continue
                    with self._lock:
                        self._in_flight[id(event)] = (event, source, number, line)
                    scheduler.add_event(event)
                    room -= 1
                    if room < 1:
                        try:
                            room = wait_for_room(pipeline, self.timeout)
                        except click.ClickException as exc:
                            stopped = exc  # the rest is written back, not sent
                self._flush_kept()
                source.read_to = handle.tell()
        return stopped

    def _sort(self, source: _Source, number: int, line: bytes, *, sending: bool) -> Event | None:
        """The event to send for this line, or None when the line is written back."""
        try:
            letter, event = _parse_letter(line)
        except _BadLetter as exc:
            self.unreadable.append((source.shown, number, str(exc)))
            self._write_back(source, number, line)
            return None
        selected = letter.exporter in self.names and (
            self.reason is None or self.reason in letter.reason
        )
        if not selected:
            self.kept += 1
            self._write_back(source, number, line)
            return None
        if not sending:
            self.not_delivered += 1
            self._write_back(source, number, line)
            return None
        return event

    def close(self) -> bool:
        """Close the scheduler (final flush); write back what it did not deliver."""
        delivered = True
        if self.scheduler is not None:
            delivered = self.scheduler.close(self.timeout)
        with self._lock:
            left = list(self._in_flight.values())
            self._in_flight.clear()
        for _, source, number, line in sorted(left, key=lambda e: (str(e[1].path), e[2])):
            self.not_delivered += 1
            self._write_back(source, number, line)
        self._flush_kept()
        return delivered

    def catch_late_letters(self, sources: Sequence[_Source]) -> None:
        """Lines appended to a source after it was read (a writer that opened the file
        just before it was taken aside): written back, never lost."""
        for source in sources:
            if source.read_to is None:
                continue
            try:
                with open(source.path, "rb") as handle:
                    handle.seek(source.read_to)
                    lines = handle.readlines()
            except OSError:
                continue
            for number, line in enumerate(lines, start=source.lines_read + 1):
                if line.strip():
                    self.late += 1
                    self._write_back(source, number, line)
        self._flush_kept()

    # -- writing back ----------------------------------------------------------------------

    def _write_back(self, source: _Source, number: int, line: bytes) -> None:
        pending = self._keep.setdefault(source.given, [])
        pending.append((source, number, line if line.endswith(b"\n") else line + b"\n"))
        if len(pending) >= _KEEP_EVERY:
            self._flush_kept()

    def _flush_kept(self) -> None:
        for given, pending in self._keep.items():
            if not pending:
                continue
            data = b"".join(line for _, _, line in pending)
            try:
                given.parent.mkdir(parents=True, exist_ok=True)
                with open(given, "ab") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as exc:
                self.problems.append(
                    f"{given}: cannot write back {len(pending)} lines: {exc.strerror or exc}"
                )
                for source, _, _ in pending:
                    source.failed = True
            else:
                by_source: dict[_Source, list[int]] = {}
                for source, number, _ in pending:
                    by_source.setdefault(source, []).append(number)
                for source, numbers in by_source.items():
                    source.note("k", numbers)
            pending.clear()


def _dead_letter_target(config: Config, section: ExporterConfig | None, fallback: Path) -> Path:
    """Where letters refused again go: the exporter's ``deadLetterFile``, as the relay
    would write it (with a spool, its default in the spool), else ``fallback``."""
    if section is None:
        return fallback
    if section.scheduling.dead_letter_file:
        return Path(section.scheduling.dead_letter_file).expanduser()
    if config.spool is not None:
        return default_path(Path(config.spool.dir).expanduser(), section.label)
    return fallback


def _lock_directories(givens: Sequence[Path]) -> list[int]:
    """Hold an exclusive lock on each FILE's directory for the replay, so that a second
    replay cannot resume a file this one is still sending. Released at exit."""
    try:
        import fcntl  # noqa: PLC0415 - POSIX only
    except ImportError:  # pragma: no cover - Windows: no lock
        return []
    held = []
    for directory in dict.fromkeys(given.parent for given in givens):
        try:
            descriptor = os.open(directory, os.O_RDONLY)
        except OSError:
            continue  # no directory: no file to replay there either
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(descriptor)
            fail(
                f"another `flagsink replay` is working in {directory}: wait for it to finish "
                "(an interrupted one is resumed by the next replay)"
            )
        held.append(descriptor)
    return held


def _take_aside(given: Path) -> Path:
    """Rename ``given`` to ``given.replaying-<unix seconds>`` (atomic, same directory), so
    that letters written from now on go to a new ``given`` and not into what is read."""
    stamp = int(time.time())
    target = given.with_name(f"{given.name}.replaying-{stamp}")
    extra = 0
    while target.exists():
        extra += 1
        target = given.with_name(f"{given.name}.replaying-{stamp}.{extra}")
    try:
        os.rename(given, target)
    except OSError as exc:
        fail(f"{given}: cannot rename it to {target.name}: {exc.strerror or exc}")
    return target


def _report_scan(
    config: Config,
    scan: LetterScan,
    section: ExporterConfig | None,
    why: str | None,
    reason: str | None,
) -> None:
    for path, letters in scan.files:
        click.echo(f"{path}: {letters} letter(s)")
    for path, left, done in scan.unfinished:
        click.echo(
            f"{path}: an unfinished replay: {left} letter(s) left, {done} finished; "
            "the next replay resumes it"
        )
    rows = scan.by_exporter_reason.most_common()
    if rows:
        width = max(len("EXPORTER"), *(len(exporter) for (exporter, _), _ in rows))
        click.echo(f"{'EXPORTER':<{width}}  {'LETTERS':>7}  REASON")
        for (exporter, text), count in rows[:_SHOWN_REASONS]:
            click.echo(f"{exporter:<{width}}  {count:>7}  {text}")
        if len(rows) > _SHOWN_REASONS:
            click.echo(f"... {len(rows) - _SHOWN_REASONS} more (exporter, reason) pairs")
    for path, number, problem in scan.unreadable[:SHOWN_ERRORS]:
        click.echo(f"{path}:{number}: unreadable: {problem}", err=True)
    if len(scan.unreadable) > SHOWN_ERRORS:
        click.echo(f"... {len(scan.unreadable) - SHOWN_ERRORS} more unreadable lines", err=True)
    total = sum(scan.by_exporter_reason.values())
    if section is None:
        click.echo(f"dry run: {why}" if why else f"dry run: {total} letter(s), nothing to send")
        return
    names = _exporter_names(config, section)
    send = sum(
        count
        for (exporter, text), count in rows
        if exporter in names and (reason is None or reason in text)
    )
    click.echo(
        f"dry run: would send {send} letter(s) to exporter {section.label} "
        f"({section.scheduling.kind}); {total - send} would stay (not selected), "
        f"{len(scan.unreadable)} unreadable line(s)"
    )


def replay_letters(
    config: Config,
    files: Sequence[str],
    *,
    wanted: str | None,
    reason: str | None,
    dry_run: bool,
    timeout: float,
) -> int:
    """Replay the dead-letter ``files`` through an exporter of ``config``.

    :param files: dead-letter files as given on the command line (a
        ``FILE.replaying-*`` name stands for FILE).
    :param wanted: the exporter to send to (its ``name`` or kind); None: the one the
        letters name, when they name only one.
    :param reason: send only the letters whose reason contains this text.
    :param dry_run: count the letters by exporter and reason; send nothing.
    :param timeout: seconds to wait for a failing exporter to recover before giving up.
    :returns: the exit code: 0 when every selected letter was delivered,
        :data:`~flagsink.cli_support.EXIT_LOST` otherwise. A usage problem prints why
        and exits with :data:`~flagsink.cli_support.EXIT_USAGE`.
    """
    givens = list(dict.fromkeys(_given_path(name) for name in files))
    held = [] if dry_run else _lock_directories(givens)
    try:
        return _replay(config, givens, wanted, reason, dry_run=dry_run, timeout=timeout)
    finally:
        for descriptor in held:
            os.close(descriptor)


def _replay(
    config: Config,
    givens: Sequence[Path],
    wanted: str | None,
    reason: str | None,
    *,
    dry_run: bool,
    timeout: float,
) -> int:
    """The replay itself; returns the exit code."""
    plan: list[tuple[Path, Path, bool]] = []  # (given, path to read, resumed)
    for given in givens:
        plan += [(given, path, True) for path in _unfinished(given)]
        if given.is_file():
            plan.append((given, given, False))
        elif given.exists():
            fail(f"{given}: not a file")
    if not plan:
        absent = ", ".join(str(given) for given in givens)
        click.echo(f"nothing to replay: no dead-letter file at {absent}")
        return 0
    scan = scan_letters([(path, resumed) for _, path, resumed in plan])
    section, why = _pick_exporter(config, wanted, scan)
    if dry_run:
        _report_scan(config, scan, section, why, reason)
        return 0
    if why is not None:
        fail(why)
    exporter: Exporter[Any] | None = None
    if section is not None:
        try:
            exporter = section.build()
        except ConfigError as exc:
            fail_config(exc)
    target = _dead_letter_target(config, section, givens[0])
    sources = []
    for given, path, resumed in plan:
        if resumed:
            click.echo(f"resuming the unfinished replay of {path}")
        read = path if resumed else _take_aside(given)
        sources.append(_Source(given, read, resumed=resumed))
    names = _exporter_names(config, section) if section is not None else frozenset()
    run = _LetterReplay(section, names, reason, target, timeout)
    if exporter is not None:
        run.start(exporter)
    stopped = run.run(sources)
    closed = run.close()
    run.catch_late_letters(sources)
    left = [source.path for source in sources if not source.finish()]
    _report_replay(run, sources, stopped, left)
    incomplete = run.rejected or run.not_delivered or run.unreadable or run.problems
    return EXIT_LOST if stopped is not None or left or not closed or incomplete else 0


def _report_replay(
    run: _LetterReplay,
    sources: Sequence[_Source],
    stopped: click.ClickException | None,
    left: Sequence[Path],
) -> None:
    for path, number, problem in run.unreadable[:SHOWN_ERRORS]:
        click.echo(f"{path}:{number}: unreadable: {problem}", err=True)
    if len(run.unreadable) > SHOWN_ERRORS:
        click.echo(f"... {len(run.unreadable) - SHOWN_ERRORS} more unreadable lines", err=True)
    if stopped is not None:
        click.echo(f"error: {stopped.message}", err=True)
    for problem in run.problems:
        click.echo(f"error: {problem}", err=True)
    back = ", ".join(dict.fromkeys(str(source.given) for source in sources))
    to = f"exporter {run.section.label}" if run.section is not None else "no exporter"
    earlier = sum(source.earlier for source in sources if source.resumed)
    click.echo(f"replayed to {to}: {run.delivered} delivered")
    if earlier:
        click.echo(f"  {earlier} line(s) finished by an earlier, interrupted replay")
    if run.rejected:
        click.echo(f"  {run.rejected} rejected again (written to {run.target})")
    if run.not_delivered:
        error = run.scheduler.stats().last_error if run.scheduler is not None else None
        cause = f"; last error: {error}" if error else ""
        click.echo(f"  {run.not_delivered} not delivered (written back to {back}){cause}")
    if run.kept:
        click.echo(f"  {run.kept} not selected (written back to {back})")
    if run.unreadable:
        click.echo(f"  {len(run.unreadable)} unreadable line(s) (written back to {back})")
    if run.late:
        click.echo(f"  {run.late} letter(s) added during the replay (written back to {back})")
    for path in left:
        click.echo(
            f"  kept {path}: some of its lines could not be written anywhere; "
            "replay the same FILE again to resume",
            err=True,
        )
