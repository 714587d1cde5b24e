"""Block hashing and diffing: xxh3 of fixed-size blocks, all-zero marks, hash diffs.

Used where change tracking cannot be trusted: source and target each hash
their image block by block and only the blocks whose hashes differ are shipped.

Design
------
* One kernel, ``_hash_span``, hashes a contiguous span of whole blocks (the
  last one may be short) without the GIL.  ``hash_buffer`` calls it once for
  the whole buffer; ``hash_file`` calls it once per read buffer, and the whole
  read-and-hash loop runs without the GIL, so several threads hashing
  different ranges run in parallel.  The kernel never raises: it reports a
  failure by return code and the GIL-holding caller raises.
* Zero detection costs almost nothing: every all-zero block of one length has
  the same hash, so once one all-zero block has been seen, a block whose hash
  differs from that one is known to be non-zero without looking at its bytes.
  A block whose hash matches (or any block before the first zero block) is
  checked byte for byte, which stops at its first non-zero byte.
* 128-bit hashes are stored as ``(low64, high64)`` in a ``(n, 2)`` uint64 array,
  i.e. the integer is ``row[0] | row[1] << 64``.
* ``diff_hashes`` finds runs of differing blocks in C and then calls the
  bitmap's public ``set_range`` once per run, so it depends only on the
  ExtentBitmap Python API, not on its internals.

Nothing here keeps state between calls, so every function is thread-safe.
"""

from libc.errno cimport EINTR, errno
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free
from libc.string cimport memcmp, strerror
from posix.types cimport off_t
from posix.unistd cimport pread

import os
import stat

import numpy as np

from cyclemirror import errors


cdef extern from "stdlib.h" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)


cdef extern from "xxhash.h" nogil:
    ctypedef unsigned long long XXH64_hash_t
    ctypedef struct XXH128_hash_t:
        XXH64_hash_t low64
        XXH64_hash_t high64
    XXH64_hash_t XXH3_64bits(const void *data, size_t length)
    XXH128_hash_t XXH3_128bits(const void *data, size_t length)


# Largest block we accept: a block is hashed in one piece from one read buffer.
MAX_BLOCK_SIZE = 1 << 30
# hash_file reads this many bytes at a time (rounded to whole blocks): small
# enough that the bytes are still in L2 when the hash reads them back.
DEFAULT_READ_SIZE = 256 * 1024


cdef struct ZeroHash:
    # The hash of an all-zero full block, once one has been seen.
    bint known
    uint64_t low
    uint64_t high


cdef inline bint _all_zero(const unsigned char *p, size_t n) noexcept nogil:
    # Comparing the block with itself shifted by one byte stops at the first
    # non-zero byte, and glibc's memcmp is vectorised.
    if n == 0:
        return True
    return p[0] == 0 and memcmp(p, p + 1, n - 1) == 0


cdef void _hash_span(const unsigned char *p, size_t length, size_t block_size, int bits,
                     uint64_t *hashes, unsigned char *zero, ZeroHash *zh) noexcept nogil:
    """Hash ceil(length / block_size) blocks of p into hashes and zero."""
    cdef size_t pos = 0, n, i = 0
    cdef uint64_t low, high = 0
    cdef XXH128_hash_t h128
    cdef bint is_zero
    while pos < length:
        n = block_size if length - pos >= block_size else length - pos
        if bits == 64:
            low = XXH3_64bits(p + pos, n)
            hashes[i] = low
        else:
            h128 = XXH3_128bits(p + pos, n)
            low = h128.low64
            high = h128.high64
            hashes[2 * i] = low
            hashes[2 * i + 1] = high
        if n != block_size:
            is_zero = _all_zero(p + pos, n)
        elif zh.known and (low != zh.low or high != zh.high):
            is_zero = False
        else:
            is_zero = _all_zero(p + pos, n)
            if is_zero and not zh.known:
                zh.known = True
                zh.low = low
                zh.high = high
        zero[i] = is_zero
        pos += n
        i += 1


cdef int64_t _pread_full(int fd, unsigned char *buf, size_t n, off_t offset) noexcept nogil:
    """Read exactly n bytes; return n, the short count at end of file, or -errno."""
    cdef size_t done = 0
    cdef ssize_t got
    while done < n:
        got = pread(fd, buf + done, n - done, offset + <off_t>done)
        if got < 0:
            if errno == EINTR:
                continue
            return -errno
        if got == 0:
            break
        done += <size_t>got
    return <int64_t>done


