"""Which layer holds each block of an image, and what kind of content it is.

An image is a stack: overlays newest first, then base. ``resolve`` cuts a
block range into segments, each owned by the newest layer whose dirty bitmap
has the block (``None`` = base). ``classify`` goes one step further and says
for every run whether it is data (with the descriptor holding the bytes at the
same offset) or zeroes: a zeroed overlay block, or a hole in base found via
SEEK_DATA/SEEK_HOLE. Both are pure functions of the layers passed in; callers
hold whatever lock keeps those layers stable.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from cyclemirror.extents import merge_adjacent
from cyclemirror.store import fileops
from cyclemirror.store.layer import Layer

DATA = "data"
ZERO = "zero"


def resolve(overlays: Sequence[Layer], b0: int, b1: int) -> list[tuple[Layer | None, int, int]]:
    """Segments (layer or None for base, first block, count) covering [b0, b1), ascending."""
    pending = [(b0, b1)]
    out: list[tuple[Layer | None, int, int]] = []
    for layer in overlays:
        if not pending:
            break
        still = []
        for s, e in pending:
            pos = s
            for rs, rl in layer.dirty.iter_runs(s, e):
                if rs > pos:
                    still.append((pos, rs))
                out.append((layer, rs, rl))
                pos = rs + rl
            if pos < e:
                still.append((pos, e))
        pending = still
    out.extend((None, s, e - s) for s, e in pending)
    out.sort(key=lambda seg: seg[1])
    return out


def _base_kinds(base: Layer, s: int, count: int, bs: int) -> Iterator[tuple[int, int, str, int]]:
    # A base block partly allocated counts as data: rounding outward keeps it a superset.
    pos, end = s, s + count
    for ds, de in fileops.data_runs(base.fd, s * bs, end * bs):
        first = max(ds // bs, pos)
        last = min(-(-de // bs), end)
        if first > pos:
            yield pos, first - pos, ZERO, -1
        if last > first:
            yield first, last - first, DATA, base.fd
        pos = max(pos, last)
    if pos < end:
        yield pos, end - pos, ZERO, -1


def _overlay_kinds(layer: Layer, s: int, count: int) -> Iterator[tuple[int, int, str, int]]:
    if not layer.has_zeroed:
        yield s, count, DATA, layer.fd
        return
    pos, end = s, s + count
    for zs, zl in layer.zeroed.iter_runs(s, end):
        if zs > pos:
            yield pos, zs - pos, DATA, layer.fd
        yield zs, zl, ZERO, -1
        pos = zs + zl
    if pos < end:
        yield pos, end - pos, DATA, layer.fd


def classify(
    overlays: Sequence[Layer], base: Layer, b0: int, b1: int, bs: int, max_run: int = 0
) -> Iterator[tuple[int, int, str, int]]:
    """Runs (first block, count, kind, fd) over [b0, b1), ascending, adjacent equal runs merged.

    ``fd`` is -1 for zero runs. ``max_run`` > 0 caps the length of every run.
    """
    def parts() -> Iterator[tuple[int, int, tuple[str, int]]]:
        for layer, s, c in resolve(overlays, b0, b1):
            kinds = _base_kinds(base, s, c, bs) if layer is None else _overlay_kinds(layer, s, c)
            for ps, pc, kind, fd in kinds:
                yield ps, pc, (kind, fd)

    for s, c, (kind, fd) in merge_adjacent(parts()):
        yield from _capped((s, c, kind, fd), max_run)


def _capped(run: tuple[int, int, str, int], max_run: int) -> Iterator[tuple[int, int, str, int]]:
    s, c, kind, fd = run
    if max_run <= 0 or c <= max_run:
        yield run
        return
    while c > 0:
        n = min(c, max_run)
        yield s, n, kind, fd
        s += n
        c -= n


def read_range(overlays: Sequence[Layer], base: Layer, offset: int, length: int, bs: int) -> bytes:
    """The bytes of the image at [offset, offset + length): each block from its owning layer."""
    if length == 0:
        return b""
    b0 = offset // bs
    b1 = (offset + length + bs - 1) // bs
    # Fast path: the whole range lives in one layer (the common case for small reads).
    for layer in overlays:
        n = layer.dirty.count_range(b0, b1 - b0)
        if n == b1 - b0:
            return fileops.pread_exact(layer.fd, length, offset)
        if n:
            break
    else:
        return fileops.pread_exact(base.fd, length, offset)
    buf = bytearray(length)
    view = memoryview(buf)
    end = offset + length
    for layer, s, c in resolve(overlays, b0, b1):
        lo = max(s * bs, offset)
        hi = min((s + c) * bs, end)
        fd = base.fd if layer is None else layer.fd
        fileops.preadv_into(fd, view[lo - offset : hi - offset], lo)
    return bytes(buf)
