"""Loopback TCP pairs for harnesses that drive code through a real socket."""

from __future__ import annotations

import socket

_listener: socket.socket | None = None


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(ours, peer): a connected loopback TCP pair (one listener per process)."""
    global _listener
    if _listener is None:
        _listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    peer = socket.create_connection(_listener.getsockname())
    ours, _ = _listener.accept()
    return ours, peer


def feed(peer: socket.socket, data: bytes) -> None:
    """Send everything the fuzzer made, then end the stream (the code sees EOF after it)."""
    peer.sendall(data)
    peer.shutdown(socket.SHUT_WR)
