"""Recovery of a damaged spool database: :func:`salvage_database` moves the damaged files
aside under ``damaged/`` and copies every event still readable into a new database, with
the cursors and counters (from the database, else from the marks file); the spool then
counts what was lost (see :mod:`flagsink.spool`).

The events are read through SQLite where it still can, and :func:`scan_rows` reads them
straight from the pages of the database: when damage hides rows from SQLite itself (a
truncated file, a broken interior page), the events are often still intact in their leaf
pages. This scanner walks every page of the database file (and of its WAL), parses table
leaf cells as the SQLite file format describes them
(https://www.sqlite.org/fileformat2.html), and keeps the cells shaped like a spool row:
``(rowid, NULL, integer CRC, blob)`` whose blob matches its CRC. The caller decides which
of them are still undelivered.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from flagsink.event import Event
from flagsink.spool_schema import (
    DAMAGED_DIR,
    DB_NAME,
    STREAM_OF,
    STREAMS,
    connect,
    create_schema,
    read_marks,
    try_rows,
)

__all__ = ["salvage_database", "scan_rows"]

logger = logging.getLogger("flagsink.spool")

_LEAF_TABLE = 13
_WAL_HEADER = 32
_WAL_FRAME_HEADER = 24
_DEFAULT_PAGE_SIZE = 4096
_MAX_OVERFLOW_PAGES = 4096


def _varint(data: bytes | memoryview, at: int) -> tuple[int, int]:
    """The varint at ``at`` and the offset after it (raises IndexError past the end)."""
    value = 0
    for i in range(8):
        byte = data[at + i]
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, at + i + 1
    return (value << 8) | data[at + 8], at + 9


def _page_size(header: bytes) -> int:
    if len(header) >= 18 and header.startswith(b"SQLite format 3\x00"):
        size = int.from_bytes(header[16:18], "big")
        size = 65536 if size == 1 else size
        if size >= 512 and size & (size - 1) == 0:
            return size
    return _DEFAULT_PAGE_SIZE


def _int(data: bytes | memoryview, serial: int) -> int | None:
    widths = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8}
    if serial in (8, 9):
        return serial - 8
    width = widths.get(serial)
    if width is None or len(data) < width:
        return None
    return int.from_bytes(data[:width], "big", signed=True)


class _Pages:
    """Page lookup for overflow chains: the database file's pages by number."""

    def __init__(self, data: bytes, page_size: int) -> None:
        self.data = data
        self.size = page_size

    def get(self, number: int) -> bytes | None:
        start = (number - 1) * self.size
        if number < 1 or start + self.size > len(self.data):
            return None
        return self.data[start : start + self.size]


