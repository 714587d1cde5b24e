# cython: language_level=3
"""NBD transmission phase: the per-connection request loop and its buffers.

Design.  One ``TransmissionSession`` serves one connection after negotiation,
on the connection's own thread, and processes requests one after the other
(a reply is sent only after the backend returned), except big writes, see
Pipelining.  Requests are parsed straight out of a fixed
receive buffer: the socket is read in big gulps, every complete request in the
gulp is handled, and only when the buffer holds no complete request any more
are the queued replies sent with one ``sendmsg`` (a gather list of reply
headers and the ``bytes`` objects the backend returned for reads).  That turns
a queue of 32 small requests into a handful of system calls.

Copies.  A WRITE payload is received once from the socket and handed to the
backend as a memoryview of the receive buffer; the backend must not keep it
after ``write`` returns (the buffer is reused).  Payloads larger than the
receive buffer go to a separate payload buffer: the part that arrived together
with the header is copied there once, the rest is received in place.  A READ
reply sends the backend's ``bytes`` object itself, without copying it.

Validation.  Every header field is checked before anything is allocated or the
backend is called: magic (wrong: hard disconnect), command, flags against what
was negotiated, zero and oversized lengths, ranges past the end.  A WRITE
longer than ``max_payload`` cannot be skipped safely, so it ends the session;
everything else gets the error reply the protocol prescribes.  Exceptions from
the backend become an error reply (EIO unless the errno says more); the
session goes on.

Pipelining.  A WRITE whose payload is longer than the receive buffer (and
that passes every check) is received into a buffer of its own and queued for
the connection's write thread (started at the first such write; up to
``ASYNC_DEPTH`` writes in flight, their buffers kept for reuse); the loop goes
on reading the next request while the backend writes.  One thread, not one
per write in flight: two buffered writes to one file do not copy in parallel
(ext4 holds the inode lock across each), and on a 2-core machine the extra
writers only spun on that lock and traded the GIL; 1 MiB writes under
freezes ran ~40% faster with one (docs/nbd.md).  The write thread takes the
queue in order, so pipelined writes reach the backend in request order, one
at a time.  It sends each reply itself, as one piece under ``send_lock`` (the
loop's batched sends take the same lock), so its replies may leave ahead of
replies the loop still holds, which NBD allows: the client matches them by
handle.  What keeps the protocol's promises: every other request (read,
flush, trim, zeroes, block status, a small write, disconnect) first waits
until all pipelined writes are done and answered, so it sees them and a FLUSH
covers every write completed before it; FUA is done by the write itself
before its reply.  Backends see concurrent ``write`` calls only from
different connections.  The session ends only after its write thread
finished and was joined.

Threads.  The GIL is released around every socket system call; backend calls
run with the GIL held (they release it themselves around their own I/O).  The
loop runs on the connection's thread; the write thread touches only the write
queue, the buffer pool and the in-flight count (under ``wcond``) and the
socket (under ``send_lock``).  Another thread may only call ``shutdown()`` on
the socket to make the blocking ``recv`` return.
"""

import logging

from cpython.bytearray cimport (
    PyByteArray_AS_STRING,
    PyByteArray_CheckExact,
    PyByteArray_GET_SIZE,
)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memmove

import collections
import errno as _errno_mod
import threading

from cyclemirror.errors import (
    BitmapRangeError,
    ConnectionLostError,
    ProtocolError,
    UsageError,
)
from cyclemirror.extents import HOLE, ZERO, merge_adjacent


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    int MSG_NOSIGNAL
    int MSG_DONTWAIT
    int MSG_WAITALL

cdef extern from "<endian.h>" nogil:
    uint16_t be16toh(uint16_t x)
    uint32_t be32toh(uint32_t x)
    uint64_t be64toh(uint64_t x)
    uint16_t htobe16(uint16_t x)
    uint32_t htobe32(uint32_t x)
    uint64_t htobe64(uint64_t x)

log = logging.getLogger("cyclemirror.nbd")

# Protocol numbers (mirrors cyclemirror.nbd.protocol; a golden test pins both).
cdef enum:
    REQUEST_MAGIC = 0x25609513
    SIMPLE_REPLY_MAGIC = 0x67446698
    STRUCTURED_REPLY_MAGIC = 0x668E33EF
    HEADER = 28

cdef enum:
    CMD_READ = 0
    CMD_WRITE = 1
    CMD_DISC = 2
    CMD_FLUSH = 3
    CMD_TRIM = 4
    CMD_WRITE_ZEROES = 6
    CMD_BLOCK_STATUS = 7

cdef enum:
    FLAG_FUA = 1
    FLAG_NO_HOLE = 2
    FLAG_DF = 4
    FLAG_REQ_ONE = 8
    FLAG_FAST_ZERO = 16

