"""Reads spooled events straight from the pages of a damaged SQLite database.

When damage hides rows from SQLite itself (a truncated file, a broken interior page),
the events are often still intact in their leaf pages. This scanner walks every page of
the database file (and of its WAL), parses table leaf cells as the SQLite file format
describes them (https://www.sqlite.org/fileformat2.html), and keeps the cells shaped
like a spool row: ``(rowid, NULL, integer CRC, blob)`` whose blob matches its CRC. The
caller decides which of them are still undelivered.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

__all__ = ["scan_rows"]

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
