"""Failback from an RBD target: a promoted RBD volume mirrored back (docs/ceph.md, "Failback").

Against the session's one-node Ceph cluster:

* the mirror subject of an RBD volume (``sender.rbdsubject``) through the
  library: a write through the volume's NBD backend is wholly in a freeze or
  wholly out of it, also across two objects; the dirty set of a freeze covers
  every block that differs from the branch snapshot (a hypothesis model of
  writes, zeroes and trims); the frozen reader's extents rebuild the
  snapshot exactly from the owed blocks over the older image; merge removes
  the freeze snapshots and never the branch snapshot;
* the cycle driver over that subject to a real target daemon: a full first
  cycle to a new target equals the frozen snapshot, the next is a delta;
* the whole failback over real daemons: A -> B (B keeps its images in RBD);
  kill -9 A; ``mirror promote --force`` on B; B's volume written over NBD
  (qemu-io) while A is down; A restarted learns it was demoted;
  ``mirror start v --to A`` on B: the wire carries at most 1.1x the
  blocks that differ, A's image equals B's volume, A's divergent write is
  kept, and a second cycle is a delta; B killed -9 right after a freeze goes
  on with deltas after its restart and the freeze it left is removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cyclemirror import keys
from cyclemirror.sender import MirrorDriver, MirrorOptions
from cyclemirror.store import Store
from tests.support.daemons import Daemon, make_key, wait_for
from tests.support.nbd import run
from tests.support.tools import require_tool

KiB, MiB = 1 << 10, 1 << 20
BS = 4096
SIZE = 8 * MiB  # two 4 MiB objects


def _fresh(io, name: str, data: bytes | None = None):
    from cyclemirror.receiver.rbdbackend import remove_image

    remove_image(io, name)
    io.create(name, SIZE)
    img = io.open(name)
    if data is not None:
        img.write(data, 0)
        img.flush()
    return img


def _subject(io, name: str, k: int = 7):
    from cyclemirror.sender.rbdsubject import RbdVolumeSubject

    return RbdVolumeSubject(io, name, size=SIZE, block_size=BS, branch_cycle=k,
                            branch_snap=f"cyclemirror-{k}", branch_freeze_time=1.5)


def _read_snap(io, name: str, snap: str) -> bytes:
    img = io.open(name, snap, True)
    try:
        return img.read(0, SIZE)
    finally:
        img.close()


def _blocks_differing(a: bytes, b: bytes) -> set[int]:
    return {i for i in range(len(a) // BS) if a[i * BS:(i + 1) * BS] != b[i * BS:(i + 1) * BS]}


def _rebuild(old: bytes, reader, owed) -> bytes:
    """``old`` with the reader's extents over ``owed`` laid on it (what a target applies)."""
    out = bytearray(old)
    for off, length, kind, fd in reader.extents(owed, 64):
        if kind == "data":
            out[off:off + length] = os.pread(fd, length, off)
        else:
            out[off:off + length] = bytes(length)
    return bytes(out)


@pytest.fixture(scope="module")
def prop_image(rbd_io):
    img = _fresh(rbd_io, "fb-prop", random.Random(1).randbytes(SIZE))
    img.snap_create("cyclemirror-7")
    yield img
    img.close()


