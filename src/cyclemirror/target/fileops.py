"""Small durable-file helpers: atomic replace, directory fsync, hole punching.

Why here: every state change on the target is "write a temp file, fsync it,
rename it over the old one, fsync the directory", and zero runs become holes
so a mirror image stays sparse where the source volume is zero.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_ZEROS = bytes(1 << 20)


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old or the new file."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def punch_zeroes(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeroes, as a hole where the FS allows."""
    if length <= 0:
        return
    rc = _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
    if rc == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise OSError(err, os.strerror(err))
    # The filesystem cannot punch holes: write the zeroes instead.
    end = offset + length
    while offset < end:
        n = min(len(_ZEROS), end - offset)
        os.pwrite(fd, _ZEROS[:n], offset)
        offset += n


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def copy_sparse(src: str, dst: str) -> None:
    """Copy ``src`` to a new ``dst`` of the same size, data extents only (holes stay holes).

    Used to clone a mirror image that readers hold, so a delta can be applied
    into the copy; ``copy_file_range`` lets the kernel (or the file system)
    move the bytes.  The caller fsyncs ``dst`` with everything else it writes.
    """
    sfd = os.open(src, os.O_RDONLY)
    try:
        size = os.fstat(sfd).st_size
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(dfd, size)
            pos = 0
            while pos < size:
                try:
                    start = os.lseek(sfd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:
                        break  # only a hole is left
                    raise
                end = os.lseek(sfd, start, os.SEEK_HOLE)
                off = start
                while off < end:
                    n = os.copy_file_range(sfd, dfd, end - off, off, off)
                    if n <= 0:
                        raise OSError(errno.EIO, f"copy_file_range of {src} stopped at {off}")
                    off += n
                pos = end
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
