"""Tree objects: a btrfs subvolume, frozen whole by a read-only subvolume snapshot.

A *tree object* is a directory tree that applications write where it is (a
database's data directory, an application tree).  Every file of it must be
frozen at one instant, which only a file system snapshot gives: a btrfs
read-only subvolume snapshot (``btrfs subvolume snapshot -r``) is taken in one
transaction, so a write of any application lands wholly before or after it,
in every file at once.  That is why the object must *be* a btrfs subvolume:
a plain directory, even on btrfs, cannot be frozen at one instant (reflinks
of its files one by one are many instants), and ``add_tree`` refuses it,
saying how to make it a subvolume.

The store keeps a record (``STORE/trees/NAME.json``) and a hidden snapshot
directory of its own beside the subvolume (``.cyclemirror-<node>-NAME/``,
mode 0700, on the same file system, as a snapshot cannot cross one):

* ``freeze()`` is freeze *k*: a read-only snapshot to ``.tmp-k``, renamed to
  ``snap-k``; the record's ``top`` moving to *k* is the commit point.
* ``merge_through(j)`` deletes the snapshots ``<= j`` (after every target
  applied cycle *j + 1*), so ``snap-(j+1)`` stays as the next delta's
  reference: the mirror's snapshots are cleaned up after each cycle.
* ``open`` (``TreeObject(...)``) deletes what a crash left: ``.tmp-*``
  snapshots, snapshots above ``top`` (a freeze that never committed) and at
  or below ``merged``.  Only names of the form ``snap-N`` and ``.tmp-N`` in
  the object's own directory are ever deleted.

Roles (docs/trees.md, "Failback"): the record also says whether the tree was
*demoted* (a target promoted its mirror; ``mark_demoted``: the daemon then
stops cycling it), whether it was *promoted* from a mirror here
(``promoted_from``: the source node, mirror, cycle *k* and its freeze time;
``add_tree(..., base=...)`` keeps a read-only snapshot of cycle *k* as
``snap-k``, the base a failback's delta starts from), and the side a user named
to lose a split brain (``discard_on``).

The delta between two snapshots is ``store.treediff``; what ships it is
``wire.treeframes``; the target's side is ``receiver.treeops``.  Snapshots
are made and deleted with the kernel's ioctls (``store.btrfsioctl``), which
need root.
"""

from __future__ import annotations

import os
import stat
import threading
import time

from cyclemirror.errors import AlreadyExistsError, NotFoundError, StoreError, UsageError
from cyclemirror.store import btrfsioctl, cowfs, fileops, treediff
from cyclemirror.store.btrfsioctl import BTRFS_SUBVOL_INO
from cyclemirror.store.names import validate_volume_name
from cyclemirror.store.snapnames import SNAP_PREFIX, TMP_PREFIX, is_ours, is_stale

TREES_DIR = "trees"
RECORD_FORMAT = 1


def snapshot_dir_for(path: str, node_id: str, name: str) -> str:
    return os.path.join(os.path.dirname(path.rstrip("/")) or "/",
                        f".cyclemirror-{node_id[:12]}-{name}")


def record_path(store_path: str, name: str) -> str:
    return os.path.join(store_path, TREES_DIR, validate_volume_name(name) + ".json")


def list_trees(store_path: str) -> list[str]:
    try:
        entries = os.listdir(os.path.join(store_path, TREES_DIR))
    except FileNotFoundError:
        return []
    return sorted(e[:-5] for e in entries if e.endswith(".json") and not e.startswith("."))


def is_subvolume(path: str) -> bool:
    st = os.lstat(path)
    return (stat.S_ISDIR(st.st_mode) and st.st_ino == BTRFS_SUBVOL_INO
            and cowfs.filesystem_of(path) == "btrfs")


