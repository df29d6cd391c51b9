"""The ``flagsink`` command: list plugins, validate a config, replay events through it,
manage the flag store."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import click
import msgspec

from flagsink.config import Config, ConfigError, ExporterConfig, StoreConfig, load_config
from flagsink.deadletter import DeadLetterFile
from flagsink.event import Event
from flagsink.exporter import Batch, Exporter, PartialExportError
from flagsink.flags import FlagFileError, flag_item, load_flag_file, next_version, tracks_events
from flagsink.pipeline import Pipeline, from_config
from flagsink.plugins import PluginError, core_version, installed_plugins
from flagsink.scheduler import DataExporterScheduler
from flagsink.spooled import SpoolScheduler
from flagsink.store import FLAGS, StoreError
from flagsink.store_cache import CachedStore
from flagsink.wire import EventDecodeError, decode_event

__all__ = ["main"]

_SHOWN_ERRORS = 20
_CHECK_EVERY = 1024  # events between back-pressure checks, at most
EXIT_LOST = 1
EXIT_USAGE = 2


def _fail(message: str) -> None:
    click.echo(f"flagsink: {message}", err=True)
    sys.exit(EXIT_USAGE)


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"error: {problem}", err=True)
        sys.exit(EXIT_USAGE)
    except PluginError as exc:
        _fail(str(exc))
        raise  # unreachable


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(core_version(), "--version", "-V", prog_name="flagsink")
@click.option(
    "--log-level",
    default="WARNING",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    help="Level of flagsink's own log messages (on stderr).",
)
def main(log_level: str) -> None:
    """Export feature-flag evaluation events to where you keep data."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def plugins(as_json: bool) -> None:
    """List installed plugins (read from package metadata; nothing is imported)."""
    rows = [
        {
            "kind": plugin.name,
            "distribution": plugin.distribution,
            "version": plugin.version,
            "mode": plugin.mode or "-",
            "module": plugin.module,
            "disabled": plugin.disabled,
        }
        for plugin in installed_plugins()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    headers = ["KIND", "DISTRIBUTION", "VERSION", "MODE", "STATUS"]
    table: list[list[str]] = [headers]
    for r in rows:
        status = "disabled" if r["disabled"] else ""
        table.append(
            [str(r["kind"]), str(r["distribution"]), str(r["version"]), str(r["mode"]), status]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    for line in table:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
def validate(config: str) -> None:
    """Check CONFIG (YAML or JSON) and that its exporters can be built."""
    loaded = _load(config)
    problems: list[str] = []
    for section in loaded.exporters:
        try:
            section.build().close()
        except ConfigError as exc:
            problems.extend(exc.problems)
    if loaded.store is not None:
        try:
            loaded.store.build_backend().close()
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        for problem in problems:
            click.echo(f"error: {problem}", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(f"{config}: OK, {len(loaded.exporters)} exporter(s)")
    for section in loaded.exporters:
        mode = "bulk" if section.exporter_class.bulk else "queue"
        click.echo(f"  {section.path}: {section.label} ({mode}, {section.scheduling.event_type})")
    if loaded.store is not None:
        click.echo(f"  store: {loaded.store.kind} (cacheTTL {loaded.store.cache_ttl:g}s)")


@dataclass
class _Replay:
    lines: int = 0
    accepted: int = 0
    rejected: int = 0


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Config file.")
@click.option("--host", default=None, help="Interface to bind (default: from config, 127.0.0.1).")
@click.option("--port", default=None, type=int, help="Port (default: from config, 1031).")
@click.option("--workers", default=1, show_default=True, help="Worker processes.")
def serve(config_path: str | None, host: str | None, port: int | None, workers: int) -> None:
    """Run the relay: GO Feature Flag's /v1/data/collector, routed to the exporters.

    With no --config, events go to JSON lines files under ./flagsink-data.
    """
    try:
        from flagsink.relay.server import serve as run  # noqa: PLC0415 - optional extra
    except ImportError as exc:
        _fail(f"the relay needs extra packages ({exc.name}): pip install 'flagsink[relay]'")
        raise  # unreachable
    config = _load(config_path) if config_path else None
    try:
        run(config, host=host, port=port, workers=workers)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"error: {problem}", err=True)
        sys.exit(EXIT_USAGE)
    # Every exporter is closed and its undelivered count logged: end the process now,
    # without the interpreter's teardown (0.05-0.3 s) or exit hooks that join threads
    # still stuck on a dead sink, so that SIGTERM ends within shutdownTimeout.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@main.command()
@click.option(
    "--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Config file."
)
@click.argument("events", default="-", type=click.File("rb"))
@click.option(
    "--timeout",
    default=60.0,
    show_default=True,
    help="Seconds to wait for a failing exporter to recover before giving up.",
)
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar (default: on a terminal)."
)
def export(config_path: str, events: IO[bytes], timeout: float, progress: bool | None) -> None:
    """Replay EVENTS (JSON lines; '-' for stdin) through the configured exporters.

    Malformed lines are reported with their line number and skipped; the exit code is 1
    if any line was rejected or any event was not delivered.
    """
    config = _load(config_path)
    try:
        pipeline = from_config(config)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"error: {problem}", err=True)
        sys.exit(EXIT_USAGE)
    name = getattr(events, "name", "-")
    name = "<stdin>" if name in ("-", "<stdin>") else name
    show = sys.stderr.isatty() if progress is None else progress
    replay = _Replay()
    stopped: click.ClickException | None = None
    try:
        _replay(pipeline, events, name, replay, show=show, timeout=timeout)
    except click.ClickException as exc:
        stopped = exc
    finally:
        delivered = pipeline.close(timeout)
    if stopped is not None:
        click.echo(f"error: {stopped.message}", err=True)
    stats = pipeline.stats()
    lost = sum(s.dropped for s in stats) + sum(s.buffered + s.in_flight for s in stats)
    exported = ", ".join(f"{s.exporter}: {s.exported} exported" for s in stats)
    click.echo(
        f"{replay.lines} lines: {replay.accepted} accepted, {replay.rejected} rejected; "
        f"{exported}; {lost} lost",
        err=True,
    )
    if stopped is not None or replay.rejected or lost or not delivered:
        sys.exit(EXIT_LOST)


