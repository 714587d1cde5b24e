"""File writes without the GIL: pwrites cut at fixed aligned boundaries, and fallocate.

``punch_hole`` and ``zero_range`` are the package's only fallocate calls
(the store's ``fileops.punch_hole`` and the NBD raw-file backend both use
them): they release the GIL and raise OSError with the real errno, so a
caller can tell "not supported here" (EOPNOTSUPP) from a real failure.

Why pieces: the kernel sizes a new page-cache folio by the write that creates it.
A 1 MiB pwrite into an uncached range of a file on ext4 makes one 1 MiB folio,
copy_file_range makes 64 KiB folios (it moves data through a 16-page pipe) and
a 4 KiB write makes a 4 KiB one.  The store frees base's stale clean pages right
before a big first-touch write into the open overlay so that the kernel hands
that memory straight back (the page hand-over in ``Volume.write``); a freed folio
can only serve a new folio of its own size or smaller.  When the store's writes
are cut where the kernel's own copies cut, every file of a volume holds folios
of one size and the hand-over works whichever way base was last written
(docs/store.md, "Merge and the page cache").

``pwrite_pieces`` writes ``data`` at ``offset`` in pieces that end on multiples
of ``piece`` in the file: a write that fits inside one piece is a single pwrite.
Short writes and EINTR are retried; any other failure raises OSError with the
errno, after which the file holds some prefix of the data.

Nothing here keeps state between calls, so it is thread-safe.
"""

from libc.errno cimport EINTR, EIO, errno
from posix.types cimport off_t
from posix.unistd cimport pwrite


cdef extern from "<fcntl.h>" nogil:
    int fallocate(int fd, int mode, off_t offset, off_t length)
    int FALLOC_FL_KEEP_SIZE
    int FALLOC_FL_PUNCH_HOLE
    int FALLOC_FL_ZERO_RANGE

import os


def pwrite_pieces(int fd, const unsigned char[::1] data, off_t offset, Py_ssize_t piece):
    """Write all of ``data`` at ``offset``, one pwrite per ``piece``-aligned piece of the file."""
    if piece <= 0 or piece & (piece - 1):
        raise ValueError(f"piece must be a power of two, got {piece}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    cdef Py_ssize_t n = data.shape[0]
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t want
    cdef ssize_t done
    cdef int err = 0
    cdef off_t mask = piece - 1
    if n == 0:
        return
    with nogil:
        while pos < n:
            want = piece - <Py_ssize_t>((offset + pos) & mask)
            if want > n - pos:
                want = n - pos
            done = pwrite(fd, &data[pos], want, offset + pos)
            if done < 0:
                if errno == EINTR:
                    continue
                err = errno
                break
            if done == 0:  # not expected from a regular file or block device; never spin
                err = EIO
                break
            pos += done
    if err:
        raise OSError(err, f"{os.strerror(err)} (pwrite of {n} bytes at offset {offset}, "
                      f"stopped after {pos})")


cdef int _fallocate(int fd, int mode, off_t offset, off_t length, str what) except -1:
    cdef int rc
    cdef int err = 0
    with nogil:
        rc = fallocate(fd, mode, offset, length)
        if rc != 0:
            err = errno  # read before anything else can change it
    if rc != 0:
        raise OSError(err, f"{os.strerror(err)} (fallocate {what} at {offset}+{length})")
    return 0


def punch_hole(int fd, off_t offset, off_t length):
    """Deallocate [offset, offset+length) of a file, keeping its size; reads back as zeroes."""
    _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length, "PUNCH_HOLE")


def zero_range(int fd, off_t offset, off_t length):
    """Zero [offset, offset+length) of a file in place, keeping it allocated and its size."""
    _fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length, "ZERO_RANGE")
