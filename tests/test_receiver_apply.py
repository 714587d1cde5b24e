"""The target's staging, journaled apply and crash recovery, on real files.

Proves with hypothesis: for random sequences of cycles (full first, then
deltas of data and zero extents) interrupted at random points -- before the
end (unacknowledged tail), after a checkpoint (resumable), right after the
commit point with the apply torn at a random record -- reopening the mirror
(recovery) always leaves the image equal to the model at the last applied
cycle, or at the committed one once recovery finished it; an incomplete delta
never touches the image.  Also pins the staging record format (golden) and
checks that a damaged state file or staging record is refused loudly.
"""

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cyclemirror.errors import IntegrityError, ProtocolError
from cyclemirror.receiver.mirror import Mirror
from cyclemirror.receiver.staging import REC_DATA, REC_ZERO, StagingWriter, read_records
from cyclemirror.receiver.state import MirrorState, VolumeSpec

BS = 4096
NBLOCKS = 32
SIZE = BS * NBLOCKS
VOL = [VolumeSpec("v", SIZE, BS)]


def open_mirror(root):
    return Mirror.open(root, "node1", None, "v", False, VOL, 1 << 20)


def read_image(m):
    with open(m.image_path(0), "rb") as f:
        return f.read()


extent = st.tuples(st.integers(0, NBLOCKS - 1), st.integers(1, 4), st.booleans(),
                   st.integers(1, 255))
cycle_plan = st.tuples(st.lists(extent, min_size=1, max_size=6),
                       st.sampled_from(["clean", "drop_before_end", "drop_after_checkpoint",
                                        "torn_apply"]),
                       st.integers(0, 10))


def records_for(exts):
    out = []
    for start, n, is_data, fill in exts:
        n = min(n, NBLOCKS - start)
        if is_data:
            out.append((REC_DATA, start * BS, n * BS, bytes([fill]) * (n * BS)))
        else:
            out.append((REC_ZERO, start * BS, n * BS, None))
    return out


def apply_model(model, recs):
    for kind, off, length, data in recs:
        model[off:off + length] = data if kind == REC_DATA else bytes(length)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=st.lists(extent, min_size=1, max_size=5), cycles=st.lists(cycle_plan, max_size=5))
def test_recovery_always_leaves_a_freeze_instant(tmp_path_factory, first, cycles):
    root = str(tmp_path_factory.mktemp("t"))
    m = open_mirror(root)
    model = bytearray(SIZE)
    recs = records_for(first)
    m.begin(1, 1.0, True, 0)
    for r in recs:
        m.receive(r[0], 0, r[1], r[2], r[3])
    m.finish(1, len(recs))
    apply_model(model, recs)
    assert read_image(m) == model
    cycle = 1
    for exts, crash, cut in cycles:
        cycle += 1
        recs = records_for(exts)
        m.begin(cycle, float(cycle), False, 0)
        if crash == "drop_before_end":
            for r in recs[: cut % (len(recs) + 1)]:
                m.receive(r[0], 0, r[1], r[2], r[3])
            m.close()
            m = open_mirror(root)  # recovery: incomplete delta not applied
            assert read_image(m) == model and m.state.applied_cycle == cycle - 1
            m.begin(cycle, float(cycle), False, 0)  # start over: the old pending is dropped
        elif crash == "drop_after_checkpoint":
            k = cut % (len(recs) + 1)
            for r in recs[:k]:
                m.receive(r[0], 0, r[1], r[2], r[3])
            acked = m.checkpoint()
            m.close()
            m = open_mirror(root)
            assert read_image(m) == model
            assert m.begin(cycle, float(cycle), False, acked) == acked
            recs_left = recs[k:]
            for r in recs_left:
                m.receive(r[0], 0, r[1], r[2], r[3])
            m.finish(cycle, len(recs))
            apply_model(model, recs)
            assert read_image(m) == model
            continue
        for r in recs:
            m.receive(r[0], 0, r[1], r[2], r[3])
        if crash == "torn_apply":
            # The state as a crash right after the commit point leaves it, with a
            # random prefix of the records already written into the image.
            m.checkpoint()
            m._close_inflight()
            p = m.state.pending
            m.state.committed, m.state.pending = p, None
            m.state.save(m.state_path)
            fd = os.open(m.image_path(0), os.O_RDWR)
            for kind, _mem, off, length, data in list(
                    read_records(m.staging_path, p.staged_bytes, 1 << 20))[: cut]:
                os.pwrite(fd, data if kind == REC_DATA else bytes(length), off)
            os.close(fd)
            m = open_mirror(root)  # recovery must finish the apply
        else:
            m.finish(cycle, len(recs))
        apply_model(model, recs)
        assert m.state.applied_cycle == cycle and m.state.committed is None
        assert read_image(m) == model
        assert not [f for f in os.listdir(m.directory) if ".staging" in f]
    m.close()


