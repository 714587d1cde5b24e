"""NBD option haggling (nbd/negotiation.py) on a real socket, fed a fuzzed client.

The input is everything the client sends after the server's greeting
(client flags, then options); the stream then ends.  ``negotiate`` must end
with a Negotiated result, None, or a CycleMirrorError; the exports are two
small raw images (``v`` writable, ``ro`` read-only, per connection), and
``boom`` makes the lookup itself fail.
"""

from __future__ import annotations

import struct
import threading

from cyclemirror.nbd import protocol as P
from cyclemirror.nbd.backends import release_backend
from cyclemirror.nbd.negotiation import negotiate
from fuzz import nbdsetup
from fuzz.harness import clean
from fuzz.tcp import tcp_pair

MAX_LEN = 4096
_stopping = threading.Event()


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", P.IHAVEOPT, option, len(data)) + data


def info(name: bytes, *requests: int) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(requests))
            + b"".join(struct.pack(">H", r) for r in requests))


def meta(name: bytes, *queries: bytes) -> bytes:
    return (struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
            + b"".join(struct.pack(">I", len(q)) + q for q in queries))


def seeds() -> list[bytes]:
    flags = struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)
    return [
        flags + opt(P.OPT_LIST) + opt(P.OPT_STRUCTURED_REPLY)
        + opt(P.OPT_SET_META_CONTEXT, meta(b"v", b"base:allocation"))
        + opt(P.OPT_GO, info(b"v", P.INFO_NAME, P.INFO_BLOCK_SIZE)),
        flags + opt(P.OPT_INFO, info(b"ro")) + opt(P.OPT_EXPORT_NAME, b"ro"),
        flags + opt(P.OPT_STARTTLS) + opt(P.OPT_LIST_META_CONTEXT, meta(b"v"))
        + opt(P.OPT_GO, info(b"boom")) + opt(P.OPT_ABORT),
        struct.pack(">I", 0) + opt(P.OPT_EXPORT_NAME, b"nope"),
    ]


def test_one_input(data: bytes) -> None:
    ours, peer = tcp_pair()
    drainer = nbdsetup.client(peer, data)
    try:
        ours.settimeout(2.0)
        result = clean(negotiate, ours, nbdsetup.lookup, nbdsetup.list_names, _stopping)
        if result is not None and not isinstance(result, Exception):
            assert result.name in ("v", "ro"), result.name
            release_backend(result.backend)
    finally:
        ours.close()
        drainer.join(5)
        peer.close()
