"""Pure-Python model of cyclemirror._cext.bitmap.ExtentBitmap.

The set bits are kept as a sorted list of disjoint, non-adjacent half-open
intervals ``[start, end)``, so ranges of 2**40 bits cost nothing and every
operation is a few lines that can be checked by eye.  ``encode`` writes the
on-disk format from its specification (docs/cext-bitmap.md) independently of
the compiled encoder, using the ``xxhash`` package for the checksum.
"""

from __future__ import annotations

import struct

import xxhash

LEAF_BITS = 32768
MAGIC = b"CMBITMAP"
VERSION = 1


class RefBitmap:
    def __init__(self, nbits: int):
        if not 0 <= nbits <= 1 << 48:
            raise IndexError(f"nbits {nbits}")
        self.nbits = nbits
        self.intervals: list[tuple[int, int]] = []

    def _check(self, start: int, count: int) -> None:
        if start < 0 or count < 0 or start + count > self.nbits:
            raise IndexError(f"range [{start}, {start + count}) outside [0, {self.nbits})")

    def _normalize(self, intervals) -> None:
        merged: list[list[int]] = []
        for s, e in sorted(i for i in intervals if i[0] < i[1]):
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        self.intervals = [(s, e) for s, e in merged]

    def set_range(self, start: int, count: int) -> None:
        self._check(start, count)
        self._normalize(self.intervals + [(start, start + count)])

    def clear_range(self, start: int, count: int) -> None:
        self._check(start, count)
        self._subtract([(start, start + count)])

    def _subtract(self, cuts) -> None:
        out = []
        for s, e in self.intervals:
            pieces = [(s, e)]
            for cs, ce in cuts:
                pieces = [p for ps, pe in pieces for p in ((ps, min(pe, cs)), (max(ps, ce), pe))]
            out.extend(pieces)
        self._normalize(out)

    def test(self, bit: int) -> bool:
        self._check(bit, 1)
        return any(s <= bit < e for s, e in self.intervals)

    def count_range(self, start: int, count: int) -> int:
        self._check(start, count)
        end = start + count
        return sum(max(0, min(e, end) - max(s, start)) for s, e in self.intervals)

    def count(self) -> int:
        return sum(e - s for s, e in self.intervals)

    def any_in_range(self, start: int, count: int) -> bool:
        return self.count_range(start, count) > 0

    def is_empty(self) -> bool:
        return not self.intervals

    def iter_runs(self, start: int = 0, stop: int | None = None, max_run: int = 0):
        stop = self.nbits if stop is None else stop
        if not 0 <= start <= stop <= self.nbits or max_run < 0:
            raise IndexError("span")
        for s, e in self.intervals:
            s, e = max(s, start), min(e, stop)
            while s < e:
                piece = e - s if max_run == 0 else min(max_run, e - s)
                yield (s, piece)
                s += piece

    def union_update(self, other: RefBitmap) -> None:
        self._normalize(self.intervals + other.intervals)

    def difference_update(self, other: RefBitmap) -> None:
        self._subtract(list(other.intervals))

    def intersection_update(self, other: RefBitmap) -> None:
        out = [
            (max(s, os_), min(e, oe))
            for s, e in self.intervals
            for os_, oe in other.intervals
        ]
        self._normalize(out)

    def nonempty_leaves(self) -> list[int]:
        leaves: set[int] = set()
        for s, e in self.intervals:
            leaves.update(range(s // LEAF_BITS, (e - 1) // LEAF_BITS + 1))
        return sorted(leaves)

    def leaf_bytes(self, leaf: int) -> bytes:
        lo, hi = leaf * LEAF_BITS, (leaf + 1) * LEAF_BITS
        value = 0
        for s, e in self.intervals:
            s, e = max(s, lo), min(e, hi)
            if s < e:
                value |= ((1 << (e - s)) - 1) << (s - lo)
        return value.to_bytes(LEAF_BITS // 8, "little")

    def encode(self) -> bytes:
        leaves = self.nonempty_leaves()
        parts = [MAGIC, struct.pack("<IIQQQ", VERSION, LEAF_BITS, self.nbits, len(leaves), self.count())]
        for leaf in leaves:
            parts.append(struct.pack("<Q", leaf))
            parts.append(self.leaf_bytes(leaf))
        body = b"".join(parts)
        return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))
