"""A tree object mirrored cycle by cycle onto a plain target tree, on a real btrfs.

Each cycle: freeze (a read-only snapshot), the delta between the two
snapshots, its frames encoded and decoded again from bytes, the target's
apply.  After every cycle the target tree must equal the source snapshot of
that cycle: paths, kinds, modes, owners, mtimes, bytes, symlink targets and
which names are hard links of one another.  A scripted history covers
renames, deletes, a swap, hard links made and broken, symlinks retargeted,
modes and owners changed, truncation and growth, sparse files, and a file
that becomes a directory and back; a seeded random history does the same at
random, and sets and removes extended attributes (user, trusted, ACLs) and
makes FIFOs and device nodes (test_tree_fidelity.py has them scripted).  The target is on btrfs (files cloned by reflink) and, where the
temporary directory is elsewhere, on that file system too (files copied).
"""

from __future__ import annotations

import contextlib
import os
import random
import stat

import pytest

from cyclemirror.receiver.treeops import TreeMirror
from cyclemirror.store import cowfs, tree, treediff
from tests.support.trees import acl_bytes, assert_same_tree, delete_subvolumes, ship, subvolume

NODE = "0123456789abcdef"
K = 4096
ACCESS, DEFAULT = "system.posix_acl_access", "system.posix_acl_default"


@pytest.fixture
def area(btrfs_mount, tmp_path):
    d = os.path.join(btrfs_mount, "m-" + tmp_path.name)
    os.makedirs(d)
    yield d
    delete_subvolumes(d)


def write(path: str, data: bytes, offset: int | None = None) -> None:
    if offset is None:
        with open(path, "wb") as fh:
            fh.write(data)
        return
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def setup_tree(area: str, tmp_path, target_on_btrfs: bool):
    src = subvolume(area)
    store = str(tmp_path / "store")
    tree.add_tree(store, NODE, "t", src)
    obj = tree.TreeObject(store, "t")
    root = os.path.join(area, "target") if target_on_btrfs else str(tmp_path / "target")
    os.makedirs(root, exist_ok=True)
    return src, obj, root


def cycle(obj, mirror):
    # Every other cycle's stage is made ahead (as the daemon does after each switch), so
    # the histories go through both ways of making a stage.
    ahead = obj.frozen_cycle % 2 == 1 and mirror.prepare_next()
    k = obj.freeze()
    delta = ship(obj, k, mirror)
    if ahead:
        assert mirror.last_stage == "ahead"
    assert_same_tree(obj.snapshot_path(k), mirror.path)
    if k > 1:  # the walk kept from the previous delta changes nothing
        fresh = treediff.tree_delta(obj.snapshot_path(k - 1), obj.snapshot_path(k))
        assert fresh.ops == delta.ops
    if k > 1:
        obj.merge_through(k - 1)  # the mirror's snapshots go after each cycle
    assert len(obj.snapshot_names()) == 1
    return delta


