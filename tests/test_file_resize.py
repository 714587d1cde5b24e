"""A mirrored file object whose live file grows and shrinks, with real daemons and clients.

A raw image on XFS (reflink) and on btrfs is mirrored as a file object while
``qemu-img resize`` grows it (and ``qemu-io`` writes into the new tail),
``qemu-img resize --shrink`` shrinks it, and ``truncate`` cuts it short and
grows it back (the tail must then read as zeroes on the target, not as what
the target held there before).  After each cycle the target's mirror image
equals the file as it was frozen, size and bytes, the NBD export of the image
(``nbdinfo``) reports the new size, and only the first cycle was a full copy.
``mirror verify`` finds the resized image clean and ``mirror scrub`` agrees.
A clone of the resized image to a path, and its promotion to a volume (read
back over NBD with ``nbdcopy``), have the new size and bytes.

A size the file object cannot take (not a multiple of its block size) stops
the mirror visibly: ``mirror sync`` fails at once naming the size, ``status``
shows the row broken, the target keeps its last cycle, and once the file has a
good size ``mirror resume`` goes on with a delta; so does a shrink after a kill
-9 and restart of the source daemon.

Crash: the target daemon is killed with SIGKILL in the middle of applying a
cycle that shrinks the image (a failpoint holds the apply right after the
resize, before the data): after its restart the image is exactly that cycle,
size and bytes (it was committed: recovery redoes it), never a mix.

In process (hypothesis): the target's ``Mirror`` takes random cycles of random
sizes, full and delta, some cut by a crash before their commit point or inside
their apply; after recovery the image always equals a bytes model of the last
applied cycle.  And a cycle's size is checked before anything is staged
(bounds, the free space a growth needs), and kept in the journal.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cyclemirror import keys
from cyclemirror._cext import frames
from cyclemirror._cext.bitmap import ExtentBitmap
from cyclemirror.errors import NoSpaceError, ProtocolError
from cyclemirror.receiver import TargetServer
from cyclemirror.receiver.mirror import Mirror
from cyclemirror.receiver.session import zero_block_digest
from cyclemirror.receiver.staging import REC_DATA, REC_ZERO, data_checksum, read_records
from cyclemirror.receiver.state import MirrorState, VolumeSpec
from cyclemirror.sender.persist import DriverState
from cyclemirror.store import Store
from cyclemirror.wire import handshake
from cyclemirror.wire.link import FrameLink, RemoteError
from tests.support.daemons import DaemonPool, cli_env, free_port, make_key, wait_for
from tests.support.tools import require_tool

K = 4096
MiB = 1 << 20
FAILPOINT_SECONDS = 30.0


@pytest.fixture(params=["xfs", "btrfs"])
def cowdir(request, tmp_path):
    """A fresh directory on XFS or btrfs, emptied afterwards."""
    mount = request.getfixturevalue(f"{request.param}_mount")
    d = os.path.join(mount, "rs-" + tmp_path.name)
    os.makedirs(d)
    yield d
    subprocess.run(["rm", "-rf", d], check=False)


def image_row(target, source) -> dict:
    rows = [r for r in target.status()["incoming"] if r["source_node"] == source.node_id]
    assert len(rows) == 1, rows
    return rows[0]


def image_of(target, source) -> bytes:
    with open(image_row(target, source)["image"], "rb") as fh:
        return fh.read()


def read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def run(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, timeout=60)


def export_size(target, source, name: str) -> int:
    out = subprocess.run(["nbdinfo", "--size",
                          f"nbd+unix:///mirror/{source.node_id}/{name}?socket={target.nbd_sock}"],
                         check=True, capture_output=True, text=True, timeout=60)
    return int(out.stdout.strip())


def full_copies(source) -> int:
    return len(re.findall(r"mirror f -> \S+: cycle \d+ applied.*full copy", source.log()))


def test_qemu_img_resize_and_truncate_are_mirrored_cycle_by_cycle(cowdir, tmp_path):
    for tool in ("qemu-img", "qemu-io", "nbdinfo", "nbdcopy"):
        require_tool(tool)
    path = os.path.join(cowdir, "f.img")
    run("qemu-img", "create", "-f", "raw", path, "1M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 256k", "-c", "write -P 0x12 960k 64k",
        path)
    with DaemonPool(tmp_path) as pool:
        key = make_key(tmp_path / "k")
        a = pool.start("a", key_file=key)
        b = pool.start("b", key_file=key, listen=True)
        a.cli("file", "add", "f", path)
        a.cli("mirror", "start", "f", "--to", b.listen, "--interval", "3600")
        a.cli("mirror", "sync", "f")
        assert image_of(b, a) == read(path)

        steps = [
            # grows to 3 MiB: a write into the new tail, the rest of it a hole
            (["qemu-img", "resize", "-f", "raw", path, "3M"],
             ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 2m 64k", path]),
            # shrinks to 512 KiB, past both writes above
            (["qemu-img", "resize", "-f", "raw", "--shrink", path, "512K"],
             ["qemu-io", "-f", "raw", "-c", "write -P 0x33 128k 4k", path]),
            # the same size again, rewritten in the middle
            (None, ["qemu-io", "-f", "raw", "-c", "write -P 0x44 300k 8k", path]),
            # cut to 256 KiB and grown back to 1 MiB between two freezes: the target
            # holds 0x44 at 300 KiB, which must become zeroes
            (["truncate", "-s", "256K", path], ["truncate", "-s", "1M", path]),
        ]
        for i, (resize, write) in enumerate(steps):
            for argv in (resize, write):
                if argv is not None:
                    run(*argv)
            frozen = read(path)  # nothing writes the file during the cycle
            a.cli("mirror", "sync", "f")
            got = image_of(b, a)
            assert len(got) == len(frozen), f"step {i}: the image has the wrong size"
            assert got == frozen, f"step {i}: the image differs from the freeze"
            assert export_size(b, a, "f") == len(frozen), f"step {i}: the NBD export's size"
        assert read(path)[300 << 10:308 << 10] == bytes(8 << 10)  # the zeroes arrived
        row = a.status()["mirrors"][0]
        assert row["phase"] != "broken" and row["last_error"] is None, row
        assert [f["size"] for f in a.status()["files"]] == [MiB]
        assert full_copies(a) == 1, a.log()  # every resize was a delta
        a.cli("mirror", "verify", "f")  # both sides hash the resized image alike
        assert a.status()["mirrors"][0]["verify"]["state"] == "clean"
        b.cli("mirror", "scrub", f"{a.node_id}/f")  # and the target's own record agrees

        # A clone and a promotion of the resized image are of its size.
        clone = str(tmp_path / "clone.img")
        b.cli("mirror", "clone", f"{a.node_id}/f", clone)
        assert read(clone) == frozen
        a.cli("mirror", "break", "f")
        b.cli("mirror", "promote", f"{a.node_id}/f", "--force")
        out = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///f?socket={b.nbd_sock}"],
                             check=True, capture_output=True, text=True, timeout=60)
        assert int(out.stdout) == len(frozen) == MiB
        out = subprocess.run(["nbdcopy", f"nbd+unix:///f?socket={b.nbd_sock}", "-"],
                             check=True, capture_output=True, timeout=60)
        assert out.stdout == frozen


def test_a_size_that_is_no_multiple_of_the_block_stops_the_mirror_visibly(xfs_mount,
                                                                           tmp_path):
    d = os.path.join(xfs_mount, "rs-" + tmp_path.name)
    os.makedirs(d)
    path = os.path.join(d, "f.img")
    with open(path, "wb") as fh:
        fh.write(os.urandom(64 * K))
        fh.truncate(MiB)
    try:
        with DaemonPool(tmp_path) as pool:
            key = make_key(tmp_path / "k")
            a = pool.start("a", key_file=key)
            b = pool.start("b", key_file=key, listen=True)
            a.cli("file", "add", "f", path)
            a.cli("mirror", "start", "f", "--to", b.listen, "--interval", "3600")
            a.cli("mirror", "sync", "f")
            frozen = read(path)
            assert image_of(b, a) == frozen

            with open(path, "ab") as fh:  # a writer appends 8000 bytes: no whole block
                fh.write(b"appended" * 1000)
            grown = os.path.getsize(path)
            r = a.cli("mirror", "sync", "f", check=False)  # answers, does not hang
            assert r.returncode != 0
            assert f"now {grown} bytes, it was {MiB}" in r.stderr, r.stderr
            assert "multiple of its block size 4096" in r.stderr, r.stderr
            row = a.status()["mirrors"][0]
            assert row["phase"] == "broken", row
            assert f"now {grown} bytes" in (row["last_error"] or ""), row
            assert image_of(b, a) == frozen  # the last freeze, its size too

            r = a.cli("mirror", "sync", "f", check=False)  # still stopped: says why
            assert r.returncode != 0 and "resume it first" in r.stderr, r.stderr

            os.truncate(path, 2 * MiB)  # a size it can take (larger), and a write
            with open(path, "r+b") as fh:
                fh.seek(128 * K)
                fh.write(b"after" * 100)
            a.cli("mirror", "resume", "f")
            a.cli("mirror", "sync", "f")
            assert image_of(b, a) == read(path)
            row = a.status()["mirrors"][0]
            assert row["phase"] != "broken" and row["last_error"] is None, row

            a.kill()  # SIGKILL of the source; after its restart a shrink is a delta too
            a.start()
            os.truncate(path, 768 * K)
            with open(path, "r+b") as fh:
                fh.seek(700 * K)
                fh.write(b"restarted" * 100)
            a.cli("mirror", "sync", "f")
            assert image_of(b, a) == read(path)
            assert full_copies(a) == 1, a.log()
            a.cli("mirror", "break", "f")
            a.cli("mirror", "rm", "f")
            a.cli("file", "rm", "f")
    finally:
        subprocess.run(["rm", "-rf", d], check=False)


def test_kill_9_of_the_target_inside_a_resizing_apply_recovers_to_that_cycle(xfs_mount,
                                                                            tmp_path):
    d = os.path.join(xfs_mount, "rs-" + tmp_path.name)
    os.makedirs(d)
    path = os.path.join(d, "f.img")
    with open(path, "wb") as fh:
        fh.write(os.urandom(2 * MiB))
    try:
        with DaemonPool(tmp_path) as pool:
            key = make_key(tmp_path / "k")
            port = free_port()  # b keeps its address across the restarts
            b = pool.start("b", key_file=key, extra=("--listen", f"127.0.0.1:{port}"))
            a = pool.start("a", key_file=key)
            a.cli("file", "add", "f", path)
            a.cli("mirror", "start", "f", "--to", b.listen, "--interval", "3600")
            a.cli("mirror", "sync", "f")
            old = read(path)
            assert image_of(b, a) == old
            image = image_row(b, a)["image"]
            applied = image_row(b, a)["applied_cycle"]

            b.stop()  # from now on a delta's apply sleeps right after its resize
            b.args += ["--failpoint", f"receiver.apply_resized={FAILPOINT_SECONDS}"]
            b.start()
            os.truncate(path, MiB)  # shrinks, and a write below the new end
            with open(path, "r+b") as fh:
                fh.seek(256 << 10)
                fh.write(b"new" * 4096)
            new = read(path)
            sync = subprocess.Popen([sys.executable, "-m", "cyclemirror.cli", "--store", a.store,
                                     "mirror", "sync", "f"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=cli_env())
            try:
                # The apply is inside its failpoint: the image has the new size, not yet
                # the new bytes.
                wait_for(lambda: os.path.getsize(image) == MiB, FAILPOINT_SECONDS / 2,
                         "the apply to resize the image (and sleep)")
                assert read(image)[256 << 10:(256 << 10) + 3] != b"new"
                b.kill()
            finally:
                sync.kill()
                sync.wait()
            b.args = [arg for arg in b.args
                      if arg not in ("--failpoint", f"receiver.apply_resized={FAILPOINT_SECONDS}")]
            b.start()
            got = image_of(b, a)
            assert got in (old, new), "the image after recovery is neither cycle"
            assert got == new  # the cycle was committed before its apply: redone
            assert image_row(b, a)["applied_cycle"] == applied + 1
            # And the mirror goes on.  (A write first, written back: a sync that finds
            # nothing written waits for the 'applied' of the cycle in flight, which the
            # killed target never sent; the next cycle's connection learns of it.)
            with open(path, "r+b") as fh:
                fh.write(b"later" * 100)
                fh.flush()
                os.fsync(fh.fileno())
            a.cli("mirror", "sync", "f")
            assert image_of(b, a) == read(path)
            a.cli("mirror", "break", "f")
    finally:
        subprocess.run(["rm", "-rf", d], check=False)


# -- the target's apply of resizing cycles, in process, against a bytes model ---------------

BS = 4096
MAX_BLOCKS = 48
resize_cycle = st.tuples(
    st.integers(1, MAX_BLOCKS),  # the cycle's size in blocks
    st.lists(st.tuples(st.integers(0, MAX_BLOCKS - 1), st.integers(1, 4), st.booleans(),
                       st.integers(1, 255)), max_size=5),
    st.sampled_from(["clean", "full", "crash_before_commit", "crash_in_apply"]),
    st.integers(0, 6))


def _records(nblocks: int, extents) -> list:
    out = []
    for start, n, is_data, fill in extents:
        start = start % nblocks
        n = min(n, nblocks - start)
        if is_data:
            out.append((REC_DATA, start * BS, n * BS, bytes([fill]) * (n * BS)))
        else:
            out.append((REC_ZERO, start * BS, n * BS, None))
    return out


def _open(root: str, size: int) -> Mirror:
    return Mirror.open(root, "node1", None, "f", False, [VolumeSpec("f", size, BS)], 1 << 20,
                       resizable=True)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cycles=st.lists(resize_cycle, min_size=1, max_size=6))
def test_resizing_cycles_apply_all_or_nothing_after_any_crash(tmp_path_factory, cycles):
    """Random cycles of random sizes (full or delta), some cut by a crash before their
    commit point or in the middle of their apply (after the image took the new size, a
    random prefix of the records written): after recovery the image is always exactly
    the last applied cycle, size and bytes, and the state names that size."""
    root = str(tmp_path_factory.mktemp("rs"))
    m = _open(root, 8 * BS)
    m.begin(1, 1.0, True, 0)
    m.finish(1, 0)
    model = bytes(8 * BS)
    for number, (nblocks, extents, how, cut) in enumerate(cycles, start=2):
        size = nblocks * BS
        recs = _records(nblocks, extents)
        full = how == "full"
        new = bytearray(size) if full else bytearray(model[:size].ljust(size, b"\0"))
        for kind, off, length, data in recs:
            new[off:off + length] = data if kind == REC_DATA else bytes(length)
        m.begin(number, float(number), full, 0, sizes=[size])
        for kind, off, length, data in recs:
            m.receive(kind, 0, off, length, data)
        if how == "crash_before_commit":
            m.checkpoint()
            m.close()
            m = _open(root, size)  # recovery: nothing of the cycle shows
            assert read(m.image_path(0)) == model
            assert m.state.volumes[0].size == len(model)
            m.begin(number, float(number), full, 0, sizes=[size])  # sent again, whole
            for kind, off, length, data in recs:
                m.receive(kind, 0, off, length, data)
            m.finish(number, len(recs))
        elif how == "crash_in_apply":
            # The state as a kill inside the apply leaves it: committed, the image
            # already at the new size, a prefix of the records written into it.
            m.checkpoint()
            m._close_inflight()
            p = m.state.pending
            m.state.committed, m.state.pending = p, None
            m.state.save(m.state_path)
            fd = os.open(m.image_path(0), os.O_RDWR)
            os.ftruncate(fd, size)
            for kind, _mem, off, length, data in list(
                    read_records(m.staging_path, p.staged_bytes, 1 << 20))[:cut]:
                os.pwrite(fd, data if kind == REC_DATA else bytes(length), off)
            os.close(fd)
            m = _open(root, size)  # recovery finishes the apply
        else:
            m.finish(number, len(recs))
        model = bytes(new)
        assert m.state.applied_cycle == number and m.state.committed is None
        assert m.state.volumes[0].size == size
        assert read(m.image_path(0)) == model, f"cycle {number} ({how})"
    m.close()
    again = MirrorState.load(m.state_path)  # the journal kept the last size
    assert again.volumes[0].size == len(model)


def test_a_cycle_begun_while_a_resize_is_still_applying_keeps_its_own_size(tmp_path):
    """Pipelined cycles: cycle 2 grows the image and is committed but not applied yet
    when cycle 3, back at the old size, begins.  Cycle 3 must still shrink the image
    after cycle 2's apply grew it, and a resume of cycle 3 after that apply must be
    taken (its sizes compare the same way before and after)."""
    small, big = 4 * BS, 8 * BS
    m = _open(str(tmp_path), small)
    m.begin(1, 1.0, True, 0)
    m.finish(1, 0)
    m.begin(2, 2.0, False, 0, sizes=[big])
    m.receive(REC_DATA, 0, 6 * BS, BS, b"\x02" * BS)
    hold = m.commit(2, 1)  # committed; its apply (the growth) has not run yet
    m.begin(3, 3.0, False, 0, sizes=[small])
    m.receive(REC_DATA, 0, 0, BS, b"\x03" * BS)
    m.checkpoint()
    m.apply_committed(hold)  # the image grows to cycle 2's size meanwhile
    assert m.begin(3, 3.0, False, 1, sizes=[small]) == 1  # a resume after it is taken
    m.finish(3, 1)
    assert m.state.applied_cycle == 3 and m.state.volumes[0].size == small
    assert read(m.image_path(0)) == b"\x03" * BS + bytes(3 * BS)
    m.close()


def test_a_cycles_size_is_checked_before_anything_is_staged(tmp_path):
    m = _open(str(tmp_path), 8 * BS)
    m.begin(1, 1.0, True, 0)
    m.finish(1, 0)
    for bad in (0, 8 * BS + 1, 2**56 + BS):
        with pytest.raises(ProtocolError, match="not a positive multiple of its block size"):
            m.begin(2, 2.0, False, 0, sizes=[bad])
    free = os.statvfs(str(tmp_path)).f_bavail * os.statvfs(str(tmp_path)).f_frsize
    huge = (free // BS + (1 << 20)) * BS  # more than the file system has free
    with pytest.raises(NoSpaceError, match="grows its images by .* free space there"):
        m.begin(2, 2.0, False, 0, sizes=[huge])
    assert m.state.pending is None and m.state.volumes[0].size == 8 * BS
    assert not [f for f in os.listdir(m.directory) if ".staging" in f]
    m.begin(2, 2.0, False, 0, sizes=[4 * BS])  # a shrink
    m.receive(REC_DATA, 0, 3 * BS, BS, b"z" * BS)
    with pytest.raises(ProtocolError, match="outside volume 'f' of 16384 bytes"):
        m.receive(REC_DATA, 0, 4 * BS, BS, b"z" * BS)  # past the cycle's new end
    m.checkpoint()
    with pytest.raises(ProtocolError, match="cannot resume"):
        m.begin(2, 2.0, False, 1, sizes=[8 * BS])  # the same cycle with another size
    m.close()


def test_a_resizing_cycle_survives_the_state_file_and_old_files_still_load(tmp_path):
    m = _open(str(tmp_path), 8 * BS)
    m.begin(1, 1.0, True, 0)
    m.finish(1, 0)
    m.begin(2, 2.0, False, 0, sizes=[16 * BS])
    m.checkpoint()
    m.close()
    st = MirrorState.load(m.state_path)
    assert st.pending.sizes == [16 * BS] and st.volumes[0].size == 8 * BS
    plain = MirrorState("g", False, "node1", None, [VolumeSpec("g", 8 * BS, BS)])
    assert b"sizes" not in plain.to_bytes()  # a cycle that keeps its size: as before
    with pytest.raises(ProtocolError, match="size or block-size change"):  # not resizable
        Mirror.open(str(tmp_path), "node1", None, "f", False, [VolumeSpec("f", 4 * BS, BS)],
                    1 << 20)


# -- the 'resizable' and 'size' messages against a real TargetServer over a socket ---------

@pytest.fixture
def target(tmp_path):
    key = keys.generate_key()
    dst = Store.create(str(tmp_path / "dst"))
    server = TargetServer(dst, key)
    server.start()
    yield {"server": server, "key": key, "dir": os.path.join(dst.path, "mirrors", "srcnode")}
    server.stop()
    dst.close()


def _session(t, size: int, resizable: bool) -> FrameLink:
    sock = socket.create_connection(t["server"].address, timeout=10)
    handshake.client_handshake(sock, t["key"])
    link = FrameLink(sock)
    if resizable:
        link.send_message("resizable")
    link.send_message("open", node_id="srcnode", node_name=None, mirror="f", group=False,
                      volumes=[{"name": "f", "size": size, "block_size": BS}])
    link.recv_message({"opened"})
    return link


def _cycle(link: FrameLink, cycle: int, full: bool, offset: int, data: bytes) -> None:
    link.send_message("begin", cycle=cycle, freeze_time=float(cycle), full=full, resume_from=0)
    assert link.recv_message({"ack"})["chunks"] == 0
    link.sock.sendall(frames.encode_header(frames.FT_DATA, 0, frames.CODEC_NONE, cycle, offset,
                                           len(data), len(data), data_checksum(data)) + data)
    link.send_message("end", cycle=cycle, chunks=1)
    while link.recv_message({"ack", "committed", "applied"})["type"] != "applied":
        pass


def _refused(link: FrameLink) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        while True:
            link.recv_message({"ack"})
    link.sock.close()
    return info.value


def test_the_size_messages_are_checked_and_a_resize_applies_over_a_socket(target):
    link = _session(target, MiB, resizable=False)
    _cycle(link, 1, True, 0, b"a" * BS)
    link.sock.close()
    image = os.path.join(target["dir"], "f.img")
    assert os.path.getsize(image) == MiB

    # Without 'resizable' another size in 'open' is still refused.
    sock = socket.create_connection(target["server"].address, timeout=10)
    handshake.client_handshake(sock, target["key"])
    plain = FrameLink(sock)
    plain.send_message("open", node_id="srcnode", node_name=None, mirror="f", group=False,
                       volumes=[{"name": "f", "size": 2 * MiB, "block_size": BS}])
    assert "size or block-size change" in str(_refused(plain))

    bad = [({"cycle": 2, "index": 1, "size": 2 * MiB}, "names member 1", False),
           ({"cycle": 2, "index": 0, "size": 2 * MiB + 512}, "not a positive multiple", False),
           ({"cycle": 2, "index": 0, "size": 2**56 + BS}, "not a positive multiple", False),
           ({"cycle": 2, "index": 0, "size": -BS}, "must be an integer", False),
           ({"cycle": 2, "index": 0, "size": 2**55}, "free space there", True)]
    for fields, why, temporary in bad:
        link = _session(target, MiB, resizable=True)
        if fields["size"] < 0:  # past our own encoder's checks: raw JSON
            payload = json.dumps({"type": "size", **fields}).encode()
            link.sock.sendall(frames.encode_control(2, payload))
        else:
            link.send_message("size", **fields)
            link.send_message("begin", cycle=2, freeze_time=2.0, full=False, resume_from=0)
        err = _refused(link)
        assert why in str(err), (fields, err)
        assert err.temporary is temporary, (fields, err)
    assert os.path.getsize(image) == MiB  # nothing of it was applied
    assert not [f for f in os.listdir(target["dir"]) if ".staging" in f]

    # 'open' names the new size; the cycle needs no 'size' message then.  Before it,
    # the hashes of blocks past the image's end (a source comparing) are zero blocks'.
    link = _session(target, 2 * MiB, resizable=True)
    link.send_message("hash_request", index=0, start_block=0, count=300)
    got = link.recv_message({"hashes"})["digests"]
    zero = zero_block_digest(BS).hex()
    assert got[:16] != zero and got[256 * 16:] == zero * 44  # blocks 256.. lie past the end
    link.send_message("hash_request", index=0, start_block=500, count=13)  # past 'open''s
    assert "outside 0..512" in str(_refused(link))
    link = _session(target, 2 * MiB, resizable=True)
    _cycle(link, 2, False, MiB + BS, b"b" * BS)
    # And a shrink named by a 'size' message on the same connection.
    link.send_message("size", cycle=3, index=0, size=8 * BS)
    _cycle(link, 3, False, BS, b"c" * BS)
    link.sock.close()
    assert read(image) == b"a" * BS + b"c" * BS + bytes(6 * BS)


def test_an_rbd_target_resizes_its_images_inside_the_journaled_apply(ceph_cluster, tmp_path):
    """A target that keeps its images in a Ceph pool: growth and shrink are applied
    (each cycle's snapshot has its size), and a kill inside a resizing apply (the head
    already resized, part of the data written) is redone from the last snapshot."""
    try:
        from cyclemirror._cext import rbd  # noqa: F401
    except ImportError:
        pytest.skip("cyclemirror._cext.rbd is not built (install librbd-dev and librados-dev, "
                    "then rebuild: python3 setup.py build_ext --inplace)")
    from cyclemirror.receiver.rbdbackend import RbdSnapshotReader
    from tests.support import ceph

    cfg = ceph.rbd_config(ceph_cluster)
    node = "rs" + os.urandom(6).hex()  # the pool outlives the test: a name of its own
    root = str(tmp_path)

    def open_mirror(size):
        return Mirror.open(root, node, None, "f", False, [VolumeSpec("f", size, BS)], 1 << 20,
                           rbd=cfg, resizable=True)

    def snapshot(cycle) -> bytes:
        reader = RbdSnapshotReader(cfg, node, "f", cycle, BS)
        try:
            return reader.read(0, reader.size)
        finally:
            reader.release()

    m = open_mirror(8 * BS)
    assert m.backend.kind == "rbd"
    m.begin(1, 1.0, True, 0)
    m.receive(REC_DATA, 0, 0, BS, b"a" * BS)
    m.finish(1, 1)
    model = b"a" * BS + bytes(7 * BS)
    assert snapshot(1) == model
    for cycle, size, offset, fill in ((2, 16 * BS, 12 * BS, b"b"), (3, 4 * BS, BS, b"c")):
        m.begin(cycle, float(cycle), False, 0, sizes=[size])
        m.receive(REC_DATA, 0, offset, BS, fill * BS)
        m.finish(cycle, 1)
        new = bytearray(model[:size].ljust(size, b"\0"))
        new[offset:offset + BS] = fill * BS
        model = bytes(new)
        assert snapshot(cycle) == model, f"cycle {cycle}"
        assert m.state.volumes[0].size == size

    # Cycle 4 grows to 12 blocks; a kill lands after the resize and one of two writes.
    m.begin(4, 4.0, False, 0, sizes=[12 * BS])
    m.receive(REC_DATA, 0, 10 * BS, BS, b"d" * BS)
    m.receive(REC_ZERO, 0, 0, BS)
    m.checkpoint()
    m._close_inflight()
    p = m.state.pending
    m.state.committed, m.state.pending = p, None
    m.state.save(m.state_path)
    delta = m.backend.open_delta(4, m.state_path, False)
    delta.resize(0, 12 * BS)
    delta.write(0, b"d" * BS, 10 * BS)
    delta.close()
    m.backend.close()
    m = open_mirror(12 * BS)  # recovery: from snapshot 3 (its size), the whole cycle again
    new = bytearray(model.ljust(12 * BS, b"\0"))
    new[10 * BS:11 * BS] = b"d" * BS
    new[0:BS] = bytes(BS)
    assert m.state.applied_cycle == 4 and m.state.volumes[0].size == 12 * BS
    assert snapshot(4) == bytes(new)
    m.close()


def test_owed_sets_saved_at_another_size_are_laid_onto_the_new_one(tmp_path):
    """The driver's persisted owed set of a file object was saved at the size of the
    freeze it last accounted for; loaded after a crash that came after a resizing
    freeze, it is laid onto the new size (its bits below the end kept).  A volume's
    owed set of another size is not trusted (a hash comparison follows)."""
    d = str(tmp_path / "outgoing")
    st = DriverState(d, 10, resizable=True)
    owed = ExtentBitmap(10)
    owed.set_range(2, 3)
    owed.set_range(9, 1)
    st.save_owed("t:1", owed)
    st.save()
    grown = DriverState(d, 20, resizable=True).load_owed("t:1")
    assert grown.nbits == 20 and list(grown.iter_runs()) == [(2, 3), (9, 1)]
    shrunk = DriverState(d, 4, resizable=True).load_owed("t:1")
    assert shrunk.nbits == 4 and list(shrunk.iter_runs()) == [(2, 2)]
    fixed = DriverState(d, 20)
    assert fixed.load_owed("t:1").is_empty() and fixed.entry("t:1").untrusted
