"""Frames of the mirror protocol: the fixed header, payload checks, and extent packing.

The byte layout and the validation rules are in docs/protocol.md ("Frame
header"); this module is the only code that reads or writes them.

Design
------
* The header is 48 bytes, little-endian, and ends with an xxh3-64 of its own
  first 40 bytes, so a flipped bit in an offset is caught just like one in a
  payload (whose xxh3-64 of the raw bytes is also in the header).
* ``decode_header`` checks every field in layout order against the caller's
  ``FrameLimits`` and raises ``FrameError(field=...)`` naming the first bad
  one, and only then the header checksum (``ChecksumError``).  It allocates
  nothing but the small FrameHeader it returns; payload buffers are sized by
  the caller only from a header that passed these checks.
* ``decode_payload`` decompresses into a bytes object of exactly
  ``raw_length`` bytes (the decompressor can never write more) and verifies
  the checksum before returning.
* ``FramePacker.pack_extents`` reads each run with a single ``preadv`` whose
  vectors point straight into the payload area of each chunk's frame (a bytes
  object allocated at full size), so raw chunks are never copied.  Each chunk
  is hashed in place, compressed into a scratch buffer and copied back only
  when that made it smaller; the frame is then shrunk to fit.  Runs longer
  than MAX_READ bytes are read in pieces of whole chunks.  The read, hashing
  and compression of a piece all run without the GIL.
* A FramePacker holds only its settings; buffers and compression contexts
  belong to one call, so one packer may be used by many threads at once.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, _PyBytes_Resize
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.errno cimport EINTR, errno
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, strerror
from posix.types cimport off_t

from cyclemirror import errors


cdef extern from "sys/uio.h" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t preadv(int fd, const iovec *iov, int iovcnt, off_t offset)


cdef extern from "xxhash.h" nogil:
    ctypedef unsigned long long XXH64_hash_t
    XXH64_hash_t XXH3_64bits(const void *data, size_t length)


cdef extern from "lz4.h" nogil:
    int LZ4_compressBound(int inputSize)
    int LZ4_compress_default(const char *src, char *dst, int srcSize, int dstCapacity)
    int LZ4_decompress_safe(const char *src, char *dst, int compressedSize, int dstCapacity)


cdef extern from "zstd.h" nogil:
    ctypedef struct ZSTD_CCtx:
        pass
    size_t ZSTD_compressBound(size_t srcSize)
    unsigned ZSTD_isError(size_t code)
    const char *ZSTD_getErrorName(size_t code)
    ZSTD_CCtx *ZSTD_createCCtx()
    size_t ZSTD_freeCCtx(ZSTD_CCtx *cctx)
    size_t ZSTD_compressCCtx(ZSTD_CCtx *cctx, void *dst, size_t dstCapacity,
                             const void *src, size_t srcSize, int compressionLevel)
    size_t ZSTD_decompress(void *dst, size_t dstCapacity, const void *src, size_t compressedSize)
    int ZSTD_minCLevel()
    int ZSTD_maxCLevel()


HEADER_SIZE = 48
MAGIC = b"CMFR"
VERSION = 1

cdef enum:
    C_FT_DATA = 1
    C_FT_ZERO = 2
    C_FT_TRIM = 3
    C_FT_CONTROL = 4
    C_FT_SCATTER = 5
    C_CODEC_NONE = 0
    C_CODEC_LZ4 = 1
    C_CODEC_ZSTD = 2

FT_DATA = C_FT_DATA
FT_ZERO = C_FT_ZERO
FT_TRIM = C_FT_TRIM
FT_CONTROL = C_FT_CONTROL
FT_SCATTER = C_FT_SCATTER

CODEC_NONE = C_CODEC_NONE
CODEC_LZ4 = C_CODEC_LZ4
CODEC_ZSTD = C_CODEC_ZSTD

# The one defined flag: the last frame of a batch (the wire protocol says which batch).
FLAG_LAST = 0x01
FLAGS_RESERVED = 0xFE

# Largest run piece read by one preadv (whole chunks, at most IOV_MAX of them).
MAX_READ = 16 << 20
MAX_CHUNK_SIZE = 64 << 20
MAX_CYCLE = 2**63 - 1
MAX_OFFSET = 2**63 - 1
U32_MAX = 0xFFFFFFFF

cdef enum:
    C_HEADER_SIZE = 48
    C_CHECKED_BYTES = 40        # bytes covered by the header checksum
    C_SCATTER_HEAD = 8
    C_SCATTER_ENTRY = 16
    C_MAX_SCATTER = 1024
    C_IOV_MAX = 1024
    C_MAX_READ = 16 << 20

cdef const char *C_MAGIC = b"CMFR"

_TYPE_NAMES = {FT_DATA: "DATA", FT_ZERO: "ZERO", FT_TRIM: "TRIM", FT_CONTROL: "CONTROL",
               FT_SCATTER: "SCATTER"}

# A SCATTER payload (raw) starts with a table: count u32, reserved u32, then per
# extent offset u64, length u32, reserved u32; the extents' data follows in table order.
SCATTER_TABLE_HEAD = 8
SCATTER_ENTRY = 16
MAX_SCATTER_EXTENTS = 1024
_CODEC_NAMES = {CODEC_NONE: "NONE", CODEC_LZ4: "LZ4", CODEC_ZSTD: "ZSTD"}


# ---------------------------------------------------------------- byte order

cdef inline void _put_u32(unsigned char *p, uint32_t v) noexcept nogil:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF


cdef inline void _put_u64(unsigned char *p, uint64_t v) noexcept nogil:
    _put_u32(p, <uint32_t>(v & 0xFFFFFFFFu))
    _put_u32(p + 4, <uint32_t>(v >> 32))


cdef inline uint32_t _get_u32(const unsigned char *p) noexcept nogil:
    return (<uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16)
            | (<uint32_t>p[3] << 24))


cdef inline uint64_t _get_u64(const unsigned char *p) noexcept nogil:
    return <uint64_t>_get_u32(p) | (<uint64_t>_get_u32(p + 4) << 32)


cdef void _write_header(unsigned char *p, uint8_t ftype, uint8_t flags, uint8_t codec,
                        uint64_t cycle, uint64_t offset, uint32_t length,
                        uint32_t raw_length, uint64_t checksum) noexcept nogil:
    memcpy(p, C_MAGIC, 4)
    p[4] = 1  # VERSION
    p[5] = ftype
    p[6] = flags
    p[7] = codec
    _put_u64(p + 8, cycle)
    _put_u64(p + 16, offset)
    _put_u32(p + 24, length)
    _put_u32(p + 28, raw_length)
    _put_u64(p + 32, checksum)
    _put_u64(p + 40, XXH3_64bits(p, C_CHECKED_BYTES))


# ---------------------------------------------------------------- limits, header

cdef object _check_int(object value, str what, object low, object high):
    try:
        value = value.__index__()
    except AttributeError:
        raise errors.UsageError(
            f"frames: {what} must be an integer, got {type(value).__name__}") from None
    if value < low or value > high:
        raise errors.UsageError(
            f"frames: {what}={value} is outside [{low}, {high}]; pass a value in range")
    return value


cdef class FrameLimits:
    """Caps a decoder applies to every header before anything is allocated.

    max_payload: largest on-wire payload (bytes after the header);
    max_raw: largest uncompressed DATA chunk; max_control: largest CONTROL
    payload (uncompressed); volume_size: DATA/ZERO/TRIM must end inside it;
    alignment: DATA/ZERO/TRIM offsets, and lengths except one that ends exactly
    at volume_size, must be multiples of it (1 = no rule).  Immutable.
    """

    cdef readonly uint64_t max_payload, max_raw, max_control, volume_size, alignment

    def __init__(self, max_payload, max_raw, max_control, volume_size, alignment=1):
        self.max_payload = _check_int(max_payload, "FrameLimits.max_payload", 0, U32_MAX)
        self.max_raw = _check_int(max_raw, "FrameLimits.max_raw", 0, U32_MAX)
        self.max_control = _check_int(max_control, "FrameLimits.max_control", 0, U32_MAX)
        self.volume_size = _check_int(volume_size, "FrameLimits.volume_size", 0, MAX_OFFSET)
        self.alignment = _check_int(alignment, "FrameLimits.alignment", 1, 1 << 30)

    def __repr__(self):
        return (f"FrameLimits(max_payload={self.max_payload}, max_raw={self.max_raw}, "
                f"max_control={self.max_control}, volume_size={self.volume_size}, "
                f"alignment={self.alignment})")


cdef class FrameHeader:
    """A decoded header. Only decode_header makes ones that decode_payload accepts."""

    cdef readonly int type, flags, codec
    cdef readonly uint64_t cycle, offset, checksum
    cdef readonly uint32_t length, raw_length
    # Set only by decode_header: the fields passed the caller's limits, so
    # raw_length is safe to allocate.
    cdef bint validated

    def __repr__(self):
        return (f"FrameHeader(type={_TYPE_NAMES.get(self.type, self.type)}, flags={self.flags:#x}, "
                f"codec={_CODEC_NAMES.get(self.codec, self.codec)}, cycle={self.cycle}, "
                f"offset={self.offset}, length={self.length}, raw_length={self.raw_length}, "
                f"checksum={self.checksum:#018x})")

    def __eq__(self, other):
        if not isinstance(other, FrameHeader):
            return NotImplemented
        return self.as_tuple() == (<FrameHeader>other).as_tuple()

    def __hash__(self):
        return hash(self.as_tuple())

    def as_tuple(self):
        """(type, flags, codec, cycle, offset, length, raw_length, checksum)."""
        return (self.type, self.flags, self.codec, self.cycle, self.offset,
                self.length, self.raw_length, self.checksum)


def encode_header(ftype, flags, codec, cycle, offset, length, raw_length, checksum):
    """Return the HEADER_SIZE bytes of a header, its own checksum included.

    Checks that every value fits its field and that type, codec and flags are
    defined; the rules between fields are decode_header's job.
    """
    ftype = _check_int(ftype, "frame type", 0, 0xFF)
    codec = _check_int(codec, "codec", 0, 0xFF)
    if ftype not in _TYPE_NAMES:
        raise errors.UsageError(f"frames: unknown frame type {ftype!r}; use one of FT_*")
    if codec not in _CODEC_NAMES:
        raise errors.UsageError(f"frames: unknown codec {codec!r}; use one of CODEC_*")
    f = _check_int(flags, "flags", 0, 0xFF)
    if f & FLAGS_RESERVED:
        raise errors.UsageError(f"frames: flags={f:#x} sets reserved bits {FLAGS_RESERVED:#x}")
    cdef uint64_t c = _check_int(cycle, "cycle", 0, MAX_CYCLE)
    cdef uint64_t o = _check_int(offset, "offset", 0, MAX_OFFSET)
    cdef uint32_t ln = _check_int(length, "length", 0, U32_MAX)
    cdef uint32_t raw = _check_int(raw_length, "raw_length", 0, U32_MAX)
    cdef uint64_t ck = _check_int(checksum, "checksum", 0, 2**64 - 1)
    out = PyBytes_FromStringAndSize(NULL, C_HEADER_SIZE)
    _write_header(<unsigned char *>PyBytes_AS_STRING(out), ftype, f, codec, c, o, ln, raw, ck)
    return out


def frame_raw_length(frame):
    """The ``raw_length`` field of a whole frame this process built (bytes-like, header first).

    A DATA frame's raw (uncompressed) bytes, a ZERO or TRIM frame's extent
    length, a SCATTER frame's payload (table and data), a CONTROL frame's
    message length: what the sender counts as covered.  Only this module knows the header layout, so code outside it
    asks here instead of slicing bytes.  The frame is not re-verified (it is
    our own); one shorter than a header or without the magic is a UsageError.
    """
    cdef const unsigned char[::1] view = memoryview(frame).cast("B")
    if view.shape[0] < C_HEADER_SIZE or memcmp_magic(&view[0]) != 0:
        raise errors.UsageError(
            f"frames: frame_raw_length needs a whole frame ({view.shape[0]} bytes given)")
    return _get_u32(&view[0] + 28)


cdef inline bint _is_aligned(uint64_t value, uint64_t alignment) noexcept nogil:
    return alignment <= 1 or value % alignment == 0


cdef _bad(str field, str what):
    raise errors.FrameError(f"frame header: {field} {what}; closing the connection", field=field)


def decode_header(buf, FrameLimits limits not None):
    """Parse and validate the first HEADER_SIZE bytes of buf against limits.

    Raises FrameError(field=<first bad field>) or ChecksumError(field="header_checksum").
    """
    cdef const unsigned char[::1] view
    try:
        view = memoryview(buf).cast("B")
    except (TypeError, ValueError) as exc:
        raise errors.UsageError(f"frames: header buffer must be bytes-like ({exc})") from None
    if view.shape[0] < C_HEADER_SIZE:
        _bad("header", f"is {view.shape[0]} bytes, shorter than {C_HEADER_SIZE}")
    cdef const unsigned char *p = &view[0]
    if memcmp_magic(p) != 0:
        _bad("magic", f"is {bytes(view[:4])!r}, not {MAGIC!r} (not a cyclemirror frame)")
    if p[4] != VERSION:
        _bad("version", f"is {p[4]}, this side speaks only version {VERSION}")
    cdef int ftype = p[5], flags = p[6], codec = p[7]
    if ftype not in _TYPE_NAMES:
        _bad("type", f"{ftype} is not a known frame type")
    if flags & FLAGS_RESERVED:
        _bad("flags", f"{flags:#x} sets reserved bits {FLAGS_RESERVED:#x}")
    if codec not in _CODEC_NAMES:
        _bad("codec", f"{codec} is not a known codec")
    cdef uint64_t cycle = _get_u64(p + 8), offset = _get_u64(p + 16)
    cdef uint32_t length = _get_u32(p + 24), raw_length = _get_u32(p + 28)
    cdef uint64_t checksum = _get_u64(p + 32), header_checksum = _get_u64(p + 40)
    cdef bint extent = ftype != FT_CONTROL
    cdef str name = _TYPE_NAMES[ftype]
    if cycle > MAX_CYCLE:
        _bad("cycle", f"{cycle} exceeds {MAX_CYCLE}")
    cdef bint carries = ftype == FT_DATA or ftype == FT_SCATTER  # an extent with a payload
    if extent and codec != CODEC_NONE and not carries:
        _bad("codec", f"{_CODEC_NAMES[codec]} on a {name} frame, which has no payload")
    # offset
    if not extent:
        if offset != 0:
            _bad("offset", f"{offset} on a CONTROL frame must be 0")
    else:
        if offset > limits.volume_size:
            _bad("offset", f"{offset} is beyond the volume size {limits.volume_size}")
        if not _is_aligned(offset, limits.alignment):
            _bad("offset", f"{offset} is not a multiple of the alignment {limits.alignment}")
    # raw_length
    if not extent:
        if raw_length > limits.max_control:
            _bad("raw_length", f"{raw_length} exceeds the CONTROL cap {limits.max_control}")
    else:
        if raw_length == 0:
            _bad("raw_length", f"is 0 on a {name} frame")
        if carries and raw_length > limits.max_raw:
            _bad("raw_length", f"{raw_length} exceeds the {name} cap {limits.max_raw}")
        if ftype == FT_SCATTER:
            # The payload is a table and scattered extents: scatter_check validates them.
            if raw_length < C_SCATTER_HEAD + C_SCATTER_ENTRY + 1:
                _bad("raw_length", f"{raw_length} is too short for a SCATTER table and data")
        elif raw_length > limits.volume_size - offset:
            _bad("raw_length", f"{raw_length} at offset {offset} runs past the volume "
                 f"size {limits.volume_size}")
        elif (not _is_aligned(raw_length, limits.alignment)
                and offset + raw_length != limits.volume_size):
            _bad("raw_length", f"{raw_length} is not a multiple of the alignment "
                 f"{limits.alignment} and does not end the volume")
    # length (bytes of payload on the wire)
    if ftype == FT_ZERO or ftype == FT_TRIM:
        if length != 0:
            _bad("length", f"{length} on a {name} frame must be 0 (no payload)")
    else:
        if length > limits.max_payload:
            _bad("length", f"{length} exceeds the payload cap {limits.max_payload}")
        if codec == CODEC_NONE and length != raw_length:
            _bad("length", f"{length} differs from raw_length {raw_length} of an uncompressed frame")
        if codec != CODEC_NONE and (length == 0 or length >= raw_length):
            _bad("length", f"{length} of a compressed frame must be in [1, raw_length={raw_length})")
    if (ftype == FT_ZERO or ftype == FT_TRIM) and checksum != 0:
        _bad("checksum", f"{checksum:#x} on a {name} frame must be 0")
    if XXH3_64bits(p, C_CHECKED_BYTES) != header_checksum:
        raise errors.ChecksumError(
            "frame header: header_checksum does not match the header bytes (corrupted in "
            "transit); closing the connection", field="header_checksum")
    cdef FrameHeader h = FrameHeader.__new__(FrameHeader)
    h.type = ftype
    h.flags = flags
    h.codec = codec
    h.cycle = cycle
    h.offset = offset
    h.length = length
    h.raw_length = raw_length
    h.checksum = checksum
    h.validated = True
    return h


cdef inline int memcmp_magic(const unsigned char *p) noexcept nogil:
    return 0 if (p[0] == C_MAGIC[0] and p[1] == C_MAGIC[1] and p[2] == C_MAGIC[2]
                 and p[3] == C_MAGIC[3]) else 1


def encode_control(cycle, payload):
    """Return a whole CONTROL frame (header + payload), uncompressed."""
    cdef const unsigned char[::1] data
    try:
        data = memoryview(payload).cast("B")
    except (TypeError, ValueError) as exc:
        raise errors.UsageError(f"frames: control payload must be bytes-like ({exc})") from None
    cdef size_t n = data.shape[0]
    if n > U32_MAX:
        raise errors.UsageError(f"frames: control payload of {n} bytes exceeds {U32_MAX}")
    cdef uint64_t c = _check_int(cycle, "cycle", 0, MAX_CYCLE)
    out = PyBytes_FromStringAndSize(NULL, C_HEADER_SIZE + n)
    cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(out)
    cdef uint64_t ck = XXH3_64bits(&data[0] if n else NULL, n)
    if n:
        memcpy(p + C_HEADER_SIZE, &data[0], n)
    _write_header(p, FT_CONTROL, 0, CODEC_NONE, c, 0, <uint32_t>n, <uint32_t>n, ck)
    return out


def encode_zero(ftype, cycle, offset, length):
    """Return the header of a ZERO or TRIM record for [offset, offset+length); no payload.

    length must fit 32 bits: callers split longer runs.
    """
    ftype = _check_int(ftype, "frame type", 0, 0xFF)
    if ftype != FT_ZERO and ftype != FT_TRIM:
        raise errors.UsageError(f"frames: encode_zero needs FT_ZERO or FT_TRIM, got {ftype!r}")
    ln = _check_int(length, "length", 1, U32_MAX)
    return encode_header(ftype, 0, CODEC_NONE, cycle, offset, 0, ln, 0)


def decode_payload(FrameHeader header not None, payload):
    """Return the raw bytes of a frame's payload, decompressed and verified.

    header must come from decode_header (its lengths passed the caps).
    Raises FrameError(field="length") for a payload of the wrong size,
    FrameError(field="payload") for one that does not decompress to exactly
    raw_length bytes, ChecksumError(field="checksum") for a checksum mismatch.
    """
    return _decode_payload(header, payload, False)


def verify_payload(FrameHeader header not None, payload):
    """decode_payload for a receiver that hands its payload buffer over.

    Same checks and errors as decode_payload, but an uncompressed payload is
    verified in place and returned as the very object passed in (a receive
    buffer, bytearray or bytes) instead of a copy: at chunk sizes that copy
    was a third of the receiver's CPU.  The caller must not reuse or change
    that buffer afterwards.  A compressed payload is decompressed into a new
    ``new_aligned_buffer`` (a memoryview, ready for O_DIRECT), so its input
    buffer may be reused at once.  ZERO and TRIM frames give b"".
    """
    return _decode_payload(header, payload, True)


# ---------------------------------------------------------------- scatter payloads

cdef extern from "unistd.h" nogil:
    ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset)


cdef int _scatter_parse(const unsigned char *p, size_t raw, uint64_t volume_size,
                        uint64_t alignment, uint32_t *count_out, size_t *table_out) noexcept nogil:
    """Check a SCATTER raw payload; return 0 or the number of the first failed rule."""
    if raw < C_SCATTER_HEAD:
        return 1
    cdef uint32_t count = _get_u32(p)
    if count == 0 or count > C_MAX_SCATTER or _get_u32(p + 4) != 0:
        return 2
    cdef size_t table = C_SCATTER_HEAD + C_SCATTER_ENTRY * <size_t>count
    if table > raw:
        return 3
    cdef uint64_t prev_end = 0, off, total = 0
    cdef uint32_t ln, i
    cdef const unsigned char *e
    for i in range(count):
        e = p + C_SCATTER_HEAD + C_SCATTER_ENTRY * i
        off = _get_u64(e)
        ln = _get_u32(e + 8)
        if ln == 0 or _get_u32(e + 12) != 0:
            return 4
        if (i and off < prev_end) or off > volume_size or ln > volume_size - off:
            return 5
        if not _is_aligned(off, alignment) or (
                not _is_aligned(ln, alignment) and off + ln != volume_size):
            return 6
        prev_end = off + ln
        total += ln
    if total != raw - table:
        return 7
    count_out[0] = count
    table_out[0] = table
    return 0


_SCATTER_RULES = {
    1: "is shorter than its table head",
    2: "has an extent count of 0 or over MAX_SCATTER_EXTENTS, or a reserved field set",
    3: "has a table longer than the payload",
    4: "has an extent of length 0 or a reserved field set",
    5: "has extents that are not ascending, overlap, or run past the volume",
    6: "has an extent that is not aligned to the block size",
    7: "has data that does not add up to the extents' lengths",
}


cdef object _scatter_view(raw, volume_size, alignment, uint32_t *count, size_t *table):
    """The payload as a checked byte memoryview; count and table size through the pointers."""
    cdef uint64_t vs = _check_int(volume_size, "volume_size", 0, MAX_OFFSET)
    cdef uint64_t al = _check_int(alignment, "alignment", 1, 1 << 30)
    cdef const unsigned char[::1] view
    try:
        view = memoryview(raw).cast("B")
    except (TypeError, ValueError) as exc:
        raise errors.UsageError(f"frames: scatter payload must be bytes-like ({exc})") from None
    cdef size_t n = view.shape[0]
    cdef int rule
    with nogil:
        rule = _scatter_parse(&view[0] if n else NULL, n, vs, al, count, table)
    if rule:
        raise errors.FrameError(
            f"SCATTER payload of {n} bytes {_SCATTER_RULES[rule]}; closing the connection",
            field="payload")
    return view


def scatter_check(raw, volume_size, alignment=1):
    """Validate a SCATTER frame's verified raw payload against one volume.

    Returns (first offset, extent count, data bytes).  Raises FrameError(field="payload")
    naming the rule broken: the table must hold 1..MAX_SCATTER_EXTENTS extents,
    each non-empty, aligned (a length may be unaligned only at the volume's end),
    ascending without overlap, inside the volume, and their lengths must add up
    to the data that follows the table.
    """
    cdef const unsigned char[::1] view
    cdef uint32_t count = 0
    cdef size_t table = 0
    view = _scatter_view(raw, volume_size, alignment, &count, &table)
    return _get_u64(&view[0] + C_SCATTER_HEAD), count, view.shape[0] - table


def scatter_extents(raw, volume_size, alignment=1):
    """[(offset, length), ...] of a SCATTER raw payload (validated as in scatter_check)."""
    cdef const unsigned char[::1] view
    cdef uint32_t count = 0, i
    cdef size_t table = 0
    view = _scatter_view(raw, volume_size, alignment, &count, &table)
    cdef const unsigned char *e
    out = []
    for i in range(count):
        e = &view[0] + C_SCATTER_HEAD + C_SCATTER_ENTRY * i
        out.append((_get_u64(e), _get_u32(e + 8)))
    return out


def scatter_write(fd, raw, volume_size, alignment=1):
    """Write every extent of a SCATTER raw payload into fd at its offset; return data bytes.

    Validates first (scatter_check's rules) and writes nothing from a bad table;
    the writes run without the GIL, one pwrite per extent.  An I/O error raises
    OSError with its errno (the caller knows which file it is).
    """
    cdef int cfd = _check_int(fd, "fd", 0, 2**31 - 1)
    cdef const unsigned char[::1] view
    cdef uint32_t count = 0, i
    cdef size_t table = 0, pos, left
    view = _scatter_view(raw, volume_size, alignment, &count, &table)
    cdef size_t n = view.shape[0]
    cdef const unsigned char *p = &view[0]
    cdef const unsigned char *e
    cdef uint64_t off
    cdef ssize_t got
    cdef int err = 0
    with nogil:
        pos = table
        for i in range(count):
            e = p + C_SCATTER_HEAD + C_SCATTER_ENTRY * i
            off = _get_u64(e)
            left = _get_u32(e + 8)
            while left:
                got = pwrite(cfd, p + pos, left, <off_t>off)
                if got < 0:
                    if errno == EINTR:
                        continue
                    err = errno
                    break
                pos += <size_t>got
                off += <uint64_t>got
                left -= <size_t>got
            if err:
                break
    if err:
        raise OSError(err, strerror(err).decode())
    return n - table


def new_payload_buffer(n):
    """A bytearray of ``n`` bytes whose content is NOT initialised.

    For a receiver about to fill every byte (``recv_into``): bytearray(n)
    would zero megabytes per chunk first.  n is a length from a header that
    passed decode_header, so it is already capped; 0 <= n < 2**32 is checked.
    """
    cdef object size = _check_int(n, "payload buffer size", 0, 0xFFFFFFFF)
    return PyByteArray_FromStringAndSize(NULL, <Py_ssize_t>size)


# Payload buffers a receiver writes to disk with O_DIRECT start at this alignment.
BUFFER_ALIGN = 4096


def new_aligned_buffer(n):
    """A writable memoryview of ``n`` uninitialised bytes starting at a BUFFER_ALIGN boundary.

    For payloads that end up in an O_DIRECT write (which needs an aligned
    address): a bytearray of n + BUFFER_ALIGN - 1 bytes, viewed from its
    first aligned byte.  The view keeps the bytearray alive (and unresizable).
    """
    cdef object size = _check_int(n, "payload buffer size", 0, 0xFFFFFFFF)
    buf = PyByteArray_FromStringAndSize(NULL, <Py_ssize_t>size + BUFFER_ALIGN - 1)
    cdef uintptr_t address = <uintptr_t>PyByteArray_AS_STRING(buf)
    cdef Py_ssize_t skip = <Py_ssize_t>((BUFFER_ALIGN - address % BUFFER_ALIGN) % BUFFER_ALIGN)
    return memoryview(buf)[skip:skip + size]


def is_aligned(buf, alignment):
    """True if the bytes-like ``buf`` starts at a multiple of ``alignment`` (a power of two)."""
    cdef uintptr_t a = _check_int(alignment, "alignment", 1, 1 << 30)
    if a & (a - 1):
        raise errors.UsageError(f"is_aligned: alignment {alignment} is not a power of two")
    cdef const unsigned char[::1] view = memoryview(buf).cast("B")
    if view.shape[0] == 0:
        return True
    return (<uintptr_t>&view[0]) % a == 0


cdef object _decode_payload(FrameHeader header, payload, bint borrow):
    if not header.validated:
        raise errors.UsageError(
            "frames: decode_payload needs a FrameHeader returned by decode_header")
    cdef const unsigned char[::1] data
    try:
        data = memoryview(payload).cast("B")
    except (TypeError, ValueError) as exc:
        raise errors.UsageError(f"frames: payload must be bytes-like ({exc})") from None
    cdef size_t n = data.shape[0]
    if n != header.length:
        raise errors.FrameError(
            f"frame payload: got {n} bytes but the header says length={header.length}; "
            "closing the connection", field="length")
    if header.type == FT_ZERO or header.type == FT_TRIM:
        return b""
    cdef size_t raw = header.raw_length
    cdef const char *src = <const char *>&data[0] if n else NULL
    cdef const char *rp = src
    cdef int lz4_got = 0
    cdef size_t zstd_got = 0
    cdef char *dst
    cdef unsigned char[::1] view_out
    if header.codec == CODEC_NONE:
        if borrow:
            out = payload  # verified in place below, handed back without a copy
        else:
            # A bytes payload is immutable: hand it back as is instead of copying.
            out = payload if type(payload) is bytes else bytes(data)
            rp = PyBytes_AS_STRING(out)
    else:
        if borrow:
            # The receiver's output goes to disk: an aligned buffer lets it go by O_DIRECT.
            out = new_aligned_buffer(raw)
            view_out = out
            dst = <char *>&view_out[0] if raw else NULL
        else:
            out = PyBytes_FromStringAndSize(NULL, raw)
            dst = PyBytes_AS_STRING(out)
        rp = dst
        if header.codec == CODEC_LZ4:
            with nogil:
                lz4_got = LZ4_decompress_safe(src, dst, <int>n, <int>raw)
            if lz4_got != <int>raw:
                raise errors.FrameError(
                    f"frame payload: lz4 data at offset {header.offset} does not decompress to "
                    f"raw_length={raw} bytes (got {lz4_got}); closing the connection",
                    field="payload")
        else:
            with nogil:
                zstd_got = ZSTD_decompress(dst, raw, src, n)
            if ZSTD_isError(zstd_got) or zstd_got != raw:
                why = (ZSTD_getErrorName(zstd_got).decode() if ZSTD_isError(zstd_got)
                       else f"got {zstd_got} bytes")
                raise errors.FrameError(
                    f"frame payload: zstd data at offset {header.offset} does not decompress to "
                    f"raw_length={raw} bytes ({why}); closing the connection", field="payload")
    cdef uint64_t ck
    with nogil:
        ck = XXH3_64bits(rp, raw)
    if ck != header.checksum:
        raise errors.ChecksumError(
            f"frame payload: xxh3 of the {raw} raw bytes at offset {header.offset} is {ck:#x}, "
            f"header says {header.checksum:#x} (corrupted); closing the connection",
            field="checksum")
    return out


# ---------------------------------------------------------------- packing

cdef struct Chunk:
    unsigned char *frame      # start of the frame's bytes object (header, then payload)
    uint64_t offset           # where the chunk's bytes are in the file
    uint64_t checksum         # xxh3-64 of the raw bytes
    size_t raw_length
    size_t length             # payload length after compression (or raw)
    uint8_t codec


cdef int64_t _preadv_full(int fd, iovec *iov, int count, off_t offset) noexcept nogil:
    """Fill every vector; return 0, -errno, or the offset where end of file came early (+1)."""
    cdef ssize_t got
    cdef int first = 0
    cdef size_t left
    while first < count:
        got = preadv(fd, iov + first, count - first, offset)
        if got < 0:
            if errno == EINTR:
                continue
            return -errno
        if got == 0:
            return <int64_t>offset + 1
        offset += got
        left = <size_t>got
        # A short read (rare on regular files): skip the filled vectors and retry.
        while first < count and left >= iov[first].iov_len:
            left -= iov[first].iov_len
            first += 1
        if first < count and left:
            iov[first].iov_base = <char *>iov[first].iov_base + left
            iov[first].iov_len -= left
    return 0


cdef int _finish_chunks(Chunk *chunks, int count, int codec, int level, uint64_t cycle,
                        char *scratch, size_t scratch_size, ZSTD_CCtx *cctx,
                        size_t *zstd_error, uint8_t ftype=C_FT_DATA) noexcept nogil:
    """Hash each chunk's raw payload, compress it in place when that shrinks it, write
    its header. Return 0 or -1 for a zstd error."""
    cdef int i
    cdef size_t got
    cdef int lz4_got
    cdef char *payload
    for i in range(count):
        payload = <char *>chunks[i].frame + C_HEADER_SIZE
        chunks[i].checksum = XXH3_64bits(payload, chunks[i].raw_length)
        chunks[i].codec = C_CODEC_NONE
        chunks[i].length = chunks[i].raw_length
        if codec == C_CODEC_LZ4:
            lz4_got = LZ4_compress_default(payload, scratch, <int>chunks[i].raw_length,
                                           <int>scratch_size)
            got = <size_t>lz4_got if lz4_got > 0 else chunks[i].raw_length
        elif codec == C_CODEC_ZSTD:
            got = ZSTD_compressCCtx(cctx, scratch, scratch_size, payload,
                                    chunks[i].raw_length, level)
            if ZSTD_isError(got):
                zstd_error[0] = got
                return -1
        else:
            got = chunks[i].raw_length
        if got < chunks[i].raw_length:
            memcpy(payload, scratch, got)
            chunks[i].codec = <uint8_t>codec
            chunks[i].length = got
        _write_header(chunks[i].frame, ftype, 0, chunks[i].codec, cycle, chunks[i].offset,
                      <uint32_t>chunks[i].length, <uint32_t>chunks[i].raw_length,
                      chunks[i].checksum)
    return 0


cdef tuple _extent_arg(str caller, Py_ssize_t index, object extent, object max_length):
    """(offset, length) of one extent argument, checked: a UsageError names what is wrong."""
    try:
        ext_offset, ext_length = extent
    except (TypeError, ValueError):
        raise errors.UsageError(
            f"{caller}: extent #{index} is {extent!r}, not (offset, length)") from None
    off = _check_int(ext_offset, f"extent #{index} offset", 0, MAX_OFFSET)
    ln = _check_int(ext_length, f"extent #{index} length", 1, min(max_length, MAX_OFFSET - off))
    return off, ln


cdef class FramePacker:
    """Packs extents of a file into DATA frames: FramePacker(codec, level=0, chunk_size=1 MiB).

    level: 0 for the codec's default; zstd takes ZSTD_minCLevel()..ZSTD_maxCLevel(),
    lz4 and none take only 0.  Holds no buffers, so it is safe to share between threads.
    """

    cdef readonly int codec, level
    cdef readonly size_t chunk_size

    def __init__(self, codec, level=0, chunk_size=1 << 20):
        codec = _check_int(codec, "codec", 0, 0xFF)
        if codec not in _CODEC_NAMES:
            raise errors.UsageError(f"FramePacker: unknown codec {codec!r}; use one of CODEC_*")
        self.codec = codec
        if codec == CODEC_ZSTD:
            self.level = _check_int(level, "zstd level", ZSTD_minCLevel(), ZSTD_maxCLevel())
        else:
            self.level = _check_int(level, f"{_CODEC_NAMES[codec]} level", 0, 0)
        self.chunk_size = _check_int(chunk_size, "chunk_size", 1, MAX_CHUNK_SIZE)

    def __repr__(self):
        return (f"FramePacker(codec={_CODEC_NAMES[self.codec]}, level={self.level}, "
                f"chunk_size={self.chunk_size})")

    def pack_extents(self, fd, extents, cycle):
        """Return a list of whole DATA frames (bytes) for extents [(offset, length), ...] of fd.

        Each run is read with one preadv (runs above MAX_READ in pieces),
        cut into chunk_size chunks, each compressed when that makes it smaller,
        each with the xxh3-64 of its raw bytes.  A run past end of file raises
        UsageError; a read error raises StoreError.
        """
        cdef int cfd = _check_int(fd, "fd", 0, 2**31 - 1)
        cdef uint64_t c = _check_int(cycle, "cycle", 0, MAX_CYCLE)
        cdef size_t piece_max = min(<size_t>C_MAX_READ, <size_t>C_IOV_MAX * self.chunk_size)
        piece_max -= piece_max % self.chunk_size
        if piece_max == 0:
            piece_max = self.chunk_size
        cdef size_t scratch_size = 0
        if self.codec == CODEC_LZ4:
            scratch_size = LZ4_compressBound(<int>self.chunk_size)
        elif self.codec == CODEC_ZSTD:
            scratch_size = ZSTD_compressBound(self.chunk_size)
        cdef char *scratch = NULL
        cdef ZSTD_CCtx *cctx = NULL
        cdef Chunk *chunks = <Chunk *>malloc(C_IOV_MAX * sizeof(Chunk))
        cdef iovec *iov = <iovec *>malloc(C_IOV_MAX * sizeof(iovec))
        frames = []
        try:
            if chunks == NULL or iov == NULL:
                raise MemoryError()
            if scratch_size:
                scratch = <char *>malloc(scratch_size)
                if scratch == NULL:
                    raise MemoryError()
            if self.codec == CODEC_ZSTD:
                cctx = ZSTD_createCCtx()
                if cctx == NULL:
                    raise MemoryError()
            for index, extent in enumerate(extents):
                off, ln = _extent_arg("pack_extents", index, extent, MAX_OFFSET)
                while ln > 0:
                    piece = min(ln, piece_max)
                    self._pack_piece(cfd, off, piece, c, frames, chunks, iov, scratch,
                                     scratch_size, cctx)
                    off += piece
                    ln -= piece
        finally:
            free(chunks)
            free(iov)
            free(scratch)
            if cctx != NULL:
                ZSTD_freeCCtx(cctx)
        return frames

    def pack_scatter(self, fd, extents, cycle):
        """Return [(frame, data bytes), ...]: SCATTER frames carrying many small extents each.

        extents: [(offset, length), ...] ascending and not overlapping.  A frame
        takes extents in order until its data would pass chunk_size or it holds
        MAX_SCATTER_EXTENTS of them (an extent longer than chunk_size gets a frame
        of its own); its raw payload is the extent table then each extent's bytes,
        read with one pread each, hashed and compressed as one chunk.  For the same
        extents the frames are always the same (resume regenerates them).
        """
        cdef int cfd = _check_int(fd, "fd", 0, 2**31 - 1)
        cdef uint64_t c = _check_int(cycle, "cycle", 0, MAX_CYCLE)
        cdef list offs = []
        cdef list lens = []
        cdef uint64_t prev_end = 0
        for index, extent in enumerate(extents):
            off, ln = _extent_arg("pack_scatter", index, extent, U32_MAX)
            if index and off < prev_end:
                raise errors.UsageError(
                    f"pack_scatter: extent #{index} at {off} overlaps or precedes the one before")
            prev_end = off + ln
            offs.append(off)
            lens.append(ln)
        out = []
        cdef Py_ssize_t n = len(offs), first = 0, last
        cdef size_t data
        while first < n:
            last = first
            data = lens[first]
            while (last + 1 < n and last + 1 - first < C_MAX_SCATTER
                   and data + <size_t>lens[last + 1] <= self.chunk_size):
                last += 1
                data += <size_t>lens[last]
            out.append((self._pack_scatter_frame(cfd, offs, lens, first, last + 1, data, c),
                        data))
            first = last + 1
        return out

    cdef bytes _pack_scatter_frame(self, int fd, list offs, list lens, Py_ssize_t first,
                                   Py_ssize_t stop, size_t data, uint64_t cycle):
        cdef int count = <int>(stop - first), i, rc_compress = 0
        cdef size_t table = C_SCATTER_HEAD + C_SCATTER_ENTRY * <size_t>count
        cdef size_t raw = table + data
        cdef size_t scratch_size = 0, zstd_error = 0, pos
        cdef int64_t rc_read = 0
        cdef uint64_t *eo = <uint64_t *>malloc(count * sizeof(uint64_t))
        cdef size_t *el = <size_t *>malloc(count * sizeof(size_t))
        cdef char *scratch = NULL
        cdef ZSTD_CCtx *cctx = NULL
        cdef Chunk chunk
        cdef iovec iov
        cdef unsigned char *p
        cdef int codec = self.codec, level = self.level
        frame = PyBytes_FromStringAndSize(NULL, C_HEADER_SIZE + raw)
        try:
            if eo == NULL or el == NULL:
                raise MemoryError()
            for i in range(count):
                eo[i] = offs[first + i]
                el[i] = lens[first + i]
            if codec == CODEC_LZ4:
                scratch_size = LZ4_compressBound(<int>raw)
            elif codec == CODEC_ZSTD:
                scratch_size = ZSTD_compressBound(raw)
                cctx = ZSTD_createCCtx()
                if cctx == NULL:
                    raise MemoryError()
            if scratch_size:
                scratch = <char *>malloc(scratch_size)
                if scratch == NULL:
                    raise MemoryError()
            p = <unsigned char *>PyBytes_AS_STRING(frame)
            chunk.frame = p
            chunk.offset = eo[0]
            chunk.raw_length = raw
            with nogil:
                p += C_HEADER_SIZE
                _put_u32(p, <uint32_t>count)
                _put_u32(p + 4, 0)
                for i in range(count):
                    _put_u64(p + C_SCATTER_HEAD + C_SCATTER_ENTRY * i, eo[i])
                    _put_u32(p + C_SCATTER_HEAD + C_SCATTER_ENTRY * i + 8, <uint32_t>el[i])
                    _put_u32(p + C_SCATTER_HEAD + C_SCATTER_ENTRY * i + 12, 0)
                pos = table
                for i in range(count):
                    iov.iov_base = p + pos
                    iov.iov_len = el[i]
                    rc_read = _preadv_full(fd, &iov, 1, <off_t>eo[i])
                    if rc_read != 0:
                        break
                    pos += el[i]
                if rc_read == 0:
                    rc_compress = _finish_chunks(&chunk, 1, codec, level, cycle, scratch,
                                                 scratch_size, cctx, &zstd_error, C_FT_SCATTER)
            if rc_read < 0:
                raise errors.StoreError(
                    f"pack_scatter: reading fd {fd} failed: {strerror(<int>-rc_read).decode()} "
                    f"(errno {-rc_read}); check the source image")
            if rc_read > 0:
                raise errors.UsageError(
                    f"pack_scatter: fd {fd} ends at byte {rc_read - 1}, inside an extent; "
                    "extents must lie inside the file")
            if rc_compress < 0:
                raise errors.StoreError(
                    f"pack_scatter: zstd failed: {ZSTD_getErrorName(zstd_error).decode()}")
        finally:
            free(eo)
            free(el)
            free(scratch)
            if cctx != NULL:
                ZSTD_freeCCtx(cctx)
        if chunk.length != raw:
            return frame[:C_HEADER_SIZE + chunk.length]
        return frame

    cdef _pack_piece(self, int fd, uint64_t offset, size_t length, uint64_t cycle, list frames,
                     Chunk *chunks, iovec *iov, char *scratch, size_t scratch_size,
                     ZSTD_CCtx *cctx):
        cdef int count = 0, i, rc_compress = 0
        cdef size_t pos = 0, n, zstd_error = 0
        cdef int64_t rc_read
        cdef int codec = self.codec, level = self.level
        pending = []
        # Allocate every frame of the piece at full size first, so the read,
        # hashing and compression below can all run without the GIL.
        while pos < length:
            n = min(self.chunk_size, length - pos)
            frame = PyBytes_FromStringAndSize(NULL, C_HEADER_SIZE + n)
            pending.append(frame)
            chunks[count].frame = <unsigned char *>PyBytes_AS_STRING(frame)
            chunks[count].raw_length = n
            chunks[count].offset = offset + pos
            iov[count].iov_base = chunks[count].frame + C_HEADER_SIZE
            iov[count].iov_len = n
            count += 1
            pos += n
        with nogil:
            rc_read = _preadv_full(fd, iov, count, <off_t>offset)
            if rc_read == 0:
                rc_compress = _finish_chunks(chunks, count, codec, level, cycle, scratch,
                                             scratch_size, cctx, &zstd_error)
        if rc_read < 0:
            raise errors.StoreError(
                f"pack_extents: reading fd {fd} at [{offset}, {offset + length}) failed: "
                f"{strerror(<int>-rc_read).decode()} (errno {-rc_read}); check the source image")
        if rc_read > 0:
            raise errors.UsageError(
                f"pack_extents: fd {fd} ends at byte {rc_read - 1}, inside extent piece "
                f"[{offset}, {offset + length}); extents must lie inside the file")
        if rc_compress < 0:
            raise errors.StoreError(
                f"pack_extents: zstd failed at [{offset}, {offset + length}): "
                f"{ZSTD_getErrorName(zstd_error).decode()}")
        cdef PyObject *obj
        for i in range(count):
            frame = pending[i]
            if chunks[i].length != chunks[i].raw_length:
                # Shrink to the compressed size in place.  _PyBytes_Resize needs
                # the only reference, so hand ours to obj and drop the others.
                pending[i] = None
                obj = <PyObject *>frame
                Py_INCREF(frame)
                frame = None
                if _PyBytes_Resize(&obj, C_HEADER_SIZE + chunks[i].length) < 0:
                    raise MemoryError()
                frame = <object>obj
                Py_DECREF(frame)
            frames.append(frame)
