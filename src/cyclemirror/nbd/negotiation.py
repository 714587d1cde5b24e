"""NBD fixed newstyle negotiation: the option haggling before transmission.

Design.  Negotiation is short and rare, so it is plain Python over a blocking
socket with a timeout.  Every option header and payload is validated before it
is acted on: option data over ``MAX_OPTION_DATA`` bytes and more than
``MAX_OPTIONS`` options end the connection (a client that keeps haggling is a
denial of service); a malformed payload of a known option gets
``NBD_REP_ERR_INVALID``; an unknown option gets ``NBD_REP_ERR_UNSUP``; an
unknown export gets ``NBD_REP_ERR_UNKNOWN`` (or, for ``NBD_OPT_EXPORT_NAME``,
which cannot answer with an error, a closed connection).

TLS.  With a ``tls`` setting (``tls.py``), TLS is required: before
``NBD_OPT_STARTTLS`` every option but ``NBD_OPT_ABORT`` gets
``NBD_REP_ERR_TLS_REQD`` (``NBD_OPT_EXPORT_NAME``, which cannot answer with an
error, closes the connection), as the protocol prescribes for a server that
requires TLS.  STARTTLS is acknowledged, the handshake runs, and the rest of
the haggling (and the transmission) uses the channel's plain socket, handed to
the server through ``on_tls`` so it can stop and clean up the channel.  The
identity the client proved decides, through ``access`` (``access.py``), which
exports it may see, probe and use, and whether read-only: a refused export
gets ``NBD_REP_ERR_POLICY`` and is left out of ``NBD_OPT_LIST``.

The result, ``Negotiated``, says which backend to serve and with which
transmission flags; the flags advertise exactly what the transmission loop
will honour for that backend (see ``transmission_flags``).

Every lookup result is accounted for: a per-connection backend found for a
probe (INFO, meta contexts), or for GO / EXPORT_NAME when the reply fails, is
released here at once; the one in ``Negotiated`` is the server's to release
when the session ends.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cyclemirror.errors import ConnectionLostError, ProtocolError
from cyclemirror.nbd import protocol as P
from cyclemirror.nbd.access import Access, ClientAccess
from cyclemirror.nbd.backends import as_backend, release_backend

log = logging.getLogger("cyclemirror.nbd")

MAX_OPTIONS = 1024
BASE_ALLOCATION_ID = 1  # the one context we offer gets this id in SET_META_CONTEXT


@dataclass(frozen=True)
class Negotiated:
    """What transmission needs: the export, its backend and the negotiated features."""

    name: str
    backend: Any
    size: int
    transmission_flags: int
    structured: bool
    context_id: int  # 0: no metadata context selected


def transmission_flags(backend: Any, structured: bool, readonly: bool = False) -> int:
    """The transmission flags for a backend: only what the request loop implements for it.

    Writable exports get FLUSH, FUA, TRIM and WRITE_ZEROES; FAST_ZERO only when
    the backend says zeroing never falls back to writing data; MULTI_CONN only
    when the backend says every connection sees one shared, coherent image.
    """
    flags = P.TFLAG_HAS_FLAGS
    if readonly or getattr(backend, "readonly", False):
        flags |= P.TFLAG_READ_ONLY
    else:
        flags |= P.TFLAG_SEND_FLUSH | P.TFLAG_SEND_FUA | P.TFLAG_SEND_TRIM
        flags |= P.TFLAG_SEND_WRITE_ZEROES
        if getattr(backend, "fast_zero", False):
            flags |= P.TFLAG_SEND_FAST_ZERO
    if structured:
        flags |= P.TFLAG_SEND_DF  # every read is answered with one content chunk
    if getattr(backend, "can_multi_conn", False):
        flags |= P.TFLAG_CAN_MULTI_CONN
    return flags


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly n bytes or raise ConnectionLostError (n was bounds-checked by the caller)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            k = sock.recv_into(view[got:], n - got)
        except TimeoutError as exc:
            raise ConnectionLostError("nbd negotiation: the client stalled past the timeout") from exc
        except OSError as exc:
            raise ConnectionLostError(f"nbd negotiation: receive failed: {exc}") from exc
        if k == 0:
            raise ConnectionLostError(f"nbd negotiation: client closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


class _Options:
    """Option haggling on one connection (used by one thread only)."""

    def __init__(self, sock: socket.socket, lookup: Callable[[str], Any],
                 list_names: Callable[[], Iterable[str]] | None, stopping: threading.Event,
                 tls: Any = None, on_tls: Callable[[Any], None] | None = None,
                 access: ClientAccess | None = None):
        self.sock = sock
        self.tls = tls
        self.on_tls = on_tls
        self.tls_started = False
        self.identity: str | None = None
        self.access = access if access is not None else ClientAccess(None)
        self.readonly_names: set[str] = set()  # exports this client may only read
        self.lookup = lookup
        self.list_names = list_names
        self.stopping = stopping
        self.structured = False
        self.no_zeroes = False
        self.meta_export: str | None = None  # export the selected contexts belong to
        self.context_id = 0

    # --- replies

    def reply(self, option: int, rtype: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QIII", P.REPLY_MAGIC, option, rtype, len(data)) + data)

    def error(self, option: int, rtype: int, message: str) -> None:
        self.reply(option, rtype, message.encode("utf-8", "replace")[: P.MAX_STRING])

    # --- helpers

    @staticmethod
    def decode_name(raw: bytes) -> str:
        if len(raw) > P.MAX_STRING:
            raise ValueError(f"name of {len(raw)} bytes exceeds {P.MAX_STRING}")
        name = raw.decode("utf-8")  # UnicodeDecodeError is a ValueError
        if "\0" in name:
            raise ValueError("name contains NUL")
        return name

    def find(self, name: str) -> tuple[Any | None, str]:
        """The backend for an export name, or (None, why)."""
        try:
            backend = self.lookup(name)
        except Exception as exc:  # the lookup is the daemon's; its failure is not our crash
            log.warning("nbd: lookup of export %r failed: %s", name, exc)
            return None, f"export {name!r} cannot be opened: {exc}"
        if backend is None:
            return None, f"no export named {name!r}"
        try:
            wrapped = as_backend(backend)
        except Exception as exc:
            release_backend(backend)
            log.error("nbd: export %r is not a usable backend: %s", name, exc)
            return None, f"export {name!r} cannot be served: {exc}"
        size = getattr(wrapped, "size", None)
        if not isinstance(size, int) or size < 0 or size >= 1 << 63:
            release_backend(wrapped)
            log.error("nbd: export %r has an invalid size %r", name, size)
            return None, f"export {name!r} has an invalid size"
        return wrapped, ""

    def allowed(self, name: str) -> bool:
        """May this client use export NAME?  Records read-only access for ``negotiated``."""
        decision = self.access.decide(self.identity, name)
        if decision is Access.READ_ONLY:
            self.readonly_names.add(name)
        return decision is not Access.NONE

    def negotiated(self, name: str, backend: Any) -> Negotiated:
        context_id = self.context_id if self.meta_export == name else 0
        readonly = name in self.readonly_names
        return Negotiated(name, backend, backend.size,
                          transmission_flags(backend, self.structured, readonly),
                          self.structured, context_id)

    # --- the loop

    def run(self) -> Negotiated | None:
        self.sock.sendall(struct.pack(">QQH", P.NBDMAGIC, P.IHAVEOPT,
                                      P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", recv_exact(self.sock, 4))
        if client_flags & ~P.KNOWN_CLIENT_FLAGS:
            raise ProtocolError(f"nbd negotiation: unknown client flags 0x{client_flags:x}")
        self.no_zeroes = bool(client_flags & P.FLAG_C_NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            magic, option, length = struct.unpack(">QII", recv_exact(self.sock, 16))
            if magic != P.IHAVEOPT:
                raise ProtocolError(f"nbd negotiation: bad option magic 0x{magic:016x}")
            if length > P.MAX_OPTION_DATA:
                raise ProtocolError(
                    f"nbd negotiation: option {option} carries {length} bytes, "
                    f"more than the {P.MAX_OPTION_DATA} any option needs")
            data = recv_exact(self.sock, length)
            if self.stopping.is_set() and option not in (P.OPT_ABORT, P.OPT_EXPORT_NAME):
                self.error(option, P.REP_ERR_SHUTDOWN, "server is shutting down")
                continue
            if self.tls is not None and not self.tls_started and option not in (
                    P.OPT_STARTTLS, P.OPT_ABORT):
                if option == P.OPT_EXPORT_NAME:  # cannot answer with an error
                    log.info("nbd: EXPORT_NAME before STARTTLS on a TLS-only server; closing")
                    return None
                self.error(option, P.REP_ERR_TLS_REQD,
                           "this server requires TLS: negotiate NBD_OPT_STARTTLS first "
                           "(e.g. nbds:// URIs with tls-psk-file, or qemu's tls-creds)")
                continue
            done = self.handle(option, data)
            if done is not None:
                return done or None
        raise ProtocolError(f"nbd negotiation: more than {MAX_OPTIONS} options")

    def handle(self, option: int, data: bytes) -> Negotiated | bool | None:
        """Handle one option. Returns Negotiated to start transmission, False to close."""
        if option == P.OPT_EXPORT_NAME:
            return self.export_name(data)
        if option == P.OPT_ABORT:
            try:
                self.reply(option, P.REP_ACK)
            except OSError:
                pass  # the client may close without waiting for the ACK
            return False
        if option == P.OPT_LIST:
            self.list_exports(option, data)
        elif option in (P.OPT_INFO, P.OPT_GO):
            return self.info_or_go(option, data)
        elif option == P.OPT_STRUCTURED_REPLY:
            if data:
                self.error(option, P.REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
            else:
                self.structured = True
                self.reply(option, P.REP_ACK)
        elif option in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
            self.meta_context(option, data)
        elif option == P.OPT_STARTTLS:
            self.starttls(option, data)
        else:
            self.error(option, P.REP_ERR_UNSUP, f"option {option} is not supported")
        return None

    def starttls(self, option: int, data: bytes) -> None:
        if self.tls is None:
            self.error(option, P.REP_ERR_POLICY, "this server does not offer TLS")
            return
        if data:
            self.error(option, P.REP_ERR_INVALID, "STARTTLS takes no data")
            return
        if self.tls_started:
            self.error(option, P.REP_ERR_INVALID, "TLS is already on")
            return
        self.reply(option, P.REP_ACK)
        timeout = self.sock.gettimeout()
        channel = self.tls.start(self.sock)  # TlsError ends the connection
        self.tls_started = True
        if self.on_tls is not None:
            self.on_tls(channel)  # the server owns the channel from here on
        self.sock = channel.plain
        self.sock.settimeout(timeout)
        self.identity = channel.identity
        log.info("nbd: TLS on (%s)", channel.describe())

    def export_name(self, data: bytes) -> Negotiated | bool:
        try:
            name = self.decode_name(data)
        except ValueError as exc:
            log.info("nbd: EXPORT_NAME with a bad name (%s); closing", exc)
            return False
        if not self.allowed(name):
            log.info("nbd: EXPORT_NAME: %s; closing", self.access.why_not(self.identity, name))
            return False
        backend, why = self.find(name)
        if backend is None:
            log.info("nbd: EXPORT_NAME: %s; closing (this option cannot return an error)", why)
            return False
        try:
            result = self.negotiated(name, backend)
            tail = b"" if self.no_zeroes else bytes(124)
            self.sock.sendall(struct.pack(">QH", result.size, result.transmission_flags) + tail)
        except BaseException:
            release_backend(backend)
            raise
        return result

    def list_exports(self, option: int, data: bytes) -> None:
        if data:
            self.error(option, P.REP_ERR_INVALID, "LIST takes no data")
            return
        if self.list_names is None:
            self.error(option, P.REP_ERR_POLICY, "listing exports is disabled")
            return
        try:
            names = [str(n) for n in self.list_names()]
        except Exception as exc:
            log.warning("nbd: list_names failed: %s", exc)
            self.error(option, P.REP_ERR_POLICY, f"listing exports failed: {exc}")
            return
        for name in names:
            if self.access.decide(self.identity, name) is Access.NONE:
                continue
            raw = name.encode("utf-8")
            if len(raw) <= P.MAX_STRING:
                self.reply(option, P.REP_SERVER, struct.pack(">I", len(raw)) + raw)
        self.reply(option, P.REP_ACK)

    def info_or_go(self, option: int, data: bytes) -> Negotiated | None:
        # u32 name length, name, u16 number of info requests, u16 each
        try:
            if len(data) < 6:
                raise ValueError(f"{len(data)} bytes is too short")
            (nlen,) = struct.unpack_from(">I", data, 0)
            if nlen > len(data) - 6:
                raise ValueError(f"name length {nlen} exceeds the option data")
            name = self.decode_name(data[4:4 + nlen])
            (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
            if len(data) != 6 + nlen + 2 * nreq:
                raise ValueError(f"{nreq} info requests do not match {len(data)} bytes")
            requests = struct.unpack_from(f">{nreq}H", data, 6 + nlen)
        except (ValueError, struct.error) as exc:
            self.error(option, P.REP_ERR_INVALID, f"malformed INFO/GO option: {exc}")
            return None
        if not self.allowed(name):
            self.error(option, P.REP_ERR_POLICY, self.access.why_not(self.identity, name))
            return None
        backend, why = self.find(name)
        if backend is None:
            self.error(option, P.REP_ERR_UNKNOWN, why)
            return None
        keep = False
        try:
            result = self.info_replies(option, name, backend, requests)
            keep = option == P.OPT_GO
            return result if keep else None
        finally:
            if not keep:
                release_backend(backend)

    def info_replies(self, option: int, name: str, backend: Any,
                     requests: tuple[int, ...]) -> Negotiated:
        result = self.negotiated(name, backend)
        self.reply(option, P.REP_INFO,
                   struct.pack(">HQH", P.INFO_EXPORT, result.size, result.transmission_flags))
        if P.INFO_NAME in requests:
            self.reply(option, P.REP_INFO, struct.pack(">H", P.INFO_NAME) + name.encode("utf-8"))
        # Block sizes are always sent: they tell clients our payload cap.
        block = getattr(backend, "block_size", P.PREFERRED_BLOCK)
        preferred = block if isinstance(block, int) and 1 <= block <= P.MAX_PAYLOAD else P.PREFERRED_BLOCK
        self.reply(option, P.REP_INFO,
                   struct.pack(">HIII", P.INFO_BLOCK_SIZE, 1, preferred, P.MAX_PAYLOAD))
        self.reply(option, P.REP_ACK)
        return result

    def meta_context(self, option: int, data: bytes) -> None:
        setting = option == P.OPT_SET_META_CONTEXT
        if setting:
            self.context_id = 0
            self.meta_export = None
        if not self.structured:
            self.error(option, P.REP_ERR_INVALID, "negotiate STRUCTURED_REPLY first")
            return
        # u32 name length, name, u32 number of queries, (u32 length, query) each
        try:
            if len(data) < 8:
                raise ValueError(f"{len(data)} bytes is too short")
            (nlen,) = struct.unpack_from(">I", data, 0)
            if nlen > len(data) - 8:
                raise ValueError(f"name length {nlen} exceeds the option data")
            name = self.decode_name(data[4:4 + nlen])
            pos = 4 + nlen
            (nq,) = struct.unpack_from(">I", data, pos)
            pos += 4
            queries = []
            for _ in range(nq):
                if len(data) - pos < 4:
                    raise ValueError("query count exceeds the option data")
                (qlen,) = struct.unpack_from(">I", data, pos)
                pos += 4
                if qlen > len(data) - pos:
                    raise ValueError(f"query length {qlen} exceeds the option data")
                queries.append(self.decode_name(data[pos:pos + qlen]))
                pos += qlen
            if pos != len(data):
                raise ValueError(f"{len(data) - pos} trailing bytes")
        except (ValueError, struct.error) as exc:
            self.error(option, P.REP_ERR_INVALID, f"malformed meta context option: {exc}")
            return
        if not self.allowed(name):
            self.error(option, P.REP_ERR_POLICY, self.access.why_not(self.identity, name))
            return
        backend, why = self.find(name)
        if backend is None:
            self.error(option, P.REP_ERR_UNKNOWN, why)
            return
        release_backend(backend)  # only its existence matters here
        if setting:
            selected = P.CONTEXT_BASE_ALLOCATION in queries
        else:  # listing: no query, the namespace, or the exact name all match
            selected = not queries or any(q in ("base:", P.CONTEXT_BASE_ALLOCATION) for q in queries)
        if selected:
            cid = BASE_ALLOCATION_ID if setting else 0
            self.reply(option, P.REP_META_CONTEXT,
                       struct.pack(">I", cid) + P.CONTEXT_BASE_ALLOCATION.encode())
            if setting:
                self.context_id = BASE_ALLOCATION_ID
                self.meta_export = name
        self.reply(option, P.REP_ACK)


def negotiate(sock: socket.socket, lookup: Callable[[str], Any],
              list_names: Callable[[], Iterable[str]] | None,
              stopping: threading.Event, *, tls: Any = None,
              on_tls: Callable[[Any], None] | None = None,
              access: ClientAccess | None = None) -> Negotiated | None:
    """Run option haggling on a connected socket; None when the client left or aborted.

    With ``tls`` (an ``NbdTls``) the client must start TLS first; ``on_tls(channel)``
    receives the channel, whose ``plain`` socket carries the session from then on.
    """
    try:
        return _Options(sock, lookup, list_names, stopping, tls, on_tls, access).run()
    except OSError as exc:
        raise ConnectionLostError(f"nbd negotiation: {exc}") from exc