def _replay(
    pipeline: Pipeline, stream: IO[bytes], name: str, replay: _Replay, *, show: bool, timeout: float
) -> None:
    size = _size_of(stream)
    bar: Any = (
        click.progressbar(length=size, label="exporting", file=sys.stderr, show_pos=size is None)
        if show
        else _NoBar()
    )
    room = _wait_for_room(pipeline, timeout)
    with bar:
        for number, line in enumerate(stream, start=1):
            replay.lines = number
            bar.update(len(line) if size is not None else 1)
            if not line.strip():
                continue
            try:
                event = decode_event(line)
            except EventDecodeError as exc:
                replay.rejected += 1
                if replay.rejected <= _SHOWN_ERRORS:
                    click.echo(f"{name}:{number}: rejected: {exc}", err=True)
                continue
            pipeline.add_event(event)
            replay.accepted += 1
            room -= 1
            if room < 1:
                room = _wait_for_room(pipeline, timeout)
    if replay.rejected > _SHOWN_ERRORS:
        click.echo(f"{name}: ... {replay.rejected - _SHOWN_ERRORS} more rejected", err=True)


def _room(scheduler: DataExporterScheduler | SpoolScheduler) -> int:
    """Events ``scheduler`` can take before its cap drops any (a failed batch comes back)."""
    stats = scheduler.stats()
    return scheduler.max_buffered_events - stats.buffered - stats.in_flight


def _wait_for_room(pipeline: Pipeline, timeout: float) -> int:
    """Back-pressure: a replay never outruns an exporter into dropping events.

    :returns: how many events may be added before the next call.
    """
    for scheduler in pipeline.schedulers:
        deadline = time.monotonic() + timeout
        while _room(scheduler) < 1:
            if scheduler.flush(max(deadline - time.monotonic(), 0.0)):
                break
            if time.monotonic() >= deadline:
                error = scheduler.stats().last_error
                raise click.ClickException(
                    f"exporter {scheduler.name} kept failing for {timeout:.0f}s "
                    f"(last error: {error}); stopping the replay"
                )
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0.0)))
    return min([_CHECK_EVERY, *(_room(scheduler) for scheduler in pipeline.schedulers)])


def _size_of(stream: IO[bytes]) -> int | None:
    try:
        if stream.seekable():
            position = stream.tell()
            size = stream.seek(0, 2) - position
            stream.seek(position)
            return size
    except OSError:
        pass
    return None


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def update(self, _: int) -> None:
        return None


