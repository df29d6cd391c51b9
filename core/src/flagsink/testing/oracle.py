"""An oracle for end-to-end delivery tests: which accepted events came back, how often,
and intact or not.

Every event the oracle makes carries a unique id in its ``userKey``
(``oracle-<run>-<n>``): a field every format and sink keeps (JSON lines, CSV, Parquet,
message bodies, partition keys). A test hands the events to flagsink, tells the oracle
which were accepted, reads every sink back with its own client, and asks for a report::

    oracle = Oracle()
    events = oracle.events(10_000)
    pipeline.add_events(events)
    oracle.accepted(events)
    ...
    report = oracle.report(read_back, dead_letters=dead)
    report.assert_exact(max_duplicates=0)

Read-back events may be :class:`~flagsink.event.Event` objects, decoded JSON objects
(``dict``) or JSON text (``str``/``bytes``); they are compared through their JSON form,
so a sink that round-trips through JSON compares equal.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from flagsink.event import Event, FeatureEvent, TrackingEvent

__all__ = ["Oracle", "OracleReport"]

ReadBack = Event | Mapping[str, Any] | str | bytes

_SHOWN = 5  # ids listed per problem in a summary


@dataclass(frozen=True)
class OracleReport:
    """What a read-back held, compared with what was accepted.

    :ivar accepted: events the oracle was told flagsink accepted.
    :ivar read_back: events read back from the sinks (with this run's ids).
    :ivar delivered: distinct accepted ids found in the sinks.
    :ivar missing: accepted ids found neither in a sink nor in the dead letters.
    :ivar duplicated: id -> copies, for ids read back more than once (sinks and dead
        letters together).
    :ivar corrupted: id -> the fields whose read-back value differs from the accepted one
        (``{field: (accepted, read back)}``; the first differing copy).
    :ivar unexpected: ids of this run read back that were never accepted.
    :ivar dead_lettered: accepted ids found in the dead letters.
    :ivar foreign: events read back without an id of this run (ignored otherwise).
    """

    accepted: int
    read_back: int
    delivered: int
    missing: list[str] = field(default_factory=list)
    duplicated: dict[str, int] = field(default_factory=dict)
    corrupted: dict[str, dict[str, tuple[Any, Any]]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    dead_lettered: list[str] = field(default_factory=list)
    foreign: int = 0

    @property
    def extra_copies(self) -> int:
        """Copies beyond the first, summed over every duplicated id."""
        return sum(count - 1 for count in self.duplicated.values())

    @property
    def exact(self) -> bool:
        """Every accepted event once, intact; nothing else of this run."""
        return not (self.missing or self.duplicated or self.corrupted or self.unexpected)

    def summary(self) -> str:
        """One readable paragraph: the counts, then a few ids of each problem."""
        lines = [
            f"accepted {self.accepted}, read back {self.read_back} "
            f"({self.delivered} distinct delivered, {len(self.dead_lettered)} dead-lettered, "
            f"{self.foreign} foreign ignored): "
            f"{len(self.missing)} missing, {len(self.duplicated)} duplicated "
            f"({self.extra_copies} extra copies), {len(self.corrupted)} corrupted, "
            f"{len(self.unexpected)} unexpected"
        ]
        if self.missing:
            lines.append("  missing: " + _some(self.missing))
        if self.duplicated:
            shown = sorted(self.duplicated.items(), key=lambda item: (-item[1], item[0]))
            lines.append(
                "  duplicated: "
                + ", ".join(f"{key} x{count}" for key, count in shown[:_SHOWN])
                + (f" ... ({len(shown) - _SHOWN} more)" if len(shown) > _SHOWN else "")
            )
        for key, diff in list(self.corrupted.items())[:_SHOWN]:
            fields = "; ".join(
                f"{name}: accepted {_short(want)}, read {_short(got)}"
                for name, (want, got) in diff.items()
            )
            lines.append(f"  corrupted {key}: {fields}")
        if len(self.corrupted) > _SHOWN:
            lines.append(f"  ... {len(self.corrupted) - _SHOWN} more corrupted")
        if self.unexpected:
            lines.append("  unexpected: " + _some(self.unexpected))
        return "\n".join(lines)

    def assert_exact(self, max_duplicates: int = 0) -> None:
        """Raise :class:`AssertionError` (with :meth:`summary`) unless nothing is missing,
        corrupted or unexpected, and there are at most ``max_duplicates`` extra copies."""
        if self.missing or self.corrupted or self.unexpected or self.extra_copies > max_duplicates:
            raise AssertionError(
                f"delivery is not exact (at most {max_duplicates} extra copies allowed):\n"
                + self.summary()
            )

    def __str__(self) -> str:
        return self.summary()


class Oracle:
    """Stamps events with unique ids, records which were accepted, and checks read-backs.

    :param run: a label for this run's ids (default: 8 random hex digits); two oracles
        with different runs never confuse each other's events in a shared sink.
    Thread-safe.
    """

    def __init__(self, run: str | None = None) -> None:
        self.run = run or uuid.uuid4().hex[:8]
        if "-" in self.run:
            raise ValueError(f"Oracle(run={self.run!r}): the run label cannot contain '-'")
        self.prefix = f"oracle-{self.run}-"
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._accepted: dict[str, Any] = {}

    def next_id(self) -> str:
        """A new id of this run: ``oracle-<run>-<n>`` (n zero-padded to 9 digits)."""
        return f"{self.prefix}{next(self._counter):09d}"

    def id_of(self, event: ReadBack) -> str | None:
        """The id an event carries, or None when it is not one of this run's."""
        key = _json(event).get("userKey")
        if isinstance(key, str) and key.startswith(self.prefix):
            return key
        return None

    def stamp(self, event: Event) -> Event:
        """A copy of ``event`` carrying a new id (its ``userKey`` replaced)."""
        return msgspec.structs.replace(event, user_key=self.next_id())

    def events(self, count: int, *, tracking_every: int = 5, payload: int = 0) -> list[Event]:
        """``count`` new events with ids: feature events of a few flags with varied values
        and metadata, every ``tracking_every``-th a tracking event (0: none).

        :param payload: pad each event's value (feature) or details (tracking) with this
            many characters, to reach a size.
        """
        made: list[Event] = []
        for _ in range(count):
            key = self.next_id()
            n = int(key.rsplit("-", 1)[1])
            pad = "p" * payload
            if tracking_every and n % tracking_every == tracking_every - 1:
                made.append(
                    TrackingEvent(
                        "user",
                        key,
                        1_700_000_000 + n,
                        "checkout",
                        {"targetingKey": key, "plan": ("free", "pro")[n % 2]},
                        {"amount": n, "currency": "EUR", **({"pad": pad} if pad else {})},
                    )
                )
                continue
            value: Any = ({"nested": [n, 2.5, None]}, n % 2 == 0, f"text;{n},x", n)[n % 4]
            made.append(
                FeatureEvent(
                    "anonymousUser" if n % 7 == 0 else "user",
                    key,
                    1_700_000_000 + n,
                    f"flag-{n % 4}",
                    ("on", "off", "SdkDefault")[n % 3],
                    f"{pad}{n}" if pad else value,
                    n % 3 == 2,
                    str(n % 5),
                    ("SERVER", "PROVIDER_CACHE", "INPROCESS")[n % 3],
                    {"env": "test", "n": n} if n % 2 else None,
                )
            )
        return made

    def accepted(self, events: Iterable[Event]) -> None:
        """Record ``events`` as accepted by flagsink (every one must carry an id of this
        run). Accepting the same id again with the same content is a no-op; with other
        content it is an error in the test."""
        for event in events:
            data = _json(event)
            key = data.get("userKey")
            if not isinstance(key, str) or not key.startswith(self.prefix):
                raise ValueError(
                    f"Oracle.accepted: event with userKey {key!r} has no id of run "
                    f"{self.run!r}: make events with Oracle.events() or Oracle.stamp()"
                )
            with self._lock:
                known = self._accepted.setdefault(key, data)
            if known is not data and known != data:
                raise ValueError(f"Oracle.accepted: id {key} accepted twice with other content")

    @property
    def accepted_count(self) -> int:
        """How many distinct events were accepted."""
        with self._lock:
            return len(self._accepted)

    def report(
        self, read_back: Iterable[ReadBack], *, dead_letters: Iterable[ReadBack] = ()
    ) -> OracleReport:
        """Compare what the sinks hold (``read_back``) and what went to dead letters with
        what was accepted. An id in both counts as duplicated."""
        with self._lock:
            accepted = dict(self._accepted)
        copies: Counter[str] = Counter()
        delivered: set[str] = set()
        dead: set[str] = set()
        corrupted: dict[str, dict[str, tuple[Any, Any]]] = {}
        unexpected: set[str] = set()
        total = foreign = 0
        for source, events in ((delivered, read_back), (dead, dead_letters)):
            for event in events:
                data = _json(event)
                key = data.get("userKey")
                if not isinstance(key, str) or not key.startswith(self.prefix):
                    foreign += 1
                    continue
                total += 1
                copies[key] += 1
                want = accepted.get(key)
                if want is None:
                    unexpected.add(key)
                    continue
                source.add(key)
                if data != want and key not in corrupted:
                    corrupted[key] = _diff(want, data)
        return OracleReport(
            accepted=len(accepted),
            read_back=total,
            delivered=len(delivered),
            missing=sorted(accepted.keys() - delivered - dead),
            duplicated={key: count for key, count in sorted(copies.items()) if count > 1},
            corrupted=dict(sorted(corrupted.items())),
            unexpected=sorted(unexpected),
            dead_lettered=sorted(dead),
            foreign=foreign,
        )


def _json(event: ReadBack) -> dict[str, Any]:
    """The JSON object of an event, however it was read back."""
    if isinstance(event, FeatureEvent | TrackingEvent):
        data: Any = msgspec.json.decode(msgspec.json.encode(event))
    elif isinstance(event, str | bytes):
        data = msgspec.json.decode(event)
    else:
        data = msgspec.json.decode(msgspec.json.encode(dict(event)))
    if not isinstance(data, dict):
        raise TypeError(f"a read-back event must be a JSON object, not {type(data).__name__}")
    return data


def _diff(want: dict[str, Any], got: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    missing = object()
    return {
        name: (want.get(name), got.get(name))
        for name in sorted(want.keys() | got.keys())
        if want.get(name, missing) != got.get(name, missing)
    }


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _some(keys: list[str]) -> str:
    more = f" ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more
