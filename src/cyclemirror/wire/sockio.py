"""Exact-length socket reads that turn EOF and resets into ConnectionLostError.

Every reader in the protocol says what it was reading (``what``), so a
truncated stream produces a message such as "connection closed after 7 of 48
bytes of the frame header from 10.0.0.2:7000" instead of a bare struct error.

``tune_link`` sets the TCP options both ends of a mirror connection use, so
that a link that dies is noticed in about a minute rather than the kernel's
retransmission limit (``tcp_retries2``: 15 minutes and more).  The minute is
the daemon's ``link_timeout`` (``serve --link-timeout``), set once at start
with ``set_link_timeout``: the keepalive timings scale with it (a third of
it idle, then six probes a twelfth of it apart), so the default 60 s gives
20 s, 5 s and 6 probes.
"""

from __future__ import annotations

import socket
import ssl

from cyclemirror.errors import ConnectionLostError

# A link is dead when sent data stays unacknowledged this long (TCP_USER_TIMEOUT), or
# when an idle one answers no keepalive probe: first after KEEPIDLE s, then every
# KEEPINTVL s, KEEPCNT of them.  A slow link still acknowledges continuously.
LINK_DEAD_AFTER_MS = 60_000
KEEPIDLE, KEEPINTVL, KEEPCNT = 20, 5, 6
LINK_TIMEOUT_RANGE = (1.0, 3600.0)  # seconds ``set_link_timeout`` accepts
_timings = {"TCP_KEEPIDLE": KEEPIDLE, "TCP_KEEPINTVL": KEEPINTVL, "TCP_KEEPCNT": KEEPCNT,
            "TCP_USER_TIMEOUT": LINK_DEAD_AFTER_MS}


def link_timings(seconds: float) -> dict[str, int]:
    """The socket options for a link declared dead after ``seconds`` (pure)."""
    low, high = LINK_TIMEOUT_RANGE
    if not low <= seconds <= high:
        raise ValueError(f"link timeout {seconds} s is outside {low:g}-{high:g} s")
    return {"TCP_KEEPIDLE": max(1, round(seconds / 3)),
            "TCP_KEEPINTVL": max(1, round(seconds / 12)), "TCP_KEEPCNT": KEEPCNT,
            "TCP_USER_TIMEOUT": round(seconds * 1000)}


def set_link_timeout(seconds: float) -> None:
    """How long a link may leave data unacknowledged (or probes unanswered): every
    connection tuned from now on uses it (the daemon sets it once, at start)."""
    _timings.update(link_timings(seconds))


def link_timeout() -> float:
    """The link timeout in force, in seconds (what ``set_link_timeout`` set)."""
    return _timings["TCP_USER_TIMEOUT"] / 1000


def tune_link(sock: socket.socket) -> None:
    """No Nagle delay, keepalive probes, and a bound on unacknowledged data (Linux)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in tuple(_timings.items()):
        option = getattr(socket, name, None)
        if option is not None:  # all of them exist on Linux
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


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


def recv_into_exact(sock: socket.socket, buf, what: str, already: int = 0) -> None:
    """Fill all of the writable buffer ``buf`` from ``sock`` or raise ConnectionLostError.

    A plain socket asks the kernel for the whole remainder at once
    (MSG_WAITALL), so a megabyte payload costs one system call instead of one
    per TCP receive window; a TLS socket accepts no flags and loops instead.
    With a timeout set, the socket is non-blocking underneath and MSG_WAITALL
    may still return early; the loop covers that too.  ``already``: bytes of
    the same message the caller got before (for the error message only).
    """
    view = memoryview(buf).cast("B")
    n = len(view)
    flags = 0 if isinstance(sock, ssl.SSLSocket) else socket.MSG_WAITALL
    got = 0
    while got < n:
        got += _recv_once(sock, view[got:], flags, what, already + got, already + n)


def _recv_once(sock: socket.socket, view: memoryview, flags: int, what: str, got: int,
               total: int) -> int:
    """One recv_into; EOF, resets and timeouts become ConnectionLostError naming ``what``."""
    try:
        k = sock.recv_into(view, len(view), flags)
    except TimeoutError:
        raise ConnectionLostError(
            f"timed out after {got} of {total} bytes of {what} from {peer_name(sock)}"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise ConnectionLostError(
            f"connection error after {got} of {total} bytes of {what} from "
            f"{peer_name(sock)}: {exc}"
        ) from None
    if k == 0:
        err = ConnectionLostError(
            f"connection closed after {got} of {total} bytes of {what} from {peer_name(sock)}"
        )
        err.clean = got == 0  # closed between messages: an orderly end, not truncation
        raise err
    return k


class BufferedReceiver:
    """Exact reads through one receive buffer, so small messages do not cost a recv each.

    A delta of scattered 4 KiB blocks is thousands of frames; reading each
    header and payload with its own recv was two system calls per frame.
    Here one recv takes whatever has arrived (up to ``size`` bytes), and
    reads are served from it; a read of half the buffer or more that the
    buffer does not hold goes straight into the caller's buffer (no copy).
    The same errors as ``recv_into_exact``.  One reader thread only.
    """

    def __init__(self, sock: socket.socket, size: int = 256 << 10):
        self.sock = sock
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = self._end = 0

    @property
    def buffered(self) -> int:
        """Bytes received from the socket and not yet read."""
        return self._end - self._start

    def read_into(self, buf, what: str) -> None:
        view = memoryview(buf).cast("B")
        n = len(view)
        got = min(n, self._end - self._start)
        if got:
            view[:got] = self._view[self._start:self._start + got]
            self._start += got
        rest = n - got
        if not rest:
            return
        if rest >= len(self._buf) // 2:
            recv_into_exact(self.sock, view[got:], what, already=got)
            return
        self._start = self._end = 0
        while self._end < rest:
            self._end += _recv_once(self.sock, self._view[self._end:], 0, what,
                                    got + self._end, n)
        view[got:] = self._view[:rest]
        self._start = rest


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