cdef int64_t _hash_fd_range(int fd, uint64_t offset, uint64_t length, size_t block_size, int bits,
                            size_t read_size, uint64_t *hashes, unsigned char *zero,
                            uint64_t *bytes_done) noexcept nogil:
    """Read-and-hash loop for hash_file. Return 0, -errno, or 1 for end of file."""
    cdef unsigned char *buf = NULL
    cdef ZeroHash zh
    cdef uint64_t pos = 0
    cdef size_t want, blocks_done = 0
    cdef int64_t got
    zh.known = False
    zh.low = 0
    zh.high = 0
    if posix_memalign(<void **>&buf, 4096, read_size) != 0:
        return -12  # ENOMEM
    while pos < length:
        want = read_size if length - pos >= read_size else <size_t>(length - pos)
        got = _pread_full(fd, buf, want, <off_t>(offset + pos))
        if got < 0:
            free(buf)
            bytes_done[0] = pos
            return got
        if <size_t>got != want:
            free(buf)
            bytes_done[0] = pos + <uint64_t>got
            return 1
        _hash_span(buf, want, block_size, bits,
                   hashes + (2 * blocks_done if bits == 128 else blocks_done),
                   zero + blocks_done, &zh)
        blocks_done += (want + block_size - 1) // block_size
        pos += want
    free(buf)
    bytes_done[0] = pos
    return 0


cdef object _check_int(object value, str name, object low, object high):
    try:
        value = value.__index__()
    except AttributeError:
        raise errors.UsageError(
            f"blockhash: {name} must be an integer, got {type(value).__name__}") from None
    if value < low or value > high:
        raise errors.UsageError(
            f"blockhash: {name}={value} is outside [{low}, {high}]; pass a value in range")
    return value


cdef tuple _alloc_outputs(object nblocks, int bits):
    shape = (nblocks, 2) if bits == 128 else (nblocks,)
    hashes = np.empty(shape, dtype=np.uint64)
    zero = np.zeros(nblocks, dtype=np.bool_)
    return hashes, zero


def hash_buffer(buf, block_size, bits=64):
    """Hash buf in blocks of block_size bytes (the last block may be short).

    Return ``(hashes, zero)``: hashes is uint64 ``(n,)`` for bits=64 or
    ``(n, 2)`` as ``(low64, high64)`` for bits=128; zero is bool ``(n,)``,
    True where a block is all zero bytes.  buf is any C-contiguous buffer.
    """
    cdef size_t bs = _check_int(block_size, "block_size", 1, MAX_BLOCK_SIZE)
    cdef int nbits = _check_int(bits, "bits", 64, 128)
    if nbits != 64 and nbits != 128:
        raise errors.UsageError(f"blockhash: bits={nbits} is not supported; use 64 or 128")
    cdef const unsigned char[::1] data
    try:
        data = memoryview(buf).cast("B")
    except (TypeError, ValueError) as exc:
        raise errors.UsageError(
            f"blockhash: buf must be a C-contiguous bytes-like object ({exc})") from None
    cdef size_t length = data.shape[0]
    cdef size_t nblocks = (length + bs - 1) // bs
    hashes, zero = _alloc_outputs(nblocks, nbits)
    if nblocks == 0:
        return hashes, zero
    cdef uint64_t[::1] hv = hashes.reshape(-1)
    cdef unsigned char[::1] zv = zero.view(np.uint8)
    cdef ZeroHash zh
    zh.known = False
    zh.low = 0
    zh.high = 0
    with nogil:
        _hash_span(&data[0], length, bs, nbits, &hv[0], &zv[0], &zh)
    return hashes, zero


