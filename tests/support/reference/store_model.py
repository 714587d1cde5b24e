"""A tiny in-memory model of one store volume: what every read and frozen image must return.

The model keeps the whole view as a bytearray and, per frozen cycle, a copy
of the image at its freeze plus the exact sets of blocks its overlay touched
(``dirty``) and of those whose last touch was a whole-block zero or trim
(``zeroed``). It knows nothing about layers or files: it is the meaning the
store must implement, written as plainly as possible.
"""

from __future__ import annotations


class VolumeModel:
    def __init__(self, size: int, block_size: int):
        self.size = size
        self.block_size = block_size
        self.view = bytearray(size)
        self.open_overlay = 0
        self.merged_through = -1
        self.touched: set[int] = set()
        self.zeroed: set[int] = set()
        # cycle number -> (image bytes, dirty blocks, zeroed blocks, dirty of a full cycle is None)
        self.frozen: dict[int, tuple[bytes, set[int] | None, set[int] | None]] = {}

    def _blocks(self, offset: int, length: int) -> range:
        bs = self.block_size
        if length == 0:
            return range(0)  # an empty request touches no block
        return range(offset // bs, (offset + length + bs - 1) // bs)

    def write(self, offset: int, data: bytes) -> None:
        self.view[offset : offset + len(data)] = data
        for b in self._blocks(offset, len(data)):
            self.touched.add(b)
            self.zeroed.discard(b)

    def write_zeroes(self, offset: int, length: int) -> None:
        bs = self.block_size
        self.view[offset : offset + length] = bytes(length)
        for b in self._blocks(offset, length):
            self.touched.add(b)
            if offset <= b * bs and (b + 1) * bs <= offset + length:
                self.zeroed.add(b)
            else:
                self.zeroed.discard(b)

    trim = write_zeroes  # the store makes trimmed ranges read back as zeroes

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.view[offset : offset + length])

    def freeze(self) -> int:
        k = self.open_overlay + 1
        if k == 1:
            self.frozen[k] = (bytes(self.view), None, None)
        else:
            self.frozen[k] = (bytes(self.view), set(self.touched), set(self.zeroed))
        self.touched, self.zeroed = set(), set()
        self.open_overlay = k
        return k

    def frozen_cycles(self) -> list[int]:
        """Cycles whose overlay (number - 1) is frozen and not merged yet."""
        return list(range(self.merged_through + 2, self.open_overlay + 1))

    def merge_through(self, overlay: int) -> None:
        assert overlay < self.open_overlay
        self.merged_through = max(self.merged_through, overlay)
        for c in [c for c in self.frozen if c <= self.merged_through + 1]:
            del self.frozen[c]
