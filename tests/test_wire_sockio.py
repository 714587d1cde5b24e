"""sockio.send_all_parts: gathered sends arrive exactly as their concatenation.

Over real TCP on loopback with a small send buffer and a slow reader, so
sendmsg returns short in the middle of a part and the resume arithmetic is
exercised; more parts than one sendmsg takes; a peer that goes away is a
ConnectionLostError naming what was being sent.
"""

from __future__ import annotations

import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyclemirror import errors
from cyclemirror.wire.sockio import IOV_MAX, send_all_parts


def tcp_pair():
    with socket.create_server(("127.0.0.1", 0)) as lst:
        a = socket.create_connection(lst.getsockname())
        b, _ = lst.accept()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    # With a timeout the socket is non-blocking underneath, as the driver's are, so
    # sendmsg returns after what fits: short sends in the middle of a part.
    a.settimeout(30)
    b.settimeout(60)
    return a, b


def read_all(sock, expected, out):
    """Everything until the sender shuts its side; past ``expected`` bytes, hang up.

    A sender that repeats bytes (a wrong resume after a short send) then
    fails on the closed connection instead of sending forever.
    """
    got = bytearray()
    while len(got) <= expected and (chunk := sock.recv(3000)):
        got += chunk
    out.append(bytes(got))
    sock.close()


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 70000), min_size=1, max_size=20),
       seed=st.integers(0, 255))
def test_parts_arrive_as_their_concatenation(sizes, seed):
    parts = [bytes((seed + i + j) % 251 for j in range(n % 1000)) * (n // 1000 + 1)
             for i, n in enumerate(sizes)]
    parts = [p[:n] for p, n in zip(parts, sizes, strict=True)]
    whole = b"".join(parts)
    a, b = tcp_pair()
    try:
        out: list[bytes] = []
        t = threading.Thread(target=read_all, args=(b, len(whole), out), daemon=True)
        t.start()
        send_all_parts(a, [bytearray(p) if i % 2 else p for i, p in enumerate(parts)], "parts")
        a.shutdown(socket.SHUT_WR)
        t.join()
        assert out[0] == whole
    finally:
        a.close()
        b.close()


def test_more_parts_than_one_sendmsg_takes():
    parts = [bytes([i % 256]) * (1 + i % 7) for i in range(3 * IOV_MAX + 5)]
    whole = b"".join(parts)
    a, b = tcp_pair()
    try:
        out: list[bytes] = []
        t = threading.Thread(target=read_all, args=(b, len(whole), out), daemon=True)
        t.start()
        send_all_parts(a, parts, "many parts")
        a.shutdown(socket.SHUT_WR)
        t.join()
        assert out[0] == whole
    finally:
        a.close()
        b.close()


def test_a_vanished_peer_is_a_lost_connection_naming_what_was_sent():
    a, b = tcp_pair()
    b.close()
    with pytest.raises(errors.ConnectionLostError, match="chunks up to 9"):
        for _ in range(100):  # the first sends may still land in the buffer
            send_all_parts(a, [b"x" * 65536, b"y" * 65536], "chunks up to 9")
    a.close()
