"""A tree mirror's connection on the target: ``tree_open``, then whole tree cycles.

A source opens a tree mirror with ``tree_open`` {node_id, node_name, mirror}
(instead of a volume's ``open``; docs/protocol.md, "Tree mirrors").  The
mirror lives under the store, one directory per source node::

    STORE/mirrors/<source node id>/trees/NAME/                  the plain tree
    STORE/mirrors/<source node id>/trees/.cyclemirror-tree-NAME/ ours (receiver.treeops)
    STORE/mirrors/<source node id>/trees/.source.json            the source's node name

and is held in the server's registry under (node, NAME, "tree"), apart from
volume mirrors of the same name.  The answer ``tree_opened`` says which cycle
is applied here and its freeze time.  Then, per cycle: ``tree_base`` {cycle,
base, base_freeze_time} says what the delta starts from (base 0: a full
cycle, else the cycle applied here, with its freeze time as this target
recorded it: a delta from anything else is refused before a byte is
applied), then the cycle's frames (``wire.treeframes``) go straight into
``TreeMirror.apply``, which builds the new version aside and switches it in
whole; ``applied`` goes back once it is switched (and durable).  Any error
ends the connection after an ``error`` message; the tree stays the previous
cycle.

A promoted tree's ``tree_branch`` before ``tree_open`` may make this a
failback: this node's own tree turned into the mirror at the promoted cycle
first (``receiver.treefailback``).

``tree_status`` is the ``incoming_trees`` of ``status --json``;
``remove_tree_mirror`` is ``mirror rm SOURCE/NAME`` for a tree mirror.
"""

from __future__ import annotations

import logging
import os
import stat

from cyclemirror.errors import ConnectionLostError, ProtocolError, UsageError
from cyclemirror.receiver.treeops import TreeMirror
from cyclemirror.wire import treeframes

log = logging.getLogger(__name__)
TREES_DIR = "trees"
KIND = "tree"  # the third part of a tree mirror's registry key


def trees_root(store_root: str, node_id: str) -> str:
    return os.path.join(store_root, "mirrors", node_id, TREES_DIR)


SOURCE_FILE = ".source.json"  # in a node's trees/: the source's node name, for status


def source_name(store_root: str, node_id: str) -> str | None:
    """The node name the source gave at its latest tree_open (None: unknown)."""
    from cyclemirror.store.fileops import read_json

    try:
        rec = read_json(os.path.join(trees_root(store_root, node_id), SOURCE_FILE),
                        "tree source record")
    except Exception:  # noqa: BLE001 - missing or damaged: the node id stands in
        return None
    name = rec.get("node_name")
    return name if isinstance(name, str) and name else None


def _note_source(store_root: str, node_id: str, node_name: str | None) -> None:
    from cyclemirror.store.fileops import atomic_write_json

    if node_name and source_name(store_root, node_id) != node_name:
        atomic_write_json(os.path.join(trees_root(store_root, node_id), SOURCE_FILE),
                          {"node_name": node_name})


def recover_all(store_root: str, note_error) -> None:
    """Settle every tree mirror's crashed apply before anyone connects."""
    base = os.path.join(store_root, "mirrors")
    for node in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        root = trees_root(store_root, node)
        for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            if name.startswith(".cyclemirror-tree-"):
                try:
                    TreeMirror(root, name[len(".cyclemirror-tree-"):]).close()
                except Exception as exc:  # noqa: BLE001 - one mirror must not stop the rest
                    note_error(f"recovery of tree mirror {root}/{name}: {exc}")


