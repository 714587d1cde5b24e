"""The full-cycle image writer (O_DIRECT runs, buffered edges) against a bytearray model.

Whatever mix of aligned and unaligned writes and holes arrives, the file
must read back exactly as the same operations applied to a bytearray, both
after ``sync`` and after ``close``; where the file system refuses O_DIRECT
the writer must fall back to the page cache and still be exact.
"""

from __future__ import annotations

import os
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyclemirror.target.imagewriter import ALIGN, RUN_BYTES, ImageWriter

SIZE = 3 * RUN_BYTES // 2 + 1536  # not a multiple of ALIGN: the tail is unaligned


def ops_strategy():
    """Writes in offset order (as a cycle streams them) with holes between, at 512-byte grain."""
    step = st.tuples(
        st.sampled_from(["data", "zero", "gap"]),
        st.integers(1, 2 * RUN_BYTES // 512 + 3).map(lambda n: n * 512),
        st.integers(0, 255),
    )
    return st.lists(step, max_size=12)


def apply(path, ops, *, direct=True, sync=True):
    model = bytearray(SIZE)
    w = ImageWriter(path, SIZE, direct=direct)
    pos = 0
    try:
        for kind, length, fill in ops:
            length = min(length, SIZE - pos)
            if length <= 0:
                break
            if kind == "data":
                data = bytes([fill]) * length
                # Split in two calls to exercise gathering across writes.
                half = (length // 2) // 512 * 512
                w.write(data[:half], pos)
                w.write(memoryview(data)[half:], pos + half)
                model[pos:pos + length] = data
            elif kind == "zero":
                w.punch(pos, length)
                model[pos:pos + length] = bytes(length)
            pos += length
        if sync:
            w.sync()
    finally:
        w.close()
    return model


@settings(max_examples=30, deadline=None)
@given(ops=ops_strategy(), sync=st.booleans())
def test_reads_back_like_the_model(tmp_path_factory, ops, sync):
    path = str(tmp_path_factory.mktemp("iw") / "img.new")
    model = apply(path, ops, sync=sync)
    with open(path, "rb") as f:
        assert f.read() == bytes(model)


def test_overwrites_data_written_before_with_a_hole_and_new_data(tmp_path):
    # A resumed cycle may write again over bytes an earlier attempt wrote.
    path = str(tmp_path / "img.new")
    apply(path, [("data", RUN_BYTES + 4096, 7)])
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
    ops = [("gap", 512, 0), ("data", RUN_BYTES, 3), ("zero", 4096, 0), ("data", 1536, 5)]
    model = apply(path, ops, direct=False)
    assert open(path, "rb").read() == bytes(model)


def test_on_tmpfs_the_writer_is_exact_whichever_path_it_takes(tmp_path):
    # tmpfs refused O_DIRECT before Linux 6.6 and takes it since: either way, exact.
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm (tmpfs) to try a second file system")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        path = os.path.join(d, "img.new")
        model = apply(path, [("data", 3 * ALIGN + 512, 1), ("zero", ALIGN, 0),
                             ("data", ALIGN, 2)])
        assert open(path, "rb").read() == bytes(model)
