"""Failback of a tree on the old source: its tree object becomes the new primary's mirror.

A tree promoted on another node (``receiver.treepromote``) is mirrored back
here with ``mirror start NAME --to THIS-NODE`` there.  Its driver sends
``tree_branch`` before ``tree_open``: "I was promoted from your mirror
``MIRROR``, cycle *k* frozen at *F*; I changed ``written_ops`` paths since;
the user named ``discard_on`` to lose a split brain".  This node still has
the snapshot of cycle *k* (the base its own mirror kept for the next delta)
and the promoted tree was made from exactly that cycle, so no full copy is
needed.  ``prepare(server, open_msg, branch)`` (in the session, before the
mirror opens):

1. Only for a branch of *this* node, when no such incoming tree mirror holds a
   cycle yet and the tree object ``MIRROR`` is here (else None: the usual
   open, a full cycle into a mirror of its own, this node's tree untouched).
   Its snapshot of cycle *k* must be there, frozen at *F*: refused otherwise
   (``RoleError``, permanent, nothing changed), saying how to take a full copy.
2. What this node changed after cycle *k*: a freeze of the live tree now, and
   the ops of the delta from ``snap-k`` to it.  If both sides changed the tree
   since *k* it is split brain: refused (``SplitBrainError``, naming both sides
   and their changes) unless the user named this node to lose (``mirror
   resolve TREE --discard-changes-on THIS-NODE`` on the new primary).
3. The daemon lets go of the tree (``server.on_failback``: its outgoing
   mirrors stop and are removed).
4. The record ``failback.json`` in the mirror's directory is written: the
   commit point.  From it on, ``finish`` does the rest, and runs again at the
   next connect when a crash cut it:
   a. the mirror ``mirrors/<new primary>/trees/NAME`` becomes a writable
      snapshot of ``snap-k`` (a copy where a snapshot cannot be made), switched
      in with the mirror's own pending record and ``RENAME_NOREPLACE``
      (``TreeMirror._switch``), recorded as applied cycle *k* at *F*;
   b. the live tree (a subvolume) is renamed aside, never deleted:
      ``PATH.kept-<k>-<unix time>``, with what it changed after *k* readable
      there (listed in the record, ``status`` and the log) until the user
      deletes it (``btrfs subvolume delete``);
   c. the tree object is removed (its record and snapshots), and with it the
      outgoing mirror's state;
   d. the record says ``done``.

The session then opens the mirror, which says it holds cycle *k* at *F*; the
new primary's snapshot of that cycle is the same instant, so its first cycle
is a delta from it: only what it changed since the promotion crosses the wire.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

from cyclemirror import failpoints
from cyclemirror.errors import RoleError, SplitBrainError, StoreError
from cyclemirror.receiver import treeops
from cyclemirror.store import btrfsioctl, treediff
from cyclemirror.store.fileops import atomic_write_json, read_json

log = logging.getLogger(__name__)
RECORD_FILE = "failback.json"
RECORD_FORMAT = 1
_RECORD_FIELDS = {"format": int, "tree": str, "path": str, "kept": str, "cycle": int,
                  "freeze_time": float, "divergent_ops": int, "divergent_bytes": int,
                  "source_node": str, "time": float, "done": bool}


def record(work: str) -> dict | None:
    """The failback recorded in a tree mirror's directory ``work``, or None."""
    try:
        rec = read_json(os.path.join(work, RECORD_FILE), "tree failback record")
    except FileNotFoundError:
        return None
    ok = isinstance(rec, dict) and set(rec) == set(_RECORD_FIELDS) and all(
        _kind_ok(rec[key], kind) for key, kind in _RECORD_FIELDS.items())
    if not ok or rec["format"] != RECORD_FORMAT or not os.path.isabs(rec["path"]):
        raise StoreError(f"tree failback record in {work} is damaged; look at it (it names "
                         "the tree's kept copy) and move it away")
    return rec


