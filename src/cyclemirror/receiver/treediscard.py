"""Split brain on a tree won by the old source: the promoted tree goes back to being a mirror.

``mirror resolve TREE --discard-changes-on THIS-NODE`` on the node that promoted
tree mirror ``SOURCE/MIRROR`` to tree object ``TREE`` at ``PATH``
(``receiver.treepromote``).  The mirror itself was never touched by the
promotion: ``mirrors/<source>/trees/MIRROR`` still holds exactly the promoted
cycle *k*, and only its ``promoted.json`` keeps the old source refused as
demoted.  So no data needs to move (``discard_here``):

1. checks, nothing changed yet: the tree was promoted here from that mirror
   (its record ``promoted.json`` names this tree object and path) and the
   mirror still holds cycle *k* at the promoted freeze time (else refused,
   ``RoleError``: the mirror was removed; take a full copy instead);
2. the daemon lets go of the tree (``release(name)``: its outgoing mirrors,
   such as the refused failback to the old source, stop and are removed);
3. the record ``discarded.json`` in the mirror's directory is written: the
   commit point.  From it on ``finish`` does the rest, each step skipped when
   done, and the daemon's start finishes it after a crash (``finish_cut``):
   a. the live tree (a subvolume) is renamed aside, whole, never deleted:
      ``PATH.kept-<k>-<unix time>`` holds everything this node wrote since the
      promotion (named in the output, ``status`` and the log) until the user
      deletes it (``btrfs subvolume delete``);
   b. the tree object is removed (its record and snapshots), with its outgoing
      state;
   c. ``promoted.json`` goes: the old source is no longer refused;
   d. the record says ``done``.

The old source then takes its demotion back (``mirror reinstate TREE`` there,
``daemon.reinstate``): it asks this node, which opens the mirror and says it
holds cycle *k*, and its mirror resumes with a delta from its own snapshot of
*k*: only what it changed since crosses the wire.  The failpoints
``treediscard.recorded`` (after the commit point), ``treediscard.kept`` (after
the rename) and ``treediscard.released`` (after the promotion record went) let
tests kill -9 the daemon there.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

from cyclemirror import failpoints
from cyclemirror.errors import RoleError, StoreError, UsageError
from cyclemirror.receiver import treeclone, treeops, treepromote
from cyclemirror.receiver.treesession import KIND
from cyclemirror.store.fileops import atomic_write_json, read_json

log = logging.getLogger(__name__)
RECORD_FILE = "discarded.json"
RECORD_FORMAT = 1
_RECORD_FIELDS = {"format": int, "tree": str, "path": str, "kept": str, "cycle": int,
                  "freeze_time": float, "source_node": str, "time": float, "done": bool}


def record(work: str) -> dict | None:
    """The discard recorded in a tree mirror's directory ``work``, or None."""
    try:
        rec = read_json(os.path.join(work, RECORD_FILE), "tree split brain record")
    except FileNotFoundError:
        return None
    ok = isinstance(rec, dict) and set(rec) == set(_RECORD_FIELDS) and all(
        _kind_ok(rec[key], kind) for key, kind in _RECORD_FIELDS.items())
    if not ok or rec["format"] != RECORD_FORMAT or not os.path.isabs(rec["path"]) \
            or not os.path.isabs(rec["kept"]) or rec["cycle"] < 1:
        raise StoreError(f"tree split brain record in {work} is damaged; look at it (it "
                         "names the promoted tree's kept copy) and move it away")
    return rec


def _kind_ok(value, kind) -> bool:
    if kind is float:
        return type(value) in (int, float) and value == value and value >= 0
    return type(value) is kind and (kind is not int or value >= 0)


