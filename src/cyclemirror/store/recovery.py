"""Rebuilding an overlay's dirty and zeroed bitmaps after a restart, without reading data.

The bitmaps live in memory only. On open they are rebuilt from two things
the kernel already keeps exact across a kill -9:

* the overlay file's allocation map (SEEK_DATA/SEEK_HOLE): every block a
  write ever reached is allocated, because writes always put whole blocks
  into an overlay and pwrite allocates;
* the zero log: every whole-block zero or trim appended its record *before*
  punching the hole.

dirty = allocated blocks | logged blocks; zeroed = logged blocks that are not
allocated (a write after a zero allocates the block again, and a zero after
a write punches it, so "allocated" always tells the later of the two).
Every block whose content differs from the layers below was written or
zeroed, so it is in this set: a safe superset of what changed, which is all
the next delta needs. The set can only be larger than the in-memory one by
operations that were in flight at the crash.

A block that is only partly allocated was torn by the crash (a multi-page
pwrite cut short, or pages lost at power failure). Its holes are filled with
what that block held just before the torn write: zeroes if the block is in
the zero log (it was a hole because a zero came last), else the image below.
The torn write was never acknowledged, so any mix of old and new is allowed,
but bytes outside it must not change.
"""

from __future__ import annotations

from collections.abc import Sequence

from cyclemirror._cext.bitmap import ExtentBitmap
from cyclemirror.store import fileops
from cyclemirror.store.layer import Layer
from cyclemirror.store.resolve import read_range


def recover_overlay(
    layer: Layer, below: Sequence[Layer], base: Layer, size: int, bs: int, nblocks: int
) -> int:
    """Fill ``layer.dirty``/``zeroed`` from disk; repair torn blocks. Returns how many were torn.

    ``below`` are the older overlays, newest first, already recovered.
    """
    logged = ExtentBitmap(nblocks)
    for start, count in layer.zlog.read_ranges(nblocks):
        logged.set_range(start, count)
    allocated = ExtentBitmap(nblocks)
    torn: set[int] = set()
    for ds, de in fileops.data_runs(layer.fd, 0, size):
        first, last = ds // bs, -(-de // bs)
        allocated.set_range(first, last - first)
        if ds % bs:
            torn.add(first)
        if de % bs:
            torn.add(last - 1)
    for block in sorted(torn):
        off = block * bs
        if logged.test(block):
            before = bytes(bs)
        else:
            before = read_range(below, base, off, bs, bs)
        pos = off
        holes = []
        for ds, de in fileops.data_runs(layer.fd, off, off + bs):
            if ds > pos:
                holes.append((pos, ds))
            pos = de
        if pos < off + bs:
            holes.append((pos, off + bs))
        for hs, he in holes:
            fileops.pwrite_all(layer.fd, before[hs - off : he - off], hs)
    zeroed = logged.copy()
    zeroed.difference_update(allocated)
    dirty = allocated
    dirty.union_update(logged)
    layer.dirty = dirty
    layer.zeroed = zeroed
    layer.has_zeroed = not zeroed.is_empty()
    return len(torn)
