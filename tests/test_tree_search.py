"""The tree delta from what btrfs says changed equals the one from walking everything.

``treediff.tree_delta`` looks, where it can, only at the inodes a
``BTRFS_IOC_TREE_SEARCH`` says were written since the previous snapshot
(``_search_walk``).  Over seeded random histories (creates, deletes of files
and of whole subtrees, renames of files and directories, swaps, hard links,
symlinks, FIFOs, device nodes, extended attributes and ACLs set and removed,
a file becoming a directory, mode/owner/mtime changes, truncation, growth,
sparse files), on plain and on zstd-compressed btrfs,
every cycle's delta made that way must have been made that way (``how`` is
"search") and equal the full walk's: the same ops, skipped paths and data
bytes, and the same walk of the new snapshot for the next delta.  Every cycle
is also shipped and applied, and the target must equal the source snapshot.
Where the search cannot vouch (a kept walk that is not of the previous
snapshot, or a plain dict), it walks, and the ops are still right.
"""

from __future__ import annotations

import errno
import os
import random
import shutil

import pytest

from cyclemirror.receiver.treeops import TreeMirror
from cyclemirror.store import tree, treediff
from tests.support.trees import delete_subvolumes, ship, subvolume, tree_image
from tests.test_tree_mirror import random_step, some_bytes, write

NODE = "0123456789abcdef"


def listing(src: str) -> tuple[list[str], list[str]]:
    files, dirs = [], []
    for root, ds, fs in os.walk(src):
        rel = os.path.relpath(root, src)
        dirs += [os.path.normpath(os.path.join(rel, d)) for d in ds]
        files += [os.path.normpath(os.path.join(rel, f)) for f in fs]
    return files, dirs


def structural_step(rnd: random.Random, src: str) -> None:
    """What random_step does not: whole subtrees deleted, moved, swapped; FIFOs; a
    file and a directory trading a name; a deep new subtree; a sparse file."""
    files, dirs = listing(src)
    j = lambda p: os.path.join(src, p)  # noqa: E731
    what = rnd.randrange(7)
    if what == 0 and dirs:
        shutil.rmtree(j(rnd.choice(dirs)))
    elif what == 1 and len(dirs) >= 2:
        a, b = rnd.sample(dirs, 2)
        if not (a + "/").startswith(b + "/") and not (b + "/").startswith(a + "/"):
            os.rename(j(a), j(a + ".swap"))
            os.rename(j(b), j(a))
            os.rename(j(a + ".swap"), j(b))
    elif what == 2:
        d = rnd.choice(["."] + dirs)
        p = os.path.normpath(os.path.join(d, f"fifo{rnd.randrange(4)}"))
        if not os.path.lexists(j(p)):
            os.mkfifo(j(p))
    elif what == 3 and files:
        f = rnd.choice(files)
        if os.path.isfile(j(f)) and not os.path.islink(j(f)):
            os.unlink(j(f))
            os.mkdir(j(f))
            write(os.path.join(j(f), "inside"), b"was a file")
    elif what == 4:
        top = os.path.normpath(os.path.join(rnd.choice(["."] + dirs), f"deep{rnd.randrange(3)}"))
        if not os.path.lexists(j(top)):
            os.makedirs(j(os.path.join(top, "a", "b")))
            for i in range(rnd.randrange(1, 6)):
                write(j(os.path.join(top, "a", "b", f"f{i}")), some_bytes(rnd, 3000))
    elif what == 5:
        p = os.path.normpath(os.path.join(rnd.choice(["."] + dirs), "sparse"))
        if not os.path.lexists(j(p)):
            with open(j(p), "wb") as fh:
                fh.seek(rnd.randrange(1, 1 << 20))
                fh.write(some_bytes(rnd, 5000))
    elif what == 6 and dirs:
        d = rnd.choice(dirs)
        dest = os.path.normpath(os.path.join(rnd.choice(["."] + dirs), f"moved{rnd.randrange(3)}"))
        if not (dest + "/").startswith(d + "/") and not os.path.lexists(j(dest)):
            os.rename(j(d), j(dest))


def assert_mirrored(source: str, target: str) -> None:
    """The target equals the source but for sockets, which are not mirrored."""
    a, b = tree_image(source), tree_image(target)
    a["entries"] = {p: e for p, e in a["entries"].items() if e[0] != "socket"}
    assert a == b


