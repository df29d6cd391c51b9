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
"""

from __future__ import annotations

import bisect
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from flagsink import faultpoints
from flagsink.event import Event, FeatureEvent, TrackingEvent
from flagsink.spool_recovery import scan_rows

__all__ = [
    "ConsumerStats",
    "Spool",
    "SpoolConsumer",
    "SpoolError",
    "SpoolSettings",
    "SpoolStats",
    "inspect_spool",
]

logger = logging.getLogger("flagsink.spool")

STREAMS = ("feature", "tracking")
_STREAM_OF: dict[type, str] = {FeatureEvent: "feature", TrackingEvent: "tracking"}
DB_NAME = "spool.db"
LOCK_NAME = "spool.lock"
# A copy of the tails, cursors and counters, rewritten after every commit: when damage
# makes them unreadable in the database, recovery still knows exactly what was lost.
MARKS_NAME = "spool.marks.json"
DAMAGED_DIR = "damaged"
_SCHEMA_VERSION = "1"
# Events inserted per transaction at most, so one commit never stalls the writer long.
_MAX_PER_COMMIT = 50_000
# Bytes counted per row beyond its payload (rowid, CRC, record header, b-tree cell).
_ROW_OVERHEAD = 16
_SPACE_CHECK_INTERVAL = 0.5


class SpoolSettings(BaseModel):
    """The ``spool:`` section: where and how events are kept on disk before delivery."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    dir: str = Field(description="Directory of the spool (created if missing); one process.")
    max_bytes: int = Field(
        1024**3,
        ge=1024 * 1024,
        description="Largest size of the spooled events on disk, in bytes (default 1 GiB).",
    )
    when_full: Literal["block", "dropOldest"] = Field(
        "block",
        description="When `maxBytes` is reached: `block` holds new events in memory (the "
        "relay answers 503 with Retry-After) for up to `blockTimeout`, then refuses them, "
        "counted; `dropOldest` deletes the oldest undelivered events, counted.",
    )
    block_timeout: int = Field(
        5_000, ge=0, description="Milliseconds `block` waits for room before refusing events."
    )
    commit_interval: float = Field(
        10.0,
        gt=0,
        le=1_000,
        description="Milliseconds between group commits (each one fsync): the longest an "
        "event waits to be durable, and the relay's added latency.",
    )
    max_pending_in_memory: int = Field(
        200_000,
        ge=1_000,
        description="Events waiting in memory for a commit at most (only reached while the "
        "disk is slow or the spool is full); past it the oldest are refused, counted.",
    )

    @field_validator("dir")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a directory, e.g. /var/lib/flagsink/spool")
        return value


class SpoolError(Exception):
    """The spool cannot be opened or used (the message names the directory and cause)."""


@dataclass
class ConsumerStats:
    """One exporter's durable counters: ``accepted == delivered + dropped + pending``."""

    exporter: str
    stream: str
    accepted: int
    delivered: int
    dropped_by_reason: dict[str, int]
    pending: int
    cursor: int

    @property
    def dropped(self) -> int:
        """All drops, whatever the reason."""
        return sum(self.dropped_by_reason.values())


@dataclass
class SpoolStats:
    """The spool's own figures."""

    directory: str
    bytes_used: int
    max_bytes: int
    waiting: int
    committed: dict[str, int]
    commits: int
    refused: int
    damaged: int
    consumers: list[ConsumerStats] = field(default_factory=list)


class _Submission:
    """Events handed in by a caller that wants to know when they are durable."""

    __slots__ = ("callback", "events")

    def __init__(self, events: Sequence[Event], callback: Callable[[bool], None]) -> None:
        self.events = events
        self.callback = callback


@dataclass
class _Consumed:
    """A confirmation from a consumer, applied at the next group commit."""

    consumer: str
    last: int
    delivered: int
    dropped: dict[str, int]
    done: threading.Event = field(default_factory=threading.Event)


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
    consumer: str
    first: int
    last: int
    created: float
    done: threading.Event


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


