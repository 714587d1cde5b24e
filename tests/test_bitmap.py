"""Tests of cyclemirror._cext.bitmap.ExtentBitmap.

The compiled bitmap is checked against the pure-Python model in
tests/support/reference/bitmap_ref.py on random operation sequences (hypothesis),
including the first and last bit, zero-length ranges, leaf boundaries and
nbits up to 2**40 and 2**48; a stateful test interleaves every operation
with save/load and copies.  A golden test pins the file bytes of a small
bitmap; corruption tests prove that torn, foreign, wrong-version and
crafted files are refused before anything is allocated.
"""

import hashlib
import os
import pickle
import random
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from cyclemirror._cext import bitmap as bitmap_module
from cyclemirror.errors import BitmapError, BitmapFormatError, BitmapRangeError, IntegrityError
from tests.support.reference.bitmap_ref import LEAF_BITS, RefBitmap

ExtentBitmap = bitmap_module.ExtentBitmap

LEAF_SIZE = 8 + LEAF_BITS // 8          # leaf record on disk / leaf payload in memory
EMPTY = ExtentBitmap(0).memory_bytes()  # a bitmap with nothing set: the root node only

# Sizes that stress the edges: word and leaf boundaries, each tree depth, the maximum.
EDGE_NBITS = [0, 1, 63, 64, 65, LEAF_BITS - 1, LEAF_BITS, LEAF_BITS + 1, 3 * LEAF_BITS,
              (1 << 24) + 1, (1 << 33) + 7, 1 << 40, 1 << 48]
MAX_SET = 3 * LEAF_BITS + 100            # caps how much one random set_range allocates