@pytest.mark.parametrize("target_on_btrfs", [True, False], ids=["btrfs-target", "tmp-target"])
def test_a_scripted_history_arrives_exactly(area, tmp_path, target_on_btrfs):
    src, obj, root = setup_tree(area, tmp_path, target_on_btrfs)
    if not target_on_btrfs and cowfs.filesystem_of(root) == "btrfs":
        pytest.skip("the temporary directory is on btrfs too")
    rnd = random.Random(5)
    j = lambda *p: os.path.join(src, *p)  # noqa: E731
    os.makedirs(j("a", "b"))
    big = rnd.randbytes(300 * K + 123)
    write(j("a", "big"), big)
    write(j("a", "b", "small"), b"small\n")
    write(j("a", "h1"), b"hard-linked")
    os.link(j("a", "h1"), j("a", "b", "h2"))
    os.symlink("a/big", j("s"))
    os.symlink("/etc/passwd", j("abs"))  # points out of the tree: stored, never followed
    with open(j("sparse"), "wb") as fh:
        fh.truncate(1 << 20)
        fh.seek(512 * 1024)
        fh.write(b"x" * K)
    write(j("empty"), b"")
    write(j("x"), b"x-content" * 1000)  # past btrfs inline data: extents to compare
    write(j("y"), b"y-content" * 1000)
    os.chmod(j("a", "b"), 0o750)
    os.chmod(j("x"), 0o600)
    os.chown(j("y"), 1234, 4321)
    os.mkdir(j("willbefile"))
    write(j("willbedir"), b"soon a directory")
    os.utime(j("empty"), ns=(1, 1_000_000_007))  # an old mtime arrives exactly
    mirror = TreeMirror(root, "t")
    d1 = cycle(obj, mirror)
    assert [op.op for op in d1.ops].count("link") == 1

    # cycle 2: renames, a delete, a swap, in-place writes, truncate, grow, chmod, chown...
    os.rename(j("a", "big"), j("a", "b", "big-renamed"))
    os.unlink(j("a", "b", "small"))
    os.rename(j("x"), j("tmp"))
    os.rename(j("y"), j("x"))
    os.rename(j("tmp"), j("y"))
    write(j("a", "b", "big-renamed"), b"CHANGED", 100 * K + 5)
    os.truncate(j("sparse"), 600 * 1024)
    with open(j("empty"), "ab") as fh:
        fh.write(b"grown")
    os.chmod(j("a", "h1"), 0o640)
    os.chown(j("x"), 42, 43)
    os.unlink(j("s"))
    os.symlink("a/b/big-renamed", j("s"))
    os.rmdir(j("willbefile"))
    write(j("willbefile"), b"now a file")
    os.unlink(j("willbedir"))
    os.makedirs(j("willbedir", "deep"))
    write(j("willbedir", "deep", "f"), b"deep")
    os.link(j("y"), j("a", "y-link"))
    d2 = cycle(obj, mirror)
    patches = {op.path: op for op in d2.ops if op.op == "patch"}
    renamed = patches["a/b/big-renamed"]
    assert renamed.ref == "a/big" and sum(n for _, n in renamed.data) <= 2 * K, renamed
    # the swap, no data needed (y has a new name too, which sorts first)
    assert patches["x"].ref == "y" and patches["a/y-link"].ref == "x"
    assert not patches["x"].data and not patches["a/y-link"].data
    assert d2.data_bytes < 64 * K, d2.data_bytes

    # cycle 3: break a hard link, relink, a directory becomes a file, deep rename
    os.unlink(j("a", "b", "h2"))
    write(j("a", "b", "h2"), b"no longer a link")
    os.link(j("a", "h1"), j("h3"))
    os.rename(j("willbedir"), j("a", "moved-dir"))
    write(j("a", "moved-dir", "deep", "f"), b"deeper")
    os.chmod(j("a", "moved-dir"), 0o700)
    os.utime(j("a", "b"), ns=(5, 5_000_000_000))
    os.symlink("../..", j("a", "b", "up"))  # a symlink out of the tree, as data
    cycle(obj, mirror)

    # cycle 4: nothing changed: an empty delta
    d4 = cycle(obj, mirror)
    assert [op.op for op in d4.ops] == [] and d4.data_bytes == 0
    mirror.close()
    # a reopened mirror knows its cycle and holds nothing of ours but the record
    m2 = TreeMirror(root, "t")
    assert m2.applied_cycle == 4
    assert os.listdir(m2.work) == ["state.json"]
    m2.close()


