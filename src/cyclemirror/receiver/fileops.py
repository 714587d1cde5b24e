"""Small durable-file helpers of the target: atomic replace and sparse copies.

Why here: every state change on the target is "write a temp file, fsync it,
rename it over the old one, fsync the directory", and zero runs become holes
so a mirror image stays sparse where the source volume is zero.
"""

from __future__ import annotations

import os

# The store already has these; the target shares them rather than keeping twins.
from cyclemirror.store.fileops import (  # noqa: F401 - re-exported for the receiver
    KernelCopier,
    atomic_write,
    data_runs,
    fsync_dir,
    pwrite_all,
)
from cyclemirror.store.fileops import punch_hole as punch_zeroes

__all__ = ["atomic_write", "copy_sparse", "fsync_dir", "punch_zeroes", "pwrite_all"]


def copy_sparse(src: str, dst: str) -> None:
    """Copy ``src`` to a new ``dst`` of the same size, data extents only (holes stay holes).

    Used to clone a mirror image that readers hold, so a delta can be applied
    into the copy; ``copy_file_range`` lets the kernel (or the file system)
    move the bytes (a reflink where the file system has it).  The caller fsyncs ``dst`` with everything else it writes.
    """
    sfd = os.open(src, os.O_RDONLY)
    try:
        size = os.fstat(sfd).st_size
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(dfd, size)
            copier = KernelCopier()  # reflink where the file system can, else copy_file_range
            for begin, end in data_runs(sfd, 0, size):
                copier.copy(sfd, dfd, begin, end - begin)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
