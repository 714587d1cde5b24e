"""File objects: a regular file on XFS (reflink) or btrfs, mirrored like a volume.

The application keeps writing the live file where it is; the store only keeps
a record of it (``STORE/files/NAME.json``) and a hidden snapshot directory of
its own beside the file (``.cyclemirror-<node>-NAME/``, mode 0700; it must be
on the same file system, because a reflink cannot cross one).

A ``FileObject`` offers the mirror driver what a ``Volume`` does, so the
driver, the frames and the target's apply are the volumes' own:

* ``freeze()`` is freeze *k*: a ``FICLONE`` reflink of the live file to
  ``snap-k`` (under a temp name, fsynced, renamed; the record's ``top`` moving
  to *k* is the commit point).  The reflink is one instant for the file (the
  file system locks the inode: a write lands wholly before or after it), and
  copy-on-write then plays the overlay: the application's later writes go to
  new blocks, the snapshot keeps the freeze-instant bytes.
* ``frozen(k).dirty`` is what changed between freeze *k-1* and freeze *k*:
  the blocks whose extents ``snap-(k-1)`` and ``snap-k`` no longer share
  (FIEMAP, ``cowfs.changed_ranges``).  Where the file system will not map the
  file, both snapshots are hashed with the Cython block hashes and diffed.
  Cycle 1 ships everything (``dirty`` None).
* ``reader()`` reads ``snap-k``; its ``extents`` yields the file's unmapped
  and unwritten ranges as zero runs and the rest as data, read through the
  snapshot's descriptor (which stays valid even if a merge removes the file).
* ``merge_through(j)`` deletes the snapshots ``<= j``: after every target
  applied cycle *c* the driver calls ``merge_through(c - 1)``, so ``snap-c``
  stays as the reference for the next delta, and at most three snapshots
  exist at once (applied, being shipped, and one frozen meanwhile).

Crash recovery (``open``): temp snapshots and snapshots above ``top`` (a
freeze that never committed) are deleted, and so are those at or below
``merged``.  The snapshots the record still names survive a restart, so the
next cycle after a crash is a delta, never a full copy; a snapshot that is
gone makes ``frozen()`` raise NotFoundError, which the driver answers by
comparing block hashes with the target.

Sizes: the live file may grow or shrink between freezes (``qemu-img resize``,
``truncate``).  Each freeze records its snapshot's size (``sizes`` in the record,
for the cycles not yet merged), and ``frozen(k)`` has that size and a dirty set of
``k``'s blocks: within the size both snapshots have, what their maps no longer
share; on growth every block of the new tail as well (holes there travel as zero
runs, without bytes, since the target cannot be assumed to hold zeros there after
a shrink and a regrowth); on a shrink nothing past the new end.  A size must stay
a positive multiple of the block size: a freeze that finds another size fails,
naming it and the fix.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time

import numpy as np

from cyclemirror._cext import blockhash
from cyclemirror._cext.bitmap import ExtentBitmap
from cyclemirror.errors import AlreadyExistsError, NotFoundError, StoreError, UsageError
from cyclemirror.store import cowfs, fileops
from cyclemirror.store.names import validate_volume_name
from cyclemirror.store.snapnames import SNAP_PREFIX, TMP_PREFIX, is_ours, is_stale
from cyclemirror.wire.messages import MAX_VOLUME_SIZE

FILES_DIR = "files"
RECORD_FORMAT = 1
DEFAULT_BLOCK_SIZE = 4096
HASH_SPAN = 64 << 20  # bytes hashed per call in the fallback diff
PENDING_CACHE_SECONDS = 1.0
READ_AHEAD_BYTES = 256 << 20  # a delta's blocks asked for ahead of the packer, at most


def snapshot_dir_for(path: str, node_id: str, name: str) -> str:
    return os.path.join(os.path.dirname(path), f".cyclemirror-{node_id[:12]}-{name}")


def record_path(store_path: str, name: str) -> str:
    return os.path.join(store_path, FILES_DIR, validate_volume_name(name) + ".json")


def list_files(store_path: str) -> list[str]:
    d = os.path.join(store_path, FILES_DIR)
    try:
        entries = os.listdir(d)
    except FileNotFoundError:
        return []
    return sorted(e[:-5] for e in entries if e.endswith(".json") and not e.startswith("."))


def add_file(store_path: str, node_id: str, name: str, path: str,
             block_size: int = DEFAULT_BLOCK_SIZE) -> dict:
    """Record file ``path`` as object ``name``: checks the file system can freeze it (a
    real reflink into the snapshot directory), and its size."""
    validate_volume_name(name)
    if not os.path.isabs(path):
        raise UsageError(f"file object {name!r}: the path must be absolute, got {path!r}")
    if os.path.exists(record_path(store_path, name)):
        raise AlreadyExistsError(f"file object {name!r} already exists; remove it first "
                                 f"('cyclemirror file rm {name}')")
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        raise NotFoundError(f"file object {name!r}: {path} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"file object {name!r}: {path} is not a regular file (a symlink, "
                         "a directory or a device); name the file itself")
    if block_size < DEFAULT_BLOCK_SIZE or block_size > 1 << 20 or block_size & (block_size - 1):
        raise UsageError(f"file object {name!r}: block size {block_size} must be a power of "
                         "two from 4096 to 1048576")
    fs = cowfs.check_cow(path, f"file {path}")
    if st.st_size == 0 or st.st_size % block_size:
        raise UsageError(
            f"file object {name!r}: {path} is {st.st_size} bytes, not a positive multiple of "
            f"the block size {block_size}; a file object's size must be one, so extend it first "
            f"(truncate -s SIZE {path}) or give a smaller --block-size")
    snaps = snapshot_dir_for(path, node_id, name)
    _own_directory(snaps, f"file object {name!r}")
    probe = os.path.join(snaps, TMP_PREFIX + "probe")
    try:
        _clone_to(path, probe, f"file {path}")
    finally:
        _unlink_quiet(probe)
    rec = {"format": RECORD_FORMAT, "name": name, "path": path, "block_size": block_size,
           "size": st.st_size, "fs": fs, "snapshots": snaps, "top": 0, "merged": -1,
           "freeze_times": {}, "sizes": {}, "created": time.time()}
    os.makedirs(os.path.join(store_path, FILES_DIR), exist_ok=True)
    fileops.atomic_write_json(record_path(store_path, name), rec)
    return rec


def remove_file(store_path: str, name: str) -> None:
    """Forget object ``name`` and delete its snapshots (the live file is not touched)."""
    rec = _read_record(record_path(store_path, name), name)
    snaps = rec["snapshots"]
    os.unlink(record_path(store_path, name))
    fileops.fsync_dir(os.path.join(store_path, FILES_DIR))
    _remove_snapshot_dir(snaps)


def _remove_snapshot_dir(snaps: str) -> None:
    try:
        entries = os.listdir(snaps)
    except FileNotFoundError:
        return
    for e in entries:
        if is_ours(e):
            _unlink_quiet(os.path.join(snaps, e))
    try:
        os.rmdir(snaps)
    except OSError:
        pass  # something not ours in it: left alone


def _read_record(path: str, name: str) -> dict:
    try:
        rec = fileops.read_json(path, f"file object {name!r}")
    except FileNotFoundError:
        raise NotFoundError(f"no file object {name!r}") from None
    ok = (rec.get("format") == RECORD_FORMAT and rec.get("name") == name
          and isinstance(rec.get("path"), str) and os.path.isabs(rec["path"])
          and isinstance(rec.get("snapshots"), str) and os.path.isabs(rec["snapshots"])
          and all(type(rec.get(k)) is int for k in ("block_size", "size", "top", "merged"))
          and isinstance(rec.get("freeze_times"), dict)
          and isinstance(rec.get("sizes", {}), dict))
    if not ok or rec["block_size"] <= 0 or not all(
            _good_size(v, rec["block_size"]) for v in [rec["size"], *rec.get("sizes", {}).values()]
    ) or not (-1 <= rec["merged"] < max(rec["top"], 1)):
        raise StoreError(f"file object {name!r}: its record {path} is damaged; remove it "
                         f"('cyclemirror file rm {name}') and add the file again")
    return rec


def _good_size(size, block_size: int) -> bool:
    return type(size) is int and 0 < size <= MAX_VOLUME_SIZE and size % block_size == 0


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _clone_to(src: str, dst: str, what: str) -> int:
    """Reflink ``src`` to the new file ``dst`` (fsynced); return the size it had.  On any
    failure ``dst`` is gone again."""
    sfd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        _unlink_quiet(dst)
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            cowfs.clone_file(sfd, dfd, what)
            os.fsync(dfd)
            return os.fstat(dfd).st_size
        except BaseException:
            _unlink_quiet(dst)
            raise
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _own_directory(path: str, what: str) -> None:
    """Make ``path`` (mode 0700) if missing; refuse one that is not a directory of ours
    (a symlink planted there would point our unlinks elsewhere)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise StoreError(f"{what}: {path} is not a directory owned by this daemon's user "
                         "(a symlink or someone else's?); move it away and try again")


