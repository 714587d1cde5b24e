"""One source-to-target connection: connect, authenticate, open, ship, await apply.

``TargetLink.connect()`` dials (TLS if configured), runs the handshake and the
``open`` exchange, and starts a reader thread that turns ``ack``, ``committed``,
``applied``, ``hashes`` and ``error`` messages into state the shipping thread
waits on.  ``applied`` arrives whenever the target's apply ends (with protocol
2, while the next cycle is already shipping): the reader thread hands it to
``on_applied``.
The shipping thread only writes, so the target's acks never wait behind our
sends (no deadlock when both socket buffers fill).

Locking: ``_cond`` guards ``acked``, ``applied``, ``hashes``, ``failure``.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time

from cyclemirror.errors import (
    AuthenticationError,
    ConnectionLostError,
    DeadlineError,
    ProtocolError,
)
from cyclemirror.wire import handshake, sockio
from cyclemirror.wire.link import FrameLink, volume_limits

CONNECT_TIMEOUT = 10.0


class TargetLink:
    def __init__(self, address: tuple[str, int], key: bytes | None, *,
                 tls: handshake.TlsConfig | None = None, insecure: bool = False,
                 on_applied=None, on_failure=None):
        self.address = (address[0], int(address[1]))
        self.key = key
        self.tls = tls
        self.insecure = insecure
        self.link: FrameLink | None = None
        self.opened: dict | None = None
        self.declared_sizes: list[int] = []  # the volumes' sizes 'open' declared
        self._cond = threading.Condition()
        self.acked = (0, 0)  # (cycle, chunks) of the newest ack
        self.committed = 0  # newest cycle the target committed (protocol 2)
        self.applied = (0, 0.0)  # (cycle, freeze_time) of the newest apply
        self.version = 0  # the protocol version the handshake agreed on
        # on_applied(cycle, freeze_time): called by the reader thread for each 'applied'.
        self.on_applied = on_applied
        # on_failure(exc): called by the reader thread once, when it ends with a failure.
        self.on_failure = on_failure
        self.hashes: dict[tuple[int, int], bytes] = {}
        self.failure: BaseException | None = None
        self._reader: threading.Thread | None = None

    @property
    def label(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def dial(self) -> FrameLink:
        """Connect (TLS if configured) and run the handshake; the link, not yet opened.

        A verify (sender/verify.py) opens its own connection this way.  The socket
        keeps the connect timeout until the caller sets another.
        """
        try:
            raw = socket.create_connection(self.address, timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            raise ConnectionLostError(f"cannot connect to target {self.label}: {exc}") from None
        try:
            sockio.tune_link(raw)
            sock = raw
            if self.tls is not None:
                sock = self._tls_connect(raw)
            self.version = handshake.client_handshake(sock, self.key, insecure=self.insecure)
            return FrameLink(sock)
        except BaseException:
            raw.close()
            raise

    def connect(self, open_msg: dict, lineage: dict | None = None,
                resizable: bool = False) -> dict:
        """Dial, authenticate, open the mirror; return the target's ``opened`` reply.

        ``lineage``: the fields of the ``lineage`` message (the volume's generation,
        docs/failover.md), sent before ``open`` to a target of protocol 3 or newer.
        ``resizable``: a ``resizable`` message goes before ``open`` (a file object
        whose size changed: the target may hold another size than ``open`` says)."""
        link = self.dial()
        sock = link.sock
        try:
            if lineage is not None and self.version >= handshake.LINEAGE_VERSION:
                link.send_message("lineage", **lineage)
            if resizable:
                link.send_message("resizable")
            link.send_message("open", **open_msg)
            opened = link.recv_message({"opened"})
            vols = open_msg["volumes"]
            link.limits = volume_limits(max(v["size"] for v in vols),
                                        min(v["block_size"] for v in vols))
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        self.link, self.opened = link, opened
        # The sizes 'open' declared: a cycle of another size says so first ('size').
        self.declared_sizes = [v["size"] for v in open_msg["volumes"]]
        with self._cond:
            self.acked = (opened["pending_cycle"], opened["pending_chunks"])
            self.applied = (opened["applied_cycle"], opened["freeze_time"])
            self.committed = opened["applied_cycle"]
            self.failure = None
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name=f"mirror-acks-{self.label}")
        self._reader.start()
        return opened

    def _tls_connect(self, raw: socket.socket) -> ssl.SSLSocket:
        """The TLS handshake; an untrusted certificate is permanent, anything else a retry."""
        ctx = self.tls.client_context()
        name = self.tls.server_hostname or self.address[0]
        try:
            return ctx.wrap_socket(raw, server_hostname=name)
        except ssl.SSLCertVerificationError as exc:
            raise AuthenticationError(
                f"TLS: the certificate of target {self.label} is not trusted "
                f"({exc.verify_message or exc.reason}; [{exc.reason}]): check --tls-ca "
                f"(the CA that signed it) and --tls-server-name (checked: {name})") from None
        except ssl.SSLError as exc:
            raise ConnectionLostError(
                f"TLS handshake with target {self.label} failed ({exc.reason or exc}); does "
                "the target run with --tls-cert? (a plaintext target closes the "
                "connection)") from None

    def _read_loop(self) -> None:
        try:
            while True:
                msg = self.link.recv_message({"ack", "committed", "applied", "hashes"})
                with self._cond:
                    if msg["type"] == "ack":
                        self.acked = (msg["cycle"], msg["chunks"])
                    elif msg["type"] == "committed":
                        self.committed = max(self.committed, msg["cycle"])
                    elif msg["type"] == "applied":
                        self.applied = (msg["cycle"], msg["freeze_time"])
                        self.committed = max(self.committed, msg["cycle"])
                    else:
                        if len(msg["digests"]) != msg["count"] * 16:
                            raise ProtocolError("hashes: digest count does not match 'count'")
                        self.hashes[(msg["index"], msg["start_block"])] = bytes.fromhex(
                            msg["digests"])
                    self._cond.notify_all()
                # After self.applied is set: the driver relies on that order.
                if msg["type"] == "applied" and self.on_applied is not None:
                    self.on_applied(msg["cycle"], msg["freeze_time"])
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            with self._cond:
                self.failure = exc
                self._cond.notify_all()
            if self.on_failure is not None:
                self.on_failure(exc)

    def check(self) -> None:
        """Raise the reader's failure, if any (a lost link or the target's error)."""
        if self.failure is not None:
            raise self.failure

    def wait_for(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = predicate()
                if result:
                    return result
                self.check()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineError(f"target {self.label}: timed out waiting for {what}")
                self._cond.wait(min(left, 1.0))

    @property
    def pipelined(self) -> bool:
        """The target commits, says so, and applies while the next cycle arrives."""
        return self.version >= handshake.PIPELINED_VERSION

    def wait_applied(self, cycle: int, timeout: float) -> float:
        return self.wait_for(lambda: self.applied[0] >= cycle and self.applied[1] + 1,
                             timeout, f"cycle {cycle} to be applied")

    def wait_committed(self, cycle: int, timeout: float) -> None:
        """Wait until the target holds ``cycle`` durably: committed (protocol 2; it
        applies it meanwhile, and recovery would finish that), or applied (protocol 1)."""
        if not self.pipelined:
            self.wait_applied(cycle, timeout)
            return
        self.wait_for(lambda: self.committed >= cycle, timeout, f"cycle {cycle} to be committed")

    def fetch_hashes(self, index: int, start: int, count: int, timeout: float) -> bytes:
        self.link.send_message("hash_request", index=index, start_block=start, count=count)
        return self.wait_for(lambda: self.hashes.pop((index, start), None), timeout,
                             f"block hashes {start}+{count}")

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(5)
        # self.link stays: a sender still holding it gets ConnectionLostError.

