"""Dead letters: events a sink refused for good, kept in a JSON lines file with the reason.

Each line is ``{"time": <unix seconds>, "exporter": ..., "reason": ..., "event": {...}}``,
so the events can be inspected and sent again once the cause is fixed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec

from flagsink.event import Event

__all__ = ["SPOOL_FOLDER", "DeadLetterFile", "default_path"]

logger = logging.getLogger("flagsink.deadletter")

#: The folder of a spool directory that holds the exporters' dead letters by default.
SPOOL_FOLDER = "deadletter"


def default_path(spool_dir: Path, exporter: str) -> Path:
    """Where exporter ``exporter``'s dead letters go by default with a spool."""
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in exporter) or "exporter"
    return spool_dir / SPOOL_FOLDER / f"{name}.jsonl"


class _Letter(msgspec.Struct):
    time: float
    exporter: str
    reason: str
    event: Event


class DeadLetterFile:
    """Appends dead letters to ``path`` (created with its directory), synced to disk."""

    def __init__(self, path: str | os.PathLike[str], exporter: str) -> None:
        self.path = Path(path).expanduser()
        self.exporter = exporter
        self._lock = threading.Lock()
        self._encode = msgspec.json.Encoder().encode_lines

    def write(self, events: Sequence[Event], reason: str) -> int:
        """Append ``events`` with ``reason``; return how many were written."""
        now = time.time()
        letters = [_Letter(now, self.exporter, reason, event) for event in events]
        try:
            data = self._encode(letters)
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
            data = self._encode(
                [_Letter(now, self.exporter, reason, e) for e in _encodable(events)]
            )
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        return data.count(b"\n")

    def keep(self, events: Sequence[Event], reason: str) -> int:
        """Like :meth:`write`, but never raises: a file that cannot be written is logged
        (naming it) and 0 returned, so a rejected batch never fails the export twice."""
        try:
            return self.write(events, reason)
        except OSError as exc:
            logger.error(
                "exporter %s: cannot write %d dead letters to %s: %s",
                self.exporter,
                len(events),
                self.path,
                exc,
            )
            return 0

    def keep_by_reason(self, rejected: Iterable[tuple[Event, str]]) -> int:
        """:meth:`keep` each ``(event, reason)``, one append per reason."""
        groups: dict[str, list[Event]] = {}
        for event, reason in rejected:
            groups.setdefault(reason, []).append(event)
        return sum(self.keep(events, reason) for reason, events in groups.items())


def _encodable(events: Sequence[Event]) -> list[Event]:
    good = []
    for event in events:
        try:
            msgspec.json.encode(event)
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
            continue
        good.append(event)
    return good
