"""Reading a spool directory's durable counters from outside (``flagsink status
--spool``, a relay's start-up check): read-only, safe while a process uses the spool."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from flagsink.spool_ranges import SequenceRanges
from flagsink.spool_schema import DB_NAME
from flagsink.spool_settings import ConsumerStats, SpoolError

__all__ = ["inspect_spool", "rows_pending"]


def rows_pending(db: sqlite3.Connection, stream: str, tail: int, position: int) -> int:
    """Events after ``position`` still to handle (damage was counted on open)."""
    spans = db.execute("SELECT first, last FROM damaged WHERE stream = ?", (stream,)).fetchall()
    known = SequenceRanges.merge([(int(a), int(b)) for a, b in spans])
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
                    pending=rows_pending(db, stream, int(tails.get(stream, 0)), int(position)),
                    cursor=int(position),
                )
            )
        db.close()
    except sqlite3.DatabaseError as exc:
        raise SpoolError(f"{path}: cannot read the spool: {exc}") from None
    return result