def discard_here(store, registry, name: str, release) -> dict:
    """Turn promoted tree object ``name`` back into the old source's mirror of cycle *k*,
    keeping the tree whole beside its path (see the module's docstring)."""
    root = os.fspath(store.path)
    obj = store.open_tree(name)
    p = obj.promoted_from
    if p is None:
        raise UsageError(f"tree {name!r} was not promoted on this node")
    who = p["source_name"] or p["source_node"]
    k, ftime = p["cycle"], float(p["freeze_time"])
    ref = treeclone.find_tree_mirror(root, p["source_node"], p["mirror"])
    what = f"tree {name!r}: discarding this node's changes in favour of {who}"
    full = (f"nothing was changed. To keep {who}'s tree, remove the tree object here "
            f"('cyclemirror mirror rm {name}', 'cyclemirror tree rm {name}'; the tree "
            f"itself stays) and mirror it from {who} again (a full copy)")
    if ref is None:
        raise RoleError(f"{what}: the mirror {who}/{p['mirror']} it was promoted from is "
                        f"gone from this store; {full}")
    prom = treepromote.promoted(ref.work)
    if prom is None or prom["name"] != name or prom["path"] != obj.path:
        raise RoleError(f"{what}: the mirror {ref.label()} does not record its promotion "
                        f"to this tree (it says {prom!r}); {full}")
    st = treeclone.read_state(ref)
    if st["applied_cycle"] != k or float(st["freeze_time"] or 0.0) != ftime \
            or not os.path.isdir(ref.path):
        raise RoleError(f"{what}: the mirror {ref.label()} holds cycle "
                        f"{st['applied_cycle']}, not the promoted cycle {k}; {full}")
    key = (ref.node, ref.name, KIND)
    if registry is not None:
        try:
            holder = registry.hold(key, force=False)
        except UsageError as exc:
            raise RoleError(f"{what}: refused: {exc}") from None
    try:
        release(name)  # the daemon lets go: its outgoing mirrors stop and are removed
        now = time.time()
        rec = {"format": RECORD_FORMAT, "tree": name, "path": obj.path,
               "kept": f"{obj.path}.kept-{k}-{int(now)}", "cycle": k, "freeze_time": ftime,
               "source_node": p["source_node"], "time": now, "done": False}
        obj.close()
        atomic_write_json(os.path.join(ref.work, RECORD_FILE), rec)  # the commit point
        out = finish(store, ref.work, rec)
    finally:
        if registry is not None:
            registry.release(key, holder)
    return {**out, "mirror": ref.name, "image": f"{who}/{ref.name}"}


def finish(store, work: str, rec: dict) -> dict:
    """The steps after the commit point, each skipped when done already."""
    t0 = time.monotonic()
    name, path, kept = rec["tree"], rec["path"], rec["kept"]
    failpoints.hit("treediscard.recorded")
    if os.path.lexists(path) and not os.path.lexists(kept):
        os.rename(path, kept)  # the promoted tree, kept whole for the user
        treeops.fsync_dir(os.path.dirname(path))
    failpoints.hit("treediscard.kept")
    if name in store.list_trees():
        obj = store.open_tree(name)
        mine = obj.path == path
        obj.close()
        if mine:
            store.remove_tree(name)
    shutil.rmtree(os.path.join(os.fspath(store.path), "outgoing", name), ignore_errors=True)
    try:
        os.unlink(os.path.join(work, treepromote.PROMOTED_FILE))
    except FileNotFoundError:
        pass
    treeops.fsync_dir(work)
    failpoints.hit("treediscard.released")
    rec["done"] = True
    atomic_write_json(os.path.join(work, RECORD_FILE), rec)
    log.warning("split brain on tree %s resolved by the user in favour of %s: this node's "
                "tree (its changes since cycle %d) is kept at %s until you delete it; the "
                "mirror %s is the old source's mirror again, as of cycle %d (%.3fs)", name,
                rec["source_node"], rec["cycle"], kept, os.path.basename(work)[len(
                    ".cyclemirror-tree-"):], rec["cycle"], time.monotonic() - t0)
    return {"tree": name, "cycle": rec["cycle"], "kept": kept}


def finish_cut(store) -> list[dict]:
    """At daemon start, before any source can connect: finish the discards a crash cut
    short (a record not ``done``); one that fails is logged and left for a person."""
    root = os.fspath(store.path)
    out = []
    base = os.path.join(root, "mirrors")
    for node in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        troot = os.path.join(base, node, "trees")
        for entry in sorted(os.listdir(troot)) if os.path.isdir(troot) else []:
            if not entry.startswith(".cyclemirror-tree-"):
                continue
            work = os.path.join(troot, entry)
            try:
                rec = record(work)
                if rec is not None and not rec["done"]:
                    out.append(finish(store, work, rec))
            except Exception:  # noqa: BLE001 - one mirror must not stop the daemon
                log.exception("finishing the split brain resolution of tree mirror %s "
                              "failed; look at %s", entry, os.path.join(work, RECORD_FILE))
    return out
