"""Both ends of a real mirror connection notice a dead link in about a minute.

Without TCP_USER_TIMEOUT a send into a link that died waits for the kernel's
retransmission limit (tcp_retries2, 15 minutes and more) before the source
retries on a new connection; without keepalive timings an idle link between
cycles is probed only after two hours.  ``wire.sockio.tune_link`` sets both,
and the source's dial and the target's accept use it: checked here on the
sockets of a real connection between a TargetLink and a TargetServer.
"""

import socket

from cyclemirror import keys
from cyclemirror.receiver import TargetServer
from cyclemirror.receiver import server as target_server
from cyclemirror.sender.connection import TargetLink
from cyclemirror.store import Store
from cyclemirror.wire import sockio
from cyclemirror.wire.handshake import TlsConfig
from tests.support.certs import Certs
from tests.support.mirror import wait_for


def options(sock: socket.socket) -> dict:
    tcp = socket.IPPROTO_TCP
    return {"nodelay": sock.getsockopt(tcp, socket.TCP_NODELAY) != 0,
            "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0,
            "idle": sock.getsockopt(tcp, socket.TCP_KEEPIDLE),
            "interval": sock.getsockopt(tcp, socket.TCP_KEEPINTVL),
            "count": sock.getsockopt(tcp, socket.TCP_KEEPCNT),
            "user_timeout_ms": sock.getsockopt(tcp, socket.TCP_USER_TIMEOUT)}


WANT = {"nodelay": True, "keepalive": True, "idle": sockio.KEEPIDLE,
        "interval": sockio.KEEPINTVL, "count": sockio.KEEPCNT,
        "user_timeout_ms": sockio.LINK_DEAD_AFTER_MS}


def test_both_ends_of_a_mirror_connection_bound_how_long_a_dead_link_goes_unnoticed(tmp_path):
    key = keys.generate_key()
    server = TargetServer(Store.create(str(tmp_path / "dst")), key)
    server.start()
    try:
        link = TargetLink(server.address, key).dial()
        try:
            assert options(link.sock) == WANT
            wait_for(lambda: server._conns, 10, "the target to accept")
            (accepted,) = list(server._conns)
            assert options(accepted) == WANT
        finally:
            link.close()
    finally:
        server.stop()


def test_stopping_a_tls_target_wakes_a_session_idle_between_cycles(tmp_path, monkeypatch):
    """wrap_socket detaches the accepted socket: stop() must shut down the TLS socket
    the session reads from, or a source idle between cycles keeps the target's stop
    waiting out STOP_WAIT (60 s: a `systemctl stop` that hangs, then is killed)."""
    certs = Certs(tmp_path / "certs")
    cert, key_file = certs.server("target")
    key = keys.generate_key()
    server = TargetServer(Store.create(str(tmp_path / "dst")), key,
                          tls=TlsConfig(certfile=cert, keyfile=key_file))
    server.start()
    link = TargetLink(server.address, key,
                      tls=TlsConfig(cafile=certs.ca_cert, server_hostname="127.0.0.1")).dial()
    try:
        wait_for(lambda: server._sessions, 10, "the target to start a session")
        (session,) = list(server._sessions)
        # Short enough that a session nobody woke is still alive when stop() returns.
        monkeypatch.setattr(target_server, "STOP_WAIT", 3.0)
        server.stop()
        assert not session.is_alive(), "stop() left the idle TLS session blocked in a read"
    finally:
        link.close()
