"""NBD option haggling on a TLS-only server (nbd/negotiation.py, nbd/tls.py), and the
psktool key file parser.

The input's first byte picks the target.  Odd: the rest is a ``psktool`` key
file for ``read_psk_file``.  Even: the rest is everything a client sends
after the greeting to a server that requires TLS and limits clients with a
``[nbd_clients]`` table: options before STARTTLS (each must get
NBD_REP_ERR_TLS_REQD or close), then, after a STARTTLS, what should be a
TLS ClientHello and is not (OpenSSL's handshake must fail cleanly, as a
TlsError).  Either way the rule is the harness's: a result or a
CycleMirrorError.
"""

from __future__ import annotations

import os
import struct
import tempfile
import threading

from cyclemirror.nbd import protocol as P
from cyclemirror.nbd.access import ClientAccess, ClientRule
from cyclemirror.nbd.backends import release_backend
from cyclemirror.nbd.negotiation import negotiate
from cyclemirror.nbd.tls import NbdTls, read_psk_file
from fuzz import nbdsetup
from fuzz.harness import clean
from fuzz.tcp import tcp_pair

MAX_LEN = 4096
_stopping = threading.Event()
_dir = tempfile.mkdtemp(prefix="cm-fuzz-nbdtls-")
_keys = os.path.join(_dir, "keys.psk")
with open(_keys, "w") as _fh:
    _fh.write("alice:" + "11" * 32 + "\nbob:" + "22" * 32 + "\n")
_tls = NbdTls(psk_file=_keys, handshake_timeout=1.0)
_access = ClientAccess({"alice": ClientRule(("v",)), "*": ClientRule(("ro",), readonly=True)})


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", P.IHAVEOPT, option, len(data)) + data


def seeds() -> list[bytes]:
    flags = struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)
    go = struct.pack(">I", 1) + b"v" + struct.pack(">H", 0)
    # the start of a TLS 1.3 ClientHello record: handshake, TLS 1.0 record version
    hello = bytes.fromhex("16030100f4010000f00303") + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00"
    return [
        b"\x00" + flags + opt(P.OPT_LIST) + opt(P.OPT_GO, go) + opt(P.OPT_STARTTLS) + hello,
        b"\x00" + flags + opt(P.OPT_STARTTLS, b"x") + opt(P.OPT_EXPORT_NAME, b"v"),
        b"\x00" + flags + opt(P.OPT_STARTTLS) + opt(P.OPT_LIST),
        b"\x01alice:" + b"11" * 32 + b"\nbob:00\n# comment\n",
        b"\x01\xff\xfe:00\n",
    ]


def test_one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] & 1:
        path = os.path.join(_dir, "fuzzed.psk")
        with open(path, "wb") as fh:
            fh.write(data[1:])
        result = clean(read_psk_file, path)
        if isinstance(result, dict):
            assert all(isinstance(k, bytes) and 1 <= len(k) <= 512 for k in result.values())
        return
    ours, peer = tcp_pair()
    drainer = nbdsetup.client(peer, data[1:])
    channels = []
    try:
        ours.settimeout(2.0)
        result = clean(negotiate, ours, nbdsetup.lookup, nbdsetup.list_names, _stopping,
                       tls=_tls, on_tls=channels.append, access=_access)
        if result is not None and not isinstance(result, Exception):
            release_backend(result.backend)
            raise AssertionError("a client without a TLS handshake reached an export")
    finally:
        for channel in channels:
            channel.finish(1.0)
        ours.close()
        drainer.join(5)
        peer.close()