def _kind_ok(value, kind) -> bool:
    if kind is float:
        return type(value) in (int, float) and value == value and value >= 0
    return type(value) is kind and (kind is not int or value >= 0)


def prepare(server, open_msg: dict, branch: dict | None) -> dict | None:
    """Turn this node's tree into the mirror of the promoted tree, if this is a failback
    (see the module's docstring); None if it is not one."""
    store = getattr(server, "store", None)
    from cyclemirror.receiver.treesession import trees_root

    root = trees_root(server.root, open_msg["node_id"])
    mirror = open_msg["mirror"]
    work = os.path.join(root, f".cyclemirror-tree-{mirror}")
    done = record(work)
    if done is not None and not done["done"]:
        return finish(server, root, mirror, done)  # a crash cut it: finish it
    if store is None or branch is None or branch["source_node"] != server.node_id:
        return None
    st = _mirror_state(work)
    if st is not None and st["applied_cycle"] > 0 and not supersedes(work, branch,
                                                                      server.node_id):
        return None  # the mirror holds a cycle: an ordinary delta
    tname, k, ftime = branch["mirror"], branch["cycle"], float(branch["freeze_time"])
    if tname not in store.list_trees():
        return None
    who = open_msg["node_name"] or open_msg["node_id"]
    me = server.node_name or server.node_id
    obj = store.open_tree(tname)
    try:
        base = obj.snapshot_path(k)
    except Exception:  # noqa: BLE001 - NotFoundError or a bad number: refused alike
        base = None
    if base is None or obj.freeze_time(k) != ftime or not os.path.isdir(base):
        raise RoleError(
            f"failback of tree {tname!r} from {who}: it was promoted from cycle {k} "
            f"(frozen at {ftime}) of {me}'s tree, which {me} no longer holds (its "
            "snapshots: " + (", ".join(obj.snapshot_names()) or "none") + "); nothing was "
            f"changed. To take a full copy instead, on {me} remove the tree object "
            f"('cyclemirror mirror rm {tname}', 'cyclemirror tree rm {tname}'; the tree "
            "itself stays) and resume the mirror on " + who)
    m = obj.freeze()  # what this node's tree is now
    d = treediff.tree_delta(base, obj.snapshot_path(m))
    mine_ops = len(d.ops)
    mine_bytes = sum(ln for op in d.ops for _off, ln in op.data)
    theirs = branch["written_ops"]
    loser = me if me != who else server.node_id  # two nodes of one name: by node id
    if mine_ops and theirs and branch["discard_on"] != server.node_id:
        raise SplitBrainError(
            f"split brain on tree {tname}: {me} (this node, the old primary) changed "
            f"{mine_ops} paths ({mine_bytes} bytes of data) after their last common cycle "
            f"{k}, and {who} (the new primary) changed {theirs} paths since its promotion; "
            f"nothing was changed. Name the side whose changes lose: on {who} run "
            f"'cyclemirror mirror resolve {open_msg['mirror']} --discard-changes-on {loser}' "
            f"and 'cyclemirror mirror resume {open_msg['mirror']}' ({me}'s tree is then "
            f"kept whole beside it, at {obj.path}.kept-{k}-<time>)")
    if server.on_failback is not None:
        server.on_failback(tname)  # the daemon lets go: its outgoing mirrors stop
    os.makedirs(root, mode=0o700, exist_ok=True)
    treeops.TreeMirror(root, mirror).close()  # our directory, settled
    now = time.time()
    rec = {"format": RECORD_FORMAT, "tree": tname, "path": obj.path,
           "kept": f"{obj.path}.kept-{k}-{int(now)}", "cycle": k, "freeze_time": ftime,
           "divergent_ops": mine_ops, "divergent_bytes": mine_bytes,
           "source_node": open_msg["node_id"], "time": now, "done": False}
    atomic_write_json(os.path.join(work, RECORD_FILE), rec)  # the commit point
    return finish(server, root, mirror, rec)


