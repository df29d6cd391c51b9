"""One exporter's view of the spool: :class:`SpoolConsumer` reads after its cursor,
records the batch it sends, and confirms what is handled (see :mod:`flagsink.spool`)."""

from __future__ import annotations

import sqlite3
import threading
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from flagsink.event import Event
from flagsink.spool_schema import connect
from flagsink.spool_settings import ConsumerStats

if TYPE_CHECKING:
    from flagsink.spool import Spool

__all__ = ["Confirmation", "SpoolConsumer"]


@dataclass
class Confirmation:
    """A confirmation from a consumer, applied at the next group commit."""

    consumer: str
    last: int
    delivered: int
    dropped: dict[str, int]
    done: threading.Event = field(default_factory=threading.Event)


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
            self._db = connect(self.spool.db_path)
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
        item = Confirmation(self.name, last, delivered, dropped)
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
