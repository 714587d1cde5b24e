"""A volume: base plus a chain of overlays, served as one view with freeze and merge.

Data path (redirect-on-write): every write goes to the newest ("open")
overlay as whole blocks. An aligned write is one pwrite plus a bitmap update;
an unaligned one first reads the partial edge blocks through the view
(read-modify-write), so the overlay only ever holds whole blocks. Whole-block
zeroes and trims append to the overlay's zero log, then punch a hole.

Locking: ``_lock`` guards the layer list, the bitmaps and the reader counts;
every view operation (read, zero, trim, unaligned write, block_status) holds it
for its duration. A whole-block write holds it only to pick the open overlay
and to count itself in ``_writing``; its pwrite and bitmap update run outside,
so several writes proceed at once (the bitmaps lock themselves). Whatever must
not overlap a write in flight (a freeze's switch, read-modify-write, zeroing,
close, a live export) calls ``_drain_writes_locked`` under ``_lock``: it sets
``_draining`` (new writes wait) and waits for ``_writing`` to reach 0, so a
freeze still falls wholly before or after each write.
``_cond`` (on ``_lock``) wakes merges waiting for frozen readers.
``_freeze_lock`` serialises freezes, ``_merge_lock`` merges; neither is held
by the data path, and the long work (fsync of a frozen overlay, copying an
overlay into base) runs outside ``_lock``.

On-disk protocol (argued in docs/store.md):
* freeze k: create overlay-k files (fsynced), then under ``_lock`` switch and
  atomically rewrite volume.json listing overlay k. The rename is the commit:
  before it a reopen deletes the stray overlay-k (pre-freeze state), after it
  overlay k exists (post-freeze state).
* merge j: persist ``merging = j``, copy overlay j into base, fsync base,
  persist ``merged_through = j``, unlink overlay j. A reopen that finds
  ``merging`` set redoes the copy (idempotent: overlay j is frozen).
  When overlay j holds most of the volume, the merge goes the other way
  (``merge_mode = "swap"``): copy the blocks j lacks from base into j, fsync
  j, rename it over base.img. A reopen redoes the fill if overlay-j.img is
  still there and only finishes the state if the rename already happened.
"""

from __future__ import annotations

import errno
import math
import os
import re
import threading
import time

from cyclemirror import extents
from cyclemirror.errors import DeadlineError, NotFoundError, StoreError, UsageError
from cyclemirror.store import fileops
from cyclemirror.store.exporter import write_image
from cyclemirror.store.frozen import FrozenCycle
from cyclemirror.store.layer import Layer, overlay_paths
from cyclemirror.store.recovery import recover_overlay
from cyclemirror.store.resolve import ZERO, classify, read_range

STATE_FILE = "volume.json"
BASE_FILE = "base.img"
FORMAT = 1
MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 1 << 20
MAX_VOLUME_SIZE = 1 << 50
# Bytes per kernel copy call during a merge; also how much of the merged overlay's
# page cache is dropped at a time behind the copy (see _fold_into_base).
MERGE_CHUNK = 16 << 20
# Whole-block writes at least this big first drop base's cached pages of their range
# (see Volume.write): one fadvise per write is noise at this size, not at 4 KiB.
FEED_MIN = 256 << 10
_OVERLAY_FILE_RE = re.compile(r"overlay-(\d+)\.(img|zlog)")



def check_geometry(size: object, block_size: object) -> None:
    """Raise UsageError unless (size, block_size) describe a volume we can store."""
    if type(block_size) is not int or not (
        MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE and block_size & (block_size - 1) == 0
    ):
        raise UsageError(
            f"block size {block_size!r} is not allowed: use a power of two from "
            f"{MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
        )
    if type(size) is not int or size <= 0 or size > MAX_VOLUME_SIZE:
        raise UsageError(f"volume size {size!r} must be an integer from 1 to {MAX_VOLUME_SIZE} bytes")
    if size % block_size:
        raise UsageError(
            f"volume size {size} is not a multiple of the block size {block_size}; "
            "round it up (for an image: truncate -s) or pick a smaller block size"
        )


MERGE_COPY = "copy"  # overlay j's blocks are copied into base
MERGE_SWAP = "swap"  # base's other blocks are copied into overlay j, which becomes base


def initial_state(size: int, block_size: int) -> dict:
    return {
        "format": FORMAT,
        "size": size,
        "block_size": block_size,
        "created": time.time(),
        "merged_through": -1,
        "merging": None,
        "merge_mode": None,
        "overlays": [{"number": 0, "closed_at": None}],
    }


