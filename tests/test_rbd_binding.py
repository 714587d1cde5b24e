"""cyclemirror._cext.rbd against a bytearray: random writes and write-zeroes, in flight.

Proves, on a real cluster: any sequence of asynchronous writes and
write-zeroes (overlapping, up to more than the queue holds in flight)
reads back, after ``flush``, exactly as the same operations applied in order
to a bytearray; a snapshot keeps its content while the head changes and a
rollback returns to it; errors carry librbd's errno and name the image.
"""

import errno
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SIZE = 1 << 20
ALIGN = 512

op = st.tuples(st.sampled_from(["write", "zero"]), st.integers(0, SIZE // ALIGN - 1),
               st.integers(1, 64), st.integers(0, 255))


@pytest.fixture(scope="module")
def io(ceph_cluster):
    try:
        from cyclemirror._cext import rbd
    except ImportError:
        pytest.skip("cyclemirror._cext.rbd is not built (install librbd-dev and librados-dev, "
                    "then rebuild: python3 setup.py build_ext --inplace)")
    cluster = rbd.Cluster(ceph_cluster.conf, ceph_cluster.client, ceph_cluster.keyring)
    cluster.connect()
    ioctx = cluster.ioctx(ceph_cluster.pool)
    yield ioctx
    ioctx.close()
    cluster.shutdown()


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=1, max_size=60))
def test_queued_writes_and_zeroes_read_back_as_the_model(io, ops):
    name = "b" + uuid.uuid4().hex[:12]
    io.create(name, SIZE)
    img = io.open(name)
    try:
        model = bytearray(SIZE)
        img.write(b"\x11" * SIZE, 0)  # something for zeroes to clear
        model[:] = b"\x11" * SIZE
        for kind, block, count, fill in ops:
            off = block * ALIGN
            length = min(count * ALIGN, SIZE - off)
            if kind == "write":
                data = bytes([fill]) * length
                img.write(memoryview(data), off)  # the binding holds the buffer
                model[off:off + length] = data
            else:
                img.write_zeroes(off, length)
                model[off:off + length] = bytes(length)
        img.flush()
        assert img.read(0, SIZE) == model
    finally:
        img.close()
        io.remove(name)


def test_a_snapshot_keeps_its_content_and_rollback_returns_to_it(io):
    name = "b" + uuid.uuid4().hex[:12]
    io.create(name, SIZE)
    img = io.open(name)
    try:
        img.write(b"a" * 4096, 0)
        img.flush()
        img.snap_create("s1")
        img.write(b"b" * 4096, 0)
        img.flush()
        snap = io.open(name, "s1", True)
        assert snap.read(0, 4096) == b"a" * 4096
        snap.close()
        assert img.read(0, 4096) == b"b" * 4096
        assert [s for s, _size in img.snap_list()] == ["s1"]
        img.snap_rollback("s1")
        assert img.read(0, 4096) == b"a" * 4096
        img.snap_remove("s1")
        assert img.snap_list() == []
    finally:
        img.close()
        io.remove(name)


def test_errors_carry_the_errno_and_name_the_image(io):
    with pytest.raises(OSError) as info:
        io.open("no-such-image")
    assert info.value.errno == errno.ENOENT and "no-such-image" in str(info.value)
    with pytest.raises(ValueError, match="NUL"):
        io.open("bad\0name")
