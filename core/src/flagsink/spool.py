"""A crash-safe disk spool: events are durable before they are acknowledged.

One SQLite database per spool directory (WAL journal, ``synchronous=FULL``), one row per
event with a CRC32 of its bytes, one table per event type. A single writer thread owns
every write and group-commits: it wakes every ``commitInterval`` milliseconds, inserts
what ``append`` queued since, applies the exporters' confirmations and commits once, so
one fsync covers everything. ``append`` only appends to a deque.

Each exporter is a :class:`SpoolConsumer` with its own cursor (all events up to it are
handled), its counters and the batch it is sending, so exporters advance independently,
a restart resumes each where it stopped, and a batch interrupted by a crash is formed
again identically (deterministic object names). Rows every exporter has handled are
deleted as cursors move.

Per exporter, at every commit: ``accepted = delivered + dropped (by reason) + pending``,
where pending is the events after its cursor. Damage found on start (a database SQLite
cannot read) or on read (a CRC mismatch, a missing row) is counted exactly from the
sequence numbers, the damaged bytes are moved to ``damaged/``, and the spool goes on.

This module holds :class:`Spool` (the writer: group commits, caps, damage found on open).
The rest: :mod:`flagsink.spool_settings` (the ``spool:`` section, the error, the figures),
:mod:`flagsink.spool_consumer` (an exporter's reader), :mod:`flagsink.spool_schema` (the
files and tables), :mod:`flagsink.spool_ranges`, :mod:`flagsink.spool_recovery` (salvage
of a damaged database) and :mod:`flagsink.spool_inspect` (counters read from outside).
Import the public names from here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
import weakref
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from flagsink import faultpoints
from flagsink.event import Event
from flagsink.spool_consumer import Confirmation, SpoolConsumer
from flagsink.spool_inspect import inspect_spool, rows_pending
from flagsink.spool_ranges import SequenceRanges
from flagsink.spool_recovery import salvage_database
from flagsink.spool_schema import (
    DAMAGED_DIR,
    DB_NAME,
    LOCK_NAME,
    MARKS_NAME,
    SCHEMA_VERSION,
    STREAM_OF,
    STREAMS,
    connect,
    create_schema,
    read_marks,
    try_rows,
)
from flagsink.spool_settings import ConsumerStats, SpoolError, SpoolSettings, SpoolStats

__all__ = [
    "DAMAGED_DIR",
    "DB_NAME",
    "LOCK_NAME",
    "MARKS_NAME",
    "STREAMS",
    "ConsumerStats",
    "Spool",
    "SpoolConsumer",
    "SpoolError",
    "SpoolSettings",
    "SpoolStats",
    "inspect_spool",
]

logger = logging.getLogger("flagsink.spool")

# Events inserted per transaction at most, so one commit never stalls the writer long.
_MAX_PER_COMMIT = 50_000
# Bytes counted per row beyond its payload (rowid, CRC, record header, b-tree cell).
_ROW_OVERHEAD = 16
_SPACE_CHECK_INTERVAL = 0.5


class _Submission:
    """Events handed in by a caller that wants to know when they are durable."""

    __slots__ = ("callback", "events")

    def __init__(self, events: Sequence[Event], callback: Callable[[bool], None]) -> None:
        self.events = events
        self.callback = callback


@dataclass
class _Refused:
    """Events of ``stream`` refused before they were committed (counted as dropped)."""

    stream: str
    count: int


@dataclass
class _Answer:
    """A relay answer to keep for ``Idempotency-Key`` retries after a restart."""

    scope: str
    fingerprint: bytes
    expires: float
    status: int
    body: bytes


@dataclass
class _Intent:
    """A batch a consumer is about to send, recorded so that a crash forms it again."""

    consumer: str
    first: int
    last: int
    created: float
    done: threading.Event


class Spool:
    """A spool directory opened by this process (a lock file keeps others out).

    :param directory: created if missing.
    :param settings: caps and timing (see :class:`SpoolSettings`).

    Call :meth:`consumer` for every exporter, then :meth:`start`; :meth:`append` and
    :meth:`submit` hand events in; :meth:`close` commits what is waiting and closes.
    """

    def __init__(self, settings: SpoolSettings) -> None:
        self.settings = settings
        self.directory = Path(settings.dir).expanduser()
        self.db_path = self.directory / DB_NAME
        self._commit_interval = settings.commit_interval / 1000.0
        self._waiting: deque[Event | _Submission] = deque()
        self._control: deque[Confirmation | _Intent | _Refused | _Answer] = deque()
        self._consumers: dict[str, SpoolConsumer] = {}
        self._by_stream: dict[str, list[SpoolConsumer]] = {s: [] for s in STREAMS}
        self._tails: dict[str, int] = dict.fromkeys(STREAMS, 0)
        self._commits = 0
        self._refused = 0
        self._damaged = 0
        self._damage_seen: dict[str, set[int]] = {s: set() for s in STREAMS}
        # Sequence ranges found damaged on open and counted then (table `damaged` and
        # the marks): readers skip them without counting them again.
        self._known_damage: dict[str, SequenceRanges] = {s: SequenceRanges([]) for s in STREAMS}
        self._bytes_used = 0
        self._blocked_since: float | None = None
        self._last_write_error = 0.0
        self._full = False
        self._stop = threading.Event()
        self._closed = False
        self._started = False
        self._pid = os.getpid()
        self._lock = threading.Lock()  # guards counters read by stats()
        self._encode = msgspec.msgpack.Encoder().encode
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.directory / LOCK_NAME, "a+b")  # noqa: SIM115
        except OSError as exc:
            raise SpoolError(f"spool.dir {self.directory}: cannot create or open: {exc}") from None
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise SpoolError(
                f"spool.dir {self.directory}: in use by another process; give each "
                "process (and each relay worker) its own spool directory"
            ) from None
        try:
            self._db = self._open()
            self._load()
        except Exception:
            self._lock_file.close()
            raise
        _live.add(self)

    def _forked(self) -> None:
        self._refused = 0
        self._closed = True
        self._started = False

        def refuse(event: object) -> None:
            # Counted in stats().refused (this process's own figure).
            self._refused += 1
            if self._refused == 1:
                logger.error(
                    "spool %s: events added in a process forked after the spool was "
                    "opened are refused (counted); open the pipeline after forking",
                    self.directory,
                )

        def refuse_many(events: Iterable[object]) -> None:
            for event in events:
                refuse(event)

        self.append = refuse  # type: ignore[method-assign]
        self.append_many = refuse_many  # type: ignore[method-assign]

    # -- opening and recovery -------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        try:
            db = connect(self.db_path)
            create_schema(db)
            problem = db.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            problem = str(exc)
            with contextlib.suppress(Exception):
                db.close()
        else:
            if problem == "ok":
                return db
            db.close()
        return salvage_database(self.directory, problem)

    def _write_marks(self) -> None:
        """Rewrite the marks file (atomically by rename; not synced: it only matters when
        the database itself is damaged, not after a crash)."""
        counters: dict[str, dict[str, int]] = {}
        for consumer in self._consumers.values():
            values = {"accepted": consumer.accepted, "delivered": consumer.delivered}
            values.update({f"dropped:{k}": v for k, v in consumer.dropped.items()})
            counters[consumer.name] = values
        damaged = {
            stream: ranges.above(min((c.position for c in self._by_stream[stream]), default=0))
            for stream, ranges in self._known_damage.items()
        }
        marks = {
            "id": self.id,
            "damaged": damaged,
            "tails": self._tails,
            "cursors": {c.name: [c.stream, c.position] for c in self._consumers.values()},
            "counters": counters,
        }
        path = self.directory / MARKS_NAME
        temporary = path.with_suffix(".tmp")
        try:
            temporary.write_text(json.dumps(marks), encoding="utf-8")
            os.replace(temporary, path)
        except OSError as exc:  # pragma: no cover - the database stays the reference
            logger.warning("spool %s: cannot write %s: %s", self.directory, path, exc)

    def _load(self) -> None:
        db = self._db
        row = db.execute("SELECT value FROM meta WHERE key = 'id'").fetchone()
        if row is None:
            self.id = secrets.token_hex(8)
            db.execute("INSERT INTO meta VALUES ('id', ?)", (self.id,))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (SCHEMA_VERSION,))
        else:
            self.id = str(row[0])
        marks = read_marks(self.directory) or {}
        marked_tails = {str(k): int(v) for k, v in dict(marks.get("tails", {})).items()}
        for stream, last in db.execute("SELECT stream, last FROM tails"):
            if stream in self._tails:
                self._tails[stream] = self._plausible_tail(stream, int(last), marked_tails)
        spans: dict[str, list[tuple[int, int]]] = {s: [] for s in STREAMS}
        for stream, first, last in try_rows(db, "SELECT stream, first, last FROM damaged"):
            if stream in spans:
                spans[stream].append((int(first), int(last)))
        for stream, marked in dict(marks.get("damaged", {})).items():
            if stream in spans:
                spans[stream].extend((int(a), int(b)) for a, b in marked)
        for stream in STREAMS:
            self._known_damage[stream] = SequenceRanges.merge(spans[stream])
            self._verify(db, stream)
        self._measure()

    def _plausible_tail(self, stream: str, stored: int, marked: dict[str, int]) -> int:
        """The recorded tail, unless damage made it larger than the marks allow (the
        marks lag by one commit at most, never by more than a commit's events)."""
        copy = marked.get(stream)
        if copy is not None and stored > copy + _MAX_PER_COMMIT:
            logger.error(
                "spool %s: the recorded %s tail (%d) is damaged; using the marks' (%d)",
                self.directory,
                stream,
                stored,
                copy,
            )
            return copy
        return stored

    def _verify(self, db: sqlite3.Connection, stream: str) -> None:
        """Check every undelivered row of ``stream``: rows whose bytes do not match their
        CRC, and rows missing below the recorded tail, are damaged. Each is counted once
        as dropped (reason ``damaged``) for every exporter that had not handled it, its
        sequence range recorded (readers skip it), its bytes kept under ``damaged/``."""
        cursors = db.execute(
            "SELECT exporter, position FROM cursors WHERE stream = ?", (stream,)
        ).fetchall()
        tail = self._tails[stream]
        low = min((int(position) for _, position in cursors), default=tail)
        bad: list[tuple[int, bytes]] = []
        gaps: list[tuple[int, int]] = []
        expected = low + 1
        last = low
        for seq, crc, data in db.execute(
            f"SELECT seq, crc, data FROM {stream} WHERE seq > ? ORDER BY seq", (low,)
        ):
            if seq > expected:
                gaps.append((expected, seq - 1))
            expected = seq + 1
            last = seq
            if not isinstance(data, bytes) or zlib.crc32(data) != crc:
                bad.append((seq, bytes(data) if isinstance(data, bytes | memoryview) else b""))
        if last > tail:  # rows past a tail lost with a damaged tails table
            tail = self._tails[stream] = last
            db.execute("UPDATE tails SET last = ? WHERE stream = ?", (tail, stream))
        if tail >= expected:
            gaps.append((expected, tail))
        known = self._known_damage[stream]
        new_spans = [piece for a, b in gaps for piece in known.subtract(a, b)]
        new_spans += [(seq, seq) for seq, _ in bad if not known.contains(seq)]
        new = SequenceRanges.merge(new_spans)
        if not bad and not new.spans:
            return
        db.execute("BEGIN IMMEDIATE")
        db.executemany(f"DELETE FROM {stream} WHERE seq = ?", ((seq,) for seq, _ in bad))
        db.executemany(
            "INSERT INTO damaged VALUES (?, ?, ?)", ((stream, a, b) for a, b in new.spans)
        )
        for name, position in cursors:
            lost = new.count_above(int(position))
            if lost:
                db.execute(
                    "INSERT INTO counters VALUES (?, 'dropped:damaged', ?) ON CONFLICT "
                    "(exporter, name) DO UPDATE SET value = value + excluded.value",
                    (name, lost),
                )
        db.execute("COMMIT")
        self._known_damage[stream] = SequenceRanges.merge(known.spans + new.spans)
        self._damaged += new.total
        kept = self._keep_damaged(stream, "open", bad)
        logger.error(
            "spool %s: %d undelivered %s events were damaged (%d unreadable, %d missing) "
            "and are counted as dropped, reason damaged%s",
            self.directory,
            new.total,
            stream,
            len(bad),
            new.total - len(bad),
            kept,
        )

    def _keep_damaged(self, stream: str, label: str, bad: list[tuple[int, bytes]]) -> str:
        """Append the bytes of damaged rows to a file under ``damaged/``; its description."""
        if not bad:
            return ""
        folder = self.directory / DAMAGED_DIR
        try:
            folder.mkdir(exist_ok=True)
            path = folder / f"{stream}-{label}-{bad[0][0]}-{bad[-1][0]}.bin"
            with open(path, "ab") as out:
                for seq, data in bad:
                    out.write(f"{seq} {len(data)}\n".encode())
                    out.write(data + b"\n")
        except OSError as exc:
            return f"; cannot keep their bytes in {folder}: {exc}"
        return f"; their bytes are in {path}"

    # -- consumers ------------------------------------------------------------------------

    def consumer(self, name: str, stream: str = "feature") -> SpoolConsumer:
        """The consumer for exporter ``name``, resuming where it stopped (new exporters
        start at the current end: they get events from now on)."""
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, not {stream!r}")
        if name in self._consumers:
            raise SpoolError(f"spool {self.directory}: two exporters are named {name!r}")
        if self._started:
            raise SpoolError("consumers must be added before the spool starts")
        db = self._db
        row = db.execute(
            "SELECT stream, position, batch_first, batch_last, batch_created FROM cursors "
            "WHERE exporter = ?",
            (name,),
        ).fetchone()
        if row is None or row[0] != stream:
            if row is not None:
                logger.warning(
                    "spool %s: exporter %r now takes %s events, not %s: it starts afresh",
                    self.directory,
                    name,
                    stream,
                    row[0],
                )
                db.execute("DELETE FROM counters WHERE exporter = ?", (name,))
            position = self._tails[stream]
            db.execute(
                "INSERT OR REPLACE INTO cursors VALUES (?, ?, ?, NULL, NULL, NULL)",
                (name, stream, position),
            )
            consumer = SpoolConsumer(self, name, stream, position)
        else:
            consumer = SpoolConsumer(self, name, stream, int(row[1]))
            if row[2] is not None and row[3] is not None and int(row[3]) > consumer.position:
                consumer.intent = (int(row[2]), int(row[3]), float(row[4] or time.time()))
        counts = dict(
            db.execute("SELECT name, value FROM counters WHERE exporter = ?", (name,)).fetchall()
        )
        consumer.accepted = int(counts.pop("accepted", 0))
        consumer.delivered = int(counts.pop("delivered", 0))
        for key, value in counts.items():
            if key.startswith("dropped:"):
                consumer.dropped[key[len("dropped:") :]] = int(value)
        # The counters and the rows must agree; they can only differ when a damaged
        # database lost the counters: then the rows decide.
        known_damage = self._known_damage[stream].count_above(consumer.position)
        pending = self._tails[stream] - consumer.position - known_damage
        known = consumer.accepted - consumer.delivered - sum(consumer.dropped.values())
        if known != pending:
            logger.warning(
                "spool %s: exporter %s: counters say %d events pending, the spool holds %d; "
                "using the spool's figure",
                self.directory,
                name,
                known,
                pending,
            )
            consumer.accepted += pending - known
        self._consumers[name] = consumer
        self._by_stream[stream].append(consumer)
        return consumer

    def start(self) -> None:
        """Forget exporters no longer configured, then start the writer thread."""
        if self._started:
            return
        db = self._db
        for name, stream, position in db.execute(
            "SELECT exporter, stream, position FROM cursors"
        ).fetchall():
            if name not in self._consumers:
                left = 0
                if stream in self._tails:
                    left = rows_pending(db, str(stream), self._tails[stream], int(position))
                logger.warning(
                    "spool %s: exporter %r is no longer configured; its %d undelivered "
                    "events are abandoned (run `flagsink status --spool %s --drained` before "
                    "removing or renaming an exporter)",
                    self.directory,
                    name,
                    left,
                    self.directory,
                )
                db.execute("DELETE FROM cursors WHERE exporter = ?", (name,))
                db.execute("DELETE FROM counters WHERE exporter = ?", (name,))
        self._compact(db)
        for consumer in self._consumers.values():
            pending = consumer.pending
            if pending:
                logger.info(
                    "spool %s: exporter %s resumes with %d undelivered events",
                    self.directory,
                    consumer.name,
                    pending,
                )
        self._write_marks()
        self._started = True
        self._writer = threading.Thread(target=self._run, name="flagsink-spool", daemon=True)
        self._writer.start()

    # -- application side -----------------------------------------------------------------

    def append(self, event: Event) -> None:
        """Queue ``event`` for the next group commit. O(1), never blocks or raises."""
        self._waiting.append(event)

    def append_many(self, events: Iterable[Event]) -> None:
        """Queue several events for the next group commit."""
        self._waiting.extend(events)

    def submit(self, events: Sequence[Event], callback: Callable[[bool], None]) -> None:
        """Queue ``events``; ``callback(True)`` runs on the writer thread once they are
        durable, ``callback(False)`` if they were refused (spool full past the block
        timeout, or closed)."""
        if self._closed:
            callback(False)
            return
        self._waiting.append(_Submission(events, callback))

    @property
    def has_room(self) -> bool:
        """False while the spool is full under the ``block`` policy (new events wait)."""
        return not self._full

    @property
    def waiting(self) -> int:
        """Items handed in and not yet committed."""
        return len(self._waiting)

    @property
    def writing(self) -> bool:
        """True while the writer thread commits."""
        return self._started and self._writer.is_alive()

    def tail(self, stream: str) -> int:
        """Sequence number of the last committed event of ``stream``."""
        return self._tails[stream]

    # -- writer ---------------------------------------------------------------------------

    def _run(self) -> None:
        db = self._db
        rounds_after_stop = 0
        try:
            while True:
                stopping = self._stop.wait(self._commit_interval)
                more = self._commit_once(db)
                while more and not self._full:
                    more = self._commit_once(db)
                if not stopping:
                    continue
                rounds_after_stop += 1
                if not self._waiting and not self._control:
                    break
                if rounds_after_stop > 3:
                    # Closing while full or unable to write: refuse (and count) the rest.
                    self._refuse_waiting(len(self._waiting), "the spool closed first")
                    with contextlib.suppress(sqlite3.Error):
                        self._apply_control_only(db)
                    break
        except Exception:  # pragma: no cover - the writer must never die silently
            logger.exception("spool %s: writer failed", self.directory)
            self._refuse_waiting(len(self._waiting), "writer failed")

    def _commit_once(self, db: sqlite3.Connection) -> bool:
        """One group commit; True when more events are waiting."""
        if self._full and not self._room_after_compaction(db):
            self._enforce_memory_cap()
            self._apply_control_only(db)
            return False
        items, events, submissions = self._take()
        control: list[Confirmation | _Intent | _Refused | _Answer] = []
        while self._control:
            control.append(self._control.popleft())
        if not events and not control and not submissions:
            return False
        rows, tails, size = self._encode_rows(events)
        full = size and self._bytes_used + size > self.settings.max_bytes
        if full and not self._make_room(db, size, items, control):
            return False
        try:
            self._write(db, rows, tails, control)
        except sqlite3.Error as exc:
            # Disk full, I/O error...: keep everything in memory and try again.
            for item in reversed(control):
                self._control.appendleft(item)
            self._waiting.extendleft(reversed(items))
            self._write_failed(exc)
            return False
        self._commits += 1
        self._bytes_used += size
        with self._lock:  # stats() reads the counters under it: one moment
            for stream, stream_rows in rows.items():
                if stream_rows:
                    for consumer in self._by_stream[stream]:
                        consumer.accepted += len(stream_rows)
        self._tails = tails
        self._write_marks()
        self._after_commit(db, rows, control, submissions)
        return bool(self._waiting)

    def _take(self) -> tuple[list[Event | _Submission], list[Event], list[_Submission]]:
        waiting = self._waiting
        items: list[Event | _Submission] = []
        events: list[Event] = []
        submissions: list[_Submission] = []
        while waiting and len(events) < _MAX_PER_COMMIT:
            item = waiting.popleft()
            items.append(item)
            if type(item) is _Submission:
                submissions.append(item)
                events.extend(item.events)
            else:
                events.append(item)  # type: ignore[arg-type]
        return items, events, submissions

    def _encode_rows(
        self, events: list[Event]
    ) -> tuple[dict[str, list[tuple[int, int, bytes]]], dict[str, int], int]:
        rows: dict[str, list[tuple[int, int, bytes]]] = {s: [] for s in STREAMS}
        tails = dict(self._tails)
        size = 0
        encode = self._encode
        for event in events:
            stream = STREAM_OF.get(type(event))
            if stream is None:
                continue
            data = encode(event)
            size += len(data) + _ROW_OVERHEAD
            tails[stream] += 1
            rows[stream].append((tails[stream], zlib.crc32(data), data))
        return rows, tails, size

    def _write(
        self,
        db: sqlite3.Connection,
        rows: dict[str, list[tuple[int, int, bytes]]],
        tails: dict[str, int],
        control: list[Confirmation | _Intent | _Refused | _Answer],
    ) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            for stream, stream_rows in rows.items():
                if stream_rows:
                    db.executemany(f"INSERT INTO {stream} VALUES (?, ?, ?)", stream_rows)
                    db.execute(
                        "UPDATE tails SET last = ? WHERE stream = ?", (tails[stream], stream)
                    )
                    self._count(db, self._by_stream[stream], "accepted", len(stream_rows))
            self._apply(db, control)
            faultpoints.hit("spool.after_append_before_fsync")
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def _write_failed(self, exc: sqlite3.Error) -> None:
        now = time.monotonic()
        if now - self._last_write_error >= 10.0:
            self._last_write_error = now
            logger.error(
                "spool %s: cannot write (%s); %d events wait in memory and are retried",
                self.directory,
                exc,
                len(self._waiting),
            )
        self._enforce_memory_cap()
        self._stop.wait(min(1.0, self._commit_interval * 10))

    def _after_commit(
        self,
        db: sqlite3.Connection,
        rows: dict[str, list[tuple[int, int, bytes]]],
        control: list[Confirmation | _Intent | _Refused | _Answer],
        submissions: list[_Submission],
    ) -> None:
        for item in control:
            if isinstance(item, Confirmation | _Intent):
                item.done.set()
        for submission in submissions:
            _call(submission.callback, True)
        for stream, stream_rows in rows.items():
            if stream_rows:
                for consumer in self._by_stream[stream]:
                    if consumer.unread >= consumer.wake_at:
                        consumer.wake.set()
        if any(isinstance(item, Confirmation) for item in control):
            self._maybe_compact(db)

    def _apply_control_only(self, db: sqlite3.Connection) -> None:
        control: list[Confirmation | _Intent | _Refused | _Answer] = []
        while self._control:
            control.append(self._control.popleft())
        if not control:
            return
        db.execute("BEGIN IMMEDIATE")
        self._apply(db, control)
        db.execute("COMMIT")
        for item in control:
            if isinstance(item, Confirmation | _Intent):
                item.done.set()
        self._maybe_compact(db)

    def _apply(
        self, db: sqlite3.Connection, control: list[Confirmation | _Intent | _Refused | _Answer]
    ) -> None:
        for item in control:
            if isinstance(item, _Answer):
                db.execute(
                    "INSERT OR REPLACE INTO idempotency VALUES (?, ?, ?, ?, ?)",
                    (item.scope, item.fingerprint, item.expires, item.status, item.body),
                )
                continue
            if isinstance(item, _Refused):
                consumers = self._by_stream[item.stream]
                self._count(db, consumers, "accepted", item.count)
                self._count(db, consumers, "dropped:spool_full", item.count)
                continue
            if isinstance(item, _Intent):
                db.execute(
                    "UPDATE cursors SET batch_first = ?, batch_last = ?, batch_created = ? "
                    "WHERE exporter = ?",
                    (item.first, item.last, item.created, item.consumer),
                )
                continue
            db.execute(
                "UPDATE cursors SET position = max(position, ?), batch_first = NULL, "
                "batch_last = NULL, batch_created = NULL WHERE exporter = ?",
                (item.last, item.consumer),
            )
            consumer = self._consumers[item.consumer]
            if item.delivered:
                self._count(db, [consumer], "delivered", item.delivered)
            for reason, count in item.dropped.items():
                self._count(db, [consumer], f"dropped:{reason}", count)

    @staticmethod
    def _count(db: sqlite3.Connection, consumers: list[SpoolConsumer], name: str, n: int) -> None:
        db.executemany(
            "INSERT INTO counters VALUES (?, ?, ?) ON CONFLICT (exporter, name) "
            "DO UPDATE SET value = value + excluded.value",
            [(c.name, name, n) for c in consumers],
        )

    # -- space ----------------------------------------------------------------------------

    def _measure(self) -> None:
        db = self._db
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        self._bytes_used = (pages - free) * page_size
        self._measured_at = time.monotonic()

    def _maybe_compact(self, db: sqlite3.Connection) -> None:
        self._compact(db)
        if time.monotonic() - self._measured_at >= _SPACE_CHECK_INTERVAL:
            self._measure()

    def _compact(self, db: sqlite3.Connection) -> None:
        """Delete rows every consumer of their stream has handled."""
        for stream in STREAMS:
            consumers = self._by_stream[stream]
            low = min((c.position for c in consumers), default=self._tails[stream])
            db.execute("BEGIN IMMEDIATE")
            db.execute(f"DELETE FROM {stream} WHERE seq <= ?", (low,))
            if self._known_damage[stream].spans:
                db.execute("DELETE FROM damaged WHERE stream = ? AND last <= ?", (stream, low))
                self._known_damage[stream] = SequenceRanges(self._known_damage[stream].above(low))
            if stream == STREAMS[0]:
                db.execute("DELETE FROM idempotency WHERE expires < ?", (time.time(),))
            faultpoints.hit("spool.during_compaction")
            db.execute("COMMIT")

    def _room_after_compaction(self, db: sqlite3.Connection) -> bool:
        self._apply_control_only(db)
        self._measure()
        if self._bytes_used < self.settings.max_bytes * 0.95:
            self._full = False
            self._blocked_since = None
            return True
        if (
            self._blocked_since is not None
            and time.monotonic() - self._blocked_since >= self.settings.block_timeout / 1000
        ):
            # Blocked past the deadline: refuse what waits, keep blocking new ones.
            self._refuse_waiting(len(self._waiting), "spool full past blockTimeout")
            self._blocked_since = time.monotonic()
        return False

    def _make_room(
        self,
        db: sqlite3.Connection,
        size: int,
        items: list[Event | _Submission],
        control: list[Confirmation | _Intent | _Refused | _Answer],
    ) -> bool:
        """The spool is full: apply the policy. True when the commit may go on."""
        self._measure()
        if self._bytes_used + size <= self.settings.max_bytes:
            return True
        if self.settings.when_full == "dropOldest":
            self._drop_oldest(db, self._bytes_used + size - self.settings.max_bytes)
            return True
        # block: hold the events (back in front of the queue) until there is room.
        for item in reversed(control):
            self._control.appendleft(item)
        self._waiting.extendleft(reversed(items))
        if not self._full:
            self._full = True
            self._blocked_since = time.monotonic()
            logger.warning(
                "spool %s: full (%d of %d bytes): new events wait in memory for up to "
                "%d ms; the exporters are failing or slower than the event rate",
                self.directory,
                self._bytes_used,
                self.settings.max_bytes,
                self.settings.block_timeout,
            )
        return False

    def _drop_oldest(self, db: sqlite3.Connection, need: int) -> None:
        """Delete the oldest undelivered rows worth ``need`` bytes, counted per exporter."""
        db.execute("BEGIN IMMEDIATE")
        freed = 0
        dropped: Counter[str] = Counter()
        # Consumers confirm under the lock: their cursors cannot move meanwhile.
        with self._lock:
            for stream in STREAMS:
                consumers = self._by_stream[stream]
                low = min((c.position for c in consumers), default=self._tails[stream])
                upto = low
                for seq, length in db.execute(
                    f"SELECT seq, length(data) FROM {stream} WHERE seq > ? ORDER BY seq",
                    (low,),
                ):
                    if freed >= need:
                        break
                    freed += length + _ROW_OVERHEAD
                    upto = seq
                if upto > low:
                    db.execute(f"DELETE FROM {stream} WHERE seq <= ?", (upto,))
                    for consumer in consumers:
                        if consumer.position < upto:
                            lost = upto - consumer.position
                            # Rows of the batch being sent: counted here, not at its confirm.
                            sending = min(upto, consumer.read_position) - consumer.position
                            consumer.settled_ahead += max(sending, 0)
                            dropped[consumer.name] += lost
                            self._count(db, [consumer], "dropped:spool_full", lost)
                            db.execute(
                                "UPDATE cursors SET position = ? WHERE exporter = ?",
                                (upto, consumer.name),
                            )
                            consumer.position = upto
                            consumer.read_position = max(consumer.read_position, upto)
                            consumer.dropped["spool_full"] += lost
                if freed >= need:
                    break
        db.execute("COMMIT")
        self._bytes_used -= freed
        if dropped:
            logger.warning(
                "spool %s: full (maxBytes %d): dropped the oldest undelivered events: %s",
                self.directory,
                self.settings.max_bytes,
                ", ".join(f"{name} {count}" for name, count in sorted(dropped.items())),
            )

    def _enforce_memory_cap(self) -> None:
        excess = len(self._waiting) - self.settings.max_pending_in_memory
        if excess > 0:
            self._refuse_waiting(excess, "too many events waiting in memory")

    def _refuse_waiting(self, count: int, why: str) -> None:
        """Refuse the ``count`` oldest waiting items: events handed to :meth:`submit` go
        back to their caller (told by its callback; the relay answers 503 and the client
        keeps them); events from :meth:`append` are dropped, counted per exporter."""
        refused: Counter[str] = Counter()
        total = returned = 0
        waiting = self._waiting
        for _ in range(count):
            try:
                item = waiting.popleft()
            except IndexError:
                break
            if type(item) is _Submission:
                _call(item.callback, False)
                returned += len(item.events)
                continue
            stream = STREAM_OF.get(type(item))
            if stream is not None:
                refused[stream] += 1
                total += 1
        if returned:
            logger.warning(
                "spool %s: %d events not taken (%s); their senders were told to retry",
                self.directory,
                returned,
                why,
            )
        if not total:
            return
        with self._lock:
            self._refused += total
            for stream, count_ in refused.items():
                for consumer in self._by_stream[stream]:
                    consumer.accepted += count_
                    consumer.dropped["spool_full"] += count_
                # Made durable at the next commit (accepted and dropped together).
                self._control.append(_Refused(stream, count_))
        logger.error("spool %s: refused %d events: %s", self.directory, total, why)

    # -- relay answers ---------------------------------------------------------------------

    def remember_answer(
        self, scope: str, fingerprint: bytes, status: int, body: bytes, ttl: float
    ) -> None:
        """Keep a relay answer (``Idempotency-Key``) for ``ttl`` seconds, across restarts;
        durable at the next group commit."""
        self._control.append(_Answer(scope, fingerprint, time.time() + ttl, status, body))

    def answers(self) -> list[tuple[str, bytes, int, bytes, float]]:
        """Answers kept and not expired: ``(scope, fingerprint, status, body, seconds
        left)``. Read once at start, before the writer runs."""
        now = time.time()
        rows = try_rows(
            self._db,
            "SELECT scope, fingerprint, status, body, expires FROM idempotency ORDER BY expires",
        )
        return [
            (str(scope), bytes(fp), int(status), bytes(body), float(expires) - now)
            for scope, fp, status, body, expires in rows
            if float(expires) > now
        ]

    # -- used by consumers ----------------------------------------------------------------

    def _confirm(self, item: Confirmation) -> None:
        self._control.append(item)

    def _record_intent(
        self, name: str, first: int, last: int, created: float, timeout: float
    ) -> bool:
        done = threading.Event()
        self._control.append(_Intent(name, first, last, created, done))
        return self.writing and done.wait(timeout)

    def _report_damage(  # noqa: PLR0917 - private, one caller
        self,
        consumer: str,
        stream: str,
        first: int,
        last: int,
        damaged: int,
        bad: list[tuple[int, bytes]],
    ) -> None:
        with self._lock:
            # Several exporters of a stream meet the same damage: count each event once.
            seen = self._damage_seen[stream]
            new = [seq for seq, _ in bad if seq not in seen]
            seen.update(new)
            self._damaged += damaged - (len(bad) - len(new))
        moved = self._keep_damaged(stream, consumer, [(q, d) for q, d in bad if q in new])
        logger.error(
            "spool %s: exporter %s: %d damaged events between sequence %d and %d skipped "
            "(counted as dropped, reason damaged)%s",
            self.directory,
            consumer,
            damaged,
            first,
            last,
            moved,
        )

    # -- status and closing ---------------------------------------------------------------

    def stats(self) -> SpoolStats:
        """The spool's figures and each exporter's counters."""
        return SpoolStats(
            directory=str(self.directory),
            bytes_used=self._bytes_used,
            max_bytes=self.settings.max_bytes,
            waiting=len(self._waiting),
            committed=dict(self._tails),
            commits=self._commits,
            refused=self._refused,
            damaged=self._damaged,
            consumers=[c.stats() for c in self._consumers.values()],
        )

    def sync(self, timeout: float | None = None) -> bool:
        """Wait until everything appended so far is committed (or ``timeout`` seconds);
        True when it is."""
        if not self.writing:
            return not self._waiting
        done = threading.Event()
        outcome: list[bool] = []

        def committed(ok: bool) -> None:
            outcome.append(ok)
            done.set()

        self._waiting.append(_Submission((), committed))
        return done.wait(timeout) and outcome == [True]

    def close(self, timeout: float = 10.0) -> None:
        """Commit what waits and what was confirmed, then close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._pid:
            return  # a forked child must not touch its parent's database
        self._stop.set()
        if self._started:
            self._writer.join(max(timeout, 0.0))
            if self._writer.is_alive():
                logger.error("spool %s: writer still busy at close", self.directory)
                return
        else:
            self._commit_once(self._db)
        for consumer in self._consumers.values():
            consumer.close()
        with contextlib.suppress(sqlite3.Error):
            self._compact(self._db)
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()
        self._lock_file.close()


_live: weakref.WeakSet[Spool] = weakref.WeakSet()


def _disable_in_child() -> None:
    # A forked child shares its parent's database and lock: it must never write to them.
    for spool in list(_live):
        spool._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_disable_in_child)


def _call(callback: Callable[[bool], None], ok: bool) -> None:
    try:
        callback(ok)
    except Exception:
        logger.exception("spool: a commit callback failed")