def _create_schema(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    for stream in STREAMS:
        db.execute(
            f"CREATE TABLE IF NOT EXISTS {stream} "
            "(seq INTEGER PRIMARY KEY, crc INTEGER NOT NULL, data BLOB NOT NULL)"
        )
    db.execute("CREATE TABLE IF NOT EXISTS tails (stream TEXT PRIMARY KEY, last INTEGER NOT NULL)")
    db.execute(
        "CREATE TABLE IF NOT EXISTS cursors (exporter TEXT PRIMARY KEY, stream TEXT NOT NULL,"
        " position INTEGER NOT NULL, batch_first INTEGER, batch_last INTEGER,"
        " batch_created REAL)"
    )
    db.execute(
        "CREATE TABLE IF NOT EXISTS counters (exporter TEXT NOT NULL, name TEXT NOT NULL,"
        " value INTEGER NOT NULL, PRIMARY KEY (exporter, name))"
    )
    db.execute(
        "CREATE TABLE IF NOT EXISTS idempotency (scope TEXT PRIMARY KEY, fingerprint BLOB,"
        " expires REAL NOT NULL, status INTEGER NOT NULL, body BLOB NOT NULL)"
    )
    db.execute(
        "CREATE TABLE IF NOT EXISTS damaged (stream TEXT NOT NULL, first INTEGER NOT NULL,"
        " last INTEGER NOT NULL)"
    )
    for stream in STREAMS:
        db.execute("INSERT OR IGNORE INTO tails VALUES (?, 0)", (stream,))


class SpoolConsumer:
    """One exporter's view of the spool: read after its cursor, confirm, resume.

    Used from that exporter's worker thread only (it has its own read connection).
    """

    def __init__(self, spool: Spool, name: str, stream: str, position: int) -> None:
        self.spool = spool
        self.name = name
        self.stream = stream
        self.position = position  # durable cursor as last confirmed by this consumer
        self.read_position = position  # rows up to here are being or have been sent
        self.wake = threading.Event()
        self.wake_at = 1
        self.intent: tuple[int, int, float] | None = None  # batch interrupted by a crash
        self.accepted = 0
        self.delivered = 0
        self.dropped: Counter[str] = Counter()
        # Events of the batch being sent that dropOldest deleted (and counted as dropped)
        # before the batch was confirmed: its confirmation must not count them again.
        self.settled_ahead = 0
        self._db: sqlite3.Connection | None = None
        self._decoder = msgspec.msgpack.Decoder(Event)

    # -- reading --------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Committed events after the durable cursor (not yet confirmed)."""
        return max(self.spool.tail(self.stream) - self.position, 0)

    @property
    def unread(self) -> int:
        """Committed events after the read position (not yet formed into a batch)."""
        return max(self.spool.tail(self.stream) - self.read_position, 0)

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = _connect(self.spool.db_path)
        return self._db

    def read(self, limit: int, upto: int | None = None) -> tuple[list[Event], int, int, int]:
        """Up to ``limit`` events after the read position (up to sequence ``upto``).

        :returns: ``(events, first, last, damaged)``: the batch covers sequence numbers
            ``first..last``; ``damaged`` of them could not be read (missing rows or a
            CRC mismatch: moved aside and counted, never sent).
        """
        tail = self.spool.tail(self.stream)
        start = self.read_position
        end = tail if upto is None else min(upto, tail)
        if end <= start:
            return [], start + 1, start, 0
        rows = self._connection().execute(
            f"SELECT seq, crc, data FROM {self.stream} WHERE seq > ? AND seq <= ? "
            "ORDER BY seq LIMIT ?",
            (start, end, limit),
        )
        events: list[Event] = []
        known = self.spool._known_damage[self.stream]  # found on open, counted then
        damaged = count = 0
        expected = start + 1
        bad: list[tuple[int, bytes]] = []
        decode = self._decoder.decode
        last = start
        for seq, crc, data in rows:
            count += 1
            if seq > expected:
                damaged += known.missing_between(expected, seq - 1)
            expected = seq + 1
            last = seq
            if zlib.crc32(data) != crc:
                damaged += 1
                bad.append((seq, bytes(data)))
                continue
            try:
                events.append(decode(data))
            except msgspec.DecodeError:
                damaged += 1
                bad.append((seq, bytes(data)))
        if count < limit and last < end:
            # Fewer rows than asked though more were committed: the rest are missing.
            damaged += known.missing_between(last + 1, end)
            last = end
        if damaged:
            self.spool._report_damage(self.name, self.stream, start + 1, last, damaged, bad)
        self.read_position = last
        return events, start + 1, last, damaged

    def rewind(self) -> None:
        """Read again from the durable cursor (after a batch was abandoned)."""
        self.read_position = self.position

    # -- confirming -----------------------------------------------------------------------

    def begin_batch(self, first: int, last: int, created: float, timeout: float = 10.0) -> bool:
        """Record durably that ``first..last`` is being sent (so a crash forms it again
        identically); True once committed."""
        return self.spool._record_intent(self.name, first, last, created, timeout)

    def confirm(
        self,
        last: int,
        delivered: int,
        dropped: dict[str, int] | None = None,
        timeout: float | None = 10.0,
    ) -> bool:
        """Everything up to ``last`` is handled: ``delivered`` sent, ``dropped`` counted by
        reason. Waits up to ``timeout`` for the group commit that makes it durable (so a
        crash resends at most the batch being sent); True once durable."""
        dropped = {k: v for k, v in (dropped or {}).items() if v}
        with self.spool._lock:  # against _drop_oldest moving this cursor meanwhile
            if self.settled_ahead:
                delivered, dropped = _without_settled(self.settled_ahead, delivered, dropped)
                self.settled_ahead = 0
            self.position = max(self.position, last)
            self.read_position = max(self.read_position, last)
            self.intent = None
            self.delivered += delivered
            self.dropped.update(dropped)
        item = _Consumed(self.name, last, delivered, dropped)
        self.spool._confirm(item)
        if timeout == 0 or not self.spool.writing:
            return False
        return item.done.wait(timeout)

    def stats(self) -> ConsumerStats:
        """In-memory counters (the durable ones can lag by one group commit), read under
        the spool's lock, which every change to them takes: one moment."""
        with self.spool._lock:
            accepted, delivered, dropped = self.accepted, self.delivered, dict(self.dropped)
            position = self.position
        return ConsumerStats(
            exporter=self.name,
            stream=self.stream,
            accepted=accepted,
            delivered=delivered,
            dropped_by_reason=dropped,
            pending=accepted - delivered - sum(dropped.values()),
            cursor=position,
        )

    def close(self) -> None:
        """Close the read connection."""
        if self._db is not None:
            self._db.close()
            self._db = None


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
        self._control: deque[_Consumed | _Intent | _Refused | _Answer] = deque()
        self._consumers: dict[str, SpoolConsumer] = {}
        self._by_stream: dict[str, list[SpoolConsumer]] = {s: [] for s in STREAMS}
        self._tails: dict[str, int] = dict.fromkeys(STREAMS, 0)
        self._commits = 0
        self._refused = 0
        self._damaged = 0
        self._damage_seen: dict[str, set[int]] = {s: set() for s in STREAMS}
        # Sequence ranges found damaged on open and counted then (table `damaged` and
        # the marks): readers skip them without counting them again.
        self._known_damage: dict[str, _Ranges] = {s: _Ranges([]) for s in STREAMS}
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
        self._refused_in_child = 0
        self._closed = True
        self._started = False

        def refuse(event: object) -> None:
            self._refused_in_child += 1
            if self._refused_in_child == 1:
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
            db = _connect(self.db_path)
            _create_schema(db)
            problem = db.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            problem = str(exc)
            with contextlib.suppress(Exception):
                db.close()
        else:
            if problem == "ok":
                return db
            db.close()
        return self._salvage(problem)

    def _move_aside(self) -> tuple[Path, Path]:
        """Move the database files into ``damaged/``; return the folder and the path."""
        damaged_dir = self.directory / DAMAGED_DIR
        damaged_dir.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{secrets.token_hex(3)}"
        aside = damaged_dir / f"spool-{stamp}.db"
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{self.db_path}{suffix}")
            if source.exists():
                os.replace(source, Path(f"{aside}{suffix}"))
        return damaged_dir, aside

    def _salvage(self, problem: str) -> sqlite3.Connection:
        """Copy every readable row of a damaged database into a new one; move the old
        files aside. Counts the events lost exactly from the recorded tails."""
        logger.error(
            "spool %s: the database is damaged (%s); recovering every readable event",
            self.directory,
            problem,
        )
        damaged_dir, aside = self._move_aside()
        new = _connect(self.db_path)
        _create_schema(new)
        old: sqlite3.Connection | None = None
        with contextlib.suppress(sqlite3.DatabaseError):
            old = sqlite3.connect(f"file:{aside}?mode=ro", uri=True, isolation_level=None)
        meta: dict[str, str] = {}
        damaged: list[tuple[Any, ...]] = []
        tails: dict[str, int] = {}
        cursors: list[tuple[Any, ...]] = []
        counters: list[tuple[Any, ...]] = []
        if old is not None:
            meta = dict(_try_rows(old, "SELECT key, value FROM meta"))
            tails = {str(s): int(t) for s, t in _try_rows(old, "SELECT stream, last FROM tails")}
            cursors = _try_rows(old, "SELECT * FROM cursors")
            counters = _try_rows(old, "SELECT * FROM counters")
            damaged = _try_rows(old, "SELECT stream, first, last FROM damaged")
        marks = self._read_marks()
        if marks is not None:
            # The database's own figures when readable, else the copy.
            for stream, last in marks["tails"].items():
                tails[stream] = max(tails.get(stream, 0), int(last))
            if not cursors:
                cursors = [
                    (name, stream, int(position), None, None, None)
                    for name, (stream, position) in marks["cursors"].items()
                ]
            if not counters:
                counters = [
                    (name, key, int(value))
                    for name, values in marks["counters"].items()
                    for key, value in values.items()
                ]
            meta.setdefault("id", str(marks.get("id", "")) or secrets.token_hex(8))
        new.execute("BEGIN")
        for key, value in meta.items():
            new.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
        new.executemany("INSERT OR REPLACE INTO cursors VALUES (?, ?, ?, ?, ?, ?)", cursors)
        new.executemany("INSERT OR REPLACE INTO counters VALUES (?, ?, ?)", counters)
        new.executemany("INSERT INTO damaged VALUES (?, ?, ?)", damaged)
        scanned = self._scan(aside)
        for stream in STREAMS:
            low = min((int(c[2]) for c in cursors if c[1] == stream), default=0)
            found = {row[0]: row for row in scanned[stream] if row[0] > low}
            if old is not None:
                found.update((row[0], row) for row in _salvage_rows(old, stream, low))
            rows = [found[seq] for seq in sorted(found)]
            new.executemany(f"INSERT INTO {stream} VALUES (?, ?, ?)", rows)
            tail = max(tails.get(stream, 0), rows[-1][0] if rows else 0)
            new.execute("UPDATE tails SET last = ? WHERE stream = ?", (tail, stream))
        new.execute("COMMIT")
        if old is not None:
            old.close()
        logger.error(
            "spool %s: copied every readable event into a new database; the damaged files "
            "are in %s (the events lost are counted next)",
            self.directory,
            damaged_dir,
        )
        return new

    @staticmethod
    def _scan(database: Path) -> dict[str, list[tuple[int, int, bytes]]]:
        """Intact rows read from the pages of a damaged database, by stream (the event's
        own ``kind`` tells which)."""
        decode = msgspec.msgpack.Decoder(Event).decode
        by_stream: dict[str, list[tuple[int, int, bytes]]] = {s: [] for s in STREAMS}
        for candidates in scan_rows(database).values():
            seen: set[str] = set()
            for seq, crc, data in candidates:
                try:
                    stream = _STREAM_OF[type(decode(data))]
                except (msgspec.DecodeError, KeyError):
                    continue
                if stream not in seen:
                    seen.add(stream)
                    by_stream[stream].append((seq, crc, data))
        return by_stream

    def _read_marks(self) -> dict[str, Any] | None:
        try:
            marks = json.loads((self.directory / MARKS_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(marks, dict) or not {"tails", "cursors", "counters"} <= marks.keys():
            return None
        return marks

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
            db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (_SCHEMA_VERSION,))
        else:
            self.id = str(row[0])
        marks = self._read_marks() or {}
        marked_tails = {str(k): int(v) for k, v in dict(marks.get("tails", {})).items()}
        for stream, last in db.execute("SELECT stream, last FROM tails"):
            if stream in self._tails:
                self._tails[stream] = self._plausible_tail(stream, int(last), marked_tails)
        spans: dict[str, list[tuple[int, int]]] = {s: [] for s in STREAMS}
        for stream, first, last in _try_rows(db, "SELECT stream, first, last FROM damaged"):
            if stream in spans:
                spans[stream].append((int(first), int(last)))
        for stream, marked in dict(marks.get("damaged", {})).items():
            if stream in spans:
                spans[stream].extend((int(a), int(b)) for a, b in marked)
        for stream in STREAMS:
            self._known_damage[stream] = _Ranges.merge(spans[stream])
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
        new = _Ranges.merge(new_spans)
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
        self._known_damage[stream] = _Ranges.merge(known.spans + new.spans)
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
                    left = _rows_pending(db, str(stream), self._tails[stream], int(position))
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
        control: list[_Consumed | _Intent | _Refused | _Answer] = []
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
            stream = _STREAM_OF.get(type(event))
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
        control: list[_Consumed | _Intent | _Refused | _Answer],
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
        control: list[_Consumed | _Intent | _Refused | _Answer],
        submissions: list[_Submission],
    ) -> None:
        for item in control:
            if isinstance(item, _Consumed | _Intent):
                item.done.set()
        for submission in submissions:
            _call(submission.callback, True)
        for stream, stream_rows in rows.items():
            if stream_rows:
                for consumer in self._by_stream[stream]:
                    if consumer.unread >= consumer.wake_at:
                        consumer.wake.set()
        if any(isinstance(item, _Consumed) for item in control):
            self._maybe_compact(db)

    def _apply_control_only(self, db: sqlite3.Connection) -> None:
        control: list[_Consumed | _Intent | _Refused | _Answer] = []
        while self._control:
            control.append(self._control.popleft())
        if not control:
            return
        db.execute("BEGIN IMMEDIATE")
        self._apply(db, control)
        db.execute("COMMIT")
        for item in control:
            if isinstance(item, _Consumed | _Intent):
                item.done.set()
        self._maybe_compact(db)

    def _apply(
        self, db: sqlite3.Connection, control: list[_Consumed | _Intent | _Refused | _Answer]
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
                self._known_damage[stream] = _Ranges(self._known_damage[stream].above(low))
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
        control: list[_Consumed | _Intent | _Refused | _Answer],
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
            stream = _STREAM_OF.get(type(item))
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
        rows = _try_rows(
            self._db,
            "SELECT scope, fingerprint, status, body, expires FROM idempotency ORDER BY expires",
        )
        return [
            (str(scope), bytes(fp), int(status), bytes(body), float(expires) - now)
            for scope, fp, status, body, expires in rows
            if float(expires) > now
        ]

    # -- used by consumers ----------------------------------------------------------------

    def _confirm(self, item: _Consumed) -> None:
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


class _Ranges:
    """Sorted, disjoint, non-adjacent ``(first, last)`` ranges of sequence numbers."""

    def __init__(self, spans: list[tuple[int, int]]) -> None:
        self.spans = spans
        self._firsts = [first for first, _ in spans]

    @classmethod
    def merge(cls, spans: list[tuple[int, int]]) -> _Ranges:
        merged: list[tuple[int, int]] = []
        for first, last in sorted(spans):
            if merged and first <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], last))
            else:
                merged.append((first, last))
        return cls(merged)

    @property
    def total(self) -> int:
        return sum(last - first + 1 for first, last in self.spans)

    def contains(self, n: int) -> bool:
        i = bisect.bisect_right(self._firsts, n) - 1
        return i >= 0 and self.spans[i][0] <= n <= self.spans[i][1]

    def subtract(self, first: int, last: int) -> list[tuple[int, int]]:
        """The parts of ``first..last`` outside these ranges."""
        pieces = []
        at = first
        start = max(bisect.bisect_right(self._firsts, first) - 1, 0)
        for a, b in self.spans[start:]:
            if a > last:
                break
            if b < at:
                continue
            if a > at:
                pieces.append((at, a - 1))
            at = max(at, b + 1)
        if at <= last:
            pieces.append((at, last))
        return pieces

    def missing_between(self, first: int, last: int) -> int:
        """How many of ``first..last`` are not in these ranges."""
        return sum(b - a + 1 for a, b in self.subtract(first, last))

    def count_above(self, position: int) -> int:
        return sum(b - max(a, position + 1) + 1 for a, b in self.spans if b > position)

    def above(self, position: int) -> list[tuple[int, int]]:
        return [(max(a, position + 1), b) for a, b in self.spans if b > position]