# -- replay of dead letters ----------------------------------------------------------------

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
        _fail(f"{journal}: cannot read this replay journal: {exc.strerror or exc}")
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
class _LetterScan:
    """What the dead-letter files hold, before anything is sent."""

    by_exporter_reason: Counter[tuple[str, str]] = field(default_factory=Counter)
    unreadable: list[tuple[Path, int, str]] = field(default_factory=list)
    unfinished: list[tuple[Path, int, int]] = field(default_factory=list)  # path, left, done
    files: list[tuple[Path, int]] = field(default_factory=list)  # path, letters

    @property
    def exporters(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for (exporter, _), count in self.by_exporter_reason.items():
            counts[exporter] += count
        return counts


def _scan_letters(paths: Sequence[tuple[Path, bool]]) -> _LetterScan:
    scan = _LetterScan()
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
            _fail(f"{path}: cannot read: {exc.strerror or exc}")
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
    config: Config, wanted: str | None, scan: _LetterScan
) -> tuple[ExporterConfig | None, str | None]:
    """The section to send to, or ``(None, why)`` when it cannot be decided."""
    sections = config.exporters
    listed = ", ".join(f"{s.label} ({s.scheduling.kind})" for s in sections)
    if wanted is not None:
        found = [s for s in sections if s.label == wanted] or [
            s for s in sections if s.scheduling.kind == wanted
        ]
        if not found:
            _fail(f"--exporter {wanted}: {config.source} has no such exporter (it has: {listed})")
        if len(found) > 1:
            names = ", ".join(s.label for s in found)
            _fail(
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
        room = _wait_for_room(pipeline, self.timeout) if pipeline is not None else 0
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
                            room = _wait_for_room(pipeline, self.timeout)
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
        # As flagsink.pipeline names it (keep the two in step).
        name = "".join(c if c.isalnum() or c in "._-" else "_" for c in section.label)
        return Path(config.spool.dir).expanduser() / "deadletter" / f"{name or 'exporter'}.jsonl"
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
            _fail(
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
        _fail(f"{given}: cannot rename it to {target.name}: {exc.strerror or exc}")
    return target


def _report_scan(
    config: Config,
    scan: _LetterScan,
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
    for path, number, problem in scan.unreadable[:_SHOWN_ERRORS]:
        click.echo(f"{path}:{number}: unreadable: {problem}", err=True)
    if len(scan.unreadable) > _SHOWN_ERRORS:
        click.echo(f"... {len(scan.unreadable) - _SHOWN_ERRORS} more unreadable lines", err=True)
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


@main.command()
@click.option(
    "--config", "config_path", required=True, type=click.Path(dir_okay=False), help="Config file."
)
@click.option(
    "--exporter",
    "wanted",
    default=None,
    help="Send to this exporter (its `name`, or its kind), and only the letters it wrote. "
    "Default: the exporter named in the letters, when they name only one.",
)
@click.option(
    "--reason",
    default=None,
    metavar="TEXT",
    help="Send only the letters whose reason contains TEXT; the others stay in FILE.",
)
@click.option(
    "--dry-run", is_flag=True, help="Count the letters by exporter and reason; send nothing."
)
@click.option(
    "--timeout",
    default=60.0,
    show_default=True,
    help="Seconds to wait for a failing exporter to recover before giving up.",
)
@click.argument(
    "files", nargs=-1, required=True, metavar="FILE...", type=click.Path(dir_okay=False)
)
def replay(
    *,
    config_path: str,
    wanted: str | None,
    reason: str | None,
    dry_run: bool,
    timeout: float,
    files: tuple[str, ...],
) -> None:
    """Send the events of dead-letter FILEs again, after the cause is fixed.

    Each FILE is first renamed to FILE.replaying-<unix time>, so that events refused
    again go to a new FILE (or the exporter's deadLetterFile) and not into what is being
    read. Letters not selected (--exporter, --reason), unreadable lines, and letters not
    delivered in time are written back to FILE. The renamed file is deleted once every
    line of it is accounted for; a replay that was interrupted is resumed by the next
    one, skipping what it had finished. Exit code: 0 when every selected letter was
    delivered, 1 otherwise, 2 for a usage or config error.
    """
    config = _load(config_path)
    givens = list(dict.fromkeys(_given_path(name) for name in files))
    held = [] if dry_run else _lock_directories(givens)
    try:
        code = _replay_letters(config, givens, wanted, reason, dry_run=dry_run, timeout=timeout)
    finally:
        for descriptor in held:
            os.close(descriptor)
    if code:
        sys.exit(code)


def _replay_letters(
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
            _fail(f"{given}: not a file")
    if not plan:
        absent = ", ".join(str(given) for given in givens)
        click.echo(f"nothing to replay: no dead-letter file at {absent}")
        return 0
    scan = _scan_letters([(path, resumed) for _, path, resumed in plan])
    section, why = _pick_exporter(config, wanted, scan)
    if dry_run:
        _report_scan(config, scan, section, why, reason)
        return 0
    if why is not None:
        _fail(why)
    exporter: Exporter[Any] | None = None
    if section is not None:
        try:
            exporter = section.build()
        except ConfigError as exc:
            for problem in exc.problems:
                click.echo(f"error: {problem}", err=True)
            sys.exit(EXIT_USAGE)
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
    for path, number, problem in run.unreadable[:_SHOWN_ERRORS]:
        click.echo(f"{path}:{number}: unreadable: {problem}", err=True)
    if len(run.unreadable) > _SHOWN_ERRORS:
        click.echo(f"... {len(run.unreadable) - _SHOWN_ERRORS} more unreadable lines", err=True)
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


# -- flag store ----------------------------------------------------------------------------


def _store_config(config_path: str) -> StoreConfig:
    loaded = _load(config_path)
    if loaded.store is None:
        _fail(f"{config_path}: no `store:` section; add one, e.g. `store: {{kind: dynamodb, ...}}`")
    assert loaded.store is not None
    return loaded.store


def _open_store(config_path: str) -> CachedStore:
    section = _store_config(config_path)
    try:
        return CachedStore(section.build_backend(), ttl=0)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"error: {problem}", err=True)
        sys.exit(EXIT_USAGE)


@main.group()
def flags() -> None:
    """Read and write the flags of the configured store."""


@flags.command("push")
@click.argument("flag_file", type=click.Path(dir_okay=False, exists=True))
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--replace",
    is_flag=True,
    help="Replace everything (init): flags not in FLAG_FILE are removed. Default: upsert "
    "each flag, leaving other flags alone.",
)
def push(flag_file: str, config_path: str, replace: bool) -> None:
    """Load FLAG_FILE (GO Feature Flag YAML, JSON or TOML) into the configured store.

    Each flag is upserted with a new version when its content changed (its own numeric
    `version` if it has one, else the stored version + 1); unchanged flags are skipped.
    """
    try:
        definitions = load_flag_file(flag_file)
    except FlagFileError as exc:
        _fail(str(exc))
    store = _open_store(config_path)
    try:
        current = store.all(FLAGS)
        raw = store.backend.all_items(FLAGS)  # tombstones included, for their versions
        written = skipped = stale = 0
        items = {}
        for key, definition in definitions.items():
            previous = raw.get(key) or current.get(key)
            version = next_version(definition, previous)
            if version is None:
                skipped += 1
                items[key] = previous
                continue
            item = flag_item(key, definition, version)
            items[key] = item
            if replace or store.upsert(FLAGS, item):
                written += 1
            else:
                stale += 1
                click.echo(
                    f"  {key}: not written, the store holds version "
                    f"{store.backend.get_item(FLAGS, key)['version']}"  # type: ignore[index]
                    f" >= {version} (raise the flag's `version`)",
                    err=True,
                )
        if replace:
            store.init({FLAGS: {k: v for k, v in items.items() if v is not None}})
            removed = len(set(current) - set(definitions))
            click.echo(
                f"{flag_file}: replaced the store's flags: {len(definitions)} flag(s), "
                f"{written} changed, {skipped} unchanged, {removed} removed"
            )
        else:
            click.echo(
                f"{flag_file}: {written} flag(s) written, {skipped} unchanged, "
                f"{stale} not written (older version)"
            )
    except StoreError as exc:
        _fail(str(exc))
    finally:
        store.close()
    if stale:
        sys.exit(EXIT_LOST)


@flags.command("list")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_flags(config_path: str, as_json: bool) -> None:
    """List the flags in the configured store: key, version, trackEvents."""
    store = _open_store(config_path)
    try:
        items = store.all(FLAGS)
    except StoreError as exc:
        _fail(str(exc))
    finally:
        store.close()
    rows = [
        {"key": key, "version": item.get("version"), "trackEvents": tracks_events(item)}
        for key, item in sorted(items.items())
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max([len("KEY"), *(len(str(row["key"])) for row in rows)])
    click.echo(f"{'KEY':<{width}}  VERSION  TRACKEVENTS")
    for row in rows:
        track = "true" if row["trackEvents"] else "false"
        click.echo(f"{row['key']:<{width}}  {row['version']!s:<7}  {track}")


@main.group()
def store() -> None:
    """Manage the configured flag store."""


@store.command("init")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
def store_init(config_path: str) -> None:
    """Create what the store needs (e.g. the DynamoDB table), if the store can."""
    section = _store_config(config_path)
    create = getattr(section.store_class, "create", None)
    if create is None:
        click.echo(f"store {section.kind}: nothing to create")
        return
    try:
        backend = section.build_backend()
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"error: {problem}", err=True)
        sys.exit(EXIT_USAGE)
    try:
        result = backend.create()  # type: ignore[attr-defined]
    except StoreError as exc:
        _fail(str(exc))
    finally:
        backend.close()
    detail = f": {result}" if isinstance(result, str) and result else ""
    click.echo(f"store {section.kind}: created{detail}")


# -- status -----------------------------------------------------------------------------

EXIT_UNREADABLE = 3
STATUS_PATH = "/v1/status"
_MEMORY_REASONS = ("overflow", "rejected", "shutdown")
_SPOOL_REASONS = ("rejected", "spool_full", "damaged")
# A spool read while a relay commits may straddle a commit: read again before judging.
_SPOOL_READS = 3


class _Unreadable(Exception):
    """The relay or the spool directory cannot be read (the message says what to do)."""


def _balanced(row: dict[str, Any]) -> bool:
    """``accepted == delivered + dropped + pending``, no figure negative."""
    try:
        dropped = [int(count) for count in dict(row["dropped"]).values()]
        parts = [int(row["delivered"]), int(row["pending"]), *dropped]
        accepted = int(row["accepted"])
    except (KeyError, TypeError, ValueError):
        return False
    return accepted == sum(parts) and min([accepted, *parts]) >= 0


def _shown_url(url: str) -> str:
    """``url`` without any ``user:password@`` part, for messages."""
    scheme, sep, rest = url.partition("://")
    host, slash, path = rest.partition("/")
    return f"{scheme}{sep}{host.rpartition('@')[2]}{slash}{path}"


def _status_url(url: str) -> str:
    """The ``/v1/status`` URL of the relay at ``url`` (a base URL, with or without the
    path; ``host:port`` means ``http://host:port``)."""
    url = url.strip()
    if "://" not in url:
        url = f"http://{url}"
    scheme = url.partition("://")[0].lower()
    if scheme not in ("http", "https"):
        _fail(f"--url {_shown_url(url)}: use an http:// or https:// URL of the relay")
    url = url.rstrip("/")
    return url if url.endswith(STATUS_PATH) else url + STATUS_PATH


def _fetch_status(url: str, api_key: str | None, timeout: float) -> dict[str, Any]:
    import urllib.error  # noqa: PLC0415 - only `status --url` needs them
    import urllib.request  # noqa: PLC0415

    shown = _shown_url(url)
    headers = {"Accept": "application/json"}
    if api_key:
        headers["X-API-Key"] = api_key
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - scheme checked
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310
            body = answer.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            hint = (
                "the key given was refused; check it"
                if api_key
                else "it needs a key: pass --api-key KEY or set FLAGSINK_API_KEY"
            )
            raise _Unreadable(f"{shown}: 401 (missing or wrong API key): {hint}") from None
        if exc.code == 404:
            raise _Unreadable(
                f"{shown}: 404: not a flagsink relay with {STATUS_PATH} (an older version?); "
                "give the relay's base URL, e.g. --url http://127.0.0.1:1031, or read its "
                "spool with --spool DIR"
            ) from None
        raise _Unreadable(f"{shown}: the relay answered HTTP {exc.code}; see its log") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Unreadable(
            f"cannot reach the relay at {shown} ({reason}): is it running (flagsink serve), "
            "and are the host and port right?"
        ) from None
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict) or not isinstance(document.get("exporters"), list):
        raise _Unreadable(
            f"{shown}: the answer is not a flagsink status document; is this the relay's URL?"
        )
    return document


def _spool_slots(directory: Path) -> list[tuple[str, Path]]:
    """``(label, path)`` of the spools under ``directory``: itself, or the relay's
    per-worker slots ``worker-<i>``."""
    from flagsink.spool import DB_NAME  # noqa: PLC0415 - status only

    if not directory.is_dir():
        raise _Unreadable(
            f"--spool {directory}: no such directory; give the `spool.dir` of the config"
        )
    if (directory / DB_NAME).exists():
        return [("", directory)]
    slots = [p.parent for p in directory.glob(f"worker-*/{DB_NAME}")]
    if not slots:
        raise _Unreadable(
            f"--spool {directory}: no spool here (no {DB_NAME}, no worker-*/{DB_NAME}); "
            "give the `spool.dir` of the config"
        )
    return [(f"{slot.name}/", slot) for slot in sorted(slots, key=_slot_number)]


def _slot_number(path: Path) -> tuple[int, str]:
    suffix = path.name.removeprefix("worker-")
    return (int(suffix), "") if suffix.isdigit() else (1 << 30, path.name)


def _read_spool(directory: Path) -> dict[str, Any]:
    from flagsink.spool import SpoolError, inspect_spool  # noqa: PLC0415 - status only

    rows: list[dict[str, Any]] = []
    letters: list[dict[str, Any]] = []
    for label, path in _spool_slots(directory):
        slot_rows: list[dict[str, Any]] = []
        for _ in range(_SPOOL_READS):
            try:
                consumers = inspect_spool(path)
            except SpoolError as exc:
                raise _Unreadable(f"--spool {directory}: {exc}") from None
            slot_rows = []
            for stats in consumers:
                dropped = dict.fromkeys(_SPOOL_REASONS, 0)
                dropped.update(stats.dropped_by_reason)
                row: dict[str, Any] = {
                    "name": f"{label}{stats.exporter}",
                    "eventType": stats.stream,
                    "accepted": stats.accepted,
                    "delivered": stats.delivered,
                    "dropped": dropped,
                    "pending": stats.pending,
                    "cursor": stats.cursor,
                }
                row["balanced"] = _balanced(row)
                slot_rows.append(row)
            if all(row["balanced"] for row in slot_rows):
                break
        rows += slot_rows
        for file in sorted((path / "deadletter").glob("*.jsonl")):
            with open(file, "rb") as handle:
                count = sum(1 for line in handle if line.strip())
            letters.append({"path": str(file), "letters": count})
    return {
        "source": {"spool": str(directory)},
        "balanced": all(row["balanced"] for row in rows),
        "exporters": rows,
        "deadLetters": letters,
    }


def _from_relay(url: str, api_key: str | None, timeout: float) -> dict[str, Any]:
    document = _fetch_status(url, api_key, timeout)
    rows: list[dict[str, Any]] = []
    for given in document["exporters"]:
        if isinstance(given, dict):
            row = dict(given)
            row["balanced"] = _balanced(row)  # judged here, not taken from the relay
            rows.append(row)
    return {
        **document,
        "source": {"url": _shown_url(url.removesuffix(STATUS_PATH))},
        "balanced": len(rows) == len(document["exporters"])
        and all(row["balanced"] for row in rows),
        "exporters": rows,
    }


def _bytes_text(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"  # pragma: no cover - unreachable


def _dropped_text(dropped: dict[str, Any]) -> str:
    total = sum(int(n) for n in dropped.values())
    detail = ", ".join(f"{reason} {n}" for reason, n in dropped.items() if n)
    return f"{total} ({detail})" if detail else str(total)


def _print_status(report: dict[str, Any]) -> None:
    source = report["source"]
    if "url" in source:
        version = report.get("version")
        click.echo(f"relay {source['url']}" + (f" (flagsink {version})" if version else ""))
    else:
        click.echo(f"spool {source['spool']}")
    headers = ["EXPORTER", "ACCEPTED", "DELIVERED", "DROPPED", "PENDING", "BALANCED"]
    table = [headers]
    for row in report["exporters"]:
        table.append(
            [
                str(row.get("name", "?")),
                str(row.get("accepted", "?")),
                str(row.get("delivered", "?")),
                _dropped_text(dict(row.get("dropped") or {})),
                str(row.get("pending", "?")),
                "yes" if row["balanced"] else "NO",
            ]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    for line in table:
        cells = [
            cell.ljust(width) if i in (0, 3, 5) else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        click.echo("  ".join(cells).rstrip())
    spool = report.get("spool")
    if isinstance(spool, dict):
        click.echo(
            f"spool {spool.get('directory')}: {_bytes_text(int(spool.get('bytes', 0)))} of "
            f"{_bytes_text(int(spool.get('maxBytes', 0)))} (whenFull {spool.get('whenFull')}"
            f"{', full' if spool.get('full') else ''}), {spool.get('waiting')} waiting for "
            f"a commit, {spool.get('refused')} refused, {spool.get('damaged')} damaged"
        )
    relay = report.get("relay")
    if isinstance(relay, dict):
        rejected = dict(relay.get("rejected") or {})
        click.echo(
            f"relay: {relay.get('received')} received, {relay.get('accepted')} accepted, "
            f"{relay.get('filtered')} filtered, {_dropped_text(rejected)} rejected, "
            f"{relay.get('inProgress')} in progress"
        )
    for file in report.get("deadLetters", []):
        click.echo(
            f"dead letters: {file['letters']} in {file['path']} "
            "(flagsink replay sends them again once the cause is fixed)"
        )


def _verdict(report: dict[str, Any], drained: bool) -> int:
    rows = report["exporters"]
    broken = [row for row in rows if not row["balanced"]]
    pending = sum(int(row.get("pending", 0)) for row in rows if row["balanced"])
    if broken:
        for row in broken:
            click.echo(
                f"accepted = delivered + dropped + pending does NOT hold for "
                f"{row.get('name')}: accepted {row.get('accepted')}, delivered "
                f"{row.get('delivered')}, dropped {_dropped_text(dict(row.get('dropped') or {}))}"
                f", pending {row.get('pending')}; please report it with this output",
                err=True,
            )
        return EXIT_LOST
    if not rows:
        click.echo("no exporters")
        return 0
    click.echo(
        f"accepted = delivered + dropped + pending holds for every exporter "
        f"({pending} events pending)"
    )
    if drained and pending:
        click.echo(f"--drained: {pending} events are not delivered yet", err=True)
        return EXIT_LOST
    return 0


@main.command()
@click.option(
    "--url", help="Base URL of a running relay, e.g. http://127.0.0.1:1031 (reads /v1/status)."
)
@click.option(
    "--api-key",
    envvar="FLAGSINK_API_KEY",
    show_envvar=True,
    help="The relay's API key, when it has keys (sent as X-API-Key; never printed).",
)
@click.option(
    "--spool",
    "spool_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="A spool directory (the config's spool.dir): read-only, safe while a relay runs.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--drained", is_flag=True, help="Also exit 1 while events are pending (not delivered)."
)
@click.option(
    "--timeout", default=10.0, show_default=True, help="Seconds to wait for the relay's answer."
)
def status(  # noqa: PLR0917 - click passes every option by keyword
    url: str | None,
    api_key: str | None,
    spool_dir: Path | None,
    as_json: bool,
    drained: bool,
    timeout: float,
) -> None:
    """Each exporter's accounting: accepted = delivered + dropped + pending.

    Reads a running relay (--url) or a spool directory (--spool). Exit code 0 when the
    identity holds for every exporter, 1 when it does not (or, with --drained, when events
    are pending), 2 for a usage error, 3 when the relay or directory cannot be read.
    """
    if (url is None) == (spool_dir is None):
        _fail("give either --url URL (a running relay) or --spool DIR (a spool directory)")
    try:
        if url is not None:
            report = _from_relay(_status_url(url), api_key, timeout)
        else:
            assert spool_dir is not None
            report = _read_spool(spool_dir.expanduser())
    except _Unreadable as exc:
        click.echo(f"flagsink: {exc}", err=True)
        sys.exit(EXIT_UNREADABLE)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        code = EXIT_LOST if not report["balanced"] else 0
        if not code and drained and any(int(r.get("pending", 0)) for r in report["exporters"]):
            code = EXIT_LOST
    else:
        _print_status(report)
        code = _verdict(report, drained)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