def test_end_with_missing_chunks_applies_nothing(tmp_path):
    m = open_mirror(str(tmp_path))
    m.begin(1, 1.0, True, 0)
    m.receive(REC_DATA, 0, 0, BS, b"x" * BS)
    with pytest.raises(ProtocolError, match="received 1"):
        m.finish(1, 2)
    assert not os.path.exists(m.image_path(0))
    assert m.state.applied_cycle == 0


def test_extent_outside_the_volume_is_refused(tmp_path):
    m = open_mirror(str(tmp_path))
    m.begin(1, 1.0, True, 0)
    with pytest.raises(ProtocolError, match="outside volume"):
        m.receive(REC_ZERO, 0, SIZE - BS, 2 * BS)
    with pytest.raises(ProtocolError, match="member 3"):
        m.receive(REC_ZERO, 3, 0, BS)


def test_resume_at_a_chunk_we_do_not_hold_is_refused(tmp_path):
    m = open_mirror(str(tmp_path))
    m.begin(1, 1.0, True, 0)
    with pytest.raises(ProtocolError, match="cannot resume"):
        m.begin(1, 1.0, True, 5)


def test_geometry_change_is_refused(tmp_path):
    open_mirror(str(tmp_path)).close()
    with pytest.raises(ProtocolError, match="size or block-size change"):
        Mirror.open(str(tmp_path), "node1", None, "v", False, [VolumeSpec("v", 2 * SIZE, BS)],
                    1 << 20)


def test_damaged_state_file_is_detected(tmp_path):
    m = open_mirror(str(tmp_path))
    m.close()
    raw = open(m.state_path, "rb").read().replace(b'"applied_cycle": 0', b'"applied_cycle": 7')
    open(m.state_path, "wb").write(raw)
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        MirrorState.load(m.state_path)


def test_staging_record_format_is_pinned(tmp_path):
    path = str(tmp_path / "s")
    w = StagingWriter(path, 0)
    w.append(REC_DATA, 2, 8192, 4, b"abcd")
    w.append(REC_ZERO, 0, 0, 4096)
    w.sync()
    w.close()
    raw = open(path, "rb").read()
    # magic, kind, reserved, member, offset, length, xxh3-64("abcd"), data
    assert raw[:32] == b"CMSR" + struct.pack(">BBHQQQ", 1, 0, 2, 8192, 4, 0x6497A96F53A89890)
    assert raw[32:36] == b"abcd"
    assert raw[36:] == b"CMSR" + struct.pack(">BBHQQQ", 2, 0, 0, 0, 4096, 0)
    assert [r[:4] for r in read_records(path, len(raw), 1 << 20)] == [
        (REC_DATA, 2, 8192, 4), (REC_ZERO, 0, 0, 4096)]


def test_corrupted_staging_data_is_refused_on_apply(tmp_path):
    path = str(tmp_path / "s")
    w = StagingWriter(path, 0)
    w.append(REC_DATA, 0, 0, 4, b"abcd")
    w.close()
    raw = bytearray(open(path, "rb").read())
    raw[33] ^= 1
    open(path, "wb").write(raw)
    with pytest.raises(IntegrityError, match="fails its checksum"):
        list(read_records(path, len(raw), 1 << 20))


GROUP = [VolumeSpec("a", SIZE, BS), VolumeSpec("b", SIZE, BS)]


def open_group(root):
    return Mirror.open(root, "node1", None, "g", True, GROUP, 1 << 20)


@pytest.mark.parametrize("crash", ["before_end", "after_commit"])
def test_group_cycle_applies_to_all_members_or_to_none(tmp_path, crash):
    root = str(tmp_path)
    m = open_group(root)
    m.begin(1, 1.0, True, 0)
    m.receive(REC_DATA, 0, 0, BS, b"a" * BS)
    m.receive(REC_DATA, 1, 0, BS, b"b" * BS)
    m.finish(1, 2)
    images = lambda g: [open(g.image_path(i), "rb").read(BS) for i in range(2)]  # noqa: E731
    assert images(m) == [b"a" * BS, b"b" * BS]
    m.begin(2, 2.0, False, 0)
    m.receive(REC_DATA, 0, 0, BS, b"A" * BS)
    m.receive(REC_DATA, 1, 0, BS, b"B" * BS)
    if crash == "before_end":
        m.checkpoint()
        m.close()
        m = open_group(root)
        assert images(m) == [b"a" * BS, b"b" * BS]  # neither member changed
    else:
        m.checkpoint()
        m._close_inflight()
        p = m.state.pending
        m.state.committed, m.state.pending = p, None
        m.state.save(m.state_path)
        fd = os.open(m.image_path(0), os.O_RDWR)  # member a already written, b not
        os.pwrite(fd, b"A" * BS, 0)
        os.close(fd)
        m = open_group(root)
        assert images(m) == [b"A" * BS, b"B" * BS]  # recovery finished both
        assert m.state.applied_cycle == 2
    m.close()