def supersedes(work: str, branch: dict | None, node_id: str) -> bool:
    """Whether the source's tree descends from this node's tree that was promoted from
    this very mirror (``work``): a switch back, whose failback replaces the mirror's
    old cycle (and lifts its promotion record, which refuses the old source)."""
    if branch is None or branch["source_node"] != node_id:
        return False
    from cyclemirror.receiver.treepromote import promoted

    rec = promoted(work)
    return rec is not None and rec.get("done") is True and rec["name"] == branch["mirror"]


def _mirror_state(work: str) -> dict | None:
    try:
        return read_json(os.path.join(work, treeops.STATE_FILE), "tree mirror state")
    except FileNotFoundError:
        return None


def finish(server, root: str, mirror: str, rec: dict) -> dict:
    """The steps after the commit point, each skipped when done already."""
    t0 = time.monotonic()
    store = server.store
    k, tname = rec["cycle"], rec["tree"]
    failpoints.hit("treefailback.recorded")
    m = treeops.TreeMirror(root, mirror)
    try:
        if m.applied_cycle != k or float(m.state["freeze_time"]) != rec["freeze_time"] \
                or not os.path.isdir(m.path):
            obj = store.open_tree(tname)  # still here: it goes only after the switch
            _switch_in(m, obj.snapshot_path(k), k, rec["freeze_time"])
    finally:
        m.close()
    work = os.path.join(root, f".cyclemirror-tree-{mirror}")
    from cyclemirror.receiver.treepromote import PROMOTED_FILE

    if os.path.exists(os.path.join(work, PROMOTED_FILE)):  # a switch back: the promotion
        os.unlink(os.path.join(work, PROMOTED_FILE))    # of the mirror's old cycle is over
        treeops.fsync_dir(work)
    failpoints.hit("treefailback.switched")
    if os.path.lexists(rec["path"]) and not os.path.lexists(rec["kept"]):
        os.rename(rec["path"], rec["kept"])  # the live tree, kept whole for the user
        treeops.fsync_dir(os.path.dirname(rec["path"]))
    failpoints.hit("treefailback.kept")
    if tname in store.list_trees():
        store.remove_tree(tname)
    shutil.rmtree(os.path.join(store.path, "outgoing", tname), ignore_errors=True)
    rec["done"] = True
    atomic_write_json(os.path.join(root, f".cyclemirror-tree-{mirror}", RECORD_FILE), rec)
    log.warning("failback of tree %s: this node's tree is now the mirror %s/%s as of cycle "
                "%d, no copy (%.3fs); the tree as this node left it (%d paths changed after "
                "cycle %d) is kept at %s until you delete it", tname, rec["source_node"],
                mirror, k, time.monotonic() - t0, rec["divergent_ops"], k, rec["kept"])
    return {"cycle": k, "kept": rec["kept"], "divergent_ops": rec["divergent_ops"]}


def _switch_in(m: treeops.TreeMirror, snap: str, k: int, freeze_time: float) -> None:
    """Make the mirror ``m`` hold ``snap`` (cycle ``k``): a writable snapshot of it (a
    copy where that cannot be), switched in as a cycle's stage is."""
    stage = f"{treeops.STAGE_PREFIX}{k}"
    m._remove(stage)
    path = os.path.join(m.work, stage)
    try:
        btrfsioctl.snapshot(snap, path, readonly=False)
    except StoreError:
        if m.subvolumes:
            btrfsioctl.create_subvolume(path)
        else:
            os.mkdir(path, 0o700)
        sfd = os.open(snap, treeops._DIR_FLAGS)
        dfd = os.open(path, treeops._DIR_FLAGS)
        try:
            treeops.copy_tree(sfd, dfd)
        finally:
            os.close(sfd)
            os.close(dfd)
    fd = os.open(path, treeops._DIR_FLAGS)
    try:
        treeops.syncfs(fd)
        m._switch(stage, fd, k, freeze_time, os.path.lexists(m.path))
    finally:
        os.close(fd)
