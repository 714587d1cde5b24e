"""Malformed NBD traffic: each attack opens its own connection and breaks the protocol once.

Every attack returns what the server did ("closed", or the error it replied)
so the test can check it against the protocol, not merely that nothing
crashed.  Sizes are chosen to tempt a careless server into huge allocations.
"""

from __future__ import annotations

import socket
import struct

from tests.support import nbd_rawclient as C


def _closed(sock: socket.socket) -> bool:
    """True once the server has hung up (EOF or reset) within the socket's timeout."""
    try:
        while True:
            if sock.recv(65536) == b"":
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def _session(path: str, name: str, structured: bool = True):
    sock = C.connect_unix(path, timeout=10)
    export = C.open_export(sock, name, structured=structured)
    return sock, export


# --- handshake-phase attacks: the server must hang up ------------------------------

def close_immediately(path, name):
    C.connect_unix(path).close()
    return "closed"


def garbage_client_flags(path, name):
    with C.connect_unix(path) as s:
        C.recv_exact(s, 18)
        s.sendall(b"\xff" * 64)
        return "closed" if _closed(s) else "open"


def bad_option_magic(path, name):
    with C.connect_unix(path) as s:
        C.greet(s)
        s.sendall(b"NOTMAGIC" + struct.pack(">II", 7, 0))
        return "closed" if _closed(s) else "open"


def huge_option_length(path, name):
    with C.connect_unix(path) as s:
        C.greet(s)
        s.sendall(struct.pack(">QII", C.IHAVEOPT, C.OPT["GO"], 0xFFFFFFF0) + b"x" * 1000)
        return "closed" if _closed(s) else "open"


def truncated_option_then_close(path, name):
    with C.connect_unix(path) as s:
        C.greet(s)
        s.sendall(struct.pack(">QII", C.IHAVEOPT, C.OPT["GO"], 100) + b"abc")
    return "closed"


def export_name_unknown(path, name):
    with C.connect_unix(path) as s:
        C.greet(s)
        C.send_option(s, C.OPT["EXPORT_NAME"], b"no-such-export")
        return "closed" if _closed(s) else "open"


def option_flood(path, name):
    with C.connect_unix(path, timeout=30) as s:
        C.greet(s)
        try:
            for _ in range(3000):
                C.send_option(s, 0x7777, b"z" * 100)
                C.option_replies(s)
        except (EOFError, ConnectionResetError, BrokenPipeError):
            return "closed"
        return "open"


# --- transmission-phase attacks -------------------------------------------------------

def bad_request_magic(path, name):
    s, _ = _session(path, name)
    with s:
        s.sendall(C.request(C.CMD_READ, 0, 512, magic=0xDEADBEEF))
        return "closed" if _closed(s) else "open"


def truncated_request_header(path, name):
    s, _ = _session(path, name)
    with s:
        s.sendall(C.request(C.CMD_READ, 0, 512)[:13])
    return "closed"


def truncated_write_payload(path, name):
    s, _ = _session(path, name)
    with s:
        s.sendall(C.request(C.CMD_WRITE, 0, 1 << 20) + b"q" * 1000)
    return "closed"


def huge_write_length(path, name):
    s, _ = _session(path, name)
    with s:
        s.sendall(C.request(C.CMD_WRITE, 0, 0xFFFFFFFF) + b"w" * 4096)
        return "closed" if _closed(s) else "open"


def errors_that_keep_the_session(path, name):
    """Requests the server must answer with an error and then keep serving."""
    s, export = _session(path, name)
    with s:
        reader = C.ReplyReader(s, True)
        cases = [
            (C.request(C.CMD_READ, 0, 0xFFFFFFFF, handle=1), C.EINVAL),          # huge read
            (C.request(C.CMD_READ, 2**64 - 512, 512, handle=2), C.EINVAL),       # offset wraps
            (C.request(C.CMD_READ, export.size, 1, handle=3), C.EINVAL),         # past the end
            (C.request(0x55, 0, 512, handle=4), C.EINVAL),                       # unknown command
            (C.request(C.CMD_READ, 0, 512, flags=0x4000, handle=5), C.EINVAL),   # unknown flag
            (C.request(C.CMD_WRITE, export.size - 1, 2, handle=6, payload=b"xy"), C.ENOSPC),
            (C.request(C.CMD_TRIM, 0, 0, handle=7), C.EINVAL),                   # zero length
            (C.request(C.CMD_FLUSH, 5, 0, handle=8), C.EINVAL),                  # flush with offset
            (C.request(C.CMD_WRITE_ZEROES, 0, 4096, flags=C.REQ_ONE, handle=9), C.EINVAL),
            (C.request(C.CMD_BLOCK_STATUS, 0, 0xFFFFFFFF, handle=10), C.EINVAL),
            (C.request(5, 0, 4096, handle=11), C.EINVAL),                        # CACHE: not offered
        ]
        s.sendall(b"".join(req for req, _ in cases))
        got = {}
        for _ in cases:
            r = reader.next()
            got[r.handle] = r.error
        want = {struct.unpack(">Q", req[8:16])[0]: err for req, err in cases}
        assert got == want, (got, want)
        # and the session still works
        s.sendall(C.request(C.CMD_READ, 0, 4096, handle=99))
        reader.expect_read(99, 0, 4096)
        r = reader.next()
        assert r.error == 0 and len(r.data) == 4096
        s.sendall(C.request(C.CMD_DISC))
        return "served"


def writes_to_read_only_export(path, name):
    """WRITE, TRIM and WRITE_ZEROES on a read-only export get EPERM; reads keep working."""
    s, export = _session(path, name)
    with s:
        assert export.flags & 2
        reader = C.ReplyReader(s, True)
        s.sendall(C.request(C.CMD_WRITE, 0, 4, handle=1, payload=b"evil")
                  + C.request(C.CMD_TRIM, 0, 4096, handle=2)
                  + C.request(C.CMD_WRITE_ZEROES, 0, 4096, handle=3))
        errors = [reader.next().error for _ in range(3)]
        reader.expect_read(4, 0, 4)
        s.sendall(C.request(C.CMD_READ, 0, 4, handle=4))
        data = reader.next().data
        s.sendall(C.request(C.CMD_DISC))
        return errors, data


def never_reads_replies(path, name, requests: int = 4000):
    """Queues thousands of reads and never reads a reply: only this session may stall."""
    s, _ = _session(path, name)
    s.settimeout(2)
    try:
        s.sendall(b"".join(C.request(C.CMD_READ, 0, 65536, handle=i) for i in range(requests)))
    except (TimeoutError, BlockingIOError):
        pass  # the server stopped reading because we do not read: that is the point
    return s  # the caller closes it after checking the others were served


ATTACKS = [close_immediately, garbage_client_flags, bad_option_magic, huge_option_length,
           truncated_option_then_close, export_name_unknown, option_flood, bad_request_magic,
           truncated_request_header, truncated_write_payload, huge_write_length,
           errors_that_keep_the_session]
