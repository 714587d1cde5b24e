"""Tree objects on a real btrfs on a loop device: what is refused, and the snapshots.

Proves: a plain directory (even on btrfs), a file and a tree on ext4/tmpfs
are refused with the reason and what to do; a freeze is a read-only subvolume
snapshot holding every file as it was at that instant (later writes are not in
it, and it cannot be written); merges delete the snapshots up to a cycle; what
a crash leaves (a temp snapshot, a snapshot of a freeze that never committed,
merged ones) is deleted at the next open, and nothing that is not the mirror's
own; removing the object deletes every snapshot and leaves the tree.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from cyclemirror.errors import AlreadyExistsError, StoreError, UsageError
from cyclemirror.store import cowfs, tree

NODE = "0123456789abcdef"


@pytest.fixture
def btrfs_dir(btrfs_mount, tmp_path):
    d = os.path.join(btrfs_mount, "t-" + tmp_path.name)
    os.makedirs(d)
    yield d
    for e in sorted(os.listdir(d)):
        subprocess.run(["sh", "-c", f"btrfs subvolume delete {d}/{e}/snap-* {d}/{e}/.tmp-* "
                        f"{d}/{e} >/dev/null 2>&1"], check=False)
    subprocess.run(["rm", "-rf", d], check=False)


def subvolume(parent: str, name: str = "tree") -> str:
    path = os.path.join(parent, name)
    subprocess.run(["btrfs", "subvolume", "create", path], check=True, capture_output=True)
    return path


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


def test_a_plain_directory_on_btrfs_is_refused_naming_the_fix(btrfs_dir, tmp_path):
    plain = os.path.join(btrfs_dir, "plain")
    os.mkdir(plain)
    with pytest.raises(UsageError, match="not a subvolume.*btrfs subvolume create"):
        tree.add_tree(str(tmp_path / "store"), NODE, "t", plain)
    with pytest.raises(UsageError, match="not a directory"):
        write(os.path.join(btrfs_dir, "f"), b"x")
        tree.add_tree(str(tmp_path / "store"), NODE, "t", os.path.join(btrfs_dir, "f"))
    with pytest.raises(UsageError, match="absolute"):
        tree.add_tree(str(tmp_path / "store"), NODE, "t", "relative/dir")


def test_a_tree_off_btrfs_is_refused_naming_the_file_system(tmp_path):
    checked = 0
    for where in (str(tmp_path), "/dev/shm"):
        fs = cowfs.filesystem_of(where)
        if fs == "btrfs" or not os.path.isdir(where):
            continue
        d = os.path.join(where, f"tree-{os.getpid()}")
        os.makedirs(d, exist_ok=True)
        try:
            with pytest.raises(UsageError, match=f"is on {fs}.*btrfs subvolume"):
                tree.add_tree(str(tmp_path / "store"), NODE, "t", d)
        finally:
            os.rmdir(d)
        checked += 1
    if not checked:
        pytest.skip("no non-btrfs directory here to try")


def test_a_freeze_is_one_read_only_instant_of_every_file(btrfs_dir, tmp_path):
    src = subvolume(btrfs_dir)
    os.mkdir(os.path.join(src, "d"))
    write(os.path.join(src, "a"), b"one")
    write(os.path.join(src, "d", "b"), b"two")
    store = str(tmp_path / "store")
    tree.add_tree(store, NODE, "t", src)
    with pytest.raises(AlreadyExistsError):
        tree.add_tree(store, NODE, "t", src)
    obj = tree.TreeObject(store, "t")
    assert obj.freeze() == 1
    write(os.path.join(src, "a"), b"changed")
    os.unlink(os.path.join(src, "d", "b"))
    snap = obj.snapshot_path(1)
    with open(os.path.join(snap, "a"), "rb") as fh:
        assert fh.read() == b"one"
    with open(os.path.join(snap, "d", "b"), "rb") as fh:
        assert fh.read() == b"two"
    with pytest.raises(OSError):
        write(os.path.join(snap, "new"), b"x")  # read-only
    assert obj.freeze() == 2
    with open(os.path.join(obj.snapshot_path(2), "a"), "rb") as fh:
        assert fh.read() == b"changed"
    assert obj.info()["consistency"] == "tree" and obj.info()["frozen_cycle"] == 2
    obj.merge_through(1)
    assert obj.snapshot_names() == ["snap-2"]
    with pytest.raises(UsageError):
        obj.merge_through(2)  # the newest freeze stays


def test_what_a_crash_left_goes_at_open_and_nothing_else(btrfs_dir, tmp_path):
    src = subvolume(btrfs_dir)
    write(os.path.join(src, "a"), b"one")
    store = str(tmp_path / "store")
    rec = tree.add_tree(store, NODE, "t", src)
    obj = tree.TreeObject(store, "t")
    for _ in range(3):
        obj.freeze()
    obj.merge_through(1)
    snaps = rec["snapshots"]
    # A crash: a temp snapshot, one of a freeze that never committed, a merged one
    # whose delete did not happen; and someone else's directory, which must stay.
    for name in (".tmp-4", "snap-4", "snap-1"):
        subprocess.run(["btrfs", "subvolume", "snapshot", "-r", src, os.path.join(snaps, name)],
                       check=True, capture_output=True)
    os.mkdir(os.path.join(snaps, "not-ours"))
    tree.TreeObject(store, "t")
    assert sorted(os.listdir(snaps)) == ["not-ours", "snap-2", "snap-3"]
    os.rmdir(os.path.join(snaps, "not-ours"))
    tree.remove_tree(store, "t")
    assert not os.path.exists(snaps)
    assert os.listdir(src) == ["a"]  # the tree itself untouched
    assert tree.list_trees(store) == []


def test_a_damaged_record_is_named(btrfs_dir, tmp_path):
    src = subvolume(btrfs_dir)
    store = str(tmp_path / "store")
    tree.add_tree(store, NODE, "t", src)
    write(tree.record_path(store, "t"), b'{"format": 1, "name": "t"}')
    with pytest.raises(StoreError, match="record .* is damaged.*tree rm t"):
        tree.TreeObject(store, "t")


def test_tree_verbs_through_a_real_daemon(btrfs_dir, tmp_path):
    from tests.support.daemons import DaemonPool

    src = subvolume(btrfs_dir)
    write(os.path.join(src, "a"), b"one")
    plain = os.path.join(btrfs_dir, "plain")
    os.mkdir(plain)
    with DaemonPool(tmp_path) as pool:
        a = pool.start("a")
        r = a.cli("tree", "add", "t", plain, check=False)
        assert r.returncode == 2 and "btrfs subvolume create" in r.stderr, r.stderr
        out = a.cli("tree", "add", "t", src).stdout
        assert "added tree object t" in out and "consistency tree" in out
        r = a.cli("file", "add", "t", os.path.join(src, "a"), check=False)
        assert r.returncode != 0 and "tree object" in r.stderr, r.stderr
        import json

        listed = json.loads(a.cli("tree", "list", "--json").stdout)
        assert [(t["name"], t["path"], t["kind"], t["frozen_cycle"]) for t in listed] == [
            ("t", src, "tree", 0)]
        status = json.loads(a.cli("status", "--json").stdout)
        assert [t["name"] for t in status["trees"]] == ["t"]
        assert "TREE" in a.cli("status").stdout and src in a.cli("status").stdout
        r = a.cli("mirror", "start", "t", "--to", "127.0.0.1:9", "--group", "g", check=False)
        assert r.returncode == 2 and "cannot join group" in r.stderr, r.stderr
        a.cli("tree", "rm", "t")
        assert "no tree objects" in a.cli("tree", "list").stdout
    assert os.listdir(src) == ["a"]
