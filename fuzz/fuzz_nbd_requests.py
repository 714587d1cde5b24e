"""The NBD transmission loop (cext/nbdio.pyx ``TransmissionSession``) fed fuzzed requests.

Byte 0 picks the session's negotiated shape (structured replies, the
base:allocation context, the writable or the read-only export, a small
payload cap); the rest is the stream of requests, then EOF.  ``run`` must
return a reason or raise a CycleMirrorError, whatever the requests say.

The loop is Cython, which atheris does not instrument: coverage feedback
comes from the Python backend calls only, so this harness is close to
blind mutation around its seeds; its seeds hold one of every command.
"""

from __future__ import annotations

import struct

from cyclemirror._cext.nbdio import TransmissionSession
from cyclemirror.nbd import protocol as P
from cyclemirror.nbd.backends import release_backend
from cyclemirror.nbd.negotiation import transmission_flags
from fuzz import nbdsetup
from fuzz.harness import clean
from fuzz.tcp import tcp_pair

MAX_LEN = 1 << 18


def req(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, handle: int = 7,
        payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", P.REQUEST_MAGIC, flags, cmd, handle, offset,
                       length) + payload


def seeds() -> list[bytes]:
    return [
        b"\x03" + req(P.CMD_WRITE, 4096, 8, payload=b"12345678") + req(P.CMD_READ, 0, 4096)
        + req(P.CMD_FLUSH) + req(P.CMD_TRIM, 8192, 4096) + req(P.CMD_BLOCK_STATUS, 0, 65536)
        + req(P.CMD_WRITE_ZEROES, 0, 4096, P.CMD_FLAG_FAST_ZERO) + req(P.CMD_DISC),
        b"\x00" + req(P.CMD_WRITE, 0, 4096, P.CMD_FLAG_FUA, payload=bytes(4096))
        + req(P.CMD_READ, 1 << 20, 1) + req(P.CMD_CACHE, 0, 512) + req(99),
        b"\x04" + req(P.CMD_WRITE, 0, 4, payload=b"nope") + req(P.CMD_READ, 0, 512, P.CMD_FLAG_DF),
        b"\x08" + req(P.CMD_WRITE, 0, 300000, payload=bytes(1000)),
        b"\x01" + req(P.CMD_WRITE, 0, 200000, payload=bytes(200000)) + req(P.CMD_READ, 0, 100),
    ]


def test_one_input(data: bytes) -> None:
    if not data:
        return
    shape = data[0]
    structured = bool(shape & 1)
    context = 1 if structured and shape & 2 else 0
    backend = nbdsetup.lookup("ro" if shape & 4 else "v")
    max_payload = 65536 if shape & 8 else P.MAX_PAYLOAD
    ours, peer = tcp_pair()
    drainer = nbdsetup.client(peer, data[1:])
    try:
        session = TransmissionSession(ours.fileno(), "v", backend, backend.size,
                                      transmission_flags(backend, structured), structured,
                                      context, max_payload)
        reason = clean(session.run)
        assert reason is None or isinstance(reason, str | Exception), reason
    finally:
        ours.close()
        drainer.join(5)
        peer.close()
        release_backend(backend)
        if not getattr(backend, "per_connection", False):
            backend.close()
