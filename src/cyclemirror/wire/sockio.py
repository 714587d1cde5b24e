"""Exact-length socket reads that turn EOF and resets into ConnectionLostError.

Every reader in the protocol says what it was reading (``what``), so a
truncated stream produces a message such as "connection closed after 7 of 48
bytes of the frame header from 10.0.0.2:7000" instead of a bare struct error.
"""

from __future__ import annotations

import socket
import ssl

from cyclemirror.errors import ConnectionLostError


def peer_name(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "a closed peer"


def recv_exact(sock: socket.socket, n: int, what: str) -> bytearray:
    """Read exactly ``n`` bytes or raise ConnectionLostError naming ``what``.

    Returns the receive buffer itself (no copy: payloads are megabytes).
    """
    buf = bytearray(n)
    recv_into_exact(sock, buf, what)
    return buf


def recv_into_exact(sock: socket.socket, buf, what: str) -> None:
    """Fill all of the writable buffer ``buf`` from ``sock`` or raise ConnectionLostError.

    A plain socket asks the kernel for the whole remainder at once
    (MSG_WAITALL), so a megabyte payload costs one system call instead of one
    per TCP receive window; a TLS socket accepts no flags and loops instead.
    With a timeout set, the socket is non-blocking underneath and MSG_WAITALL
    may still return early; the loop covers that too.
    """
    view = memoryview(buf).cast("B")
    n = len(view)
    flags = 0 if isinstance(sock, ssl.SSLSocket) else socket.MSG_WAITALL
    got = 0
    while got < n:
        try:
            k = sock.recv_into(view[got:], n - got, flags)
        except TimeoutError:
            raise ConnectionLostError(
                f"timed out after {got} of {n} bytes of {what} from {peer_name(sock)}"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionLostError(
                f"connection error after {got} of {n} bytes of {what} from "
                f"{peer_name(sock)}: {exc}"
            ) from None
        if k == 0:
            err = ConnectionLostError(
                f"connection closed after {got} of {n} bytes of {what} from {peer_name(sock)}"
            )
            err.clean = got == 0  # closed between messages: an orderly end, not truncation
            raise err
        got += k


def send_all(sock: socket.socket, data: bytes | memoryview, what: str) -> None:
    try:
        sock.sendall(data)
    except TimeoutError:
        raise ConnectionLostError(f"timed out sending {what} to {peer_name(sock)}") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConnectionLostError(f"cannot send {what} to {peer_name(sock)}: {exc}") from None


IOV_MAX = 1024  # sendmsg takes at most this many buffers per call on Linux


def send_all_parts(sock: socket.socket, parts: list, what: str) -> None:
    """Send the concatenation of ``parts`` without building it (sendmsg gathers them).

    A TLS socket has no sendmsg, so its parts are joined first.
    """
    if len(parts) == 1 or isinstance(sock, ssl.SSLSocket):
        send_all(sock, parts[0] if len(parts) == 1 else b"".join(parts), what)
        return
    views = [memoryview(p).cast("B") for p in parts]
    first = 0
    try:
        while first < len(views):
            n = sock.sendmsg(views[first:first + IOV_MAX])
            while first < len(views) and n >= len(views[first]):
                n -= len(views[first])
                first += 1
            if n:
                views[first] = views[first][n:]
    except TimeoutError:
        raise ConnectionLostError(f"timed out sending {what} to {peer_name(sock)}") from None
    except OSError as exc:
        raise ConnectionLostError(f"cannot send {what} to {peer_name(sock)}: {exc}") from None
