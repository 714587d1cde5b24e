"""cyclemirror._cext.rbd against a bytearray: random writes and write-zeroes, in flight.

Proves, on a real cluster: any sequence of asynchronous writes and
write-zeroes (overlapping, up to more than the queue holds in flight)
reads back, after ``flush``, exactly as the same operations applied in order
to a bytearray; a snapshot keeps its content while the head changes and a
rollback returns to it; errors carry librbd's errno and name the image.

The object writer (one RADOS operation per data object, for a delta's
scattered blocks): any sequence of writes, across object boundaries and
several operations on one object, reads back as the model after ``flush``;
the image's snapshots keep their content (the writes carry the image's
snapshot context), also a removed snapshot that a clone still reads from;
an image that is not plain (other features, parent data) gets none.
Sent early (``send_before``, as a full cycle streams) or marked (``mark``,
an asynchronous checkpoint), the writes still read back as the model, and
once ``reached(mark)`` every byte written before the mark and not since
reads as it was at the mark.
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
OBJ = 4 << 20  # the binding's images: 4 MiB objects
OW_SIZE = 2 * OBJ + 3 * 4096  # three objects, the last one partial
_B = OBJ // ALIGN
ow_write = st.tuples(st.one_of(st.integers(0, OW_SIZE // ALIGN - 1),  # often near a boundary
                               st.integers(_B - 300, _B + 300),
                               st.integers(2 * _B - 300, OW_SIZE // ALIGN - 1)),
                     st.integers(1, 40), st.integers(0, 255), st.booleans())


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=1, max_size=60))
def test_queued_writes_and_zeroes_read_back_as_the_model(rbd_io, ops):
    name = "b" + uuid.uuid4().hex[:12]
    rbd_io.create(name, SIZE)
    img = rbd_io.open(name)
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
        rbd_io.remove(name)


def test_a_snapshot_keeps_its_content_and_rollback_returns_to_it(rbd_io):
    name = "b" + uuid.uuid4().hex[:12]
    rbd_io.create(name, SIZE)
    img = rbd_io.open(name)
    try:
        img.write(b"a" * 4096, 0)
        img.flush()
        img.snap_create("s1")
        img.write(b"b" * 4096, 0)
        img.flush()
        snap = rbd_io.open(name, "s1", True)
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
        rbd_io.remove(name)


def test_errors_carry_the_errno_and_name_the_image(rbd_io):
    with pytest.raises(OSError) as info:
        rbd_io.open("no-such-image")
    assert info.value.errno == errno.ENOENT and "no-such-image" in str(info.value)
    with pytest.raises(ValueError, match="NUL"):
        rbd_io.open("bad\0name")


def _fresh(rbd_io, size, fill=None):
    name = "w" + uuid.uuid4().hex[:12]
    rbd_io.create(name, size)
    img = rbd_io.open(name)
    if fill is not None:
        img.write(bytes([fill]) * size, 0)
        img.flush()
    return name, img


def _drop(rbd_io, name):
    img = rbd_io.open(name)
    try:
        for snap, _size in img.snap_list():
            img.snap_remove(snap)
    finally:
        img.close()
    rbd_io.remove(name)


@settings(max_examples=5, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=st.lists(ow_write, min_size=1, max_size=30), pending=st.sampled_from([1, 1 << 30]))
def test_object_writer_writes_read_back_as_the_model_and_the_snapshot_keeps_its_own(
        rbd_io, writes, pending, monkeypatch):
    from cyclemirror._cext import rbd

    # pending=1: every write is sent at once (several operations on one object, in
    # order), one operation in flight at a time
    monkeypatch.setattr(rbd, "OBJECT_WRITER_PENDING_BYTES", pending)
    monkeypatch.setattr(rbd, "OBJECT_BYTES_INFLIGHT", min(pending, 64 << 20))
    name, img = _fresh(rbd_io, OW_SIZE, 0x11)
    try:
        model = bytearray(b"\x11" * OW_SIZE)
        img.snap_create("before")
        w = img.object_writer()
        assert w is not None
        for block, count, fill, flush in writes:
            off = block * ALIGN
            length = min(count * ALIGN * 8, OW_SIZE - off)  # up to 160 KiB
            data = bytes([fill]) * length
            w.write(memoryview(data), off)
            model[off:off + length] = data
            if flush:
                w.flush()
        w.flush()
        assert w.operations >= 1 and w.extents >= len(writes)
        w.close()
        assert img.read(0, OW_SIZE) == model
        snap = rbd_io.open(name, "before", True)
        try:
            assert snap.read(0, OW_SIZE) == b"\x11" * OW_SIZE
        finally:
            snap.close()
    finally:
        img.close()
        _drop(rbd_io, name)


def test_object_writer_splits_an_object_into_several_operations_in_order(rbd_io):
    from cyclemirror._cext import rbd

    name, img = _fresh(rbd_io, OBJ)
    try:
        w = img.object_writer()
        n = rbd.OBJECT_OP_MAX_EXTENTS * 2 + 5
        for i in range(n):  # the same 4 KiB again and again: the last one wins
            w.write(i.to_bytes(4, "big") * 1024, 8192)
        w.flush()
        assert (w.operations, w.extents) == (3, n)
        w.close()
        assert img.read(8192, 4096) == (n - 1).to_bytes(4, "big") * 1024
        assert img.read(0, 8192) == bytes(8192)
    finally:
        img.close()
        _drop(rbd_io, name)


def test_object_writer_spares_a_removed_snapshot_that_a_clone_reads(rbd_io):
    """A clone (v2) of snapshot ``a`` keeps ``a`` after its removal (in the trash
    namespace, not named by the user): writes to the parent must still clone for it."""
    parent, img = _fresh(rbd_io, OBJ + 8192, 0x01)
    child = parent + "-c"
    try:
        img.snap_create("a")
        rbd_io.clone(parent, "a", child, 2)
        img.snap_remove("a")
        w = img.object_writer()
        assert w is not None  # the parent of a clone is still plain to write
        w.write(b"\x02" * 8192, OBJ - 4096)  # the end of object 0, the start of object 1
        w.flush()
        w.close()
        c = rbd_io.open(child)
        try:
            assert c.read(0, OBJ + 8192) == b"\x01" * (OBJ + 8192)
            assert c.object_writer() is None  # it reads its parent's data: librbd copies up
        finally:
            c.close()
        assert img.read(OBJ - 4096, 8192) == b"\x02" * 8192
    finally:
        img.close()
        rbd_io.remove(child)
        _drop(rbd_io, parent)


def test_object_writer_is_none_for_an_image_with_other_features(rbd_io, ceph_cluster):
    name = "f" + uuid.uuid4().hex[:12]
    ceph_cluster.run("rbd", "create", "--size", "4M", "--image-feature",
                     "layering,exclusive-lock", f"{ceph_cluster.pool}/{name}")
    img = rbd_io.open(name)
    try:
        assert img.object_writer() is None
    finally:
        img.close()
        rbd_io.remove(name)
    with pytest.raises(ValueError, match="snapshot"):
        name, img = _fresh(rbd_io, 4096)
        try:
            img.snap_create("s")
            snap = rbd_io.open(name, "s", True)
            try:
                snap.object_writer()
            finally:
                snap.close()
        finally:
            img.close()
            _drop(rbd_io, name)


ow_step = st.one_of(ow_write, st.just("mark"), st.just("reach"),
                    st.tuples(st.just("send_before"), st.integers(0, OW_SIZE)))


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(ow_step, min_size=1, max_size=30))
def test_object_writer_marks_are_durable_when_reached_and_early_sends_keep_the_order(
        rbd_io, steps):
    import numpy as np

    name, img = _fresh(rbd_io, OW_SIZE, 0x22)
    try:
        model = bytearray(b"\x22" * OW_SIZE)
        touched_since = []  # per mark in flight: (mark, model then, bytes written since)
        w = img.object_writer()
        for step in steps:
            if step == "mark":
                touched_since.append((w.mark(), bytes(model), np.zeros(OW_SIZE, bool)))
            elif step == "reach":
                if not touched_since:
                    continue
                mark, then, since = touched_since.pop(0)
                assert w.reached(mark, True) is True
                assert w.completed >= mark  # every operation sent before the mark is done
                assert w.reached(mark) is True  # and stays so
                now = np.frombuffer(img.read(0, OW_SIZE), np.uint8)
                kept = ~since  # bytes written since the mark may be in flight
                assert (now[kept] == np.frombuffer(then, np.uint8)[kept]).all()
            elif step[0] == "send_before":
                w.send_before(step[1])
            else:
                block, count, fill, _flush = step
                off = block * ALIGN
                length = min(count * ALIGN * 8, OW_SIZE - off)
                data = bytes([fill]) * length
                w.write(data, off)
                model[off:off + length] = data
                for _m, _then, since in touched_since:
                    since[off:off + length] = True
        w.flush()
        assert w.completed == w.operations
        w.close()
        assert img.read(0, OW_SIZE) == model
    finally:
        img.close()
        _drop(rbd_io, name)


def test_object_writer_reached_waits_for_every_operation_before_the_mark(rbd_io):
    """A mark just made has its operations in flight: ``reached`` without waiting may
    say no, with ``wait`` it returns only once all of them completed (reaped)."""
    name, img = _fresh(rbd_io, 3 * OBJ)
    try:
        w = img.object_writer()
        # A full cycle's chunks in offset order, with a hole (a zero run it skips) in
        # object 0, which is never whole: it goes once the stream passes it; object 1
        # goes whole; object 2 (three chunks of four) is still gathered.
        for off in range(0, 3 * OBJ - (1 << 20), 1 << 20):
            w.send_before(off)
            if off != 1 << 20:
                w.write(bytes([off >> 20]) * (1 << 20), off)
        assert w.operations == 2
        mark = w.mark()
        assert mark == w.operations == 3
        answer = w.reached(mark)
        assert answer is (w.completed >= mark)
        assert w.reached(mark, True) is True and w.completed == 3
        w.write(b"\x07" * 4096, 0)  # after the mark: a fourth operation, not part of it
        later = w.mark()
        assert later == 4 and w.reached(mark) is True
        w.flush()
        w.close()
        assert img.read(0, 4096) == b"\x07" * 4096
        assert img.read(1 << 20, 1 << 20) == bytes(1 << 20)
        assert img.read(2 * OBJ, 1 << 20) == bytes([8]) * (1 << 20)
    finally:
        img.close()
        _drop(rbd_io, name)
