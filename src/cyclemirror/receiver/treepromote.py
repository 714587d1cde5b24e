"""Promote a tree mirror: its last applied cycle becomes a live tree object of this store.

``promote_tree(store, registry, source, mirror, dest, as_name, force)`` is
``mirror promote SOURCE/TREE PATH [--as NAME] [--force]`` on a target
(docs/trees.md, "Clone and promote on the target"):

1. refused while the source is connected and sending, unless ``force`` (which
   closes its connection): the mirror is held in the server's registry, so no
   cycle arrives meanwhile; a cycle cut short is discarded
   (``TreeMirror.recover``);
2. the promotion is recorded in the mirror's own directory (``promoted.json``:
   name, path, cycle; ``done`` false), the commit point: from then on the old
   source's ``tree_open`` is refused with a ``DemotedError`` that says what
   happened (``refuse_if_promoted``), and the source breaks that target with
   that message, so the mirror stays at the promoted cycle;
3. ``PATH`` becomes a btrfs subvolume holding that cycle (a writable snapshot
   of the mirror where it can be, else a copy: see ``receiver.treeclone``),
   built aside and renamed in whole;
4. it is registered as tree object ``NAME`` (default: the mirror's name) of
   this store (``Store.add_tree``), so it can be mirrored in its turn, with a
   read-only snapshot of the promoted cycle *k* kept as its ``snap-k`` (taken
   of the mirror's tree, held at *k*) and ``promoted_from`` naming the source,
   the mirror, *k* and its freeze time: its next freeze is cycle *k + 1*, and
   mirroring it back to the old source is a failback that ships the delta from
   that base (``receiver.treefailback``);
5. the record says ``done``.

The mirror's tree stays as it was (the cycle promoted from) until ``mirror rm
SOURCE/TREE``.  Running the same promotion again answers it (``resumed``);
after a crash between steps 2 and 5 the daemon's start does what is left of 3
to 5 (``finish_cut``), and so would a rerun.
"""

from __future__ import annotations

import logging
import os
import secrets
import time

from cyclemirror import failpoints
from cyclemirror.errors import (
    AlreadyExistsError,
    DemotedError,
    NotFoundError,
    ProtocolError,
    RoleError,
    StoreError,
    UsageError,
)
from cyclemirror.receiver import treeclone, treeops
from cyclemirror.store import cowfs, fileobject
from cyclemirror.store.fileops import atomic_write_json, read_json
from cyclemirror.store.names import validate_volume_name

log = logging.getLogger(__name__)
PROMOTED_FILE = "promoted.json"
RECORD_FORMAT = 1
_LOCAL = None  # the registry of a daemon that runs no target server


def promoted(work: str) -> dict | None:
    """The promotion recorded in a tree mirror's directory ``work``, or None."""
    try:
        rec = read_json(os.path.join(work, PROMOTED_FILE), "tree promotion record")
    except FileNotFoundError:
        return None
    if rec.get("format") != RECORD_FORMAT or not isinstance(rec.get("name"), str) \
            or not isinstance(rec.get("path"), str) or type(rec.get("cycle")) is not int \
            or not isinstance(rec.get("time"), int | float):
        raise StoreError(f"tree promotion record in {work} is damaged; move it away only if "
                         "the tree was not promoted")
    return rec


def refuse_if_promoted(work: str, mirror: str, source: str, here: str) -> None:
    """Raise DemotedError if tree mirror ``mirror`` (in ``work``) was promoted here."""
    rec = promoted(work)
    if rec is None:
        return
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(rec["time"]))
    raise DemotedError(
        f"tree mirror {mirror!r} from {source}: {here} promoted it to tree object "
        f"{rec['name']!r} ({rec['path']}) at {when}, as of cycle {rec['cycle']}"
        f"{' (forced)' if rec.get('forced') else ''}; {source}'s tree is demoted and must not "
        f"mirror over the new primary. Stop its writers there, then fail back: on {here} "
        f"run 'cyclemirror mirror start {rec['name']} --to {source}' (ships only what "
        f"changed since cycle {rec['cycle']}; docs/trees.md, \"Failback\")")


def _result(ref, rec: dict, resumed: bool, seconds: float, how: str) -> dict:
    return {"kind": "tree", "source_node": ref.node, "source_name": ref.source_name,
            "mirror": ref.name, "tree": rec["name"], "path": rec["path"],
            "cycle": rec["cycle"], "freeze_time": rec["freeze_time"],
            "forced": rec["forced"], "resumed": resumed, "how": how, "seconds": seconds,
            "group": False, "volumes": []}