def check_tree_path(path: str, what: str) -> None:
    """Refuse anything but a btrfs subvolume, saying why and what to do."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise NotFoundError(f"{what}: {path} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what}: {path} is not a directory (a symlink or a file?); name "
                         "the directory itself (a single file is a file object: "
                         "'cyclemirror file add')")
    fs = cowfs.filesystem_of(path)
    if fs != "btrfs":
        raise UsageError(
            f"{what}: {path} is on {fs}: all the files of a tree can be frozen at one "
            "instant without stopping their writers only by a btrfs subvolume snapshot. "
            "Keep the tree in a btrfs subvolume ('btrfs subvolume create'), or keep its "
            "files on XFS/btrfs as file objects, one instant per file ('cyclemirror file "
            "add')")
    if st.st_ino != BTRFS_SUBVOL_INO:
        raise UsageError(
            f"{what}: {path} is a plain directory on btrfs, not a subvolume: its files "
            "could be frozen only one at a time, never all at one instant. Make it a "
            f"subvolume: 'btrfs subvolume create {path}.new', move the contents over "
            f"(stop the writers, 'cp -a --reflink=always {path}/. {path}.new/'), swap the "
            "names, then add it again")


def add_tree(store_path: str, node_id: str, name: str, path: str, base: dict | None = None,
             promoted_from: dict | None = None) -> dict:
    """Record the btrfs subvolume ``path`` as tree object ``name``, after a probe snapshot.

    A promoted tree (``promoted_from``) may start from a base: ``base`` = {"path": a
    subvolume holding exactly cycle ``cycle``, "cycle", "freeze_time"}; it is kept as
    the read-only ``snap-<cycle>``, frozen at that time, and the object's next freeze is
    cycle + 1, so a failback ships a delta from it.  A base that cannot be snapshotted
    (another file system) is left out: the object starts at cycle 0."""
    validate_volume_name(name)
    if not os.path.isabs(path):
        raise UsageError(f"tree object {name!r}: the path must be absolute, got {path!r}")
    path = os.path.normpath(path)
    if os.path.exists(record_path(store_path, name)):
        raise AlreadyExistsError(f"tree object {name!r} already exists; remove it first "
                                 f"('cyclemirror tree rm {name}')")
    check_tree_path(path, f"tree object {name!r}")
    snaps = snapshot_dir_for(path, node_id, name)
    _own_directory(snaps, f"tree object {name!r}")
    probe = os.path.join(snaps, TMP_PREFIX + "probe")
    _delete_snapshot(probe, f"tree object {name!r}")
    btrfsioctl.snapshot(path, probe, readonly=True)
    _delete_snapshot(probe, f"tree object {name!r}")
    rec = {"format": RECORD_FORMAT, "name": name, "path": path, "fs": "btrfs",
           "snapshots": snaps, "top": 0, "merged": -1, "freeze_times": {},
           "created": time.time()}
    if promoted_from is not None:
        rec["promoted_from"] = dict(promoted_from)
    if base is not None:
        k = base["cycle"]
        tmp = os.path.join(snaps, f"{TMP_PREFIX}{k}")
        _delete_snapshot(tmp, f"tree object {name!r}")
        try:
            btrfsioctl.snapshot(base["path"], tmp, readonly=True)
        except StoreError:
            rec["base_error"] = f"no base snapshot of cycle {k} could be made from {base['path']}"
        else:
            final = os.path.join(snaps, f"{SNAP_PREFIX}{k}")
            _delete_snapshot(final, f"tree object {name!r}")
            os.rename(tmp, final)
            fileops.fsync_dir(snaps)
            rec.update(top=k, merged=k - 1, freeze_times={str(k): float(base["freeze_time"])})
    os.makedirs(os.path.join(store_path, TREES_DIR), exist_ok=True)
    fileops.atomic_write_json(record_path(store_path, name), rec)
    return rec


def remove_tree(store_path: str, name: str) -> None:
    """Forget tree object ``name`` and delete its snapshots (the tree is not touched)."""
    rec = _read_record(record_path(store_path, name), name)
    os.unlink(record_path(store_path, name))
    fileops.fsync_dir(os.path.join(store_path, TREES_DIR))
    snaps = rec["snapshots"]
    try:
        entries = os.listdir(snaps)
    except FileNotFoundError:
        return
    for e in entries:
        if is_ours(e):
            _delete_snapshot(os.path.join(snaps, e), f"tree object {name!r}")
    try:
        os.rmdir(snaps)
    except OSError:
        pass  # something not ours in it: left alone


def _delete_snapshot(path: str, what: str) -> None:
    """Delete a snapshot of ours if it exists (a read-only subvolume)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode) or st.st_ino != BTRFS_SUBVOL_INO:
        raise StoreError(f"{what}: {path} is not a snapshot of ours (not a subvolume); "
                         "move it away")
    try:
        btrfsioctl.delete_subvolume(path)
    except StoreError as exc:
        raise StoreError(f"{what}: {exc}") from None


