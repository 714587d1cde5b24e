"""Helpers for the tree-object tests: btrfs subvolumes, shipping a cycle, comparing trees.

``ship(obj, k, mirror)`` is one cycle without a daemon: the delta between the
snapshots of freeze k-1 and k (``store.treediff``), encoded to frames
(``wire.treeframes``), decoded again from the bytes and applied by the target
(``receiver.treeops``); ``ship_through_socket`` the same through a socketpair
(a sender thread encoding, the target decoding as it applies), and
``library_cycle`` a whole cycle that way (freeze, ship, merge), what the
PostgreSQL test and benchmark run every second.  ``tree_image`` is
everything the tests compare of a tree: per path its kind, mode, owner,
mtime, size, bytes or symlink target, device number, extended attributes of
the mirrored namespaces (user, trusted, security, POSIX ACLs: read here with
plain ``os.listxattr``, not the code under test), and which paths are hard
links of one another; ``assert_same_tree`` also compares what ``getfacl``
prints of both trees where it is installed.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass

from cyclemirror.receiver.treeops import TreeMirror
from cyclemirror.store import treediff  # noqa: F401 (TreeDelta in annotations)
from cyclemirror.store.tree import TreeObject
from cyclemirror.wire import treeframes


def subvolume(parent: str, name: str = "tree") -> str:
    path = os.path.join(parent, name)
    subprocess.run(["btrfs", "subvolume", "create", path], check=True, capture_output=True)
    return path


def delete_subvolumes(d: str) -> None:
    """Delete every subvolume under ``d`` (snapshots first), then ``d``."""
    if not os.path.isdir(d):
        return
    subs = []
    for root, dirs, _ in os.walk(d):
        for x in dirs:
            p = os.path.join(root, x)
            if os.lstat(p).st_ino == 256:
                subs.append(p)
    for p in sorted(subs, key=len, reverse=True):
        subprocess.run(["btrfs", "subvolume", "delete", p], capture_output=True, check=False)
    subprocess.run(["rm", "-rf", d], check=False)


def encode_cycle(obj: TreeObject, k: int) -> tuple[bytes, treediff.TreeDelta]:
    new = obj.snapshot_path(k)
    delta = obj.delta(k)

    def open_new(rel: str) -> int:
        return os.open(os.path.join(new, rel), os.O_RDONLY | os.O_NOFOLLOW)

    data = b"".join(treeframes.encode_tree_delta(delta.ops, open_new, k, obj.freeze_time(k),
                                                 k == 1))
    return data, delta


def apply_bytes(mirror: TreeMirror, data: bytes) -> int:
    reader = treeframes.TreeFrameReader(treeframes.read_exact_from(io.BytesIO(data)))
    return mirror.apply(reader.events())


def ship(obj: TreeObject, k: int, mirror: TreeMirror) -> treediff.TreeDelta:
    data, delta = encode_cycle(obj, k)
    assert apply_bytes(mirror, data) == k
    return delta


def xattrs_of(path: str) -> tuple:
    """The extended attributes a tree mirror carries, (name, value) sorted."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    keep = [n for n in names if n.startswith(("user.", "trusted.", "security."))
            or n in ("system.posix_acl_access", "system.posix_acl_default")]
    return tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False)) for n in keep))


def getfacl(root: str) -> str:
    """``getfacl -R`` of the tree (physical walk, numeric ids, only entries with ACLs
    beyond their mode), one block per path sorted by path (it prints in directory
    order, which two file systems need not share)."""
    out = subprocess.run(["getfacl", "-R", "-P", "-n", "-s", "."], cwd=root, check=True,
                         capture_output=True, text=True).stdout
    return "\n\n".join(sorted(b.strip() for b in out.split("\n\n") if b.strip()))


def tree_image(root: str) -> dict:
    out = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in [".", *dirs, *files] if dirpath == root else [*dirs, *files]:
            p = os.path.join(dirpath, name) if name != "." else root
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            m = st.st_mode
            if stat.S_ISREG(m):
                with open(p, "rb") as fh:
                    body = hashlib.sha256(fh.read()).hexdigest()
                inodes.setdefault(st.st_ino, []).append(rel)
                kind = "file"
            elif stat.S_ISLNK(m):
                body, kind = os.readlink(p), "symlink"
            elif stat.S_ISDIR(m):
                body, kind = "", "dir"
            elif stat.S_ISFIFO(m):
                body, kind = "", "fifo"
            elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
                body = (os.major(st.st_rdev), os.minor(st.st_rdev))
                kind = "chr" if stat.S_ISCHR(m) else "blk"
            else:
                body, kind = "", "socket"
            mode = None if kind == "symlink" else stat.S_IMODE(m)
            out[rel] = (kind, mode, st.st_uid, st.st_gid, st.st_mtime_ns,
                        st.st_size if kind == "file" else 0, body, xattrs_of(p))
    links = sorted(tuple(sorted(v)) for v in inodes.values() if len(v) > 1)
    return {"entries": out, "links": links}


def assert_same_tree(source: str, target: str) -> None:
    a, b = tree_image(source), tree_image(target)
    if a == b:
        assert_same_acls(source, target)
        return
    ea, eb = a["entries"], b["entries"]
    diffs = [f"only in source: {sorted(set(ea) - set(eb))[:10]}",
             f"only in target: {sorted(set(eb) - set(ea))[:10]}"]
    diffs += [f"{p}: source {ea[p]} target {eb[p]}" for p in sorted(set(ea) & set(eb))
              if ea[p] != eb[p]][:10]
    if a["links"] != b["links"]:
        diffs.append(f"hard links: source {a['links']} target {b['links']}")
    raise AssertionError("trees differ:\n" + "\n".join(diffs))