def tree_status(store_root: str, now: float) -> list[dict]:
    """One row per tree mirror held here (the ``incoming_trees`` of ``status --json``)."""
    from cyclemirror.store.fileops import read_json

    rows = []
    base = os.path.join(store_root, "mirrors")
    for node in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        root = trees_root(store_root, node)
        for entry in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            if not entry.startswith(".cyclemirror-tree-"):
                continue
            name = entry[len(".cyclemirror-tree-"):]
            row = {"source_node": node, "tree": name, "path": os.path.join(root, name),
                   "applied_cycle": 0, "freeze_time": None, "rpo_age": None, "error": None}
            try:
                st = read_json(os.path.join(root, entry, "state.json"), "tree mirror state")
            except FileNotFoundError:
                pass
            except Exception as exc:  # noqa: BLE001 - shown, never hidden
                row["error"] = str(exc)
            else:
                applied = st.get("applied_cycle") if type(st.get("applied_cycle")) is int else 0
                row["applied_cycle"] = applied
                if applied and isinstance(st.get("freeze_time"), int | float):
                    row["freeze_time"] = st["freeze_time"]
                    row["rpo_age"] = now - st["freeze_time"]
            row["source_name"] = source_name(store_root, node)
            try:
                from cyclemirror.receiver.treepromote import promoted

                rec = promoted(os.path.join(root, entry))
            except Exception as exc:  # noqa: BLE001 - shown, never hidden
                rec, row["error"] = None, str(exc)
            row["promoted"] = None if rec is None else {
                k: rec.get(k) for k in ("name", "path", "cycle", "time", "forced", "done")}
            try:
                from cyclemirror.receiver.treefailback import record

                back = record(os.path.join(root, entry))
            except Exception as exc:  # noqa: BLE001 - shown, never hidden
                back, row["error"] = None, str(exc)
            row["failback"] = None if back is None else {
                k: back[k] for k in ("tree", "cycle", "kept", "divergent_ops",
                                     "divergent_bytes", "time", "done")}
            try:
                from cyclemirror.receiver.treediscard import record as discarded

                lost = discarded(os.path.join(root, entry))
            except Exception as exc:  # noqa: BLE001 - shown, never hidden
                lost, row["error"] = None, str(exc)
            row["discarded"] = None if lost is None else {
                k: lost[k] for k in ("tree", "path", "cycle", "kept", "time", "done")}
            rows.append(row)
    return rows


class TreeSession:
    """The rest of one connection after ``tree_open``; ``run()`` returns when it ends."""

    def __init__(self, server, link, msg: dict, branch: dict | None = None):
        self.server = server
        self.link = link
        self.open_msg = msg
        self.branch = branch  # a promoted tree's 'tree_branch' (receiver.treefailback)
        self.mirror: TreeMirror | None = None
        self.key = None

    def run(self) -> None:
        try:
            self._serve()
        finally:
            if self.mirror is not None:
                self.mirror.close()
            if self.key is not None:
                self.server.registry.release(self.key, self)

    def _serve(self) -> None:
        msg = self.open_msg
        name = msg["mirror"]
        if msg["node_id"] == self.server.node_id:
            raise ProtocolError(f"tree mirror {name!r}: the source is this very node "
                                f"({msg['node_id']}); mirror to another daemon's store")
        self.key = (msg["node_id"], name, KIND)
        self.server.registry.acquire(self.key, self)
        root = trees_root(self.server.root, msg["node_id"])
        from cyclemirror.receiver import treefailback
        from cyclemirror.receiver.treepromote import refuse_if_promoted

        work = os.path.join(root, f".cyclemirror-tree-{name}")
        if not treefailback.supersedes(work, self.branch, self.server.node_id):
            refuse_if_promoted(work, name, msg["node_name"] or msg["node_id"],
                               self.server.node_name or self.server.node_id)

        treefailback.prepare(self.server, msg, self.branch)  # a failback: no full copy
        os.makedirs(root, mode=0o700, exist_ok=True)
        _note_source(self.server.root, msg["node_id"], msg["node_name"])
        self.mirror = m = TreeMirror(root, name)  # settles a crashed apply
        self.link.send_message("tree_opened", node_id=self.server.node_id,
                               applied_cycle=m.applied_cycle,
                               freeze_time=float(m.state["freeze_time"]))
        log.info("tree mirror %s from %s opened by %s (applied cycle %d)", name,
                 msg["node_name"] or msg["node_id"], self.link.peer, m.applied_cycle)
        where = f"tree mirror {name!r} from {self.link.peer}"
        self._prepare_next(name)  # the first cycle's frames wait in the socket meanwhile
        while True:
            try:
                base = self.link.recv_message({"tree_base", "tree_switchover"})
            except ConnectionLostError as exc:
                if getattr(exc, "clean", False):
                    return  # the source closed between cycles
                raise
            if base["type"] == "tree_switchover":  # a planned role swap (docs/trees.md)
                from cyclemirror.receiver.treepromote import serve_tree_switchover

                return serve_tree_switchover(self, base)
            self._check_base(base, where)
            reader = treeframes.TreeFrameReader(self._read_exact, where)
            events = reader.events()
            first = next(events)
            if first[1]["cycle"] != base["cycle"] or first[1]["full"] != (base["base"] == 0):
                raise ProtocolError(
                    f"{where}: 'begin' (cycle {first[1]['cycle']}, full {first[1]['full']}) "
                    f"does not match 'tree_base' (cycle {base['cycle']}, base {base['base']})")
            cycle = m.apply(_chain(first, events),
                            base=base["base"] if base["base"] else None)
            self.link.send_message("applied", cycle=cycle, freeze_time=m.state["freeze_time"])
            log.info("tree mirror %s applied cycle %d", name, cycle)
            self._prepare_next(name)  # while the source waits for its next freeze
            if self.server.on_applied is not None:
                self.server.on_applied(m)

    def _prepare_next(self, name: str) -> None:
        """The next delta's stage, made now (``TreeMirror.prepare_next``): a failure here
        only means the next apply makes its stage itself (and says what is wrong)."""
        try:
            self.mirror.prepare_next()
        except Exception as exc:  # noqa: BLE001 - logged; the apply reports it again
            log.warning("tree mirror %s: making the next cycle's stage ahead failed: %s "
                        "(the next cycle makes it)", name, exc)

    def _check_base(self, msg: dict, where: str) -> None:
        m = self.mirror
        cycle, base = msg["cycle"], msg["base"]
        if cycle <= m.applied_cycle and base:
            raise ProtocolError(f"{where}: cycle {cycle} is not newer than the applied "
                                f"cycle {m.applied_cycle}")
        if base and (base != m.applied_cycle
                     or msg["base_freeze_time"] != m.state["freeze_time"]):
            raise ProtocolError(
                f"{where}: a delta from cycle {base} (frozen at {msg['base_freeze_time']}) "
                f"is refused: this target holds cycle {m.applied_cycle} (frozen at "
                f"{m.state['freeze_time']}); the source ships a full cycle when it reconnects")

    def _read_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        self.link._rx.read_into(buf, "a tree cycle's frame")
        self.link.bytes_received += n
        return bytes(buf)