def _payload(page: bytes, at: int, size: int, usable: int, pages: _Pages) -> bytes | None:
    """A cell's whole payload, following overflow pages when it does not fit."""
    local_max = usable - 35
    if size <= local_max:
        return page[at : at + size] if at + size <= len(page) else None
    minimum = ((usable - 12) * 32 // 255) - 23
    local = minimum + ((size - minimum) % (usable - 4))
    if local > local_max:
        local = minimum
    if at + local + 4 > len(page):
        return None
    parts = [page[at : at + local]]
    need = size - local
    number = int.from_bytes(page[at + local : at + local + 4], "big")
    for _ in range(_MAX_OVERFLOW_PAGES):
        if need <= 0:
            break
        overflow = pages.get(number)
        if overflow is None:
            return None
        chunk = overflow[4 : 4 + min(need, usable - 4)]
        parts.append(chunk)
        need -= len(chunk)
        number = int.from_bytes(overflow[:4], "big")
    return b"".join(parts) if need <= 0 else None


def _cells(
    page: bytes, offset: int, usable: int, pages: _Pages
) -> Iterator[tuple[int, int, bytes]]:
    """Spool-shaped rows ``(seq, crc, data)`` of one table leaf page."""
    try:
        count = int.from_bytes(page[offset + 3 : offset + 5], "big")
        for index in range(count):
            pointer = offset + 8 + 2 * index
            cell = int.from_bytes(page[pointer : pointer + 2], "big")
            if not 0 < cell < len(page):
                continue
            size, at = _varint(page, cell)
            rowid, at = _varint(page, at)
            payload = _payload(page, at, size, usable, pages)
            if payload is None:
                continue
            row = _record(payload)
            if row is not None:
                yield rowid, row[0], row[1]
    except IndexError:
        return


def _record(payload: bytes) -> tuple[int, bytes] | None:
    """``(crc, data)`` when ``payload`` is a ``(NULL, int, blob)`` record with a CRC that
    matches its blob; None otherwise."""
    try:
        header_size, at = _varint(payload, 0)
        serials: list[int] = []
        while at < header_size and len(serials) < 4:
            serial, at = _varint(payload, at)
            serials.append(serial)
    except IndexError:
        return None
    if len(serials) != 3 or serials[0] != 0 or not 1 <= serials[1] <= 9:
        return None
    blob_type = serials[2]
    if blob_type < 12 or blob_type % 2:
        return None
    widths = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8, 8: 0, 9: 0}
    crc_width = widths.get(serials[1])
    if crc_width is None:
        return None
    crc = _int(payload[header_size:], serials[1])
    start = header_size + crc_width
    data = payload[start : start + (blob_type - 12) // 2]
    if crc is None or len(data) != (blob_type - 12) // 2 or zlib.crc32(data) != crc:
        return None
    return crc, bytes(data)


def _leaf_pages(
    data: bytes, page_size: int, first_page_offset: bool
) -> Iterator[tuple[bytes, int]]:
    # A page cut by truncation is padded: cells still whole in it pass their CRC check.
    for start in range(0, len(data), page_size):
        page = data[start : start + page_size].ljust(page_size, b"\x00")
        offset = 100 if first_page_offset and start == 0 else 0
        if page[offset] == _LEAF_TABLE:
            yield page, offset


def scan_rows(database: Path) -> dict[int, list[tuple[int, int, bytes]]]:
    """Every intact spool row found in ``database`` and its ``-wal`` file, keyed by the
    page size it was read with: ``{seq: (seq, crc, data)}`` merged across both files.

    Rows are matched by shape and CRC only; the caller maps them to streams (the event's
    own ``kind``) and drops those already delivered.
    """
    found: dict[int, list[tuple[int, int, bytes]]] = {}
    try:
        data = database.read_bytes()
    except OSError:
        data = b""
    page_size = _page_size(data[:100])
    usable = page_size - (data[20] if len(data) > 20 and data[:16] == b"SQLite format 3\x00" else 0)
    pages = _Pages(data, page_size)
    for page, offset in _leaf_pages(data, page_size, True):
        for row in _cells(page, offset, usable, pages):
            found.setdefault(row[0], []).append(row)
    wal = Path(f"{database}-wal")
    try:
        log = wal.read_bytes()
    except OSError:
        log = b""
    if len(log) > _WAL_HEADER:
        wal_page_size = int.from_bytes(log[8:12], "big") or page_size
        frame = _WAL_FRAME_HEADER + wal_page_size
        for start in range(_WAL_HEADER, len(log) - frame + 1, frame):
            page = log[start + _WAL_FRAME_HEADER : start + frame]
            number = int.from_bytes(log[start : start + 4], "big")
            offset = 100 if number == 1 else 0
            if page[offset] == _LEAF_TABLE:
                for row in _cells(page, offset, wal_page_size, pages):
                    found.setdefault(row[0], []).append(row)
    return found


# -- salvage of a damaged database ---------------------------------------------------------


def _move_aside(directory: Path) -> tuple[Path, Path]:
    """Move the database files into ``damaged/``; return the folder and the path."""
    damaged_dir = directory / DAMAGED_DIR
    damaged_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{secrets.token_hex(3)}"
    aside = damaged_dir / f"spool-{stamp}.db"
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{directory / DB_NAME}{suffix}")
        if source.exists():
            os.replace(source, Path(f"{aside}{suffix}"))
    return damaged_dir, aside


def salvage_database(directory: Path, problem: str) -> sqlite3.Connection:
    """Copy every readable row of a damaged database into a new one; move the old
    files aside. Counts the events lost exactly from the recorded tails.

    :param directory: the spool directory (its database is :data:`DB_NAME`).
    :param problem: what is wrong with the database, for the log.
    :returns: the new database, open, with the schema, the rows, cursors and counters.
    """
    logger.error(
        "spool %s: the database is damaged (%s); recovering every readable event",
        directory,
        problem,
    )
    damaged_dir, aside = _move_aside(directory)
    new = connect(directory / DB_NAME)
    create_schema(new)
    old: sqlite3.Connection | None = None
    with contextlib.suppress(sqlite3.DatabaseError):
        old = sqlite3.connect(f"file:{aside}?mode=ro", uri=True, isolation_level=None)
    meta: dict[str, str] = {}
    damaged: list[tuple[Any, ...]] = []
    tails: dict[str, int] = {}
    cursors: list[tuple[Any, ...]] = []
    counters: list[tuple[Any, ...]] = []
    if old is not None:
        meta = dict(try_rows(old, "SELECT key, value FROM meta"))
        tails = {str(s): int(t) for s, t in try_rows(old, "SELECT stream, last FROM tails")}
        cursors = try_rows(old, "SELECT * FROM cursors")
        counters = try_rows(old, "SELECT * FROM counters")
        damaged = try_rows(old, "SELECT stream, first, last FROM damaged")
    marks = read_marks(directory)
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
    scanned = _scan(aside)
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
        directory,
        damaged_dir,
    )
    return new


def _scan(database: Path) -> dict[str, list[tuple[int, int, bytes]]]:
    """Intact rows read from the pages of a damaged database, by stream (the event's
    own ``kind`` tells which)."""
    decode = msgspec.msgpack.Decoder(Event).decode
    by_stream: dict[str, list[tuple[int, int, bytes]]] = {s: [] for s in STREAMS}
    for candidates in scan_rows(database).values():
        seen: set[str] = set()
        for seq, crc, data in candidates:
            try:
                stream = STREAM_OF[type(decode(data))]
            except (msgspec.DecodeError, KeyError):
                continue
            if stream not in seen:
                seen.add(stream)
                by_stream[stream].append((seq, crc, data))
    return by_stream


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