def assert_same_acls(source: str, target: str) -> None:
    """What ``getfacl -R`` prints of both trees is the same (where it is installed)."""
    if shutil.which("getfacl"):
        assert getfacl(source) == getfacl(target)


# -- hand-made frames, for what a hostile or broken peer could send -------------------------

def control(cycle: int, msg: dict) -> bytes:
    """A CONTROL frame of any JSON (not checked against the schemas: a peer's)."""
    import json

    from cyclemirror._cext import frames

    return frames.encode_control(cycle, json.dumps(msg).encode())


def begin(cycle: int = 2, full: bool = False) -> bytes:
    return control(cycle, {"type": "begin", "cycle": cycle, "freeze_time": 1.0, "full": full,
                           "resume_from": 0})


def tree_op(cycle: int = 2, **kw) -> bytes:
    msg = {"type": "tree_op", "op": "file", "path": "a", "ref": "", "mode": 0o644, "uid": 0,
           "gid": 0, "mtime_ns": 0, "size": 0, "rdev": 0, "xattrs": []}
    msg.update(kw)
    return control(cycle, msg)


def end(cycle: int = 2, chunks: int = 1) -> bytes:
    return control(cycle, {"type": "end", "cycle": cycle, "chunks": chunks})


def ship_through_socket(obj: TreeObject, k: int, mirror: TreeMirror) -> int:
    """Cycle ``k`` of ``obj`` through a socket: a thread encodes its frames into one end of
    a socketpair while the target's ``apply`` decodes them from the other, as a daemon pair
    would.  Returns the number of bytes that crossed."""
    import socket
    import threading

    new = obj.snapshot_path(k)
    delta = obj.delta(k)
    here, there = socket.socketpair()
    sent = [0]
    failure: list[BaseException] = []

    def open_new(rel: str) -> int:
        return os.open(os.path.join(new, rel), os.O_RDONLY | os.O_NOFOLLOW)

    def send() -> None:
        try:
            for frame in treeframes.encode_tree_delta(delta.ops, open_new, k,
                                                      obj.freeze_time(k), k == 1):
                here.sendall(frame)
                sent[0] += len(frame)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            failure.append(exc)
        finally:
            here.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send, name=f"tree-sender-{k}", daemon=True)
    sender.start()
    try:
        with there.makefile("rb") as stream:
            reader = treeframes.TreeFrameReader(treeframes.read_exact_from(stream),
                                                f"tree {obj.name!r} cycle {k}")
            applied = mirror.apply(reader.events())
    finally:
        there.close()  # a sender still writing gets an error, not a hang
        sender.join(timeout=60)
        here.close()
    if failure:
        raise failure[0]
    if applied != k:
        raise AssertionError(f"the target applied cycle {applied}, cycle {k} was sent")
    return sent[0]


@dataclass(frozen=True)
class Freeze:
    cycle: int
    before: float   # time.time() just before the freeze call
    after: float    # just after it returned
    wire_bytes: int


def library_cycle(obj: TreeObject, target_root: str, name: str) -> Freeze:
    """One cycle of a tree mirror without daemons: freeze, the delta, its frames through a
    socket into ``TreeMirror(target_root, name).apply``, then the merge of the older
    snapshot.  Cycles frozen but never applied (a source that died mid-cycle) are shipped
    first, as a restarted source would."""
    import time

    mirror = TreeMirror(target_root, name)
    try:
        for j in range(mirror.applied_cycle + 1, obj.frozen_cycle + 1):
            ship_through_socket(obj, j, mirror)
        before = time.time()
        k = obj.freeze()
        after = time.time()
        sent = ship_through_socket(obj, k, mirror)
    finally:
        mirror.close()
    if k > 1:
        obj.merge_through(k - 1)
    return Freeze(k, before, after, sent)


# -- POSIX ACLs as the kernel keeps them, for tests where setfacl may be missing ----------

ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 1, 2, 4, 8, 0x10, 0x20
ACL_UNDEFINED_ID = 0xFFFFFFFF


def acl_bytes(owner: int, group: int, other: int, users: dict | None = None,
              groups: dict | None = None) -> bytes:
    """A ``system.posix_acl_access`` / ``_default`` value (version 2): owner, group and
    other permissions (0..7), named users and groups {id: perm}; a mask (the union of
    the group-class entries) when there are named ones."""
    users, groups = users or {}, groups or {}
    ents = [(ACL_USER_OBJ, owner, ACL_UNDEFINED_ID)]
    ents += [(ACL_USER, p, u) for u, p in sorted(users.items())]
    ents.append((ACL_GROUP_OBJ, group, ACL_UNDEFINED_ID))
    ents += [(ACL_GROUP, p, g) for g, p in sorted(groups.items())]
    if users or groups:
        mask = group
        for p in [*users.values(), *groups.values()]:
            mask |= p
        ents.append((ACL_MASK, mask, ACL_UNDEFINED_ID))
    ents.append((ACL_OTHER, other, ACL_UNDEFINED_ID))
    return (2).to_bytes(4, "little") + b"".join(
        t.to_bytes(2, "little") + p.to_bytes(2, "little") + i.to_bytes(4, "little")
        for t, p, i in ents)