def _validate_state(state: dict, where: str) -> None:
    def bad(why: str) -> StoreError:
        return StoreError(f"volume state {where} is damaged: {why}")

    if state.get("format") != FORMAT:
        raise bad(f"format {state.get('format')!r}, this version reads {FORMAT}")
    try:
        check_geometry(state.get("size"), state.get("block_size"))
    except UsageError as exc:
        raise bad(str(exc)) from exc
    # Every key the constructor indexes must be here: .get() alone let a file without
    # "merging" or "closed_at" pass, and the constructor's KeyError escaped the daemon's start.
    for key in ("merged_through", "merging", "overlays"):
        if key not in state:
            raise bad(f"the key {key!r} is missing")
    merged = state["merged_through"]
    overlays = state["overlays"]
    merging = state["merging"]
    created = state.get("created", 0.0)
    if type(created) not in (int, float) or not math.isfinite(created):
        raise bad(f"created is {created!r:.40}")
    if type(merged) is not int or merged < -1:
        raise bad(f"merged_through is {merged!r:.40}")
    if not isinstance(overlays, list) or not overlays:
        raise bad("no overlay list")
    for i, entry in enumerate(overlays):
        if not isinstance(entry, dict) or entry.get("number") != merged + 1 + i:
            raise bad(f"overlay entry {i} is {entry!r:.80}, expected number {merged + 1 + i}")
        if "closed_at" not in entry:
            raise bad(f"overlay {entry['number']} has no closed_at")
        closed = entry["closed_at"]
        is_last = i == len(overlays) - 1
        if is_last != (closed is None) or not (
                closed is None or (type(closed) in (int, float) and math.isfinite(closed))):
            raise bad(f"overlay {entry['number']} has closed_at {closed!r:.40}")
    if merging is not None and (type(merging) is not int or merging != merged + 1):
        raise bad(f"merging is {merging!r} but merged_through is {merged}")
    if merging is not None and len(overlays) < 2:
        raise bad(f"merging overlay {merging}, which is the open one")
    mode = state.get("merge_mode")  # absent in files written before swap merges existed
    if merging is None and mode is not None:
        raise bad(f"merge_mode is {mode!r} but no merge is in progress")
    if mode not in (None, MERGE_COPY, MERGE_SWAP):
        raise bad(f"merge_mode is {mode!r}, expected {MERGE_COPY!r} or {MERGE_SWAP!r}")