def check_cycle(obj, mirror) -> treediff.TreeDelta:
    """One cycle: the kept walk's delta (the search) against a full walk's, then shipped."""
    k = obj.freeze()
    if k > 1:
        old, new = obj.snapshot_path(k - 1), obj.snapshot_path(k)
        full = treediff.tree_delta(old, new, search=False)
        # the inodes written after the old snapshot, from the search's own pass, are
        # what a search of their own (from the next transaction) says
        assert treediff._search_walk(old, new, treediff.walk(old))[2] == \
            treediff._written_since(old, new)
    delta = ship(obj, k, mirror)
    assert_mirrored(obj.snapshot_path(k), mirror.path)
    if k > 1:
        assert delta.new_walk.how == "search", delta.new_walk.how
        assert full.new_walk.how == "walk"
        assert delta.ops == full.ops
        assert delta.skipped == full.skipped
        assert delta.data_bytes == full.data_bytes
        assert dict(delta.new_walk) == dict(full.new_walk)
        kept = delta.new_walk
        assert {i: sorted(kept.paths_of(i)) for i in kept.by_ino} == \
            {i: sorted(full.new_walk.paths_of(i)) for i in full.new_walk.by_ino}
        assert kept.others == full.new_walk.others
        obj.merge_through(k - 1)
    return delta


def history(area: str, tmp_path, seed: int, cycles: int) -> None:
    src = subvolume(area)
    store = str(tmp_path / "store")
    tree.add_tree(store, NODE, "t", src)
    obj = tree.TreeObject(store, "t")
    root = os.path.join(area, "target")
    os.makedirs(root)
    rnd = random.Random(seed)
    names = [f"n{i}" for i in range(8)]
    mirror = TreeMirror(root, "t")
    seen: set[str] = set()
    try:
        for _ in range(cycles):
            for _ in range(rnd.randrange(5, 40)):
                if rnd.random() < 0.25:
                    structural_step(rnd, src)
                else:
                    try:
                        random_step(rnd, src, names)
                    except OSError as exc:  # it truncated a FIFO: no change made
                        if exc.errno != errno.EINVAL:
                            raise
            d = check_cycle(obj, mirror)
            seen |= {op.op for op in d.ops} | {"xattrs:" + op.op for op in d.ops if op.xattrs}
    finally:
        mirror.close()
    # the history exercised what the search must notice beyond files: attributes (set
    # on files and directories), FIFOs and device nodes
    assert "node" in seen and any(x.startswith("xattrs:") for x in seen), sorted(seen)


@pytest.mark.parametrize("seed", range(31, 37))
def test_a_random_history_searched_equals_walked(btrfs_mount, tmp_path, seed):
    area = os.path.join(btrfs_mount, "s-" + tmp_path.name)
    os.makedirs(area)
    try:
        history(area, tmp_path, seed, 6)
    finally:
        delete_subvolumes(area)


@pytest.mark.parametrize("seed", [45, 46])
def test_a_random_history_compared_by_threads_equals_walked(btrfs_mount, tmp_path, seed,
                                                             monkeypatch):
    """Two compare threads, so that four or more changed files are compared by threads
    (``treediff._compare_all``): the same ops as the full walk, and the target equal
    to the source."""
    monkeypatch.setattr(treediff, "COMPARE_THREADS", 2)
    area = os.path.join(btrfs_mount, "st-" + tmp_path.name)
    os.makedirs(area)
    try:
        history(area, tmp_path, seed, 4)
    finally:
        delete_subvolumes(area)


@pytest.mark.parametrize("seed", [41, 42])
def test_a_random_history_on_compressed_btrfs_searched_equals_walked(btrfs_zstd_mount,
                                                                      tmp_path, seed):
    area = os.path.join(btrfs_zstd_mount, "sz-" + tmp_path.name)
    os.makedirs(area)
    try:
        history(area, tmp_path, seed, 5)
    finally:
        delete_subvolumes(area)


def test_a_kept_walk_of_another_snapshot_is_not_trusted(btrfs_mount, tmp_path):
    """A kept walk must be of the previous snapshot (its uuid) to search from: a walk of
    an older one, or a plain dict that says nothing of where it came from, makes the
    delta walk the new snapshot; so do snapshots out of order and a live subvolume."""
    area = os.path.join(btrfs_mount, "w-" + tmp_path.name)
    os.makedirs(area)
    try:
        src = subvolume(area)
        store = str(tmp_path / "store")
        tree.add_tree(store, NODE, "t", src)
        obj = tree.TreeObject(store, "t")
        for i in range(20):
            write(os.path.join(src, f"f{i}"), b"one" * i)
        s1 = obj.snapshot_path(obj.freeze())
        write(os.path.join(src, "f3"), b"two")
        s2 = obj.snapshot_path(obj.freeze())
        write(os.path.join(src, "f4"), b"three")
        os.unlink(os.path.join(src, "f5"))
        s3 = obj.snapshot_path(obj.freeze())
        w1, w2 = treediff.walk(s1), treediff.walk(s2)
        want = treediff.tree_delta(s2, s3, search=False).ops
        assert {op.path for op in want} == {".", "f4", "f5"}
        wrong = treediff.tree_delta(s2, s3, w1)  # the walk of s1, not s2
        assert wrong.new_walk.how.startswith("walk (the walk kept is not of")
        # the walk passed is what the delta starts from (as before); it is just not
        # searched from.  Its ops are those from s1 (their data ranges may differ: a
        # small file's bytes are compared, and those are read from s2)
        assert [(op.op, op.path, op.size) for op in wrong.ops] == \
            [(op.op, op.path, op.size) for op in treediff.tree_delta(s1, s3, search=False).ops]
        plain = treediff.tree_delta(s2, s3, dict(w2))
        assert plain.new_walk.how.startswith("walk (")
        assert plain.ops == want
        right = treediff.tree_delta(s2, s3, w2)
        assert right.new_walk.how == "search" and right.ops == want
        backwards = treediff.tree_delta(s3, s2, right.new_walk)
        assert backwards.new_walk.how.startswith("walk (not two snapshots")
        assert backwards.ops == treediff.tree_delta(s3, s2, search=False).ops
        # a writable subvolume can change after it was walked: never searched from
        live = treediff.tree_delta(s3, src, right.new_walk)
        assert live.new_walk.how == "walk (not read-only snapshots)"
    finally:
        delete_subvolumes(area)


