"""The target's journaled apply into RBD images, against a byte model (a real cluster).

Proves, for random cycles (a full first one with data and zero runs, then
deltas of DATA, ZERO and SCATTER records, now and then a second full cycle
over an existing image) and random interruptions (an incomplete delta
dropped; a crash right after the commit point with the image's head torn,
here by garbage anywhere in it): after reopening (recovery) the snapshot
``cyclemirror-<applied cycle>`` equals the model at that cycle, it is the
only cycle snapshot left, and the head equals it too.  Also: a group's
members (two images) are applied all or none and snapshotted at one cycle.
"""

import os
import random
import uuid

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cyclemirror.receiver.staging import REC_DATA, REC_SCATTER, REC_ZERO
from cyclemirror.receiver.state import VolumeSpec
from tests.support.ceph import rbd_config
from tests.support.reference.frames_ref import scatter_payload

BS = 4096
NBLOCKS = 64
SIZE = BS * NBLOCKS


@pytest.fixture(scope="module")
def rbd(ceph_cluster):
    try:
        from cyclemirror._cext import rbd as _binding  # noqa: F401
    except ImportError:
        pytest.skip("cyclemirror._cext.rbd is not built (install librbd-dev and librados-dev, "
                    "then rebuild: python3 setup.py build_ext --inplace)")
    from cyclemirror.receiver import rbdbackend

    cfg = rbd_config(ceph_cluster)
    return cfg, rbdbackend.connection(cfg)


def open_mirror(root, node, cfg, volumes):
    from cyclemirror.receiver.mirror import Mirror

    group = len(volumes) > 1
    return Mirror.open(root, node, None, "g" if group else volumes[0].name, group, volumes,
                       1 << 20, rbd=cfg)


def read_rbd(io, name, snap=None):
    img = io.open(name, snap, True)
    try:
        return img.read(0, img.size())
    finally:
        img.close()


def snapshots(io, name):
    img = io.open(name, None, True)
    try:
        return [s for s, _ in img.snap_list()]
    finally:
        img.close()


def remove_images(io, node, names):
    for vol in names:
        for suffix in ("", "~new", "~old"):
            try:
                img = io.open(f"{node}~{vol}{suffix}")
            except OSError:
                continue
            for s, _ in img.snap_list():
                img.snap_remove(s)
            img.close()
            io.remove(f"{node}~{vol}{suffix}")


extent = st.tuples(st.integers(0, NBLOCKS - 1), st.integers(1, 6),
                   st.sampled_from(["data", "zero", "scatter"]), st.integers(1, 255))
cycle_plan = st.tuples(st.lists(extent, min_size=1, max_size=6),
                       st.sampled_from(["clean", "drop_before_end", "torn_apply", "full_again"]),
                       st.integers(0, 10))


def records_for(exts, full):
    """(kind, offset, length, data) records; a full cycle takes no SCATTER."""
    out = []
    for start, n, kind, fill in exts:
        n = min(n, NBLOCKS - start)
        if kind == "zero":
            out.append((REC_ZERO, start * BS, n * BS, None))
        elif kind == "data" or full or n < 2:
            out.append((REC_DATA, start * BS, n * BS, bytes([fill]) * (n * BS)))
        else:  # two extents with a gap: every other block
            exts2 = [(start * BS, BS), ((start + n - 1) * BS, BS)]
            raw = scatter_payload(exts2, bytes([fill]) * BS + bytes([fill ^ 0xFF]) * BS)
            out.append((REC_SCATTER, start * BS, len(raw), raw))
    return out


def apply_model(model, recs):
    for kind, off, length, data in recs:
        if kind == REC_DATA:
            model[off:off + length] = data
        elif kind == REC_ZERO:
            model[off:off + length] = bytes(length)
        else:
            from cyclemirror._cext import frames

            pos = len(data) - sum(ln for _o, ln in frames.scatter_extents(data, SIZE, BS))
            for o, ln in frames.scatter_extents(data, SIZE, BS):
                model[o:o + ln] = data[pos:pos + ln]
                pos += ln


def send(m, cycle, recs, full):
    m.begin(cycle, float(cycle), full, 0)
    for kind, off, length, data in recs:
        m.receive(kind, 0, off, length, data)


