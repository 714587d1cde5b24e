"""File objects on real XFS (reflink) and btrfs file systems on loop devices.

Proves: ext4 and tmpfs are refused with the reason and the fixes; a freeze is
a reflink snapshot whose delta (FIEMAP) holds every rewritten block and not
much more, agreeing with the block-hash fallback; old snapshots go at merge
and what a crash left goes at the next open; a file that grew or shrank
freezes with its new size (the grown tail all in the delta, its holes as zero
runs), and one whose size is no multiple of the block size fails the freeze,
naming both sizes.  End to end with real daemons: qemu-io writes
at random offsets into a sparse file on XFS and on btrfs while cycles repeat, and every
applied cycle on the target is a prefix of the writes (one freeze instant,
never torn); a kill -9 of the source daemon in the middle of a cycle leaves
the target at its last freeze, and after the restart the next cycle is a
delta, no stray snapshot is left, and removing the object removes them all.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest

from cyclemirror.errors import AlreadyExistsError, StoreError, UsageError
from cyclemirror.store import Store, cowfs, fileobject
from tests.support.daemons import DaemonPool, cli_env, make_key, wait_for
from tests.support.tools import require_tool

K = 4096
MiB = 1 << 20


@pytest.fixture
def xfs(xfs_mount):
    return xfs_mount


@pytest.fixture(params=["xfs", "btrfs"])
def cowdir(request, tmp_path):
    """A fresh directory on XFS or btrfs, emptied afterwards."""
    mount = request.getfixturevalue(f"{request.param}_mount")
    d = os.path.join(mount, tmp_path.name)
    os.makedirs(d)
    yield d
    subprocess.run(["rm", "-rf", d], check=False)


@pytest.fixture
def store(tmp_path):
    s = Store.create(str(tmp_path / "store"))
    yield s
    s.close()


def make_file(path: str, size: int, data_at=()) -> None:
    with open(path, "wb") as fh:
        fh.truncate(size)
        for off, data in data_at:
            fh.seek(off)
            fh.write(data)
        os.fsync(fh.fileno())


def pwrite(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


# -- refusals ------------------------------------------------------------------------------

def test_ext4_and_tmpfs_are_refused_with_the_reason_and_the_fixes(store, tmp_path):
    checked = 0
    for where in (str(tmp_path), "/dev/shm"):
        fs = cowfs.filesystem_of(where)
        if fs not in ("ext4", "tmpfs"):
            continue
        path = os.path.join(where, f"cm-refused-{os.getpid()}.img")
        make_file(path, MiB)
        try:
            with pytest.raises(UsageError) as err:
                store.add_file("f", path)
        finally:
            os.unlink(path)
        text = str(err.value)
        assert f"is on {fs}" in text and "copy-on-write" in text
        assert "reflink=1" in text and "btrfs" in text and "volume" in text
        checked += 1
    if not checked:
        pytest.skip("neither the temp directory nor /dev/shm is ext4 or tmpfs here")
    assert store.list_files() == []


def test_a_file_object_name_is_not_also_a_volume_and_bad_paths_are_refused(store, xfs,
                                                                        tmp_path):
    path = os.path.join(xfs, f"names-{tmp_path.name}.img")
    make_file(path, MiB)
    try:
        store.create_volume("v", MiB)
        with pytest.raises(AlreadyExistsError, match="is a volume"):
            store.add_file("v", path)
        with pytest.raises(UsageError, match="absolute"):
            store.add_file("f", "relative.img")
        with pytest.raises(UsageError, match="not a positive multiple"):
            make_file(path + ".odd", 5000)
            store.add_file("f", path + ".odd")
        store.add_file("f", path)
        with pytest.raises(AlreadyExistsError, match="is a file object"):
            store.create_volume("f", MiB)
    finally:
        for p in (path, path + ".odd"):
            if os.path.exists(p):
                os.unlink(p)
        if "f" in store.list_files():
            store.remove_file("f")


def test_a_symlink_planted_as_the_snapshot_directory_is_refused(store, cowdir):
    path = os.path.join(cowdir, "s.img")
    make_file(path, MiB)
    elsewhere = os.path.join(cowdir, "elsewhere")
    os.mkdir(elsewhere)
    os.symlink(elsewhere, fileobject.snapshot_dir_for(path, store.node_id, "s"))
    with pytest.raises(StoreError, match="not a directory owned by"):
        store.add_file("s", path)
    assert os.listdir(elsewhere) == [] and store.list_files() == []


# -- the freeze and the delta -----------------------------------------------------------------

def test_the_delta_holds_every_rewritten_block_and_agrees_with_block_hashes(store, cowdir):
    rnd = random.Random(16)
    size = 16 * MiB
    path = os.path.join(cowdir, "vm.img")
    make_file(path, size, [(0, rnd.randbytes(4 * MiB)), (9 * MiB, rnd.randbytes(MiB))])
    obj = store.add_file("vm", path)
    c1 = obj.freeze()
    assert c1.number == 1 and c1.dirty is None  # the first cycle ships everything
    written = set()
    for _ in range(60):
        block = rnd.randrange(size // K)
        pwrite(path, block * K, rnd.randbytes(K))
        written.add(block)
    with open(path, "rb") as fh:
        at_freeze = fh.read()
    c2 = obj.freeze()
    dirty = {b for s, n in c2.dirty.iter_runs() for b in range(s, s + n)}
    assert written <= dirty
    assert len(dirty) <= 8 * len(written), "the delta is the rewritten extents, not the file"
    assert obj.last_diff_method == "fiemap"
    pwrite(path, 0, b"after the freeze" * 256)  # the snapshot keeps the freeze's bytes
    with c2.reader() as rd:
        assert rd.read(0, size) == at_freeze
        runs = list(rd.extents(None, 1 << 10))
        # the holes of the sparse file are zero runs, the rest data, covering it all
        assert sum(n for _o, n, _k, _fd in runs) == size
        assert any(k == "zero" for _o, _n, k, _fd in runs)
        for off, n, kind, _fd in runs:
            if kind == "zero":
                assert at_freeze[off:off + n] == bytes(n)
    snaps = obj.snapshots
    fds = [os.open(os.path.join(snaps, f"snap-{k}"), os.O_RDONLY) for k in (1, 2)]
    try:
        by_hash = fileobject.hash_diff(fds[0], fds[1], size, K)
    finally:
        for fd in fds:
            os.close(fd)
    hashed = {b for s, n in by_hash.iter_runs() for b in range(s, s + n)}
    assert hashed <= dirty and hashed == {b for b in written}  # random blocks all differ


def test_a_write_not_yet_written_back_counts_as_pending_for_a_sync(store, cowdir):
    """A `mirror sync` skips a freeze when nothing is pending since the last one; an
    overwrite of a block still shared with the snapshot, in the page cache only, is
    invisible to a plain FIEMAP, so the exact count must write back first."""
    path = os.path.join(cowdir, "vm.img")
    make_file(path, 8 * MiB, [(0, os.urandom(8 * MiB))])
    obj = store.add_file("vm", path)
    obj.freeze()
    assert obj.pending_blocks(exact=True) == 0
    pwrite(path, 3 * MiB, b"x" * K)  # no fsync: the block is dirty in the page cache
    assert obj.pending_blocks(exact=True) >= 1
    pwrite(path, 5 * MiB, b"y" * K)  # again within the approximate count's cache second
    assert obj.pending_blocks(exact=True) >= 2


def test_compressed_btrfs_extents_are_compared_by_their_bytes(store, btrfs_zstd_mount,
                                                             tmp_path):
    # A compressed extent's map gives the extent's place, not the byte's: the two parts
    # of an extent split by a write look alike in the map, so their bytes are hashed.
    path = os.path.join(btrfs_zstd_mount, f"z-{tmp_path.name}.img")
    make_file(path, 4 * MiB, [(0, b"abc" * (4 * MiB // 3))])
    try:
        obj = store.add_file("z", path)
        obj.freeze()
        pwrite(path, 10 * K, b"Z" * K)
        c2 = obj.freeze()
        assert obj.last_diff_method == "fiemap+hash"
        assert list(c2.dirty.iter_runs()) == [(10, 1)]
        assert list(obj.freeze().dirty.iter_runs()) == []
    finally:
        store.remove_file("z")
        os.unlink(path)


def test_merge_deletes_old_snapshots_and_open_cleans_what_a_crash_left(tmp_path, cowdir):
    path = os.path.join(cowdir, "f.img")
    make_file(path, 4 * MiB, [(0, b"x" * MiB)])
    spath = str(tmp_path / "s")
    with Store.create(spath) as s:
        obj = s.add_file("f", path)
        obj.freeze()
        for k in (2, 3):
            pwrite(path, k * 64 * K, bytes([k]) * K)
            obj.freeze()
        want = obj.frozen(3).dirty
        obj.merge_through(1)
        assert obj.frozen_cycles() == [3]
        snaps = obj.snapshots
        assert sorted(os.listdir(snaps)) == ["snap-2", "snap-3"]
    # What a crash leaves: a clone under its temp name, a freeze that never committed
    # (above top) and a merged snapshot whose unlink never happened.
    for name in (".tmp-4", "snap-4", "snap-1"):
        with open(os.path.join(snaps, name), "wb") as fh:
            fh.write(b"left")
    with Store.open(spath) as s:
        obj = s.open_file("f")
        assert sorted(os.listdir(snaps)) == ["snap-2", "snap-3"]
        assert obj.open_overlay == 3 and obj.frozen(3).dirty == want  # found again
        s.remove_file("f")
        assert not os.path.exists(snaps) and os.path.exists(path)


def test_a_file_that_grows_or_shrinks_freezes_with_its_new_size(store, cowdir, tmp_path):
    path = os.path.join(cowdir, "g.img")
    make_file(path, MiB, [(0, b"a" * K)])
    obj = store.add_file("g", path)
    obj.freeze()
    os.truncate(path, 2 * MiB)  # grows; one block written in the new tail
    pwrite(path, MiB + 128 * K, b"t" * K)
    c2 = obj.freeze()
    assert (c2.size, c2.nblocks, obj.size) == (2 * MiB, 512, 2 * MiB)
    assert list(c2.dirty.iter_runs()) == [(256, 256)]  # the whole new tail, nothing else
    with c2.reader() as rd:
        runs = [(o, n, kind) for o, n, kind, _fd in rd.extents(c2.dirty, 1 << 20)]
    data = [(o, n) for o, n, kind in runs if kind == "data"]
    assert data == [(MiB + 128 * K, K)]  # the holes of the tail travel as zero runs
    assert sum(n for _o, n, _k in runs) == MiB

    os.truncate(path, 128 * K)  # shrinks below where it was written
    c3 = obj.freeze()
    assert (c3.size, c3.dirty.nbits) == (128 * K, 128) and c3.dirty.is_empty()
    with c3.reader() as rd:
        assert rd.read(0, K) == b"a" * K
        with pytest.raises(UsageError):
            rd.read(128 * K, K)  # past its end

    o2 = fileobject.FileObject(store.path, "g")  # the sizes of kept cycles are recorded
    assert o2.size == 128 * K and o2.size_changed
    assert o2.frozen(3).size == 128 * K and o2.frozen(2).size == 2 * MiB

    os.truncate(path, 128 * K + 100)  # not a multiple of the block size: refused
    with pytest.raises(StoreError, match=r"now 524388 bytes, it was 524288 .*multiple of its "
                                         r"block size 4096"):
        obj.freeze()
    assert obj.open_overlay == 3
    assert sorted(os.listdir(obj.snapshots)) == ["snap-1", "snap-2", "snap-3"]


# -- end to end: real daemons, qemu-io, kill -9 -------------------------------------------------

SLOT = 16 * K  # 64 KiB
FILE_SIZE = 64 * MiB


def writes_plan(n: int, seed: int) -> list[tuple[int, int, int]]:
    """n writes (offset, length, pattern) at distinct 64 KiB slots: the image at any freeze
    must hold exactly the first j of them, each whole."""
    rnd = random.Random(seed)
    slots = rnd.sample(range(FILE_SIZE // SLOT), n)
    return [(s * SLOT, rnd.choice((K, 2 * K, 8 * K, SLOT)), 1 + i % 250)
            for i, s in enumerate(slots)]


def prefix_length(image: bytes, plan) -> int:
    """How many of the planned writes the image holds (they must be a prefix, none torn)."""
    present = []
    for i, (off, n, pattern) in enumerate(plan):
        got = image[off:off + n]
        if got == bytes([pattern]) * n:
            present.append(True)
        elif got == bytes(n):
            present.append(False)
        else:
            raise AssertionError(f"write {i} at {off} ({n} bytes) is torn on the target")
    j = present.count(True)
    assert present == [True] * j + [False] * (len(present) - j), \
        f"the target holds writes {[i for i, p in enumerate(present) if p]}: not a prefix"
    return j


def image_of(target, source) -> bytes:
    rows = [r for r in target.status()["incoming"] if r["source_node"] == source.node_id]
    assert len(rows) == 1, rows
    with open(rows[0]["image"], "rb") as fh:
        return fh.read()


def full_copies(source) -> int:
    return len(re.findall(r"mirror vm -> \S+: cycle \d+ applied.*full copy", source.log()))


def test_qemu_io_writes_while_mirrored_and_a_kill_9_mid_cycle(cowdir, tmp_path):
    qemu_io = require_tool("qemu-io")
    path = os.path.join(cowdir, "vm.img")
    make_file(path, FILE_SIZE)
    plan = writes_plan(300, seed=7)
    with DaemonPool(tmp_path) as pool:
        key = make_key(tmp_path / "k")
        a = pool.start("a", key_file=key)
        b = pool.start("b", key_file=key, listen=True)
        a.cli("file", "add", "vm", path)
        elsewhere = str(tmp_path / "on-the-temp-fs.img")
        make_file(elsewhere, MiB)
        r = a.cli("file", "add", "other", elsewhere, check=False)
        if cowfs.filesystem_of(elsewhere) not in cowfs.COW_FILESYSTEMS:
            assert r.returncode == 2 and "copy-on-write" in r.stderr, r.stderr
        r = a.cli("mirror", "start", "vm", "--to", b.listen, "--group", "g", check=False)
        assert r.returncode == 2 and "per-file" in r.stderr, r.stderr
        # Cycles only when asked; a slow link, so a cycle of incompressible data lasts.
        a.cli("mirror", "start", "vm", "--to", b.listen, "--interval", "3600",
              "--bwlimit", "8M")
        a.cli("mirror", "sync", "vm")
        script = []
        for off, n, pattern in plan:
            script += ["-c", f"write -P {pattern} {off} {n}", "-c", "sleep 10"]
        writer = subprocess.Popen([qemu_io, "-f", "raw", *script, path],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seen = []
        try:
            while writer.poll() is None:
                a.cli("mirror", "sync", "vm")
                seen.append(prefix_length(image_of(b, a), plan))
        finally:
            writer.wait(60)
        assert writer.returncode == 0, writer.stderr.read()
        a.cli("mirror", "sync", "vm")
        seen.append(prefix_length(image_of(b, a), plan))
        assert seen == sorted(seen) and seen[-1] == len(plan), seen
        with open(path, "rb") as fh:
            at_last_freeze = fh.read()
        assert image_of(b, a) == at_last_freeze
        assert "clean" in a.cli("mirror", "verify", "vm").stdout  # verify reads snapshots

        # kill -9 of the source daemon while a cycle of 24 MiB of new data ships
        rnd = random.Random(9)
        pwrite(path, 8 * MiB, rnd.randbytes(24 * MiB))
        bg = subprocess.Popen([sys.executable, "-m", "cyclemirror.cli", "--store", a.store,
                               "mirror", "sync", "vm"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=cli_env())

        def shipping():
            t = a.status()["mirrors"][0]
            prog = t.get("progress")
            return prog is not None and 0 < prog["done"] < prog["total"]

        wait_for(shipping, 60, "the cycle to be shipping")
        a.kill()
        bg.wait(60)
        assert image_of(b, a) == at_last_freeze  # still the last freeze, nothing torn
        snaps = [d for d in os.listdir(cowdir) if d.startswith(".cyclemirror-")]
        assert len(snaps) == 1
        snapdir = os.path.join(cowdir, snaps[0])

        a.start()  # the mirror comes back by itself; its next cycle is a delta
        a.cli("mirror", "sync", "vm")
        with open(path, "rb") as fh:
            assert image_of(b, a) == fh.read()
        assert full_copies(a) == 1, a.log()
        left = sorted(os.listdir(snapdir))
        assert left and len(left) <= 2 and all(re.fullmatch(r"snap-\d+", n) for n in left), left
        files = a.status()["files"]
        assert [f["name"] for f in files] == ["vm"] and files[0]["consistency"] == "per-file"

        r = a.cli("file", "rm", "vm", check=False)
        assert r.returncode == 2 and "is mirrored to" in r.stderr, r.stderr
        listed = json.loads(a.cli("file", "list", "--json").stdout)
        assert [(f["name"], f["path"]) for f in listed] == [("vm", path)]
        a.cli("mirror", "break", "vm")
        a.cli("mirror", "rm", "vm")
        a.cli("file", "rm", "vm")
        assert json.loads(a.cli("file", "list", "--json").stdout) == []
        assert not os.path.exists(snapdir) and os.path.getsize(path) == FILE_SIZE
    os.unlink(path)
