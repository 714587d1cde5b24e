"""cext/tlsrelay.pyx against its reference: a relay is the identity on both byte streams.

The model is the simplest there is: what one side writes, the other side
reads, in order, exactly, whichever way and in whatever pieces.  Hypothesis
drives random exchanges through a real TLS connection (Python's ssl as the
client with a certificate made by openssl: it has no PSK before 3.13, and
the relay does not care how the handshake authenticated), the relay in a
thread, and the plain end of a socket pair.  Also: the ends propagate
(close_notify -> EOF on the plain side, plain EOF -> close_notify), and a
handshake with a client that is not TLS fails as a TlsError.
"""

from __future__ import annotations

import socket
import ssl
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cyclemirror._cext.tlsrelay import ServerContext, TlsError, TlsSession
from tests.support.certs import Certs


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    certs = Certs(tmp_path_factory.mktemp("relay-certs"))
    cert, key = certs.server("relay")
    client = ssl.create_default_context(cafile=certs.ca_cert)
    return ServerContext(certfile=cert, keyfile=key), client


class Relayed:
    """One TLS connection through the relay: ``client`` (ssl) and ``plain`` (socket pair)."""

    def __init__(self, tls):
        server_ctx, client_ctx = tls
        lst = socket.create_server(("127.0.0.1", 0))
        raw = socket.create_connection(lst.getsockname(), timeout=10)
        self.conn, _ = lst.accept()
        lst.close()
        self.conn.setblocking(False)
        done = []
        t = threading.Thread(target=lambda: done.append(
            TlsSession.accept(server_ctx, self.conn.fileno(), None, 10.0)))
        t.start()
        self.client = client_ctx.wrap_socket(raw, server_hostname="localhost")
        t.join(10)
        self.session = done[0]
        self.plain, end = socket.socketpair()
        self.plain.settimeout(10)
        end.setblocking(False)
        self.reason = []

        def relay():
            try:
                self.reason.append(self.session.relay(self.conn.fileno(), end.fileno()))
            finally:
                end.close()

        self.thread = threading.Thread(target=relay)
        self.thread.start()

    def close(self):
        for s in (self.client, self.plain):
            try:
                s.close()
            except OSError:
                pass
        self.thread.join(10)
        self.conn.close()


def recv_exactly(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(1 << 20, n - len(buf)))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


pieces = st.lists(st.tuples(st.booleans(), st.integers(1, 300_000)), min_size=1, max_size=8)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(exchange=pieces, seed=st.integers(0, 255))
def test_every_byte_arrives_in_order_both_ways(tls, exchange, seed):
    r = Relayed(tls)
    try:
        for n, (to_server, size) in enumerate(exchange):
            data = bytes((seed + n + i) % 251 for i in range(256)) * (size // 256 + 1)
            data = data[:size]
            src, dst = (r.client, r.plain) if to_server else (r.plain, r.client)
            sender = threading.Thread(target=src.sendall, args=(data,))
            sender.start()  # both directions buffer: send and receive at once
            assert recv_exactly(dst, size) == data
            sender.join(10)
    finally:
        r.close()
    assert r.reason and r.reason[0] in ("the session ended", "the client closed TLS",
                                        "the client's socket failed or closed without "
                                        "close_notify")


def test_close_notify_and_plain_eof_propagate(tls):
    r = Relayed(tls)
    try:
        r.client.unwrap()  # close_notify from the client
        assert r.plain.recv(1) == b""  # the session sees the end
        r.thread.join(10)
        assert r.reason == ["the client closed TLS"]
    finally:
        r.close()
    r = Relayed(tls)
    try:
        r.plain.sendall(b"last words")
        r.plain.close()  # the session ended: the relay sends close_notify
        assert recv_exactly(r.client, 10) == b"last words"
        assert r.client.recv(1) == b""  # ssl reports close_notify as EOF
        r.thread.join(10)
        assert r.reason == ["the session ended"]
    finally:
        r.close()


def test_a_client_that_is_not_tls_fails_the_handshake(tls):
    server_ctx, _ = tls
    lst = socket.create_server(("127.0.0.1", 0))
    raw = socket.create_connection(lst.getsockname(), timeout=10)
    conn, _ = lst.accept()
    lst.close()
    try:
        conn.setblocking(False)
        raw.sendall(b"GET / HTTP/1.0\r\n\r\n" * 4)
        with pytest.raises(TlsError, match="TLS handshake failed"):
            TlsSession.accept(server_ctx, conn.fileno(), None, 10.0)
        raw.close()
        with pytest.raises(TlsError, match="stalled past"):  # and one that says nothing
            lst = socket.create_server(("127.0.0.1", 0))
            quiet = socket.create_connection(lst.getsockname(), timeout=10)
            c2, _ = lst.accept()
            lst.close()
            c2.setblocking(False)
            try:
                TlsSession.accept(server_ctx, c2.fileno(), None, 0.3)
            finally:
                c2.close()
                quiet.close()
    finally:
        conn.close()
