"""Extended attributes, POSIX ACLs, FIFOs and device nodes of a tree arrive exactly.

A scripted history on a real btrfs (the source a subvolume, run as root):
user, trusted and security attributes (a file capability set by ``setcap``
where it is installed), access and default ACLs (inherited by a file made
under the default one), FIFOs, character and block devices, a socket (not
mirrored: listed in ``skipped``), then changes to each: a value changed,
one removed, an ACL shrunk and a default ACL dropped, a device's number
changed, a FIFO replaced by a device, a chown that clears a capability.  Each
cycle is shipped through the wire form and applied; the target must equal
the source snapshot (``tree_image``: kinds, device numbers, attributes of the
mirrored namespaces; and ``getfacl -R`` of both, where installed), and the
delta made from btrfs's search must equal the full walk's.  The target is on
btrfs (a snapshot per stage) and on the temporary directory's file system
(each stage copied file by file, attributes and nodes with it).

A target that does not run as root refuses a device node, and a trusted
attribute, with an error saying to run it as root, and keeps its cycle.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile

import pytest

from cyclemirror.receiver.treeops import TreeMirror
from cyclemirror.store import cowfs, tree, treediff
from tests.support.trees import (
    acl_bytes,
    assert_same_acls,
    begin,
    control,
    delete_subvolumes,
    end,
    ship,
    subvolume,
    tree_image,
    tree_op,
)

NODE = "0123456789abcdef"
ACCESS, DEFAULT = "system.posix_acl_access", "system.posix_acl_default"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: device nodes, "
                                "trusted.* attributes and btrfs snapshots")


@pytest.fixture
def area(btrfs_mount, tmp_path):
    d = os.path.join(btrfs_mount, "x-" + tmp_path.name)
    os.makedirs(d)
    yield d
    delete_subvolumes(d)


def assert_mirrored(source: str, target: str) -> None:
    """The target equals the source snapshot but for sockets, which are not mirrored."""
    a, b = tree_image(source), tree_image(target)
    a["entries"] = {p: e for p, e in a["entries"].items() if e[0] != "socket"}
    assert a["links"] == b["links"]
    ea, eb = a["entries"], b["entries"]
    assert sorted(ea) == sorted(eb)
    for p in ea:
        assert ea[p] == eb[p], p
    assert_same_acls(source, target)


def cycle(obj, mirror) -> treediff.TreeDelta:
    k = obj.freeze()
    walked = None
    if k > 1:
        walked = treediff.tree_delta(obj.snapshot_path(k - 1), obj.snapshot_path(k),
                                     search=False)
    delta = ship(obj, k, mirror)
    assert_mirrored(obj.snapshot_path(k), mirror.path)
    if walked is not None:
        assert delta.new_walk.how == "search", delta.new_walk.how
        assert delta.ops == walked.ops and delta.skipped == walked.skipped
        assert dict(delta.new_walk) == dict(walked.new_walk)
        obj.merge_through(k - 1)
    return delta


def make_socket(path: str) -> None:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(path)
    finally:
        s.close()


def set_capability(path: str) -> None:
    """cap_net_raw+ep: with ``setcap`` where installed, else the raw v2 attribute."""
    if shutil.which("setcap"):
        subprocess.run(["setcap", "cap_net_raw+ep", path], check=True, capture_output=True)
    else:
        os.setxattr(path, "security.capability", (0x02000001).to_bytes(4, "little")
                    + (1 << 13).to_bytes(4, "little") + bytes(12))


@pytest.mark.parametrize("target_on_btrfs", [True, False], ids=["btrfs-target", "tmp-target"])
def test_attributes_acls_and_nodes_arrive_exactly(area, tmp_path, target_on_btrfs):
    src = subvolume(area)
    store = str(tmp_path / "store")
    tree.add_tree(store, NODE, "t", src)
    obj = tree.TreeObject(store, "t")
    root = os.path.join(area, "target") if target_on_btrfs else str(tmp_path / "target")
    os.makedirs(root)
    if not target_on_btrfs and cowfs.filesystem_of(root) == "btrfs":
        pytest.skip("the temporary directory is on btrfs too")
    j = lambda *p: os.path.join(src, *p)  # noqa: E731
    with open(j("f"), "wb") as fh:
        fh.write(b"f" * 10_000)
    os.setxattr(j("f"), "user.a", b"one")
    os.setxattr(j("f"), "user.big", os.urandom(4000))
    os.setxattr(j("f"), "trusted.t", b"")
    os.mkdir(j("d"))
    os.setxattr(j("d"), ACCESS, acl_bytes(7, 5, 0, users={1000: 7}))
    os.setxattr(j("d"), DEFAULT, acl_bytes(6, 4, 0, groups={2000: 5}))
    with open(j("d", "inherit"), "wb") as fh:  # takes the default ACL as its access ACL
        fh.write(b"inherited")
    assert ACCESS in os.listxattr(j("d", "inherit"))
    with open(j("cap"), "wb") as fh:
        fh.write(b"#!/bin/true\n" * 400)
    set_capability(j("cap"))
    os.mkfifo(j("p"), 0o640)
    os.setxattr(j("p"), "trusted.on-fifo", b"x")
    os.mknod(j("null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(j("loopdev"), stat.S_IFBLK | 0o600, os.makedev(7, 200))
    os.symlink("f", j("s"))
    os.setxattr(j("s"), "trusted.on-link", b"l", follow_symlinks=False)
    os.setxattr(src, "user.root", b"r")
    make_socket(j("sock"))
    mirror = TreeMirror(root, "t")
    d1 = cycle(obj, mirror)
    assert d1.skipped == ["sock"]
    kinds = {op.path: (op.op, op.ref, op.rdev) for op in d1.ops}
    assert kinds["null"] == ("node", "chr", os.makedev(1, 3))
    assert kinds["loopdev"] == ("node", "blk", os.makedev(7, 200))
    assert kinds["p"] == ("node", "fifo", 0)
    got = os.getxattr(os.path.join(mirror.path, "cap"), "security.capability")
    assert got == os.getxattr(j("cap"), "security.capability")

    # cycle 2: a value changed and one removed (a metadata-only op, no data), an ACL
    # shrunk and a default ACL dropped, a device renumbered, a FIFO become a device...
    os.setxattr(j("f"), "user.a", b"two")
    os.removexattr(j("f"), "user.big")
    os.setxattr(j("f"), "security.cyclemirror-test", b"label")
    os.setxattr(j("d"), ACCESS, acl_bytes(7, 5, 0))
    os.removexattr(j("d"), DEFAULT)
    os.removexattr(j("d", "inherit"), ACCESS)
    os.unlink(j("null"))
    os.mknod(j("null"), stat.S_IFCHR | 0o666, os.makedev(1, 5))
    os.unlink(j("p"))
    os.mknod(j("p"), stat.S_IFCHR | 0o600, os.makedev(1, 7))
    os.chmod(j("loopdev"), 0o660)
    os.setxattr(j("loopdev"), "trusted.new", b"n")
    os.chown(j("cap"), 1, 1)  # clears the capability, on the source as anywhere
    os.mkfifo(j("d", "fifo2"))
    os.unlink(j("sock"))
    d2 = cycle(obj, mirror)
    assert d2.skipped == []
    ops = {op.path: op for op in d2.ops}
    assert ops["f"].op == "meta" and not ops["f"].data
    assert dict(ops["f"].xattrs) == {"user.a": b"two", "trusted.t": b"",
                                     "security.cyclemirror-test": b"label"}
    assert ops["null"].op == "node" and ops["null"].rdev == os.makedev(1, 5)
    assert [(op.op, op.path) for op in d2.ops if op.path == "p"] == [("rm", "p"), ("node", "p")]
    assert ops["loopdev"].op == "meta"
    assert ops["d"].op == "dir" and DEFAULT not in dict(ops["d"].xattrs)
    assert "security.capability" not in os.listxattr(os.path.join(mirror.path, "cap"))

    # cycle 3: nothing changed: an empty delta
    assert cycle(obj, mirror).ops == []
    mirror.close()


def _as_nobody(root: str) -> dict:
    """Apply hand-made full cycles to a mirror in ``root`` in a forked child that has
    dropped to uid/gid 65534 (a real process without privileges); what each gave."""
    import io
    import traceback

    from cyclemirror.wire import treeframes

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            m = TreeMirror(root, "t")
            out = {}

            def apply(*frames):
                reader = treeframes.TreeFrameReader(
                    treeframes.read_exact_from(io.BytesIO(b"".join(frames))))
                try:
                    return {"cycle": m.apply(reader.events())}
                except Exception as exc:  # noqa: BLE001 - reported to the parent
                    return {"error": f"{type(exc).__name__}: {exc}"}

            def top(k):
                return tree_op(k, op="dir", path=".", mode=0o755, uid=65534, gid=65534)

            out["fifo"] = apply(begin(1, True), top(1), tree_op(
                1, op="node", path="p", ref="fifo", mode=0o600, uid=65534, gid=65534),
                end(1, 2))
            out["device"] = apply(begin(2, True), top(2), tree_op(
                2, op="node", path="null", ref="chr", rdev=os.makedev(1, 3), mode=0o666,
                uid=65534, gid=65534), end(2, 2))
            out["trusted"] = apply(begin(3, True), top(3), tree_op(
                3, path="f", uid=65534, gid=65534, xattrs=[["trusted.x", "eA=="]]),
                end(3, 2))
            out["applied"] = m.applied_cycle
            m.close()
            os.write(wfd, json.dumps(out).encode())
            code = 0
        except BaseException:  # noqa: BLE001
            os.write(wfd, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as fh:
        got = fh.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, got
    return json.loads(got)


def test_a_target_not_running_as_root_refuses_devices_and_trusted_attributes():
    """Device nodes are made only when the target runs as root (mknod needs CAP_MKNOD):
    otherwise the cycle is refused with an error saying so, and nothing of it stays; a
    FIFO needs no privilege and arrives.  A trusted attribute: the same."""
    root = tempfile.mkdtemp(prefix="cm-nobody-")
    try:
        os.chmod(root, 0o755)
        os.chown(root, 65534, 65534)
        out = _as_nobody(root)
        assert out["fifo"] == {"cycle": 1}
        assert "StoreError" in out["device"]["error"]
        assert "only when the target daemon runs as root" in out["device"]["error"]
        assert "'null'" in out["device"]["error"]
        assert "trusted.x" in out["trusted"]["error"]
        assert "run as root" in out["trusted"]["error"]
        assert out["applied"] == 1
        assert stat.S_ISFIFO(os.lstat(os.path.join(root, "t", "p")).st_mode)
        assert os.listdir(os.path.join(root, "t")) == ["p"]
        assert os.listdir(os.path.join(root, ".cyclemirror-tree-t")) == ["state.json"]
    finally:
        shutil.rmtree(root)


def test_attributes_through_a_symlink_land_on_the_link_never_its_target(area, tmp_path):
    """A 'meta' op naming a symlink sets attributes on the link itself: the file outside
    the tree it points at is untouched.  An op whose path runs through a symlink is
    refused (nothing of the cycle stays)."""
    from cyclemirror.errors import ProtocolError
    from tests.support.trees import apply_bytes

    outside = os.path.join(area, "outside")
    with open(outside, "wb") as fh:
        fh.write(b"secret")
    os.mkdir(os.path.join(area, "outdir"))
    src = subvolume(area)
    os.symlink(outside, os.path.join(src, "abs"))
    os.symlink(os.path.join(area, "outdir"), os.path.join(src, "dirlink"))
    store = str(tmp_path / "store")
    tree.add_tree(store, NODE, "t", src)
    obj = tree.TreeObject(store, "t")
    root = os.path.join(area, "target")
    os.mkdir(root)
    mirror = TreeMirror(root, "t")
    ship(obj, obj.freeze(), mirror)
    before = tree_image(mirror.path)
    k = 2
    apply_bytes(mirror, begin(k) + tree_op(k, op="meta", path="abs", mode=0,
                                           xattrs=[["trusted.evil", "eA=="]]) + end(k, 1))
    assert "trusted.evil" not in os.listxattr(outside)
    assert os.getxattr(os.path.join(mirror.path, "abs"), "trusted.evil",
                       follow_symlinks=False) == b"x"
    before = tree_image(mirror.path)
    for bad in (tree_op(3, op="node", path="dirlink/dev", ref="blk", rdev=os.makedev(8, 0)),
                tree_op(3, op="node", path="dirlink/fifo", ref="fifo"),
                tree_op(3, op="dir", path="dirlink/d", xattrs=[["user.x", ""]])):
        with pytest.raises(ProtocolError, match="symlink is never followed"):
            apply_bytes(mirror, begin(3) + bad + end(3, 1))
        assert os.listdir(os.path.join(area, "outdir")) == []
        assert tree_image(mirror.path) == before
        assert mirror.applied_cycle == 2
    mirror.close()


def test_a_hostile_device_number_or_node_kind_is_refused_before_anything_is_made(area,
                                                                                  tmp_path):
    """The decoder refuses a node of an unknown kind, a FIFO with a device number and a
    device number Linux cannot hold; the target then holds its cycle, unchanged."""
    from cyclemirror.errors import ProtocolError
    from tests.support.trees import apply_bytes

    src = subvolume(area)
    store = str(tmp_path / "store")
    tree.add_tree(store, NODE, "t", src)
    obj = tree.TreeObject(store, "t")
    root = os.path.join(area, "target")
    os.mkdir(root)
    mirror = TreeMirror(root, "t")
    ship(obj, obj.freeze(), mirror)
    before = tree_image(mirror.path)
    for fields, why in [({"ref": "socket"}, "a node is one of"),
                        ({"ref": "fifo", "rdev": 1}, "no device number"),
                        ({"ref": "chr", "rdev": 1 << 33}, "not a Linux one"),
                        ({"ref": "chr", "mode": 0o20666}, "permission bits")]:
        with pytest.raises(ProtocolError, match=why):
            apply_bytes(mirror, begin(2) + tree_op(2, op="node", path="n", **fields)
                        + end(2, 1))
        assert tree_image(mirror.path) == before and mirror.applied_cycle == 1
    # a raw message with a value that is not base64 at all
    bad = control(2, {"type": "tree_op", "op": "dir", "path": ".", "ref": "", "mode": 0o755,
                      "uid": 0, "gid": 0, "mtime_ns": 0, "size": 0, "rdev": 0,
                      "xattrs": [["user.x", "%%%"]]})
    with pytest.raises(ProtocolError, match="not base64"):
        apply_bytes(mirror, begin(2) + bad + end(2, 1))
    assert tree_image(mirror.path) == before
    mirror.close()