# Each example costs cluster round trips (snapshots): a few random ones, and one that
# meets every kind of record and interruption.
@settings(max_examples=2, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=st.lists(extent, min_size=1, max_size=5), cycles=st.lists(cycle_plan, max_size=3))
@example(first=[(0, 4, "data", 1), (10, 3, "zero", 0)],
         cycles=[([(2, 4, "scatter", 5), (20, 2, "zero", 0)], "torn_apply", 3),
                 ([(5, 2, "data", 9), (6, 1, "zero", 0)], "drop_before_end", 0),
                 ([(1, 2, "data", 3)], "full_again", 0),
                 ([(3, 5, "scatter", 8)], "clean", 0)])
def test_recovery_leaves_the_last_snapshot_at_the_model(rbd, tmp_path_factory, first, cycles):
    cfg, io = rbd
    root = str(tmp_path_factory.mktemp("t"))
    node = "n" + uuid.uuid4().hex[:12]
    vols = [VolumeSpec("v", SIZE, BS)]
    name = f"{node}~v"
    try:
        m = open_mirror(root, node, cfg, vols)
        model = bytearray(SIZE)
        # A full cycle's zero runs go over a fresh image: give it some data first.
        recs = [(REC_DATA, 0, SIZE, bytes([7]) * SIZE)] + records_for(first, True)
        send(m, 1, recs, True)
        m.finish(1, len(recs))
        apply_model(model, recs)
        assert read_rbd(io, name, "cyclemirror-1") == model
        cycle = 1
        for exts, crash, cut in cycles:
            cycle += 1
            full = crash == "full_again"
            recs = records_for(exts, full)
            if full:
                model = bytearray(SIZE)
            send(m, cycle, recs, full)
            if crash == "drop_before_end":
                m.close()
                m = open_mirror(root, node, cfg, vols)
                assert m.state.applied_cycle == cycle - 1
                send(m, cycle, recs, full)  # the source starts the cycle over
            if crash == "torn_apply":
                m.checkpoint()
                m._close_inflight()
                p = m.state.pending
                m.state.committed, m.state.pending = p, None
                m.state.save(m.state_path)
                m.close()
                img = io.open(name)  # garbage anywhere in the head: rollback fixes it
                rng = random.Random(cut)
                for _ in range(3):
                    img.write(os.urandom(BS), rng.randrange(NBLOCKS) * BS)
                img.flush()
                img.close()
                m = open_mirror(root, node, cfg, vols)  # recovery: rollback, redo, snapshot
            else:
                m.finish(cycle, len(recs))
            apply_model(model, recs)
            assert m.state.applied_cycle == cycle and m.state.committed is None
            assert read_rbd(io, name, f"cyclemirror-{cycle}") == model, (cycle, crash)
            assert read_rbd(io, name) == model
            m.backend.wait_pruned()  # older snapshots go in a thread after the apply
            assert snapshots(io, name) == [f"cyclemirror-{cycle}"]
        m.close()
    finally:
        remove_images(io, node, ["v"])


def test_a_group_is_applied_and_snapshotted_at_one_cycle(rbd, tmp_path):
    cfg, io = rbd
    node = "n" + uuid.uuid4().hex[:12]
    vols = [VolumeSpec("a", SIZE, BS), VolumeSpec("b", SIZE, BS)]
    try:
        m = open_mirror(str(tmp_path), node, cfg, vols)
        m.begin(1, 1.0, True, 0)
        m.receive(REC_DATA, 0, 0, BS, b"a" * BS)
        m.receive(REC_DATA, 1, BS, BS, b"b" * BS)
        m.finish(1, 2)
        m.begin(2, 2.0, False, 0)
        m.receive(REC_DATA, 0, 0, BS, b"A" * BS)
        m.receive(REC_DATA, 1, BS, BS, b"B" * BS)
        m.checkpoint()
        m.close()  # cut before the end: neither member changes
        m = open_mirror(str(tmp_path), node, cfg, vols)
        assert read_rbd(io, f"{node}~a", "cyclemirror-1")[:BS] == b"a" * BS
        assert read_rbd(io, f"{node}~b", "cyclemirror-1")[BS:2 * BS] == b"b" * BS
        m.begin(2, 2.0, False, 0)
        m.receive(REC_DATA, 0, 0, BS, b"A" * BS)
        m.receive(REC_DATA, 1, BS, BS, b"B" * BS)
        m.finish(2, 2)
        m.backend.wait_pruned()  # older snapshots go in a thread after the apply
        for vol, off, byte in (("a", 0, b"A"), ("b", BS, b"B")):
            assert snapshots(io, f"{node}~{vol}") == ["cyclemirror-2"]
            assert read_rbd(io, f"{node}~{vol}", "cyclemirror-2")[off:off + BS] == byte * BS
        m.close()
    finally:
        remove_images(io, node, ["a", "b"])


