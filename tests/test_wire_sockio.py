"""sockio.send_all_parts: gathered sends arrive exactly as their concatenation.

Over real TCP on loopback with a small send buffer and a slow reader, so
sendmsg returns short in the middle of a part and the resume arithmetic is
exercised; more parts than one sendmsg takes; a peer that goes away is a
ConnectionLostError naming what was being sent.
"""

from __future__ import annotations

import random
import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cyclemirror import errors
from cyclemirror.wire.sockio import IOV_MAX, BufferedReceiver, send_all_parts


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


def received_after_sending(parts):
    """send_all_parts over a fresh TCP pair; what the other end got before EOF."""
    a, b = tcp_pair()
    try:
        out: list[bytes] = []
        t = threading.Thread(target=read_all, args=(b, sum(map(len, parts)), out),
                             daemon=True)
        t.start()
        send_all_parts(a, parts, "parts")
        a.shutdown(socket.SHUT_WR)
        t.join()
        return out[0]
    finally:
        a.close()
        b.close()


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 70000), min_size=1, max_size=20),
       seed=st.integers(0, 255))
def test_parts_arrive_as_their_concatenation(sizes, seed):
    parts = [bytes((seed + i + j) % 251 for j in range(n % 1000)) * (n // 1000 + 1)
             for i, n in enumerate(sizes)]
    parts = [p[:n] for p, n in zip(parts, sizes, strict=True)]
    mixed = [bytearray(p) if i % 2 else p for i, p in enumerate(parts)]
    assert received_after_sending(mixed) == b"".join(parts)


def test_more_parts_than_one_sendmsg_takes():
    parts = [bytes([i % 256]) * (1 + i % 7) for i in range(3 * IOV_MAX + 5)]
    assert received_after_sending(parts) == b"".join(parts)


def test_a_vanished_peer_is_a_lost_connection_naming_what_was_sent():
    a, b = tcp_pair()
    b.close()
    with pytest.raises(errors.ConnectionLostError, match="chunks up to 9"):
        for _ in range(100):  # the first sends may still land in the buffer
            send_all_parts(a, [b"x" * 65536, b"y" * 65536], "chunks up to 9")
    a.close()


def pieces_sender(sock, data, cuts, then_close=True):
    def run():
        pos = 0
        for c in [*cuts, len(data)]:
            c = min(max(c, pos), len(data))
            if c > pos:
                sock.sendall(data[pos:c])
            pos = c
        if then_close:
            sock.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@settings(max_examples=40, deadline=None)
@given(reads=st.lists(st.integers(1, 20_000), min_size=1, max_size=30),
       cuts=st.lists(st.integers(0, 300_000), max_size=20), size=st.sampled_from([64, 4096]),
       seed=st.integers(0, 2**32))
def test_buffered_reads_return_the_stream_in_order_whatever_the_pieces(reads, cuts, size, seed):
    """Reads smaller and larger than the buffer, over sends cut anywhere, rebuild the stream."""
    data = random.Random(seed).randbytes(sum(reads))
    with socket.create_server(("127.0.0.1", 0)) as lst:
        a = socket.create_connection(lst.getsockname())
        b, _ = lst.accept()
    try:
        t = pieces_sender(a, data, sorted(cuts))
        rx = BufferedReceiver(b, size)
        got = bytearray()
        for n in reads:
            buf = bytearray(n)
            rx.read_into(buf, "a test message")
            got += buf
        assert got == data and rx.buffered == 0
        t.join()
    finally:
        a.close()
        b.close()


def test_buffered_eof_between_messages_is_clean_and_inside_one_is_not():
    a, b = tcp_pair()
    try:
        t = pieces_sender(a, b"x" * 100, [30])
        rx = BufferedReceiver(b, 4096)
        rx.read_into(bytearray(60), "a header")
        with pytest.raises(errors.ConnectionLostError, match="after 40 of 50 bytes of a tail"):
            rx.read_into(bytearray(50), "a tail")
        t.join()
    finally:
        a.close()
        b.close()
    a, b = tcp_pair()
    try:
        t = pieces_sender(a, b"y" * 10, [])
        rx = BufferedReceiver(b, 4096)
        rx.read_into(bytearray(10), "a header")
        with pytest.raises(errors.ConnectionLostError) as exc:
            rx.read_into(bytearray(48), "a frame header")
        assert exc.value.clean
        t.join()
    finally:
        a.close()
        b.close()
