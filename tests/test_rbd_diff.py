"""``Image.diff``: what changed in an RBD image since a snapshot (``rbd_diff_iterate2``).

The building block of a failback from an RBD volume (the blocks a promoted
image wrote since its cycle snapshot are what the old primary lacks): a range
it leaves out would never reach the old primary, so the property that
matters is that nothing that differs is missed.  Against the session's real
one-node cluster: random writes, write-zeroes and discards after a snapshot;
every byte where the head differs from the snapshot lies in a reported
extent, the extents are ordered, disjoint and inside the image, and they
reach no object the operations left alone (an object made after the snapshot
is reported from its start to its end: Ceph knows it is new, not which of
its bytes were written).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

KiB, MiB = 1 << 10, 1 << 20
SIZE = 8 * MiB  # two 4 MiB objects


def _fresh(io, name: str):
    from cyclemirror.receiver.rbdbackend import remove_image

    remove_image(io, name)
    io.create(name, SIZE)
    return io.open(name)


def _runs(a: bytes, b: bytes, step: int = 4 * KiB) -> list[tuple[int, int]]:
    """The 4 KiB blocks where ``a`` and ``b`` differ, as (offset, length) runs."""
    out = []
    for off in range(0, len(a), step):
        if a[off:off + step] != b[off:off + step]:
            if out and out[-1][0] + out[-1][1] == off:
                out[-1] = (out[-1][0], out[-1][1] + step)
            else:
                out.append((off, step))
    return out


def _covered(extents, off: int, length: int) -> bool:
    end = off + length
    for e_off, e_len, _exists in extents:
        if e_off <= off < e_off + e_len:
            off = e_off + e_len
            if off >= end:
                return True
    return off >= end


_op = st.tuples(st.sampled_from(["write", "zero", "discard"]),
                st.integers(0, SIZE // (4 * KiB) - 1),  # first block
                st.integers(1, 300))  # blocks (up to 1.2 MiB, across objects)
OBJECT_BLOCKS = (4 * MiB) // (4 * KiB)


@pytest.fixture(scope="module")
def prop_image(rbd_io):
    img = _fresh(rbd_io, "diff-prop")  # one image for every example: snapshots cost
    yield img
    img.close()


@settings(max_examples=4, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=st.lists(st.tuples(st.integers(0, SIZE // MiB - 1), st.integers(1, 3)),
                      max_size=3),
       ops=st.lists(_op, min_size=1, max_size=6))
def test_diff_since_a_snapshot_misses_nothing_that_differs(rbd_io, prop_image, first, ops):
    img = prop_image
    for mib, count in first:  # more data before the snapshot (sparse)
        n = min(count, SIZE // MiB - mib)
        img.write(os.urandom(n * MiB), mib * MiB)
    img.flush()
    for snap, _size in img.snap_list():
        img.snap_remove(snap)  # the previous example's
    img.snap_create("base")
    touched = set()
    for kind, block, count in ops:
        off = block * 4 * KiB
        length = min(count * 4 * KiB, SIZE - off)
        if kind == "write":
            img.write(os.urandom(length), off)
        elif kind == "zero":
            img.write_zeroes(off, length)
        else:
            img.discard(off, length)
        touched.update(range(off // (4 * KiB), (off + length) // (4 * KiB)))
    img.flush()
    extents = img.diff("base")
    before = rbd_io.open("diff-prop", "base", read_only=True)
    try:
        old = before.read(0, SIZE)
    finally:
        before.close()
    new = img.read(0, SIZE)
    # Ordered, disjoint, inside the image.
    pos = 0
    for off, length, _exists in extents:
        assert off >= pos and length > 0 and off + length <= SIZE, extents
        pos = off + length
    # Nothing that differs is missed.
    for off, length in _runs(old, new):
        assert _covered(extents, off, length), (off, length, extents)
    # Nothing beyond the objects the operations touched, nor past the last block
    # they touched in each (an object made after the snapshot is reported from its
    # start: Ceph knows it is new, not which of its bytes were written).
    last = {}
    for b in touched:
        last[b // OBJECT_BLOCKS] = max(last.get(b // OBJECT_BLOCKS, -1), b)
    for off, length, _exists in extents:
        for b in range(off // (4 * KiB), -(-(off + length) // (4 * KiB))):
            assert b <= last.get(b // OBJECT_BLOCKS, -1), (b, extents, sorted(touched)[:20])


def test_diff_from_nothing_is_the_allocated_data_and_bad_ranges_are_refused(rbd_io):
    img = _fresh(rbd_io, "diff-alloc")
    try:
        img.write(b"\x01" * (64 * KiB), 5 * MiB)
        img.flush()
        extents = img.diff(None)
        # The object made for the write is reported from its start to the write's end.
        assert extents == [(4 * MiB, MiB + 64 * KiB, True)], extents
        assert img.diff(None, 0, 4 * MiB) == []  # the first object only: nothing there
        with pytest.raises(ValueError, match="outside"):
            img.diff(None, SIZE - 4096, 8192)
        with pytest.raises(OSError, match="nosuch"):
            img.diff("nosuch")
    finally:
        img.close()