def _without_settled(
    settled: int, delivered: int, dropped: dict[str, int]
) -> tuple[int, dict[str, int]]:
    """A batch's outcome without its first ``settled`` events, already counted as
    dropped when ``dropOldest`` deleted them while the batch was being sent."""
    take = min(settled, delivered)
    delivered -= take
    settled -= take
    rest = dict(dropped)
    for reason in list(rest):
        take = min(settled, rest[reason])
        rest[reason] -= take
        settled -= take
    return delivered, {k: v for k, v in rest.items() if v}


def _call(callback: Callable[[bool], None], ok: bool) -> None:
    try:
        callback(ok)
    except Exception:
        logger.exception("spool: a commit callback failed")


def _try_rows(db: sqlite3.Connection, sql: str) -> list[tuple[Any, ...]]:
    try:
        return db.execute(sql).fetchall()
    except sqlite3.DatabaseError:
        return []


def _salvage_rows(db: sqlite3.Connection, stream: str, low: int) -> list[tuple[int, int, bytes]]:
    """Every readable row with a valid CRC after ``low``, skipping unreadable ranges."""
    rows: list[tuple[int, int, bytes]] = []
    position = low
    step = 1
    failures = 0
    while failures < 64:
        try:
            chunk = db.execute(
                f"SELECT seq, crc, data FROM {stream} WHERE seq > ? ORDER BY seq LIMIT 1000",
                (position,),
            ).fetchall()
        except sqlite3.DatabaseError:
            # Jump over the unreadable part, further each time it persists.
            failures += 1
            position += step
            step *= 2
            continue
        if not chunk:
            break
        failures, step = 0, 1
        for seq, crc, data in chunk:
            if isinstance(data, bytes) and zlib.crc32(data) == crc:
                rows.append((int(seq), int(crc), data))
        position = int(chunk[-1][0])
    return rows