def some_bytes(rnd: random.Random, n: int) -> bytes:
    """Random bytes, or a compressible pattern (so compress=zstd encodes its extents)."""
    if rnd.random() < 0.5:
        return rnd.randbytes(n)
    return (b"pattern %d " % rnd.randrange(10) * (n // 9 + 1))[:n]


def random_step(rnd: random.Random, src: str, names: list[str]) -> None:
    """One random change to the tree: the kinds the scripted history has, at random."""
    files = []
    dirs = ["."]
    for root, ds, fs in os.walk(src):
        rel = os.path.relpath(root, src)
        dirs += [os.path.normpath(os.path.join(rel, d)) for d in ds]
        files += [os.path.normpath(os.path.join(rel, f)) for f in fs]
    j = lambda p: os.path.join(src, p)  # noqa: E731
    new = os.path.normpath(os.path.join(rnd.choice(dirs), rnd.choice(names)))
    if os.path.lexists(j(new)):
        new = None
    what = rnd.randrange(14)
    if what == 0 and new:
        write(j(new), some_bytes(rnd, rnd.choice([0, 10, 5000, 70_000, 300_000])))
    elif what == 1 and new:
        os.mkdir(j(new), rnd.choice([0o755, 0o700, 0o750]))
    elif what == 2 and new:
        os.symlink(rnd.choice(["x", "../y", "/abs/z", new]), j(new))
    elif files and what == 3 and new and os.path.isfile(j(f := rnd.choice(files))) \
            and not os.path.islink(j(f)):
        os.link(j(f), j(new))
    elif files and what == 4:
        f = rnd.choice(files)
        if not os.path.islink(j(f)) and os.path.isfile(j(f)):
            size = os.path.getsize(j(f))
            write(j(f), some_bytes(rnd, rnd.randrange(1, 9000)), rnd.randrange(0, size + 1))
    elif files and what == 5:
        f = rnd.choice(files)
        if not os.path.islink(j(f)) and os.path.isfile(j(f)):  # not a FIFO or a device
            os.truncate(j(f), rnd.randrange(0, 100_000))
    elif files and what == 6:
        os.unlink(j(rnd.choice(files)))
    elif what == 7 and new and (files or len(dirs) > 1):
        victim = rnd.choice(files + dirs[1:])
        if not (new + "/").startswith(victim + "/"):
            os.rename(j(victim), j(new))
    elif what == 8 and len(dirs) > 1:
        d = rnd.choice(dirs[1:])
        os.chmod(d and j(d), rnd.choice([0o755, 0o700, 0o711]))
    elif files and what == 9:
        f = rnd.choice(files)
        if not os.path.islink(j(f)):
            os.chmod(j(f), rnd.choice([0o644, 0o600, 0o755, 0o4755]))
        os.chown(j(f), rnd.randrange(3), rnd.randrange(3), follow_symlinks=False)
    elif files and what == 10:
        f = rnd.choice(files)
        os.utime(j(f), ns=(rnd.randrange(1 << 40), rnd.randrange(1 << 60)),
                 follow_symlinks=False)
    elif what == 11:  # a user attribute or an ACL set or removed (files and directories)
        p = rnd.choice(files + dirs)
        st = os.lstat(j(p))
        if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
            name = rnd.choice(["user.a", "user.b", ACCESS] + [DEFAULT] * stat.S_ISDIR(st.st_mode))
            if rnd.random() < 0.3:
                with contextlib.suppress(OSError):  # (not there)
                    os.removexattr(j(p), name)
            elif name.startswith("user."):
                os.setxattr(j(p), name, some_bytes(rnd, rnd.choice([0, 5, 3000])))
            else:
                perm = lambda: rnd.randrange(8)  # noqa: E731
                os.setxattr(j(p), name, acl_bytes(
                    perm(), perm(), perm(), {rnd.randrange(1, 3000): perm()} if
                    rnd.random() < 0.7 else {}, {rnd.randrange(1, 3000): perm()} if
                    rnd.random() < 0.5 else {}))
    elif what == 12 and new:  # a FIFO or a device node (numbers no real device has)
        kind = rnd.choice(["fifo", "chr", "blk"])
        if kind == "fifo":
            os.mkfifo(j(new), rnd.choice([0o600, 0o644]))
        else:
            os.mknod(j(new), (stat.S_IFCHR if kind == "chr" else stat.S_IFBLK) | 0o600,
                     os.makedev(240 if kind == "chr" else 7, rnd.randrange(1000, 1 << 20)))
    elif what == 13 and (files or len(dirs) > 1):  # trusted.*: on any kind, links too
        p = rnd.choice(files + dirs)
        if rnd.random() < 0.3:
            with contextlib.suppress(OSError):
                os.removexattr(j(p), "trusted.t", follow_symlinks=False)
        else:
            os.setxattr(j(p), "trusted.t", some_bytes(rnd, rnd.randrange(0, 200)),
                        follow_symlinks=False)


@pytest.mark.parametrize("seed", range(1, 6))
def test_a_random_history_arrives_exactly(area, tmp_path, seed):
    src, obj, root = setup_tree(area, tmp_path, True)
    rnd = random.Random(seed)
    names = [f"n{i}" for i in range(8)]
    mirror = TreeMirror(root, "t")
    for _ in range(6):
        for _ in range(rnd.randrange(5, 40)):
            random_step(rnd, src, names)
        cycle(obj, mirror)
    mirror.close()


def test_compressed_extents_are_compared_by_their_bytes(btrfs_zstd_mount, tmp_path):
    """On btrfs with compress=zstd the map cannot tell two ranges of one compressed
    extent apart: those ranges are compared by block hashes, and still arrive exactly."""
    area = os.path.join(btrfs_zstd_mount, "z-" + tmp_path.name)
    os.makedirs(area)
    try:
        src, obj, root = setup_tree(area, tmp_path, True)
        for i in range(4):
            write(os.path.join(src, f"text{i}"), b"compressible line of text\n" * 20_000)
        mirror = TreeMirror(root, "t")
        cycle(obj, mirror)
        write(os.path.join(src, "text1"), b"CHANGED", 300_001)
        os.chmod(os.path.join(src, "text2"), 0o600)  # ctime moves, bytes do not
        d = cycle(obj, mirror)
        patched = {op.path: op for op in d.ops if op.op == "patch"}
        assert set(patched) <= {"text1", "text2"} and "text1" in patched
        assert sum(n for _, n in patched["text1"].data) <= 256 << 10  # not the whole file
        assert not patched.get("text2") or not patched["text2"].data
        assert "items+hash" in d.methods or "items" in d.methods, d.methods  # no FIEMAP
        mirror.close()
    finally:
        delete_subvolumes(area)


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_a_random_history_on_compressed_btrfs_arrives_exactly(btrfs_zstd_mount, tmp_path, seed):
    area = os.path.join(btrfs_zstd_mount, "zr-" + tmp_path.name)
    os.makedirs(area)
    try:
        src, obj, root = setup_tree(area, tmp_path, True)
        rnd = random.Random(seed)
        mirror = TreeMirror(root, "t")
        for _ in range(5):
            for _ in range(rnd.randrange(5, 40)):
                random_step(rnd, src, [f"n{i}" for i in range(8)])
            cycle(obj, mirror)
        mirror.close()
    finally:
        delete_subvolumes(area)


def test_a_target_that_missed_cycles_takes_one_delta_from_the_cycle_it_holds(area, tmp_path):
    """What the daemon ships a lagging target: one delta from its cycle to the newest,
    applied with ``base``; a delta from any other cycle is refused, the tree untouched."""
    import io

    from cyclemirror.errors import ProtocolError
    from cyclemirror.wire import treeframes

    src, obj, root = setup_tree(area, tmp_path, True)
    write(os.path.join(src, "a"), b"one" * 2000)
    write(os.path.join(src, "b"), b"two" * 2000)
    mirror = TreeMirror(root, "t")
    ship(obj, obj.freeze(), mirror)
    os.rename(os.path.join(src, "a"), os.path.join(src, "a2"))
    obj.freeze()
    write(os.path.join(src, "b"), b"TWO", 100)
    os.symlink("a2", os.path.join(src, "s"))
    k = obj.freeze()
    old, new = obj.snapshot_path(1), obj.snapshot_path(k)
    delta = treediff.tree_delta(old, new)

    def frames_of() -> bytes:
        return b"".join(treeframes.encode_tree_delta(
            delta.ops, lambda rel: os.open(os.path.join(new, rel), os.O_RDONLY | os.O_NOFOLLOW),
            k, obj.freeze_time(k), False))

    def apply(base):
        reader = treeframes.TreeFrameReader(treeframes.read_exact_from(io.BytesIO(frames_of())))
        return mirror.apply(reader.events(), base=base)

    with pytest.raises(ProtocolError, match="needs cycle 2 applied here; cycle 1 is"):
        apply(2)
    with pytest.raises(ProtocolError, match="needs cycle 2 applied here"):
        apply(None)  # the default: the cycle before it
    assert_same_tree(old, mirror.path)
    assert apply(1) == k and mirror.applied_cycle == k
    assert_same_tree(new, mirror.path)
    assert [e for e in os.listdir(mirror.work) if e.startswith("stage-")] == []


def test_a_stage_made_ahead_is_used_once_and_never_outlives_a_reopen(area, tmp_path):
    """``prepare_next`` snapshots the applied tree as ``next-A``; a reopen (what a restart
    or crash leads to) deletes it; the next apply of a delta from A takes it as its stage;
    off btrfs subvolumes there is nothing to make ahead."""
    src, obj, root = setup_tree(area, tmp_path, True)
    write(os.path.join(src, "f"), b"one" * 2000)
    mirror = TreeMirror(root, "t")
    assert not mirror.prepare_next()  # nothing applied yet
    cycle(obj, mirror)
    assert mirror.prepare_next() and mirror.prepare_next()  # the second: already there
    assert sorted(os.listdir(mirror.work)) == ["next-1", "state.json"]
    mirror.close()
    mirror = TreeMirror(root, "t")
    assert os.listdir(mirror.work) == ["state.json"]
    assert mirror.prepare_next()
    write(os.path.join(src, "f"), b"two", 100)
    k = obj.freeze()
    ship(obj, k, mirror)
    assert mirror.last_stage == "ahead"
    assert_same_tree(obj.snapshot_path(k), mirror.path)
    assert os.listdir(mirror.work) == ["state.json"]
    mirror.close()
    plain = TreeMirror(str(tmp_path / "plain"), "t")
    assert not plain.prepare_next()
    plain.close()


def test_a_next_stage_that_is_not_a_snapshot_of_the_mirror_is_not_used(area, tmp_path):
    """A ``next-A`` that is a snapshot of another subvolume (not of the mirror as it is)
    is deleted, and the stage is snapshotted from the mirror as before: the result is
    still exactly the source."""
    src, obj, root = setup_tree(area, tmp_path, True)
    write(os.path.join(src, "f"), b"one" * 2000)
    mirror = TreeMirror(root, "t")
    cycle(obj, mirror)
    other = subvolume(area, "other")
    write(os.path.join(other, "junk"), b"not the mirror")
    from cyclemirror.store import btrfsioctl

    btrfsioctl.snapshot(other, os.path.join(mirror.work, "next-1"), readonly=False)
    write(os.path.join(src, "g"), b"new")
    k = obj.freeze()
    ship(obj, k, mirror)
    assert mirror.last_stage == "snapshot"
    assert_same_tree(obj.snapshot_path(k), mirror.path)
    assert os.listdir(mirror.work) == ["state.json"]
    mirror.close()


def test_file_writers_finish_every_file_and_raise_the_first_failure(tmp_path):
    """The target's pool (``treeops.FileWriters``) writes each file's held runs and then
    its metadata; a file whose write fails (here a descriptor opened read-only) fails
    the cycle at ``wait``, the other files are still finished (grown, written, zeroed,
    in that order), and every descriptor is closed either way."""
    import errno

    from cyclemirror.receiver import treeops

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = fds()
    writers = treeops.FileWriters()
    meta = {"mode": 0o640, "uid": os.getuid(), "gid": os.getgid(),
            "mtime_ns": 1_500_000_000_123_456_789, "xattrs": ()}
    paths = [str(tmp_path / f"f{i}") for i in range(20)]
    for i, p in enumerate(paths):
        with open(p, "wb") as fh:
            fh.write(b"\1" * 2 * K)
        flags = os.O_RDONLY if i == 7 else os.O_RDWR
        fd = os.open(p, flags)
        runs = [(treeops._truncate, 3 * K, None),
                (treeops.pwrite_all, K, bytes([i + 2]) * K),
                (treeops.punch_zeroes, 0, K)]
        writers.submit(fd, runs, meta, f"file {i}")
    with pytest.raises(OSError) as err:
        writers.close(check=True)
    assert err.value.errno in (errno.EBADF, errno.EINVAL)
    assert fds() == before
    for i, p in enumerate(paths):
        with open(p, "rb") as fh:
            body = fh.read()
        if i == 7:
            assert body == b"\1" * 2 * K
            continue
        assert body == b"\0" * K + bytes([i + 2]) * K + b"\0" * K
        st = os.stat(p)
        assert stat.S_IMODE(st.st_mode) == 0o640
        assert st.st_mtime_ns == meta["mtime_ns"]
