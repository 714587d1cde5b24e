"""cyclemirror._cext.btrfsitems against the pure-Python twin in tests/support/reference.

Proves: for buffers of search records as ``BTRFS_IOC_TREE_SEARCH_V2`` lays
them out (inode items, directory items holding several entries, other item
kinds, extended-attribute items, transids either side of the threshold), the Cython parser finds the
same changed inodes and the same last key as the reference; for buffers cut
short, lengths that run past the buffer or the item, inode items too short to
hold their transid, and ``nr_items`` beyond what the buffer holds, both raise
ValueError; a negative ``nr_items`` is refused.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyclemirror._cext import btrfsitems
from tests.support.reference import btrfsitems_ref
from tests.support.tools import SLOW

HEADER = struct.Struct("<QQQII")
U64 = st.integers(0, (1 << 64) - 1)
TRANSIDS = st.integers(0, 40)  # around the thresholds drawn below


def inode_item(transid: int, rest: bytes) -> bytes:
    return rest[:8].ljust(8, b"\0") + transid.to_bytes(8, "little") + rest[8:]


def dir_entry(transid: int, name: bytes, data: bytes) -> bytes:
    return (bytes(17) + transid.to_bytes(8, "little") + len(data).to_bytes(2, "little")
            + len(name).to_bytes(2, "little") + b"\x01" + name + data)


inode_items = st.builds(lambda t, r: (1, inode_item(t, r)), TRANSIDS, st.binary(max_size=150))
dir_items = st.builds(
    lambda typ, entries: (typ, b"".join(dir_entry(*e) for e in entries)),
    st.sampled_from([84, 96, 24]),  # directory items and indexes, xattr items
    st.lists(st.tuples(TRANSIDS, st.binary(max_size=20), st.binary(max_size=8)), max_size=3))
other_items = st.tuples(st.sampled_from([0, 12, 13, 108, 255]), st.binary(max_size=60))
records = st.lists(st.tuples(U64, st.integers(0, 600), U64,
                             st.one_of(inode_items, dir_items, other_items)), max_size=12)


def layout(recs) -> bytes:
    return b"".join(HEADER.pack(leaf, objectid, offset, typ, len(body)) + body
                    for leaf, objectid, (typ, body), offset in
                    ((r[0], r[1], r[3], r[2]) for r in recs))


def both(buf: bytes, nr: int, since: int):
    """Each scan's (answer, changed, later); ``later`` must be what a scan from
    ``since + 1`` finds, and only those."""
    out = []
    for f in (btrfsitems.scan_items, btrfsitems_ref.scan_items):
        changed: set[int] = set()
        later: set[int] = set()
        try:
            out.append((f(buf, nr, since, changed, later), changed, later))
        except ValueError:
            out.append(ValueError)
            continue
        if since + 1 < 1 << 64:
            after: set[int] = set()
            assert f(buf, nr, since + 1, after) == out[-1][0]
            assert later == after
        assert later <= changed
    return out


@given(recs=records, since=TRANSIDS)
@settings(max_examples=1000 if SLOW else 100, deadline=None)
def test_well_formed_buffers_match_the_reference(recs, since):
    buf = layout(recs) + bytes(64)  # the kernel's buffer is larger than what it filled
    fast, ref = both(buf, len(recs), since)
    assert fast == ref
    (n, last), changed, _later = fast
    assert n == len(recs)
    assert last == (None if not recs else (recs[-1][1], recs[-1][3][0], recs[-1][2]))
    # every inode item at or after the threshold is found, none before it
    for _, objectid, _, (typ, body) in recs:
        if typ == 1 and len(body) >= 16 and int.from_bytes(body[8:16], "little") >= since:
            assert objectid in changed
    # and every inode with an xattr (set) at or after it: the same entry layout
    for _, objectid, _, (typ, body) in recs:
        q = 0
        while typ == 24 and q < len(body):
            if int.from_bytes(body[q + 17:q + 25], "little") >= since:
                assert objectid in changed
            q += 30 + int.from_bytes(body[q + 25:q + 27], "little") + int.from_bytes(
                body[q + 27:q + 29], "little")


@given(recs=records, since=TRANSIDS, cut=st.integers(0, 1 << 12), extra=st.integers(0, 3),
       flip=st.tuples(st.integers(0, 1 << 12), st.integers(0, 255)))
@settings(max_examples=1000 if SLOW else 150, deadline=None)
def test_broken_buffers_are_refused_alike(recs, since, cut, extra, flip):
    buf = bytearray(layout(recs))
    if buf:
        buf[flip[0] % len(buf)] = flip[1]  # a length, a type, a transid or a name byte
    buf = bytes(buf[:cut])
    fast, ref = both(buf, len(recs) + extra, since)
    assert fast == ref


def test_short_inode_items_and_runaway_lengths_raise():
    short = HEADER.pack(9, 300, 0, 1, 8) + bytes(8)
    with pytest.raises(ValueError, match="inode item 300 is 8 bytes"):
        btrfsitems.scan_items(short, 1, 0, set())
    runaway = HEADER.pack(9, 300, 0, 108, 100) + bytes(50)
    with pytest.raises(ValueError, match="runs past"):
        btrfsitems.scan_items(runaway, 1, 0, set())
    bad_entry = HEADER.pack(9, 256, 5, 96, 31) + dir_entry(7, b"ab", b"")[:31]
    with pytest.raises(ValueError, match="directory 256"):
        btrfsitems.scan_items(bad_entry, 1, 0, set())
    with pytest.raises(ValueError, match="nr_items"):
        btrfsitems.scan_items(b"", -1, 0, set())
    assert btrfsitems.scan_items(b"", 0, 0, set()) == (0, None)
