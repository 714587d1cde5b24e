"""A tree mirror never follows a symlink, whatever the delta names.

The tree holds symlinks that point out of it (to a directory and a file
outside, to '../..', to /etc), legitimately mirrored by cycle 1.  Then hand-
made cycle-2 deltas try to reach through them: write a file under a
symlinked directory, patch from a file behind one, hard-link to a symlink,
remove something behind one, make a symlink a directory.  Each is refused
with a ProtocolError; afterwards the target still holds exactly cycle 1,
nothing of ours is left in the work directory, and the files outside are
untouched.  Metadata ops on a symlink change the link, never its target.
"""

from __future__ import annotations

import os
import stat

import pytest

from cyclemirror.errors import ProtocolError
from cyclemirror.receiver.treeops import TreeMirror
from cyclemirror.store import tree
from tests.support.trees import (
    apply_bytes,
    assert_same_tree,
    begin,
    delete_subvolumes,
    end,
    ship,
    subvolume,
    tree_op,
)

NODE = "0123456789abcdef"


@pytest.fixture
def setup(btrfs_mount, tmp_path):
    area = os.path.join(btrfs_mount, "h-" + tmp_path.name)
    os.makedirs(area)
    outside = os.path.join(area, "outside")
    os.mkdir(outside)
    with open(os.path.join(outside, "secret"), "wb") as fh:
        fh.write(b"secret" * 1000)
    os.chmod(os.path.join(outside, "secret"), 0o600)
    src = subvolume(area)
    os.symlink(outside, os.path.join(src, "evil"))
    os.symlink(os.path.join(outside, "secret"), os.path.join(src, "abs"))
    os.symlink("../..", os.path.join(src, "up"))
    os.mkdir(os.path.join(src, "d"))
    with open(os.path.join(src, "d", "f"), "wb") as fh:
        fh.write(b"f" * 5000)
    store = str(tmp_path / "store")
    tree.add_tree(store, NODE, "t", src)
    obj = tree.TreeObject(store, "t")
    root = os.path.join(area, "target")
    os.mkdir(root)
    mirror = TreeMirror(root, "t")
    obj.freeze()
    ship(obj, 1, mirror)
    yield obj, mirror, outside
    mirror.close()
    delete_subvolumes(area)


def outside_state(outside: str) -> list:
    out = []
    for name in sorted(os.listdir(outside)):
        st = os.lstat(os.path.join(outside, name))
        with open(os.path.join(outside, name), "rb") as fh:
            out.append((name, stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns, fh.read()))
    return out


@pytest.mark.parametrize("ops", [
    [dict(op="file", path="evil/planted", size=3)],
    [dict(op="file", path="up/planted", size=3)],
    [dict(op="dir", path="evil/newdir")],
    [dict(op="rm", path="evil/secret")],
    [dict(op="patch", path="d/copy", ref="evil/secret", size=10)],
    [dict(op="patch", path="d/copy", ref="abs", size=10)],
    [dict(op="link", path="d/l", ref="abs")],
    [dict(op="link", path="d/l", ref="evil/secret")],
    [dict(op="dir", path="evil")],
    [dict(op="meta", path="evil/secret", mode=0o777)],
    [dict(op="file", path="d/ok", size=0), dict(op="rm", path="up/x")],
], ids=lambda ops: ",".join(f"{o['op']}:{o['path']}" for o in ops))
def test_a_delta_reaching_through_a_symlink_is_refused_and_nothing_changes(setup, ops):
    obj, mirror, outside = setup
    before = outside_state(outside)
    stream = begin() + b"".join(tree_op(**o) for o in ops) + end(chunks=len(ops))
    with pytest.raises(ProtocolError):
        apply_bytes(mirror, stream)
    assert mirror.applied_cycle == 1
    assert_same_tree(obj.snapshot_path(1), mirror.path)
    assert os.listdir(mirror.work) == ["state.json"]
    assert outside_state(outside) == before


def test_metadata_of_a_symlink_changes_the_link_not_its_target(setup):
    obj, mirror, outside = setup
    before = outside_state(outside)
    stream = begin() + tree_op(op="meta", path="abs", mode=0o777, uid=7, gid=8,
                               mtime_ns=123) + tree_op(op="meta", path="evil", uid=9, gid=9,
                                                       mtime_ns=5) + end(chunks=2)
    assert apply_bytes(mirror, stream) == 2
    st = os.lstat(os.path.join(mirror.path, "abs"))
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (7, 8, 123)
    assert outside_state(outside) == before


def test_a_delta_for_the_wrong_cycle_is_refused(setup):
    obj, mirror, outside = setup
    with pytest.raises(ProtocolError, match="needs cycle 2 applied"):
        apply_bytes(mirror, begin(3) + end(3, 0))
    with pytest.raises(ProtocolError, match="not newer"):
        apply_bytes(mirror, begin(1, full=True) + end(1, 0))
    assert mirror.applied_cycle == 1