def test_a_small_file_only_read_since_the_last_snapshot_is_not_shipped_again(btrfs_mount,
                                                                            tmp_path):
    """A read rewrites a small file's inode (its atime) in a later transaction, so the
    delta looks at it; its data is inline, which FIEMAP cannot place, so its bytes
    decide: no op (a failback once counted such a file as the old source's change)."""
    area = os.path.join(btrfs_mount, "r-" + tmp_path.name)
    os.makedirs(area)
    try:
        src = subvolume(area)
        store = str(tmp_path / "store")
        tree.add_tree(store, NODE, "t", src)
        obj = tree.TreeObject(store, "t")
        path = os.path.join(src, "small")
        write(path, b"changed on B\n")
        s1 = obj.snapshot_path(obj.freeze())
        ino = os.lstat(path).st_ino
        with open(path, "rb") as fh:  # relatime: the first read after a write sets atime
            assert fh.read() == b"changed on B\n"
        s2 = obj.snapshot_path(obj.freeze())
        written = treediff._written_since(s1, s2)
        if written is None or ino not in written:
            pytest.skip("the read wrote no atime here (a noatime mount): nothing to show")
        for search in (True, False):
            assert [op for op in treediff.tree_delta(s1, s2, search=search).ops
                    if op.path == "small"] == [], search
    finally:
        delete_subvolumes(area)


def test_a_patch_from_itself_is_written_in_place_unless_hard_linked(btrfs_mount, tmp_path):
    """The target patches a file from its own path in the stage's copy of it (the same
    inode as the previous version's, a snapshot keeps inode numbers), but makes a file
    with another name anew (writing in place would change the other name too)."""
    area = os.path.join(btrfs_mount, "p-" + tmp_path.name)
    os.makedirs(area)
    try:
        src = subvolume(area)
        store = str(tmp_path / "store")
        tree.add_tree(store, NODE, "t", src)
        obj = tree.TreeObject(store, "t")
        root = os.path.join(area, "target")
        os.makedirs(root)
        mirror = TreeMirror(root, "t")
        write(os.path.join(src, "alone"), b"a" * 20_000)
        write(os.path.join(src, "linked"), b"b" * 20_000)
        os.link(os.path.join(src, "linked"), os.path.join(src, "other-name"))
        write(os.path.join(src, "same"), b"c" * 20_000)
        check_cycle(obj, mirror)
        before = {n: os.lstat(os.path.join(mirror.path, n)).st_ino
                  for n in ("alone", "linked", "same")}
        write(os.path.join(src, "alone"), b"A" * 100, 5000)
        write(os.path.join(src, "linked"), b"B" * 100, 5000)
        os.truncate(os.path.join(src, "same"), 30_000)
        d = check_cycle(obj, mirror)
        assert {(op.op, op.path, op.ref) for op in d.ops} >= {
            ("patch", "alone", "alone"), ("patch", "linked", "linked"), ("patch", "same", "same")}
        after = {n: os.lstat(os.path.join(mirror.path, n)).st_ino
                 for n in ("alone", "linked", "same")}
        assert after["alone"] == before["alone"] and after["same"] == before["same"]
        assert after["linked"] != before["linked"]
        assert os.lstat(os.path.join(mirror.path, "other-name")).st_ino == after["linked"]
        mirror.close()
    finally:
        delete_subvolumes(area)


FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2


