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

Key rotation: a target may hold several keys (old and new).  A source puts
the id of its key (``key_id``: the first 4 bytes of a SHA-256 of the key,
shown as 8 hex digits) in the first 4 bytes of its nonce and sets
``FLAG_KEY_ID``; the target proves with that key, or refuses naming the id.
A source without the flag (an older release) gets the target's first key.
The id reveals which key is used, nothing about it.

TLS (optional) wraps the socket before HELLO; then the handshake also runs
inside the encrypted channel, and frames after it are protected by TLS.
Without TLS only the handshake is authenticated: use TLS on untrusted links.
The contexts allow TLS 1.2+ with AEAD ciphers only (AES-GCM, ChaCha20-Poly1305),
and the source checks the target's certificate chain and name (by default
the host it dials).  A plaintext peer of a TLS peer (or the reverse) is
recognised by its first bytes and refused with an error that says which
option is missing.
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
# overlaps the apply (docs/protocol.md, "Cycle").  3: 'lineage' before 'open'
# (roles and generations, docs/failover.md).  A target speaks 1 to 3.
PROTOCOL_VERSION = 3
PIPELINED_VERSION = 2
LINEAGE_VERSION = 3  # the source sends 'lineage' before 'open' (docs/failover.md)
MIN_PROTOCOL_VERSION = 1
HANDSHAKE_TIMEOUT = 15.0

MAGIC_SOURCE = b"CYMIRSRC"
MAGIC_TARGET = b"CYMIRTGT"
NONCE_SIZE = 32
PROOF_SIZE = 32

AUTH_NONE = 0
AUTH_HMAC_SHA256 = 1
FLAG_SOURCE_HAS_KEY = 1
FLAG_KEY_ID = 2  # the first KEY_ID_SIZE bytes of the source's nonce name its key
KEY_ID_SIZE = 4
# TLS 1.2 suites: forward-secret AEAD only (TLS 1.3's own suites are all AEAD).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!SHA1"
_TLS_RECORD_TYPES = (0x15, 0x16, 0x17)  # alert, handshake, application data


def key_id(key: bytes) -> str:
    """The public id of a key (8 hex digits), as status shows it and the nonce carries it."""
    return hashlib.sha256(b"cyclemirror key id\0" + key).digest()[:KEY_ID_SIZE].hex()


def looks_like_tls(first: bytes) -> bool:
    """True when ``first`` (>= 2 bytes) starts a TLS record (type, then major version 3)."""
    return len(first) >= 2 and first[0] in _TLS_RECORD_TYPES and first[1] == 3


def _peek(sock: socket.socket, n: int) -> bytes:
    """Up to ``n`` bytes at the head of a plain socket, left unread (b"" if none/TLS)."""
    if isinstance(sock, ssl.SSLSocket):
        return b""
    try:
        return sock.recv(n, socket.MSG_PEEK | socket.MSG_WAITALL)
    except OSError:
        return b""

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
        ctx.set_ciphers(TLS12_CIPHERS)
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
        ctx.set_ciphers(TLS12_CIPHERS)
        try:
            if self.cafile:
                ctx.load_verify_locations(self.cafile)
            else:
                ctx.load_default_certs()
            if self.certfile:
                ctx.load_cert_chain(self.certfile, self.keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"TLS: cannot load certificates: {exc}") from None
        # The name checked is server_hostname, or else the host the caller dials
        # (wrap_socket's server_hostname): a certificate for another host is refused.
        ctx.check_hostname = True
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


def _refuse_tls_mismatch(sock: socket.socket, peer: str, role: str) -> None:
    """Name the missing option when a plaintext end meets a TLS one."""
    first = _peek(sock, 2)
    if looks_like_tls(first):
        if role == "source":
            raise ProtocolError(
                f"target {peer} answered with TLS: it requires TLS; start the mirror with "
                "--tls-ca FILE (the CA that signed the target's certificate)")
        raise ProtocolError(
            f"source {peer} speaks TLS, but this target has no certificate: start it with "
            "--tls-cert FILE --tls-key FILE, or the source without --tls-ca")


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
    if key is not None:
        nonce_s = bytes.fromhex(key_id(key)) + nonce_s[KEY_ID_SIZE:]
        flags |= FLAG_KEY_ID
    send_all(
        sock,
        _HELLO.pack(MAGIC_SOURCE, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, flags, nonce_s),
        "handshake hello",
    )
    _refuse_tls_mismatch(sock, peer, "source")
    raw = recv_exact(sock, _CHALLENGE.size, "handshake challenge")
    magic, version, auth, _reserved, nonce_t, proof_t = _CHALLENGE.unpack(raw)
    if magic != MAGIC_TARGET:
        raise ProtocolError(f"{peer} is not a cyclemirror target (bad magic {magic!r})")
    if version == 0:
        _ok, text = _read_verdict(sock)
        refused = AuthenticationError if auth == AUTH_HMAC_SHA256 else ProtocolError
        raise refused(f"target {peer} refused the handshake: {text}")
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


