"""The mirror handshake (wire/handshake.py), both roles, and the first frame after it.

Byte 0: bit 0 = which role we play (0 target, 1 source), bit 1 = with a key
(else insecure mode on both ends).  The rest is what the peer sends, then
the stream ends.  As an insecure target that accepted the handshake, the
harness also reads the ``open`` message through a FrameLink, so the frame
reader behind the handshake sees fuzzed bytes too.
"""

from __future__ import annotations

import struct

from cyclemirror.wire import handshake, link
from fuzz.harness import clean
from fuzz.tcp import feed, tcp_pair

MAX_LEN = 4096
KEY = bytes(range(32))


def seeds() -> list[bytes]:
    hello = handshake._HELLO.pack(handshake.MAGIC_SOURCE, 1, 1, handshake.FLAG_SOURCE_HAS_KEY,
                                  b"n" * 32)
    hello_nokey = handshake._HELLO.pack(handshake.MAGIC_SOURCE, 1, 1, 0, b"n" * 32)
    challenge = handshake._CHALLENGE.pack(handshake.MAGIC_TARGET, 1, handshake.AUTH_HMAC_SHA256,
                                          0, b"t" * 32, b"p" * 32)
    challenge_none = handshake._CHALLENGE.pack(handshake.MAGIC_TARGET, 1, handshake.AUTH_NONE,
                                               0, b"t" * 32, bytes(32))
    refused = handshake._CHALLENGE.pack(handshake.MAGIC_TARGET, 0, 0, 0, b"t" * 32, bytes(32))
    verdict = struct.pack(">BH", 0, 2) + b"ok"
    from cyclemirror._cext import frames
    open_frame = bytes(frames.encode_control(0, b'{"type":"open"}'))
    return [b"\x02" + hello + b"p" * 32, b"\x00" + hello_nokey + bytes(32) + open_frame,
            b"\x03" + challenge + verdict, b"\x01" + challenge_none + verdict,
            b"\x01" + refused + struct.pack(">BH", 1, 5) + b"nope!"]


def test_one_input(data: bytes) -> None:
    if not data:
        return
    source = bool(data[0] & 1)
    key = KEY if data[0] & 2 else None
    ours, peer = tcp_pair()
    try:
        ours.settimeout(2.0)
        feed(peer, data[1:])
        if source:
            clean(handshake.client_handshake, ours, key, insecure=key is None)
        else:
            version = clean(handshake.server_handshake, ours, key)
            if isinstance(version, int) and key is None:
                clean(link.FrameLink(ours).recv_message, {"open"})
    finally:
        ours.close()
        peer.close()