def _extent_step(rnd: random.Random, files: list[str]) -> None:
    """One change of a file's extents: writes (inline-sized, unaligned, large),
    preallocation inside and past the end, punched holes, truncation, growth, and
    ranges cloned from another file (reflinks keep the source's extent items)."""
    import ctypes
    import fcntl
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    path = rnd.choice(files)
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        what = rnd.randrange(6)
        at = rnd.randrange(0, size + 1) if rnd.random() < 0.7 else rnd.randrange(0, 1 << 20)
        if what == 0:
            os.pwrite(fd, some_bytes(rnd, rnd.choice([100, 3000, 4096, 70_000])), at)
        elif what == 1:
            flags = FALLOC_FL_KEEP_SIZE if rnd.random() < 0.5 else 0
            libc.fallocate(fd, flags, ctypes.c_long(at - at % 4096),
                           ctypes.c_long(rnd.choice([4096, 65536])))
        elif what == 2 and size:
            libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                           ctypes.c_long(at - at % 4096), ctypes.c_long(rnd.choice([4096, 12288])))
        elif what == 3:
            os.ftruncate(fd, rnd.randrange(0, 300_000))
        elif what == 4:
            other = rnd.choice(files)
            sfd = os.open(other, os.O_RDONLY)
            try:
                ssize = os.fstat(sfd).st_size // 4096 * 4096
                if ssize:
                    src_at = rnd.randrange(0, ssize, 4096)
                    n = min(ssize - src_at, rnd.choice([4096, 65536]))
                    arg = struct.pack("=qQQQ", sfd, src_at, n, at - at % 4096)
                    try:
                        fcntl.ioctl(fd, FICLONERANGE, arg)
                    except OSError as exc:  # same file overlapping, inline: not cloned
                        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                            raise
            finally:
                os.close(sfd)
        else:
            os.pwrite(fd, b"x" * rnd.randrange(1, 2000), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("fs", ["plain", "zstd"])
def test_extent_maps_from_items_say_what_fiemap_says(request, tmp_path, fs):
    """``btrfsioctl.extent_map`` (a file's EXTENT_DATA items, by tree search) against
    FIEMAP (``cowfs.extent_map``) of the same files of consecutive snapshots: the changed
    and unproven ranges between two versions and the data ranges are the same."""
    from cyclemirror.store import btrfsioctl, cowfs

    mount = request.getfixturevalue("btrfs_mount" if fs == "plain" else "btrfs_zstd_mount")
    area = os.path.join(mount, "x-" + tmp_path.name)
    os.makedirs(area)
    try:
        src = subvolume(area)
        rnd = random.Random(7)
        files = [os.path.join(src, f"f{i}") for i in range(8)]
        for f in files:
            write(f, some_bytes(rnd, rnd.choice([0, 500, 5000, 200_000])))
        snaps = []
        for k in range(5):
            for _ in range(30):
                _extent_step(rnd, files)
            snap = os.path.join(area, f"snap{k}")
            from cyclemirror.store.btrfsioctl import snapshot

            snapshot(src, snap, readonly=True)
            snaps.append(snap)
        compared = 0
        for old, new in zip(snaps, snaps[1:], strict=False):
            ofd, nfd = os.open(old, os.O_RDONLY), os.open(new, os.O_RDONLY)
            try:
                for f in files:
                    name = os.path.basename(f)
                    fo = os.open(os.path.join(old, name), os.O_RDONLY)
                    fn = os.open(os.path.join(new, name), os.O_RDONLY)
                    try:
                        so, sn = os.fstat(fo), os.fstat(fn)
                        io_, in_ = (btrfsioctl.extent_map(ofd, so.st_ino),
                                    btrfsioctl.extent_map(nfd, sn.st_ino))
                        fo_, fn_ = cowfs.extent_map(fo), cowfs.extent_map(fn)
                        size = sn.st_size
                        assert cowfs.compare_maps(io_, in_, size) == \
                            cowfs.compare_maps(fo_, fn_, size), (name, io_, fo_, in_, fn_)
                        assert cowfs.data_ranges(in_, size) == cowfs.data_ranges(fn_, size)
                        compared += 1
                    finally:
                        os.close(fo)
                        os.close(fn)
            finally:
                os.close(ofd)
                os.close(nfd)
        assert compared == 4 * len(files)
    finally:
        delete_subvolumes(area)


def test_work_in_threads_keeps_the_order_and_every_failure(tmp_path):
    """``treediff._in_threads`` (the compare threads): the outcomes in the
    items' order, each failure in its place, whatever the threads' count."""
    paths = []
    for i in range(23):
        p = tmp_path / f"f{i}"
        if i % 5 != 3:
            p.write_bytes(b"x" * i)
        paths.append((str(p),))
    for threads in (1, 4, 8, 40):
        out = treediff._in_threads(os.stat, paths, threads, "test")
        for i, r in enumerate(out):
            if i % 5 == 3:
                assert isinstance(r, treediff._Failed)
                assert isinstance(r.exc, FileNotFoundError)
            else:
                assert r.st_size == i
