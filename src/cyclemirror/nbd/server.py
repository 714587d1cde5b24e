"""The NBD server: listeners, one thread per connection, orderly shutdown.

Design.  ``NbdServer`` listens on a Unix socket and/or TCP.  Each listener has
an accept thread; each accepted connection gets its own thread that runs the
negotiation (``negotiation.negotiate``, Python, with a timeout) and then the
transmission loop (``cyclemirror._cext.nbdio.TransmissionSession``, Cython,
blocking, GIL released around socket calls).  A connection's failure, however
malformed its traffic, ends only that connection: every exception is caught
and logged in its thread.

Locking.  ``_lock`` guards the set of live connections and the listeners.  A
connection thread closes its socket under the lock, and ``stop()`` shuts
sockets down under the same lock, so a shutdown never reaches a file
descriptor number that was already reused.

Backend lifecycle.  ``lookup`` may return a backend made for one connection
(``per_connection = True``, e.g. a pinned mirror image): the negotiation
releases those it only probed, and the connection thread releases the one it
served when the session ends, whatever way it ends (``backends.release_backend``).

TLS.  With ``tls`` (an ``nbd.tls.NbdTls``) every TCP connection must start
TLS before anything else (``negotiation.py``); the Unix socket stays plain,
its file permissions being its access control.  Once TLS is on, the
connection's registered socket becomes the channel's plain end (under
``_lock``, so ``stop()`` shuts down the socket the session reads), and the
connection thread ends the channel (``TlsChannel.finish``) before it closes
the TCP socket, so the relay thread never touches a closed descriptor.
``access`` (``nbd.access.ClientAccess``) limits TLS clients, by the PSK user
name they proved, to some exports, read-only or read-write.

Shutdown.  ``stop()`` closes the listeners, then shuts down the read side of
every connection: a blocked ``recv`` returns end-of-stream, the session sends
the replies to the requests it already handled and ends.  Connections still
alive after the grace period are shut down both ways.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterable
from typing import Any

from cyclemirror._cext.nbdio import TransmissionSession
from cyclemirror.errors import AlreadyExistsError, CycleMirrorError, UsageError
from cyclemirror.nbd import protocol as P
from cyclemirror.nbd.backends import release_backend
from cyclemirror.nbd.negotiation import negotiate

log = logging.getLogger("cyclemirror.nbd")

NEGOTIATION_TIMEOUT = 30.0  # seconds a client may take per negotiation read
_UNIX_PATH_MAX = 107


class NbdServer:
    """Serves exports found by ``lookup(name) -> backend | None`` over NBD.

    ``list_names()`` (optional) answers NBD_OPT_LIST.  ``tcp`` is ``(host,
    port)``; port 0 picks a free one, readable afterwards as ``tcp_address``.
    ``max_payload`` caps READ/WRITE lengths (advertised as the maximum block
    size); ``negotiation_timeout`` is how long a client may stall per read
    during negotiation before it is dropped.
    """

    def __init__(self, lookup: Callable[[str], Any], *,
                 list_names: Callable[[], Iterable[str]] | None = None,
                 unix_path: str | os.PathLike[str] | None = None,
                 tcp: tuple[str, int] | None = None,
                 max_connections: int = 256,
                 max_payload: int = P.MAX_PAYLOAD,
                 negotiation_timeout: float = NEGOTIATION_TIMEOUT,
                 tls: Any = None, access: Any = None):
        if not callable(lookup):
            raise UsageError("NbdServer: lookup must be callable (name -> backend or None)")
        if unix_path is None and tcp is None:
            raise UsageError("NbdServer: give unix_path and/or tcp=(host, port) to listen on")
        if unix_path is not None and len(os.fsencode(unix_path)) > _UNIX_PATH_MAX:
            raise UsageError(f"NbdServer: unix socket path {unix_path} is longer than "
                             f"{_UNIX_PATH_MAX} bytes; choose a shorter one")
        if tcp is not None:
            if (not isinstance(tcp, tuple) or len(tcp) != 2 or not isinstance(tcp[1], int)
                    or not 0 <= tcp[1] <= 65535):
                raise UsageError(f"NbdServer: tcp must be (host, port 0..65535), not {tcp!r}")
        if not 512 <= max_payload <= P.MAX_PAYLOAD:
            raise UsageError(f"NbdServer: max_payload {max_payload} is outside [512, {P.MAX_PAYLOAD}]")
        self._lookup = lookup
        self._list_names = list_names
        self._unix_path = os.fspath(unix_path) if unix_path is not None else None
        self._tcp = tcp
        self._max_connections = max_connections
        self._max_payload = max_payload
        self._negotiation_timeout = float(negotiation_timeout)
        self._tls = tls
        self._access = access
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listeners: list[socket.socket] = []
        self._accept_threads: list[threading.Thread] = []
        self._connections: dict[threading.Thread, socket.socket] = {}
        self.tcp_address: tuple[str, int] | None = None
        self.started = False

    # ------------------------------------------------------------ addresses

    @property
    def unix_path(self) -> str | None:
        return self._unix_path

    def uri(self, name: str) -> str:
        """An NBD URI for an export (Unix socket preferred), for clients such as nbdinfo.

        Over TCP with TLS it is an ``nbds://`` URI; a PSK client adds its user name
        and ``?tls-psk-file=FILE``.
        """
        if self._unix_path is not None:
            return f"nbd+unix:///{name}?socket={self._unix_path}"
        if self.tcp_address is None:
            raise UsageError("NbdServer.uri: the server is not listening yet; call start()")
        host, port = self.tcp_address
        if ":" in host:
            host = f"[{host}]"  # IPv6 literal
        scheme = "nbds" if self._tls is not None else "nbd"
        return f"{scheme}://{host}:{port}/{name}"

    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> NbdServer:
        if self.started:
            raise UsageError("NbdServer.start: already started")
        self._stopping.clear()  # a stopped server may be started again
        self._accept_threads = []
        try:
            if self._unix_path is not None:
                self._listeners.append(self._bind_unix(self._unix_path))
            if self._tcp is not None:
                host, port = self._tcp
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
                sock.listen(64)
                self.tcp_address = sock.getsockname()[:2]
                self._listeners.append(sock)
        except OSError as exc:
            self._close_listeners()
            raise UsageError(f"NbdServer: cannot listen on {self._unix_path or self._tcp}: "
                             f"{exc.strerror or exc}") from exc
        self.started = True
        for sock in self._listeners:
            t = threading.Thread(target=self._accept_loop, args=(sock,), daemon=True,
                                 name=f"nbd-accept-{sock.fileno()}")
            t.start()
            self._accept_threads.append(t)
        return self

    @staticmethod
    def _bind_unix(path: str) -> socket.socket:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise AlreadyExistsError(f"NbdServer: {path} exists and is not a socket; "
                                         "remove it or choose another path")
            os.unlink(path)  # a stale socket from an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(64)
        return sock

    def _close_listeners(self) -> None:
        with self._lock:
            listeners, self._listeners = self._listeners, []
        for sock in listeners:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() on Linux
            except OSError:
                pass
            sock.close()

    def stop(self, grace: float = 5.0) -> None:
        """Stop listening, let connections finish their current request, join all threads."""
        if not self.started:
            return
        self._stopping.set()
        self._close_listeners()
        for t in self._accept_threads:
            t.join(grace)
        with self._lock:
            for sock in self._connections.values():
                try:
                    sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass
            threads = list(self._connections)
        for t in threads:
            t.join(grace)
        with self._lock:
            for sock in self._connections.values():
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            threads = list(self._connections)
        for t in threads:
            t.join(grace)
        if self._unix_path is not None:
            try:
                os.unlink(self._unix_path)
            except FileNotFoundError:
                pass
        self.started = False

    def __enter__(self) -> NbdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ connections

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                conn, _peer = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("nbd: accept failed; listener stops")
                return
            with self._lock:
                full = len(self._connections) >= self._max_connections
                if not full and not self._stopping.is_set():
                    t = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                         name="nbd-conn")
                    self._connections[t] = conn
                    t.start()
                    continue
            log.warning("nbd: refusing a connection: %s",
                        "server is stopping" if self._stopping.is_set()
                        else f"{self._max_connections} connections are open")
            conn.close()

    def _serve(self, conn: socket.socket) -> None:
        me = threading.current_thread()
        name = "?"
        result = None
        channels = []  # the TLS channel, once the client started TLS

        def on_tls(channel) -> None:
            channels.append(channel)
            with self._lock:
                self._connections[me] = channel.plain

        try:
            tcp = conn.family in (socket.AF_INET, socket.AF_INET6)
            if tcp:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self._negotiation_timeout)
            tls = self._tls if tcp else None
            result = negotiate(conn, self._lookup, self._list_names, self._stopping,
                               tls=tls, on_tls=on_tls,
                               access=self._access if tls is not None else None)
            if result is None:
                return
            name = result.name
            sock = channels[0].plain if channels else conn
            sock.settimeout(None)  # transmission may idle as long as the client likes
            session = TransmissionSession(
                sock.fileno(), result.name, result.backend, result.size,
                result.transmission_flags, result.structured, result.context_id,
                self._max_payload)
            reason = session.run()
            log.info("nbd export %r: session ended after %d requests: %s", name,
                     session.requests, reason)
        except CycleMirrorError as exc:
            log.info("nbd export %r: connection ended: %s", name, exc)
        except Exception:  # a bug in one session must not take the server down
            log.exception("nbd export %r: connection failed", name)
        finally:
            if result is not None:
                release_backend(result.backend)
            if channels:
                with self._lock:  # stop() must not reach the plain end while it closes
                    self._connections[me] = conn
            for channel in channels:
                channel.finish()
            with self._lock:
                self._connections.pop(me, None)
                conn.close()