class Volume:
    """One volume of a store. Thread-safe; see the module docstring for the locks."""

    def __init__(self, name: str, vol_dir: str, state: dict, on_close=None):
        self.name = name
        self.dir = vol_dir
        self.size: int = state["size"]
        self.block_size: int = state["block_size"]
        self.nblocks = self.size // self.block_size
        self.created: float = state.get("created", 0.0)
        self._shift = self.block_size.bit_length() - 1
        self._mask = self.block_size - 1
        self._merged_through: int = state["merged_through"]
        self._merging: int | None = state["merging"]
        self._merge_mode: str | None = state.get("merge_mode") or (
            MERGE_COPY if self._merging is not None else None
        )
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._writing = 0  # whole-block writes copying data outside _lock right now
        self._writes_held: str | None = None  # hold_writes(): why writes are refused (EPERM)
        self._draining = 0  # holders of _lock waiting for them (new writes wait meanwhile)
        self._freeze_lock = threading.Lock()
        self._merge_lock = threading.Lock()
        self._readers: dict[int, int] = {}
        self._cycles: dict[int, FrozenCycle] = {}
        self._on_close = on_close
        self._closed = False
        self.torn_blocks_repaired = 0
        # Set by a mirror started with --pace (sender/pacing.py): admit(nbytes) before
        # each data write, waiting while writers are ahead of what the mirror can ship.
        self.write_pacer = None
        # Bytes merges moved into base by reflink and by copy_file_range (for metrics and tests).
        self.merged_bytes_reflinked = 0
        self.merged_bytes_copied = 0
        # Merges done by swapping, and the base bytes they copied into the overlay first.
        self.merges_swapped = 0
        self.swap_filled_bytes = 0
        self._base = Layer.open_base(os.path.join(vol_dir, BASE_FILE))
        self._overlays: list[Layer] = []  # newest (open) first
        try:
            self._open_overlays(state["overlays"])
        except BaseException:
            for layer in [*self._overlays, self._base]:
                layer.retire()
            raise

    # -- opening and recovery ---------------------------------------------------

    @classmethod
    def open(cls, name: str, vol_dir: str, on_close=None) -> Volume:
        path = os.path.join(vol_dir, STATE_FILE)
        try:
            state = fileops.read_json(path, f"state of volume {name!r}")
        except FileNotFoundError as exc:
            raise NotFoundError(f"volume {name!r} has no {STATE_FILE} in {vol_dir}") from exc
        _validate_state(state, path)
        base = os.path.join(vol_dir, BASE_FILE)
        if not os.path.exists(base) or os.stat(base).st_size != state["size"]:
            raise StoreError(f"base image {base} is missing or not {state['size']} bytes; volume damaged")
        return cls(name, vol_dir, state, on_close)

    def _open_overlays(self, entries: list[dict]) -> None:
        if self._merge_mode == MERGE_SWAP and not os.path.exists(overlay_paths(self.dir, self._merging)[0]):
            # The crash came after the swap's rename: base.img is the merged image already,
            # only the state still lists the overlay. Finish that step now.
            entries = entries[1:]
            self._merged_through, self._merging, self._merge_mode = self._merging, None, None
            self._save_state(entries)
        listed = {e["number"] for e in entries}
        for fname in os.listdir(self.dir):
            m = _OVERLAY_FILE_RE.fullmatch(fname)
            if m and int(m.group(1)) not in listed:
                # Overlays merged before a crash, or created by a freeze that never committed.
                os.unlink(os.path.join(self.dir, fname))
        below: list[Layer] = []
        for entry in entries:
            layer = Layer.open_overlay(self.dir, entry["number"], self.size, self.nblocks)
            self._overlays.insert(0, layer)
            layer.closed_at = entry["closed_at"]
            torn = recover_overlay(layer, below, self._base, self.size, self.block_size, self.nblocks)
            if torn or entry["closed_at"] is not None:
                # A frozen overlay's fsync may have been deferred (freeze(sync=False)) and
                # cut by a kill: what a mirror ships from it must be on disk first.
                os.fsync(layer.fd)
            self.torn_blocks_repaired += torn
            below.insert(0, layer)
        if self._merging is not None:
            oldest = self._overlays[-1]
            if self._merge_mode == MERGE_SWAP:
                self._fill_from_base(oldest)
            else:
                self._fold_into_base(oldest)
            self._finish_merge(oldest)

    def _state(self, overlays: list[dict] | None = None) -> dict:
        if overlays is None:
            overlays = [
                {"number": layer.number, "closed_at": layer.closed_at}
                for layer in reversed(self._overlays)
            ]
        return {
            "format": FORMAT,
            "size": self.size,
            "block_size": self.block_size,
            "created": self.created,
            "merged_through": self._merged_through,
            "merging": self._merging,
            "merge_mode": self._merge_mode,
            "overlays": overlays,
        }

    def _save_state(self, overlays: list[dict] | None = None) -> None:
        """Replace volume.json; ``overlays`` (entries as in the file) stands in for the layer
        list while the volume is still being opened."""
        try:
            fileops.atomic_write_json(os.path.join(self.dir, STATE_FILE), self._state(overlays))
        except OSError as exc:
            raise fileops.store_error(f"saving the state of volume {self.name!r}", exc) from exc

    # -- argument checks ----------------------------------------------------------

    def _check_range(self, offset: int, length: int, op: str) -> None:
        extents.check_range(offset, length, self.size, f"{op} on volume {self.name!r}")

    def _top(self) -> Layer:
        if self._closed:
            raise StoreError(f"volume {self.name!r} is closed; open it again from its store")
        return self._overlays[0]

    # -- the view -------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        if type(offset) is not int or type(length) is not int or not (
            0 <= offset and 0 <= length and offset + length <= self.size
        ):
            self._check_range(offset, length, "read")
        with self._lock:
            if self._closed:
                self._top()  # raises the "closed" error
            try:
                block = offset >> self._shift
                if 0 < length and (offset + length - 1) >> self._shift == block:
                    # One block (the common NBD read): the newest layer holding it serves it.
                    for layer in self._overlays:
                        if layer.dirty.test(block):
                            return fileops.pread_exact(layer.fd, length, offset)
                    return fileops.pread_exact(self._base.fd, length, offset)
                return read_range(self._overlays, self._base, offset, length, self.block_size)
            except OSError as exc:
                raise fileops.store_error(f"reading volume {self.name!r} at {offset}", exc) from exc

    def write(self, offset: int, data, fua: bool = False) -> None:
        # The hot path: checks are inlined and the slow helpers run only on failure.
        n = len(data)
        if type(offset) is not int or offset < 0 or offset + n > self.size:
            self._check_range(offset, n, "write")
        if n == 0:
            return
        pacer = self.write_pacer
        if pacer is not None:  # before any lock: a paced writer never delays a freeze
            pacer.admit(n)
        if (offset | n) & self._mask:
            # Read-modify-write of edge blocks: alone against every other write.
            with self._lock:
                # Drain first: the wait releases _lock, so a freeze may switch overlays
                # meanwhile, and a top picked before it would be a frozen overlay.
                self._drain_writes_locked()
                self._check_writable()
                top = self._top()
                try:
                    self._write_unaligned(top, offset, data)
                    if fua:
                        os.fdatasync(top.fd)
                except OSError as exc:
                    raise fileops.store_error(f"writing volume {self.name!r} at {offset}", exc) from exc
            return
        # Whole blocks: the copy runs outside _lock, so writes from several connections
        # proceed in parallel; _writing counts them so that a freeze or any exclusive
        # operation can wait for them (_drain_writes_locked).
        with self._lock:
            while self._draining:
                self._cond.wait()
            if self._closed or self._writes_held:
                self._check_writable()  # first: a demoted volume says so even once closed
                self._top()  # raises the "closed" error
            top = self._overlays[0]
            nb = n >> self._shift
            base = None
            if n >= FEED_MIN and top.dirty.count_range(offset >> self._shift, nb) < nb:
                base = self._base
                base.acquire()  # a merge may retire it meanwhile
            self._writing += 1
        try:
            if base is not None:
                # A big first touch (a rewrite needs no new pages): the view reads this
                # range from the open overlay from now on, and no delta cycle reads base
                # where a newer overlay holds it, so base's cached pages of the range are
                # stale. Free them right before the write allocates as many: the kernel
                # hands them straight back instead of new memory, which on a VM whose free
                # memory goes back to the host costs a host page fault per page
                # (docs/store.md, "Merge and the page cache"). Frozen overlays were tried
                # as a source too: their pages stay dirty until the freeze's fsync, and the
                # benchmark did not move.
                fileops.drop_cache(base.fd, offset, n)
                base.release()
                base = None
            fileops.pwrite_all(top.fd, data, offset)
            b0 = offset >> self._shift
            top.dirty.set_range(b0, nb)  # the bitmap has its own lock
            if top.has_zeroed:  # only set under _lock with no write in flight
                top.zeroed.clear_range(b0, nb)
            if fua:
                os.fdatasync(top.fd)
        except OSError as exc:
            raise fileops.store_error(f"writing volume {self.name!r} at {offset}", exc) from exc
        finally:
            if base is not None:
                base.release()
            with self._lock:
                self._writing -= 1
                if not self._writing and self._draining:
                    self._cond.notify_all()

    def _drain_writes_locked(self) -> None:
        """With _lock held: wait until no whole-block write is in flight; new ones wait
        meanwhile. On return _lock is held again and nothing writes until it is released.
        The wait releases _lock (a freeze or close may run meanwhile): read the layer list
        only after this returns."""
        if not self._writing:
            return
        self._draining += 1
        try:
            while self._writing:
                self._cond.wait()
        finally:
            self._draining -= 1
            if not self._draining:
                self._cond.notify_all()  # writers gated while we waited

    def _write_unaligned(self, top: Layer, offset: int, data) -> None:
        # The first touch of a partial block in this overlay is read-modify-write against
        # the view, so the overlay keeps whole blocks only (recovery relies on that shape).
        # A partial block the overlay already holds as data takes the bytes in place.
        bs = self.block_size
        end = offset + len(data)
        a0 = offset & ~self._mask
        a1 = (end + self._mask) & ~self._mask
        head_rmw = offset != a0 and self._needs_rmw(top, a0 >> self._shift)
        tail_rmw = end != a1 and self._needs_rmw(top, (a1 >> self._shift) - 1)
        if head_rmw or tail_rmw:
            lo = a0 if head_rmw else offset
            hi = a1 if tail_rmw else end
            buf = bytearray(hi - lo)
            if head_rmw:
                buf[0:bs] = read_range(self._overlays, self._base, a0, bs, bs)
            if tail_rmw and (a1 - bs != a0 or not head_rmw):
                buf[hi - lo - bs :] = read_range(self._overlays, self._base, a1 - bs, bs, bs)
            buf[offset - lo : end - lo] = data
            fileops.pwrite_all(top.fd, buf, lo)
        else:
            fileops.pwrite_all(top.fd, data, offset)
        b0, count = a0 >> self._shift, (a1 - a0) >> self._shift
        top.dirty.set_range(b0, count)
        if top.has_zeroed:
            top.zeroed.clear_range(b0, count)

    @staticmethod
    def _needs_rmw(top: Layer, block: int) -> bool:
        # Zeroed blocks are holes in the overlay: a partial write would leave them half allocated.
        return not top.dirty.test(block) or (top.has_zeroed and top.zeroed.test(block))

    def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        self._zero(offset, length, fua, "write_zeroes")

    def trim(self, offset: int, length: int) -> None:
        """Discard: the range reads back as zeroes afterwards (tracked like write_zeroes)."""
        self._zero(offset, length, False, "trim")

    def _zero(self, offset: int, length: int, fua: bool, op: str) -> None:
        self._check_range(offset, length, op)
        if length == 0:
            return
        end = offset + length
        a0 = (offset + self._mask) & ~self._mask
        a1 = end & ~self._mask
        with self._lock:
            self._drain_writes_locked()  # first: its wait releases _lock (see write)
            self._check_writable()
            top = self._top()
            try:
                if a0 >= a1:
                    self._write_unaligned(top, offset, bytes(length))
                else:
                    b0, count = a0 >> self._shift, (a1 - a0) >> self._shift
                    top.zlog.append(b0, count)  # ahead of the hole: recovery must see it
                    fileops.punch_hole(top.fd, a0, a1 - a0)
                    top.dirty.set_range(b0, count)
                    top.zeroed.set_range(b0, count)
                    top.has_zeroed = True
                    if offset < a0:
                        self._write_unaligned(top, offset, bytes(a0 - offset))
                    if a1 < end:
                        self._write_unaligned(top, a1, bytes(end - a1))
                if fua:
                    os.fsync(top.fd)
                    top.zlog.sync()
            except OSError as exc:
                raise fileops.store_error(f"{op} on volume {self.name!r} at {offset}", exc) from exc

    def flush(self) -> None:
        with self._lock:
            top = self._top()
            # A just-frozen overlay may not be fsynced yet (freeze does it outside the lock).
            layers = [top, *(layer for layer in self._overlays[1:] if not layer.synced)]
            for layer in layers:
                layer.acquire()
        try:
            for layer in layers:
                os.fsync(layer.fd)
                layer.zlog.sync()
        except OSError as exc:
            raise fileops.store_error(f"flushing volume {self.name!r}", exc) from exc
        finally:
            for layer in layers:
                layer.release()

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """NBD-style extents over [offset, offset + length): (length, flags), 1 = hole, 2 = zero."""
        self._check_range(offset, length, "block_status")
        if length == 0:
            return []
        bs = self.block_size
        end = offset + length
        with self._lock:
            self._top()
            runs = list(classify(self._overlays, self._base, offset // bs, -(-end // bs), bs))
        clipped = []
        for s, c, kind, _fd in runs:
            lo, hi = max(s * bs, offset), min((s + c) * bs, end)
            clipped.append((lo, hi - lo, extents.HOLE | extents.ZERO if kind == ZERO else 0))
        # Data of two layers side by side is one extent to a client.
        return [(n, flags) for _lo, n, flags in extents.merge_adjacent(clipped)]

    # -- freeze -----------------------------------------------------------------------

    def pending_blocks(self, exact: bool = False) -> int:
        """Blocks the open overlay holds so far: what the next freeze will owe targets
        (always exact: every acknowledged write is in the overlay's bitmap)."""
        with self._lock:
            top = self._top()
        return top.dirty.count()

    def _check_writable(self) -> None:
        if self._writes_held:
            raise PermissionError(errno.EPERM, f"volume {self.name!r} takes no writes: "
                                  f"{self._writes_held}")

    def hold_writes(self, why: str) -> None:
        """Refuse every write from now on (PermissionError EPERM, naming ``why``); returns
        once the writes in flight have landed, so each acknowledged write is in the view."""
        with self._lock:
            self._drain_writes_locked()
            self._writes_held = why or "writes are held"

    def release_writes(self) -> None:
        with self._lock:
            self._writes_held = None

    def dirty_since(self, number: int):
        """The blocks written to overlays ``number`` and newer (an ExtentBitmap), i.e.
        since freeze ``number``; None when one of those overlays was merged already."""
        from cyclemirror._cext.bitmap import ExtentBitmap

        with self._lock:
            self._top()
            if number <= self._merged_through:
                return None
            out = ExtentBitmap(self.nblocks)
            for layer in self._overlays:
                if layer.number >= number:
                    out.union_update(layer.dirty)
            return out

    @property
    def open_overlay(self) -> int:
        """Number of the overlay taking writes now (= number of the last freeze)."""
        return self._overlays[0].number

    def freeze(self, sync: bool = True) -> FrozenCycle:
        """Freeze now; with ``sync=False`` the frozen overlay's fsync is left to the
        returned cycle's ``sync()`` (see FrozenCycle)."""
        with self._freeze_lock:
            new = self._freeze_prepare()
            with self._lock:
                old = self._freeze_commit_locked(new, time.time())
            return self._freeze_finish(new.number, old, sync)

    # The three steps of a freeze, also used by store.group to freeze several
    # volumes at one instant: the caller holds _freeze_lock around all three and
    # _lock around the commit.
    def _freeze_prepare(self) -> Layer:
        return Layer.create_overlay(self.dir, self._top().number + 1, self.size, self.nblocks)

    def _freeze_commit_locked(self, new: Layer, now: float) -> Layer:
        self._drain_writes_locked()  # a write in flight lands wholly before the freeze
        old = self._top()
        old.closed_at = now
        old.synced = False
        self._overlays.insert(0, new)
        try:
            self._save_state()
        except BaseException:
            self._overlays.pop(0)
            old.closed_at = None
            new.retire()
            new.unlink()
            raise
        return old

    def _freeze_finish(self, k: int, old: Layer, sync: bool = True) -> FrozenCycle:
        cycle = self._make_cycle(k, old)
        if sync:
            self._sync_frozen(old)
        else:
            old.acquire()  # released by _sync_frozen: a merge must not close it first
            cycle._unsynced = old
        with self._lock:
            self._cycles[k] = cycle
        return cycle

    def _sync_frozen(self, old: Layer, release: bool = False) -> None:
        """fsync a frozen overlay; ``release``: drop the hold a deferred sync took."""
        try:
            self._hand_over_base_under(old)
            try:
                os.fsync(old.fd)
                old.zlog.sync()
            except OSError as exc:
                raise fileops.store_error(f"syncing frozen overlay {old.number}", exc) from exc
            old.synced = True
        finally:
            if release:
                old.release()

    def _hand_over_base_under(self, frozen: Layer) -> None:
        # Base's cached pages under the frozen overlay's data are dead for the view: the
        # frozen overlay and the open one above it shadow them. Free them now, when the new
        # overlay's first writes start allocating, so the kernel hands this memory straight
        # back to them. The per-write hand-over (write) cannot do it in this window: base
        # is still the previous overlay, whose pages the frozen overlay's own first writes
        # took, and the frozen overlay stays dirty until its fsync (docs/store.md, "Merge
        # and the page cache"). Runs shorter than FEED_MIN are left, as in write.
        bs = self.block_size
        runs = frozen.dirty.runs()
        runs = runs[runs[:, 1] * bs >= FEED_MIN]
        if not len(runs):
            return
        with self._lock:
            base = self._base
            base.acquire()  # a merge may retire it meanwhile
        try:
            for start, count in runs.tolist():
                fileops.drop_cache(base.fd, start * bs, count * bs)
        finally:
            base.release()

    def _make_cycle(self, k: int, overlay: Layer) -> FrozenCycle:
        if k == 1:
            return FrozenCycle(self, k, overlay.closed_at, None, None)
        return FrozenCycle(self, k, overlay.closed_at, overlay.dirty.copy(), overlay.zeroed.copy())

    def _cycle_valid(self, k: int) -> bool:
        merged = self._merged_through if self._merging is None else self._merging
        return merged < k <= self._overlays[0].number and k >= 1

    def frozen(self, k: int) -> FrozenCycle:
        if type(k) is not int:
            raise UsageError(f"cycle number must be an integer, got {k!r}")
        with self._lock:
            self._top()
            if not self._cycle_valid(k):
                raise NotFoundError(self._no_cycle(k))
            cycle = self._cycles.get(k)
            if cycle is None:
                overlay = next((o for o in self._overlays if o.number == k - 1), None)
                if overlay is None:
                    raise NotFoundError(
                        f"cycle {k} of volume {self.name!r}: its overlay {k - 1} is already merged "
                        "into base, so its dirty set is gone; the cycle is complete"
                    )
                cycle = self._cycles[k] = self._make_cycle(k, overlay)
            return cycle

    def frozen_cycles(self) -> list[int]:
        """Numbers of the cycles that frozen() can return now, oldest first."""
        with self._lock:
            return [o.number + 1 for o in reversed(self._overlays[1:])]

    def _no_cycle(self, k: int) -> str:
        return (
            f"volume {self.name!r} has no frozen cycle {k}: frozen cycles are "
            f"{self._merged_through + 2}..{self._overlays[0].number} "
            f"(merged through overlay {self._merged_through}"
            f"{'' if self._merging is None else f', merging {self._merging}'})"
        )

    def _open_reader(self, k: int) -> tuple[list[Layer], Layer]:
        with self._lock:
            self._top()
            if not self._cycle_valid(k):
                raise NotFoundError(self._no_cycle(k))
            overlays = [o for o in self._overlays if o.number < k]
            for layer in [*overlays, self._base]:
                layer.acquire()
            self._readers[k] = self._readers.get(k, 0) + 1
            return overlays, self._base

    def _close_reader(self, k: int, overlays: list[Layer], base: Layer) -> None:
        for layer in [*overlays, base]:
            layer.release()
        with self._cond:
            self._readers[k] -= 1
            if not self._readers[k]:
                del self._readers[k]
            self._cond.notify_all()

    # -- merge ------------------------------------------------------------------------

    def merge_through(self, k: int, timeout: float | None = None) -> None:
        """Fold frozen overlays <= k into base, oldest first; waits for readers of the images it changes.

        Overlay j is the one frozen cycle j + 1 shipped, so after every target
        applied cycle c, call merge_through(c - 1). Already-merged numbers are a no-op.
        """
        if type(k) is not int or k < 0:
            raise UsageError(f"merge_through needs an overlay number >= 0, got {k!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._merge_lock:
            with self._lock:
                top = self._top().number
            if k >= top:
                raise UsageError(
                    f"cannot merge overlay {k} of volume {self.name!r}: overlay {top} is still "
                    "open; only frozen overlays (below the newest) can be merged"
                )
            while self._merged_through < k:
                self._merge_one(self._merged_through + 1, deadline)

    def _merge_one(self, j: int, deadline: float | None) -> None:
        with self._cond:
            self._merging = j

            def no_readers() -> bool:
                return not any(c <= j for c in self._readers)

            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._cond.wait_for(no_readers, left):
                self._merging = None
                raise DeadlineError(
                    f"merging overlay {j} of volume {self.name!r}: readers of cycles "
                    f"{sorted(c for c in self._readers if c <= j)} are still open"
                )
            layer = self._overlays[-1]
            assert layer.number == j, (layer.number, j)
            self._merge_mode = self._cheaper_merge(layer)
            try:
                self._save_state()  # from here on a reopen redoes the merge
            except BaseException:
                self._merging = self._merge_mode = None
                raise
            layer.acquire()
        try:
            if self._merge_mode == MERGE_SWAP:
                self._fill_from_base(layer)
            else:
                self._fold_into_base(layer)
        finally:
            layer.release()
        self._finish_merge(layer)

    def _cheaper_merge(self, layer: Layer) -> str:
        """Copy the overlay's data blocks into base, or base's other blocks into the overlay
        and swap the files: whichever copies fewer blocks (base holes cost nothing, so the
        swap's count is an upper bound). A workload that rewrites most of the volume
        between freezes merges without copying at all."""
        held = layer.dirty.count()
        data = held - (layer.zeroed.count() if layer.has_zeroed else 0)
        return MERGE_SWAP if self.nblocks - held < data else MERGE_COPY

    def _fold_into_base(self, layer: Layer) -> None:
        bs = self.block_size
        base_fd = self._base.fd
        try:
            data = layer.dirty.copy()
            if layer.has_zeroed:
                data.difference_update(layer.zeroed)
            copier = fileops.KernelCopier()
            for s, c in data.iter_runs(max_run=max(1, MERGE_CHUNK // bs)):
                copier.copy(layer.fd, base_fd, s * bs, c * bs)
                # The overlay is read for the last time: give its cached pages back at once
                # (they are clean, the freeze fsynced them), so the open overlay's writers
                # take freshly freed memory instead of new memory. On a VM whose freed
                # memory returns to the host, a new page costs a host page fault, which made
                # writes during a merge ~10x slower (docs/store.md, "Merge and the page cache").
                fileops.drop_cache(layer.fd, s * bs, c * bs)
            self.merged_bytes_reflinked += copier.reflinked_bytes
            self.merged_bytes_copied += copier.copied_bytes
            if layer.has_zeroed:
                for s, c in layer.zeroed.iter_runs():
                    fileops.punch_hole(base_fd, s * bs, c * bs)
            os.fsync(base_fd)
        except OSError as exc:
            raise fileops.store_error(
                f"merging overlay {layer.number} into base of volume {self.name!r}", exc
            ) from exc

    def _fill_from_base(self, layer: Layer) -> None:
        """First half of a swap merge: copy base's data under every block the overlay does not
        hold into the overlay (base holes stay holes), then fsync the overlay. Images do not
        change: those blocks resolve to base, whose bytes they now repeat. Idempotent."""
        bs = self.block_size
        base_fd = self._base.fd
        try:
            copier = fileops.KernelCopier()
            pos = 0
            for s, c in [*layer.dirty.iter_runs(), (self.nblocks, 0)]:
                for ds, de in fileops.data_runs(base_fd, pos * bs, s * bs) if s > pos else ():
                    for off in range(ds, de, MERGE_CHUNK):
                        n = min(MERGE_CHUNK, de - off)
                        copier.copy(base_fd, layer.fd, off, n)
                        fileops.drop_cache(base_fd, off, n)  # base goes away with the swap
                pos = s + c
            self.swap_filled_bytes += copier.reflinked_bytes + copier.copied_bytes
            os.fsync(layer.fd)
        except OSError as exc:
            raise fileops.store_error(
                f"merging overlay {layer.number} of volume {self.name!r} (copying base's other "
                "blocks into it)", exc
            ) from exc

    def _finish_merge(self, layer: Layer) -> None:
        new_base = None
        if self._merge_mode == MERGE_SWAP:
            # The commit of a swap: after this rename base.img is image j+1 itself. A reopen
            # that finds overlay-j.img gone only has to finish the state (_open_overlays).
            base_path = os.path.join(self.dir, BASE_FILE)
            try:
                os.rename(layer.path, base_path)
                fileops.fsync_dir(self.dir)
                new_base = Layer.open_base(base_path)
            except OSError as exc:
                raise fileops.store_error(
                    f"merging overlay {layer.number} of volume {self.name!r} (renaming it to "
                    f"{BASE_FILE}); reopen the store to finish the merge", exc
                ) from exc
            self.merges_swapped += 1
        with self._cond:
            self._merged_through = layer.number
            self._merging = self._merge_mode = None
            self._overlays.remove(layer)
            for c in [c for c in self._cycles if c <= layer.number]:
                del self._cycles[c]
            old_base = self._base
            if new_base is not None:
                self._base = new_base
            self._save_state()
        layer.retire()
        if new_base is not None:
            old_base.retire()  # readers that pinned it keep reading the old inode
        layer.unlink(image=new_base is None)  # after a swap its file is base.img

    # -- export and close --------------------------------------------------------------

    def export(self, path: str, cycle: int | None = None) -> None:
        """Write a point-in-time copy to ``path`` (sparse raw file).

        With ``cycle``, copies that frozen image without stopping writers; without,
        copies the view now, holding writes off until the copy is done.
        """
        if cycle is not None:
            with self.frozen(cycle).reader() as reader:
                reader.export_to(path)
            return
        with self._lock:
            self._drain_writes_locked()
            self._top()  # raises if a close ran while the drain waited
            bs = self.block_size
            runs = (
                (s * bs, c * bs, kind, fd)
                for s, c, kind, fd in classify(self._overlays, self._base, 0, self.nblocks, bs, 1 << 18)
            )
            write_image(path, self.size, runs)

    def close(self) -> None:
        with self._freeze_lock, self._merge_lock:
            with self._lock:
                if self._closed:
                    return
                self._drain_writes_locked()
                top = self._overlays[0]
                try:
                    os.fsync(top.fd)
                    top.zlog.sync()
                finally:
                    self._closed = True
                    for layer in [*self._overlays, self._base]:
                        layer.retire()
        if self._on_close is not None:
            self._on_close(self)

    def __repr__(self) -> str:
        return f"Volume({self.name!r}, size={self.size}, block_size={self.block_size})"


__all__ = ["Volume", "check_geometry", "initial_state", "overlay_paths"]