cdef enum:
    TFLAG_READ_ONLY = 2
    TFLAG_SEND_FLUSH = 4
    TFLAG_SEND_FUA = 8
    TFLAG_SEND_TRIM = 32
    TFLAG_SEND_WRITE_ZEROES = 64
    TFLAG_SEND_DF = 128
    TFLAG_SEND_FAST_ZERO = 2048

cdef enum:
    REPLY_FLAG_DONE = 1
    REPLY_TYPE_OFFSET_DATA = 1
    REPLY_TYPE_BLOCK_STATUS = 5
    REPLY_TYPE_ERROR = 32769

cdef enum:
    E_PERM = 1
    E_IO = 5
    E_INVAL = 22
    E_NOSPC = 28
    E_OVERFLOW = 75
    E_NOTSUP = 95

cdef enum:
    RECV_BUFFER = 262144
    MAX_IOV = 512
    HDR_AREA = 65536
    FLUSH_BYTES = 4194304
    MAX_DESCRIPTORS = 65536
    KEEP_BIG_BUFFER = 4194304
    ASYNC_DEPTH = 4

MAX_STATUS_LENGTH = 1 << 30


cdef inline uint16_t _get16(const unsigned char *p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return be16toh(v)


cdef inline uint32_t _get32(const unsigned char *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return be32toh(v)


cdef inline uint64_t _get64(const unsigned char *p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return be64toh(v)


cdef inline void _put16(unsigned char *p, uint16_t v) noexcept nogil:
    v = htobe16(v)
    memcpy(p, &v, 2)


cdef inline void _put32(unsigned char *p, uint32_t v) noexcept nogil:
    v = htobe32(v)
    memcpy(p, &v, 4)


cdef inline void _put64(unsigned char *p, uint64_t v) noexcept nogil:
    v = htobe64(v)
    memcpy(p, &v, 8)


_HOST_TO_WIRE = {
    _errno_mod.EPERM: E_PERM,
    _errno_mod.EACCES: E_PERM,
    _errno_mod.EROFS: E_PERM,
    _errno_mod.EINVAL: E_INVAL,
    _errno_mod.ENOSPC: E_NOSPC,
    _errno_mod.EDQUOT: E_NOSPC,
    _errno_mod.EFBIG: E_NOSPC,
    _errno_mod.EOVERFLOW: E_OVERFLOW,
    _errno_mod.EOPNOTSUPP: E_NOTSUP,
}


def wire_error_for(exc):
    """The NBD error value for an exception a backend raised (EIO unless it says more)."""
    if isinstance(exc, OSError) and exc.errno in _HOST_TO_WIRE:
        return _HOST_TO_WIRE[exc.errno]
    if isinstance(exc, (UsageError, BitmapRangeError)):
        return E_INVAL
    return E_IO


cdef class TransmissionSession:
    """Serves the transmission phase of one negotiated connection (see module docstring).

    ``fd`` is a connected, blocking stream socket; the caller keeps the socket
    object alive and closes it after ``run()`` returned.
    """

    cdef int fd
    cdef readonly str export_name
    cdef object backend
    cdef object read_fn, write_fn, zeroes_fn, trim_fn, flush_fn, status_fn
    cdef uint64_t size
    cdef readonly uint32_t transmission_flags
    cdef readonly bint structured
    cdef readonly uint32_t context_id
    cdef readonly uint32_t max_payload
    cdef uint32_t allowed_flags[8]
    # receive side
    cdef bytearray rbuf
    cdef object rview
    cdef unsigned char *rp
    cdef Py_ssize_t rpos, rend
    cdef bytearray bigbuf
    cdef object bigview
    # send side
    cdef iovec *iov
    cdef int niov
    cdef unsigned char *hdr
    cdef Py_ssize_t hdrused
    cdef Py_ssize_t queued
    cdef list owners
    # pipelined big writes (see "Pipelining" in the module docstring)
    cdef object wcond
    cdef object wqueue
    cdef object writer
    cdef list wpool
    cdef int inflight
    cdef bint wclosing
    cdef object send_lock
    cdef readonly uint64_t async_writes
    # what happened, for logs and tests
    cdef readonly uint64_t requests
    cdef readonly uint64_t error_replies
    cdef readonly str end_reason

    def __cinit__(self):
        self.iov = NULL
        self.hdr = NULL

    def __init__(self, int fd, str export_name, backend, uint64_t size,
                 uint32_t transmission_flags, bint structured, uint32_t context_id,
                 uint32_t max_payload):
        if max_payload < 512 or max_payload > (1 << 30):
            raise UsageError(f"nbd session: max_payload {max_payload} is outside [512, 2**30]")
        self.fd = fd
        self.export_name = export_name
        self.backend = backend
        self.size = size
        self.transmission_flags = transmission_flags
        self.structured = structured
        self.context_id = context_id
        self.max_payload = max_payload
        is_readonly = bool(transmission_flags & TFLAG_READ_ONLY)
        # Bound methods looked up once: a request then costs one call each.
        self.read_fn = backend.read
        self.flush_fn = backend.flush if transmission_flags & TFLAG_SEND_FLUSH else None
        self.write_fn = None if is_readonly else backend.write
        self.trim_fn = backend.trim if transmission_flags & TFLAG_SEND_TRIM else None
        self.zeroes_fn = backend.write_zeroes if transmission_flags & TFLAG_SEND_WRITE_ZEROES else None
        self.status_fn = backend.block_status if context_id else None
        self._compute_allowed_flags()
        self.rbuf = bytearray(RECV_BUFFER)
        self.rview = memoryview(self.rbuf)
        self.rp = <unsigned char *> (<char *> self.rbuf)
        self.rpos = 0
        self.rend = 0
        self.bigbuf = None
        self.bigview = None
        self.iov = <iovec *> malloc(sizeof(iovec) * MAX_IOV)
        self.hdr = <unsigned char *> malloc(HDR_AREA)
        if self.iov == NULL or self.hdr == NULL:
            raise MemoryError("nbd session: cannot allocate reply buffers")
        self.niov = 0
        self.hdrused = 0
        self.queued = 0
        self.owners = []
        self.requests = 0
        self.error_replies = 0
        self.end_reason = ""
        self.wcond = threading.Condition()
        self.wqueue = collections.deque()
        self.writer = None
        self.wpool = []
        self.inflight = 0
        self.wclosing = False
        self.send_lock = None
        self.async_writes = 0

    def __dealloc__(self):
        if self.iov != NULL:
            free(self.iov)
        if self.hdr != NULL:
            free(self.hdr)

    cdef void _compute_allowed_flags(self):
        cdef uint32_t fua = FLAG_FUA if self.transmission_flags & TFLAG_SEND_FUA else 0
        cdef int i
        for i in range(8):
            self.allowed_flags[i] = 0
        self.allowed_flags[CMD_READ] = fua | (FLAG_DF if self.transmission_flags & TFLAG_SEND_DF else 0)
        self.allowed_flags[CMD_WRITE] = fua
        self.allowed_flags[CMD_FLUSH] = fua
        self.allowed_flags[CMD_TRIM] = fua
        self.allowed_flags[CMD_WRITE_ZEROES] = fua | FLAG_NO_HOLE | (
            FLAG_FAST_ZERO if self.transmission_flags & TFLAG_SEND_FAST_ZERO else 0)
        self.allowed_flags[CMD_BLOCK_STATUS] = fua | FLAG_REQ_ONE

    # ------------------------------------------------------------------ sending

    cdef int _send_all(self) except -1:
        """Send every queued iovec (blocking), then forget them."""
        if self.send_lock is None:
            return self._send_all_unlocked()
        with self.send_lock:  # the write thread sends its replies too
            return self._send_all_unlocked()

    cdef int _send_all_unlocked(self) except -1:
        cdef msghdr msg
        cdef ssize_t n
        cdef int first = 0
        cdef int err = 0
        cdef size_t done
        while first < self.niov:
            msg.msg_name = NULL
            msg.msg_namelen = 0
            msg.msg_iov = self.iov + first
            msg.msg_iovlen = self.niov - first
            msg.msg_control = NULL
            msg.msg_controllen = 0
            msg.msg_flags = 0
            with nogil:
                n = sendmsg(self.fd, &msg, MSG_NOSIGNAL)
                if n < 0:
                    err = errno
            if n < 0:
                if err == EINTR:
                    continue
                self.niov = 0
                self.owners = []
                raise ConnectionLostError(
                    f"nbd export {self.export_name!r}: sending replies failed "
                    f"({_errno_mod.errorcode.get(err, err)}); the client went away")
            done = <size_t> n
            while first < self.niov and done >= self.iov[first].iov_len:
                done -= self.iov[first].iov_len
                first += 1
            if first < self.niov and done:
                self.iov[first].iov_base = <char *> self.iov[first].iov_base + done
                self.iov[first].iov_len -= done
        self.niov = 0
        self.hdrused = 0
        self.queued = 0
        self.owners = []
        return 0

    cdef inline int _room(self, Py_ssize_t hdr_bytes, int iovs) except -1:
        if self.niov + iovs > MAX_IOV or self.hdrused + hdr_bytes > HDR_AREA or self.queued >= FLUSH_BYTES:
            self._send_all()
        return 0

    cdef inline unsigned char *_hdr(self, Py_ssize_t n) noexcept:
        """Reserve n bytes of the header area as a new iovec (caller checked _room)."""
        cdef unsigned char *p = self.hdr + self.hdrused
        self.hdrused += n
        self.iov[self.niov].iov_base = p
        self.iov[self.niov].iov_len = n
        self.niov += 1
        self.queued += n
        return p

    cdef int _queue_object(self, object data, const unsigned char *ptr, Py_ssize_t n) except -1:
        self.owners.append(data)
        self.iov[self.niov].iov_base = <void *> ptr
        self.iov[self.niov].iov_len = n
        self.niov += 1
        self.queued += n
        return 0

    cdef int _reply_ok(self, uint64_t handle) except -1:
        self._room(16, 1)
        cdef unsigned char *p = self._hdr(16)
        _put32(p, SIMPLE_REPLY_MAGIC)
        _put32(p + 4, 0)
        _put64(p + 8, handle)
        return 0

    cdef int _reply_error(self, uint64_t handle, uint32_t error, str message) except -1:
        # Rare: one small bytes object per error reply, encoded in one place.
        cdef bytes data = _reply_bytes(self.structured, handle, error, message)
        self.error_replies += 1
        self._room(0, 1)
        self._queue_object(data, <const unsigned char *> PyBytes_AS_STRING(data), len(data))
        return 0

    # ---------------------------------------------------------------- receiving

    cdef Py_ssize_t _recv_some(self, unsigned char *dst, Py_ssize_t room) except -2:
        """Receive into dst: first without blocking; if nothing is there, send the
        queued replies and block.  Returns bytes received, 0 at end of stream."""
        cdef ssize_t n
        cdef int err = 0
        while True:
            with nogil:
                n = recv(self.fd, dst, <size_t> room, MSG_DONTWAIT)
                if n < 0:
                    err = errno
            if n >= 0:
                return n
            if err == EINTR:
                continue
            if err != EAGAIN:  # EWOULDBLOCK is the same number on Linux
                raise ConnectionLostError(
                    f"nbd export {self.export_name!r}: receiving failed "
                    f"({_errno_mod.errorcode.get(err, err)})")
            if self.niov:
                self._send_all()
            with nogil:
                n = recv(self.fd, dst, <size_t> room, 0)
                if n < 0:
                    err = errno
            if n >= 0:
                return n
            if err == EINTR:
                continue
            raise ConnectionLostError(
                f"nbd export {self.export_name!r}: receiving failed "
                f"({_errno_mod.errorcode.get(err, err)})")

    cdef int _fill(self, Py_ssize_t need) except -1:
        """Make rbuf[rpos:rpos+need] valid (need <= RECV_BUFFER).  1 ok, 0 end of stream."""
        cdef Py_ssize_t n
        if self.rend - self.rpos >= need:
            return 1
        if RECV_BUFFER - self.rpos < need:
            # The partial request moves to the front; at most one per buffer gulp.
            memmove(self.rp, self.rp + self.rpos, self.rend - self.rpos)
            self.rend -= self.rpos
            self.rpos = 0
        while self.rend - self.rpos < need:
            n = self._recv_some(self.rp + self.rend, RECV_BUFFER - self.rend)
            if n == 0:
                return 0
            self.rend += n
        return 1

    cdef object _big_payload(self, Py_ssize_t length):
        """Receive a payload longer than the receive buffer; returns a memoryview or None at EOF."""
        if self.bigbuf is None or len(self.bigbuf) < length:
            self.bigview = None
            self.bigbuf = bytearray(length)
            self.bigview = memoryview(self.bigbuf)
        if not self._recv_payload(self.bigbuf, length):
            return None
        return self.bigview[:length]

    cdef int _recv_payload(self, bytearray buf, Py_ssize_t length) except -1:
        """Fill buf[:length] with a payload longer than what the receive buffer holds
        (the part that came with the header is copied once, the rest lands in place).
        1 done, 0 end of stream."""
        cdef Py_ssize_t have = self.rend - self.rpos
        cdef Py_ssize_t got
        cdef unsigned char *dst = <unsigned char *> (<char *> buf)
        cdef ssize_t r
        cdef int err = 0
        memcpy(dst, self.rp + self.rpos, have)
        self.rpos = 0
        self.rend = 0
        got = have
        if got < length and self.niov:
            self._send_all()  # the client may wait for these before it sends on
        while got < length:
            # The client must send the whole payload now: wait for all of it in one call.
            with nogil:
                r = recv(self.fd, dst + got, <size_t> (length - got), MSG_WAITALL)
                if r < 0:
                    err = errno
            if r == 0:
                return 0
            if r < 0:
                if err == EINTR:
                    continue
                raise ConnectionLostError(
                    f"nbd export {self.export_name!r}: receiving a write payload failed "
                    f"({_errno_mod.errorcode.get(err, err)})")
            got += r
        return 1

    # ------------------------------------------------------- pipelined big writes

    cdef bint _can_pipeline(self, uint16_t flags, uint64_t offset, uint32_t length):
        """A big write that will reach the backend (anything the checks refuse is
        answered in order by the loop itself)."""
        return (self.write_fn is not None and not (flags & ~self.allowed_flags[CMD_WRITE])
                and offset <= self.size and length <= self.size - offset)

    cdef object _take_buffer(self, Py_ssize_t length):
        """A payload buffer for one more write in flight; waits while ASYNC_DEPTH are."""
        cdef Py_ssize_t i
        if self.send_lock is None:
            self._start_writer()
        if self.inflight >= ASYNC_DEPTH and self.niov:
            self._send_all()
        with self.wcond:
            while self.inflight >= ASYNC_DEPTH:
                self.wcond.wait()
            self.inflight += 1
            for i in range(len(self.wpool)):
                if len(self.wpool[i]) >= length:
                    return self.wpool.pop(i)
        return bytearray(length)

    cdef int _give_back(self, bytearray buf) except -1:
        with self.wcond:
            self.inflight -= 1
            if len(buf) <= KEEP_BIG_BUFFER and len(self.wpool) < ASYNC_DEPTH:
                self.wpool.append(buf)  # reused: warm pages, no allocation per write
            self.wcond.notify_all()
        return 0

    cdef int _start_writer(self) except -1:
        self.send_lock = threading.Lock()
        self.writer = threading.Thread(target=self._write_worker, daemon=True, name="nbd-write")
        self.writer.start()
        return 0

    cdef int _drain_writes(self) except -1:
        """Wait until every pipelined write is done and answered (the barrier in front
        of every other request)."""
        if self.inflight == 0:
            return 0
        if self.niov:
            self._send_all()
        with self.wcond:
            while self.inflight:
                self.wcond.wait()
        return 0

    cdef int _stop_writer(self) except -1:
        if self.writer is None:
            return 0
        self._drain_writes()
        with self.wcond:
            self.wclosing = True
            self.wcond.notify_all()
        self.writer.join()
        self.writer = None
        return 0

    def _write_worker(self):
        """The write thread: takes queued big writes in order, calls the backend, sends the reply."""
        cdef uint16_t flags = 0
        cdef uint64_t handle = 0, offset = 0
        cdef uint32_t length = 0
        cdef uint32_t err
        while True:
            with self.wcond:
                while not self.wqueue and not self.wclosing:
                    self.wcond.wait()
                if not self.wqueue:
                    return
                flags, handle, offset, length, buf = self.wqueue.popleft()
            err = 0
            text = ""
            try:
                view = memoryview(buf)[:length]
                try:
                    self.write_fn(offset, view, bool(flags & FLAG_FUA))
                finally:
                    view = None
            except Exception as exc:
                err = wire_error_for(exc)
                log.warning("nbd export %r: write at %d+%d failed: %s", self.export_name,
                            offset, length, exc)
                text = f"write at {offset}+{length} failed: {exc}"
                self.error_replies += 1
            try:
                self._send_now(_reply_bytes(self.structured, handle, err, text))
            except ConnectionLostError:
                pass  # the loop's next receive ends the session
            except Exception:  # never leave a write counted as in flight
                log.exception("nbd export %r: replying to a write failed", self.export_name)
            finally:
                self._give_back(buf)

    cdef int _send_now(self, bytes msg) except -1:
        """Send one complete reply at once, between the loop's batches (send_lock)."""
        cdef const char *p = PyBytes_AS_STRING(msg)
        cdef Py_ssize_t left = PyBytes_GET_SIZE(msg)
        cdef ssize_t n
        cdef int err = 0
        with self.send_lock:
            while left > 0:
                with nogil:
                    n = send(self.fd, p, <size_t> left, MSG_NOSIGNAL)
                    if n < 0:
                        err = errno
                if n < 0:
                    if err == EINTR:
                        continue
                    raise ConnectionLostError(
                        f"nbd export {self.export_name!r}: sending a write reply failed "
                        f"({_errno_mod.errorcode.get(err, err)}); the client went away")
                p += n
                left -= n
        return 0

    # ------------------------------------------------------------------ the loop

    def run(self):
        """Serve requests until the client disconnects; returns why the session ended."""
        cdef const unsigned char *h
        cdef uint32_t magic, length
        cdef uint16_t flags, cmd
        cdef uint64_t handle, offset
        cdef object payload
        cdef object buf
        try:
            while True:
                if self.rpos == self.rend:
                    self.rpos = 0
                    self.rend = 0
                if not self._fill(HEADER):
                    self.end_reason = "end of stream" if self.rpos == self.rend else "truncated request header"
                    break
                h = self.rp + self.rpos
                magic = _get32(h)
                flags = _get16(h + 4)
                cmd = _get16(h + 6)
                handle = _get64(h + 8)
                offset = _get64(h + 16)
                length = _get32(h + 24)
                self.requests += 1
                if magic != REQUEST_MAGIC:
                    self.end_reason = f"bad request magic 0x{magic:08x}"
                    break
                if cmd == CMD_WRITE:
                    if length > self.max_payload:
                        # The payload cannot be skipped safely: end the session.
                        self.end_reason = (f"write of {length} bytes exceeds the maximum "
                                           f"payload {self.max_payload}")
                        break
                    if self.rend - self.rpos >= HEADER + <Py_ssize_t> length:
                        payload = self.rview[self.rpos + HEADER:self.rpos + HEADER + length]
                        self.rpos += HEADER + length
                    elif HEADER + <Py_ssize_t> length <= RECV_BUFFER:
                        if not self._fill(HEADER + length):
                            self.end_reason = "truncated write payload"
                            break
                        payload = self.rview[self.rpos + HEADER:self.rpos + HEADER + length]
                        self.rpos += HEADER + length
                    elif self._can_pipeline(flags, offset, length):
                        # Big and valid: received into its own buffer and handed to a write
                        # thread, so the next request is read while this one is written.
                        self.rpos += HEADER
                        buf = self._take_buffer(length)
                        if not self._recv_payload(buf, length):
                            self._give_back(buf)
                            self.end_reason = "truncated write payload"
                            break
                        with self.wcond:
                            self.wqueue.append((flags, handle, offset, length, buf))
                            self.async_writes += 1
                            self.wcond.notify()
                        buf = None
                        continue
                    else:
                        self.rpos += HEADER
                        payload = self._big_payload(length)
                        if payload is None:
                            self.end_reason = "truncated write payload"
                            break
                    self._drain_writes()
                    self._do_write(flags, handle, offset, length, payload)
                    payload = None
                    if self.bigbuf is not None and len(self.bigbuf) > KEEP_BIG_BUFFER:
                        # Bound what idle connections hold: only modest buffers are reused.
                        self.bigview = None
                        self.bigbuf = None
                    continue
                self.rpos += HEADER
                if self.inflight:
                    self._drain_writes()
                if cmd == CMD_READ:
                    self._do_read(flags, handle, offset, length)
                elif cmd == CMD_DISC:
                    self.end_reason = "client disconnected (NBD_CMD_DISC)"
                    break
                elif cmd == CMD_FLUSH:
                    self._do_flush(flags, handle, offset, length)
                elif cmd == CMD_TRIM:
                    self._do_trim(flags, handle, offset, length)
                elif cmd == CMD_WRITE_ZEROES:
                    self._do_zeroes(flags, handle, offset, length)
                elif cmd == CMD_BLOCK_STATUS:
                    self._do_status(flags, handle, offset, length)
                else:
                    self._reply_error(handle, E_INVAL, f"unknown command {cmd}")
        except ConnectionLostError as exc:
            self.end_reason = str(exc)
            self._stop_writer()
            return self.end_reason
        except BaseException:
            self._stop_writer()
            raise
        # Replies to everything handled before the end still go out.
        self._stop_writer()
        try:
            if self.niov:
                self._send_all()
        except ConnectionLostError:
            pass
        return self.end_reason

    # ------------------------------------------------------------- the commands

    cdef int _bad_flags(self, uint16_t cmd, uint16_t flags, uint64_t handle) except -1:
        cdef uint32_t extra = flags & ~self.allowed_flags[cmd]
        if extra:
            self._reply_error(handle, E_INVAL, f"command {cmd}: flags 0x{extra:x} are not valid here")
            return 1
        return 0

    cdef int _bad_range(self, str what, uint64_t offset, uint32_t length, uint32_t error,
                        uint64_t handle) except -1:
        if length == 0:
            self._reply_error(handle, E_INVAL, f"{what}: length 0")
            return 1
        if offset > self.size or length > self.size - offset:
            self._reply_error(handle, error,
                              f"{what}: {offset}+{length} is beyond the export's size {self.size}")
            return 1
        return 0

    cdef int _backend_failed(self, str what, uint64_t handle, uint64_t offset, uint32_t length,
                             object exc) except -1:
        err = wire_error_for(exc)
        log.warning("nbd export %r: %s at %d+%d failed: %s", self.export_name, what, offset,
                    length, exc)
        self._reply_error(handle, err, f"{what} at {offset}+{length} failed: {exc}")
        return 0

    cdef int _do_read(self, uint16_t flags, uint64_t handle, uint64_t offset, uint32_t length) except -1:
        cdef unsigned char *p
        cdef const unsigned char *ptr
        cdef Py_ssize_t got
        if self._bad_flags(CMD_READ, flags, handle):
            return 0
        if length > self.max_payload:
            self._reply_error(handle, E_INVAL if not (flags & FLAG_DF) else E_OVERFLOW,
                              f"read of {length} bytes exceeds the maximum {self.max_payload}")
            return 0
        if self._bad_range("read", offset, length, E_INVAL, handle):
            return 0
        try:
            data = self.read_fn(offset, length)
        except Exception as exc:
            return self._backend_failed("read", handle, offset, length, exc)
        if PyBytes_CheckExact(data):
            ptr = <const unsigned char *> PyBytes_AS_STRING(data)
            got = PyBytes_GET_SIZE(data)
        elif PyByteArray_CheckExact(data):
            ptr = <const unsigned char *> PyByteArray_AS_STRING(data)
            got = PyByteArray_GET_SIZE(data)
        else:
            return self._backend_failed(
                "read", handle, offset, length,
                ProtocolError(f"backend returned {type(data).__name__}, not bytes"))
        if got != length:
            return self._backend_failed(
                "read", handle, offset, length,
                ProtocolError(f"backend returned {got} bytes, not {length}"))
        if self.structured:
            self._room(28, 2)
            p = self._hdr(28)
            _put32(p, STRUCTURED_REPLY_MAGIC)
            _put16(p + 4, REPLY_FLAG_DONE)
            _put16(p + 6, REPLY_TYPE_OFFSET_DATA)
            _put64(p + 8, handle)
            _put32(p + 16, 8 + length)
            _put64(p + 20, offset)
        else:
            self._room(16, 2)
            p = self._hdr(16)
            _put32(p, SIMPLE_REPLY_MAGIC)
            _put32(p + 4, 0)
            _put64(p + 8, handle)
        self._queue_object(data, ptr, length)
        return 0

    cdef int _do_write(self, uint16_t flags, uint64_t handle, uint64_t offset, uint32_t length,
                       object payload) except -1:
        if self.write_fn is None:
            self._reply_error(handle, E_PERM, f"export {self.export_name!r} is read-only")
            return 0
        if self._bad_flags(CMD_WRITE, flags, handle):
            return 0
        if self._bad_range("write", offset, length, E_NOSPC, handle):
            return 0
        try:
            self.write_fn(offset, payload, bool(flags & FLAG_FUA))
        except Exception as exc:
            return self._backend_failed("write", handle, offset, length, exc)
        self._reply_ok(handle)
        return 0

    cdef int _do_flush(self, uint16_t flags, uint64_t handle, uint64_t offset, uint32_t length) except -1:
        if self.flush_fn is None:
            self._reply_error(handle, E_INVAL, "flush was not advertised for this export")
            return 0
        if self._bad_flags(CMD_FLUSH, flags, handle):
            return 0
        if offset != 0 or length != 0:
            self._reply_error(handle, E_INVAL, "flush: offset and length must be 0")
            return 0
        try:
            self.flush_fn()
        except Exception as exc:
            return self._backend_failed("flush", handle, 0, 0, exc)
        self._reply_ok(handle)
        return 0

    cdef int _refuse_unoffered(self, str what, uint64_t handle) except -1:
        """A command this export does not offer: EPERM on a read-only export, else EINVAL."""
        if self.transmission_flags & TFLAG_READ_ONLY:
            self._reply_error(handle, E_PERM, f"export {self.export_name!r} is read-only")
        else:
            self._reply_error(handle, E_INVAL, f"{what} was not advertised for this export")
        return 0

    cdef int _do_trim(self, uint16_t flags, uint64_t handle, uint64_t offset, uint32_t length) except -1:
        if self.trim_fn is None:
            return self._refuse_unoffered("trim", handle)
        if self._bad_flags(CMD_TRIM, flags, handle):
            return 0
        if self._bad_range("trim", offset, length, E_NOSPC, handle):
            return 0
        try:
            self.trim_fn(offset, length)
            if flags & FLAG_FUA:
                # trim() has no fua argument: a flush makes the trim durable instead.
                self.flush_fn()
        except Exception as exc:
            return self._backend_failed("trim", handle, offset, length, exc)
        self._reply_ok(handle)
        return 0

    cdef int _do_zeroes(self, uint16_t flags, uint64_t handle, uint64_t offset, uint32_t length) except -1:
        if self.zeroes_fn is None:
            return self._refuse_unoffered("write zeroes", handle)
        if self._bad_flags(CMD_WRITE_ZEROES, flags, handle):
            return 0
        if self._bad_range("write zeroes", offset, length, E_NOSPC, handle):
            return 0
        try:
            done = self.zeroes_fn(offset, length, bool(flags & FLAG_FUA),
                                  no_hole=bool(flags & FLAG_NO_HOLE),
                                  fast_only=bool(flags & FLAG_FAST_ZERO))
            if done is False and flags & FLAG_FAST_ZERO:
                self._reply_error(handle, E_NOTSUP,
                                  f"write zeroes at {offset}+{length} cannot be fast here")
                return 0
        except Exception as exc:
            return self._backend_failed("write zeroes", handle, offset, length, exc)
        self._reply_ok(handle)
        return 0

    cdef int _do_status(self, uint16_t flags, uint64_t handle, uint64_t offset, uint32_t length) except -1:
        cdef uint32_t qlen
        cdef Py_ssize_t n = 0
        cdef bytearray out
        cdef unsigned char *p
        cdef bytes body
        if self.status_fn is None:
            self._reply_error(handle, E_INVAL, "block status needs a metadata context (base:allocation)")
            return 0
        if self._bad_flags(CMD_BLOCK_STATUS, flags, handle):
            return 0
        if self._bad_range("block status", offset, length, E_INVAL, handle):
            return 0
        qlen = length if length <= MAX_STATUS_LENGTH else MAX_STATUS_LENGTH
        try:
            extents = self.status_fn(offset, qlen)
            # Adjacent runs of one kind go out as one descriptor (extents.merge_adjacent,
            # lazy: a capped reply stops reading the backend's answer there).
            out = bytearray()
            for _pos, elen, eflags in merge_adjacent(_checked_extents(extents, offset, qlen)):
                out += _descriptor(elen, eflags)
                n += 1
                if (flags & FLAG_REQ_ONE) or n >= MAX_DESCRIPTORS:
                    break
            if n == 0:
                raise ProtocolError(f"backend block status described nothing at {offset}+{qlen}")
        except Exception as exc:
            return self._backend_failed("block status", handle, offset, length, exc)
        body = bytes(out)
        self._room(24, 2)
        p = self._hdr(24)
        _put32(p, STRUCTURED_REPLY_MAGIC)
        _put16(p + 4, REPLY_FLAG_DONE)
        _put16(p + 6, REPLY_TYPE_BLOCK_STATUS)
        _put64(p + 8, handle)
        _put32(p + 16, <uint32_t> (4 + len(body)))
        _put32(p + 20, self.context_id)
        self._queue_object(body, <const unsigned char *> PyBytes_AS_STRING(body), len(body))
        return 0


def _checked_extents(extents, uint64_t offset, uint32_t qlen):
    """Yield (position in the query, length, flags) of a backend's block-status answer,
    checking each: a positive length that never passes the query, flags of 32 bits
    (only the HOLE and ZERO bits are kept)."""
    cdef uint64_t total = 0
    cdef uint64_t elen
    cdef uint32_t eflags
    for item in extents:
        elen, eflags = item
        if elen == 0 or elen > qlen - total:
            raise ProtocolError(
                f"backend block status gave an extent of {elen} bytes at {offset + total} "
                f"for a query of {qlen} bytes at {offset}")
        yield total, elen, eflags & (HOLE | ZERO)
        total += elen


cdef bytes _reply_bytes(bint structured, uint64_t handle, uint32_t error, str message):
    """A complete reply: simple when the request succeeded (as _reply_ok sends), else an
    error reply, structured if negotiated; _reply_error queues exactly these bytes."""
    cdef bytes text
    cdef Py_ssize_t tlen
    cdef unsigned char p[26]
    if error == 0 or not structured:
        _put32(p, SIMPLE_REPLY_MAGIC)
        _put32(p + 4, error)
        _put64(p + 8, handle)
        return (<char *> p)[:16]
    text = message.encode("utf-8", "replace")[:4096]
    tlen = len(text)
    _put32(p, STRUCTURED_REPLY_MAGIC)
    _put16(p + 4, REPLY_FLAG_DONE)
    _put16(p + 6, REPLY_TYPE_ERROR)
    _put64(p + 8, handle)
    _put32(p + 16, <uint32_t> (6 + tlen))
    _put32(p + 20, error)
    _put16(p + 24, <uint16_t> tlen)
    return (<char *> p)[:26] + text


cdef bytes _descriptor(uint64_t length, uint32_t flags):
    cdef unsigned char d[8]
    _put32(d, <uint32_t> length)
    _put32(d + 4, flags)
    return (<char *> d)[:8]
