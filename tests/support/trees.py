"""Helpers for the tree-object tests: btrfs subvolumes, shipping a cycle, comparing trees.

``ship(obj, k, mirror)`` is one cycle without a daemon: the delta between the
snapshots of freeze k-1 and k (``store.treediff``), encoded to frames
(``wire.treeframes``), decoded again from the bytes and applied by the target
(``receiver.treeops``); ``ship_through_socket`` the same through a socketpair
(a sender thread encoding, the target decoding as it applies), and
``library_cycle`` a whole cycle that way (freeze, ship, merge), what the
PostgreSQL test and benchmark run every second.  ``tree_image`` is
everything the tests compare of a tree: per path its kind, mode, owner,
mtime, size, bytes or symlink target, and which paths are hard links of one
another.
"""

from __future__ import annotations

import hashlib
import io
import os
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
            else:
                body, kind = "", "other"
            mode = None if kind == "symlink" else stat.S_IMODE(m)
            out[rel] = (kind, mode, st.st_uid, st.st_gid, st.st_mtime_ns,
                        st.st_size if kind == "file" else 0, body)
    links = sorted(tuple(sorted(v)) for v in inodes.values() if len(v) > 1)
    return {"entries": out, "links": links}


def assert_same_tree(source: str, target: str) -> None:
    a, b = tree_image(source), tree_image(target)
    if a == b:
        return
    ea, eb = a["entries"], b["entries"]
    diffs = [f"only in source: {sorted(set(ea) - set(eb))[:10]}",
             f"only in target: {sorted(set(eb) - set(ea))[:10]}"]
    diffs += [f"{p}: source {ea[p]} target {eb[p]}" for p in sorted(set(ea) & set(eb))
              if ea[p] != eb[p]][:10]
    if a["links"] != b["links"]:
        diffs.append(f"hard links: source {a['links']} target {b['links']}")
    raise AssertionError("trees differ:\n" + "\n".join(diffs))


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
           "gid": 0, "mtime_ns": 0, "size": 0}
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
