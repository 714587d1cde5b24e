"""A raw NBD client for tests: speaks the protocol byte by byte, so it can also break it.

It is written from the protocol document independently of the server's code
(it does not import cyclemirror.nbd), so a misunderstanding on one side shows
up as a failing test instead of cancelling out.  Used by the negotiation,
malformed-traffic and differential tests.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF

OPT = {"EXPORT_NAME": 1, "ABORT": 2, "LIST": 3, "STARTTLS": 5, "INFO": 6, "GO": 7,
       "STRUCTURED_REPLY": 8, "LIST_META_CONTEXT": 9, "SET_META_CONTEXT": 10}
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_UNKNOWN = 0x80000006

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 0, 1, 2, 3, 4, 6, 7
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16
EPERM, EIO, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP = 1, 5, 22, 28, 75, 95


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"server closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def connect_unix(path: str, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def greet(sock: socket.socket, client_flags: int = 3) -> int:
    """Read the server greeting, send client flags; returns the handshake flags."""
    magic, opt_magic, hflags = struct.unpack(">QQH", recv_exact(sock, 18))
    assert magic == NBDMAGIC and opt_magic == IHAVEOPT
    sock.sendall(struct.pack(">I", client_flags))
    return hflags


def send_option(sock: socket.socket, option: int, data: bytes = b"", *, magic: int = IHAVEOPT) -> None:
    sock.sendall(struct.pack(">QII", magic, option, len(data)) + data)


def read_option_reply(sock: socket.socket) -> tuple[int, int, bytes]:
    magic, option, rtype, length = struct.unpack(">QIII", recv_exact(sock, 20))
    assert magic == REPLY_MAGIC, hex(magic)
    return option, rtype, recv_exact(sock, length)


def option_replies(sock: socket.socket) -> list[tuple[int, bytes]]:
    """All replies to one option, up to and including the final one (ACK or an error)."""
    out = []
    while True:
        _opt, rtype, data = read_option_reply(sock)
        out.append((rtype, data))
        if rtype == REP_ACK or rtype & 0x80000000:
            return out


def go_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def meta_data(name: str, queries: list[str]) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


@dataclass
class Export:
    size: int
    flags: int
    context_id: int | None


def open_export(sock: socket.socket, name: str, *, structured: bool = True,
                allocation: bool = True) -> Export:
    """Full handshake with GO; returns the export's size, flags and base:allocation id."""
    greet(sock)
    context_id = None
    if structured:
        send_option(sock, OPT["STRUCTURED_REPLY"])
        assert option_replies(sock) == [(REP_ACK, b"")]
        if allocation:
            send_option(sock, OPT["SET_META_CONTEXT"], meta_data(name, ["base:allocation"]))
            for rtype, data in option_replies(sock):
                if rtype == REP_META_CONTEXT:
                    assert data[4:] == b"base:allocation"
                    context_id = struct.unpack(">I", data[:4])[0]
    send_option(sock, OPT["GO"], go_data(name))
    size = flags = None
    for rtype, data in option_replies(sock):
        if rtype == REP_INFO and struct.unpack(">H", data[:2])[0] == 0:
            _t, size, flags = struct.unpack(">HQH", data)
        elif rtype & 0x80000000:
            raise LookupError(f"GO refused: 0x{rtype:x} {data!r}")
    assert size is not None
    return Export(size, flags, context_id)


def request(cmd: int, offset: int = 0, length: int = 0, *, flags: int = 0, handle: int = 1,
            payload: bytes = b"", magic: int = REQUEST_MAGIC) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, cmd, handle, offset, length) + payload


@dataclass
class Reply:
    """One reply, whole: error 0 or an NBD error; data for reads; extents for block status."""

    handle: int
    error: int
    data: bytes | None = None
    extents: list[tuple[int, int]] | None = None
    message: str = ""


class ReplyReader:
    """Parses the server's reply stream; knows which handles are reads (simple replies need that)."""

    def __init__(self, sock: socket.socket, structured: bool):
        self.sock = sock
        self.structured = structured
        self.reads: dict[int, tuple[int, int]] = {}  # handle -> (offset, length)

    def expect_read(self, handle: int, offset: int, length: int) -> None:
        self.reads[handle] = (offset, length)

    def next(self) -> Reply:
        if not self.structured:
            magic, error, handle = struct.unpack(">IIQ", recv_exact(self.sock, 16))
            assert magic == SIMPLE_MAGIC, f"bad simple reply magic 0x{magic:x}"
            if handle in self.reads:
                _off, length = self.reads.pop(handle)
                if error == 0:
                    return Reply(handle, 0, data=recv_exact(self.sock, length))
            return Reply(handle, error)
        reply: Reply | None = None
        while True:
            head = recv_exact(self.sock, 4)
            (magic,) = struct.unpack(">I", head)
            if magic == SIMPLE_MAGIC:
                error, handle = struct.unpack(">IQ", recv_exact(self.sock, 12))
                assert handle not in self.reads, "simple reply to a structured read"
                return Reply(handle, error)
            assert magic == STRUCTURED_MAGIC, f"bad reply magic 0x{magic:x}"
            flags, rtype, handle, length = struct.unpack(">HHQI", recv_exact(self.sock, 16))
            body = recv_exact(self.sock, length)
            if reply is None:
                reply = Reply(handle, 0)
            assert handle == reply.handle
            if rtype == 1:  # OFFSET_DATA
                (off,) = struct.unpack(">Q", body[:8])
                expected_off, expected_len = self.reads.pop(handle)
                assert off == expected_off and len(body) - 8 == expected_len, "partial read chunk"
                reply.data = body[8:]
            elif rtype == 5:  # BLOCK_STATUS
                (_cid,) = struct.unpack(">I", body[:4])
                reply.extents = [struct.unpack(">II", body[i:i + 8]) for i in range(4, len(body), 8)]
            elif rtype & 0x8000:
                err, mlen = struct.unpack(">IH", body[:6])
                reply.error = err
                reply.message = body[6:6 + mlen].decode()
                self.reads.pop(handle, None)
            elif rtype != 0:
                raise AssertionError(f"unexpected chunk type {rtype}")
            if flags & 1:
                return reply
