"""File helpers of the target: sparse copies, and the shared ones it uses by name.

Zero runs become holes (``punch_zeroes``) so a mirror image stays sparse
where the source volume is zero.  The helpers themselves live in
``cyclemirror.fileio`` (``fsync_dir``; state files go through its
``atomic_write``) and ``cyclemirror.store.fileops``; this module only adds
``copy_sparse``.
"""

from __future__ import annotations

import os

# One home each (fileio, store.fileops); the target uses them rather than keeping twins.
from cyclemirror.fileio import fsync_dir
from cyclemirror.store.fileops import KernelCopier, data_runs, pwrite_all
from cyclemirror.store.fileops import punch_hole as punch_zeroes

__all__ = ["copy_sparse", "fsync_dir", "punch_zeroes", "pwrite_all"]


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
