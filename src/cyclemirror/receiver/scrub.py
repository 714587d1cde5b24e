"""The scrub record: a digest per block of a mirror image, kept as cycles apply, and the scrub.

Why.  A verify needs the source; rot on the target's disk should also be
found when the source is far away or gone.  So the target records, for
every block of each mirror image, the digest it had when the cycle that
wrote it was applied, and ``scrub_image`` re-reads the image and compares.

**The file** ``<volume>.scrub`` beside ``<volume>.img``::

    header (4 KiB)  magic "CMSCRUB1", version u16, reserved u16, block size u32,
                    blocks u64, cycle u64, pages u64, table bytes u64,
                    xxh3-64 of those 48 bytes u64                (big-endian)
    table           a u64 (little-endian) per page: xxh3-64 of the page seeded
                    with page index + 1; 0 = the page holds no digests yet
    pages           4 KiB each: the block digests (store.rangehash) of 512
                    blocks, little-endian u64

``cycle`` is the applied cycle every valid page describes.  A page whose
checksum does not match is damaged and treated as unknown (a scrub refills it).
Per block: 8 bytes per 4 KiB block (0.2% of the image); per 1 MiB it would
be smaller, but then a cycle that wrote one 4 KiB block would make the hook
read 1 MiB to recompute its digest, and a delta of scattered blocks would
read most of the image at every apply.

**Keeping it current** (``record_apply``, called by ``Mirror._redo`` after the
image writes are durable and before the state lets go of the committed cycle):
a full cycle hashes the whole new image into a new record (renamed in); a
delta re-reads just the blocks its staging log touched (they are in the page
cache, just written), writes their digests into the valid pages, fdatasyncs
the pages, then the header with the new cycle.  The hook runs again if a
crash makes recovery redo the cycle (idempotent), so after any crash the
record's cycle is the applied cycle's or the one being applied (or, if the
state already said applied when the crash came, the cycle before).  A record
whose cycle is none of these (or any error in the hook) is deleted: the next scrub
starts a new baseline rather than trust it.  The hook never fails an apply.

**Scrub** (``scrub_image``): for each span of 32 pages, hash the span at one
applied cycle (``receiver.verify.ImageSpans``), then under the record's lock
check that the state has not moved and compare with the record's valid
pages; a block whose digest differs is rot.  Pages with no digests yet are
filled from what was read (a baseline: nothing to compare there yet).  A
record missing or of another cycle is replaced by an empty one at the
current cycle first.  ``RECORD_LOCKS`` serialises the hook and a scrub's
record reads and writes per image.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import xxhash

from cyclemirror._cext import blockhash
from cyclemirror._cext.bitmap import ExtentBitmap
from cyclemirror.errors import DeadlineError, IntegrityError, UsageError
from cyclemirror.receiver.fileops import fsync_dir
from cyclemirror.receiver.staging import HEADER_SIZE as STAGING_HEADER
from cyclemirror.receiver.staging import REC_DATA, REC_SCATTER
from cyclemirror.sender.ratelimit import RateLimiter
from cyclemirror.store import rangehash

log = logging.getLogger(__name__)

MAGIC = b"CMSCRUB1"
VERSION = 1
PAGE = 4096
PER_PAGE = PAGE // 8  # block digests per page
_HEADER = struct.Struct(">8sHHIQQQQ")
STEP_PAGES = 32  # pages a scrub reads per step (64 MiB of 4 KiB blocks)
SCRUB_TRIES = 10
CLUSTER_GAP = 8  # pages between two touched ones still read and written in one go
_STAGING_HEAD = struct.Struct(">4sBBHQQQ")
_SCATTER_HEAD = struct.Struct("<II")  # a SCATTER payload's table head: count, reserved
_SCATTER_ENTRY = struct.Struct("<QII")  # offset, length, reserved


def record_path(image_path: str) -> str:
    base = image_path[: -len(".img")] if image_path.endswith(".img") else image_path
    return base + ".scrub"


class _Locks:
    def __init__(self):
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def __call__(self, path: str) -> threading.Lock:
        key = os.path.realpath(path)
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())


RECORD_LOCKS = _Locks()


def _page_sum(page: np.ndarray, index: int) -> int:
    """Checksum of one page (a little-endian u64 array of PER_PAGE digests)."""
    value = xxhash.xxh3_64_intdigest(memoryview(page).cast("B"), seed=index + 1)
    return value or 1  # 0 means "no digests": a real checksum of 0 becomes 1


class ScrubRecord:
    """One open record file; the caller holds ``RECORD_LOCKS(path)`` around every use."""

    def __init__(self, path: str, fd: int, block_size: int, nblocks: int, cycle: int):
        self.path = path
        self.fd = fd
        self.block_size = block_size
        self.nblocks = nblocks
        self.cycle = cycle
        self.npages = -(-nblocks // PER_PAGE)
        self.table_off = PAGE
        self.table_bytes = -(-self.npages * 8 // PAGE) * PAGE
        self.data_off = PAGE + self.table_bytes
        self.damaged_pages = 0

    # -- files ------------------------------------------------------------------------
    @staticmethod
    def _header(block_size: int, nblocks: int, cycle: int, npages: int, table: int) -> bytes:
        head = _HEADER.pack(MAGIC, VERSION, 0, block_size, nblocks, cycle, npages, table)
        return head + xxhash.xxh3_64_intdigest(head).to_bytes(8, "big")

    @classmethod
    def create(cls, path: str, block_size: int, nblocks: int, cycle: int) -> ScrubRecord:
        """A new record with no digests yet (every page unknown), replacing any old one."""
        npages = -(-nblocks // PER_PAGE)
        table = -(-npages * 8 // PAGE) * PAGE
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, PAGE + table + npages * PAGE)  # sparse: all zero = unknown
            os.pwrite(fd, cls._header(block_size, nblocks, cycle, npages, table), 0)
            os.fsync(fd)
            os.replace(tmp, path)
            fsync_dir(os.path.dirname(path) or ".")
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, block_size, nblocks, cycle)

    @classmethod
    def open(cls, path: str) -> ScrubRecord:
        fd = os.open(path, os.O_RDWR)
        try:
            raw = os.pread(fd, _HEADER.size + 8, 0)
            if len(raw) != _HEADER.size + 8:
                raise IntegrityError(f"scrub record {path}: truncated header")
            head, check = raw[:_HEADER.size], int.from_bytes(raw[_HEADER.size:], "big")
            magic, version, _r, bs, nblocks, cycle, npages, table = _HEADER.unpack(head)
            if magic != MAGIC or version != VERSION or xxhash.xxh3_64_intdigest(head) != check:
                raise IntegrityError(f"scrub record {path}: not a version-{VERSION} record "
                                     "or its header is damaged")
            rec = cls(path, fd, bs, nblocks, cycle)
            size = os.fstat(fd).st_size
            if npages != rec.npages or table != rec.table_bytes or \
                    size < rec.data_off + npages * PAGE:
                raise IntegrityError(f"scrub record {path}: its geometry does not add up")
            return rec
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ScrubRecord:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- pages -----------------------------------------------------------------------
    def _pages(self, first_block: int, count: int) -> range:
        if first_block < 0 or count < 0 or first_block + count > self.nblocks:
            raise UsageError(f"scrub record {self.path}: blocks {first_block}+{count} outside "
                             f"0..{self.nblocks}")
        if count == 0:
            return range(0)
        return range(first_block // PER_PAGE, (first_block + count - 1) // PER_PAGE + 1)

    def _load(self, pages: range, count_damage: bool = True
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(digests per block, checksums per page, valid per page) of whole pages."""
        n = len(pages)
        data = os.pread(self.fd, n * PAGE, self.data_off + pages.start * PAGE)
        sums = os.pread(self.fd, n * 8, self.table_off + pages.start * 8)
        if len(data) != n * PAGE or len(sums) != n * 8:
            raise IntegrityError(f"scrub record {self.path}: short read")
        # Kept little-endian (the file's order) and writable, so pages go back as they are.
        digests = np.frombuffer(bytearray(data), dtype="<u8")
        table = np.frombuffer(bytearray(sums), dtype="<u8")
        valid = np.zeros(n, dtype=bool)
        for i, (p, stored) in enumerate(zip(pages, table.tolist(), strict=True)):
            if stored == 0:
                continue
            if _page_sum(digests[i * PER_PAGE:(i + 1) * PER_PAGE], p) == stored:
                valid[i] = True
            elif count_damage:
                self.damaged_pages += 1
        return digests, table, valid

    def read(self, first_block: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(digests, known) of the blocks: known is False where the page holds none."""
        pages = self._pages(first_block, count)
        if not pages:
            return np.empty(0, dtype=np.uint64), np.empty(0, dtype=bool)
        digests, _table, valid = self._load(pages)
        skip = first_block - pages.start * PER_PAGE
        known = np.repeat(valid, PER_PAGE)[skip:skip + count]
        return digests[skip:skip + count].astype(np.uint64), known

    def write(self, first_block: int, digests: np.ndarray, mode: str) -> int:
        """Store block digests; returns the pages written.

        mode "update": only into pages that hold digests already (the apply hook);
        "fill": only into pages that hold none, and only pages the span covers
        wholly (a scrub's baseline).
        """
        count = len(digests)
        pages = self._pages(first_block, count)
        if not pages:
            return 0
        data, table, valid = self._load(pages, count_damage=False)
        written = 0
        for i, p in enumerate(pages):
            lo, hi = p * PER_PAGE, min((p + 1) * PER_PAGE, self.nblocks)
            a, b = max(lo, first_block), min(hi, first_block + count)
            if mode == "update":
                if not valid[i]:
                    continue
            elif mode == "fill":
                if valid[i] or a != lo or b != hi:
                    continue
            else:
                raise UsageError(f"scrub record write mode {mode!r}")
            page = data[i * PER_PAGE:(i + 1) * PER_PAGE]
            page[a - p * PER_PAGE:b - p * PER_PAGE] = digests[a - first_block:b - first_block]
            table[i] = _page_sum(page, p)
            written += 1
        if written:
            os.pwrite(self.fd, data, self.data_off + pages.start * PAGE)
            os.pwrite(self.fd, table, self.table_off + pages.start * 8)
        return written

    def update_blocks(self, blocks: np.ndarray, digests: np.ndarray) -> int:
        """Set the digests of these blocks (ascending) in pages that hold digests already.

        Pages are read and written in clusters (neighbours within ``CLUSTER_GAP``
        pages go in one pread and one pwrite), so a delta of scattered blocks
        costs a few system calls per cluster, not per block.  Returns pages written.
        """
        if not len(blocks):
            return 0
        if int(blocks[0]) < 0 or int(blocks[-1]) >= self.nblocks:
            raise UsageError(f"scrub record {self.path}: blocks outside 0..{self.nblocks}")
        pages = np.unique(blocks // PER_PAGE)
        breaks = np.nonzero(np.diff(pages) > CLUSTER_GAP)[0] + 1
        written = 0
        for cluster in np.split(pages, breaks):
            p0, p1 = int(cluster[0]), int(cluster[-1]) + 1
            data, table, valid = self._load(range(p0, p1), count_damage=False)
            sel = (blocks >= p0 * PER_PAGE) & (blocks < p1 * PER_PAGE)
            local = blocks[sel] - p0 * PER_PAGE
            keep = valid[local // PER_PAGE]
            data[local[keep]] = digests[sel][keep]
            for p in cluster.tolist():
                if valid[p - p0]:
                    i = p - p0
                    table[i] = _page_sum(data[i * PER_PAGE:(i + 1) * PER_PAGE], p)
                    written += 1
            os.pwrite(self.fd, data, self.data_off + p0 * PAGE)
            os.pwrite(self.fd, table, self.table_off + p0 * 8)
        return written

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def set_cycle(self, cycle: int) -> None:
        """Pages first (``sync``), then this: the header never runs ahead of its pages."""
        os.pwrite(self.fd, self._header(self.block_size, self.nblocks, cycle, self.npages,
                                        self.table_bytes), 0)
        os.fdatasync(self.fd)
        self.cycle = cycle


def _drop(path: str, why: str) -> None:
    try:
        os.unlink(path)
        log.warning("scrub record %s dropped (%s); the next scrub starts a new baseline",
                    path, why)
    except FileNotFoundError:
        pass


# -- the apply hook ----------------------------------------------------------------------

def touched_blocks(staging_path: str, total: int, volumes) -> list[ExtentBitmap]:
    """Per member, the blocks the staged records of a delta cover.

    Reads record headers, and a SCATTER record's extent table (its payload
    starts with it: count u32, reserved u32, then offset u64, length u32,
    reserved u32 per extent, little-endian; docs/protocol.md), never data.
    """
    out = [ExtentBitmap(v.size // v.block_size) for v in volumes]

    def cover(member: int, offset: int, length: int) -> None:
        bs = volumes[member].block_size
        if offset + length > volumes[member].size:
            raise IntegrityError(f"staging {staging_path}: record beyond the volume")
        first, last = offset // bs, -(-(offset + length) // bs)
        if last > first:
            out[member].set_range(first, last - first)

    with open(staging_path, "rb") as f:
        pos = 0
        while pos < total:
            raw = f.read(STAGING_HEADER)
            if len(raw) != STAGING_HEADER:
                raise IntegrityError(f"staging {staging_path}: truncated at byte {pos}")
            magic, kind, _r, member, offset, length, _sum = _STAGING_HEAD.unpack(raw)
            if magic != b"CMSR" or member >= len(volumes):
                raise IntegrityError(f"staging {staging_path}: bad record at byte {pos}")
            pos += STAGING_HEADER
            if kind == REC_SCATTER:
                head = f.read(_SCATTER_HEAD.size)
                count = _SCATTER_HEAD.unpack(head)[0] if len(head) == _SCATTER_HEAD.size else 0
                table = f.read(_SCATTER_ENTRY.size * count)
                if not count or len(table) != _SCATTER_ENTRY.size * count:
                    raise IntegrityError(f"staging {staging_path}: bad SCATTER table at {pos}")
                for off, ln, _res in _SCATTER_ENTRY.iter_unpack(table):
                    cover(member, off, ln)
            else:
                cover(member, offset, length)
            if kind in (REC_DATA, REC_SCATTER):
                pos += length
            f.seek(pos)
    return out


def record_apply(mirror, c, previous: int) -> None:
    """Bring each member's record from cycle ``previous`` (the image's before this apply)
    to cycle ``c`` (``InFlight``); never raises.

    An RBD mirror (a backend with ``snapshot_hasher``) reads the touched blocks
    from the new cycle's snapshot; after a full cycle its record is dropped rather
    than rebuilt (that would read the whole image back from the cluster), so the
    next scrub makes a new baseline."""
    st = mirror.state
    hasher = getattr(mirror.backend, "snapshot_hasher", None)
    images = [mirror.backend.image_path_of(i) if hasher else mirror.image_path(i)
              for i in range(len(st.volumes))]
    paths = [record_path(image) for image in images]
    try:
        touched = None if c.full else touched_blocks(mirror.staging_file(c), c.staged_bytes,
                                                     st.volumes)
        for i, vol in enumerate(st.volumes):
            with RECORD_LOCKS(paths[i]):
                if c.full and hasher:
                    _drop(paths[i], "a full cycle was applied into RBD")
                elif c.full:
                    _rebuild(paths[i], images[i], vol, c.cycle)
                else:
                    _update(paths[i], hasher(i, c.cycle) if hasher else images[i], vol,
                            previous, c.cycle, touched[i])
    except Exception as exc:  # noqa: BLE001 - a record must never fail an apply
        for path in paths:
            with RECORD_LOCKS(path):
                _drop(path, f"{type(exc).__name__}: {exc}")


def _rebuild(path: str, image: str, vol, cycle: int) -> None:
    nblocks = vol.size // vol.block_size
    rec = ScrubRecord.create(path + ".new", vol.block_size, nblocks, cycle)
    try:
        fd = os.open(image, os.O_RDONLY)
        try:
            step = STEP_PAGES * PER_PAGE
            for b0 in range(0, nblocks, step):
                n = min(step, nblocks - b0)
                digests, _read = rangehash.hash_file_span(fd, b0 * vol.block_size,
                                                          n * vol.block_size, vol.block_size)
                rec.write(b0, digests, "fill")
        finally:
            os.close(fd)
        rec.sync()
    finally:
        rec.close()
    os.replace(path + ".new", path)
    fsync_dir(os.path.dirname(path) or ".")


def _update(path: str, image, vol, applied: int, cycle: int,
            touched: ExtentBitmap) -> None:
    """``image``: the image file's path, or an RBD snapshot's hasher
    (``digests(offset, length)``, ``close()``)."""
    try:
        if not os.path.exists(path):
            return  # no baseline yet: the next scrub makes one
        _update_record(path, image, vol, applied, cycle, touched)
    finally:
        if not isinstance(image, str):
            image.close()


def _update_record(path: str, image, vol, applied: int, cycle: int,
                   touched: ExtentBitmap) -> None:
    try:
        rec = ScrubRecord.open(path)
    except IntegrityError as exc:
        _drop(path, str(exc))
        return
    with rec:
        # A redo after a crash may find the state already at ``cycle`` (an in-place apply
        # says applied before its fsync, Mirror._redo): the record is then at the cycle
        # before, the only older one it can be at, since every apply updates or drops it.
        at_start = rec.cycle in (applied, cycle) or (applied == cycle and rec.cycle < cycle)
        if not at_start or rec.block_size != vol.block_size or \
                rec.nblocks != vol.size // vol.block_size:
            _drop(path, f"it describes cycle {rec.cycle}, the image was at {applied}")
            return
        bs = vol.block_size
        runs = touched.runs()
        if not len(runs):
            rec.set_cycle(cycle)
            return
        blocks, digests = _hash_runs(image, runs, bs)
        rec.update_blocks(blocks, digests)
        rec.sync()
        rec.set_cycle(cycle)


def _hash_runs(image, runs: np.ndarray, bs: int) -> tuple[np.ndarray, np.ndarray]:
    """(block numbers, digests) of the blocks in ``runs`` of the image.

    The blocks were just written, so they are read whole (a hole reads as zeroes:
    the same digest); a lone block, the common case of a scattered delta, takes
    one pread and one hash without any array in between.
    """
    blocks = np.empty(int(runs[:, 1].sum()), dtype=np.int64)
    digests = np.empty(len(blocks), dtype=np.uint64)
    if not isinstance(image, str):  # an RBD snapshot's hasher
        pos = 0
        for start, count in runs.tolist():
            blocks[pos:pos + count] = np.arange(start, start + count)
            digests[pos:pos + count] = image(start * bs, count * bs)
            pos += count
        return blocks, digests
    fd = os.open(image, os.O_RDONLY)
    try:
        pos = 0
        for start, count in runs.tolist():
            blocks[pos:pos + count] = np.arange(start, start + count)
            if count == 1:
                data = os.pread(fd, bs, start * bs)
                if len(data) != bs:
                    raise IntegrityError(f"mirror image {image} ends before block {start}")
                digests[pos] = xxhash.xxh3_64_intdigest(data)
            else:
                digests[pos:pos + count] = blockhash.hash_file(fd, start * bs, count * bs,
                                                               bs)[0]
            pos += count
    finally:
        os.close(fd)
    return blocks, digests


# -- the scrub ---------------------------------------------------------------------------

@dataclass
class ScrubOutcome:
    image: str
    offset: int
    length: int
    block_size: int
    bad: ExtentBitmap
    checked_blocks: int = 0
    unchecked_blocks: int = 0  # no digests recorded there yet: filled now (a baseline)
    damaged_pages: int = 0
    new_record: bool = False
    cycles: list = field(default_factory=list)
    bytes_read: int = 0
    duration: float = 0.0
    resumed_from: int = 0


def scrub_image(state_path: str, image_path: str, vol, *, offset: int = 0,
                length: int | None = None, rate: int = 0, resume_from: int | None = None,
                found: ExtentBitmap | None = None, on_progress: Callable | None = None,
                cancel: threading.Event | None = None,
                make_spans: Callable | None = None) -> ScrubOutcome:
    """Compare ``[offset, offset + length)`` of the image with its record (see above).

    The span is widened to whole record pages (512 blocks).  ``make_spans(throttle,
    check)``: the image's spans where it is not a file (RBD: ``RbdImageSpans``).
    """
    from cyclemirror.receiver.verify import ImageSpans

    bs = vol.block_size
    nblocks = vol.size // bs
    if length is None or length == 0:
        length = vol.size - offset
    if offset < 0 or length <= 0 or offset + length > vol.size:
        raise UsageError(f"scrub of {image_path}: --offset {offset} / --length {length} lie "
                         f"outside the image's {vol.size} bytes")
    first = offset // bs // PER_PAGE * PER_PAGE
    end_block = -(-(offset + length) // bs)
    stop = min(nblocks, -(-end_block // PER_PAGE) * PER_PAGE)
    start = first if resume_from is None else max(first, resume_from // bs)
    cancel = cancel or threading.Event()

    def check():
        if cancel.is_set():
            raise DeadlineError(f"scrub of {image_path} was cancelled")

    throttle = RateLimiter(rate).consume if rate else None
    spans = (make_spans(throttle, check) if make_spans is not None
             else ImageSpans(state_path, image_path, bs, throttle, check))
    path = record_path(image_path)
    out = ScrubOutcome(image_path, first * bs, (stop - first) * bs, bs,
                       found.copy() if found is not None else ExtentBitmap(nblocks),
                       resumed_from=(start - first) * bs)
    t0 = time.monotonic()
    step = STEP_PAGES * PER_PAGE
    last_progress = time.monotonic()
    for b0 in range(start, stop, step):
        n = min(step, stop - b0)
        for _ in range(SCRUB_TRIES):
            cycle, ft, digests = spans.hash_span(b0 * bs, n * bs)
            with RECORD_LOCKS(path):
                if spans.state_key() != (cycle, ft):
                    continue  # an apply came by since: the record may have moved on
                rec = _open_for(path, bs, nblocks, cycle, out)
                with rec:
                    theirs, known = rec.read(b0, n)
                    bad = np.nonzero(known & (theirs != digests))[0]
                    for i in bad.tolist():
                        out.bad.set_range(b0 + i, 1)
                    out.checked_blocks += int(known.sum())
                    out.unchecked_blocks += int(n - known.sum())
                    if not known.all() and rec.write(b0, digests, "fill"):
                        rec.sync()
                    out.damaged_pages += rec.damaged_pages
            out.cycles = [min(out.cycles[0], cycle), max(out.cycles[1], cycle)] \
                if out.cycles else [cycle, cycle]
            break
        else:
            raise DeadlineError(f"scrub of {image_path}: cycles kept applying over blocks "
                                f"{b0}+{n} through {SCRUB_TRIES} tries; scrub again later")
        if on_progress is not None and (time.monotonic() - last_progress >= 1.0
                                        or b0 + n >= stop):
            on_progress((b0 + n) * bs, out)
            last_progress = time.monotonic()
    out.bytes_read = spans.bytes_read
    out.duration = time.monotonic() - t0
    return out


def _open_for(path: str, bs: int, nblocks: int, cycle: int, out: ScrubOutcome) -> ScrubRecord:
    """The record at ``cycle``, or a new empty one in its place (lock held)."""
    try:
        rec = ScrubRecord.open(path)
    except FileNotFoundError:
        rec = None
    except IntegrityError as exc:
        log.warning("%s; starting a new one", exc)
        rec = None
    if rec is not None and (rec.cycle != cycle or rec.block_size != bs
                            or rec.nblocks != nblocks):
        log.warning("scrub record %s describes cycle %d, the image is at %d: starting a new "
                    "baseline", path, rec.cycle, cycle)
        rec.close()
        rec = None
    if rec is None:
        rec = ScrubRecord.create(path, bs, nblocks, cycle)
        out.new_record = True
    return rec
