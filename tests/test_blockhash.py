"""cyclemirror._cext.blockhash against the pure-Python model in tests/support/reference/hash_ref.py.

Proves: per-block xxh3 (64 and 128 bit) and all-zero marks equal the model's
for random buffers and files, edges included (empty input, one short block,
a last short block, reads spanning several internal buffers); hash_file equals
hash_buffer of the same bytes; diff_hashes sets exactly the differing blocks,
shifted by first_block; bad arguments raise the documented errors.
"""

import os
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyclemirror import errors
from cyclemirror._cext import blockhash
from tests.support.reference import hash_ref
from tests.support.tools import SLOW

# CYCLEMIRROR_SLOW=1 runs 20 times as many random examples.


def examples(n: int) -> int:
    return n * 20 if SLOW else n


def as_ref_hashes(hashes: np.ndarray) -> list:
    if hashes.ndim == 1:
        return [int(h) for h in hashes]
    return [(int(lo), int(hi)) for lo, hi in hashes]


# Buffers made of zero runs and random runs, so all-zero, mixed and non-zero
# blocks all occur, at every alignment against the block size.
segments = st.lists(
    st.one_of(st.binary(min_size=1, max_size=300),
              st.integers(1, 600).map(bytes),
              st.integers(1, 40).map(lambda n: b"\x00" * (n - 1) + b"\x01")),
    max_size=12,
).map(b"".join)
block_sizes = st.one_of(st.sampled_from([1, 2, 16, 64, 512]), st.integers(1, 700))


@given(data=segments, block_size=block_sizes, bits=st.sampled_from([64, 128]))
@settings(max_examples=examples(300), deadline=None)
def test_hash_buffer_matches_reference(data, block_size, bits):
    hashes, zero = blockhash.hash_buffer(data, block_size, bits)
    ref_hashes, ref_zero = hash_ref.hash_blocks(data, block_size, bits)
    assert hashes.dtype == np.uint64 and zero.dtype == np.bool_
    assert hashes.shape == ((len(ref_hashes),) if bits == 64 else (len(ref_hashes), 2))
    assert as_ref_hashes(hashes) == ref_hashes
    assert zero.tolist() == ref_zero


def test_empty_buffer_gives_empty_arrays_of_the_right_shape():
    hashes, zero = blockhash.hash_buffer(b"", 4096)
    assert hashes.shape == (0,) and zero.shape == (0,)
    hashes, zero = blockhash.hash_buffer(bytearray(), 4096, bits=128)
    assert hashes.shape == (0, 2) and zero.shape == (0,)


def test_zero_marks_after_a_zero_block_was_seen():
    # Once a zero block's hash is known, non-zero blocks must still be caught,
    # including one whose only non-zero byte is the very last.
    bs = 4096
    last_byte = bytearray(bs)
    last_byte[-1] = 1
    first_byte = bytearray(bs)
    first_byte[0] = 1
    data = bytes(bs) + bytes(last_byte) + bytes(bs) + bytes(first_byte) + bytes(bs) + bytes(100)
    _, zero = blockhash.hash_buffer(data, bs)
    assert zero.tolist() == [True, False, True, False, True, True]


def test_accepts_numpy_and_memoryview_buffers():
    raw = os.urandom(10000)
    expected = blockhash.hash_buffer(raw, 1000)[0]
    assert (blockhash.hash_buffer(np.frombuffer(raw, np.uint8), 1000)[0] == expected).all()
    assert (blockhash.hash_buffer(memoryview(raw), 1000)[0] == expected).all()
    # A C-contiguous array of wider items is hashed as its bytes.
    assert (blockhash.hash_buffer(np.frombuffer(raw, np.uint32), 1000)[0] == expected).all()


@given(data=segments, block_size=block_sizes, bits=st.sampled_from([64, 128]),
       prefix=st.integers(0, 5000))
@settings(max_examples=examples(60), deadline=None)
def test_hash_file_equals_hash_buffer_of_the_same_bytes(tmp_path_factory, data, block_size,
                                                        bits, prefix):
    path = tmp_path_factory.mktemp("hf") / "img"
    path.write_bytes(os.urandom(prefix) + data + b"tail")
    with open(path, "rb") as f:
        hashes, zero = blockhash.hash_file(f.fileno(), prefix, len(data), block_size, bits)
    ref_hashes, ref_zero = hash_ref.hash_blocks(data, block_size, bits)
    assert as_ref_hashes(hashes) == ref_hashes
    assert zero.tolist() == ref_zero