# CYCLEMIRROR_SLOW=1 multiplies the random trials by 20 (a few minutes instead of seconds).
SCALE = 20 if os.environ.get("CYCLEMIRROR_SLOW") == "1" else 1
SETTINGS = settings(deadline=None, max_examples=150 * SCALE,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- strategies ---------------------------------------------------------------

def positions(nbits):
    """A bit position in [0, nbits], biased to edges (first, last, word and leaf borders)."""
    edges = {0, nbits, max(nbits - 1, 0), nbits // 2}
    for b in (63, 64, LEAF_BITS - 1, LEAF_BITS, LEAF_BITS + 1, 1 << 24, 1 << 33):
        edges.update({b, nbits - b})
    edges = sorted(e for e in edges if 0 <= e <= nbits)
    return st.one_of(st.sampled_from(edges), st.integers(0, nbits))


@st.composite
def ranges(draw, nbits, max_count=None):
    start = draw(positions(nbits))
    room = nbits - start
    if max_count is not None:
        room = min(room, max_count)
    count = draw(st.one_of(st.just(0), st.just(room), st.integers(0, min(room, 200)),
                           st.integers(0, room)))
    return start, count


@st.composite
def operations(draw, nbits):
    kind = draw(st.sampled_from(["set", "set", "set", "clear", "clear", "test", "count",
                                 "any", "runs"]))
    if kind == "set":
        return (kind, *draw(ranges(nbits, MAX_SET)))
    if kind == "test":
        return (kind, draw(st.integers(0, nbits - 1))) if nbits else ("count", 0, 0)
    if kind == "runs":
        start, count = draw(ranges(nbits))
        return (kind, start, start + count, draw(st.sampled_from([0, 1, 7, 64, LEAF_BITS])))
    return (kind, *draw(ranges(nbits)))


nbits_strategy = st.one_of(st.sampled_from(EDGE_NBITS), st.integers(0, 1 << 20),
                           st.integers(0, 1 << 40))


def apply(op, bm, ref):
    """Run one operation on both; return both results."""
    kind, *args = op
    if kind == "set":
        return bm.set_range(*args), ref.set_range(*args)
    if kind == "clear":
        return bm.clear_range(*args), ref.clear_range(*args)
    if kind == "test":
        return bm.test(*args), ref.test(*args)
    if kind == "count":
        return bm.count_range(*args), ref.count_range(*args)
    if kind == "any":
        return bm.any_in_range(*args), ref.any_in_range(*args)
    start, stop, max_run = args
    got = list(bm.iter_runs(start, stop, max_run))
    as_array = bm.runs(start, stop, max_run)
    assert as_array.dtype == np.int64 and as_array.shape == (len(got), 2)
    assert [tuple(r) for r in as_array.tolist()] == got
    return got, list(ref.iter_runs(start, stop, max_run))


def assert_same(bm, ref):
    assert bm.nbits == ref.nbits
    assert bm.count() == ref.count()
    assert bm.is_empty() == ref.is_empty()
    assert list(bm.iter_runs()) == list(ref.iter_runs())
    leaves = len(ref.nonempty_leaves())
    # memory follows what is set: one leaf per non-empty leaf, plus a few nodes per leaf
    assert bm.memory_bytes() >= EMPTY + leaves * (LEAF_SIZE)
    assert bm.memory_bytes() <= EMPTY + leaves * (LEAF_SIZE + 3 * EMPTY)
    if leaves == 0:
        assert bm.memory_bytes() == EMPTY


def build(nbits, ops):
    bm, ref = ExtentBitmap(nbits), RefBitmap(nbits)
    for op in ops:
        apply(op, bm, ref)
    return bm, ref


# ---- the compiled module is what we test ------------------------------------------

def test_compiled_module_is_loaded_not_a_python_fallback():
    assert bitmap_module.__file__.endswith(".so")
    assert type(ExtentBitmap.set_range).__name__ in ("cython_function_or_method", "method_descriptor")


# ---- differential property tests ------------------------------------------------------

@SETTINGS
@given(st.data())
def test_random_operation_sequences_match_the_reference(data):
    nbits = data.draw(nbits_strategy, label="nbits")
    bm, ref = ExtentBitmap(nbits), RefBitmap(nbits)
    for _ in range(data.draw(st.integers(1, 25), label="length")):
        op = data.draw(operations(nbits), label="op")
        got, want = apply(op, bm, ref)
        assert got == want, op
        assert bm.count() == ref.count(), op
    assert_same(bm, ref)
    if len(ref.nonempty_leaves()) <= 8:
        assert bm.to_bytes() == ref.encode()


@SETTINGS
@given(st.data())
def test_union_difference_intersection_match_the_reference(data):
    nbits = data.draw(nbits_strategy, label="nbits")
    ops_a = data.draw(st.lists(operations(nbits), max_size=8), label="a")
    ops_b = data.draw(st.lists(operations(nbits), max_size=8), label="b")
    for method in ("union_update", "difference_update", "intersection_update"):
        a, ref_a = build(nbits, ops_a)
        b, ref_b = build(nbits, ops_b)
        getattr(a, method)(b)
        getattr(ref_a, method)(ref_b)
        assert_same(a, ref_a)
        assert_same(b, ref_b)            # the argument is never changed
        assert (a == ExtentBitmap.from_bytes(a.to_bytes()))


@SETTINGS
@given(st.data())
def test_max_run_splits_long_runs_exactly_like_the_reference(data):
    nbits = data.draw(st.integers(1, 1 << 22))
    bm, ref = build(nbits, data.draw(st.lists(operations(nbits), max_size=6)))
    start, count = data.draw(ranges(nbits, 1 << 21))
    bm.set_range(start, count)
    ref.set_range(start, count)
    max_run = data.draw(st.integers(1, 1 << 16))
    runs = list(bm.iter_runs(max_run=max_run))
    assert runs == list(ref.iter_runs(max_run=max_run))
    assert all(0 < n <= max_run for _, n in runs)
    assert sum(n for _, n in runs) == ref.count()


@SETTINGS
@given(st.data())
def test_persistence_roundtrip_equals_the_original(data):
    nbits = data.draw(nbits_strategy)
    bm, ref = build(nbits, data.draw(st.lists(operations(nbits), max_size=10)))
    back = ExtentBitmap.from_bytes(bm.to_bytes())
    assert back == bm
    assert_same(back, ref)
    assert pickle.loads(pickle.dumps(bm)) == bm


class BitmapMachine(RuleBasedStateMachine):
    """Interleaves every mutation with copies, save/load and cross-checks."""

    @initialize(nbits=st.sampled_from([1, 64, LEAF_BITS + 3, 5 * LEAF_BITS, (1 << 33) + 5]))
    def start(self, nbits):
        self.bm, self.ref = ExtentBitmap(nbits), RefBitmap(nbits)
        self.snapshot = None

    @rule(data=st.data())
    def set_range(self, data):
        start, count = data.draw(ranges(self.ref.nbits, MAX_SET))
        self.bm.set_range(start, count)
        self.ref.set_range(start, count)

    @rule(data=st.data())
    def clear_range(self, data):
        start, count = data.draw(ranges(self.ref.nbits))
        self.bm.clear_range(start, count)
        self.ref.clear_range(start, count)

    @rule(data=st.data())
    def refused_range_changes_nothing(self, data):
        nbits = self.ref.nbits
        start = data.draw(st.integers(0, nbits))
        count = data.draw(st.integers(nbits - start + 1, nbits - start + 1 + (1 << 50)))
        before = self.bm.to_bytes()
        for method in (self.bm.set_range, self.bm.clear_range, self.bm.count_range,
                       self.bm.any_in_range):
            with pytest.raises(BitmapRangeError):
                method(start, count)
        assert self.bm.to_bytes() == before

    @rule()
    def take_snapshot(self):
        self.snapshot = (self.bm.copy(), RefBitmap(self.ref.nbits))
        self.snapshot[1].intervals = list(self.ref.intervals)

    @rule(method=st.sampled_from(["union_update", "difference_update", "intersection_update"]))
    def combine_with_snapshot(self, method):
        if self.snapshot is None:
            return
        getattr(self.bm, method)(self.snapshot[0])
        getattr(self.ref, method)(self.snapshot[1])
        assert_same(*self.snapshot)

    @rule()
    def save_and_load(self):
        self.bm = ExtentBitmap.from_bytes(self.bm.to_bytes())

    @invariant()
    def matches_reference(self):
        if hasattr(self, "bm"):
            assert_same(self.bm, self.ref)


TestBitmapMachine = BitmapMachine.TestCase
TestBitmapMachine.settings = settings(max_examples=40 * SCALE, stateful_step_count=30, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])


# ---- edges and memory --------------------------------------------------------------

@pytest.mark.parametrize("nbits", EDGE_NBITS[1:])
def test_first_and_last_bit_are_usable_at_every_size(nbits):
    bm = ExtentBitmap(nbits)
    bm.set_range(0, 1)
    bm.set_range(nbits - 1, 1)
    assert bm.test(0) and bm.test(nbits - 1)
    assert bm.count() == (1 if nbits == 1 else 2)
    assert bm.count_range(0, nbits) == bm.count()
    want = [(0, 1)] if nbits == 1 else ([(0, 2)] if nbits == 2 else [(0, 1), (nbits - 1, 1)])
    assert list(bm.iter_runs()) == want
    bm.clear_range(0, nbits)
    assert bm.is_empty() and bm.memory_bytes() == EMPTY


def test_zero_length_ranges_are_valid_everywhere_including_at_nbits():
    bm = ExtentBitmap(100)
    for start in (0, 50, 100):
        bm.set_range(start, 0)
        bm.clear_range(start, 0)
        assert bm.count_range(start, 0) == 0
        assert not bm.any_in_range(start, 0)
        assert list(bm.iter_runs(start, start)) == []
    assert bm.is_empty() and bm.memory_bytes() == EMPTY
    assert ExtentBitmap(0).runs().shape == (0, 2)


def test_16tib_volume_with_1gib_dirty_in_clusters_holds_a_few_mib():
    nbits = 1 << 32                       # 16 TiB at 4 KiB blocks
    bm = ExtentBitmap(nbits)
    starts = [0, 3 << 28, 5 << 29, nbits - (1 << 16)]
    for s in starts:
        bm.set_range(s, 1 << 16)          # four clusters of 256 MiB: 1 GiB in all
    assert bm.count() == 1 << 18
    assert bm.memory_bytes() < 2 << 20, bm.memory_bytes()   # a flat bitmap would be 512 MiB
    assert list(bm.iter_runs()) == [(s, 1 << 16) for s in starts]
    bm.clear_range(0, nbits)
    assert bm.memory_bytes() == EMPTY


def test_fully_set_bitmap_is_no_bigger_than_flat_plus_a_small_index():
    nbits = 40 * LEAF_BITS + 5
    bm = ExtentBitmap(nbits)
    bm.set_range(0, nbits)
    flat = (nbits + 7) // 8
    assert flat <= bm.memory_bytes() <= flat + LEAF_SIZE + 41 * 8 + 2 * EMPTY


def test_sparse_2_48_bitmap_iterates_and_clears_without_walking_empty_space():
    nbits = 1 << 48
    bm = ExtentBitmap(nbits)
    picks = [0, 1 << 20, (1 << 40) + 3, (1 << 47) - 1, nbits - 1]
    for p in picks:
        bm.set_range(p, 1)
    assert [s for s, _ in bm.iter_runs()] == picks
    assert bm.count_range(0, nbits) == len(picks)
    assert bm.any_in_range(2, (1 << 40))
    assert not bm.any_in_range((1 << 40) + 4, (1 << 47) - (1 << 40) - 5)
    bm.clear_range(1, nbits - 2)
    assert list(bm.iter_runs()) == [(0, 1), (nbits - 1, 1)]


def test_runs_at_word_and_leaf_borders_for_every_cut_and_cap():
    """Exhaustive over the borders where the scan changes word or leaf."""
    for nbits, pieces in [
        (300, [(0, 1), (62, 3), (127, 2), (190, 66), (299, 1)]),
        (3 * LEAF_BITS, [(LEAF_BITS - 5, 10), (2 * LEAF_BITS - 1, 2), (2 * LEAF_BITS + 63, 1),
                         (3 * LEAF_BITS - 64, 64)]),
        (3 * LEAF_BITS, [(0, 3 * LEAF_BITS)]),
    ]:
        bm, ref = ExtentBitmap(nbits), RefBitmap(nbits)
        for start, count in pieces:
            bm.set_range(start, count)
            ref.set_range(start, count)
        cuts = sorted({c for s, n in pieces for c in (s - 1, s, s + 1, s + n - 1, s + n, s + n + 1)
                       if 0 <= c <= nbits} | {0, nbits})
        for start in cuts:
            for stop in (c for c in cuts if c >= start):
                for max_run in (0, 1, 2, 63, 64, 65, LEAF_BITS):
                    want = list(ref.iter_runs(start, stop, max_run))
                    assert list(bm.iter_runs(start, stop, max_run)) == want, (start, stop, max_run)
                assert bm.count_range(start, stop - start) == ref.count_range(start, stop - start)
                assert bm.any_in_range(start, stop - start) == ref.any_in_range(start, stop - start)


def test_iter_runs_longer_than_one_batch_resumes_exactly():
    bm, ref = ExtentBitmap(1 << 20), RefBitmap(1 << 20)
    ref.intervals = [(i, i + 1) for i in range(0, 1 << 20, 3)]       # 349526 runs: many batches
    for s, _ in ref.intervals:
        bm.set_range(s, 1)
    assert list(bm.iter_runs()) == list(ref.iter_runs())
    assert list(bm.iter_runs(5, 9000, 1)) == list(ref.iter_runs(5, 9000, 1))
    bm.clear_range(0, 1 << 20)
    bm.set_range(0, 1 << 20)
    assert len(list(bm.iter_runs(max_run=7))) == -(-(1 << 20) // 7)


# ---- out-of-range arguments raise and change nothing ------------------------------------

@pytest.mark.parametrize("call", [
    lambda b: b.set_range(-1, 1),
    lambda b: b.set_range(0, -1),
    lambda b: b.set_range(99, 2),
    lambda b: b.set_range(101, 0),
    lambda b: b.set_range(0, 1 << 70),
    lambda b: b.clear_range(100, 1),
    lambda b: b.count_range(0, 101),
    lambda b: b.any_in_range(-5, 3),
    lambda b: b.test(100),
    lambda b: b.test(-1),
    lambda b: b.iter_runs(0, 101),
    lambda b: b.iter_runs(50, 49),
    lambda b: b.iter_runs(-1),
    lambda b: b.iter_runs(max_run=-1),
    lambda b: b.runs(0, 101),
    lambda b: b.union_update(ExtentBitmap(101)),
    lambda b: b.difference_update(ExtentBitmap(99)),
    lambda b: b.intersection_update(ExtentBitmap(0)),
])
def test_out_of_range_arguments_raise_range_error_and_change_nothing(call):
    bm = ExtentBitmap(100)
    bm.set_range(10, 5)
    before = bm.to_bytes()
    with pytest.raises(BitmapRangeError) as info:
        call(bm)
    assert "ExtentBitmap." in str(info.value)
    assert isinstance(info.value, BitmapError) and isinstance(info.value, IndexError)
    assert bm.to_bytes() == before


@pytest.mark.parametrize("nbits", [-1, (1 << 48) + 1, 1 << 64])
def test_nbits_outside_0_to_2_48_is_refused(nbits):
    with pytest.raises(BitmapRangeError, match="nbits"):
        ExtentBitmap(nbits)


def test_non_integer_arguments_are_type_errors_not_silently_truncated():
    bm = ExtentBitmap(100)
    with pytest.raises(TypeError):
        bm.set_range(1.5, 2)
    with pytest.raises(TypeError):
        bm.test("3")
    with pytest.raises(TypeError):
        bm.union_update({1, 2})
    with pytest.raises(TypeError):
        ExtentBitmap(10.0)
    assert bm.is_empty()


def test_equality_copy_and_self_operations():
    a = ExtentBitmap(1000)
    a.set_range(5, 10)
    b = a.copy()
    assert a == b and a is not b
    b.set_range(900, 1)
    assert a != b and a.count() == 10
    assert ExtentBitmap(10) != ExtentBitmap(11)
    assert a != {5}
    with pytest.raises(TypeError):
        hash(a)
    a.union_update(a)
    assert a.count() == 10
    a.intersection_update(a)
    assert a.count() == 10
    a.difference_update(a)
    assert a.is_empty() and a.memory_bytes() == EMPTY


# ---- threads ---------------------------------------------------------------------------

def test_concurrent_writers_and_readers_on_one_bitmap_lose_no_bits():
    nbits = 64 * LEAF_BITS
    bm = ExtentBitmap(nbits)
    other = ExtentBitmap(nbits)
    other.set_range(0, 7)
    errors = []

    def writer(offset):
        try:
            for i in range(offset, nbits, 97 * 2):
                bm.set_range(i, 1)
        except Exception as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    def reader():
        try:
            for _ in range(50):
                sum(n for _, n in bm.iter_runs(max_run=5))
                bm.union_update(other)
                other.union_update(bm)      # the opposite lock order must not deadlock
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(0,)), threading.Thread(target=writer, args=(97,)),
               threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert not any(t.is_alive() for t in threads)
    want = RefBitmap(nbits)
    want.intervals = [(0, 7)] + [(i, i + 1) for i in range(97, nbits, 97)]
    bm.union_update(other)
    bm.intersection_update(ExtentBitmap.from_bytes(bm.to_bytes()))
    assert_same(bm, want) if bm.count() == want.count() else pytest.fail(
        f"expected {want.count()} bits, found {bm.count()}")


# ---- on-disk format -------------------------------------------------------------------------

def golden_bitmap():
    bm = ExtentBitmap(100_000)
    for start, count in [(0, 1), (63, 2), (40_000, 11), (99_999, 1)]:
        bm.set_range(start, count)
    return bm


GOLDEN_HEADER = (
    "434d4249544d4150"      # magic "CMBITMAP"
    "01000000"              # version 1
    "00800000"              # 32768 bits per leaf
    "a086010000000000"      # nbits 100000
    "0300000000000000"      # 3 leaves
    "0f00000000000000"      # population 15
)
GOLDEN_SIZE = 40 + 3 * LEAF_SIZE + 8


def test_golden_file_bytes_of_a_small_bitmap_are_pinned(tmp_path):
    data = golden_bitmap().to_bytes()
    assert len(data) == GOLDEN_SIZE
    assert data[:40].hex() == GOLDEN_HEADER
    leaf0 = data[40:40 + LEAF_SIZE]
    assert leaf0[:8] == struct.pack("<Q", 0)
    assert leaf0[8:24] == bytes.fromhex("01000000000000800100000000000000")
    assert data[40 + LEAF_SIZE:48 + LEAF_SIZE] == struct.pack("<Q", 1)
    assert data[40 + 2 * LEAF_SIZE:48 + 2 * LEAF_SIZE] == struct.pack("<Q", 3)
    assert data[-8:] == struct.pack("<Q", xxhash.xxh3_64_intdigest(data[:-8]))
    assert data[-8:].hex() == GOLDEN_TRAILER
    assert hashlib.sha256(data).hexdigest() == GOLDEN_SHA256
    # the independent encoder in the reference, written from the spec, agrees
    ref = RefBitmap(100_000)
    for start, count in [(0, 1), (63, 2), (40_000, 11), (99_999, 1)]:
        ref.set_range(start, count)
    assert ref.encode() == data
    path = tmp_path / "golden.bitmap"
    golden_bitmap().save(path)
    assert path.read_bytes() == data


GOLDEN_TRAILER = "0a59783cac2b6e52"
GOLDEN_SHA256 = "a027d4eb8b17f64631c4127cf9f3913fda4e459a5b1748764045d4a235011c2b"


def test_save_is_atomic_replaces_the_old_file_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "dirty.bitmap"
    old = ExtentBitmap(1 << 30)
    old.set_range(5, 1 << 20)
    old.save(path)
    new = ExtentBitmap(1 << 30)
    new.set_range((1 << 30) - 3, 3)
    new.save(str(path))
    assert ExtentBitmap.load(path) == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dirty.bitmap"]


def test_save_into_a_missing_directory_raises_and_leaves_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        golden_bitmap().save(tmp_path / "missing" / "x.bitmap")
    assert list(tmp_path.iterdir()) == []


def rechecksum(body: bytes) -> bytes:
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def test_every_truncation_of_a_file_is_detected(tmp_path):
    data = golden_bitmap().to_bytes()
    cuts = sorted({0, 1, 7, 8, 39, 40, 47, 48, 100, LEAF_SIZE + 40, len(data) - 9,
                   len(data) - 8, len(data) - 1})
    for cut in cuts:
        path = tmp_path / f"torn-{cut}"
        path.write_bytes(data[:cut])
        with pytest.raises(BitmapFormatError):
            ExtentBitmap.load(path)
    with pytest.raises(BitmapFormatError, match="bytes"):
        ExtentBitmap.from_bytes(data + b"\0")


@settings(deadline=None, max_examples=200 * SCALE)
@given(position=st.integers(0, GOLDEN_SIZE - 1), flip=st.integers(1, 255))
def test_any_flipped_byte_is_detected(position, flip):
    data = bytearray(golden_bitmap().to_bytes())
    data[position] ^= flip
    with pytest.raises(BitmapFormatError):
        ExtentBitmap.from_bytes(bytes(data))


NOISE = random.Random(553).randbytes(4200)  # the same in every process (pytest-xdist)


@pytest.mark.parametrize("data", [b"", b"\x89PNG\r\n\x1a\n" + bytes(100), NOISE,
                                  b"CMBITMAQ" + bytes(40)])
def test_foreign_files_are_refused(data):
    with pytest.raises(BitmapFormatError) as info:
        ExtentBitmap.from_bytes(data)
    assert isinstance(info.value, IntegrityError)


def test_wrong_version_is_refused_even_with_a_valid_checksum():
    data = golden_bitmap().to_bytes()
    forged = rechecksum(data[:8] + struct.pack("<I", 2) + data[12:-8])
    with pytest.raises(BitmapFormatError, match="version 2"):
        ExtentBitmap.from_bytes(forged)


def header(nbits, nleaves, population, leaf_bits=LEAF_BITS):
    return b"CMBITMAP" + struct.pack("<IIQQQ", 1, leaf_bits, nbits, nleaves, population)


def leaf_record(index, words):
    payload = bytearray(LEAF_BITS // 8)
    for i, w in words.items():
        payload[8 * i:8 * i + 8] = struct.pack("<Q", w)
    return struct.pack("<Q", index) + bytes(payload)


@pytest.mark.parametrize("body, complaint", [
    (header(100, 0, 0, leaf_bits=4096), "leaf size"),
    (header((1 << 48) + 1, 0, 0), "2\\*\\*48"),
    (header(100, 2, 0), "leaves for 100 bits"),
    (header(1 << 40, 1 << 33, 0), "bytes"),                  # huge count, tiny file: no allocation
    (header(1 << 20, 1, 1) + leaf_record(32, {0: 1}), "index 32"),
    (header(1 << 20, 2, 2) + leaf_record(3, {0: 1}) + leaf_record(3, {0: 1}), "ascend"),
    (header(1 << 20, 2, 2) + leaf_record(5, {0: 1}) + leaf_record(2, {0: 1}), "ascend"),
    (header(1 << 20, 1, 0) + leaf_record(0, {}), "empty"),
    (header(100, 1, 1) + leaf_record(0, {1: 1 << 36}), "beyond nbits"),
    (header(1 << 20, 1, 5) + leaf_record(0, {0: 3}), "population"),
])
def test_crafted_files_with_valid_checksums_are_refused(body, complaint):
    with pytest.raises(BitmapFormatError, match=complaint):
        ExtentBitmap.from_bytes(rechecksum(body))


@settings(deadline=None, max_examples=300 * SCALE)
@given(nbits=st.integers(0, 4 * LEAF_BITS), leaf_bits=st.sampled_from([LEAF_BITS, LEAF_BITS, 4096]),
       records=st.lists(st.tuples(st.integers(0, 5),
                                  st.dictionaries(st.sampled_from([0, 1, 255, 511]),
                                                  st.integers(0, (1 << 64) - 1), max_size=3)),
                        max_size=4),
       population=st.one_of(st.none(), st.integers(0, 1 << 40)))
def test_a_checksummed_file_is_either_refused_or_canonical(nbits, leaf_bits, records, population):
    """Whatever a file says, loading it refuses it or rebuilds exactly those bytes."""
    if population is None:                  # the honest population, so some files are valid
        population = sum(bin(w).count("1") for _, words in records for w in words.values())
    body = header(nbits, len(records), population, leaf_bits)
    body += b"".join(leaf_record(i, words) for i, words in records)
    data = rechecksum(body)
    try:
        bm = ExtentBitmap.from_bytes(data)
    except BitmapFormatError:
        return
    assert bm.to_bytes() == data
    assert bm.count() == population


def test_load_names_the_file_in_its_error(tmp_path):
    path = tmp_path / "x.bitmap"
    path.write_bytes(b"nonsense")
    with pytest.raises(BitmapFormatError, match=str(path)):
        ExtentBitmap.load(Path(path))
