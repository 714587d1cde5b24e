"""Copy-on-write file systems: which one a path is on, reflink snapshots, extent maps.

A file object (``store.fileobject``) is frozen by a reflink of the live file
(``FICLONE``): the clone shares every extent with the file at that instant, and
the file system's copy-on-write moves each later write of the application to
new blocks.  So what changed between two snapshots is exactly the ranges whose
physical mapping differs (the extents no longer shared); ``extent_map`` reads
the mapping with ``FS_IOC_FIEMAP`` and ``changed_ranges`` compares two maps.
``changed_ranges`` is pure (no I/O) and table-tested; anything the map cannot
vouch for (delayed allocation, inline or encoded data, an unknown location)
counts as changed, so the answer errs towards shipping more, never less.

Only XFS (made with reflink) and btrfs qualify: ``check_cow`` names any other
file system and says why it is refused and what to do instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
from collections.abc import Iterator

from cyclemirror.errors import StoreError, UsageError

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_ENCODED = 0x8
FIEMAP_EXTENT_NOT_ALIGNED = 0x100
FIEMAP_EXTENT_DATA_INLINE = 0x200
FIEMAP_EXTENT_DATA_TAIL = 0x400
FIEMAP_EXTENT_UNWRITTEN = 0x800
# A location these flags come with says nothing about the bytes: always "changed".
UNTRUSTED_FLAGS = (FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_NOT_ALIGNED
                   | FIEMAP_EXTENT_DATA_INLINE | FIEMAP_EXTENT_DATA_TAIL)
_FIEMAP_HEADER = struct.Struct("=QQIIII")
_FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")
FIEMAP_BATCH = 1024  # extents per ioctl

XFS_MAGIC = 0x58465342
BTRFS_MAGIC = 0x9123683E
_FS_NAMES = {XFS_MAGIC: "xfs", BTRFS_MAGIC: "btrfs", 0xEF53: "ext4", 0x01021994: "tmpfs",
             0x6969: "nfs", 0x794C7630: "overlayfs", 0x2FC12FC1: "zfs", 0x4D44: "vfat",
             0x65735546: "fuse"}
COW_FILESYSTEMS = ("xfs", "btrfs")


class _StatFs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("f_bsize", ctypes.c_long),
                ("rest", ctypes.c_byte * 112)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def filesystem_of(path: str) -> str:
    """The file system type of ``path`` ("xfs", "btrfs", "ext4", ... or "0x<magic>")."""
    buf = _StatFs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    magic = buf.f_type & 0xFFFFFFFF
    return _FS_NAMES.get(magic, f"0x{magic:x}")


def refusal(what: str, fs: str, why: str = "") -> UsageError:
    """The error for a file that cannot be frozen where it is."""
    return UsageError(
        f"{what} is on {fs}{why}: a live file can be frozen without stopping its writers "
        "only by a reflink snapshot, which needs copy-on-write. Keep it on XFS made with "
        "reflink (mkfs.xfs -m reflink=1) or on btrfs, or keep the data in a cyclemirror "
        "volume ('cyclemirror volume import') and let the application use it over NBD")


def check_cow(path: str, what: str) -> str:
    """Return the file system of ``path`` if it is XFS or btrfs, else the refusal."""
    fs = filesystem_of(path)
    if fs not in COW_FILESYSTEMS:
        raise refusal(what, fs, ", which has no copy-on-write")
    return fs


def clone_file(src_fd: int, dst_fd: int, what: str) -> None:
    """Make ``dst_fd`` a reflink of all of ``src_fd`` (one instant: the file system locks
    both inodes, so every write of the source lands wholly before or after it)."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV):
            raise refusal(what, "a file system that refused a reflink",
                          f" ({exc.strerror}; XFS made without -m reflink=1?)") from None
        hint = "; free space on that file system" if exc.errno == errno.ENOSPC else ""
        raise StoreError(f"reflink snapshot of {what} failed: {exc.strerror}{hint}") from None


def extent_map(fd: int, sync: bool = False) -> list[tuple[int, int, int, int]]:
    """Every mapped extent of the file: (logical, physical, length, flags), ascending.

    ``sync`` writes delayed allocations back first (otherwise they show as DELALLOC,
    which ``changed_ranges`` takes as changed)."""
    out: list[tuple[int, int, int, int]] = []
    start = 0
    flags = FIEMAP_FLAG_SYNC if sync else 0
    size = _FIEMAP_HEADER.size + FIEMAP_BATCH * _FIEMAP_EXTENT.size
    while True:
        buf = bytearray(size)
        _FIEMAP_HEADER.pack_into(buf, 0, start, (1 << 64) - 1 - start, flags, 0,
                                 FIEMAP_BATCH, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        mapped = _FIEMAP_HEADER.unpack_from(buf, 0)[3]
        if not 0 <= mapped <= FIEMAP_BATCH:
            raise StoreError(f"FIEMAP answered {mapped} extents for a batch of {FIEMAP_BATCH}")
        last = False
        for i in range(mapped):
            logical, physical, length, _r1, _r2, eflags, *_ = _FIEMAP_EXTENT.unpack_from(
                buf, _FIEMAP_HEADER.size + i * _FIEMAP_EXTENT.size)
            if out and logical < out[-1][0] + out[-1][2]:
                raise StoreError("FIEMAP answered overlapping or unordered extents")
            out.append((logical, physical, length, eflags))
            last = bool(eflags & FIEMAP_EXTENT_LAST)
        if mapped == 0 or last:
            return out
        start = out[-1][0] + out[-1][2]


def _keys(extents, bounds: list[int]) -> Iterator[object]:
    """For each piece [bounds[i], bounds[i+1]): what the map says is there (None = hole)."""
    i, n = 0, len(extents)
    for a in bounds[:-1]:
        while i < n and extents[i][0] + extents[i][2] <= a:
            i += 1
        if i == n or extents[i][0] > a:
            yield None
            continue
        logical, physical, length, flags = extents[i]
        if flags & UNTRUSTED_FLAGS:
            yield object()  # equal to nothing
        elif flags & FIEMAP_EXTENT_ENCODED:
            # Compressed: the location is the encoded extent's, not the byte's own.
            yield ("encoded", logical, physical, length)
        else:
            yield ("raw", physical + (a - logical), bool(flags & FIEMAP_EXTENT_UNWRITTEN))


def changed_ranges(old, new, size: int) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of [0, size) whose mapping differs between two extent
    maps (``extent_map`` results): what the file changed between the two snapshots."""
    bounds = {0, size}
    for ext in (*old, *new):
        for b in (ext[0], ext[0] + ext[2]):
            if 0 < b < size:
                bounds.add(b)
    edges = sorted(bounds)
    out: list[tuple[int, int]] = []
    for a, b, ko, kn in zip(edges[:-1], edges[1:], _keys(old, edges), _keys(new, edges),
                            strict=True):
        if ko is None and kn is None or ko == kn:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def data_ranges(extents, size: int) -> list[tuple[int, int]]:
    """Byte ranges of [0, size) that may hold data (mapped and not unwritten); the rest
    reads as zeroes."""
    out: list[tuple[int, int]] = []
    for logical, _physical, length, flags in extents:
        if flags & FIEMAP_EXTENT_UNWRITTEN and not flags & UNTRUSTED_FLAGS:
            continue
        a, b = max(0, logical), min(size, logical + length)
        if a >= b:
            continue
        if out and out[-1][1] >= a:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