def _read_record(path: str, name: str) -> dict:
    try:
        rec = fileops.read_json(path, f"tree object {name!r}")
    except FileNotFoundError:
        raise NotFoundError(f"no tree object {name!r}") from None
    ok = (rec.get("format") == RECORD_FORMAT and rec.get("name") == name
          and isinstance(rec.get("path"), str) and os.path.isabs(rec["path"])
          and isinstance(rec.get("snapshots"), str) and os.path.isabs(rec["snapshots"])
          and all(type(rec.get(k)) is int for k in ("top", "merged"))
          and isinstance(rec.get("freeze_times"), dict))
    if ok:
        ok = _roles_ok(rec)
    if not ok or not -1 <= rec["merged"] < max(rec["top"], 1):
        raise StoreError(f"tree object {name!r}: its record {path} is damaged; remove it "
                         f"('cyclemirror tree rm {name}') and add the tree again")
    return rec


def _is_time(v) -> bool:
    return type(v) in (int, float) and v == v and 0 <= v < 1e12


def _roles_ok(rec: dict) -> bool:
    """The optional role fields of a record, if present, have their shapes."""
    d = rec.get("demoted")
    if d is not None and not (isinstance(d, dict) and set(d) == {"by", "message", "time"}
                              and isinstance(d["by"], str) and isinstance(d["message"], str)
                              and _is_time(d["time"])):
        return False
    p = rec.get("promoted_from")
    if p is not None and not (
            isinstance(p, dict) and set(p) == set(PROMOTED_FIELDS)
            and isinstance(p["source_node"], str) and isinstance(p["mirror"], str)
            and (p["source_name"] is None or isinstance(p["source_name"], str))
            and type(p["cycle"]) is int and p["cycle"] >= 1 and _is_time(p["freeze_time"])
            and type(p["forced"]) is bool and _is_time(p["time"])):
        return False
    return rec.get("discard_on") is None or isinstance(rec["discard_on"], str)


PROMOTED_FIELDS = ("source_node", "source_name", "mirror", "cycle", "freeze_time", "forced",
                   "time")


def _own_directory(path: str, what: str) -> None:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise StoreError(f"{what}: {path} is not a directory owned by this daemon's user "
                         "(a symlink or someone else's?); move it away and try again")