def hash_file(fd, offset, length, block_size, bits=64):
    """Hash ``length`` bytes of the open file fd from ``offset`` in blocks of block_size.

    Same result as ``hash_buffer(os.pread(fd, length, offset), ...)``, read with
    pread in whole-block pieces of about DEFAULT_READ_SIZE without the GIL.
    The range must lie inside the file: reaching end of file early raises
    UsageError, a read error raises StoreError.
    """
    cdef int cfd = _check_int(fd, "fd", 0, 2**31 - 1)
    cdef uint64_t off = _check_int(offset, "offset", 0, 2**63 - 1)
    cdef uint64_t ln = _check_int(length, "length", 0, 2**63 - 1 - off)
    cdef size_t bs = _check_int(block_size, "block_size", 1, MAX_BLOCK_SIZE)
    cdef int nbits = _check_int(bits, "bits", 64, 128)
    if nbits != 64 and nbits != 128:
        raise errors.UsageError(f"blockhash: bits={nbits} is not supported; use 64 or 128")
    # Refuse a range past the end of a regular file before sizing the outputs
    # by it (block devices report no size here; their reads stop at the end).
    try:
        st = os.fstat(cfd)
    except OSError as exc:
        raise errors.StoreError(
            f"blockhash: fd {cfd} cannot be inspected: {exc.strerror} (errno {exc.errno}); "
            "pass an open file") from None
    if ln and stat.S_ISREG(st.st_mode) and off + ln > <uint64_t>st.st_size:
        raise errors.UsageError(
            f"blockhash: fd {cfd} ends at byte {st.st_size}, before the end of the range "
            f"[{off}, {off + ln}) to hash; hash only bytes inside the file")
    cdef uint64_t nblocks = (ln + bs - 1) // bs
    hashes, zero = _alloc_outputs(nblocks, nbits)
    if nblocks == 0:
        return hashes, zero
    cdef uint64_t[::1] hv = hashes.reshape(-1)
    cdef unsigned char[::1] zv = zero.view(np.uint8)
    # Whole blocks per read so that no block straddles two reads.
    cdef size_t read_size = max(1, DEFAULT_READ_SIZE // bs) * bs
    cdef uint64_t done = 0
    cdef int64_t rc
    with nogil:
        rc = _hash_fd_range(cfd, off, ln, bs, nbits, read_size, &hv[0], &zv[0], &done)
    if rc == 1:
        raise errors.UsageError(
            f"blockhash: fd {cfd} ends at byte {off + done}, before the end of the range "
            f"[{off}, {off + ln}) to hash; hash only bytes inside the file")
    if rc < 0:
        raise errors.StoreError(
            f"blockhash: reading fd {cfd} at byte {off + done} failed: "
            f"{strerror(<int>-rc).decode()} (errno {-rc}); check the file and the device")
    return hashes, zero


cdef Py_ssize_t _find_runs(const uint64_t *a, const uint64_t *b, Py_ssize_t n, int width,
                           int64_t *runs) noexcept nogil:
    """Store (start, length) of each run of differing rows; return the run count.

    With runs == NULL only count.
    """
    cdef Py_ssize_t i = 0, j, start, nruns = 0
    cdef bint differ
    while i < n:
        differ = False
        for j in range(width):
            if a[i * width + j] != b[i * width + j]:
                differ = True
        if not differ:
            i += 1
            continue
        start = i
        i += 1
        while i < n:
            differ = False
            for j in range(width):
                if a[i * width + j] != b[i * width + j]:
                    differ = True
            if not differ:
                break
            i += 1
        if runs != NULL:
            runs[2 * nruns] = start
            runs[2 * nruns + 1] = i - start
        nruns += 1
    return nruns


def diff_hashes(a, b, nbits, first_block=0):
    """Return an ExtentBitmap(nbits) with bit first_block+i set where a[i] != b[i].

    a and b are hash arrays from hash_buffer/hash_file of one shape and of the
    same width (both 64 or both 128 bit).  The compared blocks must fit in the
    bitmap: first_block + len(a) > nbits raises BitmapRangeError.
    """
    if not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray):
        raise errors.UsageError("diff_hashes: a and b must be numpy arrays from hash_buffer/hash_file")
    if a.dtype != np.uint64 or b.dtype != np.uint64:
        raise errors.UsageError(
            f"diff_hashes: hash arrays must be uint64, got {a.dtype} and {b.dtype}")
    if a.shape != b.shape:
        raise errors.UsageError(
            f"diff_hashes: hash arrays differ in shape ({a.shape} vs {b.shape}); "
            "compare hashes of the same block count and width")
    if not (a.ndim == 1 or (a.ndim == 2 and a.shape[1] == 2)):
        raise errors.UsageError(
            f"diff_hashes: hash arrays must have shape (n,) or (n, 2), got {a.shape}")
    nbits_i = _check_int(nbits, "nbits", 0, 2**63 - 1)
    first = _check_int(first_block, "first_block", 0, 2**63 - 1)
    cdef Py_ssize_t n = a.shape[0]
    if first + n > nbits_i:
        raise errors.BitmapRangeError(
            f"diff_hashes: blocks [{first}, {first + n}) do not fit a bitmap of {nbits_i} bits; "
            "pass the volume's block count as nbits")
    # Imported here, not at module load, so hashing works (and builds) without
    # depending on the bitmap module's build order; a missing bitmap module
    # still fails loudly at the first diff.
    from cyclemirror._cext.bitmap import ExtentBitmap

    bitmap = ExtentBitmap(nbits_i)
    if n == 0:
        return bitmap
    cdef int width = 1 if a.ndim == 1 else 2
    cdef const uint64_t[::1] av = np.ascontiguousarray(a).reshape(-1)
    cdef const uint64_t[::1] bv = np.ascontiguousarray(b).reshape(-1)
    cdef Py_ssize_t nruns
    with nogil:
        nruns = _find_runs(&av[0], &bv[0], n, width, NULL)
    runs = np.empty((nruns, 2), dtype=np.int64)
    cdef int64_t[:, ::1] rv = runs
    if nruns:
        with nogil:
            _find_runs(&av[0], &bv[0], n, width, &rv[0, 0])
    for start, count in runs.tolist():
        bitmap.set_range(first + start, count)
    return bitmap
