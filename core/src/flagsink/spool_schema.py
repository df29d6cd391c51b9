"""The spool directory's layout: its files, the SQLite schema of its database, and how
they are opened and read (see :mod:`flagsink.spool`)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from flagsink.event import FeatureEvent, TrackingEvent

__all__ = [
    "DAMAGED_DIR",
    "DB_NAME",
    "LOCK_NAME",
    "MARKS_NAME",
    "SCHEMA_VERSION",
    "STREAMS",
    "STREAM_OF",
    "connect",
    "create_schema",
    "read_marks",
    "try_rows",
]

STREAMS = ("feature", "tracking")
STREAM_OF: dict[type, str] = {FeatureEvent: "feature", TrackingEvent: "tracking"}
DB_NAME = "spool.db"
LOCK_NAME = "spool.lock"
# A copy of the tails, cursors and counters, rewritten after every commit: when damage
# makes them unreadable in the database, recovery still knows exactly what was lost.
MARKS_NAME = "spool.marks.json"
DAMAGED_DIR = "damaged"
SCHEMA_VERSION = "1"


def connect(path: Path) -> sqlite3.Connection:
    """Open the spool database at ``path``: WAL journal, ``synchronous=FULL`` (a commit
    is on disk when it returns), usable from any thread."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


def create_schema(db: sqlite3.Connection) -> None:
    """Create the tables missing from ``db``: one per stream (sequence number, CRC32,
    event bytes), tails, cursors, counters, relay answers and damaged ranges."""
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


def read_marks(directory: Path) -> dict[str, Any] | None:
    """The marks file of the spool at ``directory`` (see :data:`MARKS_NAME`), or None when
    it is missing or unreadable."""
    try:
        marks = json.loads((directory / MARKS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marks, dict) or not {"tails", "cursors", "counters"} <= marks.keys():
        return None
    return marks


def try_rows(db: sqlite3.Connection, sql: str) -> list[tuple[Any, ...]]:
    """The rows ``sql`` selects, or none when a damaged ``db`` cannot answer it."""
    try:
        return db.execute(sql).fetchall()
    except sqlite3.DatabaseError:
        return []