class TreeObject:
    """One tree object of a store: its freezes (snapshots), merges and crash recovery.
    Thread-safe: ``_lock`` guards the record."""

    is_file = False
    is_tree = True

    def __init__(self, store_path: str, name: str):
        self.name = validate_volume_name(name)
        self._record_path = record_path(store_path, name)
        rec = _read_record(self._record_path, name)
        self.path: str = rec["path"]
        self.snapshots: str = rec["snapshots"]
        self._rec = rec
        self._lock = threading.Lock()
        self._freeze_lock = threading.Lock()
        self._walk: tuple[int, dict] | None = None  # the newest delta's walk of its snapshot
        self._recover()

    def snapshot_path(self, k: int) -> str:
        """The read-only snapshot of freeze ``k`` (NotFoundError once merged)."""
        if type(k) is not int:
            raise UsageError(f"cycle number must be an integer, got {k!r}")
        with self._lock:
            if not max(1, self._rec["merged"] + 1) <= k <= self._rec["top"]:
                raise NotFoundError(
                    f"tree object {self.name!r} has no snapshot of cycle {k}: it holds "
                    f"{max(1, self._rec['merged'] + 1)}..{self._rec['top']}")
        return os.path.join(self.snapshots, f"{SNAP_PREFIX}{k}")

    def _recover(self) -> None:
        """Delete what a crash left: temp snapshots, uncommitted ones, merged ones."""
        what = f"tree object {self.name!r}"
        try:
            _own_directory(self.snapshots, what)
            entries = os.listdir(self.snapshots)
        except OSError as exc:
            raise fileops.store_error(f"{what}: snapshot directory {self.snapshots}",
                                      exc) from exc
        top, merged = self._rec["top"], self._rec["merged"]
        for e in entries:
            if is_stale(e, merged, top):
                _delete_snapshot(os.path.join(self.snapshots, e), what)
        fileops.fsync_dir(self.snapshots)

    def _save(self) -> None:
        fileops.atomic_write_json(self._record_path, self._rec)

    def snapshot_names(self) -> list[str]:
        try:
            return sorted(os.listdir(self.snapshots))
        except FileNotFoundError:
            return []

    def info(self) -> dict:
        with self._lock:
            return {"name": self.name, "kind": "tree", "path": self.path, "fs": "btrfs",
                    "consistency": "tree", "snapshots": self.snapshots,
                    "frozen_cycle": self._rec["top"],
                    "role": "demoted" if self._rec.get("demoted") else "primary",
                    "demoted": self._rec.get("demoted"),
                    "promoted_from": self._rec.get("promoted_from"),
                    "discard_on": self._rec.get("discard_on")}

    # -- roles (docs/trees.md, "Failback") ---------------------------------------------------
    @property
    def demoted(self) -> dict | None:
        """{"by", "message", "time"} once a target said it promoted this tree, else None."""
        with self._lock:
            d = self._rec.get("demoted")
            return dict(d) if d else None

    @property
    def promoted_from(self) -> dict | None:
        with self._lock:
            p = self._rec.get("promoted_from")
            return dict(p) if p else None

    @property
    def discard_on(self) -> str | None:
        with self._lock:
            return self._rec.get("discard_on")

    def mark_demoted(self, by: str, message: str) -> bool:
        """Record that target ``by`` promoted this tree; False if it was demoted already."""
        with self._lock:
            if self._rec.get("demoted"):
                return False
            self._rec["demoted"] = {"by": str(by)[:4096], "message": str(message)[:4096],
                                    "time": time.time()}
            self._save()
            return True

    def clear_demoted(self) -> None:
        """``mirror reinstate``: primary again (the demotion is in the daemon's log)."""
        with self._lock:
            if self._rec.pop("demoted", None) is not None:
                self._save()

    def set_discard_on(self, node: str | None) -> None:
        """A split brain's loser, as the user named it (``mirror resolve``)."""
        with self._lock:
            self._rec["discard_on"] = node
            self._save()

    @property
    def frozen_cycle(self) -> int:
        return self._rec["top"]

    def freeze_time(self, k: int) -> float:
        with self._lock:
            return float(self._rec["freeze_times"].get(str(k), 0.0))

    def freeze(self) -> int:
        """Freeze now: a read-only snapshot of the whole subvolume; returns its cycle."""
        with self._freeze_lock:
            k = self._rec["top"] + 1
            what = f"tree object {self.name!r} ({self.path})"
            tmp = os.path.join(self.snapshots, f"{TMP_PREFIX}{k}")
            _delete_snapshot(tmp, what)
            if not os.path.isdir(self.path):
                raise NotFoundError(f"{what}: the subvolume is gone; put it back, or remove "
                                    "the object")
            now = time.time()
            try:
                btrfsioctl.snapshot(self.path, tmp, readonly=True)
            except StoreError as exc:
                raise StoreError(f"freezing {what}: {exc}") from None
            final = os.path.join(self.snapshots, f"{SNAP_PREFIX}{k}")
            _delete_snapshot(final, what)  # a snap-k of a freeze that failed to commit
            os.rename(tmp, final)
            fileops.fsync_dir(self.snapshots)
            with self._lock:
                self._rec["top"] = k
                self._rec["freeze_times"][str(k)] = now
                self._rec["freeze_times"] = {n: t for n, t in self._rec["freeze_times"].items()
                                             if int(n) > self._rec["merged"]}
                self._save()  # the commit point
            return k

    def delta(self, k: int) -> treediff.TreeDelta:
        """The delta of cycle ``k``: from snapshot k-1 (none for cycle 1) to snapshot k.
        The walk of snapshot k is kept for the delta of k+1 (a snapshot never changes)."""
        old = self.snapshot_path(k - 1) if k > 1 else None
        new = self.snapshot_path(k)
        with self._lock:
            cached = self._walk[1] if self._walk and self._walk[0] == k - 1 else None
        d = treediff.tree_delta(old, new, cached)
        with self._lock:
            self._walk = (k, d.new_walk)
        return d

    def merge_through(self, k: int) -> None:
        """Delete the snapshots <= k (the targets hold cycle k + 1 or later)."""
        if type(k) is not int or k < 0:
            raise UsageError(f"merge_through needs a cycle number >= 0, got {k!r}")
        with self._lock:
            if k >= self._rec["top"]:
                raise UsageError(f"cannot merge cycle {k} of tree object {self.name!r}: "
                                 f"cycle {self._rec['top']} is the newest freeze")
            if k <= self._rec["merged"]:
                return
            old = self._rec["merged"]
            self._rec["merged"] = k
            self._save()
        for j in range(max(1, old + 1), k + 1):
            _delete_snapshot(os.path.join(self.snapshots, f"{SNAP_PREFIX}{j}"),
                             f"tree object {self.name!r}")
        fileops.fsync_dir(self.snapshots)

    def close(self) -> None:
        pass
