"""TargetServer: the listening side a daemon hosts, one thread per connection.

``TargetServer(store, key, listen=(host, port), tls=None, insecure=False)``;
``key`` is one key, a list of keys (all accepted: rotation), or a callable
returning such a list, called for every connection (so a key file edited on
disk takes effect without a restart);
``start()`` binds (port 0 picks a free port, see ``address``) and accepts in a
thread; ``stop()`` closes the listener and every session.  ``store`` is a
``cyclemirror.store.Store`` (only ``.path`` and ``.node_id`` are used), so
mirror images land in ``STORE/mirrors/<source node id>/``.

Isolation: a session that fails (bad key, protocol error, corrupted frame,
disk error) is logged, told why, and closed; other sessions never notice.

Keys in use: ``key_use`` maps (source node, mirror) to the id of the key
(``handshake.key_id``) its latest session proved, with the peer and the time,
for status.

Locking: ``registry`` maps (source node, mirror, group) to the session that
holds that mirror, under one lock.  A new session for a held mirror takes it
over (the old connection is usually a dead one the source already left):
the old socket is shut down and the new session waits for its release.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time

from cyclemirror.errors import (
    ConnectionLostError,
    CycleMirrorError,
    DeadlineError,
    PeerError,
    ProtocolError,
    UsageError,
)
from cyclemirror.receiver.backend import backend_record, rbd_status
from cyclemirror.receiver.session import Session, error_code
from cyclemirror.wire import handshake, sockio
from cyclemirror.wire.handshake import TlsConfig
from cyclemirror.wire.link import MAX_CHUNK, FrameLink

log = logging.getLogger(__name__)
TAKEOVER_TIMEOUT = 30.0
STOP_WAIT = 60.0  # how long stop() lets running sessions (and their applies) finish


class Removal:
    """Holds a mirror in the registry while ``mirror rm SOURCE/NAME`` deletes it."""

    link = None


class MirrorRegistry:
    """Which session holds which mirror; guarded by one condition variable."""

    def __init__(self):
        self._cond = threading.Condition()
        self._held: dict[tuple, Session] = {}
        self.key_use: dict[tuple[str, str], dict] = {}  # (node, mirror) -> key id, peer, time

    def acquire(self, key: tuple, session: Session) -> None:
        with self._cond:
            old = self._held.get(key)
            if isinstance(old, Removal):
                raise ConnectionLostError(f"mirror {key[1]!r} is being removed on this "
                                          "target ('mirror rm' there); retrying later")
            if old is not None:
                log.info("mirror %s: new connection takes over from %s", key, old.link.peer)
                try:
                    old.link.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if not self._cond.wait_for(lambda: key not in self._held, TAKEOVER_TIMEOUT):
                raise DeadlineError(f"mirror {key[1]!r} is still held by another session")
            self._held[key] = session
            used = getattr(session.link, "key_id", None)
            self.key_use[(key[0], key[1])] = {"key_id": used, "peer": session.link.peer,
                                              "tls": getattr(session.link, "tls", False),
                                              "time": time.time()}

    def holder(self, key: tuple):
        """The session holding mirror ``key`` now (a connected source), or None."""
        with self._cond:
            return self._held.get(key)

    def release(self, key: tuple, session: Session) -> None:
        with self._cond:
            if self._held.get(key) is session:
                del self._held[key]
                self._cond.notify_all()

    def hold(self, key: tuple, *, force: bool, timeout: float = TAKEOVER_TIMEOUT) -> object:
        """Keep sources out of mirror ``key`` while it is removed; returns the holder to
        give to ``release``.  A connected source refuses it unless ``force``, which
        closes that source's connection (the source retries, and is refused meanwhile)."""
        holder = Removal()
        with self._cond:
            old = self._held.get(key)
            if old is not None and not force:
                raise UsageError(
                    f"mirror {key[1]!r} of source {key[0]}: the source at {old.link.peer} is "
                    "connected and sending to it; break that mirror on the source first "
                    "('cyclemirror mirror break VOLUME --to HOST:PORT' there) or pass --force")
            if isinstance(old, Removal):
                raise UsageError(f"mirror {key[1]!r} of source {key[0]} is being removed")
            if old is not None:
                log.info("mirror %s: closing the connection of %s to remove it", key,
                         old.link.peer)
                try:
                    old.link.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if not self._cond.wait_for(lambda: key not in self._held, timeout):
                raise DeadlineError(f"mirror {key[1]!r}: its session did not end within "
                                    f"{timeout}s; try again")
            self._held[key] = holder
        return holder


