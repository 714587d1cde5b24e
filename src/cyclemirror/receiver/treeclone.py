"""A writable copy of a tree mirror's last applied cycle, while cycles keep arriving.

``clone_tree(store_root, source, mirror, dest)`` is ``mirror clone SOURCE/TREE
DEST`` on a target (docs/trees.md, "Clone and promote on the target"):

* the mirror ``STORE/mirrors/<node>/trees/NAME`` is found by the source's node
  id or the node name it gave at its latest connect (``find_tree_mirror``);
* ``DEST`` must be an absolute, normalised path whose parent directory exists,
  that does not exist itself and is not inside the store (``check_dest``);
* the copy is built beside ``DEST`` under a hidden name and renamed into place
  with ``RENAME_NOREPLACE`` once complete, so ``DEST`` is either absent or a
  whole copy: a writable btrfs snapshot of the mirror when the mirror is a
  subvolume and ``DEST`` on the same btrfs (constant time), else a subvolume
  (btrfs, as root) or directory filled by ``treeops.copy_tree`` (reflink
  clones where the file system has them, else copies);
* the mirror's switch to a new cycle is one ``RENAME_EXCHANGE`` preceded by a
  ``pending`` record and followed by the applied record (``receiver.treeops``),
  so the copy is of one cycle exactly when the record reads the same cycle
  with nothing pending both before and after it was taken; otherwise the copy
  is deleted and taken again (a few times, then an error says what to do).

Nothing is held: the mirror's cycles go on applying throughout, and the clone
shares nothing writable with it.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import time

from cyclemirror.errors import AlreadyExistsError, NotFoundError, StoreError, UsageError
from cyclemirror.receiver import treeops
from cyclemirror.receiver.treesession import source_name, trees_root
from cyclemirror.store import btrfsioctl, cowfs
from cyclemirror.store.fileops import read_json
from cyclemirror.store.names import validate_volume_name

log = logging.getLogger(__name__)
WORK_PREFIX = ".cyclemirror-clone-"
ATTEMPTS = 20          # copies taken before giving up when cycles keep moving under us
PENDING_WAIT = 0.05    # seconds between looks while a switch is in progress


class TreeMirrorRef:
    """Where one tree mirror of this store is."""

    def __init__(self, store_root: str, node: str, name: str):
        self.node = node
        self.name = name
        self.root = trees_root(store_root, node)
        self.path = os.path.join(self.root, name)
        self.work = os.path.join(self.root, f".cyclemirror-tree-{name}")
        self.state_path = os.path.join(self.work, treeops.STATE_FILE)
        self.source_name = source_name(store_root, node)

    def label(self) -> str:
        return f"{self.source_name or self.node}/{self.name}"


def find_tree_mirror(store_root: str, source: str, mirror: str) -> TreeMirrorRef | None:
    """The tree mirror ``SOURCE/MIRROR`` (SOURCE: node id or node name), or None."""
    if not source or not mirror or "/" in source or "/" in mirror \
            or "." in (source[:1], mirror[:1]):
        return None
    base = os.path.join(store_root, "mirrors")
    nodes = sorted(os.listdir(base)) if os.path.isdir(base) else []
    if source in nodes:
        node = source
    else:
        named = [n for n in nodes if source_name(store_root, n) == source]
        if len(named) > 1:
            raise UsageError(f"source name {source!r} belongs to several source nodes "
                             f"({', '.join(named)}); name the source by its node id")
        if not named:
            return None
        node = named[0]
    ref = TreeMirrorRef(store_root, node, mirror)
    return ref if os.path.isdir(ref.work) else None


def known_tree_mirrors(store_root: str) -> list[str]:
    base = os.path.join(store_root, "mirrors")
    out = []
    for node in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        root = trees_root(store_root, node)
        for entry in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            if entry.startswith(".cyclemirror-tree-"):
                out.append(f"{source_name(store_root, node) or node}/"
                           f"{entry[len('.cyclemirror-tree-'):]}")
    return out


def check_dest(store_root: str, dest: object, what: str) -> str:
    """``dest`` as a path a tree may be made at, or a UsageError/AlreadyExistsError."""
    if not isinstance(dest, str) or not dest or "\0" in dest:
        raise UsageError(f"{what}: the destination must be a path")
    if not os.path.isabs(dest) or os.path.normpath(dest) != dest or dest == "/":
        raise UsageError(f"{what}: the destination {dest!r} must be an absolute path without "
                         "'.', '..' or a trailing slash, e.g. /srv/app-test")
    parent, leaf = os.path.split(dest)
    if leaf.startswith(".cyclemirror") or len(os.fsencode(leaf)) > 255:
        raise UsageError(f"{what}: {leaf!r} is not a usable name for the destination")
    if not os.path.isdir(parent):
        raise UsageError(f"{what}: the destination's parent directory {parent} does not exist "
                         "(or is not a directory); create it first")
    real_parent = os.path.realpath(parent)
    real = os.path.join(real_parent, leaf)
    store = os.path.realpath(store_root)
    if real == store or real.startswith(store + os.sep) or store.startswith(real + os.sep):
        raise UsageError(f"{what}: the destination {dest} is inside this daemon's store "
                         f"{store} (or holds it); pick a path outside it")
    if os.path.lexists(real):
        raise AlreadyExistsError(f"{what}: {dest} already exists; nothing was changed. Pick "
                                 "another path or move it away")
    return real


def read_state(ref: TreeMirrorRef) -> dict:
    try:
        st = read_json(ref.state_path, f"tree mirror {ref.label()} state")
    except FileNotFoundError:
        raise NotFoundError(f"tree mirror {ref.label()}: it has no record (removed "
                            "meanwhile?)") from None
    cycle, ft = st.get("applied_cycle"), st.get("freeze_time")
    if type(cycle) is not int or cycle < 0 or not isinstance(ft, int | float):
        raise StoreError(f"tree mirror {ref.label()}: its state {ref.state_path} is damaged")
    return st


def is_subvolume(path: str) -> bool:
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_ino != btrfsioctl.BTRFS_SUBVOL_INO:
        return False
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        return btrfsioctl.subvolume_id(fd) != 0
    finally:
        os.close(fd)


def remove_tree(path: str) -> None:
    """Delete a tree we made (a subvolume by btrfs, a directory by unlinks)."""
    if not os.path.lexists(path):
        return
    if is_subvolume(path):
        btrfsioctl.delete_subvolume(path)
        return
    parent, leaf = os.path.split(path)
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        treeops._rm_at(fd, leaf)
    finally:
        os.close(fd)


def copy_once(src: str, work: str, want_subvolume: bool) -> str:
    """Copy the tree at ``src`` to the new ``work``; say how ("snapshot" or "copy")."""
    if want_subvolume and is_subvolume(src):
        try:
            btrfsioctl.snapshot(src, work, readonly=False)
            return "snapshot"
        except StoreError as exc:  # another file system (EXDEV): copy file by file
            log.info("tree clone: snapshot of %s as %s failed (%s); copying instead", src,
                     work, exc)
            remove_tree(work)
    sfd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if want_subvolume:
            btrfsioctl.create_subvolume(work)
        else:
            os.mkdir(work, 0o700)
        dfd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            treeops.copy_tree(sfd, dfd)
            treeops.syncfs(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    return "copy"


def consistent_copy(ref: TreeMirrorRef, work: str, on_copied=None) -> tuple[dict, str]:
    """Copy the mirror's tree to ``work`` as of one applied cycle; (its record, how).

    ``on_copied(attempt)``, for tests, runs between the copy and the second look at
    the record."""
    parent = os.path.dirname(work)
    want_subvolume = os.geteuid() == 0 and cowfs.filesystem_of(parent) == "btrfs"
    moved = 0
    for attempt in range(ATTEMPTS * 20):
        before = read_state(ref)
        if before.get("pending") is not None:  # a switch is under way: look again
            time.sleep(PENDING_WAIT)
            continue
        if before["applied_cycle"] == 0 or not os.path.isdir(ref.path):
            raise NotFoundError(f"tree mirror {ref.label()} holds no applied cycle yet; "
                                "wait for its first cycle")
        try:
            how = copy_once(ref.path, work, want_subvolume)
            copy_error = None
        except OSError as exc:  # the tree moved under the walk (a cycle switched in)
            copy_error = exc
            how = "copy"
        if on_copied is not None:
            on_copied(attempt)
        after = read_state(ref)
        if copy_error is None and after.get("pending") is None and \
                (after["applied_cycle"], after["freeze_time"]) == \
                (before["applied_cycle"], before["freeze_time"]):
            return after, how
        remove_tree(work)
        if copy_error is not None and after.get("pending") is None and \
                after["applied_cycle"] == before["applied_cycle"]:
            raise copy_error  # not a cycle moving: a real failure
        moved += 1
        log.info("tree clone of %s: cycle %d moved on while copying; copying again",
                 ref.label(), before["applied_cycle"])
        if moved >= ATTEMPTS:
            break
    raise StoreError(f"tree mirror {ref.label()}: cycles arrived faster than a copy could be "
                     f"taken ({moved} tries); run 'mirror sync' less often or break the "
                     "mirror on the source for a moment, then clone again")


def clone_tree(store_root: str, source: str, mirror: str, dest: object,
               on_copied=None) -> dict:
    t0 = time.monotonic()
    what = f"clone of tree mirror {source}/{mirror}"
    validate_volume_name(mirror)
    ref = find_tree_mirror(store_root, source, mirror)
    if ref is None:
        known = known_tree_mirrors(store_root)
        raise NotFoundError(f"no tree mirror {source}/{mirror} in this store (tree mirrors: "
                            f"{', '.join(known) or 'none'})")
    real = check_dest(store_root, dest, what)
    parent, leaf = os.path.split(real)
    work = os.path.join(parent, f"{WORK_PREFIX}{leaf}-{secrets.token_hex(4)}")
    try:
        st, how = consistent_copy(ref, work, on_copied)
        pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                treeops.renameat2(pfd, os.path.basename(work), pfd, leaf,
                                  treeops.RENAME_NOREPLACE)
            except FileExistsError:
                raise AlreadyExistsError(f"{what}: {dest} appeared meanwhile; nothing was "
                                         "changed") from None
            os.fsync(pfd)
        finally:
            os.close(pfd)
    except BaseException:
        try:
            remove_tree(work)
        except Exception:  # noqa: BLE001 - the first error is the one to report
            log.exception("tree clone: removing %s failed", work)
        raise
    seconds = time.monotonic() - t0
    log.info("cloned tree mirror %s at cycle %d to %s by %s (%.3fs)", ref.label(),
             st["applied_cycle"], real, how, seconds)
    return {"kind": "tree", "source_node": ref.node, "source_name": ref.source_name,
            "mirror": ref.name, "cycle": st["applied_cycle"],
            "freeze_time": st["freeze_time"], "path": real, "how": how,
            "subvolume": is_subvolume(real), "seconds": seconds}