def _rows_pending(db: sqlite3.Connection, stream: str, tail: int, position: int) -> int:
    """Events after ``position`` still to handle (damage was counted on open)."""
    spans = db.execute("SELECT first, last FROM damaged WHERE stream = ?", (stream,)).fetchall()
    known = _Ranges.merge([(int(a), int(b)) for a, b in spans])
    return tail - position - known.count_above(position)


def inspect_spool(directory: str | os.PathLike[str]) -> list[ConsumerStats]:
    """Read the durable counters of a spool directory (read-only; safe while in use)."""
    path = Path(directory).expanduser() / DB_NAME
    if not path.exists():
        raise SpoolError(f"{Path(directory)}: no spool here (no {DB_NAME})")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        # One read transaction: tails, cursors and counters from the same commit.
        db.execute("BEGIN")
        tails = dict(db.execute("SELECT stream, last FROM tails").fetchall())
        result = []
        for name, stream, position in db.execute(
            "SELECT exporter, stream, position FROM cursors ORDER BY exporter"
        ).fetchall():
            counts = dict(
                db.execute(
                    "SELECT name, value FROM counters WHERE exporter = ?", (name,)
                ).fetchall()
            )
            dropped = {
                key[len("dropped:") :]: int(value)
                for key, value in counts.items()
                if key.startswith("dropped:")
            }
            result.append(
                ConsumerStats(
                    exporter=name,
                    stream=stream,
                    accepted=int(counts.get("accepted", 0)),
                    delivered=int(counts.get("delivered", 0)),
                    dropped_by_reason=dropped,
                    pending=_rows_pending(db, stream, int(tails.get(stream, 0)), int(position)),
                    cursor=int(position),
                )
            )
        db.close()
    except sqlite3.DatabaseError as exc:
        raise SpoolError(f"{path}: cannot read the spool: {exc}") from None
    return result