def promote_tree(store, registry, source: str, mirror: str, dest: object,
                 as_name: str | None, force: bool) -> dict:
    global _LOCAL

    t0 = time.monotonic()
    root = os.fspath(store.path)
    what = f"promote of tree mirror {source}/{mirror}"
    validate_volume_name(mirror)
    ref = treeclone.find_tree_mirror(root, source, mirror)
    if ref is None:
        known = treeclone.known_tree_mirrors(root)
        raise NotFoundError(f"no tree mirror {source}/{mirror} in this store (tree mirrors: "
                            f"{', '.join(known) or 'none'})")
    name = validate_volume_name(as_name if as_name is not None else mirror)
    if not isinstance(dest, str) or not os.path.isabs(dest):
        raise UsageError(f"{what}: the destination must be an absolute path, got {dest!r}")
    real = os.path.join(os.path.realpath(os.path.dirname(dest)), os.path.basename(dest))
    done = promoted(ref.work)
    if done is not None:
        if done["name"] != name or done["path"] != real:
            raise RoleError(f"{what}: it was promoted already, to tree object "
                            f"{done['name']!r} at {done['path']}")
        if done.get("done"):
            return _result(ref, done, True, time.monotonic() - t0, "")
        return _make(store, ref, done, t0, resumed=True)  # a crash cut it: finish it
    real = treeclone.check_dest(root, dest, what)
    parent = os.path.dirname(real)
    if os.geteuid() != 0 or cowfs.filesystem_of(parent) != "btrfs":
        raise UsageError(f"{what}: {parent} is not on btrfs (or the daemon does not run as "
                         "root): a promoted tree must be a btrfs subvolume, a tree object "
                         "that can be mirrored in its turn; pick a path on a btrfs file "
                         "system")
    _check_name_free(store, root, name, what)
    if registry is None:
        from cyclemirror.receiver.server import MirrorRegistry

        if _LOCAL is None:
            _LOCAL = MirrorRegistry()
        registry = _LOCAL
    key = (ref.node, ref.name, "tree")
    try:
        holder = registry.hold(key, force=force)
    except UsageError as exc:
        raise RoleError(f"{what}: refused: {exc}") from None
    try:
        treeops.TreeMirror(ref.root, ref.name).close()  # settles a cycle cut short
        st = treeclone.read_state(ref)
        if st["applied_cycle"] == 0 or not os.path.isdir(ref.path):
            raise NotFoundError(f"{what}: the mirror holds no applied cycle yet; nothing to "
                                "promote")
        # The commit point: from here the old source is refused (the mirror stays this
        # cycle), and a crash is finished by running the promotion again.
        rec = {"format": RECORD_FORMAT, "name": name, "path": real,
               "cycle": st["applied_cycle"], "freeze_time": st["freeze_time"],
               "time": time.time(), "forced": bool(force), "source_node": ref.node,
               "source_name": ref.source_name, "done": False}
        atomic_write_json(os.path.join(ref.work, PROMOTED_FILE), rec)
        return _make(store, ref, rec, t0, resumed=False)
    finally:
        registry.release(key, holder)


def _check_name_free(store, root: str, name: str, what: str) -> None:
    if name in store.list_volumes() or name in store.list_trees() or \
            os.path.exists(fileobject.record_path(root, name)):
        raise AlreadyExistsError(f"{what}: {name!r} is already an object of this store; "
                                 "give the promoted tree another name with --as")


