"""A kill -9 of the target while it applies a tree cycle leaves exactly one instant.

Cycle 1 of a tree on btrfs is on the target; cycle 2 changes hundreds of
files (writes, renames, deletes, new hard links and symlinks, modes,
extended attributes, default ACLs, FIFOs, device nodes). A
child process applies cycle 2 and is killed with SIGKILL: while it applies
operations in the staging copy, after it recorded the pending switch but
before the exchange, right after the exchange before the record says so,
and at random moments. After each kill, opening the mirror settles it: the
tree equals the source snapshot of cycle 1 or of cycle 2 in every path,
byte and metadata (cycle 2 exactly when the exchange had happened), its
applied cycle says which, and nothing of the staging is left.
"""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys

import pytest

from cyclemirror.receiver.treeops import TreeMirror
from cyclemirror.receiver.treeops import dir_identity as identity
from cyclemirror.store import tree
from tests.support.daemons import wait_for
from tests.support.procenv import child_env
from tests.support.trees import (
    acl_bytes,
    apply_bytes,
    assert_same_tree,
    delete_subvolumes,
    encode_cycle,
    subvolume,
    tree_image,
)

NODE = "0123456789abcdef"


@pytest.fixture(scope="module")
def history(btrfs_mount, tmp_path_factory):
    """A tree object with cycles 1 and 2 frozen, and both cycles' frames in files."""
    tmp = tmp_path_factory.mktemp("treecrash")
    area = os.path.join(btrfs_mount, "c-" + tmp.name)
    os.makedirs(area)
    src = subvolume(area)
    rnd = random.Random(11)
    for d in range(10):
        os.makedirs(os.path.join(src, f"d{d}", "sub"))
        for f in range(30):
            with open(os.path.join(src, f"d{d}", f"f{f}"), "wb") as fh:
                fh.write(rnd.randbytes(rnd.choice([100, 5000, 40_000])))
    store = str(tmp / "store")
    tree.add_tree(store, NODE, "t", src)
    obj = tree.TreeObject(store, "t")
    obj.freeze()
    for d in range(10):
        base = os.path.join(src, f"d{d}")
        for f in range(0, 30, 3):
            with open(os.path.join(base, f"f{f}"), "r+b") as fh:
                fh.seek(rnd.randrange(50))
                fh.write(rnd.randbytes(300))
        os.rename(os.path.join(base, "f1"), os.path.join(base, "sub", "moved"))
        os.unlink(os.path.join(base, "f2"))
        os.link(os.path.join(base, "f4"), os.path.join(base, "sub", "link"))
        os.symlink("../f5", os.path.join(base, "sub", "sym"))
        os.chmod(os.path.join(base, "f7"), 0o600)
        os.chmod(os.path.join(base, "sub"), 0o700)
        # attributes, ACLs, FIFOs and device nodes go through the same stage and switch
        os.setxattr(os.path.join(base, "f8"), "user.v", rnd.randbytes(rnd.randrange(300)))
        os.setxattr(os.path.join(base, "f9"), "trusted.t", b"t")
        os.setxattr(os.path.join(base, "sub"), "system.posix_acl_default",
                    acl_bytes(7, 5, 0, groups={100 + d: 5}))
        os.mkfifo(os.path.join(base, "sub", "fifo"))
        os.mknod(os.path.join(base, "dev"), stat.S_IFCHR | 0o600, os.makedev(1, 5))
    obj.freeze()
    c1, _ = encode_cycle(obj, 1)
    c2, delta = encode_cycle(obj, 2)
    assert len(delta.ops) > 100
    files = {}
    for k, data in ((1, c1), (2, c2)):
        files[k] = str(tmp / f"cycle{k}.frames")
        with open(files[k], "wb") as fh:
            fh.write(data)
    yield obj, files, area
    delete_subvolumes(area)


