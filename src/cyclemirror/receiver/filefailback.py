"""Failback of a file object on the old source: its snapshot of the common cycle becomes
the new primary's mirror image.

A file object's mirror promoted on a target becomes a volume there
(``receiver.promote``), with the old source's generation ``E:k`` as its parent.
Mirrored back here (``mirror start NAME --to THIS-NODE`` there) its ``lineage``
names that parent; ``receiver.resync.prepare`` hands the open to ``prepare``
when ``NAME`` is a file object here of epoch ``E`` (demoted, or primary and not
yet told) and no such incoming mirror exists yet.  The file object still has
its reflink snapshot of cycle *k* (the base it kept for its next delta), which
is exactly the image the new primary was promoted from, so:

1. the snapshot of cycle *k* must be there, frozen at the time the lineage
   names (else ``ProtocolError``, nothing changed: remove the file object to
   take a full copy), and the sizes must agree;
2. what this node wrote after *k*: a freeze now, and the blocks that differ
   between the two snapshots (their extent maps, ``FileObject.changed_between``).
   Both sides written since *k* is split brain: refused (``SplitBrainError``)
   unless the user named this node to lose (``mirror resolve NAME
   --discard-changes-on THIS-NODE`` on the new primary), as for a volume;
3. the daemon lets go of the file object (``server.on_failback``: its outgoing
   mirrors stop and are removed);
4. the mirror image ``mirrors/<new primary>/NAME.img`` is made a reflink clone
   of the snapshot of *k* (a copy where the store is on another file system)
   and the mirror state written: applied cycle *k* of the new epoch (the commit
   point, as in ``receiver.resync``);
5. the live file is renamed aside, whole, ``PATH.kept-<k>-<unix time>`` (it holds
   whatever this node wrote after *k*; never deleted), listed in the role
   record's ``kept`` and in ``status``; the file object is removed (record and
   snapshots) with its outgoing state, and the role record says ``secondary``.

The new primary's driver was seeded with the blocks written since the promotion
(``sender.failback``), so its first cycle is a delta of exactly those.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

from cyclemirror.errors import ProtocolError, SplitBrainError
from cyclemirror.receiver import fileops
from cyclemirror.receiver.lineage import LINEAGE_KEY
from cyclemirror.receiver.state import MirrorState, VolumeSpec
from cyclemirror.receiver.treeops import _clone_or_copy
from cyclemirror.store import roles

log = logging.getLogger(__name__)


def prepare(server, open_msg: dict, msg: dict, rec: roles.RoleRecord, k: int) -> dict:
    """Turn file object ``open_msg['mirror']`` into the new primary's image of cycle ``k``
    (see the module's docstring)."""
    store = server.store
    root = os.fspath(store.path)
    name, source = open_msg["mirror"], open_msg["node_id"]
    who = open_msg["node_name"] or source
    me = server.node_name or server.node_id
    spec = open_msg["volumes"][0]
    obj = store.open_file(name)
    what = f"failback of file object {name} from {who}"
    if (spec["size"], spec["block_size"]) != (obj.size, obj.block_size):
        raise ProtocolError(f"{what}: it sends {spec['size']} bytes in blocks of "
                            f"{spec['block_size']}, the file here has {obj.size} in blocks "
                            f"of {obj.block_size}")
    kept_snap = obj.snapshot_of(k)
    if kept_snap is None or kept_snap[1] != msg["parent_freeze_time"]:
        raise ProtocolError(
            f"{what}: it branched from cycle {k} (frozen at {msg['parent_freeze_time']}) of "
            f"this file, whose snapshot is gone here (snapshots: "
            f"{', '.join(obj.snapshot_names()) or 'none'}); nothing was changed. Remove the "
            f"file object here ('cyclemirror mirror rm {name}', 'cyclemirror file rm "
            f"{name}'; the file stays) to take a full copy")
    m = obj.freeze().number  # what the live file holds now
    divergent = obj.changed_between(k, m)
    mine = divergent.count() * obj.block_size
    theirs = msg["written_blocks"] * obj.block_size
    if mine and theirs and msg["discard_on"] != server.node_id:
        loser = me if me != who else server.node_id  # two nodes of one name: by node id
        raise SplitBrainError(
            f"split brain on file object {name}: {me} (this node, the old primary) wrote "
            f"{mine} bytes after their last common cycle {msg['parent']}, and {who} (the "
            f"new primary) wrote {theirs} bytes since its promotion; nothing was changed. "
            f"Name the side whose changes lose: on {who} run 'cyclemirror mirror resolve "
            f"{name} --discard-changes-on {loser}' and resume the mirror ({me}'s file is "
            f"then kept whole beside it, at {obj.path}.kept-{k}-<time>)")
    t0 = time.monotonic()
    if server.on_failback is not None:
        server.on_failback(name)  # the daemon lets go: its outgoing mirrors stop
    ndir = os.path.join(root, "mirrors", source)
    os.makedirs(ndir, exist_ok=True)
    image = os.path.join(ndir, name + ".img")
    tmp = image + ".failback-tmp"
    sfd = os.open(kept_snap[0], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                      | os.O_CLOEXEC, 0o600)
        try:
            _clone_or_copy(sfd, dfd)  # a reflink where the store shares the file system
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    os.replace(tmp, image)
    state = MirrorState(mirror=name, group=False, source_node=source,
                        source_name=open_msg["node_name"],
                        volumes=[VolumeSpec(name, obj.size, obj.block_size)],
                        applied_cycle=k, freeze_time=msg["parent_freeze_time"],
                        extra={LINEAGE_KEY: {"epoch": msg["epoch"], "parent": msg["parent"],
                                             "since": time.time()}})
    state.save(os.path.join(ndir, name + ".state.json"))  # the commit point
    fileops.fsync_dir(ndir)
    now = time.time()
    kept = f"{obj.path}.kept-{k}-{int(now)}"
    if os.path.lexists(obj.path):
        os.rename(obj.path, kept)  # the live file, kept whole for the user
        fileops.fsync_dir(os.path.dirname(obj.path))
    rec.kept = [*rec.kept, {"path": kept, "blocks": divergent.count(), "bytes": mine,
                            "generation": roles.generation(rec.epoch, k), "time": now}
                ][-roles.MAX_KEPT:]
    store.remove_file(name)
    shutil.rmtree(os.path.join(root, "outgoing", name), ignore_errors=True)
    rec.role, rec.changed = roles.SECONDARY, time.time()
    roles.save_role(root, rec)
    log.warning("failback of file object %s from %s: its snapshot of cycle %d is now the "
                "mirror image (generation %s), no copy (%.3fs); the file as this node left it "
                "(%d bytes written after cycle %d) is kept at %s until you delete it", name,
                who, k, msg["parent"], time.monotonic() - t0, mine, k, kept)
    return {"cycle": k, "kept": kept}
