"""A small blocking NBD client (fixed newstyle, NBD_OPT_GO, simple replies).

The demo writes its workload through the daemon's NBD socket with this client,
and the end-to-end tests use it where the external clients would need a
kernel module or FUSE.  It is deliberately minimal: one request in flight,
no structured replies, no TLS.  Every value from the server is checked (magics,
handles, export size, reply lengths) before it is used, and a server error
becomes a ``StoreError`` naming the command, offset and length.

Not thread-safe: one client per thread.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from cyclemirror.errors import ConnectionLostError, ProtocolError, StoreError, UsageError
from cyclemirror.extents import check_range

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_GO = 7
OPT_ABORT = 2
REP_ACK = 1
REP_INFO = 3
INFO_EXPORT = 0
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
CMD_FLAG_FUA = 1
TFLAG_READ_ONLY = 1 << 1
MAX_REQUEST = 32 << 20  # what we ask for per request; servers accept at least this
MAX_OPTION_REPLY = 64 << 10
MAX_EXPORT_SIZE = 1 << 62


class NbdClient:
    """``NbdClient(export, unix_path=...)`` or ``NbdClient(export, tcp=(host, port))``."""

    def __init__(self, export: str, *, unix_path: str | None = None,
                 tcp: tuple[str, int] | None = None, timeout: float = 30.0):
        if (unix_path is None) == (tcp is None):
            raise UsageError("NbdClient: give exactly one of unix_path or tcp")
        self.export = export
        self.where = f"unix:{unix_path}" if unix_path else f"tcp:{tcp[0]}:{tcp[1]}"
        try:
            if unix_path:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.settimeout(timeout)
                self._sock.connect(unix_path)
            else:
                self._sock = socket.create_connection(tcp, timeout=timeout)
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            raise ConnectionLostError(
                f"cannot connect to the NBD server at {self.where}: {exc.strerror or exc}; "
                "is the daemon running with --nbd?") from None
        self._handle = 0
        try:
            self.size, self.transmission_flags = self._negotiate(export)
        except BaseException:
            self._sock.close()
            raise

    # -- plumbing ---------------------------------------------------------------------------

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self._sock.recv_into(view[got:])
            except OSError as exc:
                raise ConnectionLostError(f"NBD server {self.where}: {exc}") from None
            if k == 0:
                raise ConnectionLostError(
                    f"NBD server {self.where} closed the connection (export {self.export!r})")
            got += k
        return bytes(buf)

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise ConnectionLostError(f"NBD server {self.where}: {exc}") from None

    def _negotiate(self, export: str) -> tuple[int, int]:
        magic, opt_magic, server_flags = struct.unpack(">QQH", self._recv_exact(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise ProtocolError(f"{self.where} is not a newstyle NBD server")
        if not server_flags & FLAG_FIXED_NEWSTYLE:
            raise ProtocolError(f"NBD server {self.where} does not speak fixed newstyle")
        client_flags = FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES)
        name = export.encode()
        payload = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self._send(struct.pack(">IQII", client_flags, IHAVEOPT, OPT_GO, len(payload)) + payload)
        size = flags = None
        while True:
            rmagic, opt, rtype, length = struct.unpack(">QIII", self._recv_exact(20))
            if rmagic != REPLY_MAGIC or opt != OPT_GO:
                raise ProtocolError(f"NBD server {self.where} sent a malformed option reply")
            if length > MAX_OPTION_REPLY:
                raise ProtocolError(f"NBD server {self.where}: option reply of {length} bytes")
            data = self._recv_exact(length)
            if rtype == REP_ACK:
                break
            if rtype & (1 << 31):
                message = data.decode("utf-8", "replace")
                raise StoreError(f"NBD server {self.where} refused export {export!r}: "
                                 f"{message or f'error {rtype & 0x7FFFFFFF}'}")
            if rtype == REP_INFO and len(data) >= 2:
                (info,) = struct.unpack(">H", data[:2])
                if info == INFO_EXPORT:
                    if len(data) != 12:
                        raise ProtocolError(f"NBD server {self.where}: bad NBD_INFO_EXPORT")
                    size, flags = struct.unpack(">QH", data[2:])
        if size is None:
            raise ProtocolError(f"NBD server {self.where} finished NBD_OPT_GO without a size")
        if size > MAX_EXPORT_SIZE:
            raise ProtocolError(f"NBD server {self.where}: export size {size} is absurd")
        return size, flags

    def _request(self, cmd: int, offset: int, length: int, data: bytes = b"",
                 flags: int = 0) -> bytes:
        self._handle += 1
        handle = self._handle
        self._send(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, handle, offset, length)
                   + data)
        magic, error, got_handle = struct.unpack(">IIQ", self._recv_exact(16))
        if magic != SIMPLE_REPLY_MAGIC:
            raise ProtocolError(f"NBD server {self.where}: bad reply magic {magic:#x}")
        if got_handle != handle:
            raise ProtocolError(f"NBD server {self.where}: reply for handle {got_handle}, "
                                f"expected {handle}")
        if error:
            name = errno.errorcode.get(error, str(error))
            raise StoreError(f"NBD {_CMD_NAMES.get(cmd, cmd)} of {length} bytes at offset "
                             f"{offset} on export {self.export!r} failed: {name} "
                             f"({os.strerror(error)})")
        if cmd == CMD_READ:
            return self._recv_exact(length)
        return b""

    def _check_range(self, offset: int, length: int) -> None:
        check_range(offset, length, self.size, f"NBD request on export {self.export!r}")

    # -- commands ---------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        parts = []
        while length:
            n = min(length, MAX_REQUEST)
            parts.append(self._request(CMD_READ, offset, n))
            offset += n
            length -= n
        return b"".join(parts)

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self._check_range(offset, len(data))
        view = memoryview(data)
        for start in range(0, len(data), MAX_REQUEST):
            chunk = bytes(view[start:start + MAX_REQUEST])
            self._request(CMD_WRITE, offset + start, len(chunk), chunk,
                          CMD_FLAG_FUA if fua else 0)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        self._request(CMD_WRITE_ZEROES, offset, length)

    def trim(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        self._request(CMD_TRIM, offset, length)

    def flush(self) -> None:
        self._request(CMD_FLUSH, 0, 0)

    def close(self) -> None:
        try:
            self._handle += 1
            self._sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC,
                                           self._handle, 0, 0))
        except OSError:
            pass
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_CMD_NAMES = {CMD_READ: "read", CMD_WRITE: "write", CMD_FLUSH: "flush", CMD_TRIM: "trim",
              CMD_WRITE_ZEROES: "write_zeroes"}