class FileObject:
    """One file object of a store, with the parts of the ``Volume`` interface a mirror
    driver uses.  Thread-safe: ``_lock`` guards the record and the dirty-set cache."""

    is_file = True
    resizable = True  # its size may change from cycle to cycle (sender/driver.py)

    def __init__(self, store_path: str, name: str):
        self.name = validate_volume_name(name)
        self._record_path = record_path(store_path, name)
        rec = _read_record(self._record_path, name)
        self.path: str = rec["path"]
        self.snapshots: str = rec["snapshots"]
        self.block_size: int = rec["block_size"]
        self.size: int = rec["size"]
        self.fs: str = rec.get("fs", "?")
        self.nblocks = self.size // self.block_size
        if "sizes" not in rec:  # a record from before sizes were recorded: one size for all
            rec["sizes"] = {str(k): rec["size"] for k in range(max(1, rec["merged"] + 1),
                                                                rec["top"] + 1)}
        self._rec = rec
        self._lock = threading.Lock()
        self._freeze_lock = threading.Lock()
        self._dirty: dict[int, ExtentBitmap | None] = {}
        # Extent maps of snapshots (immutable files, so a map read once stays true): the
        # newest one serves the next freeze's comparison and the readers of its cycle.
        self._maps: dict[int, object] = {}
        self._maps_lock = threading.Lock()
        self._pending: tuple[float, int] | None = None
        self.last_diff_method = ""  # "fiemap" or "hash": how the newest dirty set was found
        self._recover()

    # -- the record and the snapshot directory --------------------------------------------
    def _snap(self, k: int) -> str:
        return os.path.join(self.snapshots, f"{SNAP_PREFIX}{k}")

    def _recover(self) -> None:
        """Delete what a crash left: temp snapshots, uncommitted ones, merged ones."""
        try:
            _own_directory(self.snapshots, f"file object {self.name!r}")
            entries = os.listdir(self.snapshots)
        except OSError as exc:
            raise fileops.store_error(f"file object {self.name!r}: snapshot directory "
                                      f"{self.snapshots}", exc) from exc
        top, merged = self._rec["top"], self._rec["merged"]
        for e in entries:
            if is_stale(e, merged, top):
                _unlink_quiet(os.path.join(self.snapshots, e))
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
            return {"name": self.name, "kind": "file", "path": self.path, "size": self.size,
                    "block_size": self.block_size, "fs": self.fs,
                    "consistency": "per-file", "snapshots": self.snapshots,
                    "frozen_cycle": self._rec["top"]}

    # -- the Volume interface the driver uses ---------------------------------------------
    @property
    def open_overlay(self) -> int:
        return self._rec["top"]

    def freeze(self, sync: bool = True) -> FileCycle:
        """Freeze now: a reflink snapshot of the live file (``sync`` is accepted for the
        Volume interface; the snapshot is durable before this returns)."""
        with self._freeze_lock:
            k = self._rec["top"] + 1
            tmp = os.path.join(self.snapshots, f"{TMP_PREFIX}{k}")
            now = time.time()
            try:
                size = _clone_to(self.path, tmp, f"file object {self.name!r} ({self.path})")
            except FileNotFoundError:
                raise NotFoundError(f"file object {self.name!r}: {self.path} is gone; put "
                                    "it back, or remove the object") from None
            except OSError as exc:
                _unlink_quiet(tmp)
                raise fileops.store_error(f"freezing file object {self.name!r}", exc) from exc
            if not _good_size(size, self.block_size):
                _unlink_quiet(tmp)
                raise StoreError(
                    f"file object {self.name!r}: {self.path} is now {size} bytes, it was "
                    f"{self.size} at the last freeze; a file object's size must be a positive "
                    f"multiple of its block size {self.block_size} (at most 2**56): give it "
                    f"such a size (truncate -s or qemu-img resize), then 'mirror resume'")
            with self._maps_lock:
                self._maps.pop(k, None)  # a snap-k of a freeze that failed to commit
            os.rename(tmp, self._snap(k))
            fileops.fsync_dir(self.snapshots)
            with self._lock:
                self._rec["top"] = k
                self._rec["freeze_times"][str(k)] = now
                self._rec.setdefault("sizes", {})[str(k)] = size
                if size != self._rec["size"]:
                    self._rec["resized"] = True  # for good: targets may hold another size
                self._rec["size"] = size
                # Freeze times and sizes of merged cycles are of no more use.
                for key in ("freeze_times", "sizes"):
                    self._rec[key] = {n: t for n, t in self._rec[key].items()
                                      if int(n) > self._rec["merged"]}
                self._save()  # the commit point
                self.size, self.nblocks = size, size // self.block_size
                self._pending = None
            return self.frozen(k)

    def size_of(self, k: int) -> int:
        """The size of snapshot ``k`` as its freeze recorded it (records written before
        sizes were recorded hold one size for every cycle)."""
        return int(self._rec.get("sizes", {}).get(str(k), self._rec["size"]))

    @property
    def size_changed(self) -> bool:
        """The file changed size at some freeze: a target may hold another size than
        the newest, so a mirror's connection says the sizes may differ."""
        return bool(self._rec.get("resized", False))

    def _valid(self, k: int) -> bool:
        return max(1, self._rec["merged"] + 2) <= k <= self._rec["top"]

    def frozen(self, k: int) -> FileCycle:
        if type(k) is not int:
            raise UsageError(f"cycle number must be an integer, got {k!r}")
        with self._lock:
            if not self._valid(k):
                raise NotFoundError(
                    f"file object {self.name!r} has no frozen cycle {k}: frozen cycles are "
                    f"{max(1, self._rec['merged'] + 2)}..{self._rec['top']}")
            freeze_time = float(self._rec["freeze_times"].get(str(k), 0.0))
            size = self.size_of(k)
            if k not in self._dirty:
                self._dirty[k] = None if k == 1 else self._changed(k)
            dirty = self._dirty[k]
        return FileCycle(self, k, freeze_time, None if dirty is None else dirty.copy(), size)

    def frozen_reader(self, k: int) -> FileReader:
        """A reader of snapshot ``k`` whatever its dirty set (a verify's reference image);
        NotFoundError on entry once it is merged."""
        if type(k) is not int or not 1 <= k <= self._rec["top"]:
            raise NotFoundError(f"file object {self.name!r} has no snapshot {k!r}")
        return FileCycle(self, k, 0.0, None, self.size_of(k)).reader()

    def snapshot_of(self, k: int) -> tuple[str, float] | None:
        """(path, freeze time) of snapshot ``k`` if it is still kept (the oldest one kept
        is the base of the next delta), else None."""
        with self._lock:
            if type(k) is not int or not max(1, self._rec["merged"] + 1) <= k <= self._rec["top"]:
                return None
            ft = self._rec["freeze_times"].get(str(k))
        path = self._snap(k)
        return (path, float(ft)) if ft is not None and os.path.exists(path) else None

    def frozen_cycles(self) -> list[int]:
        with self._lock:
            return list(range(max(1, self._rec["merged"] + 2), self._rec["top"] + 1))

    def merge_through(self, k: int, timeout: float | None = None) -> None:
        """Delete the snapshots <= k (readers keep reading theirs through their fds)."""
        if type(k) is not int or k < 0:
            raise UsageError(f"merge_through needs a cycle number >= 0, got {k!r}")
        with self._lock:
            if k >= self._rec["top"]:
                raise UsageError(f"cannot merge cycle {k} of file object {self.name!r}: "
                                 f"cycle {self._rec['top']} is the newest freeze")
            if k <= self._rec["merged"]:
                return
            old = self._rec["merged"]
            self._rec["merged"] = k
            self._save()
            for j in [j for j in self._dirty if j <= k + 1]:
                del self._dirty[j]
        for j in range(max(1, old + 1), k + 1):
            _unlink_quiet(self._snap(j))
        fileops.fsync_dir(self.snapshots)

    def pending_blocks(self, exact: bool = False) -> int:
        """Blocks written since the newest freeze.

        By default as far as the mapping tells without forcing writeback, cached for a
        second (for status and the RPO estimate): an overwrite of a block still shared
        with the snapshot shows only once written back.  ``exact`` (a sync deciding
        whether a freeze is needed) writes the live file back first and is not cached."""
        with self._lock:
            top = self._rec["top"]
            cached = self._pending
        now = time.monotonic()
        if not exact and cached is not None and now - cached[0] < PENDING_CACHE_SECONDS:
            return cached[1]
        if top == 0:
            count = self.nblocks
        else:
            try:
                count = self._count_changed(self.path, self._snap(top), sync=exact)
            except (OSError, StoreError):
                count = self.nblocks
        with self._lock:
            self._pending = (now, count)
        return count

    def _count_changed(self, live: str, snap: str, sync: bool = False) -> int:
        fds = [os.open(p, os.O_RDONLY) for p in (snap, live)]
        try:
            old, new = (os.fstat(fd).st_size for fd in fds)
            bs = self.block_size
            common = min(old, new) // bs * bs
            bm = self._bitmap(cowfs.changed_ranges(cowfs.extent_map(fds[0]),
                                                   cowfs.extent_map(fds[1], sync=sync),
                                                   common),
                              max(common, new) // bs)
            return bm.count() + max(0, -(-new // bs) - common // bs)
        finally:
            for fd in fds:
                os.close(fd)

    # -- dirty sets -----------------------------------------------------------------------
    def _bitmap(self, ranges, nblocks: int | None = None) -> ExtentBitmap:
        bm = ExtentBitmap(self.nblocks if nblocks is None else nblocks)
        bs = self.block_size
        for a, b in ranges:
            first = a // bs
            bm.set_range(first, -(-b // bs) - first)
        return bm

    def _changed(self, k: int) -> ExtentBitmap:
        """Blocks that differ between snap-(k-1) and snap-k (called with _lock held)."""
        return self.changed_between(k - 1, k)

    def changed_between(self, j: int, k: int) -> ExtentBitmap:
        """Blocks of snapshot ``k`` that differ from snapshot ``j`` (a failback's
        divergence: what this file was written after cycle ``j``).  Where ``k`` is the
        larger, its tail past ``j``'s end counts as changed whole (its holes then
        travel as zero runs)."""
        bs = self.block_size
        size_j, size_k = self.size_of(j), self.size_of(k)
        common = min(size_j, size_k)
        out = self._changed_within(j, k, common, size_k // bs)
        if size_k > common:
            out.set_range(common // bs, (size_k - common) // bs)
        return out

    def _changed_within(self, j: int, k: int, common: int, nblocks: int) -> ExtentBitmap:
        """Blocks below ``common`` bytes that differ between snapshots ``j`` and ``k``, in
        a bitmap of ``nblocks``."""
        try:
            fds = [os.open(self._snap(i), os.O_RDONLY) for i in (j, k)]
        except FileNotFoundError:
            raise NotFoundError(f"file object {self.name!r}: snapshot of cycle {j} or {k} "
                                f"is gone from {self.snapshots}; the mirror compares block "
                                "hashes with its targets instead") from None
        try:
            try:
                maps = [self._map_of(i, fd) for i, fd in zip((j, k), fds, strict=True)]
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                    raise fileops.store_error(f"mapping file object {self.name!r}",
                                              exc) from exc
                self.last_diff_method = "hash"
                return hash_diff(fds[0], fds[1], common, self.block_size, nbits=nblocks)
            changed, unproven = cowfs.compare_maps(maps[0], maps[1], common)
            out = self._bitmap(changed, nblocks)
            self.last_diff_method = "fiemap"
            if unproven:  # compressed extents: the map cannot tell, the bytes can
                self.last_diff_method = "fiemap+hash"
                spans = self._bitmap(unproven, nblocks)
                spans.difference_update(out)
                out.union_update(hash_diff(fds[0], fds[1], common, self.block_size,
                                           spans.iter_runs(), nbits=nblocks))
            return out
        finally:
            for fd in fds:
                os.close(fd)

    def _map_of(self, k: int, fd: int):
        """The extent map of snapshot ``k`` (open as ``fd``), read once and kept for the
        two newest snapshots."""
        with self._maps_lock:
            cached = self._maps.get(k)
        if cached is not None:
            return cached
        m = cowfs.extent_map(fd)
        with self._maps_lock:
            self._maps[k] = m
            for j in sorted(self._maps)[:-2]:
                del self._maps[j]
        return m

    def close(self) -> None:
        pass


def resized_bitmap(bm: ExtentBitmap, nbits: int) -> ExtentBitmap:
    """``bm`` as a bitmap of ``nbits`` (bits past the end dropped, new ones clear; ``bm``
    itself when it has that size already)."""
    if bm.nbits == nbits:
        return bm
    out = ExtentBitmap(nbits)
    for start, count in bm.iter_runs(0, min(bm.nbits, nbits)):
        out.set_range(start, count)
    return out


def hash_diff(old_fd: int, new_fd: int, size: int, block_size: int,
              block_runs=None, nbits: int | None = None) -> ExtentBitmap:
    """Blocks whose xxh3 hashes differ between two files of ``size`` bytes, over
    ``block_runs`` ((first block, count) pairs; None: all of them), in a bitmap of
    ``nbits`` (default: the blocks of ``size``; more where the file grew since).  The
    fallback where the extent map cannot be read, or cannot vouch for what it maps."""
    nblocks = size // block_size
    nbits = nblocks if nbits is None else nbits
    out = ExtentBitmap(nbits)
    step = max(1, HASH_SPAN // block_size)
    for first, count in [(0, nblocks)] if block_runs is None else block_runs:
        for start in range(first, first + count, step):
            n = min(step, first + count - start) * block_size
            a, _ = blockhash.hash_file(old_fd, start * block_size, n, block_size)
            b, _ = blockhash.hash_file(new_fd, start * block_size, n, block_size)
            out.union_update(blockhash.diff_hashes(np.asarray(a, dtype=np.uint64),
                                                   np.asarray(b, dtype=np.uint64), nbits,
                                                   start))
    return out


class FileCycle:
    """Cycle ``number`` of a file object: its freeze time, its size, the blocks it
    changed since the previous freeze (None for cycle 1; a bitmap of this cycle's
    blocks) and a reader of its snapshot."""

    synced = True
    zeroed = None

    def __init__(self, obj: FileObject, number: int, freeze_time: float,
                 dirty: ExtentBitmap | None, size: int):
        self.volume = obj
        self.number = number
        self.freeze_time = freeze_time
        self.dirty = dirty
        self.size = size
        self.nblocks = size // obj.block_size

    def sync(self) -> None:
        """The snapshot was fsynced at the freeze."""

    def reader(self) -> FileReader:
        return FileReader(self)

    def __repr__(self) -> str:
        return f"FileCycle({self.volume.name!r}, number={self.number})"


class FileReader:
    """A context manager holding cycle ``number``'s snapshot open (FrozenReader's face)."""

    def __init__(self, cycle: FileCycle):
        self.cycle = cycle
        self._obj = cycle.volume
        self.fd = -1
        self.size = cycle.size
        self.nblocks = cycle.nblocks
        self._allocated: ExtentBitmap | None = None

    def __enter__(self) -> FileReader:
        obj = self._obj
        try:
            self.fd = os.open(obj._snap(self.cycle.number), os.O_RDONLY)
        except FileNotFoundError:
            raise NotFoundError(f"file object {obj.name!r}: the snapshot of cycle "
                                f"{self.cycle.number} is gone (merged)") from None
        try:
            try:
                ranges = cowfs.data_ranges(obj._map_of(self.cycle.number, self.fd), self.size)
            except OSError:
                ranges = list(fileops.data_runs(self.fd, 0, self.size))
            self._allocated = obj._bitmap(ranges, self.nblocks)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _check_open(self) -> None:
        if self.fd < 0:
            raise UsageError(f"reader of cycle {self.cycle.number} of file object "
                             f"{self._obj.name!r} is not open; use 'with cycle.reader() as r:'")

    def read(self, offset: int, length: int) -> bytes:
        self._check_open()
        from cyclemirror.extents import check_range

        check_range(offset, length, self.size, f"read of file object {self._obj.name!r} "
                    f"(cycle {self.cycle.number})")
        return fileops.pread_exact(self.fd, length, offset)

    def extents(self, blocks: ExtentBitmap | None, max_run_blocks: int):
        """(offset, length, "data"|"zero", fd) ascending over ``blocks`` (None = all)."""
        self._check_open()
        obj = self._obj
        if type(max_run_blocks) is not int or max_run_blocks < 1:
            raise UsageError(f"max_run_blocks must be a positive integer, got {max_run_blocks!r}")
        full = blocks is None
        if full:
            blocks = ExtentBitmap(self.nblocks)
            blocks.set_range(0, self.nblocks)
        elif not isinstance(blocks, ExtentBitmap) or blocks.nbits != self.nblocks:
            from cyclemirror.errors import BitmapRangeError

            raise BitmapRangeError(f"block bitmap does not fit cycle {self.cycle.number} of "
                                   f"file object {obj.name!r} ({self.nblocks} blocks)")
        data = blocks.copy()
        data.intersection_update(self._allocated)
        zero = blocks.copy()
        zero.difference_update(data)
        if not full:
            self._read_ahead(data)
        return self._merge(data.iter_runs(max_run=max_run_blocks),
                           zero.iter_runs(max_run=max_run_blocks))

    def _read_ahead(self, data: ExtentBitmap) -> None:
        """Ask for a delta's scattered blocks all at once (the snapshot is a new inode: none
        of them is cached), so the reads the packer then makes one by one find them."""
        bs, budget = self._obj.block_size, READ_AHEAD_BYTES
        for start, count in data.iter_runs():
            if budget <= 0:
                break
            os.posix_fadvise(self.fd, start * bs, count * bs, os.POSIX_FADV_WILLNEED)
            budget -= count * bs

    def _merge(self, data_runs, zero_runs):
        bs = self._obj.block_size
        d, z = next(data_runs, None), next(zero_runs, None)
        while d is not None or z is not None:
            if z is None or (d is not None and d[0] < z[0]):
                self._check_open()
                yield d[0] * bs, d[1] * bs, "data", self.fd
                d = next(data_runs, None)
            else:
                yield z[0] * bs, z[1] * bs, "zero", self.fd
                z = next(zero_runs, None)
