"""The full-cycle image writer (O_DIRECT runs, buffered edges) against a bytearray model.

Whatever mix of aligned and unaligned writes and holes arrives, the file
must read back exactly as the same operations applied to a bytearray, both
after ``sync`` and after ``close``; where the file system refuses O_DIRECT
the writer must fall back to the page cache and still be exact.
"""

from __future__ import annotations

import errno
import os
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyclemirror._cext import frames
from cyclemirror.receiver.imagewriter import ALIGN, RUN_BYTES, ImageWriter

SIZE = 3 * RUN_BYTES // 2 + 1536  # not a multiple of ALIGN: the tail is unaligned


def ops_strategy():
    """Writes in offset order (as a cycle streams them) with holes between."""
    grain = st.sampled_from([512, ALIGN])  # 512-byte-block volumes, and page-sized chunks
    step = st.tuples(
        st.sampled_from(["data", "data", "zero", "gap"]),
        st.tuples(st.integers(1, 2 * RUN_BYTES // ALIGN + 3), grain).map(lambda t: t[0] * t[1]),
        st.integers(0, 255),
        st.sampled_from([1, 2, 5]),  # pieces a data step arrives in
    )
    return st.lists(step, max_size=12)


def apply(path, ops, *, direct=True):
    model = bytearray(SIZE)
    w = ImageWriter(path, SIZE, direct=direct)
    pos = 0
    try:
        for kind, length, fill, pieces in ops:
            length = min(length, SIZE - pos)
            if length <= 0:
                break
            if kind == "data":
                data = bytes([fill]) * length
                # Split in two calls to exercise gathering across writes; odd fills come
                # in aligned buffers as the receive path makes them (written without a copy).
                cuts = sorted({0, length, *(length * k // pieces // 512 * 512
                                            for k in range(1, pieces))})
                for lo, hi in zip(cuts, cuts[1:], strict=False):
                    piece, at = data[lo:hi], pos + lo
                    if fill % 2:
                        buf = frames.new_aligned_buffer(len(piece))
                        buf[:] = piece
                        piece = buf
                    w.write(piece, at)
                model[pos:pos + length] = data
            elif kind == "zero":
                w.punch(pos, length)
                model[pos:pos + length] = bytes(length)
            pos += length
        w.sync()
    finally:
        w.close()
    return model


@settings(max_examples=60, deadline=None)
@given(ops=ops_strategy())
def test_reads_back_like_the_model(tmp_path_factory, ops):
    path = str(tmp_path_factory.mktemp("iw") / "img.new")
    model = apply(path, ops)
    with open(path, "rb") as f:
        assert f.read() == bytes(model)


def test_overwrites_data_written_before_with_a_hole_and_new_data(tmp_path):
    # A resumed cycle may write again over bytes an earlier attempt wrote.
    path = str(tmp_path / "img.new")
    apply(path, [("data", RUN_BYTES + 4096, 7, 2)])
    w = ImageWriter(path, SIZE)
    w.punch(0, 8192)
    w.write(b"\x09" * 512, 8192 + 512)
    w.sync()
    w.close()
    data = open(path, "rb").read()
    assert data[:8192] == bytes(8192)
    assert data[8192:8192 + 512] == b"\x07" * 512
    assert data[8192 + 512:8192 + 1024] == b"\x09" * 512
    assert data[8192 + 1024:RUN_BYTES + 4096] == b"\x07" * (RUN_BYTES + 4096 - 8192 - 1024)
    assert os.path.getsize(path) == SIZE


def test_direct_io_is_used_where_the_file_system_allows_it(tmp_path):
    probe = str(tmp_path / "probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
        os.close(fd)
        allowed = True
    except OSError:
        allowed = False
    w = ImageWriter(str(tmp_path / "img.new"), SIZE)
    try:
        assert w.direct == allowed
    finally:
        w.close()


def test_without_direct_io_the_page_cache_path_is_exact(tmp_path):
    path = str(tmp_path / "img.new")
    ops = [("gap", 512, 0, 1), ("data", RUN_BYTES, 3, 2), ("zero", 4096, 0, 1),
           ("data", 1536, 5, 2)]
    model = apply(path, ops, direct=False)
    assert open(path, "rb").read() == bytes(model)


def test_on_tmpfs_the_writer_is_exact_whichever_path_it_takes(tmp_path):
    # tmpfs refused O_DIRECT before Linux 6.6 and takes it since: either way, exact.
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm (tmpfs) to try a second file system")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        path = os.path.join(d, "img.new")
        model = apply(path, [("data", 3 * ALIGN + 512, 1, 2), ("zero", ALIGN, 0, 1),
                             ("data", ALIGN, 2, 1)])
        assert open(path, "rb").read() == bytes(model)


def test_aligned_buffers_are_aligned_and_is_aligned_tells_them_apart():
    for n in (0, 1, 4096, (1 << 20) + 3):
        buf = frames.new_aligned_buffer(n)
        assert len(buf) == n and not buf.readonly
        assert frames.is_aligned(buf, ALIGN)
    assert frames.is_aligned(frames.new_aligned_buffer(8192)[4096:], ALIGN)
    assert not frames.is_aligned(frames.new_aligned_buffer(8192)[1:], 2)
    with pytest.raises(Exception, match="power of two"):
        frames.is_aligned(b"x", 3)


def test_a_stream_of_aligned_chunks_is_written_without_copies_and_exactly(tmp_path):
    # The shape of a real first cycle: 1 MiB chunks in aligned buffers, back to back.
    path = str(tmp_path / "img.new")
    size = 20 << 20
    w = ImageWriter(path, size)
    expect = bytearray(size)
    for i in range(size >> 20):
        buf = frames.new_aligned_buffer(1 << 20)
        buf[:] = bytes([i + 1]) * (1 << 20)
        w.write(buf, i << 20)
        expect[i << 20:(i + 1) << 20] = buf
    w.sync()
    w.close()
    assert open(path, "rb").read() == bytes(expect)


def test_close_drops_a_run_that_was_never_synced(tmp_path):
    # Unsynced bytes were never acknowledged: the source sends them again.
    path = str(tmp_path / "img.new")
    w = ImageWriter(path, SIZE)
    if not w.direct:
        w.close()
        pytest.skip("this file system refuses O_DIRECT: writes are not gathered here")
    buf = frames.new_aligned_buffer(ALIGN)
    buf[:] = b"\x05" * ALIGN
    w.write(buf, 0)
    w.write(b"\x06" * ALIGN, ALIGN)  # a new, copied run: the aligned one was written
    w.close()
    w.close()  # a second close is harmless
    assert open(path, "rb").read(2 * ALIGN) == b"\x05" * ALIGN + bytes(ALIGN)


def test_a_device_that_refuses_our_alignment_gets_everything_through_the_page_cache(
        tmp_path, monkeypatch):
    # Fault injection: the kernel answers EINVAL to every O_DIRECT write, as on a
    # device whose logical block is bigger than ALIGN.
    path = str(tmp_path / "img.new")
    w = ImageWriter(path, SIZE)
    if not w.direct:
        w.close()
        pytest.skip("this file system refuses O_DIRECT at open already")

    def refuse(*_args):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "pwritev", refuse)
    first = frames.new_aligned_buffer(2 * ALIGN)
    first[:] = b"\x01" * (2 * ALIGN)
    w.write(first, 0)
    w.write(b"\x02" * (ALIGN + 512), 2 * ALIGN)  # flushes the first run: refused
    assert not w.direct
    w.write(b"\x03" * ALIGN, 4 * ALIGN)
    w.sync()
    w.close()
    monkeypatch.undo()
    data = open(path, "rb").read(5 * ALIGN)
    assert data == (b"\x01" * (2 * ALIGN) + b"\x02" * (ALIGN + 512) + bytes(ALIGN - 512)
                    + b"\x03" * ALIGN)
