"""The extent-map comparison that finds what a file changed between two reflink snapshots.

``cowfs.changed_ranges`` is pure: table tests pin the rules (a range is
unchanged only where both maps hold it at the same physical place, or both
have a hole; anything the map cannot vouch for counts as changed), and a
hypothesis test checks it against a byte-by-byte twin on random maps.
The same for ``data_ranges`` (what may hold data, the rest reads as zeroes),
and the vectorised comparison against its plain twin on larger maps.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from cyclemirror.store import cowfs
from cyclemirror.store.cowfs import (
    FIEMAP_EXTENT_DELALLOC,
    FIEMAP_EXTENT_ENCODED,
    FIEMAP_EXTENT_LAST,
    FIEMAP_EXTENT_UNWRITTEN,
    changed_ranges,
    data_ranges,
)
from tests.support.reference.cowfs_ref import changed_ranges_ref, unproven_ranges_ref

K = 4096


def test_the_same_map_changed_nothing():
    m = [(0, 10 * K, 4 * K, 0), (8 * K, 50 * K, 2 * K, FIEMAP_EXTENT_LAST)]
    assert changed_ranges(m, list(m), 16 * K) == []


def test_an_extent_split_by_a_write_elsewhere_is_not_a_change():
    old = [(0, 100 * K, 8 * K, 0)]
    new = [(0, 100 * K, 3 * K, 0), (3 * K, 500 * K, K, 0), (4 * K, 104 * K, 4 * K, 0)]
    assert changed_ranges(old, new, 8 * K) == [(3 * K, 4 * K)]


def test_holes_filled_and_punched_are_changes_holes_in_both_are_not():
    old = [(4 * K, 10 * K, K, 0)]
    new = [(0, 20 * K, K, 0)]
    assert changed_ranges(old, new, 8 * K) == [(0, K), (4 * K, 5 * K)]


def test_unwritten_against_written_at_one_place_is_a_change():
    old = [(0, 10 * K, 2 * K, FIEMAP_EXTENT_UNWRITTEN)]
    new = [(0, 10 * K, K, 0), (K, 11 * K, K, FIEMAP_EXTENT_UNWRITTEN)]
    assert changed_ranges(old, new, 2 * K) == [(0, K)]


def test_what_the_map_cannot_vouch_for_is_always_changed():
    delalloc = [(0, 0, 2 * K, FIEMAP_EXTENT_DELALLOC)]
    assert changed_ranges(delalloc, delalloc, 4 * K) == [(0, 2 * K)]
    # encoded (compressed) extents: in one extent on both sides, the bytes must be
    # compared (the map cannot prove them equal); in different ones, changed
    enc = [(0, 90 * K, 4 * K, FIEMAP_EXTENT_ENCODED)]
    assert cowfs.compare_maps(enc, list(enc), 4 * K) == ([], [(0, 4 * K)])
    split = [(0, 90 * K, 2 * K, FIEMAP_EXTENT_ENCODED), (2 * K, 90 * K, 2 * K,
                                                         FIEMAP_EXTENT_ENCODED)]
    assert cowfs.compare_maps(enc, split, 4 * K) == ([], [(0, 4 * K)])
    moved = [(0, 90 * K, K, FIEMAP_EXTENT_ENCODED), (K, 95 * K, 3 * K,
                                                     FIEMAP_EXTENT_ENCODED)]
    assert cowfs.compare_maps(enc, moved, 4 * K) == ([(K, 4 * K)], [(0, K)])


def test_extents_past_the_size_are_cut_and_unwritten_reads_as_zeroes():
    m = [(0, 1, K, 0), (K, 2, K, FIEMAP_EXTENT_UNWRITTEN), (2 * K, 3, 8 * K, 0)]
    assert data_ranges(m, 4 * K) == [(0, K), (2 * K, 4 * K)]
    assert changed_ranges([], m, 4 * K) == [(0, 4 * K)]


# -- against a byte-by-byte twin -------------------------------------------------------

FLAGS = st.sampled_from([0, 0, 0, FIEMAP_EXTENT_UNWRITTEN, FIEMAP_EXTENT_ENCODED,
                         FIEMAP_EXTENT_DELALLOC])


@st.composite
def extent_maps(draw, size=64):
    out, pos = [], 0
    while pos < size + 8 and draw(st.booleans()):
        pos += draw(st.integers(0, 6))
        length = draw(st.integers(1, 12))
        out.append((pos, draw(st.integers(0, 40)), length, draw(FLAGS)))
        pos += length
    return out


def _key(m, x):
    for logical, physical, length, flags in m:
        if logical <= x < logical + length:
            if flags & cowfs.UNTRUSTED_FLAGS:
                return object()
            if flags & FIEMAP_EXTENT_ENCODED:
                return ("e", physical)
            return ("r", physical + x - logical, bool(flags & FIEMAP_EXTENT_UNWRITTEN))
    return None


def _runs(xs):
    out = []
    for x in xs:
        if out and out[-1][1] == x:
            out[-1] = (out[-1][0], x + 1)
        else:
            out.append((x, x + 1))
    return out


@settings(max_examples=200, deadline=None)
@given(extent_maps(), extent_maps(), st.integers(1, 64))
def test_changed_ranges_matches_a_byte_by_byte_twin(old, new, size):
    want = []
    for x in range(size):
        a, b = _key(old, x), _key(new, x)
        if not (a is None and b is None or a == b):
            want.append(x)
    assert changed_ranges(old, new, size) == _runs(want)


@settings(max_examples=200, deadline=None)
@given(extent_maps(), st.integers(1, 64))
def test_data_ranges_matches_a_byte_by_byte_twin(m, size):
    want = [x for x in range(size) if any(
        lo <= x < lo + n and (not f & FIEMAP_EXTENT_UNWRITTEN or f & cowfs.UNTRUSTED_FLAGS)
        for lo, _p, n, f in m)]
    assert data_ranges(m, size) == _runs(want)


def random_map(rnd) -> list:
    """Up to 60 extents; physical places drawn from few bases, so stretches shared between
    two maps are common, as between two snapshots."""
    out, pos = [], rnd.randrange(4) * K
    for _ in range(rnd.randrange(61)):
        pos += rnd.choice([0, 0, K, 5 * K])
        length = rnd.randint(1, 16) * K
        out.append((pos, rnd.choice([10, 20, 30]) * K * 1000 + pos, length,
                    rnd.choice([0, 0, 0, FIEMAP_EXTENT_UNWRITTEN, FIEMAP_EXTENT_ENCODED,
                                FIEMAP_EXTENT_DELALLOC])))
        pos += length
    return out


@settings(max_examples=150, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(1, 1200))
def test_the_vectorised_comparison_equals_its_plain_twin(rnd, blocks):
    old, new = random_map(rnd), random_map(rnd)
    if rnd.random() < 0.5:  # the new map: the old one with a few extents moved
        new = [(lo, p + (K << 20) if rnd.random() < 0.2 else p, n, f) for lo, p, n, f in old]
    assert cowfs.compare_maps(old, new, blocks * K) == (
        changed_ranges_ref(old, new, blocks * K), unproven_ranges_ref(old, new, blocks * K))


@settings(max_examples=60, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(1, 200))
def test_small_maps_compared_in_plain_python_equal_the_vectorised_way(rnd, blocks):
    """Maps of up to SMALL_MAPS extents in all are compared by a plain loop (cheaper than
    numpy's set-up for the small files of a tree): the same answers as numpy's and
    the twin's."""
    old = random_map(rnd)[:rnd.randrange(9)]
    new = random_map(rnd)[:rnd.randrange(9)]
    if rnd.random() < 0.5:
        new = [(lo, p + (K << 20) if rnd.random() < 0.2 else p, n, f) for lo, p, n, f in old]
    want = (changed_ranges_ref(old, new, blocks * K), unproven_ranges_ref(old, new, blocks * K))
    assert len(old) + len(new) <= cowfs.SMALL_MAPS
    assert cowfs.compare_maps(old, new, blocks * K) == want
    small = cowfs.SMALL_MAPS
    cowfs.SMALL_MAPS = -1  # the numpy way for the same maps
    try:
        assert cowfs.compare_maps(old, new, blocks * K) == want
    finally:
        cowfs.SMALL_MAPS = small