class TargetServer:
    def __init__(self, store, key: bytes | None, listen=("127.0.0.1", 0),
                 tls: TlsConfig | None = None, insecure: bool = False, on_applied=None,
                 on_committed=None, rbd=None):
        if (key is None or (isinstance(key, list) and not key)) and not insecure:
            raise UsageError("a target without a key refuses to run; give it a key file "
                             "(cyclemirror keygen) or pass --insecure explicitly")
        self.root = os.fspath(store.path)
        # rbd: a receiver.backend.RbdConfig puts new mirrors' images into that Ceph pool.
        self.rbd = rbd
        self.store = store  # failback turns a local volume into an image (receiver/resync.py)
        # on_failback(volume): the daemon lets go of a volume a failback turns into an image.
        self.on_failback = None
        # on_switchover(promote result, back_to): a planned switchover promoted an image
        # here; the daemon mirrors the new volume back to back_to (HOST:PORT, or "").
        self.on_switchover = None
        self.node_id = store.node_id
        self.node_name = getattr(store, "node_name", None)
        self.key = key
        self.listen = tuple(listen)
        self.tls_context = tls.server_context() if tls else None
        self.registry = MirrorRegistry()
        # on_applied(mirror): called right after a cycle is applied (in the mirror's apply
        # thread, or the session's for a protocol-1 source), before the source hears of
        # it (the daemon's metrics, tests' snapshots).
        self.on_applied = on_applied
        # on_committed(mirror): called in the session thread at a cycle's commit point,
        # before the source hears of it (from then on the cycle survives any crash).
        self.on_committed = on_committed
        self.address: tuple[str, int] | None = None
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._sessions: set[threading.Thread] = set()
        self._lock = threading.Lock()  # guards _conns and _sessions
        self._stopping = threading.Event()
        self.errors: list[str] = []  # recent session errors, newest last (capped)

    def start(self) -> None:
        os.makedirs(os.path.join(self.root, "mirrors"), exist_ok=True)
        self._recover_all()
        self._listener = socket.create_server(self.listen, reuse_port=False)
        self.address = self._listener.getsockname()[:2]
        self._thread = threading.Thread(target=self._accept_loop, name="target-accept",
                                        daemon=True)
        self._thread.start()
        log.info("mirror target listening on %s:%d", *self.address)

    def _recover_all(self) -> None:
        """Finish or keep every mirror's in-flight cycle before accepting anyone."""
        from cyclemirror.receiver.mirror import Mirror
        from cyclemirror.receiver.state import MirrorState

        base = os.path.join(self.root, "mirrors")
        for node in sorted(os.listdir(base)):
            ndir = os.path.join(base, node)
            if not os.path.isdir(ndir):
                continue
            for name in sorted(os.listdir(ndir)):
                if name.endswith((".state.json", ".group.json")):
                    try:
                        st = MirrorState.load(os.path.join(ndir, name))
                        Mirror(ndir, st, os.path.join(ndir, name), MAX_CHUNK,
                               rbd=self.rbd).close()
                    except (CycleMirrorError, OSError) as exc:
                        self._note_error(f"recovery of {ndir}/{name}: {exc}")
        from cyclemirror.receiver.treesession import recover_all

        recover_all(self.root, self._note_error)  # tree mirrors (receiver/treesession.py)

    def _note_error(self, text: str) -> None:
        log.warning("%s", text)
        self.errors = (self.errors + [text])[-50:]

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _addr = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            t = threading.Thread(target=self._serve, args=(conn,), name="target-session",
                                 daemon=True)
            with self._lock:
                self._sessions.add(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.add(conn)
        link = None
        sock = conn
        try:
            conn.settimeout(handshake.HANDSHAKE_TIMEOUT)
            sockio.tune_link(conn)
            if self.tls_context is not None:
                sock = self._tls_accept(conn)
                # wrap_socket detached conn (its fd is sock's now): stop() must shut
                # down the TLS socket, or a session idle between cycles is never woken.
                with self._lock:
                    self._conns.discard(conn)
                    self._conns.add(sock)
            keys = self.key() if callable(self.key) else self.key
            version, used = handshake.server_handshake_keys(sock, keys)
            sock.settimeout(None)  # idle between cycles is normal; keepalive finds the dead
            link = FrameLink(sock)
            link.key_id, link.tls = used, sock is not conn
            Session(self, link, version).run()
        except Exception as exc:  # noqa: BLE001 - isolate every session's failure
            self._note_error(f"session with {_peer(conn)}: {type(exc).__name__}: {exc}")
            if link is not None:
                link.send_error(exc, error_code(exc))
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._conns.discard(sock)
                self._sessions.discard(threading.current_thread())
            for c in {conn, sock}:
                try:
                    c.close()
                except OSError:
                    pass

    def _tls_accept(self, conn: socket.socket):
        """The TLS handshake of a session, its failures named for a person."""
        first = handshake._peek(conn, 8)
        if first == handshake.MAGIC_SOURCE:
            # A cyclemirror source without TLS: tell it, in plaintext, what to add.
            handshake.refuse_plaintext_source(conn)  # raises, naming the fix
        if first and not handshake.looks_like_tls(first):
            raise ProtocolError(f"{_peer(conn)} sent plaintext to this TLS target; refused")
        try:
            return self.tls_context.wrap_socket(conn, server_side=True)
        except ssl.SSLError as exc:
            raise PeerError(f"TLS handshake with {_peer(conn)} failed: "
                            f"{exc.reason or exc}") from None
        except OSError as exc:
            raise ConnectionLostError(f"TLS handshake with {_peer(conn)} failed: {exc}") from None

    @property
    def key_use(self) -> dict:
        return self.registry.key_use

    def status(self) -> list[dict]:
        from cyclemirror.receiver.state import MirrorState

        out = []
        base = os.path.join(self.root, "mirrors")
        for node in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            ndir = os.path.join(base, node)
            for name in sorted(os.listdir(ndir)) if os.path.isdir(ndir) else []:
                if name.endswith((".state.json", ".group.json")):
                    try:
                        st = MirrorState.load(os.path.join(ndir, name))
                    except (CycleMirrorError, OSError):
                        continue
                    row = {"source_node": node, "mirror": st.mirror,
                           "applied_cycle": st.applied_cycle, "freeze_time": st.freeze_time}
                    rec = backend_record(st)
                    if rec is not None:  # where the images are, for RBD mirrors
                        row.update(rbd_status(st, rec))
                    out.append(row)
        return out

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            except OSError:
                pass
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                # The plain socket's shutdown, also for a TLS one: it wakes a session
                # blocked in a read without tearing the TLS state from under it.
                socket.socket.shutdown(c, socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
        # A session ends by waiting for its mirror's apply (an apply reports 'applied'
        # before its fsync, Mirror._redo): a stop lets it finish, so a daemon stopped
        # right after a sync leaves no committed cycle for the next start to redo (a
        # daemon started without --listen exports no image with a cycle to redo).
        deadline = time.monotonic() + STOP_WAIT
        with self._lock:
            sessions = list(self._sessions)
        for t in sessions:
            t.join(max(0.0, deadline - time.monotonic()))


def _peer(conn: socket.socket) -> str:
    try:
        host, port = conn.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "a peer"