_op = st.tuples(st.sampled_from(["write", "zero", "discard"]),
                st.integers(0, SIZE // BS - 1), st.integers(1, 300))


@settings(max_examples=4, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, min_size=1, max_size=6))
def test_a_freeze_owes_every_block_that_differs_and_its_reader_rebuilds_it(
        rbd_io, prop_image, ops):
    img = prop_image
    for snap, _size in img.snap_list():  # the previous example's freezes
        if snap.startswith("cyclemirror-out-"):
            img.snap_remove(snap)
    sub = _subject(rbd_io, "fb-prop")
    try:
        img.snap_rollback("cyclemirror-7")
        branch = _read_snap(rbd_io, "fb-prop", "cyclemirror-7")
        assert sub.open_overlay == 7 and sub.frozen_cycles() == [7]
        for kind, block, count in ops:
            off = block * BS
            length = min(count * BS, SIZE - off)
            if kind == "write":
                img.write(os.urandom(length), off)
            elif kind == "zero":
                img.write_zeroes(off, length)
            else:
                img.discard(off, length)
        img.flush()
        frozen = sub.freeze()
        assert frozen.number == 8 and sub.frozen_cycles() == [7, 8]
        snap = _read_snap(rbd_io, "fb-prop", frozen.snap)
        differ = _blocks_differing(branch, snap)
        owed = set()
        for start, count in frozen.dirty.iter_runs():
            owed.update(range(start, start + count))
        assert differ <= owed, sorted(differ - owed)[:10]
        img.write(b"\xee" * BS, 0)  # after the freeze: not in it
        img.flush()
        with frozen.reader() as rd:
            assert _rebuild(branch, rd, frozen.dirty) == snap
            assert rd.read(0, BS) == snap[:BS]
        assert sub.dirty_since(7).count_range(0, 1) == 1  # the write after it
        sub.merge_through(8)
        assert sub.frozen_cycles() == [7]  # the branch snapshot stays
    finally:
        sub.close()


def test_a_write_through_the_nbd_backend_is_wholly_before_or_after_a_freeze(rbd_io,
                                                                            ceph_cluster):
    """Writes spanning both objects, through the NBD export's own librbd handle, race
    freezes taken through the subject's handle: each snapshot holds each write whole
    (librbd quiesces the image's clients for a snapshot; the subject relies on it)."""
    from cyclemirror.receiver.rbdvolumes import RbdVolume, RbdVolumeBackend
    from tests.support.ceph import rbd_config

    img = _fresh(rbd_io, "fb-quiesce", bytes(SIZE))
    img.snap_create("cyclemirror-7")
    img.close()
    cfg = rbd_config(ceph_cluster)
    vol = RbdVolume(name="fb-quiesce", size=SIZE, block_size=BS, pool=cfg.pool, namespace=None,
                    kind="promoted", source_node="n", source_name=None, mirror="m",
                    member="m", cycle=7, parent=None, time=0.0)
    backend = RbdVolumeBackend(cfg, vol)
    sub = _subject(rbd_io, "fb-quiesce")
    span = (4 * MiB - 64 * KiB, 128 * KiB)  # across the two objects
    stop, first = threading.Event(), threading.Event()
    written, failed = [0], []

    def writer():
        try:
            while not stop.is_set():
                backend.write(span[0], bytes([written[0] % 251 + 1]) * span[1])
                written[0] += 1
                first.set()
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            failed.append(exc)
            first.set()

    t = threading.Thread(target=writer)
    t.start()
    try:
        first.wait(60)
        snaps = [sub.freeze().snap for _ in range(4)]
    finally:
        stop.set()
        t.join()
        backend.release()
    try:
        assert not failed, failed
        seen = set()
        for snap in snaps:
            got = _read_snap(rbd_io, "fb-quiesce", snap)[span[0]:span[0] + span[1]]
            assert got[0] != 0 and got == bytes([got[0]]) * span[1], snap  # one write, whole
            seen.add(got[0])
        assert written[0] > len(seen) >= 1
    finally:
        sub.merge_through(2**62)
        sub.close()


def test_cycle_numbers_go_on_from_the_floor_and_a_lost_freeze_owes_more_not_less(rbd_io):
    """Freeze snapshots removed with a mirror: the next freeze continues the numbering
    (``floor``) and owes what changed since the branch snapshot."""
    img = _fresh(rbd_io, "fb-floor", random.Random(2).randbytes(SIZE))
    img.snap_create("cyclemirror-7")
    img.write(b"\x11" * BS, 0)
    img.flush()
    sub = _subject(rbd_io, "fb-floor")
    try:
        assert sub.freeze().number == 8
        img.write(b"\x22" * BS, MiB)
        img.flush()
        f9 = sub.freeze()
        assert [s for s, _ in f9.dirty.iter_runs()] == [MiB // BS]  # since 8 only
        assert sub.remove_freezes() == 2 and sub.frozen_cycles() == [7]
    finally:
        sub.close()
    from cyclemirror.sender.rbdsubject import RbdVolumeSubject

    sub = RbdVolumeSubject(rbd_io, "fb-floor", size=SIZE, block_size=BS, branch_cycle=7,
                           branch_snap="cyclemirror-7", branch_freeze_time=1.5, floor=9)
    try:
        assert sub.open_overlay == 9
        f10 = sub.freeze()
        assert f10.number == 10
        assert [s for s, _ in f10.dirty.iter_runs()] == [0, MiB // BS]  # since 7
        sub.remove_freezes()
    finally:
        sub.close()
        img.close()


def _namespaces(io, name: str) -> dict[str, int]:
    img = io.open(name)
    try:
        return {snap: ns for snap, _id, ns in img.snap_ids()}
    finally:
        img.close()


def test_a_trashed_freeze_snapshot_goes_once_no_clone_needs_it(rbd_io):
    """librbd trashes a snapshot before removing it (a kill -9 in between leaves it
    there) and keeps it trashed while a clone reads from it: merges remove trashed
    snapshots by id once they can go, and volume rm's image removal too."""
    from cyclemirror.receiver.rbdbackend import remove_image

    img = _fresh(rbd_io, "fb-trash", random.Random(4).randbytes(SIZE))
    img.snap_create("cyclemirror-7")
    img.close()
    sub = _subject(rbd_io, "fb-trash")
    try:
        snap = sub.freeze().snap
        remove_image(rbd_io, "fb-trash-clone")
        rbd_io.clone("fb-trash", snap, "fb-trash-clone", 2)
        sub.freeze()
        sub.merge_through(8)  # the clone reads from it: trashed, not removed
        spaces = _namespaces(rbd_io, "fb-trash")
        assert snap not in spaces and sorted(spaces.values()).count(2) == 1, spaces
        assert sub.frozen_cycles() == [7, 9]
        remove_image(rbd_io, "fb-trash-clone")
        sub.merge_through(8)
        spaces = _namespaces(rbd_io, "fb-trash")
        assert 2 not in spaces.values() and len(spaces) == 2, spaces
        rbd_io.clone("fb-trash", "cyclemirror-7", "fb-trash-clone", 2)
        trashed = rbd_io.open("fb-trash")
        try:
            trashed.snap_remove("cyclemirror-7")  # trashed: the clone needs it
        finally:
            trashed.close()
        remove_image(rbd_io, "fb-trash-clone")
    finally:
        sub.close()
    assert remove_image(rbd_io, "fb-trash")  # a trashed snapshot does not stop it


def test_the_driver_ships_an_rbd_volume_full_then_as_deltas(rbd_io, tmp_path):
    """A new target of an RBD volume: the branch cycle in full, then deltas."""
    require_tool("nbdcopy")
    key_file = make_key(tmp_path / "mirror.key")
    data = random.Random(3).randbytes(SIZE)
    img = _fresh(rbd_io, "fb-drv", data)
    img.snap_create("cyclemirror-7")
    target = Daemon(tmp_path, "dst", key_file=key_file, listen=True, metrics=False).start()
    store = Store.create(os.path.join(tmp_path, "src"), node_name="rbdsrc")
    sub = _subject(rbd_io, "fb-drv")
    frozen: dict[int, bytes] = {}
    applied: dict[int, dict] = {}

    def on_frozen(f, reader):
        frozen[f.number] = reader.read(0, SIZE)

    host, port = target.listen.rsplit(":", 1)
    driver = MirrorDriver(sub, (host, int(port)), keys.read_key_file(key_file),
                          MirrorOptions(interval=3600, on_frozen=on_frozen,
                                        on_applied=lambda c, _l, s: applied.update({c: s})),
                          store=store)
    try:
        driver.start()
        wait_for(lambda: 7 in applied, 60, "the branch cycle to apply")
        assert applied[7]["full"]
        img.write(b"\x5a" * (3 * BS), MiB)  # after the branch snapshot
        img.flush()
        c = driver.sync(60)
        assert c == 8 and not applied[8]["full"]
        assert applied[8]["bytes_raw"] == 3 * BS  # exactly the written blocks
        image = run("nbdcopy", f"nbd+unix:///mirror/rbdsrc/fb-drv?socket={target.nbd_sock}",
                    "-").stdout
        assert hashlib.sha256(image).digest() == hashlib.sha256(frozen[8]).digest()
        assert frozen[8][MiB:MiB + 3 * BS] == b"\x5a" * (3 * BS)
        wait_for(lambda: sub.frozen_cycles() == [7, 8], 30, "freeze 7's merge")
    finally:
        driver.stop()
        sub.merge_through(2**62)
        sub.close()
        img.close()
        store.close()
        target.stop()


def _qemu_io(d, name: str, command: str, check: bool = True):
    """One qemu-io command; a write is followed by a flush (acknowledged = durable)."""
    uri = f"nbd+unix:///{name}?socket={d.nbd_sock}"
    if command.startswith("write"):
        return run("qemu-io", "-f", "raw", "-c", command, "-c", "flush", uri, check=check)
    return run("qemu-io", "-r", "-f", "raw", "-c", command, uri, check=check)


def _digest(d, export: str) -> str:
    data = run("nbdcopy", f"nbd+unix:///{export}?socket={d.nbd_sock}", "-").stdout
    return hashlib.sha256(data).hexdigest()


def _role(d, volume: str) -> dict:
    return next((r for r in d.status().get("roles", []) if r.get("volume") == volume), {})


def _snaps(cluster, image: str) -> list[str]:
    out = cluster.run("rbd", "snap", "ls", "--format", "json", f"{cluster.pool}/{image}")
    return [s["name"] for s in json.loads(out)]


def test_failback_from_an_rbd_volume_ships_only_the_differing_blocks(tmp_path, ceph_cluster):
    try:
        from cyclemirror._cext import rbd  # noqa: F401
    except ImportError:
        pytest.skip("cyclemirror._cext.rbd is not built (install librbd-dev and librados-dev, "
                    "then rebuild: python3 setup.py build_ext --inplace)")
    require_tool("qemu-io")
    require_tool("nbdcopy")
    key = make_key(tmp_path / "mirror.key")
    flags = ("--rbd-pool", ceph_cluster.pool, "--ceph-conf", ceph_cluster.conf,
             "--ceph-keyring", ceph_cluster.keyring)
    a = Daemon(tmp_path, "a", key_file=key, listen=True, metrics=False,
               extra=("--node-name", "hosta")).start()
    b = Daemon(tmp_path, "b", key_file=key, listen=True, metrics=False,
               extra=("--node-name", "hostb", *flags)).start()
    try:
        # A -> B, B's image in RBD.
        a.cli("volume", "create", "v", "--size", str(SIZE))
        _qemu_io(a, "v", f"write -P 1 0 {2 * MiB}")
        a.cli("mirror", "start", "v", "--to", b.listen, "--interval", "0.2")
        a.cli("mirror", "sync", "v")
        _qemu_io(a, "v", f"write -P 3 {3 * MiB} 64k")  # A's own: never shipped
        a.kill()
        res = json.loads(b.cli("mirror", "promote", "hosta/v", "--force", "--json").stdout)
        k = res["cycle"]
        assert _snaps(ceph_cluster, "v") == [f"cyclemirror-{k}"]
        # B's volume written over NBD while A is down: 192 KiB.
        _qemu_io(b, "v", f"write -P 2 {MiB} 64k")
        _qemu_io(b, "v", f"write -P 4 {5 * MiB} 128k")  # into an object new since k
        written = 192 * KiB
        a.start()
        wait_for(lambda: _role(a, "v").get("role") == "demoted", 60, "a to learn it was demoted")

        # Not for an RBD volume: a group (its freeze is its own snapshot) or --pace.
        for extra in (("--group", "g"), ("--rpo", "30", "--pace")):
            bad = b.cli("mirror", "start", "v", "--to", a.listen, *extra, check=False)
            assert bad.returncode == 2 and "RBD volume 'v'" in bad.stderr, bad
        assert b.status()["mirrors"] == []
        # Mirror B -> A: both sides wrote since k, so A refuses (split brain) until B's
        # user names A to lose; A's divergent write is then kept in a file.
        b.cli("mirror", "start", "v", "--to", a.listen, "--interval", "3600",
              "--compress", "none")
        wait_for(lambda: "plit brain" in (b.status()["mirrors"][0]["last_error"] or ""), 60,
                 "a to refuse the split brain")
        assert _role(a, "v")["role"] == "demoted"  # nothing changed on A
        b.cli("mirror", "resolve", "v", "--discard-changes-on", "hosta")
        b.cli("mirror", "resume", "v")
        rows = json.loads(b.cli("mirror", "sync", "v", "--json").stdout)
        row = rows[0]
        assert row["phase"] != "broken", row
        assert not row["last_cycle"]["full"], row
        # No full copy: the written blocks once, plus framing and messages.
        assert written <= row["shipped_bytes_total"] <= 1.1 * written, row
        print(f"failback: {row['shipped_bytes_total']} bytes on the wire for {written} "
              f"written on the RBD volume ({row['shipped_bytes_total'] / written:.3f}x)")
        assert _digest(a, "mirror/hostb/v") == _digest(b, "v")
        kept = _role(a, "v")["kept"]
        assert len(kept) == 1 and kept[0]["bytes"] == 64 * KiB, kept
        with open(kept[0]["path"], "rb") as f:
            f.seek(3 * MiB)
            assert f.read(64 * KiB) == b"\x03" * (64 * KiB)
        assert _role(a, "v")["role"] == "secondary"
        bad = b.cli("mirror", "verify", "v", check=False)  # not built for RBD: says so
        assert bad.returncode == 2 and "RBD volume" in bad.stderr, bad

        # A second cycle is a delta of what B wrote since, while B's NBD writes go on.
        _qemu_io(b, "v", f"write -P 5 {7 * MiB} 4k")
        before = row["shipped_bytes_total"]
        rows = json.loads(b.cli("mirror", "sync", "v", "--json").stdout)
        assert not rows[0]["last_cycle"]["full"]
        assert rows[0]["shipped_bytes_total"] - before < 2 * 4096 + 1024, rows
        assert _digest(a, "mirror/hostb/v") == _digest(b, "v")

        # kill -9 of B right after a freeze (its snapshot made, maybe not yet shipped):
        # after the restart the mirror goes on as deltas, and the freeze the crash left
        # behind is removed once a newer cycle is held.
        _qemu_io(b, "v", f"write -P 6 {6 * MiB} 8k")
        frozen = set(_snaps(ceph_cluster, "v"))
        syncing = threading.Thread(target=b.cli, args=("mirror", "sync", "v"),
                                   kwargs={"check": False})
        syncing.start()
        wait_for(lambda: set(_snaps(ceph_cluster, "v")) - frozen, 60, "a freeze on B")
        b.kill()
        syncing.join()
        left = set(_snaps(ceph_cluster, "v")) - frozen
        b.start()
        _qemu_io(b, "v", f"write -P 7 {6 * MiB} 4k")
        rows = json.loads(b.cli("mirror", "sync", "v", "--json").stdout)
        assert rows[0]["phase"] != "broken" and not rows[0]["last_cycle"]["full"], rows
        assert rows[0]["shipped_bytes_total"] < 64 * KiB, rows  # since the restart
        assert _digest(a, "mirror/hostb/v") == _digest(b, "v")
        # Freeze snapshots are removed once no longer needed, all of them with the mirror.
        wait_for(lambda: len(_snaps(ceph_cluster, "v")) <= 2, 30, "older freezes to go")
        assert not left & set(_snaps(ceph_cluster, "v"))
        b.cli("mirror", "break", "v")
        b.cli("mirror", "rm", "v")
        assert _snaps(ceph_cluster, "v") == [f"cyclemirror-{k}"]
        b.cli("volume", "rm", "v")
    finally:
        for d in (a, b):
            try:
                d.stop()
            except Exception:  # noqa: BLE001 - the other one still stops
                pass