def _make(store, ref, rec: dict, t0: float, resumed: bool) -> dict:
    """The steps after the commit point, each skipped when a crash left it done: the tree
    at the path, its registration, the record saying done."""
    path, name = rec["path"], rec["name"]
    parent, leaf = os.path.split(path)
    how = ""
    if not os.path.lexists(path):
        work = os.path.join(parent, f"{treeclone.WORK_PREFIX}{leaf}-{secrets.token_hex(4)}")
        try:
            st, how = treeclone.consistent_copy(ref, work)
            if st["applied_cycle"] != rec["cycle"]:
                raise StoreError(f"tree mirror {ref.label()} moved to cycle "
                                 f"{st['applied_cycle']} after it was promoted as of cycle "
                                 f"{rec['cycle']}; its state is not ours to trust")
            pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                treeops.renameat2(pfd, os.path.basename(work), pfd, leaf,
                                  treeops.RENAME_NOREPLACE)
                os.fsync(pfd)
            finally:
                os.close(pfd)
        except BaseException:
            treeclone.remove_tree(work)
            raise
    failpoints.hit("treepromote.made")
    if name not in store.list_trees():
        store.add_tree(name, path, base={"path": ref.path, "cycle": rec["cycle"],
                                         "freeze_time": rec["freeze_time"]},
                       promoted_from={"source_node": rec["source_node"],
                                      "source_name": rec["source_name"],
                                      "mirror": ref.name, "cycle": rec["cycle"],
                                      "freeze_time": float(rec["freeze_time"]),
                                      "forced": bool(rec["forced"]), "time": rec["time"]})
        if store.open_tree(name).frozen_cycle != rec["cycle"]:
            log.warning("tree %s: no snapshot of the promoted cycle %d could be kept (the "
                        "mirror %s is not a subvolume on the file system of %s): mirroring "
                        "it back to %s will be a full cycle", name, rec["cycle"], ref.path,
                        path, ref.source_name or ref.node)
    failpoints.hit("treepromote.registered")
    rec["done"] = True
    atomic_write_json(os.path.join(ref.work, PROMOTED_FILE), rec)
    seconds = time.monotonic() - t0
    log.warning("tree mirror %s promoted%s to tree object %s at %s, as of cycle %d (%.3fs)%s;"
                " its source is demoted", ref.label(), " (forced)" if rec["forced"] else "",
                name, path, rec["cycle"], seconds,
                " (finished a promotion a crash cut short)" if resumed else "")
    return _result(ref, rec, resumed, seconds, how)


def finish_cut(store) -> list[dict]:
    """At daemon start, before any source can connect: finish the tree promotions a crash
    cut short (a record not ``done``); one that fails is logged and left for a rerun."""
    root = os.fspath(store.path)
    out = []
    base = os.path.join(root, "mirrors")
    for node in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        troot = os.path.join(base, node, "trees")
        for entry in sorted(os.listdir(troot)) if os.path.isdir(troot) else []:
            if not entry.startswith(".cyclemirror-tree-"):
                continue
            ref = treeclone.TreeMirrorRef(root, node, entry[len(".cyclemirror-tree-"):])
            try:
                rec = promoted(ref.work)
                if rec is not None and not rec.get("done"):
                    out.append(_make(store, ref, rec, time.monotonic(), resumed=True))
            except Exception:  # noqa: BLE001 - one mirror must not stop the daemon
                log.exception("finishing the promotion of tree mirror %s failed; run the "
                              "same 'mirror promote' again", ref.label())
    return out


def serve_tree_switchover(session, msg: dict) -> None:
    """The target's half of a tree's planned switchover (``daemon.treeswitchover``): the
    source asks, after its final cycle ``msg['cycle']`` was applied here, that the mirror
    be promoted at ``msg['path']`` (not forced: the source asked) and mirrored back to
    ``msg['back_to']``; the answer is ``switched``."""
    from cyclemirror.receiver.promote import _ADDRESS

    m = session.mirror
    name, node = session.open_msg["mirror"], session.open_msg["node_id"]
    if m.applied_cycle != msg["cycle"]:
        raise ProtocolError(f"switchover of tree {name!r}: the source's final cycle is "
                            f"{msg['cycle']}, this mirror applied {m.applied_cycle}")
    back_to = msg["back_to"]
    if back_to and not _ADDRESS.fullmatch(back_to):
        raise ProtocolError(f"switchover: back_to {back_to!r:.80} is not HOST:PORT")
    server = session.server
    if getattr(server, "store", None) is None:
        raise UsageError(f"switchover of tree {name!r}: this target has no store to make "
                         "a tree object in")
    m.close()
    session.mirror = None
    server.registry.release(session.key, session)
    session.key = None
    try:
        result = promote_tree(server.store, server.registry, node, name, msg["path"], None,
                              False)
    except Exception as exc:
        from cyclemirror.receiver.treesession import trees_root

        if promoted(os.path.join(trees_root(server.root, node),
                                 f".cyclemirror-tree-{name}")) is None:
            raise  # refused before the commit point: the source takes its tree back
        raise StoreError(f"switchover of tree {name!r}: promoted here as of cycle "
                         f"{msg['cycle']}, but not finished ({type(exc).__name__}: {exc}); "
                         "this daemon finishes it when it starts again, or run the same "
                         "'cyclemirror mirror promote' here") from exc
    session.link.send_message("switched", volume=result["tree"],
                              generation=str(result["cycle"]), epoch="")
    hook = getattr(server, "on_switchover", None)
    if hook is not None:
        hook(result, back_to)
