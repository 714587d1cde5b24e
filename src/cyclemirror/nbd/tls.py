"""TLS for the NBD export: the ``psktool`` key file, the handshake and the relay thread.

Design.  A client asks for TLS with ``NBD_OPT_STARTTLS`` during negotiation
(``negotiation.py`` refuses every other option before it when TLS is on).
``NbdTls.start(sock)`` then runs the server handshake on the connection
(``cyclemirror._cext.tlsrelay``, OpenSSL, pre-shared keys and/or a
certificate) and returns a ``TlsChannel``: a socket pair whose ``plain`` end
the server uses from then on, for the rest of the negotiation and for the
transmission loop, exactly as it uses a plain TCP connection; a thread of the
channel's own relays between the other end and the TLS connection (the one
thread that touches it: see the docstring of ``tlsrelay``).

Keys.  The key file is the one nbdkit, qemu and libnbd read, made by GnuTLS's
``psktool -u USER -p FILE``: one ``username:hexkey`` per line.  It is read
anew for every connection, so adding a user or changing a key needs no
restart; if it cannot be read then, the keys read last are used and the
failure is logged.  The user name a client proved is its identity, which
``access.py`` maps to the exports it may use.

Client certificates.  With a certificate and ``client_ca``, a client that
authenticates by certificate must present one of its own signed by that CA
(else the handshake fails: no certificate, another CA, expired); the
certificate's common name is then its identity, as a PSK user name is, so
``[nbd_clients]`` applies to it by that name.  PSK clients are unaffected.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading

from cyclemirror.errors import CycleMirrorError, UsageError

log = logging.getLogger("cyclemirror.nbd")

HANDSHAKE_TIMEOUT = 30.0  # seconds a client may take for the whole TLS handshake
MAX_PSK_FILE = 1 << 20  # bytes; a key file is a few lines
_USER = re.compile(r"[^:\s\x00]{1,128}")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2}){1,512}")


def read_psk_file(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """The keys of a ``psktool`` key file: {user name: key}; a bad line is an error."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PSK_FILE + 1)
    except OSError as exc:
        raise UsageError(f"NBD TLS key file {path}: cannot be read: {exc.strerror or exc}; "
                         "make it with 'psktool -u USER -p FILE'") from exc
    if len(raw) > MAX_PSK_FILE:
        raise UsageError(f"NBD TLS key file {path}: larger than {MAX_PSK_FILE} bytes; "
                         "is it really a psktool key file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"NBD TLS key file {path}: not UTF-8 text ({exc}); "
                         "expected 'username:hexkey' lines (psktool)") from exc
    keys: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hexkey = line.partition(":")
        if not sep or not _USER.fullmatch(user) or not _HEX.fullmatch(hexkey):
            raise UsageError(
                f"NBD TLS key file {path}, line {number}: expected 'username:hexkey' "
                "(a user name of 1-128 characters without ':' or blanks, and a key of "
                "1-512 bytes in hex), as 'psktool -u USER -p FILE' writes")
        if user in keys:
            raise UsageError(f"NBD TLS key file {path}, line {number}: user {user!r} "
                             "appears twice; keep one line per user")
        keys[user] = bytes.fromhex(hexkey)
    if not keys:
        raise UsageError(f"NBD TLS key file {path}: no keys; add one with "
                         "'psktool -u USER -p FILE'")
    return keys


class NbdTls:
    """The server's NBD TLS settings: a PSK key file and/or a certificate and key.

    ``client_ca``: clients that use certificates must present one signed by it.
    """

    def __init__(self, *, psk_file: str | os.PathLike[str] | None = None,
                 certfile: str | os.PathLike[str] | None = None,
                 keyfile: str | os.PathLike[str] | None = None,
                 client_ca: str | os.PathLike[str] | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT):
        from cyclemirror._cext.tlsrelay import ServerContext

        if psk_file is None and certfile is None:
            raise UsageError("NBD TLS: give a PSK key file (--nbd-tls-psk) and/or a "
                             "certificate (--nbd-tls-cert)")
        if keyfile is not None and certfile is None:
            raise UsageError("NBD TLS: --nbd-tls-key needs --nbd-tls-cert")
        if client_ca is not None and certfile is None:
            raise UsageError("NBD TLS: --nbd-tls-ca (client certificates) needs a server "
                             "certificate: add --nbd-tls-cert FILE")
        self.psk_file = os.fspath(psk_file) if psk_file is not None else None
        self._keys = read_psk_file(self.psk_file) if self.psk_file is not None else {}
        self.client_ca = os.fspath(client_ca) if client_ca is not None else None
        self._context = ServerContext(psk=self.psk_file is not None, certfile=certfile,
                                      keyfile=keyfile, client_ca=self.client_ca)
        self.handshake_timeout = float(handshake_timeout)

    def current_keys(self) -> dict[str, bytes]:
        """The key file as it is now, or the keys read last if it cannot be read."""
        if self.psk_file is None:
            return {}
        try:
            self._keys = read_psk_file(self.psk_file)
        except CycleMirrorError as exc:
            log.error("nbd: %s; keeping the keys read before", exc)
        return self._keys

    def start(self, sock: socket.socket) -> TlsChannel:
        """Run the handshake on a connection (after STARTTLS was acknowledged)."""
        from cyclemirror._cext.tlsrelay import TlsSession

        sock.setblocking(False)
        session = TlsSession.accept(self._context, sock.fileno(), self.current_keys(),
                                    self.handshake_timeout)
        return TlsChannel(sock, session)


class TlsChannel:
    """One connection's TLS: ``plain`` is the socket to use instead of the TCP one."""

    def __init__(self, sock: socket.socket, session):
        self.sock = sock
        self.session = session
        self.identity: str | None = session.identity
        self.plain, self._relay_end = socket.socketpair()
        self._relay_end.setblocking(False)
        self._thread = threading.Thread(target=self._relay, daemon=True, name="nbd-tls-relay")
        self._thread.start()

    def describe(self) -> str:
        if self.session.client_certificate:
            who = f"client certificate {self.identity!r}"
        else:
            who = f"user {self.identity!r}" if self.identity else "server certificate only"
        return f"{who}, {self.session.version} {self.session.cipher}"

    def _relay(self) -> None:
        try:
            reason = self.session.relay(self.sock.fileno(), self._relay_end.fileno())
            log.debug("nbd: TLS relay ended: %s", reason)
        except Exception:  # one connection's failure is logged, never the server's end
            log.exception("nbd: TLS relay failed")
        finally:
            self._relay_end.close()

    def finish(self, grace: float = 5.0) -> None:
        """End the channel: close the plain end, let the relay send close_notify, join it.

        A client that stops reading cannot hold the relay: after ``grace`` the TCP
        socket is shut down, which fails the relay's next TLS write or read.  The
        caller closes the TCP socket afterwards.
        """
        self.plain.close()
        self._thread.join(grace)
        if self._thread.is_alive():
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._thread.join()
