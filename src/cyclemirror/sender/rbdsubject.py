"""A MirrorDriver subject whose data is an RBD volume: failback from an RBD target.

A mirror image promoted on an RBD target (``receiver.rbdvolumes``) is an RBD
image ``NAME`` of the daemon's pool that still has the snapshot of the cycle
it branched from, ``cyclemirror-<k>``.  ``RbdVolumeSubject`` lets the cycle
driver (``sender.driver``) mirror such a volume exactly as it mirrors a store
volume (``sender.group.SingleVolume``), with RBD's copy-on-write in the
overlay's role:

* **freeze** *n*: an RBD snapshot ``cyclemirror-out-<n>-<freeze time in
  microseconds>`` of the image (the name carries the freeze time, so it
  survives a restart without a file of its own).  librbd quiesces the image
  for it (``rbd_snap_create`` since Ceph 15 notifies every client that has
  the image open, such as this daemon's NBD export of it, and each holds its
  new writes and waits for those in flight), so every write is wholly before
  or wholly after it.  Writes after it go to the image head.
* **dirty set** of cycle *n* (what the driver folds into each target's owed
  set): the blocks that differ between the snapshot of cycle *n-1* (the
  branch snapshot for the first freeze) and that of *n*, from
  ``Image.diff`` (``rbd_diff_iterate2``: the OSDs answer from their snapshot
  records, nothing is read).  Ranges are rounded out to whole blocks.
* **reads** come from the frozen snapshot (``FrozenReader`` interface):
  blocks that read as zeroes travel as zero runs, the others are put into a
  ``memfd`` at their own offsets for ``FramePacker`` (which reads files by
  descriptor), and punched out of it again once packed, so it holds a bounded
  window of the stream, never the image.  Up to 16 reads are in flight at
  once (a read waits for an OSD round trip; scattered blocks read one after
  the other would be bound by that latency).
* **merge** through *j*: the freeze snapshots of cycles <= *j* go (every
  one, also those a crash left behind).  The branch snapshot is the
  promotion's and stays; ``volume rm`` removes the image with all of them.

``dirty_since(k)`` (the blocks written since the branch, for the lineage
message and status) is the head against the branch snapshot.  A failback to
the old primary is seeded by ``sender.failback.seed_rbd``: the target holds
cycle *k*, and the first freeze's dirty set is exactly what the volume
wrote since the promotion.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import re
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cyclemirror._cext.bitmap import ExtentBitmap
from cyclemirror.errors import BitmapRangeError, NotFoundError, StoreError, UsageError
from cyclemirror.sender import shipping
from cyclemirror.sender.group import SingleVolume
from cyclemirror.store.fileops import punch_hole, pwrite_all

SNAP_NAMESPACE_TRASH = 2  # librbd's namespace of snapshots being removed

log = logging.getLogger(__name__)

FREEZE_PREFIX = "cyclemirror-out-"
_FREEZE = re.compile(r"cyclemirror-out-([0-9]{1,18})-([0-9]{1,20})")
# Data handed to the packer stays in the memfd until this much more was handed
# after it: the packer has at most 2 * PACK_THREADS batches in flight plus the
# one it is gathering (shipping.cycle_frames), each at most BATCH_BYTES.
SPOOL_WINDOW = (2 * shipping.PACK_THREADS + 3) * shipping.BATCH_BYTES
# Reads of the frozen snapshot in flight at once, and how far they run ahead.
READ_THREADS = 16
READ_AHEAD_COUNT = 256
READ_AHEAD_BYTES = 32 << 20


def freeze_snap_name(cycle: int, freeze_time: float) -> str:
    return f"{FREEZE_PREFIX}{cycle}-{int(freeze_time * 1e6)}"


def parse_freeze_snap(name: str) -> tuple[int, float] | None:
    """(cycle, freeze time) of a freeze snapshot's name; None for any other name."""
    m = _FREEZE.fullmatch(name)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)) / 1e6


