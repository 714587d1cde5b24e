"""Versioned handshake with mutual HMAC-SHA256 challenge-response, and TLS setup.

The handshake runs before any frame, in fixed-size binary messages, so a
peer cannot make us allocate anything before it has proven the key:

  source -> target  HELLO      magic, min/max version, flags, 32-byte nonce Ns
  target -> source  CHALLENGE  magic, chosen version, auth mode, nonce Nt,
                               proof_t = HMAC(K, "cyclemirror target" | V | Ns | Nt)
  source -> target  PROOF      proof_s = HMAC(K, "cyclemirror source" | V | Nt | Ns)
  target -> source  VERDICT    status byte, length-prefixed message (<= 1 KiB)

Both sides prove the key over the other's fresh nonce; the role labels keep a
proof from being reflected back.  The target proves first so a source never
sends a proof to a peer that has not shown it holds the key.  The key never
travels.  A target without a key runs only with ``insecure=True`` and then
says so in CHALLENGE (auth mode 0); a source that has a key refuses such a
target, and a keyless source must opt in to insecure mode too.

TLS (optional) wraps the socket before HELLO; then the handshake also runs
inside the encrypted channel, and frames after it are protected by TLS.
Without TLS only the handshake is authenticated: use TLS on untrusted links.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import ssl
import struct
from dataclasses import dataclass

from cyclemirror.errors import AuthenticationError, ProtocolError, UsageError
from cyclemirror.wire.sockio import peer_name, recv_exact, send_all

# 2: SCATTER frames, and 'committed' before 'applied' so the next cycle's copy
# overlaps the apply (docs/protocol.md, "Cycle").  A target speaks 1 and 2.
PROTOCOL_VERSION = 2
PIPELINED_VERSION = 2
MIN_PROTOCOL_VERSION = 1
HANDSHAKE_TIMEOUT = 15.0

MAGIC_SOURCE = b"CYMIRSRC"
MAGIC_TARGET = b"CYMIRTGT"
NONCE_SIZE = 32
PROOF_SIZE = 32

AUTH_NONE = 0
AUTH_HMAC_SHA256 = 1
FLAG_SOURCE_HAS_KEY = 1

_HELLO = struct.Struct(">8sHHI32s")  # magic, min, max, flags, nonce
_CHALLENGE = struct.Struct(">8sHHI32s32s")  # magic, version, auth, reserved, nonce, proof
_VERDICT = struct.Struct(">BH")  # status, message length
MAX_VERDICT_MESSAGE = 1024


@dataclass(frozen=True)
class TlsConfig:
    """Certificate files for TLS; ``cafile`` verifies the peer when given."""

    certfile: str | None = None
    keyfile: str | None = None
    cafile: str | None = None
    server_hostname: str | None = None  # source side: name to check in the target's cert

    def server_context(self) -> ssl.SSLContext:
        if not self.certfile:
            raise UsageError("TLS on the target needs a certificate file (certfile)")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.certfile, self.keyfile)
            if self.cafile:
                ctx.load_verify_locations(self.cafile)
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"TLS: cannot load {self.certfile}: {exc}") from None
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            if self.cafile:
                ctx.load_verify_locations(self.cafile)
            else:
                ctx.load_default_certs()
            if self.certfile:
                ctx.load_cert_chain(self.certfile, self.keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"TLS: cannot load certificates: {exc}") from None
        # The pre-shared key authenticates the peer; the hostname check is an
        # extra that needs a name, so it is on only when one is configured.
        ctx.check_hostname = self.server_hostname is not None
        return ctx


def _proof(key: bytes, role: bytes, version: int, first: bytes, second: bytes) -> bytes:
    msg = b"cyclemirror " + role + struct.pack(">H", version) + first + second
    return hmac.new(key, msg, hashlib.sha256).digest()


def _send_verdict(sock: socket.socket, ok: bool, message: str) -> None:
    data = message.encode("utf-8")[:MAX_VERDICT_MESSAGE]
    send_all(sock, _VERDICT.pack(0 if ok else 1, len(data)) + data, "handshake verdict")


def _read_verdict(sock: socket.socket) -> tuple[bool, str]:
    status, length = _VERDICT.unpack(recv_exact(sock, _VERDICT.size, "handshake verdict"))
    if length > MAX_VERDICT_MESSAGE:
        raise ProtocolError(
            f"target {peer_name(sock)} sent a handshake message of {length} bytes "
            f"(cap {MAX_VERDICT_MESSAGE})"
        )
    text = recv_exact(sock, length, "handshake verdict").decode("utf-8", "replace")
    return status == 0, text


def client_handshake(sock: socket.socket, key: bytes | None, *, insecure: bool = False) -> int:
    """Run the source side on a connected socket; return the agreed version.

    Raises AuthenticationError (permanent) on a key mismatch or an
    unauthenticated target, ProtocolError on garbage, ConnectionLostError
    when the stream ends early.
    """
    if key is None and not insecure:
        raise UsageError("a mirror source needs a key (or insecure=True, explicitly)")
    peer = peer_name(sock)
    nonce_s = secrets.token_bytes(NONCE_SIZE)
    flags = FLAG_SOURCE_HAS_KEY if key is not None else 0
    send_all(
        sock,
        _HELLO.pack(MAGIC_SOURCE, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, flags, nonce_s),
        "handshake hello",
    )
    raw = recv_exact(sock, _CHALLENGE.size, "handshake challenge")
    magic, version, auth, _reserved, nonce_t, proof_t = _CHALLENGE.unpack(raw)
    if magic != MAGIC_TARGET:
        raise ProtocolError(f"{peer} is not a cyclemirror target (bad magic {magic!r})")
    if version == 0:
        _ok, text = _read_verdict(sock)
        raise ProtocolError(f"target {peer} refused the handshake: {text}")
    if not MIN_PROTOCOL_VERSION <= version <= PROTOCOL_VERSION:
        raise ProtocolError(
            f"target {peer} chose protocol version {version}, which we did not offer "
            f"({MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION})"
        )
    if auth == AUTH_NONE:
        if key is not None:
            raise AuthenticationError(
                f"target {peer} runs without a key (--insecure); refusing to send it "
                "data: give the target the key file"
            )
        if proof_t != bytes(PROOF_SIZE):
            raise ProtocolError(f"target {peer} sent a proof in insecure mode")
        proof_s = bytes(PROOF_SIZE)
    elif auth == AUTH_HMAC_SHA256:
        if key is None:
            _ok, text = _read_verdict(sock)
            raise AuthenticationError(f"target {peer} requires a key: {text}")
        expected = _proof(key, b"target", version, nonce_s, nonce_t)
        if not hmac.compare_digest(expected, proof_t):
            raise AuthenticationError(
                f"target {peer} does not hold our key (its HMAC proof did not match); "
                "check that both sides use the same key file"
            )
        proof_s = _proof(key, b"source", version, nonce_t, nonce_s)
    else:
        raise ProtocolError(f"target {peer} asked for unknown auth mode {auth}")
    send_all(sock, proof_s, "handshake proof")
    ok, text = _read_verdict(sock)
    if not ok:
        raise AuthenticationError(f"target {peer} rejected us: {text}")
    return version


def server_handshake(sock: socket.socket, key: bytes | None) -> int:
    """Run the target side; return the agreed version or raise (after telling the peer).

    ``key`` None means insecure mode (the caller checked that it was asked for).
    """
    peer = peer_name(sock)
    raw = recv_exact(sock, _HELLO.size, "handshake hello")
    magic, vmin, vmax, flags, nonce_s = _HELLO.unpack(raw)
    nonce_t = secrets.token_bytes(NONCE_SIZE)
    if magic != MAGIC_SOURCE:
        raise ProtocolError(f"{peer} is not a cyclemirror source (bad magic {magic!r})")
    version = min(vmax, PROTOCOL_VERSION)
    if vmin > vmax or version < max(vmin, MIN_PROTOCOL_VERSION):
        text = (
            f"no common protocol version: source offers {vmin}..{vmax}, target speaks "
            f"{MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}; upgrade the older side"
        )
        send_all(sock, _CHALLENGE.pack(MAGIC_TARGET, 0, 0, 0, nonce_t, bytes(PROOF_SIZE)),
                 "handshake challenge")
        _send_verdict(sock, False, text)
        raise ProtocolError(f"handshake with {peer}: {text}")
    if key is None:
        send_all(
            sock,
            _CHALLENGE.pack(MAGIC_TARGET, version, AUTH_NONE, 0, nonce_t, bytes(PROOF_SIZE)),
            "handshake challenge",
        )
        recv_exact(sock, PROOF_SIZE, "handshake proof")
        _send_verdict(sock, True, "insecure mode")
        return version
    proof_t = _proof(key, b"target", version, nonce_s, nonce_t)
    send_all(
        sock,
        _CHALLENGE.pack(MAGIC_TARGET, version, AUTH_HMAC_SHA256, 0, nonce_t, proof_t),
        "handshake challenge",
    )
    if not flags & FLAG_SOURCE_HAS_KEY:
        _send_verdict(sock, False, "this target requires a key; start the source with one")
        raise AuthenticationError(f"source {peer} has no key; refused")
    proof_s = recv_exact(sock, PROOF_SIZE, "handshake proof")
    expected = _proof(key, b"source", version, nonce_t, nonce_s)
    if not hmac.compare_digest(expected, proof_s):
        _send_verdict(sock, False, "authentication failed: the keys differ")
        raise AuthenticationError(
            f"source {peer} failed authentication (HMAC proof did not match our key)"
        )
    _send_verdict(sock, True, "ok")
    return version
