"""Thin wrappers over the Linux file calls the store needs, with clear errors.

Everything here works on raw file descriptors: positional I/O that loops over
short transfers (writes cut into page-cache-folio-sized pieces, in
cext/pagewrite.pyx), hole punching (fallocate PUNCH_HOLE, which Python's os module
does not expose, so it is compiled in cext/pagewrite.pyx too), the allocation map
through SEEK_DATA/SEEK_HOLE, kernel copies (FICLONERANGE reflink first, then
copy_file_range) and JSON state files replaced atomically (``cyclemirror.fileio``).
No store logic lives here.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
from collections.abc import Iterator

from cyclemirror._cext import pagewrite
from cyclemirror._cext.pagewrite import pwrite_pieces
from cyclemirror.errors import StoreError
from cyclemirror.fileio import atomic_write, fsync_dir
from cyclemirror.jsontext import loads_strict

__all__ = ["KernelCopier", "atomic_write", "atomic_write_json", "data_runs", "drop_cache",
           "fsync_dir", "pread_exact", "preadv_into", "punch_hole", "pwrite_all", "read_json",
           "store_error", "write_zero_bytes"]

# fallocate's answers for "this file system (or device) cannot do that here"
FALLOCATE_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})
# _IOW(0x94, 13, struct file_clone_range): the reflink-a-range ioctl.
_FICLONERANGE = 0x4020940D
_NO_CLONE_ERRNOS = {errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS}

# Every store write is cut at multiples of this in the file: 64 KiB is the piece in
# which copy_file_range (merges, swap fills, imports) fills the page cache, and the
# kernel sizes a new cached folio by the write that creates it. With one folio size in
# every file, the clean pages the page hand-over frees in base (Volume.write) can serve
# the new overlay's writes; a 1 MiB folio cannot be built from freed 64 KiB or 4 KiB
# ones, and without that memory each new page costs a host page fault on a VM whose
# free memory goes back to the host (docs/store.md, "Merge and the page cache").
WRITE_PIECE = 64 << 10


def store_error(what: str, exc: OSError) -> StoreError:
    """One place that turns an OSError into the StoreError a user sees."""
    hint = ""
    if exc.errno == errno.ENOSPC:
        hint = "; free space on the store's filesystem and retry"
    elif exc.errno == errno.EFBIG:
        hint = "; the filesystem cannot hold a file this large (ext4: under 16 TiB)"
    return StoreError(f"{what} failed: {exc.strerror or exc}{hint}")


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """Read exactly ``length`` bytes; all store files are sized, so short means broken."""
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise StoreError(
            f"short read of {length} bytes at offset {offset} (got {len(data)}): "
            "a layer file was truncated behind the store's back"
        )
    return data


def preadv_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``fd`` at ``offset``, looping over short reads."""
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise StoreError(
                f"short read at offset {offset}: a layer file was truncated behind the store's back"
            )
        view = view[n:]
        offset += n


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write all of ``data`` at ``offset``, one pwrite per WRITE_PIECE-aligned piece (see
    WRITE_PIECE); short writes and EINTR are retried, other failures raise OSError."""
    pwrite_pieces(fd, data, offset, WRITE_PIECE)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range (reads back as zeroes); falls back to writing zeroes where the
    file system cannot punch holes (e.g. a block device base)."""
    if length <= 0:
        return
    try:
        pagewrite.punch_hole(fd, offset, length)
    except OSError as exc:
        if exc.errno not in FALLOCATE_UNSUPPORTED:
            raise
        write_zero_bytes(fd, offset, length)


def write_zero_bytes(fd: int, offset: int, length: int) -> None:
    """Write ``length`` zero bytes at ``offset``, 1 MiB at a time (the range stays allocated)."""
    chunk = bytes(min(length, 1 << 20))
    end = offset + length
    while offset < end:
        n = min(len(chunk), end - offset)
        pwrite_all(fd, memoryview(chunk)[:n], offset)
        offset += n


def data_runs(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Yield allocated byte ranges (begin, end) of ``fd`` within [start, end), via SEEK_DATA/SEEK_HOLE."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                return
            raise
        if data >= end:
            return
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        yield data, min(hole, end)
        pos = hole


class KernelCopier:
    """Copies byte ranges between files in the kernel: reflink when it works, else copy_file_range.

    Remembers after the first refusal that reflink is unavailable so every later
    range goes straight to copy_file_range. Not shared between threads.
    """

    def __init__(self, try_reflink: bool = True):
        self.try_reflink = try_reflink
        self.reflinked_bytes = 0
        self.copied_bytes = 0

    def copy(self, src_fd: int, dst_fd: int, offset: int, length: int) -> None:
        if self.try_reflink:
            arg = struct.pack("=qQQQ", src_fd, offset, length, offset)
            try:
                fcntl.ioctl(dst_fd, _FICLONERANGE, arg)
                self.reflinked_bytes += length
                return
            except OSError as exc:
                if exc.errno not in _NO_CLONE_ERRNOS:
                    raise
                self.try_reflink = False
        end = offset + length
        pos = offset
        while pos < end:
            n = os.copy_file_range(src_fd, dst_fd, end - pos, pos, pos)
            if n <= 0:
                raise StoreError(
                    f"copy_file_range stopped at offset {pos} of {end}: the source file is short"
                )
            pos += n
        self.copied_bytes += length


def drop_cache(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to evict the clean cached pages of a range (a hint: dirty pages stay,
    the data on disk is untouched). Errors are ignored: only memory reuse depends on it."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def atomic_write_json(path: str, obj: dict) -> None:
    """Replace ``path`` with ``obj`` so that a crash leaves the old or the new file, never a mix."""
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode(), mode=0o644)


def read_json(path: str, what: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StoreError(f"cannot read {what} at {path}: {exc}; the file is damaged") from exc
    # loads_strict: deep nesting, NaN and 1e999 are damage too, not a RecursionError.
    obj = loads_strict(raw, f"{what} at {path} (the file is damaged)", StoreError)
    if not isinstance(obj, dict):
        raise StoreError(f"{what} at {path} is not a JSON object; the file is damaged")
    return obj