def test_block_digests_of_an_rbd_image_equal_those_of_the_same_bytes_in_a_file(rbd, tmp_path):
    # A source's hash_request (compare block hashes instead of a full copy) is answered
    # from the applied cycle's snapshot; a file of the same bytes is the reference.
    from cyclemirror.receiver.session import block_digests

    cfg, io = rbd
    node = "n" + uuid.uuid4().hex[:12]
    vols = [VolumeSpec("v", SIZE, BS)]
    model = bytearray(random.Random(9).randbytes(SIZE))
    model[BS * 5:BS * 9] = bytes(BS * 4)
    try:
        m = open_mirror(str(tmp_path), node, cfg, vols)
        m.begin(1, 1.0, True, 0)
        m.receive(REC_DATA, 0, 0, SIZE, bytes(model))
        m.finish(1, 1)
        m.begin(2, 2.0, False, 0)
        m.receive(REC_DATA, 0, BS * 3, BS, b"z" * BS)
        m.finish(2, 1)
        model[BS * 3:BS * 4] = b"z" * BS
        ref = tmp_path / "ref.img"
        ref.write_bytes(bytes(model))
        for start, count in ((0, NBLOCKS), (3, 7), (NBLOCKS - 1, 1)):
            assert m.backend.block_digests(0, start, count, BS) == block_digests(
                str(ref), start, count, BS), (start, count)
        m.close()
    finally:
        remove_images(io, node, ["v"])


def test_a_pool_the_cluster_lacks_is_a_temporary_error_naming_the_pool(rbd):
    from dataclasses import replace

    from cyclemirror.errors import ClusterUnavailableError, is_temporary
    from cyclemirror.receiver import rbdbackend

    cfg, _io = rbd
    with pytest.raises(ClusterUnavailableError, match="'no-such-pool'") as info:
        rbdbackend.connection(replace(cfg, pool="no-such-pool"))
    assert is_temporary(info.value)  # the source retries, and resumes once it exists


def test_an_asynchronous_checkpoint_of_a_full_cycle_counts_only_what_the_cluster_holds(
        rbd, tmp_path):
    """``checkpoint_mark`` / ``checkpoint_reached`` (a full cycle into RBD): once a mark
    is reached, the chunks before it are in ``~new`` (read through another handle)
    and the state file counts exactly them, not the ones received after the mark;
    a reopen (as after a crash) resumes there, and the cycle ends equal to the model."""
    from cyclemirror.receiver.state import MirrorState

    cfg, io = rbd
    mib = 1 << 20
    size = 14 * mib  # three whole 4 MiB objects and a partial one
    node = "n" + uuid.uuid4().hex[:12]
    name = f"{node}~v"
    vols = [VolumeSpec("v", size, BS)]
    rng = random.Random(5)
    chunks, model = [], bytearray(size)
    for i in range(size // mib):
        if i % 3 == 2:  # a zero run, as a full cycle ships the volume's holes
            chunks.append((REC_ZERO, 0, i * mib, mib, None, None))
        else:
            data = rng.randbytes(mib)
            chunks.append((REC_DATA, 0, i * mib, mib, data, None))
            model[i * mib:(i + 1) * mib] = data
    try:
        m = open_mirror(str(tmp_path), node, cfg, vols)
        m.begin(1, 1.0, True, 0)
        assert m.can_checkpoint_async()
        m.receive_batch(chunks[:7])
        token = m.checkpoint_mark()
        m.receive_batch(chunks[7:10])  # after the mark: not part of it
        assert m.checkpoint_reached(token, wait=True) == 7
        assert MirrorState.load(m.state_path).pending.chunks == 7
        assert read_rbd(io, name + "~new")[:7 * mib] == model[:7 * mib]
        m.close()  # the writes after the mark are dropped or not: either way uncounted
        m = open_mirror(str(tmp_path), node, cfg, vols)
        assert m.state.pending.chunks == 7
        assert m.begin(1, 1.0, True, 7) == 7
        assert m.can_checkpoint_async()  # the resumed image is not fresh: zero runs written
        m.receive_batch(chunks[7:9])  # a zero run through librbd, then data
        token = m.checkpoint_mark()
        assert m.checkpoint_reached(token, wait=True) == 9
        m.receive_batch(chunks[9:])
        m.finish(1, len(chunks))
        assert read_rbd(io, name, "cyclemirror-1") == model
        m.close()
    finally:
        remove_images(io, node, ["v"])