def _blocks_of(extents, block_size: int, nblocks: int) -> ExtentBitmap:
    """``Image.diff`` extents rounded out to whole blocks."""
    out = ExtentBitmap(nblocks)
    for off, length, _exists in extents:
        first = off // block_size
        last = min(nblocks, -(-(off + length) // block_size))
        if last > first:
            out.set_range(first, last - first)
    return out


class _RbdFace:
    """What the driver and the daemon read from ``driver.volume``."""

    write_pacer = None  # (pacing is for store volumes; the daemon refuses --pace here)

    def __init__(self, subject: RbdVolumeSubject):
        self._subject = subject
        self.name = subject.name
        self.size = subject.size
        self.block_size = subject.block_size
        self.nblocks = subject.nblocks

    @property
    def open_overlay(self) -> int:
        return self._subject.open_overlay

    def pending_blocks(self, exact: bool = False) -> int:
        """Blocks written since the newest freeze (the head against its snapshot; always
        exact)."""
        return self._subject.pending().count()

    def dirty_since(self, k: int) -> ExtentBitmap | None:
        return self._subject.dirty_since(k)


class RbdVolumeSubject(SingleVolume):
    """RBD image ``image`` of ``io`` (an ``IoCtx`` of the binding), mirrored as volume
    ``name``; ``branch_cycle``: the cycle whose snapshot ``branch_snap`` it branched
    from (its freeze time ``branch_freeze_time``); ``floor``: the newest cycle a
    driver ever accounted for (its state's ``last_freeze``), so cycle numbers never go
    back when the freeze snapshots were removed with a mirror."""

    group = False
    is_rbd = True

    def __init__(self, io, image: str, *, size: int, block_size: int, branch_cycle: int,
                 branch_snap: str, branch_freeze_time: float, name: str | None = None,
                 remote_name: str | None = None, floor: int = 0):
        if type(block_size) is not int or block_size < 512 or block_size & (block_size - 1):
            raise UsageError(f"RBD volume {image}: block size {block_size!r} is not a power "
                             "of two of at least 512")
        if type(size) is not int or size <= 0 or size % block_size:
            raise UsageError(f"RBD volume {image}: size {size!r} is not a positive multiple "
                             f"of its block size {block_size}")
        if type(branch_cycle) is not int or branch_cycle < 0:
            raise UsageError(f"RBD volume {image}: branch cycle {branch_cycle!r} is not a "
                             "cycle number")
        self.io = io
        self.image = image
        self.name = name or image
        self.size = size
        self.block_size = block_size
        self.nblocks = size // block_size
        self.branch_cycle = branch_cycle
        self.branch_snap = branch_snap
        self.branch_freeze_time = float(branch_freeze_time)
        self._lock = threading.Lock()  # the head handle: one librbd call at a time
        try:
            self._head = io.open(image)
        except OSError as exc:
            raise _error(exc, f"cannot open RBD volume {image}") from exc
        try:
            actual = self._head.size()
            if actual != size:
                raise StoreError(f"RBD volume {image} is {actual} bytes, its record says "
                                 f"{size}; look at the record (STORE/rbd-volumes) and the image")
            self.remote_name = self._check_remote(remote_name or self.name)
            self.remote_names = [self.remote_name]
            self.offsets = [0]
            self.state_dir_name = self.name
            self.volume = _RbdFace(self)
            self.volumes = [self.volume]
            # The newest freeze: kept here (this subject makes every freeze snapshot), so
            # the driver's frequent reads of it cost no cluster round trip.
            self._top = max(max(self.snapshots(), default=branch_cycle), floor)
        except BaseException:
            self._head.close()  # whatever failed, the image is not left open
            raise

    @staticmethod
    def _check_remote(name: str) -> str:
        from cyclemirror.store.names import validate_volume_name

        return validate_volume_name(name)

    def close(self) -> None:
        with self._lock:
            head, self._head = self._head, None
        if head is not None:
            head.close()

    # -- snapshots ---------------------------------------------------------------------
    def _head_handle(self):
        if self._head is None:
            raise StoreError(f"RBD volume {self.image}: its mirror subject is closed")
        return self._head

    def _listed(self) -> list[tuple[int, str, float]]:
        """(cycle, name, freeze time) of the branch snapshot and every freeze snapshot,
        in creation order."""
        with self._lock:
            try:
                listed = self._head_handle().snap_list()
            except OSError as exc:
                raise _error(exc, f"listing the snapshots of RBD volume {self.image}") from exc
        out = []
        for snap, _size in listed:
            if snap == self.branch_snap:
                out.append((self.branch_cycle, snap, self.branch_freeze_time))
                continue
            parsed = parse_freeze_snap(snap)
            if parsed is not None and parsed[0] > self.branch_cycle:
                out.append((parsed[0], snap, parsed[1]))
        return out

    def snapshots(self) -> dict[int, tuple[str, float]]:
        """{cycle: (snapshot name, freeze time)}: the branch snapshot and the freezes (of
        two for one cycle, which only a failed call that took effect leaves, the newer)."""
        return {cycle: (name, t) for cycle, name, t in self._listed()}

    @property
    def open_overlay(self) -> int:
        return self._top

    def frozen_cycles(self) -> list[int]:
        return sorted(self.snapshots())

    def freeze(self, sync: bool = True) -> RbdFrozenCycle:
        """Snapshot the image now: cycle ``open_overlay + 1``."""
        n = self.open_overlay + 1
        with self._lock:
            head = self._head_handle()
            t = time.time()
            name = freeze_snap_name(n, t)
            try:
                head.snap_create(name)  # quiesced by librbd (see the module doc)
            except OSError as exc:
                failure = _error(exc, f"freezing RBD volume {self.image} (snapshot {name})")
            else:
                failure = None
                self._top = n
        if failure is not None:
            # It may have taken effect all the same (a timeout): ask the image.
            self._top = max(self._top, max(self.snapshots(), default=self.branch_cycle))
            raise failure
        log.debug("RBD volume %s: frozen as %s", self.image, name)
        return self.frozen(n)

    def frozen(self, k: int) -> RbdFrozenCycle:
        snaps = self.snapshots()
        if k not in snaps:
            raise NotFoundError(f"RBD volume {self.image} has no snapshot of cycle {k} "
                                f"(its cycles: {sorted(snaps)})")
        name, freeze_time = snaps[k]
        # What changed since the previous freeze; if that snapshot went (with a removed
        # mirror), since the newest older one (the branch snapshot at worst): more than
        # changed in the cycle, never less.  None (no older snapshot at all: the branch
        # cycle itself) means the whole image.
        older = [c for c in snaps if c < k]
        dirty = self._diff(snaps[max(older)][0], name) if older else None
        return RbdFrozenCycle(self, k, name, freeze_time, dirty)

    def _diff(self, older: str, newer: str | None) -> ExtentBitmap:
        """Blocks that differ between snapshot ``older`` and ``newer`` (None: the head)."""
        try:
            if newer is None:
                with self._lock:
                    extents = self._head_handle().diff(older)
            else:
                img = self.io.open(self.image, newer, True)
                try:
                    extents = img.diff(older)
                finally:
                    img.close()
        except OSError as exc:
            raise _error(exc, f"diffing RBD volume {self.image} from {older} to "
                              f"{newer or 'its head'}") from exc
        return _blocks_of(extents, self.block_size, self.nblocks)

    def pending(self) -> ExtentBitmap:
        snaps = self.snapshots()
        top = max(snaps, default=None)
        if top is None:
            return _all(self.nblocks)  # never frozen (the branch snapshot went): all of it
        return self._diff(snaps[top][0], None)

    def dirty_since(self, k: int) -> ExtentBitmap | None:
        """Blocks written since freeze ``k`` (the head against its snapshot), or None if
        that snapshot is gone."""
        snaps = self.snapshots()
        if k not in snaps:
            return None
        return self._diff(snaps[k][0], None)

    def merge_through(self, k: int) -> None:
        """Remove the freeze snapshots of cycles <= ``k`` (never the branch snapshot)."""
        for cycle, name, _t in self._listed():
            if cycle > k or not name.startswith(FREEZE_PREFIX):
                continue
            with self._lock:
                try:
                    self._head_handle().snap_remove(name)
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        raise _error(exc, f"removing snapshot {name} of RBD volume "
                                          f"{self.image}") from exc
            log.debug("RBD volume %s: freeze snapshot %s removed", self.image, name)
        self._empty_trash()

    def _empty_trash(self) -> None:
        """Snapshots in librbd's trash namespace: a removal cut by a kill -9 leaves the
        snapshot there (librbd trashes it first).  Removed by id; one that a clone
        still needs is refused by librbd and stays."""
        with self._lock:
            try:
                listed = self._head_handle().snap_ids()
            except OSError as exc:
                log.warning("RBD volume %s: listing its snapshots failed (%s)", self.image, exc)
                return
            for name, snap_id, namespace in listed:
                if namespace != SNAP_NAMESPACE_TRASH:
                    continue
                try:
                    self._head_handle().snap_remove_by_id(snap_id)
                    log.info("RBD volume %s: trashed snapshot %s (id %d) removed", self.image,
                             name, snap_id)
                except OSError as exc:
                    log.debug("RBD volume %s: trashed snapshot %s stays (%s)", self.image,
                              name, exc)

    def remove_freezes(self) -> int:
        """Every freeze snapshot (the mirror is removed); returns how many went."""
        before = [n for _c, n, _t in self._listed() if n.startswith(FREEZE_PREFIX)]
        self.merge_through(2**62)
        return len(before)


def _all(n: int) -> ExtentBitmap:
    bm = ExtentBitmap(n)
    bm.set_range(0, n)
    return bm


def _error(exc: OSError, what: str) -> StoreError:
    from cyclemirror.errors import ClusterUnavailableError

    if exc.errno in (errno.ETIMEDOUT, errno.ENOTCONN, errno.ESHUTDOWN):
        return ClusterUnavailableError(f"{what}: the Ceph cluster did not answer ({exc}); "
                                       "the mirror retries")
    return StoreError(f"{what}: {exc}")


class RbdFrozenCycle:
    """Cycle ``number`` of an RBD volume: its snapshot, freeze time and dirty set.

    Snapshots are durable when made: ``synced`` is always true."""

    synced = True
    zeroed = None

    def __init__(self, subject: RbdVolumeSubject, number: int, snap: str,
                 freeze_time: float, dirty: ExtentBitmap | None):
        self.subject = subject
        self.volume = subject.volume
        self.number = number
        self.snap = snap
        self.freeze_time = freeze_time
        self.dirty = dirty

    def sync(self) -> None:
        return None

    def reader(self) -> RbdFrozenReader:
        return RbdFrozenReader(self)

    def __repr__(self) -> str:
        return f"RbdFrozenCycle({self.subject.image!r}, number={self.number})"


class RbdFrozenReader:
    """The frozen snapshot, read for a cycle (``store.frozen.FrozenReader``'s interface).
    One thread at a time; the packer's workers read only the memfd it fills."""

    def __init__(self, cycle: RbdFrozenCycle):
        self.cycle = cycle
        self._subject = cycle.subject
        self._img = None
        self._spool = -1

    def __enter__(self) -> RbdFrozenReader:
        if self._img is not None:
            raise UsageError("this reader is already open; take a new one with cycle.reader()")
        s = self._subject
        try:
            self._img = s.io.open(s.image, self.cycle.snap, True)
        except OSError as exc:
            raise _error(exc, f"opening snapshot {self.cycle.snap} of RBD volume "
                              f"{s.image}") from exc
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        img, self._img = self._img, None
        if img is not None:
            img.close()
        if self._spool >= 0:
            os.close(self._spool)
            self._spool = -1

    def _image(self):
        if self._img is None:
            raise UsageError(f"reader of cycle {self.cycle.number} of RBD volume "
                             f"{self._subject.image} is not open")
        return self._img

    def read(self, offset: int, length: int) -> bytes:
        s = self._subject
        if offset < 0 or length < 0 or offset + length > s.size:
            raise UsageError(f"frozen read {offset}+{length} outside RBD volume {s.image} "
                             f"({s.size} bytes)")
        try:
            return self._image().read(offset, length)
        except OSError as exc:
            raise _error(exc, f"reading snapshot {self.cycle.snap} of RBD volume "
                              f"{s.image} at {offset}") from exc

    def extents(self, blocks: ExtentBitmap | None, max_run_blocks: int):
        """(offset, length, "data"|"zero", fd) in ascending order over ``blocks`` (None:
        the whole image); data extents are in the reader's memfd at their own offsets."""
        s = self._subject
        if type(max_run_blocks) is not int or max_run_blocks < 1:
            raise UsageError(f"max_run_blocks must be a positive integer, got {max_run_blocks!r}")
        if blocks is not None:
            if not isinstance(blocks, ExtentBitmap):
                raise UsageError(f"blocks must be an ExtentBitmap or None, got "
                                 f"{type(blocks).__name__}")
            if blocks.nbits != s.nblocks:
                raise BitmapRangeError(f"block bitmap has {blocks.nbits} bits but RBD volume "
                                       f"{s.image} has {s.nblocks} blocks")
        self._image()
        if self._spool < 0:
            self._spool = os.memfd_create(f"cyclemirror-rbd-{s.name}", os.MFD_CLOEXEC)
            os.ftruncate(self._spool, s.size)
        return self._extents(blocks, max_run_blocks)

    def _ranges(self, blocks: ExtentBitmap | None):
        """(first block, count, allocated) runs covering what is asked for, in order."""
        s = self._subject
        if blocks is not None:
            for start, count in blocks.iter_runs():
                yield start, count, True
            return
        try:
            allocated = self._image().diff(None)  # what exists in the snapshot
        except OSError as exc:
            raise _error(exc, f"listing the data of snapshot {self.cycle.snap} of RBD "
                              f"volume {s.image}") from exc
        pos = 0
        for start, count in _blocks_of(allocated, s.block_size, s.nblocks).iter_runs():
            if start > pos:
                yield pos, start - pos, False
            yield start, count, True
            pos = start + count
        if pos < s.nblocks:
            yield pos, s.nblocks - pos, False

    def _pieces(self, blocks, max_run_blocks):
        """(offset, length, allocated) pieces of at most ``max_run_blocks`` blocks."""
        bs = self._subject.block_size
        for start, count, allocated in self._ranges(blocks):
            if not allocated:
                yield start * bs, count * bs, False
                continue
            for piece in range(start, start + count, max_run_blocks):
                n = min(max_run_blocks, start + count - piece)
                yield piece * bs, n * bs, True

    def _read_ahead(self, pieces):
        """(offset, length, data or None) in order; the data of allocated pieces is read
        by READ_THREADS at once (librbd's read waits for one OSD round trip: scattered
        4 KiB blocks one after the other would be bound by the latency), at most
        READ_AHEAD_BYTES ahead."""
        pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="rbd-read")
        ahead: deque = deque()
        ahead_bytes = 0
        try:
            for off, length, allocated in pieces:
                ahead.append((off, length, pool.submit(self.read, off, length)
                              if allocated else None))
                ahead_bytes += length if allocated else 0
                while ahead and (len(ahead) > READ_AHEAD_COUNT
                                 or ahead_bytes > READ_AHEAD_BYTES):
                    o, n, fut = ahead.popleft()
                    ahead_bytes -= n if fut is not None else 0
                    yield o, n, fut.result() if fut is not None else None
            while ahead:
                o, n, fut = ahead.popleft()
                yield o, n, fut.result() if fut is not None else None
        finally:
            for _o, _n, fut in ahead:
                if fut is not None:
                    fut.cancel()
            pool.shutdown(wait=True)

    def _extents(self, blocks, max_run_blocks):
        bs = self._subject.block_size
        handed: deque[tuple[int, int, int]] = deque()  # (stream pos, offset, length) in the spool
        stream = 0
        for off, length, data in self._read_ahead(self._pieces(blocks, max_run_blocks)):
            if data is None:
                yield off, length, "zero", -1
                continue
            n = length // bs
            nonzero = np.frombuffer(data, dtype=np.uint64).reshape(n, bs // 8).any(axis=1)
            # The runs of blocks alike (all zero, or holding data): edges where it changes.
            edges = [0, *(np.flatnonzero(nonzero[1:] != nonzero[:-1]) + 1).tolist(), n]
            for i, j in itertools.pairwise(edges):
                if not nonzero[i]:
                    yield off + i * bs, (j - i) * bs, "zero", -1
                else:
                    a, b = off + i * bs, off + j * bs
                    pwrite_all(self._spool, memoryview(data)[i * bs: j * bs], a)
                    handed.append((stream, a, b - a))
                    stream += b - a
                    # Punch out what the packer is surely done with.
                    while handed and handed[0][0] + SPOOL_WINDOW < stream - (b - a):
                        _pos, p_off, p_len = handed.popleft()
                        punch_hole(self._spool, p_off, p_len)
                    yield a, b - a, "data", self._spool
