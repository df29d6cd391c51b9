"""Spool damage against a plain model (hypothesis, stateful): the spool always starts,
every intact event comes back byte for byte and in order, and the damaged ones are
counted exactly."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from flagsink.event import FeatureEvent, new_feature_event
from flagsink.spool import DB_NAME, Spool, SpoolConsumer, SpoolSettings
from flagsink.spool_recovery import scan_rows

NAMES = ("a", "b")
PAGE = 4096


def ev(i: int) -> FeatureEvent:
    return new_feature_event(f"u{i}", "flag", {"n": i, "pad": "x" * (i % 37)}, "v", creation_date=i)


def encoded(event: FeatureEvent) -> bytes:
    return msgspec.msgpack.encode(event)


class SpoolDamage(RuleBasedStateMachine):
    """The model: per exporter, the events it has not handled yet, in order."""

    @initialize()
    def open_first(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="spool-damage-"))
        self.next = 0
        self.pending: dict[str, list[FeatureEvent]] = {n: [] for n in NAMES}
        self.lost: dict[str, int] = dict.fromkeys(NAMES, 0)
        self.base: dict[str, dict[str, int]] = {n: {} for n in NAMES}
        self._open()

    def _open(self) -> None:
        self.spool = Spool(SpoolSettings(dir=str(self.dir)))
        self.consumers: dict[str, SpoolConsumer] = {n: self.spool.consumer(n) for n in NAMES}
        self.spool.start()

    def teardown(self) -> None:
        self.spool.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(count=st.integers(1, 300))
    def append(self, count: int) -> None:
        events = [ev(self.next + i) for i in range(count)]
        self.next += count
        self.spool.append_many(events)
        assert self.spool.sync(5)
        for name in NAMES:
            self.pending[name].extend(events)

    @rule(name=st.sampled_from(NAMES), count=st.integers(1, 400))
    def deliver(self, name: str, count: int) -> None:
        consumer = self.consumers[name]
        events, _, last, damaged = consumer.read(count)
        expected = self.pending[name][: len(events)]
        assert events == expected
        assert damaged == 0  # damage is found on open, never later without new damage
        if last >= consumer.position + 1:
            assert consumer.confirm(last, len(events))
        del self.pending[name][: len(events)]

    @rule()
    def restart(self) -> None:
        self.spool.close()
        self._open()
        self._check_recovered(damage_expected=False)

    @precondition(lambda self: any(self.pending[n] for n in NAMES))
    @rule(data=st.data())
    def corrupt_one_event(self, data: st.DataObject) -> None:
        """One byte flipped inside one stored event: exactly that event is lost."""
        candidates = sorted({encoded(e) for n in NAMES for e in self.pending[n]})
        self.spool.close()
        path = self.dir / DB_NAME
        blob = bytearray(path.read_bytes())
        target = data.draw(st.sampled_from(candidates))
        at = blob.find(target)
        if at < 0:  # pragma: no cover - every pending event is in the closed file
            raise AssertionError("pending event not found in the database file")
        blob[at + data.draw(st.integers(0, len(target) - 1))] ^= 0x5A
        path.write_bytes(bytes(blob))
        self._open()
        self._check_recovered(damage_expected=True, exactly_lost={target})

    @precondition(lambda self: any(self.pending[n] for n in NAMES))
    @rule(fraction=st.floats(0.05, 0.95))
    def truncate(self, fraction: float) -> None:
        """The file cut short: every event still whole in what is left comes back."""
        self.spool.close()
        path = self.dir / DB_NAME
        size = path.stat().st_size
        with open(path, "r+b") as handle:
            handle.truncate(int(size * fraction))
        survivors = path.read_bytes()
        self._open()
        self._check_recovered(damage_expected=True, survivors=survivors)

    @precondition(lambda self: any(self.pending[n] for n in NAMES))
    @rule(data=st.data())
    def scramble_a_page(self, data: st.DataObject) -> None:
        """Bytes of a page holding events overwritten: the rest comes back, the loss is
        counted exactly."""
        self.spool.close()
        path = self.dir / DB_NAME
        blob = bytearray(path.read_bytes())
        pages = [
            number
            for number in range(1, len(blob) // PAGE)
            if scan_rows_in_page(bytes(blob[number * PAGE : (number + 1) * PAGE]))
        ]
        if pages:
            number = data.draw(st.sampled_from(pages))
            start = number * PAGE + data.draw(st.integers(0, PAGE - 64))
            length = data.draw(st.integers(1, 64))
            blob[start : start + length] = bytes(
                data.draw(st.binary(min_size=length, max_size=length))
            )
            path.write_bytes(bytes(blob))
        self._open()
        self._check_recovered(damage_expected=True)

    def _check_recovered(
        self,
        *,
        damage_expected: bool,
        exactly_lost: set[bytes] | None = None,
        survivors: bytes | None = None,
    ) -> None:
        for name in NAMES:
            consumer = self.consumers[name]
            events, _, _, damaged = consumer.read(10**9)
            consumer.rewind()
            counted = consumer.stats().dropped_by_reason.get("damaged", 0) - self.base[name].get(
                "damaged", 0
            )
            model = self.pending[name]
            # In order, byte for byte, nothing invented: a subsequence of the model.
            it = iter(model)
            assert all(any(e == m for m in it) for e in events), "recovered events differ"
            # Exactly counted.
            assert len(events) + counted + damaged == len(model)
            if not damage_expected:
                assert counted == damaged == 0
            if exactly_lost is not None:
                assert [e for e in model if encoded(e) not in exactly_lost] == events
            if survivors is not None:
                assert [e for e in model if encoded(e) in survivors] == events
            self.pending[name] = list(events)
            # The damaged ones are handled: the model forgets them, the spool counted them.
            self.base[name] = dict(consumer.stats().dropped_by_reason)
            self.lost[name] += counted

    @invariant()
    def accounting_holds(self) -> None:
        for consumer in self.consumers.values():
            stats = consumer.stats()
            assert stats.accepted == stats.delivered + stats.dropped + stats.pending


def scan_rows_in_page(page: bytes) -> bool:
    with tempfile.NamedTemporaryFile(suffix=".db") as handle:
        handle.write(page)
        handle.flush()
        return bool(scan_rows(Path(handle.name)))


SpoolDamage.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSpoolDamage = SpoolDamage.TestCase


class LongSpoolDamage(SpoolDamage):
    """The long variant (``nox -s faults``): many more sequences."""


LongSpoolDamage.TestCase.settings = settings(
    max_examples=int(os.environ.get("SPOOL_DAMAGE_EXAMPLES", "500")),
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSpoolDamageLong = pytest.mark.long(LongSpoolDamage.TestCase)