def _chain(first, rest):
    yield first
    yield from rest


def remove_tree_mirror(store_root: str, registry, name: str, force: bool) -> dict | None:
    """``mirror rm SOURCE/NAME`` on a target for a tree mirror (SOURCE: the source's node
    id, as ``status`` lists it under the trees held here): the record first (from then
    on nothing names the tree), then the tree and our directory.  None when there is no
    such tree mirror; refused while the source is connected unless ``force``."""
    from cyclemirror.receiver import treeops
    from cyclemirror.store import btrfsioctl

    if not isinstance(name, str) or name.count("/") != 1:
        return None
    node, mirror = name.split("/")
    base = os.path.join(store_root, "mirrors")
    if not os.path.isdir(trees_root(store_root, node)) and os.path.isdir(base):
        named = [n for n in sorted(os.listdir(base)) if source_name(store_root, n) == node]
        if len(named) > 1:
            raise UsageError(f"source name {node!r} belongs to several source nodes "
                             f"({', '.join(named)}); name the source by its node id")
        node = named[0] if named else node
    root = trees_root(store_root, node)
    work = os.path.join(root, f".cyclemirror-tree-{mirror}")
    if not node or not mirror or "." in (node[:1], mirror[:1]) or not os.path.isdir(work):
        return None
    key = (node, mirror, KIND)
    holder = registry.hold(key, force=force)
    removed = []
    try:
        for parent, entry in ((work, "state.json"), (work, "promoted.json"),
                              (work, "failback.json"), (root, mirror)):
            path = os.path.join(parent, entry)
            if not os.path.lexists(path):
                continue
            if _is_subvolume(path):
                btrfsioctl.delete_subvolume(path)
            else:
                fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                try:
                    treeops._rm_at(fd, entry)
                finally:
                    os.close(fd)
            removed.append(path)
        m = treeops.TreeMirror(root, mirror)  # deletes the stages left, as a recovery
        m.close()
        os.rmdir(work)
        gone_name = source_name(store_root, node)
        if os.listdir(root) == [SOURCE_FILE]:  # the node's last tree: its record goes too
            os.unlink(os.path.join(root, SOURCE_FILE))
        treeops.fsync_dir(root)
    finally:
        registry.release(key, holder)
    log.info("incoming tree mirror %s/%s removed%s", node, mirror,
             " with --force" if force else "")
    return {"source_node": node, "source_name": gone_name, "mirror": mirror, "group": False,
            "volumes": [], "kind": "tree", "removed": removed}


def _is_subvolume(path: str) -> bool:
    from cyclemirror.store.btrfsioctl import BTRFS_SUBVOL_INO, subvolume_id

    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_ino != BTRFS_SUBVOL_INO:
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        return subvolume_id(fd) != 0
    finally:
        os.close(fd)