def server_handshake(sock: socket.socket, key: bytes | list[bytes] | None) -> int:
    """Run the target side; return the agreed version or raise (after telling the peer).

    ``key`` None means insecure mode (the caller checked that it was asked for);
    a list holds every key the target accepts (see ``server_handshake_keys``).
    """
    return server_handshake_keys(sock, key)[0]


def _refuse(sock: socket.socket, peer: str, nonce_t: bytes, text: str, exc_class) -> None:
    # Version 0 is a refusal; its auth field says why (HMAC: the key; 0: the version).
    auth = AUTH_HMAC_SHA256 if exc_class is AuthenticationError else 0
    send_all(sock, _CHALLENGE.pack(MAGIC_TARGET, 0, auth, 0, nonce_t, bytes(PROOF_SIZE)),
             "handshake challenge")
    _send_verdict(sock, False, text)
    raise exc_class(f"handshake with {peer}: {text}")


def refuse_plaintext_source(sock: socket.socket) -> None:
    """A TLS target that received a plaintext HELLO: refuse it in words the source reads."""
    peer = peer_name(sock)
    recv_exact(sock, _HELLO.size, "handshake hello")
    _refuse(sock, peer, secrets.token_bytes(NONCE_SIZE),
            "this target requires TLS: start the mirror with --tls-ca FILE (the CA that "
            "signed the target's certificate)", ProtocolError)


def server_handshake_keys(sock: socket.socket,
                          keys: bytes | list[bytes] | None) -> tuple[int, str | None]:
    """The target side with a list of accepted keys: return (version, id of the key used).

    The source's key is the one whose id its nonce carries (FLAG_KEY_ID), or
    the first of ``keys`` for a source that sends no id.
    """
    peer = peer_name(sock)
    _refuse_tls_mismatch(sock, peer, "target")
    raw = recv_exact(sock, _HELLO.size, "handshake hello")
    magic, vmin, vmax, flags, nonce_s = _HELLO.unpack(raw)
    nonce_t = secrets.token_bytes(NONCE_SIZE)
    if magic != MAGIC_SOURCE:
        raise ProtocolError(f"{peer} is not a cyclemirror source (bad magic {magic!r})")
    version = min(vmax, PROTOCOL_VERSION)
    if vmin > vmax or version < max(vmin, MIN_PROTOCOL_VERSION):
        _refuse(sock, peer, nonce_t,
                f"no common protocol version: source offers {vmin}..{vmax}, target speaks "
                f"{MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}; upgrade the older side",
                ProtocolError)
    if isinstance(keys, bytes | bytearray):
        keys = [bytes(keys)]
    key = None
    if keys:
        by_id = {key_id(k): k for k in keys}
        if flags & FLAG_KEY_ID:
            wanted = nonce_s[:KEY_ID_SIZE].hex()
            key = by_id.get(wanted)
            if key is None:
                _refuse(sock, peer, nonce_t,
                        f"the source's key (id {wanted}) is not one of this target's keys "
                        f"(ids {', '.join(by_id)}); give the target that key file too, or "
                        "the source one of these", AuthenticationError)
        else:
            key = keys[0]
    used = key_id(key) if key is not None else None
    if key is None:
        send_all(
            sock,
            _CHALLENGE.pack(MAGIC_TARGET, version, AUTH_NONE, 0, nonce_t, bytes(PROOF_SIZE)),
            "handshake challenge",
        )
        recv_exact(sock, PROOF_SIZE, "handshake proof")
        _send_verdict(sock, True, "insecure mode")
        return version, None
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
    return version, used