@pytest.mark.parametrize("block_size", [4096, 3000, 1 << 20, 5 << 20])
def test_hash_file_across_many_read_buffers(tmp_path, block_size):
    # 6 MiB + 123 bytes: several internal reads, block sizes that do and do not
    # divide the read size, blocks larger than the read size, a short tail.
    size = (6 << 20) + 123
    data = bytearray(os.urandom(size))
    data[1 << 20:(3 << 20) + 7] = bytes((2 << 20) + 7)
    path = tmp_path / "img"
    path.write_bytes(data)
    with open(path, "rb") as f:
        hashes, zero = blockhash.hash_file(f.fileno(), 0, size, block_size, 128)
    ref_hashes, ref_zero = hash_ref.hash_blocks(bytes(data), block_size, 128)
    assert as_ref_hashes(hashes) == ref_hashes
    assert zero.tolist() == ref_zero


def test_hash_file_from_two_threads_gives_the_same_result(tmp_path):
    # The read-and-hash loop runs without the GIL; concurrent calls must not
    # share any state.
    size = 8 << 20
    data = os.urandom(size)
    path = tmp_path / "img"
    path.write_bytes(data)
    expected = blockhash.hash_buffer(data, 4096)[0]
    results = {}
    with open(path, "rb") as f:
        def work(name, offset, length):
            results[name] = blockhash.hash_file(f.fileno(), offset, length, 4096)[0]
        threads = [threading.Thread(target=work, args=(i, i * size // 2, size // 2))
                   for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert (np.concatenate([results[0], results[1]]) == expected).all()


def test_hash_file_past_end_of_file_raises(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(b"x" * 10000)
    with open(path, "rb") as f:
        with pytest.raises(errors.UsageError, match="ends at byte 10000"):
            blockhash.hash_file(f.fileno(), 4096, 8192, 4096)
        # Exactly to the end is fine; zero length anywhere is fine.
        assert blockhash.hash_file(f.fileno(), 4096, 10000 - 4096, 4096)[0].shape == (2,)
        assert blockhash.hash_file(f.fileno(), 1 << 40, 0, 4096)[0].shape == (0,)
        # A huge range is refused before any output is sized by it.
        with pytest.raises(errors.UsageError, match="ends at byte 10000"):
            blockhash.hash_file(f.fileno(), 0, 1 << 60, 1)


def test_hash_file_on_devices_without_a_size_stops_at_their_end():
    # Character devices report no size, so the read loop itself must notice
    # the end (/dev/null ends at once) and never hash missing bytes.
    with open("/dev/null", "rb") as f:
        with pytest.raises(errors.UsageError, match="ends at byte 0"):
            blockhash.hash_file(f.fileno(), 0, 4096, 4096)
    with open("/dev/zero", "rb") as f:
        hashes, zero = blockhash.hash_file(f.fileno(), 0, (1 << 20) + 5, 4096)
    assert zero.all() and len(zero) == 257
    assert as_ref_hashes(hashes) == hash_ref.hash_blocks(bytes((1 << 20) + 5), 4096)[0]


def test_hash_file_on_a_closed_fd_raises_store_error(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)
    with pytest.raises(errors.StoreError, match="errno 9"):
        blockhash.hash_file(fd, 0, 100, 4096)


@pytest.mark.parametrize("kwargs", [
    dict(block_size=0), dict(block_size=-1), dict(block_size=(1 << 30) + 1),
    dict(block_size=4096, bits=32), dict(block_size=4096, bits=127), dict(block_size=1.5),
])
def test_bad_hash_arguments_raise_usage_error(kwargs):
    with pytest.raises(errors.UsageError):
        blockhash.hash_buffer(b"abc", **kwargs)


def test_bad_buffers_and_file_ranges_raise_usage_error():
    with pytest.raises(errors.UsageError, match="C-contiguous"):
        blockhash.hash_buffer(memoryview(b"abcdef")[::2], 2)
    with pytest.raises(errors.UsageError, match="bytes-like"):
        blockhash.hash_buffer("text", 2)
    with pytest.raises(errors.UsageError, match="offset"):
        blockhash.hash_file(0, -1, 10, 4096)
    with pytest.raises(errors.UsageError, match="length"):
        blockhash.hash_file(0, 0, -10, 4096)
    with pytest.raises(errors.UsageError, match="fd"):
        blockhash.hash_file(-1, 0, 10, 4096)


# ---------------------------------------------------------------- diff_hashes

def bitmap_runs(bitmap) -> list[tuple[int, int]]:
    return [(int(s), int(n)) for s, n in bitmap.iter_runs()]


@given(n=st.integers(0, 200), bits=st.sampled_from([64, 128]), data=st.data())
@settings(max_examples=examples(200), deadline=None)
def test_diff_hashes_matches_reference(n, bits, data):
    shape = (n,) if bits == 64 else (n, 2)
    a = np.array(data.draw(st.lists(st.integers(0, 3), min_size=a_size(shape),
                                    max_size=a_size(shape))), dtype=np.uint64).reshape(shape)
    b = np.array(data.draw(st.lists(st.integers(0, 3), min_size=a_size(shape),
                                    max_size=a_size(shape))), dtype=np.uint64).reshape(shape)
    first = data.draw(st.integers(0, 50))
    nbits = first + n + data.draw(st.integers(0, 50))
    bitmap = blockhash.diff_hashes(a, b, nbits, first)
    assert bitmap.nbits == nbits
    ref = hash_ref.diff_runs(as_ref_hashes(a), as_ref_hashes(b), first)
    assert bitmap_runs(bitmap) == ref


def a_size(shape) -> int:
    return int(np.prod(shape))


def test_diff_hashes_of_real_hashes_marks_changed_blocks_only():
    bs = 512
    old = bytearray(os.urandom(bs * 64))
    new = bytearray(old)
    new[0] ^= 1                  # first block
    new[bs * 10 + 5] ^= 1        # block 10
    new[bs * 11] ^= 1            # block 11 (run 10-11)
    new[-1] ^= 1                 # last block
    for bits in (64, 128):
        a = blockhash.hash_buffer(old, bs, bits)[0]
        b = blockhash.hash_buffer(new, bs, bits)[0]
        bitmap = blockhash.diff_hashes(a, b, 1000, first_block=936)
        assert bitmap_runs(bitmap) == [(936, 1), (946, 2), (999, 1)]


def test_diff_hashes_of_equal_or_empty_arrays_is_empty():
    a = np.arange(10, dtype=np.uint64)
    assert blockhash.diff_hashes(a, a.copy(), 10).is_empty()
    empty = np.empty(0, np.uint64)
    assert blockhash.diff_hashes(empty, empty, 0).is_empty()


def test_diff_hashes_refuses_blocks_outside_the_bitmap():
    a = np.zeros(10, np.uint64)
    b = np.ones(10, np.uint64)
    with pytest.raises(errors.BitmapRangeError, match=r"\[5, 15\)"):
        blockhash.diff_hashes(a, b, 14, first_block=5)
    assert blockhash.diff_hashes(a, b, 15, first_block=5).count() == 10


@pytest.mark.parametrize("a, b", [
    (np.zeros(3, np.uint64), np.zeros(4, np.uint64)),
    (np.zeros(3, np.uint64), np.zeros((3, 2), np.uint64)),
    (np.zeros(3, np.int64), np.zeros(3, np.int64)),
    (np.zeros((3, 3), np.uint64), np.zeros((3, 3), np.uint64)),
    ([1, 2], [1, 2]),
])
def test_diff_hashes_refuses_mismatched_or_foreign_arrays(a, b):
    with pytest.raises(errors.UsageError):
        blockhash.diff_hashes(a, b, 100)


def test_diff_hashes_reads_non_contiguous_columns_correctly():
    h = np.arange(40, dtype=np.uint64).reshape(10, 4)
    a = h[:, ::2]                # (10, 2), not C-contiguous
    b = a.copy()
    b[7, 1] += 1
    assert bitmap_runs(blockhash.diff_hashes(a, b, 10)) == [(7, 1)]


def test_hash_file_beyond_4_gib_in_a_sparse_file(tmp_path):
    # Offsets above 32 bits must reach pread intact.
    path = tmp_path / "sparse.img"
    data = os.urandom(3 * 4096 + 10)
    with open(path, "wb") as f:
        f.truncate(6 << 30)
        f.seek((5 << 30) + 4096)
        f.write(data)
    with open(path, "rb") as f:
        hashes, zero = blockhash.hash_file(f.fileno(), 5 << 30, 8 * 4096, 4096)
    ref_hashes, ref_zero = hash_ref.hash_blocks(bytes(4096) + data + bytes(4 * 4096 - 10),
                                                4096)
    assert as_ref_hashes(hashes) == ref_hashes
    assert zero.tolist() == ref_zero == [True, False, False, False, False, True, True, True]