def fresh_target(history, label: str, where: str = "btrfs") -> str:
    """A target holding cycle 1: on btrfs (stages are subvolumes) or in the temporary
    directory (stages are copies, file by file)."""
    obj, files, area = history
    root = os.path.join(area if where == "btrfs" else str(files[1]) + ".d", f"target-{label}")
    os.makedirs(root)
    m = TreeMirror(root, "t")
    with open(files[1], "rb") as fh:
        assert apply_bytes(m, fh.read()) == 1
    m.close()
    return root


def start_child(root: str, delta: str, *failpoints: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.support.tree_apply_child", root, "t",
                             delta, *failpoints], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=child_env(), text=True)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def pending(root: str):
    try:
        with open(os.path.join(root, ".cyclemirror-tree-t", "state.json")) as fh:
            return json.load(fh).get("pending")
    except (FileNotFoundError, ValueError):
        return None


def settle_and_check(history, root: str, expect: int | None) -> int:
    obj = history[0]
    m = TreeMirror(root, "t")  # recovery runs here
    try:
        cycle = m.applied_cycle
        assert cycle in (1, 2)
        if expect is not None:
            assert cycle == expect
        assert_same_tree(obj.snapshot_path(cycle), m.path)
        assert os.listdir(m.work) == ["state.json"]
        assert m.state["pending"] is None
        return cycle
    finally:
        m.close()


def applying_ops(root: str) -> bool:
    """Whether the child is applying operations: one of the first files of the delta
    (d0's renamed file, cycle 2's ops go directory by directory) is in the stage."""
    return os.path.exists(os.path.join(root, ".cyclemirror-tree-t", "stage-2", "d0", "sub",
                                       "moved"))


def staging(root: str) -> bool:
    return os.path.exists(os.path.join(root, ".cyclemirror-tree-t", "stage-2"))


def exchanged(root: str) -> bool:
    """Whether the pending switch is recorded and ROOT/t is the stage it names."""
    p = pending(root)
    if p is None:
        return False
    fd = os.open(os.path.join(root, "t"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        return identity(fd) == p["stage_id"]
    finally:
        os.close(fd)


@pytest.mark.parametrize("point, failpoint, reached, expect", [
    ("mid-ops", "receiver.tree_op=0.05", applying_ops, 1),
    ("before-exchange", "receiver.tree_switch=60", lambda r: pending(r) is not None, 1),
    ("after-exchange", "receiver.tree_switched=60", exchanged, 2),
])
@pytest.mark.parametrize("where", ["btrfs", "tmp"])
def test_a_kill_at_each_step_leaves_one_instant(history, point, failpoint, reached, expect,
                                                where):
    root = fresh_target(history, point, where)
    proc = start_child(root, history[1][2], failpoint)
    try:
        wait_for(lambda: reached(root) or proc.poll() is not None, 120, f"the apply {point}",
                 interval=0.01)
        assert proc.poll() is None, proc.communicate()
    finally:
        kill(proc)
    settle_and_check(history, root, expect)
    # and the next apply of cycle 2 (if it is still due) completes
    m = TreeMirror(root, "t")
    if m.applied_cycle == 1:
        with open(history[1][2], "rb") as fh:
            assert apply_bytes(m, fh.read()) == 2
    m.close()
    settle_and_check(history, root, 2)


def wait_progress(proc: subprocess.Popen, root: str, polls: int) -> None:
    """Return after ``polls`` looks at the child's work directory that found it writing
    files of cycle 2 (a random point of the apply), or when the child has finished."""
    seen = 0

    def progressed() -> bool:
        nonlocal seen
        if proc.poll() is not None:
            return True
        seen += staging(root)
        return seen >= polls
    wait_for(progressed, 120, "the apply to progress", interval=0.001)


def test_kills_at_random_moments_leave_one_instant(history):
    rnd = random.Random(3)
    seen = set()
    for trial in range(6):
        root = fresh_target(history, f"random-{trial}")
        proc = start_child(root, history[1][2], "receiver.tree_op=0.002")
        try:
            wait_progress(proc, root, rnd.randrange(0, 400))
        finally:
            kill(proc)
        seen.add(settle_and_check(history, root, None))
        image = tree_image(os.path.join(root, "t"))
        assert image["entries"]  # a tree is there, whichever instant
    assert seen, seen
