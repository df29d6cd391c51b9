"""Sets of spool sequence numbers kept as ranges: the damage a spool found and counted."""

from __future__ import annotations

import bisect

__all__ = ["SequenceRanges"]


class SequenceRanges:
    """Sorted, disjoint, non-adjacent ``(first, last)`` ranges of sequence numbers."""

    def __init__(self, spans: list[tuple[int, int]]) -> None:
        self.spans = spans
        self._firsts = [first for first, _ in spans]

    @classmethod
    def merge(cls, spans: list[tuple[int, int]]) -> SequenceRanges:
        """The ranges covering ``spans`` (in any order, overlapping or adjacent)."""
        merged: list[tuple[int, int]] = []
        for first, last in sorted(spans):
            if merged and first <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], last))
            else:
                merged.append((first, last))
        return cls(merged)

    @property
    def total(self) -> int:
        """How many sequence numbers these ranges hold."""
        return sum(last - first + 1 for first, last in self.spans)

    def contains(self, n: int) -> bool:
        """True when ``n`` is in one of these ranges."""
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
        """How many sequence numbers of these ranges are after ``position``."""
        return sum(b - max(a, position + 1) + 1 for a, b in self.spans if b > position)

    def above(self, position: int) -> list[tuple[int, int]]:
        """These ranges cut to the sequence numbers after ``position``."""
        return [(max(a, position + 1), b) for a, b in self.spans if b > position]
